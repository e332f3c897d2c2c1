"""DelugeNet and Wide-DelugeNet.

J. Kuen, X. Kong, G. Wang, "DelugeNets: Deep Networks with Massive and Flexible Cross-layer
Information Inflows", arXiv 1611.05552. Faithful to the official Lua code (xternalz/DelugeNets),
which reproduces every published parameter count: see ``shared/specs/delugenet.md``.

A stage keeps the list S of its composite layers' outputs. Every consumer reads all of S through a
cross-layer depthwise convolution (CLDC): a per-input affine-free batch normalisation, then a
per-(channel, input) scale and shift, summed over the inputs. Because all consumers of an output
normalise it with the same batch statistics, this implementation normalises each output ONCE when
it is produced (``shared normalisation``) and each CLDC is a weighted sum of the stored normalised
tensors: identical outputs, gradients and running statistics, O(L) instead of O(L^2) normalisations
per stage. Inputs of a CLDC are ordered newest first, as in the official weights: column 0 of
``weight`` multiplies the immediately preceding output, column L-1 the stage's first tensor.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from crosslayer.models._base import ClassifierMixin, batch_norm, count_batch, has_hooks, init_he_fan_out, is_tracing
from crosslayer.models._registry import register_model

PAPER = "Kuen et al., DelugeNets: Deep Networks with Massive and Flexible Cross-layer Information Inflows, 2016"


class CrossLayerDepthwiseConv(nn.Module):
    """Cross-layer depthwise convolution, the paper's Eq. x_l^c = sum_i w_{l-i}^c h_{l-i}^c + b_l^c,
    in the official form out[:, c] = sum_i (weight[c, i] * BN_i(x_i)[:, c] + bias[c, i]).

    ``weight`` and ``bias`` are (channels, num_inputs), initialised to 1/L and 0 (2*C*L parameters,
    the count that reproduces the paper's tables). ``forward`` takes the inputs already normalised
    (affine-free BN), newest first. The bias is inert under the following BN but is kept for
    parameter parity with the paper.
    """

    def __init__(self, channels: int, num_inputs: int):
        super().__init__()
        self.channels, self.num_inputs = channels, num_inputs
        self.weight = nn.Parameter(torch.full((channels, num_inputs), 1.0 / num_inputs))
        self.bias = nn.Parameter(torch.zeros(channels, num_inputs))

    def forward(self, normalized: list[torch.Tensor], bank: _GradBank | None = None) -> torch.Tensor:
        """``normalized``: the stage's outputs after the shared normalisation, newest first.
        ``bank``: where their gradients are summed (training; see :class:`_SharedBatchNorm`)."""
        if len(normalized) != self.num_inputs:
            raise ValueError(f"CLDC expects {self.num_inputs} inputs, got {len(normalized)}")
        if is_tracing(normalized[0]):  # traced form (torch.compile fuses it itself; FX records it)
            return _weighted_sum(self.weight, self.bias, normalized)
        return _WeightedSum.apply(self.weight, self.bias, bank, *normalized)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_inputs={self.num_inputs}"


def _weighted_sum(weight: torch.Tensor, bias: torch.Tensor, xs) -> torch.Tensor:
    """sum_i weight[:, i] * xs[i] + sum_i bias[:, i], per channel, accumulated in place into one output
    (each in-place result is reassigned, so an FX trace chains the steps instead of pruning them)."""
    w = weight.to(xs[0].dtype)
    out = torch.mul(xs[0], w[:, 0, None, None])
    for i in range(1, len(xs)):
        out = out.addcmul_(xs[i], w[:, i, None, None])
    return out.add_(bias.sum(1).to(out.dtype)[:, None, None])


class _GradBank:
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


class _SharedBatchNorm(torch.autograd.Function):
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
        x, mean, invstd = ctx.saved_tensors
        banked = ctx.bank.pop(ctx.j)
        grad = banked if grad is None else grad if banked is None else grad + banked
        if grad is None:
            return None, None, None, None
        gx = torch.ops.aten.native_batch_norm_backward(grad, x, None, None, None, mean, invstd, True, ctx.eps,
                                                       [True, False, False])[0]
        return gx, None, None, None


class _WeightedSum(torch.autograd.Function):
    """out = sum_i weight[:, i] * x_i + sum_i bias[:, i] (per channel), the CLDC's arithmetic, in
    one autograd node: forward accumulates in place into one output (no temporary per input).
    Backward adds weight[:, i] * grad into input i's gradient in ``bank`` in place (or returns it,
    without a bank), and computes weight column i with one temporary-free reduction; the per-input
    ``addcmul`` autograd graph needs two products, a product by the scalar 1, a sum and autograd's
    gradient additions. Inputs are a stage's outputs newest first: input i is output L-1-i."""

    @staticmethod
    def forward(ctx, weight, bias, bank, *xs):
        out = _weighted_sum(weight, bias, xs)
        ctx.save_for_backward(weight, *xs)
        ctx.bank = bank
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, *xs = ctx.saved_tensors
        grad_weight = torch.empty_like(weight)
        grad_xs = []
        zero = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        one = torch.ones_like(zero)
        w = weight.to(grad.dtype)
        for i, x in enumerate(xs):
            if ctx.bank is not None:
                ctx.bank.add(len(xs) - 1 - i, grad, w[:, i])
                grad_xs.append(None)
            else:
                grad_xs.append(grad * w[:, i, None, None] if ctx.needs_input_grad[3 + i] else None)
            # sum over N, H, W of grad * x_i without a temporary: the weight gradient of an eval-mode
            # batch norm with mean 0, variance 1, eps 0
            grad_weight[:, i] = torch.ops.aten.native_batch_norm_backward(
                grad, x, one, zero, one, None, None, False, 0.0, [False, True, False])[1]
        grad_bias = grad.sum((0, 2, 3), dtype=weight.dtype)[:, None].expand_as(weight).clone()
        return (grad_weight, grad_bias, None, *grad_xs)


class Bottleneck(nn.Sequential):
    """Bottleneck body B(C_in -> w -> out): Conv1x1-BN-ReLU-Conv3x3-BN-ReLU-Conv1x1, no BN/ReLU
    after the last conv (pre-activation style); out = 2w (expansion 2)."""

    def __init__(self, in_channels: int, width: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)


class CompositeLayer(nn.Module):
    """Composite layer: pre-activation (BN-ReLU for one input, CLDC-BN-ReLU for L > 1) followed
    by the bottleneck body. Its output is appended to the stage list S (no residual addition).
    ``memory_efficient`` recomputes the CLDC, BN and ReLU in backward."""

    def __init__(self, in_channels: int, width: int, out_channels: int, num_inputs: int,
                 memory_efficient: bool = False):
        super().__init__()
        self.cldc = CrossLayerDepthwiseConv(in_channels, num_inputs) if num_inputs > 1 else None
        self.norm = nn.BatchNorm2d(in_channels)
        self.body = Bottleneck(in_channels, width, out_channels)
        self.memory_efficient = memory_efficient

    def _pre(self, inputs: list[torch.Tensor], update_stats: bool = True, bank=None) -> torch.Tensor:
        x = inputs[0] if self.cldc is None else self.cldc(inputs, bank)
        return self.body.conv1(F.relu(batch_norm(self.norm, x, update_stats)))

    def forward(self, raw: list[torch.Tensor], normalized: list[torch.Tensor], bank=None) -> torch.Tensor:
        inputs = raw[:1] if self.cldc is None else normalized
        if self.memory_efficient and self.training and any(t.requires_grad for t in inputs):
            calls = [0]

            def run(*xs):
                calls[0] += 1  # second call = recomputation in backward: BN statistics already updated
                return self._pre(list(xs), update_stats=calls[0] == 1, bank=bank)

            x = checkpoint(run, *inputs, use_reentrant=False)
        else:
            x = self._pre(inputs, bank=bank)
        b = self.body
        x = b.relu1(b.bn1(x))
        x = b.relu2(b.bn2(b.conv2(x)))
        return b.conv3(x)


class Transition(nn.Module):
    """Transition: CLDC over the finished stage -> BN -> Conv3x3 stride 2 (doubling the channels).
    No ReLU and no pooling, as in the official code."""

    def __init__(self, in_channels: int, out_channels: int, num_inputs: int):
        super().__init__()
        self.cldc = CrossLayerDepthwiseConv(in_channels, num_inputs)
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)

    def forward(self, normalized: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(self.norm(self.cldc(normalized, getattr(normalized, "bank", None))))


class DelugeStage(nn.Module):
    """One stage: an entry producing S[0] (first composite layer, a 1x1 projection, or a
    transition) followed by ``num_layers`` composite layers, the k-th reading k inputs.
    ``norms[j]`` is the shared affine-free normalisation of S[j]. Returns S normalised, newest first."""

    def __init__(self, entry: nn.Module, channels: int, width: int, num_layers: int, memory_efficient: bool = False):
        super().__init__()
        self.entry = entry
        self.layers = nn.ModuleList(CompositeLayer(channels, width, channels, k, memory_efficient)
                                    for k in range(1, num_layers + 1))
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels, affine=False) for _ in range(num_layers + 1))

    def forward(self, x) -> list[torch.Tensor]:
        raw = [self.entry(x)]  # newest first
        normalized = _StageOutputs()
        if (torch.is_grad_enabled() and not is_tracing(raw[0])
                and all(type(n) is nn.BatchNorm2d and n.training for n in self.norms)  # not SyncBatchNorm, not frozen
                and not has_hooks(self.norms)):  # the bank bypasses the norms' module calls
            normalized.bank = _GradBank()
        normalized.append(self._normalize(0, raw[0], normalized.bank))
        for j, layer in enumerate(self.layers, start=1):
            out = layer(raw, normalized, normalized.bank)
            raw.insert(0, out)
            normalized.insert(0, self._normalize(j, out, normalized.bank))
        return normalized

    def _normalize(self, j: int, x: torch.Tensor, bank: _GradBank | None) -> torch.Tensor:
        return self.norms[j](x) if bank is None else _SharedBatchNorm.apply(x, self.norms[j], bank, j)


class _StageOutputs(list):
    """A stage's normalised outputs, newest first, and the bank their consumers' gradients go to."""

    bank: _GradBank | None = None


class DelugeNet(ClassifierMixin, nn.Module):
    """DelugeNet for CIFAR (``stem="cifar"``) or ImageNet (``stem="imagenet"``).

    ``units`` = composite layers per stage counting the stage's first unit (CIFAR DelugeNet-146:
    (8, 16, 24) plus the transition outputs; see the spec's table); ``widths`` = stage channels C_s
    (bottleneck width C_s/2).
    """

    def __init__(self, composites: tuple[int, ...], widths: tuple[int, ...], stem_channels: int,
                 num_classes: int = 10, in_channels: int = 3, stem: str = "cifar", memory_efficient: bool = False):
        super().__init__()
        self.composites, self.widths = tuple(composites), tuple(widths)
        me = memory_efficient
        stages = []
        if stem == "cifar":
            self.stem = nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False)
            # stage 1 starts from a composite layer on the stem output (no CLDC; BN-ReLU-bottleneck)
            entry = CompositeLayer(stem_channels, widths[0] // 2, widths[0], 1, me)
            first = _Single(entry)
            stages.append(DelugeStage(first, widths[0], widths[0] // 2, composites[0] - 1, me))
        elif stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_channels, 7, 2, 3, bias=False),
                                      nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
            entry = nn.Conv2d(stem_channels, widths[0], 1, bias=False)
            stages.append(DelugeStage(entry, widths[0], widths[0] // 2, composites[0], me))
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        for s in range(1, len(widths)):
            prev_len = stages[-1].layers.__len__() + 1
            trans = Transition(widths[s - 1], widths[s], prev_len)
            stages.append(DelugeStage(trans, widths[s], widths[s] // 2, composites[s], me))
        self.stages = nn.ModuleList(stages)
        last = len(stages[-1].layers) + 1
        self.head_cldc = CrossLayerDepthwiseConv(widths[-1], last)
        self.head_norm = nn.BatchNorm2d(widths[-1])
        self.num_features, self.num_classes = widths[-1], num_classes
        self.classifier = nn.Linear(widths[-1], num_classes)
        # On CPU, train in channels_last (NHWC): oneDNN's convolutions and batch norms are faster
        # there (1.18x a training step; inference is faster in NCHW: docs/benchmarks.md). Same
        # math and state_dict; False = the input's own layout.
        self.cpu_channels_last = True
        init_he_fan_out(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not is_tracing(x) and self.cpu_channels_last and self.training and x.device.type == "cpu" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return F.relu(self.head_norm(self.head_cldc(x, getattr(x, "bank", None))))

    def set_memory_efficient(self, enabled: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, CompositeLayer):
                m.memory_efficient = enabled

    set_grad_checkpointing = set_memory_efficient

    def cross_layer_convs(self) -> list[dict]:
        """Every CLDC in forward order: dicts with ``stage`` (1-based), ``kind`` ('composite',
        'transition' or 'head'), ``index`` (consumer position in the stage, 1-based), ``name``
        and ``module`` (``weight`` is (C, L), column 0 = newest input)."""
        out = []
        for s, stage in enumerate(self.stages, start=1):
            if isinstance(stage.entry, Transition):
                out.append(dict(stage=s - 1, kind="transition", index=len(self.stages[s - 2].layers) + 1,
                                name=f"stages.{s - 1}.entry.cldc", module=stage.entry.cldc))
            for j, layer in enumerate(stage.layers, start=1):
                if layer.cldc is not None:
                    out.append(dict(stage=s, kind="composite", index=j, name=f"stages.{s - 1}.layers.{j - 1}.cldc",
                                    module=layer.cldc))
        out.append(dict(stage=len(self.stages), kind="head", index=len(self.stages[-1].layers) + 1,
                        name="head_cldc", module=self.head_cldc))
        return out


class _Single(nn.Module):
    """Adapts the CIFAR stage-1 entry (a composite layer on the raw stem output) to a tensor input."""

    def __init__(self, layer: CompositeLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer([x], [x])


def delugenet_cifar(n: int, width: float = 1.0, **kwargs) -> DelugeNet:
    """CIFAR DelugeNet of depth 18n+2: stages of n, 2n, 3n composite layers with 64w/128w/256w
    channels, stem 32w."""
    w = lambda c: int(round(c * width))  # noqa: E731
    return DelugeNet((n, 2 * n, 3 * n), (w(64), w(128), w(256)), w(32), **kwargs)


@register_model("delugenet", depth=146, paper_params_m=6.7, paper=PAPER)
def delugenet146(**kwargs):
    """DelugeNet-146 (n=8), CIFAR table."""
    return delugenet_cifar(8, 1.0, **kwargs)


@register_model("delugenet", depth=218, paper_params_m=10.0, paper=PAPER)
def delugenet218(**kwargs):
    """DelugeNet-218 (n=12), CIFAR table."""
    return delugenet_cifar(12, 1.0, **kwargs)


@register_model("delugenet", depth=146, paper_params_m=20.2, paper=PAPER)
def wide_delugenet146(**kwargs):
    """Wide-DelugeNet-146 (n=8, width x1.75), CIFAR table."""
    return delugenet_cifar(8, 1.75, **kwargs)


@register_model("delugenet", depth=20, paper=PAPER, note="tiny DelugeNet (n=1) for quick CPU runs (not in the paper)")
def delugenet20(**kwargs):
    """DelugeNet-20 (n=1): the smallest member of the CIFAR family, for tests and demos."""
    return delugenet_cifar(1, 1.0, **kwargs)


def _register_imagenet(name: str, units: tuple[int, ...], params_m: float):
    def fn(**kwargs):
        composites = (units[0] - 1,) + tuple(u - 1 for u in units[1:])
        return DelugeNet(composites, (128, 256, 512, 1024), 64, stem="imagenet", **kwargs)

    fn.__name__ = name
    fn.__doc__ = f"{name}: ImageNet DelugeNet, units per stage {units} (official README)."
    depth = 3 * sum(u - 1 for u in units) + 2
    return register_model("delugenet", depth=depth, input_size=(3, 224, 224), default_classes=1000,
                          paper_params_m=params_m, paper=PAPER)(fn)


delugenet92 = _register_imagenet("delugenet92", (8, 8, 9, 9), 43.4)
delugenet104 = _register_imagenet("delugenet104", (8, 9, 10, 11), 51.4)
delugenet122 = _register_imagenet("delugenet122", (8, 10, 12, 14), 63.6)


# ---------------------------------------------------------------- small variants for `crosslayer study`
# DelugeNet-20 (n=1: stages of 1, 2, 3 composite layers) at a fraction of the CIFAR widths, the
# paper's width rule of Wide-DelugeNet (stage channels 64w/128w/256w, stem 32w) with w < 1; small
# enough to train on a CPU. Not in the paper.
STUDY_NOTE = "small variant for crosslayer study (not in the paper)"


@register_model("delugenet", depth=20, input_size=(1, 28, 28), paper=PAPER, note=STUDY_NOTE)
def delugenet20_w25(**kwargs):
    """DelugeNet-20 at width x0.25 (stage channels 16/32/64)."""
    return delugenet_cifar(1, 0.25, **kwargs)


@register_model("delugenet", depth=20, input_size=(1, 28, 28), paper=PAPER, note=STUDY_NOTE)
def delugenet20_w50(**kwargs):
    """DelugeNet-20 at width x0.5 (stage channels 32/64/128)."""
    return delugenet_cifar(1, 0.5, **kwargs)


@register_model("delugenet", depth=20, input_size=(1, 28, 28), paper=PAPER, note=STUDY_NOTE)
def delugenet20_w75(**kwargs):
    """DelugeNet-20 at width x0.75 (stage channels 48/96/192)."""
    return delugenet_cifar(1, 0.75, **kwargs)
