"""BatchNorm helpers for implementations that normalise outside ``nn.BatchNorm2d.forward`` but must
leave every BatchNorm's running statistics exactly as its own training-mode forward would."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def count_batch(bn: nn.BatchNorm2d) -> float:
    """What a training-mode BatchNorm forward does before normalising: count the batch and return
    the running-average factor (``momentum``, or 1/num_batches for ``momentum=None``; 0 without
    running statistics)."""
    if not bn.track_running_stats:
        return 0.0
    bn.num_batches_tracked.add_(1)
    return bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)


def update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """What ``bn``'s own training-mode forward does to its running statistics, given the batch
    ``mean`` and biased ``var`` over ``n`` values per channel."""
    if not bn.track_running_stats:
        return
    with torch.no_grad():
        f = count_batch(bn)
        bn.running_mean.mul_(1 - f).add_(mean.to(bn.running_mean.dtype), alpha=f)
        bn.running_var.mul_(1 - f).add_((var * (n / max(n - 1, 1))).to(bn.running_var.dtype), alpha=f)


def batch_norm(bn: nn.Module, x: torch.Tensor, update_stats: bool = True) -> torch.Tensor:
    """``bn(x)``, but with ``update_stats=False`` a training-mode BatchNorm normalises with the batch
    statistics without touching its running statistics. Used when a checkpointed region is
    recomputed in backward, so running statistics are updated once per step, not twice
    (the bug of torchvision's ``memory_efficient`` DenseNet, pytorch/pytorch#96136).
    Any other normalisation module is simply called."""
    if update_stats or not bn.training or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return bn(x)
    # throw-away copies of the running statistics: the recomputation must save the same tensors
    # as the original forward (non-reentrant checkpoint checks their number), but update nothing
    rm = bn.running_mean.clone() if bn.running_mean is not None else None
    rv = bn.running_var.clone() if bn.running_var is not None else None
    return F.batch_norm(x, rm, rv, bn.weight, bn.bias, True, 0.0, bn.eps)


def bn_relu(x: torch.Tensor, bn: nn.BatchNorm2d, stats=None, inplace: bool = False):
    """relu(bn(x)) for an affine BatchNorm2d (``x`` channels_last). Returns (y, mean, invstd); pass
    the returned statistics back in to recompute y bit-identically in backward. ``inplace`` writes y
    over x (inference: no backward needs x, and a fresh large tensor costs its page faults)."""
    sdt = torch.promote_types(x.dtype, torch.float32)  # statistics in fp32 (or fp64)
    if stats is None:
        if bn.training:
            mean, var = (s.to(sdt) for s in torch.batch_norm_update_stats(x, None, None, 0.0))
            update_running_stats(bn, mean, var, x.numel() // x.shape[1])
        else:
            mean, var = bn.running_mean.to(sdt), bn.running_var.to(sdt)
        stats = (mean, torch.rsqrt(var + bn.eps))
    mean, invstd = stats
    alpha = invstd * bn.weight.to(sdt)
    beta = bn.bias.to(sdt) - mean * alpha
    beta, alpha = beta.to(x.dtype)[:, None, None], alpha.to(x.dtype)[:, None, None]
    y = torch.addcmul(beta, x, alpha, out=x) if inplace else torch.addcmul(beta, x, alpha)
    y = y.relu_()
    return y, mean, invstd
