"""DelugeNet fast paths: shared normalisation, the per-stage gradient bank, the CLDC weighted sum.

Kuen et al., "DelugeNets", arXiv 1611.05552, Sec. 3 (cross-layer depthwise convolution); the
official Lua code (xternalz/DelugeNets) normalises every input of every CLDC with its own
affine-free BatchNorm. All consumers of a stage output normalise it with the same batch
statistics, so the model normalises each output once (one ``nn.BatchNorm2d(affine=False)`` per
output, ``DelugeStage.norms``) and each CLDC is a weighted sum of the stored normalised tensors.
In training the fast path here also sums the gradients of each normalised output over its
consumers in place (:class:`GradBank`) instead of through autograd's per-consumer additions.
On CPU (float32/float64, channels_last) the CLDC's weighted sum and its backward run as a compiled
kernel (:mod:`crosslayer.ops.cpu_kernels`) where it builds.

:func:`bank_applies` recognises exactly the normalisation modules this implements; anything
else (SyncBatchNorm, another norm, hooks, a tracer, eval mode) runs the plain modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from crosslayer.ops import cpu_kernels
from crosslayer.ops.batchnorm import count_batch
from crosslayer.ops.defaults import refuse_double_backward, use_fused
from crosslayer.ops.dispatch import has_hooks, is_tracing, plain_batch_norm


class GradBank:
    """Gradients of one stage's normalised outputs, each summed over its consumers in place (one
    buffer per output instead of one product tensor per consumer plus autograd's additions).
    Keys: output index in the stage, 0 = oldest."""

    def __init__(self):
        self.grads: dict[int, torch.Tensor] = {}

    def add(self, j: int, grad: torch.Tensor, w: torch.Tensor) -> None:
        """grads[j] += grad * w (w per channel)."""
        if j in self.grads:
            self.grads[j].addcmul_(grad, w[:, None, None])
        else:
            self.grads[j] = grad * w[:, None, None]

    def pop(self, j: int) -> torch.Tensor | None:
        return self.grads.pop(j, None)

    def slots(self, js: list[int], like: torch.Tensor) -> tuple[list[torch.Tensor], list[bool]] | None:
        """The gradient tensors of outputs ``js`` for the compiled CLDC backward to write into: the
        existing ones (to add into), new ones like ``like`` (to assign, flag True). None when an
        existing one is not laid out like ``like`` (the kernel's layout): the operator path then runs."""
        if any(j in self.grads and not _same_layout(self.grads[j], like) for j in js):
            return None
        assign = [j not in self.grads for j in js]
        for j in js:
            self.grads.setdefault(j, torch.empty_like(like, memory_format=torch.channels_last))
        return [self.grads[j] for j in js], assign


@dataclass
class StageOutputs:
    """What a DelugeNet stage hands to its consumers (the next stage's transition, or the head):
    its outputs after the shared normalisation, newest first, and the bank their gradients are
    summed in (None on the plain path)."""

    normalized: list[torch.Tensor]
    bank: GradBank | None = None


def bankable(norms) -> bool:
    """Whether a stage's shared normalisations are what the gradient bank implements: each exactly an
    affine-free ``nn.BatchNorm2d`` with running statistics (not SyncBatchNorm, nothing swapped)."""
    return all(plain_batch_norm(n, affine=False) for n in norms)


def bank_applies(norms: nn.ModuleList, x: torch.Tensor, fused: bool | None) -> bool:
    """Whether a stage's shared normalisations run as :class:`SharedBatchNorm` with a gradient bank:
    fast paths on (``fused``: True / False / None = the device kind's default), autograd on, no
    tracer, and every norm exactly a training-mode, affine-free ``nn.BatchNorm2d`` with running
    statistics and no hooks (the bank bypasses the norms' module calls). Frozen (eval-mode) norms
    and SyncBatchNorm take the module path."""
    return (use_fused(fused, x.device.type) and torch.is_grad_enabled() and not is_tracing(x)
            and bankable(norms) and all(n.training for n in norms) and not has_hooks(norms))


def normalize(bn: nn.BatchNorm2d, x: torch.Tensor, j: int, bank: GradBank | None) -> torch.Tensor:
    """Stage output ``j`` after its shared normalisation ``bn``: the module call, or with a bank
    the :class:`SharedBatchNorm` node whose gradient arrives through the bank."""
    return bn(x) if bank is None else SharedBatchNorm.apply(x, bn, bank, j)


class SharedBatchNorm(torch.autograd.Function):
    """Training-mode affine-free batch norm of stage output j (``bn``: its shared BatchNorm2d, whose
    running statistics are updated exactly as its own forward would). The gradient of the result
    arrives through ``bank`` (its consumers, the CLDCs, add into it), plus any ordinary one; this
    node runs after all of them because each consumer takes the result as an input."""

    @staticmethod
    def forward(ctx, x, bn, bank, j):
        ctx.set_materialize_grads(False)
        f = count_batch(bn)
        out, mean, invstd = torch.native_batch_norm(x, None, None, bn.running_mean, bn.running_var, True, f, bn.eps)
        ctx.save_for_backward(x, mean, invstd)
        ctx.bank, ctx.j, ctx.eps = bank, j, bn.eps
        return out

    @staticmethod
    def backward(ctx, grad):
        refuse_double_backward("DelugeNet shared batch norm")
        x, mean, invstd = ctx.saved_tensors
        banked = ctx.bank.pop(ctx.j)
        grad = banked if grad is None else grad if banked is None else grad + banked
        if grad is None:
            return None, None, None, None
        gx = torch.ops.aten.native_batch_norm_backward(grad, x, None, None, None, mean, invstd, True, ctx.eps,
                                                       [True, False, False])[0]
        return gx, None, None, None


def _same_layout(t: torch.Tensor, ref: torch.Tensor) -> bool:
    return t.shape == ref.shape and t.dtype == ref.dtype and t.is_contiguous(memory_format=torch.channels_last)


def _cldc_kernels(ref: torch.Tensor, tensors):
    """The compiled CLDC kernels when they implement these tensors (CPU, float32/float64, 4-d, one
    shape, channels_last memory: the CPU models' layout), else None."""
    if ref.device.type != "cpu" or ref.dtype not in (torch.float32, torch.float64) or ref.dim() != 4:
        return None
    if not all(_same_layout(t, ref) for t in tensors):
        return None
    return cpu_kernels.get()


def weighted_sum(weight: torch.Tensor, bias: torch.Tensor, xs) -> torch.Tensor:
    """sum_i weight[:, i] * xs[i] + sum_i bias[:, i], per channel, accumulated in place into one output
    (each in-place result is reassigned, so an FX trace chains the steps instead of pruning them).
    The CLDC's arithmetic with plain autograd (the traced and plain form)."""
    w = weight.to(xs[0].dtype)
    out = torch.mul(xs[0], w[:, 0, None, None])
    for i in range(1, len(xs)):
        out = out.addcmul_(xs[i], w[:, i, None, None])
    return out.add_(bias.sum(1).to(out.dtype)[:, None, None])


class WeightedSum(torch.autograd.Function):
    """out = sum_i weight[:, i] * x_i + sum_i bias[:, i] (per channel), the CLDC's arithmetic, in
    one autograd node: forward accumulates in place into one output (no temporary per input).
    Backward adds weight[:, i] * grad into input i's gradient in ``bank`` in place, and computes
    weight column i with one temporary-free reduction; the per-input ``addcmul`` autograd graph
    needs two products, a product by the scalar 1, a sum and autograd's gradient additions.
    Inputs are a stage's outputs newest first: input i is output L-1-i.

    With the compiled CPU kernels (:mod:`crosslayer.ops.cpu_kernels`; float32/float64, channels_last)
    forward and backward each make one pass over the inputs per chunk of pixels."""

    @staticmethod
    def forward(ctx, weight, bias, bank, *xs):
        kernels = _cldc_kernels(xs[0], xs)
        if kernels is None:
            out = weighted_sum(weight, bias, xs)
        else:
            dt = xs[0].dtype
            out = kernels.cldc_forward(list(xs), weight.to(dt), bias.sum(1).to(dt))
        ctx.save_for_backward(weight, *xs)
        ctx.bank, ctx.kernels = bank, kernels
        return out

    @staticmethod
    def backward(ctx, grad):
        refuse_double_backward("DelugeNet cross-layer depthwise convolution")
        weight, *xs = ctx.saved_tensors
        slots = None
        if ctx.kernels is not None and _same_layout(grad, xs[0]):
            slots = ctx.bank.slots([len(xs) - 1 - i for i in range(len(xs))], grad)
        if slots is not None:
            grad_weight, grad_bias_sum = ctx.kernels.cldc_backward(grad, xs, weight.to(grad.dtype), *slots)
            grad_bias = grad_bias_sum.to(weight.dtype)[:, None].expand_as(weight).clone()
            return (grad_weight.to(weight.dtype), grad_bias, None, *([None] * len(xs)))
        grad_weight = torch.empty_like(weight)
        zero = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        one = torch.ones_like(zero)
        w = weight.to(grad.dtype)
        for i, x in enumerate(xs):
            ctx.bank.add(len(xs) - 1 - i, grad, w[:, i])
            # sum over N, H, W of grad * x_i without a temporary: the weight gradient of an eval-mode
            # batch norm with mean 0, variance 1, eps 0. The saved statistics repeat them: CUDA
            # asserts they are defined (and reads them), CPU reads the running ones
            grad_weight[:, i] = torch.ops.aten.native_batch_norm_backward(
                grad, x, one, zero, one, zero, one, False, 0.0, [False, True, False])[1]
        grad_bias = grad.sum((0, 2, 3), dtype=weight.dtype)[:, None].expand_as(weight).clone()
        return (grad_weight, grad_bias, None, *([None] * len(xs)))  # the inputs' gradients went to the bank
