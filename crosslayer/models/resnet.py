"""CIFAR ResNets: the original (post-activation) ResNet with option-A shortcuts, the pre-activation
ResNet, and the ResNet with stochastic depth.

- K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016 (Sec. 4.2).
- K. He, X. Zhang, S. Ren, J. Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016.
- G. Huang, Y. Sun, Z. Liu, D. Sedra, K. Q. Weinberger, "Deep Networks with Stochastic Depth", ECCV 2016.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from crosslayer.models._base import ClassifierMixin, init_he_fan_out
from crosslayer.models._registry import register_model

HE = "He et al., Deep Residual Learning for Image Recognition, CVPR 2016"
PREACT = "He et al., Identity Mappings in Deep Residual Networks, ECCV 2016"
SD = "Huang et al., Deep Networks with Stochastic Depth, ECCV 2016"


def zero_pad_shortcut(x: torch.Tensor, in_channels: int, out_channels: int, stride: int,
                      pool: str = "subsample") -> torch.Tensor:
    """Parameter-free shortcut (He et al. option A): spatial subsampling (or 2x2 average pooling,
    as in the stochastic-depth code) and zero-padding of the new channels. The channel counts are
    the block's (not read off ``x``), so FX can trace it."""
    if stride > 1:
        x = x[:, :, ::stride, ::stride] if pool == "subsample" else F.avg_pool2d(x, stride)
    pad = out_channels - in_channels
    return F.pad(x, (0, 0, 0, 0, 0, pad)) if pad > 0 else x


class BasicBlock(nn.Module):
    """Original residual unit y = ReLU(x + F(x)), F = conv3x3-BN-ReLU-conv3x3-BN (He 2016, Fig. 2).

    With ``survival_prob < 1`` it is a stochastic-depth block (Huang 2016, Eq. 2-5): in training the
    residual branch is kept with probability p_l for the whole mini-batch; at test time it is
    scaled by p_l."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, conv_bias: bool = False,
                 survival_prob: float = 1.0, shortcut_pool: str = "subsample"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.survival_prob, self.shortcut_pool = survival_prob, shortcut_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = zero_pad_shortcut(x, self.in_channels, self.out_channels, self.stride, self.shortcut_pool)
        branch = lambda: self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))  # noqa: E731
        if self.training and self.survival_prob < 1:  # one draw per mini-batch
            if isinstance(x, torch.fx.Proxy):  # a graph cannot branch on the draw: it multiplies by it
                keep = torch.rand_like(x[:1, :1, :1, :1]) < self.survival_prob
                return F.relu(shortcut + branch() * keep.to(x.dtype))
            if torch.rand(()) >= self.survival_prob:  # branch dropped: not computed, its parameters get a
                # zero gradient, so weight decay and momentum still reach them (as in the authors' Torch
                # optimiser, which updates the flattened parameters of every block)
                return F.relu(shortcut + sum(p.sum() for p in self.parameters()) * 0)
        out = branch()
        if self.survival_prob < 1:
            out = out * self.survival_prob
        return F.relu(shortcut + out)


class PreActBlock(nn.Module):
    """Pre-activation basic unit x + F(x), F = BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3 (He 2016b,
    Fig. 4e; dropout between the convs as in Wide ResNets).

    ``shortcut`` where the shape changes: ``"projection"`` = 1x1 conv (option B), ``"zero_pad"`` =
    strided subsampling + zero channels (option A, parameter-free). ``preact_shortcut``: the
    shortcut reads the pre-activated input BN-ReLU(x) instead of x (fb.resnet.torch
    ``preresnet.lua`` 'both_preact' units, the first of each stage); None = only where the shape
    changes (Wide ResNets, ``models/wide-resnet.lua``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, drop_rate: float = 0.0,
                 shortcut: str = "projection", preact_shortcut: bool | None = None):
        super().__init__()
        if shortcut not in ("projection", "zero_pad"):
            raise ValueError(f"shortcut must be 'projection' or 'zero_pad', got {shortcut!r}")
        changes = stride != 1 or in_channels != out_channels
        self.drop_rate, self.in_channels, self.out_channels, self.stride = drop_rate, in_channels, out_channels, stride
        self.preact_shortcut = changes if preact_shortcut is None else preact_shortcut
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
                         if changes and shortcut == "projection" else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        shortcut = pre if self.preact_shortcut else x
        if self.shortcut is not None:
            shortcut = self.shortcut(shortcut)
        else:
            shortcut = zero_pad_shortcut(shortcut, self.in_channels, self.out_channels, self.stride)
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, self.drop_rate, self.training)
        return shortcut + self.conv2(out)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck unit: BN-ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1 (width out/4),
    as in KaimingHe/resnet-1k-layers: the stride sits on the first 1x1 conv and a changing shape
    takes a 1x1 projection of the pre-activated input."""

    expansion = 4

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        width = out_channels // self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
                         if stride != 1 or in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return shortcut + out


class CifarResNet(ClassifierMixin, nn.Module):
    """Three-stage CIFAR ResNet (32x32, 16x16, 8x8), ``blocks_per_stage`` units each.

    ``unit``: 'basic' (post-activation, He 2016), 'preact' or 'preact_bottleneck' (He 2016b).
    ``death_rate`` p_L > 0 makes a stochastic-depth ResNet with the linear decay rule
    p_l = 1 - l/L * (1 - p_L) (Huang 2016, Eq. 4), with ``death_rate`` = 1 - p_L.
    ``shortcut_type`` ('preact' units) is fb.resnet.torch's ``-shortcutType``: 'A' zero-padded
    identity (its CIFAR default), 'B' 1x1 projection where the shape changes; as in its
    ``preresnet.lua``, the first unit of each stage shares its BN-ReLU with the shortcut.
    ``stem="cifar-s2"`` (ours, not in the paper) gives the 3x3 stem conv stride 2, as DenseNet's
    ``"cifar-s2"``: the stages run at half the input resolution.
    timm's keywords: ``drop_rate`` = dropout before the classifier; ``drop_path_rate`` = ``death_rate``
    (basic units only).
    """

    first_conv = "stem"

    def __init__(self, blocks_per_stage: int, unit: str = "basic", widths: tuple[int, int, int] = (16, 32, 64),
                 num_classes: int = 10, in_channels: int = 3, conv_bias: bool = False, death_rate: float = 0.0,
                 shortcut_pool: str = "subsample", shortcut_type: str = "A", stem: str = "cifar",
                 drop_rate: float = 0.0, drop_path_rate: float | None = None):
        super().__init__()
        if shortcut_type not in ("A", "B"):
            raise ValueError(f"shortcut_type must be 'A' (zero-padding) or 'B' (projection), got {shortcut_type!r}")
        if stem not in ("cifar", "cifar-s2"):
            raise ValueError(f"stem must be 'cifar' or 'cifar-s2', got {stem!r}")
        preact = unit.startswith("preact")
        if drop_path_rate is not None:
            if preact and drop_path_rate:
                raise ValueError(f"drop_path_rate={drop_path_rate}: stochastic depth is built for basic units only")
            death_rate = drop_path_rate
        self.head_drop_rate = drop_rate
        self.stem = nn.Conv2d(in_channels, 16, 3, 2 if stem == "cifar-s2" else 1, 1, bias=conv_bias)
        self.stem_bn = None if preact else nn.BatchNorm2d(16)
        total, layers, channels, idx = 3 * blocks_per_stage, [], 16, 0
        for s, width in enumerate(widths):
            for b in range(blocks_per_stage):
                stride = 2 if s > 0 and b == 0 else 1
                idx += 1
                if unit == "basic":
                    p = 1.0 - idx / total * death_rate
                    layers.append(BasicBlock(channels, width, stride, conv_bias, p, shortcut_pool))
                elif unit == "preact":
                    layers.append(PreActBlock(channels, width, stride, shortcut="zero_pad" if shortcut_type == "A"
                                              else "projection", preact_shortcut=b == 0))
                elif unit == "preact_bottleneck":
                    layers.append(PreActBottleneck(channels, width, stride))
                else:
                    raise ValueError(f"unknown unit {unit!r}")
                channels = width
        self.layers = nn.Sequential(*layers)
        self.final_bn = nn.BatchNorm2d(channels) if preact else None
        self.num_features, self.num_classes = channels, num_classes
        self.classifier = self.classifier_head(channels, num_classes)
        self.stage_ends = [blocks_per_stage * (s + 1) for s in range(len(widths))]  # the stage taps
        self.feature_info = [dict(num_chs=w, reduction=(2 if stem == "cifar-s2" else 1) * 2 ** s, module=f"layers.{end - 1}")
                             for s, (w, end) in enumerate(zip(widths, self.stage_ends))]
        if preact:
            self.feature_info[-1]["module"] = "final_bn"
        init_he_fan_out(self)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        if self.stem_bn is not None:
            x = F.relu(self.stem_bn(x))
        taps, start = [], 0
        for end in self.stage_ends:
            x = self.run_blocks(self.layers[start:end], x)
            taps.append(x)
            start = end
        if self.final_bn is not None:
            taps[-1] = F.relu(self.final_bn(x))
        return taps

    def truncate_stages(self, keep: int) -> None:
        self.stage_ends = self.stage_ends[:keep]
        self.layers = self.layers[:self.stage_ends[-1]]
        self.final_bn = None

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning rates (timm): the stem, each unit, the final norm."""
        return dict(stem=r"^stem", blocks=[(r"^layers\.(\d+)", None), (r"^final_bn", (99999,))])


def _depth_blocks(depth: int, per_block: int, family: str) -> int:
    if (depth - 2) % (3 * per_block):
        raise ValueError(f"{family} depth {depth} needs (depth-2) divisible by {3 * per_block}")
    return (depth - 2) // (3 * per_block)


def resnet_cifar(depth: int, **kwargs) -> CifarResNet:
    """Original CIFAR ResNet (He 2016, Sec. 4.2): 6n+2 layers, option-A shortcuts."""
    return CifarResNet(_depth_blocks(depth, 2, "ResNet"), "basic", **kwargs)


def preact_resnet_cifar(depth: int, bottleneck: bool | None = None, **kwargs) -> CifarResNet:
    """Pre-activation CIFAR ResNet: basic units (6n+2, fb.resnet.torch ``preresnet.lua``, zero-padding
    shortcuts by default) or bottleneck units (9n+2, widths 64/128/256, KaimingHe/resnet-1k-layers,
    1x1 projections)."""
    if bottleneck is None:
        bottleneck = depth >= 164
    if bottleneck:
        return CifarResNet(_depth_blocks(depth, 3, "pre-act ResNet"), "preact_bottleneck", (64, 128, 256), **kwargs)
    return CifarResNet(_depth_blocks(depth, 2, "pre-act ResNet"), "preact", **kwargs)


def init_sd_official(model: nn.Module) -> None:
    """The stochastic-depth code's init (yueatsprograms/Stochastic_Depth ``main.lua``,
    ``ResidualDrop.lua``): conv weights ``nninit.kaiming`` with gain 'relu' = normal with std
    sqrt(2 / fan_in), conv biases 0; BatchNorm at cudnn's ``reset()`` (scale ~ U(0, 1), shift 0);
    the Linear at Torch's default, U(+-1/sqrt(fan_in)) for weight and bias (= PyTorch's)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.0, 1.0)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            m.reset_parameters()


def stochastic_depth_resnet(depth: int, death_rate: float = 0.5, conv_bias: bool = True, init: str = "official",
                            **kwargs) -> CifarResNet:
    """ResNet with stochastic depth (Huang 2016): linear decay to p_L = 0.5, whole branch dropped per
    mini-batch, test-time scaling; 2x2 average-pool + zero-pad shortcuts as in the authors' code.
    ``init="official"``: the authors' code (:func:`init_sd_official`); ``"fan_out"``: fb.resnet.torch's."""
    if init not in ("official", "fan_out"):
        raise ValueError(f"init must be 'official' or 'fan_out', got {init!r}")
    model = CifarResNet(_depth_blocks(depth, 2, "SD ResNet"), "basic", conv_bias=conv_bias, death_rate=death_rate,
                        shortcut_pool="avg", **kwargs)
    if init == "official":
        init_sd_official(model)
    return model


@register_model("resnet", depth=110, paper_params_m=1.7, paper=HE)
def resnet110(**kwargs):
    """ResNet-110 (He 2016), option-A shortcuts."""
    return resnet_cifar(110, **kwargs)


@register_model("resnet", depth=20, paper_params_m=0.27, paper=HE)
def resnet20(**kwargs):
    """ResNet-20 (He 2016): small baseline for quick runs."""
    return resnet_cifar(20, **kwargs)


@register_model("preact_resnet", depth=110, paper_params_m=1.7, paper=PREACT)
def preact_resnet110(**kwargs):
    """Pre-activation ResNet-110, basic units, zero-padding (option A) shortcuts as fb.resnet.torch
    ``preresnet.lua`` builds it for CIFAR (``shortcut_type="B"``: 1x1 projections, 1,730,522 params)."""
    return preact_resnet_cifar(110, bottleneck=False, **kwargs)


@register_model("preact_resnet", depth=164, paper_params_m=1.7, paper=PREACT)
def preact_resnet164(**kwargs):
    """Pre-activation ResNet-164, bottleneck units."""
    return preact_resnet_cifar(164, bottleneck=True, **kwargs)


@register_model("preact_resnet", depth=1001, paper_params_m=10.2, paper=PREACT,
                note="the tables print 10.2M; the released network (resnet-1k-layers) has 10.33M")
def preact_resnet1001(**kwargs):
    """Pre-activation ResNet-1001, bottleneck units."""
    return preact_resnet_cifar(1001, bottleneck=True, **kwargs)


@register_model("stochastic_depth", depth=110, paper_params_m=1.7, paper=SD)
def resnet110_sd(**kwargs):
    """ResNet-110 with stochastic depth (conv biases on and the init of the authors' Torch code)."""
    return stochastic_depth_resnet(110, **kwargs)


@register_model("stochastic_depth", depth=152, paper_params_m=None, paper=SD,
                note="the SVHN network of the tables' ResNet / stochastic-depth rows (-N 25)")
def resnet152_sd(**kwargs):
    """ResNet-152 with stochastic depth: the authors' code with ``-N 25`` (6N+2 layers), the network of
    their SVHN result (README: ``-dataset svhn -N 25 -maxEpochs 50 -deathRate 0.5``)."""
    return stochastic_depth_resnet(152, **kwargs)


@register_model("stochastic_depth", depth=1202, paper_params_m=10.2, paper=SD,
                note="the tables print 10.2M (ResNet-1001's figure); ResNet-1202 has 19.4M")
def resnet1202_sd(**kwargs):
    """ResNet-1202 with stochastic depth, built on fb.resnet.torch (no conv biases, its fan-out init)."""
    kwargs.setdefault("conv_bias", False)
    kwargs.setdefault("init", "fan_out")
    return stochastic_depth_resnet(1202, **kwargs)


# ---------------------------------------------------------------- small variants for `crosslayer study`
# Pre-activation ResNets of depth 6n+2 with basic units and widths 16/32/64 (He et al. 2016b, the
# CIFAR rule of He et al. 2016, Sec. 4.2), small enough to train on a CPU. Not in the papers.
STUDY_NOTE = "small variant for crosslayer study (not in the paper)"


@register_model("preact_resnet", depth=8, input_size=(1, 28, 28), paper=PREACT, note=STUDY_NOTE)
def preact_resnet8(**kwargs):
    """Pre-activation ResNet-8 (n=1), basic units, 1x1 projection shortcuts (as docs/study.md measured it)."""
    kwargs.setdefault("shortcut_type", "B")
    return preact_resnet_cifar(8, bottleneck=False, **kwargs)


@register_model("preact_resnet", depth=20, input_size=(1, 28, 28), paper=PREACT, note=STUDY_NOTE)
def preact_resnet20(**kwargs):
    """Pre-activation ResNet-20 (n=3), basic units, 1x1 projection shortcuts (as docs/study.md measured it)."""
    kwargs.setdefault("shortcut_type", "B")
    return preact_resnet_cifar(20, bottleneck=False, **kwargs)


@register_model("preact_resnet", depth=44, input_size=(1, 28, 28), paper=PREACT, note=STUDY_NOTE)
def preact_resnet44(**kwargs):
    """Pre-activation ResNet-44 (n=7), basic units, 1x1 projection shortcuts (as docs/study.md measured it)."""
    kwargs.setdefault("shortcut_type", "B")
    return preact_resnet_cifar(44, bottleneck=False, **kwargs)
