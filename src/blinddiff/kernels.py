"""Blur kernels of the degradation model (docs/method.md §1): Gaussian, motion, kernel files and kernel PCA.

Every kernel is a float32 tensor ``[B, k, k]``, non-negative and summing to 1.  Tap ``[i, j]`` sits at
the offset ``(x, y) = (j - k//2, i - k//2)``: ``x`` is the horizontal (column) offset growing to the
right, ``y`` the vertical (row) offset growing downwards, so odd kernels are centred on their middle tap.

Training samplers follow the paper's settings: isotropic Gaussians (setting 1), anisotropic Gaussians
with multiplicative tap noise (setting 2) and camera-shake motion kernels (the deblurring extension).
All randomness comes from an optional ``torch.Generator``: the same seed gives the same kernels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "GAUSSIAN8_SIGMAS",
    "KERNEL_FILE_SUFFIXES",
    "TRAINING_SETTINGS",
    "REAL_KERNEL_KINDS",
    "KernelPCA",
    "anisotropic_gaussian",
    "fit_kernel_pca",
    "gaussian8",
    "isotropic_gaussian",
    "load_kernel",
    "load_kernels",
    "motion_blur",
    "parse_kernel_spec",
    "shaped_kernels",
    "sinc_kernel",
    "sample_anisotropic",
    "sample_isotropic",
    "sample_real_kernels",
    "sample_training_kernels",
    "validate_kernel",
]

GAUSSIAN8_SIGMAS: tuple[float, ...] = (1.8, 2.0, 2.2, 2.4, 2.6, 2.8, 3.0, 3.2)
"""Kernel widths of the Gaussian8 benchmark (docs/method.md §1, Table 1)."""

TRAINING_SETTINGS: tuple[str, ...] = ("iso", "aniso", "motion")
"""Names accepted by :func:`sample_training_kernels`: setting 1, setting 2 and motion deblurring."""

KERNEL_FILE_SUFFIXES: tuple[str, ...] = (".npy", ".png", ".mat")
"""File types :func:`load_kernel` reads."""

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

DeviceLike = torch.device | str | None


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


def _offsets(size: int, device: DeviceLike = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Tap offsets ``-(k//2) ... k - 1 - k//2`` of a k-tap axis (centred at 0 for odd k)."""
    return torch.arange(size, device=device, dtype=dtype) - (size // 2)


def _check_gaussian_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"kernel size must be an int, got {size!r}")
    if size < 3:
        raise ValueError(f"kernel size {size} is too small; use an odd size >= 3 such as 21")
    if size % 2 == 0:
        raise ValueError(f"kernel size {size} is even; use an odd size such as {size + 1}")


def _check_range(name: str, value_range: Sequence[float]) -> tuple[float, float]:
    if len(value_range) != 2:
        raise ValueError(f"{name}={tuple(value_range)} is invalid; use (low, high) with 0 < low <= high")
    low, high = (float(v) for v in value_range)
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise ValueError(f"{name}={tuple(value_range)} is invalid; use (low, high) with 0 < low <= high")
    return low, high


def _check_batch(batch: int) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r} is invalid; use a positive int")


def _rand(shape: Sequence[int], generator: torch.Generator | None, dtype: torch.dtype = torch.float32) -> Tensor:
    """U(0, 1) samples on the CPU, drawn with ``generator`` (on its own device) for reproducibility."""
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(tuple(shape), generator=generator, device=device, dtype=dtype).cpu()


def _as_batch(name: str, value: float | Tensor, device: DeviceLike) -> Tensor:
    """A float or a 0-D/1-D tensor as a float32 1-D tensor (on ``device`` when given)."""
    t = torch.as_tensor(value, dtype=torch.float32)
    if device is not None:
        t = t.to(device)
    if t.dim() > 1:
        raise ValueError(f"{name} must be a float or a 1-D tensor [B], got shape {tuple(t.shape)}")
    t = t.reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty; give at least one value")
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        raise ValueError(f"{name} must be finite, got {_some(t[~finite])}")
    return t


def _check_positive(name: str, t: Tensor) -> None:
    positive = t > 0
    if not bool(positive.all()):
        raise ValueError(f"{name} must be > 0, got {_some(t[~positive])}")


def _some(bad: Tensor, shown: int = 4) -> str:
    """A short listing of offending values for error messages."""
    values = ", ".join(f"{v:g}" for v in bad[:shown].tolist())
    return values + (f" (and {bad.numel() - shown} more)" if bad.numel() > shown else "")


def _normalise(kernels: Tensor) -> Tensor:
    return kernels / kernels.sum(dim=(-2, -1), keepdim=True)


def _resolve_device(device: DeviceLike, *tensors: object) -> torch.device | None:
    if device is not None:
        return torch.device(device)
    for t in tensors:
        if isinstance(t, Tensor):
            return t.device
    return None


# --------------------------------------------------------------------------------------------------
# Gaussian kernels (docs/method.md §1, settings 1 and 2)
# --------------------------------------------------------------------------------------------------


def isotropic_gaussian(sigma: float | Tensor, size: int = 21, device: DeviceLike = None) -> Tensor:
    """Isotropic Gaussian kernels exp(-(x²+y²)/(2σ²)), normalised (docs/method.md §1, setting 1).

    ``sigma`` is a float or a 1-D tensor ``[B]``; returns ``[B, size, size]`` (``B = 1`` for a float).
    Differentiable with respect to a tensor ``sigma``.
    """
    _check_gaussian_size(size)
    device = _resolve_device(device, sigma)
    s = _as_batch("sigma", sigma, device)
    _check_positive("sigma", s)
    r = _offsets(size, s.device)
    r2 = r[None, :, None] ** 2 + r[None, None, :] ** 2  # [1, k, k]
    return _normalise(torch.exp(-r2 / (2 * s[:, None, None] ** 2)))


def anisotropic_gaussian(
    sigma_x: float | Tensor,
    sigma_y: float | Tensor,
    theta: float | Tensor,
    size: int = 21,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    device: DeviceLike = None,
) -> Tensor:
    """Anisotropic Gaussians k ∝ exp(-½ vᵀΣ⁻¹v), Σ = R(θ) diag(σx², σy²) R(θ)ᵀ (docs/method.md §1, setting 2).

    ``v = (x, y)`` is the (column, row) offset: x grows to the right and y downwards, so with θ = 0 the
    kernel has standard deviation σx horizontally and σy vertically, and a positive θ turns the σx axis
    from +x towards +y (clockwise on screen).  ``noise > 0`` multiplies every tap by 1 + U(0, noise)
    and renormalises (the paper's setting 2 uses 0.25).  The three parameters broadcast to ``[B]``.
    """
    _check_gaussian_size(size)
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise={noise} is invalid; use a finite value >= 0 (setting 2 uses 0.25)")
    device = _resolve_device(device, sigma_x, sigma_y, theta)
    sx, sy, th = torch.broadcast_tensors(
        _as_batch("sigma_x", sigma_x, device),
        _as_batch("sigma_y", sigma_y, device),
        _as_batch("theta", theta, device),
    )
    _check_positive("sigma_x", sx)
    _check_positive("sigma_y", sy)
    kernels = _normalise(torch.exp(-0.5 * _quadratic_form(sx, sy, th, size)))
    if noise > 0:
        jitter = _rand(kernels.shape, generator).to(kernels.device)
        kernels = _normalise(kernels * (1 + noise * jitter))
    return kernels


def _quadratic_form(sx: Tensor, sy: Tensor, th: Tensor, size: int) -> Tensor:
    """vᵀΣ⁻¹v on the k×k tap grid ``[B, k, k]``, Σ = R(θ) diag(σx², σy²) R(θ)ᵀ (see :func:`anisotropic_gaussian`)."""
    r = _offsets(size, sx.device)
    x, y = r[None, None, :], r[None, :, None]  # column offset, row offset
    cos, sin = torch.cos(th)[:, None, None], torch.sin(th)[:, None, None]
    along = cos * x + sin * y  # coordinates in the kernel's principal frame: R(θ)ᵀ v
    across = -sin * x + cos * y
    return (along / sx[:, None, None]) ** 2 + (across / sy[:, None, None]) ** 2


def sample_isotropic(
    batch: int,
    size: int = 21,
    sigma_range: tuple[float, float] = (0.2, 4.0),
    generator: torch.Generator | None = None,
    device: DeviceLike = None,
    return_params: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Training setting 1: isotropic Gaussians with σ ~ U(sigma_range) (docs/method.md §1).

    Returns ``[batch, size, size]``, or ``(kernels, {"sigma": [batch]})`` with ``return_params=True``.
    """
    _check_batch(batch)
    _check_gaussian_size(size)
    low, high = _check_range("sigma_range", sigma_range)
    sigma = low + (high - low) * _rand((batch,), generator)
    if device is not None:
        sigma = sigma.to(device)
    kernels = isotropic_gaussian(sigma, size)
    return (kernels, {"sigma": sigma}) if return_params else kernels


def sample_anisotropic(
    batch: int,
    size: int = 21,
    sigma_range: tuple[float, float] = (0.6, 5.0),
    noise: float = 0.25,
    generator: torch.Generator | None = None,
    device: DeviceLike = None,
    return_params: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Training setting 2: σx, σy ~ U(sigma_range) independently, θ ~ U(-π, π), tap noise (docs/method.md §1).

    Returns ``[batch, size, size]``, or ``(kernels, {"sigma_x", "sigma_y", "theta"})`` with
    ``return_params=True``.
    """
    _check_batch(batch)
    _check_gaussian_size(size)
    low, high = _check_range("sigma_range", sigma_range)
    u = _rand((3, batch), generator)
    if device is not None:
        u = u.to(device)
    params = {
        "sigma_x": low + (high - low) * u[0],
        "sigma_y": low + (high - low) * u[1],
        "theta": math.pi * (2 * u[2] - 1),
    }
    kernels = anisotropic_gaussian(
        params["sigma_x"], params["sigma_y"], params["theta"], size=size, noise=noise, generator=generator
    )
    return (kernels, params) if return_params else kernels


def gaussian8(size: int = 21, device: DeviceLike = None) -> Tensor:
    """The eight isotropic kernels ``[8, k, k]`` of the Gaussian8 benchmark, σ = 1.8 … 3.2 (docs/method.md §1, Table 1)."""
    return isotropic_gaussian(torch.tensor(GAUSSIAN8_SIGMAS, device=device), size)


# --------------------------------------------------------------------------------------------------
# Motion kernels (docs/method.md §1, deblurring extension as in BlindDPS)
# --------------------------------------------------------------------------------------------------

_MOTION_EPS = 0.1  # the reference generator's offset on step length and angle range
_SPLAT_SPACING = 0.25  # canvas pixels between trajectory samples
_LANCZOS_LOBES = 3


def _beta_1_b(u: Tensor, b: float) -> Tensor:
    """Beta(1, b) by inverse CDF: 1 - (1 - u)^(1/b)."""
    return 1 - (1 - u) ** (1 / b)


def _beta_2_20(generator: torch.Generator | None, batch: int) -> Tensor:
    """Beta(2, 20) as G2 / (G2 + G20), with Gamma(n) a sum of n unit exponentials."""
    e = -torch.log1p(-_rand((batch, 22), generator, torch.float64))
    g2 = e[:, :2].sum(1)
    return g2 / (g2 + e[:, 2:].sum(1))


def _triangular(u: Tensor, mode: Tensor, right: Tensor) -> Tensor:
    """Triangular(0, mode, right) by inverse CDF."""
    split = mode / right
    rising = torch.sqrt(u * right * mode)
    falling = right - torch.sqrt((1 - u) * right * (right - mode))
    return torch.where(u < split, rising, falling)


def _motion_steps(
    batch: int, diagonal: float, intensity: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Step lengths ``[B, N]`` (zero-padded) and step counts ``[B]`` of the camera trajectories.

    Path budget L = 0.75·diag·(U(0,1) + U(0, I²)); steps Beta(1, 30)·(1 - I + 0.1)·diag, each step
    longer than L rejected, drawn until their sum reaches L.
    """
    u = _rand((batch, 2), generator, torch.float64)
    max_len = 0.75 * diagonal * (u[:, 0] + intensity**2 * u[:, 1])
    scale = (1 - intensity + _MOTION_EPS) * diagonal
    # a path budget under half a canvas pixel renders as a point: skip its (possibly long) rejection loop
    point = max_len < 0.5
    chunk = int(math.ceil(1.5 * float(max_len.max()) / (scale / 31))) + 8
    drawn: list[Tensor] = []
    total = torch.zeros(batch, dtype=torch.float64)
    while not bool((point | (total >= max_len)).all()):
        steps = _beta_1_b(_rand((batch, chunk), generator, torch.float64), 30.0) * scale
        steps = torch.where(steps < max_len[:, None], steps, torch.zeros_like(steps))
        drawn.append(steps)
        total = total + steps.sum(1)
    if not drawn:
        return torch.zeros(batch, 1, dtype=torch.float64), torch.zeros(batch, dtype=torch.long)
    steps = torch.cat(drawn, dim=1)
    # compact accepted steps to the front of each row, keeping their order
    order = torch.argsort((steps == 0).to(torch.int8), dim=1, stable=True)
    steps = torch.gather(steps, 1, order)
    reached = torch.cumsum(steps, 1) >= max_len[:, None]
    count = torch.where(point, 0, reached.to(torch.int8).argmax(1) + 1)
    n_max = max(int(count.max()), 1)
    steps = steps[:, :n_max]
    steps = torch.where(torch.arange(n_max)[None, :] < count[:, None], steps, torch.zeros_like(steps))
    return steps, count


def _motion_angles(count: Tensor, intensity: float, generator: torch.Generator | None) -> Tensor:
    """Absolute step directions ``[B, N]``.

    Max angle A ~ U(0, I·π), sign-flip probability J ~ Beta(2, 20); the first angle is U(-A, A), the
    following magnitudes Triangular(0, I·A, A + 0.1), each flipping the previous sign with probability J.
    """
    batch, n = count.shape[0], max(int(count.max()), 1)
    u = _rand((batch, 2), generator, torch.float64)
    max_angle = u[:, 0] * intensity * math.pi
    jitter = _beta_2_20(generator, batch)
    first = max_angle * (2 * u[:, 1] - 1)
    u_mag, u_flip = _rand((2, batch, n), generator, torch.float64)
    magnitude = _triangular(u_mag, (intensity * max_angle)[:, None], (max_angle + _MOTION_EPS)[:, None])
    flips = torch.where(u_flip < jitter[:, None], -1.0, 1.0).to(torch.float64)
    flips[:, 0] = 1.0
    sign = torch.sign(first)[:, None] * torch.cumprod(flips, dim=1)
    angles = magnitude * sign
    angles[:, 0] = first
    return angles


def _trajectory_points(steps: Tensor, angles: Tensor, spacing: float) -> tuple[Tensor, Tensor, Tensor]:
    """Points evenly spaced along each polyline, ``x, y: [B, P]``, and the arc length per point ``[B]``.

    As in the reference, the polyline joins the partial sums of the steps, so the first step only
    translates the path.  Rows without a segment collapse to a single point at the origin.
    """
    increments = torch.polar(steps, angles)[:, 1:]  # [B, S] complex segments
    lengths = steps[:, 1:]
    batch, n_seg = lengths.shape
    if n_seg == 0:
        zeros = torch.zeros(batch, 1, dtype=torch.float64)
        return zeros, zeros, torch.zeros(batch, dtype=torch.float64)
    cum = torch.cumsum(lengths, 1)
    total = cum[:, -1]
    n_points = max(int(math.ceil(float(total.max()) / spacing)), 1)
    s = (torch.arange(n_points, dtype=torch.float64)[None, :] + 0.5) / n_points * total[:, None]
    seg = torch.searchsorted(cum, s).clamp(max=n_seg - 1)
    seg_len = torch.gather(lengths, 1, seg)
    seg_start = torch.gather(cum, 1, seg) - seg_len
    frac = torch.where(seg_len > 0, (s - seg_start) / seg_len.clamp(min=1e-12), torch.zeros_like(s)).clamp(0, 1)
    starts = torch.cumsum(increments, 1) - increments  # vertex at the start of every segment
    z = torch.gather(starts, 1, seg) + frac * torch.gather(increments, 1, seg)
    return z.real, z.imag, total / n_points


def _centre_points(
    x: Tensor, y: Tensor, canvas: int, centre: float, iterations: int = 4
) -> tuple[Tensor, Tensor, Tensor]:
    """Translate each path so the mean of its points that land on the canvas is at ``centre``.

    The reference centres the path's vertices and lets the canvas clip whatever overflows; centring the
    drawn (clipped) mass instead keeps the kernel's centre of mass on the grid centre.
    """
    keep = torch.ones_like(x, dtype=torch.bool)
    for _ in range(iterations):
        w = keep.to(x.dtype)
        n = w.sum(1, keepdim=True).clamp(min=1)
        x = x - (x * w).sum(1, keepdim=True) / n + centre
        y = y - (y * w).sum(1, keepdim=True) / n + centre
        inside = (x >= 0.5) & (x <= canvas - 0.5) & (y >= 0.5) & (y <= canvas - 0.5)
        keep = torch.where(inside.any(1, keepdim=True), inside, torch.ones_like(inside))
    return x, y, keep


def _splat(x: Tensor, y: Tensor, weight: Tensor, size: int) -> Tensor:
    """Bilinear splatting of weighted points (pixel i covers [i, i+1)) onto ``[B, size, size]``."""
    batch = x.shape[0]
    u, v = x - 0.5, y - 0.5
    i0, j0 = torch.floor(u), torch.floor(v)
    fu, fv = (u - i0).float(), (v - j0).float()
    i0, j0 = i0.long(), j0.long()
    canvas = torch.zeros(batch * size * size, dtype=torch.float32)
    base = torch.arange(batch)[:, None] * (size * size)
    for di, wu in ((0, 1 - fu), (1, fu)):
        for dj, wv in ((0, 1 - fv), (1, fv)):
            col, row = i0 + di, j0 + dj
            valid = (col >= 0) & (col < size) & (row >= 0) & (row < size)
            idx = base + row.clamp(0, size - 1) * size + col.clamp(0, size - 1)
            canvas.index_add_(0, idx.reshape(-1), (weight * wu * wv * valid).reshape(-1))
    return canvas.view(batch, size, size)


def _gaussian_taps(sigma: float) -> Tensor:
    radius = max(int(math.ceil(3 * sigma)), 1)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def _lanczos_half_taps() -> Tensor:
    """Antialiased Lanczos-3 taps for a 2× downscale: 12 inputs at distances (t - ½)/2, t = -5…6."""
    d = (torch.arange(-5, 7, dtype=torch.float64) - 0.5) / 2
    w = torch.sinc(d) * torch.sinc(d / _LANCZOS_LOBES)
    return w / w.sum()


def _band_matrix(taps: Tensor, n_out: int, n_in: int, stride: int, first: int) -> Tensor:
    """``[n_out, n_in]`` matrix applying ``taps`` to inputs ``stride·o + first + t`` (zero outside)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)[:, None]
    cols = stride * rows + first + torch.arange(taps.numel())[None, :]
    valid = (cols >= 0) & (cols < n_in)
    m[rows.expand_as(cols)[valid], cols[valid]] = taps.expand_as(cols)[valid]
    return m


def _motion_filter(size: int, pad: int, sigma: float) -> Tensor:
    """``[size, 2·size + 2·pad]``: Gaussian blur, Lanczos 2× downscale and crop of one canvas axis."""
    n = 2 * size + 2 * pad
    lanczos = _band_matrix(_lanczos_half_taps(), size, n, stride=2, first=pad - 5)
    if sigma <= 0:
        return lanczos.float()
    taps = _gaussian_taps(sigma)
    return (lanczos @ _band_matrix(taps, n, n, stride=1, first=-(taps.numel() // 2))).float()


def _centre_of_mass(kernels: Tensor) -> tuple[Tensor, Tensor]:
    """Horizontal and vertical centre of mass ``[B]`` of non-negative kernels, in taps from ``k//2``."""
    r = _offsets(kernels.shape[-1], kernels.device, kernels.dtype)
    total = kernels.sum(dim=(-2, -1)).clamp(min=torch.finfo(kernels.dtype).tiny)
    return (kernels.sum(-2) * r).sum(-1) / total, (kernels.sum(-1) * r).sum(-1) / total


def motion_blur(
    batch: int,
    size: int = 64,
    intensity: float = 0.5,
    generator: torch.Generator | None = None,
    device: DeviceLike = None,
) -> Tensor:
    """Random camera-shake kernels ``[batch, size, size]`` (docs/method.md §1, motion deblurring as in BlindDPS).

    Follows the recipe of the public "motionblur" generator (Borodenko) that BlindDPS uses: on a 2×
    supersampled canvas, a trajectory of random steps whose total length and direction changes grow
    with ``intensity`` (0: a straight line of random length, 1: long, strongly curved paths) is
    centred, randomly rotated by U(0, π), drawn as a stroke (overlaps do not accumulate, as when
    painting), Gaussian-blurred by 1 % of the canvas diagonal, Lanczos-downscaled to ``size`` and
    normalised.  Differences from the reference: the stroke is drawn with sub-pixel (bilinear)
    splatting instead of aliased line drawing, the drawn mass (not the path's vertices) is centred on
    tap ``size//2``, and the result is not quantised to 8 bits.
    """
    _check_batch(batch)
    if isinstance(size, bool) or not isinstance(size, int) or size < 3:
        raise ValueError(f"motion kernel size {size!r} is invalid; use an int >= 3 such as 64")
    try:
        level = float(intensity)
    except (TypeError, ValueError):
        level = math.nan
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"intensity={intensity!r} is invalid; use a number in [0, 1] such as 0.5")
    intensity = level
    canvas = 2 * size
    diagonal = math.sqrt(2.0) * canvas
    steps, count = _motion_steps(batch, diagonal, intensity, generator)
    angles = _motion_angles(count, intensity, generator)
    rotation = _rand((batch,), generator, torch.float64) * math.pi
    x, y, arc = _trajectory_points(steps, angles + rotation[:, None], _SPLAT_SPACING)
    x, y, keep = _centre_points(x, y, canvas, centre=2 * (size // 2) + 1.0)

    # blur of the reference (σ = 1 % of the diagonal, whole pixels) plus the stroke width beyond 1 px
    width = max(int(diagonal / 150), 1)
    sigma = math.sqrt(int(diagonal * 0.01) ** 2 + (width**2 - 1) / 12)
    pad = 2 * int(math.ceil((math.ceil(3 * sigma) + 6) / 2))  # room for blur + Lanczos, kept even
    filt = _motion_filter(size, pad, sigma)
    # each point carries its arc length, so a stroke deposits ~1 per pixel and overlaps saturate at 1
    arc = torch.where(arc > 0, arc, torch.ones_like(arc))[:, None]

    def render(x: Tensor, y: Tensor, keep: Tensor) -> Tensor:
        image = _splat(x + pad, y + pad, (arc * keep).float(), canvas + 2 * pad).clamp(max=1.0)
        return (filt @ image @ filt.T).clamp(min=0)

    kernels = render(x, y, keep)
    # saturated overlaps and clipping move the mass away from the points' mean: re-centre on the result
    for _ in range(3):
        dx, dy = _centre_of_mass(kernels)
        if float(torch.maximum(dx.abs(), dy.abs()).max()) < 0.02:
            break
        x, y = x - 2 * dx.double()[:, None], y - 2 * dy.double()[:, None]
        keep = keep & (x >= 0.5) & (x <= canvas - 0.5) & (y >= 0.5) & (y <= canvas - 0.5)
        kernels = render(x, y, keep)
    total = kernels.sum(dim=(-2, -1), keepdim=True)
    delta = torch.zeros_like(kernels)
    delta[:, size // 2, size // 2] = 1
    kernels = torch.where(total > 0, kernels / total.clamp(min=1e-30), delta)
    return kernels.to(device) if device is not None else kernels


# --------------------------------------------------------------------------------------------------
# Kernel files
# --------------------------------------------------------------------------------------------------


KERNEL_SUM_TOLERANCE = 1e-3
"""How far from 1 the sum of a kernel scored as an estimate may be (float32 rounding is about 1e-6)."""


def validate_kernel(array: np.ndarray, what: str = "kernel", *, square: bool = False,
                    normalised: bool = False) -> Tensor:
    """Check one blur kernel (``what`` names it in errors, e.g. "kernel file k.npy") → float32 summing to 1.

    A kernel is a 2-D array of finite, non-negative taps with a positive, finite sum (an un-normalised
    one is normalised); ``square`` also asks for k×k, as applying a kernel to an image does;
    ``normalised`` refuses a sum farther than `KERNEL_SUM_TOLERANCE` from 1 instead of normalising it,
    as scoring an estimated kernel needs (an estimate that does not sum to 1 is not yet a kernel).
    """
    if not _is_numeric(array):
        raise ValueError(f"{what} holds non-numeric data of type {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"{what} holds an array of shape {array.shape}; a kernel must be 2-D [k, k]")
    if array.size == 0:
        raise ValueError(f"{what} holds an empty array")
    if square and array.shape[0] != array.shape[1]:
        raise ValueError(f"{what} is {array.shape[0]}×{array.shape[1]}; a kernel must be square [k, k] "
                         "(pad it with zeros, keeping its centre)")
    a = np.asarray(array, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{what} has non-finite values (NaN or inf); a kernel must have finite taps")
    with np.errstate(over="ignore"):  # taps near the float64 limit: said below, not as a numpy warning
        total = a.sum()
    if not np.isfinite(total):
        raise ValueError(f"{what} has taps up to {a.max():.3g} whose sum overflows float64; a blur kernel's "
                         "taps sum to about 1: rescale it")
    if total <= 0:
        raise ValueError(
            f"{what} sums to {total:.3g}; a blur kernel must be non-negative with a positive sum"
        )
    if a.min() < -1e-6:
        raise ValueError(
            f"{what} has negative taps (min {a.min():.3g}); a blur kernel must be non-negative"
        )
    if normalised and abs(total - 1) > KERNEL_SUM_TOLERANCE:
        raise ValueError(f"{what} sums to {total:.4g}, not 1 (±{KERNEL_SUM_TOLERANCE:g}); a kernel estimate "
                         "is scored only when normalised: save it divided by its sum")
    a = np.clip(a, 0, None)
    return torch.from_numpy(a / a.sum()).float()


def _png_kernel(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
            return np.asarray(image, dtype=np.float64)
        if image.mode == "LA":
            return np.asarray(image, dtype=np.float64)[..., 0]
        return np.asarray(image.convert("RGB"), dtype=np.float64).mean(axis=2)


def _is_numeric(a: np.ndarray) -> bool:
    return a.dtype.kind in "iuf"


def _mat_candidates(variables: dict[str, object]) -> list[np.ndarray]:
    """Kernels among a .mat file's variables: ``kernel``/``kernels`` if present, else the first 2-D
    numeric array or cell array of 2-D numeric arrays."""

    def cells(value: np.ndarray) -> list[np.ndarray]:
        return [np.asarray(c) for c in value.ravel()]

    for name in ("kernel", "kernels"):
        match = next((k for k in variables if k.lower() == name), None)
        value = variables.get(match) if match is not None else None
        if isinstance(value, np.ndarray):
            return cells(value) if value.dtype == object else [value]
    for value in variables.values():
        if not isinstance(value, np.ndarray):
            continue
        if value.dtype != object and _is_numeric(value) and value.ndim == 2:
            return [value]
        if value.dtype == object and value.size and all(_is_numeric(c) and c.ndim == 2 for c in cells(value)):
            return cells(value)
    return []


def _is_hdf5(path: Path) -> bool:
    """HDF5 signature at offset 0 or after a 512-byte user block (MATLAB v7.3 puts its header there)."""
    with open(path, "rb") as f:
        head = f.read(520)
    return any(head[o : o + 8] == _HDF5_SIGNATURE for o in (0, 512))


def _mat73_variables(path: Path) -> dict[str, object]:
    """Variables of a MATLAB v7.3 (HDF5) file as numpy arrays in MATLAB's (row, column) order."""
    try:
        import h5py
    except ImportError as error:  # optional dependency
        raise ImportError(
            f"kernel file {path} is a MATLAB v7.3 (HDF5) file, which needs h5py: pip install blinddiff[mat73]"
        ) from error

    def read(file: h5py.File, item: object) -> object:
        if not isinstance(item, h5py.Dataset):
            return None
        if h5py.check_dtype(ref=item.dtype) is not None:  # cell array of references
            refs = np.asarray(item[()]).T
            cells = np.empty(refs.shape, dtype=object)
            for idx, ref in np.ndenumerate(refs):
                cells[idx] = read(file, file[ref])
            return cells
        cls = item.attrs.get("MATLAB_class", b"double")
        cls = cls.decode() if isinstance(cls, bytes) else str(cls)
        if cls in ("char", "logical", "struct", "cell") or item.attrs.get("MATLAB_empty", 0):
            return None
        return np.asarray(item[()]).T  # HDF5 stores MATLAB arrays column-major

    with h5py.File(path, "r") as file:
        return {k: read(file, file[k]) for k in file.keys() if not k.startswith("#")}


def load_kernels(path: str | os.PathLike) -> list[Tensor]:
    """All kernels of a file as float32 ``[k, k]`` tensors normalised to sum 1.

    ``.npy``: one 2-D array.  ``.png``: one grayscale (or RGB, averaged) image.  ``.mat`` (MATLAB v5 via
    scipy, v7.3 via h5py): variable ``kernel``/``kernels`` or else the first 2-D numeric array; a cell
    array gives all its kernels.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"kernel file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".npy", ".png"):
        try:
            arrays = [np.load(path, allow_pickle=False) if suffix == ".npy" else _png_kernel(path)]
        except Exception as error:  # numpy and Pillow raise many kinds of errors for damaged files
            raise ValueError(f"kernel file {path} could not be read ({type(error).__name__}: {error}); "
                             "replace it with a valid kernel file") from None
    elif suffix == ".mat":
        import scipy.io

        try:
            if _is_hdf5(path):  # MATLAB v7.3
                variables = _mat73_variables(path)
            else:
                variables = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
        except ImportError:
            raise
        except Exception as error:  # scipy and h5py raise many kinds of errors for damaged files
            raise ValueError(f"kernel file {path} is not a readable MATLAB file ({type(error).__name__}: "
                             f"{error}); replace it with a valid .mat, .npy or .png kernel") from None
        arrays = _mat_candidates(variables)
        if not arrays:
            raise ValueError(
                f"kernel file {path} has no 2-D numeric array (variables: {sorted(variables)}); "
                "store the kernel as variable 'kernel' or a cell array 'kernels'"
            )
    else:
        raise ValueError(f"kernel file {path} has unsupported type {suffix!r}; use one of {KERNEL_FILE_SUFFIXES}")
    kernels = []
    for i, a in enumerate(arrays):
        name = str(path) if len(arrays) == 1 else f"{path} (kernel {i})"
        kernels.append(validate_kernel(np.asarray(a), f"kernel file {name}"))
    return kernels


def load_kernel(path: str | os.PathLike, index: int = 0) -> Tensor:
    """One kernel ``[k, k]`` float32 summing to 1 from a .npy, .png or .mat file (``index`` picks a cell)."""
    kernels = load_kernels(path)
    if not -len(kernels) <= index < len(kernels):
        raise ValueError(f"kernel file {path} holds {len(kernels)} kernel(s); index {index} is out of range")
    return kernels[index]


# --------------------------------------------------------------------------------------------------
# Kernel PCA (the paper's reduced kernel code, docs/method.md §2)
# --------------------------------------------------------------------------------------------------


class KernelPCA(nn.Module):
    """Linear kernel code: ``code = (k - mean) · Vᵀ`` with the top principal directions V (docs/method.md §2).

    Buffers: ``mean [k, k]`` and ``components [L, k·k]`` (orthonormal rows), so ``state_dict()`` is a
    plain tensor dict (safetensors-friendly) and ``.to(device)`` moves it like any module.
    """

    mean: Tensor
    components: Tensor

    def __init__(self, mean: Tensor, components: Tensor) -> None:
        super().__init__()
        if mean.dim() != 2 or mean.shape[0] != mean.shape[1]:
            raise ValueError(f"KernelPCA mean must be a square [k, k] kernel, got shape {tuple(mean.shape)}")
        if components.dim() != 2 or components.shape[1] != mean.numel():
            raise ValueError(
                f"KernelPCA components must be [L, {mean.numel()}] for a {tuple(mean.shape)} mean, "
                f"got shape {tuple(components.shape)}"
            )
        self.register_buffer("mean", mean.detach().float().contiguous().clone())
        self.register_buffer("components", components.detach().float().contiguous().clone())

    @property
    def size(self) -> int:
        return self.mean.shape[-1]

    @property
    def code_length(self) -> int:
        return self.components.shape[0]

    @classmethod
    def fit(cls, kernels: Tensor, code_length: int = 10) -> KernelPCA:
        """Mean and top ``code_length`` right singular vectors of the centred kernels ``[N, k, k]``."""
        if kernels.dim() != 3 or kernels.shape[1] != kernels.shape[2]:
            raise ValueError(f"KernelPCA.fit takes kernels [N, k, k], got shape {tuple(kernels.shape)}")
        n, k = kernels.shape[0], kernels.shape[1]
        valid = isinstance(code_length, int) and not isinstance(code_length, bool)
        if not (valid and 1 <= code_length <= min(n, k * k)):
            raise ValueError(
                f"code_length={code_length!r} is invalid for {n} kernels of {k}x{k}; use 1 <= L <= {min(n, k * k)}"
            )
        flat = kernels.detach().reshape(n, k * k).to(torch.float64)
        mean = flat.mean(0)
        _, _, vh = torch.linalg.svd(flat - mean, full_matrices=False)
        return cls(mean.view(k, k).to(kernels.device), vh[:code_length].to(kernels.device))

    def _check(self, name: str, t: Tensor, tail: tuple[int, ...]) -> None:
        if t.dim() != len(tail) + 1 or tuple(t.shape[1:]) != tail:
            raise ValueError(f"{name} must be [B, {', '.join(map(str, tail))}], got shape {tuple(t.shape)}")

    def encode(self, kernels: Tensor) -> Tensor:
        """Kernels ``[B, k, k]`` → codes ``[B, L]`` (differentiable)."""
        self._check("kernels", kernels, (self.size, self.size))
        mean = self.mean.to(kernels)
        return (kernels - mean).flatten(1) @ self.components.to(kernels).T

    def decode(self, codes: Tensor, normalize: bool = False) -> Tensor:
        """Codes ``[B, L]`` → kernels ``[B, k, k]``; ``normalize`` clamps to ≥ 0 and rescales to sum 1."""
        self._check("codes", codes, (self.code_length,))
        flat = codes @ self.components.to(codes) + self.mean.to(codes).flatten()
        kernels = flat.view(-1, self.size, self.size)
        if normalize:
            kernels = kernels.clamp(min=0)
            kernels = kernels / kernels.sum(dim=(-2, -1), keepdim=True).clamp(min=torch.finfo(kernels.dtype).tiny)
        return kernels


def fit_kernel_pca(
    sampler_name: str = "iso", n: int = 8192, size: int = 21, code_length: int = 10, seed: int = 0
) -> KernelPCA:
    """Fit a :class:`KernelPCA` to ``n`` kernels of a training sampler (see :func:`sample_training_kernels`)."""
    generator = torch.Generator().manual_seed(seed)
    return KernelPCA.fit(sample_training_kernels(sampler_name, n, size, generator=generator), code_length)


# --------------------------------------------------------------------------------------------------
# Kernels of real-world degradations (Real-ESRGAN's first- and second-order blurs, docs/method.md)
# --------------------------------------------------------------------------------------------------

REAL_KERNEL_KINDS: tuple[str, ...] = (
    "iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
"""Kernel families of :func:`sample_real_kernels`, in the order of its ``probs``."""


def shaped_kernels(sigma_x: Tensor, sigma_y: Tensor, theta: Tensor, beta: Tensor, family: Tensor,
                   size: int = 21, support: Tensor | None = None) -> Tensor:
    """Gaussian-family kernels ``[B, k, k]`` from per-kernel parameters (Real-ESRGAN's kernel zoo).

    With q = vᵀΣ⁻¹v (Σ as in :func:`anisotropic_gaussian`), ``family`` 0 is the Gaussian exp(−q/2), 1 the
    generalized Gaussian exp(−q^β/2) (β = 1: Gaussian; β < 1 heavier tails, β > 1 flatter tops) and 2 the
    plateau 1/(1 + q^β). ``support`` (odd sizes ≤ k, per kernel) zeroes the taps outside a centred
    support×support window, so kernels of several sizes share one k×k canvas. Non-negative, sum to 1.
    """
    _check_gaussian_size(size)
    q = _quadratic_form(sigma_x, sigma_y, theta, size)
    powered = q.clamp_min(0).pow(beta[:, None, None])
    family = family[:, None, None]
    kernels = torch.where(family == 0, torch.exp(-0.5 * q),
                          torch.where(family == 1, torch.exp(-0.5 * powered), 1.0 / (1.0 + powered)))
    if support is not None:
        r = _offsets(size, kernels.device).abs()
        half = (support.to(kernels.device) // 2)[:, None, None]
        inside = (r[None, :, None] <= half) & (r[None, None, :] <= half)
        kernels = kernels * inside
    return _normalise(kernels)


def sinc_kernel(cutoff: Tensor, size: int = 21) -> Tensor:
    """Circular low-pass (2-D sinc) kernels ``[B, k, k]``: k(r) ∝ ω_c J₁(ω_c r) / (2π r), ω_c = ``cutoff``
    in radians per pixel (π: no filtering). They sum to 1 but have negative lobes: the ringing and
    overshoot artefacts of sharpened, resampled photos (Real-ESRGAN's final stage)."""
    _check_gaussian_size(size)
    r = _offsets(size, cutoff.device)
    radius = torch.sqrt(r[None, :, None] ** 2 + r[None, None, :] ** 2)  # [1, k, k]
    w = cutoff[:, None, None]
    safe = torch.where(radius == 0, torch.ones_like(radius), radius)
    kernels = torch.where(radius == 0, w ** 2 / (4 * math.pi),
                          w * torch.special.bessel_j1(w * safe) / (2 * math.pi * safe))
    return _normalise(kernels)


def sample_real_kernels(
    batch: int,
    size: int = 21,
    probs: Sequence[float] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
    sigma_range: tuple[float, float] = (0.2, 3.0),
    betag_range: tuple[float, float] = (0.5, 4.0),
    betap_range: tuple[float, float] = (1.0, 2.0),
    min_size: int = 7,
    generator: torch.Generator | None = None,
    device: DeviceLike = None,
) -> Tensor:
    """Random real-world blur kernels ``[batch, size, size]`` (non-negative, sum 1): a family of
    :data:`REAL_KERNEL_KINDS` drawn with ``probs``, σx (and σy for the anisotropic ones) ~ U(sigma_range),
    θ ~ U(−π, π), β ~ U(betag_range) (generalized) or U(betap_range) (plateau), and a support of odd size
    ~ U{min_size, …, size} — Real-ESRGAN's first-order kernels without the sinc (whose negative taps the
    kernel head cannot represent; the sinc comes in the final stage of the pipeline instead)."""
    _check_batch(batch)
    _check_gaussian_size(size)
    low, high = _check_range("sigma_range", sigma_range)
    bg_low, bg_high = _check_range("betag_range", betag_range)
    bp_low, bp_high = _check_range("betap_range", betap_range)
    weights = torch.as_tensor([float(p) for p in probs], dtype=torch.float64)
    if weights.numel() != len(REAL_KERNEL_KINDS) or not bool((weights >= 0).all()) or float(weights.sum()) <= 0:
        raise ValueError(f"probs={tuple(probs)} is invalid; give {len(REAL_KERNEL_KINDS)} non-negative "
                         f"weights, one per kind of {REAL_KERNEL_KINDS}")
    if not (isinstance(min_size, int) and 1 <= min_size <= size and min_size % 2 == 1):
        raise ValueError(f"min_size={min_size!r} is invalid; use an odd size from 1 to {size}")
    u = _rand((6, batch), generator, torch.float64)
    cumulative = torch.cumsum(weights / weights.sum(), 0)
    kind = torch.searchsorted(cumulative, u[0].contiguous(), right=True).clamp_max(len(REAL_KERNEL_KINDS) - 1)
    isotropic = kind % 2 == 0
    family = kind // 2  # 0 Gaussian, 1 generalized, 2 plateau
    sigma_x = low + (high - low) * u[1]
    sigma_y = torch.where(isotropic, sigma_x, low + (high - low) * u[2])
    theta = torch.where(isotropic, torch.zeros_like(u[3]), math.pi * (2 * u[3] - 1))
    beta = torch.where(family == 1, bg_low + (bg_high - bg_low) * u[4],
                       torch.where(family == 2, bp_low + (bp_high - bp_low) * u[4], torch.ones_like(u[4])))
    sizes = torch.arange(min_size, size + 1, 2, dtype=torch.float64)
    support = sizes[(u[5] * len(sizes)).long().clamp_max(len(sizes) - 1)].long()
    params = [t.float() if device is None else t.float().to(device) for t in (sigma_x, sigma_y, theta, beta)]
    family = family if device is None else family.to(device)
    return shaped_kernels(*params, family, size, support=support)


# --------------------------------------------------------------------------------------------------
# Dispatch for the data pipeline and the command line
# --------------------------------------------------------------------------------------------------


def sample_training_kernels(
    setting: str, batch: int, size: int = 21, generator: torch.Generator | None = None, device: DeviceLike = None
) -> Tensor:
    """``[batch, size, size]`` kernels of a training setting: ``"iso"`` (setting 1), ``"aniso"`` (setting 2)
    or ``"motion"`` (intensity 0.5), with the paper's parameter ranges (docs/method.md §1)."""
    if setting == "iso":
        return sample_isotropic(batch, size, generator=generator, device=device)
    if setting == "aniso":
        return sample_anisotropic(batch, size, generator=generator, device=device)
    if setting == "motion":
        return motion_blur(batch, size, generator=generator, device=device)
    raise ValueError(f"unknown kernel setting {setting!r}; use one of {TRAINING_SETTINGS}")


_SPEC_FORMS = (
    "'iso:SIGMA' (e.g. iso:2.6), 'aniso:SIGMA_X,SIGMA_Y,THETA' (θ in radians, e.g. aniso:1.5,4,0.3), "
    "'motion:INTENSITY' (e.g. motion:0.5), 'random-iso', 'random-aniso', 'random-motion', "
    "or a kernel file (.npy, .png, .mat)"
)


def parse_kernel_spec(
    spec: str, size: int = 21, generator: torch.Generator | None = None, device: DeviceLike = None
) -> Tensor:
    """A command-line kernel description → ``[1, k, k]``.

    Forms: ``iso:σ``, ``aniso:σx,σy,θ`` (no tap noise), ``motion:intensity`` (``size`` is the motion kernel
    size), ``random-iso`` / ``random-aniso`` / ``random-motion`` (training samplers), or a kernel file
    path (its own size is kept).
    """
    text = spec.strip()
    head, sep, tail = text.partition(":")
    if sep and head in ("iso", "aniso", "motion"):
        try:
            values = [float(v) for v in tail.split(",")]
        except ValueError:
            values = []
        expected = {"iso": 1, "aniso": 3, "motion": 1}[head]
        if len(values) != expected or not all(math.isfinite(v) for v in values):
            raise ValueError(f"kernel spec {spec!r} is malformed; accepted forms: {_SPEC_FORMS}")
        if head == "iso":
            return isotropic_gaussian(values[0], size, device=device)
        if head == "aniso":
            return anisotropic_gaussian(*values, size=size, device=device)
        return motion_blur(1, size, values[0], generator=generator, device=device)
    if text.startswith("random-") and text[len("random-") :] in TRAINING_SETTINGS:
        return sample_training_kernels(text[len("random-") :], 1, size, generator=generator, device=device)
    if Path(text).suffix.lower() in KERNEL_FILE_SUFFIXES:
        kernel = validate_kernel(load_kernel(text).numpy(), f"kernel file {text}", square=True)[None]
        return kernel.to(device) if device is not None else kernel
    raise ValueError(f"unknown kernel spec {spec!r}; accepted forms: {_SPEC_FORMS}")
