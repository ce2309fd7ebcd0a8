"""The evaluation suite: `evaluate` and `benchmark` (report, resume, torchrun), with a tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blinddiff import evaluation
from blinddiff.degradation import upsample_bicubic
from blinddiff.fileio import read_rgb, rgb_to_tensor, tensor_to_rgb
from blinddiff.metrics import LPIPS, build_metric_suite, psnr, ssim
from blinddiff.testsets import build_testset
from conftest import metric_weights_installed, one_image_testset, run_cli, sample_options, sample_rgb

REPO = Path(__file__).resolve().parents[1]


LPIPS_INSTALLED = metric_weights_installed("vgg")  # by `make metric-weights`; then LPIPS-VGG is a default metric
needs_lpips_vgg = pytest.mark.skipif(not LPIPS_INSTALLED,
                                     reason="LPIPS-VGG weights not installed; run `make metric-weights`")
needs_metric_weights = pytest.mark.skipif(not metric_weights_installed("vgg", "alex", "dists"),
                                          reason="LPIPS/DISTS weights not installed; run `make metric-weights`")
BENCH_ARGS = ["--steps", "2", "--steps-sweep", "1,2", "--trajectory-steps", "3", "--no-progress", "--device", "cpu"]

RUNNER = """
import sys
from blinddiff.cli import build_parser
args = build_parser().parse_args()
sys.exit(args.run(args))
"""


def textured(which: str, height: int, width: int) -> np.ndarray:
    """A crop of a scikit-image picture away from its flat top-left corner."""
    return np.ascontiguousarray(sample_rgb(200, 260, which)[-height:, -width:])


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 cases (×4, σ 2, 11×11 kernels): two 64×64 images (batched together), 48×64 and a grey 64×48."""
    hr = tmp_path_factory.mktemp("hr")
    Image.fromarray(sample_rgb(64, 64)).save(hr / "astronaut.png")
    Image.fromarray(textured("chelsea", 64, 64)).save(hr / "chelsea.png")
    Image.fromarray(textured("coffee", 48, 64)).save(hr / "coffee.png")
    Image.fromarray(textured("camera", 64, 48)[..., 0]).save(hr / "camera.png")
    out = tmp_path_factory.mktemp("bench") / "mini"
    records, problems = build_testset(hr, out, "iso:2.0", 4, kernel_size=11, log=lambda message: None)
    assert len(records) == 4 and not problems
    return out


@pytest.fixture(scope="module")
def run_folder(weights: Path, bench: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert run_cli("benchmark", "--benchmark", str(bench), "--weights", str(weights), "--out", str(out),
                   "--batch-size", "2", *BENCH_ARGS) == 0
    return out


def cases(bench: Path) -> list[dict]:
    return json.loads((bench / "manifest.json").read_text())["cases"]


def copy_hr_as_sr(bench: Path, folder: Path, suffix: str = "") -> None:
    """SR = HR and estimated kernels = GT kernels: every metric has a known value."""
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases(bench):
        shutil.copy(bench / case["hr"], folder / f"{case['name']}{suffix}.png")
        shutil.copy(bench / case["kernel"], folder / f"{case['name']}_kernel.npy")


# ------------------------------------------------------------------------------------------ evaluate


def test_evaluate_known_values(bench: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sr = tmp_path / "sr"
    copy_hr_as_sr(bench, sr, suffix="_x4")
    assert run_cli("evaluate", "--benchmark", str(bench), "--sr", str(sr), "--suffix", "_x4",
                   "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")) == 0
    table = capsys.readouterr().out
    lpips = ["lpips_vgg"] if LPIPS_INSTALLED else []
    assert f"| sr | 4 | inf | 1.0000 | {'0.0000 | ' * len(lpips)}0.0000 | inf |" in table
    assert "r.json: " in table and "value(s) that are not finite numbers are null" in table
    result = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda constant: pytest.fail(constant))
    assert result["metrics"] == ["psnr", "ssim", *lpips, "kernel_l1", "lr_psnr"] and result["luma"] == "studio"
    assert [row["name"] for row in result["cases"]] == [c["name"] for c in cases(bench)]
    for row in result["cases"]:
        assert row["psnr"] is None and row["ssim"] == pytest.approx(1.0, abs=1e-12)  # inf: JSON has none
        assert row["kernel_l1"] == 0.0 and row["lr_psnr"] is None
        assert row.get("lpips_vgg", 0.0) == pytest.approx(0.0, abs=1e-6)
    csv_lines = (tmp_path / "r.csv").read_text().splitlines()
    assert csv_lines[0].startswith(",".join(["name,image,group,psnr,ssim", *lpips, "kernel_l1,lr_psnr"]))
    assert len(csv_lines) == 5


def test_evaluate_matches_metrics_on_bicubic_results(bench: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """Finite values: per-image PSNR/SSIM (Y, 4-pixel border) of bicubic ×4, and their means in the table."""
    sr = tmp_path / "bicubic"
    sr.mkdir()
    expected = []
    for case in cases(bench):
        up = tensor_to_rgb(upsample_bicubic(rgb_to_tensor(read_rgb(bench / case["lr"])), 4).clamp(0, 1))
        Image.fromarray(up).save(sr / f"{case['name']}.png")
        hr = read_rgb(bench / case["hr"])
        expected.append((float(psnr(up, hr, crop=4)[0]), float(ssim(up, hr, crop=4)[0])))
    assert run_cli("evaluate", "--benchmark", str(bench), "--sr", str(sr), "--metrics", "psnr,ssim") == 0
    result = json.loads((sr / "metrics.json").read_text())
    assert result["metrics"] == ["psnr", "ssim"]
    got = [[row["psnr"], row["ssim"]] for row in result["cases"]]
    assert_close(got, [list(pair) for pair in expected], "bicubic")
    assert 15 < min(p for p, _ in got) and max(p for p, _ in got) < 45
    mean_psnr = sum(p for p, _ in expected) / len(expected)
    assert result["mean"]["psnr"] == pytest.approx(mean_psnr, rel=1e-12)
    assert f"| bicubic | 4 | {mean_psnr:.2f} |" in capsys.readouterr().out
    # full-range luma (the published Bicubic rows): every PSNR 20·log10(255/219) dB lower
    assert run_cli("evaluate", "--benchmark", str(bench), "--sr", str(sr), "--metrics", "psnr", "--luma", "full",
                   "--json", str(sr / "full.json")) == 0
    full = json.loads((sr / "full.json").read_text())
    assert full["luma"] == "full"
    assert_close([[row["psnr"] + 20 * math.log10(255 / 219)] for row in full["cases"]], [[p] for p, _ in expected],
                 "full-range luma")


@needs_metric_weights
def test_evaluate_lpips_with_installed_weights(bench: Path, tmp_path: Path) -> None:
    """`--metrics lpips --lpips-net vgg` and LPIPS-Alex/DISTS need no weight options once installed."""
    sr = tmp_path / "bicubic"
    sr.mkdir()
    expected = []
    model = LPIPS.pretrained("vgg")
    for case in cases(bench):
        up = tensor_to_rgb(upsample_bicubic(rgb_to_tensor(read_rgb(bench / case["lr"])), 4).clamp(0, 1))
        Image.fromarray(up).save(sr / f"{case['name']}.png")
        hr = read_rgb(bench / case["hr"])
        expected.append([float(model(rgb_to_tensor(up), rgb_to_tensor(hr), crop=4)[0])])
    assert run_cli("evaluate", "--benchmark", str(bench), "--sr", str(sr), "--metrics", "lpips,lpips_alex,dists",
                   "--lpips-net", "vgg") == 0
    result = json.loads((sr / "metrics.json").read_text())
    assert result["metrics"] == ["lpips_vgg", "lpips_alex", "dists"]
    assert_close([[row["lpips_vgg"]] for row in result["cases"]], expected, "LPIPS-VGG")
    assert all(0 < row["lpips_alex"] < 1 and 0 < row["dists"] < 1 for row in result["cases"])


def test_evaluate_reports_missing_and_missized_files(bench: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    sr = tmp_path / "sr"
    copy_hr_as_sr(bench, sr)
    first, second = cases(bench)[0]["name"], cases(bench)[2]["name"]
    (sr / f"{first}.png").unlink()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(sr / f"{second}.png")
    assert run_cli("evaluate", "--benchmark", str(bench), "--sr", str(sr)) == 1
    captured = capsys.readouterr()
    assert first in captured.err and f"{second}.png" in captured.err and "40x40" in captured.err
    assert f"2 of {len(cases(bench))} inputs failed" in captured.err
    result = json.loads((sr / "metrics.json").read_text())
    assert {row["name"] for row in result["cases"]} == {c["name"] for c in cases(bench)} - {first, second}
    assert len(result["problems"]) == 2 and "| sr | 2 |" in captured.out


def test_metrics_that_need_weights_fail_clearly(bench: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sr = tmp_path / "sr"
    copy_hr_as_sr(bench, sr)
    base = ["evaluate", "--benchmark", str(bench), "--sr", str(sr)]
    with pytest.raises(ValueError, match="both --lpips-backbone and --lpips-linear"):
        run_cli(*base, "--metrics", "psnr,lpips", "--lpips-backbone", str(tmp_path / "vgg.pth"))
    with monkeypatch.context() as patch:  # as on a machine without `make metric-weights`
        patch.setattr(importlib.util, "find_spec", lambda name, *args: None)
        for metric in ("lpips", "lpips_alex", "dists"):
            with pytest.raises(FileNotFoundError, match="run `make metric-weights`"):
                run_cli(*base, "--metrics", f"psnr,{metric}")
        assert run_cli(*base, "--metrics", "psnr") == 0
    with pytest.raises(FileNotFoundError, match="no_vgg.pth"):
        run_cli(*base, "--metrics", "lpips", "--lpips-backbone", str(tmp_path / "no_vgg.pth"),
                "--lpips-linear", str(tmp_path / "no_lin.pth"))
    with pytest.raises(FileNotFoundError, match="no_niqe.npz"):
        run_cli(*base, "--niqe-params", str(tmp_path / "no_niqe.npz"))
    with pytest.raises(FileNotFoundError, match="no_inception.pth"):
        run_cli(*base, "--fid-weights", str(tmp_path / "no_inception.pth"))
    with pytest.raises(ValueError, match="unknown"):
        run_cli(*base, "--metrics", "psnr,sharpness")
    with pytest.raises(FileNotFoundError, match="make-benchmark"):
        run_cli("evaluate", "--benchmark", str(tmp_path), "--sr", str(sr))


# ------------------------------------------------------------------------------------------ benchmark


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.targets += [value for name, value in attrs if name in ("src", "href") and value]


def test_benchmark_writes_results_and_a_self_contained_report(run_folder: Path, bench: Path) -> None:
    results = json.loads((run_folder / "results.json").read_text())
    assert set(results["methods"]) == {"blinddiff", "bicubic", "gt-kernel"}
    names = [c["name"] for c in cases(bench)]
    for method, data in results["methods"].items():
        assert [row["name"] for row in data["cases"]] == names and data["mean"]["n"] == 4
        assert (("kernel_l1" in data["mean"]) == (method == "blinddiff"))
        assert all((run_folder / method / f"{n}.png").is_file() for n in names)
    blind = results["methods"]["blinddiff"]
    assert blind["mean"]["psnr"] == pytest.approx(np.mean([r["psnr"] for r in blind["cases"]]))
    assert 0 <= blind["mean"]["kernel_l1"] <= 2
    # the bicubic baseline is plain MATLAB bicubic ×4 of the LR
    case = cases(bench)[0]
    up = tensor_to_rgb(upsample_bicubic(rgb_to_tensor(read_rgb(bench / case["lr"])), 4).clamp(0, 1))
    assert results["methods"]["bicubic"]["cases"][0]["psnr"] == pytest.approx(
        float(psnr(up, read_rgb(bench / case["hr"]), crop=4)[0]), rel=1e-12)
    # Fig. 7a traces: one point per step; quality vs steps: 2 step counts × 2 images
    assert len(results["trajectory"]) == 2 and all(len(t["points"]) == 3 for t in results["trajectory"])
    assert sorted((p["steps"], p["name"]) for p in results["steps_sweep"]) == sorted(
        (s, n) for s in (1, 2) for n in (names[0], names[-1]))
    assert len((run_folder / "results.csv").read_text().splitlines()) == 1 + 3 * 4
    assert "| blinddiff | 4 |" in (run_folder / "results.md").read_text()
    # report.html: every referenced file exists, nothing outside the run folder or online
    links = Links()
    links.feed((run_folder / "report.html").read_text())
    images = [t for t in links.targets if t.endswith(".png")]
    # per case: LR, bicubic, ours, gt-kernel, HR, 2 kernels; plots: 2 traces, PSNR and SSIM vs steps
    assert len(images) >= 4 * 7 + 4
    for target in links.targets:
        assert "://" not in target and not target.startswith("/") and ".." not in target
        assert (run_folder / target).is_file(), target
    with Image.open(run_folder / "plots" / "trajectory_psnr_x0.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 200


@needs_lpips_vgg
def test_benchmark_scores_and_plots_lpips_once_its_weights_are_installed(run_folder: Path) -> None:
    """With LPIPS-VGG installed it is a default metric: in every mean, plotted vs steps and against PSNR."""
    results = json.loads((run_folder / "results.json").read_text())
    assert all("lpips_vgg" in data["mean"] for data in results["methods"].values())
    links = Links()
    links.feed((run_folder / "report.html").read_text())
    assert {"plots/perception_distortion.png", "plots/steps_lpips_vgg.png"} <= set(links.targets)
    assert all((run_folder / target).is_file() for target in links.targets)


def test_evaluate_on_a_benchmark_run_gives_its_numbers(run_folder: Path, bench: Path, tmp_path: Path) -> None:
    assert run_cli("evaluate", "--benchmark", str(bench), "--sr", str(run_folder / "blinddiff"),
                   "--json", str(tmp_path / "e.json"), "--csv", str(tmp_path / "e.csv")) == 0
    again = json.loads((tmp_path / "e.json").read_text())["cases"]
    recorded = json.loads((run_folder / "results.json").read_text())["methods"]["blinddiff"]["cases"]
    assert [{k: v for k, v in row.items() if k != "file"} for row in again] == without_timing(recorded)


def test_benchmark_resumes_without_recomputing(run_folder: Path, bench: Path, weights: Path,
                                               tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    outputs = sorted(p for method in ("blinddiff", "bicubic", "gt-kernel") for p in (run / method).glob("*.*"))
    stamps = {p: p.stat().st_mtime_ns for p in outputs}
    settings = evaluation.BenchmarkSettings(trajectory_steps=3, steps_sweep=(1, 2), batch_size=2)
    options = sample_options(steps=2)
    outcome = evaluation.run_benchmark(bench, weights, run, options=options, settings=settings, device="cpu",
                                       log=lambda message: None)
    assert outcome.computed == {"blinddiff": 0, "bicubic": 0, "gt-kernel": 0}
    assert outcome.resumed == {"blinddiff": 4, "bicubic": 4, "gt-kernel": 4}
    assert all(p.stat().st_mtime_ns == stamps[p] for p in outputs)
    before = json.loads((run_folder / "results.json").read_text())["methods"]
    assert outcome.results is not None and outcome.results["methods"] == before
    # a lost record (e.g. killed before it was written) recomputes that case only
    name = cases(bench)[1]["name"]
    (run / "blinddiff" / "records" / f"{name}.json").unlink()
    outcome = evaluation.run_benchmark(bench, weights, run, options=options, settings=settings, device="cpu",
                                       log=lambda message: None)
    assert outcome.computed == {"blinddiff": 1, "bicubic": 0, "gt-kernel": 0}
    assert outcome.results is not None
    assert without_timing(outcome.results["methods"]) == without_timing(before)  # same seed, same result
    changed = [p.name for p in outputs if p.stat().st_mtime_ns != stamps[p]]
    assert changed == [f"{name}.png", f"{name}_kernel.npy", f"{name}_kernel.png"]
    with pytest.raises(ValueError, match="sampling"):
        evaluation.run_benchmark(bench, weights, run, options=sample_options(steps=3), settings=settings,
                                 device="cpu", log=lambda message: None)


def test_benchmark_rescored_on_full_range_luma(run_folder: Path, bench: Path, weights: Path, tmp_path: Path) -> None:
    """Resuming with --luma full recomputes only the Y metrics, from the saved images."""
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    settings = evaluation.BenchmarkSettings(trajectory_steps=3, steps_sweep=(1, 2), batch_size=2)
    outcome = evaluation.run_benchmark(bench, weights, run, options=sample_options(steps=2), settings=settings,
                                       suite=build_metric_suite(luma="full"), device="cpu",
                                       log=lambda message: None)
    assert outcome.computed == {"blinddiff": 0, "bicubic": 0, "gt-kernel": 0} and outcome.results is not None
    assert outcome.results["luma"] == "full"
    before = json.loads((run_folder / "results.json").read_text())["methods"]
    gap = 20 * math.log10(255 / 219)
    for method, data in outcome.results["methods"].items():
        for old, new in zip(before[method]["cases"], data["cases"]):
            assert new["psnr"] == pytest.approx(old["psnr"] - gap) and new["ssim"] != old["ssim"]
            assert new.get("kernel_l1") == old.get("kernel_l1") and new.get("lpips_vgg") == old.get("lpips_vgg")
    record = json.loads((run / "bicubic" / "records" / f"{cases(bench)[0]['name']}.json").read_text())
    assert record["luma"] == "full"
    assert "full-range luma" in (run / "results.md").read_text()


def without_timing(value: object) -> object:
    """``value`` without its "seconds" entries (wall time differs between runs)."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def test_benchmark_times_every_image(run_folder: Path) -> None:
    results = json.loads((run_folder / "results.json").read_text())
    for method in ("blinddiff", "bicubic", "gt-kernel"):
        assert all(case["seconds"] > 0 for case in results["methods"][method]["cases"])
        assert results["methods"][method]["mean"]["seconds"] > 0
    sampled, bicubic = (results["methods"][m]["mean"]["seconds"] for m in ("blinddiff", "bicubic"))
    assert sampled > bicubic  # the reverse process costs more than one resize
    assert "s / image" in (run_folder / "results.md").read_text()


def test_limit_takes_cases_spread_over_the_set(bench: Path, weights: Path, tmp_path: Path) -> None:
    settings = evaluation.BenchmarkSettings(baselines=(), trajectory_cases=0, limit=2)
    outcome = evaluation.run_benchmark(bench, weights, tmp_path / "run", options=sample_options(steps=1),
                                       settings=settings, device="cpu", log=lambda message: None)
    names = [case["name"] for case in cases(bench)]
    assert outcome.results is not None
    assert [row["name"] for row in outcome.results["methods"]["blinddiff"]["cases"]] == [names[0], names[-1]]


def test_benchmark_argument_errors(bench: Path, weights: Path, tmp_path: Path) -> None:
    base = ["benchmark", "--benchmark", str(bench), "--weights", str(weights), "--out", str(tmp_path / "r")]
    with pytest.raises(ValueError, match="bicubc"):
        run_cli(*base, "--baselines", "bicubc")
    with pytest.raises(ValueError, match="limit=0"):
        run_cli(*base, "--limit", "0")
    one_image_testset(tmp_path, "x2", "iso:1.5", 2, kernel_size=7)
    with pytest.raises(ValueError, match="×4 but the test set .* ×2"):
        run_cli("benchmark", "--benchmark", str(tmp_path / "x2"), "--weights", str(weights), "--out",
                str(tmp_path / "r2"), "--device", "cpu")


def test_gt_kernel_baseline_only_where_the_options_use_a_kernel(bench: Path, weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    base = ["benchmark", "--benchmark", str(bench), "--weights", str(weights), "--out", str(out), "--device", "cpu",
            "--no-progress", "--limit", "1", "--trajectory-cases", "0", "--report-cases", "0", "--metrics", "psnr"]
    for options in (["--mode", "fidelity"], ["--guidance", "bicubic"], ["--zeta", "0"]):  # the row would equal ours
        with pytest.raises(ValueError, match="gt-kernel would equal blinddiff.*--baselines bicubic"):
            run_cli(*base, *options, "--baselines", "bicubic,gt-kernel")
        assert not out.exists()  # refused before any work
    assert run_cli(*base, "--mode", "fidelity") == 0  # by default it is left out there
    assert set(json.loads((out / "results.json").read_text())["methods"]) == {"blinddiff", "bicubic"}


@pytest.mark.slow
def test_two_process_gloo_benchmark_equals_single_process(run_folder: Path, bench: Path, weights: Path,
                                                          tmp_path: Path) -> None:
    script = tmp_path / "blinddiff_eval.py"
    script.write_text(RUNNER)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), "benchmark", "--benchmark", str(bench), "--weights", str(weights), "--out",
                    str(out), *BENCH_ARGS], env=env, check=True, timeout=300, stdout=subprocess.DEVNULL)
    single = json.loads((run_folder / "results.json").read_text())
    double = json.loads((out / "results.json").read_text())
    for key in ("methods", "trajectory", "steps_sweep"):  # equal up to float summation order
        assert_close(without_timing(double[key]), without_timing(single[key]), key)
    # each rank upscaled its own shard (case i → rank i mod 2): every record was written once
    assert len(list((out / "blinddiff" / "records").glob("*.json"))) == 4
    assert (out / "report.html").is_file()


def assert_close(a: object, b: object, where: str) -> None:
    """Same structure, same strings, floats equal to 1e-4 relative or 1e-5 absolute.

    A case upscaled in a batch of another size sums in another order, and the guided steps amplify that to
    the sixth digit; a case given the wrong seed or another rank's image differs by orders of magnitude more."""
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), where
        for key in b:
            assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{index}]")
    elif isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), where
    else:
        assert a == b, where


# ------------------------------------------------------------------------------------------ pieces


def test_summaries_and_tables() -> None:
    rows = [{"name": "a", "group": "sigma 2", "psnr": 30.0, "ssim": 0.5},
            {"name": "b", "group": "sigma 3", "psnr": 20.0, "ssim": 0.7},
            {"name": "c", "group": "sigma 3", "psnr": math.inf, "ssim": 1.0}]
    assert evaluation.summarize(rows[:2], ["psnr", "ssim"]) == {"n": 2, "psnr": 25.0, "ssim": pytest.approx(0.6)}
    assert evaluation.summarize(rows, ["psnr"])["psnr"] == math.inf
    groups = evaluation.group_summaries(rows[:2], ["psnr"])
    assert groups == {"sigma 2": {"n": 1, "psnr": 30.0}, "sigma 3": {"n": 1, "psnr": 20.0}}
    table = evaluation.markdown_table({"x": evaluation.summarize(rows[:2], ["psnr", "ssim"])},
                                      ["psnr", "ssim", "lpips"])  # lpips: no values, no column
    assert table.splitlines() == ["| method | n | PSNR ↑ | SSIM ↑ |", "|---|---:|---:|---:|",
                                  "| x | 2 | 25.00 | 0.6000 |"]


MATPLOTLIB_C0_C1 = ((31, 119, 180), (255, 127, 14))  # matplotlib's first two default colours


def drawn_pixels(path: Path, colour: tuple[int, int, int]) -> int:
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(pixels - colour).sum(axis=2) < 30).sum())


def test_line_plot_draws_each_series(tmp_path: Path) -> None:
    path = tmp_path / "plot.png"
    evaluation.line_plot(path, {"a": ([1, 2, 3], [1.0, 2.0, math.inf]), "b": ([1, 2, 3], [3.0, 1.0, 2.0])},
                         title="t", xlabel="step", ylabel="y", size=(300, 200))
    assert Image.open(path).size == (300, 200)
    for colour in MATPLOTLIB_C0_C1:  # both series are drawn in their colours
        assert drawn_pixels(path, colour) > 20


def test_scatter_plot_draws_one_point_per_method(tmp_path: Path) -> None:
    path = tmp_path / "scatter.png"
    evaluation.scatter_plot(path, {"bicubic": (0.45, 25.9), "blinddiff": (0.30, 27.3), "broken": (math.nan, 1.0)},
                            title="t", xlabel="LPIPS", ylabel="PSNR", size=(320, 240))
    assert Image.open(path).size == (320, 240)
    for colour in MATPLOTLIB_C0_C1:
        assert drawn_pixels(path, colour) > 10
    assert drawn_pixels(path, (44, 160, 44)) == 0  # C2: the non-finite point is left out


def test_deblurring_baselines_on_a_scale_1_benchmark(tmp_path: Path) -> None:
    """blurry, Richardson–Lucy and Wiener (true and estimated kernel) run next to the blind method at scale 1."""
    from blinddiff.checkpoint import save_weights
    from blinddiff.config import load_config
    from blinddiff.model import MCFormer

    cfg = load_config("tiny", ["data.scale=1"])
    weights = tmp_path / "deblur.safetensors"
    save_weights(weights, MCFormer(cfg.model).state_dict(), cfg)
    hr = tmp_path / "hr"
    hr.mkdir()
    Image.fromarray(textured("chelsea", 48, 48)).save(hr / "chelsea.png")
    Image.fromarray(textured("coffee", 48, 48)).save(hr / "coffee.png")
    bench = tmp_path / "bench"
    build_testset(hr, bench, "motion", 1, kernel_size=11, noise=0.01, log=lambda message: None)
    methods = ("blurry", "gt-kernel", "rl-gt", "rl-est", "wiener-gt", "wiener-est")
    settings = evaluation.BenchmarkSettings(baselines=methods, trajectory_cases=0)
    outcome = evaluation.run_benchmark(bench, weights, tmp_path / "run", options=sample_options(steps=1),
                                       settings=settings, suite=build_metric_suite("psnr,kernel_l1"), device="cpu",
                                       log=lambda message: None)
    results = outcome.results
    assert results is not None and not outcome.problems
    assert set(results["methods"]) == {"blinddiff", *methods}
    blurry = results["methods"]["blurry"]["mean"]["psnr"]
    for case in cases(bench):  # the blurry baseline is the test set's input, unchanged
        assert np.array_equal(read_rgb(tmp_path / "run" / "blurry" / f"{case['name']}.png"), read_rgb(bench / case["lr"]))
    assert results["methods"]["rl-gt"]["mean"]["psnr"] > blurry  # the true kernel helps a classical method
    report = (tmp_path / "run" / "report.html").read_text()
    assert "rl-est" in report and "estimated kernel" in report and "GT kernel" in report and "blurry input" in report
    build_testset(hr, tmp_path / "x4", "iso:1.0", 4, kernel_size=7, log=lambda message: None)
    for baseline in ("rl-gt", "blurry"):  # refused before any work on a test set with downsampling
        with pytest.raises(ValueError, match="×4"):
            evaluation.run_benchmark(tmp_path / "x4", weights, tmp_path / "r", device="cpu",
                                     settings=evaluation.BenchmarkSettings(baselines=(baseline,)))


def test_a_new_baseline_is_one_registry_entry(bench: Path, weights: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A producer registered under a new name is run, scored, tabled and pictured like the shipped baselines."""
    from blinddiff.evaluation import baselines

    def nearest(inputs: baselines.BaselineInputs) -> baselines.Producer:
        scale = inputs.bench.scale
        return lambda lr, cases: (lr.repeat_interleave(scale, -2).repeat_interleave(scale, -1), None)

    monkeypatch.setitem(baselines.REGISTRY, "nearest", baselines.Baseline(nearest))
    settings = evaluation.BenchmarkSettings(baselines=("nearest", "bicubic"), trajectory_cases=0, limit=1)
    outcome = evaluation.run_benchmark(bench, weights, tmp_path / "run", options=sample_options(steps=1),
                                       settings=settings, suite=build_metric_suite("psnr"), device="cpu",
                                       log=lambda message: None)
    assert outcome.results is not None and not outcome.problems
    assert list(outcome.results["methods"]) == ["blinddiff", "bicubic", "nearest"]  # registry order
    case = cases(bench)[0]
    expected = np.repeat(np.repeat(read_rgb(bench / case["lr"]), 4, 0), 4, 1)
    assert np.array_equal(read_rgb(tmp_path / "run" / "nearest" / f"{case['name']}.png"), expected)
    assert outcome.results["methods"]["nearest"]["cases"][0]["psnr"] == pytest.approx(
        float(psnr(expected, read_rgb(bench / case["hr"]), crop=4)[0]), rel=1e-12)
    assert "<figcaption>nearest</figcaption>" in (tmp_path / "run" / "report.html").read_text()
