"""Data package: official-format readers, variants, errors and the two loader paths."""

from __future__ import annotations

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
    fx.write_idx(img, np.zeros((20, 32, 32)), gz=False)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: images are 32x32, mnist images are 28x28"):
        load_dataset("mnist", data_dir=tmp_path)
    img.write_bytes(good)
    fx.write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(9), gz=False)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: 9 labels but t10k-images-idx3-ubyte has 10 images"):
        load_dataset("mnist", data_dir=tmp_path)
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
    b = load_dataset("synthetic", limit=100)
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
    b = load_dataset("synthetic+", limit=300 if fast else 100)
    L = build_loader(b, "train", 32 if fast else 8, "cpu", train=True, fast=fast, seed=1)
    L.set_epoch(3)
    full = list(L)
    L.set_epoch(3, start_batch=4)
    rest = list(L)
    assert len(rest) == len(full) - 4
    for (x1, y1), (x2, y2) in zip(full[4:], rest, strict=True):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)
    L.set_epoch(4)
    assert not torch.equal(next(iter(L))[1], full[0][1])
    if not fast:  # per-sample seeding: same batches with worker processes, global RNG untouched
        torch.manual_seed(0)
        before = torch.rand(3)
        torch.manual_seed(0)
        L = build_loader(b, "train", 8, "cpu", train=True, fast=False, seed=1, num_workers=2)
        L.set_epoch(3, start_batch=10)
        for (x1, y1), (x2, y2) in zip(full[10:], L, strict=True):
            assert torch.equal(y1, y2) and torch.equal(x1, x2)
        assert torch.equal(torch.rand(3), before)
        torch.manual_seed(0)
        L = build_loader(b, "train", 8, "cpu", train=True, fast=False, seed=1, num_workers=0)
        L.set_epoch(3, start_batch=10)
        rest = []
        for x, y in L:
            torch.rand(5)  # the training step uses the global RNG between batches
            rest.append((x, y))
        after = torch.rand(3)
        assert all(torch.equal(a[0], c[0]) for a, c in zip(full[10:], rest, strict=True))
        torch.manual_seed(0)
        for _ in rest:
            torch.rand(5)
        assert torch.equal(torch.rand(3), after)  # loading did not consume or reseed the caller's RNG


def _coord_bundle(n=512):
    r = torch.arange(32)
    img = torch.stack([(10 + 7 * r)[:, None].expand(32, 32), (10 + 7 * r)[None, :].expand(32, 32), torch.full((32, 32), 200)])
    x = img.to(torch.uint8).expand(n, 3, 32, 32).clone()
    y = torch.zeros(n, dtype=torch.int64)
    return bundle_from_tensors("coord", (x, y), (x[:4], y[:4]), ["a"], (0.5,) * 3, (0.25,) * 3, Augment(4, True)), img


def _classify(xs, img):
    """Index flip*81 + dy*9 + dx of each augmented image (decoded from the coordinate-coded centre
    pixels) and the max deviation from that exact flip/crop of the image."""
    z = (img.float() / 255 - 0.5) / 0.25
    p = torch.nn.functional.pad(z, (4, 4, 4, 4))
    px = (xs[:, :2, 16, 16:18] * 0.25 + 0.5) * 255  # (n, [row, col], [x=16, x=17]) original coordinates
    row, col = ((px - 10) / 7).round().long().unbind(1)
    flip = (col[:, 1] < col[:, 0]).long()
    dy = row[:, 0] - 12
    dx = torch.where(flip.bool(), 19 - col[:, 0], col[:, 0] - 12)
    k = flip * 81 + dy * 9 + dx
    cands = torch.stack([(p.flip(-1) if f else p)[:, a:a + 32, b:b + 32] for f in (0, 1) for a in range(9) for b in range(9)])
    return k, float((cands[k] - xs).abs().max())


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


# ---------------------------------------------------------------- CIFAR

def test_cifar10_folder_and_archive(tmp_path):
    d = fx.make_cifar10(tmp_path / "a")
    b = load_dataset("c10", data_dir=tmp_path / "a")
    assert b.train_tensors[0].shape == (30, 3, 32, 32) and b.test_tensors[0].shape == (8, 3, 32, 32)
    assert b.classes[0] == "airplane" and b.num_classes == 10 and not b.augment
    assert b.mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255)) and b.std[2] == pytest.approx(66.7 / 255)
    # row-major 3072 = 1024 R, 1024 G, 1024 B
    from crosslayer.data.cifar import safe_load

    with open(d / "data_batch_2", "rb") as f:
        raw = safe_load(f, "x")
    assert np.array_equal(b.train_tensors[0][6].numpy(), raw["data"][0].reshape(3, 32, 32))
    assert b.train_tensors[1][6] == raw["labels"][0]
    x, _ = b.test[0]
    ref = (b.test_tensors[0][0].float() / 255 - torch.tensor(b.mean).view(3, 1, 1)) / torch.tensor(b.std).view(3, 1, 1)
    assert torch.allclose(x, ref, atol=1e-5)
    # the official .tar.gz, read in place, same content; also found via the folder given directly
    fx.tar_folder(d, tmp_path / "cifar-10-python.tar.gz")
    a = load_dataset("c10+", data_dir=tmp_path)
    assert a.source.endswith("cifar-10-python.tar.gz") and a.augment
    assert torch.equal(a.train_tensors[0], b.train_tensors[0]) and torch.equal(a.test_tensors[1], b.test_tensors[1])
    assert load_dataset("c10", data_dir=d).source == str(d)


def test_cifar100_fine_labels(tmp_path):
    d = fx.make_cifar100(tmp_path)
    b = load_dataset("c100+", data_dir=tmp_path)
    assert b.num_classes == 100 and b.classes[5] == "fine5" and b.train_tensors[0].shape == (12, 3, 32, 32)
    from crosslayer.data.cifar import safe_load

    with open(d / "train", "rb") as f:
        assert b.train_tensors[1].tolist() == safe_load(f, "x")["fine_labels"]
    assert b.mean == pytest.approx((129.3 / 255, 124.1 / 255, 112.4 / 255))
    fx.tar_folder(d, tmp_path / "z" / "cifar-100-python.tar.gz")
    assert torch.equal(load_dataset("c100", data_dir=tmp_path / "z").train_tensors[1], b.train_tensors[1])


def test_malicious_pickle_refused_and_not_executed(tmp_path):
    d = fx.make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    (d / "data_batch_3").write_bytes(fx.evil_pickle(marker))
    with pytest.raises(DataError, match=r"data_batch_3: refused pickle \(forbidden global (posix|os|nt)\.system"):
        load_dataset("c10", data_dir=tmp_path)
    assert not marker.exists()
    import pickle

    for payload in (pickle.dumps(eval), pickle.dumps(os.getcwd), pickle.dumps(np.load)):
        (d / "data_batch_3").write_bytes(payload)
        with pytest.raises(DataError, match="forbidden global"):
            load_dataset("c10", data_dir=tmp_path)
    from crosslayer.data.cifar import RestrictedUnpickler

    u = RestrictedUnpickler(fx.io_bytes(b""))
    assert callable(u.find_class("numpy.core.multiarray", "_reconstruct"))  # official (numpy 1.x) pickles
    assert u.find_class("numpy", "ndarray") is np.ndarray


def test_cifar_errors(tmp_path):
    with pytest.raises(DataError, match=r"cifar10: files not found: expected cifar-10-batches-py/.*cifar-10-python.tar.gz in one of: "):
        load_dataset("c10", data_dir=tmp_path)
    d = fx.make_cifar10(tmp_path)
    good = (d / "test_batch").read_bytes()
    (d / "test_batch").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"test_batch: truncated or corrupt pickle"):
        load_dataset("c10", data_dir=tmp_path)
    import pickle

    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, protocol=4))
    with pytest.raises(DataError, match=r"test_batch: label 10 out of range for 10 classes"):
        load_dataset("c10", data_dir=tmp_path)
    (d / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, protocol=4))
    with pytest.raises(DataError, match=r"test_batch: 'data' must be uint8 N x 3072"):
        load_dataset("c10", data_dir=tmp_path)
    (d / "test_batch").write_bytes(good)
    arch = fx.tar_folder(d, tmp_path / "t" / "cifar-10-python.tar.gz")
    arch.write_bytes(arch.read_bytes()[:2000])
    with pytest.raises(DataError, match=r"cifar-10-python.tar.gz: truncated or corrupt archive"):
        load_dataset("c10", data_dir=tmp_path / "t")


def test_download_checks_md5(tmp_path, monkeypatch):
    import torchvision.datasets.utils as U

    calls = []

    def fake_download(url, root, filename=None, md5=None):
        calls.append(url)
        Path(root, filename).write_bytes(b"not the real archive")

    monkeypatch.setattr(U, "download_url", fake_download)
    with pytest.raises(DataError, match=r"cifar-10-python.tar.gz: bad checksum: md5 .* expected c58f30108f718f92721af3b95e74349a"):
        load_dataset("c10", data_dir=tmp_path, download=True)
    assert calls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]

    def offline(url, root, filename=None, md5=None):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(U, "download_url", offline)
    with pytest.raises(DataError, match=r"train_32x32.mat: download failed: OSError"):
        load_dataset("svhn", data_dir=tmp_path / "s", download=True)


# ---------------------------------------------------------------- SVHN

def test_svhn(tmp_path):
    fx.make_svhn(tmp_path)
    b = load_dataset("svhn", data_dir=tmp_path)
    assert b.train_tensors[0].shape == (16, 3, 32, 32) and b.test_tensors[0].shape == (5, 3, 32, 32)
    assert b.train_tensors[1][:10].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # 10 -> digit 0
    assert b.mean == (0.0,) * 3 and b.std == (1.0,) * 3 and not b.augment and b.classes[0] == "0"
    from scipy.io import loadmat

    X = loadmat(tmp_path / "extra_32x32.mat")["X"]
    assert np.array_equal(b.train_tensors[0][10 + 2].numpy(), X[:, :, :, 2].transpose(2, 0, 1))
    x, _ = b.train[12]
    assert torch.allclose(x, b.train_tensors[0][12].float() / 255)
    assert load_dataset("svhn-train", data_dir=tmp_path).train_tensors[0].shape[0] == 10
    assert len(load_dataset("svhn", data_dir=tmp_path, val_size=6).val) == 6


def test_svhn_errors(tmp_path):
    from scipy.io import savemat

    fx.make_svhn(tmp_path)
    (tmp_path / "extra_32x32.mat").unlink()
    with pytest.raises(DataError, match=r"svhn: files not found: expected train_32x32.mat, extra_32x32.mat, test_32x32.mat in one of: "):
        load_dataset("svhn", data_dir=tmp_path)
    fx.make_svhn(tmp_path)
    savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[11], [1]], np.uint8)})
    with pytest.raises(DataError, match=r"test_32x32.mat: label 11 out of range"):
        load_dataset("svhn", data_dir=tmp_path)
    savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.array([[1], [1]], np.uint8)})
    with pytest.raises(DataError, match=r"test_32x32.mat: X must be uint8 32x32x3xN"):
        load_dataset("svhn", data_dir=tmp_path)
    p = tmp_path / "train_32x32.mat"
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(DataError, match=r"train_32x32.mat: truncated or corrupt .mat file"):
        load_dataset("svhn", data_dir=tmp_path)


# ---------------------------------------------------------------- ImageFolder

def test_imagefolder(tmp_path):
    fx.make_imagefolder(tmp_path, splits=("train", "test"), per_class=4, size=(12, 12))
    b = load_dataset(f"imagefolder:{tmp_path}", val_size=2)
    assert b.classes == ["cat", "dog"] and b.image_size == 12 and b.in_channels == 3
    assert len(b.train) == 6 and len(b.val) == 2 and len(b.test) == 8 and b.train_tensors is None
    x, y = b.train[0]
    assert x.shape == (3, 12, 12) and y in (0, 1)
    L = build_loader(b, "train", 4, "cpu", train=True)
    assert not L.fast and [x.shape[0] for x, _ in L] == [4, 2]
    r = load_dataset(f"imagefolder+:{tmp_path}", image_size=8, limit=4)
    assert r.augment and r.image_size == 8 and len(r.train) == 4 and sorted(int(r.train[i][1]) for i in range(4)) == [0, 0, 1, 1]
    assert r.train[0][0].shape == (3, 8, 8)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="needs train/ and val/"):
        load_dataset(f"imagefolder:{tmp_path}")
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"train: empty ImageFolder"):
        load_dataset(f"imagefolder:{tmp_path}")
    fx.make_imagefolder(tmp_path / "r", size=(12, 10))
    with pytest.raises(DataError, match=r"0.png: image is 12x10, not square"):
        load_dataset(f"imagefolder:{tmp_path / 'r'}")
    fx.make_imagefolder(tmp_path / "m", size=(8, 8))
    from PIL import Image

    Image.new("RGB", (9, 9)).save(tmp_path / "m" / "val" / "dog" / "1.png")
    b = load_dataset(f"imagefolder:{tmp_path / 'm'}")
    with pytest.raises(DataError, match=r"val/dog/1.png: image is 9x9 but the data set's images are 8x8; pass image_size"):
        list(build_loader(b, "test", 4, "cpu", train=False))
    assert load_dataset(f"imagefolder:{tmp_path / 'm'}", image_size=8).test[4][0].shape == (3, 8, 8)


def test_bad_image_one_line_error_from_workers(tmp_path):
    fx.make_imagefolder(tmp_path, size=(8, 8))
    (tmp_path / "train" / "dog" / "9.png").write_bytes(b"not a png")
    b = load_dataset(f"imagefolder:{tmp_path}")
    for workers in (0, 1):
        L = build_loader(b, "train", 16, "cpu", train=False, num_workers=workers)
        with pytest.raises(DataError) as e:
            list(L)
        assert str(e.value).endswith("9.png: unreadable image (UnidentifiedImageError)") and "\n" not in str(e.value)


def test_pin_memory_summary_and_shared_device_copy():
    b = load_dataset("synthetic")
    assert build_loader(b, "test", 8, "cuda", train=False, fast=False).loader.pin_memory  # no GPU needed to build
    assert not build_loader(b, "test", 8, "cpu", train=False, fast=False).loader.pin_memory
    assert b.summary().startswith("synthetic: 512 train / 0 val / 256 test, 3x32x32, 10 classes")
    a = build_loader(b, "train", 8, "cpu", train=True)
    c = build_loader(b, "train", 8, "cpu", train=False)
    assert a.images is c.images and "tensor" not in repr(b)


def test_download_success_paths(tmp_path, monkeypatch):
    """--download: official URLs, mirror fallback, md5 accepted, files then read from the download dir."""
    import torchvision.datasets.utils as U

    from crosslayer.data import cifar, idx
    from crosslayer.data.files import md5sum

    src = fx.make_idx_dir(tmp_path / "src")
    arch = fx.tar_folder(fx.make_cifar10(tmp_path / "csrc"), tmp_path / "csrc" / "cifar-10-python.tar.gz")
    files = {p.name: p for p in [*src.iterdir(), arch]}
    monkeypatch.setitem(idx.INFO["mnist"], "md5", {k: md5sum(v) for k, v in files.items() if "idx" in k})
    monkeypatch.setitem(cifar.SPECS["cifar10"], "md5", md5sum(arch))
    urls = []

    def fake(url, root, filename=None, md5=None):
        urls.append(url)
        if "ossci" in url:
            raise OSError("first mirror down")
        Path(root, filename).write_bytes(files[filename].read_bytes())

    monkeypatch.setattr(U, "download_url", fake)
    b = load_dataset("mnist", download=True)  # data_dir None -> $CROSSLAYER_DATA/mnist
    assert b.train_tensors[0].shape == (20, 1, 28, 28) and b.source.endswith("no-such-cache/mnist")
    assert urls[:2] == ["https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz",
                        "http://yann.lecun.com/exdb/mnist/train-images-idx3-ubyte.gz"]
    c = load_dataset("c10", data_dir=tmp_path / "dl", download=True)
    assert c.source == str(tmp_path / "dl" / "cifar-10-python.tar.gz") and c.train_tensors[0].shape[0] == 30
    n = len(urls)
    load_dataset("c10", data_dir=tmp_path / "dl", download=True)  # already there: no new download
    assert len(urls) == n
