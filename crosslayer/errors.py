"""User-facing errors.

Anything the user can cause (a bad file, a wrong flag, a model/data mismatch) is raised as
:class:`CrosslayerError` with a one-line message naming the file and what is wrong. The CLI
prints that line and exits with status 2 instead of showing a traceback.
"""


class CrosslayerError(Exception):
    """An error caused by user input; its message is shown to the user as a single line."""


class DataError(CrosslayerError):
    """A data set file is missing, truncated, corrupt or inconsistent."""


class MissingData(DataError):
    """A data set's files were not found. The message says which files were expected and where it
    looked, and how to fix it in the caller's own terms: the Python arguments by default, the
    command's flags when the CLI asks (:meth:`line`)."""

    def __init__(self, what: str, expected, dirs: list):
        self.what, self.expected, self.dirs = what, list(expected), list(dirs)
        super().__init__(self.line("data_dir=<folder>", "download=True"))

    def line(self, data_dir: str, download: str | None) -> str:
        """The one-line message, naming ``data_dir`` and (when the caller offers it) ``download``
        as the fixes."""
        looked = ", ".join(str(d) for d in self.dirs) or "(nowhere)"
        fixes = " or ".join(f for f in (data_dir, download) if f)
        return f"{self.what}: files not found: expected {', '.join(self.expected)} in one of: {looked} (pass {fixes})"


class CheckpointError(CrosslayerError):
    """A checkpoint file is missing, truncated, corrupt or does not fit the model."""


def check_output_dir(path, flag: str = "--out") -> None:
    """Refuse, in one line and before any work, an output folder that cannot be written: a file, a
    path below a file, or a folder (or, when it does not exist yet, its nearest existing parent) that
    this process may not write into or that lies on a read-only file system. Creates nothing."""
    import os

    target = os.path.abspath(os.fspath(path))
    existing = target
    while not os.path.exists(existing):  # False for a path below a file too
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == target else f"is below the file {existing}"
        raise CrosslayerError(f"{flag} {path}: {where}; give a folder")
    why = None
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        why = "permission denied"
    elif hasattr(os, "statvfs") and os.statvfs(existing).f_flag & getattr(os, "ST_RDONLY", 1):
        why = "read-only file system"
    if why:
        what = "folder" if existing == target else f"parent folder {existing}"
        raise CrosslayerError(f"{flag} {path}: cannot write into the {what} ({why}); choose another {flag}")
