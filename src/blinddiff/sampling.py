"""The MAP reverse process of BlindDiff (docs/method.md §4, paper Algorithm 2): kernel and image in ONE chain.

At every reverse step t the network gives ε̂ (hence x̂0) and a kernel estimate k̂_t from (x_t, y); the
kernel-aware gradient of the data term E = ‖y − D_s(x̂0 ⊛ k̂_t)‖₂ then steers the next state,

    x_{t−1} = x'_{t−1} − ζ·∂E/∂x_t,

so kernel estimation and image restoration alternate along the reverse process (the unfolded MAP
optimisation of paper §3). The sampler is a plain function over a denoiser callable (k-diffusion style):
``denoiser(x_t, t_original [B], lr) -> (out [B, 2C|C, H, W], kernel [B, k, k])``, exactly MCFormer's
forward; nothing here knows the architecture. The paper's ablations are arguments, not forks: the data
term is a callable built by `kernel_aware_energy` (Algorithm 2), `bicubic_energy` (Table 3's fixed
bicubic term) or None (ζ = 0 of Table 4); `known_kernel` wraps a denoiser to report the ground-truth
kernel (the non-blind upper bound); the reverse update itself is the schedule's
(`GaussianDiffusion.ddpm_step` or `ddim_step`, chosen by `reverse_step`).

Unlike the authors' release, the autograd graph of a step is freed before the next one, any batch
size and scale work, and an image of any size can be processed as overlapping windows (`sample_windows`),
each running the whole reverse process, so memory follows the window and not the image (docs/method.md,
"Images of any size").
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .degradation import DOWNSAMPLE_MODES, blur, check_scale, downsample as _downsample_images, \
    estimate_noise_level, matlab_bicubic_resize
from .diffusion import DiffusionConfig, GaussianDiffusion, space_timesteps

__all__ = [
    "GRADIENTS", "GUIDANCE", "KERNEL_GUIDANCE", "NOISE_FLOOR", "SAMPLERS", "PositionalNoise", "StepInfo", "Window",
    "bicubic_energy", "data_term", "kernel_aware_energy", "known_kernel", "noise_aware_energy", "noise_weights",
    "reverse_step", "sample", "sample_windows", "sampling_chain", "window_grid",
]

GUIDANCE = ("noise-aware", "kernel-aware", "bicubic", "none")  # the data terms by name (`data_term`)
KERNEL_GUIDANCE = ("noise-aware", "kernel-aware")  # the data terms that use the kernel (bicubic: a fixed one)
NOISE_FLOOR = 2.0  # σ̂ (0–255) up to which the noise-aware data term keeps the weight ζ was tuned at
GRADIENTS = ("xt", "x0")
SAMPLERS = ("ddpm", "ddim")

Denoiser = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]  # (x_t, t_original [B], lr) -> (out, k̂)
DataTerm = Callable[[Tensor, Tensor], Tensor]  # (x̂0 [B, C, H, W], k̂ [B, k, k]) -> E [B]


@dataclass
class StepInfo:
    """What the per-step callback receives (all tensors detached)."""

    index: int  # 0 … steps−1 in sampling order
    t: int  # original timestep (0 … T−1) the network was shown
    x_t: Tensor  # the state entering this step [B, C, H, W]
    x0: Tensor  # x̂0 [B, C, H, W], clipped to [0, 1]
    kernel: Tensor  # k̂_t [B, k, k], or the given kernel in non-blind mode
    energy: Tensor  # E per image [B] (also reported when ζ = 0; zeros without a data term)


# --------------------------------------------------------------------------- chain and data terms


def sampling_chain(diffusion_cfg: DiffusionConfig, steps: int) -> GaussianDiffusion:
    """The T-step chain respaced to `steps` evenly spaced steps, always ending at T−1 (IDDPM respacing)."""
    if not isinstance(diffusion_cfg, DiffusionConfig):
        raise ValueError(f"diffusion_cfg is a {type(diffusion_cfg).__name__}: pass a DiffusionConfig")
    total = diffusion_cfg.steps
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= total:
        raise ValueError(f"steps={steps!r}: must be an int in [1, {total}] (the release samples with 500)")
    base = GaussianDiffusion.from_config(replace(diffusion_cfg, train_steps=None))
    # one step means one jump from pure noise, not the nearly noise-free step 0
    kept = [total - 1] if steps == 1 else space_timesteps(total, int(steps))
    return base.respace(kept)


def reverse_step(chain: GaussianDiffusion, sampler: str = "ddpm", eta: float = 0.0) -> Callable[..., Tensor]:
    """The update x'_{t−1} of Algorithm 2's step 2 that `sampler` names, as ``(p, x_t, t, *, noise)``:
    `chain.ddpm_step`, or `chain.ddim_step` with `eta`."""
    _check_choice("sampler", sampler, SAMPLERS)
    return chain.ddpm_step if sampler == "ddpm" else functools.partial(chain.ddim_step, eta=eta)


def kernel_aware_energy(lr: Tensor, scale: int, downsample: str = "bicubic", *,
                        x0_norm_weight: float = 0.0) -> DataTerm:
    """E(x̂0, k̂) = ‖y − D_s(x̂0 ⊛ k̂)‖₂ per image (paper Eq. 12, un-squared): blur with k̂ ([B, k, k] or [k, k]),
    then ↓s with `downsample` (the data's downsampler). Adds x0_norm_weight·‖x̂0‖ (the release's undocumented
    0.1·‖x̂0‖ term). Computed in float32 or better; differentiable w.r.t. x̂0 and k̂."""
    _check_choice("downsample", downsample, DOWNSAMPLE_MODES)

    def degrade(x: Tensor, kernel: Tensor | None) -> Tensor:
        if kernel is None:
            raise ValueError("the kernel-aware data term needs a kernel [B, k, k]; pass one or use bicubic_energy")
        return _downsample_images(blur(x, kernel.to(x.dtype)), scale, downsample)

    return _energy(lr, scale, x0_norm_weight, degrade)


def noise_weights(lr: Tensor, floor: float = NOISE_FLOOR) -> Tensor:
    """min(1, floor²/σ̂²) per image [B], σ̂ = `estimate_noise_level(lr)`: the 1/σ² of the MAP data term
    −log p(y | x, k) = ‖y − D_s(x ⊛ k)‖²/(2σ²), relative to the clean inputs on which ζ was tuned."""
    sigma = estimate_noise_level(lr)
    return (floor ** 2 / sigma.clamp_min(1e-6).square()).clamp(max=1.0)


def noise_aware_energy(lr: Tensor, scale: int, downsample: str = "bicubic", *,
                       x0_norm_weight: float = 0.0, weights: Tensor | None = None) -> DataTerm:
    """The kernel-aware data term weighted per image by `noise_weights(lr)`: on a clean input (σ̂ ≤
    `NOISE_FLOOR`, what the estimator reads on clean 8-bit images) it is `kernel_aware_energy`; on a noisy
    or JPEG-compressed input the gradient shrinks as 1/σ̂², as MAP prescribes, so the guidance stops
    fitting the noise. `weights` [B]: given (e.g. those of the whole image, for a window of it) instead."""
    base = kernel_aware_energy(lr, scale, downsample, x0_norm_weight=x0_norm_weight)

    def energy(x0: Tensor, kernel: Tensor | None) -> Tensor:
        nonlocal weights
        if weights is None:  # estimated once, at the first step
            weights = noise_weights(lr)
        return weights.to(device=x0.device) * base(x0, kernel)

    return energy


def bicubic_energy(lr: Tensor, scale: int, *, x0_norm_weight: float = 0.0) -> DataTerm:
    """E(x̂0) = ‖y − bicubic↓s(x̂0)‖₂: the fixed bicubic degradation of the Table 3 ablation (MATLAB bicubic
    whatever the data's downsampler; the kernel is not used)."""
    return _energy(lr, scale, x0_norm_weight,
                   lambda x, kernel: x if scale == 1 else matlab_bicubic_resize(x, scale=1.0 / scale))


def data_term(guidance: str, lr: Tensor, scale: int, downsample: str = "bicubic", *,
              x0_norm_weight: float = 0.0, noise_weights: Tensor | None = None) -> DataTerm | None:
    """The data term called `guidance` ("noise-aware" | "kernel-aware" | "bicubic" | "none" → None), as
    options name it; `noise_weights`: the noise-aware term's weights, if already known."""
    _check_choice("guidance", guidance, GUIDANCE)
    if guidance == "noise-aware":
        return noise_aware_energy(lr, scale, downsample, x0_norm_weight=x0_norm_weight, weights=noise_weights)
    if guidance == "kernel-aware":
        return kernel_aware_energy(lr, scale, downsample, x0_norm_weight=x0_norm_weight)
    if guidance == "bicubic":
        return bicubic_energy(lr, scale, x0_norm_weight=x0_norm_weight)
    return None


def _energy(lr: Tensor, scale: int, x0_norm_weight: float,
            degrade: Callable[[Tensor, Tensor | None], Tensor]) -> DataTerm:
    """‖y − degrade(x̂0, k̂)‖₂ (+ x0_norm_weight·‖x̂0‖) per image, with the arguments checked once."""
    scale = check_scale(scale)
    x0_norm_weight = _check_nonnegative("x0_norm_weight", x0_norm_weight)
    if not isinstance(lr, Tensor) or lr.ndim != 4:
        raise ValueError(f"lr must be a tensor [B, C, h, w], got {_describe(lr)}")

    def energy(x0: Tensor, kernel: Tensor | None) -> Tensor:
        if not isinstance(x0, Tensor) or x0.ndim != 4 or not x0.is_floating_point():
            raise ValueError(f"x0 must be a floating tensor [B, C, H, W], got {_describe(x0)}")
        want = (x0.shape[0], x0.shape[1], math.ceil(x0.shape[2] / scale), math.ceil(x0.shape[3] / scale))
        if tuple(lr.shape) != want:
            raise ValueError(
                f"lr shape {tuple(lr.shape)} does not match x0 {tuple(x0.shape)} at scale {scale}: expected {want}"
            )
        x = x0.to(torch.promote_types(torch.promote_types(x0.dtype, lr.dtype), torch.float32))
        value = torch.linalg.vector_norm((lr.to(x.dtype) - degrade(x, kernel)).flatten(1), dim=1)
        if x0_norm_weight:
            value = value + x0_norm_weight * torch.linalg.vector_norm(x.flatten(1), dim=1)
        return value

    return energy


# --------------------------------------------------------------------------- denoiser wrappers


def known_kernel(denoiser: Denoiser, kernel: Tensor) -> Denoiser:
    """The denoiser reporting the given kernel ([B, k, k] or one shared [k, k]) instead of its k̂_t: the
    non-blind mode, where the data term uses the true kernel."""
    if not isinstance(kernel, Tensor) or kernel.ndim not in (2, 3) or not kernel.is_floating_point():
        raise ValueError(f"kernel must be a floating tensor [B, k, k] or [k, k], got {_describe(kernel)}")
    if not bool(torch.isfinite(kernel).all()):
        raise ValueError("kernel contains NaN or infinite taps; pass a valid kernel")
    kernel = kernel if kernel.ndim == 3 else kernel.unsqueeze(0)

    def with_kernel(x_t: Tensor, t: Tensor, lr: Tensor) -> tuple[Tensor, Tensor]:
        batch, (height, width) = x_t.shape[0], x_t.shape[-2:]
        if kernel.shape[0] not in (1, batch):
            raise ValueError(f"kernel shape {tuple(kernel.shape)} does not match the batch of {batch} images: "
                             f"pass [{batch}, k, k] or one shared [k, k]")
        kh, kw = kernel.shape[-2:]
        if kh // 2 >= height or kw // 2 >= width:
            raise ValueError(f"kernel {kh}×{kw} is too large for the {height}×{width} output; use a smaller kernel")
        out, _ = denoiser(x_t, t, lr)
        return out, kernel.to(device=x_t.device, dtype=x_t.dtype).expand(batch, kh, kw)

    return with_kernel


# --------------------------------------------------------------------------- noise that windows agree on


class PositionalNoise:
    """N(0, I) noise as a function of (image seed, draw, HR position): a window of an image gets exactly the
    noise the whole image has there, so overlapping windows (`sample_windows`) start from, and add, the same
    noise, and one window covering the image is the untiled run. Drawn in `block`×`block` squares, each from a
    generator seeded by (seed, draw, square row, square column); draw 0 is x_T, draw i the noise of step i."""

    block = 64

    def __init__(self, seeds: Sequence[int]) -> None:
        self.seeds = [int(seed) for seed in seeds]

    @classmethod
    def from_generators(cls, generators: Sequence[torch.Generator]) -> "PositionalNoise":
        """One seed per image, drawn from its generator (so a seeded generator gives the same image)."""
        return cls([int(torch.randint(0, 2**63 - 1, (1,), generator=g)) for g in generators])

    def __call__(self, draw: int, channels: int, window: tuple[int, int, int, int], device: torch.device,
                 dtype: torch.dtype) -> Tensor:
        """The noise [B, channels, height, width] of HR window (top, left, height, width)."""
        top, left, height, width = window
        size = self.block
        out = torch.empty(len(self.seeds), channels, height, width)
        for row in range(top // size, (top + height - 1) // size + 1):
            for col in range(left // size, (left + width - 1) // size + 1):
                y0, y1 = max(top, row * size), min(top + height, (row + 1) * size)
                x0, x1 = max(left, col * size), min(left + width, (col + 1) * size)
                for b, seed in enumerate(self.seeds):
                    generator = torch.Generator().manual_seed(_mix(seed, draw, row, col))
                    square = torch.randn(channels, size, size, generator=generator)
                    out[b, :, y0 - top:y1 - top, x0 - left:x1 - left] = \
                        square[:, y0 - row * size:y1 - row * size, x0 - col * size:x1 - col * size]
        return out.to(device=device, dtype=dtype)


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): neighbouring squares and draws get unrelated streams."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value % 2**64)) * 0xBF58476D1CE4E5B9 % 2**64
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB % 2**64
        state ^= state >> 29
    return state >> 1


# --------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class Window:
    """An HR window (top, left, height, width) on the s-grid, with its separable blend weights (1-D)."""

    top: int
    left: int
    height: int
    width: int
    row_weight: Tensor  # [height], float64
    col_weight: Tensor  # [width], float64

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.top, self.left, self.height, self.width

    def weight(self) -> Tensor:
        """The blend weight [1, 1, height, width]; over all windows they sum to 1 at every pixel."""
        return (self.row_weight[:, None] * self.col_weight[None, :])[None, None]

    def area(self) -> float:
        """The window's share of the image's pixels (Σ of its blend weight)."""
        return float(self.row_weight.sum() * self.col_weight.sum())

    def lr(self, scale: int) -> tuple[slice, slice]:
        return (slice(self.top // scale, (self.top + self.height) // scale),
                slice(self.left // scale, (self.left + self.width) // scale))


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Window origins along one side: stride tile − overlap, the last one flush with the far border."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def _ramps(length: int, starts: list[int], size: int, overlap: int) -> list[Tensor]:
    """Raised-cosine ramps over the overlap (not at the image border), normalised to sum 1 per pixel."""
    ramp = torch.sin(0.5 * math.pi * (torch.arange(overlap, dtype=torch.float64) + 0.5) / max(overlap, 1)) ** 2
    windows = []
    for start in starts:
        w = torch.ones(size, dtype=torch.float64)
        if overlap and start > 0:
            w[:overlap] = torch.minimum(w[:overlap], ramp)
        if overlap and start + size < length:
            w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0))
        windows.append(w)
    total = torch.zeros(length, dtype=torch.float64)
    for start, w in zip(starts, windows):
        total[start : start + size] += w
    return [w / total[start : start + size] for start, w in zip(starts, windows)]


def window_grid(height: int, width: int, tile: int | None, overlap: int) -> list[Window]:
    """Overlapping windows covering an HR image of height×width, row by row (None: one window, the image)."""
    if tile is None:
        return [Window(0, 0, height, width, torch.ones(height, dtype=torch.float64),
                       torch.ones(width, dtype=torch.float64))]
    th, tw = min(tile, height), min(tile, width)
    rows, cols = _tile_starts(height, tile, overlap), _tile_starts(width, tile, overlap)
    wy, wx = _ramps(height, rows, th, overlap), _ramps(width, cols, tw, overlap)
    return [Window(top, left, th, tw, wy[i], wx[j]) for i, top in enumerate(rows) for j, left in enumerate(cols)]


def sample_windows(
    denoiser: Denoiser,
    lr: Tensor,
    chain: GaussianDiffusion,
    *,
    scale: int,
    write: Callable[[int, Tensor], object],
    tile: int | None = None,
    overlap: int = 0,
    multiple: int = 1,
    data_term: Callable[[Tensor], DataTerm | None] | None = None,
    noise: PositionalNoise | None = None,
    callback: Callable[[StepInfo], object] | None = None,
    progress: bool = False,
    **options: Any,
) -> Tensor:
    """The whole reverse process (`sample`) on overlapping HR windows of `tile` pixels, one at a time, blended
    with raised-cosine weights (docs/method.md, "Images of any size") → k̂ [B, k, k], the windows' kernels
    averaged by their share of the image. tile=None: one window, exactly `sample`.

    Each window runs every step on its own LR crop: its x_t, noise, x̂0 and data-term gradient are window-sized,
    and the noise is the image's (`PositionalNoise`), so overlaps agree. `data_term(lr_window)` builds a
    window's data term; it is weighted by √(window area / image area), so that ζ·∂E/∂x keeps the size it has
    on the whole image (E = ‖y − D_s(x̂0 ⊛ k̂)‖ is un-squared: its gradient is r/‖r‖, and a window's ‖r‖ is
    √(share) of the image's when the residual is spread evenly). The result leaves through `write(top, band)`:
    bands [B, C, rows, s·w] of finished HR rows from `top` on, top to bottom; only the band of rows that a
    window still touches is held in float, so memory follows the window and the image width, not the image.
    `callback` (a `StepInfo` per step) needs a single window. `multiple`: the network's input size multiple
    (tiles sit on the lcm of it and the scale).
    """
    scale = check_scale(scale)
    if tile is not None:
        check_tile(tile, overlap, scale, multiple)
    if not isinstance(lr, Tensor) or lr.ndim != 4:
        raise ValueError(f"lr must be a floating tensor [B, C, h, w] in [0, 1], got {_describe(lr)}")
    batch, channels, h, w = lr.shape
    height, width = scale * h, scale * w
    windows = window_grid(height, width, tile, overlap)
    if callback is not None and len(windows) > 1:
        raise ValueError(f"a per-step callback needs the image in one window; this one takes {len(windows)} "
                         f"windows of {tile} pixels: process it untiled (a larger memory budget) or without it")
    noise = noise or PositionalNoise([0] * batch)
    meter = _StepMeter(len(windows) * chain.num_steps, progress)
    band: Tensor | None = None  # HR rows [band_top, band_top + band.shape[2]) still being blended
    band_top, kernel_sum = 0, None
    try:
        for window in windows:
            if window.top > band_top and band is not None:  # rows above this window are finished
                done = window.top - band_top
                write(band_top, band[:, :, :done])
                band, band_top = band[:, :, done:], window.top
            rows_needed = window.top + window.height - band_top
            if band is None or band.shape[2] < rows_needed:
                grown = lr.new_zeros(batch, channels, rows_needed, width, dtype=torch.float32, device="cpu")
                if band is not None:
                    grown[:, :, : band.shape[2]] = band
                band = grown
            ly, lx = window.lr(scale)
            crop = lr[:, :, ly, lx]
            term = None if data_term is None else data_term(crop)
            if term is not None and len(windows) > 1:
                term = _weighted(term, math.sqrt(window.height * window.width / (height * width)))
            sr, kernel = sample(denoiser, crop, chain, scale=scale, data_term=term, noise=noise,
                                origin=(window.top, window.left), callback=_chain(callback, meter), **options)
            rows = slice(window.top - band_top, window.top - band_top + window.height)
            cols = slice(window.left, window.left + window.width)
            band[:, :, rows, cols] += (window.weight() * sr.double().cpu()).float()
            share = window.area() / (height * width)
            kernel_sum = kernel * share if kernel_sum is None else kernel_sum + kernel * share
            del sr
        assert band is not None and kernel_sum is not None
        write(band_top, band)
    finally:
        meter.close()
    return kernel_sum


def _weighted(term: DataTerm, factor: float) -> DataTerm:
    return lambda x0, kernel: factor * term(x0, kernel)


def _chain(*callbacks: Callable[[StepInfo], object] | None) -> Callable[[StepInfo], object]:
    def call(info: StepInfo) -> None:
        for callback in callbacks:
            if callback is not None:
                callback(info)

    return call


class _StepMeter:
    """Progress over steps: a tqdm bar on a terminal; elsewhere (a log file, a pipe) a plain line at most every
    `interval` seconds and one at the end, so no escape codes reach the log."""

    interval = 10.0

    def __init__(self, total: int, enabled: bool, desc: str = "sampling") -> None:
        self.total, self.done, self.desc, self.bar = total, 0, desc, None
        self.enabled = enabled
        self.started = self.shown = time.monotonic()
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def __call__(self, info: StepInfo | None = None) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled and (self.done == self.total or time.monotonic() - self.shown >= self.interval):
            self.shown = time.monotonic()
            print(f"{self.desc}: {self.done}/{self.total} steps, {self.shown - self.started:.0f} s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- network evaluation


def _call(model: Denoiser, x_t: Tensor, t: Tensor, lr: Tensor) -> tuple[Tensor, Tensor]:
    """One network call, outputs checked and cast to x_t's dtype (autocast may return half precision)."""
    result = model(x_t, t, lr)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise ValueError(f"model returned {type(result).__name__}: it must return (out, kernel)")
    out, kernel = result
    if not isinstance(kernel, Tensor) or kernel.ndim != 3 or kernel.shape[0] != x_t.shape[0]:
        raise ValueError(f"model kernel output {_describe(kernel)}: expected [{x_t.shape[0]}, k, k]")
    return out.to(x_t.dtype), kernel.to(x_t.dtype)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The data term and the update run in full precision even when the caller autocasts the network."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a backend without autocast
        return contextlib.nullcontext()


def _evaluate(
    denoiser: Denoiser, x_t: Tensor, index: int, chain: GaussianDiffusion, lr: Tensor,
    energy_fn: DataTerm | None, guided: bool, gradient: str,
) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor | None]:
    """Steps (1)-(3) of Algorithm 2: network, x̂0 and posterior, E and its gradient (None if unguided).

    Returns (p_mean_variance dict, detached; k̂_t; E [B]; ∂E/∂x_t — or ∂E/∂x̂0 for gradient="x0").
    """
    t_model = chain.model_timesteps(torch.full((x_t.shape[0],), index, dtype=torch.long, device=x_t.device))
    if guided and gradient == "xt":
        # the paper: back-propagate E through the network to x_t; no parameter gradients
        with torch.enable_grad():
            x_leaf = x_t.detach().requires_grad_(True)
            out, kernel = _call(denoiser, x_leaf, t_model, lr)
            with _no_autocast(x_t.device):
                p = chain.p_mean_variance(out, x_leaf, index, clip_x0=True)
                energy = energy_fn(p["pred_x0"], kernel)
                (grad,) = _grad(energy, [x_leaf])
        return {k: v.detach() for k, v in p.items()}, kernel.detach(), energy.detach(), grad
    with torch.no_grad():
        out, kernel = _call(denoiser, x_t, t_model, lr)
    with _no_autocast(x_t.device):
        p = chain.p_mean_variance(out, x_t, index, clip_x0=True)
        if energy_fn is None:
            return p, kernel, p["pred_x0"].new_zeros(x_t.shape[0]), None
        if not guided:  # E is still reported (ζ = 0 of Table 4)
            with torch.no_grad():
                return p, kernel, energy_fn(p["pred_x0"], kernel), None
        with torch.enable_grad():
            # cheap variant: ∂E/∂x̂0 stands in for ∂E/∂x_t (no backward through the network)
            x0 = p["pred_x0"].detach().requires_grad_(True)
            energy = energy_fn(x0, kernel)
            (grad,) = _grad(energy, [x0])
    return p, kernel, energy.detach(), grad


def _grad(energy: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    """∂(Σ E)/∂inputs; an input E does not depend on gets zeros; only these inputs are differentiated."""
    if not energy.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(energy.sum(), inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


# --------------------------------------------------------------------------- the sampler


def sample(
    denoiser: Denoiser,
    lr: Tensor,
    chain: GaussianDiffusion,
    *,
    scale: int,
    data_term: DataTerm | None = None,
    zeta: float = 1.0,
    gradient: str = "xt",
    sampler: str = "ddpm",
    eta: float = 0.0,
    generators: Sequence[torch.Generator] | None = None,
    noise: PositionalNoise | None = None,
    origin: tuple[int, int] = (0, 0),
    callback: Callable[[StepInfo], object] | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """BlindDiff's MAP reverse process (paper Algorithm 2, docs/method.md §4) → (sr [B, C, s·h, s·w] in [0, 1], k̂).

    Per step of `chain` (from `sampling_chain`), from T to 1: (1) out, k̂_t = denoiser(x_t, t, y);
    (2) x̂0 (clipped to [0, 1]) and x'_{t−1} = `chain.ddpm_step` (the posterior with the learned variance) or
    `chain.ddim_step` (with `eta`), no noise at the last step; (3) E = data_term(x̂0, k̂_t); (4) x_{t−1} = x'_{t−1} −
    ζ·∂E/∂x_t, then detached. `gradient="xt"` back-propagates E through the network to x_t (the paper; no
    parameter gradients); "x0" runs the network without autograd and uses ∂E/∂x̂0 in place of ∂E/∂x_t
    (cheaper, an approximation). No data term or ζ = 0 computes no gradient at all.

    `generators`: one per image; x_T and the noise of image b come from generators[b] (through one seed drawn
    from it, `PositionalNoise.from_generators`), so a seed gives the same image whatever the batch; None →
    every image gets a generator seeded 0. Or give the `noise` itself, and `origin`, the HR (top, left) of
    this image in a larger one whose noise it is (a window of `sample_windows`). The callback gets a
    `StepInfo` after every step. Returns the final kernel: k̂ of the last step.
    """
    check_options(sampler=sampler, eta=eta, zeta=zeta, gradient=gradient)
    scale, zeta, eta = check_scale(scale), float(zeta), float(eta)
    if not isinstance(chain, GaussianDiffusion):
        raise ValueError(f"chain is a {type(chain).__name__}: build it with sampling_chain(cfg.diffusion, steps)")
    if not callable(denoiser):
        raise ValueError(f"denoiser is a {type(denoiser).__name__}: pass a callable (x_t, t, lr) -> (out, kernel)")
    if data_term is not None and not callable(data_term):
        raise ValueError(f"data_term is a {type(data_term).__name__}: build it with kernel_aware_energy or None")
    if not isinstance(lr, Tensor) or lr.ndim != 4 or not lr.is_floating_point():
        raise ValueError(f"lr must be a floating tensor [B, C, h, w] in [0, 1], got {_describe(lr)}")
    if not bool(torch.isfinite(lr).all()):
        raise ValueError("lr: input contains NaN or infinite values; clean or re-read the image before sampling")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback is a {type(callback).__name__}: pass a function of StepInfo or None")
    batch, channels, h, w = lr.shape
    if batch < 1 or h < 1 or w < 1:
        raise ValueError(f"lr shape {tuple(lr.shape)}: need at least one image of at least 1×1 pixels")
    dtype = torch.promote_types(lr.dtype, torch.float32)
    device = lr.device
    if noise is None:
        noise = PositionalNoise.from_generators(_check_generators(generators, batch))
    elif generators is not None:
        raise ValueError("give generators or noise, not both")
    elif not isinstance(noise, PositionalNoise) or len(noise.seeds) != batch:
        raise ValueError(f"noise must be a PositionalNoise with one seed per image ({batch})")
    box = (int(origin[0]), int(origin[1]), scale * h, scale * w)
    guided = data_term is not None and zeta > 0.0
    step = reverse_step(chain, sampler, eta)
    if not guided and callback is None:
        data_term = None  # E would only be reported: not worth its image-sized tensors

    # Never build on an inference tensor: a caller's inference_mode must not break the gradient step.
    with torch.inference_mode(False):
        lr = lr.to(dtype).clone()
        x = noise(0, channels, box, device, dtype)  # x_T
        kernel: Tensor | None = None
        meter = _StepMeter(chain.num_steps, progress)
        for order, index in enumerate(range(chain.num_steps - 1, -1, -1)):
            p, kernel, energy, grad = _evaluate(denoiser, x, index, chain, lr, data_term, guided, gradient)
            with torch.no_grad(), _no_autocast(device):
                x_next = step(p, x, index, noise=lambda: noise(order + 1, channels, box, device, x.dtype))
                if grad is not None:
                    x_next = x_next - zeta * grad.to(x_next.dtype)
            kernel = kernel.detach()
            if callback is not None:
                callback(StepInfo(order, int(chain.timestep_map[index]), x, p["pred_x0"], kernel, energy))
            x = x_next.detach()
            del p, grad, x_next, energy
            meter()
        meter.close()
    assert kernel is not None
    return x.clamp(0.0, 1.0), kernel


# --------------------------------------------------------------------------- argument checks


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is unknown; choose one of {', '.join(choices)}")


def _check_nonnegative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < math.inf:
        raise ValueError(f"{name}={value!r}: must be a finite number >= 0 (NaN and negatives are not allowed)")
    return float(value)


def _check_generators(generators: Sequence[torch.Generator] | None, batch: int) -> list[torch.Generator]:
    if generators is None:
        return [torch.Generator().manual_seed(0) for _ in range(batch)]
    if isinstance(generators, torch.Generator):
        generators = [generators]
    gens = list(generators)
    if len(gens) != batch or not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError(
            f"generators: got {len(gens)} items for {batch} images; pass one torch.Generator per image "
            "(e.g. [torch.Generator().manual_seed(s) for s in seeds]) or None"
        )
    return gens


def check_options(*, sampler: str = "ddpm", eta: float = 0.0, zeta: float = 1.0, gradient: str = "xt") -> None:
    """The checks of `sample` that do not depend on the images, so a caller can make them once, up front."""
    _check_choice("sampler", sampler, SAMPLERS)
    _check_choice("gradient", gradient, GRADIENTS)
    _check_nonnegative("zeta", zeta)
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta={eta!r}: must be a number in [0, 1] (0 = deterministic DDIM, 1 ≈ DDPM)")


def check_tile(tile: object, overlap: object, scale: int, multiple: int) -> None:
    need = math.lcm(check_scale(scale), multiple)
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1 or tile % need:
        suggestion = need * max(1, round(tile / need)) if isinstance(tile, int) and not isinstance(tile, bool) else need
        raise ValueError(
            f"tile={tile!r}: must be a positive multiple of {need} HR pixels (lcm of scale {scale} and the "
            f"model's size multiple {multiple}); try tile={suggestion}"
        )
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0 or overlap % scale or overlap >= tile:
        raise ValueError(
            f"tile_overlap={overlap!r}: must be an int in [0, tile={tile}) and a multiple of the scale {scale} "
            f"(e.g. {min(scale * 8, tile - scale)})"
        )
