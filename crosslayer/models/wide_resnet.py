"""Wide Residual Networks.

S. Zagoruyko, N. Komodakis, "Wide Residual Networks", BMVC 2016: WRN-d-k has depth d = 6n+4,
n pre-activation basic blocks per stage, stage widths 16k/32k/64k, a 16-channel stem, 1x1
projection shortcuts on the pre-activated input where the width changes, and optional dropout
between the two 3x3 convs of each block.

Initialised as the released code (szagoruyko/wide-residual-networks, ``models/utils.lua``):
``MSRinit`` = He normal with n = k*k*in_channels (fan-in), conv biases removed, ``FCinit`` = zero
classifier bias, and BatchNorm left at Torch's default (scale ~ U(0, 1), shift 0). ``init="fan_out"``
gives the fb.resnet.torch rule (He fan-out, BN scale 1) used by the other models instead.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from crosslayer.models._base import ClassifierMixin, init_he_fan_out
from crosslayer.models._registry import register_model
from crosslayer.models.resnet import PreActBlock

PAPER = "Zagoruyko & Komodakis, Wide Residual Networks, BMVC 2016"


class WideResNet(ClassifierMixin, nn.Module):
    """WRN-depth-width for 32x32 inputs (Table 1 of the paper). ``conv_drop_rate``: the paper's dropout
    between the two convolutions of every block; ``drop_rate`` (timm's): dropout before the classifier."""

    first_conv = "stem"

    def __init__(self, depth: int = 28, width: int = 10, conv_drop_rate: float = 0.0, num_classes: int = 10,
                 in_channels: int = 3, init: str = "official", drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if init not in ("official", "fan_out"):
            raise ValueError(f"init must be 'official' or 'fan_out', got {init!r}")
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth {depth} needs (depth-4) divisible by 6")
        if drop_path_rate:
            raise ValueError(f"drop_path_rate={drop_path_rate}: a Wide ResNet has no drop-path (stochastic depth)")
        n = (depth - 4) // 6
        self.depth, self.width, self.conv_drop_rate, self.head_drop_rate = depth, width, conv_drop_rate, drop_rate
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        blocks, channels, self.feature_info = [], 16, []
        for s, w in enumerate((16 * width, 32 * width, 64 * width)):
            for b in range(n):
                blocks.append(PreActBlock(channels, w, 2 if s > 0 and b == 0 else 1, conv_drop_rate))
                channels = w
            self.feature_info.append(dict(num_chs=w, reduction=2 ** s, module=f"blocks.{len(blocks) - 1}"))
        self.feature_info[-1]["module"] = "final_bn"
        self.blocks = nn.Sequential(*blocks)
        self.stage_ends = [n, 2 * n, 3 * n]  # the stage taps
        self.final_bn = nn.BatchNorm2d(channels)
        self.num_features, self.num_classes = channels, num_classes
        self.classifier = self.classifier_head(channels, num_classes)
        if init == "official":
            init_wrn_official(self)
        else:
            init_he_fan_out(self)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, taps, start = self.stem(x), [], 0
        for end in self.stage_ends:
            x = self.run_blocks(self.blocks[start:end], x)
            taps.append(x)
            start = end
        if self.final_bn is not None:  # None once pruned to an earlier stage
            taps[-1] = F.relu(self.final_bn(x))
        return taps

    def truncate_stages(self, keep: int) -> None:
        self.stage_ends = self.stage_ends[:keep]
        self.blocks = self.blocks[:self.stage_ends[-1]]
        self.final_bn = None

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning rates (timm): the stem, each block, the final norm."""
        return dict(stem=r"^stem", blocks=[(r"^blocks\.(\d+)", None), (r"^final_bn", (99999,))])


def init_wrn_official(model: nn.Module) -> None:
    """``utils.MSRinit`` + ``utils.FCinit`` of the released Torch code; BatchNorm at Torch's
    ``reset()`` default (weight ~ U(0, 1), bias 0); Linear weight at Torch's default
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (= PyTorch's)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.0, 1.0)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def wide_resnet(depth: int, width: int, dropout: float = 0.0, **kwargs) -> WideResNet:
    """Generic WRN-depth-width with the paper's in-block dropout probability ``dropout`` (0 by default
    as the released ``train.lua``; 0.3 on CIFAR and 0.4 on SVHN for the "-dropout" variants)."""
    kwargs.setdefault("conv_drop_rate", dropout)
    return WideResNet(depth, width, **kwargs)


@register_model("wrn", depth=16, paper_params_m=2.7, paper=PAPER)
def wrn16_4(**kwargs):
    """WRN-16-4 (the tables' SVHN row uses dropout 0.4)."""
    return wide_resnet(16, 4, **kwargs)


@register_model("wrn", depth=16, paper_params_m=11.0, paper=PAPER)
def wrn16_8(**kwargs):
    """WRN-16-8."""
    return wide_resnet(16, 8, **kwargs)


@register_model("wrn", depth=28, paper_params_m=36.5, paper=PAPER)
def wrn28_10(**kwargs):
    """WRN-28-10."""
    return wide_resnet(28, 10, **kwargs)


@register_model("wrn", depth=40, paper_params_m=8.7, paper=PAPER,
                note="the DelugeNet table prints 8.7M (WRN arXiv v1); the network has 8.9M")
def wrn40_4(**kwargs):
    """WRN-40-4."""
    return wide_resnet(40, 4, **kwargs)
