"""PIQE (Venkatanath et al. 2015), the second no-reference score of the real-world sets (docs/method.md §5).

The Perception-based Image Quality Evaluator scores block-wise distortion (noise, blockiness, blur) and
needs no trained model; it is computed by the optional ``pypiqe`` package (MATLAB ``piqe``'s port), which
``make metric-weights`` installs pinned and hash-checked.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .images import ImageLike, check_crop, crop_border, to_levels

__all__ = ["piqe", "require_pypiqe"]


def require_pypiqe() -> Callable[[np.ndarray], tuple]:
    """``pypiqe.piqe``; a ValueError naming the install when the package (or OpenCV) is missing."""
    try:
        from pypiqe import piqe as reference
    except ImportError:
        raise ValueError("metric piqe needs the pypiqe package and OpenCV, which `make metric-weights` installs "
                         "(pinned and hash-checked); or leave piqe out of --metrics") from None
    return reference


def piqe(images: ImageLike, *, crop: int = 0) -> Tensor:
    """PIQE per image [B] (float64, lower is better, 0–100) of the uint8 RGB image after ``crop`` border
    pixels (grey images as they are)."""
    reference = require_pypiqe()
    levels = to_levels(images)
    height, width = levels.shape[-2:]
    crop = check_crop(crop, height, width, minimum=16)
    batch = crop_border(levels, crop).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    scores = [float(reference(image if image.shape[-1] == 3 else image[..., 0])[0]) for image in batch]
    return torch.tensor(scores, dtype=torch.float64)
