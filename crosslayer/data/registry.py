"""Data set variants by name, :class:`DatasetBundle` and :func:`load_dataset`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from crosslayer.data.bundle import DatasetBundle
from crosslayer.data.transforms import Augment
from crosslayer.data.whitening import apply_zca, fit_zca
from crosslayer.errors import DataError

_C10 = dict(mean=(125.3 / 255, 123.0 / 255, 113.9 / 255), std=(63.0 / 255, 62.1 / 255, 66.7 / 255))
_C100 = dict(mean=(129.3 / 255, 124.1 / 255, 112.4 / 255), std=(68.2 / 255, 65.4 / 255, 70.4 / 255))
_SVHN = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # pixels / 255, no standardisation (WRN, DenseNet)
_FMNIST = dict(mean=(0.2860,), std=(0.3530,))  # training-set statistics (60k images)
_MNIST = dict(mean=(0.1307,), std=(0.3081,))
_CIFAR_AUG = Augment(pad=4, flip=True)
_GRAY_AUG = Augment(pad=2, flip=False)


@dataclass(frozen=True)
class Variant:
    family: str  # cifar10, cifar100, svhn, svhn-train, fashion-mnist, mnist, synthetic
    aug: Augment | None
    mean: tuple
    std: tuple
    description: str


VARIANTS: dict[str, Variant] = {
    "c10": Variant("cifar10", None, **_C10, description="CIFAR-10, per-channel mean/std, no augmentation"),
    "c10+": Variant("cifar10", _CIFAR_AUG, **_C10,
        description="CIFAR-10 + flip, 4-px zero pad after normalisation, random 32x32 crop"),
    "c100": Variant("cifar100", None, **_C100, description="CIFAR-100 (fine labels), mean/std, no augmentation"),
    "c100+": Variant("cifar100", _CIFAR_AUG, **_C100, description="CIFAR-100 + flip, 4-px zero pad, random crop"),
    "svhn": Variant("svhn", None, **_SVHN,
        description="SVHN train+extra (604,388), pixels/255, no augmentation; test 26,032"),
    "svhn-train": Variant("svhn-train", None, **_SVHN,
        description="SVHN train only (73,257), pixels/255, no augmentation"),
    "fashion-mnist": Variant("fashion-mnist", None, **_FMNIST,
        description="Fashion-MNIST 28x28x1, mean/std, no augmentation"),
    "fashion-mnist+": Variant("fashion-mnist", _GRAY_AUG, **_FMNIST,
        description="Fashion-MNIST + 2-px zero pad, random 28x28 crop, NO flip"),
    "mnist": Variant("mnist", None, **_MNIST, description="MNIST 28x28x1, mean/std, no augmentation"),
    "mnist+": Variant("mnist", _GRAY_AUG, **_MNIST, description="MNIST + 2-px zero pad, random crop, no flip"),
    "synthetic": Variant("synthetic", None, (), (),
        description="random class-dependent 3x32x32 images, 10 classes, 512 train / 256 test (tests)"),
    "synthetic+": Variant("synthetic", _CIFAR_AUG, (), (), description="synthetic + CIFAR augmentation (tests)"),
}
FOLDER_PREFIXES = ("imagefolder:", "imagefolder+:")
# the image size of each family's files (image folders and ImageNet have none: they are resized)
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "svhn": 32, "svhn-train": 32, "fashion-mnist": 28, "mnist": 28,
               "synthetic": 32}

DATASETS: dict[str, str] = {k: v.description for k, v in VARIANTS.items()}
DATASETS["imagefolder:ROOT"] = ("ROOT/train and ROOT/val (or ROOT/test) class folders; ImageNet mean/std; native size "
                                "or --image-size N")
DATASETS["imagefolder+:ROOT"] = "same + flip and random crop of the zero-padded (size/8) image"
DATASETS["imagenet:ROOT"] = ("ROOT/train, ROOT/val class folders (ILSVRC-2012 layout); fb.resnet.torch augmentation: "
                             "random-resized crop 224, colour jitter, PCA lighting, flip; eval resize 256 + centre 224")


def _check_labels(y: torch.Tensor, num_classes: int, what: str):
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.max()) if int(y.max()) >= num_classes else int(y.min())
        raise DataError(f"{what}: label {bad} out of range for {num_classes} classes")


def bundle_from_tensors(name, train, test, classes, mean=None, std=None, aug=None, source="memory",
                        val_size=0, seed=0, limit=None, val_indices=None, normalize=None) -> DatasetBundle:
    """Build a bundle from (uint8 NxCxHxW, int64 N) train/test pairs (also for tests and custom data).

    ``limit`` keeps the first ``limit`` images of train and test; then ``val_size`` images are
    held out from train as a seeded random subset, or exactly the training images ``val_indices``
    (no augmentation on them). mean/std default to the per-channel statistics of the training
    images; ``normalize="pixel_mean_global_std"`` uses the training images' per-pixel mean image and
    one global standard deviation instead (the stochastic-depth code's ``preprocess``);
    ``normalize="zca"`` replaces the images by float32 ZCA-whitened ones, fitted on the training
    split (after the validation split is held out) and applied to every split
    (:mod:`crosslayer.data.whitening`, the Wide ResNet code's data), with an identity normalisation.
    """
    (xtr, ytr), (xte, yte) = train, test
    xtr, xte = torch.as_tensor(xtr), torch.as_tensor(xte)
    ytr, yte = torch.as_tensor(ytr, dtype=torch.int64), torch.as_tensor(yte, dtype=torch.int64)
    for x, y, split in ((xtr, ytr, "train"), (xte, yte, "test")):
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[0] != y.shape[0] or y.dim() != 1:
            raise DataError(f"{source}: {split} images must be uint8 NxCxHxW with N labels, got {x.dtype} "
                            f"{tuple(x.shape)} and labels {tuple(y.shape)}")
        _check_labels(y, len(classes), f"{source} ({split})")
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(f"{source}: train images {tuple(xtr.shape[1:])} and test images {tuple(xte.shape[1:])} "
                        f"differ in shape")
    if limit is not None:
        xtr, ytr, xte, yte = xtr[:limit], ytr[:limit], xte[:limit], yte[:limit]
    if normalize == "mean_std":
        normalize = None
    if normalize not in (None, "pixel_mean_global_std", "zca"):
        raise DataError(f"{source}: unknown normalisation {normalize!r} (mean_std, pixel_mean_global_std, zca)")
    if mean is None and normalize is None:
        f = xtr.float().div_(255)
        mean = tuple(f.mean(dim=(0, 2, 3)).tolist())
        std = tuple(f.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    val = None
    if val_size or val_indices is not None:
        vi, ti = _val_split(xtr.shape[0], val_size, seed, val_indices, source)
        val = (xtr[vi], ytr[vi])
        xtr, ytr = xtr[ti], ytr[ti]
    if normalize == "pixel_mean_global_std":  # statistics of the training split only
        mean, std = _pixel_mean_global_std(xtr)
    if normalize == "zca":  # fitted on the training split only; float images, identity affine (x * 1 + 0)
        zca = fit_zca(xtr)
        xtr, xte = apply_zca(xtr, *zca), apply_zca(xte, *zca)
        val = (apply_zca(val[0], *zca), val[1]) if val is not None else None
        mean, std = (0.0,) * int(xtr.shape[1]), (1 / 255,) * int(xtr.shape[1])
    if not isinstance(mean, torch.Tensor):
        mean = tuple(float(m) for m in mean)
    b = DatasetBundle(
        name=name, num_classes=len(classes), in_channels=int(xtr.shape[1]), image_size=int(xtr.shape[-1]),
        classes=list(classes), mean=mean, std=tuple(float(s) for s in std),
        augment=aug is not None, source=source, train_tensors=(xtr.contiguous(), ytr), val_tensors=val,
        test_tensors=(xte.contiguous(), yte), aug=aug,
    )
    b.train = b.dataset("train", augment=b.augment)
    b.val = b.dataset("val") if val is not None else None
    b.test = b.dataset("test")
    return b


def _val_split(n: int, val_size: int, seed: int, val_indices, source: str):
    """(validation indices, training indices), both sorted: ``val_indices`` as given, else a
    seeded uniform random subset of ``val_size`` of the ``n`` training images."""
    if val_indices is not None:
        vi = torch.as_tensor(val_indices, dtype=torch.int64).unique()
        if not 0 < vi.numel() < n or int(vi.max()) >= n:
            raise DataError(f"{source}: the validation split needs 1 to {n - 1} of the {n} training images")
    else:
        if not 0 < val_size < n:
            raise DataError(f"{source}: val_size={val_size} must be between 1 and {n - 1} (training images)")
        vi = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:val_size].sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[vi] = False
    return vi, keep.nonzero().flatten()


def _pixel_mean_global_std(x: torch.Tensor):
    """Per-pixel mean image (C, H, W) and one global standard deviation, on the 0-1 scale (the
    stochastic-depth code: ``mean = data:mean(1)``, ``std = data:std()``; the scale cancels)."""
    f = x.double().div_(255)
    mean = f.mean(0).float()
    std = float(f.std()) if f.numel() > 1 else 1.0
    return mean, (max(std, 1e-3),) * int(x.shape[1])


def with_padding(aug: Augment | None, pad_mode: str | None) -> Augment | None:
    """``aug`` with its crop padding set to ``pad_mode`` ("zero" or "reflect"; None keeps it)."""
    if aug is None or pad_mode is None:
        return aug
    modes = {"zero": "constant", "reflect": "reflect"}
    if pad_mode not in modes:
        raise DataError(f"pad mode {pad_mode!r} unknown; choose zero or reflect")
    return dataclasses.replace(aug, padding_mode=modes[pad_mode])


def synthetic(n_train=512, n_test=256, num_classes=10, size=32, channels=3):
    """Deterministic, learnable toy data: per-class smooth colour pattern + noise, uint8."""
    g = torch.Generator().manual_seed(1234)
    protos = torch.rand(num_classes, channels, 4, 4, generator=g)
    protos = torch.nn.functional.interpolate(protos, size=(size, size), mode="bilinear", align_corners=False)

    def make(n):
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        x = protos[y] * 160 + torch.rand(n, channels, size, size, generator=g) * 95
        return x.round().clamp(0, 255).to(torch.uint8), y

    return make(n_train), make(n_test), [f"class{i}" for i in range(num_classes)]


def _unknown(name) -> DataError:
    return DataError(f"{name}: unknown data set; valid: {', '.join(VARIANTS)}, imagefolder:ROOT, imagefolder+:ROOT, "
                     f"imagenet:ROOT")


def load_dataset(name: str, data_dir=None, download: bool = False, val_size: int = 0, seed: int = 0,
                 limit: int | None = None, image_size: int | None = None, *, pad_mode: str | None = None,
                 normalize: str | None = None, val_split: str | None = None,
                 crop_size: int | None = None, ten_crop: bool = False, mean=None, std=None,
                 resize_size: int | None = None) -> DatasetBundle:
    """Load data set variant ``name`` (see ``crosslayer.data`` docstring) into a :class:`DatasetBundle`.

    data_dir: directory with the files in their official formats (None: search the defaults, see
    ``crosslayer.data.files``); download: fetch missing files from the official URLs (md5-checked);
    val_size: hold out this many training images (seeded by ``seed``); limit: keep the first
    ``limit`` train and test images; image_size: image folders only, resize the shorter side to
    ``image_size`` and centre-crop a square (``--image-size``; default: the images' own size).
    The protocol options a preset may set (docs/protocols.md): pad_mode "zero" | "reflect" (the
    crop padding of augmented variants); normalize "pixel_mean_global_std" (mean image + one std);
    val_split "svhn_balanced" (SVHN train+extra: 400 images per class from train and 200 per class
    from extra, as the stochastic-depth code; ``val_size`` is then ignored). crop_size: ``imagenet:``
    only (default 224; evaluation resizes the shorter side to crop_size x 256/224 first). ten_crop:
    ``imagenet:`` only, the test split yields fb.resnet.torch's ten crops of each image.
    mean/std: normalise with these instead of the data set's own statistics (fine-tuning uses the
    starting weights'; not for ``imagenet:``, whose transform is fixed). resize_size: image folders
    with ``image_size``, resize the shorter side to this before the centre crop (torchvision's
    evaluation transform: 256 then 224).
    """
    if limit is not None and limit < 1:
        raise DataError(f"{name}: limit must be >= 1, got {limit}")
    if image_size is not None and not 1 <= int(image_size) <= 4096:
        raise DataError(f"{name}: image_size must be from 1 to 4096, got {image_size}")
    if name.startswith("imagenet:"):
        from crosslayer.data.imagenet import load_imagenet

        return load_imagenet(name, name[len("imagenet:"):] or data_dir, val_size, seed, limit, crop_size or 224,
                             ten_crop)
    if ten_crop:
        raise DataError(f"--ten-crop: only for imagenet:ROOT (fb.resnet.torch's 10-crop of the 256-pixel image), "
                        f"not {name}")
    for pre in FOLDER_PREFIXES:
        if name.startswith(pre):
            from crosslayer.data.folder import load_imagefolder

            aug = pre == "imagefolder+:"
            return load_imagefolder(name, name[len(pre):] or data_dir, aug, val_size, seed, limit, image_size,
                                    mean=mean, std=std, resize_size=resize_size)
    v = VARIANTS.get(name)
    if v is None:
        raise _unknown(name)
    if mean is None or std is None:
        mean, std = (v.mean or None), (v.std or None)
    val_indices = None
    if val_split not in (None, "random", "svhn_balanced"):
        raise DataError(f"validation split {val_split!r} unknown; choose random or svhn_balanced")
    if val_split == "svhn_balanced" and v.family != "svhn":
        raise DataError(f"{name}: the svhn_balanced validation split needs data svhn (train + extra)")
    if v.family == "synthetic":
        tr, te, classes = synthetic()
        source = "synthetic (seeded)"
    elif v.family in ("fashion-mnist", "mnist"):
        from crosslayer.data.idx import load_idx_dataset

        splits, classes, source = load_idx_dataset(v.family, data_dir, download)
        tr, te = (torch.from_numpy(a) for a in splits["train"]), (torch.from_numpy(a) for a in splits["test"])
    elif v.family in ("cifar10", "cifar100"):
        from crosslayer.data.cifar import load_cifar

        tr, te, classes, source = load_cifar(v.family, data_dir, download)
    elif v.family in ("svhn", "svhn-train"):
        from crosslayer.data.svhn import load_svhn

        tr, te, classes, source, n_train = load_svhn(data_dir, download, extra=v.family == "svhn",
                                                     return_train_count=True)
        if val_split == "svhn_balanced":
            from crosslayer.data.svhn import balanced_val_indices

            y = tr[1][:limit] if limit is not None else tr[1]
            val_indices = balanced_val_indices(y, n_train, seed)
    else:  # pragma: no cover
        raise _unknown(name)
    b = bundle_from_tensors(name, tuple(tr), tuple(te), classes, mean, std, with_padding(v.aug, pad_mode), source,
                            val_size, seed, limit, val_indices, normalize)
    if image_size is not None and int(image_size) != b.image_size:
        raise DataError(f"{name}: --image-size {image_size}: only image folders (imagefolder:ROOT) are resized; "
                        f"{name} images are {b.image_size}x{b.image_size}")
    return b
