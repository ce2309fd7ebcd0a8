"""Tests of the training objective, paper Eq. (13) (docs/method.md §3): the likelihood helpers, the IDDPM bound
against closed forms written out here, the kernel term and how `training_losses` combines them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blinddiff.diffusion import DiffusionConfig, GaussianDiffusion
from blinddiff.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    kernel_loss,
    loss_settings,
    normal_kl,
    training_losses,
    vb_terms_bpd,
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
    """A delta against the uniform kernel of n = k² taps: Σ|Δ| = 2(1 − 1/n), Σ Δ² = (1 − 1/n)² + (n − 1)/n², mean Δ²
    that over n; identical kernels cost 0 (paper Eq. 13, L_kernel)."""
    n = KSIZE * KSIZE
    delta = torch.zeros(2, KSIZE, KSIZE)
    delta[:, KSIZE // 2, KSIZE // 2] = 1.0
    uniform = torch.full((2, KSIZE, KSIZE), 1.0 / n)
    l2 = (1 - 1 / n) ** 2 + (n - 1) / n**2
    assert kernel_loss(delta, uniform, "l1").tolist() == pytest.approx([2 * (1 - 1 / n)] * 2, rel=1e-6)
    assert kernel_loss(delta, uniform, "l2").tolist() == pytest.approx([l2] * 2, rel=1e-6)
    assert kernel_loss(delta, uniform, "mse").tolist() == pytest.approx([l2 / n] * 2, rel=1e-6)
    assert kernel_loss(uniform, uniform).tolist() == [0.0, 0.0]
    a, b = _kernels(3, seed=1), _kernels(3, seed=2)
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


def test_oracle_model_gives_zero_mse_and_the_exact_variance_zero_kl():
    """ε̂ = the drawn ε (the target of L_noise) costs 0; v = −1 (σ² = β̃_t) makes the KL of L_vb vanish for t > 0,
    any other v costs more."""
    d = _chain(1000, train_steps=500)
    x0 = _images((4, 3, 8, 8), dtype=torch.float64)
    noise = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kernels = _kernels(4)
    t = torch.tensor([0, 1, 200, 499])
    for v in (-1.0, 0.3, 1.0):
        losses = training_losses(d, _oracle(noise, kernels, v), x0, x0[:, :, ::2, ::2], kernels, t=t, noise=noise)
        assert (losses["mse"] == 0).all() and (losses["kernel"] == 0).all()
        assert torch.isfinite(losses["vb"]).all() and (losses["vb"] >= -1e-9).all()
    # predicting the true posterior variance (v = −1 ⇒ β̃_t) makes the KL terms vanish for t > 0
    exact = training_losses(d, _oracle(noise, kernels, -1.0), x0, x0[:, :, ::2, ::2], kernels, t=t, noise=noise)
    assert exact["vb"][1:].abs().max() < 1e-9
    wrong = training_losses(d, _oracle(noise, kernels, 1.0), x0, x0[:, :, ::2, ::2], kernels, t=t, noise=noise)
    assert (wrong["vb"] >= exact["vb"]).all() and wrong["vb"][1] > 1e-2  # β_t ≈ β̃_t only for large t


def test_model_sees_original_timesteps_and_lr():
    d = _chain(1000, train_steps=100)
    net = TinyNet()
    x0 = _images((3, 3, 8, 8))
    t = torch.tensor([0, 50, 99])
    training_losses(d, net, x0, x0[:, :, ::2, ::2], _kernels(3), t=t)
    assert net.seen_t.tolist() == d.timestep_map[t].tolist()


def test_random_model_losses_finite_including_t0():
    torch.manual_seed(0)
    x0 = _images((3, 3, 8, 8))
    lr = x0[:, :, ::2, ::2]
    for learned in (True, False):
        d = _chain(1000, train_steps=500, learned_variance=learned)
        losses = training_losses(d, TinyNet(learned=learned), x0, lr, _kernels(3), t=torch.tensor([0, 1, 499]))
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
    vb = training_losses(d, _oracle(noise + delta, kernels, v), x0, x0[:, :, ::2, ::2], kernels, t=t, noise=noise)["vb"]
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


def test_total_is_mse_plus_vb_plus_the_configured_kernel_term():
    """loss_settings(cfg) carries λ and the kernel norm of the config: L = mse + vb + 0.5·(mean Δ² of the taps)."""
    x0 = _images((4, 3, 8, 8))
    cfg = DiffusionConfig(steps=100, kernel_loss_weight=0.5, kernel_loss="mse")
    d = GaussianDiffusion.from_config(cfg)
    net, predicted = TinyNet(), []

    def model(x_t, t, lr):
        out, kernel = net(x_t, t, lr)
        predicted.append(kernel.detach())
        return out, kernel

    kernels = _kernels(4)
    losses = training_losses(d, model, x0, x0[:, :, ::2, ::2], kernels, generator=torch.Generator().manual_seed(0),
                             **loss_settings(cfg))
    torch.testing.assert_close(losses["kernel"], (predicted[0] - kernels).square().mean((1, 2)))
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"] + 0.5 * losses["kernel"])
    assert (losses["kernel"] > 0).all()


def test_zero_kernel_weight_drops_kernel_term_exactly():
    d = _chain(100)
    x0 = _images((2, 3, 8, 8))
    net = TinyNet()

    def nan_kernel_model(x_t, t, lr):
        out, kernel = net(x_t, t, lr)
        return out, torch.full_like(kernel, float("nan"))

    lr, seed = x0[:, :, ::2, ::2], torch.Generator().manual_seed(1)
    losses = training_losses(d, nan_kernel_model, x0, lr, _kernels(2), generator=seed, kernel_weight=0.0)
    assert torch.isnan(losses["kernel"]).all()
    assert torch.equal(losses["loss"], losses["mse"] + losses["vb"])
    # without ground-truth kernels λ must be 0
    none = training_losses(d, net, x0, x0[:, :, ::2, ::2], None, generator=torch.Generator().manual_seed(1),
                           kernel_weight=0.0)
    assert (none["kernel"] == 0).all()
    with pytest.raises(ValueError, match="kernel_loss_weight"):
        training_losses(_chain(100), net, x0, x0[:, :, ::2, ::2], None)


def test_kernel_shape_mismatch_raises():
    d = _chain(100)
    x0 = _images((2, 3, 8, 8))
    with pytest.raises(ValueError, match="kernel_gt shape"):
        training_losses(d, TinyNet(), x0, x0[:, :, ::2, ::2], _kernels(2).flatten(1))


def test_determinism_under_generator_seed():
    d = _chain(1000, train_steps=500)
    net = TinyNet()
    x0 = _images((4, 3, 8, 8))
    lr, k = x0[:, :, ::2, ::2], _kernels(4)
    runs = [training_losses(d, net, x0, lr, k, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
    assert not torch.equal(runs[0]["mse"], runs[2]["mse"])


def test_vb_gradient_reaches_variance_head_only():
    d = _chain(1000, train_steps=500)
    net = TinyNet()
    x0 = _images((3, 3, 8, 8))
    losses = training_losses(d, net, x0, x0[:, :, ::2, ::2], _kernels(3), t=torch.tensor([0, 7, 300]))
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
        losses = training_losses(d, net, x0, x0[:, :, ::2, ::2], _kernels(3), t=torch.tensor([0, 1, 499]))
    for name, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), name
    losses["loss"].sum().backward()
    assert torch.isfinite(net.var_head.weight.grad).all()


def test_x0_prediction_is_trained_on_x0():
    """prediction="x0": L_noise is the MSE to the clean image, whatever the noise drawn (x̂0 = x0 + δ costs δ²)."""
    d = _chain(1000, train_steps=100, prediction="x0", learned_variance=False)
    x0 = _images((2, 3, 8, 8), seed=5)
    losses = training_losses(d, lambda x_t, t, lr: (x0 + 0.25, None), x0, x0, None, kernel_weight=0.0)
    torch.testing.assert_close(losses["mse"], torch.full((2,), 0.0625))
    assert (losses["vb"] == 0).all()


def test_vb_terms_need_a_learned_variance():
    d = _chain(100, learned_variance=False)
    x = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="learned_variance"):
        vb_terms_bpd(d, x, x, x, 0)
