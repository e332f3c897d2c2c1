"""Finding, checksumming and downloading data files.

Search order for a data set called NAME (first directory holding the expected files wins):
``data_dir`` if given (and its usual sub-folders), else ``$CROSSLAYER_DATA/NAME``,
``$CROSSLAYER_DATA``, ``~/.cache/crosslayer/NAME`` and any system location of the data set
(e.g. ``/usr/share/datasets/fashion-mnist`` from Debian's ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from crosslayer.errors import DataError


def cache_dir(name: str) -> Path:
    """Where ``--download`` puts NAME when no data_dir is given."""
    env = os.environ.get("CROSSLAYER_DATA")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "crosslayer"
    return base / name


def search_dirs(name: str, data_dir, subdirs=(), system=()) -> list[Path]:
    """Candidate directories, in order, for data set NAME (see module docstring)."""
    if data_dir is not None:
        bases = [Path(data_dir).expanduser()]
    else:
        bases = []
        env = os.environ.get("CROSSLAYER_DATA")
        if env:
            bases += [Path(env).expanduser() / name, Path(env).expanduser()]
        bases += [Path.home() / ".cache" / "crosslayer" / name]
        bases += [Path(p) for p in system]
    out = []
    for b in bases:
        for d in [b, *(b / s for s in subdirs)]:
            if d not in out:
                out.append(d)
    return out


def find_first(dirs: list[Path], names) -> Path | None:
    """First existing file among ``dir/name`` for dir in dirs, name in names (dirs vary slowest)."""
    for d in dirs:
        for n in names:
            p = d / n
            if p.is_file():
                return p
    return None


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_md5(path: Path, md5: str) -> None:
    got = md5sum(path)
    if got != md5:
        raise DataError(f"{path}: bad checksum: md5 {got}, expected {md5} (corrupt or partial download; delete it and retry)")


def download(url: str, dest_dir: Path, filename: str, md5: str | None) -> Path:
    """Download URL to dest_dir/filename with torchvision's helper (skipped if a file with the right md5 is there)."""
    from torchvision.datasets.utils import download_url

    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / filename
    if path.is_file() and (md5 is None or md5sum(path) == md5):
        return path
    try:
        download_url(url, str(dest_dir), filename=filename, md5=None)
    except Exception as e:  # network errors come in many types (URLError, HTTPError, OSError, RuntimeError)
        raise DataError(f"{url}: download failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not path.is_file():
        raise DataError(f"{path}: download of {url} produced no file")
    if md5 is not None:
        check_md5(path, md5)
    return path
