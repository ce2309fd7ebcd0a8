"""NIQE (Mittal et al. 2013), the no-reference score of the real-world sets (docs/method.md §5, §6).

BasicSR's MATLAB-faithful formulation (``calculate_niqe(convert_to='y')``): MSCN coefficients of the Y
channel, GGD/AGGD fits on 96×96 blocks at two scales, and the distance to a pristine multivariate
Gaussian read from a parameter file given by path (BasicSR's ``niqe_pris_params.npz``).
"""

from __future__ import annotations

import functools
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import gamma as gamma_function
from torch import Tensor

from ..degradation import matlab_bicubic_resize
from .images import ImageLike, check_crop, crop_border, rgb_to_y, to_levels

__all__ = ["NIQEParams", "load_niqe_params", "niqe", "niqe_features"]

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
    levels = to_levels(images)
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

