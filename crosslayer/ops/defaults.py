"""What runs by default on which device kind: decided here and nowhere else.

Fast paths. A custom-autograd fast path becomes a device kind's default only once it has been
measured there to compute the same function as the plain modules and to be faster
(docs/benchmarks.md, "Defaults per device"). Elsewhere the default is the plain per-layer path
(cuDNN on CUDA); a model's ``fused=True`` opts in explicitly, ``fused=False`` opts out.

Training settings. ``crosslayer train`` leaves ``--amp`` and ``--channels-last`` unset unless the
user gives them; the trainer then fills them in with :func:`training_defaults` for the device it
trains on: on CUDA bf16 autocast (where the GPU computes bf16 natively) and channels_last (NHWC),
the layout and precision cuDNN's tensor-core kernels are built for; elsewhere float32 in the
input's layout (the CPU models choose their own internal layout, ``cpu_channels_last``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# device type -> the fused paths are the default there (measured equal and faster)
FUSED_BY_DEFAULT = {"cpu": True}

# device type -> training settings used when the user did not choose them
TRAINING_DEFAULTS = {
    "cpu": {"amp": "none", "channels_last": False},
    "cuda": {"amp": "bf16", "channels_last": True},
}
# a device kind not listed: nothing assumed about its kernels
FALLBACK_TRAINING_DEFAULTS = {"amp": "none", "channels_last": False}


def fused_by_default(device_type: str) -> bool:
    return FUSED_BY_DEFAULT.get(device_type, False)


def use_fused(setting: bool | None, device_type: str) -> bool:
    """A model's ``fused`` setting (True / False / None = the device kind's default) resolved."""
    return fused_by_default(device_type) if setting is None else bool(setting)


def cuda_bf16_supported() -> bool:
    """Whether the current CUDA device computes bf16 natively (compute capability 8.0 or later);
    emulated bf16 (older GPUs) is slower than float32, so autocast stays off there."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def training_defaults(device_type: str, bf16_supported: bool | None = None) -> dict:
    """The training settings (``amp``, ``channels_last``) a run on ``device_type`` gets when the
    user does not choose them. ``bf16_supported``: whether the device computes bf16 natively
    (None: ask the current CUDA device); without it CUDA trains in float32."""
    out = dict(TRAINING_DEFAULTS.get(device_type, FALLBACK_TRAINING_DEFAULTS))
    if device_type == "cuda" and out["amp"] == "bf16":
        native = cuda_bf16_supported() if bf16_supported is None else bf16_supported
        out["amp"] = "bf16" if native else "none"
    return out


def unset_training_defaults(settings, device_type: str, bf16_supported: bool | None = None) -> dict:
    """The entries of :func:`training_defaults` that ``settings`` (a dict, or a config object with
    attributes) leaves unset (absent or None): ``cfg.update(unset_training_defaults(cfg,
    device.type))`` completes a run's config without overriding anything the user chose."""
    defaults = training_defaults(device_type, bf16_supported)
    get = settings.get if isinstance(settings, Mapping) else lambda k: getattr(settings, k, None)
    return {k: v for k, v in defaults.items() if get(k) is None}


def cpu_bf16_native(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 in hardware (the ``avx512_bf16`` or ``amx_bf16`` flag): there
    bf16 autocast runs oneDNN's native kernels; elsewhere it is emulated and not faster than
    float32. False where the flags cannot be read (not Linux)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_native(device: str) -> bool:
    """Whether ``device`` (``cpu``, ``cuda[:N]``, or ``auto``: CUDA when available, else the CPU)
    computes bf16 natively, where bf16 autocast is faster than float32: the rule of the demo's and
    the study's ``--amp auto``."""
    kind = device.split(":")[0]
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    return cpu_bf16_native() if kind == "cpu" else kind == "cuda" and cuda_bf16_supported()


def refuse_double_backward(node: str) -> None:
    """Called first in a fused node's backward: raise one line when autograd records that backward
    for a second derivative (``create_graph=True`` runs backward with grad mode on). The fused nodes
    write gradients in place, which autograd cannot differentiate; the plain modules can."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{node}: double backward (create_graph=True) is not supported by the fused path; "
                           f"build the model with fused=False or call model.set_speed(fused=False)")
