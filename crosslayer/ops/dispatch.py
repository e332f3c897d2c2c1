"""When a fast path must step aside: tracers and hooks.

A fast path bypasses the module calls of the modules it replaces, so it runs only when nothing
would notice: no tracer is recording the model (torch.compile / torch.export, TorchScript's
``torch.jit.trace``, FX symbolic tracing as in torchvision's ``create_feature_extractor``) and no
hook is registered that would then not fire.

Deciding whether a structure is one a fast path implements walks the module tree; a model decides
it once per structure (:class:`StructureCache`) and per call only what can change per call.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable

import torch
import torch.fx
import torch.nn as nn
from torch.nn.modules import module as M
from torch.utils.hooks import RemovableHandle

_registrations = 0  # modules, parameters and buffers registered anywhere (a swap, an added module)


def _registered(*args) -> None:
    global _registrations
    _registrations += 1


for _register in (M.register_module_module_registration_hook, M.register_module_parameter_registration_hook,
                  M.register_module_buffer_registration_hook):
    _register(_registered)

# The attributes of the leaf modules a structure check reads: an in-place change of one (a norm's
# eps, a convolution's padding) is seen by comparing them with their values at the check.
WATCHED = {nn.Conv2d: operator.attrgetter("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"),
           nn.BatchNorm2d: operator.attrgetter("eps", "affine", "track_running_stats"),
           nn.AvgPool2d: operator.attrgetter("kernel_size", "stride", "padding", "ceil_mode", "divisor_override"),
           nn.Dropout: operator.attrgetter("p")}


def is_tracing(x) -> bool:
    """Whether ``x`` flows through a tracer (torch.compile / torch.export, ``torch.jit.trace``, or
    FX symbolic tracing): models then take their plain module path, which tracers can record."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or isinstance(x, torch.fx.Proxy)


def _global_hooks() -> bool:
    return bool(M._global_forward_hooks or M._global_forward_pre_hooks or M._global_backward_hooks)


def has_hooks(root: nn.Module) -> bool:
    """Whether a forward/backward hook is registered on ``root`` or below, or globally: fused
    implementations that bypass submodule calls step aside then, so hooks keep firing."""
    if _global_hooks():
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in root.modules())


def _child_count(module: nn.Module) -> int:
    return len(module._modules)


class _Entry:
    def __init__(self, root: nn.Module, check: Callable[[nn.Module], object], watched: dict):
        self.registrations = _registrations
        self.answer = check(root)
        self.extra = [(getter, m) for m in root.modules() for cls, getter in watched.items() if type(m) is cls]
        # a deleted submodule (``del layer.se``) registers nothing: each container's child count is watched
        self.extra += [(_child_count, m) for m in root.modules() if m._modules]
        self.values = self.snapshot()
        self.hook_handles, self.hooks = RemovableHandle.next_id, has_hooks(root)

    def snapshot(self) -> list:
        return [getter(m) for getter, m in self.extra]


class StructureCache:
    """``check(root)`` (a structural question: the module types, their order and attributes; None
    for no) and whether ``root`` has hooks, answered once per structure. An answer is recomputed
    when a module, parameter or buffer has been registered anywhere since (torch's global
    registration hooks), when a module below ``root`` lost a child, when an attribute ``check``
    reads (``watched``: exact type -> getter) has changed in place, and for hooks when a hook handle
    has been made anywhere (``RemovableHandle``'s counter) or while hooks were there (they may have
    been removed). Modes and autograd are the caller's, per call."""

    def __init__(self, check: Callable[[nn.Module], object], watched: dict | None = None):
        self.check, self.watched = check, WATCHED if watched is None else watched
        self.entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, root: nn.Module):
        """``check(root)``'s answer, None where ``root`` or the whole program has hooks."""
        e = self.entries.get(root)
        if e is None or e.registrations != _registrations or e.snapshot() != e.values:
            e = self.entries[root] = _Entry(root, self.check, self.watched)
        if e.answer is None or _global_hooks():
            return None
        if e.hooks or e.hook_handles != RemovableHandle.next_id:
            e.hook_handles, e.hooks = RemovableHandle.next_id, has_hooks(root)
        return None if e.hooks else e.answer


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
