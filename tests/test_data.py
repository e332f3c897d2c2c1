"""Data package: official-format readers, variants, errors and the two loader paths."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from crosslayer.data import DATASETS, build_loader, bundle_from_tensors, load_dataset
from crosslayer.data.loaders import epoch_indices
from crosslayer.data.transforms import Augment
from crosslayer.errors import DataError
from tests import data_fixtures as fx

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Keep the default search path away from the user's real cache."""
    monkeypatch.setenv("CROSSLAYER_DATA", str(tmp_path / "no-such-cache"))


# ---------------------------------------------------------------- synthetic / registry

def test_synthetic_bundle():
    b = load_dataset("synthetic")
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 3, 32)
    assert len(b.train) == 512 and len(b.test) == 256 and b.val is None and not b.augment
    x, y = b.train[0]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and isinstance(y, int)
    xs = b.train_tensors[0].float().div(255)
    z = (xs - torch.tensor(b.mean).view(1, 3, 1, 1)) / torch.tensor(b.std).view(1, 3, 1, 1)
    assert abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 1) < 0.05
    assert torch.equal(load_dataset("synthetic").test_tensors[0], b.test_tensors[0])  # deterministic


def test_val_split_and_limit():
    b = load_dataset("synthetic+", val_size=100, seed=3, limit=300)
    assert len(b.train) == 200 and len(b.val) == 100 and len(b.test) == 256
    assert b.augment and b.val.aug is None
    b2 = load_dataset("synthetic+", val_size=100, seed=3, limit=300)
    assert torch.equal(b.val_tensors[0], b2.val_tensors[0])
    b3 = load_dataset("synthetic+", val_size=100, seed=4, limit=300)
    assert not torch.equal(b.val_tensors[1], b3.val_tensors[1]) or not torch.equal(b.val_tensors[0], b3.val_tensors[0])
    full = load_dataset("synthetic").train_tensors[0][:300]  # val + train partition the first 300
    allx = torch.cat([b.train_tensors[0], b.val_tensors[0]]).flatten(1)
    assert sorted(map(bytes, allx.numpy())) == sorted(map(bytes, full.flatten(1).numpy()))
    with pytest.raises(DataError, match="val_size"):
        load_dataset("synthetic", val_size=512)


def test_unknown_name_lists_valid():
    with pytest.raises(DataError, match="unknown data set.*c10\\+.*fashion-mnist.*imagefolder"):
        load_dataset("cifar11")
    assert "c100+" in DATASETS and "svhn" in DATASETS


# ---------------------------------------------------------------- IDX (Fashion-MNIST / MNIST)

@pytest.mark.parametrize("gz", [True, False])
def test_idx_fixture(tmp_path, gz):
    fx.make_idx_dir(tmp_path, gz=gz)
    b = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert (b.in_channels, b.image_size, b.num_classes) == (1, 28, 10)
    assert b.train_tensors[0].shape == (20, 1, 28, 28) and b.test_tensors[0].shape == (10, 1, 28, 28)
    assert b.train_tensors[1].tolist() == [i % 10 for i in range(20)]
    assert b.classes[0] == "T-shirt/top" and b.mean == (0.2860,)
    m = load_dataset("mnist", data_dir=tmp_path)
    assert m.classes[3].startswith("3")


def test_idx_errors(tmp_path):
    with pytest.raises(DataError, match=r"mnist: files not found: expected train-images-idx3-ubyte.*one of: .*empty"):
        load_dataset("mnist", data_dir=tmp_path / "empty")
    fx.make_idx_dir(tmp_path, gz=False)
    img = tmp_path / "train-images-idx3-ubyte"
    good = img.read_bytes()
    img.write_bytes(good[:-5])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: IDX data truncated"):
        load_dataset("mnist", data_dir=tmp_path)
    img.write_bytes(b"\x00\x00\x0d\x03" + good[4:])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: bad IDX magic"):
        load_dataset("mnist", data_dir=tmp_path)
    img.write_bytes(good)
    fx.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(10, 10), gz=False)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: label 10 out of range"):
        load_dataset("mnist", data_dir=tmp_path)


def test_idx_corrupt_gzip(tmp_path):
    fx.make_idx_dir(tmp_path, gz=True)
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes()[:15])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: cannot read"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_default_location(monkeypatch):
    b = load_dataset("fashion-mnist")  # data_dir=None finds /usr/share/datasets/fashion-mnist
    assert b.train_tensors[0].shape == (60000, 1, 28, 28) and b.test_tensors[0].shape == (10000, 1, 28, 28)
    assert torch.bincount(b.train_tensors[1]).tolist() == [6000] * 10
    x = b.train_tensors[0].float().div_(255)
    assert abs(float(x.mean()) - b.mean[0]) < 1e-3 and abs(float(x.std()) - b.std[0]) < 1e-3
    assert b.source == str(FMNIST)


# ---------------------------------------------------------------- loaders

def test_loader_basic_and_channels_last():
    b = load_dataset("synthetic", val_size=64)
    for fast in (True, False):
        L = build_loader(b, "train", 100, "cpu", train=True, fast=fast, channels_last=True)
        assert len(L) == 5 and L.num_samples == 448
        xs = list(L)
        assert [x.shape[0] for x, _ in xs] == [100, 100, 100, 100, 48]
        assert xs[0][0].is_contiguous(memory_format=torch.channels_last) and xs[0][1].dtype == torch.int64
        L = build_loader(b, "val", 100, "cpu", train=False, fast=fast, drop_last=True)
        assert len(L) == 0 and list(L) == []
    assert build_loader(b, "train", 64, "cpu", train=True).fast


def test_fast_and_dataloader_same_batches_without_aug():
    b = load_dataset("synthetic", limit=200)
    for train in (True, False):
        a = build_loader(b, "train", 32, "cpu", train=train, fast=True, seed=5)
        c = build_loader(b, "train", 32, "cpu", train=train, fast=False, seed=5)
        a.set_epoch(2), c.set_epoch(2)
        for (x1, y1), (x2, y2) in zip(a, c, strict=True):
            assert torch.equal(y1, y2) and torch.allclose(x1, x2, atol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_sharding_two_ranks_covers(train):
    b = load_dataset("synthetic", limit=101)
    n = 101
    got = []
    for rank in range(2):
        L = build_loader(b, "train", 8, "cpu", train=train, rank=rank, world_size=2, seed=7)
        L.set_epoch(4)
        idx = epoch_indices(n, train=train, seed=7, epoch=4, rank=rank, world_size=2)
        if train:
            ref = list(torch.utils.data.DistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=True, seed=7))
            s = torch.utils.data.DistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=True, seed=7)
            s.set_epoch(4)
            assert idx.tolist() == list(s) and L.num_samples == 51 and ref != list(s)
        labels = torch.cat([y for _, y in L])
        assert torch.equal(labels, b.train_tensors[1][idx])
        got += idx.tolist()
    if train:
        assert len(got) == 102 and set(got) == set(range(n))
    else:
        assert sorted(got) == list(range(n))


@pytest.mark.parametrize("fast", [True, False])
def test_resume_mid_epoch_exact(fast):
    b = load_dataset("synthetic+" if fast else "synthetic", limit=300)
    L = build_loader(b, "train", 32, "cpu", train=True, fast=fast, seed=1)
    L.set_epoch(3)
    full = list(L)
    L.set_epoch(3, start_batch=4)
    rest = list(L)
    assert len(rest) == len(full) - 4
    for (x1, y1), (x2, y2) in zip(full[4:], rest, strict=True):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)
    L.set_epoch(4)
    assert not torch.equal(next(iter(L))[1], full[0][1])


def _coord_bundle(n=512):
    r = torch.arange(32)
    img = torch.stack([(10 + 7 * r)[:, None].expand(32, 32), (10 + 7 * r)[None, :].expand(32, 32), torch.full((32, 32), 200)])
    x = img.to(torch.uint8).expand(n, 3, 32, 32).clone()
    y = torch.zeros(n, dtype=torch.int64)
    return bundle_from_tensors("coord", (x, y), (x[:4], y[:4]), ["a"], (0.5,) * 3, (0.25,) * 3, Augment(4, True)), img


def _classify(xs, img):
    """Index (flip, dy, dx) of each augmented image among the 2*9*9 possible ones (and max residual)."""
    z = (img.float() / 255 - 0.5) / 0.25
    p = torch.nn.functional.pad(z, (4, 4, 4, 4))
    cands = []
    for flip in (0, 1):
        q = p.flip(-1) if flip else p
        cands += [q[:, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
    c = torch.stack(cands).flatten(1)
    d = torch.cdist(xs.flatten(1).double(), c.double(), compute_mode="donot_use_mm_for_euclid_dist")
    best = d.min(1)
    return best.indices, float(best.values.max())


def test_augmentation_same_distribution_both_paths():
    from scipy.stats import chi2_contingency, chisquare

    b, img = _coord_bundle()
    torch.manual_seed(0)
    counts = []
    for fast in (True, False):
        L = build_loader(b, "train", 256, "cpu", train=True, fast=fast, seed=0)
        xs = []
        for e in range(4):
            L.set_epoch(e)
            xs += [x for x, _ in L]
        k, resid = _classify(torch.cat(xs), img)
        assert resid < 1e-4  # every output is exactly one legal flip/crop of the image
        cnt = torch.bincount(k, minlength=162).numpy()
        assert abs(cnt[81:].sum() / cnt.sum() - 0.5) < 0.05  # flip p = 0.5
        assert chisquare(cnt.reshape(2, 9, 9).sum((0, 2))).pvalue > 1e-3  # dy uniform over 0..8
        assert chisquare(cnt.reshape(2, 9, 9).sum((0, 1))).pvalue > 1e-3  # dx uniform
        counts.append(cnt)
    assert chi2_contingency(np.stack(counts)).pvalue > 1e-3  # same joint distribution
    # and no augmentation when evaluating the train split
    x, _ = next(iter(build_loader(b, "train", 8, "cpu", train=False)))
    assert torch.allclose(x, ((img.float() / 255 - 0.5) / 0.25).expand(8, 3, 32, 32))
