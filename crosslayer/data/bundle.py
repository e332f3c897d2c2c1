"""What every loader returns: :class:`DatasetBundle` (metadata, Datasets per split, the in-memory
tensors), and the ImageNet statistics the folder loaders normalise with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from crosslayer.data.transforms import Augment, TensorImageDataset

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@dataclass
class DatasetBundle:
    """A loaded data set: metadata, torch Datasets per split and (when in memory) uint8 tensors.

    ``train``/``val``/``test`` yield (normalised float CxHxW, int); ``*_tensors`` are
    (uint8 NxCxHxW, int64 N) or None (ImageFolder). ``val`` is None unless ``val_size > 0``.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    classes: list
    mean: tuple
    std: tuple
    augment: bool
    source: str
    train: torch.utils.data.Dataset | None = field(default=None, repr=False)
    val: torch.utils.data.Dataset | None = field(default=None, repr=False)
    test: torch.utils.data.Dataset | None = field(default=None, repr=False)
    train_tensors: tuple | None = field(default=None, repr=False)
    val_tensors: tuple | None = field(default=None, repr=False)
    test_tensors: tuple | None = field(default=None, repr=False)
    aug: Augment | None = None  # the train augmentation (pad, flip), None without augmentation
    _factory: Callable | None = field(default=None, repr=False)
    _device_cache: dict = field(default_factory=dict, repr=False)

    def dataset(self, split: str, augment: bool = False):
        """A fresh Dataset of ``split`` with or without the train augmentation."""
        tensors = getattr(self, f"{split}_tensors")
        if tensors is not None:
            return TensorImageDataset(*tensors, self.mean, self.std, self.aug if augment else None)
        return self._factory(split, augment)

    def summary(self) -> str:
        """One line: name, sizes, shape, classes, source."""
        n = lambda d: len(d) if d is not None else 0  # noqa: E731
        return (f"{self.name}: {n(self.train)} train / {n(self.val)} val / {n(self.test)} test, "
                f"{self.in_channels}x{self.image_size}x{self.image_size}, {self.num_classes} classes, "
                f"augment={'yes' if self.augment else 'no'}, from {self.source}")

    def device_tensors(self, split: str, device):
        """``<split>_tensors`` moved to ``device`` once and shared by all loaders of this bundle."""
        key = (split, str(torch.device(device)))
        if key not in self._device_cache:
            x, y = getattr(self, f"{split}_tensors")
            self._device_cache[key] = (x.to(device), y.to(device))
        return self._device_cache[key]
