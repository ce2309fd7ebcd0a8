"""Tests of the degradation model (docs/method.md §1): blur, MATLAB bicubic resize, downsampling, noise,
quantisation and the composed ``degrade``.

MATLAB is not available, so MATLAB agreement is checked against golden values derived here
independently: hand-computed cubic weights at MATLAB's sample positions, and a plain-Python
loop implementation of ``imresize`` written from MATLAB's documented algorithm.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from blinddiff.degradation import (
    add_gaussian_noise,
    blur,
    degrade,
    downsample,
    matlab_bicubic_resize,
    quantize,
    upsample_bicubic,
)


def gaussian_kernels(sigmas: list[float], size: int, dtype=torch.float32) -> torch.Tensor:
    """Isotropic Gaussian kernels [B, size, size] summing to 1 (built here, not imported)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    sig = torch.tensor(sigmas, dtype=torch.float64)[:, None, None]
    k = torch.exp(-(coords[None, :, None] ** 2 + coords[None, None, :] ** 2) / (2 * sig**2))
    return (k / k.sum(dim=(1, 2), keepdim=True)).to(dtype)


def random_kernels(batch: int, kh: int, kw: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.rand(batch, kh, kw, generator=g, dtype=torch.float64)
    return (k / k.sum(dim=(1, 2), keepdim=True)).to(dtype)


# ------------------------------------------------------------------------------------------
# Independent reference of MATLAB imresize (bicubic, antialiased), plain Python loops
# ------------------------------------------------------------------------------------------


def ref_cubic(t: float) -> float:
    t = abs(t)
    if t <= 1:
        return 1.5 * t**3 - 2.5 * t**2 + 1
    if t <= 2:
        return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
    return 0.0


def ref_mirror(j: int, n: int) -> int:
    """1-based index j (possibly outside 1..n) → 0-based index, mirroring with the edge
    sample repeated: 0 → 1, -1 → 2, n+1 → n, n+2 → n-1, ... (repeatedly if needed)."""
    while j < 1 or j > n:
        j = 1 - j if j < 1 else 2 * n + 1 - j
    return j - 1


def ref_resize_1d(signal: list[float], scale: float, out_len: int) -> list[float]:
    n = len(signal)
    half_support = 2.0 / scale if scale < 1 else 2.0
    out = []
    for x in range(1, out_len + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        taps = range(math.floor(u - half_support), math.ceil(u + half_support) + 1)
        if scale < 1:
            w = [scale * ref_cubic(scale * (u - j)) for j in taps]
        else:
            w = [ref_cubic(u - j) for j in taps]
        total = sum(w)
        out.append(sum(wi / total * signal[ref_mirror(j, n)] for wi, j in zip(w, taps)))
    return out


def ref_resize_2d(image: np.ndarray, scale=None, size=None) -> np.ndarray:
    h, w = image.shape
    if scale is not None:
        sh = sw = scale
        oh, ow = math.ceil(h * scale), math.ceil(w * scale)
    else:
        oh, ow = size
        sh, sw = oh / h, ow / w
    img = [list(map(float, row)) for row in image]
    def do_rows(a):  # resize along dim 0 (each column)
        cols = [ref_resize_1d([a[i][j] for i in range(len(a))], sh, oh) for j in range(len(a[0]))]
        return [[cols[j][i] for j in range(len(cols))] for i in range(oh)]
    def do_cols(a):  # resize along dim 1 (each row)
        return [ref_resize_1d(row, sw, ow) for row in a]
    out = do_cols(do_rows(img)) if sh <= sw else do_rows(do_cols(img))
    return np.array(out)


# Hand-computed Keys cubic (a = -0.5) values, cubic(t) for the distances used below.
C_025, C_075, C_125, C_175 = 0.8671875, 0.2265625, -0.0703125, -0.0234375
# cubic(d / 4) for d = 0.5, 1.5, ..., 7.5 (the ×1/4 kernel before its 1/4 factor).
C_QUARTER = [0.9638671875, 0.7275390625, 0.3896484375, 0.0908203125,
             -0.0478515625, -0.0732421875, -0.0439453125, -0.0068359375]


def test_hand_computed_shrink_by_2():
    # imresize(x, 1/2) of length 8: output k samples u = 2k - 0.5 (1-based), the kernel
    # 0.5·cubic(d/2) has width 8, so taps j = 2k-4 .. 2k+3 at |d| = 0.5, 1.5, 2.5, 3.5.
    x = [3.0, -1.0, 4.0, 1.0, -5.0, 9.0, 2.0, 6.0]
    side = [C_025 / 2, C_075 / 2, C_125 / 2, C_175 / 2]  # 0.5·cubic(0.25, 0.75, 1.25, 1.75)
    taps = side[::-1] + side  # d = 3.5 .. 0.5, 0.5 .. 3.5
    assert sum(taps) == pytest.approx(1.0, abs=1e-15)
    # symmetric padding with the edge repeated: j = -2, -1, 0 -> x3, x2, x1; 9, 10, 11 -> x8, x7, x6
    padded = [x[2], x[1], x[0]] + x + [x[7], x[6], x[5]]
    expected = [sum(t * p for t, p in zip(taps, padded[2 * k - 2: 2 * k + 6])) for k in range(1, 5)]
    got = matlab_bicubic_resize(torch.tensor([x], dtype=torch.float64), scale=0.5)[0]
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-13)


def test_hand_computed_shrink_by_4():
    # imresize(x, 1/4) of length 8: 2 outputs at u = 2.5 and 6.5, kernel 0.25·cubic(d/4) of
    # width 16, taps j = u-7.5 .. u+7.5 — the left window reaches j = -5, folded twice over.
    x = [0.5, 2.0, -1.0, 3.0, 7.0, -2.0, 1.0, 4.0]
    side = [c / 4 for c in C_QUARTER]
    taps = side[::-1] + side
    assert sum(taps) == pytest.approx(1.0, abs=1e-15)
    padded = x[5::-1] + x + x[:1:-1]  # j = -5..0 -> x6..x1 ; j = 9..14 -> x8..x3
    assert len(padded) == 20 and padded[:6] == [x[5], x[4], x[3], x[2], x[1], x[0]]
    expected = [sum(t * p for t, p in zip(taps, padded[0:16])),
                sum(t * p for t, p in zip(taps, padded[4:20]))]
    got = matlab_bicubic_resize(torch.tensor([x], dtype=torch.float64), scale=0.25)[0]
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-13)


def test_hand_computed_enlarge_by_2():
    # imresize(x, 2) of length 4: u = x/2 + 1/4, plain cubic with 4 taps j = floor(u)-1 .. +2.
    x = [1.0, 4.0, -2.0, 5.0]
    padded = [x[1], x[0]] + x + [x[3], x[2]]  # j = -1 .. 6
    frac_quarter = [C_125, C_025, C_075, C_175]  # u = m + 1/4: j = m-1, m, m+1, m+2
    frac_three_quarter = frac_quarter[::-1]      # u = m + 3/4
    windows = [(frac_three_quarter, 0), (frac_quarter, 1), (frac_three_quarter, 1),
               (frac_quarter, 2), (frac_three_quarter, 2), (frac_quarter, 3),
               (frac_three_quarter, 3), (frac_quarter, 4)]  # (taps, m) for u = 0.75 .. 4.25
    expected = [sum(t * p for t, p in zip(taps, padded[m: m + 4])) for taps, m in windows]
    got = upsample_bicubic(torch.tensor([[x]], dtype=torch.float64)[None], 2)[0, 0, 0]
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("scale,size", [
    (0.5, None), (0.25, None), (1 / 3, None), (0.7, None), (2.0, None), (3.0, None),
    (None, (5, 7)), (None, (11, 13)), (None, (4, 12)), (None, (13, 3)),
])
@pytest.mark.parametrize("shape", [(13, 10), (8, 8), (9, 17)])
def test_float64_matches_independent_reference(scale, size, shape):
    rng = np.random.default_rng(sum(shape))
    image = rng.random(shape)
    got = matlab_bicubic_resize(torch.from_numpy(image)[None, None], scale=scale, size=size)[0, 0]
    expected = ref_resize_2d(image, scale=scale, size=size)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [0.25, 1 / 3, 0.5, 0.8, 1.0, 1.5, 2.0, 4.0])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (13, 10), (16, 16)])
def test_constant_stays_constant(scale, shape):
    image = torch.full((2, 3, *shape), 0.37, dtype=torch.float64)
    out = matlab_bicubic_resize(image, scale=scale)
    torch.testing.assert_close(out, torch.full_like(out, 0.37), rtol=0, atol=1e-13)
    out = matlab_bicubic_resize(image, size=(5, 2))
    torch.testing.assert_close(out, torch.full_like(out, 0.37), rtol=0, atol=1e-13)


def test_output_shape_rules():
    x = torch.rand(2, 3, 13, 10)
    assert matlab_bicubic_resize(x, scale=0.25).shape == (2, 3, 4, 3)  # ceil(13/4), ceil(10/4)
    assert matlab_bicubic_resize(x, scale=1 / 3).shape == (2, 3, 5, 4)
    assert matlab_bicubic_resize(x, scale=1.5).shape == (2, 3, 20, 15)  # ceil(19.5), 15
    assert matlab_bicubic_resize(x, size=(7, 21)).shape == (2, 3, 7, 21)
    assert matlab_bicubic_resize(x[0, 0], scale=0.5).shape == (7, 5)  # any leading dims
    assert upsample_bicubic(x, 3).shape == (2, 3, 39, 30)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_linear_ramp_stays_linear_under_upscale(scale):
    n = 12
    ramp = 0.3 + 0.05 * torch.arange(n, dtype=torch.float64)
    image = ramp[None, None, None, :].expand(1, 1, 5, n)
    out = upsample_bicubic(image, scale)[0, 0, 2]
    # output pixel i (0-based) samples input position u - 1 = (i + 1)/s + (1 - 1/s)/2 - 1
    i = torch.arange(n * scale, dtype=torch.float64)
    position = (i + 1) / scale + 0.5 * (1 - 1 / scale) - 1
    interior = (position >= 2) & (position <= n - 3)  # taps do not reach the border
    expected = 0.3 + 0.05 * position
    torch.testing.assert_close(out[interior], expected[interior], rtol=0, atol=1e-13)
    assert not torch.allclose(out[:1], expected[:1])  # the border differs (mirroring)


def test_linear_ramp_stays_linear_under_antialiased_downscale():
    n = 64
    ramp = torch.arange(n, dtype=torch.float64)[None, None, None, :].expand(1, 1, 8, n)
    out = matlab_bicubic_resize(ramp, scale=0.25)[0, 0, 1]
    second_difference = out[2:] - 2 * out[1:-1] + out[:-2]
    torch.testing.assert_close(second_difference[2:-2], torch.zeros(10, dtype=torch.float64),
                               rtol=0, atol=1e-11)
    torch.testing.assert_close(out[4:-4], 4 * torch.arange(4, 12, dtype=torch.float64) + 1.5)


@pytest.mark.parametrize("scale", [0.25, 0.5, 2.0])
def test_separable_rows_then_columns(scale):
    image = torch.rand(11, 14, dtype=torch.float64)
    full = matlab_bicubic_resize(image, scale=scale)
    # 1-D operator on every column ([W, H, 1]: the length-1 dim resizes to itself) ...
    columns = matlab_bicubic_resize(image.T[:, :, None], scale=scale)[:, :, 0].T
    # ... then on every row
    rows = matlab_bicubic_resize(columns[:, None, :], scale=scale)[:, 0, :]
    torch.testing.assert_close(full, rows, rtol=0, atol=1e-13)


def test_resize_dtypes_grad_and_inference_mode():
    x64 = torch.rand(1, 2, 12, 9, dtype=torch.float64)
    out32 = matlab_bicubic_resize(x64.float(), scale=0.5)
    torch.testing.assert_close(out32.double(), matlab_bicubic_resize(x64, scale=0.5),
                               rtol=0, atol=1e-6)
    with torch.inference_mode():  # a weight matrix cached here must still work with autograd
        matlab_bicubic_resize(torch.rand(1, 1, 20, 20), scale=0.5)
    x = torch.rand(1, 1, 20, 20, requires_grad=True)
    matlab_bicubic_resize(x, scale=0.5).sum().backward()
    assert x.grad is not None and x.grad.sum().item() == pytest.approx(100.0, rel=1e-5)


def test_resize_bad_arguments():
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="exactly one"):
        matlab_bicubic_resize(x)
    with pytest.raises(ValueError, match="exactly one"):
        matlab_bicubic_resize(x, scale=0.5, size=(4, 4))
    with pytest.raises(ValueError, match="scale -1"):
        matlab_bicubic_resize(x, scale=-1)
    with pytest.raises(ValueError, match="size"):
        matlab_bicubic_resize(x, size=(0, 4))


# ------------------------------------------------------------------------------------------
# Blur
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["conv", "fft", "auto"])
@pytest.mark.parametrize("k", [1, 4, 5])
def test_blur_delta_is_identity(method, k):
    images = torch.rand(2, 3, 9, 11)
    delta = torch.zeros(k, k)
    delta[k // 2, k // 2] = 1  # the kernel centre is at index k//2, also for even k
    torch.testing.assert_close(blur(images, delta, method=method), images, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["conv", "fft"])
@pytest.mark.parametrize("k", [7, 8])
def test_blur_of_constant_is_constant(method, k):
    images = torch.full((3, 2, 10, 12), 0.6, dtype=torch.float64)
    out = blur(images, random_kernels(3, k, k, dtype=torch.float64), method=method)
    torch.testing.assert_close(out, images, rtol=0, atol=1e-12)


def test_blur_is_correlation_with_reflect_padding():
    images = torch.rand(1, 2, 6, 7, dtype=torch.float64)
    kernel = torch.zeros(3, 3, dtype=torch.float64)
    kernel[0, 0] = 1  # correlation: out[i, j] = x[i - 1, j - 1] (a flipped conv would shift up)
    for method in ("conv", "fft"):
        out = blur(images, kernel, method=method)
        torch.testing.assert_close(out[..., 1:, 1:], images[..., :-1, :-1], rtol=0, atol=1e-12)
        torch.testing.assert_close(out[..., 0, 1:], images[..., 1, :-1], rtol=0, atol=1e-12)
    # and an asymmetric random kernel against numpy's reflect pad + explicit correlation
    k = random_kernels(1, 4, 5, dtype=torch.float64)[0]
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (2, 1), (2, 2)), mode="reflect")
    expected = np.zeros_like(images.numpy())
    for a in range(4):
        for b in range(5):
            expected += k[a, b].item() * padded[..., a:a + 6, b:b + 7]
    for method in ("conv", "fft"):
        np.testing.assert_allclose(blur(images, k, method=method).numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("kh,kw,shared", [(21, 21, False), (8, 8, False), (5, 9, False),
                                          (21, 21, True), (64, 64, False)])
def test_fft_matches_conv(kh, kw, shared):
    images = torch.rand(3, 3, 40, 36)
    if kh == 64:
        images = torch.rand(2, 3, 70, 66)
    kernels = random_kernels(images.shape[0], kh, kw)
    if shared:
        kernels = kernels[0]
    conv = blur(images, kernels, method="conv")
    fft = blur(images, kernels, method="fft")
    assert conv.shape == fft.shape == images.shape
    torch.testing.assert_close(fft, conv, rtol=0, atol=1e-5)


def test_blur_kernels_are_per_sample():
    image = torch.rand(1, 3, 16, 16)
    images = image.expand(3, -1, -1, -1)
    kernels = gaussian_kernels([0.3, 1.5, 3.0], 9)
    out = blur(images, kernels)
    for i in range(3):
        torch.testing.assert_close(out[i:i + 1], blur(image, kernels[i]), rtol=0, atol=1e-6)
    assert (out[0] - out[2]).abs().max() > 1e-2
    assert out[0].std() > out[1].std() > out[2].std()  # wider Gaussian, smoother image


@pytest.mark.parametrize("method", ["conv", "fft"])
def test_blur_gradcheck(method):
    images = torch.rand(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    kernels = random_kernels(2, 3, 4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, k: blur(x, k, method=method), (images, kernels))


def test_blur_auto_with_gradients_agrees_with_conv():
    images = torch.rand(2, 3, 24, 24, requires_grad=True)
    kernels = gaussian_kernels([1.0, 2.5], 21).requires_grad_(True)
    out = blur(images, kernels)  # auto picks FFT here
    torch.testing.assert_close(out, blur(images.detach(), kernels.detach(), method="conv"),
                               rtol=0, atol=1e-5)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((out * weights).sum(), [images, kernels])
    want = torch.autograd.grad((blur(images, kernels, method="conv") * weights).sum(), [images, kernels])
    for g, w in zip(got, want):  # the kernel-aware gradient differentiates through whichever path auto picks
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_blur_bad_arguments():
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="kernel batch size 3 does not match image batch size 2"):
        blur(images, random_kernels(3, 3, 3))
    with pytest.raises(ValueError, match=r"kernel 21×21 .* image 8×8"):
        blur(images, random_kernels(2, 21, 21))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        blur(images[0], random_kernels(2, 3, 3))
    with pytest.raises(ValueError, match="method"):
        blur(images, random_kernels(2, 3, 3), method="direct")


# ------------------------------------------------------------------------------------------
# Downsampling, noise, quantisation, degrade
# ------------------------------------------------------------------------------------------


def test_downsample_modes():
    x = torch.rand(2, 3, 13, 10)
    direct = downsample(x, 4, "direct")
    assert torch.equal(direct, x[..., ::4, ::4]) and direct.shape == (2, 3, 4, 3)
    bicubic = downsample(x, 4)
    assert bicubic.shape == (2, 3, 4, 3)
    assert (bicubic - direct).abs().max() > 1e-2
    torch.testing.assert_close(bicubic, matlab_bicubic_resize(x, scale=0.25))
    assert downsample(x, 1) is x and downsample(x, 1, "direct") is x


@pytest.mark.parametrize("bad", [0, 2.5, -1, True])
def test_downsample_bad_scale(bad):
    with pytest.raises(ValueError, match=f"scale {bad} is invalid; use an integer ≥ 1"):
        downsample(torch.rand(1, 1, 8, 8), bad)


def test_bad_mode_and_scale_in_degrade():
    hr, k = torch.rand(1, 3, 16, 16), gaussian_kernels([1.0], 5)
    with pytest.raises(ValueError, match="'nearest' is invalid"):
        downsample(hr, 2, "nearest")
    with pytest.raises(ValueError, match="'nearest' is invalid"):
        degrade(hr, k, 2, downsample="nearest")
    with pytest.raises(ValueError, match="scale 0 is invalid"):
        degrade(hr, k, 0)
    with pytest.raises(ValueError, match="scale 2.5 is invalid"):
        upsample_bicubic(hr, 2.5)


@pytest.mark.parametrize("mode", ["bicubic", "direct"])
@pytest.mark.parametrize("scale", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [(24, 24), (26, 19)])
def test_degrade_shapes(mode, scale, size):
    hr = torch.rand(2, 3, *size)
    lr = degrade(hr, gaussian_kernels([1.0, 2.0], 7), scale, downsample=mode)
    assert lr.shape == (2, 3, math.ceil(size[0] / scale), math.ceil(size[1] / scale))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_degrade_direct_equals_blur_then_slice(requires_grad):
    hr = torch.rand(2, 3, 30, 27, requires_grad=requires_grad)
    kernels = gaussian_kernels([1.2, 2.6], 13)
    lr = degrade(hr, kernels, 3, downsample="direct", quantize=False)
    expected = blur(hr, kernels, method="conv")[..., ::3, ::3]
    torch.testing.assert_close(lr, expected, rtol=0, atol=1e-5)


def test_degrade_bicubic_composition_and_gradient():
    hr = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    kernels = gaussian_kernels([1.2, 2.6], 9, dtype=torch.float64)
    lr = degrade(hr, kernels, 4, quantize=False)
    torch.testing.assert_close(lr, matlab_bicubic_resize(blur(hr, kernels), scale=0.25))
    # The data term of docs/method.md §4 differentiates the forward model in the image and the kernel.
    small_hr = torch.rand(2, 1, 12, 10, dtype=torch.float64, requires_grad=True)
    small_kernels = random_kernels(2, 5, 4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, k: degrade(x, k, 2, quantize=False), (small_hr, small_kernels))


def test_quantize_grid():
    x = torch.rand(2, 3, 16, 16) * 1.4 - 0.2
    q = quantize(x)
    assert q.min() >= 0 and q.max() <= 1
    levels = q * 255
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert (q - x.clamp(0, 1)).abs().max() <= 0.5 / 255 + 1e-6
    lr = degrade(torch.rand(2, 3, 16, 16), gaussian_kernels([1.0, 2.0], 5), 2, noise_sigma=0.05,
                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lr * 255, (lr * 255).round(), rtol=0, atol=1e-4)


def test_noise_is_deterministic_under_a_seed():
    images = torch.full((3, 3, 16, 16), 0.5)
    a = add_gaussian_noise(images, 0.1, generator=torch.Generator().manual_seed(7))
    b = add_gaussian_noise(images, 0.1, generator=torch.Generator().manual_seed(7))
    c = add_gaussian_noise(images, 0.1, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a - images).std().item() == pytest.approx(0.1, rel=0.1)
    sigma = torch.tensor([0.0, 0.02, 0.2])  # one sigma per image
    d = add_gaussian_noise(images, sigma, generator=torch.Generator().manual_seed(7))
    assert torch.equal(d[0], images[0])
    assert (d[2] - images[2]).std() > 5 * (d[1] - images[1]).std()
    e = degrade(images, gaussian_kernels([1.0] * 3, 5), 2, noise_sigma=0.1, quantize=False,
                generator=torch.Generator().manual_seed(7))
    f = degrade(images, gaussian_kernels([1.0] * 3, 5), 2, noise_sigma=0.1, quantize=False,
                generator=torch.Generator().manual_seed(7))
    assert torch.equal(e, f)
    with pytest.raises(ValueError, match="sigma"):
        add_gaussian_noise(images, -0.1)
    with pytest.raises(ValueError, match="sigma"):
        add_gaussian_noise(images, torch.zeros(2))
