"""Pieces shared by every model file: the timm-style classifier interface and the init rule."""

from __future__ import annotations

import torch
import torch.fx
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


def count_batch(bn: nn.BatchNorm2d) -> float:
    """What a training-mode BatchNorm forward does before normalising: count the batch and return
    the running-average factor (``momentum``, or 1/num_batches for ``momentum=None``; 0 without
    running statistics). For implementations that update a BatchNorm's statistics themselves."""
    if not bn.track_running_stats:
        return 0.0
    bn.num_batches_tracked.add_(1)
    return bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)


def batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, update_stats: bool = True) -> torch.Tensor:
    """``bn(x)``, but with ``update_stats=False`` a training-mode call normalises with the batch
    statistics without touching the running statistics. Used when a checkpointed region is
    recomputed in backward, so running statistics are updated once per step, not twice
    (the bug of torchvision's ``memory_efficient`` DenseNet, pytorch/pytorch#96136)."""
    if update_stats or not bn.training:
        return bn(x)
    # throw-away copies of the running statistics: the recomputation must save the same tensors
    # as the original forward (non-reentrant checkpoint checks their number), but update nothing
    rm = bn.running_mean.clone() if bn.running_mean is not None else None
    rv = bn.running_var.clone() if bn.running_var is not None else None
    return F.batch_norm(x, rm, rv, bn.weight, bn.bias, True, 0.0, bn.eps)


def is_tracing(x) -> bool:
    """Whether ``x`` flows through a tracer (torch.compile / torch.export, FX symbolic tracing as in
    torchvision's create_feature_extractor, or ``torch.jit.trace`` / the TorchScript-based ONNX
    exporter): models then take their plain module path."""
    return torch.compiler.is_compiling() or isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing()


def has_hooks(root: nn.Module) -> bool:
    """Whether a forward/backward hook is registered on ``root`` or below, or globally: fused
    implementations that bypass submodule calls step aside then, so hooks keep firing."""
    from torch.nn.modules import module as M

    if M._global_forward_hooks or M._global_forward_pre_hooks or M._global_backward_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in root.modules())
