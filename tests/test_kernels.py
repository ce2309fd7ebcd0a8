"""Blur kernels (docs/method.md §1): Gaussian and motion samplers, kernel files, kernel PCA and CLI specs."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blinddiff.fileio import write_npy
from blinddiff.kernels import (
    GAUSSIAN8_SIGMAS,
    KernelPCA,
    anisotropic_gaussian,
    fit_kernel_pca,
    gaussian8,
    isotropic_gaussian,
    load_kernel,
    load_kernels,
    motion_blur,
    parse_kernel_spec,
    sample_anisotropic,
    sample_isotropic,
    sample_training_kernels,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def moments(kernels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre of mass [B, 2] and covariance [B, 2, 2] of kernels, in (x = column, y = row) offsets."""
    k = kernels.double()
    r = torch.arange(k.shape[-1], dtype=torch.float64) - k.shape[-1] // 2
    x, y = r[None, None, :], r[None, :, None]
    mx, my = (k * x).sum((1, 2)), (k * y).sum((1, 2))
    cxx = (k * x * x).sum((1, 2)) - mx**2
    cyy = (k * y * y).sum((1, 2)) - my**2
    cxy = (k * x * y).sum((1, 2)) - mx * my
    cov = torch.stack([torch.stack([cxx, cxy], -1), torch.stack([cxy, cyy], -1)], -2)
    return torch.stack([mx, my], -1), cov


def expected_cov(sx: float, sy: float, theta: float) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return rot @ torch.diag(torch.tensor([sx**2, sy**2], dtype=torch.float64)) @ rot.T


GENERATORS: dict[str, tuple[Callable[[], torch.Tensor], tuple[int, int, int]]] = {
    "iso": (lambda: isotropic_gaussian(torch.tensor([0.2, 1.0, 4.0]), 21), (3, 21, 21)),
    "iso-float": (lambda: isotropic_gaussian(2.6, 15), (1, 15, 15)),
    "aniso": (lambda: anisotropic_gaussian(torch.tensor([0.6, 5.0]), 2.0, 0.7, 21), (2, 21, 21)),
    "aniso-noise": (lambda: anisotropic_gaussian(3.0, 1.0, -2.0, 21, noise=0.25, generator=gen(0)), (1, 21, 21)),
    "sample-iso": (lambda: sample_isotropic(5, 13, generator=gen(0)), (5, 13, 13)),
    "sample-aniso": (lambda: sample_anisotropic(5, 21, generator=gen(0)), (5, 21, 21)),
    "gaussian8": (lambda: gaussian8(21), (8, 21, 21)),
    "motion-64": (lambda: motion_blur(4, 64, 0.5, generator=gen(0)), (4, 64, 64)),
    "motion-21-strong": (lambda: motion_blur(4, 21, 1.0, generator=gen(1)), (4, 21, 21)),
    "motion-3": (lambda: motion_blur(3, 3, 0.5, generator=gen(2)), (3, 3, 3)),
    "training-motion": (lambda: sample_training_kernels("motion", 2, 32, generator=gen(3)), (2, 32, 32)),
}


@pytest.mark.parametrize("name", list(GENERATORS))
def test_every_generator_gives_normalised_float32_kernels(name: str) -> None:
    make, shape = GENERATORS[name]
    kernels = make()
    assert kernels.dtype == torch.float32 and tuple(kernels.shape) == shape
    assert bool(torch.isfinite(kernels).all()) and float(kernels.min()) >= 0
    torch.testing.assert_close(kernels.sum((1, 2)), torch.ones(shape[0]), atol=1e-5, rtol=0)


def test_isotropic_matches_closed_form_and_symmetries() -> None:
    r = np.arange(21) - 10
    golden = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 2.6**2))
    golden /= golden.sum()
    k = isotropic_gaussian(2.6)[0]
    np.testing.assert_allclose(k.numpy(), golden, rtol=1e-5, atol=1e-8)
    assert int(k.argmax()) == 10 * 21 + 10
    for transformed in (k.flip(0), k.flip(1), k.T):
        torch.testing.assert_close(transformed, k, atol=1e-8, rtol=0)


def test_isotropic_gradient_in_sigma_is_the_closed_form() -> None:
    # k = g / Σg with g = exp(-r²/2σ²), so ∂k/∂σ = k · (r² − Σ k r²) / σ³ at every tap (computed here in float64).
    sigma = torch.tensor([0.7, 1.5, 3.0])
    jacobian = torch.autograd.functional.jacobian(lambda s: isotropic_gaussian(s, 21), sigma)  # [3, 21, 21, 3]
    per_kernel = torch.stack([jacobian[i, :, :, i] for i in range(3)]).double()
    across = jacobian.clone()
    for i in range(3):
        across[i, :, :, i] = 0
    assert across.abs().max() == 0  # kernel i depends on σ_i only
    s = sigma.double()[:, None, None]
    r = torch.arange(21, dtype=torch.float64) - 10
    r2 = r[:, None] ** 2 + r[None, :] ** 2
    k = torch.exp(-r2 / (2 * s**2))
    k = k / k.sum((1, 2), keepdim=True)
    expected = k * (r2 - (k * r2).sum((1, 2), keepdim=True)) / s**3
    torch.testing.assert_close(per_kernel, expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    ("sx", "sy", "theta"), [(2.5, 1.0, 0.0), (1.0, 2.0, 0.5), (2.2, 0.8, -2.3), (1.5, 1.5, 1.0)]
)
def test_anisotropic_second_moments_match_covariance(sx: float, sy: float, theta: float) -> None:
    centre, cov = moments(anisotropic_gaussian(sx, sy, theta, 21))
    assert float(centre.abs().max()) < 1e-5
    target = expected_cov(sx, sy, theta)
    assert float((cov[0] - target).norm() / target.norm()) < 0.02


def test_anisotropic_orientation_convention() -> None:
    horizontal = anisotropic_gaussian(3.0, 1.0, 0.0, 21)[0]
    _, cov = moments(horizontal[None])
    assert float(cov[0, 0, 0]) > 5 * float(cov[0, 1, 1])  # θ = 0: σx along the columns (x)
    assert float(horizontal[10, 14]) > 10 * float(horizontal[14, 10])
    vertical = anisotropic_gaussian(3.0, 1.0, math.pi / 2, 21)[0]
    torch.testing.assert_close(vertical, horizontal.T, atol=1e-7, rtol=0)
    # positive θ turns the long axis from +x towards +y (down-right on screen)
    diagonal = anisotropic_gaussian(3.0, 0.5, math.pi / 4, 21)[0]
    assert float(diagonal[13, 13]) > 100 * float(diagonal[7, 13])


@pytest.mark.parametrize("theta", [0.0, 0.4, -2.9])
def test_isotropic_equals_anisotropic_with_equal_sigmas(theta: float) -> None:
    sigma = torch.tensor([0.7, 1.9, 3.5])
    torch.testing.assert_close(
        anisotropic_gaussian(sigma, sigma, theta, 21), isotropic_gaussian(sigma, 21), atol=1e-7, rtol=1e-5
    )


def test_anisotropic_noise_is_bounded_multiplicative_jitter() -> None:
    clean = anisotropic_gaussian(2.0, 1.0, 0.3, 21)
    noisy = anisotropic_gaussian(2.0, 1.0, 0.3, 21, noise=0.25, generator=gen(0))
    ratio = noisy / clean
    spread = float(ratio.max() / ratio.min())
    assert 1.15 < spread <= 1.25 + 1e-4


@pytest.mark.parametrize("setting", ["iso", "aniso", "motion"])
def test_samplers_are_deterministic_per_seed(setting: str) -> None:
    size = 25 if setting == "motion" else 21
    a = sample_training_kernels(setting, 4, size, generator=gen(7))
    b = sample_training_kernels(setting, 4, size, generator=gen(7))
    c = sample_training_kernels(setting, 4, size, generator=gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])  # kernels within a batch differ too


def test_sample_isotropic_sigma_range() -> None:
    kernels, params = sample_isotropic(512, 21, generator=gen(0), return_params=True)
    sigma = params["sigma"]
    assert float(sigma.min()) >= 0.2 and float(sigma.max()) <= 4.0
    assert float(sigma.min()) < 0.4 and float(sigma.max()) > 3.8  # the whole range is used
    torch.testing.assert_close(kernels, isotropic_gaussian(sigma, 21))
    # second moments agree with σ where the 21×21 grid does not truncate or under-sample
    _, cov = moments(kernels)
    sel = (sigma > 0.8) & (sigma < 2.5)
    measured = (0.5 * (cov[:, 0, 0] + cov[:, 1, 1])).sqrt()
    torch.testing.assert_close(measured[sel].float(), sigma[sel], rtol=0.02, atol=0)
    kernels = sample_isotropic(64, 21, sigma_range=(1.0, 1.5), generator=gen(1))
    variance = 0.5 * moments(kernels)[1].diagonal(dim1=1, dim2=2).sum(-1)
    assert float(variance.min()) > 0.97 and float(variance.max()) < 1.5**2 * 1.03


def test_sample_anisotropic_parameter_ranges() -> None:
    kernels, params = sample_anisotropic(512, 21, noise=0.0, generator=gen(0), return_params=True)
    sx, sy, theta = params["sigma_x"], params["sigma_y"], params["theta"]
    for s in (sx, sy):
        assert float(s.min()) >= 0.6 and float(s.max()) <= 5.0 and float(s.max() - s.min()) > 4.0
    assert float(theta.min()) >= -math.pi and float(theta.max()) <= math.pi
    assert float(theta.max() - theta.min()) > 6.0
    assert abs(float(torch.corrcoef(torch.stack([sx, sy]))[0, 1])) < 0.15  # independent
    torch.testing.assert_close(kernels, anisotropic_gaussian(sx, sy, theta, 21))
    eig = torch.linalg.eigvalsh(moments(kernels)[1])
    assert float(eig.min()) > 0.6**2 * 0.97 and float(eig.max()) < 5.0**2


def test_gaussian8_kernels() -> None:
    assert GAUSSIAN8_SIGMAS == (1.8, 2.0, 2.2, 2.4, 2.6, 2.8, 3.0, 3.2)
    kernels = gaussian8(21)
    torch.testing.assert_close(kernels[3], isotropic_gaussian(2.4)[0])
    variance = moments(kernels)[1][:, 0, 0]
    assert bool((variance[1:] > variance[:-1]).all())


@pytest.mark.parametrize(("size", "reason"), [(20, "is even; use an odd size such as 21"), (2, "is too small"),
                                            (1, "is too small")])
def test_gaussian_size_must_be_odd_and_at_least_3(size: int, reason: str) -> None:
    for make in (lambda: isotropic_gaussian(2.0, size), lambda: sample_anisotropic(2, size), lambda: gaussian8(size)):
        with pytest.raises(ValueError, match=f"kernel size {size} {reason}"):
            make()


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf")])
def test_gaussian_rejects_bad_sigma(sigma: float) -> None:
    with pytest.raises(ValueError, match="sigma"):
        isotropic_gaussian(sigma)
    with pytest.raises(ValueError, match="sigma_y"):
        anisotropic_gaussian(1.0, sigma, 0.0)


def test_sampler_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="sigma_range"):
        sample_isotropic(2, sigma_range=(4.0, 0.2))
    with pytest.raises(ValueError, match="noise"):
        anisotropic_gaussian(1.0, 2.0, 0.0, noise=-0.1)
    with pytest.raises(ValueError, match="batch"):
        sample_isotropic(0)
    with pytest.raises(ValueError, match="'iso', 'aniso', 'motion'"):
        sample_training_kernels("gaussian", 2, 21)


@pytest.mark.parametrize(("size", "intensity"), [(64, 0.0), (64, 0.5), (64, 1.0), (21, 0.5), (33, 1.0)])
def test_motion_kernels_are_centred(size: int, intensity: float) -> None:
    kernels = motion_blur(32, size, intensity, generator=gen(size))
    centre, _ = moments(kernels)
    assert float(centre.norm(dim=1).max()) < 0.5  # centre of mass on tap size//2 (the reference drifts by pixels)
    torch.testing.assert_close(kernels.sum((1, 2)), torch.ones(32), atol=1e-5, rtol=0)


def test_motion_intensity_zero_is_a_straight_stroke() -> None:
    # as in the reference generator, intensity 0 gives linear motion of random length, not a point
    _, cov = moments(motion_blur(16, 64, 0.0, generator=gen(0)))
    eig = torch.linalg.eigvalsh(cov)
    assert float(eig[:, 0].max()) < 0.6  # no width beyond the stroke's own
    assert float(eig[:, 1].max()) > 25  # but some are long
    curved = torch.linalg.eigvalsh(moments(motion_blur(16, 64, 1.0, generator=gen(0)))[1])
    assert float(curved[:, 0].mean()) > 3 * float(eig[:, 0].mean())


def test_motion_is_deterministic_and_checks_arguments() -> None:
    a = motion_blur(3, 40, 0.5, generator=gen(5))
    assert torch.equal(a, motion_blur(3, 40, 0.5, generator=gen(5)))
    assert not torch.allclose(a, motion_blur(3, 40, 0.5, generator=gen(6)))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="intensity"):
            motion_blur(1, 32, bad)
    with pytest.raises(ValueError, match="size"):
        motion_blur(1, 2)


# ---------------------------------------------------------------- kernel files


def test_npy_round_trip(tmp_path: Path) -> None:
    kernel = anisotropic_gaussian(2.0, 1.0, 0.4, 15)[0]
    path = tmp_path / "sub" / "k.npy"
    write_npy(path, (kernel * 3).numpy())  # unnormalised on disk, normalised on load
    loaded = load_kernel(path)
    assert loaded.dtype == torch.float32 and loaded.shape == (15, 15)
    torch.testing.assert_close(loaded, kernel, atol=1e-7, rtol=1e-5)
    write_npy(tmp_path / "k3.npy", kernel[None].numpy())  # a .npy holds one 2-D kernel
    with pytest.raises(ValueError, match="k3.npy"):
        load_kernel(tmp_path / "k3.npy")
    with pytest.raises(ValueError, match="index 1"):
        load_kernel(path, index=1)


def test_png_round_trip_grey_and_rgb(tmp_path: Path) -> None:
    kernel = anisotropic_gaussian(2.5, 1.2, -0.6, 21)[0]
    grey = np.round(kernel.numpy() / float(kernel.max()) * 255).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.png")
    tolerance = 0.5 / 255 * float(kernel.max()) / float(torch.from_numpy(grey / 255.0).sum() * kernel.max()) + 1e-6
    for name in ("grey.png", "rgb.png"):
        loaded = load_kernel(tmp_path / name)
        assert loaded.dtype == torch.float32 and loaded.shape == (21, 21)
        assert abs(float(loaded.sum()) - 1) < 1e-5
        assert float((loaded - kernel).abs().max()) < 2 * tolerance


def test_mat_v5_round_trip_with_cells(tmp_path: Path) -> None:
    import scipy.io

    k1, k2 = isotropic_gaussian(1.5, 11)[0].numpy(), anisotropic_gaussian(3.0, 1.0, 1.0, 15)[0].numpy()
    scipy.io.savemat(tmp_path / "one.mat", {"title": "x", "kernel": k1 * 2})
    np.testing.assert_allclose(load_kernel(tmp_path / "one.mat").numpy(), k1, atol=1e-7)
    cells = np.empty((1, 2), dtype=object)
    cells[0, 0], cells[0, 1] = k1, k2
    scipy.io.savemat(tmp_path / "cells.mat", {"kernels": cells})
    loaded = load_kernels(tmp_path / "cells.mat")
    assert [tuple(k.shape) for k in loaded] == [(11, 11), (15, 15)]
    np.testing.assert_allclose(load_kernel(tmp_path / "cells.mat", index=1).numpy(), k2, atol=1e-7)
    with pytest.raises(ValueError, match="index 2"):
        load_kernel(tmp_path / "cells.mat", index=2)
    scipy.io.savemat(tmp_path / "other.mat", {"name": "x", "psf": k2[:, :13]})  # first 2-D numeric array
    expected = k2[:, :13] / k2[:, :13].sum()
    np.testing.assert_allclose(load_kernel(tmp_path / "other.mat").numpy(), expected, atol=1e-7)
    scipy.io.savemat(tmp_path / "none.mat", {"name": "x"})
    with pytest.raises(ValueError, match="no 2-D numeric array"):
        load_kernel(tmp_path / "none.mat")


def write_mat73(path: Path, kernels: list[np.ndarray]) -> None:
    """A MATLAB v7.3-style file: 512-byte MAT header, cell 'kernels' of references, column-major data."""
    import h5py

    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        ref_array = np.empty((len(kernels), 1), dtype=h5py.ref_dtype)
        for i, k in enumerate(kernels):
            ds = refs.create_dataset(f"k{i}", data=np.ascontiguousarray(k.T))
            ds.attrs["MATLAB_class"] = np.bytes_(b"double")
            ref_array[i, 0] = ds.ref
        cell = f.create_dataset("kernels", data=ref_array)
        cell.attrs["MATLAB_class"] = np.bytes_(b"cell")
        name = f.create_dataset("name", data=np.array([[ord("a")]], dtype=np.uint16))
        name.attrs["MATLAB_class"] = np.bytes_(b"char")
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116) + b"\0" * 8 + b"\x00\x02IM")


def test_mat_v73_hdf5_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    k1 = anisotropic_gaussian(3.0, 1.0, 0.3, 13)[0].double().numpy()
    k2 = np.zeros((9, 7))
    k2[2, 1:6] = 1.0  # asymmetric and non-square: catches a missing transpose
    write_mat73(tmp_path / "levin.mat", [k1, k2])
    loaded = load_kernels(tmp_path / "levin.mat")
    assert [tuple(k.shape) for k in loaded] == [(13, 13), (9, 7)]
    np.testing.assert_allclose(loaded[0].numpy(), k1, atol=1e-7)
    np.testing.assert_allclose(load_kernel(tmp_path / "levin.mat", index=1).numpy(), k2 / 5, atol=1e-7)


def test_mat_v73_without_h5py_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("h5py")
    write_mat73(tmp_path / "levin.mat", [np.ones((3, 3))])
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match=r"pip install blinddiff\[mat73\]"):
        load_kernel(tmp_path / "levin.mat")


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((5, 5), -0.012), "sums to -0.3; a blur kernel must be non-negative with a positive sum"),
        (np.array([[0.5, -0.1], [0.3, 0.3]]), "negative taps"),
        (np.array([[0.5, np.nan], [0.3, 0.3]]), "non-finite"),
        (np.ones((2, 3, 3)), "2-D"),
        (np.ones(9), "2-D"),
    ],
)
def test_load_kernel_rejects_bad_arrays(tmp_path: Path, array: np.ndarray, message: str) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(ValueError, match=message) as info:
        load_kernel(path)
    assert str(path) in str(info.value)


def test_load_kernel_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_kernel(tmp_path / "missing.npy")
    (tmp_path / "k.txt").write_text("1")
    with pytest.raises(ValueError, match=r"'\.txt'"):
        load_kernel(tmp_path / "k.txt")
    np.save(tmp_path / "tiny.npy", np.array([[1e-7, -1e-7], [0.5, 0.5]]))  # tiny negatives are clamped
    assert float(load_kernel(tmp_path / "tiny.npy").min()) == 0.0


# ---------------------------------------------------------------- command-line specs


def test_parse_kernel_spec_forms(tmp_path: Path) -> None:
    torch.testing.assert_close(parse_kernel_spec("iso:2.6"), isotropic_gaussian(2.6, 21))
    torch.testing.assert_close(parse_kernel_spec("aniso:1.5,4,0.3", size=15), anisotropic_gaussian(1.5, 4, 0.3, 15))
    motion = parse_kernel_spec("motion:0.5", size=32, generator=gen(0))
    assert motion.shape == (1, 32, 32) and torch.equal(motion, motion_blur(1, 32, 0.5, generator=gen(0)))
    for setting, size in (("iso", 15), ("aniso", 15), ("motion", 24)):  # one draw of the training sampler
        random = parse_kernel_spec(f"random-{setting}", size=size, generator=gen(0))
        assert torch.equal(random, sample_training_kernels(setting, 1, size, generator=gen(0)))
    write_npy(tmp_path / "k.npy", isotropic_gaussian(1.0, 9)[0].numpy())
    torch.testing.assert_close(parse_kernel_spec(str(tmp_path / "k.npy")), isotropic_gaussian(1.0, 9))


@pytest.mark.parametrize(
    "spec", ["iso:", "iso:abc", "iso:1,2", "aniso:1,2", "motion:x", "gauss:2", "random-foo", "k.txt", ""]
)
def test_parse_kernel_spec_rejects_malformed(spec: str) -> None:
    with pytest.raises(ValueError, match="accepted forms"):
        parse_kernel_spec(spec)


# ---------------------------------------------------------------- kernel PCA


def test_kernel_pca_reconstructs_training_kernels() -> None:
    pca = fit_kernel_pca("iso", n=1024, size=21, code_length=10, seed=0)
    assert pca.code_length == 10 and pca.size == 21
    gram = pca.components @ pca.components.T
    torch.testing.assert_close(gram, torch.eye(10), atol=1e-5, rtol=0)
    kernels = sample_isotropic(64, 21, generator=gen(123))  # unseen kernels of the same family
    codes = pca.encode(kernels)
    assert codes.shape == (64, 10)
    error = (pca.decode(codes) - kernels).flatten(1).norm(dim=1) / kernels.flatten(1).norm(dim=1)
    assert float(error.max()) < 0.01
    mean = pca.mean[None]
    torch.testing.assert_close(pca.encode(mean), torch.zeros(1, 10), atol=1e-6, rtol=0)
    torch.testing.assert_close(pca.decode(pca.encode(mean)), mean, atol=1e-6, rtol=0)
    normalised = pca.decode(torch.randn(4, 10, generator=gen(0)) * 0.05, normalize=True)
    assert float(normalised.min()) >= 0
    torch.testing.assert_close(normalised.sum((1, 2)), torch.ones(4), atol=1e-5, rtol=0)


def test_kernel_pca_longer_codes_fit_better() -> None:
    kernels = sample_anisotropic(400, 15, generator=gen(0))
    errors = []
    for length in (2, 8, 32):
        pca = KernelPCA.fit(kernels, length)
        errors.append(float((pca.decode(pca.encode(kernels)) - kernels).norm()))
    assert errors[0] > errors[1] > errors[2]
    with pytest.raises(ValueError, match="code_length"):
        KernelPCA.fit(kernels[:5], 10)
    with pytest.raises(ValueError, match=r"\[B, 15, 15\]"):
        KernelPCA.fit(kernels, 4).encode(kernels[:, :14, :14])


def test_kernel_pca_state_dict_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    pca = KernelPCA.fit(sample_isotropic(200, 11, generator=gen(0)), 6)
    state = pca.state_dict()
    assert set(state) == {"mean", "components"} and all(isinstance(v, torch.Tensor) for v in state.values())
    save_file(dict(state), str(tmp_path / "pca.safetensors"))
    loaded = load_file(str(tmp_path / "pca.safetensors"))
    restored = KernelPCA(loaded["mean"], loaded["components"])
    for key in state:
        assert torch.equal(restored.state_dict()[key], state[key])
    kernels = sample_isotropic(5, 11, generator=gen(1))
    assert torch.equal(restored.encode(kernels), pca.encode(kernels))
    assert restored.to("cpu") is restored
    with pytest.raises(ValueError, match="components"):
        KernelPCA(state["mean"], state["components"][:, :-1])


# ---------------------------------------------------------------- speed (data hot path)


@pytest.mark.parametrize("sampler", [sample_isotropic, sample_anisotropic])
def test_gaussian_samplers_are_fast(sampler: Callable[..., torch.Tensor]) -> None:
    generator = gen(0)
    sampler(32, 21, generator=generator)  # warm-up
    times = []
    for _ in range(30):
        start = time.perf_counter()
        sampler(32, 21, generator=generator)
        times.append(time.perf_counter() - start)
    assert float(np.median(times)) < 5e-3
