"""Process-wide settings of a training run: seeds, deterministic algorithms, autocast, the allocator."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def set_seed(seed: int) -> None:
    """Seed Python ``random``, NumPy's global generator and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


KEEP_FREED_SWITCH = "CROSSLAYER_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    PyTorch's CPU allocator is plain malloc. By default glibc serves every block above 32 MB with
    its own mmap and unmaps it on free (and trims the heap's top above a few tens of MB), so each
    training step page-faults its large activations in afresh: 10% of a DenseNet-BC-100 step at
    batch 64 on a 2-vCPU AMD EPYC, 20-30% of torchvision's (docs/benchmarks.md, "The allocator").
    With blocks up to 1 GiB from the heap and no trimming, freed blocks are reused; the resident
    size stays at the step's peak, which a training process reaches every step anyway. The CLI
    calls this at start; ``CROSSLAYER_KEEP_FREED_MEMORY=0`` (or setting glibc's own MALLOC_* /
    GLIBC_TUNABLES variables, or preloading another allocator) leaves malloc alone. Returns
    whether the settings were applied (False off Linux/glibc)."""
    if os.environ.get(KEEP_FREED_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ) or os.environ.get("LD_PRELOAD"):
        return False  # the user chose the allocator's settings
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
        # older glibc refuses thresholds above 32 MB (its dynamic maximum): take that then
        heap = libc.mallopt(m_mmap_threshold, ctypes.c_int(1 << 30)) or libc.mallopt(m_mmap_threshold, ctypes.c_int(32 << 20))
        return bool(heap and libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1)))
    except (OSError, AttributeError):  # not glibc
        return False


def set_deterministic(enabled: bool, device: torch.device) -> None:
    """``torch.use_deterministic_algorithms`` + cuDNN flags. On CUDA some kernels used by these
    models (adaptive average-pool backward) have no deterministic version, so there it only warns."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def amp_context(amp: str, device: torch.device):
    """Autocast for ``--amp bf16`` / ``fp16``; a no-op for ``none``."""
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if amp == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the allocators' out-of-memory errors: CUDA's ``OutOfMemoryError``, and the CPU
    allocator's RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom) or isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
