"""Which fast paths run by default on which device kind: decided here and nowhere else.

A custom-autograd fast path becomes a device kind's default only once it has been measured there
to compute the same function as the plain modules and to be faster (docs/benchmarks.md,
"Defaults per device"). Elsewhere the default is the plain per-layer path (cuDNN on CUDA); a
model's ``fused=True`` opts in explicitly, ``fused=False`` opts out.
"""

from __future__ import annotations

# device type -> the fused paths are the default there (measured equal and faster)
FUSED_BY_DEFAULT = {"cpu": True}


def fused_by_default(device_type: str) -> bool:
    return FUSED_BY_DEFAULT.get(device_type, False)


def use_fused(setting: bool | None, device_type: str) -> bool:
    """A model's ``fused`` setting (True / False / None = the device kind's default) resolved."""
    return fused_by_default(device_type) if setting is None else bool(setting)
