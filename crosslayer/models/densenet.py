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

from crosslayer.models._base import ClassifierMixin, batch_norm, init_he_fan_out
from crosslayer.models._registry import register_model

PAPER = "Huang et al., Densely Connected Convolutional Networks, CVPR 2017"


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _like(shape, ref: torch.Tensor, dtype=None, zero=False) -> torch.Tensor:
    """A new tensor of ``shape`` in ``ref``'s memory format (channels_last or contiguous)."""
    fmt = (torch.channels_last if ref.dim() == 4 and not ref.is_contiguous()
           and ref.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
    make = torch.zeros if zero else torch.empty
    return make(shape, dtype=dtype or ref.dtype, device=ref.device).contiguous(memory_format=fmt)


def _relu_conv_backward(grad_out, y, conv_weight, padding, dtype, need_weight_grad):
    """Backward of ``conv2d(y.to(dtype), conv_weight.to(dtype), padding=padding)`` with ``y`` a ReLU
    output: returns (gradient before the ReLU, in y's dtype; conv weight gradient or None)."""
    dt = dtype or y.dtype
    grad_y, grad_cw, _ = torch.ops.aten.convolution_backward(
        grad_out.to(dt), y.to(dt), conv_weight.to(dt), None, [1, 1], list(padding), [1, 1], False,
        [0, 0], 1, [True, need_weight_grad, False])
    grad_cw = grad_cw.to(conv_weight.dtype) if grad_cw is not None else None
    grad_y = grad_y.to(y.dtype)
    return torch.ops.aten.threshold_backward.grad_input(grad_y, y, 0, grad_input=grad_y), grad_cw


class _SharedNorm:
    """Shared normalisation of one dense block (training mode).

    Every consumer of a feature map (each later dense layer, the transition, the final norm) would
    batch-normalise it with the same batch statistics, so each feature map is normalised ONCE, as
    it is produced, into a preallocated block buffer ``hat`` (N, C_total, H, W); a consumer reading
    the first C channels takes the view ``hat[:, :C]`` (no concatenation copy) and applies only its
    own affine + ReLU. In backward each consumer adds its gradient into one block gradient buffer
    in place, and each feature map's normalisation backward reads its slice of that buffer once
    (no per-consumer gradient tensors, no autograd accumulation). Outputs, gradients and running
    statistics equal the plain per-layer form (tests/test_memory_efficient.py).
    """

    def __init__(self, x0: torch.Tensor, total_channels: int, eps: float):
        n, _, h, w = x0.shape
        self.eps, self.total, self.width = eps, total_channels, 0
        self.hat = _like((n, total_channels, h, w), x0)
        self.grad: torch.Tensor | None = None  # allocated by the first consumer's backward
        self.scratch: torch.Tensor | None = None  # reused ReLU output of the memory-efficient mode
        self.means = torch.zeros(total_channels, device=x0.device, dtype=torch.float32)
        self.vars = torch.zeros(total_channels, device=x0.device, dtype=torch.float32)
        self.handles: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        self.handles.append(_NormalizeInto.apply(x, self))

    def grad_slice(self, c0: int, c1: int) -> torch.Tensor:
        if self.grad is None:
            self.grad = _like(self.hat.shape, self.hat, torch.promote_types(self.hat.dtype, torch.float32), zero=True)
        return self.grad[:, c0:c1]

    def relu_out(self, c: int, recompute: bool) -> torch.Tensor:
        """Where a consumer's ReLU output goes: a fresh tensor (fast mode: it is kept for backward)
        or a slice of one block scratch buffer (memory-efficient mode: it is recomputed)."""
        n, _, h, w = self.hat.shape
        if not recompute:
            return _like((n, c, h, w), self.hat)
        if self.scratch is None:
            self.scratch = torch.empty(self.hat.numel(), dtype=self.hat.dtype, device=self.hat.device)
        flat = self.scratch[:n * c * h * w]
        if self.hat.is_contiguous():
            return flat.view(n, c, h, w)
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)

    def consume(self, bn: nn.BatchNorm2d, conv: nn.Conv2d | None, recompute: bool) -> torch.Tensor:
        """conv(relu(bn(cat(features)))) with ``bn``'s running statistics updated exactly as its
        own training-mode forward would (one update per step)."""
        c = self.width
        if bn.training and bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                f = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                bn.running_mean.mul_(1 - f).add_(self.means[:c].to(bn.running_mean.dtype), alpha=f)
                bn.running_var.mul_(1 - f).add_(self.vars[:c].to(bn.running_var.dtype), alpha=f)
        if conv is None:
            return _AffineReLUConv.apply(bn.weight, bn.bias, None, None, self, c, recompute, *self.handles)
        if conv.stride != (1, 1) or conv.groups != 1 or conv.bias is not None or conv.dilation != (1, 1):
            raise ValueError("shared normalisation expects a stride-1, bias-free convolution")
        return _AffineReLUConv.apply(bn.weight, bn.bias, conv.weight, conv.padding, self, c, recompute, *self.handles)


class _NormalizeInto(torch.autograd.Function):
    """Affine-free training-mode batch norm of one feature map, written into its slice of the block
    buffer. Returns an empty handle tensor that links the consumers to this node in the graph; the
    gradient arrives through the block gradient buffer, after every consumer's backward has run."""

    @staticmethod
    def forward(ctx, x, state):
        ctx.set_materialize_grads(False)
        c0, c1 = state.width, state.width + x.shape[1]
        # momentum 1: the "running" slices receive exactly the batch mean and unbiased variance
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            x, None, None, state.means[c0:c1], state.vars[c0:c1], True, 1.0, state.eps)
        state.hat[:, c0:c1].copy_(out)
        state.width = c1
        saved = (x, mean, invstd)
        if c1 == state.total:  # the buffer is complete: let saved-tensor hooks see (and count) it once
            saved += (state.hat,)
        ctx.save_for_backward(*saved)
        ctx.state, ctx.c0, ctx.c1 = state, c0, c1
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, _unused):
        x, mean, invstd = ctx.saved_tensors[:3]
        state = ctx.state
        if state.grad is None:
            return None, None
        g = state.grad[:, ctx.c0:ctx.c1]
        gx = torch.ops.aten.native_batch_norm_backward(g.to(x.dtype), x, None, None, None, mean, invstd, True,
                                                       state.eps, [True, False, False])[0]
        return gx, None


class _AffineReLUConv(torch.autograd.Function):
    """out = conv(relu(hat[:, :C] * weight + bias)): one consumer of a block's shared normalisation.

    Stores the ReLU output (``recompute=False``) or nothing (``recompute=True``: the affine + ReLU
    of the buffer view is recomputed in backward; the convolution is not re-run). Both settings
    give bit-identical results.
    """

    @staticmethod
    def forward(ctx, weight, bias, conv_weight, padding, state, c, recompute, *handles):
        ctx.set_materialize_grads(False)
        ctx.padding, ctx.recompute, ctx.n, ctx.state, ctx.c = padding, recompute, len(handles), state, c
        ctx.dtype = _autocast_dtype(state.hat)
        with torch.autocast(state.hat.device.type, enabled=False):
            y = _AffineReLUConv.affine_relu(state, c, weight, bias, recompute)
            out = y
            if conv_weight is not None:
                dt = ctx.dtype or y.dtype
                out = F.conv2d(y.to(dt), conv_weight.to(dt), None, 1, padding)
            elif recompute:
                out = y.clone()  # the caller keeps it; the scratch buffer is reused
        ctx.save_for_backward(weight, bias, conv_weight, *(() if recompute else (y,)))
        return out

    @staticmethod
    def affine_relu(state, c, weight, bias, recompute):
        z = state.hat[:, :c]
        y = state.relu_out(c, recompute)
        torch.addcmul(bias.to(z.dtype)[:, None, None], z, weight.to(z.dtype)[:, None, None], out=y)
        return y.relu_()

    @staticmethod
    def backward(ctx, grad_out):
        weight, bias, conv_weight, *rest = ctx.saved_tensors
        state, c = ctx.state, ctx.c
        none = (None,) * (4 + ctx.n)
        if grad_out is None:
            return (None, None, None) + none
        with torch.autocast(state.hat.device.type, enabled=False):
            y = _AffineReLUConv.affine_relu(state, c, weight, bias, True) if ctx.recompute else rest[0]
            if conv_weight is not None:
                grad_a, grad_cw = _relu_conv_backward(grad_out, y, conv_weight, ctx.padding, ctx.dtype,
                                                      ctx.needs_input_grad[2])
            else:
                grad_a, grad_cw = torch.ops.aten.threshold_backward(grad_out.to(y.dtype), y, 0), None
            z = state.hat[:, :c]
            mixed = z.dtype != weight.dtype
            _, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                grad_a.float() if mixed else grad_a, z.float() if mixed else z, weight, torch.zeros_like(weight),
                torch.ones_like(weight), None, None, False, 0.0, [False, True, True])
            state.grad_slice(0, c).addcmul_(grad_a, weight[:, None, None])
        return (grad_w, grad_b, grad_cw) + none


class _BNReLUConv(torch.autograd.Function):
    """out = conv(relu(batch_norm(x))) in training mode (the bottleneck's norm2-relu2-conv2), with
    the running statistics updated once in forward. Stores x and the batch statistics, plus the
    ReLU output unless ``recompute`` (memory-efficient mode: recomputed in backward, same formula,
    so both modes are bit-identical)."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv_weight, bn, padding, recompute):
        ctx.set_materialize_grads(False)
        ctx.padding, ctx.recompute, ctx.eps = padding, recompute, bn.eps
        ctx.dtype = _autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
            invstd = torch.rsqrt(var + bn.eps)
            if bn.track_running_stats:
                bn.num_batches_tracked.add_(1)
                f = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                n = x.numel() // x.shape[1]
                bn.running_mean.mul_(1 - f).add_(mean.to(bn.running_mean.dtype), alpha=f)
                bn.running_var.mul_(1 - f).add_((var * (n / max(n - 1, 1))).to(bn.running_var.dtype), alpha=f)
            y = _BNReLUConv.normalize_relu(x, weight, bias, mean, invstd)
            dt = ctx.dtype or y.dtype
            out = F.conv2d(y.to(dt), conv_weight.to(dt), None, 1, padding)
        ctx.save_for_backward(x, weight, bias, conv_weight, mean, invstd, *(() if recompute else (y,)))
        return out

    @staticmethod
    def normalize_relu(x, weight, bias, mean, invstd):
        alpha = invstd * weight
        beta = bias - mean * alpha
        return torch.addcmul(beta.to(x.dtype)[:, None, None], x, alpha.to(x.dtype)[:, None, None]).relu_()

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, conv_weight, mean, invstd, *rest = ctx.saved_tensors
        if grad_out is None:
            return (None,) * 7
        with torch.autocast(x.device.type, enabled=False):
            y = _BNReLUConv.normalize_relu(x, weight, bias, mean, invstd) if ctx.recompute else rest[0]
            grad_a, grad_cw = _relu_conv_backward(grad_out, y, conv_weight, ctx.padding, ctx.dtype,
                                                  ctx.needs_input_grad[3])
            mixed = x.dtype != weight.dtype
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                grad_a.float() if mixed else grad_a, x.float() if mixed else x, weight, None, None, mean, invstd,
                True, ctx.eps, [True, True, True])
        return gx.to(x.dtype), gw, gb, grad_cw, None, None, None


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

    def forward_shared(self, feats: _SharedNorm) -> torch.Tensor:
        """Training-mode forward on the block's shared normalised features (same math as ``forward``)."""
        out = feats.consume(self.norm1, self.conv1, self.memory_efficient)
        if not self.bottleneck or self.drop_rate > 0 or not self.norm2.training:
            return self._second(out)
        c2, n2 = self.conv2, self.norm2
        return _BNReLUConv.apply(out, n2.weight, n2.bias, c2.weight, n2, c2.padding, self.memory_efficient)


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

    def forward_shared(self, x: torch.Tensor, eps: float) -> _SharedNorm:
        layers = list(self.values())
        feats = _SharedNorm(x, x.shape[1] + sum(layer.growth_rate for layer in layers), eps)
        feats.add(x)
        for layer in self.values():
            feats.add(layer.forward_shared(feats))
        return feats


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

    def forward_shared(self, feats: _SharedNorm, recompute: bool) -> torch.Tensor:
        out = feats.consume(self.norm, self.conv, recompute)
        if hasattr(self, "drop"):
            out = self.drop(out)
        return self.pool(out)


class DenseNet(ClassifierMixin, nn.Module):
    """DenseNet(-B)(-C) for CIFAR/SVHN (``stem="cifar"``: one 3x3 conv, three blocks) or ImageNet
    (``stem="imagenet"``: 7x7/2 conv-BN-ReLU-3x3/2 max-pool, four blocks).

    Args follow the paper: ``growth_rate`` k, ``bottleneck`` (B), ``compression`` theta (C),
    ``num_init_features`` c_0 (16 for basic DenseNet, 2k for DenseNet-BC), ``drop_rate``.
    """

    def __init__(self, block_config: tuple[int, ...], growth_rate: int = 12, num_init_features: int = 24,
                 bottleneck: bool = True, compression: float = 0.5, bn_size: int = 4, drop_rate: float = 0.0,
                 num_classes: int = 10, in_channels: int = 3, stem: str = "cifar",
                 memory_efficient: bool = False, shared_norm: bool = False):
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
        # Training mode: normalise every feature map once and share it among its consumers
        # (identical math; see _SharedNorm). It stores the least (with memory_efficient: nothing
        # quadratic in the block depth) but on 2 CPU cores it is ~1.4x slower than the plain
        # per-layer cat-BN-ReLU-conv form (docs/benchmarks.md), hence off by default.
        self.shared_norm = shared_norm
        # On CPU, run the feature extractor in channels_last (NHWC): oneDNN's convolutions skip
        # their per-call layout reorders of the (ever wider) concatenated inputs, ~1.8x faster
        # here. Same math; weights and state_dict keys unchanged. False = the input's own layout.
        self.cpu_channels_last = True
        init_he_fan_out(self)

    def set_memory_efficient(self, enabled: bool = True) -> None:
        """Switch the memory-efficient mode on or off; weights are unchanged. With shared
        normalisation nothing quadratic in the block depth is stored: the concatenation and each
        consumer's affine + ReLU are recomputed in backward. BatchNorm running statistics are
        updated once per step in either mode."""
        self.memory_efficient = enabled
        for m in self.modules():
            if isinstance(m, DenseLayer):
                m.memory_efficient = enabled

    set_grad_checkpointing = set_memory_efficient  # timm's name

    def _use_shared_norm(self) -> bool:
        if not (self.shared_norm and self.training) or torch.compiler.is_compiling():
            return False  # torch.compile / torch.export trace the plain form, which they fuse themselves
        consumers = [m.norm1 for m in self.modules() if isinstance(m, DenseLayer)]
        consumers += [m.norm for m in self.features.children() if isinstance(m, Transition)] + [self.features.norm5]
        eps = consumers[0].eps
        return all(bn.affine and bn.eps == eps for bn in consumers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_channels_last and x.device.type == "cpu" and x.dim() == 4 and not torch.compiler.is_compiling():
            x = x.contiguous(memory_format=torch.channels_last)
        if not self._use_shared_norm():
            return F.relu(self.features(x))
        eps = self.features.norm5.eps
        feats = None
        for name, module in self.features.named_children():
            if isinstance(module, DenseBlock):
                feats = module.forward_shared(x, eps)
            elif isinstance(module, Transition):
                x = module.forward_shared(feats, self.memory_efficient)
                feats.handles.clear()  # break state -> handles -> grad_fn -> ctx.state cycle (leaked every step)
            elif name == "norm5":
                out = feats.consume(module, None, self.memory_efficient)
                feats.handles.clear()
                return out
            else:
                x = module(x)
        raise RuntimeError("DenseNet.features must end with norm5")


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
