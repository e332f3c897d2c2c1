"""Safe checkpoint loading: ``torch.load(weights_only=True)`` and a one-line diagnosis of bad files.

:func:`load_checkpoint` never unpickles code and turns every problem (missing, empty, truncated,
corrupt, unsafe pickle, not a crosslayer checkpoint, newer format) into one line naming the file.
:func:`load_resume_checkpoint` is ``--resume``'s choice between ``last.pt`` and ``last.pt.prev``;
:func:`verify_checkpoint` checks a file's integrity before it is kept as ``.prev``.
"""

from __future__ import annotations

import glob
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Callable

import torch

from crosslayer.errors import CheckpointError
from crosslayer.io import first_line, remove_quietly

FORMAT_VERSION = 1
PREV_SUFFIX = ".prev"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
RUN_DIR_CHECKPOINTS = ("best.pt", "last.pt")  # what a run directory stands for, in this order


def _describe_load_error(exc: BaseException, is_zip: bool) -> str:
    """What is wrong with a file ``torch.load`` choked on, in a few words."""
    msg = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in msg.lower().replace("_", " "):
        m = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"global[: ]+([\w.]+)", msg, re.I)
        what = f" ({m.group(1)})" if m else ""
        return (f"refusing to load: it holds Python objects{what}, not just tensors and plain "
                f"containers, and unpickling them could run code")
    if is_zip or isinstance(exc, EOFError) or "central directory" in msg:
        # a torch.save zip archive that does not read back: cut short or damaged
        return "truncated or corrupt file (incomplete write or damaged copy?)"
    kind = type(exc).__name__ if type(exc).__module__ == "builtins" else f"{type(exc).__module__}.{type(exc).__name__}"
    return f"corrupt or not a PyTorch checkpoint ({kind}: {first_line(exc, 100)})"


def _read_magic(path: str) -> bytes:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or first_line(e)})") from None
    if not magic:
        raise CheckpointError(f"{path}: empty file (0 bytes; incomplete write?)")
    return magic


def resolve_checkpoint(path) -> str:
    """``path`` itself, or for a run directory its ``best.pt``, else its ``last.pt``: every verb that
    reads a checkpoint (eval, reuse, predict, export) takes either."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path  # a missing file is reported by load_checkpoint ("no such checkpoint")
    for name in RUN_DIR_CHECKPOINTS:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise CheckpointError(f"{path}: a folder without {' or '.join(RUN_DIR_CHECKPOINTS)}; give a checkpoint file "
                          f"or a run directory written by `crosslayer train`")


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    Every problem (missing, empty, truncated, corrupt, unsafe pickle, not a crosslayer checkpoint,
    newer format) raises a one-line :class:`CheckpointError` ``"PATH: what is wrong"``."""
    path = os.fspath(path)
    magic = _read_magic(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says enough
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"{path}: {_describe_load_error(e, magic == _ZIP_MAGIC)}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a crosslayer checkpoint (no 'model' entry)")
    fmt = ckpt.get("format", FORMAT_VERSION)
    if isinstance(fmt, int) and fmt > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {fmt} is newer than this crosslayer "
                              f"understands ({FORMAT_VERSION}); upgrade crosslayer")
    return ckpt


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """None if ``path`` reads back completely, else what is wrong (a few words).

    ``torch.save`` writes a zip archive with a CRC-32 per record: every record is read and checked
    (no unpickling, no tensors built). A file in the legacy (non-zip) format is loaded instead."""
    path = os.fspath(path)
    try:
        magic = _read_magic(path)
        if magic != _ZIP_MAGIC:
            load_checkpoint(path)
            return None
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            if bad is not None:
                return f"record {bad} fails its CRC check (corrupt)"
            if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist()):
                return "not a PyTorch checkpoint (no data.pkl)"
    except CheckpointError as e:
        return str(e).split(": ", 1)[-1]
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        return f"truncated or corrupt file ({first_line(e, 80)})"
    return None


def _warn(msg: str) -> None:
    print(f"crosslayer: warning: {msg}", file=sys.stderr, flush=True)


def load_resume_checkpoint(out_dir: str | os.PathLike, map_location="cpu", name: str = "last.pt",
                           accept: Callable[[dict], str | None] | None = None):
    """The newest loadable checkpoint of a run directory: ``(state, path)`` or None if there is none.

    Tries ``OUT/last.pt`` then ``OUT/last.pt.prev``. ``accept(state)`` may refuse a candidate by
    returning why (e.g. a ``.prev`` left by another run: different model or data). A truncated,
    corrupt or refused ``last.pt`` gives ONE warning line on stderr naming the file and what is
    wrong, then the fallback is used. If files exist but none is usable, raises a one-line
    CheckpointError naming each file and its problem. Stale temporary files of killed writers are
    removed."""
    out_dir = os.fspath(out_dir)
    main = os.path.join(out_dir, name)
    prev = main + PREV_SUFFIX
    for stale in glob.glob(os.path.join(out_dir, f".{glob.escape(name)}*.tmp")):
        remove_quietly(stale)
    problems = []
    for i, candidate in enumerate((main, prev)):
        if not os.path.exists(candidate):
            continue
        try:
            state = load_checkpoint(candidate, map_location)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        refused = accept(state) if accept is not None else None
        if refused:
            problems.append(f"{candidate}: {refused}")
            continue
        if problems:
            _warn(f"{problems[0]}; resuming from {candidate} instead")
        elif i == 1:
            _warn(f"{main}: missing; resuming from {candidate} instead")
        return state, candidate
    if not problems:
        return None
    raise CheckpointError(f"{out_dir}: no loadable checkpoint to resume from ({'; '.join(problems)})")
