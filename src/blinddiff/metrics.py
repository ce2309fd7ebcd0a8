"""Evaluation metrics of BlindDiff, computed as the paper's numbers are (docs/method.md §1 "Metrics", §6).

* **PSNR / SSIM** — exactly the BasicSR convention (``calculate_psnr`` / ``calculate_ssim`` with
  ``crop_border=scale``, ``test_y_channel=True``): the images are first rounded to uint8 (as when
  they are saved to PNG), ``crop`` pixels are cut at every border, the Y channel of ITU-R BT.601
  ("MATLAB rgb2ycbcr", 16…235) is computed from the uint8 values *without rounding*, PSNR uses the
  peak 255 and SSIM the 11×11 Gaussian window (σ 1.5) in 'valid' mode, averaged over the map (and
  over channels when RGB). BasicSR evaluates Y in float32 and we do it in float64; the two agree
  to ~1e-5 dB. ``luma="full"`` uses full-range luma 0.299 R + 0.587 G + 0.114 B (0…255) instead:
  the published "Bicubic" rows of the blind-SR tables (IKC, copied by DAN, DCLS, BlindDiff) are on
  that scale, 20·log10(255/219) = 1.32 dB below studio-swing Y for the same images (docs/method.md §5).
* **NIQE** — no-reference quality (Mittal et al. 2013) in BasicSR's MATLAB-faithful formulation,
  with the pristine model read from a parameter file given by path.
* **LPIPS / DISTS** — computed by the pretrained networks of ``blinddiff.perceptual``.
* **FID** — Fréchet distance of Inception pool features; features may be pre-computed, or the
  optional ``pytorch_fid`` InceptionV3 is used with a local weight file (nothing is downloaded).
* **Kernel accuracy** (Fig. 7) — L1 distance between kernels and "LR PSNR": the GT HR image
  degraded with the estimated kernel versus with the GT kernel.

Image inputs (all image metrics): float tensors ``[B, C, H, W]`` / ``[C, H, W]`` in [0, 1]
(clamped and rounded to uint8 levels first), uint8 tensors, or numpy arrays ``[H, W]``,
``[H, W, C]`` or ``[B, H, W, C]`` (uint8, or float in [0, 1]); C is 1 (grey) or 3 (RGB).
Per-image metrics return a float64 tensor ``[B]`` on the input's device (the CPU for MPS inputs,
which lack float64).
"""

from __future__ import annotations

import functools
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from scipy.special import gamma as gamma_function
from torch import Tensor, nn

from .checkpoint import unreadable_torch_file
from .degradation import check_scale, degrade, matlab_bicubic_resize
from .fileio import read_rgb
from .perceptual import PERCEPTUAL_METRICS, check_crop, crop_border

if TYPE_CHECKING:
    from .perceptual import DISTS, LPIPS

__all__ = [
    "LUMA",
    "ALL_METRICS",
    "METRIC_NAMES",
    "MetricSuite",
    "NIQEParams",
    "PERCEPTUAL_METRICS",
    "build_metric_suite",
    "evaluate_pair",
    "feature_statistics",
    "fid_from_features",
    "fid_from_images",
    "frechet_distance",
    "kernel_l1",
    "load_niqe_params",
    "lr_psnr",
    "niqe",
    "niqe_features",
    "piqe",
    "psnr",
    "rgb_to_y",
    "ssim",
]

ImageLike = Tensor | np.ndarray

METRIC_NAMES: tuple[str, ...] = ("psnr", "ssim", "lpips_vgg", "lpips_alex", "dists", "niqe", "piqe",
                                  "kernel_l1", "lr_psnr")
"""Names accepted by :func:`evaluate_pair`."""

# BT.601 luma on 0…255 for RGB in [0, 1] as (offset, weights). "studio" ("MATLAB rgb2ycbcr", the
# paper's tables): Y = 16 + 65.481 R + 128.553 G + 24.966 B ∈ [16, 235]; "full": 255 · (0.299 R
# + 0.587 G + 0.114 B) ∈ [0, 255], on which the published Bicubic rows were computed.
_LUMA_COEFFICIENTS = {"studio": (16.0, (65.481, 128.553, 24.966)),
                      "full": (0.0, (0.299 * 255, 0.587 * 255, 0.114 * 255))}
LUMA = tuple(_LUMA_COEFFICIENTS)

_SSIM_WINDOW_SIZE = 11
_SSIM_WINDOW_SIGMA = 1.5


# --------------------------------------------------------------------------------------------
# Image conversion: uint8 levels, border crop, Y channel
# --------------------------------------------------------------------------------------------


def _to_levels(images: ImageLike, name: str = "images") -> Tensor:
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


def _prepare_pair(sr: ImageLike, hr: ImageLike, crop: int, y_channel: bool, luma: str,
                  minimum: int = 1) -> tuple[Tensor, Tensor]:
    a, b = _to_levels(sr, "sr"), _to_levels(hr, "hr")
    if a.shape != b.shape:
        raise ValueError(f"sr {tuple(a.shape)} and hr {tuple(b.shape)} differ (as [B, C, H, W]); "
                         "mod-crop the HR image to the SR size first")
    b = b.to(a.device)
    crop = check_crop(crop, a.shape[-2], a.shape[-1], minimum)
    a, b = crop_border(a, crop), crop_border(b, crop)
    if y_channel and a.shape[1] == 3:
        a, b = rgb_to_y(a, data_range=255.0, luma=luma), rgb_to_y(b, data_range=255.0, luma=luma)
    return a, b


# --------------------------------------------------------------------------------------------
# PSNR and SSIM (docs/method.md §5: uint8, Y channel, `scale` pixels cropped)
# --------------------------------------------------------------------------------------------


def psnr(sr: ImageLike, hr: ImageLike, *, crop: int = 0, y_channel: bool = True,
         data_range: float = 255.0, luma: str = "studio") -> Tensor:
    """PSNR per image [B] (float64, inf for identical images), BasicSR's ``calculate_psnr``.

    Both images are rounded to uint8, ``crop`` pixels removed at each border, then the MSE is
    taken over Y (``y_channel`` and RGB, ``luma`` as :func:`rgb_to_y`; grey images are used as
    they are) or over all channels, with peak ``data_range`` on the 0…255 scale.
    """
    if not (isinstance(data_range, numbers.Real) and data_range > 0):
        raise ValueError(f"data_range {data_range!r} is invalid; use 255.0 (uint8 peak)")
    a, b = _prepare_pair(sr, hr, crop, y_channel, luma)
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
    a, b = _prepare_pair(sr, hr, crop, y_channel, luma, minimum=_SSIM_WINDOW_SIZE)
    return _ssim_levels(a, b)


# --------------------------------------------------------------------------------------------
# NIQE (no-reference, for the real-world sets)
# --------------------------------------------------------------------------------------------

_NIQE_KEYS = ("mu_pris_param", "cov_pris_param", "gaussian_window")
_NIQE_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))  # horizontal, vertical, two diagonals


@dataclass(frozen=True)
class NIQEParams:
    """Pristine multivariate-Gaussian model of NIQE: feature mean [D], covariance [D, D] and the
    local-statistics window [k, k] (BasicSR's ``niqe_pris_params.npz``: D = 36, k = 7)."""

    mu: np.ndarray
    cov: np.ndarray
    window: np.ndarray


def load_niqe_params(path: str | os.PathLike) -> NIQEParams:
    """Read a NIQE pristine-parameter ``.npz`` with keys ``mu_pris_param`` [1, D],
    ``cov_pris_param`` [D, D] and ``gaussian_window`` [k, k] (BasicSR's file format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"NIQE pristine parameters not found: {path}. Pass --niqe-params PATH, e.g. "
            "../shared/weights/niqe/niqe_pris_params.npz (BasicSR's "
            "basicsr/metrics/niqe_pris_params.npz)")
    with np.load(path) as data:
        missing = [key for key in _NIQE_KEYS if key not in data.files]
        if missing:
            raise ValueError(f"{path} lacks {missing}; a NIQE parameter file holds {_NIQE_KEYS}")
        mu = np.asarray(data["mu_pris_param"], dtype=np.float64).reshape(-1)
        cov = np.asarray(data["cov_pris_param"], dtype=np.float64)
        window = np.asarray(data["gaussian_window"], dtype=np.float64)
    dim = mu.shape[0]
    if cov.shape != (dim, dim) or dim % 2:
        raise ValueError(f"{path}: mu has {dim} entries but cov is {cov.shape}; expected an even "
                         "number D of features and a D×D covariance")
    if window.ndim != 2 or window.shape[0] % 2 == 0 or window.shape[1] % 2 == 0:
        raise ValueError(f"{path}: gaussian_window must be a 2-D odd-sized window, got "
                         f"{window.shape}")
    return NIQEParams(mu=mu, cov=cov, window=window)


@functools.lru_cache(maxsize=4)
def _aggd_grid(device: torch.device) -> tuple[Tensor, Tensor]:
    """Shape grid 0.2:0.001:10 and its ratio Γ(2/α)² / (Γ(1/α) Γ(3/α)) (Mittal et al. Eq. 7)."""
    alphas = np.arange(0.2, 10.001, 0.001)
    ratio = gamma_function(2 / alphas) ** 2 / (gamma_function(1 / alphas)
                                                * gamma_function(3 / alphas))
    return (torch.from_numpy(alphas).to(device), torch.from_numpy(ratio).to(device))


def _gamma_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    return torch.exp(torch.lgamma(numerator) - torch.lgamma(denominator))


def _fit_aggd(samples: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Moment-matching AGGD fit over the last dim: shape α (grid search), left and right scales.

    A side with no samples gives NaN scales, like the reference (such blocks are left out of the
    covariance and of the NaN-aware mean).
    """
    squares = samples.square()
    negative, positive = samples < 0, samples > 0
    left_std = torch.sqrt((squares * negative).sum(-1) / negative.sum(-1))
    right_std = torch.sqrt((squares * positive).sum(-1) / positive.sum(-1))
    gamma_hat = left_std / right_std
    r_hat = samples.abs().mean(-1).square() / squares.mean(-1)
    r_hat_norm = r_hat * (gamma_hat**3 + 1) * (gamma_hat + 1) / (gamma_hat**2 + 1) ** 2
    alphas, ratios = _aggd_grid(samples.device)
    alpha = alphas[(ratios - r_hat_norm.unsqueeze(-1)).square().argmin(dim=-1)]
    scale = torch.sqrt(_gamma_ratio(1 / alpha, 3 / alpha))
    return alpha, left_std * scale, right_std * scale


def _block_features(blocks: Tensor) -> Tensor:
    """18 NIQE features of MSCN blocks [N, h, w]: GGD fit of the coefficients, AGGD fits of the
    products of neighbours along 4 orientations (circular shifts, as MATLAB's circshift)."""
    alpha, beta_left, beta_right = _fit_aggd(blocks.flatten(-2))
    features = [alpha, (beta_left + beta_right) / 2]
    for shift in _NIQE_SHIFTS:
        products = blocks * torch.roll(blocks, shifts=shift, dims=(-2, -1))
        alpha, beta_left, beta_right = _fit_aggd(products.flatten(-2))
        mean = (beta_right - beta_left) * _gamma_ratio(2 / alpha, 1 / alpha)
        features += [alpha, mean, beta_left, beta_right]
    return torch.stack(features, dim=-1)


def _mscn(image: Tensor, window: Tensor) -> Tensor:
    """Mean-subtracted contrast-normalised coefficients (Eq. 1) of [1, 1, H, W] on 0…255;
    local statistics by convolution with replicate ('nearest') borders.

    Computed in float32 like BasicSR (float32 image; filtering accumulated in double and stored
    as float32, as scipy.ndimage does): σ = √|E[x²] − μ²| cancels badly in smooth regions, which
    can move an AGGD shape estimate by one grid step. On Set14 baboon float32 gives 5.72958, as
    BasicSR (5.7295763) and MATLAB R2021a (5.72957338) report, where all-float64 gives 5.72996.
    """
    kh, kw = window.shape
    kernel = window.to(torch.float64).flip(0, 1)[None, None]  # true convolution, as ndimage

    def local(x: Tensor) -> Tensor:
        padded = F.pad(x.to(torch.float64), (kw // 2, kw // 2, kh // 2, kh // 2), mode="replicate")
        return F.conv2d(padded, kernel).to(torch.float32)

    image = image.to(torch.float32)
    mu = local(image)
    sigma = torch.sqrt((local(image.square()) - mu.square()).abs())
    return ((image - mu) / (sigma + 1)).to(torch.float64)


def _to_blocks(image: Tensor, block_h: int, block_w: int) -> Tensor:
    """[1, 1, H, W] with H, W multiples of the block size → [N, block_h, block_w]."""
    rows, cols = image.shape[-2] // block_h, image.shape[-1] // block_w
    blocks = image.reshape(rows, block_h, cols, block_w).permute(0, 2, 1, 3)
    return blocks.reshape(rows * cols, block_h, block_w)


def _check_block_size(block_size: object) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) \
            or block_size < 8 or block_size % 2:
        raise ValueError(f"block_size {block_size!r} is invalid; use an even integer ≥ 8 "
                         "(96 is NIQE's standard)")
    return int(block_size)


def niqe_features(luma: Tensor, window: Tensor | np.ndarray, *, block_size: int = 96) -> Tensor:
    """NIQE features [N, 2·18] of one grey/Y image [H, W] on the 0…255 scale.

    The image is cut to whole ``block_size`` blocks (top-left kept); features of each block at
    full scale and of the same block after MATLAB bicubic ×½ (antialiased) are concatenated.
    Use it to build a pristine model: mu = mean, cov = covariance of features of sharp images.
    """
    block_size = _check_block_size(block_size)
    if not isinstance(luma, Tensor) or luma.ndim != 2:
        raise ValueError("niqe_features needs one grey or Y image as a tensor [H, W]")
    rows, cols = luma.shape[0] // block_size, luma.shape[1] // block_size
    if rows * cols < 1:
        raise ValueError(f"image {tuple(luma.shape)} is smaller than one {block_size}×{block_size} "
                         "NIQE block")
    image = luma.to(torch.float64)[None, None, :rows * block_size, :cols * block_size]
    window = torch.as_tensor(window, dtype=torch.float64, device=image.device)
    per_scale = []
    for factor in (1, 2):
        blocks = _to_blocks(_mscn(image, window), block_size // factor, block_size // factor)
        per_scale.append(_block_features(blocks))
        if factor == 1:
            image = matlab_bicubic_resize(image / 255.0, scale=0.5) * 255.0
    return torch.cat(per_scale, dim=-1)


def _niqe_distance(features: np.ndarray, params: NIQEParams) -> float:
    """Eq. 10: distance between the pristine MVG and the MVG fitted to the image's blocks."""
    mu = np.nanmean(features, axis=0)
    complete = features[~np.isnan(features).any(axis=1)]
    cov = np.cov(complete, rowvar=False)
    inverse = np.linalg.pinv((params.cov + cov) / 2)
    diff = params.mu - mu
    return float(np.sqrt(diff @ inverse @ diff))


def niqe(images: ImageLike, params_path: str | os.PathLike, *, crop: int = 0,
         block_size: int = 96) -> Tensor:
    """NIQE per image [B] (float64, lower is better; Mittal et al. 2013), BasicSR's
    ``calculate_niqe(convert_to='y')``, which matches the official MATLAB code.

    The image is rounded to uint8, RGB converted to Y (BT.601, as PSNR), ``crop`` pixels cut at
    each border, Y rounded to integers, then :func:`niqe_features` on non-overlapping
    ``block_size`` blocks (at least 2 are needed for a covariance) and the distance to the
    pristine model in ``params_path`` (see :func:`load_niqe_params`).
    """
    params = load_niqe_params(params_path)
    block_size = _check_block_size(block_size)
    levels = _to_levels(images)
    crop = check_crop(crop, levels.shape[-2], levels.shape[-1])
    levels = crop_border(levels, crop)
    if levels.shape[1] == 3:
        levels = torch.round(rgb_to_y(levels, data_range=255.0))
    blocks = (levels.shape[-2] // block_size) * (levels.shape[-1] // block_size)
    if blocks < 2:
        raise ValueError(f"image {tuple(levels.shape[-2:])} (after crop {crop}) holds {blocks} "
                         f"{block_size}×{block_size} NIQE block(s); at least 2 are needed — use a "
                         "larger image or a smaller block_size")
    if params.mu.shape[0] != 36:
        raise ValueError(f"NIQE parameters have {params.mu.shape[0]} features; this NIQE uses 36")
    scores = [_niqe_distance(niqe_features(image[0], params.window, block_size=block_size)
                             .cpu().numpy(), params) for image in levels]
    return torch.tensor(scores, dtype=torch.float64, device=levels.device)


# --------------------------------------------------------------------------------------------
# FID (docs/method.md §5: InceptionV3 pool features of the whole test set vs its HR images)
# --------------------------------------------------------------------------------------------


def _pypiqe() -> Callable[[np.ndarray], tuple]:
    try:
        from pypiqe import piqe as reference
    except ImportError:
        raise ValueError("metric piqe needs the pypiqe package and OpenCV, which `make metric-weights` installs "
                         "(pinned and hash-checked); or leave piqe out of --metrics") from None
    return reference


def piqe(images: ImageLike, *, crop: int = 0) -> Tensor:
    """PIQE per image [B] (float64, lower is better, 0–100): the Perception-based Image Quality Evaluator
    (Venkatanath et al. 2015), a no-reference score from block-wise distortion (noise, blockiness, blur)
    that needs no trained model, computed by the ``pypiqe`` package (MATLAB ``piqe``'s port) on the
    uint8 RGB image after ``crop`` border pixels."""
    reference = _pypiqe()
    levels = _to_levels(images)
    height, width = levels.shape[-2:]
    crop = check_crop(crop, height, width, minimum=16)
    batch = crop_border(levels, crop).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    scores = [float(reference(image if image.shape[-1] == 3 else image[..., 0])[0]) for image in batch]
    return torch.tensor(scores, dtype=torch.float64)


def feature_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N ≥ 2."""
    if isinstance(features, Tensor):
        features = features.detach().cpu().double().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N ≥ 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     *, eps: float = 1e-6) -> float:
    """Fréchet distance ‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) between two Gaussians (FID).

    As the reference implementation: if the matrix square root is not finite (singular product)
    ``eps`` is added to both diagonals; a complex result whose diagonal imaginary part is below
    1e-3 is taken as real, a larger one raises ValueError.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) \
            or sigma2.shape != (dim, dim):
        raise ValueError(f"inconsistent shapes: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 "
                         f"{mu2.shape}, sigma2 {sigma2.shape}; expected [D] and [D, D]")
    diff = mu1 - mu2
    with np.errstate(all="ignore"):
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(dim) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = np.abs(np.diagonal(covmean).imag).max()
        if imaginary > 1e-3:
            raise ValueError(f"matrix square root has an imaginary component {imaginary:.3g}; "
                             "the covariances are not valid (use more samples)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(sr_features: Tensor | np.ndarray, hr_features: Tensor | np.ndarray) -> float:
    """FID between two pre-computed feature sets [N, D] (e.g. Inception pool features)."""
    return frechet_distance(*feature_statistics(sr_features), *feature_statistics(hr_features))


_FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
_FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                    + _FID_WEIGHTS_NAME)


def _fid_inception(weights: Path) -> nn.Module:
    """pytorch_fid's InceptionV3 (2048-d pool features) with weights read from a local file."""
    try:
        from pytorch_fid import inception as fid_inception
    except ImportError as error:
        raise ImportError("fid_from_images needs the optional package pytorch-fid (with "
                          "torchvision): pip install pytorch-fid; or compute Inception features "
                          "elsewhere and call fid_from_features") from error

    def load_local(*args: object, **kwargs: object) -> dict[str, Tensor]:
        return torch.load(weights, map_location="cpu", weights_only=True)

    # pytorch_fid fetches its weights by URL inside InceptionV3(); serve the local file instead.
    fetch = fid_inception.load_state_dict_from_url
    fid_inception.load_state_dict_from_url = load_local
    try:
        model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    finally:
        fid_inception.load_state_dict_from_url = fetch
    return model.eval()


def _as_image_batches(images: ImageLike | Iterable[ImageLike], name: str) -> Iterable[Tensor]:
    if isinstance(images, (Tensor, np.ndarray)):
        images = [images]
    for item in images:
        batch = _to_levels(item, name) / 255.0
        yield batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch


@torch.no_grad()
def fid_from_images(sr_images: ImageLike | Iterable[ImageLike],
                    hr_images: ImageLike | Iterable[ImageLike], *,
                    inception_weights: str | os.PathLike,
                    device: torch.device | str | None = None, batch_size: int = 16) -> float:
    """FID between two image sets (docs/method.md §5) with pytorch_fid's InceptionV3.

    Each set is a tensor/array batch or an iterable of images or batches of any size (images
    are rounded to uint8 like saved PNGs; pytorch_fid resizes them to 299² itself).
    ``inception_weights`` is the local ``pt_inception-2015-12-05-6726825d.pth``. Raises
    FileNotFoundError / ImportError naming the missing file or package; never downloads.
    """
    weights = Path(inception_weights)
    if not weights.is_file():
        raise FileNotFoundError(f"FID Inception weights not found: {weights}. Download "
                                f"{_FID_WEIGHTS_NAME} (on a machine with internet) from "
                                f"{_FID_WEIGHTS_URL} and pass its local path")
    model = _fid_inception(weights).to(device or "cpu")
    parameter = next(model.parameters())

    def features(images: ImageLike | Iterable[ImageLike], name: str) -> Tensor:
        pooled = []
        for batch in _as_image_batches(images, name):
            for chunk in batch.split(batch_size):
                out = model(chunk.to(parameter.device, parameter.dtype))[0]
                pooled.append(out.flatten(1).double().cpu())
        if not pooled:
            raise ValueError(f"{name}: no images given")
        return torch.cat(pooled)

    return fid_from_features(features(sr_images, "sr_images"), features(hr_images, "hr_images"))


# --------------------------------------------------------------------------------------------
# Kernel accuracy (docs/method.md §5, Fig. 7: kernel L1 and "LR PSNR")
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# All metrics of one SR result (used by the evaluation command)
# --------------------------------------------------------------------------------------------


def evaluate_pair(sr: ImageLike, hr: ImageLike, *, scale: int,
                  metrics: Sequence[str] = ("psnr", "ssim"), crop: int | None = None,
                  y_channel: bool = True, luma: str = "studio", kernel: Tensor | None = None,
                  gt_kernel: Tensor | None = None,
                  networks: Mapping[str, Callable[..., Tensor]] | None = None,
                  niqe_params: str | os.PathLike | None = None,
                  downsample: str = "bicubic") -> dict[str, float]:
    """The requested ``metrics`` (names in :data:`METRIC_NAMES`) of one SR image against its HR.

    ``sr``/``hr``: one image (tensor [C, H, W] / [1, C, H, W] in [0, 1], or uint8 numpy
    [H, W, C]) of equal size. ``crop`` defaults to ``scale`` (the paper's protocol) for PSNR,
    SSIM, LPIPS/DISTS (on the uint8-rounded images) and NIQE (of ``sr``); ``luma`` is the Y of
    PSNR, SSIM and LR-PSNR (:func:`rgb_to_y`). ``kernel_l1`` and ``lr_psnr`` need ``kernel``
    (estimated) and ``gt_kernel``; each of :data:`PERCEPTUAL_METRICS` needs its network in
    ``networks`` (e.g. ``{"lpips_vgg": load_perceptual("lpips_vgg")}``); ``niqe`` needs
    ``niqe_params`` (path).
    """
    unknown = [name for name in metrics if name not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {METRIC_NAMES}")
    scale = check_scale(scale)
    if luma not in LUMA:
        raise ValueError(f"luma {luma!r} is invalid; use one of {LUMA}")
    crop = int(scale) if crop is None else crop
    sr_levels, hr_levels = _to_levels(sr, "sr"), _to_levels(hr, "hr")
    if sr_levels.shape[0] != 1 or sr_levels.shape != hr_levels.shape:
        raise ValueError(f"evaluate_pair takes one SR image and its HR image of the same size, got "
                         f"{tuple(sr_levels.shape)} and {tuple(hr_levels.shape)} as [B, C, H, W]")
    needs_kernels = {"kernel_l1", "lr_psnr"} & set(metrics)
    if needs_kernels and (kernel is None or gt_kernel is None):
        raise ValueError(f"{sorted(needs_kernels)} need both kernel= (estimated) and gt_kernel=")
    networks = networks or {}
    lacking = [name for name in metrics if name in PERCEPTUAL_METRICS and name not in networks]
    if lacking:
        raise ValueError(f"{lacking} need their networks: networks={{name: load_perceptual(name)}}")
    if "niqe" in metrics and niqe_params is None:
        raise ValueError("'niqe' needs niqe_params=PATH, e.g. "
                         "../shared/weights/niqe/niqe_pris_params.npz")
    sr_uint8, hr_uint8 = sr_levels.to(torch.uint8), hr_levels.to(torch.uint8)
    results: dict[str, float] = {}
    for name in metrics:
        if name == "psnr":
            value = psnr(sr_uint8, hr_uint8, crop=crop, y_channel=y_channel, luma=luma)
        elif name == "ssim":
            value = ssim(sr_uint8, hr_uint8, crop=crop, y_channel=y_channel, luma=luma)
        elif name in PERCEPTUAL_METRICS:
            network = networks[name]
            device = next(network.parameters()).device
            with torch.no_grad():
                value = network((sr_levels / 255).to(device), (hr_levels / 255).to(device),
                                crop=crop)
        elif name == "niqe":
            assert niqe_params is not None
            value = niqe(sr_uint8, niqe_params, crop=crop)
        elif name == "piqe":
            value = piqe(sr_uint8, crop=crop)
        elif name == "kernel_l1":
            assert kernel is not None and gt_kernel is not None
            value = kernel_l1(kernel, gt_kernel)
        else:  # lr_psnr
            assert kernel is not None and gt_kernel is not None
            value = lr_psnr(hr_levels / 255, kernel, gt_kernel, scale, downsample,
                            y_channel=y_channel, luma=luma)
        results[name] = float(value.reshape(-1)[0])
    return results


# --------------------------------------------------------------------------------------------
# The metric suite of a command: the metrics asked for, with their networks and files loaded once
# --------------------------------------------------------------------------------------------

KERNEL_METRICS = ("kernel_l1", "lr_psnr")
SET_METRICS = ("fid",)  # one value per test set, not per image
ALL_METRICS = METRIC_NAMES + SET_METRICS
DEFAULT_METRICS = ("psnr", "ssim", "lpips_vgg", "kernel_l1", "lr_psnr")  # lpips_vgg when its weights are installed
LUMA_METRICS = ("psnr", "ssim", "lr_psnr")  # computed on Y, so they depend on the luma


@dataclass
class MetricSuite:
    """The metrics asked for, with what they need loaded once (LPIPS/DISTS networks, NIQE and FID files)."""

    names: tuple[str, ...]
    networks: dict[str, LPIPS | DISTS] = field(default_factory=dict)  # metric name → network
    luma: str = "studio"  # Y of PSNR/SSIM/LR-PSNR: "studio" (16–235, the paper's) or "full"
    niqe_params: Path | None = None
    fid_weights: Path | None = None
    device: torch.device = torch.device("cpu")

    @property
    def image_metrics(self) -> tuple[str, ...]:
        return tuple(name for name in self.names if name not in SET_METRICS)

    @property
    def needs_kernels(self) -> bool:
        return any(name in KERNEL_METRICS for name in self.names)

    def without_kernel_metrics(self) -> MetricSuite:
        """For methods without an estimated kernel (the baselines)."""
        return replace(self, names=tuple(n for n in self.names if n not in KERNEL_METRICS))

    def score(self, sr: np.ndarray, hr: np.ndarray, *, scale: int, downsample: str,
              kernel: np.ndarray | None = None, gt_kernel: np.ndarray | None = None,
              names: Sequence[str] | None = None) -> dict[str, float]:
        """Per-image metrics (docs/method.md §5) of a uint8 SR [H, W, 3] against its HR."""
        names = tuple(self.image_metrics if names is None else names)
        return evaluate_pair(sr, hr, scale=scale, metrics=names, networks=self.networks, luma=self.luma,
                             niqe_params=self.niqe_params, downsample=downsample,
                             kernel=None if kernel is None else torch.as_tensor(kernel, dtype=torch.float32),
                             gt_kernel=None if gt_kernel is None else torch.as_tensor(gt_kernel, dtype=torch.float32))


def _installed(name: str) -> bool:
    from .perceptual import installed_weights

    try:
        installed_weights(name)  # type: ignore[arg-type]
    except FileNotFoundError:
        return False
    return True


def parse_metrics(text: str | Sequence[str] | None, lpips_net: str = "vgg") -> tuple[str, ...]:
    """``"psnr,ssim"`` or a sequence → validated names (no duplicates; ``lpips`` stands for
    ``lpips_<lpips_net>``); None → the defaults, LPIPS-VGG only if its weights are installed."""
    if text is None:
        return tuple(name for name in DEFAULT_METRICS if name != "lpips_vgg" or _installed("vgg"))
    items = [part.strip() for part in (text.split(",") if isinstance(text, str) else text) if part.strip()]
    items = [f"lpips_{lpips_net}" if name == "lpips" else name for name in items]
    unknown = [name for name in items if name not in ALL_METRICS]
    if unknown or not items:
        raise ValueError(f"--metrics {text!r}: unknown or empty {unknown}; choose from lpips,"
                         f"{','.join(ALL_METRICS)}")
    return tuple(dict.fromkeys(items))


def build_metric_suite(metrics: str | Sequence[str] | None = None, *, lpips_backbone: str | None = None,
                       lpips_linear: str | None = None, lpips_net: str = "vgg", luma: str = "studio",
                       niqe_params: str | None = None, fid_weights: str | None = None,
                       device: torch.device | str = "cpu") -> MetricSuite:
    """Validate the metric names and load what they need; fails early, naming a missing file.

    ``metrics=None``: PSNR, SSIM, LPIPS-VGG (when installed), kernel L1, LR-PSNR, plus LPIPS-``lpips_net``
    / NIQE / FID when their files are given. LPIPS and DISTS use the weights installed by ``make
    metric-weights``; ``lpips_backbone`` + ``lpips_linear`` (torchvision and official LPIPS files)
    replace them for ``lpips_<lpips_net>``. NIQE and FID need their local files.
    """
    from .perceptual import LPIPS, load_perceptual

    if lpips_net not in ("vgg", "alex"):
        raise ValueError(f"--lpips-net {lpips_net!r} is invalid; use vgg (the paper's) or alex")
    if luma not in LUMA:
        raise ValueError(f"--luma {luma!r} is invalid; use one of {', '.join(LUMA)}")
    if bool(lpips_backbone) != bool(lpips_linear):
        raise ValueError("give both --lpips-backbone and --lpips-linear (torchvision and LPIPS v0.1 files), or "
                         "neither for the installed weights")
    names = list(parse_metrics(metrics, lpips_net))
    if metrics is None:
        names += [name for name, given in ((f"lpips_{lpips_net}", lpips_backbone), ("niqe", niqe_params),
                                           ("fid", fid_weights)) if given and name not in names]
    device = torch.device(device)
    suite = MetricSuite(tuple(names), luma=luma, device=device)
    for name in PERCEPTUAL_METRICS:
        if name not in names:
            continue
        if lpips_backbone and lpips_linear and name == f"lpips_{lpips_net}":
            try:
                network: torch.nn.Module = LPIPS.from_weights(lpips_backbone, lpips_linear, net=lpips_net)
            except (FileNotFoundError, ValueError):
                raise
            except Exception as err:  # a damaged or malicious file: name both, never suggest unpickling
                raise unreadable_torch_file(f"--lpips-backbone {lpips_backbone} or --lpips-linear {lpips_linear}",
                                            err) from None
        else:
            network = load_perceptual(name)  # FileNotFoundError naming `make metric-weights`
        suite.networks[name] = network.to(device)
    if "niqe" in names:
        if not niqe_params:
            raise ValueError("metric niqe needs --niqe-params PATH (e.g. ../shared/weights/niqe/niqe_pris_params.npz)")
        try:
            load_niqe_params(niqe_params)  # raises FileNotFoundError naming the file
        except (FileNotFoundError, ValueError):
            raise
        except Exception as err:  # not an .npz at all (a .npy, text, a damaged archive)
            raise ValueError(f"--niqe-params {niqe_params} is not a NIQE parameter .npz ({type(err).__name__}: "
                             f"{err}); pass BasicSR's niqe_pris_params.npz") from None
        suite.niqe_params = Path(niqe_params)
    if "piqe" in names:
        _pypiqe()  # fails now, naming the install, not after the first method has run
    if "fid" in names:
        if not fid_weights:
            raise ValueError("metric fid needs --fid-weights PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
        if not Path(fid_weights).is_file():
            raise FileNotFoundError(f"FID Inception weights not found: {fid_weights}; pass the local "
                                    "pt_inception-2015-12-05-6726825d.pth")
        try:
            import pytorch_fid  # noqa: F401
        except ImportError:
            raise ValueError("metric fid needs the optional package pytorch-fid (pip install pytorch-fid); "
                             "or leave fid out of --metrics") from None
        suite.fid_weights = Path(fid_weights)
    return suite


def set_fid(suite: MetricSuite, sr_paths: Sequence[Path], hr_paths: Sequence[Path]) -> float | None:
    """FID of the SR images against the HR of each case (docs/method.md §1: over the whole test set)."""
    if suite.fid_weights is None or len(sr_paths) < 2:
        return None
    return fid_from_images((read_rgb(p) for p in sr_paths), (read_rgb(p) for p in hr_paths),
                           inception_weights=suite.fid_weights, device=suite.device)
