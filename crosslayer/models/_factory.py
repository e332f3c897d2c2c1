"""``create_model``: build a registered model with timm's keywords beside ours (as timm's
``_factory.py``): pretrained weights, a checkpoint file, pooling, features_only, device and dtype."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from crosslayer.errors import CrosslayerError
from crosslayer.models import _contract
from crosslayer.models._registry import model_info
from crosslayer.models.pretrained import load_pretrained


class ModelArgumentError(CrosslayerError, TypeError):
    """A keyword the model does not take: a TypeError, as in timm, and a one-line CrosslayerError."""


# timm's create_model keywords that configure its own layers (TorchScript, export, the hub cache):
# accepted, nothing to configure in these models
TIMM_NO_EFFECT = ("scriptable", "exportable", "no_jit", "cache_dir", "feature_cls", "feature_cfg")


def create_model(name: str, num_classes: int | None = None, in_channels: int | None = None, pretrained=False,
                 **kwargs) -> nn.Module:
    """Build a registered model; takes timm's ``create_model`` keywords beside ours.

    Ours: ``num_classes`` (0: no classifier, the model returns pooled features), ``in_channels`` (3),
    ``pretrained`` (True = the published ImageNet weights of DenseNet-121/169/201/161,
    torchvision's files through the torch.hub cache, or a path / URL of a state_dict; the
    classifier is replaced when ``num_classes`` differs from the weights', the stem adapted when
    ``in_channels`` does, see :mod:`crosslayer.models.pretrained`), and any constructor argument
    (``conv_drop_rate``, ``memory_efficient``, ``growth_rate``, ...).

    timm's: ``in_chans`` (= ``in_channels``), ``drop_rate`` (dropout before the classifier),
    ``drop_path_rate`` (stochastic depth / drop-path where the family has it, else only 0),
    ``global_pool``, ``features_only`` / ``out_indices``, ``device`` / ``dtype``, ``checkpoint_path``,
    ``pretrained_cfg`` / ``pretrained_cfg_overlay`` (merged into ``model.pretrained_cfg``).
    Keywords given as None are dropped, as timm does; an unknown keyword is a TypeError naming it."""
    info = model_info(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    in_chans = kwargs.pop("in_chans", None)
    if in_chans is not None and in_channels is not None and in_chans != in_channels:
        raise ModelArgumentError(f"model {name!r}: in_chans={in_chans} and in_channels={in_channels} disagree")
    in_channels = in_chans or in_channels or 3
    global_pool = kwargs.pop("global_pool", None)
    features_only, out_indices = kwargs.pop("features_only", False), kwargs.pop("out_indices", None)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    checkpoint_path = kwargs.pop("checkpoint_path", None)
    cfg, overlay = kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
    for k in TIMM_NO_EFFECT:
        kwargs.pop(k, None)
    if kwargs.get("output_stride", 32) != 32:
        raise ModelArgumentError(f"model {name!r}: output_stride={kwargs['output_stride']}: only 32 (no dilation)")
    kwargs.pop("output_stride", None)
    wanted = info.default_classes if num_classes is None else num_classes
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = info.fn(num_classes=info.default_classes if pretrained else wanted, in_channels=in_channels,
                            **kwargs)
    except TypeError as e:  # a keyword the model does not take
        raise ModelArgumentError(f"model {name!r}: {e}") from None
    model.model_name = name
    model.pretrained_cfg = {**_contract.default_cfg(name, info.input_size, model), **(cfg or {}), **(overlay or {})}
    if pretrained:
        load_pretrained(model, name, pretrained, num_classes=wanted)
    if checkpoint_path:
        _contract.load_checkpoint_file(model, checkpoint_path)
    if global_pool is not None:
        _contract.set_global_pool(model, global_pool)
    if dtype is not None:
        model.to(dtype=dtype)
    return _contract.FeatureNet(model, out_indices) if features_only else model
