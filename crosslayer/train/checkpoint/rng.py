"""Capture and restore every random generator a training step draws from.

Python ``random``, NumPy's global generator, torch's CPU generator and all CUDA generators are
stored as tensors and plain values, so the state is ``weights_only``-loadable inside a checkpoint.
Dropout and stochastic depth draw from torch's global generator: restoring it makes a resumed run
continue the exact same random stream.
"""

from __future__ import annotations

import random

import numpy as np
import torch


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
