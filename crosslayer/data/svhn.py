"""SVHN (cropped digits) from the official ``train_32x32.mat``, ``extra_32x32.mat``, ``test_32x32.mat``.

Each file holds ``X`` (32 x 32 x 3 x N uint8) and ``y`` (N x 1, labels 1..10 where 10 means the
digit 0 → mapped to 0 here). Read with ``scipy.io.loadmat`` (MATLAB v5 format, no pickles).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crosslayer.data.files import cache_dir, download, search_dirs
from crosslayer.errors import DataError, MissingData

BASE = "http://ufldl.stanford.edu/housenumbers/"
MD5 = {  # torchvision.datasets.SVHN.split_list
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
    "extra_32x32.mat": "a93ce644f1a588dc4d68dda5feec44a7",
}
CLASSES = [str(i) for i in range(10)]


def read_mat(path: Path, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN .mat file -> (uint8 N x 3 x 32 x 32, int64 N labels 0..9), written into ``out`` if given."""
    from scipy.io import loadmat

    try:
        m = loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # scipy raises ValueError, OSError, MatReadError, TypeError ... on bad files
        raise DataError(f"{path}: truncated or corrupt .mat file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if "X" not in m or "y" not in m:
        raise DataError(f"{path}: expected variables X and y, found {sorted(k for k in m if not k.startswith('__'))}")
    x, y = m["X"], m["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: X must be uint8 32x32x3xN, got {x.dtype} {x.shape}")
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if y.shape[0] != x.shape[3]:
        raise DataError(f"{path}: {y.shape[0]} labels for {x.shape[3]} images")
    if y.size and (y.min() < 1 or y.max() > 10):
        bad = int(y.min()) if y.min() < 1 else int(y.max())
        raise DataError(f"{path}: label {bad} out of range for SVHN (1..10, 10 = digit 0)")
    y[y == 10] = 0
    if out is None:
        return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y
    if out.shape[0] != x.shape[3]:
        raise DataError(f"{path}: header says {out.shape[0]} images, data has {x.shape[3]}")
    out[...] = x.transpose(3, 2, 0, 1)
    return out, y


def _count(path: Path) -> int:
    from scipy.io import whosmat

    try:
        shapes = dict((n, s) for n, s, _ in whosmat(path))
    except Exception as e:
        raise DataError(f"{path}: truncated or corrupt .mat file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if "X" not in shapes or len(shapes["X"]) != 4:
        raise DataError(f"{path}: expected a 4-d variable X (32x32x3xN), found {shapes}")
    return int(shapes["X"][3])


def balanced_val_indices(labels, n_train: int, seed: int = 0, per_class: tuple[int, int] = (400, 200)):
    """The stochastic-depth SVHN validation split (yueatsprograms/Stochastic_Depth,
    ``svhn-dataset.lua``): ``per_class[0]`` images of each class from the train file (the first
    ``n_train`` of ``labels``) and ``per_class[1]`` of each class from extra (the rest), each drawn
    at random (the official code shuffles both files, then takes the first ones of each class).
    With fewer images of a class than asked (small ``--limit`` runs), all but one. Sorted int64."""
    import torch

    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    picked = []
    for lo, hi, k in ((0, min(n_train, len(labels)), per_class[0]), (n_train, len(labels), per_class[1])):
        part = labels[lo:hi]
        for c in range(10):
            idx = (part == c).nonzero().flatten()
            take = min(k, max(0, idx.numel() - 1))
            picked.append(idx[torch.randperm(idx.numel(), generator=g)[:take]] + lo)
    return torch.cat(picked).sort().values


def load_svhn(data_dir=None, download_ok: bool = False, extra: bool = True, return_train_count: bool = False):
    """Return ((x_train, y_train), (x_test, y_test), classes, source); train = train (+ extra).
    With ``return_train_count`` also the number of images that come from the train file (first)."""
    import torch

    files = ["train_32x32.mat"] + (["extra_32x32.mat"] if extra else []) + ["test_32x32.mat"]
    dirs = search_dirs("svhn", data_dir, subdirs=("svhn", "SVHN"))
    found = next((d for d in dirs if all((d / f).is_file() for f in files)), None)
    if found is None and download_ok:
        found = Path(data_dir).expanduser() if data_dir is not None else cache_dir("svhn")
        for f in files:
            download(BASE + f, found, f, MD5[f])
    if found is None:
        raise MissingData("svhn" if extra else "svhn-train", files, dirs)
    counts = [_count(found / f) for f in files[:-1]]
    xtr = np.empty((sum(counts), 3, 32, 32), np.uint8)  # filled in place: peak memory = result + one file
    ys, at = [], 0
    for f, n in zip(files[:-1], counts):
        ys.append(read_mat(found / f, xtr[at:at + n])[1])
        at += n
    ytr = np.concatenate(ys)
    xte, yte = read_mat(found / files[-1])
    t = torch.from_numpy
    out = (t(xtr), t(ytr)), (t(xte), t(yte)), CLASSES, str(found)
    return (*out, counts[0]) if return_train_count else out
