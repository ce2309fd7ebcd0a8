"""Degradation model of BlindDiff (SPEC §2): y = ((x ⊛ k)↓s + n), rounded to 8 bits.

This is the forward model the whole method is built around: training pairs are made with it,
and the reverse process (SPEC §5, the kernel-aware gradient) back-propagates through
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
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DOWNSAMPLE_MODES",
    "add_gaussian_noise",
    "blur",
    "check_scale",
    "degrade",
    "downsample",
    "matlab_bicubic_resize",
    "quantize",
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
# Blur (SPEC §2: reflect padding, same kernel for every channel)
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
    """Blur ``images`` [B, C, H, W] with ``kernels`` [B, kh, kw] or [kh, kw] (x ⊛ k, SPEC §2).

    Reflect padding keeps H×W (``k//2`` before, ``k − 1 − k//2`` after, so even kernels are
    supported); the same kernel is applied to every channel; correlation like ``F.conv2d``
    (see the module docstring). ``method``: ``"conv"`` (grouped conv2d), ``"fft"`` (FFT of
    the padded image; equal to 1e-5 in float32) or ``"auto"`` — conv for kernels up to 25×25
    when no gradient is needed, FFT otherwise. Differentiable w.r.t. images and kernels.
    """
    return _blur(images, kernels, method)


# --------------------------------------------------------------------------------------------
# MATLAB-compatible bicubic resize (SPEC §2, "bicubic" downsampling)
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
    """MATLAB ``imresize(x, scale, 'bicubic')`` (antialiased) of the last two dims (SPEC §2).

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
    """MATLAB bicubic ×``scale`` enlargement (the network's conditioning input ↑y, SPEC §3)."""
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
    """↓s of SPEC §2: ``"bicubic"`` = MATLAB ``imresize(x, 1/s)`` (output ``ceil(H/s)``),
    ``"direct"`` = ``x[..., ::s, ::s]`` (paper Eq. 1). ``scale`` = 1 returns the input."""
    return _downsample(images, scale, mode)


# --------------------------------------------------------------------------------------------
# Noise and quantisation
# --------------------------------------------------------------------------------------------


def add_gaussian_noise(images: Tensor, sigma: float | Tensor,
                       generator: torch.Generator | None = None) -> Tensor:
    """Add n ~ N(0, σ²) on the [0, 1] scale (SPEC §2; σ = 0.02 in the deblurring setting).

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


def _quantize(images: Tensor) -> Tensor:
    return torch.round(images.clamp(0, 1) * 255) / 255


def quantize(images: Tensor) -> Tensor:
    """8-bit quantisation of the LR image: clamp to [0, 1], round(255·y)/255 (SPEC §2).
    ``torch.round`` rounds halves to even, like ``numpy.round`` in the authors' code."""
    return _quantize(images)


# --------------------------------------------------------------------------------------------
# The whole forward model
# --------------------------------------------------------------------------------------------


def degrade(hr: Tensor, kernels: Tensor, scale: int, downsample: str = "bicubic",
            noise_sigma: float | Tensor = 0.0, quantize: bool = True,
            generator: torch.Generator | None = None) -> Tensor:
    """y = quantize((hr ⊛ k)↓s + n) — the degradation of SPEC §2 (paper Eq. 1).

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
