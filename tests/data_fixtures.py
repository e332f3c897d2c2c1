"""Tiny data files in exactly the official on-disk formats, for tests."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    arr = np.asarray(arr, dtype=np.uint8)
    raw = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path = Path(str(path) + ".gz") if gz else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


def make_idx_dir(root: Path, n_train=20, n_test=10, gz=True, num_classes=10, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(root / f"{split}-labels-idx1-ubyte", np.arange(n) % num_classes, gz)
    return root


def py2_pickle(obj) -> bytes:
    """Pickle like the official CIFAR files (Python 2 cPickle, protocol 2, numpy 1.x): str as
    BINSTRING, arrays via ``numpy.core.multiarray._reconstruct``. Handles dict/list/bytes/int/uint8 ndarray."""
    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def enc(o) -> bytes:
        if isinstance(o, dict):
            return b"}(" + b"".join(enc(k) + enc(v) for k, v in o.items()) + b"u"
        if isinstance(o, list):
            return b"](" + b"".join(enc(v) for v in o) + b"e"
        if isinstance(o, bytes):
            return s(o)
        if isinstance(o, (int, np.integer)):
            return b"K" + bytes([int(o)]) if 0 <= o < 256 else b"J" + struct.pack("<i", int(o))
        if isinstance(o, np.ndarray) and o.dtype == np.uint8:
            dtype = (b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R" + b"(K\x03" + s(b"|")
                     + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
            shape = b"(" + b"".join(enc(int(d)) for d in o.shape) + b"t"
            return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
                    + b"(K\x01" + shape + dtype + b"\x89" + s(np.ascontiguousarray(o).tobytes()) + b"tb")
        raise TypeError(type(o))

    return b"\x80\x02" + enc(obj) + b"."


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(py2_pickle(obj))


def make_cifar10(root: Path, per_batch=6, n_test=8, seed=0) -> Path:
    """root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} with the official keys."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        _dump(d / name, {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}.png".encode() for i in range(n)],
        })
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(d / "batches.meta", {b"num_cases_per_batch": per_batch, b"label_names": [s.encode() for s in names], b"num_vis": 3072})
    return d


def make_cifar100(root: Path, n_train=12, n_test=8, seed=0) -> Path:
    """root/cifar-100-python/{train, test, meta} with fine and coarse labels."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    for name, n in (("train", n_train), ("test", n_test)):
        _dump(d / name, {
            b"filenames": [f"img{i}.png".encode() for i in range(n)],
            b"batch_label": name.encode(),
            b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
            b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        })
    _dump(d / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                       b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return d


def tar_folder(folder: Path, archive: Path) -> Path:
    Path(archive).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return archive


def make_svhn(root: Path, n_train=10, n_extra=6, n_test=5, seed=0) -> Path:
    """root/{train,extra,test}_32x32.mat: X is 32x32x3xN uint8, y is Nx1 with 10 for digit 0."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("extra", n_extra), ("test", n_test)):
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)  # 1..10, 10 = digit 0
        savemat(root / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": y})
    return root


def evil_pickle(marker: Path) -> bytes:
    """A pickle that would create ``marker`` via os.system if unpickled unrestricted."""

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    return pickle.dumps({b"data": Evil(), b"labels": [0]}, protocol=4)


def make_imagefolder(root: Path, splits=("train", "val"), classes=("cat", "dog"), per_class=3, size=(12, 10)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for s in splits:
        for c in classes:
            d = root / s / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def io_bytes(b: bytes):
    return io.BytesIO(b)
