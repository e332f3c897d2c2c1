"""When a fast path must step aside: tracers and hooks.

A fast path bypasses the module calls of the modules it replaces, so it runs only when nothing
would notice: no tracer is recording the model (torch.compile / torch.export, TorchScript's
``torch.jit.trace``, FX symbolic tracing as in torchvision's ``create_feature_extractor``) and no
hook is registered that would then not fire.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn


def is_tracing(x) -> bool:
    """Whether ``x`` flows through a tracer (torch.compile / torch.export, ``torch.jit.trace``, or
    FX symbolic tracing): models then take their plain module path, which tracers can record."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy)


def has_hooks(root: nn.Module) -> bool:
    """Whether a forward/backward hook is registered on ``root`` or below, or globally: fused
    implementations that bypass submodule calls step aside then, so hooks keep firing."""
    from torch.nn.modules import module as M

    if M._global_forward_hooks or M._global_forward_pre_hooks or M._global_backward_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in root.modules())


def children_are(module: nn.Module, expected: list[tuple[str, type]]) -> bool:
    """Whether ``module``'s direct children are exactly ``expected`` (name, exact type), in order:
    nothing swapped (a subclass or another module type), nothing added, nothing missing."""
    got = [(name, type(m)) for name, m in module.named_children()]
    return got == expected


def plain_conv(conv: nn.Module, kernel: int, stride: int = 1) -> bool:
    """An ``nn.Conv2d`` (exactly) with a square ``kernel``, ``stride``, 'same' zero padding for
    stride 1, no dilation, no groups and no bias."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (kernel, kernel) and conv.stride == (stride, stride)
            and conv.padding == (kernel // 2, kernel // 2) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.bias is None and conv.padding_mode == "zeros")


def plain_batch_norm(bn: nn.Module, affine: bool = True) -> bool:
    """An ``nn.BatchNorm2d`` (exactly: not SyncBatchNorm, whose statistics are not the local ones)
    with running statistics and the given ``affine``."""
    return type(bn) is nn.BatchNorm2d and bn.affine == affine and bn.track_running_stats
