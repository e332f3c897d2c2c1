"""Checkpoints: minimal first version (to be hardened: atomic writes, fallback, RNG state).

A checkpoint is a ``torch.save`` dict holding only tensors and plain Python containers, so it
loads with ``torch.load(weights_only=True)``:
    {"model": state_dict, "config": {"model": name, "num_classes": int, "in_channels": int,
     "model_kwargs": dict, ...}, "epoch": int, ...}
"""

from __future__ import annotations

import os

import torch

from crosslayer.errors import CheckpointError


def save_checkpoint(path: str, state: dict) -> None:
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None


def load_model_from_checkpoint(path: str, map_location="cpu"):
    """Rebuild the model a checkpoint was trained as and load its weights. Returns (model, checkpoint)."""
    from crosslayer.models import create_model

    ckpt = load_checkpoint(path, map_location)
    cfg = ckpt.get("config", {})
    model = create_model(cfg["model"], num_classes=cfg["num_classes"], in_channels=cfg.get("in_channels", 3),
                         **cfg.get("model_kwargs", {}))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt
