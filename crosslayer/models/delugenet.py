"""DelugeNet and Wide-DelugeNet.

J. Kuen, X. Kong, G. Wang, "DelugeNets: Deep Networks with Massive and Flexible Cross-layer
Information Inflows", arXiv 1611.05552. Faithful to the official Lua code (xternalz/DelugeNets),
which reproduces every published parameter count: see docs/architecture.md, "DelugeNet".

A stage keeps the list S of its composite layers' outputs. Every consumer reads all of S through a
cross-layer depthwise convolution (CLDC): a per-input affine-free batch normalisation, then a
per-(channel, input) scale and shift, summed over the inputs. Because all consumers of an output
normalise it with the same batch statistics, this implementation normalises each output ONCE when
it is produced (``shared normalisation``) and each CLDC is a weighted sum of the stored normalised
tensors: identical outputs, gradients and running statistics, O(L) instead of O(L^2) normalisations
per stage (the fast paths behind this live in :mod:`crosslayer.ops.deluge`). Inputs of a CLDC are
ordered newest first, as in the official weights: column 0 of ``weight`` multiplies the
immediately preceding output, column L-1 the stage's first tensor.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from crosslayer.models._base import ClassifierMixin, SpeedSwitches, init_he_fan_out
from crosslayer.models._registry import register_model
from crosslayer.ops.batchnorm import batch_norm
from crosslayer.ops.deluge import GradBank, StageOutputs, WeightedSum, bank_applies, bankable, normalize, weighted_sum
from crosslayer.ops.dispatch import is_tracing

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

    def forward(self, normalized: list[torch.Tensor], bank: GradBank | None = None) -> torch.Tensor:
        """``normalized``: the stage's outputs after the shared normalisation, newest first.
        ``bank``: where their gradients are summed (the training fast path, :mod:`crosslayer.ops.deluge`)."""
        if len(normalized) != self.num_inputs:
            raise ValueError(f"CLDC expects {self.num_inputs} inputs, got {len(normalized)}")
        if bank is None or is_tracing(normalized[0]):  # plain autograd (torch.compile fuses it; FX records it)
            return weighted_sum(self.weight, self.bias, normalized)
        return WeightedSum.apply(self.weight, self.bias, bank, *normalized)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_inputs={self.num_inputs}"


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
    ``memory_efficient`` recomputes the CLDC, BN, ReLU and the body's first convolution in backward."""

    def __init__(self, in_channels: int, width: int, out_channels: int, num_inputs: int,
                 memory_efficient: bool = False):
        super().__init__()
        self.cldc = CrossLayerDepthwiseConv(in_channels, num_inputs) if num_inputs > 1 else None
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.body = Bottleneck(in_channels, width, out_channels)
        self.memory_efficient = memory_efficient

    def _pre(self, inputs: list[torch.Tensor], update_stats: bool = True, bank=None) -> torch.Tensor:
        x = inputs[0] if self.cldc is None else self.cldc(inputs, bank)
        return self.body[0](self.relu(batch_norm(self.norm, x, update_stats)))

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
        for module in list(self.body)[1:]:  # bn1-relu1-conv2-bn2-relu2-conv3
            x = module(x)
        return x


class Transition(nn.Module):
    """Transition: CLDC over the finished stage -> BN -> Conv3x3 stride 2 (doubling the channels).
    No ReLU and no pooling, as in the official code."""

    def __init__(self, in_channels: int, out_channels: int, num_inputs: int):
        super().__init__()
        self.cldc = CrossLayerDepthwiseConv(in_channels, num_inputs)
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)

    def forward(self, stage: StageOutputs) -> torch.Tensor:
        return self.conv(self.norm(self.cldc(stage.normalized, stage.bank)))


class DelugeStage(nn.Module):
    """One stage: an entry producing S[0] (first composite layer, a 1x1 projection, or a
    transition) followed by ``num_layers`` composite layers, the k-th reading k inputs.
    ``norms[j]`` is the shared affine-free normalisation of S[j]. Returns S normalised, newest first
    (:class:`~crosslayer.ops.deluge.StageOutputs`)."""

    def __init__(self, entry: nn.Module, channels: int, width: int, num_layers: int, memory_efficient: bool = False):
        super().__init__()
        self.entry = entry
        self.layers = nn.ModuleList(CompositeLayer(channels, width, channels, k, memory_efficient)
                                    for k in range(1, num_layers + 1))
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels, affine=False) for _ in range(num_layers + 1))

    def forward(self, x, fused: bool | None = None) -> StageOutputs:
        """``x``: the stem output, or the previous stage's :class:`StageOutputs` (into a transition).
        ``fused``: the model's switch (None = the device kind's default)."""
        raw = [self.entry(x)]  # newest first
        bank = GradBank() if bank_applies(self.norms, raw[0], fused) else None
        out = StageOutputs([normalize(self.norms[0], raw[0], 0, bank)], bank)
        for j, layer in enumerate(self.layers, start=1):
            raw.insert(0, layer(raw, out.normalized, bank))
            out.normalized.insert(0, normalize(self.norms[j], raw[0], j, bank))
        return out


class DelugeNet(SpeedSwitches, ClassifierMixin, nn.Module):
    """DelugeNet for CIFAR (``stem="cifar"``) or ImageNet (``stem="imagenet"``). ``"cifar-s2"`` (ours,
    not in the paper) gives the CIFAR stem conv stride 2, as DenseNet's: the stages run at half the
    input resolution.

    ``units`` = composite layers per stage counting the stage's first unit (CIFAR DelugeNet-146:
    (8, 16, 24) plus the transition outputs; docs/architecture.md); ``widths`` = stage channels C_s
    (bottleneck width C_s/2).

    Speed switches (:class:`~crosslayer.models._base.SpeedSwitches`; same function, same weights):
    ``memory_efficient`` recomputes each composite layer's CLDC-BN-ReLU-conv1 in backward;
    ``fused`` sums the gradients of the shared normalisations in a per-stage bank
    (:mod:`crosslayer.ops.deluge`), True / False / None (the device kind's default);
    ``cpu_channels_last`` trains in channels_last (NHWC) on CPU.
    """

    def __init__(self, composites: tuple[int, ...], widths: tuple[int, ...], stem_channels: int,
                 num_classes: int = 10, in_channels: int = 3, stem: str = "cifar", memory_efficient: bool = False,
                 fused: bool | None = None, cpu_channels_last: bool = True, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        if drop_path_rate:
            raise ValueError(f"drop_path_rate={drop_path_rate}: a DelugeNet has no drop-path (stochastic depth)")
        self.composites, self.widths, self.head_drop_rate = tuple(composites), tuple(widths), drop_rate
        self.first_conv = "stem.0" if stem == "imagenet" else "stem"
        first = {"cifar": 1, "cifar-s2": 2}.get(stem, 4)  # the stem's reduction; each later stage halves the resolution
        self.feature_info = [dict(num_chs=w, reduction=first * 2 ** s, module=f"stages.{s}") for s, w in enumerate(widths)]
        self.feature_info[-1]["module"] = "head_norm"  # the last tap is the final features
        me = memory_efficient
        stages = []
        if stem in ("cifar", "cifar-s2"):
            self.stem = nn.Conv2d(in_channels, stem_channels, 3, 2 if stem == "cifar-s2" else 1, 1, bias=False)
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
            raise ValueError(f"stem must be 'cifar', 'cifar-s2' or 'imagenet', got {stem!r}")
        for s in range(1, len(widths)):
            prev_len = stages[-1].layers.__len__() + 1
            trans = Transition(widths[s - 1], widths[s], prev_len)
            stages.append(DelugeStage(trans, widths[s], widths[s] // 2, composites[s], me))
        self.stages = nn.ModuleList(stages)
        last = len(stages[-1].layers) + 1
        self.head_cldc = CrossLayerDepthwiseConv(widths[-1], last)
        self.head_norm = nn.BatchNorm2d(widths[-1])
        self.num_features, self.num_classes = widths[-1], num_classes
        self.classifier = self.classifier_head(widths[-1], num_classes)
        # On CPU, train in channels_last (NHWC): oneDNN's convolutions and batch norms are faster
        # there (1.18x a training step; inference is faster in NCHW: docs/benchmarks.md).
        self.set_speed(memory_efficient=memory_efficient, fused=fused, cpu_channels_last=cpu_channels_last)
        init_he_fan_out(self)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's newest output after its shared normalisation; last, the final features."""
        if not is_tracing(x) and self.cpu_channels_last and self.training and x.device.type == "cpu" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        x, taps = self.stem(x), []
        for stage in self.stages:
            x = stage(x, self.fused)
            taps.append(x.normalized[0])
        if self.head_cldc is not None:  # None once pruned to an earlier stage
            taps[-1] = F.relu(self.head_norm(self.head_cldc(x.normalized, x.bank)))
        return taps

    def fast_path_blocker(self) -> str | None:
        if not bankable(n for stage in self.stages for n in stage.norms):
            return "its shared normalisations are not plain affine-free BatchNorm2d (e.g. SyncBatchNorm)"
        return None

    def truncate_stages(self, keep: int) -> None:
        self.stages = self.stages[:keep]
        self.head_cldc = self.head_norm = None

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning rates (timm): the stem, each stage, the head's CLDC and norm."""
        return dict(stem=r"^stem", blocks=[(r"^stages\.(\d+)", None), (r"^head_(?:cldc|norm)", (99999,))])

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
        if self.head_cldc is not None:
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


@register_model("delugenet", depth=20, paper=PAPER,
                note="our own small variant (n=1) for quick CPU runs, not in the paper; the official builder "
                     "would start stage 2 with a strided BN-ReLU bottleneck instead of a transition")
def delugenet20(**kwargs):
    """DelugeNet-20 (n=1): our own small variant for tests and demos, not in the paper.

    Every stage boundary is the paper's transition (CLDC-BN-Conv3x3 stride 2). The official
    ``delugenet.lua`` builder with n=1 differs at the stage-1 -> stage-2 boundary only: stage 1 then
    has a single output, so its 'both_preact' unit takes the ``nLayers == 1`` branch and builds a
    BN-ReLU-bottleneck with a strided 3x3 instead of a transition (docs/architecture.md)."""
    return delugenet_cifar(1, 1.0, **kwargs)


def delugenet_imagenet(units: tuple[int, ...], **kwargs) -> DelugeNet:
    """ImageNet DelugeNet: ``units`` = the official ``cfg`` (composite layers + 1 per stage), stage
    widths 128-256-512-1024, 7x7 stem of 64 channels (xternalz/DelugeNets ``delugenet.lua``)."""
    composites = (units[0] - 1,) + tuple(u - 1 for u in units[1:])
    return DelugeNet(composites, (128, 256, 512, 1024), 64, stem="imagenet", **kwargs)


def _register_imagenet(units: tuple[int, ...], params_m: float):
    depth = 3 * sum(u - 1 for u in units) + 2
    return register_model("delugenet", depth=depth, input_size=(3, 224, 224), default_classes=1000,
                          paper_params_m=params_m, paper=PAPER)


@_register_imagenet((8, 8, 9, 9), 43.4)
def delugenet92(**kwargs):
    """DelugeNet-92: ImageNet, units per stage (8, 8, 9, 9) (official README)."""
    return delugenet_imagenet((8, 8, 9, 9), **kwargs)


@_register_imagenet((8, 9, 10, 11), 51.4)
def delugenet104(**kwargs):
    """DelugeNet-104: ImageNet, units per stage (8, 9, 10, 11) (official README)."""
    return delugenet_imagenet((8, 9, 10, 11), **kwargs)


@_register_imagenet((8, 10, 12, 14), 63.6)
def delugenet122(**kwargs):
    """DelugeNet-122: ImageNet, units per stage (8, 10, 12, 14) (official README)."""
    return delugenet_imagenet((8, 10, 12, 14), **kwargs)


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
