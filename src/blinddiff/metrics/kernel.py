"""Kernel accuracy (paper Fig. 7b, docs/method.md §5): the L1 distance between kernels and "LR PSNR", the
GT HR image degraded with the estimated kernel versus with the GT kernel.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..degradation import degrade
from .fidelity import psnr

__all__ = ["kernel_l1", "lr_psnr"]


def _as_kernel_batch(kernels: Tensor | np.ndarray, name: str) -> Tensor:
    kernels = torch.as_tensor(kernels)
    if kernels.ndim == 2:
        kernels = kernels[None]
    if kernels.ndim != 3 or not kernels.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor [B, k, k] or [k, k], got "
                         f"{tuple(kernels.shape)} {kernels.dtype}")
    return kernels


def _centre_pad(kernels: Tensor, height: int, width: int) -> Tensor:
    """Zero-pad [B, h, w] to [B, height, width] keeping the centre tap (h//2, w//2) at
    (height//2, width//2), the centre convention of ``blinddiff.kernels``."""
    top, left = height // 2 - kernels.shape[-2] // 2, width // 2 - kernels.shape[-1] // 2
    return F.pad(kernels, (left, width - kernels.shape[-1] - left,
                           top, height - kernels.shape[-2] - top))


def kernel_l1(estimated: Tensor | np.ndarray, gt: Tensor | np.ndarray, *,
              reduction: Literal["sum", "mean"] = "sum") -> Tensor:
    """L1 error between kernels per sample [B] (float64): [B, k, k] / [k, k] each, sizes may
    differ — the smaller is centre-padded with zeros to the larger first.

    ``reduction="sum"``: Σ|k̂ − k| (the L1 distance, independent of the padding; in [0, 2] for
    normalised kernels); ``"mean"``: averaged over the taps of the common grid.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction {reduction!r} is invalid; use 'sum' or 'mean'")
    a = _as_kernel_batch(estimated, "estimated").to(torch.float64)
    b = _as_kernel_batch(gt, "gt").to(device=a.device, dtype=torch.float64)
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(f"kernel batch sizes {a.shape[0]} and {b.shape[0]} differ; pass one "
                         "kernel per sample on both sides (or a single shared one)")
    height, width = max(a.shape[-2], b.shape[-2]), max(a.shape[-1], b.shape[-1])
    error = (_centre_pad(a, height, width) - _centre_pad(b, height, width)).abs()
    return error.sum(dim=(-2, -1)) if reduction == "sum" else error.mean(dim=(-2, -1))


@torch.no_grad()
def lr_psnr(hr: Tensor, estimated_kernel: Tensor, gt_kernel: Tensor, scale: int,
            downsample: str = "bicubic", *, y_channel: bool = True, luma: str = "studio") -> Tensor:
    """"LR PSNR" of Fig. 7b per image [B]: PSNR between degrade(hr, k̂) and degrade(hr, k).

    ``hr`` [B, C, H, W] in [0, 1]; kernels [B, k, k] or [k, k] (any, possibly different sizes).
    Both LR images go through the full degradation of docs/method.md §1 (reflect-pad blur, ↓``scale``
    with ``downsample``, uint8 rounding) and are compared as :func:`psnr` does, on Y by default
    (``y_channel=False``: RGB; ``luma`` as there), with no border crop. inf when the kernels give
    the same LR.
    """
    if not isinstance(hr, Tensor) or hr.ndim != 4 or not hr.is_floating_point():
        raise ValueError("lr_psnr needs hr as a floating tensor [B, C, H, W] in [0, 1]")
    estimated = _as_kernel_batch(estimated_kernel, "estimated_kernel")
    target = _as_kernel_batch(gt_kernel, "gt_kernel")
    lr_estimated = degrade(hr, estimated.to(hr.device, hr.dtype), scale, downsample)
    lr_target = degrade(hr, target.to(hr.device, hr.dtype), scale, downsample)
    return psnr(lr_estimated, lr_target, crop=0, y_channel=y_channel, luma=luma)

