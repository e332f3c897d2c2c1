"""User-facing errors.

Anything the user can cause (a bad file, a wrong flag, a model/data mismatch) is raised as
:class:`CrosslayerError` with a one-line message naming the file and what is wrong. The CLI
prints that line and exits with status 2 instead of showing a traceback.
"""


class CrosslayerError(Exception):
    """An error caused by user input; its message is shown to the user as a single line."""


class DataError(CrosslayerError):
    """A data set file is missing, truncated, corrupt or inconsistent."""


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
