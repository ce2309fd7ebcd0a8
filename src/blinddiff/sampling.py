"""The MAP reverse process of BlindDiff (SPEC §5, paper Algorithm 2): kernel and image in ONE chain.

At every reverse step t the network gives ε̂ (hence x̂0) and a kernel estimate k̂_t from (x_t, y); the
kernel-aware gradient of the data term E = ‖y − D_s(x̂0 ⊛ k̂_t)‖₂ then steers the next state,

    x_{t−1} = x'_{t−1} − ζ·∂E/∂x_t,

so kernel estimation and image restoration alternate along the reverse process (the unfolded MAP
optimisation of paper §3). The sampler is a plain function over a denoiser callable (k-diffusion style):
``denoiser(x_t, t_original [B], lr) -> (out [B, 2C|C, H, W], kernel [B, k, k])``, exactly MCFormer's
forward; nothing here knows the architecture. The paper's ablations are arguments, not forks: the data
term is a callable built by `kernel_aware_energy` (Algorithm 2), `bicubic_energy` (Table 3's fixed
bicubic term) or None (ζ = 0 of Table 4); `known_kernel` wraps a denoiser to report the ground-truth
kernel (the non-blind upper bound); `tiled` wraps one to run on overlapping tiles; the reverse update
itself is the schedule's (`GaussianDiffusion.step`, DDPM or DDIM).

Unlike the authors' release, the autograd graph of a step is freed before the next one, any batch
size and scale work, and large images can be processed in overlapping tiles at every step with one
shared kernel, so memory is bounded by the tile and not by the image.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .degradation import DOWNSAMPLE_MODES, blur, check_scale, downsample as _downsample_images, \
    estimate_noise_level, matlab_bicubic_resize
from .diffusion import DiffusionConfig, GaussianDiffusion, per_image_noise, space_timesteps

__all__ = [
    "GRADIENTS", "GUIDANCE", "KERNEL_GUIDANCE", "NOISE_FLOOR", "SAMPLERS", "StepInfo", "bicubic_energy", "data_term",
    "kernel_aware_energy", "known_kernel", "noise_aware_energy", "noise_weights", "sample", "sampling_chain",
    "tiled",
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
                       x0_norm_weight: float = 0.0) -> DataTerm:
    """The kernel-aware data term weighted per image by `noise_weights(lr)`: on a clean input (σ̂ ≤
    `NOISE_FLOOR`, what the estimator reads on clean 8-bit images) it is `kernel_aware_energy`; on a noisy
    or JPEG-compressed input the gradient shrinks as 1/σ̂², as MAP prescribes, so the guidance stops
    fitting the noise."""
    base = kernel_aware_energy(lr, scale, downsample, x0_norm_weight=x0_norm_weight)
    weights: Tensor | None = None

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
              x0_norm_weight: float = 0.0) -> DataTerm | None:
    """The data term called `guidance` ("noise-aware" | "kernel-aware" | "bicubic" | "none" → None), as
    options name it."""
    _check_choice("guidance", guidance, GUIDANCE)
    if guidance == "noise-aware":
        return noise_aware_energy(lr, scale, downsample, x0_norm_weight=x0_norm_weight)
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


# --------------------------------------------------------------------------- tiles


@dataclass
class _Tile:
    """An HR window (top, left, height, width) with its normalised blend weight [1, 1, height, width]."""

    top: int
    left: int
    height: int
    width: int
    weight: Tensor

    def hr(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)

    def lr(self, scale: int) -> tuple[slice, slice]:
        # tiles sit on the s-grid, so the HR window maps onto whole LR pixels
        return (
            slice(self.top // scale, (self.top + self.height) // scale),
            slice(self.left // scale, (self.left + self.width) // scale),
        )


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one side: stride tile − overlap, the last one flush with the far border."""
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


def _tile_grid(height: int, width: int, tile: int, overlap: int) -> list[_Tile]:
    """Overlapping tiles covering an HR image; separable weights, so they sum to 1 at every pixel."""
    th, tw = min(tile, height), min(tile, width)
    rows, cols = _tile_starts(height, tile, overlap), _tile_starts(width, tile, overlap)
    wy, wx = _ramps(height, rows, th, overlap), _ramps(width, cols, tw, overlap)
    return [
        _Tile(top, left, th, tw, (wy[i][:, None] * wx[j][None, :])[None, None])
        for i, top in enumerate(rows)
        for j, left in enumerate(cols)
    ]


def tiled(denoiser: Denoiser, tile: int, overlap: int, scale: int, multiple: int = 1) -> Denoiser:
    """The denoiser run on HR tiles of `tile` pixels overlapping by `overlap` (a multiple of the scale), with ε̂
    and v blended by raised-cosine weights and the tiles' mean kernel shared; one tile covering the image is
    exactly the plain call. `multiple`: the network's input size multiple (tiles sit on the lcm of it and
    the scale). Its gradient re-runs each tile (vector-Jacobian products), so memory follows the tile, not
    the image; the network must then be deterministic (eval mode)."""
    _check_tile(tile, overlap, scale, multiple)
    grids: dict[tuple[int, int], list[_Tile]] = {}

    def run(x_t: Tensor, t: Tensor, lr: Tensor) -> tuple[Tensor, Tensor]:
        height, width = x_t.shape[-2:]
        if height <= tile and width <= tile:
            return denoiser(x_t, t, lr)
        if (height, width) not in grids:
            grids[height, width] = _tile_grid(height, width, tile, overlap)
        return _TiledCall.apply(x_t, t, lr, denoiser, grids[height, width], scale)

    return run


class _TiledCall(torch.autograd.Function):
    """(out, k̂) blended over tiles; backward re-runs one tile at a time (its graph freed before the next)."""

    @staticmethod
    def forward(ctx, x_t, t, lr, denoiser, tiles, scale):  # type: ignore[override]
        ctx.save_for_backward(x_t, t, lr)
        ctx.denoiser, ctx.tiles, ctx.scale = denoiser, tiles, scale
        ctx.autocast = _autocast_state(x_t.device)
        ctx.set_materialize_grads(False)
        out = kernel = None
        for tile in tiles:
            (ys, xs), (ly, lx) = tile.hr(), tile.lr(scale)
            part, k = _call(denoiser, x_t[:, :, ys, xs], t, lr[:, :, ly, lx])
            if out is None:
                out = x_t.new_zeros(x_t.shape[0], part.shape[1], *x_t.shape[2:])
                kernel = torch.zeros_like(k)
            out[:, :, ys, xs] += tile.weight.to(part) * part
            kernel = kernel + k
        return out, kernel / len(tiles)

    @staticmethod
    def backward(ctx, grad_out, grad_kernel):  # type: ignore[override]
        x_t, t, lr = ctx.saved_tensors
        grad = torch.zeros_like(x_t)
        for tile in ctx.tiles:
            (ys, xs), (ly, lx) = tile.hr(), tile.lr(ctx.scale)
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                x_tile = x_t[:, :, ys, xs].detach().requires_grad_(True)
                part, k = _call(ctx.denoiser, x_tile, t, lr[:, :, ly, lx])
                with _no_autocast(x_t.device):
                    share = part.new_zeros(())
                    if grad_out is not None:
                        share = share + (part * (tile.weight.to(part) * grad_out[:, :, ys, xs])).sum()
                    if grad_kernel is not None:
                        share = share + (k * grad_kernel).sum() / len(ctx.tiles)
                (g,) = _grad(share, [x_tile])
            grad[:, :, ys, xs] += g
            del part, k, share, g  # free this tile's graph before the next
        return grad, None, None, None, None, None


def _autocast_state(device: torch.device) -> dict:
    """The caller's autocast settings, to re-enter them when a tile is run again in the backward pass."""
    try:
        return {"device_type": device.type, "enabled": torch.is_autocast_enabled(device.type),
                "dtype": torch.get_autocast_dtype(device.type)}
    except (RuntimeError, ValueError):  # a backend without autocast
        return {"device_type": "cpu", "enabled": False}


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
    callback: Callable[[StepInfo], object] | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """BlindDiff's MAP reverse process (paper Algorithm 2, SPEC §5) → (sr [B, C, s·h, s·w] in [0, 1], k̂).

    Per step of `chain` (from `sampling_chain`), from T to 1: (1) out, k̂_t = denoiser(x_t, t, y);
    (2) x̂0 (clipped to [0, 1]) and x'_{t−1} = `chain.step` (DDPM posterior with the learned variance, or
    DDIM with `eta`; no noise at the last step); (3) E = data_term(x̂0, k̂_t); (4) x_{t−1} = x'_{t−1} −
    ζ·∂E/∂x_t, then detached. `gradient="xt"` back-propagates E through the network to x_t (the paper; no
    parameter gradients); "x0" runs the network without autograd and uses ∂E/∂x̂0 in place of ∂E/∂x_t
    (cheaper, an approximation). No data term or ζ = 0 computes no gradient at all.

    `generators`: one per image; x_T and the noise of image b come from generators[b], so a seed gives
    the same image whatever the batch; None → every image gets a generator seeded 0. The callback gets a
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
    gens = _check_generators(generators, batch)
    guided = data_term is not None and zeta > 0.0

    # Never build on an inference tensor: a caller's inference_mode must not break the gradient step.
    with torch.inference_mode(False):
        lr = lr.to(dtype).clone()
        x = per_image_noise(gens, (channels, scale * h, scale * w), device, dtype)  # x_T
        kernel: Tensor | None = None
        for order, index in enumerate(_progress(range(chain.num_steps - 1, -1, -1), progress)):
            p, kernel, energy, grad = _evaluate(denoiser, x, index, chain, lr, data_term, guided, gradient)
            with torch.no_grad(), _no_autocast(device):
                x_next = chain.step(p, x, index, sampler=sampler, eta=eta,
                                    noise=lambda: per_image_noise(gens, x.shape[1:], device, x.dtype))
                if grad is not None:
                    x_next = x_next - zeta * grad.to(x_next.dtype)
            kernel = kernel.detach()
            if callback is not None:
                callback(StepInfo(order, int(chain.timestep_map[index]), x, p["pred_x0"], kernel, energy))
            x = x_next.detach()
            del p, grad, x_next, energy
    assert kernel is not None
    return x.clamp(0.0, 1.0), kernel


def _progress(steps: range, enabled: bool) -> Iterator[int]:
    if not enabled:
        return iter(steps)
    from tqdm.auto import tqdm

    return iter(tqdm(steps, desc="sampling", unit="step"))


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


def _check_tile(tile: object, overlap: object, scale: int, multiple: int) -> None:
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
