"""Atomic file writes: every file a run writes (checkpoints, config.json, metrics, results, eval.json, ...).

:func:`atomic_write` is the only place that writes such a file:

1. the content goes to a temporary file ``.NAME.PID.tmp`` in the same directory (same file system,
   so the rename below is atomic), which is flushed and ``fsync``-ed;
2. an optional ``before_replace(path)`` hook runs (checkpoints keep the previous file as ``.prev``);
3. ``os.replace`` puts the temporary file onto ``NAME`` and the directory is ``fsync``-ed, so the
   rename itself survives a power loss.

A reader therefore sees either the old file or the complete new one, never a torn one. On any
failure the temporary file is removed, ``NAME`` is untouched, and a one-line
:class:`~crosslayer.errors.CrosslayerError` (or the class given as ``error``) says
``"PATH: could not write WHAT (why)"``. A KeyboardInterrupt or SystemExit mid-write also removes
the temporary file and is re-raised.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable
from typing import BinaryIO

from crosslayer.errors import CrosslayerError

Content = bytes | str | Callable[[BinaryIO], object]


def fsync_dir(directory: str) -> None:
    """``fsync`` a directory so that a rename inside it is durable (a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def beside_checkpoint(checkpoint: str, suffix: str) -> str:
    """``runs/x/best.pt`` -> ``runs/x/best<suffix>``: where an export of a checkpoint is written."""
    return (checkpoint[:-3] if checkpoint.endswith(".pt") else checkpoint) + suffix


def tmp_name(path: str) -> str:
    """The temporary name :func:`atomic_write` uses for ``path``: ``.NAME.PID.tmp`` next to it."""
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.{os.getpid()}.tmp")


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (torch's zip writer wraps the file's OSError in a RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    line = text[0].strip() if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def write_error(path: str, exc: BaseException, what: str = "", error: type[Exception] = CrosslayerError) -> Exception:
    """``error("PATH: could not write WHAT (why)")`` for a failed write."""
    ose = os_error_in(exc)
    if ose is not None:
        why = ose.strerror or (os.strerror(ose.errno) if ose.errno else first_line(ose))
    else:
        why = f"{type(exc).__name__}: {first_line(exc)}"
    return error(f"{path}: could not write{' ' + what if what else ''} ({why})")


def refuse_overwrite(path: str | os.PathLike, force: bool = False, *, flag: str = "--out",
                     reads: Iterable = ()) -> None:
    """The one rule of every verb that writes a file the user names: an existing ``path`` is replaced
    only with ``--force``, and never when it is a file the command reads (``reads``: its checkpoint),
    ``--force`` or not. One-line CrosslayerError otherwise; checks only, writes nothing."""
    path = os.fspath(path)
    if not os.path.lexists(path) or os.path.isdir(path):
        return
    for src in reads:
        try:
            same = os.path.samefile(path, src)
        except OSError:
            same = False
        if same:
            raise CrosslayerError(f"{flag} {path}: is the file this command reads; choose another {flag}")
    if not force:
        raise CrosslayerError(f"{flag} {path}: exists; pass --force to overwrite it, or choose another {flag}")


def _write_tmp(tmp: str, content: Content) -> None:
    with open(tmp, "wb") as f:
        if callable(content):
            content(f)
        else:
            f.write(content.encode() if isinstance(content, str) else content)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, content: Content, *, what: str = "",
                 before_replace: Callable[[str], None] | None = None,
                 error: type[Exception] = CrosslayerError) -> str:
    """Write ``content`` (bytes, text, or a function writing into a binary file) to ``path``
    atomically (see the module doc); returns ``path``."""
    path = os.fspath(path)
    tmp = tmp_name(path)
    try:
        _write_tmp(tmp, content)
        if before_replace is not None:
            before_replace(path)
        os.replace(tmp, path)
    except BaseException as e:  # noqa: BLE001 - also SIGINT mid-write: never leave the tmp file behind
        remove_quietly(tmp)
        if isinstance(e, Exception):
            raise write_error(path, e, what, error) from None
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return path


def write_json(path: str | os.PathLike, obj) -> str:
    """``obj`` as indented JSON (non-JSON values as ``str``), atomically."""
    return atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> str:
    """One JSON object per line, atomically."""
    return atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_csv(path: str | os.PathLike, header: list, rows: Iterable[list]) -> str:
    """A CSV file (header + rows), atomically."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return atomic_write(path, buf.getvalue())
