"""ZCA whitening of the Wide ResNet code's CIFAR data (``--normalize zca``).

szagoruyko/wide-residual-networks ``train.lua`` defaults to ``datasets/cifar10_whitened.t7``; its
README says the whitened sets were made with pylearn2's ``make_cifar10_gcn_whitened.py``:

1. global contrast normalisation of each image (``global_contrast_normalize(X, scale=55)``): subtract
   the image's mean over all its C*H*W values, then scale the image vector to L2 norm 55;
2. ZCA (``preprocessing.ZCA()``, fitted on the training split only, ``can_fit=False`` for test):
   subtract the per-feature training mean, covariance ``X^T X / N + filter_bias * I`` with
   ``filter_bias = 0.1``, ``P = V diag(1 / sqrt(eigenvalues)) V^T``; every split becomes
   ``(gcn(x) - mean) @ P``.

So the whitened training data has covariance ``C (C + 0.1 I)^-1``: the identity on the directions
whose variance is well above 0.1, less on the faint ones, and 0 along the constant image that
contrast normalisation removed.
"""

from __future__ import annotations

import torch

GCN_SCALE = 55.0  # pylearn2 make_cifar10_gcn_whitened.py: CIFAR10(..., gcn=55.)
FILTER_BIAS = 0.1  # pylearn2 preprocessing.ZCA default filter_bias
_CHUNK = 4096


def global_contrast_normalize(x: torch.Tensor, scale: float = GCN_SCALE, min_divisor: float = 1e-8) -> torch.Tensor:
    """Rows of ``x`` (N, D) minus their mean, scaled to L2 norm ``scale`` (float64; rows of norm
    below ``min_divisor * scale`` are only centred, as pylearn2's ``global_contrast_normalize``)."""
    x = x.double()
    x = x - x.mean(1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True) / scale
    return x / torch.where(norm < min_divisor, torch.ones_like(norm), norm)


def fit_zca(images: torch.Tensor, filter_bias: float = FILTER_BIAS) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), P (D, D)) of pylearn2's ZCA fitted on the contrast-normalised ``images`` (N, C, H, W)."""
    n, d = images.shape[0], images[0].numel()
    flat = images.reshape(n, d)
    mean = torch.zeros(d, dtype=torch.float64)
    for i in range(0, n, _CHUNK):
        mean += global_contrast_normalize(flat[i:i + _CHUNK]).sum(0)
    mean /= n
    cov = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, n, _CHUNK):
        c = global_contrast_normalize(flat[i:i + _CHUNK]) - mean
        cov += c.T @ c
    cov = cov / n + filter_bias * torch.eye(d, dtype=torch.float64)
    eigval, eigvec = torch.linalg.eigh(cov)
    return mean, (eigvec * eigval.rsqrt()) @ eigvec.T


def apply_zca(images: torch.Tensor, mean: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``(gcn(x) - mean) @ P`` for each image of ``images`` (N, C, H, W) -> float32 of the same shape."""
    n = images.shape[0]
    flat = images.reshape(n, -1)
    out = torch.empty(flat.shape, dtype=torch.float32)
    for i in range(0, n, _CHUNK):
        out[i:i + _CHUNK] = ((global_contrast_normalize(flat[i:i + _CHUNK]) - mean) @ p).float()
    return out.view(images.shape)
