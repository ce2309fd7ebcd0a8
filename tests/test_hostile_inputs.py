"""Issue 12: never lose a user's file. Every command fed odd files, options and faults, as a hostile user would."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blinddiff import BlindDiff
from blinddiff.cli import main
from conftest import sample_rgb

FAST = ["--steps", "2", "--no-progress"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def save(path: Path, height: int = 12, width: int = 12, which: str = "astronaut") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sample_rgb(height, width, which)).save(path)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, idat: bytes, depth: int = 8) -> bytes:
    """An RGB PNG with any header size, bit depth and IDAT payload, every CRC valid."""
    header = struct.pack(">IIBBBBB", width, height, depth, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def strict_json(text: str) -> object:
    """JSON as other readers take it: a bare NaN or Infinity (which Python writes and reads) is an error."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def model(weights: Path) -> BlindDiff:
    return BlindDiff.from_pretrained(weights, device="cpu")


# ---------------------------------------------------------------- 1, 2: outputs never hit inputs or each other


def test_upscale_never_writes_over_another_input(weights: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "in"
    for name in ("b.jpeg", "b.jpg", "c.tif", "c.png"):
        save(folder / name)
    before = snapshot(folder)
    assert main(["upscale", str(folder), "--out", str(folder), "--weights", str(weights), *FAST]) == 1
    assert snapshot(folder) == before
    err = capsys.readouterr().err
    assert "b.jpeg" in err and "c.tif" in err and "overwrite" in err


def test_upscale_kernel_picture_never_overwrites_an_input(weights: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "in"
    save(folder / "a.png")
    save(folder / "a_kernel.png", which="coffee")
    before = snapshot(folder)
    assert main(["upscale", str(folder), "--out", str(folder), "--suffix", "_x4", "--weights", str(weights),
                 *FAST]) == 1
    assert all(snapshot(folder)[name] == data for name, data in before.items())
    assert (folder / "a_kernel_x4.png").is_file()  # the other input is still processed
    err = capsys.readouterr().err
    assert "a_kernel.png" in err and "a.png" in err


def test_degrade_never_writes_over_another_input(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "in"
    save(folder / "a.jpg", 40, 40)
    save(folder / "a.png", 40, 40, "coffee")
    before = snapshot(folder)
    assert main(["degrade", str(folder), "--out", str(folder), "--kernel", "iso:1.2"]) == 1
    assert snapshot(folder) == before
    assert "a.jpg" in capsys.readouterr().err


def test_colliding_outputs_are_found_before_anything_is_written(weights: Path, tmp_path: Path, capsys) -> None:
    save(tmp_path / "sub1" / "x.png")
    save(tmp_path / "sub2" / "x.png", which="coffee")
    save(tmp_path / "sub2" / "p.png")
    save(tmp_path / "sub2" / "p.webp")
    save(tmp_path / "sub2" / "ok.png")
    out = tmp_path / "out"
    assert main(["upscale", str(tmp_path / "sub1"), str(tmp_path / "sub2"), "--out", str(out),
                 "--weights", str(weights), *FAST]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "sub1" / "x.png") in err and str(tmp_path / "sub2" / "x.png") in err
    assert "p.webp" in err
    assert sorted(p.name for p in out.iterdir()) == ["ok.png", "ok_estimate.json", "ok_kernel.npy", "ok_kernel.png"]


# ---------------------------------------------------------------- 3: make-benchmark never writes inside --hr


def test_make_benchmark_never_writes_inside_hr(tmp_path: Path, capsys) -> None:
    hr = tmp_path / "X" / "HR"
    save(hr / "a.png", 40, 40)
    before = snapshot(hr)
    assert main(["make-benchmark", "--hr", str(hr), "--out", str(tmp_path / "X"), "--force",
                 "--protocol", "iso:1"]) == 2
    assert snapshot(hr) == before and not (tmp_path / "X" / "manifest.json").exists()
    assert "--hr" in capsys.readouterr().err


def test_make_benchmark_force_replaces_only_its_own_files(hr_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "set"
    (out / "HR").mkdir(parents=True)
    (out / "HR" / "camera.png").write_bytes(b"the user's own file")
    assert main(["make-benchmark", "--hr", str(hr_folder), "--out", str(out), "--force", "--protocol", "iso:1"]) == 2
    assert (out / "HR" / "camera.png").read_bytes() == b"the user's own file"
    assert "camera.png" in capsys.readouterr().err
    (out / "HR" / "camera.png").unlink()
    args = ["make-benchmark", "--hr", str(hr_folder), "--out", str(out), "--protocol", "iso:1"]
    assert main([*args, "--force"]) == 0 and main([*args, "--force"]) == 0  # its own set: replaced


# ---------------------------------------------------------------- 4: train validates before writing


def test_train_validates_before_writing_the_run_folder(hr_folder: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    base = ["train", "--config", "tiny", "--no-progress", "--set", f"data.root={hr_folder}", "--set", "train.steps=2",
            "--set", "train.checkpoint_every=2"]
    assert main([*base, "--out", str(run)]) == 0
    before = snapshot(run)
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "--set", "model.width=16"]) == 2
    assert snapshot(run) == before
    assert "model" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("somebody: else\n")
    (other / "log.jsonl").write_text('{"step": 1}\n')
    before = snapshot(other)
    assert main([*base, "--out", str(other)]) == 2
    assert snapshot(other) == before
    assert "config.yaml" in capsys.readouterr().err


def test_train_checks_the_data_before_writing_the_run_folder(hr_folder: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    (tmp_path / "empty").mkdir()
    base = ["train", "--config", "tiny", "--out", str(run), "--no-progress", "--set", "train.steps=1"]
    for root in (tmp_path / "missing", tmp_path / "empty"):
        assert main([*base, "--set", f"data.root={root}"]) == 2
        assert str(root) in capsys.readouterr().err
        assert not run.exists()
    assert main([*base, "--set", f"data.root={hr_folder}"]) == 0  # the corrected command is not "another run's"
    assert (run / "weights.safetensors").is_file()


# ---------------------------------------------------------------- 5: paths from manifests and options stay inside


def write_manifest(root: Path, cases: list[dict], scale=4) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"scale": scale, "cases": cases}))


@pytest.mark.parametrize("case", [
    {"name": "../../../x", "hr": "HR/a.png", "lr": "LR/a.png", "kernel": "k/a.npy"},
    {"name": "a", "hr": "../a.png", "lr": "LR/a.png", "kernel": "k/a.npy"},
    {"name": "a", "hr": "HR/a.png", "lr": "/etc/passwd", "kernel": "k/a.npy"},
    {"name": "a", "hr": "HR/a.png", "lr": "LR/a.png", "kernel": "k/../../a.npy"},
    {"name": None, "hr": "HR/a.png", "lr": "LR/a.png", "kernel": "k/a.npy"},
    {"name": "a", "hr": 5, "lr": "LR/a.png", "kernel": "k/a.npy"},
])
def test_manifest_paths_stay_inside_the_test_set(tmp_path: Path, case: dict) -> None:
    from blinddiff.testsets import load_benchmark

    write_manifest(tmp_path / "set", [case])
    with pytest.raises(ValueError, match="manifest.json"):
        load_benchmark(tmp_path / "set")


def test_manifest_scale_must_be_a_positive_integer(tmp_path: Path) -> None:
    from blinddiff.testsets import load_benchmark

    write_manifest(tmp_path / "set", [{"name": "a", "hr": "HR/a.png", "lr": "LR/a.png", "kernel": "k/a.npy"}],
                   scale=None)
    with pytest.raises(ValueError, match="scale"):
        load_benchmark(tmp_path / "set")


def test_suffix_cannot_leave_the_output_folder(weights: Path, tmp_path: Path, capsys) -> None:
    save(tmp_path / "in" / "a.png")
    assert main(["upscale", str(tmp_path / "in"), "--out", str(tmp_path / "o" / "p"), "--suffix", "/../../x",
                 "--weights", str(weights), *FAST]) == 2
    assert "--suffix" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 6: shipped names win over local files


def test_shipped_model_and_config_names_win_over_local_files(tmp_path: Path, monkeypatch, weights: Path) -> None:
    from blinddiff.config import load_config
    from blinddiff.checkpoint import WEIGHTS_DIR, resolve_weights

    monkeypatch.chdir(tmp_path)
    Path("fast-x4").write_bytes(weights.read_bytes())
    assert resolve_weights("fast-x4").parent == WEIGHTS_DIR
    assert resolve_weights("./fast-x4").resolve() == (tmp_path / "fast-x4").resolve()
    Path("tiny").mkdir()
    assert load_config("tiny").model.width == 8


# ---------------------------------------------------------------- 7: EXIF orientation and metadata


def test_exif_orientation_is_applied_and_metadata_kept(weights: Path, tmp_path: Path) -> None:
    from blinddiff.fileio import load_image

    pixels = sample_rgb(12, 20)  # landscape as stored; orientation 6 = display rotated 90° clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "TestCam"
    path = tmp_path / "in" / "photo.jpg"
    path.parent.mkdir()
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    assert load_image(path).size == (20, 12)
    assert main(["upscale", str(path), "--out", str(tmp_path / "out"), "--weights", str(weights), *FAST]) == 0
    with Image.open(tmp_path / "out" / "photo.jpg") as result:
        assert result.size == (48, 80)
        kept = result.getexif()
        assert kept.get(0x010F) == "TestCam" and kept.get(0x0112, 1) == 1


# ---------------------------------------------------------------- 8: float images, API dtypes and kernels


def test_float_tiff_in_unit_range_is_read_as_is(tmp_path: Path) -> None:
    from blinddiff.fileio import ImageError, load_image

    values = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    Image.fromarray(values, "F").save(tmp_path / "f.tif")
    loaded = load_image(tmp_path / "f.tif")
    assert np.allclose(loaded.rgb[..., 0], values, atol=1e-6) and loaded.grey
    Image.fromarray(values * 1000, "F").save(tmp_path / "big.tif")
    with pytest.raises(ImageError, match="big.tif"):
        load_image(tmp_path / "big.tif")


def test_api_scales_integer_tensors_and_refuses_out_of_range_floats(model: BlindDiff) -> None:
    rgb = torch.from_numpy(sample_rgb(12, 12)).permute(2, 0, 1)
    as_float, _ = model.upscale(rgb.float() / 255, steps=2)
    as_uint8, _ = model.upscale(rgb, steps=2)
    assert as_uint8.dtype == torch.uint8
    assert torch.equal(as_uint8, (as_float * 255).round().to(torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.upscale(sample_rgb(12, 12).astype(np.float32), steps=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.upscale(rgb.float(), steps=2)


@pytest.mark.parametrize("kernel, message", [
    (np.zeros((11, 11)), "sum"), (-np.ones((11, 11)), "negative"), (np.ones((5, 11)), "square"),
    (np.full((11, 11), np.nan), "finite"),
])
def test_api_validates_given_kernels(model: BlindDiff, kernel: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model.upscale(sample_rgb(12, 12), kernel=kernel, steps=2)


def test_api_normalises_a_given_kernel(model: BlindDiff) -> None:
    kernel = np.ones((11, 11))
    a, _ = model.upscale(sample_rgb(12, 12), kernel=kernel, steps=2)
    b, _ = model.upscale(sample_rgb(12, 12), kernel=kernel / kernel.sum(), steps=2)
    assert np.array_equal(a, b)


# ---------------------------------------------------------------- 9: non-finite results are errors


def test_non_finite_results_are_errors_naming_the_input(weights: Path, tmp_path: Path, capsys) -> None:
    path = save(tmp_path / "in" / "a.png")
    assert main(["upscale", str(path), "--out", str(tmp_path / "out"), "--weights", str(weights), "--zeta", "1e30",
                 *FAST]) == 1
    assert str(path) in capsys.readouterr().err
    assert not (tmp_path / "out" / "a.png").exists()


def test_weights_with_nan_are_refused(weights: Path, tmp_path: Path) -> None:
    from blinddiff.checkpoint import load_weights, save_weights

    tensors, cfg, _ = load_weights(weights)
    save_weights(tmp_path / "nan.safetensors", {k: torch.full_like(v, math.nan) for k, v in tensors.items()}, cfg)
    with pytest.raises(ValueError, match="nan.safetensors"):
        BlindDiff.from_pretrained(tmp_path / "nan.safetensors", device="cpu")


# ---------------------------------------------------------------- 10: training that diverges stops; config ranges


def test_training_with_a_diverging_loss_stops(hr_folder: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--out", str(run), "--no-progress", "--set", f"data.root={hr_folder}",
                 "--set", "train.lr=1e9", "--set", "train.steps=30", "--set", "train.checkpoint_every=100"]) == 1
    assert "not finite" in capsys.readouterr().err
    assert not (run / "weights.safetensors").exists()
    log = [strict_json(line) for line in (run / "log.jsonl").read_text().splitlines()]  # no bare NaN in the log
    assert any(record.get("skipped_loss", 0.0) is None for record in log)


@pytest.mark.parametrize("override", ["train.lr=inf", "train.lr=nan", "train.lr=-1", "train.warmup_steps=-5",
                                      "train.log_every=0", "train.ema_decay=1.5", "train.grad_clip=-1",
                                      "train.spike_factor=-1", "train.lr_gamma=0", "train.adam_betas=[0.9, 1.5]",
                                      "data.noise=-0.1", "data.workers=-1", "train.lr_milestones=[-3]",
                                      "diffusion.kernel_loss_weight=nan", "model.ffn_expansion=inf"])
def test_config_numbers_are_range_checked(override: str) -> None:
    from blinddiff.config import load_config

    key = override.split("=")[0]
    with pytest.raises(ValueError, match=key.split(".")[-1]):
        load_config("tiny", [override])


# ---------------------------------------------------------------- 11: benchmark resume covers case content


def test_benchmark_resume_refuses_a_test_set_rebuilt_with_other_content(hr_folder: Path, tmp_path: Path,
                                                                         weights: Path) -> None:
    from blinddiff.evaluation import BenchmarkSettings, run_benchmark
    from blinddiff.inference import SampleOptions
    from blinddiff.metrics import build_metric_suite

    assert main(["make-benchmark", "--hr", str(hr_folder), "--out", str(tmp_path / "set"), "--protocol", "iso:1"]) == 0
    settings = BenchmarkSettings(baselines=(), limit=1, trajectory_cases=0, report_cases=0)

    def run() -> None:
        run_benchmark(tmp_path / "set", weights, tmp_path / "run", options=SampleOptions(steps=1), settings=settings,
                      suite=build_metric_suite(["psnr"]), device="cpu", log=lambda message: None)

    run()
    lr = next((tmp_path / "set" / "LR").iterdir())  # same names and manifest, other pixels
    Image.fromarray(255 - np.asarray(Image.open(lr))).save(lr)
    with pytest.raises(ValueError, match="cases_sha256"):
        run()


def test_benchmark_resume_scores_a_nan_record_again(hr_folder: Path, tmp_path: Path, weights: Path) -> None:
    from blinddiff.evaluation import BenchmarkSettings, run_benchmark
    from blinddiff.inference import SampleOptions
    from blinddiff.metrics import build_metric_suite

    assert main(["make-benchmark", "--hr", str(hr_folder), "--out", str(tmp_path / "set"), "--protocol", "iso:1"]) == 0
    settings = BenchmarkSettings(baselines=(), limit=1, trajectory_cases=0, report_cases=0)

    def run() -> dict:
        run_benchmark(tmp_path / "set", weights, tmp_path / "run", options=SampleOptions(steps=1), settings=settings,
                      suite=build_metric_suite(["psnr", "ssim"]), device="cpu", log=lambda message: None)
        return strict_json((tmp_path / "run" / "results.json").read_text())["methods"]["blinddiff"]["cases"][0]

    first = run()
    record_path = next((tmp_path / "run" / "blinddiff" / "records").iterdir())
    record = json.loads(record_path.read_text())
    record["metrics"]["psnr"], record["seconds"] = math.nan, math.inf
    record_path.write_text(json.dumps(record))  # as Python writes it: a bare NaN and Infinity
    again = run()
    assert again["psnr"] == first["psnr"] and math.isfinite(again["psnr"]) and again["ssim"] == first["ssim"]
    assert strict_json(record_path.read_text())["metrics"]["psnr"] == first["psnr"]


# ---------------------------------------------------------------- 12: kernel sizes


def test_rectangular_kernel_files_and_zero_sizes_are_refused(hr_folder: Path, tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "k.npy", np.ones((5, 11)))
    out = str(tmp_path / "out")
    assert main(["degrade", str(hr_folder), "--out", out, "--kernel", str(tmp_path / "k.npy")]) == 2
    assert "k.npy" in capsys.readouterr().err
    for size in ("0", "-3", "100001"):
        assert main(["degrade", str(hr_folder), "--out", out, "--kernel", "iso:1", "--kernel-size", size]) == 2
        assert "--kernel-size" in capsys.readouterr().err
    assert main(["make-benchmark", "--hr", str(hr_folder), "--out", out, "--kernel-size", "0"]) == 2
    assert main(["info", "--config", "tiny", "--size", "0"]) == 2
    assert "--size" in capsys.readouterr().err
    assert not Path(out).exists()


# ---------------------------------------------------------------- 13, 14: pipes, full disks, odd output paths


class ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_pipe_does_not_stop_the_work(hr_folder: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdout", ClosedPipe())
    assert main(["make-benchmark", "--hr", str(hr_folder), "--out", str(tmp_path / "set"), "--protocol", "iso:1"]) == 0
    assert len(json.loads((tmp_path / "set" / "manifest.json").read_text())["cases"]) == 2


def test_write_failures_are_per_input(weights: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from blinddiff import fileio

    for name in ("a", "b", "c"):
        save(tmp_path / "in" / f"{name}.png")
    out = tmp_path / "out"
    (out / "a.png").mkdir(parents=True)  # an output name that is a folder
    real = fileio.write_pixels

    def disk_full(path, *args, **kwargs):
        if Path(path).name == "b.png":
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fileio, "write_pixels", disk_full)
    assert main(["upscale", str(tmp_path / "in"), "--out", str(out), "--weights", str(weights), *FAST]) == 1
    err = capsys.readouterr().err
    assert "a.png" in err and "No space left" in err
    assert (out / "c.png").is_file() and not (out / "b.png").exists()


def test_out_below_a_file_fails_before_sampling(weights: Path, tmp_path: Path, capsys) -> None:
    save(tmp_path / "in" / "a.png")
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert main(["upscale", str(tmp_path / "in"), "--out", str(out), "--weights", str(weights), *FAST]) == 2
        assert "--out" in capsys.readouterr().err


# ---------------------------------------------------------------- 15: kernel files and weights that are not


@pytest.mark.parametrize("name, content", [("k.npy", b""), ("k.mat", b""), ("k.mat", b"just text, not MATLAB\n"),
                                           ("k.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '<f8', 'fortran_order'")])
def test_broken_kernel_files_are_one_line_errors(tmp_path: Path, name: str, content: bytes) -> None:
    from blinddiff.kernels import load_kernel

    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=name):
        load_kernel(tmp_path / name)


def test_truncated_mat_file_is_a_one_line_error(tmp_path: Path) -> None:
    import scipy.io

    from blinddiff.kernels import load_kernel

    scipy.io.savemat(tmp_path / "k.mat", {"kernel": np.ones((21, 21))})
    data = (tmp_path / "k.mat").read_bytes()
    (tmp_path / "k.mat").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="k.mat"):
        load_kernel(tmp_path / "k.mat")


def test_a_kernel_whose_sum_overflows_is_named_so(hr_folder: Path, tmp_path: Path, capsys) -> None:
    import warnings

    np.save(tmp_path / "k.npy", np.full((5, 5), 1e308))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reason is the message, not a numpy overflow warning
        assert main(["degrade", str(hr_folder), "--out", str(tmp_path / "out"), "--kernel", str(tmp_path / "k.npy")]) == 2
    err = capsys.readouterr().err
    assert "k.npy" in err and "overflow" in err and "sums to 0" not in err


def rewrite_metadata(source: Path, target: Path, config_text: str) -> None:
    from safetensors.torch import load_file, save_file

    save_file(load_file(source), target, metadata={"format": "blinddiff-weights-1", "config": config_text})


@pytest.mark.parametrize("config_text", ["null", "[1, 2]", "{not json", "WIDTH"])
def test_weights_with_bad_metadata_are_named(weights: Path, tmp_path: Path, config_text: str) -> None:
    from blinddiff.checkpoint import load_weights

    if config_text == "WIDTH":
        data = load_weights(weights)[1]
        from blinddiff.config import config_to_dict

        cfg = config_to_dict(data)
        cfg["model"]["width"] = 1_000_000
        config_text = json.dumps(cfg)
    rewrite_metadata(weights, tmp_path / "bad.safetensors", config_text)
    with pytest.raises(ValueError, match="bad.safetensors"):
        BlindDiff.from_pretrained(tmp_path / "bad.safetensors", device="cpu")


@pytest.mark.parametrize("damage, message", [("3 GiB", "GiB"), ("truncated", "file holds"),
                                             ("size field", "header size field"), ("padded", "file holds")])
def test_weights_are_checked_by_their_header_before_any_tensor_is_read(weights: Path, tmp_path: Path,
                                                                       monkeypatch, damage: str, message: str) -> None:
    path = tmp_path / "w.safetensors"
    data = weights.read_bytes()
    if damage == "3 GiB":
        with open(path, "wb") as handle:
            handle.truncate(3 * 2**30)  # sparse: no disk used
    else:
        path.write_bytes({"truncated": data[: len(data) - 100], "size field": b"\xff" * 8 + data[8:],
                          "padded": data + b"\0" * 100}[damage])

    def read_whole(self: Path) -> bytes:
        raise AssertionError(f"{self} read whole")

    monkeypatch.setattr(Path, "read_bytes", read_whole)
    with pytest.raises(ValueError, match=message) as error:
        BlindDiff.from_pretrained(path, device="cpu")
    assert str(path) in str(error.value)
    assert BlindDiff.from_pretrained(weights, device="cpu").scale == 4  # intact weights still load, not read whole


class Boom:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("content", [b"", b"plain text", pickle.dumps(Boom())])
def test_bad_pt_weights_are_refused_safely(tmp_path: Path, content: bytes, capsys) -> None:
    (tmp_path / "w.pt").write_bytes(content)
    with pytest.raises(ValueError, match="w.pt") as error:
        BlindDiff.from_pretrained(tmp_path / "w.pt", device="cpu", allow_pickle=True, config="tiny")
    assert "weights_only=False" not in str(error.value) and "pwned" not in capsys.readouterr().out


# ---------------------------------------------------------------- 16: training data and run folders


def test_training_images_are_decoded_up_front(tmp_path: Path) -> None:
    from blinddiff.data import HRPatches
    from blinddiff.fileio import ImageError

    folder = tmp_path / "data"
    save(folder / "good.png", 40, 40)
    rows = b"".join(b"\x09" + bytes(40 * 3) for _ in range(40))  # filter type 9 does not exist
    (folder / "corrupt.png").write_bytes(crafted_png(40, 40, zlib.compress(rows)))
    (folder / "bomb.png").write_bytes(crafted_png(30000, 30000, zlib.compress(b"\x00" * 1000)))
    with pytest.raises(ImageError) as error:
        HRPatches(folder, 32)
    assert "corrupt.png" in str(error.value) and "bomb.png" in str(error.value)
    with pytest.warns(UserWarning):
        patches = HRPatches(folder, 32, skip_bad=True)
    assert [p.name for p in patches.files] == ["good.png"]


def test_config_file_errors(tmp_path: Path) -> None:
    from blinddiff.config import load_config

    (tmp_path / "a.yaml").write_text(f"base: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"base: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ValueError, match="a.yaml"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(str(tmp_path / "bad.yaml"))


def test_init_from_another_architecture_is_named(hr_folder: Path, tmp_path: Path, weights: Path, capsys) -> None:
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "run"), "--no-progress",
                 "--set", f"data.root={hr_folder}", "--set", "model.width=16",
                 "--set", f"train.init_from={weights}"]) == 2
    assert str(weights) in capsys.readouterr().err


def test_resume_skips_a_truncated_checkpoint_and_cleans_temporaries(hr_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", "--config", "tiny", "--out", str(run), "--no-progress", "--set", f"data.root={hr_folder}",
            "--set", "train.steps=4", "--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=3"]
    assert main(args) == 0
    shard = run / "checkpoints" / "step_00000004-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    killed_while_writing(run / "checkpoints" / "step_00000006.index.json", run / "weights.safetensors")
    assert len(list(run.rglob("*.tmp"))) == 2
    assert main(["train", "--out", str(run), "--resume", "--no-progress", "--set", "train.steps=6"]) == 0
    assert not list(run.rglob("*.tmp"))
    assert (run / "checkpoints" / "step_00000006.index.json").is_file()


# ---------------------------------------------------------------- 17: evaluate with odd files


def test_evaluate_with_a_wrong_niqe_file_is_one_line(tmp_path: Path, capsys) -> None:
    save(tmp_path / "set" / "HR" / "a.png", 48, 48)
    save(tmp_path / "set" / "LR" / "a.png")
    np.save(tmp_path / "set" / "a.npy", np.ones((3, 3)) / 9)
    write_manifest(tmp_path / "set", [{"name": "a", "hr": "HR/a.png", "lr": "LR/a.png", "kernel": "a.npy"}])
    np.save(tmp_path / "x.npy", np.ones(3))
    (tmp_path / "sr").mkdir()
    assert main(["evaluate", "--benchmark", str(tmp_path / "set"), "--sr", str(tmp_path / "sr"), "--metrics", "niqe",
                 "--niqe-params", str(tmp_path / "x.npy")]) == 2
    assert "x.npy" in capsys.readouterr().err


@pytest.mark.parametrize("estimate, message", [(np.ones((5, 5)), "sums to 25"), (-np.eye(5) / 5 + 0.08, "negative"),
                                               (np.full((5, 5), np.inf), "non-finite")])
def test_evaluate_scores_only_estimates_that_are_kernels(tmp_path: Path, capsys, estimate: np.ndarray,
                                                         message: str) -> None:
    save(tmp_path / "set" / "HR" / "a.png", 48, 48)
    save(tmp_path / "set" / "LR" / "a.png")
    np.save(tmp_path / "set" / "a.npy", np.ones((3, 3)) / 9)
    write_manifest(tmp_path / "set", [{"name": "a", "hr": "HR/a.png", "lr": "LR/a.png", "kernel": "a.npy"}])
    save(tmp_path / "sr" / "a.png", 48, 48, "coffee")
    args = ["evaluate", "--benchmark", str(tmp_path / "set"), "--sr", str(tmp_path / "sr"), "--metrics",
            "psnr,kernel_l1"]
    np.save(tmp_path / "sr" / "a_kernel.npy", estimate)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "a_kernel.npy" in err and message in err
    assert json.loads((tmp_path / "sr" / "metrics.json").read_text())["cases"] == []
    np.save(tmp_path / "sr" / "a_kernel.npy", np.ones((5, 5), np.float32) / 25)  # float32 rounding is fine
    assert main(args) == 0
    assert json.loads((tmp_path / "sr" / "metrics.json").read_text())["cases"][0]["kernel_l1"] > 0


# ---------------------------------------------------------------- 18: global options checked once, up front


@pytest.mark.parametrize("option", [["--steps", "0"], ["--zeta", "nan"], ["--tile", "4"], ["--seed", str(2**70)],
                                    ["--eta", "-1"], ["--tile-overlap", "-4", "--tile", "64"]])
def test_bad_sampling_options_fail_once_up_front(weights: Path, tmp_path: Path, capsys, option: list[str]) -> None:
    for name in ("a", "b"):
        save(tmp_path / "in" / f"{name}.png")
    assert main(["upscale", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--weights", str(weights),
                 *FAST, *option]) == 2
    err = capsys.readouterr().err
    assert err.count("error") == 1 and option[0].lstrip("-").split("-")[0] in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 19: headers first, one batch decoded at a time


def test_sizes_come_from_headers_and_images_are_decoded_per_batch(weights: Path, tmp_path: Path, capsys,
                                                                   monkeypatch) -> None:
    from blinddiff import fileio, inference

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "huge.png").write_bytes(crafted_png(3000, 3000, zlib.compress(b"\x00" * 100)))
    for name in ("a", "b", "c"):
        save(tmp_path / "in" / f"{name}.png")
    events: list[str] = []
    real_load, real_run = fileio.load_image, inference.BlindDiff.stream
    monkeypatch.setattr(fileio, "load_image", lambda path: events.append(f"load {Path(path).stem}") or real_load(path))

    def run(self, lr, *args, **kwargs):
        events.append("run")
        return real_run(self, lr, *args, **kwargs)

    monkeypatch.setattr(inference.BlindDiff, "stream", run)
    assert main(["upscale", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--weights", str(weights),
                 *FAST]) == 1
    assert "huge.png" in capsys.readouterr().err  # its data end early: refused by name, after the others
    assert events[:6] == ["load a", "run", "load b", "run", "load c", "run"] and "run" not in events[6:]


@pytest.mark.parametrize("content", [b"", pickle.dumps(Boom())])
def test_evaluate_with_bad_lpips_weights_is_one_line(tmp_path: Path, content: bytes, capsys) -> None:
    (tmp_path / "vgg.pth").write_bytes(content)
    (tmp_path / "lin.pth").write_bytes(content)
    write_manifest(tmp_path / "set", [{"name": "a", "hr": "HR/a.png", "lr": "LR/a.png", "kernel": "a.npy"}])
    (tmp_path / "sr").mkdir()
    assert main(["evaluate", "--benchmark", str(tmp_path / "set"), "--sr", str(tmp_path / "sr"), "--metrics", "lpips",
                 "--lpips-backbone", str(tmp_path / "vgg.pth"), "--lpips-linear", str(tmp_path / "lin.pth")]) == 2
    captured = capsys.readouterr()
    assert "vgg.pth" in captured.err and "weights_only=False" not in captured.err and "pwned" not in captured.out


def test_benchmark_checks_sampling_options_up_front(hr_folder: Path, tmp_path: Path, weights: Path, capsys) -> None:
    assert main(["make-benchmark", "--hr", str(hr_folder), "--out", str(tmp_path / "set"), "--protocol", "iso:1",
                 "--kernel-size", "11"]) == 0
    capsys.readouterr()
    assert main(["benchmark", "--benchmark", str(tmp_path / "set"), "--out", str(tmp_path / "run"), "--weights",
                 str(weights), "--steps", "0", "--no-progress"]) == 2
    assert capsys.readouterr().err.count("steps") == 1
    assert not (tmp_path / "run").exists()  # refused before any case ran


# ---------------------------------------------------------------- 20: file input and output of upscale / make-benchmark


def killed_while_writing(*paths: Path) -> None:
    """Start an `atomic_write` of each path in a child process that is then killed with SIGKILL, as a user's
    kill -9 would: what it leaves behind is exactly what a real interrupted run leaves."""
    import blinddiff

    code = ("import os, signal, sys\nfrom blinddiff.fileio import atomic_write\nwrites = []\n"
            "for path in sys.argv[1:]:\n    writes.append(atomic_write(path))\n"
            "    writes[-1].__enter__().write(b'half')\nos.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(blinddiff.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code, *map(str, paths)], env=env, capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()


@pytest.mark.parametrize("name", ["a.jpg", "a.png"])
def test_an_output_cut_short_by_a_full_disk_fails_that_input(weights: Path, tmp_path: Path, capsys, monkeypatch,
                                                             name: str) -> None:
    resource = pytest.importorskip("resource")
    from blinddiff import fileio

    save(tmp_path / "in" / name, 24, 24)
    out = tmp_path / "out"
    real = fileio.write_pixels  # every result image is written through it

    def nearly_full_disk(path, *args, **kwargs):  # the kernel: writes past 1000 bytes fail (EFBIG), part-way
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
        try:
            return real(path, *args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, ignored)

    monkeypatch.setattr(fileio, "write_pixels", nearly_full_disk)
    assert main(["upscale", str(tmp_path / "in"), "--out", str(out), "--weights", str(weights), *FAST]) == 1
    assert name in capsys.readouterr().err
    assert not (out / name).exists() and not list(out.glob(".*.tmp"))  # nothing truncated committed or left


def truncated_images(folder: Path) -> list[Path]:
    """PNGs whose headers say 100×100 but whose (valid, complete) compressed data hold 10 rows: 8 and 16 bits."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, depth in (("short.png", 8), ("short16.png", 16)):
        rows = b"".join(b"\x00" + bytes([200]) * (100 * 3 * depth // 8) for _ in range(10))
        (folder / name).write_bytes(crafted_png(100, 100, zlib.compress(rows), depth))
    return [folder / "short.png", folder / "short16.png"]


def test_truncated_images_are_refused_everywhere(weights: Path, hr_folder: Path, tmp_path: Path, capsys) -> None:
    from blinddiff.fileio import ImageError, load_image

    bad = truncated_images(tmp_path / "bad")
    for path in bad:
        with pytest.raises(ImageError, match=rf"{path.name}: truncated"):
            load_image(path)
    assert main(["upscale", *map(str, bad), "--out", str(tmp_path / "out"), "--weights", str(weights), *FAST]) == 1
    err = capsys.readouterr().err
    assert all(f"{path}: truncated" in err for path in bad) and not (tmp_path / "out" / "short.png").exists()
    for path in bad:  # as ground truth of a test set, next to good images
        shutil.copy(path, hr_folder / path.name)
    out = tmp_path / "set"
    assert main(["make-benchmark", "--hr", str(hr_folder), "--out", str(out), "--protocol", "iso:1"]) == 1
    err = capsys.readouterr().err
    assert all(f"{path.name}: truncated" in err for path in bad)
    assert {case["hr"] for case in json.loads((out / "manifest.json").read_text())["cases"]} == {
        "HR/astronaut.png", "HR/camera.png"}
    sr = tmp_path / "sr"  # and as a result to score
    sr.mkdir()
    for case in json.loads((out / "manifest.json").read_text())["cases"]:
        shutil.copy(bad[0], sr / f"{case['name']}.png")
    assert main(["evaluate", "--benchmark", str(out), "--sr", str(sr), "--metrics", "psnr"]) == 1
    assert "truncated" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", ["_kernel", "_KERNEL"])
def test_a_suffix_naming_results_like_their_kernel_files_is_refused(weights: Path, tmp_path: Path, capsys,
                                                                    suffix: str) -> None:
    save(tmp_path / "in" / "a.png")
    assert main(["upscale", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--suffix", suffix,
                 "--weights", str(weights), *FAST]) == 2
    assert "--suffix" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_outputs_are_never_taken_as_inputs(weights: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "in"
    for name in ("a", "b"):
        save(folder / f"{name}.png")
    inside = ["upscale", str(folder), "--out", str(folder / "x4"), "--weights", str(weights), *FAST]
    assert main(inside) == 0
    first = snapshot(folder)
    capsys.readouterr()
    assert main(inside) == 0  # the outputs in in/x4 are not inputs: same files, rewritten
    assert snapshot(folder).keys() == first.keys()
    assert "skipped" in capsys.readouterr().err
    same = ["upscale", str(folder), "--out", str(folder), "--suffix", "_x4", "--save-trajectory",
            "--weights", str(weights), *FAST]
    assert main(same) == 0
    first = sorted(snapshot(folder))
    capsys.readouterr()
    assert main(same) == 0 and main(["upscale", str(folder / "*.png"), *same[2:]]) == 0
    assert sorted(snapshot(folder)) == first and not (folder / "a_x4_x4.png").exists()
    err = capsys.readouterr().err
    assert err.count("blinddiff: warning: skipped") == 2 and "a_kernel.png" in err
    assert main(["upscale", str(folder / "a_x4.png"), "--out", str(tmp_path / "x16"), "--weights", str(weights),
                 *FAST]) == 0  # a result named on its own is taken (e.g. to upscale it again)
    assert (tmp_path / "x16" / "a_x4.png").is_file()


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made unwritable: immutable for root (whom permissions do not stop), else mode 0555."""
    folder.mkdir(parents=True, exist_ok=True)
    root = os.geteuid() == 0
    if root and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root and chattr +i is not available here, so no folder is read-only")
    if not root:
        folder.chmod(0o555)
    try:
        yield folder
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)


def test_a_read_only_out_fails_before_the_model_runs(weights: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from blinddiff import inference

    save(tmp_path / "in" / "a.png")
    runs: list[int] = []

    def run(self, lr, *args, **kwargs):
        runs.append(1)
        raise RuntimeError("the model ran")

    monkeypatch.setattr(inference.BlindDiff, "run", run)
    with read_only(tmp_path / "locked") as locked:
        for out in (locked, locked / "new"):
            assert main(["upscale", str(tmp_path / "in"), "--out", str(out), "--weights", str(weights), *FAST]) == 2
            err = capsys.readouterr().err
            assert f"--out {out}" in err and "not writable" in err
        assert main(["make-benchmark", "--hr", str(tmp_path / "in"), "--out", str(locked / "set"),
                     "--protocol", "iso:1"]) == 2
        assert "not writable" in capsys.readouterr().err
    assert runs == []


def test_temporaries_of_killed_runs_are_cleaned_and_nothing_else(weights: Path, hr_folder: Path, tmp_path: Path,
                                                                  capsys) -> None:
    from blinddiff.fileio import atomic_write

    save(tmp_path / "in" / "a.png")
    out, testset = tmp_path / "out", tmp_path / "set"
    assert main(["make-benchmark", "--hr", str(hr_folder), "--out", str(testset), "--protocol", "iso:1"]) == 0
    killed_while_writing(out / "a.png", out / "a_kernel.npy", testset / "HR" / "camera.png", testset / "manifest.json")
    (out / ".notes.tmp").write_text("the user's")  # not blinddiff's temporary files: never removed
    (out / ".a.png.k2j4x9ab.tmp").write_text("the user's too")
    with atomic_write(out / "b.png") as handle:  # a write in progress (this process): kept
        handle.write(b"in progress")
        assert main(["upscale", str(tmp_path / "in"), "--out", str(out), "--weights", str(weights), *FAST]) == 0
        left = {p.name for p in out.glob(".*.tmp")}
        assert len(left) == 3 and {".a.png.k2j4x9ab.tmp", ".notes.tmp"} < left and len(list(out.glob(".b.png.*"))) == 1
    assert (out / "b.png").read_bytes() == b"in progress"
    assert main(["make-benchmark", "--hr", str(hr_folder), "--out", str(testset), "--protocol", "iso:1",
                 "--force"]) == 0
    assert not list(testset.rglob("*.tmp"))


@pytest.mark.parametrize("name", ["anim.gif", "anim.webp", "pages.tif", "anim.png"])
def test_animated_and_multi_page_images_warn_that_only_the_first_frame_is_used(tmp_path: Path, name: str) -> None:
    from blinddiff.fileio import load_image

    first, second = Image.fromarray(sample_rgb(12, 12)), Image.fromarray(sample_rgb(12, 12, "coffee"))
    first.save(tmp_path / name, save_all=True, append_images=[second])
    with pytest.warns(UserWarning, match=rf"{name}: holds 2 frames.*only the first"):
        loaded = load_image(tmp_path / name)
    assert loaded.size == (12, 12)


def test_input_warnings_are_one_line_on_the_command_line(weights: Path, tmp_path: Path, capsys) -> None:
    Image.fromarray(sample_rgb(12, 12)).save(tmp_path / "anim.gif", save_all=True,
                                             append_images=[Image.fromarray(sample_rgb(12, 12, "coffee"))])
    rgba = np.dstack([sample_rgb(12, 12), np.full((12, 12), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    out = tmp_path / "out"
    assert main(["upscale", str(tmp_path / "anim.gif"), str(tmp_path / "alpha.png"), "--ext", "jpg", "--out", str(out),
                 "--weights", str(weights), *FAST]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 2 and all(line.startswith("blinddiff: warning: ") for line in warnings)
    assert "anim.gif" in warnings[0] and "first" in warnings[0]
    assert str(out / "alpha.jpg") in warnings[1] and "alpha" in warnings[1] and "--ext png" in warnings[1]
    with Image.open(out / "alpha.jpg") as result:
        assert result.mode == "RGB"


def test_input_discovery_and_planning_are_linear(model: BlindDiff, tmp_path: Path, monkeypatch) -> None:
    import pathlib

    from blinddiff.batch import upscale_files
    from blinddiff.inference import SampleOptions

    count = 3000
    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(count):
        (folder / f"{index:05d}.png").touch()
    comparisons = 0
    equal = pathlib.PurePath.__eq__

    def counted(self, other):
        nonlocal comparisons
        comparisons += 1
        return equal(self, other)

    monkeypatch.setattr(pathlib.PurePath, "__eq__", counted)
    problems = upscale_files(model, [str(folder), str(folder / "*.png")], tmp_path / "out", SampleOptions(steps=2),
                             progress=False, log=lambda line: None)
    monkeypatch.undo()
    assert len(problems) == count and all("empty" in p or "not a readable image" in p for p in problems)
    assert comparisons < 30 * count  # a few per file; a search through the files found so far makes millions


def test_a_fifo_named_like_an_image_is_refused_not_waited_on(weights: Path, tmp_path: Path, capsys) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    good = save(tmp_path / "in" / "a.png")
    stop = threading.Event()

    def unblock_readers() -> None:  # so that a reader that opened the FIFO gets end-of-file, not a hang
        while not stop.wait(0.1):
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=unblock_readers, daemon=True)
    thread.start()
    try:
        assert main(["upscale", str(fifo), str(good), "--out", str(tmp_path / "out"), "--weights", str(weights),
                     *FAST]) == 1
    finally:
        stop.set()
        thread.join()
    assert f"{fifo}: not a regular file" in capsys.readouterr().err
    assert (tmp_path / "out" / "a.png").is_file()


@pytest.mark.parametrize("image", [np.zeros((0, 0, 3), np.uint8), np.zeros((0, 7), np.float32),
                                   torch.zeros(3, 0, 5), torch.zeros(0, 3, 8, 8)])
def test_api_refuses_empty_images_clearly(model: BlindDiff, image) -> None:
    with pytest.raises(ValueError, match="empty"):
        model.upscale(image, steps=2)


def test_api_errors_name_api_parameters_and_the_cli_its_flags(tmp_path: Path, capsys) -> None:
    from blinddiff.config import load_config
    from blinddiff.model import MCFormer

    pt = tmp_path / "tiny.pt"
    torch.save(MCFormer(load_config("tiny").model).state_dict(), pt)
    with pytest.raises(ValueError, match="allow_pickle=True") as error:
        BlindDiff.from_pretrained(pt, device="cpu")
    assert "--" not in str(error.value)
    with pytest.raises(ValueError, match="config=") as error:
        BlindDiff.from_pretrained(pt, device="cpu", allow_pickle=True)
    assert "--" not in str(error.value)
    save(tmp_path / "a.png")
    run = ["upscale", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--weights", str(pt), *FAST]
    assert main(run) == 2
    assert "pass --allow-pickle to read it" in capsys.readouterr().err
    assert main([*run, "--allow-pt"]) == 2
    assert "pass --config PRESET_OR_FILE" in capsys.readouterr().err


def test_the_failure_summary_is_true(weights: Path, tmp_path: Path, capsys) -> None:
    for name in ("x", "y"):
        (tmp_path / "bad" / f"{name}.png").parent.mkdir(exist_ok=True)
        (tmp_path / "bad" / f"{name}.png").touch()
    good = save(tmp_path / "good" / "a.png")
    run = ["--out", str(tmp_path / "out"), "--weights", str(weights), *FAST]
    assert main(["upscale", str(tmp_path / "bad"), *run]) == 1
    err = capsys.readouterr().err
    assert "all 2 inputs failed" in err and "processed" not in err
    assert main(["upscale", str(tmp_path / "bad" / "x.png"), *run]) == 1
    assert "failed" not in capsys.readouterr().err  # one input: its error says it all
    assert main(["upscale", str(tmp_path / "bad" / "x.png"), str(good), *run]) == 1
    assert "1 of 2 inputs failed (see above); the other was processed" in capsys.readouterr().err
