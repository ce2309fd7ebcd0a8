"""The MAP reverse process of BlindDiff (SPEC §5, paper Algorithm 2): kernel and image in ONE chain.

At every reverse step t the network gives ε̂ (hence x̂0) and a kernel estimate k̂_t from (x_t, y); the
kernel-aware gradient of the data term E = ‖y − D_s(x̂0 ⊛ k̂_t)‖₂ then steers the next state,

    x_{t−1} = x'_{t−1} − ζ·∂E/∂x_t,

so kernel estimation and image restoration alternate along the reverse process (the unfolded MAP
optimisation of paper §3). Samplers are plain functions over a denoiser callable (k-diffusion style):
``model(x_t, t_original [B], lr) -> (out [B, 2C|C, H, W], kernel [B, k, k])``, exactly MCFormer's
forward; nothing here knows the architecture. The paper's ablations are arguments, not forks:
``guidance`` = "kernel-aware" (Algorithm 2) | "bicubic" (Table 3's fixed bicubic term) | "none"
(ζ = 0 of Table 4); ``kernel=`` gives the ground-truth kernel (non-blind upper bound).

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

from .degradation import DOWNSAMPLE_MODES, blur, downsample as _downsample_images, matlab_bicubic_resize
from .diffusion import DiffusionConfig, GaussianDiffusion, space_timesteps

__all__ = ["GRADIENTS", "GUIDANCE", "SAMPLERS", "StepInfo", "data_energy", "sample", "sampling_chain"]

GUIDANCE = ("kernel-aware", "bicubic", "none")
GRADIENTS = ("xt", "x0")
SAMPLERS = ("ddpm", "ddim")

Denoiser = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]  # (x_t, t_original [B], lr) -> (out, k̂)


@dataclass
class StepInfo:
    """What the per-step callback receives (all tensors detached)."""

    index: int  # 0 … steps−1 in sampling order
    t: int  # original timestep (0 … T−1) the network was shown
    x_t: Tensor  # the state entering this step [B, C, H, W]
    x0: Tensor  # x̂0 [B, C, H, W] (clipped to [0, 1] when clip_x0)
    kernel: Tensor  # k̂_t [B, k, k], or the given kernel in non-blind mode
    energy: Tensor  # E per image [B] (also reported when ζ = 0; zeros when guidance is "none")


# --------------------------------------------------------------------------- chain and data term


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


def data_energy(
    x0: Tensor,
    kernel: Tensor | None,
    lr: Tensor,
    scale: int,
    *,
    guidance: str = "kernel-aware",
    downsample: str = "bicubic",
    x0_norm_weight: float = 0.0,
) -> Tensor:
    """Data term E per image [B] of paper Eq. (12) / SPEC §5: ‖y − D_s(x̂0 ⊛ k̂)‖₂ (un-squared L2 norm).

    "kernel-aware": blur with `kernel` ([B, k, k] or [k, k]) then ↓s with `downsample` (the data's
    downsampler); "bicubic": ‖y − bicubic↓s(x̂0)‖, the fixed bicubic degradation of the Table 3
    ablation (MATLAB bicubic whatever `downsample` says; `kernel` unused); "none": zeros. Adds
    x0_norm_weight·‖x̂0‖ (the release's undocumented 0.1·‖x̂0‖ term). Computed in float32 or better;
    differentiable w.r.t. x0 and kernel.
    """
    _check_choice("guidance", guidance, GUIDANCE)
    _check_choice("downsample", downsample, DOWNSAMPLE_MODES)
    scale = _check_scale(scale)
    x0_norm_weight = _check_nonnegative("x0_norm_weight", x0_norm_weight)
    if not isinstance(x0, Tensor) or x0.ndim != 4 or not x0.is_floating_point():
        raise ValueError(f"x0 must be a floating tensor [B, C, H, W], got {_describe(x0)}")
    if not isinstance(lr, Tensor) or lr.ndim != 4:
        raise ValueError(f"lr must be a tensor [B, C, h, w], got {_describe(lr)}")
    want = (x0.shape[0], x0.shape[1], math.ceil(x0.shape[2] / scale), math.ceil(x0.shape[3] / scale))
    if tuple(lr.shape) != want:
        raise ValueError(
            f"lr shape {tuple(lr.shape)} does not match x0 {tuple(x0.shape)} at scale {scale}: expected {want}"
        )
    dtype = torch.promote_types(torch.promote_types(x0.dtype, lr.dtype), torch.float32)
    if guidance == "none":
        return x0.new_zeros(x0.shape[0], dtype=dtype)
    x = x0.to(dtype)
    if guidance == "kernel-aware":
        if kernel is None:
            raise ValueError("guidance='kernel-aware' needs a kernel [B, k, k]; pass one or use guidance='bicubic'")
        predicted = _downsample_images(blur(x, kernel.to(dtype)), scale, downsample)
    else:
        predicted = x if scale == 1 else matlab_bicubic_resize(x, scale=1.0 / scale)
    energy = torch.linalg.vector_norm((lr.to(dtype) - predicted).flatten(1), dim=1)
    if x0_norm_weight:
        energy = energy + x0_norm_weight * torch.linalg.vector_norm(x.flatten(1), dim=1)
    return energy


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


def _forward(
    model: Denoiser, x_t: Tensor, t: Tensor, lr: Tensor, tiles: list[_Tile] | None, scale: int
) -> tuple[Tensor, Tensor]:
    """(out, k̂) on the whole image, or blended over tiles with the tiles' mean kernel."""
    if tiles is None:
        return _call(model, x_t, t, lr)
    out = kernel = None
    for tile in tiles:
        (ys, xs), (ly, lx) = tile.hr(), tile.lr(scale)
        part, k = _call(model, x_t[:, :, ys, xs], t, lr[:, :, ly, lx])
        if out is None:
            out = x_t.new_zeros(x_t.shape[0], part.shape[1], *x_t.shape[2:])
            kernel = torch.zeros_like(k)
        out[:, :, ys, xs] += tile.weight.to(part) * part
        kernel = kernel + k
    return out, kernel / len(tiles)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The data term and the update run in full precision even when the caller autocasts the network."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a backend without autocast
        return contextlib.nullcontext()


def _evaluate(
    model: Denoiser,
    x_t: Tensor,
    index: int,
    chain: GaussianDiffusion,
    lr: Tensor,
    *,
    tiles: list[_Tile] | None,
    scale: int,
    energy_fn: Callable[[Tensor, Tensor], Tensor],
    guided: bool,
    gradient: str,
    clip_x0: bool,
    kernel_used: bool,
) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor | None]:
    """Steps (1)-(3) of Algorithm 2: network, x̂0 and posterior, E and its gradient (None if unguided).

    Returns (p_mean_variance dict, detached; k̂_t; E [B]; ∂E/∂x_t — or ∂E/∂x̂0 for gradient="x0").
    """
    batch = x_t.shape[0]
    t_chain = torch.full((batch,), index, dtype=torch.long, device=x_t.device)
    t_model = chain.model_timesteps(t_chain)

    if not guided or gradient == "x0" or tiles is not None:
        with torch.no_grad():
            out, kernel = _forward(model, x_t, t_model, lr, tiles, scale)
        with _no_autocast(x_t.device):
            p = chain.p_mean_variance(out, x_t, t_chain, clip_x0=clip_x0)
        if not guided:  # E is still reported (ζ = 0 of Table 4); zeros for guidance "none"
            with torch.no_grad(), _no_autocast(x_t.device):
                return p, kernel, energy_fn(p["pred_x0"], kernel), None
        with torch.enable_grad(), _no_autocast(x_t.device):
            if gradient == "x0":
                # cheap variant: ∂E/∂x̂0 stands in for ∂E/∂x_t (no backward through the network)
                x0 = p["pred_x0"].detach().requires_grad_(True)
                energy = energy_fn(x0, kernel)
                (grad,) = _grad(energy, [x0])
                return p, kernel, energy.detach(), grad
            # tiled ∂E/∂x_t, pass 1: E and its gradient w.r.t. the blended output and the shared kernel
            x_leaf = x_t.detach().requires_grad_(True)
            out_leaf = out.detach().requires_grad_(True)
            kernel_leaf = kernel.detach().requires_grad_(True)
            q = chain.p_mean_variance(out_leaf, x_leaf, t_chain, clip_x0=clip_x0)
            energy = energy_fn(q["pred_x0"], kernel_leaf)
            grad, grad_out, grad_kernel = _grad(energy, [x_leaf, out_leaf, kernel_leaf])
        # pass 2: one tile at a time, the vector-Jacobian product of its share into ∂E/∂x_t
        for tile in tiles:
            (ys, xs), (ly, lx) = tile.hr(), tile.lr(scale)
            with torch.enable_grad():
                x_tile = x_t[:, :, ys, xs].detach().requires_grad_(True)
                part, k = _call(model, x_tile, t_model, lr[:, :, ly, lx])
                with _no_autocast(x_t.device):
                    share = (part * (tile.weight.to(part) * grad_out[:, :, ys, xs])).sum()
                    if kernel_used:
                        share = share + (k * grad_kernel).sum() / len(tiles)
                (g,) = _grad(share, [x_tile])
            grad[:, :, ys, xs] += g
            del part, k, share, g  # free this tile's graph before the next
        return p, kernel, energy.detach(), grad

    # untiled ∂E/∂x_t (the paper): back-propagate E through the network; no parameter gradients
    with torch.enable_grad():
        x_leaf = x_t.detach().requires_grad_(True)
        out, kernel = _call(model, x_leaf, t_model, lr)
        with _no_autocast(x_t.device):
            p = chain.p_mean_variance(out, x_leaf, t_chain, clip_x0=clip_x0)
            energy = energy_fn(p["pred_x0"], kernel)
            (grad,) = _grad(energy, [x_leaf])
    return {k: v.detach() for k, v in p.items()}, kernel.detach(), energy.detach(), grad


def _grad(energy: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    """∂(Σ E)/∂inputs; an input E does not depend on gets zeros; only these inputs are differentiated."""
    if not energy.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(energy.sum(), inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


# --------------------------------------------------------------------------- the sampler


def sample(
    model: Denoiser,
    lr: Tensor,
    chain: GaussianDiffusion,
    *,
    scale: int,
    sampler: str = "ddpm",
    eta: float = 0.0,
    zeta: float = 1.0,
    guidance: str = "kernel-aware",
    gradient: str = "xt",
    x0_norm_weight: float = 0.0,
    kernel: Tensor | None = None,
    downsample: str = "bicubic",
    generators: Sequence[torch.Generator] | None = None,
    tile: int | None = None,
    tile_overlap: int = 32,
    clip_x0: bool = True,
    callback: Callable[[StepInfo], object] | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """BlindDiff's MAP reverse process (paper Algorithm 2, SPEC §5) → (sr [B, C, s·h, s·w] in [0, 1], k̂).

    Per step of `chain` (from `sampling_chain`), from T to 1: (1) out, k̂_t = model(x_t, t, y);
    (2) x̂0 from ε̂ (clipped to [0, 1] when `clip_x0`) and x'_{t−1} from the DDPM posterior with the
    learned variance (`sampler="ddpm"`) or the DDIM update with `eta` (0: deterministic); no noise at
    the last step; (3) E = `data_energy` with k̂_t, or with the given `kernel` (non-blind mode);
    (4) x_{t−1} = x'_{t−1} − ζ·∂E/∂x_t, then detached. `gradient="xt"` back-propagates E through the
    network to x_t (the paper; no parameter gradients are computed); `gradient="x0"` runs the network
    without autograd and uses ∂E/∂x̂0 in place of ∂E/∂x_t (cheaper, an approximation). guidance
    "none" or ζ = 0 computes no gradient at all.

    `generators`: one per image; x_T and the noise of image b come from generators[b] (drawn on its
    device, then moved), so a seed gives the same image whatever the batch; None → every image
    gets a generator seeded 0. `tile` (HR pixels, a multiple of the scale and of the model's size
    multiple) runs the network on tiles overlapping by `tile_overlap` HR pixels at every step,
    blends ε̂ and v with raised-cosine weights and shares the tiles' mean kernel; ∂E/∂x_t is then
    formed tile by tile (vector-Jacobian products), so memory follows the tile, not the image (the
    second pass re-runs each tile, so the model must be deterministic: eval mode).
    The callback gets a `StepInfo` after every step. Returns the final kernel: k̂ of the last step
    (blind) or the given kernel.
    """
    check_options(model, scale=scale, sampler=sampler, eta=eta, zeta=zeta, guidance=guidance, gradient=gradient,
                  x0_norm_weight=x0_norm_weight, downsample=downsample, tile=tile, tile_overlap=tile_overlap)
    scale, zeta, x0_norm_weight, eta = int(scale), float(zeta), float(x0_norm_weight), float(eta)
    if not isinstance(chain, GaussianDiffusion):
        raise ValueError(f"chain is a {type(chain).__name__}: build it with sampling_chain(cfg.diffusion, steps)")
    if not callable(model):
        raise ValueError(f"model is a {type(model).__name__}: pass a callable model(x_t, t, lr) -> (out, kernel)")
    if not isinstance(lr, Tensor) or lr.ndim != 4 or not lr.is_floating_point():
        raise ValueError(f"lr must be a floating tensor [B, C, h, w] in [0, 1], got {_describe(lr)}")
    if not bool(torch.isfinite(lr).all()):
        raise ValueError("lr: input contains NaN or infinite values; clean or re-read the image before sampling")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback is a {type(callback).__name__}: pass a function of StepInfo or None")
    batch, channels, h, w = lr.shape
    height, width = scale * h, scale * w
    if batch < 1 or h < 1 or w < 1:
        raise ValueError(f"lr shape {tuple(lr.shape)}: need at least one image of at least 1×1 pixels")
    dtype = torch.promote_types(lr.dtype, torch.float32)
    device = lr.device
    gens = _check_generators(generators, batch)
    given = _check_kernel(kernel, batch, height, width, device, dtype)
    tiles = _check_tiles(model, tile, tile_overlap, scale, height, width)

    guided = guidance != "none" and zeta > 0.0
    kernel_used = guidance == "kernel-aware" and given is None  # does E depend on k̂_t?

    def energy_fn(x0: Tensor, k_model: Tensor) -> Tensor:
        if guidance == "none":  # no data term at all
            return x0.new_zeros(x0.shape[0])
        return data_energy(
            x0, given if given is not None else k_model, lr, scale,
            guidance=guidance, downsample=downsample, x0_norm_weight=x0_norm_weight,
        )

    # Never build on an inference tensor: a caller's inference_mode must not break the gradient step.
    with torch.inference_mode(False):
        lr = lr.to(dtype).clone()
        x = _noise(gens, (channels, height, width), device, dtype)  # x_T
        kernel_out: Tensor | None = None
        for order, index in enumerate(_progress(range(chain.num_steps - 1, -1, -1), progress)):
            p, k_model, energy, grad = _evaluate(
                model, x, index, chain, lr, tiles=tiles, scale=scale, energy_fn=energy_fn,
                guided=guided, gradient=gradient, clip_x0=clip_x0, kernel_used=kernel_used,
            )
            with torch.no_grad(), _no_autocast(device):
                x0 = p["pred_x0"]
                x_next = _reverse_step(chain, index, x, p, sampler, eta, gens)
                if grad is not None:
                    x_next = x_next - zeta * grad.to(x_next.dtype)
            kernel_out = given if given is not None else k_model.detach()
            if callback is not None:
                callback(StepInfo(order, int(chain.timestep_map[index]), x, x0, kernel_out, energy))
            x = x_next.detach()
            del p, grad, x0, x_next, energy
    assert kernel_out is not None
    return x.clamp(0.0, 1.0), kernel_out


def _reverse_step(
    chain: GaussianDiffusion,
    index: int,
    x_t: Tensor,
    p: dict[str, Tensor],
    sampler: str,
    eta: float,
    gens: list[torch.Generator],
) -> Tensor:
    """x'_{t−1}: DDPM posterior sample with the learned variance, or the DDIM update (Song et al. Eq. 12)."""
    last = index == 0
    if sampler == "ddpm":
        if last:
            return p["mean"]
        return p["mean"] + torch.exp(0.5 * p["log_variance"]) * _noise(gens, x_t.shape[1:], x_t.device, x_t.dtype)
    x0 = p["pred_x0"]
    ac, ac_prev = float(chain.alphas_cumprod[index]), float(chain.alphas_cumprod_prev[index])
    # ε consistent with the (possibly clipped) x̂0, as DDIM's update needs
    eps = (x_t - math.sqrt(ac) * x0) / math.sqrt(1.0 - ac)
    sigma = eta * math.sqrt((1.0 - ac_prev) / (1.0 - ac)) * math.sqrt(1.0 - ac / ac_prev)
    x_prev = math.sqrt(ac_prev) * x0 + math.sqrt(max(1.0 - ac_prev - sigma**2, 0.0)) * eps
    if sigma > 0.0 and not last:
        x_prev = x_prev + sigma * _noise(gens, x_t.shape[1:], x_t.device, x_t.dtype)
    return x_prev


def _noise(gens: list[torch.Generator], shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
    """N(0, I) [B, *shape]: image b from generators[b] (float32 on the generator's device), then moved."""
    draws = [torch.randn(tuple(shape), generator=g, device=g.device, dtype=torch.float32) for g in gens]
    return torch.stack([d.to(device) for d in draws]).to(dtype)


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


def _check_scale(scale: object) -> int:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or float(scale) != int(scale) or scale < 1:
        raise ValueError(f"scale={scale!r}: must be a positive integer (e.g. 4 for ×4, 1 for deblurring)")
    return int(scale)


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


def check_options(
    model: object,
    *,
    scale: int,
    sampler: str = "ddpm",
    eta: float = 0.0,
    zeta: float = 1.0,
    guidance: str = "kernel-aware",
    gradient: str = "xt",
    x0_norm_weight: float = 0.0,
    downsample: str = "bicubic",
    tile: int | None = None,
    tile_overlap: int = 32,
) -> None:
    """The checks of `sample` that do not depend on the images, so a caller can make them once, up front."""
    _check_choice("sampler", sampler, SAMPLERS)
    _check_choice("guidance", guidance, GUIDANCE)
    _check_choice("gradient", gradient, GRADIENTS)
    _check_choice("downsample", downsample, DOWNSAMPLE_MODES)
    scale = _check_scale(scale)
    _check_nonnegative("zeta", zeta)
    _check_nonnegative("x0_norm_weight", x0_norm_weight)
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta={eta!r}: must be a number in [0, 1] (0 = deterministic DDIM, 1 ≈ DDPM)")
    _check_tiles(model, tile, tile_overlap, scale, 0, 0)


def _check_kernel(
    kernel: Tensor | None, batch: int, height: int, width: int, device: torch.device, dtype: torch.dtype
) -> Tensor | None:
    """The given (non-blind) kernel as [B, kh, kw] on the image's device, or None."""
    if kernel is None:
        return None
    if not isinstance(kernel, Tensor) or kernel.ndim not in (2, 3) or not kernel.is_floating_point():
        raise ValueError(f"kernel must be a floating tensor [B, k, k] or [k, k], got {_describe(kernel)}")
    if kernel.ndim == 2:
        kernel = kernel.unsqueeze(0)
    if kernel.shape[0] not in (1, batch):
        raise ValueError(
            f"kernel shape {tuple(kernel.shape)} does not match the batch of {batch} images: "
            f"pass [{batch}, k, k] or one shared [k, k]"
        )
    kh, kw = kernel.shape[-2:]
    if kh // 2 >= height or kw // 2 >= width:
        raise ValueError(f"kernel {kh}×{kw} is too large for the {height}×{width} output; use a smaller kernel")
    if not bool(torch.isfinite(kernel).all()):
        raise ValueError("kernel contains NaN or infinite taps; pass a valid kernel")
    return kernel.to(device=device, dtype=dtype).expand(batch, kh, kw).contiguous()


def _check_tiles(
    model: object, tile: int | None, overlap: int, scale: int, height: int, width: int
) -> list[_Tile] | None:
    """The tile grid, or None when there is no tiling or a single tile covers the image."""
    if tile is None:
        return None
    multiple = getattr(getattr(model, "cfg", None), "size_multiple", 1)
    multiple = multiple if isinstance(multiple, int) and multiple >= 1 else 1
    need = math.lcm(scale, multiple)
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
    if height <= tile and width <= tile:
        return None  # one tile: exactly the untiled path
    return _tile_grid(height, width, tile, overlap)
