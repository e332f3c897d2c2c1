"""Parameter and multiply-add counting, the one place every part of crosslayer counts.

Two multiply-add counts exist and are kept apart:

- **architecture** (:func:`count_macs`): the network as the paper defines it, on the meta device
  (no real compute). This is what ``crosslayer models`` and the results tables print.
- **executed** (:func:`executed_macs`): what a forward pass actually runs, e.g. fused DenseNet
  blocks average-pool before the transition's 1x1 convolution (both linear, they commute), which
  executes fewer multiply-adds than the architecture. Benchmarks report FLOP/s on this count.

Both use PyTorch's ``FlopCounterMode`` (convolutions and linear layers; MACs = FLOPs / 2).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from crosslayer.models import create_model, model_info


def count_params(model: nn.Module) -> int:
    """Trainable parameters (weights and biases, BN gamma/beta, CLDC weights): what the papers count."""
    return sum(p.numel() for p in model.parameters())


def _forward_macs(model: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops() // 2)


def count_macs(name: str, num_classes: int | None = None, in_channels: int | None = None,
               image_size: int | None = None, **model_kwargs) -> int:
    """Architecture multiply-adds of one forward pass of registered model ``name`` at its native
    input size (or ``in_channels`` x ``image_size``^2), counted on the meta device."""
    info = model_info(name)
    c = in_channels or info.input_size[0]
    size = (image_size, image_size) if image_size else tuple(info.input_size[1:])
    model_kwargs.pop("memory_efficient", None)
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, in_channels=c, **model_kwargs).eval()
        x = torch.empty(1, c, *size)
    if hasattr(model, "fused"):  # the architecture as the paper has it: the transition pools
        model.fused = False      # after its 1x1 conv (fused DenseNet blocks pool first: fewer MACs)
    return _forward_macs(model, x)


def executed_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds one forward pass of ``model`` on ``x`` actually executes (per batch ``x``)."""
    was = model.training
    model.eval()
    try:
        return _forward_macs(model, x)
    finally:
        model.train(was)


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward inside a ``with`` block
    (storages of ``exclude``, e.g. a model's parameters, not counted): ``.total`` after the block.
    Saved tensors are kept alive until backward, so no storage is reused while counting."""

    def __init__(self, exclude=()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in self._excluded and s.nbytes() > 0:
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())
