"""CIFAR-10 / CIFAR-100 from the official python-version files.

Accepted layouts (first found wins): the extracted folder ``cifar-10-batches-py/`` (data_batch_1..5,
test_batch, batches.meta) or ``cifar-100-python/`` (train, test, meta), given directly or under
data_dir; or the archive ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, read in place
(members are streamed, nothing is extracted). The batches are pickles: they are read with
:class:`RestrictedUnpickler`, which refuses every global except the numpy array reconstructors,
so a crafted file cannot run code.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from crosslayer.data.files import cache_dir, download, search_dirs
from crosslayer.errors import DataError, MissingData

SPECS = {
    "cifar10": dict(
        folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
        train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
        meta="batches.meta", names_key="label_names", labels_key="labels", num_classes=10,
    ),
    "cifar100": dict(
        folder="cifar-100-python", archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=["train"], test=["test"], meta="meta", names_key="fine_label_names", labels_key="fine_labels",
        num_classes=100,
    ),
}  # URLs and archive md5s as in torchvision.datasets.CIFAR10 / CIFAR100


def _np_reconstructors():
    import numpy

    core = getattr(numpy, "_core", None) or numpy.core
    allowed = {
        ("numpy", "ndarray"): numpy.ndarray,
        ("numpy", "dtype"): numpy.dtype,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x / 2.x names
        allowed[(mod, "_reconstruct")] = core.multiarray._reconstruct
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):  # protocol-5 pickles of numpy >= 1.16
        allowed[(mod, "_frombuffer")] = core.numeric._frombuffer
    return allowed


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside the numpy allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves numpy's array/dtype reconstructors; any other global raises."""

    _allowed = None

    def find_class(self, module, name):
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _np_reconstructors()
        obj = self._allowed.get((module, name))
        if obj is None:
            raise ForbiddenGlobal(f"forbidden global {module}.{name}")
        return obj


def safe_load(f, what: str):
    """Unpickle a CIFAR file object with :class:`RestrictedUnpickler`; DataError on anything bad."""
    try:
        obj = RestrictedUnpickler(f, encoding="bytes").load()
    except ForbiddenGlobal as e:
        raise DataError(f"{what}: refused pickle ({e}; official CIFAR files only hold numpy arrays, lists, bytes, ints)") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError, MemoryError) as e:
        raise DataError(f"{what}: truncated or corrupt pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{what}: expected a dict in the pickle, found {type(obj).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


class _Source:
    """Reads members either from the extracted folder or straight out of the .tar.gz."""

    def __init__(self, folder: Path | None = None, archive: Path | None = None, inner: str = ""):
        self.folder, self.archive, self.inner = folder, archive, inner
        self.tar = None
        if archive is not None:
            try:
                self.tar = tarfile.open(archive, "r:gz")
                self.members = {m.name: m for m in self.tar.getmembers() if m.isfile()}
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                raise DataError(f"{archive}: truncated or corrupt archive ({type(e).__name__}: {e})") from e

    def label(self, member: str) -> str:
        return f"{self.archive}:{self.inner}/{member}" if self.tar else str(self.folder / member)

    def load(self, member: str):
        what = self.label(member)
        if self.tar is None:
            with open(self.folder / member, "rb") as f:
                return safe_load(f, what)
        m = self.members.get(f"{self.inner}/{member}")
        if m is None:
            raise DataError(f"{self.archive}: archive lacks {self.inner}/{member}")
        try:
            raw = self.tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(f"{what}: truncated or corrupt archive ({type(e).__name__}: {e})") from e
        return safe_load(io.BytesIO(raw), what)

    def close(self):
        if self.tar is not None:
            self.tar.close()


def _find(family: str, data_dir, download_ok: bool) -> _Source:
    s = SPECS[family]
    need = s["train"] + s["test"] + [s["meta"]]
    dirs = search_dirs(family, data_dir, subdirs=(s["folder"],))
    for d in dirs:
        if all((d / f).is_file() for f in need):
            return _Source(folder=d)
    for d in dirs:
        if (d / s["archive"]).is_file():
            return _Source(archive=d / s["archive"], inner=s["folder"])
    if download_ok:
        dest = Path(data_dir).expanduser() if data_dir is not None else cache_dir(family)
        path = download(s["url"], dest, s["archive"], s["md5"])
        return _Source(archive=path, inner=s["folder"])
    raise MissingData(family, [f"{s['folder']}/{{{','.join(need)}}}", s["archive"]], dirs)


def _read_split(src: _Source, members, spec) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for m in members:
        d = src.load(m)
        what = src.label(m)
        if "data" not in d or spec["labels_key"] not in d:
            raise DataError(f"{what}: missing key {'data' if 'data' not in d else spec['labels_key']!r} (have {sorted(d)})")
        x, y = d["data"], d[spec["labels_key"]]
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
            shape = getattr(x, "shape", None)
            raise DataError(f"{what}: 'data' must be uint8 N x 3072 (3x32x32), got {type(x).__name__} {getattr(x, 'dtype', '')} {shape}")
        try:
            y = np.asarray(y, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise DataError(f"{what}: labels are not integers ({e})") from e
        if y.shape[0] != x.shape[0]:
            raise DataError(f"{what}: {y.shape[0]} labels for {x.shape[0]} images")
        if y.size and (y.min() < 0 or y.max() >= spec["num_classes"]):
            bad = int(y.max()) if y.max() >= spec["num_classes"] else int(y.min())
            raise DataError(f"{what}: label {bad} out of range for {spec['num_classes']} classes")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def load_cifar(family: str, data_dir=None, download: bool = False):
    """Return ((x_train, y_train), (x_test, y_test), classes, source) as torch uint8/int64 tensors."""
    import torch

    spec = SPECS[family]
    src = _find(family, data_dir, download)
    try:
        train = _read_split(src, spec["train"], spec)
        test = _read_split(src, spec["test"], spec)
        meta = src.load(spec["meta"])
    finally:
        src.close()
    names = meta.get(spec["names_key"])
    if not isinstance(names, list) or len(names) != spec["num_classes"]:
        raise DataError(f"{src.label(spec['meta'])}: {spec['names_key']!r} must list {spec['num_classes']} class names")
    classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    source = str(src.archive) if src.archive else str(src.folder)
    t = lambda p: (torch.from_numpy(np.ascontiguousarray(p[0])), torch.from_numpy(p[1]))  # noqa: E731
    return t(train), t(test), classes, source
