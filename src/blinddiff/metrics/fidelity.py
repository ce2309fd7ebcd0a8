"""PSNR and SSIM, exactly the BasicSR convention of the paper's tables (docs/method.md §5).

``calculate_psnr`` / ``calculate_ssim`` with ``crop_border=scale``, ``test_y_channel=True``: the images are
first rounded to uint8 (as when they are saved to PNG), ``crop`` pixels are cut at every border, the Y
channel of ITU-R BT.601 ("MATLAB rgb2ycbcr", 16…235) is computed from the uint8 values *without
rounding*, PSNR uses the peak 255 and SSIM the 11×11 Gaussian window (σ 1.5) in 'valid' mode, averaged
over the map (and over channels when RGB). BasicSR evaluates Y in float32 and we do it in float64; the
two agree to ~1e-5 dB. ``luma="full"`` uses full-range luma 0.299 R + 0.587 G + 0.114 B (0…255) instead:
the published "Bicubic" rows of the blind-SR tables (IKC, copied by DAN, DCLS, BlindDiff) are on that
scale, 20·log10(255/219) = 1.32 dB below studio-swing Y for the same images.
"""

from __future__ import annotations

import functools
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from .images import ImageLike, prepare_pair

__all__ = ["psnr", "ssim"]

_SSIM_WINDOW_SIZE = 11
_SSIM_WINDOW_SIGMA = 1.5


def psnr(sr: ImageLike, hr: ImageLike, *, crop: int = 0, y_channel: bool = True,
         data_range: float = 255.0, luma: str = "studio") -> Tensor:
    """PSNR per image [B] (float64, inf for identical images), BasicSR's ``calculate_psnr``.

    Both images are rounded to uint8, ``crop`` pixels removed at each border, then the MSE is
    taken over Y (``y_channel`` and RGB, ``luma`` as :func:`.images.rgb_to_y`; grey images are used as
    they are) or over all channels, with peak ``data_range`` on the 0…255 scale.
    """
    if not (isinstance(data_range, numbers.Real) and data_range > 0):
        raise ValueError(f"data_range {data_range!r} is invalid; use 255.0 (uint8 peak)")
    a, b = prepare_pair(sr, hr, crop, y_channel, luma)
    mse = (a - b).square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(float(data_range) ** 2 / mse)  # mse = 0 → inf


@functools.lru_cache(maxsize=8)
def _gaussian_window(size: int, sigma: float) -> Tensor:
    """size×size outer product of the normalised 1-D Gaussian (as OpenCV's getGaussianKernel)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-coords.square() / (2 * sigma**2))
    taps = taps / taps.sum()
    return torch.outer(taps, taps)


def _ssim_levels(a: Tensor, b: Tensor) -> Tensor:
    """Mean SSIM map per image of float64 [B, C, H, W] images on the 0…255 scale ('valid')."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    channels = a.shape[1]
    window = _gaussian_window(_SSIM_WINDOW_SIZE, _SSIM_WINDOW_SIGMA).to(a.device, a.dtype)
    window = window.expand(channels, 1, _SSIM_WINDOW_SIZE, _SSIM_WINDOW_SIZE)

    def local_mean(x: Tensor) -> Tensor:
        return F.conv2d(x, window, groups=channels)

    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mu_a.square()
    var_b = local_mean(b * b) - mu_b.square()
    cov_ab = local_mean(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / (
        (mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(1, 2, 3))  # equal-sized maps: = mean over channels of map means


def ssim(sr: ImageLike, hr: ImageLike, *, crop: int = 0, y_channel: bool = True,
         luma: str = "studio") -> Tensor:
    """SSIM per image [B] (float64), BasicSR's ``calculate_ssim`` (Wang et al. 2004).

    uint8 rounding, border crop and Y as in :func:`psnr`; 11×11 Gaussian window σ 1.5,
    C1 = (0.01·255)², C2 = (0.03·255)², no padding ('valid'), the mean of the SSIM map,
    averaged over channels for RGB with ``y_channel=False``. Needs ≥ 11×11 pixels after the crop.
    """
    a, b = prepare_pair(sr, hr, crop, y_channel, luma, minimum=_SSIM_WINDOW_SIZE)
    return _ssim_levels(a, b)
