"""The measurement scripts of benchmarks/ that docs/results.md relies on, run on tiny data and weights."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import one_image_testset, peers_installed, run_cli, run_script, sample_rgb, write_niqe_params

REPO = Path(__file__).resolve().parents[1]


def test_sampler_sweep_runs_one_factor_at_a_time(weights: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    one_image_testset(tmp_path, "set", "iso:2.0", 4, kernel_size=11)
    args = ["--benchmark", str(tmp_path / "set"), "--out", str(tmp_path / "sweep"), "--weights", str(weights),
            "--steps", "1,2", "--zetas", "0,1", "--gradients", "x0", "--base-steps", "1", "--base-zeta", "1",
            "--base-gradient", "x0", "--device", "cpu"]
    assert run_script("sampler_sweep.py", *args, monkeypatch=monkeypatch) == 0
    rows = (tmp_path / "sweep" / "sweep.md").read_text().splitlines()[2:]
    # steps 1 and 2 at ζ 1; ζ 0 at 1 step (ζ 1 at 1 step only once); DDIM at the base
    assert [row.split(" | ")[0] for row in rows] == ["| ddpm 1 steps, ζ 1, grad x0", "| ddpm 2 steps, ζ 1, grad x0",
                                                       "| ddpm 1 steps, ζ 0, grad x0", "| ddim 1 steps, ζ 1, grad x0"]
    assert len(list((tmp_path / "sweep").glob("*/results.json"))) == 4


def test_real_noref_scores_both_methods_and_resumes(weights: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    photos = tmp_path / "real"
    photos.mkdir()
    Image.fromarray(sample_rgb(24, 48)).save(photos / "wide.png")
    Image.fromarray(sample_rgb(48, 24, "coffee")).save(photos / "tall.jpg")
    Image.fromarray(sample_rgb(64, 64, "chelsea")).save(photos / "large.png")
    (photos / "broken.png").write_bytes(b"not an image")
    params = write_niqe_params(tmp_path / "niqe.npz", 96)
    out = tmp_path / "out"
    args = ["--images", str(photos), "--out", str(out), "--niqe-params", str(params), "--weights", str(weights),
            "--steps", "1", "--max-lr-pixels", "2000"]
    assert run_script("real_noref.py", *args, monkeypatch=monkeypatch) == 1  # the broken file is reported
    results = json.loads((out / "results.json").read_text())
    assert results["skipped"] == ["large.png"]
    for method in ("bicubic", "blinddiff"):
        assert [row["name"] for row in results["cases"][method]] == ["tall", "wide"]
        assert all(np.isfinite(row["niqe"]) and 0 <= row["piqe"] <= 100 for row in results["cases"][method])
    assert all(row["seconds"] > 0 for row in results["cases"]["blinddiff"])
    assert (out / "ours" / "wide_kernel.npy").is_file() and (out / "bicubic" / "tall.png").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "ours").iterdir()}
    (photos / "broken.png").unlink()
    assert run_script("real_noref.py", *args, monkeypatch=monkeypatch) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "ours").iterdir()} == stamps  # nothing upscaled again
    assert json.loads((out / "results.json").read_text())["mean"] == results["mean"]


def test_real_noref_refuses_unknown_or_missing_peers(weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    photos = tmp_path / "real"
    photos.mkdir()
    Image.fromarray(sample_rgb(24, 24)).save(photos / "one.png")
    params = write_niqe_params(tmp_path / "niqe.npz", 96)
    args = ["--images", str(photos), "--out", str(tmp_path / "out"), "--niqe-params", str(params),
            "--weights", str(weights)]
    assert run_script("real_noref.py", *args, "--peers", "realesrgan,srmd-gt", monkeypatch=monkeypatch) == 1
    assert "--peers srmd-gt is not a blind ×4 peer" in capsys.readouterr().err
    monkeypatch.setenv("BLINDDIFF_PEERS", str(tmp_path / "no-peers"))
    assert run_script("real_noref.py", *args, "--peers", "realsr", monkeypatch=monkeypatch) == 1
    assert "make peers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.skipif(not peers_installed("realesrgan"), reason="peers not installed (run `make peers`)")
def test_real_noref_scores_the_peers(weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photos = tmp_path / "real"
    photos.mkdir()
    Image.fromarray(sample_rgb(24, 48)).save(photos / "small.png")
    params = write_niqe_params(tmp_path / "niqe.npz", 96)
    out = tmp_path / "out"
    args = ["--images", str(photos), "--out", str(out), "--niqe-params", str(params), "--weights", str(weights),
            "--peers", "realesrgan", "--mode", "fidelity"]
    assert run_script("real_noref.py", *args, monkeypatch=monkeypatch) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["cases"]) == {"bicubic", "blinddiff", "realesrgan"}
    assert results["cases"]["realesrgan"][0]["seconds"] > 0
    assert Image.open(out / "realesrgan" / "small.png").size == (192, 96)


def test_case_figure_shows_a_case_of_a_run(weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    bench = one_image_testset(tmp_path, "set", "iso:2.0", 4, kernel_size=11)
    run = tmp_path / "run"
    assert run_cli("benchmark", "--benchmark", str(bench), "--weights", str(weights), "--out", str(run), "--steps", "1",
                   "--metrics", "psnr", "--trajectory-cases", "0", "--no-progress") == 0
    name = json.loads((bench / "manifest.json").read_text())["cases"][0]["name"]
    out = tmp_path / "figure.png"
    args = [str(run), "--case", name, "--crop", "16", "--out", str(out)]
    assert run_script("case_figure.py", *args, monkeypatch=monkeypatch) == 0
    width, height = Image.open(out).size
    assert width > 2 * height > 0  # one row: LR, bicubic, ours, true kernel given, HR, two kernels
    assert run_script("case_figure.py", *args[:2], "nope", *args[3:], monkeypatch=monkeypatch) == 1
    assert f"--case nope is not a case of {bench}" in capsys.readouterr().err
    assert run_script("case_figure.py", *args, "--methods", "realsr", monkeypatch=monkeypatch) == 1
    assert "--methods realsr: not in" in capsys.readouterr().err


def test_sampling_speed_times_every_variant(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    script = runpy.run_path(str(REPO / "benchmarks" / "sampling_speed.py"))
    rows = script["measure_speed"]("tiny", size=32, steps=2, precisions=("fp32", "bf16"), repeats=1, device="cpu")
    assert [(r["mode"], r["variant"]) for r in rows] == [
        (mode, variant) for mode in ("fp32 eager", "bf16 eager") for variant in script["SPEED_VARIANTS"]]
    assert all(r["seconds"] > 0 and r["peak_mib"] > 0 and r["increase_mib"] >= 0 for r in rows)
    table = script["speed_table"](rows).splitlines()
    assert len(table) == 2 + 8 and table[2].startswith("| fp32 eager | forward |") and "| 1.00 | 1.00 |" in table[2]
    assert run_script("sampling_speed.py", "--configs", "tiny", "--sizes", "32", "--steps", "2", "--modes", "fp32",
                      "--repeats", "1", "--device", "cpu", monkeypatch=monkeypatch) == 0
    out = capsys.readouterr().out
    assert "| fp32 eager | sample (2 steps) |" in out and "guided step" in out


def test_tiling_memory_reports_each_size_with_the_peak_memory_of_its_run(weights: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO / "src"))  # the child process runs this checkout
    markdown = tmp_path / "rows.md"
    assert run_script("tiling_memory.py", "--sizes", "32x24", "40x40", "--weights", str(weights), "--mode", "fidelity",
                      "--flags", "--max-memory 440MiB", "--markdown", str(markdown), monkeypatch=monkeypatch) == 0
    rows = [line for line in markdown.read_text().splitlines() if line.startswith("| 32×24") or
            line.startswith("| 40×40")]
    assert [row.split(" | ")[1] for row in rows] == ["128×96", "160×160"]  # the ×4 outputs were written
    peaks = [float(row.split(" | ")[4].split()[0]) for row in rows]
    assert all(0.05 < peak < 1.5 for peak in peaks)  # the child's RSS in GiB, not this process's or zero
    assert "--max-memory 440MiB" in rows[0]


def test_training_throughput_gives_a_row_per_variant_in_the_chosen_precision(hr_folder: Path,
                                                                              monkeypatch: pytest.MonkeyPatch,
                                                                              capsys: pytest.CaptureFixture) -> None:
    args = ["--presets", "tiny", "--steps", "2", "--crop", "32", "--precision", "fp32",
            "--set", f"data.root={hr_folder}", "--variants", "dw:", "g4:model.mixer_group_width=4 model.ffn_expansion=2.5"]
    assert run_script("training_throughput.py", *args, monkeypatch=monkeypatch) == 0
    out = capsys.readouterr().out
    assert "fp32 roofline: conv3x3_64ch" in out and "MFU (of best fp32 conv roofline)" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| tiny")]
    assert [row[0] for row in rows] == ["| tiny dw", "| tiny g4"]
    (dw_params, dw_gflop), (g4_params, g4_gflop) = ((float(row[1].split()[0]), float(row[5])) for row in rows)
    assert g4_params > dw_params and g4_gflop > dw_gflop  # the grouped 3×3 mixing holds more weights and work
    assert all(float(row[3]) > 0 and 0 < float(row[7].split()[0]) for row in rows)  # patches/s and MFU
    assert run_script("training_throughput.py", "--variants", "no-colon", monkeypatch=monkeypatch) == 2
    assert "LABEL:OVERRIDES" in capsys.readouterr().err
