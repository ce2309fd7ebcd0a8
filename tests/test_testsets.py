"""The benchmark builder and the `make-benchmark` / `degrade` commands, on scikit-image sample pictures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blinddiff.cli import main
from blinddiff.degradation import degrade
from blinddiff.fileio import read_rgb, rgb_to_tensor
from blinddiff.kernels import GAUSSIAN8_SIGMAS, anisotropic_gaussian, isotropic_gaussian
from conftest import sample_rgb


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_gaussian8_layout_and_manifest(hr_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    assert main(["make-benchmark", "--hr", str(hr_folder), "--protocol", "gaussian8", "--scale", "4",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["protocol"] == "gaussian8" and manifest["scale"] == 4 and manifest["kernel_size"] == 21
    cases = manifest["cases"]
    assert len(cases) == 2 * 8
    assert {c["name"] for c in cases if c["hr"] == "HR/astronaut.png"} == {f"astronaut_sig{s}" for s in GAUSSIAN8_SIGMAS}
    hr = np.asarray(Image.open(out / "HR" / "astronaut.png"))
    assert hr.shape == (68, 80, 3)  # 70x83 mod-cropped to multiples of 4, top-left kept
    assert np.array_equal(hr, read_rgb(hr_folder / "astronaut.png")[:68, :80])
    for case in cases:
        lr = np.asarray(Image.open(out / case["lr"]))
        hr_case = np.asarray(Image.open(out / case["hr"]))
        assert lr.dtype == np.uint8 and lr.shape == (hr_case.shape[0] // 4, hr_case.shape[1] // 4, 3)
        kernel = np.load(out / case["kernel"])
        assert kernel.dtype == np.float32 and kernel.shape == (21, 21)
        assert kernel.sum() == pytest.approx(1.0, abs=1e-5)
        assert case["scale"] == 4 and case["downsample"] == "bicubic" and case["kernel"].startswith("kernels/")
    # Each LR is exactly the forward model applied to the stored HR with the stored kernel.
    case = next(c for c in cases if c["name"] == "astronaut_sig2.6")
    assert case["sigma"] == 2.6
    expected = degrade(rgb_to_tensor(hr), isotropic_gaussian(2.6, 21), 4, downsample="bicubic", quantize=True)
    lr = rgb_to_tensor(np.asarray(Image.open(out / case["lr"])))
    assert torch.equal(lr, expected)


def test_same_arguments_give_identical_bytes(hr_folder: Path, tmp_path: Path) -> None:
    args = ["--hr", str(hr_folder), "--protocol", "aniso", "--scale", "2", "--noise", "0.01", "--seed", "7"]
    assert main(["make-benchmark", *args, "--out", str(tmp_path / "a")]) == 0
    assert main(["make-benchmark", *args, "--out", str(tmp_path / "b")]) == 0
    first, second = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert first == second and len(first) == 2 * 3 + 1
    assert main(["make-benchmark", *args[:-1], "8", "--out", str(tmp_path / "c")]) == 0
    assert tree_bytes(tmp_path / "c")["kernels/camera_aniso.npy"] != first["kernels/camera_aniso.npy"]
    kernels = [np.load(tmp_path / "a" / "kernels" / f"{stem}_aniso.npy") for stem in ("astronaut", "camera")]
    assert not np.allclose(kernels[0], kernels[1])  # one random kernel per image


def assert_lr_is_the_forward_model(root: Path, name: str, downsample: str) -> None:
    """The case's LR is degrade() of its stored HR with its stored kernel at the manifest's scale (noise 0)."""
    manifest = json.loads((root / "manifest.json").read_text())
    case = next(c for c in manifest["cases"] if c["name"] == name)
    assert case["downsample"] == downsample
    kernel = torch.from_numpy(np.load(root / case["kernel"]))[None]
    expected = degrade(rgb_to_tensor(read_rgb(root / case["hr"])), kernel, manifest["scale"], downsample=downsample,
                       quantize=True)
    assert torch.equal(rgb_to_tensor(read_rgb(root / case["lr"])), expected)


def test_direct_downsampling_and_deblurring(hr_folder: Path, tmp_path: Path) -> None:
    assert main(["make-benchmark", "--hr", str(hr_folder), "--protocol", "iso:1.5", "--scale", "3",
                 "--downsample", "direct", "--out", str(tmp_path / "d")]) == 0
    lr = np.asarray(Image.open(tmp_path / "d" / "LR" / "astronaut_sig1.5.png"))
    assert lr.shape == (70 // 3, 83 // 3, 3)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "d" / "kernels" / "astronaut_sig1.5.npy")),
                               isotropic_gaussian(1.5, 21)[0])
    assert_lr_is_the_forward_model(tmp_path / "d", "astronaut_sig1.5", "direct")
    assert main(["make-benchmark", "--hr", str(hr_folder), "--protocol", "motion", "--scale", "1",
                 "--kernel-size", "15", "--out", str(tmp_path / "m")]) == 0
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["kernel_size"] == 15 and manifest["cases"][0]["intensity"] == 0.5
    lr = np.asarray(Image.open(tmp_path / "m" / "LR" / "astronaut_motion.png"))
    assert lr.shape == (70, 83, 3)
    assert_lr_is_the_forward_model(tmp_path / "m", "astronaut_motion", "bicubic")  # scale 1: blur only


def test_non_empty_output_needs_force(hr_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["make-benchmark", "--hr", str(hr_folder), "--protocol", "iso:2", "--out", str(out)]
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()
    assert main([*args, "--force"]) == 0
    assert (out / "manifest.json").exists() and (out / "keep.txt").read_text() == "precious"


def test_bad_inputs_are_named_and_others_processed(hr_folder: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    (hr_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (hr_folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "bench"
    assert main(["make-benchmark", "--hr", str(hr_folder), "--protocol", "iso:2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "empty.jpg" in err
    names = [c["name"] for c in json.loads((out / "manifest.json").read_text())["cases"]]
    assert names == ["astronaut_sig2", "camera_sig2"]


@pytest.mark.parametrize("args, message", [
    (["--hr", "/nonexistent/folder"], "does not exist"),
    (["--scale", "0"], "scale 0"),
    (["--protocol", "iso:abc"], "positive number"),
    (["--protocol", "gauss9"], "unknown"),
    (["--noise", "nan"], "noise"),
    (["--kernel-size", "20"], "odd"),
])
def test_make_benchmark_rejects_bad_arguments(hr_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              args: list[str], message: str) -> None:
    base = {"--hr": str(hr_folder), "--protocol": "gaussian8", "--out": str(tmp_path / "o")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["make-benchmark"] + [x for pair in base.items() for x in pair]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_tiny_image_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "hr"
    folder.mkdir()
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(folder / "tiny.png")
    Image.fromarray(np.full((48, 48, 3), 128, np.uint8)).save(folder / "flat.png")
    assert main(["make-benchmark", "--hr", str(folder), "--protocol", "iso:2", "--out", str(tmp_path / "o")]) == 1
    assert "tiny.png" in capsys.readouterr().err
    lr = np.asarray(Image.open(tmp_path / "o" / "LR" / "flat_sig2.png"))
    assert (lr == 128).all()  # a constant image stays constant through blur + bicubic


def test_degrade_command(hr_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "lr"
    assert main(["degrade", str(hr_folder / "astronaut.png"), "--out", str(out), "--scale", "2",
                 "--kernel", "aniso:1.5,4,0.3"]) == 0
    assert np.asarray(Image.open(out / "astronaut.png")).shape == (35, 41, 3)
    kernel = np.load(out / "astronaut_kernel.npy")
    assert kernel.shape == (21, 21) and kernel.sum() == pytest.approx(1, abs=1e-5)
    # A kernel file round-trips: degrading with the saved kernel gives the same LR.
    assert main(["degrade", str(hr_folder / "astronaut.png"), "--out", str(tmp_path / "again"), "--scale", "2",
                 "--kernel", str(out / "astronaut_kernel.npy")]) == 0
    assert (tmp_path / "again" / "astronaut.png").read_bytes() == (out / "astronaut.png").read_bytes()
    torch.testing.assert_close(torch.from_numpy(kernel), anisotropic_gaussian(1.5, 4, 0.3, 21)[0])
    # Folders and globs, random kernels: one per image.
    assert main(["degrade", str(hr_folder), "--out", str(tmp_path / "r"), "--kernel", "random-iso"]) == 0
    assert {p.name for p in (tmp_path / "r").iterdir()} == {
        "astronaut.png", "astronaut_kernel.npy", "camera.png", "camera_kernel.npy"}
    drawn = [np.load(tmp_path / "r" / f"{stem}_kernel.npy") for stem in ("astronaut", "camera")]
    assert not np.allclose(drawn[0], drawn[1])
    for random_iso in drawn:  # isotropic: symmetric under flips and the transpose
        for transformed in (random_iso[::-1], random_iso[:, ::-1], random_iso.T):
            np.testing.assert_allclose(transformed, random_iso, atol=1e-7)
    assert main(["degrade", str(hr_folder / "*.png"), "--out", str(tmp_path / "g"), "--kernel", "motion:0.5",
                 "--scale", "1", "--kernel-size", "17"]) == 0
    assert np.load(tmp_path / "g" / "camera_kernel.npy").shape == (17, 17)


def test_degrade_bad_inputs(hr_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    negative = tmp_path / "negative.npy"
    np.save(negative, -np.ones((5, 5), np.float32))
    out = tmp_path / "o"
    assert main(["degrade", str(hr_folder), "--out", str(out), "--kernel", str(negative)]) == 2
    assert "negative.npy" in capsys.readouterr().err
    assert main(["degrade", str(hr_folder), "--out", str(out), "--kernel", "iso:2", "--kernel-size", "20"]) == 2
    assert "20" in capsys.readouterr().err
    assert main(["degrade", str(hr_folder), "--out", str(out), "--kernel", "blurry"]) == 2
    assert "blurry" in capsys.readouterr().err
    missing = str(tmp_path / "missing.png")
    assert main(["degrade", missing, str(hr_folder / "camera.png"), "--out", str(out), "--kernel", "iso:2"]) == 1
    assert "missing.png" in capsys.readouterr().err
    assert (out / "camera.png").exists()
    # Never overwrite an input: degrading a folder into itself is refused per file.
    before = tree_bytes(hr_folder)
    assert main(["degrade", str(hr_folder), "--out", str(hr_folder), "--kernel", "iso:2", "--scale", "2"]) == 1
    assert "overwrite" in capsys.readouterr().err
    assert all(tree_bytes(hr_folder)[name] == data for name, data in before.items())


# ------------------------------------------------------------------------------ Tables 2 and 5 protocols


def test_centre_crop_and_limit_take_the_first_images_in_the_middle(tmp_path: Path) -> None:
    hr = tmp_path / "hr"
    hr.mkdir()
    picture = sample_rgb(60, 80)
    for name in ("b", "a", "c"):
        Image.fromarray(picture).save(hr / f"{name}.png")
    out = tmp_path / "set"
    assert main(["make-benchmark", "--hr", str(hr), "--out", str(out), "--protocol", "motion", "--scale", "1",
                 "--kernel-size", "15", "--noise", "0.02", "--crop", "40", "--limit", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [case["name"] for case in manifest["cases"]] == ["a_motion", "b_motion"]  # first 2 in name order
    assert manifest["crop"] == 40 and manifest["limit"] == 2 and manifest["noise"] == 0.02
    assert np.array_equal(read_rgb(out / "HR" / "a.png"), picture[10:50, 20:60])  # the centred 40×40
    assert read_rgb(out / "LR" / "a_motion.png").shape == (40, 40, 3)  # scale 1: blurred, same size
    assert np.load(out / "kernels" / "a_motion.npy").shape == (15, 15)


def test_crop_larger_than_an_image_names_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    hr = tmp_path / "hr"
    hr.mkdir()
    Image.fromarray(sample_rgb(30, 30)).save(hr / "small.png")
    Image.fromarray(sample_rgb(50, 50)).save(hr / "large.png")
    assert main(["make-benchmark", "--hr", str(hr), "--out", str(tmp_path / "o"), "--protocol", "iso:1.0",
                 "--kernel-size", "7", "--crop", "40"]) == 1
    assert "small.png" in capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["cases"][0]["name"] == "large_sig1"
    assert main(["make-benchmark", "--hr", str(hr), "--out", str(tmp_path / "p"), "--crop", "0"]) == 2
    assert main(["make-benchmark", "--hr", str(hr), "--out", str(tmp_path / "q"), "--crop", "42"]) == 2  # not ×4


def asymmetric_kernels() -> list[np.ndarray]:
    first = np.zeros((5, 5))
    first[2, 1:5] = [1, 2, 3, 4]  # a horizontal streak, heavier to the right
    second = np.zeros((7, 7))
    second[0:4, 3] = 1.0
    return [first / first.sum(), second / second.sum()]


def test_levin_protocol_blurs_every_image_with_every_kernel_as_a_convolution(
        hr_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import scipy.io
    import scipy.signal

    data = tmp_path / "data"
    (data / "kernels" / "KAIR").mkdir(parents=True)
    cell = np.empty((1, 2), dtype=object)
    cell[0, 0], cell[0, 1] = asymmetric_kernels()
    scipy.io.savemat(data / "kernels" / "KAIR" / "Levin09.mat", {"kernels": cell})
    monkeypatch.setenv("BLINDDIFF_DATA", str(data))
    out = tmp_path / "levin"
    assert main(["make-benchmark", "--hr", str(hr_folder), "--out", str(out), "--protocol", "levin",
                 "--scale", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["name"] for c in manifest["cases"]] == ["astronaut_k1", "astronaut_k2", "camera_k1", "camera_k2"]
    assert manifest["kernel_size"] is None and manifest["cases"][1]["kernel_type"] == "levin"
    # the stored kernel is the file's rotated by 180°, so blinddiff's correlation is the file's convolution
    stored = np.load(out / "kernels" / "astronaut_k1.npy")
    assert np.allclose(stored, asymmetric_kernels()[0][::-1, ::-1], atol=1e-7)
    hr = read_rgb(out / "HR" / "astronaut.png").astype(np.float64)
    convolved = scipy.signal.convolve2d(hr[..., 0], asymmetric_kernels()[0], mode="same")
    lr = read_rgb(out / "LR" / "astronaut_k1.png").astype(np.float64)[..., 0]
    assert np.abs(lr - convolved)[4:-4, 4:-4].max() <= 0.5 + 1e-6  # uint8 rounding only, away from the border
    # kernels:FILE is the same without the rotation (kernel files are correlation kernels everywhere else)
    out2 = tmp_path / "file"
    assert main(["make-benchmark", "--hr", str(hr_folder), "--out", str(out2), "--scale", "1", "--protocol",
                 f"kernels:{data / 'kernels' / 'KAIR' / 'Levin09.mat'}"]) == 0
    assert np.allclose(np.load(out2 / "kernels" / "camera_k2.npy"), asymmetric_kernels()[1], atol=1e-7)
    with pytest.raises(ValueError, match="leave --kernel-size out"):
        from blinddiff.testsets import build_testset
        build_testset(hr_folder, tmp_path / "x", "levin", 1, kernel_size=21)
