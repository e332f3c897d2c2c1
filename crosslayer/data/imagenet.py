"""``imagenet:ROOT``: ILSVRC-2012 (or any ROOT/train, ROOT/val class-folder tree) with the
fb.resnet.torch ImageNet pipeline, which both DenseNet (liuzhuang13/DenseNet) and DelugeNet
(xternalz/DelugeNets) trained with (facebook/fb.resnet.torch ``datasets/imagenet.lua``):

* train: random-resized crop to 224 (``RandomSizedCrop``: 8%-100% of the area, aspect ratio
  3/4-4/3, bicubic), colour jitter (brightness, contrast, saturation 0.4, random order), AlexNet PCA
  lighting noise (std 0.1, the eigen-values/vectors below), ImageNet mean/std normalisation,
  horizontal flip;
* evaluation: shorter side resized to 256, normalise, centre crop 224 (offsets rounded up); with ``ten_crop`` the
  ``TenCrop`` of ``transforms.lua`` (``-tenCrop``): the centre and four corner 224 crops of the
  image and of its mirror, stacked (10, C, 224, 224); the evaluation averages the 10 logits.

``crop_size`` scales both (eval resize = crop x 256/224) for small smoke runs. Differences from
the Lua code: torchvision's crop draws the aspect ratio log-uniformly (Lua: uniformly) and falls
back to a centre crop after 10 failed draws (Lua: resize + centre crop); the crop is resized as
uint8 (Lua: float). Colour jitter and lighting run on the float image, unclamped, as in Lua.

Images are decoded by the Dataset (PIL), i.e. in DataLoader worker processes with
``--num-workers N``; batches go to pinned memory on CUDA (``crosslayer.data.loaders``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from crosslayer.data.bundle import IMAGENET, DatasetBundle
from crosslayer.data.folder import _folder
from crosslayer.errors import DataError

MEAN, STD = IMAGENET["mean"], IMAGENET["std"]
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))


class Lighting(torch.nn.Module):
    """AlexNet-style PCA lighting noise (fb.resnet.torch ``transforms.lua`` ``Lighting``): add
    sum_j eigvec[:, j] * alpha_j * eigval_j to every pixel, alpha ~ N(0, alphastd^2), on [0, 1] RGB."""

    def __init__(self, alphastd: float = 0.1, eigval=PCA_EIGVAL, eigvec=PCA_EIGVEC):
        super().__init__()
        self.alphastd = alphastd
        self.register_buffer("eigval", torch.tensor(eigval))
        self.register_buffer("eigvec", torch.tensor(eigvec))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.alphastd == 0:
            return img
        alpha = torch.randn(3) * self.alphastd
        rgb = (self.eigvec * (alpha * self.eigval).view(1, 3)).sum(1)
        return img + rgb.view(3, 1, 1).to(img.dtype)


def _gray(img: torch.Tensor) -> torch.Tensor:
    """Luma of an RGB float image (1, H, W), the weights of ``transforms.lua`` ``grayscale``."""
    return 0.299 * img[0:1] + 0.587 * img[1:2] + 0.114 * img[2:3]


class ColorJitter(torch.nn.Module):
    """fb.resnet.torch ``transforms.lua`` ``ColorJitter``: brightness, contrast and saturation in a
    random order, each a blend ``alpha * img + (1 - alpha) * other`` with alpha ~ 1 + U(-var, var)
    and other = black (brightness), the mean luma (contrast) or the per-pixel luma (saturation).
    On a float image and unclamped, as in Lua (torchvision's ColorJitter clamps to [0, 1] / uint8)."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4):
        super().__init__()
        self.vars = {"brightness": brightness, "contrast": contrast, "saturation": saturation}

    @staticmethod
    def blend(img: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
        if kind == "brightness":
            return img * alpha
        other = _gray(img).mean() if kind == "contrast" else _gray(img)
        return img * alpha + (1 - alpha) * other

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if not img.is_floating_point():
            raise TypeError("ColorJitter: expects a float image (fb.resnet.torch jitters floats)")
        ops = [(k, v) for k, v in self.vars.items() if v]
        for i in torch.randperm(len(ops)).tolist():
            kind, var = ops[i]
            img = self.blend(img, kind, 1.0 + (2 * torch.rand(()).item() - 1) * var)
        return img


class CenterCrop(torch.nn.Module):
    """fb.resnet.torch ``transforms.lua`` ``CenterCrop``: offsets ceil((h - size) / 2), ceil((w - size) / 2)
    (torchvision rounds half to even: one pixel apart when the margin is odd)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        s, (h, w) = self.size, img.shape[-2:]
        y, x = math.ceil((h - s) / 2), math.ceil((w - s) / 2)
        return img[..., y:y + s, x:x + s]


class TenCrop(torch.nn.Module):
    """fb.resnet.torch ``transforms.lua`` ``TenCrop``: for the image and its horizontal mirror, the
    centre crop (:class:`CenterCrop`) and the top-left, top-right, bottom-left
    and bottom-right crops, in that order, stacked (10, C, size, size)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        s, (h, w) = self.size, img.shape[-2:]
        if h < s or w < s:
            raise ValueError(f"TenCrop: image {h}x{w} is smaller than the crop {s}")
        corners = [(0, 0), (0, w - s), (h - s, 0), (h - s, w - s)]
        centre = CenterCrop(s)
        return torch.stack([c for im in (img, img.flip(-1))
                            for c in [centre(im)] + [im[..., y:y + s, x:x + s] for y, x in corners]])


def train_transform(crop: int = 224) -> T.Compose:
    """The fb.resnet.torch training pipeline on a PIL image -> normalised float tensor."""
    return T.Compose([
        T.PILToTensor(),
        T.RandomResizedCrop(crop, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=InterpolationMode.BICUBIC,
                            antialias=True),
        T.ToDtype(torch.float32, scale=True),
        ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
        Lighting(0.1),
        T.Normalize(MEAN, STD),
        T.RandomHorizontalFlip(0.5),
    ])


def eval_transform(crop: int = 224, ten_crop: bool = False) -> T.Compose:
    """Resize the shorter side to crop x 256/224 (256 for 224), normalise, then the centre crop or
    (``ten_crop``) the ten crops of :class:`TenCrop`, (10, C, crop, crop)."""
    return T.Compose([
        T.PILToTensor(),
        T.Resize(round(crop * 256 / 224), interpolation=InterpolationMode.BICUBIC, antialias=True),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(MEAN, STD),
        TenCrop(crop) if ten_crop else CenterCrop(crop),
    ])


class _Split(torch.utils.data.Subset):
    aug = None  # augmentation is in the transform, not a crosslayer Augment


def _pick(n: int, k: int | None) -> list[int]:
    """``limit``: k evenly spaced indices (ImageFolder lists images sorted by class)."""
    return list(range(n)) if k is None or k >= n else [int(i * n / k) for i in range(k)]


def load_imagenet(name: str, root, val_size: int = 0, seed: int = 0, limit: int | None = None, crop: int = 224,
                  ten_crop: bool = False):
    """A :class:`~crosslayer.data.bundle.DatasetBundle` over ROOT/train and ROOT/val (no tensors:
    the DataLoader path). ``val_size`` holds out a seeded subset of train (evaluation transform).
    ``ten_crop``: the test split yields the ten crops of each image, (10, C, crop, crop)."""
    if not root:
        raise DataError(f"{name}: give the root folder as imagenet:/path/to/ILSVRC2012")
    if crop < 8:
        raise DataError(f"--crop-size: {crop} is too small (at least 8; ImageNet protocol: 224)")
    root = Path(root).expanduser()
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise DataError(f"{root}: ImageNet root needs train/ and val/ class folders (fb.resnet.torch layout)")
    folders = {}

    def folder(split: str, augment: bool, ten: bool = False):
        key = (split, augment, ten)
        if key not in folders:
            folders[key] = _folder(root / split, train_transform(crop) if augment else eval_transform(crop, ten))
        return folders[key]

    train, test = folder("train", True), folder("val", False)
    if test.classes != train.classes:
        raise DataError(f"{root / 'val'}: classes differ from train/ ({len(test.classes)} vs {len(train.classes)})")
    tr_idx, te_idx = _pick(len(train), limit), _pick(len(test), limit)
    val_idx = []
    if val_size:
        if not 0 < val_size < len(tr_idx):
            raise DataError(f"{root / 'train'}: val_size={val_size} must be between 1 and {len(tr_idx) - 1}")
        perm = torch.randperm(len(tr_idx), generator=torch.Generator().manual_seed(seed)).tolist()
        val_idx, tr_idx = sorted(tr_idx[i] for i in perm[:val_size]), sorted(tr_idx[i] for i in perm[val_size:])
    index = {"train": tr_idx, "val": val_idx, "test": te_idx}

    def factory(split: str, augment: bool):
        if split == "test":
            return _Split(folder("val", augment, ten_crop and not augment), index[split])
        return _Split(folder("train", augment), index[split])

    b = DatasetBundle(name=name, num_classes=len(train.classes), in_channels=3, image_size=crop,
                      classes=list(train.classes), mean=MEAN, std=STD, augment=True, source=str(root),
                      _factory=factory)
    b.train, b.test = factory("train", True), factory("test", False)
    b.val = factory("val", False) if val_idx else None
    return b
