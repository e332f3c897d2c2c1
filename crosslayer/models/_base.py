"""Pieces shared by every model file: timm's model interface (classifier head, global pooling,
stage taps, grad checkpointing), the init rule and the speed switches of the cross-layer models."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from crosslayer.ops.defaults import use_fused
from crosslayer.ops.dispatch import has_hooks, is_tracing

POOL_TYPES = ("avg", "max", "avgmax", "catavgmax", "")  # timm's names; "" = no pooling


def global_pool2d(x: torch.Tensor, pool_type: str) -> torch.Tensor:
    """Global pooling of a feature map (N, C, H, W) to (N, C) (``catavgmax``: (N, 2C)); ``""``: none."""
    if pool_type == "":
        return x
    if pool_type == "avg":
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
    avg, mx = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), torch.flatten(F.adaptive_max_pool2d(x, 1), 1)
    return {"max": mx, "avgmax": 0.5 * (avg + mx), "catavgmax": torch.cat([avg, mx], 1)}[pool_type]


def check_pool_type(pool_type: str) -> str:
    if pool_type not in POOL_TYPES:
        raise ValueError(f"global_pool must be one of {', '.join(map(repr, POOL_TYPES))}, got {pool_type!r}")
    return pool_type


def take_indices(num_taps: int, indices: int | list[int] | tuple[int, ...] | None) -> list[int]:
    """timm's ``forward_intermediates`` indices: None = all taps, an int n = the last n, a sequence =
    those taps (negative counts from the end)."""
    if indices is None:
        return list(range(num_taps))
    if isinstance(indices, int):
        if not 0 < indices <= num_taps:
            raise ValueError(f"indices={indices}: there are {num_taps} feature taps")
        return list(range(num_taps - indices, num_taps))
    out = [i % num_taps if -num_taps <= i < num_taps else None for i in indices]
    if None in out:
        raise ValueError(f"indices={list(indices)}: there are {num_taps} feature taps")
    return out


class ClassifierMixin:
    """timm's model interface: ``forward_features`` -> activated feature map (N, num_features, H, W),
    ``forward_head`` -> global pool (``global_pool``, average by default) + (dropout) + linear classifier.

    Subclasses set ``self.num_features``, ``self.num_classes``, ``self.classifier`` (built with
    :meth:`classifier_head`, so ``num_classes=0`` gives pooled features), ``self.feature_info``
    (one dict per stage tap: ``num_chs``, ``reduction``, ``module``), the class attribute
    ``first_conv`` (the stem convolution's name) and implement :meth:`stage_outputs` and
    :meth:`group_matcher`. ``head_drop_rate`` is the dropout before the classifier (timm's
    ``drop_rate``; 0 unless a paper has it).
    """

    num_features: int
    num_classes: int
    first_conv: str
    feature_info: list[dict]
    head_drop_rate: float = 0.0
    global_pool: str = "avg"
    grad_checkpointing: bool = False
    pretrained_cfg: dict | None = None

    @staticmethod
    def classifier_head(num_features: int, num_classes: int, **factory) -> nn.Module:
        """The final linear classifier, or ``nn.Identity`` for ``num_classes=0``: the model then
        returns its pooled features (N, num_features), as in timm."""
        return nn.Linear(num_features, num_classes, **factory) if num_classes > 0 else nn.Identity()

    @property
    def head_hidden_size(self) -> int:
        """Width of the pooled features the classifier reads (``pre_logits``)."""
        return self.num_features * (2 if self.global_pool == "catavgmax" else 1)

    @property
    def in_chans(self) -> int:
        return self.get_submodule(self.first_conv).in_channels

    @property
    def default_cfg(self) -> dict | None:  # timm's older name of pretrained_cfg
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict | None) -> None:
        self.pretrained_cfg = cfg

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The activated final feature map: the last of :meth:`stage_outputs`."""
        return self.stage_outputs(x)[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = global_pool2d(x, self.global_pool)
        if self.head_drop_rate > 0:
            x = F.dropout(x, self.head_drop_rate, self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes`` on the model's
        device and dtype; 0 = no classifier, the model returns its pooled features (N, head_hidden_size),
        as timm's ``reset_classifier(0)``. ``global_pool`` (None = keep; a classifier after ``""``
        gets ``avg`` back): ``avg``, ``max``, ``avgmax``, ``catavgmax`` or ``""`` (no pooling,
        with ``num_classes=0`` only)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        pool = self.global_pool if global_pool is None else check_pool_type(global_pool)
        if pool == "" and num_classes > 0:  # a linear classifier reads pooled features
            if global_pool is not None:
                raise ValueError("global_pool='' (no pooling) needs num_classes=0")
            pool = "avg"
        ref = next((p for n, p in self.named_parameters() if not n.startswith("classifier.")), None)
        factory = {} if ref is None else dict(device=ref.device, dtype=ref.dtype)
        self.global_pool, self.num_classes = pool, num_classes
        self.classifier = self.classifier_head(self.head_hidden_size, num_classes, **factory)
        self.classifier.train(self.training)
        if isinstance(self.classifier, nn.Linear):
            nn.init.zeros_(self.classifier.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (same function)."""
        self.grad_checkpointing = bool(enable)

    def run_blocks(self, blocks, x: torch.Tensor) -> torch.Tensor:
        """``x`` through ``blocks`` in order, each checkpointed when grad checkpointing is on."""
        on = self.grad_checkpointing and torch.is_grad_enabled() and not is_tracing(x)
        for block in blocks:
            x = checkpoint(block, x, use_reentrant=False) if on else block(x)
        return x

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every stage tap of :attr:`feature_info`; the last is ``forward_features(x)``."""
        raise NotImplementedError

    def truncate_stages(self, keep: int) -> None:
        """Remove every stage after the first ``keep`` (their modules and the final normalisation),
        so that :meth:`stage_outputs` returns the first ``keep`` taps, the last of them unchanged."""
        raise NotImplementedError

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """timm's backbone pruning: keep the stages up to the last tap in ``indices`` (same meaning
        as in :meth:`forward_intermediates`) and remove the rest, so no parameter goes unused (DDP).
        ``forward_features`` then returns the last kept tap and ``num_features`` is its width. The
        final normalisation is part of the last tap here (the final features are normalised and
        activated), so it goes with the last stage; ``prune_norm`` is accepted for timm's signature.
        ``prune_head`` replaces the classifier by none (``reset_classifier(0, "")``); otherwise a
        classifier that read a removed stage is rebuilt for the new width. Returns the tap indices."""
        take = take_indices(len(self.feature_info), indices)
        keep = max(take) + 1
        truncated = keep < len(self.feature_info)
        if truncated:
            self.truncate_stages(keep)
            self.feature_info = [dict(info) for info in self.feature_info[:keep]]
            self.num_features = self.feature_info[-1]["num_chs"]
        if prune_head:
            self.reset_classifier(0, "")
        elif truncated:
            self.reset_classifier(self.num_classes)
        return take

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's ``forward_intermediates``: ``(forward_features(x), [stage outputs at indices])``, or only
        the list with ``intermediates_only``. ``norm`` and ``stop_early`` are accepted for timm's
        signature: the last tap is the final normalised features, and every stage runs."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        taps = self.stage_outputs(x)
        picked = [taps[i] for i in take_indices(len(taps), indices)]
        return picked if intermediates_only else (taps[-1], picked)


def init_he_fan_out(model: nn.Module) -> None:
    """He et al. 2015 normal init with n = k*k*out_channels (fan-out), as in fb.resnet.torch and the
    DenseNet / DelugeNet Lua code; BatchNorm gamma=1, beta=0; conv and linear biases 0.
    Linear weights keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) = Torch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class SpeedSwitches:
    """The speed switches of the cross-layer models (DenseNet, DelugeNet), set one way: constructor
    keyword arguments, attributes of the same names, or :meth:`set_speed`. None of them changes the
    function computed, the weights or the state_dict keys.

    - ``memory_efficient``: recompute activations in backward instead of storing them (less memory,
      a little slower); setting it on the model sets it on every layer that has the switch, and
      the layers' switches are what the plain and the fused paths read (a fused dense block
      recomputes when one of its layers has it).
    - ``fused``: the model's fast paths (:mod:`crosslayer.ops`): True, False (the plain modules),
      or None = the device kind's default (:func:`crosslayer.ops.defaults.use_fused`).
    - ``cpu_channels_last``: on CPU, run in the channels_last (NHWC) memory format.
    """

    SWITCHES = ("memory_efficient", "fused", "cpu_channels_last")
    fused: bool | None = None
    cpu_channels_last: bool = True

    @property
    def memory_efficient(self) -> bool:
        """True when every layer with the switch has it on (the layers' switches are the ones both
        paths read); the value set on a model without such layers otherwise."""
        layers = [m for m in self.modules() if m is not self and "memory_efficient" in vars(m)]
        return all(m.memory_efficient for m in layers) if layers else self.__dict__.get("_memory_efficient", False)

    @memory_efficient.setter
    def memory_efficient(self, enabled: bool) -> None:
        self.__dict__["_memory_efficient"] = bool(enabled)
        for m in self.modules():
            if m is not self and "memory_efficient" in vars(m):  # the layers' own switch
                m.memory_efficient = bool(enabled)

    def set_speed(self, **switches):
        """Set any of ``memory_efficient``, ``fused``, ``cpu_channels_last``; returns the model."""
        unknown = sorted(set(switches) - set(self.SWITCHES))
        if unknown:
            raise TypeError(f"unknown speed switch {unknown}; the switches are {', '.join(self.SWITCHES)}")
        for name, value in switches.items():
            setattr(self, name, value)
        return self

    def fast_path_off(self, device_type: str) -> str | None:
        """Why this model's fast paths, switched on (``fused``, or the device kind's default), would
        step aside in training on ``device_type``: one line for a run to print once, or None (they
        run, or they are switched off). The family's :meth:`fast_path_blocker` says what it checks."""
        if not use_fused(self.fused, device_type):
            return None
        if has_hooks(self):
            return "hooks are registered on its modules (the fused nodes would not call them)"
        return self.fast_path_blocker()

    def fast_path_blocker(self) -> str | None:
        return None

    def set_memory_efficient(self, enabled: bool = True) -> None:
        """Switch the memory-efficient mode on or off; weights are unchanged."""
        self.set_speed(memory_efficient=enabled)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's name for :meth:`set_memory_efficient`."""
        self.set_speed(memory_efficient=enable)
