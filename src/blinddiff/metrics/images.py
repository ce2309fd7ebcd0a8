"""What every image metric does first (docs/method.md §5): uint8 levels, the border crop, the Y channel.

Image inputs: float tensors ``[B, C, H, W]`` / ``[C, H, W]`` / ``[H, W]`` in [0, 1] (clamped and rounded
to uint8 levels), uint8 tensors, or numpy arrays ``[H, W]``, ``[H, W, C]`` or ``[B, H, W, C]`` (uint8,
or float in [0, 1]); C is 1 (grey) or 3 (RGB). MPS inputs are evaluated on the CPU (no float64 there).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch import Tensor

__all__ = ["ImageLike", "LUMA", "check_crop", "crop_border", "prepare_pair", "rgb_to_y", "to_levels"]

ImageLike = Tensor | np.ndarray

# BT.601 luma on 0…255 for RGB in [0, 1] as (offset, weights). "studio" ("MATLAB rgb2ycbcr", the
# paper's tables): Y = 16 + 65.481 R + 128.553 G + 24.966 B ∈ [16, 235]; "full": 255 · (0.299 R
# + 0.587 G + 0.114 B) ∈ [0, 255], on which the published Bicubic rows were computed.
_LUMA_COEFFICIENTS = {"studio": (16.0, (65.481, 128.553, 24.966)),
                      "full": (0.0, (0.299 * 255, 0.587 * 255, 0.114 * 255))}
LUMA = tuple(_LUMA_COEFFICIENTS)


def to_levels(images: ImageLike, name: str = "images") -> Tensor:
    """Images as a float64 tensor [B, C, H, W] of integer levels 0…255 (the saved uint8 image).

    Float inputs are clamped to [0, 1] and rounded as ``round(255·x)`` in their own precision
    (float32 for half types), as BasicSR's ``tensor2img`` does before metrics are computed.
    """
    if isinstance(images, np.ndarray):
        array = images
        if array.ndim == 2:
            array = array[None, :, :, None]
        elif array.ndim == 3:
            array = array[None]
        elif array.ndim != 4:
            raise ValueError(f"{name}: numpy images must be [H, W], [H, W, C] or [B, H, W, C], "
                             f"got shape {array.shape}")
        if array.dtype == np.bool_:
            raise ValueError(f"{name}: boolean arrays are not images; use uint8 or float in [0, 1]")
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)
    elif isinstance(images, Tensor):
        tensor = images.detach()
        if tensor.ndim == 2:
            tensor = tensor[None, None]
        elif tensor.ndim == 3:
            tensor = tensor[None]
        elif tensor.ndim != 4:
            raise ValueError(f"{name}: tensor images must be [B, C, H, W], [C, H, W] or [H, W], "
                             f"got shape {tuple(tensor.shape)}")
    else:
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, "
                         f"got {type(images).__name__}")
    if tensor.shape[1] not in (1, 3):
        raise ValueError(f"{name} must have 1 (grey) or 3 (RGB) channels, got shape "
                         f"{tuple(tensor.shape)} as [B, C, H, W]; numpy images are channels-last")
    if tensor.device.type == "mps":  # no float64 there: evaluate on the CPU
        tensor = tensor.cpu()
    if tensor.dtype == torch.uint8:
        return tensor.to(torch.float64)
    if not tensor.is_floating_point():
        raise ValueError(f"{name} has dtype {tensor.dtype}; use uint8 (0…255) or float in [0, 1]")
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.float()
    return torch.round(tensor.clamp(0, 1) * 255).to(torch.float64)


def check_crop(crop: object, height: int, width: int, minimum: int = 1) -> int:
    """The border crop of every metric (the scale, for the paper), checked against the image size."""
    if isinstance(crop, bool) or not isinstance(crop, numbers.Integral) or crop < 0:
        raise ValueError(f"crop {crop!r} is invalid; use an integer ≥ 0 (the scale, for the paper)")
    crop = int(crop)
    if min(height, width) - 2 * crop < minimum:
        raise ValueError(f"crop {crop} leaves less than {minimum} pixel(s) of a {height}×{width} "
                         f"image; use a smaller crop or larger images")
    return crop


def crop_border(images: Tensor, crop: int) -> Tensor:
    """`crop` pixels removed at every border of [..., H, W]."""
    if not crop:
        return images
    return images[..., crop:images.shape[-2] - crop, crop:images.shape[-1] - crop]


def rgb_to_y(images: Tensor, *, data_range: float = 1.0, luma: str = "studio") -> Tensor:
    """Y of ITU-R BT.601 YCbCr as MATLAB's ``rgb2ycbcr`` (docs/method.md §5), unrounded.

    ``images`` [..., 3, H, W] floating RGB in [0, ``data_range``] → [..., 1, H, W] on the same
    scale: with r, g, b = RGB / data_range, Y = (16 + 65.481 r + 128.553 g + 24.966 b) / 255 ·
    data_range, i.e. Y ∈ [16, 235] for ``data_range=255`` and [16/255, 235/255] for 1.
    ``luma="full"``: Y = (0.299 r + 0.587 g + 0.114 b) · data_range, over the whole range.
    """
    if not isinstance(images, Tensor) or images.ndim < 3 or images.shape[-3] != 3:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"rgb_to_y needs an RGB tensor [..., 3, H, W], got {got}")
    if not images.is_floating_point():
        raise ValueError(f"rgb_to_y needs a floating tensor, got {images.dtype}; call .double()")
    if not (isinstance(data_range, numbers.Real) and data_range > 0):
        raise ValueError(f"data_range {data_range!r} is invalid; use 1.0 or 255.0")
    if luma not in _LUMA_COEFFICIENTS:
        raise ValueError(f"luma {luma!r} is invalid; use 'studio' (16…235, the paper's) or 'full'")
    offset, coefficients = _LUMA_COEFFICIENTS[luma]
    weights = torch.tensor(coefficients, dtype=images.dtype, device=images.device)
    y = offset + torch.einsum("...chw,c->...hw", images / data_range, weights)
    return (y * (data_range / 255.0)).unsqueeze(-3)


def prepare_pair(sr: ImageLike, hr: ImageLike, crop: int, y_channel: bool, luma: str,
                 minimum: int = 1) -> tuple[Tensor, Tensor]:
    """SR and HR as float64 levels [B, 1 or C, h, w]: equal sizes checked, ``crop`` pixels cut at every
    border (leaving at least ``minimum``), Y taken of RGB when ``y_channel`` (grey images stay as they are)."""
    a, b = to_levels(sr, "sr"), to_levels(hr, "hr")
    if a.shape != b.shape:
        raise ValueError(f"sr {tuple(a.shape)} and hr {tuple(b.shape)} differ (as [B, C, H, W]); "
                         "mod-crop the HR image to the SR size first")
    b = b.to(a.device)
    crop = check_crop(crop, a.shape[-2], a.shape[-1], minimum)
    a, b = crop_border(a, crop), crop_border(b, crop)
    if y_channel and a.shape[1] == 3:
        a, b = rgb_to_y(a, data_range=255.0, luma=luma), rgb_to_y(b, data_range=255.0, luma=luma)
    return a, b
