"""Batch iterators: a device-resident fast path and a DataLoader path with the same order.

Order of an epoch (both paths, :func:`epoch_indices`): for training, ``randperm(N)`` from a CPU
generator seeded with ``seed + epoch``, padded by repetition to a multiple of ``world_size`` and
strided by rank — exactly ``torch.utils.data.DistributedSampler(shuffle=True, drop_last=False)``.
For evaluation (``train=False``): the natural order, strided by rank, **without padding**, so that
summing per-rank counts counts every image exactly once (ranks may differ by one image).
``set_epoch(epoch, start_batch=k)`` makes the next iterations start at batch k of that epoch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from crosslayer.data.transforms import augment_batch, norm_affine
from crosslayer.errors import DataError


def epoch_indices(n: int, *, train: bool, seed: int, epoch: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices this rank visits in this epoch (int64 CPU tensor)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if not train:
        return torch.arange(rank, n, world_size)
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    idx = torch.randperm(n, generator=g)
    total = math.ceil(n / world_size) * world_size
    if total > n:
        reps = math.ceil((total - n) / n)
        idx = torch.cat([idx] + [idx] * reps)[:total]
    return idx[rank:total:world_size]


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, epoch, rank, batch ...)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class _Base:
    def __init__(self, n, batch_size, device, train, rank, world_size, seed, drop_last, channels_last):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.n, self.batch_size, self.device, self.train = n, int(batch_size), torch.device(device), train
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.drop_last, self.channels_last = drop_last, channels_last
        self.epoch, self.start_batch = 0, 0
        self.num_samples = len(epoch_indices(n, train=train, seed=seed, epoch=0, rank=rank, world_size=world_size))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Order = f(seed, epoch); iterations then start at batch ``start_batch`` (mid-epoch resume)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        """Batches per (full) epoch for this rank."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def _indices(self) -> torch.Tensor:
        idx = epoch_indices(self.n, train=self.train, seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size)
        if self.drop_last:
            idx = idx[: len(self) * self.batch_size]
        return idx

    def _finish(self, x):
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


class DeviceLoader(_Base):
    """Whole uint8 split on the device; normalise (+ flip/pad/crop) per batch on the device.

    Augmentation randomness of batch b comes from a generator seeded with
    ``mix_seed(seed, epoch, rank, b)``, so resuming at batch k reproduces batches k.. exactly.
    """

    fast = True

    def __init__(self, images, labels, mean, std, aug, batch_size, device, *, train, rank=0, world_size=1,
                 seed=0, drop_last=False, channels_last=False):
        super().__init__(images.shape[0], batch_size, device, train, rank, world_size, seed, drop_last, channels_last)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.scale, self.shift = norm_affine(mean, std, self.device)
        self.aug = aug if train else None

    def __iter__(self):
        idx = self._indices().to(self.device)
        bs = self.batch_size
        for b in range(self.start_batch, len(self)):
            sel = idx[b * bs:(b + 1) * bs]
            x = self.images.index_select(0, sel).float() * self.scale + self.shift
            if self.aug is not None:
                g = torch.Generator(device=self.device)
                g.manual_seed(mix_seed(self.seed, self.epoch, self.rank, b))
                x = augment_batch(x, self.aug, g)
            yield self._finish(x), self.labels.index_select(0, sel)


class _ListSampler(torch.utils.data.Sampler):
    """This epoch's indices from ``start_batch`` on; with ``seeded`` each item is (index, rng seed)."""

    def __init__(self, owner, seeded: bool):
        self.owner, self.seeded = owner, seeded

    def __iter__(self):
        o = self.owner
        start = o.start_batch * o.batch_size
        idx = o._indices()[start:].tolist()
        if not self.seeded:
            return iter(idx)
        base = mix_seed(o.seed, o.epoch, o.rank) & 0x7FFFFFFFFFFF  # + position in the epoch
        return iter([(i, base + start + k) for k, i in enumerate(idx)])

    def __len__(self):
        o = self.owner
        return max(0, len(o._indices()) - o.start_batch * o.batch_size)


class _SeededItems(torch.utils.data.Dataset):
    """``ds[(i, s)]`` = ``ds[i]`` with torch's default CPU generator seeded by s first, so per-sample
    random transforms are a function of (seed, epoch, position). The caller restores the generator
    (DataLoaderLoader does, per batch, when loading in the main process)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        i, s = key
        torch.default_generator.manual_seed(s)
        return self.ds[i]


class DataLoaderLoader(_Base):
    """torch DataLoader over a map-style Dataset (per-sample torchvision transforms on the CPU).

    Same order as :class:`DeviceLoader`. For training, sample k of the epoch is transformed with
    torch's RNG seeded from (seed, epoch, rank, k) — independent of ``num_workers`` and exact on a
    mid-epoch resume, like the fast path (but a different random stream from it).
    """

    fast = False

    def __init__(self, dataset, batch_size, device, *, train, num_workers=0, rank=0, world_size=1, seed=0,
                 drop_last=False, channels_last=False):
        super().__init__(len(dataset), batch_size, device, train, rank, world_size, seed, drop_last, channels_last)
        self.dataset = dataset
        self.generator = torch.Generator()
        self.loader = torch.utils.data.DataLoader(
            _SeededItems(dataset) if train else dataset, batch_size=self.batch_size,
            sampler=_ListSampler(self, seeded=train), num_workers=num_workers,
            pin_memory=self.device.type == "cuda", drop_last=False, generator=self.generator,
            persistent_workers=False,
        )

    def __iter__(self):
        self.generator.manual_seed(mix_seed(self.seed, self.epoch, self.rank))
        nb = self.device.type == "cuda"
        restore = self.train and self.loader.num_workers == 0  # keep the caller's CPU RNG stream intact
        try:
            it = iter(self.loader)
            while True:
                state = torch.default_generator.get_state() if restore else None
                try:
                    x, y = next(it)
                except StopIteration:
                    return
                finally:
                    if restore:
                        torch.default_generator.set_state(state)
                yield self._finish(x.to(self.device, non_blocking=nb)), y.to(self.device, non_blocking=nb)
        except DataError as e:  # from a worker the message carries the worker's traceback: keep one line
            lines = str(e).strip().splitlines()
            if len(lines) > 1:
                raise DataError(lines[-1].split("DataError: ", 1)[-1]) from None
            raise


def build_loader(bundle, split: str, batch_size: int, device, *, train: bool, fast=None, num_workers: int = 0,
                 rank: int = 0, world_size: int = 1, seed: int = 0, drop_last: bool = False,
                 channels_last: bool = False):
    """Iterator of (x normalised float on device, y int64 on device) for ``bundle.<split>``.

    ``train=True`` shuffles (order = f(seed, epoch)) and applies the bundle's augmentation;
    ``fast=None`` uses the device-resident path when the split has tensors. See module docstring.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, not {split!r}")
    ds = getattr(bundle, split)
    if ds is None:
        raise ValueError(f"{bundle.name} has no {split} split (use val_size > 0 for a validation split)")
    tensors = getattr(bundle, f"{split}_tensors")
    if fast is None:
        fast = tensors is not None
    if fast and tensors is None:
        raise ValueError(f"{bundle.name}: no {split} tensors for the fast path (use fast=False)")
    want_aug = bool(train and split == "train" and bundle.augment)
    aug = bundle.aug if want_aug else None
    common = dict(train=train, rank=rank, world_size=world_size, seed=seed, drop_last=drop_last, channels_last=channels_last)
    if fast:
        x, y = bundle.device_tensors(split, device)
        return DeviceLoader(x, y, bundle.mean, bundle.std, aug, batch_size, device, **common)
    if want_aug != (split == "train" and bundle.augment):  # e.g. train split evaluated without augmentation
        ds = bundle.dataset(split, augment=want_aug)
    return DataLoaderLoader(ds, batch_size, device, num_workers=num_workers, **common)
