"""Tests of the MAP reverse process (docs/method.md §4; paper Algorithm 2): data term, samplers, guidance, tiles,
errors."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blinddiff.degradation import blur, degrade, downsample, matlab_bicubic_resize
from blinddiff.diffusion import DiffusionConfig, GaussianDiffusion
from blinddiff.model import MCFormer, MCFormerConfig
from blinddiff.sampling import (
    GRADIENTS,
    SAMPLERS,
    PositionalNoise,
    StepInfo,
    check_tile,
    data_term,
    known_kernel,
    sample,
    sample_windows,
    sampling_chain,
    window_grid,
)

SCALE = 2
KSIZE = 5
ALPHAS_CUMPROD = GaussianDiffusion.from_config(DiffusionConfig()).alphas_cumprod  # original 1000-step ᾱ


def _gaussian_kernel(sigma: float, size: int = KSIZE) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float32) - size // 2
    k = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return k / k.sum()


def _smooth_image(batch: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Low-frequency RGB images in [0.15, 0.85] (upsampled noise), [B, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=g)
    return 0.15 + 0.7 * F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)


def _lr_of(x0: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    return degrade(x0, kernel, SCALE, quantize=False)


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def data_energy(x0, kernel, lr, scale, *, guidance="kernel-aware", downsample="bicubic", x0_norm_weight=0.0):
    """E of the data term named `guidance` (zeros for "none")."""
    term = data_term(guidance, lr, scale, downsample, x0_norm_weight=x0_norm_weight)
    return x0.new_zeros(x0.shape[0]) if term is None else term(x0, kernel)


def run_sample(model, lr, chain, *, scale, guidance="kernel-aware", downsample="bicubic", x0_norm_weight=0.0,
               kernel=None, tile=None, tile_overlap=32, **kwargs):
    """`sample` with the data term and the known kernel as `BlindDiff.run` builds them; with `tile`, the
    windows of `sample_windows` (the noise from `generators`, as `sample` draws it), written into one tensor."""
    denoiser = model if kernel is None else known_kernel(model, kernel)
    if tile is None:
        energy = data_term(guidance, lr, scale, downsample, x0_norm_weight=x0_norm_weight)
        return sample(denoiser, lr, chain, scale=scale, data_term=energy, **kwargs)
    generators = kwargs.pop("generators", None)
    noise = PositionalNoise.from_generators(generators or [torch.Generator().manual_seed(0) for _ in lr])
    sr = torch.full((lr.shape[0], lr.shape[1], scale * lr.shape[2], scale * lr.shape[3]), math.nan)

    def write(top, band):
        assert torch.isnan(sr[:, :, top:top + band.shape[2]]).all()  # each row written once
        sr[:, :, top:top + band.shape[2]] = band

    k = sample_windows(denoiser, lr, chain, scale=scale, write=write, tile=tile, overlap=tile_overlap,
                       multiple=getattr(getattr(model, "cfg", None), "size_multiple", 1), noise=noise,
                       data_term=lambda crop: data_term(guidance, crop, scale, downsample,
                                                        x0_norm_weight=x0_norm_weight), **kwargs)
    assert not torch.isnan(sr).any()
    return sr, k


class PriorDenoiser:
    """Exact posterior-mean denoiser of a Gaussian prior N(μ, var·I), μ = mean_fn(lr, size).

    var = 0 gives the "oracle" ε of a known x0 = μ. It reads ᾱ at the ORIGINAL step it is given,
    so a sampler passing respaced indices would break it. Records what it receives.
    """

    def __init__(self, mean_fn, kernel_fn, var: float = 0.05, learned: bool = True) -> None:
        self.mean_fn, self.kernel_fn, self.var, self.learned = mean_fn, kernel_fn, var, learned
        self.sizes: list[tuple[int, int]] = []
        self.kernels: list[torch.Tensor] = []
        self.steps: list[int] = []

    def __call__(self, x_t, t, lr):
        ab = ALPHAS_CUMPROD[t.cpu()].to(x_t).view(-1, 1, 1, 1)
        mu = self.mean_fn(lr, tuple(x_t.shape[-2:]))
        x0 = mu + ab.sqrt() * self.var / (ab * self.var + 1 - ab) * (x_t - ab.sqrt() * mu)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        out = torch.cat([eps, 0.3 * torch.tanh(x_t)], 1) if self.learned else eps
        kernel = self.kernel_fn(x_t, lr)
        self.sizes.append(tuple(x_t.shape[-2:]))
        self.kernels.append(kernel.detach().clone())
        self.steps.extend(t.tolist())
        return out, kernel


def _fixed(x0: torch.Tensor):
    return lambda lr, size: x0.to(lr)


def _upsampled(mode: str = "bicubic"):
    if mode == "nearest":
        return lambda lr, size: F.interpolate(lr, size=size, mode="nearest")
    return lambda lr, size: F.interpolate(lr, size=size, mode="bicubic", align_corners=False)


def _constant_kernel(kernel: torch.Tensor):
    return lambda x_t, lr: kernel.to(x_t).expand(x_t.shape[0], -1, -1)


def _content_kernel(x_t, lr):
    """A valid kernel that depends (differentiably) on the tile content."""
    r = (torch.arange(KSIZE, dtype=x_t.dtype, device=x_t.device) - KSIZE // 2) ** 2
    d2 = (r[:, None] + r[None, :]).flatten()
    width = 0.5 + 2.0 * torch.sigmoid(4 * (x_t.mean((1, 2, 3)) + lr.mean((1, 2, 3)) - 0.6))
    return torch.softmax(-d2[None] / width[:, None], dim=1).view(-1, KSIZE, KSIZE)


@pytest.fixture(scope="module")
def truth():
    x0 = _smooth_image(1, 16, seed=3)
    kernel = _gaussian_kernel(1.2)
    return x0, kernel, _lr_of(x0, kernel)


# --------------------------------------------------------------------------- chain and data term


def test_sampling_chain_is_evenly_spaced_and_ends_at_T():
    cfg = DiffusionConfig()
    chain = sampling_chain(cfg, 10)
    steps = chain.timestep_map.tolist()
    assert len(steps) == chain.num_steps == 10
    assert steps[0] == 0 and steps[-1] == cfg.steps - 1
    gaps = torch.diff(torch.tensor(steps))
    assert int(gaps.max() - gaps.min()) <= 1
    torch.testing.assert_close(chain.alphas_cumprod, ALPHAS_CUMPROD[chain.timestep_map])
    assert sampling_chain(cfg, 1).timestep_map.tolist() == [cfg.steps - 1]  # one jump from pure noise
    assert sampling_chain(replace_train(cfg), 4).timestep_map[-1] == cfg.steps - 1  # ignores train_steps
    for bad in (0, -3, 1001, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            sampling_chain(cfg, bad)


def replace_train(cfg: DiffusionConfig) -> DiffusionConfig:
    return DiffusionConfig(steps=cfg.steps, train_steps=500)


def test_data_energy_is_the_unsquared_norm(truth):
    x0, kernel, lr = truth
    zero = data_energy(x0, kernel[None], lr, SCALE)
    assert zero.shape == (1,) and float(zero) < 1e-6
    delta = 0.05 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    e1 = data_energy(x0 + delta, kernel, lr, SCALE)
    e2 = data_energy(x0 + 2 * delta, kernel, lr, SCALE)
    torch.testing.assert_close(e2, 2 * e1, rtol=1e-4, atol=1e-6)  # un-squared: linear in the residual
    manual = (lr - downsample(blur(x0 + delta, kernel[None]), SCALE)).flatten(1).norm(dim=1)
    torch.testing.assert_close(e1, manual)
    # bicubic variant: fixed bicubic degradation, the kernel is not used
    bic = data_energy(x0, None, lr, SCALE, guidance="bicubic")
    torch.testing.assert_close(bic, (lr - matlab_bicubic_resize(x0, scale=1 / SCALE)).flatten(1).norm(dim=1))
    assert float(bic) > 10 * float(zero)
    # the release's extra 0.1·‖x̂0‖ term, and "none"
    extra = data_energy(x0 + delta, kernel, lr, SCALE, x0_norm_weight=0.1)
    torch.testing.assert_close(extra, e1 + 0.1 * (x0 + delta).flatten(1).norm(dim=1))
    assert torch.equal(data_energy(x0, kernel, lr, SCALE, guidance="none"), torch.zeros(1))
    # direct downsampling (paper Eq. 1) is a different data term
    lr_direct = degrade(x0, kernel, SCALE, downsample="direct", quantize=False)
    assert float(data_energy(x0, kernel, lr_direct, SCALE, downsample="direct")) < 1e-6


@pytest.mark.parametrize("guidance", ["kernel-aware", "bicubic"])
def test_data_energy_gradient_matches_finite_differences(truth, guidance):
    """∂E/∂x̂0 and ∂E/∂k̂ (what the guided step follows) are those of finite differences of E, away from E = 0."""
    x0, kernel, lr = truth
    x = x0.double() + 0.05 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    k = _gaussian_kernel(0.8).double()[None]  # not the true kernel
    energy = data_term(guidance, lr.double(), SCALE, x0_norm_weight=0.1)
    assert torch.autograd.gradcheck(energy, (x.requires_grad_(True), k.requires_grad_(guidance == "kernel-aware")),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------- the reverse process


def _predicted_output(chain: GaussianDiffusion, var: float, sampler: str, eta: float) -> tuple[float, float]:
    """(gain, variance) of the reverse process for data N(μ, var·I) and its exact denoiser: the output is
    μ + gain·(x_T − √ᾱ_T·μ) + noise of that variance, x_T ~ N(0, I). Each step maps z = x_t − √ᾱ_t·μ to
    a·z + σ·ξ, since x̂0 − μ = c·z with c = √ᾱ·var/(ᾱ·var + 1 − ᾱ) (DDPM Eq. 6-7 with β̃_t; DDIM Eq. 12)."""
    alphas = [float(ALPHAS_CUMPROD[step]) for step in chain.timestep_map.tolist()]
    gain, variance = 1.0, 1.0
    for k in reversed(range(len(alphas))):
        a, prev = alphas[k], alphas[k - 1] if k else 1.0
        c = math.sqrt(a) * var / (a * var + 1 - a)
        if sampler == "ddpm":
            beta = 1 - a / prev
            factor = math.sqrt(prev) * beta / (1 - a) * c + (1 - prev) * math.sqrt(1 - beta) / (1 - a)
            noise = (1 - prev) / (1 - a) * beta if k else 0.0
        else:
            noise = eta**2 * (1 - prev) / (1 - a) * (1 - a / prev)
            factor = math.sqrt(prev) * c + math.sqrt(1 - prev - noise) * (1 - math.sqrt(a) * c) / math.sqrt(1 - a)
        gain, variance = gain * factor, factor**2 * variance + noise
    return gain, variance


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_exact_denoiser_of_gaussian_data_gives_the_predicted_output_statistics(sampler):
    """Data x0 ~ N(μ, v·I) and the denoiser exact for it (the posterior mean E[x0 | x_t] at the original step it
    is shown): the sampled images' mean and variance per pixel are those `_predicted_output` computes."""
    var, eta = 0.002, 0.5
    mu = 0.3 + 0.4 * (_smooth_image(2, 64, seed=3) - 0.15) / 0.7  # in [0.3, 0.7]: 6.7 σ from the clip at 0 and 1
    kernel = _gaussian_kernel(1.2)
    model = PriorDenoiser(_fixed(mu), _constant_kernel(kernel), var=var, learned=False)
    chain = sampling_chain(DiffusionConfig(learned_variance=False), 8)
    infos: list[StepInfo] = []
    sr, k = run_sample(model, torch.zeros(2, 3, 32, 32), chain, scale=SCALE, sampler=sampler, eta=eta,
                       guidance="none", generators=_gens(1, 2), callback=infos.append)
    gain, variance = _predicted_output(chain, var, sampler, eta)
    residual = (sr - mu + gain * math.sqrt(float(ALPHAS_CUMPROD[-1])) * mu).flatten().double()
    n = residual.numel()
    assert abs(float(residual.mean())) < 4 * math.sqrt(variance / n)
    assert float(residual.var()) == pytest.approx(variance, rel=4 * math.sqrt(2 / n))
    steps = chain.timestep_map.flip(0).tolist()
    assert model.steps == [t for t in steps for _ in range(2)]  # each image shown the original step, T−1 first
    assert [i.index for i in infos] == list(range(8)) and [i.t for i in infos] == steps
    torch.testing.assert_close(k, kernel.expand(2, -1, -1))


def test_kernel_aware_guidance_lowers_the_data_energy(truth):
    x0, kernel, lr = truth
    chain = sampling_chain(DiffusionConfig(), 10)
    energies, final = {}, {}
    for guidance in ("none", "kernel-aware"):
        model = PriorDenoiser(_upsampled("nearest"), _constant_kernel(kernel), var=0.05)  # wrong prior mean
        infos: list[StepInfo] = []
        sr, _ = run_sample(model, lr, chain, scale=SCALE, guidance=guidance, zeta=1.0, generators=_gens(0),
                       callback=infos.append)
        if guidance == "none":
            assert all(float(i.energy) == 0 for i in infos)
            energies[guidance] = [float(data_energy(i.x0, i.kernel, lr, SCALE)) for i in infos]
        else:
            energies[guidance] = [float(i.energy) for i in infos]
            assert energies[guidance] == pytest.approx([float(data_energy(i.x0, i.kernel, lr, SCALE)) for i in infos])
        final[guidance] = float(data_energy(sr, kernel, lr, SCALE))
    assert all(g <= n + 1e-3 for g, n in zip(energies["kernel-aware"], energies["none"]))
    assert energies["kernel-aware"][-1] < energies["none"][-1] - 0.02
    assert final["kernel-aware"] < 0.8 * final["none"]


def test_bicubic_guidance_ignores_the_kernel_and_kernel_aware_uses_it(truth):
    x0, kernel, lr = truth
    chain = sampling_chain(DiffusionConfig(), 4)
    results = {}
    for guidance in ("bicubic", "kernel-aware"):
        for sigma in (0.6, 2.0):
            model = PriorDenoiser(_upsampled(), _constant_kernel(_gaussian_kernel(sigma)))
            results[guidance, sigma] = run_sample(model, lr, chain, scale=SCALE, guidance=guidance, generators=_gens(0))[0]
    assert torch.equal(results["bicubic", 0.6], results["bicubic", 2.0])
    assert not torch.allclose(results["kernel-aware", 0.6], results["kernel-aware", 2.0], atol=1e-4)


def test_guidance_steps_by_zeta_times_the_energy_gradient():
    """x_{t−1} = x'_{t−1} − ζ·∂E/∂(·): with gradient="x0" the step is ζ·∂E/∂x̂0, which finite differences of E
    give; with "xt" it is ζ·∂E/∂x_t = ζ·c·∂E/∂x̂0 for a denoiser whose x̂0 is μ + c·(x_t − √ᾱ_t·μ) (the exact one
    of data N(μ, v·I)); the release's 0.1·‖x̂0‖ term adds 0.1·x̂0/‖x̂0‖, the gradient of a norm."""
    kernel = _gaussian_kernel(1.2).double()
    lr = _lr_of(_smooth_image(2, 16, seed=5), _gaussian_kernel(1.5)).double()
    var, zeta, step = 0.01, 0.5, 300
    chain = GaussianDiffusion.from_config(DiffusionConfig(learned_variance=False)).respace([0, step])

    def first_step(**kw) -> tuple[torch.Tensor, torch.Tensor]:  # (x̂0 at t = 300, the state it leads to)
        infos: list[StepInfo] = []
        model = PriorDenoiser(_upsampled(), _constant_kernel(kernel), var=var, learned=False)
        run_sample(model, lr, chain, scale=SCALE, zeta=zeta, generators=_gens(0, 1), callback=infos.append, **kw)
        return infos[0].x0, infos[1].x_t

    x0_hat, unguided = first_step(guidance="none")  # the same x_T and the same step noise in every run
    assert 0 < float(x0_hat.min()) and float(x0_hat.max()) < 1  # x̂0 is not clipped: the map is linear
    grad_x0 = (unguided - first_step(gradient="x0")[1]) / zeta
    grad_xt = (unguided - first_step(gradient="xt")[1]) / zeta
    with_norm = (unguided - first_step(gradient="x0", x0_norm_weight=0.1)[1]) / zeta
    directions = torch.randn(4, *x0_hat.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-5
    for d in directions:  # directional derivatives of E, per image
        ahead, behind = (data_energy(x0_hat + side * h * d, kernel, lr, SCALE) for side in (1, -1))
        slope = (ahead - behind) / (2 * h)
        torch.testing.assert_close((grad_x0 * d).flatten(1).sum(1), slope, rtol=1e-6, atol=1e-9)
    a = float(ALPHAS_CUMPROD[step])
    torch.testing.assert_close(grad_xt, math.sqrt(a) * var / (a * var + 1 - a) * grad_x0, rtol=1e-6, atol=1e-12)
    norms = x0_hat.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(with_norm - grad_x0, 0.1 * x0_hat / norms, rtol=1e-6, atol=1e-12)


def test_zeta_zero_is_no_guidance_but_reports_the_energy(truth):
    x0, kernel, lr = truth
    chain = sampling_chain(DiffusionConfig(), 4)

    def run(**kw):
        model = PriorDenoiser(_upsampled(), _content_kernel)
        return run_sample(model, lr, chain, scale=SCALE, generators=_gens(0), **kw)[0]

    assert torch.equal(run(zeta=0.0), run(guidance="none"))
    infos: list[StepInfo] = []
    run_sample(PriorDenoiser(_upsampled(), _content_kernel), lr, chain, scale=SCALE, zeta=0.0, callback=infos.append)
    assert all(float(i.energy) == pytest.approx(float(data_energy(i.x0, i.kernel, lr, SCALE))) for i in infos)
    assert all(float(i.energy) > 0 for i in infos)


def test_non_blind_mode_uses_the_given_kernel(truth):
    x0, kernel, lr = truth
    garbage = torch.zeros(KSIZE, KSIZE)
    garbage[0, -1] = 1.0  # a shifted delta: badly inconsistent with y
    chain = sampling_chain(DiffusionConfig(), 6)
    runs = {}
    for mode, given in (("blind", None), ("non-blind", kernel[None])):
        model = PriorDenoiser(_fixed(x0), _constant_kernel(garbage), var=0.0)
        infos: list[StepInfo] = []
        sr, k = run_sample(model, lr, chain, scale=SCALE, kernel=given, generators=_gens(0), callback=infos.append)
        runs[mode] = (sr, k, infos)
    _, k, infos = runs["non-blind"]
    assert all(float(i.energy) < 1e-4 for i in infos)
    assert all(torch.equal(i.kernel, kernel[None]) for i in infos)
    assert torch.equal(k, kernel[None])
    _, k, infos = runs["blind"]
    assert all(float(i.energy) > 1e-2 for i in infos)
    assert torch.equal(k, garbage[None])


def test_same_seed_same_result_batch_equals_one_by_one():
    lr = _lr_of(_smooth_image(2, 16, seed=5), _gaussian_kernel(1.5))
    chain = sampling_chain(DiffusionConfig(), 5)

    def run(images, seeds, **kw):
        model = PriorDenoiser(_upsampled(), _content_kernel)
        return run_sample(model, images, chain, scale=SCALE, generators=_gens(*seeds), **kw)

    a, ka = run(lr, (1, 2))
    b, kb = run(lr, (1, 2))
    assert torch.equal(a, b) and torch.equal(ka, kb)
    c, _ = run(lr, (1, 3))
    assert torch.equal(a[0], c[0]) and (a[1] - c[1]).abs().max() > 1e-3
    for i, seed in enumerate((1, 2)):
        single, k = run(lr[i : i + 1], (seed,))
        torch.testing.assert_close(single, a[i : i + 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(k, ka[i : i + 1], atol=1e-5, rtol=0)
    d, _ = run_sample(PriorDenoiser(_upsampled(), _content_kernel), lr, chain, scale=SCALE)  # default: seed 0 each
    e, _ = run(lr, (0, 0))
    assert torch.equal(d, e)
    f, _ = run(lr, (1, 2), sampler="ddim", eta=0.0)
    g, _ = run(lr, (1, 2), sampler="ddim", eta=0.0)
    assert torch.equal(f, g)


def test_no_graph_survives_a_step_and_no_parameter_gradients(truth):
    x0, kernel, lr = truth

    class TinyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(6, 6, 3, padding=1)
            self.head = nn.Linear(6, KSIZE * KSIZE)

        def forward(self, x_t, t, lr):
            h = torch.cat([x_t, F.interpolate(lr, size=x_t.shape[-2:], mode="nearest")], 1)
            out = self.conv(h)
            return out, torch.softmax(self.head(h.mean((2, 3))), 1).view(-1, KSIZE, KSIZE)

    net = TinyNet()
    refs: list[weakref.ref] = []
    seen: list[StepInfo] = []

    def callback(info: StepInfo) -> None:
        for tensor in (info.x_t, info.x0, info.kernel, info.energy):
            assert tensor.grad_fn is None and not tensor.requires_grad
        refs.append(weakref.ref(info.x0))
        seen.append(info) if not seen else None  # keep only the first step alive

    for gradient in GRADIENTS:
        refs.clear(), seen.clear()
        sr, k = run_sample(net, lr, sampling_chain(DiffusionConfig(), 3), scale=SCALE, gradient=gradient,
                       callback=callback)
        assert sr.grad_fn is None and k.grad_fn is None and not sr.requires_grad
        gc.collect()
        assert refs[0]() is not None and all(r() is None for r in refs[1:-1])
        assert all(p.grad is None for p in net.parameters())


# --------------------------------------------------------------------------- tiles


def test_windows_are_a_partition_of_unity_on_the_scale_grid():
    windows = window_grid(40, 56, 16, 6)
    assert len(windows) > 1
    total = torch.zeros(40, 56, dtype=torch.float64)
    for w in windows:
        assert w.top % 2 == 0 and w.left % 2 == 0 and w.height == w.width == 16
        total[w.top:w.top + w.height, w.left:w.left + w.width] += w.weight()[0, 0]
    torch.testing.assert_close(total, torch.ones_like(total))  # the weights sum to 1 at every pixel
    assert sum(w.area() for w in windows) == pytest.approx(40 * 56)
    first = windows[0].weight()[0, 0]  # not ramped at the image border; its inner overlap is
    assert float(first[0, 0]) == pytest.approx(1.0) and 0 < float(first[0, 15]) < 0.1


def test_a_window_of_the_noise_is_the_noise_of_the_image_there():
    noise = PositionalNoise([3, 4])
    whole = noise(1, 3, (0, 0, 150, 130), torch.device("cpu"), torch.float32)
    part = noise(1, 3, (62, 70, 80, 50), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(part, whole[:, :, 62:142, 70:120], rtol=0, atol=0)
    assert abs(float(whole.std()) - 1) < 0.02 and (whole[0] - whole[1]).abs().mean() > 0.5  # seeds differ
    assert (noise(2, 3, (0, 0, 150, 130), torch.device("cpu"), torch.float32) - whole).abs().mean() > 0.5
    blocks = whole[0, 0].unfold(0, 64, 64).unfold(1, 64, 64).reshape(-1, 64 * 64)  # squares are unrelated
    assert float(torch.corrcoef(blocks).fill_diagonal_(0).abs().max()) < 0.1


def test_bands_leave_top_to_bottom_and_hold_only_the_rows_a_window_touches():
    lr = _lr_of(_smooth_image(1, 48, seed=4), _gaussian_kernel(1.0))
    bands: list = []
    sample_windows(PriorDenoiser(_upsampled(), _content_kernel), lr, sampling_chain(DiffusionConfig(), 2),
                   scale=SCALE, write=lambda top, band: bands.append((top, band.shape[2])), tile=16, overlap=4)
    tops = [top for top, _ in bands]
    assert tops == sorted(tops) and tops[0] == 0 and sum(rows for _, rows in bands) == 48
    assert all(top + rows == nxt for (top, rows), nxt in zip(bands, tops[1:]))  # contiguous, each row once
    assert max(rows for _, rows in bands) <= 16  # the float band never grew past a window's rows


def test_single_tile_is_exactly_the_untiled_path(truth):
    x0, kernel, lr = truth
    chain = sampling_chain(DiffusionConfig(), 3)

    def run(**kw):
        return run_sample(PriorDenoiser(_upsampled(), _content_kernel), lr, chain, scale=SCALE,
                      generators=_gens(0), **kw)

    plain = run()
    for tile in (16, 32):
        tiled = run(tile=tile, tile_overlap=4)
        assert torch.equal(tiled[0], plain[0]) and torch.equal(tiled[1], plain[1])


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_tiles_leave_no_seam_and_memory_follows_the_tile(gradient):
    x0 = _smooth_image(1, 48, seed=7)
    kernel = _gaussian_kernel(1.0)
    lr = _lr_of(x0, kernel)
    chain = sampling_chain(DiffusionConfig(), 4)

    def run(**kw):
        model = PriorDenoiser(_upsampled(), _constant_kernel(kernel))
        sr, _ = run_sample(model, lr, chain, scale=SCALE, gradient=gradient, generators=_gens(0), **kw)
        return sr, model

    plain, _ = run()
    tiled, model = run(tile=16, tile_overlap=8)
    assert max(max(s) for s in model.sizes) == 16  # the network never saw more than a tile
    def seam(diff: torch.Tensor) -> float:  # largest jump of the tiled-minus-untiled difference
        return max(float(diff.diff(dim=-1).abs().max()), float(diff.diff(dim=-2).abs().max()))

    # each window's data term stands in for its share of the image's (sample_windows): close, not equal
    psnr = -10 * math.log10(float((tiled - plain).square().mean()))
    hard, _ = run(tile=16, tile_overlap=0)  # without overlap the window borders show: the check can fail
    assert psnr >= 45 and seam(tiled - plain) < 0.25 * seam(hard - plain)


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_tiled_kernel_is_the_area_weighted_mean_of_the_windows(gradient):
    lr = _lr_of(_smooth_image(2, 40, seed=9) * torch.linspace(0.3, 1.3, 40), _gaussian_kernel(1.3))
    model = PriorDenoiser(_upsampled(), _content_kernel)
    steps = 2
    _, k = run_sample(model, lr, sampling_chain(DiffusionConfig(), steps), scale=SCALE, gradient=gradient,
                      tile=16, tile_overlap=4)
    windows = window_grid(40, 40, 16, 4)
    last = torch.stack(model.kernels[steps - 1::steps])  # [windows, B, k, k]: each window's final k̂
    assert len(last) == len(windows) and (last[0] - last[-1]).abs().max() > 1e-3  # the windows disagree
    shares = torch.tensor([w.area() / 40**2 for w in windows])
    torch.testing.assert_close(k, (shares[:, None, None, None] * last).sum(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(k.sum((1, 2)), torch.ones(2))


# --------------------------------------------------------------------------- a real (tiny) MCFormer


def test_tiny_mcformer_samples_in_range_without_parameter_grads():
    cfg = MCFormerConfig(width=8, blocks=(1, 1, 1, 1), heads=(1, 1, 1, 1), refinement_blocks=1,
                         estimator_depth=2, estimator_width=8, kernel_size=KSIZE)
    torch.manual_seed(0)
    net = MCFormer(cfg).eval()
    lr = torch.rand(2, 3, 8, 8)
    for gradient in GRADIENTS:
        sr, k = run_sample(net, lr, sampling_chain(DiffusionConfig(), 2), scale=SCALE, gradient=gradient)
        assert sr.shape == (2, 3, 16, 16) and k.shape == (2, KSIZE, KSIZE)
        again, _ = run_sample(net, lr, sampling_chain(DiffusionConfig(), 2), scale=SCALE, gradient=gradient)
        assert torch.equal(sr, again) and float(sr.std()) > 0  # reproducible, and not a constant (clamped) image
        torch.testing.assert_close(k.sum((1, 2)), torch.ones(2))
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="tile=12"):  # tiles must be on the model's size-multiple grid
        check_tile(12, 4, SCALE, net.cfg.size_multiple)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampler": "euler"}, "sampler='euler'"),
        ({"guidance": "kernel"}, "guidance='kernel'"),
        ({"gradient": "x1"}, "gradient='x1'"),
        ({"downsample": "nearest"}, "downsample='nearest'"),
        ({"zeta": -1.0}, "zeta=-1.0"),
        ({"zeta": math.nan}, "zeta=nan"),
        ({"eta": 1.5}, "eta=1.5"),
        ({"eta": -0.1}, "eta=-0.1"),
        ({"x0_norm_weight": -0.1}, "x0_norm_weight"),
        ({"scale": 0}, "scale 0"),
        ({"kernel": torch.ones(3, KSIZE, KSIZE) / KSIZE**2}, "kernel shape"),
        ({"kernel": torch.ones(KSIZE)}, "kernel must be"),
        ({"kernel": torch.ones(41, 41)}, "too large"),
        ({"tile": 15}, "tile=15"),
        ({"tile": 0}, "tile=0"),
        ({"tile": 8, "tile_overlap": 3}, "tile_overlap=3"),
        ({"tile": 8, "tile_overlap": 8}, "tile_overlap=8"),
        ({"generators": _gens(0, 1, 2)}, "generators"),
    ],
)
def test_bad_arguments_raise(truth, kwargs, match):
    x0, kernel, lr = truth
    model = PriorDenoiser(_upsampled(), _constant_kernel(kernel))
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("[", r"\[")):
        run_sample(model, lr.expand(2, -1, -1, -1), sampling_chain(DiffusionConfig(), 2), **{"scale": SCALE, **kwargs})
    assert not model.sizes  # rejected before any network call


def test_bad_inputs_raise(truth):
    x0, kernel, lr = truth
    model = PriorDenoiser(_upsampled(), _constant_kernel(kernel))
    chain = sampling_chain(DiffusionConfig(), 2)
    with pytest.raises(ValueError, match="lr must be"):
        run_sample(model, lr[0], chain, scale=SCALE)
    bad = lr.clone()
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="input contains NaN"):
        run_sample(model, bad, chain, scale=SCALE)
    with pytest.raises(ValueError, match="chain"):
        run_sample(model, lr, DiffusionConfig(), scale=SCALE)
    with pytest.raises(ValueError, match="shape"):
        data_energy(x0, kernel, lr[..., :-1], SCALE)
    with pytest.raises(ValueError, match="needs a kernel"):
        data_energy(x0, None, lr, SCALE)
    with pytest.raises(ValueError, match="guidance"):
        data_term("bicubic-based", lr, SCALE)
