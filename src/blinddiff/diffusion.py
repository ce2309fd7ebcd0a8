"""Gaussian diffusion of BlindDiff (docs/method.md §3): DDPM chain, IDDPM learned-range variance, training loss.

The forward process is DDPM's (Ho et al. 2020) with a linear β schedule; the network predicts ε and,
in "learned range" mode (Nichol & Dhariwal 2021, IDDPM §3.1), one interpolation value v per channel
between log β_t and log β̃_t. Training minimises paper Eq. (13):

    L = L_noise (MSE on ε) + L_vb (IDDPM bound on the variance, mean detached) + λ·L_kernel.

Images live in [0, 1] as in the authors' code (no rescale to [−1, 1]); the data range only matters
for the discretised decoder likelihood at t = 0 and for optional x̂0 clipping.

The schedule is a plain object (diffusers style): `GaussianDiffusion.from_config(DiffusionConfig)`
builds it, `respace()` derives a shorter chain over a subset of steps (IDDPM "space_timesteps"), and
`timestep_map` tells which original step the network must be shown. The network itself is any
callable ``model(x_t, t_original, lr) -> (out, kernel)``; nothing here knows its architecture.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DiffusionConfig",
    "GaussianDiffusion",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "kernel_loss",
    "linear_betas",
    "normal_kl",
    "space_timesteps",
]

KERNEL_LOSSES = ("l1", "mse", "l2")
PREDICTIONS = ("eps", "x0")
_LOG2 = math.log(2.0)


@dataclass
class DiffusionConfig:
    """Diffusion and loss settings (docs/method.md §3, paper Eq. 13). Round-trips through `dataclasses.asdict`."""

    steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    train_steps: int | None = None  # respace the training chain to this many steps (release: 500)
    learned_variance: bool = True
    kernel_loss_weight: float = 1.0  # λ_kernel of Eq. (13); 0 reproduces the authors' release
    kernel_loss: str = "l1"  # "l1": Σ|Δ| over taps | "mse": mean Δ² | "l2": Σ Δ²
    # What the network's first C channels are: "eps" (DDPM, the paper) or "x0" (the clean image, trained
    # with an MSE on x0; its one-step prediction from pure noise is the MMSE restoration, our fidelity mode)
    prediction: str = "eps"
    # A perceptual term on x̂0 (LPIPS, as Real-ESRGAN's perceptual loss and later ResShift versions): weight,
    # backbone ("alex" | "vgg") and the fraction of the chain (t < max_t·N) it acts on, so the last reverse
    # steps (the perceptual mode) sharpen while the one-step MMSE estimate from t = N−1 (fidelity) stays.
    perceptual_loss_weight: float = 0.0
    perceptual_loss_net: str = "alex"
    perceptual_max_t: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps={self.steps!r}: must be a positive int (paper: 1000)")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                f"beta_start={self.beta_start!r}, beta_end={self.beta_end!r}: "
                "need 0 < beta_start <= beta_end < 1 (paper: 1e-4 and 0.02)"
            )
        if self.train_steps is not None and (
            isinstance(self.train_steps, bool)
            or not isinstance(self.train_steps, int)
            or not 1 <= self.train_steps <= self.steps
        ):
            raise ValueError(
                f"train_steps={self.train_steps!r}: must be None or an int in [1, steps={self.steps}]"
            )
        if not self.kernel_loss_weight >= 0.0:
            raise ValueError(f"kernel_loss_weight={self.kernel_loss_weight!r}: must be >= 0")
        if self.kernel_loss not in KERNEL_LOSSES:
            raise ValueError(f"kernel_loss={self.kernel_loss!r}: choose one of {KERNEL_LOSSES}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction={self.prediction!r}: choose one of {PREDICTIONS}")
        if not self.perceptual_loss_weight >= 0.0:
            raise ValueError(f"perceptual_loss_weight={self.perceptual_loss_weight!r}: must be >= 0")
        if self.perceptual_loss_net not in ("alex", "vgg"):
            raise ValueError(f"perceptual_loss_net={self.perceptual_loss_net!r}: choose 'alex' or 'vgg'")
        if not 0.0 < self.perceptual_max_t <= 1.0:
            raise ValueError(f"perceptual_max_t={self.perceptual_max_t!r}: must be in (0, 1]")


# --------------------------------------------------------------------------- schedules


def linear_betas(steps: int, start: float = 1e-4, end: float = 0.02) -> Tensor:
    """Linear β schedule of DDPM (docs/method.md §3), float64 [steps], from `start` to `end` inclusive."""
    if steps < 1:
        raise ValueError(f"steps={steps}: must be >= 1")
    if not 0.0 < start <= end < 1.0:
        raise ValueError(f"start={start}, end={end}: need 0 < start <= end < 1")
    return torch.linspace(start, end, steps, dtype=torch.float64)


def space_timesteps(num_steps: int, count: int | str) -> list[int]:
    """Evenly spaced subset of ``range(num_steps)`` (IDDPM's space_timesteps), sorted.

    ``count`` is an int or "N": N steps from 0 to num_steps−1 inclusive, rounded (the release's
    "500" of 1000 is {0, 2, …, 498, 501, …, 999}); "a,b,c": the chain is cut into equal sections
    with a, b, c steps each; "ddimN": a constant stride starting at 0 (exactly every k-th step).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: must be >= 1")
    if isinstance(count, str) and count.startswith("ddim"):
        try:
            wanted = int(count[len("ddim"):])
        except ValueError:
            raise ValueError(f"count={count!r}: expected 'ddimN' with an integer N") from None
        for stride in range(1, num_steps + 1):
            if len(range(0, num_steps, stride)) == wanted:
                return list(range(0, num_steps, stride))
        raise ValueError(f"count={count!r}: no constant stride gives {wanted} of {num_steps} steps; use an int")
    try:
        sections = [int(count)] if isinstance(count, int) else [int(c) for c in count.split(",")]
    except (ValueError, AttributeError):
        raise ValueError(f"count={count!r}: expected an int, 'N', 'a,b,c' or 'ddimN'") from None
    if len(sections) > num_steps:
        raise ValueError(f"count={count!r}: more sections than the {num_steps} steps")
    size, extra = divmod(num_steps, len(sections))
    steps: list[int] = []
    start = 0
    for i, n in enumerate(sections):
        section = size + (1 if i < extra else 0)
        if not 1 <= n <= section:
            raise ValueError(f"count={count!r}: cannot take {n} steps from a section of {section}")
        stride = (section - 1) / (n - 1) if n > 1 else 1.0
        position = 0.0  # accumulated, not j·stride: ties then round exactly as the release's chains do
        for _ in range(n):
            steps.append(start + round(position))
            position += stride
        start += section
    return sorted(set(steps))


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


def kernel_loss(kernel_pred: Tensor, kernel_gt: Tensor, kind: str = "l1") -> Tensor:
    """Per-sample L_kernel of Eq. (13), [B]: "l1" Σ|Δ| over taps, "mse" mean Δ², "l2" Σ Δ² (float32+)."""
    if kernel_pred.shape != kernel_gt.shape:
        raise ValueError(
            f"kernel_pred shape {tuple(kernel_pred.shape)} != kernel_gt shape {tuple(kernel_gt.shape)}: "
            "make the network's kernel output and the ground-truth kernels the same layout"
        )
    if kind not in KERNEL_LOSSES:
        raise ValueError(f"kind={kind!r}: choose one of {KERNEL_LOSSES}")
    dtype = _float_at_least_32(kernel_pred.dtype, kernel_gt.dtype)
    diff = (kernel_pred.to(dtype) - kernel_gt.to(device=kernel_pred.device, dtype=dtype)).flatten(1)
    if kind == "l1":
        return diff.abs().sum(1)
    if kind == "mse":
        return diff.square().mean(1)
    return diff.square().sum(1)


def _float_at_least_32(*dtypes: torch.dtype) -> torch.dtype:
    """Common floating dtype of the inputs, promoted to at least float32 (bf16/fp16 compute in fp32)."""
    dtype = torch.float32
    for d in dtypes:
        dtype = torch.promote_types(dtype, d)
    return dtype


class GaussianDiffusion:
    """DDPM forward/posterior quantities of one β chain (docs/method.md §3), possibly respaced.

    All tables are float64 CPU tensors; every method computes in float32 or better and returns
    the input's dtype. ``t`` arguments are LongTensors [B] (or a Python int) of indices into THIS
    chain; `model_timesteps(t)` converts them to the original steps the network was trained on.
    """

    def __init__(
        self,
        betas: Tensor | Sequence[float],
        *,
        learned_variance: bool = True,
        prediction: str = "eps",
        timestep_map: Tensor | Sequence[int] | None = None,
        original_steps: int | None = None,
        data_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas shape {tuple(betas.shape)}: expected a non-empty 1-D sequence")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(
                f"betas range [{betas.min().item()}, {betas.max().item()}]: every beta must lie in (0, 1) "
                "(β = 1 leaves no signal for ε-prediction)"
            )
        lo, hi = float(data_range[0]), float(data_range[1])
        if not hi > lo:
            raise ValueError(f"data_range={data_range}: need low < high (images in [0, 1] use (0.0, 1.0))")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r}: choose one of {PREDICTIONS}")
        n = betas.numel()
        self.betas = betas
        self.learned_variance = bool(learned_variance)
        self.prediction = prediction
        self.data_range = (lo, hi)
        self.bin_width = (hi - lo) / 255.0  # 8-bit images
        self.config: DiffusionConfig | None = None  # set by from_config

        if timestep_map is None:
            timestep_map = torch.arange(n)
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.long).cpu()
        if self.timestep_map.shape != (n,):
            raise ValueError(f"timestep_map has {self.timestep_map.numel()} entries for {n} betas; give one per step")
        self.original_steps = int(original_steps) if original_steps is not None else int(self.timestep_map[-1]) + 1

        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = self.alphas_cumprod.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef1·x0 + coef2·x_t, β̃_t), DDPM Eq. (6)-(7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0; IDDPM clips its log to β̃_1 (or β_0 for a one-step chain) to stay finite
        first = self.posterior_variance[1:2] if n > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(betas)
        self._cache: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, *, data_range: tuple[float, float] = (0.0, 1.0)) -> GaussianDiffusion:
        """Linear-β chain of `cfg`, respaced to `cfg.train_steps` when set (the training chain)."""
        chain = cls(
            linear_betas(cfg.steps, cfg.beta_start, cfg.beta_end),
            learned_variance=cfg.learned_variance,
            prediction=cfg.prediction,
            data_range=data_range,
        )
        if cfg.train_steps is not None and cfg.train_steps != cfg.steps:
            chain = chain.respace(space_timesteps(cfg.steps, cfg.train_steps))
        chain.config = cfg
        return chain

    def respace(self, timesteps: Sequence[int]) -> GaussianDiffusion:
        """Chain over a subset of THIS chain's steps, keeping ᾱ at those steps (IDDPM respacing).

        β'_i = 1 − ᾱ_{k_i} / ᾱ_{k_{i−1}}; `timestep_map` composes, so it always points at the
        original chain. The result has no `config` (it no longer describes a config's chain).
        """
        steps = sorted({int(s) for s in timesteps})
        if not steps or len(steps) != len(list(timesteps)):
            raise ValueError(f"timesteps={list(timesteps)[:8]}…: need a non-empty set of distinct steps")
        if steps[0] < 0 or steps[-1] >= self.num_steps:
            raise ValueError(f"timesteps span [{steps[0]}, {steps[-1]}]: must lie in [0, {self.num_steps - 1}]")
        kept = torch.tensor(steps, dtype=torch.long)
        ac = self.alphas_cumprod[kept]
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        return GaussianDiffusion(
            1.0 - ac / ac_prev,
            learned_variance=self.learned_variance,
            prediction=self.prediction,
            timestep_map=self.timestep_map[kept],
            original_steps=self.original_steps,
            data_range=self.data_range,
        )

    @property
    def num_steps(self) -> int:
        """Length of this chain (T, or the respaced count)."""
        return self.betas.numel()

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(num_steps={self.num_steps}, original_steps={self.original_steps}, "
            f"learned_variance={self.learned_variance}, data_range={self.data_range})"
        )

    # ----------------------------------------------------------------- helpers

    def _steps(self, t: Tensor | int, x: Tensor) -> Tensor:
        """Validate t (int or integer [B] tensor indexing this chain) and return it as long on x's device."""
        batch = x.shape[0]
        if isinstance(t, int) and not isinstance(t, bool):
            if not 0 <= t < self.num_steps:
                raise ValueError(f"t={t}: indices must lie in [0, {self.num_steps - 1}] (use chain indices, not "
                                 "original steps)")
            return torch.full((batch,), t, dtype=torch.long, device=x.device)
        if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"t={t!r}: expected an int or an integer tensor [B] of chain indices")
        if t.shape != (batch,):
            raise ValueError(f"t shape {tuple(t.shape)}: expected ({batch},), one step per batch item")
        if batch and t.device.type == "cpu":  # checked where it costs no device sync (sampling passes ints)
            lo, hi = torch.stack(torch.aminmax(t)).tolist()
            if lo < 0 or hi >= self.num_steps:
                raise ValueError(
                    f"t in [{lo}, {hi}]: indices must lie in [0, {self.num_steps - 1}] "
                    "(use chain indices, not original steps)"
                )
        return t.to(device=x.device, dtype=torch.long)

    def _check_output(self, model_output: Tensor, x: Tensor) -> None:
        """Network output must be [B, 2C, …] with learned variance, [B, C, …] otherwise (x is [B, C, …])."""
        if x.ndim < 2:
            raise ValueError(f"x shape {tuple(x.shape)}: expected [B, C, ...]")
        want = (x.shape[0], 2 * x.shape[1] if self.learned_variance else x.shape[1], *x.shape[2:])
        if tuple(model_output.shape) != want:
            raise ValueError(
                f"model output shape {tuple(model_output.shape)}: expected {want} "
                f"({'ε and v' if self.learned_variance else 'ε only'}; learned_variance={self.learned_variance})"
            )

    def _at(self, name: str, t: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
        """Table `name` at steps t, shaped [B, 1, …, 1] to broadcast against x, in `dtype`."""
        key = (name, dtype, t.device)
        table = self._cache.get(key)
        if table is None:  # cast on CPU first: float64 does not exist on every backend
            table = self._cache[key] = getattr(self, name).to(dtype).to(t.device)
        return table[t].view(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Original-chain steps for chain indices t (what the network is conditioned on)."""
        return self._at("timestep_map", t.long(), t, torch.long)

    # ----------------------------------------------------------------- forward process

    def q_sample(self, x0: Tensor, t: Tensor | int, noise: Tensor | None = None) -> Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (DDPM Eq. 4); ε ~ N(0, I) drawn here when not given."""
        t = self._steps(t, x0)
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        dt = _float_at_least_32(x0.dtype, noise.dtype)
        x_t = self._at("sqrt_alphas_cumprod", t, x0, dt) * x0.to(dt) + self._at(
            "sqrt_one_minus_alphas_cumprod", t, x0, dt
        ) * noise.to(dt)
        return x_t.to(torch.promote_types(x0.dtype, noise.dtype))

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor | int, eps: Tensor) -> Tensor:
        """x̂0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t."""
        t = self._steps(t, x_t)
        dt = _float_at_least_32(x_t.dtype, eps.dtype)
        return self._x0_from_eps(x_t.to(dt), t, eps.to(dt)).to(torch.promote_types(x_t.dtype, eps.dtype))

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor | int, x0: Tensor) -> Tensor:
        """ε = (x_t − √ᾱ_t·x0) / √(1−ᾱ_t), the inverse of `predict_x0_from_eps`."""
        t = self._steps(t, x_t)
        dt = _float_at_least_32(x_t.dtype, x0.dtype)
        return self._eps_from_x0(x_t.to(dt), t, x0.to(dt)).to(torch.promote_types(x_t.dtype, x0.dtype))

    # validated-t, same-dtype kernels shared by the public methods (no re-validation, no casts)
    def _x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return self._at("sqrt_recip_alphas_cumprod", t, x_t, x_t.dtype) * x_t - self._at(
            "sqrt_recipm1_alphas_cumprod", t, x_t, x_t.dtype
        ) * eps

    def _eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (self._at("sqrt_recip_alphas_cumprod", t, x_t, x_t.dtype) * x_t - x0) / self._at(
            "sqrt_recipm1_alphas_cumprod", t, x_t, x_t.dtype
        )

    def _posterior_mean(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self._at("posterior_mean_coef1", t, x_t, x_t.dtype) * x0 + self._at(
            "posterior_mean_coef2", t, x_t, x_t.dtype
        ) * x_t

    # ----------------------------------------------------------------- reverse process

    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, t: Tensor | int, clip_x0: bool = False
    ) -> dict[str, Tensor]:
        """Mean and variance of p(x_{t−1} | x_t) from the network output [B, 2C or C, …] (docs/method.md §3).

        The first C channels are ε̂ (x̂0 when the chain's prediction is "x0"). With learned variance the
        next C channels v are IDDPM's learned
        range: log σ² = frac·log β_t + (1−frac)·log β̃_t, frac = (v+1)/2 (v is not clamped, as in
        IDDPM); otherwise σ² = β̃_t ("fixed small"). `clip_x0` clamps x̂0 to the data range before
        the mean is formed. Returns mean, variance, log_variance, pred_x0 and the model's eps.
        """
        self._check_output(model_output, x_t)
        t = self._steps(t, x_t)
        out_dtype = torch.promote_types(model_output.dtype, x_t.dtype)
        dt = _float_at_least_32(out_dtype)
        result = self._p_mean_variance(model_output.to(dt), x_t.to(dt), t, clip_x0)
        return {k: v.to(out_dtype) for k, v in result.items()}

    def _p_mean_variance(self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_x0: bool) -> dict[str, Tensor]:
        channels = x_t.shape[1]
        if self.prediction == "x0":
            pred_x0 = model_output[:, :channels]
            eps = self._eps_from_x0(x_t, t, pred_x0)
        else:
            eps = model_output[:, :channels]
            pred_x0 = self._x0_from_eps(x_t, t, eps)
        if self.learned_variance:
            frac = (model_output[:, channels:] + 1.0) / 2.0
            log_var = frac * self._at("log_betas", t, x_t, x_t.dtype) + (1.0 - frac) * self._at(
                "posterior_log_variance_clipped", t, x_t, x_t.dtype
            )
        else:
            log_var = self._at("posterior_log_variance_clipped", t, x_t, x_t.dtype).expand(x_t.shape)
        if clip_x0:
            pred_x0 = pred_x0.clamp(*self.data_range)
        return {
            "mean": self._posterior_mean(pred_x0, x_t, t),
            "variance": torch.exp(log_var),
            "log_variance": log_var,
            "pred_x0": pred_x0,
            "eps": eps,
        }

    def step(self, p: dict[str, Tensor], x_t: Tensor, t: int, *, sampler: str = "ddpm", eta: float = 0.0,
             noise: Callable[[], Tensor] | None = None) -> Tensor:
        """x_{t−1} from x_t at chain index t given `p_mean_variance`'s output: the DDPM posterior sample with the
        model's variance (`sampler="ddpm"`), or the DDIM update (Song et al. 2021, Eq. 12) with `eta` (0:
        deterministic). `noise()` draws N(0, I) shaped like x_t, only when the update needs it (never at t = 0);
        default `torch.randn_like`."""
        draw = noise if noise is not None else (lambda: torch.randn_like(x_t))
        if sampler == "ddpm":
            if t == 0:
                return p["mean"]
            return p["mean"] + torch.exp(0.5 * p["log_variance"]) * draw()
        if sampler != "ddim":
            raise ValueError(f"sampler={sampler!r} is unknown; choose ddpm or ddim")
        x0 = p["pred_x0"]
        ac, ac_prev = float(self.alphas_cumprod[t]), float(self.alphas_cumprod_prev[t])
        eps = self.predict_eps_from_x0(x_t, t, x0)  # consistent with the (possibly clipped) x̂0, as DDIM needs
        sigma = eta * math.sqrt((1.0 - ac_prev) / (1.0 - ac)) * math.sqrt(1.0 - ac / ac_prev)
        x_prev = math.sqrt(ac_prev) * x0 + math.sqrt(max(1.0 - ac_prev - sigma**2, 0.0)) * eps
        if sigma > 0.0 and t > 0:
            x_prev = x_prev + sigma * draw()
        return x_prev

    # ----------------------------------------------------------------- training objective

    def vb_terms_bpd(self, model_output: Tensor, x0: Tensor, x_t: Tensor, t: Tensor | int) -> Tensor:
        """IDDPM bound term per sample [B], in bits/dim: KL(q ‖ p) for t > 0, decoder NLL at t = 0.

        Computed in float32 or better whatever the inputs (safe under bf16 autocast).
        """
        if not self.learned_variance:
            raise ValueError("vb_terms_bpd needs learned_variance=True (the bound only trains the variance)")
        if x0.shape != x_t.shape:
            raise ValueError(f"x0 shape {tuple(x0.shape)} != x_t shape {tuple(x_t.shape)}")
        self._check_output(model_output, x_t)
        t = self._steps(t, x_t)
        dt = _float_at_least_32(model_output.dtype, x0.dtype, x_t.dtype)
        x0, x_t = x0.to(dt), x_t.to(dt)
        true_mean = self._posterior_mean(x0, x_t, t)
        true_log_var = self._at("posterior_log_variance_clipped", t, x_t, dt)
        p = self._p_mean_variance(model_output.to(dt), x_t, t, clip_x0=False)
        kl = normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"]).flatten(1).mean(1) / _LOG2
        nll = -discretized_gaussian_log_likelihood(
            x0, p["mean"], 0.5 * p["log_variance"], self.bin_width, *self.data_range
        ).flatten(1).mean(1) / _LOG2
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
        x0: Tensor,
        lr: Tensor,
        kernel_gt: Tensor | None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        cfg: DiffusionConfig | None = None,
        perceptual: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample losses of paper Eq. (13) on a batch of HR images x0 [B, C, H, W] in the data range.

        t ~ U{0, …, N−1} and ε ~ N(0, I) are drawn on the generator's device (CPU by default) and
        moved, so a seed gives the same batch on any device. The model is called as
        ``model(x_t, model_timesteps(t), lr) -> (out [B, 2C|C, H, W], kernel)``. Returns float32 [B]:
        mse (MSE of the prediction, ε or x0, mean over C,H,W), vb (`vb_terms_bpd` on cat(ε̂.detach(), v), × N/1000 as IDDPM's
        rescaled-MSE; 0 without learned variance), kernel (`kernel_loss`; 0 when kernel_gt is None)
        perceptual (`perceptual(x̂0, x0)` [B], e.g. LPIPS, on the samples with t < perceptual_max_t·N, 0
        elsewhere and without `perceptual`) and loss = mse + vb + λ·kernel + w·perceptual (a term of weight 0
        is dropped, not multiplied). `cfg` supplies λ, w and the kernel loss kind; it defaults to the
        chain's own config.
        """
        cfg = cfg if cfg is not None else (self.config if self.config is not None else DiffusionConfig())
        if cfg.learned_variance != self.learned_variance:
            raise ValueError(
                f"cfg.learned_variance={cfg.learned_variance} but this chain has learned_variance="
                f"{self.learned_variance}: build the chain with GaussianDiffusion.from_config(cfg)"
            )
        if x0.ndim < 3 or not x0.is_floating_point():
            raise ValueError(f"x0 {x0.dtype} {tuple(x0.shape)}: expected float [B, C, ...] images in the data range")
        if kernel_gt is None and cfg.kernel_loss_weight != 0:
            raise ValueError(
                f"kernel_loss_weight={cfg.kernel_loss_weight} needs kernel_gt; pass the batch's kernels or set it to 0"
            )
        batch, channels = x0.shape[:2]
        draw_device = generator.device if generator is not None else torch.device("cpu")
        if t is None:
            t = torch.randint(0, self.num_steps, (batch,), generator=generator, device=draw_device)
        t = self._steps(t.to(x0.device) if isinstance(t, Tensor) else t, x0)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=_float_at_least_32(x0.dtype))
        noise = noise.to(device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)

        result = model(x_t, self.model_timesteps(t), lr)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise ValueError(f"model returned {type(result).__name__}: it must return (out, kernel)")
        out, kernel_pred = result
        self._check_output(out, x0)
        target = x0 if self.prediction == "x0" else noise
        mse = (target.float() - out[:, :channels].float()).square().flatten(1).mean(1)

        if self.learned_variance:
            # The bound only trains the variance: the mean is frozen so L_vb cannot disturb ε̂ (IDDPM §3.1).
            frozen = torch.cat([out[:, :channels].detach(), out[:, channels:]], dim=1)
            vb = self.vb_terms_bpd(frozen, x0, x_t, t).float() * (self.num_steps / 1000.0)
        else:
            vb = torch.zeros_like(mse)

        if kernel_gt is None:
            kernel = torch.zeros_like(mse)
        else:
            if kernel_pred is None:
                raise ValueError("kernel_gt was given but the model returned no kernel")
            kernel = kernel_loss(kernel_pred, kernel_gt, cfg.kernel_loss).float()
        loss = mse + vb
        if cfg.kernel_loss_weight != 0:
            loss = loss + cfg.kernel_loss_weight * kernel
        perceptual_term = torch.zeros_like(mse)
        if perceptual is not None and cfg.perceptual_loss_weight != 0:
            late = torch.nonzero(t < cfg.perceptual_max_t * self.num_steps).flatten()
            if late.numel():
                pred = out[late, :channels]
                x0_hat = pred if self.prediction == "x0" else self._x0_from_eps(x_t[late], t[late], pred)
                low, high = self.data_range
                scaled = ((x0_hat.float() - low) / (high - low)).clamp(0, 1)
                perceptual_term = perceptual_term.index_put(
                    (late,), perceptual(scaled, ((x0[late].float() - low) / (high - low))).float())
            loss = loss + cfg.perceptual_loss_weight * perceptual_term
        return {"loss": loss, "mse": mse, "vb": vb, "kernel": kernel, "perceptual": perceptual_term}
