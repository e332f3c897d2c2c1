"""A straightforward per-consumer DelugeNet, written the way the official Lua module computes it:
every cross-layer depthwise convolution owns one affine-free BatchNorm per input and normalises
each of its inputs itself (O(L^2) normalisations per stage). Used by the tests (to prove the
shared-normalisation form equal) and by the benchmarks (as the baseline to beat)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from crosslayer.models.delugenet import DelugeNet, Transition


class PerConsumerCLDC(nn.Module):
    """out[:, c] = sum_i weight[c, i] * BN_i(x_i)[:, c] + bias[c, i], inputs newest first."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        channels, num_inputs = weight.shape
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())
        self.norms = nn.ModuleList(nn.BatchNorm2d(channels, affine=False) for _ in range(num_inputs))

    def forward(self, raw: list[torch.Tensor]) -> torch.Tensor:
        out = 0
        for i, (x, bn) in enumerate(zip(raw, self.norms)):
            out = out + self.weight[:, i, None, None] * bn(x) + self.bias[:, i, None, None]
        return out


class ReferenceDelugeNet(nn.Module):
    """Same weights as ``net`` (deep-copied), per-consumer normalisation."""

    def __init__(self, net: DelugeNet):
        super().__init__()
        self.net = copy.deepcopy(net)
        self.cldcs = nn.ModuleDict()
        for c in self.net.cross_layer_convs():
            self.cldcs[c["name"].replace(".", "_")] = PerConsumerCLDC(c["module"].weight, c["module"].bias)
        self.names = {id(c["module"]): c["name"].replace(".", "_") for c in self.net.cross_layer_convs()}

    def cldc(self, module, raw):
        return self.cldcs[self.names[id(module)]](raw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net.stem(x)
        raw = None
        for stage in net.stages:
            entry = stage.entry
            if isinstance(entry, Transition):
                first = entry.conv(entry.norm(self.cldc(entry.cldc, raw)))
            elif isinstance(entry, nn.Conv2d):
                first = entry(x)
            else:  # CIFAR stage 1: a composite layer on the stem output
                layer = entry.layer
                first = layer.body(F.relu(layer.norm(x)))
            raw = [first]
            for layer in stage.layers:
                pre = raw[0] if layer.cldc is None else self.cldc(layer.cldc, raw)
                raw.insert(0, layer.body(F.relu(layer.norm(pre))))
        feats = F.relu(net.head_norm(self.cldc(net.head_cldc, raw)))
        return net.forward_head(feats)
