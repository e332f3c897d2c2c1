"""Checkpoints that survive crashes, full disks and hostile files.

Three concerns, each readable alone: :mod:`.save` (plain-container sanitising, atomic saving,
keeping the previous good checkpoint), :mod:`.load` (safe ``weights_only`` loading, one-line
diagnosis of bad files, the ``last.pt`` -> ``last.pt.prev`` fallback of ``--resume``) and
:mod:`.rng` (capturing and restoring every random generator); :mod:`.model` rebuilds a model from
a checkpoint and exports safetensors.

Format
------
A checkpoint is a ``torch.save`` dict holding only tensors and plain Python containers
(dict/OrderedDict/Counter, list, tuple, set, str, bytes, int, float, bool, None, torch.Size,
torch.device, torch.dtype), so it loads with ``torch.load(weights_only=True)`` and loading a
crafted file can never run code::

    {"format": 1, "model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ... | None,
     "epoch": completed epochs, "batch_in_epoch": batches done in the current epoch,
     "step": global step, "rng": capture_rng_state(), "rng_ranks": [every rank's, under DDP] | None,
     "config": the run's config.json, "best_test_err": ..., "history": [...]}

The write scheme is described in :mod:`crosslayer.io` and :func:`.save.save_checkpoint`.
"""

from crosslayer.train.checkpoint.load import (
    FORMAT_VERSION,
    load_checkpoint,
    load_resume_checkpoint,
    resolve_checkpoint,
    verify_checkpoint,
)
from crosslayer.train.checkpoint.model import (
    check_checkpoint_fits,
    export_safetensors,
    input_shape,
    load_model_from_checkpoint,
    unwrap_state_dict,
)
from crosslayer.train.checkpoint.rng import capture_rng_state, restore_rng_state
from crosslayer.train.checkpoint.save import PREV_SUFFIX, save_checkpoint

__all__ = [
    "FORMAT_VERSION", "PREV_SUFFIX", "save_checkpoint", "load_checkpoint", "load_resume_checkpoint",
    "resolve_checkpoint",
    "verify_checkpoint", "capture_rng_state", "restore_rng_state", "load_model_from_checkpoint",
    "check_checkpoint_fits", "unwrap_state_dict", "export_safetensors", "input_shape",
]
