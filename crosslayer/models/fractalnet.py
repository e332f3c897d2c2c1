"""FractalNet.

G. Larsson, M. Maire, G. Shakhnarovich, "FractalNet: Ultra-Deep Neural Networks without Residuals",
ICLR 2017. The fractal expansion rule f_1(z) = conv(z), f_{C+1}(z) = join(f_C(f_C(z)), conv(z))
(Eq. 1), with join = element-wise mean, B blocks each followed by 2x2 max-pooling, and drop-path
regularisation (local: each join input dropped with probability 15%, at least one kept).
Conv unit as in the released Caffe generator: conv3x3 (with bias) -> dropout -> BN -> ReLU.

The released configuration (C=3 columns, B=5 blocks, widths 64-128-256-512-512) has 33.7M
parameters, not the 38.6M printed in the DenseNet and DelugeNet tables; no public configuration
reproduces 38.6M.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from crosslayer.models._base import ClassifierMixin
from crosslayer.models._registry import register_model

PAPER = "Larsson et al., FractalNet: Ultra-Deep Neural Networks without Residuals, ICLR 2017"


class ConvUnit(nn.Sequential):
    """conv3x3 (bias) -> dropout -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float):
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.Dropout(drop_rate),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class FractalBlock(nn.Module):
    """f_C of Eq. (1), built recursively: column c (1..C) has 2^(c-1) conv units; a join averages
    the outputs of the columns that meet there, with local drop-path in training."""

    def __init__(self, columns: int, in_channels: int, out_channels: int, drop_rate: float = 0.0,
                 drop_path: float = 0.15):
        super().__init__()
        self.columns, self.drop_path = columns, drop_path
        self.conv = ConvUnit(in_channels, out_channels, drop_rate)
        if columns > 1:
            self.first = FractalBlock(columns - 1, in_channels, out_channels, drop_rate, drop_path)
            self.second = FractalBlock(columns - 1, out_channels, out_channels, drop_rate, drop_path)

    def paths(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the columns meeting at this block's final join."""
        if self.columns == 1:
            return [self.conv(x)]
        return [self.conv(x)] + self.second.paths(self._join(self.first.paths(x)))

    def _join(self, paths: list[torch.Tensor]) -> torch.Tensor:
        if self.training and self.drop_path > 0 and len(paths) > 1:
            keep = torch.rand(len(paths)) >= self.drop_path
            if not keep.any():
                keep[torch.randint(len(paths), ())] = True
            paths = [p for p, k in zip(paths, keep) if k]
        return torch.stack(paths).mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._join(self.paths(x))


class FractalNet(ClassifierMixin, nn.Module):
    """FractalNet for 32x32 inputs: ``len(widths)`` fractal blocks, each followed by 2x2 max-pool."""

    def __init__(self, columns: int = 3, widths: tuple[int, ...] = (64, 128, 256, 512, 512),
                 drop_rates: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4), drop_path: float = 0.15,
                 num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        blocks, channels = [], in_channels
        for w, d in zip(widths, drop_rates):
            blocks += [FractalBlock(columns, channels, w, d, drop_path), nn.MaxPool2d(2)]
            channels = w
        self.blocks = nn.Sequential(*blocks)
        self.num_features, self.num_classes = channels, num_classes
        self.classifier = self.classifier_head(channels, num_classes)
        for m in self.modules():  # Xavier, as the released Caffe generator
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


@register_model("fractalnet", depth=20, paper_params_m=38.6, paper=PAPER,
                note="the released configuration (C=3, B=5) has 33.7M; 38.6M is not reproducible")
def fractalnet20(**kwargs):
    """FractalNet, 20 conv layers (C=3 columns, B=5 blocks), drop-path 15%."""
    return FractalNet(**kwargs)
