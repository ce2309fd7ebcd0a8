"""Tests of the noise schedule (docs/method.md §3; paper §3.2, Algorithms 1–2): tables, forward process, posterior,
respacing, the learned range and the DDPM / DDIM steps, against closed forms computed here with numpy in float64."""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
import yaml

from blinddiff.diffusion import DiffusionConfig, GaussianDiffusion, linear_betas, space_timesteps

BETAS = np.linspace(1e-4, 0.02, 1000)  # the paper's linear schedule, float64
ALPHAS_CUMPROD = np.cumprod(1.0 - BETAS)


def _chain(steps: int = 1000, train_steps: int | None = None, **kw) -> GaussianDiffusion:
    return GaussianDiffusion.from_config(DiffusionConfig(steps=steps, train_steps=train_steps, **kw))


def _images(shape=(2, 3, 8, 8), seed=0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, shape, generator=g) / 255.0).to(dtype)


def _gaussian(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _posterior(a_bar: float, a_bar_prev: float, x0: np.ndarray, x_t: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean and variance of q(x_{t−1} | x_t, x0) by Bayes' rule on N(x_t; √α_t·x_{t−1}, β_t)·N(x_{t−1}; √ᾱ_{t−1}·x0,
    1−ᾱ_{t−1}), with α_t = ᾱ_t/ᾱ_{t−1}; at t = 0 (ᾱ_{−1} = 1) the posterior is x0 itself."""
    if a_bar_prev == 1.0:
        return x0, 0.0
    alpha = a_bar / a_bar_prev
    beta = 1.0 - alpha
    var = 1.0 / (alpha / beta + 1.0 / (1.0 - a_bar_prev))
    return var * (math.sqrt(alpha) / beta * x_t + math.sqrt(a_bar_prev) / (1.0 - a_bar_prev) * x0), var


def _never() -> torch.Tensor:
    pytest.fail("the step drew noise where it must not")


# ----------------------------------------------------------------------------- schedule


def test_linear_betas_endpoints_and_monotone():
    b = linear_betas(1000, 1e-4, 0.02)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4, abs=1e-15) and b[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert bool((b[1:] > b[:-1]).all())
    with pytest.raises(ValueError, match="start"):
        linear_betas(10, 0.5, 0.1)


def test_tables_match_numpy_float64():
    d = _chain(1000)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ALPHAS_CUMPROD, rtol=1e-13)
    np.testing.assert_allclose(d.alphas_cumprod_prev.numpy(), np.r_[1.0, ALPHAS_CUMPROD[:-1]], rtol=1e-13)
    np.testing.assert_allclose(d.sqrt_one_minus_alphas_cumprod.numpy(), np.sqrt(1 - ALPHAS_CUMPROD), rtol=1e-13)
    assert ALPHAS_CUMPROD[-1] == pytest.approx(4.04e-5, rel=0.01)  # x_T is nearly pure noise (DDPM §4)


def test_add_noise_at_both_ends():
    d = _chain()
    x0 = _images((4, 3, 32, 32))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    first = d.add_noise(x0, 0, noise)
    assert (first - x0).abs().max() < 0.05  # √β_0 = 0.01
    last = d.add_noise(x0, d.num_steps - 1, noise)
    assert (last - noise).abs().max() < 0.02  # √ᾱ_T ≈ 0.006
    assert first.dtype == x0.dtype


@pytest.mark.parametrize("step", [10, 300, 900])
def test_add_noise_draws_have_the_forward_moments(step):
    """Over many draws of its own noise, x_t has mean √ᾱ_t·x0 and variance 1 − ᾱ_t per pixel (DDPM Eq. 4)."""
    d, n = _chain(1000), 20000
    x0 = _images((1, 3, 4, 4), dtype=torch.float64)
    torch.manual_seed(step)
    x_t = d.add_noise(x0.expand(n, -1, -1, -1), step)
    a_bar = ALPHAS_CUMPROD[step]
    mean_error = (x_t.mean(0) - math.sqrt(a_bar) * x0[0]).abs().max().item()
    assert mean_error < 5 * math.sqrt((1 - a_bar) / n)
    var = x_t.var(0)
    assert (var / (1 - a_bar) - 1).abs().max().item() < 5 * math.sqrt(2 / n)


def test_predict_x0_from_eps_inverts_add_noise_float64():
    d = _chain(1000)
    x0 = _images((5, 3, 4, 4), dtype=torch.float64)
    noise = _gaussian(x0.shape, 0)
    t = torch.tensor([0, 1, 250, 998, 999])
    x_t = d.add_noise(x0, t, noise)
    torch.testing.assert_close(d.predict_x0_from_eps(x_t, t, noise), x0, rtol=0, atol=1e-11)
    torch.testing.assert_close(d.predict_eps_from_x0(x_t, t, x0), noise, rtol=0, atol=1e-11)
    assert x_t.dtype == torch.float64


@pytest.mark.parametrize("respaced", [False, True])
def test_posterior_matches_bayes_rule_in_numpy(respaced):
    """q(x_{t−1} | x_t, x0) of the chain (and of a respaced one, over its kept ᾱ) against Bayes' rule in numpy;
    an x0-predicting chain shown the true x0 has p(x_{t−1} | x_t) = q, its fixed variance β̃_t."""
    kept = space_timesteps(1000, 50) if respaced else list(range(1000))
    d = _chain(1000, prediction="x0", learned_variance=False)
    d = d.respace(kept) if respaced else d
    a_bar = ALPHAS_CUMPROD[kept]
    x0 = _images((1, 3, 4, 4), dtype=torch.float64)
    last = len(kept) - 1
    for i in (0, 1, 17, last):
        x_t = _gaussian(x0.shape, i)
        mean_ref, var_ref = _posterior(a_bar[i], a_bar[i - 1] if i else 1.0, x0.numpy(), x_t.numpy())
        q = d.q_posterior_mean_variance(x0, x_t, i)
        np.testing.assert_allclose(q["mean"].numpy(), mean_ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(q["variance"].numpy(), np.full(x0.shape, var_ref), rtol=1e-9, atol=0)
        clipped = var_ref if i else _posterior(a_bar[1], a_bar[0], x0.numpy(), x_t.numpy())[1]  # β̃_0 → β̃_1
        np.testing.assert_allclose(q["log_variance"].numpy(), np.full(x0.shape, math.log(clipped)), rtol=1e-9)
        p = d.p_mean_variance(x0, x_t, torch.tensor([i]))
        np.testing.assert_allclose(p["mean"].numpy(), mean_ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(p["log_variance"].numpy(), q["log_variance"].numpy(), rtol=1e-12)


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


def test_respaced_tables_reproduce_the_original_alphas_cumprod_at_the_kept_steps():
    kept = space_timesteps(1000, 50)
    d = _chain(1000).respace(kept)
    assert d.num_steps == 50 and d.original_steps == 1000
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ALPHAS_CUMPROD[kept], rtol=1e-12)
    np.testing.assert_allclose(d.betas.numpy(), 1 - ALPHAS_CUMPROD[kept] / np.r_[1.0, ALPHAS_CUMPROD[kept][:-1]],
                               rtol=1e-12)
    assert d.timestep_map.tolist() == kept
    assert d.model_timesteps(torch.tensor([0, 10, 49])).tolist() == [kept[0], kept[10], kept[49]]
    # respacing composes and keeps pointing at the original chain
    dd = d.respace([0, 10, 49])
    assert dd.timestep_map.tolist() == [kept[0], kept[10], kept[49]]
    np.testing.assert_allclose(dd.alphas_cumprod.numpy(), ALPHAS_CUMPROD[[kept[0], kept[10], kept[49]]], rtol=1e-12)


def test_respace_all_steps_is_identity():
    base = _chain(200)
    d = base.respace(range(200))
    torch.testing.assert_close(d.betas, base.betas, rtol=1e-9, atol=1e-15)
    assert d.timestep_map.tolist() == list(range(200))


def test_train_chain_from_config_keeps_every_other_step():
    d = _chain(1000, train_steps=500)
    assert d.num_steps == 500
    assert d.timestep_map.tolist() == space_timesteps(1000, 500)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ALPHAS_CUMPROD[d.timestep_map.numpy()], rtol=1e-12)
    # a constant stride of 2 keeps exactly the even steps; two original steps merge into one:
    # β'_k = 1 − α_{2k}·α_{2k−1} (β'_0 = β_0)
    even = _chain(1000).respace(space_timesteps(1000, "ddim500"))
    assert even.timestep_map.tolist() == list(range(0, 1000, 2))
    alphas = 1 - BETAS
    merged = [1 - alphas[2 * k] * (alphas[2 * k - 1] if k else 1.0) for k in range(500)]
    np.testing.assert_allclose(even.betas.numpy(), merged, rtol=1e-9)


@pytest.mark.parametrize("bad", [[], [3, 3], [-1, 2], [0, 1000]])
def test_respace_rejects_bad_steps(bad):
    with pytest.raises(ValueError, match="timesteps"):
        _chain(1000).respace(bad)


# ----------------------------------------------------------------------------- reverse process


def test_learned_range_endpoints():
    """v = 1 gives σ² = β_t, v = −1 gives β̃_t (IDDPM §3.1), checked against numpy; the mean ignores v."""
    d = _chain(1000)
    x_t = _gaussian((3, 2, 4, 4), 0)
    eps = _gaussian(x_t.shape, 1)
    t = torch.tensor([0, 5, 999])
    hi = d.p_mean_variance(torch.cat([eps, torch.ones_like(eps)], 1), x_t, t)
    lo = d.p_mean_variance(torch.cat([eps, -torch.ones_like(eps)], 1), x_t, t)
    for row, k in enumerate(t.tolist()):
        beta_tilde = _posterior(ALPHAS_CUMPROD[max(k, 1)], ALPHAS_CUMPROD[max(k, 1) - 1], 0.0, 0.0)[1]  # clipped at 0
        np.testing.assert_allclose(hi["log_variance"][row].numpy(), math.log(BETAS[k]), rtol=1e-12)
        np.testing.assert_allclose(lo["log_variance"][row].numpy(), math.log(beta_tilde), rtol=1e-9)
    torch.testing.assert_close(hi["variance"], hi["log_variance"].exp())
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
        _chain(100).add_noise(torch.zeros(2, 3, 4, 4), bad)


def test_ddpm_step_draws_from_the_posterior():
    """Given the true x0, x_{t−1} = ddpm_step has the mean and variance of q(x_{t−1} | x_t, x0) (numpy); at t = 0
    it returns the mean, x0, without drawing."""
    d, n, step = _chain(1000, prediction="x0", learned_variance=False), 20000, 200
    x0 = _images((1, 3, 4, 4), dtype=torch.float64)
    x_t = _gaussian(x0.shape, 7)
    mean_ref, var_ref = _posterior(ALPHAS_CUMPROD[step], ALPHAS_CUMPROD[step - 1], x0.numpy()[0], x_t.numpy()[0])
    many_x0, many_x_t = x0.expand(n, -1, -1, -1), x_t.expand(n, -1, -1, -1)
    torch.manual_seed(0)
    samples = d.ddpm_step(d.p_mean_variance(many_x0, many_x_t, step), many_x_t, step)
    assert np.abs(samples.mean(0).numpy() - mean_ref).max() < 5 * math.sqrt(var_ref / n)
    assert np.abs(samples.var(0).numpy() / var_ref - 1).max() < 5 * math.sqrt(2 / n)
    last = d.ddpm_step(d.p_mean_variance(x0, x_t, 0), x_t, 0, noise=_never)
    torch.testing.assert_close(last, x0, rtol=0, atol=1e-12)


def test_ddim_with_eta_0_is_deterministic_and_invertible():
    """With a constant ε̂ the DDIM ODE (Song et al. 2021, Eq. 12, η = 0) never draws noise, keeps x̂0 fixed, so it
    ends at x̂0 of x_T, and re-noising that end point with the same ε̂ retraces every state it passed."""
    kept = space_timesteps(1000, 20)
    d = _chain(1000, learned_variance=False).respace(kept)
    x_T, eps = _gaussian((2, 3, 4, 4), 1), _gaussian((2, 3, 4, 4), 2)

    def run() -> list[torch.Tensor]:
        states = [x_T]
        for i in reversed(range(d.num_steps)):
            states.append(d.ddim_step(d.p_mean_variance(eps, states[-1], i), states[-1], i, eta=0.0, noise=_never))
        return states

    states = run()
    assert all(torch.equal(a, b) for a, b in zip(states, run()))
    a_T = ALPHAS_CUMPROD[kept[-1]]
    x0_hat = (x_T - math.sqrt(1 - a_T) * eps) / math.sqrt(a_T)
    torch.testing.assert_close(states[-1], x0_hat, rtol=1e-10, atol=1e-10)
    for i, state in zip(reversed(range(d.num_steps)), states[:-1]):  # the state entering step i is x_{k_i}
        a_bar = ALPHAS_CUMPROD[kept[i]]
        torch.testing.assert_close(math.sqrt(a_bar) * states[-1] + math.sqrt(1 - a_bar) * eps, state,
                                   rtol=1e-9, atol=1e-9)


def test_ddim_with_eta_1_is_the_ddpm_posterior():
    """η = 1 gives σ² = β̃_t and the posterior mean (Song et al. 2021, §4.1): the noise-free update is the numpy
    posterior mean, and one unit of noise moves it by √β̃_t."""
    kept = space_timesteps(1000, 50)
    d = _chain(1000, prediction="x0", learned_variance=False).respace(kept)
    x0 = _images((1, 3, 4, 4), dtype=torch.float64)
    for i in (1, 10, 49):
        x_t = _gaussian(x0.shape, i)
        p = d.p_mean_variance(x0, x_t, i)
        mean = d.ddim_step(p, x_t, i, eta=1.0, noise=lambda: torch.zeros_like(x_t))
        moved = d.ddim_step(p, x_t, i, eta=1.0, noise=lambda: torch.ones_like(x_t))
        mean_ref, var_ref = _posterior(ALPHAS_CUMPROD[kept[i]], ALPHAS_CUMPROD[kept[i - 1]], x0.numpy(), x_t.numpy())
        np.testing.assert_allclose(mean.numpy(), mean_ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose((moved - mean).numpy(), math.sqrt(var_ref), rtol=1e-9)


def test_golden_no_noise_loop_with_zero_eps():
    """Each posterior step with ε̂ = 0 multiplies by 1/√α_t, so the loop returns x_T/√ᾱ_T."""
    d = _chain(1000, train_steps=50)
    x_T = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    x = x_T
    for i in reversed(range(d.num_steps)):
        x = d.ddpm_step(d.p_mean_variance(torch.zeros(1, 6, 4, 4), x, i), x, i, noise=lambda: torch.zeros(1, 3, 4, 4))
    torch.testing.assert_close(x, x_T / math.sqrt(ALPHAS_CUMPROD[999]), rtol=2e-5, atol=0)  # kept steps end at 999


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
    assert torch.equal(a.betas, b.betas) and torch.equal(a.timestep_map, b.timestep_map)


@pytest.mark.parametrize(
    "field, value",
    [("steps", 0), ("beta_end", 1.5), ("train_steps", 2000), ("kernel_loss", "huber"), ("kernel_loss_weight", -1.0),
     ("prediction", "v")],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        DiffusionConfig(**{field: value})


def test_respacing_keeps_the_prediction_and_variance_kind():
    d = _chain(1000, prediction="x0", learned_variance=False).respace([0, 999])
    assert d.prediction == "x0" and not d.learned_variance and d.data_range == (0.0, 1.0)
