"""Models from checkpoints: rebuild the trained model, check it fits a data set, export safetensors."""

from __future__ import annotations

import json
import os

import torch

from crosslayer.data.registry import NATIVE_SIZE, VARIANTS
from crosslayer.errors import CheckpointError, CrosslayerError
from crosslayer.io import atomic_write, first_line
from crosslayer.models import create_model
from crosslayer.models.pretrained import unwrap_state_dict
from crosslayer.train.checkpoint.load import load_checkpoint


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


def input_shape(cfg: dict, path: str = "the checkpoint") -> tuple[int, int, int]:
    """The ``(channels, height, width)`` a checkpoint's model was trained on: the ``input_shape`` the
    run recorded, else (older runs) its ``--image-size``, ImageNet crop or data set's native size."""
    if cfg.get("input_shape"):
        c, h, w = (int(v) for v in cfg["input_shape"])
        return c, h, w
    channels, data = int(cfg.get("in_channels", 3)), str(cfg.get("data") or "")
    size = cfg.get("image_size")
    if not size and data.startswith("imagenet:"):
        size = cfg.get("crop_size") or 224
    if not size and data in VARIANTS:
        size = NATIVE_SIZE.get(VARIANTS[data].family)
    if not size:
        raise CheckpointError(f"{path}: the checkpoint records no input size (trained on {data or 'unknown data'}); "
                              f"retrain with this crosslayer version")
    return channels, int(size), int(size)


def load_model_from_checkpoint(path: str | os.PathLike, map_location="cpu", *, num_classes: int | None = None,
                               in_channels: int | None = None, data: str = "the data"):
    """Rebuild the model a checkpoint was trained as and load its weights: ``(model.eval(), ckpt)``.

    With ``num_classes`` / ``in_channels`` the checkpoint is first checked against the data
    (:func:`check_checkpoint_fits`). All problems are one-line CheckpointErrors naming ``path``."""
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
        raise CheckpointError(f"{path}: weights do not fit {cfg['model']} ({first_line(e, 200)})") from None
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model.to(map_location)
    return model.eval(), ckpt


def _safetensors_dict(sd: dict) -> dict:
    tensors, seen = {}, {}
    for k, v in unwrap_state_dict(sd).items():
        if not isinstance(v, torch.Tensor):
            continue
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        # safetensors refuses tensors sharing memory: store each shared one as its own copy
        tensors[k] = v.clone().contiguous() if ptr in seen or not v.is_contiguous() else v
        if ptr is not None:
            seen[ptr] = k
    return tensors


def export_safetensors(model, path: str | os.PathLike, metadata: dict | None = None) -> str:
    """Write a model's weights (an ``nn.Module`` or a state_dict) as safetensors, atomically.
    ``metadata`` values are stored as JSON strings (e.g. the run config)."""
    from safetensors.torch import save

    path = os.fspath(path)
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else model
    meta = {str(k): v if isinstance(v, str) else json.dumps(v, default=str) for k, v in (metadata or {}).items()}
    try:
        data = save(_safetensors_dict(sd), metadata=meta or None)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: could not write safetensors ({first_line(e)})") from None
    return atomic_write(path, data, what="safetensors", error=CheckpointError)
