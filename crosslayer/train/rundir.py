"""A run directory has one owner: the run that holds its lock.

:class:`RunDir` is entered for the whole run (rank 0 only under torchrun). It

* checks ``--out`` first (an existing file, a path below a file, no permission: one line, nothing
  created);
* creates the directory, remembering which folders it made;
* takes an exclusive OS file lock, ``fcntl.flock`` on ``OUT/.lock``, holding the owner's PID. The
  kernel releases it when the process ends, however it ends, so a SIGKILLed run never leaves a
  stale lock; a second process on the same ``--out`` is refused in one line naming the holder's PID;
* on a failed start (an error before any checkpoint was written) removes the run files it created
  and the folders it made, so a failed start leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import os
import shutil

from crosslayer.errors import CrosslayerError

LOCK_NAME = ".lock"
# the files a run writes (a failed start removes those it created, nothing else)
RUN_FILES = ("config.json", "metrics.csv", "metrics.jsonl", "metrics_steps.csv", "results.json", "best.pt", "tb")


class RunDirError(CrosslayerError):
    """``--out`` cannot be used: not a directory, not writable, or owned by another running process."""


class RunDirBusy(RunDirError):
    """``--out`` is owned by another running process (``pid``, as written in its lock file)."""

    def __init__(self, message: str, pid: str):
        super().__init__(message)
        self.pid = pid


def check_out_path(out: str) -> None:
    """One line if ``out`` cannot be (or become) a writable run directory."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunDirError(f"--out {out}: is a file, not a directory")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise RunDirError(f"--out {out}: {parent} is a file, so no directory can be made below it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"--out {out}: no permission to write in {parent}")


class RunDir:
    """Context manager owning run directory ``path`` (see the module doc); a no-op if not ``enabled``."""

    def __init__(self, path: str, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self._fd: int | None = None
        self._made: list[str] = []
        self._before: set[str] = set()

    def __enter__(self) -> RunDir:
        if self.enabled:
            check_out_path(self.path)
            self._make()
            try:
                self._lock()
            except BaseException:
                self._remove_made()
                raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled:
            return
        failed_start = exc_type is not None and not os.path.exists(os.path.join(self.path, "last.pt"))
        self._unlock()
        if failed_start:
            self._remove_created()

    # -- creation -------------------------------------------------------------------------------
    def _make(self) -> None:
        path = os.path.abspath(self.path)
        missing = []
        while not os.path.exists(path):
            missing.append(path)
            path = os.path.dirname(path)
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                continue
            except OSError as e:
                self._remove_made()
                raise RunDirError(f"--out {self.path}: cannot create {d} ({e.strerror})") from None
            self._made.append(d)
        self._before = set(os.listdir(self.path))

    def _remove_created(self) -> None:
        for name in RUN_FILES:
            p = os.path.join(self.path, name)
            if name in self._before or not os.path.lexists(p):
                continue
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.remove(p)
        self._remove_made()

    def _remove_made(self) -> None:
        for d in reversed(self._made):
            try:
                os.rmdir(d)  # only if empty: never removes anything else
            except OSError:
                break
        self._made = []

    # -- the lock -------------------------------------------------------------------------------
    def _lock(self) -> None:
        lock = os.path.join(self.path, LOCK_NAME)
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirBusy(f"--out {self.path}: in use by another crosslayer run (PID {holder}); wait for "
                                 f"it to finish or choose another --out", holder) from None
            try:  # the previous owner may have removed the file between our open and flock: retry
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _unlock(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(os.path.join(self.path, LOCK_NAME))  # removed while still held: no race with the next owner
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
