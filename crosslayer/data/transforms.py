"""Normalisation and the DenseNet/fb.resnet.torch augmentation, per sample and per batch.

Order (official Lua code, ``datasets/transforms.lua``): **normalise → horizontal flip (p=0.5) →
zero-pad by ``pad`` pixels → random crop back to the original size**. Padding after normalisation
means the pad value is 0 in normalised space (≈ the mean colour), not black. Wide ResNets pad by
reflection instead (``padding_mode="reflect"``: szagoruyko/wide-residual-networks,
``scripts/train_cifar.sh`` sets ``randomcrop_type=reflection``, ``nn.SpatialReflectionPadding``).

Normalisation is per channel (mean, std of C values) or, for the stochastic-depth protocol, a
per-pixel mean image (C x H x W) and one global standard deviation (:func:`norm_affine` takes both).

Two implementations with the same distribution (tested statistically):
* :class:`TensorImageDataset` — per sample with ``torchvision.transforms.v2`` (DataLoader path);
* :func:`augment_batch` — in batch on the tensor's device, randomness from a generator the caller
  seeds (device-resident fast path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T


@dataclass(frozen=True)
class Augment:
    """Train-time augmentation: ``flip`` = random horizontal flip p=0.5; ``pad`` = pad + random crop;
    ``padding_mode``: "constant" (zeros after normalisation) or "reflect"."""

    pad: int = 4
    flip: bool = True
    padding_mode: str = "constant"

    def __post_init__(self):
        if self.padding_mode not in ("constant", "reflect"):
            raise ValueError(f"padding_mode must be 'constant' or 'reflect', got {self.padding_mode!r}")


def norm_affine(mean, std, device=None):
    """(scale, shift) so that ``uint8 * scale + shift`` = ``(x/255 - mean)/std``, shaped (1, C, 1, 1),
    or (1, C, H, W) when ``mean`` is a per-pixel mean image (C, H, W)."""
    mean = torch.as_tensor(mean, dtype=torch.float32).to(device)
    std = torch.as_tensor(std, dtype=torch.float32).to(device)
    mean = mean.view(1, *mean.shape) if mean.dim() == 3 else mean.view(1, -1, 1, 1)
    std = std.view(1, -1, 1, 1)
    return 1.0 / (255.0 * std), -mean / std


def sample_transform(aug: Augment | None, size) -> T.Compose | None:
    """Per-sample torchvision transform applied AFTER normalisation (None = no augmentation)."""
    if aug is None:
        return None
    ts = []
    if aug.flip:
        ts.append(T.RandomHorizontalFlip(0.5))
    if aug.pad:
        ts.append(T.RandomCrop(size, padding=aug.pad, fill=0, padding_mode=aug.padding_mode))
    return T.Compose(ts) if ts else None


class TensorImageDataset(torch.utils.data.Dataset):
    """uint8 (N,C,H,W) images + int64 labels -> (normalised float CxHxW, int), augmented if ``aug``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, aug: Augment | None = None):
        self.images, self.labels = images, labels
        self.mean, self.std, self.aug = mean, tuple(std), aug
        self.transform = sample_transform(aug, tuple(images.shape[-2:]))
        scale, shift = norm_affine(mean, std)
        self._scale, self._shift = scale[0], shift[0]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i):
        x = self.images[i].float() * self._scale + self._shift
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])

    @property
    def tensors(self):
        return self.images, self.labels


def augment_batch(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """Flip + pad (zeros or reflection) + random crop a normalised float batch (N,C,H,W) on its own device.

    Same distribution as :func:`sample_transform`: each image flipped with p=0.5, then a crop offset
    (dy, dx) uniform in [0, 2*pad]^2 of the padded image. Done as one flat gather.
    """
    n, c, h, w = x.shape
    dev = x.device
    p = aug.pad
    flip = torch.rand(n, generator=generator, device=dev) < 0.5 if aug.flip else torch.zeros(n, dtype=torch.bool, device=dev)
    off = torch.randint(0, 2 * p + 1, (n, 2), generator=generator, device=dev) if p else torch.zeros(n, 2, dtype=torch.long, device=dev)
    hp, wp = h + 2 * p, w + 2 * p
    if p:
        x = F.pad(x, (p, p, p, p), mode=aug.padding_mode)
    rows = off[:, :1] + torch.arange(h, device=dev)  # (n, h) rows of the padded image
    cols = off[:, 1:] + torch.arange(w, device=dev)  # (n, w) columns of the (flipped) padded image
    cols = torch.where(flip[:, None], (wp - 1) - cols, cols)  # flip then crop
    lin = (rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return torch.gather(x.reshape(n, c, hp * wp), 2, lin).view(n, c, h, w)
