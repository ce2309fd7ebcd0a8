"""The noise schedule of BlindDiff (docs/method.md §3, paper §3.2): the DDPM chain, its posterior, its steps.

The forward process is DDPM's (Ho et al. 2020) with a linear β schedule; the network predicts ε (or x0)
and, in "learned range" mode (Nichol & Dhariwal 2021, IDDPM §3.1), one interpolation value v per channel
between log β_t and log β̃_t. What the network is trained on (paper Eq. 13) lives in `blinddiff.losses`;
this module only holds the schedule, as diffusers' schedulers do.

Images live in [0, 1] as in the authors' code (no rescale to [−1, 1]); the data range only matters
for the discretised decoder likelihood at t = 0 and for optional x̂0 clipping.

The schedule is a plain object: `GaussianDiffusion.from_config(DiffusionConfig)` builds it, `respace()`
derives a shorter chain over a subset of steps (IDDPM "space_timesteps"), `timestep_map` tells which
original step the network must be shown, `add_noise` is the forward process (paper Algorithm 1) and
`ddpm_step` / `ddim_step` the two reverse updates (paper Algorithm 2, step 2). Nothing here knows the
network's architecture.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KERNEL_LOSSES", "PREDICTIONS", "DiffusionConfig", "GaussianDiffusion", "float_at_least_32", "linear_betas",
           "space_timesteps"]

KERNEL_LOSSES = ("l1", "mse", "l2")  # the kinds `losses.kernel_loss` knows
PREDICTIONS = ("eps", "x0")


@dataclass
class DiffusionConfig:
    """Diffusion and loss settings (docs/method.md §3, paper Eq. 13). Round-trips through `dataclasses.asdict`.

    The schedule's fields build `GaussianDiffusion.from_config`; the loss fields (λ_kernel, the kernel norm,
    the perceptual term) are the keyword arguments `losses.loss_settings` hands to `losses.training_losses`.
    """

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


def float_at_least_32(*dtypes: torch.dtype) -> torch.dtype:
    """Common floating dtype of the inputs, promoted to at least float32 (bf16/fp16 compute in fp32)."""
    dtype = torch.float32
    for d in dtypes:
        dtype = torch.promote_types(dtype, d)
    return dtype


class GaussianDiffusion:
    """The schedule of one β chain (docs/method.md §3), possibly respaced: its tables, the forward process,
    the posterior q(x_{t−1} | x_t, x0), the model's p(x_{t−1} | x_t) and the DDPM and DDIM steps.

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
        return chain

    def respace(self, timesteps: Sequence[int]) -> GaussianDiffusion:
        """Chain over a subset of THIS chain's steps, keeping ᾱ at those steps (IDDPM respacing).

        β'_i = 1 − ᾱ_{k_i} / ᾱ_{k_{i−1}}; `timestep_map` composes, so it always points at the
        original chain.
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

    # ----------------------------------------------------------------- timesteps and network outputs

    def batch_timesteps(self, t: Tensor | int, x: Tensor) -> Tensor:
        """t (an int or an integer [B] tensor of indices into this chain, for the batch x [B, …]) checked, as a
        long tensor [B] on x's device."""
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

    def check_model_output(self, model_output: Tensor, x: Tensor) -> None:
        """Refuse a network output that is not [B, 2C, …] with learned variance, [B, C, …] otherwise (x is
        [B, C, …])."""
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

    def add_noise(self, x0: Tensor, t: Tensor | int, noise: Tensor | None = None) -> Tensor:
        """x_t ~ q(x_t | x0): √ᾱ_t·x0 + √(1−ᾱ_t)·ε (DDPM Eq. 4, paper Algorithm 1); ε ~ N(0, I) drawn here when
        not given."""
        t = self.batch_timesteps(t, x0)
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        dt = float_at_least_32(x0.dtype, noise.dtype)
        x_t = self._at("sqrt_alphas_cumprod", t, x0, dt) * x0.to(dt) + self._at(
            "sqrt_one_minus_alphas_cumprod", t, x0, dt
        ) * noise.to(dt)
        return x_t.to(torch.promote_types(x0.dtype, noise.dtype))

    q_sample = add_noise  # DDPM's and IDDPM's name for it

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor | int) -> dict[str, Tensor]:
        """The posterior q(x_{t−1} | x_t, x0) = N(coef1·x0 + coef2·x_t, β̃_t) (DDPM Eq. 6–7): its mean, variance
        β̃_t (0 at t = 0) and log_variance (log β̃_t, clipped to log β̃_1 at t = 0 to stay finite, as IDDPM)."""
        if x0.shape != x_t.shape:
            raise ValueError(f"x0 shape {tuple(x0.shape)} != x_t shape {tuple(x_t.shape)}")
        t = self.batch_timesteps(t, x_t)
        out_dtype = torch.promote_types(x0.dtype, x_t.dtype)
        dt = float_at_least_32(out_dtype)
        result = {"mean": self._posterior_mean(x0.to(dt), x_t.to(dt), t),
                  "variance": self._at("posterior_variance", t, x_t, dt).expand(x_t.shape),
                  "log_variance": self._at("posterior_log_variance_clipped", t, x_t, dt).expand(x_t.shape)}
        return {k: v.to(out_dtype) for k, v in result.items()}

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor | int, eps: Tensor) -> Tensor:
        """x̂0 = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t."""
        t = self.batch_timesteps(t, x_t)
        dt = float_at_least_32(x_t.dtype, eps.dtype)
        return self._x0_from_eps(x_t.to(dt), t, eps.to(dt)).to(torch.promote_types(x_t.dtype, eps.dtype))

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor | int, x0: Tensor) -> Tensor:
        """ε = (x_t − √ᾱ_t·x0) / √(1−ᾱ_t), the inverse of `predict_x0_from_eps`."""
        t = self.batch_timesteps(t, x_t)
        dt = float_at_least_32(x_t.dtype, x0.dtype)
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
        self.check_model_output(model_output, x_t)
        t = self.batch_timesteps(t, x_t)
        out_dtype = torch.promote_types(model_output.dtype, x_t.dtype)
        dt = float_at_least_32(out_dtype)
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

    def ddpm_step(self, p: dict[str, Tensor], x_t: Tensor, t: int, *,
                  noise: Callable[[], Tensor] | None = None) -> Tensor:
        """x_{t−1} ~ p(x_{t−1} | x_t) at chain index t, given `p_mean_variance`'s output: mean + σ·z with the
        model's variance (DDPM Algorithm 2; paper Algorithm 2, step 2), the mean alone at t = 0. `noise()` draws
        z ~ N(0, I) shaped like x_t (default `torch.randn_like`); it is not called at t = 0."""
        if t == 0:
            return p["mean"]
        z = noise() if noise is not None else torch.randn_like(x_t)
        return p["mean"] + torch.exp(0.5 * p["log_variance"]) * z

    def ddim_step(self, p: dict[str, Tensor], x_t: Tensor, t: int, *, eta: float = 0.0,
                  noise: Callable[[], Tensor] | None = None) -> Tensor:
        """x_{t−1} by the DDIM update (Song et al. 2021, Eq. 12) at chain index t, given `p_mean_variance`'s
        output: √ᾱ_{t−1}·x̂0 + √(1−ᾱ_{t−1}−σ²)·ε̂ + σ·z, σ = η·√((1−ᾱ_{t−1})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t−1}).
        η = 0 is deterministic and never calls `noise()` (default `torch.randn_like`); neither does t = 0."""
        x0 = p["pred_x0"]
        ac, ac_prev = float(self.alphas_cumprod[t]), float(self.alphas_cumprod_prev[t])
        eps = self.predict_eps_from_x0(x_t, t, x0)  # consistent with the (possibly clipped) x̂0, as DDIM needs
        sigma = eta * math.sqrt((1.0 - ac_prev) / (1.0 - ac)) * math.sqrt(1.0 - ac / ac_prev)
        x_prev = math.sqrt(ac_prev) * x0 + math.sqrt(max(1.0 - ac_prev - sigma**2, 0.0)) * eps
        if sigma > 0.0 and t > 0:
            x_prev = x_prev + sigma * (noise() if noise is not None else torch.randn_like(x_t))
        return x_prev
