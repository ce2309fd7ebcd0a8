"""The real-world degradation model: kernels, noise, JPEG, the second-order chain, its config, the noise
estimator and the noise-aware data term (docs/method.md, "Real photos")."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sample_rgb
from PIL import Image

from blinddiff.config import load_config
from blinddiff.degradation import DegradationOrder, RealDegradation, add_poisson_noise, degrade, degrade_real, \
    estimate_noise_level, jpeg, matlab_bicubic_resize, real_test_degradation
from blinddiff.kernels import anisotropic_gaussian, sample_real_kernels, shaped_kernels, sinc_kernel
from blinddiff.metrics import psnr
from blinddiff.sampling import kernel_aware_energy, noise_aware_energy, noise_weights


def picture(height: int = 64, width: int = 64) -> torch.Tensor:
    return torch.from_numpy(sample_rgb(height, width)).permute(2, 0, 1)[None].float() / 255


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ kernels


def test_real_kernels_are_normalised_and_stay_inside_their_support() -> None:
    kernels = sample_real_kernels(64, 21, min_size=7, generator=generator())
    assert kernels.shape == (64, 21, 21)
    assert bool((kernels >= 0).all())
    torch.testing.assert_close(kernels.sum((1, 2)), torch.ones(64))
    support = (kernels > 0).any(1).sum(1)  # columns with any weight
    assert int(support.min()) >= 7 and int(support.max()) <= 21
    assert len(set(support.tolist())) > 3  # several sizes drawn
    torch.testing.assert_close(sample_real_kernels(8, generator=generator(3)),
                               sample_real_kernels(8, generator=generator(3)))


def test_generalized_gaussian_of_beta_one_is_the_gaussian_and_plateau_is_flatter() -> None:
    sx, sy, th = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0.4])
    gaussian = anisotropic_gaussian(sx, sy, th, 21)
    torch.testing.assert_close(shaped_kernels(sx, sy, th, torch.tensor([1.0]), torch.tensor([1]), 21), gaussian)
    two, zero = torch.tensor([2.0]), torch.tensor([0.0])
    plateau = shaped_kernels(two, two, zero, two, torch.tensor([2]), 21)[0]
    iso = anisotropic_gaussian(two, two, zero, 21)[0]
    # half a σ from the centre the plateau is flatter, four σ away its tail is heavier
    assert float(plateau[10, 11] / plateau[10, 10]) > float(iso[10, 11] / iso[10, 10])
    assert float(plateau[10, 18] / plateau[10, 10]) > 5 * float(iso[10, 18] / iso[10, 10])


def test_sinc_kernel_sums_to_one_rings_and_passes_everything_at_pi() -> None:
    kernels = sinc_kernel(torch.tensor([math.pi / 4, math.pi]), 21)
    torch.testing.assert_close(kernels.sum((1, 2)), torch.ones(2))
    assert float(kernels[0].min()) < 0  # the ringing lobes
    image = picture(32, 32)
    from blinddiff.degradation import blur

    low_passed = blur(image, kernels[:1])
    assert float((low_passed - image).abs().mean()) > 0.01


# ------------------------------------------------------------------------------------------ noise, JPEG


def test_poisson_noise_variance_grows_with_intensity_and_gray_noise_is_shared() -> None:
    levels = torch.tensor([0.1, 0.4, 0.9]).view(3, 1, 1, 1).expand(3, 3, 64, 64).contiguous()
    noisy = add_poisson_noise(levels, 1.0, gray=False, generator=generator())
    variance = (noisy - levels).flatten(1).var(1)
    expected = levels[:, 0, 0, 0] / 255
    assert torch.allclose(variance, expected, rtol=0.15)
    grey = add_poisson_noise(levels, 1.0, gray=True, generator=generator())
    torch.testing.assert_close(grey[:, 0] - levels[:, 0], grey[:, 2] - levels[:, 2])


def test_jpeg_is_real_libjpeg_at_the_asked_quality() -> None:
    image = picture()
    quality_psnr = [float(psnr(jpeg(image, q), image, y_channel=False)) for q in (30, 60, 95)]
    assert quality_psnr[0] < quality_psnr[1] < quality_psnr[2]
    once = jpeg(image, 50)
    assert torch.equal(once, torch.round(once * 255) / 255)  # 8-bit decoded pixels
    # re-encoding at the same quality is nearly a fixed point; another quality is not
    assert float(psnr(jpeg(once, 50), once, y_channel=False)) > float(psnr(jpeg(once, 20), once, y_channel=False)) + 5
    both = jpeg(torch.cat([image, image]), torch.tensor([30, 95]))
    torch.testing.assert_close(both[:1], jpeg(image, 30))
    torch.testing.assert_close(both[1:], jpeg(image, 95))
    with pytest.raises(ValueError, match="quality"):
        jpeg(image, 0)


def only(stages: tuple[str, ...], **order: object) -> RealDegradation:
    """A one-order chain of the given stages with no clean samples, final sinc or final JPEG."""
    return RealDegradation(clean_fraction=0.0, second_order_prob=0.0, final_sinc_prob=0.0, final_jpeg_prob=0.0,
                           first=DegradationOrder(stages=stages, **order))


def test_measured_noise_level_is_the_sigma_that_was_added() -> None:
    settings = only(("noise",), gaussian_noise_prob=1.0, noise_range=(8.0, 8.0), gray_noise_prob=0.0)
    out = degrade_real(torch.full((4, 3, 64, 64), 0.5), settings, 1, generator=generator(), measure_noise=True)
    assert out.noise_sigma is not None
    torch.testing.assert_close(out.noise_sigma, torch.full((4,), 8.0), rtol=0.05, atol=0.0)
    measured = 255 * (out.lr - 0.5).flatten(1).std(1)
    torch.testing.assert_close(measured, torch.full((4,), 8.0), rtol=0.05, atol=0.0)


# ------------------------------------------------------------------------------------------ the chain


def test_chain_is_deterministic_by_seed_and_keeps_shapes_at_every_scale() -> None:
    hr = picture(50, 47).expand(3, -1, -1, -1).contiguous()
    settings = RealDegradation()
    for scale in (1, 2, 3, 4):
        first = degrade_real(hr, settings, scale, generator=generator(scale))
        again = degrade_real(hr, settings, scale, generator=generator(scale))
        assert first.lr.shape == (3, 3, math.ceil(50 / scale), math.ceil(47 / scale))
        assert torch.equal(first.lr, again.lr) and torch.equal(first.kernel, again.kernel)
        assert torch.equal(first.lr, torch.round(first.lr * 255) / 255)
    other = degrade_real(hr, settings, 4, generator=generator(99))
    assert not torch.equal(other.lr, degrade_real(hr, settings, 4, generator=generator(4)).lr)


def test_clean_samples_follow_the_paper_protocol_exactly() -> None:
    hr = picture().expand(2, -1, -1, -1).contiguous()
    out = degrade_real(hr, replace(RealDegradation(), clean_fraction=1.0), 4, generator=generator())
    assert bool(out.clean.all())
    torch.testing.assert_close(out.lr, degrade(hr, out.kernel, 4), atol=1 / 255 + 1e-6, rtol=0)


def test_kernel_target_is_the_first_order_blur() -> None:
    hr = picture()
    settings = only(("blur",))
    out = degrade_real(hr, settings, 4, generator=generator(1))
    from blinddiff.degradation import blur, resize

    # the whole chain is that blur, then the final resize to H/4 (one of three modes)
    candidates = [torch.round(resize(blur(hr, out.kernel), (16, 16), mode).clamp(0, 1) * 255) / 255
                  for mode in ("area", "bilinear", "bicubic")]
    assert any(torch.equal(out.lr, c) for c in candidates)
    skipped = degrade_real(hr, only(("blur",), blur_prob=0.0), 4, generator=generator(1))
    assert float(skipped.kernel[0, 10, 10]) == 1.0  # no blur: the identity kernel


def test_kernel_target_ignores_the_second_order_blur() -> None:
    settings = replace(only(("resize",)), second_order_prob=1.0, second=DegradationOrder(stages=("blur",)))
    out = degrade_real(picture(), settings, 4, generator=generator(2))
    assert float(out.kernel[0, 10, 10]) == 1.0  # the first order has no blur: the identity


def test_held_out_protocol_caps_noise_and_jpeg() -> None:
    settings = real_test_degradation()
    assert settings.clean_fraction == 0
    for order in (settings.first, settings.second):
        assert order.noise_range[1] <= 12 and tuple(order.jpeg_range) == (35, 90)


@pytest.mark.parametrize("override, key", [
    ("data.real.first.noise_range=[1,500]", "data.real.first.noise_range"),
    ("data.real.second.stages=[blur,sharpen]", "data.real.second.stages"),
    ("data.real.clean_fraction=1.5", "data.real.clean_fraction"),
    ("data.real.first.jpeg_range=[90,30]", "data.real.first.jpeg_range"),
    ("data.real.first.resize_modes=[nearest]", "data.real.first.resize_modes"),
])
def test_bad_settings_name_the_key_and_its_range(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as error:
        load_config("real-x4", [override])
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------ noise level, guidance


@pytest.mark.parametrize("sigma", [3.0, 8.0, 12.0])
def test_noise_estimator_measures_added_noise_on_lr_images(sigma: float) -> None:
    lr = matlab_bicubic_resize(picture(256, 256), scale=0.25)
    noisy = torch.round((lr + sigma / 255 * torch.randn(lr.shape, generator=generator())).clamp(0, 1) * 255) / 255
    estimate = float(estimate_noise_level(noisy)[0])
    assert abs(estimate - sigma) < 0.15 * sigma
    assert float(estimate_noise_level(torch.round(lr * 255) / 255)[0]) < 2.0


def test_noise_aware_guidance_scales_the_data_term_by_one_over_sigma_squared() -> None:
    lr = matlab_bicubic_resize(picture(128, 128), scale=0.25)
    noisy = torch.round((lr + 10 / 255 * torch.randn(lr.shape, generator=generator())).clamp(0, 1) * 255) / 255
    both = torch.cat([torch.round(lr * 255) / 255, noisy])
    weights = noise_weights(both)
    assert float(weights[0]) == 1.0  # a clean input keeps the full weight
    assert 0.02 < float(weights[1]) < 0.08  # ≈ 2²/10²
    x0 = torch.rand(2, 3, 128, 128)
    kernel = torch.full((2, 5, 5), 1 / 25)
    base = kernel_aware_energy(both, 4)(x0, kernel)
    torch.testing.assert_close(noise_aware_energy(both, 4)(x0, kernel), weights * base)


# ------------------------------------------------------------------------------------------ test sets


def test_real_protocol_and_real_pairs_as_test_sets(tmp_path: Path) -> None:
    from blinddiff.testsets import build_pair_set, build_testset, load_benchmark

    hr_dir, lr_dir = tmp_path / "hr", tmp_path / "lr"
    hr_dir.mkdir(), lr_dir.mkdir()
    for name, size in (("a", 64), ("b", 48)):
        image = sample_rgb(size, size)
        Image.fromarray(image).save(hr_dir / f"{name}.png")
        Image.fromarray(image[::4, ::4]).save(lr_dir / f"{name}.png")
    Image.fromarray(sample_rgb(40, 40)).save(hr_dir / "lonely.png")
    Image.fromarray(sample_rgb(30, 30)).save(lr_dir / "odd.png")
    Image.fromarray(sample_rgb(40, 40)).save(hr_dir / "odd.png")  # 40 is not 4 × 30
    records, problems = build_pair_set(hr_dir, lr_dir, tmp_path / "pairs", log=lambda m: None)
    assert [r["name"] for r in records] == ["a", "b"]
    assert any("lonely.png" in p for p in problems) and any("odd.png" in p for p in problems)
    bench = load_benchmark(tmp_path / "pairs")
    assert bench.scale == 4 and not bench.has_kernels
    with pytest.raises(ValueError, match="without a ground-truth kernel"):
        bench.gt_kernel(bench.cases[0])

    records, _ = build_testset(hr_dir, tmp_path / "real", "real", 4, log=lambda m: None)
    again, _ = build_testset(hr_dir, tmp_path / "real2", "real", 4, log=lambda m: None)
    assert records == again and all(r["noise_sigma"] >= 0 for r in records)
    for record in records:
        assert (tmp_path / "real" / record["lr"]).read_bytes() == (tmp_path / "real2" / record["lr"]).read_bytes()
        kernel = np.load(tmp_path / "real" / record["kernel"])
        assert kernel.shape == (21, 21) and abs(kernel.sum() - 1) < 1e-5
    manifest = json.loads((tmp_path / "real" / "manifest.json").read_text())
    assert manifest["protocol"] == "real"


# ------------------------------------------------------------------------------------------ training, upscale


def test_perceptual_term_acts_only_on_the_late_half_of_the_chain() -> None:
    from blinddiff.diffusion import GaussianDiffusion
    from blinddiff.losses import loss_settings, training_losses
    from blinddiff.model import MCFormer

    cfg = load_config("tiny", ["diffusion.perceptual_loss_weight=0.5", "diffusion.perceptual_max_t=0.5"])
    model = MCFormer(cfg.model)
    chain = GaussianDiffusion.from_config(cfg.diffusion)
    hr = picture(32, 32).expand(2, -1, -1, -1).contiguous()
    lr = matlab_bicubic_resize(hr, scale=1 / cfg.data.scale)
    kernel = torch.full((2, cfg.model.kernel_size, cfg.model.kernel_size), 1 / cfg.model.kernel_size ** 2)
    t = torch.tensor([0, chain.num_steps - 1])
    seen = []

    def perceptual(sr: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        seen.append(sr.shape[0])
        assert float(sr.detach().min()) >= 0 and float(sr.detach().max()) <= 1
        return (sr - target).abs().flatten(1).mean(1) + 1.0

    noise = torch.randn(hr.shape, generator=generator())
    with torch.no_grad():
        with_term = training_losses(chain, model, hr, lr, kernel, t=t, noise=noise, perceptual=perceptual,
                                    **loss_settings(cfg.diffusion))
        without = training_losses(chain, model, hr, lr, kernel, t=t, noise=noise, **loss_settings(cfg.diffusion))
    assert seen == [1]  # only the sample with t < N/2 went through the network
    assert float(with_term["perceptual"][1]) == 0 and float(with_term["perceptual"][0]) > 1
    torch.testing.assert_close(with_term["loss"] - without["loss"], 0.5 * with_term["perceptual"])


def test_upscale_reports_the_noise_level_beside_the_kernel(weights: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    from blinddiff.cli import main

    clean = sample_rgb(32, 32)
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 12, clean.shape), 0, 255).astype(np.uint8)
    Image.fromarray(clean).save(tmp_path / "clean.png")
    Image.fromarray(noisy).save(tmp_path / "noisy.png")
    assert main(["upscale", str(tmp_path / "clean.png"), str(tmp_path / "noisy.png"), "--out", str(tmp_path / "sr"),
                 "--weights", str(weights), "--steps", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    estimates = {name: json.loads((tmp_path / "sr" / f"{name}_estimate.json").read_text()) for name in ("clean", "noisy")}
    assert estimates["noisy"]["noise_sigma"] > estimates["clean"]["noise_sigma"] + 5
    assert estimates["noisy"]["kernel"] == "noisy_kernel.npy"
    assert f"noisy.png: estimated noise σ {estimates['noisy']['noise_sigma']:.2f}" in err


def test_benchmark_on_real_pairs_scores_without_kernels(weights: Path, tmp_path: Path) -> None:
    from blinddiff.evaluation import BenchmarkSettings, run_benchmark
    from blinddiff.metrics import build_metric_suite
    from blinddiff.testsets import build_pair_set

    hr_dir, lr_dir = tmp_path / "hr", tmp_path / "lr"
    hr_dir.mkdir(), lr_dir.mkdir()
    image = sample_rgb(64, 64)
    Image.fromarray(image).save(hr_dir / "a.png")
    Image.fromarray(image[::4, ::4]).save(lr_dir / "a.png")
    build_pair_set(hr_dir, lr_dir, tmp_path / "pairs", log=lambda m: None)
    from blinddiff.inference import SampleOptions

    suite = build_metric_suite("psnr,ssim,kernel_l1")  # kernel metrics are dropped: nothing to compare with
    with pytest.raises(ValueError, match="gt-kernel need the true kernel"):
        run_benchmark(tmp_path / "pairs", weights, tmp_path / "run", suite=suite,
                      settings=BenchmarkSettings(baselines=("bicubic", "gt-kernel")), log=lambda m: None)
    outcome = run_benchmark(tmp_path / "pairs", weights, tmp_path / "run", suite=suite,
                            options=SampleOptions.for_mode("fidelity"),
                            settings=BenchmarkSettings(baselines=("bicubic",), report_cases=1), log=lambda m: None)
    assert not outcome.problems
    assert outcome.results is not None
    assert outcome.results["metrics"] == ["psnr", "ssim", "seconds"]
    for method in ("blinddiff", "bicubic"):
        assert math.isfinite(outcome.results["methods"][method]["mean"]["psnr"])
    assert (tmp_path / "run" / "report.html").is_file()
