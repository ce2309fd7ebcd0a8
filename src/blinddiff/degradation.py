"""Degradation model of BlindDiff (docs/method.md §1): y = ((x ⊛ k)↓s + n), rounded to 8 bits.

This is the forward model the whole method is built around: training pairs are made with it,
and the reverse process (docs/method.md §4, the kernel-aware gradient) back-propagates through
:func:`blur` and :func:`downsample` at every step. All functions are pure, batched tensor
functions on images ``[B, C, H, W]`` in [0, 1]; they work on any device and floating dtype
and are differentiable with respect to images *and* kernels (except :func:`quantize`).

Kernels come from elsewhere (``blinddiff.kernels``): ``[B, kh, kw]`` (one per sample) or
``[kh, kw]`` (shared), non-negative, summing to 1, applied identically to every channel.

Conventions (following the authors' code, which blurs with ``F.conv2d``):

* **Correlation, not flipped convolution**: ``out[i, j] = Σ_ab x̃[i + a − kh//2, j + b − kw//2]
  · k[a, b]`` where x̃ is the reflect-padded image. Gaussian kernels are symmetric so this does
  not matter for them; motion kernels are not, and this is the convention that matches the
  authors' (and KAIR/DAN's) degradations.
* **Padding**: reflect (``F.pad(mode="reflect")``, edge sample not repeated), ``kh//2`` on the
  top and ``kh − 1 − kh//2`` at the bottom (likewise left/right), i.e. ``k//2`` on each side
  for odd kernels and ``k//2`` / ``k//2 − 1`` for even ones (64×64 motion kernels), so the
  output always keeps H×W.
* **Downsampling**: ``"bicubic"`` = MATLAB ``imresize(·, 1/s, 'bicubic')`` with antialiasing
  (what the authors' code and the DAN/IKC benchmarks do); ``"direct"`` = keep every s-th pixel
  starting at 0 (the paper's Eq. 1).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DOWNSAMPLE_MODES",
    "RESIZE_MODES",
    "STAGES",
    "DegradationOrder",
    "RealDegradation",
    "RealDegraded",
    "add_gaussian_noise",
    "add_poisson_noise",
    "blur",
    "check_scale",
    "degrade",
    "degrade_real",
    "downsample",
    "estimate_noise_level",
    "jpeg",
    "matlab_bicubic_resize",
    "quantize",
    "real_test_degradation",
    "resize",
    "upsample_bicubic",
]

DOWNSAMPLE_MODES = ("bicubic", "direct")
BlurMethod = Literal["auto", "conv", "fft"]

# Measured on a 2-core CPU (benchmarks/degradation_throughput.py, steady state): without
# autograd, grouped conv2d is a little faster than FFT up to about 25×25 kernels (32×3×128²
# patches at 21×21: 6.7 ms vs 7.3 ms) and slower beyond; with autograd FFT wins by far, since
# the weight gradient of a large depthwise conv is slow (forward+backward, 4×3×128² at 21×21:
# 30 ms vs 2.4 ms; 1×3×256² at 64×64: 570 ms vs 3.4 ms).
_CONV_MAX_KERNEL_AREA = 25 * 25


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_images(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [B, C, H, W], "
                         f"got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name} must have shape [B, C, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor in [0, 1], got dtype {images.dtype}; "
                         "convert with images.float() / 255")


def check_scale(scale: object) -> int:
    """Return ``scale`` as an int ≥ 1 (integral floats such as 2.0 are accepted)."""
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        value = float(scale)
        if math.isfinite(value) and value.is_integer() and value >= 1:
            return int(value)
    raise ValueError(f"scale {scale} is invalid; use an integer ≥ 1")


def _check_mode(mode: str) -> str:
    if mode not in DOWNSAMPLE_MODES:
        raise ValueError(f"downsample mode {mode!r} is invalid; use one of {DOWNSAMPLE_MODES}")
    return mode


def _prepare_kernels(kernels: Tensor, images: Tensor) -> Tensor:
    """Check kernels against images; return them as [Bk, kh, kw] (Bk ∈ {1, B}) like images."""
    if not isinstance(kernels, Tensor):
        raise ValueError(f"kernels must be a torch.Tensor [B, k, k] or [k, k], "
                         f"got {type(kernels).__name__}")
    if kernels.ndim == 2:
        kernels = kernels.unsqueeze(0)
    elif kernels.ndim != 3:
        raise ValueError(f"kernels must have shape [B, k, k] or [k, k], got {tuple(kernels.shape)}")
    batch = images.shape[0]
    if kernels.shape[0] not in (1, batch):
        raise ValueError(f"kernel batch size {kernels.shape[0]} does not match image batch size "
                         f"{batch}; pass one kernel per image ([{batch}, k, k]) or a shared [k, k]")
    kh, kw = kernels.shape[-2:]
    height, width = images.shape[-2:]
    top, left = kh // 2, kw // 2
    if kh < 1 or kw < 1 or top >= height or left >= width:
        raise ValueError(f"kernel {kh}×{kw} needs reflect padding {top}×{left}, which must be "
                         f"smaller than the image {height}×{width}; use a larger image or a "
                         "smaller kernel")
    return kernels.to(device=images.device, dtype=images.dtype)


# --------------------------------------------------------------------------------------------
# Blur (docs/method.md §1: reflect padding, same kernel for every channel)
# --------------------------------------------------------------------------------------------


def _reflect_pad(images: Tensor, kh: int, kw: int) -> Tensor:
    top, left = kh // 2, kw // 2
    return F.pad(images, (left, kw - 1 - left, top, kh - 1 - top), mode="reflect")


def _fft_length(n: int) -> int:
    """Smallest m ≥ n whose only prime factors are 2, 3, 5, 7 (fast for pocketfft and cuFFT)."""
    while True:
        m = n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _blur_conv(padded: Tensor, kernels: Tensor, channels: int, stride: int) -> Tensor:
    """Depthwise correlation of a padded batch with grouped ``conv2d`` (valid region only)."""
    batch, _, hp, wp = padded.shape
    weight = kernels.unsqueeze(1)  # [Bk, 1, kh, kw]
    if kernels.shape[0] == 1:  # shared kernel: every channel of every image is one "sample"
        out = F.conv2d(padded.reshape(batch * channels, 1, hp, wp), weight, stride=stride)
    else:  # one group per (image, channel), the image's kernel repeated over its channels
        weight = weight.repeat_interleave(channels, dim=0)
        out = F.conv2d(padded.reshape(1, batch * channels, hp, wp), weight,
                       stride=stride, groups=batch * channels)
    return out.reshape(batch, channels, out.shape[-2], out.shape[-1])


def _blur_fft(padded: Tensor, kernels: Tensor, height: int, width: int) -> Tensor:
    """Same correlation via FFT: circular correlation on a canvas ≥ the padded image is exact on
    the H×W valid region, since no index there wraps around."""
    dtype = padded.dtype
    if dtype in (torch.float16, torch.bfloat16):  # no half-precision FFT on CPU / odd sizes
        padded, kernels = padded.float(), kernels.float()
    size = (_fft_length(padded.shape[-2]), _fft_length(padded.shape[-1]))
    spectrum = torch.fft.rfft2(padded, s=size)
    kernel_spectrum = torch.fft.rfft2(kernels, s=size).unsqueeze(1)  # [Bk, 1, Hf, Wf//2+1]
    out = torch.fft.irfft2(spectrum * kernel_spectrum.conj(), s=size)
    return out[..., :height, :width].to(dtype)


def _resolve_method(method: str, images: Tensor, kernels: Tensor) -> str:
    if method not in ("auto", "conv", "fft"):
        raise ValueError(f"blur method {method!r} is invalid; use 'auto', 'conv' or 'fft'")
    if method != "auto":
        return method
    needs_grad = torch.is_grad_enabled() and (images.requires_grad or kernels.requires_grad)
    small = kernels.shape[-2] * kernels.shape[-1] <= _CONV_MAX_KERNEL_AREA
    return "conv" if small and not needs_grad else "fft"


def _blur(images: Tensor, kernels: Tensor, method: str, stride: int = 1) -> Tensor:
    """Blur and keep every ``stride``-th pixel from 0; conv computes only the kept pixels."""
    _check_images(images)
    kernels = _prepare_kernels(kernels, images)
    method = _resolve_method(method, images, kernels)
    height, width = images.shape[-2:]
    padded = _reflect_pad(images, kernels.shape[-2], kernels.shape[-1])
    if method == "conv":
        return _blur_conv(padded, kernels, images.shape[1], stride)
    out = _blur_fft(padded, kernels, height, width)
    return out[..., ::stride, ::stride] if stride > 1 else out


def blur(images: Tensor, kernels: Tensor, *, method: BlurMethod = "auto") -> Tensor:
    """Blur ``images`` [B, C, H, W] with ``kernels`` [B, kh, kw] or [kh, kw] (x ⊛ k, docs/method.md §1).

    Reflect padding keeps H×W (``k//2`` before, ``k − 1 − k//2`` after, so even kernels are
    supported); the same kernel is applied to every channel; correlation like ``F.conv2d``
    (see the module docstring). ``method``: ``"conv"`` (grouped conv2d), ``"fft"`` (FFT of
    the padded image; equal to 1e-5 in float32) or ``"auto"`` — conv for kernels up to 25×25
    when no gradient is needed, FFT otherwise. Differentiable w.r.t. images and kernels.
    """
    return _blur(images, kernels, method)


# --------------------------------------------------------------------------------------------
# MATLAB-compatible bicubic resize (docs/method.md §1, "bicubic" downsampling)
# --------------------------------------------------------------------------------------------


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = −0.5, as in MATLAB's imresize."""
    absx = np.abs(x)
    absx2, absx3 = absx**2, absx**3
    return ((1.5 * absx3 - 2.5 * absx2 + 1) * (absx <= 1)
            + (-0.5 * absx3 + 2.5 * absx2 - 4 * absx + 2) * ((1 < absx) & (absx <= 2)))


@functools.lru_cache(maxsize=128)
def _bicubic_matrix_np(in_len: int, out_len: int, scale: float) -> np.ndarray:
    """Dense [out_len, in_len] float64 resampling matrix, computed as MATLAB's ``contributions``.

    Antialiasing when shrinking: kernel h(x) = scale·cubic(scale·x) of width 4/scale. Input
    coordinate of output pixel x (1-based): u = x/scale + 0.5·(1 − 1/scale). Weights are
    normalised per output pixel, then out-of-range indices are mirrored symmetrically (edge
    sample included, period 2·in_len) and their weights summed into the matrix.
    """
    kernel_width = 4.0
    if scale < 1:
        kernel_width = kernel_width / scale
    x = np.arange(1, out_len + 1, dtype=np.float64)[:, None]
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kernel_width / 2)
    taps = int(math.ceil(kernel_width)) + 2
    indices = left + np.arange(taps, dtype=np.float64)[None, :]  # 1-based, may be out of range
    distance = u - indices
    weights = scale * _cubic(scale * distance) if scale < 1 else _cubic(distance)
    weights = weights / weights.sum(axis=1, keepdims=True)
    period = 2 * in_len
    folded = np.mod(indices.astype(np.int64) - 1, period)
    folded = np.where(folded < in_len, folded, period - 1 - folded)  # 0-based, mirrored
    matrix = np.zeros((out_len, in_len), dtype=np.float64)
    rows = np.broadcast_to(np.arange(out_len)[:, None], folded.shape)
    np.add.at(matrix, (rows, folded), weights)
    return matrix


@functools.lru_cache(maxsize=256)
def _bicubic_matrix(in_len: int, out_len: int, scale: float,
                    device: torch.device, dtype: torch.dtype) -> Tensor:
    # Never cache an inference tensor: it could not be saved for backward in a later call.
    with torch.inference_mode(False):
        matrix = torch.from_numpy(_bicubic_matrix_np(in_len, out_len, scale))
        return matrix.to(device=device, dtype=dtype)


def matlab_bicubic_resize(images: Tensor, scale: float | None = None,
                          size: tuple[int, int] | None = None) -> Tensor:
    """MATLAB ``imresize(x, scale, 'bicubic')`` (antialiased) of the last two dims (docs/method.md §1).

    Give exactly one of ``scale`` (output ``ceil(in·scale)``, MATLAB's rule, and that scale in
    the kernel) or ``size`` = (H_out, W_out) (per-dimension scale = out/in, as MATLAB derives
    it). Follows current MATLAB step by step: cubic a = −0.5, kernel widened by 1/scale and
    scaled by ``scale`` when shrinking (plain cubic when enlarging), symmetric boundary (very
    old releases clamped indices instead), weights normalised per output pixel, the dimension
    with the smaller scale resized first (rows first on ties). Implemented as two matmuls with
    cached weight matrices computed in float64 (MATLAB accumulates in double; float32 inputs
    agree to float32 rounding); any leading dims, device and float dtype; differentiable
    w.r.t. the input.
    """
    if not isinstance(images, Tensor) or images.ndim < 2 or not images.is_floating_point():
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a floating tensor [..., H, W], got {got}")
    in_h, in_w = images.shape[-2:]
    if (scale is None) == (size is None):
        raise ValueError("give exactly one of scale or size to matlab_bicubic_resize")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) \
                or not math.isfinite(float(scale)) or float(scale) <= 0:
            raise ValueError(f"scale {scale} is invalid; use a positive finite number")
        scales = (float(scale), float(scale))
        out_h, out_w = math.ceil(in_h * scales[0]), math.ceil(in_w * scales[1])
    else:
        assert size is not None
        if len(size) != 2 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
                                     and s >= 1 for s in size):
            raise ValueError(f"size {size} is invalid; use (height, width) positive integers")
        out_h, out_w = int(size[0]), int(size[1])
        scales = (out_h / in_h, out_w / in_w)
    out_sizes = (out_h, out_w)
    in_sizes = (in_h, in_w)
    order = (0, 1) if scales[0] <= scales[1] else (1, 0)
    out = images
    for dim in order:
        if scales[dim] == 1.0 and out_sizes[dim] == in_sizes[dim]:
            continue  # MATLAB's weights are exactly the identity here
        matrix = _bicubic_matrix(in_sizes[dim], out_sizes[dim], scales[dim], images.device,
                                 images.dtype)
        out = torch.matmul(matrix, out) if dim == 0 else torch.matmul(out, matrix.T)
    return out


def upsample_bicubic(images: Tensor, scale: int) -> Tensor:
    """MATLAB bicubic ×``scale`` enlargement (the network's conditioning input ↑y, docs/method.md §2)."""
    scale = check_scale(scale)
    if scale == 1:
        return images
    return matlab_bicubic_resize(images, scale=float(scale))


def _downsample(images: Tensor, scale: int, mode: str) -> Tensor:
    scale, mode = check_scale(scale), _check_mode(mode)
    _check_images(images)
    if scale == 1:
        return images
    if mode == "direct":
        return images[..., ::scale, ::scale]
    return matlab_bicubic_resize(images, scale=1 / scale)


def downsample(images: Tensor, scale: int, mode: str = "bicubic") -> Tensor:
    """↓s of docs/method.md §1: ``"bicubic"`` = MATLAB ``imresize(x, 1/s)`` (output ``ceil(H/s)``),
    ``"direct"`` = ``x[..., ::s, ::s]`` (paper Eq. 1). ``scale`` = 1 returns the input."""
    return _downsample(images, scale, mode)


# --------------------------------------------------------------------------------------------
# Noise and quantisation
# --------------------------------------------------------------------------------------------


def add_gaussian_noise(images: Tensor, sigma: float | Tensor,
                       generator: torch.Generator | None = None) -> Tensor:
    """Add n ~ N(0, σ²) on the [0, 1] scale (docs/method.md §1; σ = 0.02 in the deblurring setting).

    ``sigma``: a float or a [B] tensor (one σ per image). With a ``generator`` the noise is
    drawn on the generator's device and moved to the images', so a CPU generator gives the
    same noise on every device; without one the global RNG of the images' device is used.
    """
    _check_images(images)
    batch = images.shape[0]
    if isinstance(sigma, Tensor):
        if sigma.ndim == 0:
            sigma = sigma.reshape(1)
        if sigma.ndim != 1 or sigma.shape[0] not in (1, batch):
            raise ValueError(f"sigma must be a float or a [B] = [{batch}] tensor, "
                             f"got shape {tuple(sigma.shape)}")
        if bool((sigma < 0).any()):
            raise ValueError(f"sigma must be non-negative, got {sigma.tolist()}")
        sigma = sigma.to(device=images.device, dtype=images.dtype).reshape(-1, 1, 1, 1)
    else:
        if not isinstance(sigma, numbers.Real) or not float(sigma) >= 0:
            raise ValueError(f"sigma {sigma} is invalid; use a non-negative float or a [B] tensor")
        if float(sigma) == 0:
            return images
    draw_dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    device = generator.device if generator is not None else images.device
    noise = torch.randn(images.shape, generator=generator, device=device, dtype=draw_dtype)
    return images + sigma * noise.to(device=images.device, dtype=images.dtype)


NOISE_PATCH = 7  # patch side of estimate_noise_level


def estimate_noise_level(images: Tensor, *, patch: int = NOISE_PATCH, weak_fraction: float = 0.3,
                         max_patches: int = 20000) -> Tensor:
    """Blind estimate of the noise σ [B] (0–255 scale) of images [B, C, H, W] in [0, 1]: the PCA estimator
    of Chen, Zhu & Heng (ICCV 2015) on weak-texture patches (the idea of Liu, Tanaka & Okutomi 2013). Per
    channel, of all patch×patch patches (at most ``max_patches``, evenly strided) the ``weak_fraction`` of
    lowest variance are kept; their covariance has eigenvalues λ₁ ≤ … ≤ λ_d, and the noise variance is the
    mean of the largest set of smallest eigenvalues {λ₁ … λ_m} whose mean is also their median (the
    eigenvalues only noise explains); σ² is averaged over the channels, so grey (luminance) and colour
    noise are both measured. Measured on LR images (docs/results.md, "Real photos"): within 0.5 of white
    Gaussian σ 3–8, ≤ 2 on clean 8-bit images, but about half the level of resized, JPEG-compressed
    (correlated) noise."""
    _check_images(images)
    batch, channels, height, width = images.shape
    if min(height, width) < patch:
        raise ValueError(f"images of {height}×{width} are smaller than the {patch}×{patch} noise-estimation patch")
    x = images.detach().float().reshape(batch * channels, 1, height, width) * 255
    positions = (height - patch + 1) * (width - patch + 1)
    stride = max(1, math.ceil(math.sqrt(positions / max_patches)))
    columns = F.unfold(x, patch, stride=stride)  # [BC, p², L]
    dimension = columns.shape[1]
    keep = min(columns.shape[2], max(4 * dimension, int(weak_fraction * columns.shape[2])))
    weakest = columns.var(dim=1).argsort(dim=1)[:, :keep]
    columns = torch.gather(columns, 2, weakest[:, None, :].expand(-1, dimension, -1))
    centred = columns - columns.mean(dim=2, keepdim=True)
    covariance = centred @ centred.transpose(1, 2) / max(columns.shape[2] - 1, 1)
    eigenvalues = torch.linalg.eigvalsh(covariance.double()).clamp_min(0)  # ascending [BC, d]
    counts = torch.arange(1, dimension + 1, dtype=torch.float64)
    means = torch.cumsum(eigenvalues, dim=1) / counts  # mean of the m smallest
    medians = torch.stack([eigenvalues[:, (m - 1) // 2] if m % 2 else
                           (eigenvalues[:, m // 2 - 1] + eigenvalues[:, m // 2]) / 2
                           for m in range(1, dimension + 1)], dim=1)
    # largest m whose mean does not exceed its median (a noise-only tail is symmetric)
    noise_only = means <= medians + 1e-12
    last = dimension - 1 - torch.argmax(noise_only.flip(1).to(torch.int8), dim=1)
    variance = means.gather(1, last[:, None])[:, 0]
    return variance.reshape(batch, channels).mean(dim=1).sqrt().to(torch.float32)


def _quantize(images: Tensor) -> Tensor:
    return torch.round(images.clamp(0, 1) * 255) / 255


def quantize(images: Tensor) -> Tensor:
    """8-bit quantisation of the LR image: clamp to [0, 1], round(255·y)/255 (docs/method.md §1).
    ``torch.round`` rounds halves to even, like ``numpy.round`` in the authors' code."""
    return _quantize(images)


# --------------------------------------------------------------------------------------------
# The whole forward model
# --------------------------------------------------------------------------------------------


def degrade(hr: Tensor, kernels: Tensor, scale: int, downsample: str = "bicubic",
            noise_sigma: float | Tensor = 0.0, quantize: bool = True,
            generator: torch.Generator | None = None) -> Tensor:
    """y = quantize((hr ⊛ k)↓s + n) — the degradation of docs/method.md §1 (paper Eq. 1).

    ``scale`` = 1 is pure deblurring. With ``downsample="direct"`` the blur is evaluated only
    at the kept pixels when that is cheaper (identical to blur followed by slicing). Output
    size ``ceil(H/s) × ceil(W/s)`` in both modes. ``noise_sigma`` and ``generator`` are passed
    to :func:`add_gaussian_noise`.
    """
    scale, mode = check_scale(scale), _check_mode(downsample)
    if mode == "direct":
        lr = _blur(hr, kernels, "auto", stride=scale)
    else:
        lr = _downsample(_blur(hr, kernels, "auto"), scale, mode)
    if isinstance(noise_sigma, Tensor) or noise_sigma != 0:
        lr = add_gaussian_noise(lr, noise_sigma, generator=generator)
    return _quantize(lr) if quantize else lr


# --------------------------------------------------------------------------------------------
# Real-world degradations (docs/method.md, "Real photos"): Real-ESRGAN's second-order model
# --------------------------------------------------------------------------------------------

STAGES = ("blur", "resize", "noise", "jpeg")
RESIZE_MODES = ("area", "bilinear", "bicubic")


def _check_interval(key: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    """A (lo, hi) pair with low ≤ lo ≤ hi ≤ high, or a one-line error naming the key and the range."""
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or not all(math.isfinite(v) for v in pair) or not low <= pair[0] <= pair[1] <= high:
        raise ValueError(f"{key} {list(value)} is out of range; use [lo, hi] with {low:g} ≤ lo ≤ hi ≤ {high:g}")
    return pair


def _check_probability(key: str, value: float) -> None:
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise ValueError(f"{key} {value!r} is out of range; use a probability in [0, 1]")


def _check_weights(key: str, value: Sequence[float], count: int, names: Sequence[str]) -> None:
    if len(value) != count or not all(math.isfinite(v) and v >= 0 for v in value) or not sum(value) > 0:
        raise ValueError(f"{key} {list(value)} is invalid; give {count} non-negative weights, one per "
                         f"{' / '.join(names)}, not all 0")


@dataclass
class DegradationOrder:
    """One order of the real-world model: blur, random resize, noise, JPEG (Real-ESRGAN, Wang et al. 2021).

    Noise σ is on the 0–255 scale, as Real-ESRGAN and BSRGAN give it; `gaussian_noise_prob` chooses
    Gaussian over Poisson noise, `gray_noise_prob` one noise map for all channels (luminance noise)."""

    stages: tuple[str, ...] = STAGES  # applied in this order (see RealDegradation.shuffle)
    blur_prob: float = 1.0
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # kernels.REAL_KERNEL_KINDS
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.5, 1.5)
    resize_modes: tuple[str, ...] = RESIZE_MODES  # drawn uniformly
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 15.0)  # Gaussian σ, 0–255 scale
    poisson_scale_range: tuple[float, float] = (0.05, 1.5)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[int, int] = (35, 95)

    def check(self, key: str) -> None:
        for stage in self.stages:
            if stage not in STAGES:
                raise ValueError(f"{key}.stages: {stage!r} is not a stage; use some of {', '.join(STAGES)}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"{key}.stages {list(self.stages)} names a stage twice; name each at most once")
        for name in ("blur_prob", "gaussian_noise_prob", "gray_noise_prob"):
            _check_probability(f"{key}.{name}", getattr(self, name))
        from .kernels import REAL_KERNEL_KINDS

        _check_weights(f"{key}.kernel_probs", self.kernel_probs, len(REAL_KERNEL_KINDS), REAL_KERNEL_KINDS)
        _check_weights(f"{key}.resize_probs", self.resize_probs, 3, ("up", "down", "keep"))
        _check_interval(f"{key}.blur_sigma", self.blur_sigma, 0.1, 10.0)
        _check_interval(f"{key}.betag_range", self.betag_range, 0.1, 8.0)
        _check_interval(f"{key}.betap_range", self.betap_range, 0.1, 8.0)
        _check_interval(f"{key}.resize_range", self.resize_range, 0.1, 4.0)
        _check_interval(f"{key}.noise_range", self.noise_range, 0.0, 100.0)
        _check_interval(f"{key}.poisson_scale_range", self.poisson_scale_range, 0.0, 10.0)
        _check_interval(f"{key}.jpeg_range", self.jpeg_range, 1, 100)
        if not self.resize_modes or any(mode not in RESIZE_MODES for mode in self.resize_modes):
            raise ValueError(f"{key}.resize_modes {list(self.resize_modes)} is invalid; use some of "
                             f"{', '.join(RESIZE_MODES)}")


def _second_order() -> DegradationOrder:
    return DegradationOrder(blur_prob=0.8, blur_sigma=(0.2, 1.5), resize_probs=(0.3, 0.4, 0.3),
                            resize_range=(0.7, 1.2), noise_range=(1.0, 10.0), poisson_scale_range=(0.05, 1.0))


@dataclass
class RealDegradation:
    """The real-world degradation model (Real-ESRGAN's second-order pipeline, BSRGAN's shuffle as an option).

    A sample is, with probability `clean_fraction`, degraded by the paper's protocol (isotropic Gaussian
    σ ~ U(0.2, 4), MATLAB bicubic ↓s, 8 bits; docs/method.md §1 setting 1); otherwise by `first`, then (with
    `second_order_prob`) `second`, then the final stage: resize to H/s × W/s (random mode), then a sinc
    filter (prob `final_sinc_prob`) and JPEG (prob `final_jpeg_prob`, quality `final_jpeg_range`) in
    random order, then 8 bits. The kernel head learns the first-order kernel (docs/method.md explains why). `shuffle` draws a new
    order of each order's stages per batch (BSRGAN)."""

    clean_fraction: float = 0.3
    first: DegradationOrder = field(default_factory=DegradationOrder)
    second_order_prob: float = 0.5
    second: DegradationOrder = field(default_factory=_second_order)
    shuffle: bool = False
    final_sinc_prob: float = 0.5
    final_jpeg_prob: float = 1.0
    final_jpeg_range: tuple[int, int] = (35, 95)

    def __post_init__(self) -> None:
        self.check("data.real")

    def check(self, key: str) -> None:
        for name in ("clean_fraction", "second_order_prob", "final_sinc_prob", "final_jpeg_prob"):
            _check_probability(f"{key}.{name}", getattr(self, name))
        _check_interval(f"{key}.final_jpeg_range", self.final_jpeg_range, 1, 100)
        self.first.check(f"{key}.first")
        self.second.check(f"{key}.second")


def real_test_degradation() -> RealDegradation:
    """The held-out synthetic real-world protocol (`make-benchmark --protocol real`): every case real-world
    (no clean fraction), noise σ up to 12 and JPEG quality 35–90 in every stage."""
    orders = {name: replace(order, noise_range=(1.0, min(12.0, order.noise_range[1])), jpeg_range=(35, 90))
              for name, order in (("first", DegradationOrder()), ("second", _second_order()))}
    return RealDegradation(clean_fraction=0.0, final_jpeg_range=(35, 90), **orders)


@dataclass
class RealDegraded:
    """What :func:`degrade_real` returns: LR [B, C, h, w] on the 8-bit grid, the first-order kernel
    [B, k, k], the effective noise level [B] (RMS of LR minus the same chain without noise and JPEG,
    0–255 scale; only with ``measure_noise``) and whether each sample took the clean protocol [B]."""

    lr: Tensor
    kernel: Tensor
    noise_sigma: Tensor | None
    clean: Tensor


def _uniform(generator: torch.Generator | None, batch: int, interval: Sequence[float]) -> Tensor:
    low, high = float(interval[0]), float(interval[1])
    draws = torch.rand(batch, generator=generator, device=_device_of(generator), dtype=torch.float64)
    return (low + (high - low) * draws).cpu()


def _choice(generator: torch.Generator | None, weights: Sequence[float]) -> int:
    total = torch.as_tensor([float(w) for w in weights], dtype=torch.float64)
    u = float(_uniform(generator, 1, (0.0, 1.0))[0])
    return int(torch.searchsorted(torch.cumsum(total / total.sum(), 0), torch.tensor([u], dtype=torch.float64),
                                  right=True).clamp_max(len(weights) - 1))


def _bernoulli(generator: torch.Generator | None, batch: int, p: float) -> Tensor:
    return _uniform(generator, batch, (0.0, 1.0)) < p


def _plan_order(order: DegradationOrder, batch: int, kernel_size: int, shuffle: bool,
                generator: torch.Generator | None) -> list[tuple[str, dict]]:
    """Every random choice of one order, drawn up front so the chain can be replayed without noise."""
    from .kernels import sample_real_kernels

    stages = list(order.stages)
    if shuffle:
        order_of = torch.randperm(len(stages), generator=generator, device=_device_of(generator)).tolist()
        stages = [stages[i] for i in order_of]
    plan = []
    for stage in stages:
        if stage == "blur":
            kernels = sample_real_kernels(batch, kernel_size, order.kernel_probs, order.blur_sigma,
                                          order.betag_range, order.betap_range, generator=generator)
            plan.append(("blur", {"kernel": kernels, "apply": _bernoulli(generator, batch, order.blur_prob)}))
        elif stage == "resize":
            direction = _choice(generator, order.resize_probs)
            low, high = order.resize_range
            factor = float(_uniform(generator, 1, (max(1.0, low), high) if direction == 0 else
                                    (low, min(1.0, high)) if direction == 1 else (1.0, 1.0))[0])
            mode = order.resize_modes[_choice(generator, [1.0] * len(order.resize_modes))]
            plan.append(("resize", {"factor": factor, "mode": mode}))
        elif stage == "noise":
            plan.append(("noise", {"gaussian": _bernoulli(generator, batch, order.gaussian_noise_prob),
                                   "sigma": _uniform(generator, batch, order.noise_range) / 255.0,
                                   "poisson_scale": _uniform(generator, batch, order.poisson_scale_range),
                                   "gray": _bernoulli(generator, batch, order.gray_noise_prob)}))
        else:
            plan.append(("jpeg", {"quality": _uniform(generator, batch, order.jpeg_range).round().long()}))
    return plan


def resize(images: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """Resize [B, C, H, W] to ``size`` with ``F.interpolate`` (area, bilinear or bicubic, no antialiasing:
    the aliasing of cheap camera and web resamplers is part of what real photos carry)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} is unknown; use one of {', '.join(RESIZE_MODES)}")
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(images, size=size, mode=mode, **kwargs)


def add_poisson_noise(images: Tensor, scale: float | Tensor, gray: bool | Tensor = False,
                      generator: torch.Generator | None = None) -> Tensor:
    """Shot noise: (Poisson(255·x)/255 − x)·scale added to x, per channel or (``gray``) one map from the
    luminance for all channels; ``scale`` and ``gray`` are scalars or [B]. Its variance grows linearly with
    the intensity (σ² = scale²·x/255), as a sensor's."""
    _check_images(images)
    batch = images.shape[0]
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1).expand(batch)
    gray = torch.as_tensor(gray, dtype=torch.bool).reshape(-1).expand(batch)
    x = images.clamp(0, 1).float()
    if images.shape[1] == 3:
        luma = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    else:
        luma = x.mean(1, keepdim=True)
    noise = torch.empty_like(x)
    for where, source in ((~gray, x), (gray, luma)):  # draw only the maps that are used
        index = torch.nonzero(where).flatten()
        if index.numel():
            rate = (source[index.to(x.device)] * 255).to(_device_of(generator, x.device))
            shot = torch.poisson(rate, generator=generator).to(x.device) / 255 - source[index.to(x.device)]
            noise[index.to(x.device)] = shot.expand(-1, x.shape[1], -1, -1)
    return images + (scale.to(x.device).view(-1, 1, 1, 1) * noise).to(images.dtype)


def _gaussian_noise(images: Tensor, sigma: Tensor, gray: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, σ²) per channel, or (``gray``) one map for all channels; σ and gray per image [B]."""
    noise = torch.randn(images.shape, generator=generator, device=_device_of(generator, images.device))
    noise = noise.to(images.device)
    noise = torch.where(gray.to(images.device).view(-1, 1, 1, 1), noise[:, :1].expand_as(noise), noise)
    return images + (sigma.to(images.device, torch.float32).view(-1, 1, 1, 1) * noise).to(images.dtype)


def jpeg(images: Tensor, quality: int | Tensor) -> Tensor:
    """Real JPEG compression, per image at ``quality`` (an int or [B] ints in 1…100): encoded and decoded by
    libjpeg through Pillow (4:2:0 chroma subsampling, Pillow's default); returns the 8-bit decoded images
    as floats in [0, 1]. Not differentiable."""
    from io import BytesIO

    from PIL import Image

    _check_images(images)
    batch = images.shape[0]
    qualities = torch.as_tensor(quality).reshape(-1).expand(batch).tolist()
    if not all(1 <= int(q) <= 100 for q in qualities):
        raise ValueError(f"JPEG quality {qualities} is out of range; use integers in [1, 100]")
    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for array, q in zip(pixels, qualities):
        grey = array.shape[-1] == 1
        buffer = BytesIO()
        Image.fromarray(array[..., 0] if grey else array).save(buffer, format="JPEG", quality=int(q))
        decoded = np.asarray(Image.open(BytesIO(buffer.getvalue())).convert("L" if grey else "RGB"))
        out.append(torch.from_numpy(decoded.reshape(array.shape).copy()))
    return torch.stack(out).permute(0, 3, 1, 2).to(device=images.device, dtype=images.dtype) / 255


def _apply_plan(x: Tensor, plan: list[tuple[str, dict]], noisy: bool, generator: torch.Generator | None) -> Tensor:
    for stage, params in plan:
        if stage == "blur":
            blurred = blur(x, params["kernel"].to(x.device, x.dtype))
            x = torch.where(params["apply"].to(x.device).view(-1, 1, 1, 1), blurred, x)
        elif stage == "resize":
            height, width = x.shape[-2:]
            size = (max(1, round(height * params["factor"])), max(1, round(width * params["factor"])))
            x = resize(x, size, params["mode"]).clamp(0, 1)
        elif stage == "noise" and noisy:
            gaussian, noisy_x = params["gaussian"], x.clone()
            for where, add in ((gaussian, lambda v, i: _gaussian_noise(v, params["sigma"][i], params["gray"][i],
                                                                        generator)),
                               (~gaussian, lambda v, i: add_poisson_noise(v, params["poisson_scale"][i],
                                                                          params["gray"][i], generator))):
                index = torch.nonzero(where).flatten()
                if index.numel():
                    noisy_x[index.to(x.device)] = add(x[index.to(x.device)], index)
            x = noisy_x.clamp(0, 1)
        elif stage == "jpeg" and noisy:
            compressed = jpeg(x, params["quality"])
            x = compressed if "apply" not in params else \
                torch.where(params["apply"].to(x.device).view(-1, 1, 1, 1), compressed, x)
        elif stage == "sinc":
            filtered = blur(x, params["kernel"].to(x.device, x.dtype)).clamp(0, 1)
            x = torch.where(params["apply"].to(x.device).view(-1, 1, 1, 1), filtered, x)
    return x


def degrade_real(hr: Tensor, settings: RealDegradation, scale: int, kernel_size: int = 21,
                 generator: torch.Generator | None = None, *, measure_noise: bool = False) -> RealDegraded:
    """Degrade a batch of HR images [B, C, H, W] by the real-world model `settings` (:class:`RealDegradation`)
    to LR [B, C, ceil(H/s), ceil(W/s)] on the 8-bit grid. Resize factors and modes are drawn per batch (the
    shapes must agree), everything else per image; the same generator state gives the same bytes."""
    from .kernels import sample_isotropic, sinc_kernel

    _check_images(hr, "hr")
    scale = check_scale(scale)
    batch, _, height, width = hr.shape
    target = (math.ceil(height / scale), math.ceil(width / scale))
    clean = _bernoulli(generator, batch, settings.clean_fraction)
    clean_kernels = sample_isotropic(batch, kernel_size, generator=generator)
    plan = _plan_order(settings.first, batch, kernel_size, settings.shuffle, generator)
    first_blur = next((p for s, p in plan if s == "blur"), None)  # of the first order only
    if bool(_bernoulli(generator, 1, settings.second_order_prob)[0]):
        plan += _plan_order(settings.second, batch, kernel_size, settings.shuffle, generator)
    cutoff = torch.where(_bernoulli(generator, batch, 0.5),
                         _uniform(generator, batch, (math.pi / 3, math.pi)),
                         _uniform(generator, batch, (math.pi / 5, math.pi))).float()
    sinc = ("sinc", {"kernel": sinc_kernel(cutoff, kernel_size),
                     "apply": _bernoulli(generator, batch, settings.final_sinc_prob)})
    final_jpeg = ("jpeg", {"quality": _uniform(generator, batch, settings.final_jpeg_range).round().long(),
                           "apply": _bernoulli(generator, batch, settings.final_jpeg_prob)})
    mode = RESIZE_MODES[_choice(generator, [1.0] * len(RESIZE_MODES))]
    final = [sinc, final_jpeg] if bool(_bernoulli(generator, 1, 0.5)[0]) else [final_jpeg, sinc]

    def chain(noisy: bool) -> Tensor:
        x = _apply_plan(hr, plan, noisy, generator)
        x = resize(x, target, mode).clamp(0, 1)
        return _quantize(_apply_plan(x, final, noisy, generator))

    lr = chain(True)
    noise_sigma = None
    if measure_noise:
        noise_sigma = 255 * (lr - chain(False)).flatten(1).square().mean(1).sqrt()
    if bool(clean.any()):
        paper = _quantize(matlab_bicubic_resize(blur(hr, clean_kernels.to(hr.device, hr.dtype)), size=target))
        lr = torch.where(clean.to(hr.device).view(-1, 1, 1, 1), paper, lr)
        if noise_sigma is not None:
            noise_sigma = torch.where(clean.to(noise_sigma.device), torch.zeros_like(noise_sigma), noise_sigma)
    identity = torch.zeros(batch, kernel_size, kernel_size)
    identity[:, kernel_size // 2, kernel_size // 2] = 1
    # a first order without a blur stage (or a skipped blur) has the identity as its first-order kernel
    real_kernels = identity if first_blur is None else \
        torch.where(first_blur["apply"].view(-1, 1, 1), first_blur["kernel"], identity)
    kernels = torch.where(clean.view(-1, 1, 1), clean_kernels, real_kernels).to(hr.device)
    return RealDegraded(lr, kernels, noise_sigma, clean)


def _device_of(generator: torch.Generator | None, default: torch.device | str = "cpu") -> torch.device:
    """Where random numbers are drawn: the generator's device, else ``default``."""
    return generator.device if generator is not None else torch.device(default)
