"""Pieces shared by every model file: the timm-style classifier interface, the init rule and the
speed switches of the cross-layer models."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ClassifierMixin:
    """timm-style interface: ``forward_features`` -> activated feature map (N, num_features, H, W),
    ``forward_head`` -> global average pool + (dropout) + linear classifier.

    Subclasses set ``self.num_features``, ``self.num_classes``, ``self.classifier`` (built with
    :meth:`classifier_head`, so ``num_classes=0`` gives pooled features) and ``self.head_drop_rate``
    (0 unless the paper has dropout before the classifier).
    """

    num_features: int
    num_classes: int
    head_drop_rate: float = 0.0

    @staticmethod
    def classifier_head(num_features: int, num_classes: int) -> nn.Module:
        """The final linear classifier, or ``nn.Identity`` for ``num_classes=0``: the model then
        returns its pooled features (N, num_features), as in timm."""
        return nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        if self.head_drop_rate > 0:
            x = F.dropout(x, self.head_drop_rate, self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes``; 0 = no classifier,
        the model returns its pooled features (N, num_features), as timm's ``reset_classifier(0)``."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        ref = self.classifier if isinstance(self.classifier, nn.Linear) else None
        self.num_classes = num_classes
        self.classifier = self.classifier_head(self.num_features, num_classes)
        if isinstance(self.classifier, nn.Linear):
            nn.init.zeros_(self.classifier.bias)
            if ref is not None:
                self.classifier.to(ref.weight.device, ref.weight.dtype)


def init_he_fan_out(model: nn.Module) -> None:
    """He et al. 2015 normal init with n = k*k*out_channels (fan-out), as in fb.resnet.torch and the
    DenseNet / DelugeNet Lua code; BatchNorm gamma=1, beta=0; conv and linear biases 0.
    Linear weights keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) = Torch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class SpeedSwitches:
    """The speed switches of the cross-layer models (DenseNet, DelugeNet), set one way: constructor
    keyword arguments, attributes of the same names, or :meth:`set_speed`. None of them changes the
    function computed, the weights or the state_dict keys.

    - ``memory_efficient``: recompute activations in backward instead of storing them (less memory,
      a little slower); setting it on the model sets it on every layer that has the switch.
    - ``fused``: the model's fast paths (:mod:`crosslayer.ops`): True, False (the plain modules),
      or None = the device kind's default (:func:`crosslayer.ops.defaults.use_fused`).
    - ``cpu_channels_last``: on CPU, run in the channels_last (NHWC) memory format.
    """

    SWITCHES = ("memory_efficient", "fused", "cpu_channels_last")
    fused: bool | None = None
    cpu_channels_last: bool = True

    @property
    def memory_efficient(self) -> bool:
        return self.__dict__.get("_memory_efficient", False)

    @memory_efficient.setter
    def memory_efficient(self, enabled: bool) -> None:
        self.__dict__["_memory_efficient"] = bool(enabled)
        for m in self.modules():
            if m is not self and "memory_efficient" in vars(m):  # the layers' own switch
                m.memory_efficient = bool(enabled)

    def set_speed(self, **switches):
        """Set any of ``memory_efficient``, ``fused``, ``cpu_channels_last``; returns the model."""
        unknown = sorted(set(switches) - set(self.SWITCHES))
        if unknown:
            raise TypeError(f"unknown speed switch {unknown}; the switches are {', '.join(self.SWITCHES)}")
        for name, value in switches.items():
            setattr(self, name, value)
        return self

    def set_memory_efficient(self, enabled: bool = True) -> None:
        """Switch the memory-efficient mode on or off; weights are unchanged."""
        self.set_speed(memory_efficient=enabled)

    set_grad_checkpointing = set_memory_efficient  # timm's name
