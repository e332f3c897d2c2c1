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
    path below a file, or a folder (or the nearest existing parent) where writing fails (read-only,
    permission denied). Creates nothing: the write test removes its probe file at once."""
    import os
    import tempfile

    target = os.path.abspath(os.fspath(path))
    existing = target
    while not os.path.exists(existing):  # False for a path below a file too
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == target else f"is below the file {existing}"
        raise CrosslayerError(f"{flag} {path}: {where}; give a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".crosslayer-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        what = "folder" if existing == target else f"parent folder {existing}"
        raise CrosslayerError(f"{flag} {path}: cannot write into the {what} ({e.strerror or type(e).__name__}); "
                              f"choose another {flag}") from None
