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
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from crosslayer.models._base import ClassifierMixin, SpeedSwitches, init_he_fan_out
from crosslayer.models._registry import register_model
from crosslayer.ops import dense_block
from crosslayer.ops.batchnorm import batch_norm
from crosslayer.ops.defaults import use_fused
from crosslayer.ops.dispatch import is_tracing

PAPER = "Huang et al., Densely Connected Convolutional Networks, CVPR 2017"


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
        return self.conv1(self.relu1(batch_norm(self.norm1, x, update_stats)))

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


dense_block.implements(DenseBlock=DenseBlock, DenseLayer=DenseLayer, Transition=Transition)  # what the fused nodes run


class DenseNet(SpeedSwitches, ClassifierMixin, nn.Module):
    """DenseNet(-B)(-C) for CIFAR/SVHN (``stem="cifar"``: one 3x3 conv, three blocks) or ImageNet
    (``stem="imagenet"``: 7x7/2 conv-BN-ReLU-3x3/2 max-pool, four blocks). Our own stems, not in
    the paper, run the first block at half the input resolution (as the ImageNet stem's downsampling
    does; for the demo's 28x28 images): ``"cifar-s2"``, the 3x3 conv with stride 2, and
    ``"cifar-pool"``, the 3x3 conv followed by a 2x2 max-pool.

    Args follow the paper: ``growth_rate`` k, ``bottleneck`` (B), ``compression`` theta (C),
    ``num_init_features`` c_0 (16 for basic DenseNet, 2k for DenseNet-BC), ``conv_drop_rate`` (the
    paper's dropout after every convolution). ``drop_rate`` is timm's: dropout before the classifier.

    Speed switches (:class:`~crosslayer.models._base.SpeedSwitches`; same function, same weights):
    ``memory_efficient`` recomputes the BN-ReLU of the concatenations in backward instead of
    storing them; ``fused`` runs each dense block and the module after it as one autograd node over
    a shared feature buffer (:mod:`crosslayer.ops.dense_block`), True / False (the per-layer
    modules) / None (the device kind's default, :mod:`crosslayer.ops.defaults`);
    ``cpu_channels_last`` runs the feature extractor in channels_last (NHWC) on CPU.
    """

    def __init__(self, block_config: tuple[int, ...], growth_rate: int = 12, num_init_features: int = 24,
                 bottleneck: bool = True, compression: float = 0.5, bn_size: int = 4, conv_drop_rate: float = 0.0,
                 num_classes: int = 10, in_channels: int = 3, stem: str = "cifar",
                 memory_efficient: bool = False, fused: bool | None = None, cpu_channels_last: bool = True,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        if drop_path_rate:
            raise ValueError(f"drop_path_rate={drop_path_rate}: a DenseNet has no drop-path (stochastic depth)")
        self.growth_rate, self.compression, self.conv_drop_rate = growth_rate, compression, conv_drop_rate
        self.head_drop_rate = drop_rate
        self.block_config = tuple(block_config)
        if stem == "cifar":
            layers = [("conv0", nn.Conv2d(in_channels, num_init_features, 3, padding=1, bias=False))]
        elif stem == "cifar-s2":
            layers = [("conv0", nn.Conv2d(in_channels, num_init_features, 3, stride=2, padding=1, bias=False))]
        elif stem == "cifar-pool":
            layers = [("conv0", nn.Conv2d(in_channels, num_init_features, 3, padding=1, bias=False)),
                      ("pool0", nn.MaxPool2d(2))]
        elif stem == "imagenet":
            layers = [("conv0", nn.Conv2d(in_channels, num_init_features, 7, 2, 3, bias=False)),
                      ("norm0", nn.BatchNorm2d(num_init_features)), ("relu0", nn.ReLU(inplace=True)),
                      ("pool0", nn.MaxPool2d(3, 2, 1))]
        else:
            raise ValueError(f"stem must be 'cifar', 'cifar-s2', 'cifar-pool' or 'imagenet', got {stem!r}")
        self.features = nn.Sequential(OrderedDict(layers))
        channels, reduction = num_init_features, {"cifar": 1, "imagenet": 4}.get(stem, 2)
        self.feature_info = []  # the stage taps: each transition's output, then the final features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, channels, growth_rate, bottleneck=bottleneck, bn_size=bn_size,
                               drop_rate=conv_drop_rate, memory_efficient=memory_efficient)
            self.features.add_module(f"denseblock{i + 1}", block)
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                out = int(math.floor(channels * compression))
                self.features.add_module(f"transition{i + 1}", Transition(channels, out, conv_drop_rate))
                channels, reduction = out, 2 * reduction
                self.feature_info.append(dict(num_chs=out, reduction=reduction, module=f"features.transition{i + 1}"))
        self.features.add_module("norm5", nn.BatchNorm2d(channels))  # torchvision's name, any depth
        self.feature_info.append(dict(num_chs=channels, reduction=reduction, module="features.norm5"))
        self.num_features, self.num_classes = channels, num_classes
        self.classifier = self.classifier_head(channels, num_classes)
        # Fused blocks: same math as the per-layer form, ~1.5x faster on CPU (docs/benchmarks.md).
        # channels_last on CPU: oneDNN's convolutions skip their per-call layout reorders of the
        # (ever wider) concatenated inputs. Neither changes the weights or state_dict keys.
        self.set_speed(memory_efficient=memory_efficient, fused=fused, cpu_channels_last=cpu_channels_last)
        init_he_fan_out(self)

    first_conv = "features.conv0"

    def _use_fused(self, x: torch.Tensor) -> bool:
        return _use_fused(self.features, x, self.fused)

    def fast_path_blocker(self) -> str | None:
        with torch.no_grad():  # the structure and the BatchNorms' modes as they are, no module touched
            fusable = dense_block.fusable_features(self.features)
        if not fusable:
            return ("its features are not exactly the stock modules the fused dense blocks implement, or its "
                    "BatchNorms are in mixed modes")
        return None

    def truncate_stages(self, keep: int) -> None:
        end = list(self.features._modules).index(f"transition{keep}")
        self.features = self.features[:end + 1]
        self.block_config = self.block_config[:keep]

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        if isinstance(x, torch.fx.Proxy) and use_fused(self.fused, next(self.parameters()).device.type):
            # the fast paths may apply: one call in the graph, which takes eager's path when it runs
            switches = (self.fused, self.cpu_channels_last)
            taps = _traced_stage_outputs(self.features, x, *switches)
            return [taps[i] for i in range(len(self.feature_info))]
        x = _cpu_layout(x, self.cpu_channels_last)
        return _run_stages(self.features, x, self._use_fused(x))

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning rates (timm): the stem, each block with its transition, the final norm."""
        return dict(stem=r"^features\.(?:conv0|norm0)",
                    blocks=[(r"^features\.(?:denseblock|transition)(\d+)", None), (r"^features\.norm5", (99999,))])


def _use_fused(features: nn.Sequential, x: torch.Tensor, fused: bool | None) -> bool:
    """Fused blocks cover training (with or without autograd, with or without the papers' dropout)
    and inference with the stock modules (:func:`crosslayer.ops.dense_block.fusable`). The plain
    path takes everything else: autograd through eval-mode BatchNorms (frozen-BN fine-tuning, input
    gradients), modules in mixed modes, hooks, SyncBatchNorm and other swapped or added modules,
    tracers."""
    if not use_fused(fused, x.device.type) or is_tracing(x):
        return False
    # hooks on the blocks' modules would not fire inside the fused node
    return dense_block.fusable_now(features)


def _cpu_layout(x: torch.Tensor, cpu_channels_last: bool) -> torch.Tensor:
    if not is_tracing(x) and cpu_channels_last and x.device.type == "cpu" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _run_stages(features: nn.Sequential, x: torch.Tensor, fused: bool) -> list[torch.Tensor]:
    """Each transition's output, then relu(features(x)) (unless ``features`` was pruned to end at a
    transition): fused, or through the modules."""
    if fused:
        return dense_block.run_stages(features, x)
    taps = []
    for module in features:
        x = module(x)
        if isinstance(module, Transition):
            taps.append(x)
    return taps if isinstance(module, Transition) else taps + [F.relu(x)]  # pruned after a transition


def _traced_stage_outputs(features: nn.Sequential, x: torch.Tensor, fused: bool | None,
                          cpu_channels_last: bool) -> list[torch.Tensor]:
    """:meth:`DenseNet.stage_outputs` as one call of an FX graph: it decides the path when it runs."""
    x = _cpu_layout(x, cpu_channels_last)
    return _run_stages(features, x, _use_fused(features, x, fused))


torch.fx.wrap("_traced_stage_outputs")


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
    """DenseNet-BC (L=40, k=12): 6 layers per block."""
    return _cifar(40, 12, True, kwargs)


@register_model("densenet", depth=40, input_size=(1, 28, 28), paper=PAPER,
                note="the demo's model: DenseNet-BC L=40 k=12 with a stride-2 stem (not in the paper)")
def densenet_bc40_k12_s2(**kwargs):
    """DenseNet-BC (L=40, k=12) with the stride-2 stem ``"cifar-s2"``: the blocks run at half the input
    resolution (14/7/3 for 28x28 images), ~4x fewer multiply-adds than :func:`densenet_bc40_k12`,
    same parameters. The demo's model (docs/benchmarks.md, "Demo")."""
    kwargs.setdefault("stem", "cifar-s2")
    return _cifar(40, 12, True, kwargs)


def _imagenet(blocks, k, kwargs):
    return DenseNet(blocks, kwargs.pop("growth_rate", k), kwargs.pop("num_init_features", 2 * k), stem="imagenet",
                    **kwargs)


def _register_imagenet(depth: int, note: str = ""):
    return register_model("densenet", depth=depth, input_size=(3, 224, 224), default_classes=1000, paper=PAPER,
                          note=note)


@_register_imagenet(121)
def densenet121(**kwargs):
    """DenseNet-121 (ImageNet, k=32, blocks 6-12-24-16), Table 1."""
    return _imagenet((6, 12, 24, 16), 32, kwargs)


@_register_imagenet(169)
def densenet169(**kwargs):
    """DenseNet-169 (ImageNet, k=32, blocks 6-12-32-32), Table 1."""
    return _imagenet((6, 12, 32, 32), 32, kwargs)


@_register_imagenet(201)
def densenet201(**kwargs):
    """DenseNet-201 (ImageNet, k=32, blocks 6-12-48-32), Table 1."""
    return _imagenet((6, 12, 48, 32), 32, kwargs)


@_register_imagenet(264)
def densenet264(**kwargs):
    """DenseNet-264 (ImageNet, k=32, blocks 6-12-64-48), Table 1."""
    return _imagenet((6, 12, 64, 48), 32, kwargs)


@_register_imagenet(161, note="from the official code / torchvision; not in Table 1")
def densenet161(**kwargs):
    """DenseNet-161 (ImageNet, k=48, blocks 6-12-36-24), liuzhuang13/DenseNet README and torchvision."""
    return _imagenet((6, 12, 36, 24), 48, kwargs)


_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                      r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def torchvision_keys(state_dict: dict[str, torch.Tensor]) -> OrderedDict:
    """A torchvision DenseNet state_dict with old-style keys (``norm.1``, pytorch/vision#474) renamed to
    the current ones (``norm1``), which are crosslayer's; other keys unchanged."""
    fixed = OrderedDict()
    for key, value in state_dict.items():
        m = _OLD_KEY.match(key)
        fixed[m.group(1) + m.group(2) if m else key] = value
    return fixed


def load_torchvision_state_dict(model: DenseNet, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load a torchvision DenseNet state_dict (current ``norm1`` or old ``norm.1`` key style,
    pytorch/vision#474) into a crosslayer ImageNet DenseNet with identical outputs."""
    return model.load_state_dict(torchvision_keys(state_dict), strict=strict)


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
