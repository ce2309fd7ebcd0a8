"""Tests of the Gaussian diffusion (docs/method.md §3; paper §3.2): schedule, posterior, respacing, learned range,
the Eq. (13) loss."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from blinddiff.diffusion import (
    DiffusionConfig,
    GaussianDiffusion,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    kernel_loss,
    linear_betas,
    normal_kl,
    space_timesteps,
)

KSIZE = 5  # kernel taps per side in these tests (any size works)


def _chain(steps: int = 1000, train_steps: int | None = None, **kw) -> GaussianDiffusion:
    return GaussianDiffusion.from_config(DiffusionConfig(steps=steps, train_steps=train_steps, **kw))


def _images(shape=(2, 3, 8, 8), seed=0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, shape, generator=g) / 255.0).to(dtype)


def _kernels(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = torch.rand(batch, KSIZE, KSIZE, generator=g)
    return k / k.sum((1, 2), keepdim=True)


class TinyNet(nn.Module):
    """Stand-in for MCFormer: separate ε and v heads so gradients can be traced per head."""

    def __init__(self, channels: int = 3, learned: bool = True, ksize: int = KSIZE) -> None:
        super().__init__()
        self.learned, self.ksize = learned, ksize
        self.eps_head = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.var_head = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.kernel_head = nn.Linear(2 * channels, ksize * ksize)
        self.seen_t: torch.Tensor | None = None

    def forward(self, x_t, t, lr):
        self.seen_t = t
        h = torch.cat([x_t, F.interpolate(lr, size=x_t.shape[-2:], mode="nearest")], 1)
        out = self.eps_head(h) + (t.float() / 1000.0).view(-1, 1, 1, 1)
        if self.learned:
            out = torch.cat([out, torch.tanh(self.var_head(h))], 1)
        kernel = torch.softmax(self.kernel_head(h.mean((2, 3))), -1).view(-1, self.ksize, self.ksize)
        return out, kernel


# ----------------------------------------------------------------------------- schedule


def test_linear_betas_endpoints_and_monotone():
    b = linear_betas(1000, 1e-4, 0.02)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4, abs=1e-15) and b[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert bool((b[1:] > b[:-1]).all())
    with pytest.raises(ValueError, match="start"):
        linear_betas(10, 0.5, 0.1)


def test_alphas_cumprod_consistent():
    d = _chain(100)
    ac = torch.cumprod(1 - d.betas, 0)
    torch.testing.assert_close(d.alphas_cumprod, ac, rtol=0, atol=1e-15)
    assert d.alphas_cumprod_prev[0] == 1.0
    torch.testing.assert_close(d.alphas_cumprod_prev[1:], d.alphas_cumprod[:-1])
    ones = torch.ones(100, dtype=torch.float64)
    torch.testing.assert_close(d.sqrt_alphas_cumprod**2 + d.sqrt_one_minus_alphas_cumprod**2, ones)
    assert bool((d.alphas_cumprod[1:] < d.alphas_cumprod[:-1]).all())


def test_q_sample_at_both_ends():
    d = _chain()
    x0 = _images((4, 3, 32, 32))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    first = d.q_sample(x0, 0, noise)
    assert (first - x0).abs().max() < 0.05  # √β_0 = 0.01
    last = d.q_sample(x0, d.num_steps - 1, noise)
    assert (last - noise).abs().max() < 0.02  # √ᾱ_T ≈ 0.006
    assert last.var().item() == pytest.approx(1.0, abs=0.06)
    assert first.dtype == x0.dtype


def test_predict_x0_from_eps_inverts_q_sample_float64():
    d = _chain(1000)
    x0 = _images((5, 3, 4, 4), dtype=torch.float64)
    noise = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 1, 250, 998, 999])
    x_t = d.q_sample(x0, t, noise)
    torch.testing.assert_close(d.predict_x0_from_eps(x_t, t, noise), x0, rtol=0, atol=1e-11)
    torch.testing.assert_close(d.predict_eps_from_x0(x_t, t, x0), noise, rtol=0, atol=1e-11)
    assert x_t.dtype == torch.float64


@pytest.mark.parametrize("step", [1, 17, 999])
def test_posterior_matches_bayes_rule(step):
    # independent route: q(x_{t-1}|x_t,x0) ∝ N(x_t; √α_t·x_{t-1}, β_t)·N(x_{t-1}; √ᾱ_{t-1}·x0, 1−ᾱ_{t-1})
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    a_bar_prev = math.prod(1 - b for b in betas[:step])
    beta, alpha = betas[step], 1 - betas[step]
    precision = alpha / beta + 1 / (1 - a_bar_prev)
    var = 1 / precision
    # through the reverse process: an x0-predicting chain with fixed variance, given the true x0, is q itself
    d = _chain(1000, prediction="x0", learned_variance=False)
    x0 = _images((1, 3, 4, 4), dtype=torch.float64)
    x_t = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
    mean_ref = var * (math.sqrt(alpha) / beta * x_t + math.sqrt(a_bar_prev) / (1 - a_bar_prev) * x0)
    p = d.p_mean_variance(x0, x_t, torch.tensor([step]))
    mean, variance, log_var = p["mean"], p["variance"], p["log_variance"]
    torch.testing.assert_close(mean, mean_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(variance, torch.full_like(x0, var), rtol=1e-9, atol=0)
    torch.testing.assert_close(log_var, torch.full_like(x0, math.log(var)), rtol=1e-9, atol=0)


def test_posterior_log_variance_clipped_at_t0():
    d = _chain(1000)
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]
    assert torch.isfinite(d.posterior_log_variance_clipped).all()


# ----------------------------------------------------------------------------- respacing


def test_space_timesteps_release_chain_and_ddim():
    release = space_timesteps(1000, 500)  # the release's "500": even, then odd after the middle
    assert len(release) == 500 and release[0] == 0 and release[-1] == 999
    gaps = [b - a for a, b in zip(release, release[1:])]
    assert gaps.count(2) == 498 and gaps.count(3) == 1
    assert release[:250] == list(range(0, 500, 2)) and release[250:] == list(range(501, 1000, 2))
    assert space_timesteps(1000, "ddim500") == list(range(0, 1000, 2))
    assert space_timesteps(1000, "500") == release
    assert space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]
    assert space_timesteps(7, 7) == list(range(7))


@pytest.mark.parametrize("bad", [0, 1001, "ddim999", "abc", "600,600"])
def test_space_timesteps_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="count"):
        space_timesteps(1000, bad)


def test_respace_keeps_alphas_cumprod_and_maps_timesteps():
    base = _chain(1000)
    kept = space_timesteps(1000, 50)
    d = base.respace(kept)
    assert d.num_steps == 50 and d.original_steps == 1000
    torch.testing.assert_close(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12, atol=0)
    assert d.timestep_map.tolist() == kept
    t = torch.tensor([0, 10, 49])
    assert d.model_timesteps(t).tolist() == [kept[0], kept[10], kept[49]]
    # respacing composes and keeps pointing at the original chain
    dd = d.respace([0, 10, 49])
    assert dd.timestep_map.tolist() == [kept[0], kept[10], kept[49]]
    torch.testing.assert_close(dd.alphas_cumprod, base.alphas_cumprod[dd.timestep_map], rtol=1e-12, atol=0)


def test_respace_all_steps_is_identity():
    base = _chain(200)
    d = base.respace(range(200))
    torch.testing.assert_close(d.betas, base.betas, rtol=1e-9, atol=1e-15)
    assert d.timestep_map.tolist() == list(range(200))


def test_train_chain_from_config_keeps_every_other_step():
    d = _chain(1000, train_steps=500)
    base = _chain(1000)
    assert d.num_steps == 500
    assert d.timestep_map.tolist() == space_timesteps(1000, 500)
    torch.testing.assert_close(d.alphas_cumprod, base.alphas_cumprod[d.timestep_map], rtol=1e-12, atol=0)
    # a constant stride of 2 keeps exactly the even steps
    even = base.respace(space_timesteps(1000, "ddim500"))
    assert even.timestep_map.tolist() == list(range(0, 1000, 2))
    # two original steps merge into one: β'_k = 1 − α_{2k}·α_{2k−1} (β'_0 = β_0)
    merged = [1 - base.alphas[2 * k].item() * (base.alphas[2 * k - 1].item() if k else 1.0) for k in range(500)]
    torch.testing.assert_close(even.betas, torch.tensor(merged, dtype=torch.float64), rtol=1e-9, atol=0)


@pytest.mark.parametrize("bad", [[], [3, 3], [-1, 2], [0, 1000]])
def test_respace_rejects_bad_steps(bad):
    with pytest.raises(ValueError, match="timesteps"):
        _chain(1000).respace(bad)


# ----------------------------------------------------------------------------- reverse process


def test_learned_range_endpoints():
    d = _chain(1000)
    x_t = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x_t)
    t = torch.tensor([0, 5, 999])
    hi = d.p_mean_variance(torch.cat([eps, torch.ones_like(eps)], 1), x_t, t)
    lo = d.p_mean_variance(torch.cat([eps, -torch.ones_like(eps)], 1), x_t, t)
    view = (-1, 1, 1, 1)
    torch.testing.assert_close(hi["log_variance"], torch.log(d.betas[t]).view(view).expand_as(x_t))
    torch.testing.assert_close(lo["log_variance"], d.posterior_log_variance_clipped[t].view(view).expand_as(x_t))
    assert lo["log_variance"][1, 0, 0, 0].item() == pytest.approx(math.log(d.posterior_variance[5].item()))
    torch.testing.assert_close(hi["variance"], hi["log_variance"].exp())
    # the mean does not depend on v, and pred_x0 / eps come from the ε channels
    torch.testing.assert_close(hi["mean"], lo["mean"])
    torch.testing.assert_close(hi["pred_x0"], d.predict_x0_from_eps(x_t, t, eps))
    torch.testing.assert_close(hi["eps"], eps)


def test_fixed_small_variance_and_channel_checks():
    d = _chain(100, learned_variance=False)
    x_t = torch.randn(2, 3, 4, 4)
    out = d.p_mean_variance(torch.randn(2, 3, 4, 4), x_t, torch.tensor([3, 50]))
    torch.testing.assert_close(out["variance"][:, 0, 0, 0], d.posterior_variance[[3, 50]].float())
    with pytest.raises(ValueError, match="model output shape"):
        d.p_mean_variance(torch.randn(2, 6, 4, 4), x_t, torch.tensor([3, 50]))
    with pytest.raises(ValueError, match="model output shape"):
        _chain(100).p_mean_variance(torch.randn(2, 3, 4, 4), x_t, torch.tensor([3, 50]))


def test_clip_x0_clamps_to_data_range():
    d = _chain(100)
    x_t = torch.randn(2, 3, 4, 4) * 5
    out = d.p_mean_variance(torch.cat([torch.zeros_like(x_t)] * 2, 1), x_t, torch.tensor([99, 99]), clip_x0=True)
    assert out["pred_x0"].min() >= 0.0 and out["pred_x0"].max() <= 1.0


@pytest.mark.parametrize(
    "bad", [torch.tensor([0, 100]), torch.tensor([-1, 0]), torch.tensor([0.0, 1.0]), torch.tensor([1])]
)
def test_bad_timesteps_rejected(bad):
    with pytest.raises(ValueError, match="t"):
        _chain(100).q_sample(torch.zeros(2, 3, 4, 4), bad)


def test_golden_no_noise_loop_with_oracle_x0():
    """Full respaced posterior loop, no noise: an oracle x0 predictor lands exactly on x0."""
    d = _chain(1000, train_steps=100)
    x0 = _images((2, 3, 8, 8), seed=5)
    x = d.q_sample(x0, d.num_steps - 1, torch.randn(x0.shape, generator=torch.Generator().manual_seed(6)))
    for i in reversed(range(d.num_steps)):
        t = torch.full((2,), i)
        eps = d.predict_eps_from_x0(x, t, x0)
        x = d.p_mean_variance(torch.cat([eps, torch.zeros_like(eps)], 1), x, t)["mean"]
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-5)


def test_golden_no_noise_loop_with_zero_eps():
    """Each posterior step with ε̂ = 0 multiplies by 1/√α_t, so the loop returns x_T/√ᾱ_T."""
    d = _chain(1000, train_steps=50)
    x_T = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    a_bar_T = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000))  # kept steps end at 999
    x = x_T
    for i in reversed(range(d.num_steps)):
        x = d.p_mean_variance(torch.zeros(1, 6, 4, 4), x, i)["mean"]
    torch.testing.assert_close(x, x_T / math.sqrt(a_bar_T), rtol=2e-5, atol=0)


# ----------------------------------------------------------------------------- likelihood helpers


def test_normal_kl_zero_for_same_and_positive_otherwise():
    m, lv = torch.randn(10), torch.randn(10)
    assert normal_kl(m, lv, m, lv).abs().max() < 1e-6  # float32 rounding of exp(±3.5)
    assert (normal_kl(m, lv, m + 0.1, lv - 0.3) > 0).all()
    # closed form for unit variances: ½Δ²
    zero = torch.tensor(0.0)
    assert normal_kl(torch.tensor(1.0), zero, zero, zero).item() == pytest.approx(0.5)


def test_approx_cdf_close_to_exact():
    x = torch.linspace(-6, 6, 241, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - exact).abs().max() < 1e-3


def test_discretized_likelihood_concentrated_and_normalised():
    x = torch.tensor([0.0, 10 / 255, 128 / 255, 1.0])
    # σ far below the bin width, mean on the value: all mass in the right bin
    ll = discretized_gaussian_log_likelihood(x, x, torch.full_like(x, math.log(1e-4)))
    assert ll.abs().max() < 1e-6
    # summing the probabilities of all 256 bins gives 1, edges included
    levels = torch.arange(256, dtype=torch.float64) / 255
    for mean, log_scale in [(0.3, math.log(0.05)), (0.999, math.log(0.2)), (-0.1, math.log(0.01))]:
        p = discretized_gaussian_log_likelihood(
            levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale)
        ).exp()
        assert p.sum().item() == pytest.approx(1.0, abs=1e-9)
    # interior bin ≈ exact Gaussian mass; [−1, 1] data uses the same function with bin 2/255
    interior = discretized_gaussian_log_likelihood(torch.tensor(0.5), torch.tensor(0.52), torch.tensor(math.log(0.01)))
    upper, lower = (0.5 + 0.5 / 255 - 0.52) / 0.01, (0.5 - 0.5 / 255 - 0.52) / 0.01
    exact = 0.5 * (math.erf(upper / math.sqrt(2)) - math.erf(lower / math.sqrt(2)))
    assert interior.exp().item() == pytest.approx(exact, rel=0.02)
    sym = discretized_gaussian_log_likelihood(
        torch.tensor([-1.0, 1.0]), torch.tensor([-1.0, 1.0]), torch.full((2,), math.log(1e-4)), 2 / 255, -1.0, 1.0
    )
    assert sym.abs().max() < 1e-6


def test_kernel_loss_kinds_and_shape_check():
    a, b = _kernels(3, seed=1), _kernels(3, seed=2)
    diff = (a - b).flatten(1)
    torch.testing.assert_close(kernel_loss(a, b, "l1"), diff.abs().sum(1))
    torch.testing.assert_close(kernel_loss(a, b, "mse"), diff.square().mean(1))
    torch.testing.assert_close(kernel_loss(a, b, "l2"), diff.square().sum(1))
    with pytest.raises(ValueError, match="kernel_gt shape"):
        kernel_loss(a, b.flatten(1))
    with pytest.raises(ValueError, match="kind"):
        kernel_loss(a, b, "huber")


# ----------------------------------------------------------------------------- training objective


def _oracle(noise: torch.Tensor, kernel: torch.Tensor, v: float | torch.Tensor):
    def model(x_t, t, lr):
        var = v if isinstance(v, torch.Tensor) else torch.full_like(noise, v)
        return torch.cat([noise.to(x_t.dtype), var.to(x_t.dtype)], 1), kernel.clone()

    return model


def test_oracle_model_gives_zero_mse_and_kernel_loss():
    d = _chain(1000, train_steps=500)
    x0 = _images((4, 3, 8, 8), dtype=torch.float64)
    noise = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kernels = _kernels(4)
    t = torch.tensor([0, 1, 200, 499])
    for v in (-1.0, 0.3, 1.0):
        losses = d.training_losses(_oracle(noise, kernels, v), x0, x0[:, :, ::2, ::2], kernels, t=t, noise=noise)
        assert (losses["mse"] == 0).all() and (losses["kernel"] == 0).all()
        assert torch.isfinite(losses["vb"]).all() and (losses["vb"] >= -1e-9).all()
    # predicting the true posterior variance (v = −1 ⇒ β̃_t) makes the KL terms vanish for t > 0
    exact = d.training_losses(_oracle(noise, kernels, -1.0), x0, x0[:, :, ::2, ::2], kernels, t=t, noise=noise)
    assert exact["vb"][1:].abs().max() < 1e-9
    wrong = d.training_losses(_oracle(noise, kernels, 1.0), x0, x0[:, :, ::2, ::2], kernels, t=t, noise=noise)
    assert (wrong["vb"] >= exact["vb"]).all() and wrong["vb"][1] > 1e-2  # β_t ≈ β̃_t only for large t


def test_model_sees_original_timesteps_and_lr():
    d = _chain(1000, train_steps=100)
    net = TinyNet()
    x0 = _images((3, 3, 8, 8))
    t = torch.tensor([0, 50, 99])
    d.training_losses(net, x0, x0[:, :, ::2, ::2], _kernels(3), t=t)
    assert net.seen_t.tolist() == d.timestep_map[t].tolist()


def test_random_model_losses_finite_including_t0():
    torch.manual_seed(0)
    x0 = _images((3, 3, 8, 8))
    lr = x0[:, :, ::2, ::2]
    for learned in (True, False):
        d = _chain(1000, train_steps=500, learned_variance=learned)
        losses = d.training_losses(TinyNet(learned=learned), x0, lr, _kernels(3), t=torch.tensor([0, 1, 499]))
        for name, value in losses.items():
            assert value.shape == (3,) and value.dtype == torch.float32, name
            assert torch.isfinite(value).all(), name
        assert (losses["vb"] > 0).all() if learned else (losses["vb"] == 0).all()


def _linear_alphas_cumprod(steps: int = 1000) -> list[float]:
    """ᾱ_t of the linear β schedule (1e-4 … 0.02), in plain Python floats."""
    products, product = [], 1.0
    for i in range(steps):
        product *= 1 - (1e-4 + (0.02 - 1e-4) * i / (steps - 1))
        products.append(product)
    return products


def test_vb_is_the_closed_form_gaussian_kl_and_decoder_nll():
    """L_vb against formulas written out here: for t > 0 the KL between the posterior q(x_{t−1}|x_t, x0) (DDPM
    Eq. 6-7) and p with the model's mean and learned-range variance (IDDPM §3.1), for t = 0 the NLL of the
    8-bit decoder (a Gaussian's mass on each pixel's bin, the outer bins open); bits per dimension × N/1000."""
    d = _chain(1000, train_steps=250)
    a_bar = [_linear_alphas_cumprod()[k] for k in d.timestep_map.tolist()]  # the respaced chain's ᾱ
    x0 = _images((3, 3, 4, 4), dtype=torch.float64)
    x0[0, 0, 0, :2] = torch.tensor([0.0, 1.0])  # both open end bins
    noise = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0, 3, 249])
    delta, v = 0.1, 0.4  # ε̂ = ε + δ: a wrong mean; v between log β_t (1) and log β̃_t (−1)
    kernels = _kernels(3)
    vb = d.training_losses(_oracle(noise + delta, kernels, v), x0, x0[:, :, ::2, ::2], kernels, t=t, noise=noise)["vb"]
    frac = (v + 1) / 2

    def step(k: int) -> tuple[float, float, float]:  # β_t, β̃_t (clipped to β̃_1 at t = 0) and the x0 coefficient
        prev = a_bar[k - 1] if k else 1.0
        beta = 1 - a_bar[k] / prev
        if k == 0:
            return beta, step(1)[1], 1.0
        return beta, (1 - prev) / (1 - a_bar[k]) * beta, math.sqrt(prev) * beta / (1 - a_bar[k])

    for i, k in enumerate(t.tolist()):
        beta, beta_tilde, coef_x0 = step(k)
        var = math.exp(frac * math.log(beta) + (1 - frac) * math.log(beta_tilde))
        x0_error = math.sqrt((1 - a_bar[k]) / a_bar[k]) * delta  # x0 − x̂0 for ε̂ = ε + δ
        if k > 0:  # the means differ by coef_x0·(x0 − x̂0), the same for every pixel
            nats = 0.5 * (math.log(var / beta_tilde) + beta_tilde / var + (coef_x0 * x0_error) ** 2 / var - 1)
            rel = 1e-5
        else:  # the decoder's mean is x̂0, x0_error below each pixel: mass of its bin [x0 ± 1/510]

            def cdf(z: float) -> float:  # of x0 − mean; exact, where the code's tanh approximation is within 1e-4
                return 0.5 * (1 + math.erf(z / math.sqrt(2 * var)))

            half, logs = 0.5 / 255, []
            for value in x0[i].flatten().tolist():
                upper = 1.0 if value > 1 - half else cdf(x0_error + half)
                lower = 0.0 if value < half else cdf(x0_error - half)
                logs.append(-math.log(upper - lower))
            nats, rel = sum(logs) / len(logs), 1e-4
        assert vb[i].item() == pytest.approx(nats / math.log(2) * 250 / 1000, rel=rel), k


def test_total_is_mse_plus_vb_plus_weighted_kernel():
    x0 = _images((4, 3, 8, 8))
    cfg = DiffusionConfig(steps=100, kernel_loss_weight=0.5, kernel_loss="mse")
    d = GaussianDiffusion.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    losses = d.training_losses(TinyNet(), x0, x0[:, :, ::2, ::2], _kernels(4), generator=g)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"] + 0.5 * losses["kernel"])
    assert (losses["kernel"] > 0).all()


def test_zero_kernel_weight_drops_kernel_term_exactly():
    d = GaussianDiffusion.from_config(DiffusionConfig(steps=100, kernel_loss_weight=0.0))
    x0 = _images((2, 3, 8, 8))
    net = TinyNet()

    def nan_kernel_model(x_t, t, lr):
        out, kernel = net(x_t, t, lr)
        return out, torch.full_like(kernel, float("nan"))

    lr, seed = x0[:, :, ::2, ::2], torch.Generator().manual_seed(1)
    losses = d.training_losses(nan_kernel_model, x0, lr, _kernels(2), generator=seed)
    assert torch.isnan(losses["kernel"]).all()
    assert torch.equal(losses["loss"], losses["mse"] + losses["vb"])
    # without ground-truth kernels λ must be 0
    none = d.training_losses(net, x0, x0[:, :, ::2, ::2], None, generator=torch.Generator().manual_seed(1))
    assert (none["kernel"] == 0).all()
    with pytest.raises(ValueError, match="kernel_loss_weight"):
        _chain(100).training_losses(net, x0, x0[:, :, ::2, ::2], None)


def test_kernel_shape_mismatch_raises():
    d = _chain(100)
    x0 = _images((2, 3, 8, 8))
    with pytest.raises(ValueError, match="kernel_gt shape"):
        d.training_losses(TinyNet(), x0, x0[:, :, ::2, ::2], _kernels(2).flatten(1))


def test_determinism_under_generator_seed():
    d = _chain(1000, train_steps=500)
    net = TinyNet()
    x0 = _images((4, 3, 8, 8))
    lr, k = x0[:, :, ::2, ::2], _kernels(4)
    runs = [d.training_losses(net, x0, lr, k, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
    assert not torch.equal(runs[0]["mse"], runs[2]["mse"])


def test_vb_gradient_reaches_variance_head_only():
    d = _chain(1000, train_steps=500)
    net = TinyNet()
    x0 = _images((3, 3, 8, 8))
    losses = d.training_losses(net, x0, x0[:, :, ::2, ::2], _kernels(3), t=torch.tensor([0, 7, 300]))
    eps_grad, var_grad = torch.autograd.grad(
        losses["vb"].sum(), [net.eps_head.weight, net.var_head.weight], retain_graph=True, allow_unused=True
    )
    assert eps_grad is None or eps_grad.abs().max() == 0
    assert var_grad is not None and var_grad.abs().max() > 0
    # and the ε MSE does not train the variance head
    (mse_var_grad,) = torch.autograd.grad(losses["mse"].sum(), [net.var_head.weight], allow_unused=True)
    assert mse_var_grad is None or mse_var_grad.abs().max() == 0


def test_losses_finite_under_bf16_autocast():
    d = _chain(1000, train_steps=500)
    net = TinyNet()
    x0 = _images((3, 3, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = d.training_losses(net, x0, x0[:, :, ::2, ::2], _kernels(3), t=torch.tensor([0, 1, 499]))
    for name, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), name
    losses["loss"].sum().backward()
    assert torch.isfinite(net.var_head.weight.grad).all()


def test_half_precision_inputs_return_input_dtype():
    d = _chain(100)
    x_t = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    out = d.p_mean_variance(torch.zeros(2, 6, 4, 4, dtype=torch.bfloat16), x_t, torch.tensor([0, 99]))
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all() for v in out.values())


# ----------------------------------------------------------------------------- config


def test_config_round_trips_through_yaml():
    cfg = DiffusionConfig(steps=1000, train_steps=500, kernel_loss_weight=0.0, kernel_loss="mse")
    again = DiffusionConfig(**yaml.safe_load(yaml.safe_dump(asdict(cfg))))
    assert again == cfg
    a, b = GaussianDiffusion.from_config(cfg), GaussianDiffusion.from_config(again)
    assert a.config == cfg and torch.equal(a.betas, b.betas) and torch.equal(a.timestep_map, b.timestep_map)


@pytest.mark.parametrize(
    "field, value",
    [("steps", 0), ("beta_end", 1.5), ("train_steps", 2000), ("kernel_loss", "huber"), ("kernel_loss_weight", -1.0)],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        DiffusionConfig(**{field: value})


def test_training_losses_rejects_mismatched_variance_config():
    d = _chain(100)
    x0 = _images((2, 3, 8, 8))
    with pytest.raises(ValueError, match="learned_variance"):
        d.training_losses(TinyNet(), x0, x0[:, :, ::2, ::2], _kernels(2), cfg=DiffusionConfig(learned_variance=False))


def test_x0_prediction_oracle_loop_and_zero_loss():
    """prediction="x0": the network's first channels are x̂0; an oracle lands on x0 and has zero loss."""
    d = _chain(1000, train_steps=100, prediction="x0", learned_variance=False)
    x0 = _images((2, 3, 8, 8), seed=5)
    x = d.q_sample(x0, d.num_steps - 1, torch.randn(x0.shape, generator=torch.Generator().manual_seed(6)))
    for i in reversed(range(d.num_steps)):
        p = d.p_mean_variance(x0, x, torch.full((2,), i))
        torch.testing.assert_close(p["pred_x0"], x0)
        torch.testing.assert_close(d.predict_x0_from_eps(x, torch.full((2,), i), p["eps"]), x0, rtol=0, atol=1e-4)
        x = p["mean"]
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-5)
    losses = d.training_losses(lambda x_t, t, lr: (x0.clone(), None), x0, x0, None,
                               cfg=DiffusionConfig(steps=1000, train_steps=100, prediction="x0",
                                                   learned_variance=False, kernel_loss_weight=0))
    assert float(losses["mse"].max()) == 0.0
    assert _chain(1000, prediction="x0").respace([0, 999]).prediction == "x0"
    with pytest.raises(ValueError, match="prediction"):
        DiffusionConfig(prediction="v")
