"""DenseNet and DenseNet-BC.

G. Huang, Z. Liu, L. van der Maaten, K. Q. Weinberger, "Densely Connected Convolutional Networks",
CVPR 2017 (arXiv 1608.06993); memory-efficient mode after G. Pleiss et al., "Memory-Efficient
Implementation of DenseNets", arXiv 1707.06990.

Module names follow torchvision (``features.conv0``, ``features.denseblock1.denselayer1.norm1``,
``features.transition1.conv``, ``features.norm5``, ``classifier``) so torchvision's ImageNet
state_dicts load directly (:func:`load_torchvision_state_dict` also handles the old key format).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from crosslayer.models._base import ClassifierMixin, batch_norm, count_batch, has_hooks, init_he_fan_out, is_tracing
from crosslayer.models._registry import register_model
from crosslayer.ops.defaults import use_fused

PAPER = "Huang et al., Densely Connected Convolutional Networks, CVPR 2017"


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    try:
        dev = t.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    except RuntimeError:  # a device without autocast (meta)
        return None


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

    def consume(self, bn: nn.BatchNorm2d, c: int, update_stats: bool = True) -> torch.Tensor:
        """relu(bn(cat(x_0, ..., x_j))) for the first ``c`` channels, a (P, c) matrix. In training
        ``bn``'s running statistics are updated from the shared batch statistics."""
        w, b = bn.weight.to(self.acc), bn.bias.to(self.acc)
        if self.training:
            if update_stats and bn.track_running_stats:
                _update_running_stats(bn, self.mean[:c], self.var[:c], self.p)
        else:
            w = w * torch.rsqrt(bn.running_var.to(self.acc) + bn.eps)
            b = b - bn.running_mean.to(self.acc) * w
        dt = self.buf.dtype  # one dtype for the whole expression: mixed-dtype kernels are slow on CPU
        return torch.addcmul(b.to(dt), self.buf[:, :c], w.to(dt)).relu_()

    def consumer_backward(self, gy: torch.Tensor, y: torch.Tensor, bn: nn.BatchNorm2d):
        """Backward of ``consume`` (training): adds weight * dL/d(pre-ReLU) into ``self.ghat[:, :c]``
        (dL/d hat summed over consumers, in place; the first call, the block's last consumer, reads
        every column and creates it) and returns (dL/d weight, dL/d bias)."""
        c = y.shape[1]
        gy = torch.ops.aten.threshold_backward.grad_input(gy, y, 0, grad_input=gy)
        grad_bias = gy.sum(0)
        if self.ghat is None:
            assert c == self.buf.shape[1]
            self.ghat = gy * bn.weight.to(gy.dtype)
        else:
            self.ghat[:, :c].addcmul_(gy, bn.weight.to(gy.dtype))
        grad_weight = gy.mul_(self.buf[:, :c]).sum(0)
        return grad_weight.to(bn.weight.dtype), grad_bias.to(bn.bias.dtype)

    def normalization_backward(self, c0: int, c1: int) -> torch.Tensor:
        """dL/dx_j (N, c1-c0, H, W) from dL/d hat_j, hat_j = (x_j - mean) * invstd with batch
        statistics: invstd * (g - mean(g) - hat * mean(g * hat)), the BatchNorm backward."""
        g = self.nchw(self.ghat[:, c0:c1]).contiguous()  # NCHW: ~30x faster than NHWC for k=12 channels
        hat = self.nchw(self.buf[:, c0:c1]).contiguous()
        zero = torch.zeros(c1 - c0, dtype=self.acc, device=g.device)
        gx = torch.ops.aten.native_batch_norm_backward(g, hat, None, None, None, zero, torch.ones_like(zero), True,
                                                       self.eps, [True, False, False])[0]
        return gx.mul_(self.invstd[c0:c1, None, None].to(gx.dtype))


def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """What ``bn``'s own training-mode forward does to its running statistics (``var`` biased)."""
    with torch.no_grad():
        f = count_batch(bn)
        bn.running_mean.mul_(1 - f).add_(mean.to(bn.running_mean.dtype), alpha=f)
        bn.running_var.mul_(1 - f).add_((var * (n / max(n - 1, 1))).to(bn.running_var.dtype), alpha=f)


def _bn_relu(x: torch.Tensor, bn: nn.BatchNorm2d, stats=None):
    """relu(bn(x)), the bottleneck's norm2-relu2 (x channels_last). Returns (y, mean, invstd); pass
    the returned statistics back in to recompute y bit-identically in backward."""
    sdt = torch.promote_types(x.dtype, torch.float32)  # statistics in fp32 (or fp64)
    if stats is None:
        if bn.training:
            mean, var = (s.to(sdt) for s in torch.batch_norm_update_stats(x, None, None, 0.0))
            if bn.track_running_stats:
                _update_running_stats(bn, mean, var, x.numel() // x.shape[1])
        else:
            mean, var = bn.running_mean.to(sdt), bn.running_var.to(sdt)
        stats = (mean, torch.rsqrt(var + bn.eps))
    mean, invstd = stats
    alpha = invstd * bn.weight.to(sdt)
    beta = bn.bias.to(sdt) - mean * alpha
    y = torch.addcmul(beta.to(x.dtype)[:, None, None], x, alpha.to(x.dtype)[:, None, None]).relu_()
    return y, mean, invstd


def _avg_pool_backward(grad: torch.Tensor, feats: _Features) -> torch.Tensor:
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


def _conv_backward(grad: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d, dtype: torch.dtype):
    """(dL/d input, dL/d weight) of a bias-free stride-1 ``conv`` computed in ``dtype``."""
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad.to(dtype), x, conv.weight.to(dtype), None, [1, 1], list(conv.padding), [1, 1], False, [0, 0], 1,
        [True, True, False])
    return gx, gw.to(conv.weight.dtype)


class _DenseBlockFunction(torch.autograd.Function):
    """A dense block and the BN-ReLU(-Conv1x1-AvgPool) after it (transition or final norm) as one
    autograd node over one shared feature buffer (:class:`_Features`).

    The same function as the per-layer cat-BN-ReLU-conv form, computed differently: no
    concatenation is copied, each feature map is normalised once instead of once per consumer, and
    the transition averages before its 1x1 convolution (both are linear, they commute; 4x fewer
    multiply-adds). Backward adds every consumer's gradient with respect to the normalised
    features into one (P, C_total) buffer, in place, and runs each feature's normalisation
    backward once. ``recompute`` (memory-efficient mode) keeps no per-consumer ReLU output
    (quadratic in depth): they are recomputed from the buffer in backward, bit-identically.
    """

    @staticmethod
    def forward(ctx, x, block, tail, recompute, *params):
        layers = list(block.values())
        norm = tail.norm if isinstance(tail, Transition) else tail
        total = x.shape[1] + sum(layer.growth_rate for layer in layers)
        dtype = _autocast_dtype(x) or x.dtype
        saved, starts = [], []  # starts[i]: where layer i's saved tensors begin
        with torch.autocast(x.device.type, enabled=False):
            feats = _Features(x, total, norm.training, norm.eps, dtype)
            feats.put(x)
            for layer in layers:
                starts.append(len(saved))
                y = feats.consume(layer.norm1, feats.width)
                out = F.conv2d(feats.nchw(y), layer.conv1.weight.to(dtype), None, 1, layer.conv1.padding)
                if layer.bottleneck:
                    y2, mean2, invstd2 = _bn_relu(out, layer.norm2)
                    saved += [out, mean2, invstd2] + ([] if recompute else [y, y2])
                    out = F.conv2d(y2, layer.conv2.weight.to(dtype), None, 1, layer.conv2.padding)
                elif not recompute:
                    saved.append(y)
                feats.put(out)
            y = feats.consume(norm, total)
            if isinstance(tail, Transition):
                pooled = F.avg_pool2d(feats.nchw(y), 2)
                out = F.conv2d(pooled, tail.conv.weight.to(dtype))
                saved += [] if recompute else [y, pooled]
            else:
                out = feats.nchw(y)
                saved.append(y)
        ctx.feats, ctx.layers, ctx.tail, ctx.norm, ctx.recompute, ctx.dtype = feats, layers, tail, norm, recompute, dtype
        ctx.starts = starts
        ctx.save_for_backward(feats.buf, *saved)
        feats.buf = None  # held by the saved tensors only (freed with the graph, counted by saved-tensor hooks)
        return out

    @staticmethod
    def backward(ctx, grad):
        buf, *saved = ctx.saved_tensors
        feats, layers, tail, norm, recompute, dtype = ctx.feats, ctx.layers, ctx.tail, ctx.norm, ctx.recompute, ctx.dtype
        feats.buf = buf
        total = buf.shape[1]
        with torch.autocast(buf.device.type, enabled=False):
            if isinstance(tail, Transition):
                if recompute:
                    y = feats.consume(norm, total, update_stats=False)
                    pooled = F.avg_pool2d(feats.nchw(y), 2)
                else:
                    y, pooled = saved[-2:]
                gpool, grad_conv = _conv_backward(grad, pooled, tail.conv, dtype)
                tail_grads = [*feats.consumer_backward(_avg_pool_backward(gpool, feats), y, norm), grad_conv]
            else:
                y = saved[-1]
                gy = torch.empty_like(y)
                feats.nchw(gy).copy_(grad)
                tail_grads = list(feats.consumer_backward(gy, y, norm))
            layer_grads = []
            c1 = total
            for layer, start in zip(reversed(layers), reversed(ctx.starts)):
                c = c1 - layer.growth_rate
                g = feats.normalization_backward(c, c1)
                y = feats.consume(layer.norm1, c, update_stats=False) if recompute else None
                grads = []
                if layer.bottleneck:
                    mid, mean2, invstd2 = saved[start:start + 3]
                    if recompute:
                        y2 = _bn_relu(mid, layer.norm2, (mean2, invstd2))[0]
                    else:
                        y, y2 = saved[start + 3:start + 5]
                    gy2, grad_conv2 = _conv_backward(g, y2, layer.conv2, dtype)
                    gy2 = torch.ops.aten.threshold_backward.grad_input(gy2, y2, 0, grad_input=gy2)
                    g, grad_w2, grad_b2 = torch.ops.aten.native_batch_norm_backward(  # takes mixed dtypes
                        gy2, mid, layer.norm2.weight, None, None, mean2, invstd2, True, layer.norm2.eps,
                        [True, True, True])
                    grads = [grad_w2, grad_b2, grad_conv2]
                elif not recompute:
                    y = saved[start]
                gy, grad_conv1 = _conv_backward(g, feats.nchw(y), layer.conv1, dtype)
                gy = feats.rows(gy.contiguous(memory_format=torch.channels_last))
                layer_grads.append([*feats.consumer_backward(gy, y, layer.norm1), grad_conv1, *grads])
                c1 = c
            grad_x = feats.normalization_backward(0, c1)
        feats.buf = feats.ghat = None
        flat = [g for grads in reversed(layer_grads) for g in grads] + tail_grads
        return (grad_x, None, None, None, *flat)  # autograd casts grad_x to x's dtype


def _block_parameters(block: DenseBlock, tail: nn.Module) -> list[nn.Parameter]:
    """The tensors _DenseBlockFunction differentiates, in the order its backward returns them."""
    params = []
    for layer in block.values():
        params += [layer.norm1.weight, layer.norm1.bias, layer.conv1.weight]
        if layer.bottleneck:
            params += [layer.norm2.weight, layer.norm2.bias, layer.conv2.weight]
    if isinstance(tail, Transition):
        return params + [tail.norm.weight, tail.norm.bias, tail.conv.weight]
    return params + [tail.weight, tail.bias]


class DenseLayer(nn.Module):
    """Composite function H_l of Eq. (2), x_l = H_l([x_0, x_1, ..., x_{l-1}]).

    Basic (DenseNet): BN-ReLU-Conv3x3(k). Bottleneck (DenseNet-B, Sec. 3 "Bottleneck layers"):
    BN-ReLU-Conv1x1(bn_size*k)-BN-ReLU-Conv3x3(k). Dropout (Sec. 4.2) follows every conv, as in
    the official code. ``memory_efficient`` recomputes the concatenation and the first
    BN-ReLU(-Conv1x1) in backward instead of storing them (Pleiss et al.), updating the BN running
    statistics once per step.
    """

    def __init__(self, in_channels: int, growth_rate: int, bottleneck: bool = True, bn_size: int = 4,
                 drop_rate: float = 0.0, memory_efficient: bool = False):
        super().__init__()
        self.bottleneck = bottleneck
        self.growth_rate = growth_rate
        self.drop_rate = drop_rate
        self.memory_efficient = memory_efficient
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        if bottleneck:
            self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
            self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, growth_rate, 3, padding=1, bias=False)

    def _first(self, features: list[torch.Tensor], update_stats: bool = True) -> torch.Tensor:
        """cat -> BN -> ReLU -> first conv: the part whose memory grows with the layer index."""
        x = torch.cat(features, 1) if len(features) > 1 else features[0]
        return self.conv1(F.relu(batch_norm(self.norm1, x, update_stats)))

    def _first_checkpointed(self, features: list[torch.Tensor]) -> torch.Tensor:
        calls = [0]

        def run(*feats):
            calls[0] += 1  # the second call is the recomputation in backward
            return self._first(list(feats), update_stats=calls[0] == 1)

        return checkpoint(run, *features, use_reentrant=False)

    def forward(self, features: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(features, torch.Tensor):
            features = [features]
        if self.memory_efficient and self.training and any(f.requires_grad for f in features):
            out = self._first_checkpointed(features)
        else:
            out = self._first(features)
        return self._second(out)

    def _second(self, out: torch.Tensor) -> torch.Tensor:
        out = F.dropout(out, self.drop_rate, self.training) if self.drop_rate > 0 else out
        if self.bottleneck:
            out = self.conv2(self.relu2(self.norm2(out)))
            out = F.dropout(out, self.drop_rate, self.training) if self.drop_rate > 0 else out
        return out

class DenseBlock(nn.ModuleDict):
    """A dense block: ``num_layers`` layers, each fed the concatenation of all earlier outputs
    (Sec. 3 "Dense connectivity"); the block output is that concatenation, k_0 + num_layers*k wide."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, **layer_kwargs):
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = DenseLayer(in_channels + i * growth_rate, growth_rate, **layer_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """Transition layer (Sec. 3 "Pooling layers", "Compression"): BN-ReLU-Conv1x1(floor(theta*m))
    -[dropout]-AvgPool 2x2."""

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float = 0.0):
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(in_channels))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, bias=False))
        if drop_rate > 0:
            self.add_module("drop", nn.Dropout(drop_rate))
        self.add_module("pool", nn.AvgPool2d(2, 2))


class DenseNet(ClassifierMixin, nn.Module):
    """DenseNet(-B)(-C) for CIFAR/SVHN (``stem="cifar"``: one 3x3 conv, three blocks) or ImageNet
    (``stem="imagenet"``: 7x7/2 conv-BN-ReLU-3x3/2 max-pool, four blocks).

    Args follow the paper: ``growth_rate`` k, ``bottleneck`` (B), ``compression`` theta (C),
    ``num_init_features`` c_0 (16 for basic DenseNet, 2k for DenseNet-BC), ``drop_rate``.
    ``memory_efficient``: recompute the BN-ReLU of the concatenations in backward instead of
    storing them. ``fused``: run each block as one autograd node over a shared feature buffer
    (:class:`_DenseBlockFunction`; same function, faster); False = the per-layer modules; None (the
    default) = the device kind's default (:mod:`crosslayer.ops.defaults`).
    """

    def __init__(self, block_config: tuple[int, ...], growth_rate: int = 12, num_init_features: int = 24,
                 bottleneck: bool = True, compression: float = 0.5, bn_size: int = 4, drop_rate: float = 0.0,
                 num_classes: int = 10, in_channels: int = 3, stem: str = "cifar",
                 memory_efficient: bool = False, fused: bool | None = None):
        super().__init__()
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        self.growth_rate, self.compression, self.drop_rate = growth_rate, compression, drop_rate
        self.block_config = tuple(block_config)
        if stem == "cifar":
            layers = [("conv0", nn.Conv2d(in_channels, num_init_features, 3, padding=1, bias=False))]
        elif stem == "imagenet":
            layers = [("conv0", nn.Conv2d(in_channels, num_init_features, 7, 2, 3, bias=False)),
                      ("norm0", nn.BatchNorm2d(num_init_features)), ("relu0", nn.ReLU(inplace=True)),
                      ("pool0", nn.MaxPool2d(3, 2, 1))]
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.features = nn.Sequential(OrderedDict(layers))
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, channels, growth_rate, bottleneck=bottleneck, bn_size=bn_size,
                               drop_rate=drop_rate, memory_efficient=memory_efficient)
            self.features.add_module(f"denseblock{i + 1}", block)
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                out = int(math.floor(channels * compression))
                self.features.add_module(f"transition{i + 1}", Transition(channels, out, drop_rate))
                channels = out
        self.features.add_module("norm5", nn.BatchNorm2d(channels))  # torchvision's name, any depth
        self.num_features, self.num_classes = channels, num_classes
        self.classifier = nn.Linear(channels, num_classes)
        self.memory_efficient = memory_efficient
        # Each dense block + the BN-ReLU(-conv-pool) after it runs as one autograd node over a
        # shared NHWC feature buffer (_DenseBlockFunction: no concatenation copies, every feature
        # map normalised once). Same math as the per-layer form, ~1.5x faster on CPU
        # (docs/benchmarks.md). False = the plain per-layer modules (what torch.compile traces);
        # None = the device kind's default (crosslayer.ops.defaults: fused on CPU, plain on CUDA).
        self.fused = fused
        # On CPU, run the feature extractor in channels_last (NHWC): oneDNN's convolutions skip
        # their per-call layout reorders of the (ever wider) concatenated inputs, ~1.8x faster
        # here. Same math; weights and state_dict keys unchanged. False = the input's own layout.
        self.cpu_channels_last = True
        init_he_fan_out(self)

    def set_memory_efficient(self, enabled: bool = True) -> None:
        """Switch the memory-efficient mode on or off; weights are unchanged. Fused blocks then keep
        nothing quadratic in the block depth (each consumer's BN-ReLU output is recomputed from the
        shared buffer in backward); the plain form checkpoints cat-BN-ReLU-conv1. BatchNorm running
        statistics are updated once per step in either case."""
        self.memory_efficient = enabled
        for m in self.modules():
            if isinstance(m, DenseLayer):
                m.memory_efficient = enabled

    set_grad_checkpointing = set_memory_efficient  # timm's name

    def _use_fused(self, x: torch.Tensor) -> bool:
        """Fused blocks cover training (with or without autograd) and inference. The plain path
        takes: autograd through eval-mode BatchNorms (frozen-BN fine-tuning, input gradients: the
        fused backward is the batch-statistics one), BatchNorms in mixed modes, dropout, hooks,
        SyncBatchNorm and other modified modules, and torch.compile."""
        if not use_fused(self.fused, x.device.type) or is_tracing(x) or self.drop_rate > 0 or has_hooks(self.features):
            return False  # hooks on the block's modules would not fire inside the fused node
        eps, modes = self.features.norm5.eps, set()
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                if not (type(m) is nn.BatchNorm2d and m.affine and m.track_running_stats and m.eps == eps):
                    return False  # e.g. SyncBatchNorm (--sync-bn): its statistics are not the local ones
                modes.add(m.training)
            if isinstance(m, nn.Conv2d) and (m.stride != (1, 1) or m.groups != 1 or m.dilation != (1, 1)
                                             or m.bias is not None) and m is not getattr(self.features, "conv0", None):
                return False
            if isinstance(m, nn.AvgPool2d) and (m.kernel_size, m.stride, m.padding) != (2, 2, 0):
                return False
        # one BatchNorm mode for all, and autograd only through training-mode ones
        return len(modes) == 1 and (modes == {True} or not torch.is_grad_enabled())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not is_tracing(x) and self.cpu_channels_last and x.device.type == "cpu" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self._use_fused(x):
            return F.relu(self.features(x))
        modules = list(self.features.children())
        i = 0
        while i < len(modules):
            if isinstance(modules[i], DenseBlock):
                block, tail = modules[i], modules[i + 1]
                x = _DenseBlockFunction.apply(x, block, tail, self.memory_efficient, *_block_parameters(block, tail))
                i += 2
            else:
                x = modules[i](x)
                i += 1
        return x


def densenet_cifar(depth: int, growth_rate: int, bottleneck: bool, compression: float,
                   num_init_features: int | None = None, **kwargs) -> DenseNet:
    """CIFAR/SVHN DenseNet of total depth L: three blocks of n = (L-4)/3 (basic) or (L-4)/6 (BC)
    layers; c_0 = 2k with a bottleneck, else 16 (the rule that reproduces the paper's counts)."""
    per_layer = 2 if bottleneck else 1
    if (depth - 4) % (3 * per_layer):
        raise ValueError(f"DenseNet depth {depth} needs (depth-4) divisible by {3 * per_layer}")
    n = (depth - 4) // (3 * per_layer)
    if num_init_features is None:
        num_init_features = 2 * growth_rate if bottleneck else 16
    return DenseNet((n, n, n), growth_rate, num_init_features, bottleneck, compression, **kwargs)


def _cifar(depth, k, bc, kwargs):
    kwargs.setdefault("bottleneck", bc)
    kwargs.setdefault("compression", 0.5 if bc else 1.0)
    return densenet_cifar(depth, kwargs.pop("growth_rate", k), kwargs.pop("bottleneck"), kwargs.pop("compression"),
                          **kwargs)


@register_model("densenet", depth=40, paper_params_m=1.0, paper=PAPER)
def densenet40_k12(**kwargs):
    """DenseNet (L=40, k=12), Table 2."""
    return _cifar(40, 12, False, kwargs)


@register_model("densenet", depth=100, paper_params_m=7.0, paper=PAPER)
def densenet100_k12(**kwargs):
    """DenseNet (L=100, k=12), Table 2."""
    return _cifar(100, 12, False, kwargs)


@register_model("densenet", depth=100, paper_params_m=27.2, paper=PAPER)
def densenet100_k24(**kwargs):
    """DenseNet (L=100, k=24), Table 2."""
    return _cifar(100, 24, False, kwargs)


@register_model("densenet", depth=100, paper_params_m=0.8, paper=PAPER)
def densenet_bc100_k12(**kwargs):
    """DenseNet-BC (L=100, k=12), Table 2."""
    return _cifar(100, 12, True, kwargs)


@register_model("densenet", depth=250, paper_params_m=15.3, paper=PAPER)
def densenet_bc250_k24(**kwargs):
    """DenseNet-BC (L=250, k=24), Table 2."""
    return _cifar(250, 24, True, kwargs)


@register_model("densenet", depth=190, paper_params_m=25.6, paper=PAPER)
def densenet_bc190_k40(**kwargs):
    """DenseNet-BC (L=190, k=40), Table 2."""
    return _cifar(190, 40, True, kwargs)


@register_model("densenet", depth=40, paper=PAPER, note="small DenseNet-BC for quick CPU runs (not in the paper)")
def densenet_bc40_k12(**kwargs):
    """DenseNet-BC (L=40, k=12): the demo model, 6 layers per block."""
    return _cifar(40, 12, True, kwargs)


def _imagenet(blocks, k, kwargs):
    return DenseNet(blocks, kwargs.pop("growth_rate", k), kwargs.pop("num_init_features", 2 * k), stem="imagenet",
                    **kwargs)


# name -> (layers per block, growth rate); Table 1, plus DenseNet-161 from the official code.
_IMAGENET = {"densenet121": ((6, 12, 24, 16), 32), "densenet169": ((6, 12, 32, 32), 32),
             "densenet201": ((6, 12, 48, 32), 32), "densenet264": ((6, 12, 64, 48), 32),
             "densenet161": ((6, 12, 36, 24), 48)}


def _register_imagenet(name, blocks, k):
    def fn(**kwargs):
        return _imagenet(blocks, k, kwargs)

    fn.__name__ = name
    fn.__doc__ = f"{name} (ImageNet, k={k}, blocks {blocks}), Table 1."
    note = "from the official code / torchvision; not in Table 1" if name == "densenet161" else ""
    return register_model("densenet", depth=int(name[len("densenet"):]), input_size=(3, 224, 224),
                          default_classes=1000, paper=PAPER, note=note)(fn)


for _name, (_blocks, _k) in _IMAGENET.items():
    globals()[_name] = _register_imagenet(_name, _blocks, _k)


_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def load_torchvision_state_dict(model: DenseNet, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load a torchvision DenseNet state_dict (current ``norm1`` or old ``norm.1`` key style,
    pytorch/vision#474) into a crosslayer ImageNet DenseNet with identical outputs."""
    fixed = OrderedDict()
    for key, value in state_dict.items():
        m = _OLD_KEY.match(key)
        fixed[m.group(1) + m.group(2) if m else key] = value
    return model.load_state_dict(fixed, strict=strict)


# ---------------------------------------------------------------- small variants for `crosslayer study`
# Built with the paper's DenseNet-BC rules (Sec. 3: bottleneck 4k, compression 0.5, c_0 = 2k, three
# blocks of (L-4)/6 layers); small enough to train on a CPU. Not in the paper.
STUDY_NOTE = "small variant for crosslayer study (not in the paper)"


@register_model("densenet", depth=16, input_size=(1, 28, 28), paper=PAPER, note=STUDY_NOTE)
def densenet_bc16_k8(**kwargs):
    """DenseNet-BC (L=16, k=8): two layers per block."""
    return _cifar(16, 8, True, kwargs)


@register_model("densenet", depth=28, input_size=(1, 28, 28), paper=PAPER, note=STUDY_NOTE)
def densenet_bc28_k12(**kwargs):
    """DenseNet-BC (L=28, k=12): four layers per block."""
    return _cifar(28, 12, True, kwargs)
