"""The training objective of BlindDiff, paper Eq. (13) (docs/method.md §3), over a `diffusion.GaussianDiffusion`:

    L = L_noise (MSE on ε, or on x0) + L_vb (IDDPM bound on the variance, mean detached) + λ·L_kernel
        (+ w·LPIPS(x̂0, x0) on the late steps, docs/method.md §6).

As guided-diffusion's `losses.py`: the likelihood helpers (`normal_kl`, `discretized_gaussian_log_likelihood`)
and the bound `vb_terms_bpd`, then `kernel_loss` and `training_losses`, which takes the schedule as an
argument. The loss weights are plain keyword arguments; `loss_settings(cfg)` reads them from a
`DiffusionConfig`, so the schedule's own settings (learned variance, prediction) are never given twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .diffusion import KERNEL_LOSSES, DiffusionConfig, GaussianDiffusion, float_at_least_32

__all__ = [
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "kernel_loss",
    "loss_settings",
    "normal_kl",
    "training_losses",
    "vb_terms_bpd",
]

_LOG2 = math.log(2.0)

# --------------------------------------------------------------------------- likelihood helpers


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats (broadcasts)."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Fast tanh approximation of the standard normal CDF (the one IDDPM uses; monotone, in [0, 1])."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: Tensor,
    means: Tensor,
    log_scales: Tensor,
    bin_width: float = 1.0 / 255.0,
    x_min: float = 0.0,
    x_max: float = 1.0,
) -> Tensor:
    """Log-probability (nats, elementwise) of quantised data x under N(means, e^{2·log_scales}).

    Each value owns the bin [x − w/2, x + w/2]; the lowest and highest bins extend to ∓∞ (IDDPM's
    decoder L_0). Defaults are 8-bit images in [0, 1]; use bin_width=2/255, x_min=−1 for [−1, 1].
    """
    if not bin_width > 0.0 or not x_max > x_min:
        raise ValueError(f"bin_width={bin_width}, range=({x_min}, {x_max}): need bin_width > 0 and x_max > x_min")
    half = 0.5 * bin_width
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + half))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - half))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < x_min + half,
        log_cdf_plus,
        torch.where(x > x_max - half, log_one_minus_cdf_min, log_delta),
    )


def vb_terms_bpd(schedule: GaussianDiffusion, model_output: Tensor, x0: Tensor, x_t: Tensor,
                 t: Tensor | int) -> Tensor:
    """L_vb of Eq. (13) per sample [B], in bits/dim (IDDPM §3.1): KL(q(x_{t−1} | x_t, x0) ‖ p(x_{t−1} | x_t))
    for t > 0, the discretised decoder NLL of x0 at t = 0.

    Computed in float32 or better whatever the inputs (safe under bf16 autocast).
    """
    if not schedule.learned_variance:
        raise ValueError("vb_terms_bpd needs learned_variance=True (the bound only trains the variance)")
    if x0.shape != x_t.shape:
        raise ValueError(f"x0 shape {tuple(x0.shape)} != x_t shape {tuple(x_t.shape)}")
    schedule.check_model_output(model_output, x_t)
    t = schedule.batch_timesteps(t, x_t)
    dt = float_at_least_32(model_output.dtype, x0.dtype, x_t.dtype)
    x0, x_t = x0.to(dt), x_t.to(dt)
    q = schedule.q_posterior_mean_variance(x0, x_t, t)
    p = schedule.p_mean_variance(model_output.to(dt), x_t, t)
    kl = normal_kl(q["mean"], q["log_variance"], p["mean"], p["log_variance"]).flatten(1).mean(1) / _LOG2
    nll = -discretized_gaussian_log_likelihood(
        x0, p["mean"], 0.5 * p["log_variance"], schedule.bin_width, *schedule.data_range
    ).flatten(1).mean(1) / _LOG2
    return torch.where(t == 0, nll, kl)


# --------------------------------------------------------------------------- Eq. (13)


def kernel_loss(kernel_pred: Tensor, kernel_gt: Tensor, kind: str = "l1") -> Tensor:
    """Per-sample L_kernel of Eq. (13), [B]: "l1" Σ|Δ| over taps, "mse" mean Δ², "l2" Σ Δ² (float32+)."""
    if kernel_pred.shape != kernel_gt.shape:
        raise ValueError(
            f"kernel_pred shape {tuple(kernel_pred.shape)} != kernel_gt shape {tuple(kernel_gt.shape)}: "
            "make the network's kernel output and the ground-truth kernels the same layout"
        )
    if kind not in KERNEL_LOSSES:
        raise ValueError(f"kind={kind!r}: choose one of {KERNEL_LOSSES}")
    dtype = float_at_least_32(kernel_pred.dtype, kernel_gt.dtype)
    diff = (kernel_pred.to(dtype) - kernel_gt.to(device=kernel_pred.device, dtype=dtype)).flatten(1)
    if kind == "l1":
        return diff.abs().sum(1)
    if kind == "mse":
        return diff.square().mean(1)
    return diff.square().sum(1)


def loss_settings(cfg: DiffusionConfig) -> dict[str, Any]:
    """The keyword arguments of `training_losses` that a config sets: λ_kernel and its norm, the perceptual
    term's weight and range (the schedule's settings come with the schedule, not from here)."""
    return {"kernel_weight": cfg.kernel_loss_weight, "kernel_kind": cfg.kernel_loss,
            "perceptual_weight": cfg.perceptual_loss_weight, "perceptual_max_t": cfg.perceptual_max_t}


def training_losses(
    schedule: GaussianDiffusion,
    model: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
    x0: Tensor,
    lr: Tensor,
    kernel_gt: Tensor | None,
    *,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    kernel_weight: float = DiffusionConfig.kernel_loss_weight,
    kernel_kind: str = DiffusionConfig.kernel_loss,
    perceptual: Callable[[Tensor, Tensor], Tensor] | None = None,
    perceptual_weight: float = DiffusionConfig.perceptual_loss_weight,
    perceptual_max_t: float = DiffusionConfig.perceptual_max_t,
) -> dict[str, Tensor]:
    """Per-sample losses of paper Eq. (13) on a batch of HR images x0 [B, C, H, W] in the data range
    (paper Algorithm 1: t ~ U, ε ~ N(0, I), x_t = `schedule.add_noise`, one network call).

    t ~ U{0, …, N−1} and ε ~ N(0, I) are drawn on the generator's device (CPU by default) and
    moved, so a seed gives the same batch on any device. The model is called as
    ``model(x_t, schedule.model_timesteps(t), lr) -> (out [B, 2C|C, H, W], kernel)``. Returns float32 [B]:
    mse (MSE of the prediction, ε or x0, mean over C,H,W), vb (`vb_terms_bpd` on cat(ε̂.detach(), v), × N/1000
    as IDDPM's rescaled-MSE; 0 without learned variance), kernel (`kernel_loss` of `kernel_kind`; 0 when
    kernel_gt is None), perceptual (`perceptual(x̂0, x0)` [B], e.g. LPIPS, on the samples with
    t < perceptual_max_t·N, 0 elsewhere and without `perceptual`) and loss = mse + vb + kernel_weight·kernel +
    perceptual_weight·perceptual (a term of weight 0 is dropped, not multiplied).
    """
    if x0.ndim < 3 or not x0.is_floating_point():
        raise ValueError(f"x0 {x0.dtype} {tuple(x0.shape)}: expected float [B, C, ...] images in the data range")
    if kernel_gt is None and kernel_weight != 0:
        raise ValueError(f"kernel_weight={kernel_weight} (diffusion.kernel_loss_weight) needs kernel_gt; pass the "
                         f"batch's kernels or set it to 0")
    batch, channels = x0.shape[:2]
    draw_device = generator.device if generator is not None else torch.device("cpu")
    if t is None:
        t = torch.randint(0, schedule.num_steps, (batch,), generator=generator, device=draw_device)
    t = schedule.batch_timesteps(t.to(x0.device) if isinstance(t, Tensor) else t, x0)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=float_at_least_32(x0.dtype))
    noise = noise.to(device=x0.device, dtype=x0.dtype)
    x_t = schedule.add_noise(x0, t, noise)

    result = model(x_t, schedule.model_timesteps(t), lr)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise ValueError(f"model returned {type(result).__name__}: it must return (out, kernel)")
    out, kernel_pred = result
    schedule.check_model_output(out, x0)
    target = x0 if schedule.prediction == "x0" else noise
    mse = (target.float() - out[:, :channels].float()).square().flatten(1).mean(1)

    if schedule.learned_variance:
        # The bound only trains the variance: the mean is frozen so L_vb cannot disturb ε̂ (IDDPM §3.1).
        frozen = torch.cat([out[:, :channels].detach(), out[:, channels:]], dim=1)
        vb = vb_terms_bpd(schedule, frozen, x0, x_t, t).float() * (schedule.num_steps / 1000.0)
    else:
        vb = torch.zeros_like(mse)

    if kernel_gt is None:
        kernel = torch.zeros_like(mse)
    else:
        if kernel_pred is None:
            raise ValueError("kernel_gt was given but the model returned no kernel")
        kernel = kernel_loss(kernel_pred, kernel_gt, kernel_kind).float()
    loss = mse + vb
    if kernel_weight != 0:
        loss = loss + kernel_weight * kernel
    perceptual_term = torch.zeros_like(mse)
    if perceptual is not None and perceptual_weight != 0:
        late = torch.nonzero(t < perceptual_max_t * schedule.num_steps).flatten()
        if late.numel():
            pred = out[late, :channels]
            x0_hat = pred if schedule.prediction == "x0" else schedule.predict_x0_from_eps(x_t[late], t[late], pred)
            low, high = schedule.data_range
            scaled = ((x0_hat.float() - low) / (high - low)).clamp(0, 1)
            perceptual_term = perceptual_term.index_put(
                (late,), perceptual(scaled, ((x0[late].float() - low) / (high - low))).float())
        loss = loss + perceptual_weight * perceptual_term
    return {"loss": loss, "mse": mse, "vb": vb, "kernel": kernel, "perceptual": perceptual_term}
