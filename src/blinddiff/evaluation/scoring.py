"""Scoring SR files against a test set, and the means the tables show (docs/method.md §5; paper §4).

:func:`evaluate_results` scores a folder of results (``blinddiff evaluate``); :func:`score_file` scores one
saved result (also what a resumed benchmark case gets its missing metrics from); :func:`summarize`,
:func:`summarize_set` (+ FID over the set) and :func:`group_summaries` (per kernel) average the rows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..fileio import IMAGE_EXTENSIONS, ImageError, read_rgb
from ..hardware import Runtime, gather, shard
from ..kernels import validate_kernel
from ..metrics import KERNEL_METRICS, MetricSuite, set_fid
from ..testsets import BenchmarkSet, case_group, load_benchmark

__all__ = ["evaluate_results", "find_result", "format_metric", "group_summaries", "score_file", "summarize",
           "summarize_set"]

_FORMATS = {"psnr": ".2f", "ssim": ".4f", "lpips_vgg": ".4f", "lpips_alex": ".4f", "dists": ".4f", "niqe": ".3f",
            "kernel_l1": ".4f", "lr_psnr": ".2f", "fid": ".2f", "seconds": ".2f"}


def format_metric(name: str, value: float | None) -> str:
    """A metric value as the logs and tables print it (``–`` where there is none)."""
    if value is None:
        return "–"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return format(value, _FORMATS.get(name, ".4f"))


def case_row(case: dict) -> dict:
    """The columns every row of a case starts with: name, image (the HR stem) and kernel group."""
    return {"name": case["name"], "image": Path(case["hr"]).stem, "group": case_group(case)}


def case_order(bench: BenchmarkSet) -> dict[str, int]:
    """Case name → its index in the manifest (rows gathered from the ranks are put back in this order)."""
    return {case["name"]: i for i, case in enumerate(bench.cases)}


def in_case_order(rows: Sequence[dict], bench: BenchmarkSet) -> list[dict]:
    order = case_order(bench)
    return sorted(rows, key=lambda row: order.get(row["name"], len(order)))


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


def score_file(bench: BenchmarkSet, case: dict, sr_path: Path, kernel_path: Path | None,
               suite: MetricSuite, names: Sequence[str]) -> dict[str, float]:
    """Metrics ``names`` of one saved result; raises ImageError naming the file when it cannot be compared."""
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
            metrics = score_file(bench, case, sr_path, kernel_path, suite, names)
        except (ImageError, ValueError) as err:
            problems.append(str(err) if str(sr_path) in str(err) or name in str(err) else f"{name}: {err}")
            continue
        rows.append({**case_row(case), **metrics, "file": sr_path.name})
        if log is not None:
            log(f"{name}: " + ", ".join(f"{k} {format_metric(k, v)}" for k, v in metrics.items()))
    return in_case_order(gather(runtime, rows), bench), gather(runtime, problems)


# --------------------------------------------------------------------------------------------
# Means
# --------------------------------------------------------------------------------------------


def metric_mean(values: list[float]) -> float:
    """The mean, NaN if any value is NaN, and inf where a value is (an inf PSNR: identical images)."""
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
            summary[name] = metric_mean(values)
    return summary


def summarize_set(rows: Sequence[dict], metrics: Sequence[str], suite: MetricSuite, bench: BenchmarkSet,
                  sr_paths: Sequence[Path]) -> dict[str, float]:
    """:func:`summarize`, plus the FID of the SR files ``sr_paths`` (one per row) against their HR images
    when the suite has it (docs/method.md §5: FID is over the whole test set)."""
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
