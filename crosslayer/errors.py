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
