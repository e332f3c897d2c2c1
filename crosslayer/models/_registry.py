"""A small timm-style model registry: ``register_model``, ``create_model``, ``list_models``.

Each registered entry is a factory function ``fn(num_classes=..., in_channels=..., **overrides)``
returning an ``nn.Module``. Metadata (the paper's parameter count, native input size, depth,
the table row it reproduces) is attached with the decorator so the ``crosslayer models``
command and the tests can check every model against the papers.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from crosslayer.errors import CrosslayerError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    fn: Callable[..., nn.Module]
    family: str
    depth: int | None = None
    input_size: tuple[int, int, int] = (3, 32, 32)
    default_classes: int = 10
    paper_params_m: float | None = None  # as printed in the paper's table
    paper: str = ""
    note: str = ""  # correction footnote for the printed figure, if any


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(
    family: str,
    depth: int | None = None,
    input_size: tuple[int, int, int] = (3, 32, 32),
    default_classes: int = 10,
    paper_params_m: float | None = None,
    paper: str = "",
    note: str = "",
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a model factory under its function name."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelInfo(name, fn, family, depth, input_size, default_classes,
                                    paper_params_m, paper, note)
        return fn

    return wrap


def list_models(pattern: str | None = None) -> list[str]:
    """Names of the registered models, sorted; ``pattern`` is an fnmatch wildcard (``"densenet*"``)."""
    _import_all()
    names = sorted(_REGISTRY)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def _normalise(name: str) -> str:
    """Case, ``-``, ``_``, ``.`` and spaces do not tell two model names apart for suggestions."""
    return re.sub(r"[-_.\s]", "", name.lower())


def suggest_models(name: str, n: int = 3) -> list[str]:
    """Registered names that a mistyped ``name`` most likely meant: the one equal up to case and
    ``-``/``_`` (``DenseNet_BC40_k12``, ``resnet-20``), else up to ``n`` close matches (``delugnet20``,
    ``densenet_bc40_k1``), closest first."""
    _import_all()
    by_key: dict[str, str] = {}
    for registered in sorted(_REGISTRY):
        by_key.setdefault(_normalise(registered), registered)
    key = _normalise(name)
    if key in by_key:
        return [by_key[key]]
    return [by_key[k] for k in difflib.get_close_matches(key, list(by_key), n=n, cutoff=0.6)]


def model_info(name: str) -> ModelInfo:
    _import_all()
    if name not in _REGISTRY:
        close = suggest_models(name)
        hint = f"; did you mean {close[0]}?" if close else ""
        hint += f" (also close: {', '.join(close[1:])})" if len(close) > 1 else ""
        raise CrosslayerError(f"unknown model {name!r}{hint} (`crosslayer models` lists them all)")
    return _REGISTRY[name]


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
    from crosslayer.models import _contract

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
        from crosslayer.models.pretrained import load_pretrained

        load_pretrained(model, name, pretrained, num_classes=wanted)
    if checkpoint_path:
        _contract.load_checkpoint_file(model, checkpoint_path)
    if global_pool is not None:
        _contract.set_global_pool(model, global_pool)
    if dtype is not None:
        model.to(dtype=dtype)
    return _contract.FeatureNet(model, out_indices) if features_only else model


def _import_all() -> None:
    # Importing the model files registers their entries.
    from crosslayer.models import delugenet, densenet, fractalnet, resnet, wide_resnet  # noqa: F401
