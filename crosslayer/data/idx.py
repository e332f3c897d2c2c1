"""MNIST and Fashion-MNIST from IDX files (``train-images-idx3-ubyte[.gz]`` etc.).

The IDX header is parsed here: two zero bytes, a type byte (0x08 = unsigned byte, the only type
these data sets use), the number of dimensions, then one big-endian uint32 per dimension.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from crosslayer.data.files import download, find_first, search_dirs
from crosslayer.errors import DataError, MissingData

FILES = {  # split -> (images stem, labels stem)
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
INFO = {
    "fashion-mnist": dict(
        classes=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
        subdirs=("fashion-mnist", "FashionMNIST/raw", "FashionMNIST"),
        system=("/usr/share/datasets/fashion-mnist",),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={  # torchvision.datasets.FashionMNIST.resources
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "mnist": dict(
        classes=["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine"],
        subdirs=("mnist", "MNIST/raw", "MNIST"),
        system=("/usr/share/datasets/mnist",),
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        md5={  # torchvision.datasets.MNIST.resources
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read one IDX file (gzip-compressed if it ends in .gz) of unsigned bytes with ``ndim`` dims."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read: truncated or corrupt gzip ({type(e).__name__}: {e})") from e
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    zero, dtype, nd = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08 or nd != ndim:
        raise DataError(
            f"{path}: bad IDX magic 0x{raw[:4].hex()} (expected 0x0000080{ndim}: unsigned bytes, {ndim} dims)"
        )
    head = 4 + 4 * nd
    if len(raw) < head:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {head})")
    dims = struct.unpack(f">{nd}I", raw[4:head])
    need = int(np.prod(dims, dtype=np.int64))
    have = len(raw) - head
    if have != need:
        kind = "truncated" if have < need else "has trailing bytes"
        raise DataError(f"{path}: IDX data {kind}: {have} bytes, header dims {tuple(dims)} need {need}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims).copy()


def _locate(name: str, data_dir, download_ok: bool):
    info = INFO[name]
    dirs = search_dirs(name, data_dir, info["subdirs"], info["system"])
    stems = [s for pair in FILES.values() for s in pair]

    def lookup():
        for d in dirs:  # all four files from the same directory
            ps = {s: find_first([d], [s + ".gz", s, s.replace("-idx", ".idx")]) for s in stems}
            if all(ps.values()):
                return ps
        return None

    paths = lookup()
    if paths is None and download_ok:
        from crosslayer.data.files import cache_dir

        dest = Path(data_dir).expanduser() if data_dir is not None else cache_dir(name)
        for s in stems:
            fn = s + ".gz"
            err = None
            for m in info["mirrors"]:
                try:
                    download(m + fn, dest, fn, info["md5"][fn])
                    err = None
                    break
                except DataError as e:
                    err = e
            if err is not None:
                raise err
        dirs = [dest]
        paths = lookup()
    if paths is None:
        raise MissingData(name, [s + "[.gz]" for s in stems], dirs)
    return paths


def load_idx_dataset(name: str, data_dir=None, download: bool = False):
    """Return dict split -> (uint8 N x 1 x 28 x 28, int64 N), classes, source."""
    paths = _locate(name, data_dir, download)
    classes = INFO[name]["classes"]
    out = {}
    for split, (istem, lstem) in FILES.items():
        x = read_idx(paths[istem], 3)
        if x.shape[1:] != (28, 28):
            raise DataError(f"{paths[istem]}: images are {x.shape[1]}x{x.shape[2]}, {name} images are 28x28")
        y = read_idx(paths[lstem], 1).astype(np.int64)
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{paths[lstem]}: {y.shape[0]} labels but {paths[istem].name} has {x.shape[0]} images")
        if y.size and y.max() >= len(classes):
            raise DataError(f"{paths[lstem]}: label {int(y.max())} out of range for {name} (0..{len(classes) - 1})")
        out[split] = (x[:, None], y)
    return out, classes, str(paths[FILES["train"][0]].parent)
