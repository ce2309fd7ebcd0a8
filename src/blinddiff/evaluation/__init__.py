"""The evaluation suite: the paper's tables from one command (docs/method.md §1 "Metrics", §6; paper §4, Fig. 7).

* :func:`evaluate_results` — score a folder of SR results against a synthetic test set written by
  ``blinddiff make-benchmark`` (``manifest.json``): PSNR/SSIM (Y, ``scale`` border; studio-swing
  or full-range luma), LPIPS-VGG, LPIPS-Alex, DISTS, NIQE, kernel L1 and LR-PSNR per image
  (``blinddiff.metrics``), FID over the set.
* :func:`run_benchmark` — upscale every case with the blind MAP reverse process, and the baselines
  (plain bicubic ×s; the same model in non-blind mode with the ground-truth kernel; on request the
  peer methods of ``blinddiff.peers``: Real-ESRGAN, RealSR, SRMD given the true or our estimated
  kernel; at scale 1 the blurry input itself and Richardson–Lucy / Wiener deconvolution given the true
  or our estimated kernel), evaluate them,
  and write ``results.json/.csv/.md`` and a self-contained ``report.html`` with crops, kernels and
  matplotlib plots: Fig. 7a (per-step PSNR of x̂0 and kernel L1 along the reverse process), quality
  against the number of steps, and perception–distortion (PSNR vs LPIPS-VGG, one point per
  method). Finished cases are recorded one file each, so a run resumes.
* Both shard their cases across ``torchrun`` ranks (case i → rank i mod world) and gather the
  per-case results on rank 0, which alone writes the tables: the numbers do not depend on the
  number of processes.
* The pieces live where they belong: the test set in ``blinddiff.testsets``, the metric suite in
  ``blinddiff.metrics``, the torchrun ranks in ``blinddiff.hardware``, the commands in ``blinddiff.cli``
  and speed measurement in ``benchmarks/sampling_speed.py``; this module imports none of the CLI.

Run folder layout (``benchmark``): ``<method>/<name>.png`` (+ ``<name>_kernel.npy/.png`` for the
blind method, the files ``blinddiff upscale`` writes, so ``evaluate --sr RUN/blinddiff`` gives the
same numbers), ``<method>/records/<name>.json`` (one per finished case), ``plots/``, ``report/``.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .fileio import IMAGE_EXTENSIONS, ImageError, atomic_write, image_size, kernel_picture, read_rgb, tensor_to_rgb, \
    write_json, write_png, write_result
from .hardware import Runtime, distributed, gather, shard
from .kernels import validate_kernel
from .metrics import ALL_METRICS, KERNEL_METRICS, LUMA_METRICS, MetricSuite, build_metric_suite, kernel_l1, psnr, \
    set_fid
from .peers import DECONVOLUTION, PEERS, check_deconvolution, check_peers, deconvolution_producers, peer_producers
from .testsets import BenchmarkSet, case_group, load_benchmark

if TYPE_CHECKING:
    from .inference import BlindDiff, SampleOptions

__all__ = [
    "ALL_BASELINES", "BASELINES", "METHOD", "BenchmarkOutcome", "BenchmarkSettings", "case_pictures",
    "default_baselines", "evaluate_results",
    "line_plot",
    "markdown_table", "null_note", "run_benchmark", "save_figure", "scatter_plot", "summarize",
]

METHOD = "blinddiff"  # the blind MAP reverse process (ours)
BASELINES = ("bicubic", "gt-kernel")  # the default; the peers (blinddiff.peers) need `make peers`


def default_baselines(options: SampleOptions) -> tuple[str, ...]:
    """`BASELINES`, without gt-kernel where the options do not use a kernel (it would equal the method)."""
    return BASELINES if options.uses_kernel else tuple(b for b in BASELINES if b != "gt-kernel")
ALL_BASELINES = BASELINES + ("blurry",) + DECONVOLUTION + PEERS  # blurry and deconvolution: scale 1 only

_LABELS = {"psnr": "PSNR ↑", "ssim": "SSIM ↑", "lpips_vgg": "LPIPS-VGG ↓", "lpips_alex": "LPIPS-Alex ↓",
           "dists": "DISTS ↓", "niqe": "NIQE ↓", "piqe": "PIQE ↓", "kernel_l1": "kernel L1 ↓", "lr_psnr": "LR-PSNR ↑", "fid": "FID ↓",
           "seconds": "s / image ↓"}
_FORMATS = {"psnr": ".2f", "ssim": ".4f", "lpips_vgg": ".4f", "lpips_alex": ".4f", "dists": ".4f", "niqe": ".3f",
            "kernel_l1": ".4f", "lr_psnr": ".2f", "fid": ".2f", "seconds": ".2f"}
_LUMA_TEXT = {"studio": "studio-swing Y (BT.601, 16–235)", "full": "full-range luma (0.299R + 0.587G + 0.114B)"}


def _ordered(rows: Sequence[dict], order: dict[str, int]) -> list[dict]:
    return sorted(rows, key=lambda row: order.get(row["name"], len(order)))


def _case_row(case: dict) -> dict:
    return {"name": case["name"], "image": Path(case["hr"]).stem, "group": case_group(case)}


# --------------------------------------------------------------------------------------------
# Evaluating a folder of results
# --------------------------------------------------------------------------------------------


def find_result(folder: Path, name: str, suffix: str = "") -> Path | None:
    """``folder/<name><suffix>.png``, else the same stem with another image extension."""
    for ext in (".png",) + tuple(e for e in IMAGE_EXTENSIONS if e != ".png"):
        for candidate in (folder / f"{name}{suffix}{ext}", folder / f"{name}{suffix}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _score_file(bench: BenchmarkSet, case: dict, sr_path: Path, kernel_path: Path | None,
                suite: MetricSuite, names: Sequence[str]) -> dict[str, float]:
    """Metrics of one saved result; raises ImageError naming the file when it cannot be compared."""
    hr = bench.hr(case)
    sr = read_rgb(sr_path)
    if sr.shape != hr.shape:
        raise ImageError(f"{sr_path}: SR is {sr.shape[1]}x{sr.shape[0]} but {case['hr']} is {hr.shape[1]}x"
                         f"{hr.shape[0]} (×{bench.scale} of the LR); upscale {case['lr']} again")
    kernel = None
    if kernel_path is not None:
        try:
            kernel = np.load(kernel_path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ImageError(f"{kernel_path}: not a readable .npy kernel ({err})") from None
        validate_kernel(kernel, f"estimated kernel {kernel_path}", normalised=True)  # scored as saved
    return suite.score(sr, hr, scale=bench.scale, downsample=bench.downsample, kernel=kernel,
                       gt_kernel=bench.gt_kernel(case) if kernel is not None else None, names=names)


def evaluate_results(benchmark: str | os.PathLike | BenchmarkSet, sr_dir: str | os.PathLike, suite: MetricSuite, *,
                     suffix: str = "", runtime: Runtime | None = None,
                     log: Callable[[str], None] | None = None) -> tuple[list[dict], list[str]]:
    """Score the SR files of a test set: ``<name><suffix>.<ext>`` and ``<name>_kernel.npy`` per case.

    Returns (one row per scored case in manifest order: name, image, group and the metrics; problems,
    each naming a case or file: missing, unreadable or mis-sized results, which are excluded). Under
    torchrun each rank scores its shard and every rank gets all rows.
    """
    bench = benchmark if isinstance(benchmark, BenchmarkSet) else load_benchmark(benchmark)
    runtime = runtime or Runtime()
    sr_dir = Path(sr_dir)
    if not sr_dir.is_dir():
        raise FileNotFoundError(f"SR folder {sr_dir} does not exist; pass the folder `blinddiff upscale --out` wrote")
    if not bench.has_kernels:  # real pairs: no true kernel to score an estimate against
        suite = suite.without_kernel_metrics()
    names = suite.image_metrics
    rows: list[dict] = []
    problems: list[str] = []
    for case in shard(bench.cases, runtime):
        name = case["name"]
        sr_path = find_result(sr_dir, name, suffix)
        if sr_path is None:
            problems.append(f"{name}: no SR result {sr_dir / (name + suffix)}.png (or another image extension)")
            continue
        kernel_path = None
        if suite.needs_kernels:
            kernel_path = sr_dir / f"{name}_kernel.npy"
            if not kernel_path.is_file():
                problems.append(f"{name}: no estimated kernel {kernel_path} for {', '.join(KERNEL_METRICS)}; "
                                "leave kernel metrics out of --metrics for methods without kernels")
                continue
        try:
            metrics = _score_file(bench, case, sr_path, kernel_path, suite, names)
        except (ImageError, ValueError) as err:
            problems.append(str(err) if str(sr_path) in str(err) or name in str(err) else f"{name}: {err}")
            continue
        rows.append({**_case_row(case), **metrics, "file": sr_path.name})
        if log is not None:
            log(f"{name}: " + ", ".join(f"{k} {_format(k, v)}" for k, v in metrics.items()))
    order = {case["name"]: i for i, case in enumerate(bench.cases)}
    return _ordered(gather(runtime, rows), order), gather(runtime, problems)


# --------------------------------------------------------------------------------------------
# Tables and result files
# --------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    if any(math.isnan(v) for v in values):
        return math.nan
    if any(math.isinf(v) for v in values):  # inf PSNR (identical images) dominates, as in any mean
        return math.fsum(v for v in values if math.isinf(v))
    return math.fsum(values) / len(values)


def summarize(rows: Sequence[dict], metrics: Sequence[str]) -> dict[str, float]:
    """Mean of each metric over the rows that have it (the paper averages over all cases), plus ``n``."""
    summary: dict[str, float] = {"n": len(rows)}
    for name in metrics:
        values = [float(row[name]) for row in rows if row.get(name) is not None]
        if values:
            summary[name] = _mean(values)
    return summary


def summarize_set(rows: Sequence[dict], metrics: Sequence[str], suite: MetricSuite, bench: BenchmarkSet,
                  sr_paths: Sequence[Path]) -> dict[str, float]:
    """:func:`summarize`, plus the FID of the SR files ``sr_paths`` (one per row) against their HR images
    when the suite has it (docs/method.md §1: FID is over the whole test set)."""
    summary = summarize(rows, metrics)
    if "fid" in suite.names:
        hr_of = {case["name"]: bench.root / case["hr"] for case in bench.cases}
        fid = set_fid(suite, sr_paths, [hr_of[row["name"]] for row in rows])
        if fid is not None:
            summary["fid"] = fid
    return summary


def group_summaries(rows: Sequence[dict], metrics: Sequence[str]) -> dict[str, dict[str, float]]:
    """:func:`summarize` per kernel group (first-seen order)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    return {group: summarize(members, metrics) for group, members in groups.items()}


def _format(name: str, value: float | None) -> str:
    if value is None:
        return "–"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return format(value, _FORMATS.get(name, ".4f"))


def null_note(name: str, nulls: int) -> str:
    """The line that says a JSON file holds null where a value was not a finite number (`fileio.write_json`)."""
    return (f"{name}: {nulls} value(s) that are not finite numbers are null there (JSON has no inf or NaN; "
            f"an inf PSNR means identical images); the tables show them as inf/nan")


def markdown_table(summaries: dict[str, dict[str, float]], metrics: Sequence[str], *, first: str = "method") -> str:
    """Markdown table: one row per entry of ``summaries`` (e.g. method → means), one column per metric."""
    columns = [name for name in metrics if any(name in s for s in summaries.values())]
    lines = ["| " + " | ".join([first, "n", *(_LABELS.get(c, c) for c in columns)]) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for label, summary in summaries.items():
        cells = [label, str(int(summary.get("n", 0))), *(_format(c, summary.get(c)) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Rows as CSV with the given columns (missing values empty), atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path, "w") as handle:
        handle.write(buffer.getvalue())


def row_columns(rows: Sequence[dict], metrics: Sequence[str], lead: Sequence[str] = ()) -> list[str]:
    present = [m for m in metrics if any(m in row for row in rows)]
    return [*lead, "name", "image", "group", *present]


# --------------------------------------------------------------------------------------------
# Plots (PNG, matplotlib's object API: no pyplot state, no display needed)
# --------------------------------------------------------------------------------------------

def _new_axes(title: str, xlabel: str, ylabel: str, size: tuple[int, int]) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100)
    axes = figure.subplots()
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def save_figure(figure: Any, path: str | os.PathLike) -> None:
    """Lay out a matplotlib figure and write it as a PNG, atomically."""
    figure.tight_layout()
    with atomic_write(path) as handle:
        figure.savefig(handle, format="png")


def line_plot(path: str | os.PathLike, series: dict[str, tuple[Sequence[float], Sequence[float]]], *,
              title: str, xlabel: str, ylabel: str, size: tuple[int, int] = (520, 340)) -> None:
    """One line per series (label → (xs, ys)) with markers, in matplotlib's colours ``C0``, ``C1`` …;
    non-finite points are left out."""
    from matplotlib.ticker import MaxNLocator

    figure, axes = _new_axes(title, xlabel, ylabel, size)
    for index, (label, (xs, ys)) in enumerate(series.items()):
        points = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
        if points:
            axes.plot(*zip(*points), marker="o", markersize=3, color=f"C{index % 10}", label=label)
    if all(float(x).is_integer() for xs, _ in series.values() for x in xs if math.isfinite(x)):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no 2.5
    if series:
        axes.legend(fontsize=7)
    save_figure(figure, path)


def scatter_plot(path: str | os.PathLike, points: dict[str, tuple[float, float]], *, title: str, xlabel: str,
                 ylabel: str, size: tuple[int, int] = (520, 380)) -> None:
    """One labelled point per entry (label → (x, y)), in the colours of :func:`line_plot`; e.g. the
    perception–distortion plane (Blau & Michaeli 2018): PSNR against LPIPS. Non-finite points are left out."""
    figure, axes = _new_axes(title, xlabel, ylabel, size)
    for index, (label, (x, y)) in enumerate(points.items()):
        if math.isfinite(x) and math.isfinite(y):
            axes.scatter([x], [y], color=f"C{index % 10}", s=30, zorder=3)
            axes.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.margins(0.15)
    save_figure(figure, path)


# --------------------------------------------------------------------------------------------
# The benchmark runner
# --------------------------------------------------------------------------------------------


@dataclass
class BenchmarkSettings:
    """What `run_benchmark` does besides the sampling options (see the `benchmark` command's help)."""

    seed: int = 0
    batch_size: int = 1
    baselines: tuple[str, ...] = BASELINES
    limit: int | None = None  # only this many cases, spread evenly over the set
    trajectory_cases: int = 2  # images whose reverse process is traced (Fig. 7a)
    trajectory_steps: int | None = None  # steps of those traces (default: the sampling steps)
    steps_sweep: tuple[int, ...] = ()  # numbers of steps for the quality-vs-steps plot
    sweep_cases: int = 2
    report_cases: int = 24  # cases shown in report.html
    crop: int = 96  # HR pixels per side of the report crops

    def check(self) -> None:
        unknown = [b for b in self.baselines if b not in ALL_BASELINES]
        if unknown:
            raise ValueError(f"baselines={','.join(self.baselines)}: unknown {unknown}; use some of "
                             f"{','.join(ALL_BASELINES)} (or 'none')")
        for name in ("batch_size", "crop"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; use 1 or more")
        for name in ("trajectory_cases", "sweep_cases", "report_cases"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; use 0 or more")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} is invalid; use 1 or more (or leave it out for all cases)")
        if self.trajectory_steps is not None and self.trajectory_steps < 1:
            raise ValueError(f"trajectory_steps={self.trajectory_steps} is invalid; use 1 or more")
        bad = [s for s in self.steps_sweep if s < 1]
        if bad:
            raise ValueError(f"steps_sweep has invalid step counts {bad}; use positive integers, e.g. 2,5,10")


@dataclass
class BenchmarkOutcome:
    """What a rank did: results (the results.json content; rank 0 only), problems, cases computed/resumed."""

    results: dict | None
    problems: list[str]
    computed: dict[str, int]
    resumed: dict[str, int]


def _spread(items: Sequence[Any], count: int) -> list[Any]:
    """``count`` items evenly spread over the sequence (first and last included)."""
    if count >= len(items):
        return list(items)
    if count <= 0:
        return []
    if count == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_record(path: Path) -> dict | None:
    """A finished case's record, without the values that are not finite numbers (NaN, inf, null, text):
    those metrics count as missing and are scored again from the case's files."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None  # a damaged record: the case is computed again
    folder = path.parent.parent
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict) \
            or not all((folder / f).is_file() for f in record.get("files", [None])):
        return None
    record["metrics"] = {k: v for k, v in record["metrics"].items() if _is_finite_number(v)}
    if not _is_finite_number(record.get("seconds", 0.0)):
        del record["seconds"]
    return record


def _lr_batch(bench: BenchmarkSet, cases: Sequence[dict]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(bench.lr(c)).permute(2, 0, 1) for c in cases]).float() / 255.0


Producer = Callable[[torch.Tensor, list[dict]], "tuple[torch.Tensor, torch.Tensor | None]"]


def _run_method(method: str, cases: Sequence[dict], produce: Producer, bench: BenchmarkSet, out: Path,
                suite: MetricSuite, batch_size: int, log: Callable[[str], None],
                progress: bool) -> tuple[list[dict], list[str], int, int]:
    """Upscale (or resume) and score this rank's cases of one method → (rows, problems, computed, resumed).

    A case is finished once ``<method>/records/<name>.json`` exists (written last, atomically) and the
    files it lists exist; finished cases only get metrics they lack computed, from their files (and the Y
    metrics again if the record was scored with another ``luma``).
    """
    from tqdm import tqdm

    from .batch import size_batches

    folder = out / method
    names = suite.image_metrics
    rows: list[dict] = []
    problems: list[str] = []
    pending: list[dict] = []
    resumed = 0
    for case in cases:
        record_path = folder / "records" / f"{case['name']}.json"
        record = _read_record(record_path)
        if record is None:
            pending.append(case)
            continue
        other_luma = record.get("luma", "studio") != suite.luma
        if other_luma:  # its Y metrics are on the other luma: void
            record["metrics"] = {k: v for k, v in record["metrics"].items() if k not in LUMA_METRICS}
            record["luma"] = suite.luma
        missing = [n for n in names if n not in record["metrics"]]
        if missing:
            kernel_file = folder / f"{case['name']}_kernel.npy"
            try:
                record["metrics"].update(_score_file(bench, case, folder / f"{case['name']}.png",
                                                     kernel_file if kernel_file.is_file() else None, suite,
                                                     missing))
            except (ImageError, ValueError) as err:
                problems.append(f"{method} {case['name']}: {err}")
                continue
        if missing or other_luma:
            write_json(record_path, record)
        rows.append({**_case_row(case), **{n: record["metrics"][n] for n in names if n in record["metrics"]},
                     **({"seconds": record["seconds"]} if "seconds" in record else {})})
        resumed += 1
    bar = tqdm(total=len(pending), desc=method, unit="img", disable=not progress or not pending)
    def size(case: dict) -> tuple:  # LR size and kernel size: one tensor per batch
        return image_size(bench.root / case["lr"]), bench.gt_kernel(case).shape if bench.has_kernels else None

    for batch in size_batches(pending, size, batch_size):
        started = time.perf_counter()
        try:
            sr, kernels = produce(_lr_batch(bench, batch), batch)
        except (ValueError, RuntimeError) as err:
            problems.extend(f"{method} {case['name']}: {err}" for case in batch)
            continue
        seconds = (time.perf_counter() - started) / len(batch)  # wall time per image of this batch
        for index, case in enumerate(batch):
            name = case["name"]
            pixels = tensor_to_rgb(sr[index])
            kernel = None if kernels is None else kernels[index].numpy()
            files = [path.name for path in write_result(folder / f"{name}.png", pixels, kernel)]
            try:
                metrics = suite.score(pixels, bench.hr(case), scale=bench.scale, downsample=bench.downsample,
                                      kernel=kernel,
                                      gt_kernel=bench.gt_kernel(case) if kernel is not None and bench.has_kernels else None)
            except ValueError as err:
                problems.append(f"{method} {name}: {err}")
                continue
            write_json(folder / "records" / f"{name}.json",
                       {"name": name, "files": files, "metrics": metrics, "luma": suite.luma, "seconds": seconds})
            rows.append({**_case_row(case), **metrics, "seconds": seconds})
            log(f"{method} {name}: " + ", ".join(f"{k} {_format(k, v)}" for k, v in metrics.items()))
            bar.update(1)
    bar.close()
    return rows, problems, len(pending), resumed


def _fingerprint(weights: Path, bench: BenchmarkSet, options: SampleOptions, settings: BenchmarkSettings,
                 precision: str) -> dict:
    """What the saved results depend on: a run folder is resumed only with the same values."""
    from .checkpoint import sha256_of

    manifest = {k: v for k, v in bench.manifest.items() if k != "cases"}
    return {"weights_sha256": sha256_of(weights), "benchmark": manifest, "cases_sha256": _cases_digest(bench),
            "sampling": asdict(options), "seed": settings.seed, "precision": precision}


def _cases_digest(bench: BenchmarkSet) -> str:
    """sha256 over the case records and the bytes of every file they name: a test set rebuilt in place
    with other content is another test set."""
    import hashlib

    digest = hashlib.sha256(json.dumps(bench.cases, sort_keys=True).encode())
    for relative in dict.fromkeys(case[key] for case in bench.cases for key in ("hr", "lr", "kernel") if case.get(key)):
        path = bench.root / relative
        digest.update(relative.encode() + b"\0")
        if path.is_file():  # a missing file is reported when its case runs
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _check_run_folder(out: Path, fingerprint: dict, runtime: Runtime) -> None:
    path = out / "run.json"
    if path.is_file():
        try:
            previous = json.loads(path.read_text()).get("fingerprint", {})
        except ValueError:
            previous = {}
        current = json.loads(json.dumps(fingerprint))  # tuples → lists, as stored
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if changed:
            raise ValueError(f"{out} holds a benchmark run made with other settings (changed: {', '.join(changed)}); "
                             "resume it with the same weights, test set and sampling options, or choose another --out")
    runtime.barrier()  # every rank has compared before rank 0 (re)writes it
    if runtime.main:
        write_json(path, {"fingerprint": fingerprint})


def _trace_reverse_process(model: BlindDiff, bench: BenchmarkSet, case: dict, options: SampleOptions, steps: int,
                           seed: int) -> dict:
    """Fig. 7a: PSNR (Y, border ``scale``) of x̂0 and kernel L1 of k̂_t at every reverse step of one image."""
    hr = bench.hr(case)
    gt = torch.from_numpy(bench.gt_kernel(case))
    points: list[dict] = []

    def record(info: Any) -> None:
        points.append({"step": info.index + 1, "t": int(info.t),
                       "psnr_x0": float(psnr(info.x0[:1].float().cpu(), hr, crop=bench.scale)[0]),
                       "kernel_l1": float(kernel_l1(info.kernel[:1].float().cpu(), gt)[0]),
                       "energy": float(info.energy.reshape(-1)[0])})

    model.run(_lr_batch(bench, [case]), [seed], replace(options, steps=steps), callback=record)
    return {"name": case["name"], "steps": steps, "points": points}


def _sweep_point(model: BlindDiff, bench: BenchmarkSet, case: dict, options: SampleOptions, steps: int, seed: int,
                 suite: MetricSuite) -> dict:
    """Quality of one image upscaled with ``steps`` reverse steps (the quality-vs-steps plot)."""
    sr, kernel = model.run(_lr_batch(bench, [case]), [seed], replace(options, steps=steps))
    names = [n for n in suite.image_metrics if n not in ("niqe", "piqe")]
    known = bench.has_kernels
    metrics = suite.score(tensor_to_rgb(sr[0]), bench.hr(case), scale=bench.scale, downsample=bench.downsample,
                          kernel=kernel[0].numpy() if known else None, gt_kernel=bench.gt_kernel(case) if known else None,
                          names=list(dict.fromkeys(names + ["psnr"] + (["kernel_l1"] if known else []))))
    return {"name": case["name"], "steps": steps, "luma": suite.luma, **metrics}


def _plot_jobs(model: BlindDiff, bench: BenchmarkSet, cases: Sequence[dict], out: Path, options: SampleOptions,
               settings: BenchmarkSettings, suite: MetricSuite, runtime: Runtime,
               log: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    """Traces (Fig. 7a) and the steps sweep, sharded like the cases and resumable (plots/records/)."""
    trace_steps = settings.trajectory_steps or options.steps
    jobs = [("trace", case, trace_steps) for case in _spread(cases, settings.trajectory_cases)]
    jobs += [("sweep", case, steps) for steps in settings.steps_sweep for case in _spread(cases, settings.sweep_cases)]
    done: list[tuple[str, dict]] = []
    for kind, case, steps in shard(jobs, runtime):
        path = out / "plots" / "records" / f"{kind}_{case['name']}_steps{steps}.json"
        if path.is_file():
            try:
                record = json.loads(path.read_text())
            except ValueError:
                record = None  # damaged: computed again
            if isinstance(record, dict) and (kind == "trace" or record.get("luma", "studio") == suite.luma):
                done.append((kind, record))
                continue
        log(f"{'tracing' if kind == 'trace' else 'steps sweep:'} {case['name']} with {steps} step(s)")
        if kind == "trace":
            result = _trace_reverse_process(model, bench, case, options, steps, settings.seed)
        else:
            result = _sweep_point(model, bench, case, options, steps, settings.seed, suite)
        write_json(path, result)
        done.append((kind, result))
    gathered = gather(runtime, done)
    order = {case["name"]: i for i, case in enumerate(bench.cases)}
    traces = sorted((r for k, r in gathered if k == "trace"), key=lambda r: order.get(r["name"], 0))
    sweep = sorted((r for k, r in gathered if k == "sweep"), key=lambda r: (r["steps"], order.get(r["name"], 0)))
    return traces, sweep


def _write_plots(out: Path, traces: list[dict], sweep: list[dict], summaries: dict[str, dict[str, float]],
                 luma: str) -> list[tuple[str, str]]:
    """PNG plots → [(relative path, caption)]: Fig. 7a traces, quality vs steps, perception–distortion."""
    plots: list[tuple[str, str]] = []
    if traces:
        for key, label in (("psnr_x0", "PSNR of x̂0 (dB, studio Y)"), ("kernel_l1", "kernel L1 to GT")):
            series = {t["name"]: ([p["step"] for p in t["points"]], [p[key] for p in t["points"]]) for t in traces}
            relative = f"plots/trajectory_{key}.png"
            line_plot(out / relative, series, title=f"Fig. 7a: {label} per reverse step", xlabel="reverse step",
                      ylabel=label)
            plots.append((relative, f"{label} at every reverse step, one line per image"))
    if sweep:
        by_steps: dict[int, list[dict]] = {}
        for point in sweep:
            by_steps.setdefault(point["steps"], []).append(point)
        steps = sorted(by_steps)
        for key, label in (("psnr", f"PSNR (dB, {luma} Y)"), ("lpips_vgg", "LPIPS-VGG"),
                           ("kernel_l1", "kernel L1 to GT")):
            if not all(key in p for p in sweep):
                continue
            means = [_mean([float(p[key]) for p in by_steps[s]]) for s in steps]
            relative = f"plots/steps_{key}.png"
            line_plot(out / relative, {f"mean of {len(by_steps[steps[0]])} image(s)": (steps, means)},
                      title=f"{label} vs number of reverse steps", xlabel="steps", ylabel=label)
            plots.append((relative, f"{label} against the number of sampling steps"))
    methods = {method: (summary["lpips_vgg"], summary["psnr"]) for method, summary in summaries.items()
               if "lpips_vgg" in summary and "psnr" in summary}
    if methods:
        relative = "plots/perception_distortion.png"
        scatter_plot(out / relative, methods, title="Perception–distortion: mean over the cases",
                     xlabel="LPIPS-VGG ↓ (perceptual distance)", ylabel=f"PSNR ↑ (dB, {luma} Y)")
        plots.append((relative, "PSNR against LPIPS-VGG, one point per method (up and left is better)"))
    return plots


def run_benchmark(benchmark: str | os.PathLike, weights: str | os.PathLike, out: str | os.PathLike, *,
                  options: SampleOptions | None = None, settings: BenchmarkSettings | None = None,
                  suite: MetricSuite | None = None,
                  device: str = "auto", precision: str = "fp32", config: str | None = None,
                  allow_pickle: bool = False, progress: bool = False,
                  log: Callable[[str], None] = print) -> BenchmarkOutcome:
    """Upscale and evaluate a whole test set with the blind model and the baselines (module docstring).

    ``options``: `inference.SampleOptions` (steps, sampler, ζ, guidance, gradient, tiles). Every image
    gets the same ``settings.seed`` (as `blinddiff upscale --seed`), drawn per image, so batching and
    sharding change nothing. Under torchrun the cases (and the plot jobs) are sharded across ranks and
    rank 0 writes results.json/.csv/.md, the plots and report.html.
    """
    from .degradation import upsample_bicubic
    from .checkpoint import resolve_weights
    from .inference import BlindDiff, SampleOptions

    options = options or SampleOptions()
    settings = settings or BenchmarkSettings()
    settings.check()
    bench = load_benchmark(benchmark)
    peers = [b for b in PEERS if b in settings.baselines]
    check_peers(peers, bench.scale)  # before any upscaling: scale ×4, ncnn and the model files installed
    deconvolution = [b for b in DECONVOLUTION if b in settings.baselines]
    check_deconvolution(deconvolution, bench.scale)
    if not bench.has_kernels:  # real LR/HR pairs: nobody knows their blur
        needs_truth = [b for b in settings.baselines if b == "gt-kernel" or b.endswith("-gt")]
        if needs_truth:
            raise ValueError(f"baselines {','.join(needs_truth)} need the true kernel, which the real pairs of "
                             f"{bench.root} do not have; leave them out (e.g. --baselines bicubic,realesrgan)")
        settings = replace(settings, trajectory_cases=0)  # the traces score k̂_t against the true kernel
    if "gt-kernel" in settings.baselines and not options.uses_kernel:
        reason = (f"--zeta {options.zeta:g} turns that off (as --mode fidelity does)" if not options.zeta > 0
                  else f"--guidance {options.guidance} has none")
        raise ValueError(f"baseline gt-kernel would equal {METHOD}: the true kernel enters only the kernel-aware "
                         f"data term, and {reason}; leave gt-kernel out (--baselines bicubic) or pass --zeta > 0 "
                         f"with --guidance noise-aware or kernel-aware")
    if "blurry" in settings.baselines and bench.scale != 1:
        raise ValueError(f"baseline blurry (the input itself) is for deblurring, but the test set is ×{bench.scale}; "
                         f"use bicubic there")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={out} exists and is not a folder; choose another out folder")
    with distributed(device) as runtime:
        suite = suite or build_metric_suite()
        if not bench.has_kernels:
            suite = suite.without_kernel_metrics()
        suite = replace(suite, device=runtime.device,
                        networks={name: network.to(runtime.device) for name, network in suite.networks.items()})
        say = log if runtime.main else (lambda message: None)
        progress = progress and runtime.main
        model = BlindDiff.from_pretrained(weights, device=str(runtime.device), precision=precision, config=config,
                                          allow_pickle=allow_pickle)
        model.check_options(options, [settings.seed])  # once, up front: not once per case
        if model.scale != bench.scale:
            raise ValueError(f"weights {weights} upscale ×{model.scale} but the test set {bench.root} is "
                             f"×{bench.scale}; use matching weights or rebuild the test set with "
                             f"--scale {model.scale}")
        cases = _spread(bench.cases, settings.limit) if settings.limit else list(bench.cases)
        fingerprint = _fingerprint(resolve_weights(weights), bench, options, settings, model.precision)
        if runtime.main:
            out.mkdir(parents=True, exist_ok=True)
        runtime.barrier()
        _check_run_folder(out, fingerprint, runtime)
        seed = settings.seed

        def blind(lr: torch.Tensor, batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
            return model.run(lr, [seed] * len(batch), options)

        def bicubic(lr: torch.Tensor, batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
            return upsample_bicubic(lr, bench.scale).clamp(0, 1), None

        def gt_kernel(lr: torch.Tensor, batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
            given = torch.stack([torch.from_numpy(bench.gt_kernel(c)).float() for c in batch])
            return model.run(lr, [seed] * len(batch), options, kernel=given)[0], None

        def estimated_kernel(case: dict) -> np.ndarray:  # srmd-est: our kernel of the same run (computed first)
            path = out / METHOD / f"{case['name']}_kernel.npy"
            if not path.is_file():
                raise ValueError(f"no estimated kernel {path}: {METHOD} did not finish this case")
            return np.load(path, allow_pickle=False)

        def blurry(lr: torch.Tensor, batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
            return lr, None  # scale 1: the input itself, the deblurring tables' first row

        producers: dict[str, Producer] = {METHOD: blind, "bicubic": bicubic, "gt-kernel": gt_kernel, "blurry": blurry}
        producers.update(peer_producers(peers, bench.scale, gt_kernel=bench.gt_kernel,
                                        estimated_kernel=estimated_kernel))
        producers.update(deconvolution_producers(deconvolution, bench.scale, gt_kernel=bench.gt_kernel,
                                                 estimated_kernel=estimated_kernel))
        methods = [METHOD] + [b for b in ALL_BASELINES if b in settings.baselines]
        my_cases = shard(cases, runtime)
        order = {case["name"]: i for i, case in enumerate(bench.cases)}
        method_rows: dict[str, list[dict]] = {}
        problems: list[str] = []
        computed: dict[str, int] = {}
        resumed: dict[str, int] = {}
        for method in methods:
            method_suite = suite if method == METHOD else suite.without_kernel_metrics()
            rows, failed, computed[method], resumed[method] = _run_method(
                method, my_cases, producers[method], bench, out, method_suite, settings.batch_size, say, progress)
            method_rows[method] = _ordered(gather(runtime, rows), order)
            problems += failed
            if resumed[method]:
                where = "" if runtime.world == 1 else " (rank 0's shard)"
                say(f"{method}: {resumed[method]} finished case(s) resumed, {computed[method]} computed{where}")
        traces, sweep = _plot_jobs(model, bench, cases, out, options, settings, suite, runtime, say)
        problems = gather(runtime, problems)
        results = None
        if runtime.main:
            results = _write_outputs(out, bench, cases, method_rows, suite, options, settings, fingerprint,
                                     traces, sweep, problems, say)
    return BenchmarkOutcome(results, problems, computed, resumed)


def _write_outputs(out: Path, bench: BenchmarkSet, cases: list[dict], method_rows: dict[str, list[dict]],
                   suite: MetricSuite, options: SampleOptions, settings: BenchmarkSettings, fingerprint: dict,
                   traces: list[dict], sweep: list[dict], problems: list[str],
                   log: Callable[[str], None]) -> dict:
    """results.json/.csv/.md, plots and report.html (rank 0)."""
    metrics = [*suite.names, "seconds"]
    summaries: dict[str, dict[str, float]] = {}
    groups: dict[str, dict[str, dict[str, float]]] = {}
    for method, rows in method_rows.items():
        sr_paths = [out / method / f"{row['name']}.png" for row in rows]
        summaries[method] = summarize_set(rows, metrics, suite, bench, sr_paths)
        groups[method] = group_summaries(rows, metrics)
    table = markdown_table(summaries, metrics)
    group_names = dict.fromkeys(g for per_group in groups.values() for g in per_group)
    by_kernel = {f"{group} · {method}": groups[method][group] for group in group_names for method in groups
                 if group in groups[method]}
    markdown = (f"# Benchmark {bench.root.name} (×{bench.scale}, {bench.manifest.get('protocol', '?')}), "
                f"{len(cases)} case(s), {options.steps} steps, {_LUMA_TEXT[suite.luma]}\n\n{table}\n## By kernel\n\n"
                f"{markdown_table(by_kernel, metrics, first='kernel · method')}")
    all_rows = [{"method": method, **row} for method, rows in method_rows.items() for row in rows]
    write_csv(out / "results.csv", all_rows, row_columns(all_rows, metrics, lead=("method",)))
    results = {"benchmark": str(bench.root), "protocol": bench.manifest.get("protocol"), "scale": bench.scale,
               "cases": len(cases), "metrics": list(metrics), "luma": suite.luma, "settings": asdict(settings),
               "fingerprint": fingerprint,
               "methods": {m: {"mean": summaries[m], "groups": groups[m], "cases": method_rows[m]}
                           for m in method_rows},
               "trajectory": traces, "steps_sweep": sweep, "problems": problems}
    nulls = write_json(out / "results.json", results)
    if nulls:
        note = null_note("results.json", nulls)
        markdown += f"\n{note}\n"
        log(note)
    with atomic_write(out / "results.md", "w") as handle:
        handle.write(markdown)
    plots = _write_plots(out, traces, sweep, summaries, suite.luma)
    _write_report(out, bench, method_rows, summaries, table, plots, settings, options, suite.luma)
    log(table.rstrip())
    log(f"wrote {out / 'results.json'}, results.csv, results.md and {out / 'report.html'}")
    return results


# --------------------------------------------------------------------------------------------
# report.html (self-contained: inline CSS, images referenced by relative paths of files written here)
# --------------------------------------------------------------------------------------------


def _crop_box(height: int, width: int, size: int, scale: int) -> tuple[int, int, int, int]:
    """A centred (top, left, h, w) HR box on the s-grid, at most ``size`` pixels per side."""
    h = max(scale, min(size, height) // scale * scale)
    w = max(scale, min(size, width) // scale * scale)
    top = (height - h) // 2 // scale * scale
    left = (width - w) // 2 // scale * scale
    return top, left, h, w


def case_pictures(out: Path, bench: BenchmarkSet, case: dict, methods: Sequence[str],
                  crop: int) -> list[tuple[str, np.ndarray]]:
    """One case of the run folder ``out`` as pictures: centred crops of at most ``crop`` HR pixels per side
    (LR nearest-enlarged | bicubic | the methods found | HR), then the true and the estimated kernel
    (magnified) → [(label, uint8 pixels)]. report.html shows them; so can a README figure."""
    from .degradation import upsample_bicubic

    name, scale = case["name"], bench.scale
    hr = bench.hr(case)
    top, left, h, w = _crop_box(hr.shape[0], hr.shape[1], crop, scale)
    lr = bench.lr(case)
    lr_crop = lr[top // scale:(top + h) // scale, left // scale:(left + w) // scale]
    lr_label = f"LR (nearest ×{scale})" if scale > 1 else "blurry input"
    pictures = [(lr_label, np.repeat(np.repeat(lr_crop, scale, 0), scale, 1))]
    # LR | bicubic | ours | non-blind bound | peers | HR
    for method in ("bicubic", METHOD, "gt-kernel", *DECONVOLUTION, *PEERS):
        path = out / method / f"{name}.png"
        if method in methods and path.is_file():
            pictures.append((method, read_rgb(path)[top:top + h, left:left + w]))
        elif method == "bicubic" and scale > 1:  # not run as a baseline: made here, the same way
            bicubic = tensor_to_rgb(upsample_bicubic(_lr_batch(bench, [case]), scale).clamp(0, 1)[0])
            pictures.append(("bicubic", bicubic[top:top + h, left:left + w]))
    pictures.append(("HR", hr[top:top + h, left:left + w]))
    kernels = [("GT kernel", bench.gt_kernel(case))] if bench.has_kernels else []
    estimated = out / METHOD / f"{name}_kernel.npy"
    if estimated.is_file():
        kernels.append(("estimated kernel", np.load(estimated)))
    size = max((k.shape[0] for _, k in kernels), default=1)
    for label, kernel in kernels:
        pictures.append((label, kernel_picture(kernel, max(1, 96 // size))))
    return pictures


def _report_pictures(out: Path, bench: BenchmarkSet, case: dict, methods: Sequence[str],
                     settings: BenchmarkSettings) -> list[tuple[str, str]]:
    """`case_pictures` written under ``out/report`` → [(label, path relative to ``out``)]."""
    written = []
    for index, (label, pixels) in enumerate(case_pictures(out, bench, case, methods, settings.crop)):
        relative = f"report/{case['name']}_{index}.png"
        write_png(out / relative, np.ascontiguousarray(pixels))
        written.append((label, relative))
    return written


_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
figure{display:inline-block;margin:0 6px 6px 0;vertical-align:top;text-align:center}
figcaption{font-size:12px}img.crop{width:192px;image-rendering:pixelated}img.kernel{width:96px;
image-rendering:pixelated}.case{border-top:1px solid #ddd;padding-top:6px;margin-top:10px}
.plot{max-width:520px}"""


def _html_table(summaries: dict[str, dict[str, float]], metrics: Sequence[str], first: str) -> str:
    columns = [m for m in metrics if any(m in s for s in summaries.values())]
    head = "".join(f"<th>{html.escape(_LABELS.get(c, c))}</th>" for c in columns)
    body = "".join(f"<tr><td>{html.escape(label)}</td><td>{int(s.get('n', 0))}</td>"
                   + "".join(f"<td>{_format(c, s.get(c))}</td>" for c in columns) + "</tr>"
                   for label, s in summaries.items())
    return f"<table><tr><th>{html.escape(first)}</th><th>n</th>{head}</tr>{body}</table>"


def _write_report(out: Path, bench: BenchmarkSet, method_rows: dict[str, list[dict]],
                  summaries: dict[str, dict[str, float]], table: str, plots: list[tuple[str, str]],
                  settings: BenchmarkSettings, options: SampleOptions, luma: str) -> None:
    metrics = [m for m in (*ALL_METRICS, "seconds") if any(m in s for s in summaries.values())]
    methods = list(method_rows)
    finished = [row["name"] for row in method_rows[METHOD]]
    by_name = {case["name"]: case for case in bench.cases}
    esc = html.escape
    sampling = ", ".join(f"{k} {v}" for k, v in asdict(options).items() if v not in (None, {}))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>BlindDiff benchmark "
             f"{esc(bench.root.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>BlindDiff on {esc(bench.root.name)} (×{bench.scale}, "
             f"{esc(str(bench.manifest.get('protocol', '?')))})</h1>",
             f"<p>{len(method_rows[METHOD])} case(s); sampling: {esc(sampling)}; seed {settings.seed}. "
             f"PSNR/SSIM on {esc(_LUMA_TEXT[luma])}, with the scale cropped at each border (docs/method.md §1).</p>",
             "<h2>Means</h2>", _html_table(summaries, metrics, "method"),
             f"<details><summary>markdown</summary><pre>{esc(table)}</pre></details>"]
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [f"<figure><img class='plot' src='{esc(path)}' alt='{esc(caption)}'>"
                  f"<figcaption>{esc(caption)}</figcaption></figure>" for path, caption in plots]
    parts.append("<h2>Images</h2>")
    rows_by_method = {m: {r["name"]: r for r in rows} for m, rows in method_rows.items()}
    for name in _spread(finished, settings.report_cases):
        case = by_name[name]
        scores = "; ".join(
            f"{esc(m)}: " + ", ".join(f"{_LABELS.get(k, k).split()[0]} {_format(k, rows_by_method[m][name][k])}"
                                      for k in ("psnr", "ssim", "lpips_vgg", "kernel_l1")
                                      if k in rows_by_method[m][name])
            for m in methods if name in rows_by_method[m])
        parts.append(f"<div class='case'><h3>{esc(name)}</h3><p>{scores}</p>")
        for label, path in _report_pictures(out, bench, case, methods, settings):
            kind = "kernel" if "kernel" in label else "crop"
            parts.append(f"<figure><img class='{kind}' src='{esc(path)}' alt='{esc(label)}'>"
                         f"<figcaption>{esc(label)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("<p>Files: <a href='results.json'>results.json</a>, <a href='results.csv'>results.csv</a>, "
                 "<a href='results.md'>results.md</a>.</p></body></html>\n")
    with atomic_write(out / "report.html", "w") as handle:
        handle.write("\n".join(parts))
