"""Fused dense blocks: a DenseNet dense block and the BN-ReLU(-Conv1x1-AvgPool) after it as one
autograd node over one shared feature buffer.

Computes exactly what the modules of :mod:`crosslayer.models.densenet` compute (Huang et al.,
CVPR 2017, Sec. 3: Eq. (2), bottleneck and transition layers; memory-efficient mode after Pleiss
et al., arXiv 1707.06990), differently: the concatenation of Eq. (2) is never copied, each feature
map is batch-normalised once instead of once per consumer, and the transition averages before its
1x1 convolution (both are linear, they commute). On CPU in float32/float64 each bottleneck's
BN-ReLU-Conv1x1 runs as the compiled kernel of :mod:`crosslayer.ops.cpu_kernels` where it builds
(the same function; it recomputes the ReLU output in backward instead of keeping it), otherwise as
PyTorch operators. docs/benchmarks.md describes and measures both.

:func:`fusable` recognises exactly the modules this implements (the stock ``DenseBlock``,
``DenseLayer``, ``Transition`` with ``BatchNorm2d``, ``ReLU``, bias-free ``Conv2d``,
``AvgPool2d(2, 2)``, the layers' dropout after each convolution and the transition's ``Dropout``,
Sec. 4.2); anything else, swapped or added, sends the model down its plain module path. Dropout
draws its masks with the operations ``F.dropout`` runs on that device, in the plain modules' order,
so that with the same generator state both paths drop the same units. :func:`fused_parameters`
defines the order of the node's parameters, used by both ``apply`` and ``backward``.
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from crosslayer.ops import cpu_kernels
from crosslayer.ops.batchnorm import bn_relu, update_running_stats
from crosslayer.ops.defaults import refuse_double_backward
from crosslayer.ops.dispatch import WATCHED, StructureCache, children_are, plain_batch_norm, plain_conv


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype in force for ``t``'s device kind, None without autocast."""
    try:
        dev = t.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    except RuntimeError:  # a device without autocast (meta)
        return None


# ------------------------------------------------------------------------------- recognition

def _layer_fusable(layer: nn.Module, layer_type: type) -> bool:
    """A stock DenseLayer: BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 (bottleneck) or BN-ReLU-Conv3x3, with
    dropout (rate < 1) after each convolution or none."""
    if type(layer) is not layer_type or not 0 <= layer.drop_rate < 1:
        return False
    bn, relu, conv = nn.BatchNorm2d, nn.ReLU, nn.Conv2d
    if layer.bottleneck:
        names = [("norm1", bn), ("relu1", relu), ("conv1", conv), ("norm2", bn), ("relu2", relu), ("conv2", conv)]
        return (children_are(layer, names) and plain_conv(layer.conv1, 1) and plain_conv(layer.conv2, 3)
                and plain_batch_norm(layer.norm1) and plain_batch_norm(layer.norm2))
    names = [("norm1", bn), ("relu1", relu), ("conv1", conv)]
    return children_are(layer, names) and plain_conv(layer.conv1, 3) and plain_batch_norm(layer.norm1)


def _transition_fusable(tail: nn.Module, transition_type: type) -> bool:
    """A stock Transition: BN-ReLU-Conv1x1-(Dropout, rate < 1)-AvgPool(2, 2)."""
    names = [("norm", nn.BatchNorm2d), ("relu", nn.ReLU), ("conv", nn.Conv2d), ("pool", nn.AvgPool2d)]
    if hasattr(tail, "drop"):
        names.insert(3, ("drop", nn.Dropout))
        if not (type(tail.drop) is nn.Dropout and 0 <= tail.drop.p < 1):
            return False
    if type(tail) is not transition_type or not children_are(tail, names):
        return False
    pool = tail.pool
    return (plain_batch_norm(tail.norm) and plain_conv(tail.conv, 1)
            and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0))
            and not pool.ceil_mode and pool.divisor_override is None)


def tail_norm(tail: nn.Module) -> nn.BatchNorm2d:
    """The BatchNorm of a block's tail: the transition's ``norm``, or the final norm itself."""
    return tail if isinstance(tail, nn.BatchNorm2d) else tail.norm


# The stock DenseNet modules these nodes implement (DenseBlock, DenseLayer, Transition), registered
# by crosslayer.models.densenet when it defines them: ops sits below models and never imports it.
STOCK: dict[str, type] = {}


def implements(**stock: type) -> None:
    """Register the stock module classes the fused nodes implement (``DenseBlock``, ``DenseLayer``,
    ``Transition``); an exact type match is required, so a subclass steps aside."""
    STOCK.update(stock)
    if "DenseLayer" in stock:  # the layer attributes the check reads, watched for in-place changes
        _PLANS.watched[stock["DenseLayer"]] = operator.attrgetter("drop_rate", "bottleneck", "growth_rate")


def fusable(block: nn.Module, tail: nn.Module) -> bool:
    """Whether ``block`` + ``tail`` (a Transition, or the final BatchNorm2d) are exactly the modules
    :class:`DenseBlockFunction` implements, in a state it implements: one BatchNorm mode for all
    (with autograd only training mode: the fused backward is the batch-statistics one) and one eps
    for every consumer of the shared normalisation."""
    moded = _moded(block, tail)
    return moded is not None and _modes_agree(moded)


def _moded(block: nn.Module, tail: nn.Module) -> list[nn.Module] | None:
    """The structural part of :func:`fusable`: None where ``block`` + ``tail`` are not the stock
    modules, else the modules whose modes must agree (the tail's norm first, every norm, every
    dropout: dropout draws exactly when the norms use batch statistics)."""
    if not STOCK:
        return None
    DenseBlock, DenseLayer, Transition = STOCK["DenseBlock"], STOCK["DenseLayer"], STOCK["Transition"]
    if type(block) is not DenseBlock or not all(_layer_fusable(m, DenseLayer) for m in block.children()):
        return None
    if not (plain_batch_norm(tail) if isinstance(tail, nn.BatchNorm2d) else _transition_fusable(tail, Transition)):
        return None
    layers = list(block.values())
    norm = tail_norm(tail)
    if not layers or not all(layer.norm1.eps == norm.eps for layer in layers):  # one eps for the shared normalisation
        return None
    bns = [norm] + [m for layer in layers for m in layer.children() if isinstance(m, nn.BatchNorm2d)]
    drops = [layer for layer in layers if layer.drop_rate > 0] + ([tail.drop] if hasattr(tail, "drop") else [])
    return bns + drops


def _modes_agree(moded: list[nn.Module]) -> bool:
    """One mode for all; with autograd only training (the fused backward is the batch-statistics one)."""
    mode = moded[0].training
    return all(m.training == mode for m in moded) and (mode or not torch.is_grad_enabled())


def _block_type() -> type:
    return STOCK.get("DenseBlock", type(None))


def fusable_features(features: nn.Sequential) -> bool:
    """Whether every dense block of a DenseNet's ``features`` can run fused: each is followed by a
    Transition or by the final BatchNorm2d (its ReLU fused in), and the last of them ends ``features``
    (a DenseNet pruned by ``prune_intermediate_layers`` ends at a transition)."""
    return _plan_runs_now(_features_plan(features))


def _plan_runs_now(plan: list[list[nn.Module]] | None) -> bool:
    """A structure plan (:func:`_features_plan`) whose every block has its modes in agreement now."""
    return plan is not None and all(_modes_agree(moded) for moded in plan)


def _features_plan(features: nn.Sequential) -> list[list[nn.Module]] | None:
    """:func:`fusable_features` less the modes: per dense block the modules whose modes must agree."""
    if type(features) is not nn.Sequential:
        return None
    modules = list(features.children())
    blocks = [i for i, m in enumerate(modules) if isinstance(m, _block_type())]
    if not blocks or blocks[-1] != len(modules) - 2:
        return None
    last = len(modules) - 1
    if any(i + 1 != last and isinstance(modules[i + 1], nn.BatchNorm2d) for i in blocks):
        return None
    plan = [_moded(modules[i], modules[i + 1]) for i in blocks]
    return None if any(p is None for p in plan) else plan


_PLANS = StructureCache(_features_plan, dict(WATCHED))


def fusable_now(features: nn.Sequential) -> bool:
    """:func:`fusable_features` and no hooks on ``features``, its structure checked once per change
    (:class:`~crosslayer.ops.dispatch.StructureCache`), the modes and autograd per call."""
    return _plan_runs_now(_PLANS(features))


def fused_parameters(block: nn.Module, tail: nn.Module) -> list[nn.Parameter]:
    """The parameters :class:`DenseBlockFunction` differentiates, in the order ``apply`` takes them
    and ``backward`` returns their gradients (the one place that order is defined)."""
    params = []
    for layer in block.values():
        params += [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight]
        if layer.bottleneck:
            params += [layer.norm2.weight, layer.norm2.bias, layer.conv2.weight]
    norm = tail_norm(tail)
    params += [norm.weight, norm.bias]
    return params if isinstance(tail, nn.BatchNorm2d) else params + [tail.conv.weight]


def run_features(features: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """relu(features(x)) for a DenseNet's ``features`` for which :func:`fusable_features` holds:
    every dense block with the module after it as one fused node, other modules called."""
    return run_stages(features, x)[-1]


def run_stages(features: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """:func:`run_features` returning the output of every fused node (each transition's output, and
    last relu(norm5(...)) = relu(features(x))). A block recomputes in backward (memory-efficient
    mode) when one of its layers has ``memory_efficient`` set: the switch the plain path reads."""
    modules, outputs = list(features.children()), []
    i = 0
    while i < len(modules):
        if isinstance(modules[i], _block_type()):
            block, tail = modules[i], modules[i + 1]
            params = fused_parameters(block, tail)
            recompute = any(layer.memory_efficient for layer in block.values())
            backward = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
            x = DenseBlockFunction.apply(x, block, tail, recompute, backward, *params)
            outputs.append(x)
            i += 2
        else:
            x = modules[i](x)
            i += 1
    return outputs


# ------------------------------------------------------------------------------- the feature buffer

class _Features:
    """The feature buffer of one dense block: a (P, C_total) matrix, P = N*H*W, one row per pixel
    (NHWC memory). Columns [c, c+k) hold feature map x_j, and a consumer of the first C channels
    (a later layer, the transition, the final norm) reads columns [0, C) in place: the
    concatenation of Eq. (2) is never copied. In training every consumer would batch-normalise x_j
    with the same batch statistics, so the buffer holds x_j normalised ONCE,
    hat_j = (x_j - mean_j) * invstd_j, and each consumer applies only its own affine + ReLU.
    In eval mode it holds the raw x_j and each consumer applies its running statistics."""

    def __init__(self, like: torch.Tensor, total: int, training: bool, eps: float, dtype: torch.dtype):
        self.n, _, self.h, self.w = like.shape
        self.p, self.training, self.eps, self.width = self.n * self.h * self.w, training, eps, 0
        # features and their gradients in the convolutions' dtype (bf16 under autocast, as the plain
        # form's), batch statistics in fp32
        self.buf = torch.empty((self.p, total), dtype=dtype, device=like.device)
        self.acc = torch.promote_types(dtype, torch.float32)
        self.mean = torch.zeros(total, dtype=self.acc, device=like.device)
        self.var = torch.ones(total, dtype=self.acc, device=like.device)
        self.invstd = torch.ones(total, dtype=self.acc, device=like.device)
        self.ghat: torch.Tensor | None = None  # backward: dL/d buffer
        self.kernels = None  # the compiled consumer kernels (crosslayer.ops.cpu_kernels) when they apply

    def nchw(self, m: torch.Tensor) -> torch.Tensor:
        """A (P, C) matrix seen as the (N, C, H, W) channels_last tensor it is."""
        return m.view(self.n, self.h, self.w, m.shape[1]).permute(0, 3, 1, 2)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """An (N, C, H, W) tensor as a (P, C) matrix (a view when it is channels_last)."""
        return t.permute(0, 2, 3, 1).reshape(self.p, t.shape[1])

    def put(self, t: torch.Tensor) -> None:
        """Append feature map ``t`` (N, k, H, W) to the buffer."""
        c0, c1 = self.width, self.width + t.shape[1]
        t = t.to(self.acc)
        if self.training:  # statistics over NCHW planes: ~3x faster than over 12-channel NHWC rows
            mean, var = torch.batch_norm_update_stats(t.contiguous(), None, None, 0.0)  # biased variance
            invstd = torch.rsqrt(var + self.eps)
            self.mean[c0:c1], self.var[c0:c1], self.invstd[c0:c1] = mean, var, invstd
            torch.addcmul(-mean * invstd, self.rows(t), invstd, out=self.buf[:, c0:c1])
        else:
            self.buf[:, c0:c1] = self.rows(t)
        self.width = c1

    def affine(self, bn: nn.BatchNorm2d, c: int, update_stats: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel (weight, bias) that ``bn`` applies to the buffer's first ``c`` columns, in
        the buffer's dtype: its own affine in training (the buffer is normalised; ``bn``'s running
        statistics are updated from the shared batch statistics unless ``update_stats`` is False),
        the affine folded with its running statistics in eval."""
        w, b = bn.weight.to(self.acc), bn.bias.to(self.acc)
        if self.training:
            if update_stats:
                update_running_stats(bn, self.mean[:c], self.var[:c], self.p)
        else:
            w = w * torch.rsqrt(bn.running_var.to(self.acc) + bn.eps)
            b = b - bn.running_mean.to(self.acc) * w
        dt = self.buf.dtype  # one dtype for the whole expression: mixed-dtype kernels are slow on CPU
        return w.to(dt), b.to(dt)

    def consume(self, bn: nn.BatchNorm2d, c: int, update_stats: bool = True) -> torch.Tensor:
        """relu(bn(cat(x_0, ..., x_j))) for the first ``c`` channels, a (P, c) matrix."""
        w, b = self.affine(bn, c, update_stats)
        return torch.addcmul(b, self.buf[:, :c], w).relu_()

    def consumer_backward(self, gy: torch.Tensor, y: torch.Tensor, bn: nn.BatchNorm2d, grads: dict) -> None:
        """Backward of ``consume`` (training): adds weight * dL/d(pre-ReLU) into ``self.ghat[:, :c]``
        (dL/d hat summed over consumers, in place; the first call, the block's last consumer, reads
        every column and creates it) and records dL/d weight and dL/d bias in ``grads``."""
        c = y.shape[1]
        gy = torch.ops.aten.threshold_backward.grad_input(gy, y, 0, grad_input=gy)
        grads[id(bn.bias)] = gy.sum(0).to(bn.bias.dtype)
        if self.ghat is None:
            assert c == self.buf.shape[1]
            self.ghat = gy * bn.weight.to(gy.dtype)
        else:
            self.ghat[:, :c].addcmul_(gy, bn.weight.to(gy.dtype))
        grads[id(bn.weight)] = gy.mul_(self.buf[:, :c]).sum(0).to(bn.weight.dtype)

    def normalization_backward(self, c0: int, c1: int) -> torch.Tensor:
        """dL/dx_j (N, c1-c0, H, W) from dL/d hat_j, hat_j = (x_j - mean) * invstd with batch
        statistics: invstd * (g - mean(g) - hat * mean(g * hat)), the BatchNorm backward."""
        g = self.nchw(self.ghat[:, c0:c1]).contiguous()  # NCHW: ~30x faster than NHWC for k=12 channels
        hat = self.nchw(self.buf[:, c0:c1]).contiguous()
        zero = torch.zeros(c1 - c0, dtype=self.acc, device=g.device)
        gx = torch.ops.aten.native_batch_norm_backward(g, hat, None, None, None, zero, torch.ones_like(zero), True,
                                                       self.eps, [True, False, False])[0]
        return gx.mul_(self.invstd[c0:c1, None, None].to(gx.dtype))


def drop_rate_of(module: nn.Module) -> float:
    """The dropout rate ``module`` (a DenseLayer, or a Transition's Dropout) applies now: 0 in eval."""
    p = module.p if isinstance(module, nn.Dropout) else module.drop_rate
    return p if module.training else 0.0


def dropout(t: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(F.dropout(t, p), the scaled mask) with the operations F.dropout runs: ATen's fused kernel
    on CUDA/XPU, a scaled Bernoulli noise elsewhere, so that the same generator state gives the
    plain modules' masks. Backward multiplies by the mask. ``p`` 0: (t, None)."""
    if p == 0:
        return t, None
    if t.device.type in ("cuda", "xpu"):
        out, keep = torch.native_dropout(t, p, True)
        return out, keep.to(t.dtype).mul_(1 / (1 - p))
    noise = torch.empty_like(t).bernoulli_(1 - p).div_(1 - p)
    return t * noise, noise


def dropout_backward(grad: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return grad if mask is None else grad * mask


def _kernels_for(buf: torch.Tensor):
    """The compiled consumer kernels when they implement this buffer (CPU, float32 or float64), else None."""
    if buf.device.type != "cpu" or buf.dtype not in (torch.float32, torch.float64):
        return None
    return cpu_kernels.get()


# ------------------------------------------------------------------------------- backward helpers

def avg_pool_backward(grad: torch.Tensor, feats: _Features) -> torch.Tensor:
    """Backward of the transition's 2x2/2 average pooling as a (P, C) matrix: each pixel gets a
    quarter of its window's gradient (written once, no zero fill; odd sizes take aten's kernel)."""
    n, c, h, w = grad.shape
    if (feats.h, feats.w) != (2 * h, 2 * w):
        full = torch.zeros((n, c, feats.h, feats.w), dtype=grad.dtype, device=grad.device)
        g = torch.ops.aten.avg_pool2d_backward(grad, full, [2, 2], [2, 2], [0, 0], False, True, None)
        return feats.rows(g)
    out = torch.empty((n, h, 2, w, 2, c), dtype=grad.dtype, device=grad.device)
    torch.mul(grad.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(out.shape), 0.25, out=out)
    return out.view(feats.p, c)


def conv_backward(grad: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d, dtype: torch.dtype, grads: dict):
    """dL/d input of a bias-free stride-1 ``conv`` computed in ``dtype``; dL/d weight goes to ``grads``."""
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad.to(dtype), x, conv.weight.to(dtype), None, [1, 1], list(conv.padding), [1, 1], False, [0, 0], 1,
        [True, True, False])
    grads[id(conv.weight)] = gw.to(conv.weight.dtype)
    return gx


# ------------------------------------------------------------------------------- the fused node

class DenseBlockFunction(torch.autograd.Function):
    """A dense block and the BN-ReLU(-Conv1x1-AvgPool) after it (transition or final norm) as one
    autograd node over one shared feature buffer (:class:`_Features`).

    Backward adds every consumer's gradient with respect to the normalised features into one
    (P, C_total) buffer, in place, and runs each feature's normalisation backward once.
    ``recompute`` (memory-efficient mode) keeps no per-consumer ReLU output (quadratic in depth):
    they are recomputed from the buffer in backward, bit-identically. Without ``backward`` (no
    gradient will be asked for: inference) nothing is kept and the bottleneck's BN-ReLU runs in place.
    """

    @staticmethod
    def forward(ctx, x, block, tail, recompute, backward, *params):
        layers, norm = list(block.values()), tail_norm(tail)
        total = x.shape[1] + sum(layer.growth_rate for layer in layers)
        dtype = autocast_dtype(x) or x.dtype
        with torch.autocast(x.device.type, enabled=False):
            feats = _Features(x, total, norm.training, norm.eps, dtype)
            feats.kernels = _kernels_for(feats.buf)
            feats.put(x)
            saved = [_layer_forward(feats, layer, recompute, dtype, backward) for layer in layers]
            y = feats.consume(norm, total)
            if isinstance(tail, nn.BatchNorm2d):
                out, tail_saved = feats.nchw(y), [y]
            elif hasattr(tail, "drop") and drop_rate_of(tail.drop) > 0:  # dropout between conv and pool: no commuting
                z, mask = dropout(F.conv2d(feats.nchw(y), tail.conv.weight.to(dtype)), drop_rate_of(tail.drop))
                out = F.avg_pool2d(z, 2)
                tail_saved = [] if not backward else [mask] + ([] if recompute else [y])
            else:
                pooled = F.avg_pool2d(feats.nchw(y), 2)
                out = F.conv2d(pooled, tail.conv.weight.to(dtype))
                tail_saved = [] if recompute or not backward else [y, pooled]
        ctx.feats, ctx.block, ctx.tail, ctx.recompute, ctx.dtype = feats, block, tail, recompute, dtype
        ctx.tail_dropout = hasattr(tail, "drop") and drop_rate_of(tail.drop) > 0
        ctx.counts = [len(s) for s in saved]
        ctx.save_for_backward(feats.buf, *[t for s in saved for t in s], *tail_saved)
        feats.buf = None  # held by the saved tensors only (freed with the graph, counted by saved-tensor hooks)
        return out

    @staticmethod
    def backward(ctx, grad):
        refuse_double_backward("fused dense block")
        buf, *saved = ctx.saved_tensors
        feats, block, tail, recompute, dtype = ctx.feats, ctx.block, ctx.tail, ctx.recompute, ctx.dtype
        feats.buf = buf
        per_layer, i = [], 0
        for n in ctx.counts:
            per_layer.append(saved[i:i + n])
            i += n
        grads: dict[int, torch.Tensor] = {}
        with torch.autocast(buf.device.type, enabled=False):
            _tail_backward(feats, tail, grad, saved[i:], recompute, dtype, grads, ctx.tail_dropout)
            c1 = buf.shape[1]
            for layer, layer_saved in zip(reversed(list(block.values())), reversed(per_layer)):
                c1 -= layer.growth_rate
                _layer_backward(feats, layer, c1, layer_saved, recompute, dtype, grads)
            grad_x = feats.normalization_backward(0, c1)
        feats.buf = feats.ghat = None
        ordered = [grads.get(id(p)) for p in fused_parameters(block, tail)]
        return (grad_x, None, None, None, None, *ordered)  # autograd casts grad_x to x's dtype


def _uses_kernel(feats: _Features, layer: nn.Module) -> bool:
    """Whether ``layer``'s BN-ReLU-Conv1x1 runs as the compiled consumer kernel (bottlenecks only)."""
    return feats.kernels is not None and layer.bottleneck


def conv1x1_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution's weight (m, c, 1, 1) as the (c, m) matrix the consumer kernel multiplies by."""
    return weight.reshape(weight.shape[0], -1).t().contiguous()


def kernel_rows(buf: torch.Tensor, c: int) -> int:
    """Rows per tile of the compiled consumer kernel over ``c`` columns of ``buf``: a (rows, c)
    scratch of ~1 MiB stays in cache."""
    return max(256, min(8192, (1 << 20) // (c * buf.element_size())))


def _layer_forward(feats: _Features, layer: nn.Module, recompute: bool, dtype: torch.dtype,
                   backward: bool = True) -> list[torch.Tensor]:
    """One DenseLayer on the buffer: consume its input columns, append its output. Returns what its
    backward needs: the bottleneck's conv1 output, norm2 statistics and (unless ``recompute``) its
    ReLU output, then the first ReLU output unless ``recompute`` or the compiled kernel (which
    recomputes it tile by tile) ran, each after the layer's two dropout masks (None where it has
    none); nothing without ``backward``."""
    c, p = feats.width, drop_rate_of(layer)
    if _uses_kernel(feats, layer):
        w, b = feats.affine(layer.norm1, c)
        wt = conv1x1_matrix(layer.conv1.weight.to(dtype))
        out = feats.nchw(feats.kernels.consume_conv1x1(feats.buf, c, w, b, wt, kernel_rows(feats.buf, c)))
        kept = []
    else:
        y = feats.consume(layer.norm1, c)
        out = F.conv2d(feats.nchw(y), layer.conv1.weight.to(dtype), None, 1, layer.conv1.padding)
        kept = [] if recompute else [y]
    mask1 = None
    if layer.bottleneck:
        out, mask1 = dropout(out, p)
        y2, mean2, invstd2 = bn_relu(out, layer.norm2, inplace=not backward)
        kept = [out, mean2, invstd2] + ([] if recompute else [y2]) + kept
        out = F.conv2d(y2, layer.conv2.weight.to(dtype), None, 1, layer.conv2.padding)
    out, mask2 = dropout(out, p)
    feats.put(out)
    return [mask1, mask2] + kept if backward else []


def _tail_backward(feats: _Features, tail: nn.Module, grad: torch.Tensor, saved: list, recompute: bool,
                   dtype: torch.dtype, grads: dict, with_dropout: bool = False) -> None:
    """Backward of the final norm-ReLU, or of the transition's norm-ReLU-pool-conv1x1 (pool first),
    or, ``with_dropout``, its norm-ReLU-conv1x1-dropout-pool."""
    if with_dropout:
        mask, *saved = saved
        y = feats.consume(tail.norm, feats.buf.shape[1], update_stats=False) if recompute else saved[0]
        gz = dropout_backward(feats.nchw(avg_pool_backward(grad, feats)), mask)
        gy = conv_backward(gz, feats.nchw(y), tail.conv, dtype, grads)
        feats.consumer_backward(feats.rows(gy.contiguous(memory_format=torch.channels_last)), y, tail.norm, grads)
        return
    if isinstance(tail, nn.BatchNorm2d):
        y = saved[-1]
        gy = torch.empty_like(y)
        feats.nchw(gy).copy_(grad)
        feats.consumer_backward(gy, y, tail, grads)
        return
    if recompute:
        y = feats.consume(tail.norm, feats.buf.shape[1], update_stats=False)
        pooled = F.avg_pool2d(feats.nchw(y), 2)
    else:
        y, pooled = saved
    gpool = conv_backward(grad, pooled, tail.conv, dtype, grads)
    feats.consumer_backward(avg_pool_backward(gpool, feats), y, tail.norm, grads)


def _layer_backward(feats: _Features, layer: nn.Module, c: int, saved: list, recompute: bool,
                    dtype: torch.dtype, grads: dict) -> None:
    """Backward of one DenseLayer whose output is buffer columns [c, c + k)."""
    mask1, mask2, *saved = saved
    g = dropout_backward(feats.normalization_backward(c, c + layer.growth_rate), mask2)
    if layer.bottleneck:
        mid, mean2, invstd2, *saved = saved
        y2 = bn_relu(mid, layer.norm2, (mean2, invstd2))[0] if recompute else saved.pop(0)
        gy2 = conv_backward(g, y2, layer.conv2, dtype, grads)
        gy2 = torch.ops.aten.threshold_backward.grad_input(gy2, y2, 0, grad_input=gy2)
        g, grads[id(layer.norm2.weight)], grads[id(layer.norm2.bias)] = torch.ops.aten.native_batch_norm_backward(
            gy2, mid, layer.norm2.weight, None, None, mean2, invstd2, True, layer.norm2.eps,  # takes mixed dtypes
            [True, True, True])
        g = dropout_backward(g, mask1)
    if _uses_kernel(feats, layer):
        w, b = feats.affine(layer.norm1, c, update_stats=False)
        conv, norm = layer.conv1, layer.norm1
        gwt, gw, gb = feats.kernels.consume_conv1x1_backward(
            feats.rows(g.contiguous(memory_format=torch.channels_last)), feats.buf, c, w, b,
            conv1x1_matrix(conv.weight.to(dtype)), feats.ghat, kernel_rows(feats.buf, c))
        grads[id(conv.weight)] = gwt.t().reshape(conv.weight.shape).to(conv.weight.dtype)
        grads[id(norm.weight)], grads[id(norm.bias)] = gw.to(norm.weight.dtype), gb.to(norm.bias.dtype)
        return
    y = feats.consume(layer.norm1, c, update_stats=False) if recompute else saved[0]
    gy = conv_backward(g, feats.nchw(y), layer.conv1, dtype, grads)
    gy = feats.rows(gy.contiguous(memory_format=torch.channels_last))
    feats.consumer_backward(gy, y, layer.norm1, grads)
