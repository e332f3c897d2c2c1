"""Atomic checkpoint saving that always keeps a good previous checkpoint.

:func:`save_checkpoint` writes through :func:`crosslayer.io.atomic_write` (temporary file in the
same directory, fsync, rename, directory fsync). With ``keep_previous``, just before the rename the
checkpoint being replaced is kept as ``NAME.prev`` (a hard link made atomically through a temporary
link, so ``NAME`` never disappears; renamed if the file system has no hard links), but only after
:func:`~crosslayer.train.checkpoint.load.verify_checkpoint` has read it back completely: a torn or
corrupt ``NAME`` is dropped and never replaces a good ``NAME.prev``.

A crash, SIGKILL or full disk at any point leaves at least one complete, loadable checkpoint;
``load_resume_checkpoint`` tries ``last.pt`` and falls back to ``last.pt.prev``.
"""

from __future__ import annotations

import collections
import os
import pathlib

import numpy as np
import torch

from crosslayer.errors import CheckpointError
from crosslayer.io import atomic_write, remove_quietly, tmp_name, write_error
from crosslayer.train.checkpoint.load import PREV_SUFFIX, verify_checkpoint

_SCALARS = (str, bytes, bytearray, int, float, bool, complex, type(None), torch.device, torch.dtype)


def _plain_dict(obj: dict, where: str) -> dict:
    out = type(obj)() if type(obj) in (dict, collections.OrderedDict, collections.Counter) else {}
    for k, v in obj.items():  # defaultdict and other subclasses become a plain dict: loads everywhere
        out[_plain(k, where)] = _plain(v, f"{where}[{k!r}]")
    meta = getattr(obj, "_metadata", None)  # state_dict module versions, used by load_state_dict
    if isinstance(meta, dict) and isinstance(out, collections.OrderedDict):
        out._metadata = _plain(meta, f"{where}._metadata")
    return out


def _plain(obj, where: str = "state"):
    """Return ``obj`` with numpy values turned into tensors/Python scalars and paths into strings;
    raise TypeError (naming the key) for anything ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(obj, torch.Tensor):
        # Parameters pickle as Parameter (allowed), but plain tensors are lighter.
        return obj.detach() if isinstance(obj, torch.nn.Parameter) else obj
    if isinstance(obj, torch.Size) or type(obj) in _SCALARS or isinstance(obj, (torch.device, torch.dtype)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):  # np.float64 is a float subclass, but pickles as a numpy object
        return obj.item()
    for base in (str, bytes, int, float, complex):  # subclasses (TorchVersion, IntEnum...) -> plain values
        if isinstance(obj, base):
            return base(obj)
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if isinstance(obj, dict):
        return _plain_dict(obj, where)
    if isinstance(obj, (list, tuple, set)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, list):
            return items
        return set(items) if isinstance(obj, set) else tuple(items)  # named tuples become plain tuples
    raise TypeError(f"checkpoint {where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
                    "torch.load(weights_only=True) refuses; store tensors and plain containers only")


def _first_nonfinite(model_state) -> str | None:
    """Name of the first floating-point tensor of a state_dict holding NaN or inf, else None."""
    if not isinstance(model_state, dict):
        return None
    for k, v in model_state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            return str(k)
    return None


def _keep_previous(path: str) -> None:
    """Keep the checkpoint at ``path`` as ``path.prev`` if it reads back; a damaged one is dropped
    silently (``--resume`` has already said so when it fell back to ``.prev``)."""
    if not os.path.isfile(path) or verify_checkpoint(path) is not None:
        return
    prev = path + PREV_SUFFIX
    link_tmp = tmp_name(prev)
    remove_quietly(link_tmp)
    try:
        os.link(path, link_tmp)
        os.replace(link_tmp, prev)  # PATH.prev now the old checkpoint; PATH still exists
    except OSError:
        remove_quietly(link_tmp)
        os.replace(path, prev)  # no hard links here: PATH is briefly absent, PATH.prev is good


def save_checkpoint(path: str | os.PathLike, state: dict, *, keep_previous: bool = True,
                    check_finite: bool = True) -> str:
    """Write ``state`` to ``path`` atomically (see the module doc); returns ``path``.

    With ``keep_previous`` the checkpoint being replaced is kept as ``PATH.prev`` (if it reads
    back). On any write failure (full disk, I/O error) the temporary file is removed, ``PATH`` and
    ``PATH.prev`` are untouched and a one-line :class:`CheckpointError` ``"PATH: could not write
    checkpoint (why)"`` is raised. A ``state`` holding objects that ``weights_only`` loading would
    refuse raises TypeError before anything is written. With ``check_finite`` a model whose weights
    hold NaN/inf (a diverged run) is not saved: CheckpointError, and the previous checkpoint stays.
    """
    path = os.fspath(path)
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, not {type(state).__name__}")
    bad = _first_nonfinite(state.get("model")) if check_finite else None
    if bad is not None:
        at = f" at step {state['step']}" if isinstance(state.get("step"), int) else ""
        raise CheckpointError(f"{path}: not saved: model weights hold NaN/inf{at} ({bad}; the run diverged, "
                              f"try a lower --lr); the previous checkpoint is kept")
    state = _plain(state)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        raise write_error(path, e, "checkpoint", CheckpointError) from None
    return atomic_write(path, lambda f: torch.save(state, f), what="checkpoint", error=CheckpointError,
                        before_replace=_keep_previous if keep_previous else None)
