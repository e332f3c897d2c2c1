"""``imagefolder:ROOT``: ROOT/train/<class>/*.png|jpg… and ROOT/val/<class>/… (or ROOT/test).

Read with ``torchvision.datasets.ImageFolder`` (images converted to RGB). ``image_size`` (the
``--image-size N`` flag of ``train`` and ``eval``) resizes the shorter side to N (antialiased) and
centre-crops N x N, so folders of mixed sizes and shapes work; without it images are used at their
native size, which must be square and the same for all images (checked on the first image, and per
image on load).
``resize_size`` (with ``image_size``) resizes the shorter side to it before the centre crop, as
torchvision's evaluation transform (256, then 224). Normalised with the ImageNet mean/std unless
``mean``/``std`` are given (fine-tuning: the starting weights'). ``imagefolder+:`` adds flip + zero-pad (size/8) + random crop,
after normalisation like the CIFAR variants. No tensors: the DataLoader path is used.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torchvision.transforms import v2 as T

from crosslayer.data.bundle import IMAGENET, DatasetBundle
from crosslayer.data.transforms import Augment, sample_transform
from crosslayer.errors import DataError


class _Subset(torch.utils.data.Subset):
    aug = None


def _folder(root: Path, transform, size: int | None = None):
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise DataError(f"{root}: missing folder (expected class sub-folders with images)")
    try:
        ds = ImageFolder(str(root), transform=transform, loader=partial(_rgb_loader, size=size))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{root}: empty ImageFolder: {str(e).splitlines()[0]}") from e
    if len(ds) == 0:
        raise DataError(f"{root}: empty ImageFolder (no images in class sub-folders)")
    return ds


def _rgb_loader(path, size: int | None = None):
    """PIL RGB image; with ``size`` (native-size data sets) it must be size x size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: unreadable image ({type(e).__name__})") from e
    if size is not None and img.size != (size, size):
        raise DataError(f"{path}: image is {img.size[0]}x{img.size[1]} but the data set's images are {size}x{size}; "
                        f"pass image_size (--image-size N) to resize")
    return img


def load_imagefolder(name, root, augment, val_size=0, seed=0, limit=None, image_size=None, *, mean=None, std=None,
                     resize_size=None):
    if not root:
        raise DataError(f"{name}: give the root folder as imagefolder:/path/to/root")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root}: image folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; an image folder holds train/ and val/ (or test/) sub-folders")
    test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"{root}: ImageFolder root needs train/ and val/ (or test/) sub-folders")
    probe = _folder(root / "train", None)
    if image_size is None:
        w, h = probe.loader(probe.samples[0][0]).size
        if w != h:
            raise DataError(f"{probe.samples[0][0]}: image is {w}x{h}, not square; pass image_size "
                            f"(--image-size N) to resize and crop")
        size, geo, check = w, [], w
    else:
        size, check = int(image_size), None
        geo = [T.Resize(int(resize_size or size), antialias=True), T.CenterCrop(size)]
    aug = Augment(pad=max(1, size // 8), flip=True) if augment else None
    if mean is None or std is None:
        mean, std = IMAGENET["mean"], IMAGENET["std"]
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def transform(with_aug):
        ts = [T.PILToTensor(), *geo, T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
        extra = sample_transform(aug, size) if with_aug else None
        return T.Compose(ts + ([extra] if extra is not None else []))

    def make(split_dir, with_aug):
        return _folder(split_dir, transform(with_aug), check)

    train_a, test = make(root / "train", augment), make(test_dir, False)
    if test.classes != train_a.classes:
        raise DataError(f"{test_dir}: classes {test.classes} differ from train/ classes {train_a.classes}")

    def pick(n, k):  # `limit`: evenly spaced, since ImageFolder lists images sorted by class
        return list(range(n)) if k is None or k >= n else [int(i * n / k) for i in range(k)]

    tr_idx, te_idx = pick(len(train_a), limit), pick(len(test), limit)
    val_idx = []
    if val_size:
        if not 0 < val_size < len(tr_idx):
            raise DataError(f"{root / 'train'}: val_size={val_size} must be between 1 and {len(tr_idx) - 1} "
                            f"(training images)")
        perm = torch.randperm(len(tr_idx), generator=torch.Generator().manual_seed(seed)).tolist()
        val_idx = sorted(tr_idx[i] for i in perm[:val_size])
        tr_idx = sorted(tr_idx[i] for i in perm[val_size:])

    def subset(ds, idx, with_aug):
        s = _Subset(ds, idx)
        s.aug = aug if with_aug else None
        return s

    cache = {}

    def factory(split, with_aug):
        key = (split, bool(with_aug))
        if key not in cache:
            if split == "test":
                cache[key] = subset(make(test_dir, with_aug), te_idx, with_aug)
            else:
                cache[key] = subset(make(root / "train", with_aug), tr_idx if split == "train" else val_idx, with_aug)
        return cache[key]

    b = DatasetBundle(
        name=name, num_classes=len(train_a.classes), in_channels=3, image_size=size, classes=list(train_a.classes),
        mean=mean, std=std, augment=augment, source=str(root), aug=aug, _factory=factory,
    )
    b.train = subset(train_a, tr_idx, augment)
    b.val = factory("val", False) if val_idx else None
    b.test = subset(test, te_idx, False)
    return b
