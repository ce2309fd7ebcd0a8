"""The BlindDiff API and the `upscale` command end to end, with a tiny random model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blinddiff import BlindDiff
from blinddiff import checkpoint
from blinddiff.cli import main
from blinddiff.config import load_config
from blinddiff.fileio import load_image
from blinddiff.model import MCFormer
from conftest import sample_rgb

FAST = ["--steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def model(weights: Path) -> BlindDiff:
    return BlindDiff.from_pretrained(weights, device="cpu")


def test_api_accepts_and_returns_each_kind(model: BlindDiff) -> None:
    rgb = sample_rgb(12, 10)
    sr, kernel = model.upscale(Image.fromarray(rgb), steps=2, seed=1)
    assert isinstance(sr, Image.Image) and sr.size == (40, 48) and sr.mode == "RGB"
    assert isinstance(kernel, np.ndarray) and kernel.shape == (11, 11)
    assert kernel.min() >= 0 and kernel.sum() == pytest.approx(1, abs=1e-4)
    grey, _ = model.upscale(rgb[..., 0], steps=2)
    assert grey.dtype == np.uint8 and grey.shape == (48, 40)
    deep, _ = model.upscale((rgb[..., 0].astype(np.uint16) * 257), steps=2)
    assert deep.dtype == np.uint16 and deep.shape == (48, 40)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    out, k = model.upscale(tensor, steps=2, seed=1)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 48, 40) and k.shape == (11, 11)
    assert np.array_equal(np.asarray(sr), np.round(out.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])
    out_rgba, _ = model.upscale(Image.fromarray(rgba, "RGBA"), steps=2)
    assert out_rgba.mode == "RGBA" and (np.asarray(out_rgba)[..., 3] == 200).all()
    with pytest.raises(ValueError, match="NaN"):
        model.upscale(torch.full((3, 12, 12), float("nan")), steps=2)
    with pytest.raises(ValueError, match="at least"):
        model.upscale(rgb[:4, :4], steps=2)


def test_seeds_and_batches(model: BlindDiff) -> None:
    images = torch.rand(2, 3, 12, 12)
    first, _ = model.upscale(images[0], steps=3, seed=5)
    again, _ = model.upscale(images[0], steps=3, seed=5)
    other, _ = model.upscale(images[0], steps=3, seed=6)
    assert torch.equal(first, again) and not torch.equal(first, other)
    batch, kernels = model.upscale(images, steps=3, seed=5)
    assert batch.shape == (2, 3, 48, 48) and kernels.shape == (2, 11, 11)
    assert torch.allclose(batch[0], first, atol=1e-5)


def test_non_blind_mode_returns_the_given_kernel(model: BlindDiff) -> None:
    given = np.zeros((11, 11), np.float32)
    given[5, 5] = 1
    _, kernel = model.upscale(sample_rgb(12, 12), steps=2, kernel=given)
    assert np.allclose(kernel, given)
    blind, _ = model.upscale(sample_rgb(12, 12), steps=2)
    assert not np.array_equal(model.upscale(sample_rgb(12, 12), steps=2, kernel=given)[0], blind)  # the kernel is used
    with pytest.raises(ValueError, match="changes nothing"):  # fidelity mode has no data term to take it
        model.upscale(sample_rgb(12, 12), mode="fidelity", kernel=given)


def make_inputs(folder: Path) -> None:
    folder.mkdir()
    rgb = sample_rgb(12, 16)
    Image.fromarray(rgb).save(folder / "colour.png")
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=95)
    Image.fromarray(rgb[..., 1]).save(folder / "grey.png")
    Image.fromarray(np.dstack([rgb, np.full((12, 16), 99, np.uint8)]), "RGBA").save(folder / "alpha.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(folder / "deep.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image at all")
    Image.fromarray(rgb[:4, :4]).save(folder / "tiny.png")


def test_upscale_command(weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = tmp_path / "in"
    make_inputs(inputs)
    out = tmp_path / "out"
    code = main(["upscale", str(inputs), "--out", str(out), "--weights", str(weights), "--suffix", "_x4", *FAST])
    err = capsys.readouterr().err
    assert code == 1
    for bad in ("corrupt.png", "empty.png", "notes.jpg", "tiny.png"):
        assert bad in err
    assert not [line for line in err.splitlines() if "colour.png" in line and "error" in line]
    colour = Image.open(out / "colour_x4.png")
    assert colour.size == (64, 48) and colour.mode == "RGB"
    assert Image.open(out / "photo_x4.jpg").format == "JPEG"
    assert Image.open(out / "grey_x4.png").mode == "L"
    alpha = Image.open(out / "alpha_x4.png")
    assert alpha.mode == "RGBA" and (np.asarray(alpha)[..., 3] == 99).all()
    deep = load_image(out / "deep_x4.png")
    assert deep.bit_depth == 16 and deep.grey and deep.size == (48, 64)
    kernel = np.load(out / "colour_kernel.npy")
    assert kernel.shape == (11, 11) and kernel.sum() == pytest.approx(1, abs=1e-4)
    assert Image.open(out / "colour_kernel.png").size == (88, 88)


def test_upscale_never_overwrites_inputs(weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(sample_rgb(12, 12)).save(folder / "a.png")
    before = (folder / "a.png").read_bytes()
    assert main(["upscale", str(folder / "a.png"), "--out", str(folder), "--weights", str(weights), *FAST]) == 1
    assert "overwrite" in capsys.readouterr().err and (folder / "a.png").read_bytes() == before


def test_trajectory_and_batching(weights: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b"):
        Image.fromarray(sample_rgb(12, 12, "astronaut" if name == "a" else "coffee")).save(folder / f"{name}.png")
    assert main(["upscale", str(folder), "--out", str(tmp_path / "one"), "--weights", str(weights), *FAST]) == 0
    assert main(["upscale", str(folder), "--out", str(tmp_path / "two"), "--weights", str(weights), "--batch-size",
                 "2", "--save-trajectory", *FAST]) == 0
    one = np.asarray(Image.open(tmp_path / "one" / "b.png")).astype(int)
    two = np.asarray(Image.open(tmp_path / "two" / "b.png")).astype(int)
    assert np.abs(one - two).max() <= 1  # batched = one by one (up to float rounding)
    assert sorted(p.name for p in (tmp_path / "two" / "a_trajectory").iterdir()) == [
        "step_0000_kernel.npy", "step_0000_x0.png", "step_0001_kernel.npy", "step_0001_x0.png"]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


def test_a_small_budget_tiles_without_seams(model: BlindDiff) -> None:
    image = sample_rgb(48, 48)
    seen: list[tuple[int, int]] = []
    hook = model.model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        plain, kernel = model.upscale(image, seed=0, max_memory=None)
        assert seen and set(seen) == {(192, 192)}  # untiled: the network sees the whole image
        seen.clear()
        tiled, tiled_kernel = model.upscale(image, seed=0, max_memory="440MiB")
    finally:
        hook.remove()
    assert len(set(seen)) == 1 and len(seen) >= 2 * 2 * 3  # ≥ 4 windows of 3 steps, all the same size
    side = seen[0][0]
    assert side < 192 and side % 8 == 0  # on the grid of the scale and the tiny network's multiple
    assert tiled.shape == plain.shape and _psnr(tiled, plain) >= 45  # seams measured: docs/benchmarks.md
    assert tiled_kernel.sum() == pytest.approx(1, abs=1e-4) and np.abs(tiled_kernel - kernel).sum() < 0.1
    explicit, _ = model.upscale(image, seed=0, tile=side)  # tile= is the override
    assert np.array_equal(explicit, tiled)


def test_memory_budget_errors(model: BlindDiff, tmp_path: Path, capsys: pytest.CaptureFixture,
                              weights: Path) -> None:
    with pytest.raises(ValueError, match="max_memory"):
        model.upscale(sample_rgb(48, 48), max_memory="401MiB")  # not even the smallest window fits
    with pytest.raises(ValueError, match="max_memory='lots'"):
        model.upscale(sample_rgb(12, 12), max_memory="lots")
    Image.fromarray(sample_rgb(12, 12)).save(tmp_path / "a.png")
    run = ["upscale", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--weights", str(weights), *FAST]
    with pytest.raises(SystemExit) as exit_info:
        main([*run, "--max-memory", "2 parsecs"])
    assert exit_info.value.code == 2 and "--max-memory" in capsys.readouterr().err
    assert main([*run, "--max-memory", "2GiB"]) == 0


def test_alpha_rows_are_the_rows_of_the_whole_alpha(model: BlindDiff) -> None:
    alpha = torch.rand(1, 1, 20, 600)
    whole = model.upscale_alpha(alpha)
    assert whole.shape == (1, 1, 80, 2400)
    for rows in (slice(0, 24), slice(24, 60), slice(60, 80)):
        torch.testing.assert_close(model.upscale_alpha(alpha, rows), whole[..., rows, :], atol=1e-6, rtol=0)


def test_outscale_and_jpeg_quality(weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = tmp_path / "in"
    make_inputs(inputs)
    for bad in ("corrupt.png", "empty.png", "notes.jpg", "tiny.png"):
        (inputs / bad).unlink()
    out = tmp_path / "out"
    base = ["upscale", str(inputs), "--out", str(out), "--weights", str(weights), *FAST]
    assert main([*base, "--outscale", "3.5", "--quality", "40"]) == 0
    assert Image.open(out / "colour.png").size == (56, 42)  # 16×12 × 3.5, not × 4
    deep = load_image(out / "deep.png")
    assert deep.bit_depth == 16 and deep.size == (42, 56)
    alpha = Image.open(out / "alpha.png")
    assert alpha.mode == "RGBA" and alpha.size == (56, 42) and (np.asarray(alpha)[..., 3] == 99).all()
    assert np.load(out / "colour_kernel.npy").shape == (11, 11)  # the kernel is not resized
    photo = Image.open(out / "photo.jpg")
    assert photo.size == (56, 42)

    def tables(quality: int) -> dict:
        reference = tmp_path / f"q{quality}.jpg"
        Image.fromarray(np.asarray(photo.convert("RGB"))).save(reference, quality=quality)
        return Image.open(reference).quantization

    assert photo.quantization == tables(40) != tables(95)
    assert main([*base, "--ext", "jpg"]) == 0  # without --quality: 95, as before
    assert Image.open(out / "colour.jpg").quantization == tables(95)
    capsys.readouterr()
    for flags, message in ((["--quality", "0"], "--quality 0"), (["--quality", "101"], "--quality 101"),
                           (["--quality", "80", "--ext", "png"], "no output is JPEG"),
                           (["--outscale", "0"], "--outscale 0"), (["--outscale", "nan"], "--outscale nan")):
        assert main([*base, "--out", str(tmp_path / "refused"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("error") == 1
    assert not (tmp_path / "refused").exists()


def test_progress_off_a_terminal_is_plain_lines(weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b"):
        Image.fromarray(sample_rgb(12, 12 + 4 * (name == "b"))).save(folder / f"{name}.png")
    assert main(["upscale", str(folder), "--out", str(tmp_path / "o"), "--weights", str(weights),
                 "--steps", "2"]) == 0  # progress on, stderr captured: not a terminal
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err  # no cursor movement, no carriage returns
    assert err.count("sampling: 2/2 steps") == 2  # one line per image at the end of its steps


def test_weight_errors(weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "a.png"
    Image.fromarray(sample_rgb(12, 12)).save(image)
    run = ["upscale", str(image), "--out", str(tmp_path / "o"), *FAST]
    assert main([*run, "--weights", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    pt = tmp_path / "tiny.pt"
    torch.save(MCFormer(load_config("tiny").model).state_dict(), pt)
    assert main([*run, "--weights", str(pt)]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main([*run, "--weights", str(pt), "--allow-pt", "--config", "tiny"]) == 0
    assert main([*run, "--weights", str(weights), "--config", "small-x4"]) == 2
    assert "does not fit" in capsys.readouterr().err
    # Shipped names resolve inside the package, with a sha256 check.
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path / "shipped")
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / "tiny.safetensors").write_bytes(weights.read_bytes())
    digest = checkpoint.sha256_of(weights)
    (tmp_path / "shipped" / "registry.json").write_text(
        f'{{"tiny": {{"file": "tiny.safetensors", "sha256": "{digest}"}}}}')
    assert checkpoint.resolve_weights("tiny") == tmp_path / "shipped" / "tiny.safetensors"
    (tmp_path / "shipped" / "tiny.safetensors").write_bytes(weights.read_bytes() + b" ")
    with pytest.raises(ValueError, match="sha256"):
        checkpoint.resolve_weights("tiny")
    with pytest.raises(FileNotFoundError, match="tiny"):
        checkpoint.resolve_weights("no-such-model")


def test_modes_name_the_two_ends_and_flags_override_them():
    from blinddiff.cli import build_parser, sample_options_from
    from blinddiff.inference import SampleOptions

    assert SampleOptions.for_mode("perceptual") == SampleOptions()
    assert SampleOptions.for_mode("fidelity").steps == 1
    assert SampleOptions.for_mode("fidelity", steps=3).steps == 3
    with pytest.raises(ValueError, match="mode 'sharp'"):
        SampleOptions.for_mode("sharp")
    with pytest.raises(ValueError, match="stepz"):
        SampleOptions.for_mode("fidelity", stepz=3)
    args = build_parser().parse_args(["upscale", "x.png", "--out", "o", "--mode", "fidelity", "--zeta", "7"])
    options = sample_options_from(args)
    assert options.steps == SampleOptions.for_mode("fidelity").steps and options.zeta == 7


def test_deblur_runs_the_shipped_scale_1_model_by_default(tmp_path: Path, capsys) -> None:
    blurry = tmp_path / "in" / "blurry.png"
    blurry.parent.mkdir()
    Image.fromarray(sample_rgb(40, 56)).save(blurry)
    assert main(["deblur", str(blurry), "--out", str(tmp_path / "sharp"), "--steps", "1", "--no-progress"]) == 0
    assert Image.open(tmp_path / "sharp" / "blurry.png").size == (56, 40)  # scale 1: same size
    kernel = np.load(tmp_path / "sharp" / "blurry_kernel.npy")
    assert kernel.shape == (64, 64) and abs(kernel.sum() - 1) < 1e-3
    # A ×4 model is refused with the fix named, and nothing is written.
    assert main(["deblur", str(blurry), "--out", str(tmp_path / "x4"), "--weights", "fast-x4", "--no-progress"]) == 2
    assert "deblur-motion" in capsys.readouterr().err and not (tmp_path / "x4").exists()
