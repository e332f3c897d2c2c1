"""FractalNet.

G. Larsson, M. Maire, G. Shakhnarovich, "FractalNet: Ultra-Deep Neural Networks without Residuals",
ICLR 2017. The fractal expansion rule f_1(z) = conv(z), f_{C+1}(z) = join(f_C(f_C(z)), conv(z))
(Sec. 2, Eq. 1), with join = element-wise mean, B blocks each reducing the resolution by 2x2
max-pooling, and drop-path regularisation (Sec. 3.1; local: each join input dropped with
probability 15%, at least one kept).

Built as the authors' released Caffe generator (gustavla/fractalnet, ``generation/fractalnet.py``
and ``generation/globals.crox``), which produced the paper's CIFAR numbers:

* conv unit = conv3x3 (with bias) -> dropout -> Caffe ``BatchNorm`` (no ``Scale`` layer, so no
  learnable scale/shift) -> ReLU;
* at the end of a block every column is max-pooled *before* the block's last join
  (``pool2 conv0_0 ...`` then ``join3``); ``pool="after_join"`` pools the joined output instead,
  as Fig. 1 of the paper draws it (a different function);
* Caffe ``xavier`` fillers (U(+-sqrt(3 / fan_in))) for conv and classifier weights, zero biases;
* biases learn at twice the base learning rate and have no weight decay (``lr_mult: 2,
  decay_mult: 0``): :meth:`FractalNet.param_groups` hands those groups to the trainer.

The released configuration (C=3 columns, B=5 blocks, widths 64-128-256-512-512) has 33,714,314
parameters for 10 classes, not the 38.6M printed in the DenseNet and DelugeNet tables; see
docs/architecture.md, "Errata".
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from crosslayer.models._base import ClassifierMixin
from crosslayer.models._registry import register_model

PAPER = "Larsson et al., FractalNet: Ultra-Deep Neural Networks without Residuals, ICLR 2017"


def caffe_xavier_(weight: torch.Tensor) -> torch.Tensor:
    """Caffe's ``xavier`` filler (default ``variance_norm: FAN_IN``): U(-a, a), a = sqrt(3 / fan_in).
    (PyTorch's ``xavier_uniform_`` averages fan-in and fan-out instead.)"""
    fan_in = weight[0].numel()
    bound = math.sqrt(3.0 / fan_in)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


class ConvUnit(nn.Sequential):
    """conv3x3 (bias) -> dropout -> BN without affine parameters -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float):
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.Dropout(drop_rate),
                         nn.BatchNorm2d(out_channels, affine=False), nn.ReLU(inplace=True))


class FractalBlock(nn.Module):
    """f_C of Eq. (1), built recursively: column c (1..C) has 2^(c-1) conv units; a join averages
    the outputs of the columns that meet there, with local drop-path in training.

    ``pool`` (top-level block only): ``"columns"`` max-pools each column before the final join
    (released code), ``"after_join"`` max-pools the join's output (Fig. 1), ``None`` no pooling."""

    def __init__(self, columns: int, in_channels: int, out_channels: int, drop_rate: float = 0.0,
                 drop_path: float = 0.15, pool: str | None = None):
        super().__init__()
        if pool not in (None, "columns", "after_join"):
            raise ValueError(f"pool must be 'columns', 'after_join' or None, got {pool!r}")
        self.columns, self.drop_path, self.pool = columns, drop_path, pool
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
        if self.training and self.drop_path > 0 and len(paths) > 1 and isinstance(paths[0], torch.fx.Proxy):
            return _traced_join(paths, self.drop_path)
        if self.training and self.drop_path > 0 and len(paths) > 1:
            keep = torch.rand(len(paths)) >= self.drop_path
            if not keep.any():
                keep[torch.randint(len(paths), ())] = True
            # the mean over the kept paths, with the dropped ones multiplied by 0 (not left out), so
            # that their parameters get a zero gradient and the solver's weight decay and momentum still
            # reach them, as Caffe's solver updates every parameter
            return sum(p * k for p, k in zip(paths, keep.to(paths[0].dtype))) / keep.sum()
        return torch.stack(paths).mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = self.paths(x)
        if self.pool == "columns":
            paths = [F.max_pool2d(p, 2) for p in paths]
        out = self._join(paths)
        return F.max_pool2d(out, 2) if self.pool == "after_join" else out


def _traced_join(paths: list[torch.Tensor], drop_path: float) -> torch.Tensor:
    """Local drop-path as arithmetic an FX graph can record: each path kept with probability
    1 - drop_path, one drawn at random kept when none is, the mean over the kept ones."""
    n = len(paths)
    coins = torch.rand_like(paths[0].new_empty(n).float()) >= drop_path
    fallback = F.one_hot(torch.randint_like(coins, n, dtype=torch.long)[0], n).bool()
    keep = (coins | fallback & ~coins.any()).to(paths[0].dtype)
    return sum(p * keep[i] for i, p in enumerate(paths)) / keep.sum()


class FractalNet(ClassifierMixin, nn.Module):
    """FractalNet for 32x32 inputs: ``len(widths)`` fractal blocks, each halving the resolution by
    2x2 max-pooling (``pool``: where, see :class:`FractalBlock`). ``drop_rates``: the paper's dropout
    after the convolutions of each block; timm's ``drop_rate`` is dropout before the classifier and
    ``drop_path_rate`` the local drop-path probability (``drop_path``)."""

    first_conv = "blocks.0.conv.0"

    def __init__(self, columns: int = 3, widths: tuple[int, ...] = (64, 128, 256, 512, 512),
                 drop_rates: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4), drop_path: float = 0.15,
                 num_classes: int = 10, in_channels: int = 3, pool: str = "columns", drop_rate: float = 0.0,
                 drop_path_rate: float | None = None):
        super().__init__()
        drop_path = drop_path if drop_path_rate is None else drop_path_rate
        self.head_drop_rate = drop_rate
        blocks, channels = [], in_channels
        for w, d in zip(widths, drop_rates):
            blocks.append(FractalBlock(columns, channels, w, d, drop_path, pool))
            channels = w
        self.feature_info = [dict(num_chs=w, reduction=2 ** (i + 1), module=f"blocks.{i}") for i, w in enumerate(widths)]
        self.blocks = nn.Sequential(*blocks)
        self.num_features, self.num_classes = channels, num_classes
        self.classifier = self.classifier_head(channels, num_classes)
        for m in self.modules():  # weight_filler xavier, bias_filler constant 0 (globals.crox)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                caffe_xavier_(m.weight)
                nn.init.zeros_(m.bias)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for block in self.blocks:
            x = self.run_blocks([block], x)
            taps.append(x)
        return taps

    def truncate_stages(self, keep: int) -> None:
        self.blocks = self.blocks[:keep]

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning rates (timm): each fractal block."""
        return dict(blocks=r"^blocks\.(\d+)")

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        if num_classes > 0:
            caffe_xavier_(self.classifier.weight)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """SGD parameter groups of the released solver set-up: weights at ``lr`` with
        ``weight_decay``; biases at 2 x ``lr`` without weight decay (``lr_mult: 2, decay_mult: 0``
        for every conv and the classifier in globals.crox). BN has no parameters."""
        weights = [p for n, p in self.named_parameters() if not n.endswith("bias")]
        biases = [p for n, p in self.named_parameters() if n.endswith("bias")]
        return [{"params": weights, "lr": lr, "weight_decay": weight_decay, "name": "weights"},
                {"params": biases, "lr": 2 * lr, "weight_decay": 0.0, "name": "biases"}]


@register_model("fractalnet", depth=20, paper_params_m=38.6, paper=PAPER,
                note="the released configuration (C=3, B=5) has 33.7M; 38.6M is not reproducible")
def fractalnet20(**kwargs):
    """FractalNet, 20 conv layers (C=3 columns, B=5 blocks), dropout 0-0.4 and local drop-path 15%."""
    return FractalNet(**kwargs)
