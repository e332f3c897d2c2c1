"""A small timm-style model registry: ``register_model``, ``list_models``, ``model_info``.

Each registered entry is a factory function ``fn(num_classes=..., in_channels=..., **overrides)``
returning an ``nn.Module``. Metadata (the paper's parameter count, native input size, depth,
the table row it reproduces) is attached with the decorator so the ``crosslayer models``
command and the tests can check every model against the papers. The family files register their
models when :mod:`crosslayer.models` imports them; the registry imports none of them.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass

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
    names = sorted(_REGISTRY)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def _normalise(name: str) -> str:
    """Case, ``-``, ``_``, ``.`` and spaces do not tell two model names apart for suggestions."""
    return re.sub(r"[-_.\s]", "", name.lower())


def suggest_models(name: str, n: int = 3) -> list[str]:
    """Registered names that a mistyped ``name`` most likely meant: the one equal up to case and
    ``-``/``_`` (``DenseNet_BC40_k12``, ``resnet-20``), else up to ``n`` close matches (``delugnet20``,
    ``densenet_bc40_k1``), closest first."""
    by_key: dict[str, str] = {}
    for registered in sorted(_REGISTRY):
        by_key.setdefault(_normalise(registered), registered)
    key = _normalise(name)
    if key in by_key:
        return [by_key[key]]
    return [by_key[k] for k in difflib.get_close_matches(key, list(by_key), n=n, cutoff=0.6)]


def model_info(name: str) -> ModelInfo:
    if name not in _REGISTRY:
        close = suggest_models(name)
        hint = f"; did you mean {close[0]}?" if close else ""
        hint += f" (also close: {', '.join(close[1:])})" if len(close) > 1 else ""
        raise CrosslayerError(f"unknown model {name!r}{hint} (`crosslayer models` lists them all)")
    return _REGISTRY[name]
