"""Multi-GPU / multi-node training through ``torchrun`` (or any launcher that sets the env vars).

``torchrun --nproc_per_node N -m crosslayer train ...`` exports RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; :func:`init_distributed` reads them, picks the device
(``cuda:LOCAL_RANK`` with NCCL, or the CPU with Gloo) and joins the process group. Conventions:
the ``--batch-size`` is the GLOBAL batch (the papers' batch sizes are per step, whatever the
number of GPUs), split evenly over the ranks; BatchNorm statistics stay per rank unless
``--sync-bn``; only rank 0 prints, logs and writes checkpoints; metrics are summed over ranks with
``all_reduce``. torchrun restarts failed workers with the same arguments, so pass ``--resume``
when launching under torchrun with restarts.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from crosslayer.errors import CrosslayerError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``auto``/None: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if device in (None, "", "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise CrosslayerError(f"--device {device}: unknown device; use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CrosslayerError(f"--device {device}: MPS is not available on this machine")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CrosslayerError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
        if dev.index >= torch.cuda.device_count():
            raise CrosslayerError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def init_distributed(device: str | None = None, timeout_s: int = 1800) -> DistInfo:
    """Join the process group if launched with WORLD_SIZE > 1; otherwise a single-process DistInfo."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=pick_device(device))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistInfo(rank, world_size, local_rank, dev, backend)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks, in place (no-op in a single process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order, on every rank ([obj] in a single process)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def convert_sync_bn(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """BatchNorm -> SyncBatchNorm (same state_dict keys); no-op in a single process."""
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if info.enabled else model


def wrap_model(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` (already on ``info.device``); no-op in a single process."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if info.device.type == "cuda":
        return DDP(model, device_ids=[info.device.index], output_device=info.device.index)
    return DDP(model)


def per_rank_batch(batch_size: int, info: DistInfo) -> int:
    if batch_size % info.world_size:
        raise CrosslayerError(f"--batch-size {batch_size} is the global batch and must be divisible by the "
                              f"number of processes ({info.world_size})")
    return batch_size // info.world_size
