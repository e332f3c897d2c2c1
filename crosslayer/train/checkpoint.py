"""Checkpoints that survive crashes, full disks and hostile files.

Format
------
A checkpoint is a ``torch.save`` dict holding only tensors and plain Python containers
(dict/OrderedDict/Counter, list, tuple, set, str, bytes, int, float, bool, None, torch.Size,
torch.device, torch.dtype), so it loads with ``torch.load(weights_only=True)`` and loading a
crafted file can never run code::

    {"format": 1, "model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ... | None,
     "epoch": completed epochs, "batch_in_epoch": batches done in the current epoch,
     "step": global step, "rng": capture_rng_state(), "rng_ranks": [every rank's, under DDP] | None,
     "config": {"model", "num_classes",
     "in_channels", "model_kwargs", ...}, "best_test_err": ..., "history": [...]}

Atomic write scheme (:func:`save_checkpoint`)
---------------------------------------------
1. write to a temporary file ``.NAME.PID.tmp`` in the same directory, flush, ``os.fsync``;
2. hard-link the current ``NAME`` to ``NAME.prev`` (atomically, via a temporary link), so the
   previous good checkpoint is kept and ``NAME`` never disappears (if the file system has no
   hard links, ``NAME`` is renamed to ``NAME.prev`` instead);
3. ``os.replace`` the temporary file onto ``NAME`` and ``fsync`` the directory.

A crash, SIGKILL or full disk at any point leaves at least one complete, loadable checkpoint;
:func:`load_resume_checkpoint` tries ``last.pt`` and falls back to ``last.pt.prev``.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import pathlib
import pickle
import random
import re
import sys
import warnings

import numpy as np
import torch

from crosslayer.errors import CheckpointError

FORMAT_VERSION = 1
PREV_SUFFIX = ".prev"

__all__ = [
    "FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "load_resume_checkpoint",
    "capture_rng_state", "restore_rng_state", "load_model_from_checkpoint", "check_checkpoint_fits",
    "unwrap_state_dict", "export_safetensors",
]


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------

_SCALARS = (str, bytes, bytearray, int, float, bool, complex, type(None), torch.device, torch.dtype)


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
        if type(obj) in (dict, collections.OrderedDict, collections.Counter):
            out = type(obj)()
        else:  # defaultdict and other subclasses: a plain dict loads everywhere
            out = {}
        for k, v in obj.items():
            out[_plain(k, where)] = _plain(v, f"{where}[{k!r}]")
        meta = getattr(obj, "_metadata", None)  # state_dict module versions, used by load_state_dict
        if isinstance(meta, dict) and isinstance(out, collections.OrderedDict):
            out._metadata = _plain(meta, f"{where}._metadata")
        return out
    if isinstance(obj, (list, tuple, set)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, list):
            return items
        if isinstance(obj, set):
            return set(items)
        return tuple(items)  # named tuples become plain tuples
    raise TypeError(f"checkpoint {where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
                    "torch.load(weights_only=True) refuses; store tensors and plain containers only")


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (torch's zip writer wraps the file's OSError in a RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and Windows) cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _tmp_name(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.{os.getpid()}.tmp")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _write_error(path: str, exc: BaseException) -> CheckpointError:
    ose = _os_error_in(exc)
    if ose is not None:
        why = ose.strerror or (os.strerror(ose.errno) if ose.errno else _first_line(ose))
    else:
        why = f"{type(exc).__name__}: {_first_line(exc)}"
    return CheckpointError(f"{path}: could not write checkpoint ({why})")


def _first_nonfinite(model_state) -> str | None:
    """Name of the first floating-point tensor of a state_dict holding NaN or inf, else None."""
    if not isinstance(model_state, dict):
        return None
    for k, v in model_state.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            return str(k)
    return None


def save_checkpoint(path: str | os.PathLike, state: dict, *, keep_previous: bool = True,
                    check_finite: bool = True) -> str:
    """Write ``state`` to ``path`` atomically (see the module doc); returns ``path``.

    With ``keep_previous`` the checkpoint being replaced is kept as ``PATH.prev``. On any write
    failure (full disk, I/O error) the temporary file is removed, ``PATH`` and ``PATH.prev`` are
    untouched and a one-line :class:`CheckpointError` ``"PATH: could not write checkpoint (why)"``
    is raised. A ``state`` holding objects that ``weights_only`` loading would refuse raises
    TypeError before anything is written. With ``check_finite`` a model whose weights hold NaN/inf
    (a diverged run) is not saved: CheckpointError, and the previous good checkpoint stays.
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
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise _write_error(path, e) from None
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:  # noqa: BLE001 - also SIGINT/SIGTERM mid-write: never leave tmp behind
        _remove_quietly(tmp)
        if isinstance(e, Exception):
            raise _write_error(path, e) from None
        raise
    try:
        if keep_previous and os.path.isfile(path):
            prev = path + PREV_SUFFIX
            link_tmp = _tmp_name(prev)
            _remove_quietly(link_tmp)
            try:
                os.link(path, link_tmp)
                os.replace(link_tmp, prev)  # PATH.prev now the old checkpoint; PATH still exists
            except OSError:
                _remove_quietly(link_tmp)
                os.replace(path, prev)  # no hard links here: PATH is briefly absent, PATH.prev is good
        os.replace(tmp, path)
    except BaseException as e:  # noqa: BLE001
        _remove_quietly(tmp)
        if isinstance(e, Exception):
            raise _write_error(path, e) from None
        raise
    _fsync_dir(directory)
    return path


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    line = text[0].strip() if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


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
    return f"corrupt or not a PyTorch checkpoint ({kind}: {_first_line(exc, 100)})"


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    Every problem (missing, empty, truncated, corrupt, unsafe pickle, not a crosslayer checkpoint,
    newer format) raises a one-line :class:`CheckpointError` ``"PATH: what is wrong"``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or _first_line(e)})") from None
    if not magic:
        raise CheckpointError(f"{path}: empty file (0 bytes; incomplete write?)")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says enough
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        is_zip = magic == b"PK\x03\x04"
        raise CheckpointError(f"{path}: {_describe_load_error(e, is_zip)}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a crosslayer checkpoint (no 'model' entry)")
    fmt = ckpt.get("format", FORMAT_VERSION)
    if isinstance(fmt, int) and fmt > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {fmt} is newer than this crosslayer "
                              f"understands ({FORMAT_VERSION}); upgrade crosslayer")
    return ckpt


def _warn(msg: str) -> None:
    print(f"crosslayer: warning: {msg}", file=sys.stderr, flush=True)


def load_resume_checkpoint(out_dir: str | os.PathLike, map_location="cpu", name: str = "last.pt"):
    """The newest loadable checkpoint of a run directory: ``(state, path)`` or None if there is none.

    Tries ``OUT/last.pt`` then ``OUT/last.pt.prev``. A truncated or corrupt ``last.pt`` gives ONE
    warning line on stderr naming the file and what is wrong, then the fallback is used. If files
    exist but none loads, raises a one-line CheckpointError naming each file and its problem.
    Stale temporary files of killed writers are removed."""
    out_dir = os.fspath(out_dir)
    main = os.path.join(out_dir, name)
    prev = main + PREV_SUFFIX
    for stale in glob.glob(os.path.join(out_dir, f".{glob.escape(name)}*.tmp")):
        _remove_quietly(stale)
    problems = []
    for i, candidate in enumerate((main, prev)):
        if not os.path.exists(candidate):
            continue
        try:
            state = load_checkpoint(candidate, map_location)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            _warn(f"{problems[0]}; resuming from {candidate} instead")
        elif i == 1:
            _warn(f"{main}: missing; resuming from {candidate} instead")
        return state, candidate
    if not problems:
        return None
    raise CheckpointError(f"{out_dir}: no loadable checkpoint to resume from ({'; '.join(problems)})")


# ----------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------

def capture_rng_state() -> dict:
    """Python ``random``, NumPy's global generator, torch CPU and (if available) all CUDA generators,
    as tensors and plain values (``weights_only``-loadable)."""
    version, internal, gauss_next = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict | None) -> None:
    """Inverse of :func:`capture_rng_state`; missing parts are left alone. CUDA states are restored
    only when the number of devices matches."""
    if not state:
        return
    py = state.get("python")
    if py is not None:
        random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    npst = state.get("numpy")
    if npst is not None:
        np.random.set_state((npst["kind"], npst["keys"].cpu().numpy().astype(np.uint32), int(npst["pos"]),
                             int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu().to(torch.uint8) for s in cuda])


# ----------------------------------------------------------------------------------------------
# Models from checkpoints
# ----------------------------------------------------------------------------------------------

def unwrap_state_dict(sd: dict) -> dict:
    """Strip the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    out = collections.OrderedDict()
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k.replace("._orig_mod.", ".")] = v
    return out


def check_checkpoint_fits(ckpt: dict, path: str, *, num_classes: int | None = None,
                          in_channels: int | None = None, data: str = "the data") -> None:
    """Raise a one-line CheckpointError if the checkpoint's model does not fit ``data``
    (its number of classes or input channels)."""
    cfg = ckpt.get("config") or {}
    name = cfg.get("model", "model")
    have_c = cfg.get("num_classes")
    if num_classes is not None and have_c is not None and int(have_c) != int(num_classes):
        raise CheckpointError(f"{path}: {name} was trained with {have_c} classes but {data} has "
                              f"{num_classes}")
    have_in = cfg.get("in_channels")
    if in_channels is not None and have_in is not None and int(have_in) != int(in_channels):
        raise CheckpointError(f"{path}: {name} takes {have_in}-channel images but {data} has "
                              f"{in_channels}-channel images")


def load_model_from_checkpoint(path: str | os.PathLike, map_location="cpu", *, num_classes: int | None = None,
                               in_channels: int | None = None, data: str = "the data"):
    """Rebuild the model a checkpoint was trained as and load its weights: ``(model.eval(), ckpt)``.

    With ``num_classes`` / ``in_channels`` the checkpoint is first checked against the data
    (:func:`check_checkpoint_fits`). All problems are one-line CheckpointErrors naming ``path``."""
    from crosslayer.errors import CrosslayerError
    from crosslayer.models import create_model

    path = os.fspath(path)
    ckpt = load_checkpoint(path, map_location)
    cfg = ckpt.get("config") or {}
    if not cfg.get("model") or cfg.get("num_classes") is None:
        raise CheckpointError(f"{path}: checkpoint has no model config (need 'model' and 'num_classes')")
    check_checkpoint_fits(ckpt, path, num_classes=num_classes, in_channels=in_channels, data=data)
    try:
        model = create_model(cfg["model"], num_classes=int(cfg["num_classes"]),
                             in_channels=int(cfg.get("in_channels", 3)), **(cfg.get("model_kwargs") or {}))
    except CrosslayerError as e:
        raise CheckpointError(f"{path}: cannot rebuild the model ({e})") from None
    try:
        model.load_state_dict(unwrap_state_dict(ckpt["model"]))
    except (RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: weights do not fit {cfg['model']} ({_first_line(e, 200)})") from None
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model.to(map_location)
    return model.eval(), ckpt


def export_safetensors(model, path: str | os.PathLike, metadata: dict | None = None) -> str:
    """Write a model's weights (an ``nn.Module`` or a state_dict) as safetensors, atomically.
    ``metadata`` values are stored as JSON strings (e.g. the run config)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else model
    sd = unwrap_state_dict(sd)
    tensors, seen = {}, {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        # safetensors refuses tensors sharing memory: store each shared one as its own copy
        tensors[k] = v.clone().contiguous() if ptr in seen or not v.is_contiguous() else v
        if ptr is not None:
            seen[ptr] = k
    meta = {str(k): v if isinstance(v, str) else json.dumps(v, default=str) for k, v in (metadata or {}).items()}
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        save_file(tensors, tmp, metadata=meta or None)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # noqa: BLE001
        _remove_quietly(tmp)
        if isinstance(e, Exception):
            raise CheckpointError(f"{path}: could not write safetensors ({_first_line(e)})") from None
        raise
    _fsync_dir(d)
    return path

