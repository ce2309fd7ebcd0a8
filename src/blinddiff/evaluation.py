"""The evaluation suite: the paper's tables from one command (SPEC §2 "Metrics", §6; paper §4, Fig. 7).

* :func:`evaluate_results` — score a folder of SR results against a synthetic test set written by
  ``blinddiff make-benchmark`` (``manifest.json``): PSNR/SSIM (Y, ``scale`` border; studio-swing
  or full-range luma), LPIPS-VGG, LPIPS-Alex, DISTS, NIQE, kernel L1 and LR-PSNR per image
  (``blinddiff.metrics``), FID over the set.
* :func:`run_benchmark` — upscale every case with the blind MAP reverse process, and the baselines
  (plain bicubic ×s; the same model in non-blind mode with the ground-truth kernel; on request the
  peer methods of ``blinddiff.peers``: Real-ESRGAN, RealSR, SRMD given the true or our estimated
  kernel), evaluate them,
  and write ``results.json/.csv/.md`` and a self-contained ``report.html`` with crops, kernels and
  matplotlib plots: Fig. 7a (per-step PSNR of x̂0 and kernel L1 along the reverse process), quality
  against the number of steps, and perception–distortion (PSNR vs LPIPS-VGG, one point per
  method). Finished cases are recorded one file each, so a run resumes.
* Both shard their cases across ``torchrun`` ranks (case i → rank i mod world) and gather the
  per-case results on rank 0, which alone writes the tables: the numbers do not depend on the
  number of processes.
* :func:`measure_speed` — forward, guided-step and whole-sample time and peak memory per precision
  and compile mode, measured in one run so the ratios are meaningful (``blinddiff bench-speed``).

Run folder layout (``benchmark``): ``<method>/<name>.png`` (+ ``<name>_kernel.npy/.png`` for the
blind method, the files ``blinddiff upscale`` writes, so ``evaluate --sr RUN/blinddiff`` gives the
same numbers), ``<method>/records/<name>.json`` (one per finished case), ``plots/``, ``report/``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import html
import io
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import unreadable_torch_file
from .fileio import IMAGE_EXTENSIONS, ImageError, atomic_write, check_name_part, image_size, inside, read_rgb, \
    tensor_to_rgb, write_json, write_npy, write_png
from .metrics import DISTS, LPIPS, LUMA, METRIC_NAMES, PERCEPTUAL_METRICS, evaluate_pair, fid_from_images, \
    installed_weights, kernel_l1, load_niqe_params, load_perceptual, psnr
from .peers import PEERS, check_peers, peer_producers
from .train import Runtime, setup_runtime

if TYPE_CHECKING:
    from .inference import BlindDiff, SampleOptions

__all__ = [
    "ALL_BASELINES", "BASELINES", "METHOD", "BenchmarkOutcome", "BenchmarkSet", "BenchmarkSettings", "MetricSuite",
    "add_evaluation_commands", "build_metric_suite", "evaluate_results", "line_plot", "load_benchmark",
    "markdown_table", "measure_speed", "run_benchmark", "scatter_plot", "speed_table", "summarize",
]

METHOD = "blinddiff"  # the blind MAP reverse process (ours)
BASELINES = ("bicubic", "gt-kernel")  # the default; the peers (blinddiff.peers) need `make peers`
ALL_BASELINES = BASELINES + PEERS
KERNEL_METRICS = ("kernel_l1", "lr_psnr")
SET_METRICS = ("fid",)  # one value per test set, not per image
ALL_METRICS = METRIC_NAMES + SET_METRICS
DEFAULT_METRICS = ("psnr", "ssim", "lpips_vgg", "kernel_l1", "lr_psnr")  # lpips_vgg when its weights are installed
LUMA_METRICS = ("psnr", "ssim", "lr_psnr")  # computed on Y, so they depend on --luma

_LABELS = {"psnr": "PSNR ↑", "ssim": "SSIM ↑", "lpips_vgg": "LPIPS-VGG ↓", "lpips_alex": "LPIPS-Alex ↓",
           "dists": "DISTS ↓", "niqe": "NIQE ↓", "kernel_l1": "kernel L1 ↓", "lr_psnr": "LR-PSNR ↑", "fid": "FID ↓",
           "seconds": "s / image ↓"}
_FORMATS = {"psnr": ".2f", "ssim": ".4f", "lpips_vgg": ".4f", "lpips_alex": ".4f", "dists": ".4f", "niqe": ".3f",
            "kernel_l1": ".4f", "lr_psnr": ".2f", "fid": ".2f", "seconds": ".2f"}
_LUMA_TEXT = {"studio": "studio-swing Y (BT.601, 16–235)", "full": "full-range luma (0.299R + 0.587G + 0.114B)"}


# --------------------------------------------------------------------------------------------
# The test set (written by `blinddiff make-benchmark`)
# --------------------------------------------------------------------------------------------


@dataclass
class BenchmarkSet:
    """A synthetic test set: its folder, its manifest and the per-case records (testsets module)."""

    root: Path
    manifest: dict
    _hr: tuple[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def cases(self) -> list[dict]:
        return self.manifest["cases"]

    @property
    def scale(self) -> int:
        return int(self.manifest["scale"])

    @property
    def downsample(self) -> str:
        return str(self.manifest.get("downsample", "bicubic"))

    def hr(self, case: dict) -> np.ndarray:
        """uint8 HR [H, W, 3] of a case (the last one is cached: the cases of one image are adjacent)."""
        if self._hr is None or self._hr[0] != case["hr"]:
            self._hr = (case["hr"], read_rgb(self.root / case["hr"]))
        return self._hr[1]

    def lr(self, case: dict) -> np.ndarray:
        return read_rgb(self.root / case["lr"])

    def gt_kernel(self, case: dict) -> np.ndarray:
        return np.load(self.root / case["kernel"], allow_pickle=False)


def load_benchmark(root: str | os.PathLike) -> BenchmarkSet:
    """Read ``root/manifest.json``; errors name the file and how to make one."""
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; build the test set with `blinddiff make-benchmark --hr HR_DIR "
                                f"--out {root}` (or pass the folder that holds manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rebuild it with blinddiff make-benchmark") from None
    cases = manifest.get("cases") if isinstance(manifest, dict) else None
    needed = ("name", "hr", "lr", "kernel")
    if not isinstance(cases, list) or "scale" not in manifest or \
            not all(isinstance(c, dict) and all(k in c for k in needed) for c in cases):
        raise ValueError(f"{path} is not a blinddiff test-set manifest (needs 'scale' and 'cases' with "
                         f"{', '.join(needed)}); rebuild it with blinddiff make-benchmark")
    if not cases:
        raise ValueError(f"{path} lists no cases; rebuild the test set from a folder of HR images")
    scale = manifest["scale"]
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"{path}: scale {scale!r} is not a positive integer; rebuild it with blinddiff make-benchmark")
    for index, case in enumerate(cases):  # every path stays inside the test set, every name is a file name
        try:
            if not isinstance(case["name"], str) or not case["name"]:
                raise ValueError(f"name {case['name']!r} is not a file name")
            check_name_part(case["name"], "name")
            for key in ("hr", "lr", "kernel"):
                inside(root, case[key], key)
        except ValueError as err:
            raise ValueError(f"{path}: case {index + 1}: {err}; fix or rebuild the manifest") from None
    return BenchmarkSet(root, manifest)


def case_group(case: dict) -> str:
    """The kernel a case belongs to, for per-kernel means (σ of Gaussian8, else the kernel type)."""
    if "sigma" in case:
        return f"sigma {float(case['sigma']):g}"
    return str(case.get("kernel_type", "all"))


def _case_row(case: dict) -> dict:
    return {"name": case["name"], "image": Path(case["hr"]).stem, "group": case_group(case)}


# --------------------------------------------------------------------------------------------
# Metrics of one result
# --------------------------------------------------------------------------------------------


@dataclass
class MetricSuite:
    """The metrics asked for, with what they need loaded once (LPIPS/DISTS networks, NIQE and FID files)."""

    names: tuple[str, ...]
    networks: dict[str, LPIPS | DISTS] = field(default_factory=dict)  # metric name → network
    luma: str = "studio"  # Y of PSNR/SSIM/LR-PSNR: "studio" (16–235, the paper's) or "full"
    niqe_params: Path | None = None
    fid_weights: Path | None = None
    device: torch.device = torch.device("cpu")

    @property
    def image_metrics(self) -> tuple[str, ...]:
        return tuple(name for name in self.names if name not in SET_METRICS)

    @property
    def needs_kernels(self) -> bool:
        return any(name in KERNEL_METRICS for name in self.names)

    def without_kernel_metrics(self) -> MetricSuite:
        """For methods without an estimated kernel (the baselines)."""
        return replace(self, names=tuple(n for n in self.names if n not in KERNEL_METRICS))

    def score(self, sr: np.ndarray, hr: np.ndarray, *, scale: int, downsample: str,
              kernel: np.ndarray | None = None, gt_kernel: np.ndarray | None = None,
              names: Sequence[str] | None = None) -> dict[str, float]:
        """Per-image metrics (SPEC §2 Metrics) of a uint8 SR [H, W, 3] against its HR."""
        names = tuple(self.image_metrics if names is None else names)
        return evaluate_pair(sr, hr, scale=scale, metrics=names, networks=self.networks, luma=self.luma,
                             niqe_params=self.niqe_params, downsample=downsample,
                             kernel=None if kernel is None else torch.as_tensor(kernel, dtype=torch.float32),
                             gt_kernel=None if gt_kernel is None else torch.as_tensor(gt_kernel, dtype=torch.float32))


def _installed(name: str) -> bool:
    try:
        installed_weights(name)  # type: ignore[arg-type]
    except FileNotFoundError:
        return False
    return True


def parse_metrics(text: str | Sequence[str] | None, lpips_net: str = "vgg") -> tuple[str, ...]:
    """``"psnr,ssim"`` or a sequence → validated names (no duplicates; ``lpips`` stands for
    ``lpips_<lpips_net>``); None → the defaults, LPIPS-VGG only if its weights are installed."""
    if text is None:
        return tuple(name for name in DEFAULT_METRICS if name != "lpips_vgg" or _installed("vgg"))
    items = [part.strip() for part in (text.split(",") if isinstance(text, str) else text) if part.strip()]
    items = [f"lpips_{lpips_net}" if name == "lpips" else name for name in items]
    unknown = [name for name in items if name not in ALL_METRICS]
    if unknown or not items:
        raise ValueError(f"--metrics {text!r}: unknown or empty {unknown}; choose from lpips,"
                         f"{','.join(ALL_METRICS)}")
    return tuple(dict.fromkeys(items))


def build_metric_suite(metrics: str | Sequence[str] | None = None, *, lpips_backbone: str | None = None,
                       lpips_linear: str | None = None, lpips_net: str = "vgg", luma: str = "studio",
                       niqe_params: str | None = None, fid_weights: str | None = None,
                       device: torch.device | str = "cpu") -> MetricSuite:
    """Validate the metric names and load what they need; fails early, naming a missing file.

    ``metrics=None``: PSNR, SSIM, LPIPS-VGG (when installed), kernel L1, LR-PSNR, plus LPIPS-``lpips_net``
    / NIQE / FID when their files are given. LPIPS and DISTS use the weights installed by ``make
    metric-weights``; ``lpips_backbone`` + ``lpips_linear`` (torchvision and official LPIPS files)
    replace them for ``lpips_<lpips_net>``. NIQE and FID need their local files.
    """
    if lpips_net not in ("vgg", "alex"):
        raise ValueError(f"--lpips-net {lpips_net!r} is invalid; use vgg (the paper's) or alex")
    if luma not in LUMA:
        raise ValueError(f"--luma {luma!r} is invalid; use one of {', '.join(LUMA)}")
    if bool(lpips_backbone) != bool(lpips_linear):
        raise ValueError("give both --lpips-backbone and --lpips-linear (torchvision and LPIPS v0.1 files), or "
                         "neither for the installed weights")
    names = list(parse_metrics(metrics, lpips_net))
    if metrics is None:
        names += [name for name, given in ((f"lpips_{lpips_net}", lpips_backbone), ("niqe", niqe_params),
                                           ("fid", fid_weights)) if given and name not in names]
    device = torch.device(device)
    suite = MetricSuite(tuple(names), luma=luma, device=device)
    for name in PERCEPTUAL_METRICS:
        if name not in names:
            continue
        if lpips_backbone and lpips_linear and name == f"lpips_{lpips_net}":
            try:
                network: LPIPS | DISTS = LPIPS.from_weights(lpips_backbone, lpips_linear, net=lpips_net)
            except (FileNotFoundError, ValueError):
                raise
            except Exception as err:  # a damaged or malicious file: name both, never suggest unpickling
                raise unreadable_torch_file(f"--lpips-backbone {lpips_backbone} or --lpips-linear {lpips_linear}",
                                            err) from None
        else:
            network = load_perceptual(name)  # FileNotFoundError naming `make metric-weights`
        suite.networks[name] = network.to(device)
    if "niqe" in names:
        if not niqe_params:
            raise ValueError("metric niqe needs --niqe-params PATH (e.g. ../shared/weights/niqe/niqe_pris_params.npz)")
        try:
            load_niqe_params(niqe_params)  # raises FileNotFoundError naming the file
        except (FileNotFoundError, ValueError):
            raise
        except Exception as err:  # not an .npz at all (a .npy, text, a damaged archive)
            raise ValueError(f"--niqe-params {niqe_params} is not a NIQE parameter .npz ({type(err).__name__}: "
                             f"{err}); pass BasicSR's niqe_pris_params.npz") from None
        suite.niqe_params = Path(niqe_params)
    if "fid" in names:
        if not fid_weights:
            raise ValueError("metric fid needs --fid-weights PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
        if not Path(fid_weights).is_file():
            raise FileNotFoundError(f"FID Inception weights not found: {fid_weights}; pass the local "
                                    "pt_inception-2015-12-05-6726825d.pth")
        try:
            import pytorch_fid  # noqa: F401
        except ImportError:
            raise ValueError("metric fid needs the optional package pytorch-fid (pip install pytorch-fid); "
                             "or leave fid out of --metrics") from None
        suite.fid_weights = Path(fid_weights)
    return suite


def _set_fid(suite: MetricSuite, sr_paths: Sequence[Path], hr_paths: Sequence[Path]) -> float | None:
    """FID of the SR images against the HR of each case (SPEC §2: over the whole test set)."""
    if suite.fid_weights is None or len(sr_paths) < 2:
        return None
    return fid_from_images((read_rgb(p) for p in sr_paths), (read_rgb(p) for p in hr_paths),
                           inception_weights=suite.fid_weights, device=suite.device)


# --------------------------------------------------------------------------------------------
# Sharding across torchrun ranks
# --------------------------------------------------------------------------------------------


def _shard(items: Sequence[Any], runtime: Runtime) -> list[Any]:
    """Item i goes to rank i mod world."""
    return list(items[runtime.rank::runtime.world])


def _gather(runtime: Runtime, items: list[Any]) -> list[Any]:
    """Every rank's list, concatenated (the same on every rank); order is restored by the caller."""
    if runtime.world == 1:
        return items
    parts: list[list[Any] | None] = [None] * runtime.world
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in (part or [])]


def _ordered(rows: Iterable[dict], order: dict[str, int]) -> list[dict]:
    return sorted(rows, key=lambda row: order.get(row["name"], len(order)))


class _Distributed:
    """The torchrun runtime for one command; tears down the process group only if it started it."""

    def __init__(self, device: str) -> None:
        self.started = dist.is_available() and not dist.is_initialized()
        self.runtime = setup_runtime(device)

    def __enter__(self) -> Runtime:
        return self.runtime

    def __exit__(self, *exc: object) -> None:
        if self.runtime.world > 1 and self.started and dist.is_initialized():
            if exc[0] is None:
                dist.barrier()
            dist.destroy_process_group()


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
        if kernel.ndim != 2 or not np.isfinite(kernel).all():
            raise ImageError(f"{kernel_path}: expected a finite [k, k] kernel, got shape {kernel.shape}")
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
    names = suite.image_metrics
    rows: list[dict] = []
    problems: list[str] = []
    for case in _shard(bench.cases, runtime):
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
    return _ordered(_gather(runtime, rows), order), _gather(runtime, problems)


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


def _row_columns(rows: Sequence[dict], metrics: Sequence[str], lead: Sequence[str] = ()) -> list[str]:
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


def _save_figure(figure: Any, path: str | os.PathLike) -> None:
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
    _save_figure(figure, path)


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
    _save_figure(figure, path)


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
            raise ValueError(f"--baselines {','.join(self.baselines)}: unknown {unknown}; use some of "
                             f"{','.join(ALL_BASELINES)} (or 'none')")
        for name in ("batch_size", "crop"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} {getattr(self, name)} is invalid; use 1 or more")
        for name in ("trajectory_cases", "sweep_cases", "report_cases"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} is invalid; use 0 or more")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit {self.limit} is invalid; use 1 or more (or leave it out for all cases)")
        if self.trajectory_steps is not None and self.trajectory_steps < 1:
            raise ValueError(f"--trajectory-steps {self.trajectory_steps} is invalid; use 1 or more")
        bad = [s for s in self.steps_sweep if s < 1]
        if bad:
            raise ValueError(f"--steps-sweep has invalid step counts {bad}; use positive integers, e.g. 2,5,10")


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


def _read_record(path: Path) -> dict | None:
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
    return record


def _lr_batch(bench: BenchmarkSet, cases: Sequence[dict]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(bench.lr(c)).permute(2, 0, 1) for c in cases]).float() / 255.0


def _batches(bench: BenchmarkSet, cases: Sequence[dict], batch_size: int) -> list[list[dict]]:
    """Cases grouped by LR size and kernel size (one tensor per batch), ``batch_size`` at a time."""
    groups: dict[tuple, list[dict]] = {}
    for case in cases:
        key = (image_size(bench.root / case["lr"]), bench.gt_kernel(case).shape)
        groups.setdefault(key, []).append(case)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


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

    from .inference import kernel_picture

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
    for batch in _batches(bench, pending, batch_size):
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
            write_png(folder / f"{name}.png", pixels)
            files = [f"{name}.png"]
            kernel = None
            if kernels is not None:
                kernel = kernels[index].numpy()
                write_npy(folder / f"{name}_kernel.npy", kernel)
                write_png(folder / f"{name}_kernel.png", kernel_picture(kernel))
                files += [f"{name}_kernel.npy", f"{name}_kernel.png"]
            try:
                metrics = suite.score(pixels, bench.hr(case), scale=bench.scale, downsample=bench.downsample,
                                      kernel=kernel, gt_kernel=bench.gt_kernel(case) if kernel is not None else None)
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
    from .inference import sha256_of

    manifest = {k: v for k, v in bench.manifest.items() if k != "cases"}
    return {"weights_sha256": sha256_of(weights), "benchmark": manifest, "cases_sha256": _cases_digest(bench),
            "sampling": asdict(options), "seed": settings.seed, "precision": precision}


def _cases_digest(bench: BenchmarkSet) -> str:
    """sha256 over the case records and the bytes of every file they name: a test set rebuilt in place
    with other content is another test set."""
    import hashlib

    digest = hashlib.sha256(json.dumps(bench.cases, sort_keys=True).encode())
    for relative in dict.fromkeys(case[key] for case in bench.cases for key in ("hr", "lr", "kernel")):
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
    names = [n for n in suite.image_metrics if n != "niqe"]
    metrics = suite.score(tensor_to_rgb(sr[0]), bench.hr(case), scale=bench.scale, downsample=bench.downsample,
                          kernel=kernel[0].numpy(), gt_kernel=bench.gt_kernel(case),
                          names=list(dict.fromkeys(names + ["psnr", "kernel_l1"])))
    return {"name": case["name"], "steps": steps, "luma": suite.luma, **metrics}


def _plot_jobs(model: BlindDiff, bench: BenchmarkSet, cases: Sequence[dict], out: Path, options: SampleOptions,
               settings: BenchmarkSettings, suite: MetricSuite, runtime: Runtime,
               log: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    """Traces (Fig. 7a) and the steps sweep, sharded like the cases and resumable (plots/records/)."""
    trace_steps = settings.trajectory_steps or options.steps
    jobs = [("trace", case, trace_steps) for case in _spread(cases, settings.trajectory_cases)]
    jobs += [("sweep", case, steps) for steps in settings.steps_sweep for case in _spread(cases, settings.sweep_cases)]
    done: list[tuple[str, dict]] = []
    for kind, case, steps in _shard(jobs, runtime):
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
    gathered = _gather(runtime, done)
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
    from .inference import BlindDiff, SampleOptions, resolve_weights

    options = options or SampleOptions()
    settings = settings or BenchmarkSettings()
    settings.check()
    bench = load_benchmark(benchmark)
    peers = [b for b in PEERS if b in settings.baselines]
    check_peers(peers, bench.scale)  # before any upscaling: scale ×4, ncnn and the model files installed
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder; choose another --out")
    with _Distributed(device) as runtime:
        suite = suite or build_metric_suite()
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

        producers: dict[str, Producer] = {METHOD: blind, "bicubic": bicubic, "gt-kernel": gt_kernel}
        producers.update(peer_producers(peers, bench.scale, gt_kernel=bench.gt_kernel,
                                        estimated_kernel=estimated_kernel))
        methods = [METHOD] + [b for b in ALL_BASELINES if b in settings.baselines]
        shard = _shard(cases, runtime)
        order = {case["name"]: i for i, case in enumerate(bench.cases)}
        method_rows: dict[str, list[dict]] = {}
        problems: list[str] = []
        computed: dict[str, int] = {}
        resumed: dict[str, int] = {}
        for method in methods:
            method_suite = suite if method == METHOD else suite.without_kernel_metrics()
            rows, failed, computed[method], resumed[method] = _run_method(
                method, shard, producers[method], bench, out, method_suite, settings.batch_size, say, progress)
            method_rows[method] = _ordered(_gather(runtime, rows), order)
            problems += failed
            if resumed[method]:
                where = "" if runtime.world == 1 else " (rank 0's shard)"
                say(f"{method}: {resumed[method]} finished case(s) resumed, {computed[method]} computed{where}")
        traces, sweep = _plot_jobs(model, bench, cases, out, options, settings, suite, runtime, say)
        problems = _gather(runtime, problems)
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
        summaries[method] = summarize(rows, metrics)
        groups[method] = group_summaries(rows, metrics)
        if "fid" in metrics:
            hr_of = {c["name"]: bench.root / c["hr"] for c in cases}
            fid = _set_fid(suite, [out / method / f"{r['name']}.png" for r in rows], [hr_of[r["name"]] for r in rows])
            if fid is not None:
                summaries[method]["fid"] = fid
    table = markdown_table(summaries, metrics)
    group_names = dict.fromkeys(g for per_group in groups.values() for g in per_group)
    by_kernel = {f"{group} · {method}": groups[method][group] for group in group_names for method in groups
                 if group in groups[method]}
    markdown = (f"# Benchmark {bench.root.name} (×{bench.scale}, {bench.manifest.get('protocol', '?')}), "
                f"{len(cases)} case(s), {options.steps} steps, {_LUMA_TEXT[suite.luma]}\n\n{table}\n## By kernel\n\n"
                f"{markdown_table(by_kernel, metrics, first='kernel · method')}")
    with atomic_write(out / "results.md", "w") as handle:
        handle.write(markdown)
    all_rows = [{"method": method, **row} for method, rows in method_rows.items() for row in rows]
    write_csv(out / "results.csv", all_rows, _row_columns(all_rows, metrics, lead=("method",)))
    results = {"benchmark": str(bench.root), "protocol": bench.manifest.get("protocol"), "scale": bench.scale,
               "cases": len(cases), "metrics": list(metrics), "luma": suite.luma, "settings": asdict(settings),
               "fingerprint": fingerprint,
               "methods": {m: {"mean": summaries[m], "groups": groups[m], "cases": method_rows[m]}
                           for m in method_rows},
               "trajectory": traces, "steps_sweep": sweep, "problems": problems}
    write_json(out / "results.json", results)
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


def _report_pictures(out: Path, bench: BenchmarkSet, case: dict, methods: Sequence[str],
                     settings: BenchmarkSettings) -> list[tuple[str, str]]:
    """Crops (LR nearest-enlarged | bicubic | methods | HR) and kernel pictures → [(label, relative path)]."""
    from .degradation import upsample_bicubic
    from .inference import kernel_picture

    name, scale = case["name"], bench.scale
    hr = bench.hr(case)
    top, left, h, w = _crop_box(hr.shape[0], hr.shape[1], settings.crop, scale)
    lr = bench.lr(case)
    lr_crop = lr[top // scale:(top + h) // scale, left // scale:(left + w) // scale]
    pictures = [(f"LR (nearest ×{scale})", np.repeat(np.repeat(lr_crop, scale, 0), scale, 1))]
    for method in ("bicubic", METHOD, "gt-kernel", *PEERS):  # LR | bicubic | ours | non-blind bound | peers | HR
        path = out / method / f"{name}.png"
        if method in methods and path.is_file():
            pictures.append((method, read_rgb(path)[top:top + h, left:left + w]))
        elif method == "bicubic":  # not run as a baseline: made here, the same way
            bicubic = tensor_to_rgb(upsample_bicubic(_lr_batch(bench, [case]), scale).clamp(0, 1)[0])
            pictures.append(("bicubic", bicubic[top:top + h, left:left + w]))
    pictures.append(("HR", hr[top:top + h, left:left + w]))
    gt = bench.gt_kernel(case)
    kernels = [("GT kernel", gt)]
    estimated = out / METHOD / f"{name}_kernel.npy"
    if estimated.is_file():
        kernels.append(("estimated kernel", np.load(estimated)))
    size = max(k.shape[0] for _, k in kernels)
    for label, kernel in kernels:
        pictures.append((label, kernel_picture(kernel, max(1, 96 // size))))
    written = []
    for index, (label, pixels) in enumerate(pictures):
        relative = f"report/{name}_{index}.png"
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
             f"PSNR/SSIM on {esc(_LUMA_TEXT[luma])}, with the scale cropped at each border (SPEC §2).</p>",
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


# --------------------------------------------------------------------------------------------
# Speed and memory (bench-speed)
# --------------------------------------------------------------------------------------------

SPEED_VARIANTS = ("forward", "guided step (∂/∂x_t)", "guided step (∂/∂x̂0)", "sample")


def _rss_mib(field_name: str) -> float | None:
    """VmRSS / VmHWM of this process in MiB from /proc (Linux), else None."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where the peak cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _memory_now(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    current = _rss_mib("VmRSS")
    if current is not None:
        return current
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # a peak, the best there is


def _memory_peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _rss_mib("VmHWM")
    return peak if peak is not None else _memory_now(device)


def measure_speed(config: str, *, size: int | None = None, steps: int = 10, batch: int = 1,
                  precisions: Sequence[str] = ("fp32", "bf16"), compile_modes: Sequence[bool] = (False,),
                  repeats: int = 3, device: str = "auto", seed: int = 0,
                  log: Callable[[str], None] | None = None) -> list[dict]:
    """Time the pieces of the reverse process with random weights of ``config`` (SPEC §5), in one run.

    Per (precision, eager/compiled): a plain forward (no grad), one guided step with ∂E/∂x_t through
    the network (the paper), one with ∂E/∂x̂0, and a whole ``steps``-step sample, on a batch of HR
    ``size``² images (LR size/scale). ``seconds`` is the best of ``repeats`` after a warm-up (robust to
    other load on shared machines; the median is kept too). Memory: peak allocated on CUDA; elsewhere
    peak RSS (VmHWM, reset before each variant) and its increase over the RSS before the variant — the
    allocator keeps freed memory, so on the CPU later variants show only what they add beyond it.
    Returns one dict per (mode, variant).
    """
    from .config import load_config
    from .hardware import autocast, pick_device, resolve_precision
    from .inference import BlindDiff, SampleOptions
    from .model import MCFormer

    cfg = load_config(config)
    size = size or cfg.data.crop
    scale = cfg.data.scale
    if size < scale or size % scale:
        raise ValueError(f"--size {size} is invalid; use a multiple of the scale {scale} (e.g. {8 * scale})")
    if steps < 1 or repeats < 1 or batch < 1:
        raise ValueError(f"steps {steps}, repeats {repeats} and batch {batch} must all be ≥ 1")
    target = pick_device(device)
    torch.manual_seed(seed)
    network = MCFormer(cfg.model).eval().requires_grad_(False).to(target)
    generator = torch.Generator().manual_seed(seed)
    lr = torch.rand(batch, 3, size // scale, size // scale, generator=generator)
    x_t = torch.randn(batch, 3, size, size, generator=generator).to(target)
    t = torch.full((batch,), cfg.diffusion.steps // 2, device=target)
    rows: list[dict] = []
    for compiled in compile_modes:
        for precision in precisions:
            resolved = resolve_precision(precision, target)
            net = torch.compile(network) if compiled else network
            runner = BlindDiff(network, cfg, target, resolved)
            runner.model = net  # BlindDiff.run calls self.model; the compiled module is a drop-in
            mode = f"{resolved} {'compiled' if compiled else 'eager'}"
            lr_device = lr.to(target)

            def forward() -> None:
                with torch.no_grad(), autocast(resolved, target):
                    net(x_t, t, lr_device)

            variants: dict[str, Callable[[], object]] = {
                SPEED_VARIANTS[0]: forward,
                SPEED_VARIANTS[1]: lambda: runner.run(lr, [seed] * batch, SampleOptions(steps=1, gradient="xt")),
                SPEED_VARIANTS[2]: lambda: runner.run(lr, [seed] * batch, SampleOptions(steps=1, gradient="x0")),
                SPEED_VARIANTS[3]: lambda: runner.run(lr, [seed] * batch, SampleOptions(steps=steps)),
            }
            for variant, fn in variants.items():
                gc.collect()
                if target.type == "cuda":
                    torch.cuda.synchronize(target)
                    torch.cuda.reset_peak_memory_stats(target)
                resettable = target.type == "cuda" or _reset_peak_rss()
                before = _memory_now(target)
                for _ in range(2 if compiled else 1):
                    fn()
                times = []
                for _ in range(repeats):
                    if target.type == "cuda":
                        torch.cuda.synchronize(target)
                    start = time.perf_counter()
                    fn()
                    if target.type == "cuda":
                        torch.cuda.synchronize(target)
                    times.append(time.perf_counter() - start)
                peak = _memory_peak(target)
                row = {"mode": mode, "variant": variant, "seconds": min(times),
                       "median_seconds": statistics.median(times),
                       "peak_mib": peak,
                       "increase_mib": max(peak - before, 0.0), "peak_is_per_variant": resettable,
                       "config": cfg.name, "hr_size": size, "batch": batch, "steps": steps if variant == "sample"
                       else 1, "device": str(target)}
                rows.append(row)
                if log is not None:
                    log(f"{mode:>14} {variant:<22} {row['seconds']:.4f} s  peak {peak:.0f} MiB")
    return rows


def speed_table(rows: Sequence[dict]) -> str:
    """Markdown: time, × forward of the same mode, × the first mode's same variant, memory."""
    forward = {r["mode"]: r["seconds"] for r in rows if r["variant"] == SPEED_VARIANTS[0]}
    first_mode = rows[0]["mode"] if rows else ""
    reference = {r["variant"]: r["seconds"] for r in rows if r["mode"] == first_mode}
    memory = "peak MiB" if all(r["peak_is_per_variant"] for r in rows) else "process peak MiB"
    lines = [f"| mode | variant | best time (s) | × forward | × {first_mode} | {memory} | + MiB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = r["variant"] if r["variant"] != "sample" else f"sample ({r['steps']} steps)"
        lines.append(f"| {r['mode']} | {name} | {r['seconds']:.4f} | {r['seconds'] / forward[r['mode']]:.2f} | "
                     f"{r['seconds'] / reference[r['variant']]:.2f} | {r['peak_mib']:.0f} | {r['increase_mib']:.0f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line: `blinddiff evaluate | benchmark | bench-speed`
# --------------------------------------------------------------------------------------------


def _add_metric_options(parser: argparse.ArgumentParser, device: bool = True) -> None:
    parser.add_argument("--metrics", default=None,
                        help=f"comma-separated, from {','.join(ALL_METRICS)}; lpips = lpips_<--lpips-net> (default: "
                             "psnr,ssim,lpips_vgg,kernel_l1,lr_psnr, LPIPS when installed by `make metric-weights`, "
                             "plus niqe/fid when their files are given)")
    parser.add_argument("--luma", choices=LUMA, default="studio",
                        help="Y of PSNR/SSIM/LR-PSNR: studio-swing 16–235 (the paper's method rows, BasicSR) or "
                             "full-range 0.299R+0.587G+0.114B (the published Bicubic rows; 20·log10(255/219) = 1.32 dB "
                             "lower PSNR)")
    parser.add_argument("--lpips-backbone", default=None,
                        help="local torchvision VGG16 (or AlexNet) weights file, instead of the installed weights")
    parser.add_argument("--lpips-linear", default=None, help="local LPIPS v0.1 linear-layer file (vgg.pth / alex.pth)")
    parser.add_argument("--lpips-net", choices=("vgg", "alex"), default="vgg",
                        help="backbone of --metrics lpips and of the path options (paper: vgg)")
    parser.add_argument("--niqe-params", default=None, help="NIQE pristine parameters (.npz)")
    parser.add_argument("--fid-weights", default=None, help="pytorch-fid Inception weights (.pth); needs pytorch-fid")
    if device:
        parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def _suite_from(args: argparse.Namespace, device: torch.device) -> MetricSuite:
    return build_metric_suite(args.metrics, lpips_backbone=args.lpips_backbone,
                              lpips_linear=args.lpips_linear, lpips_net=args.lpips_net, luma=args.luma,
                              niqe_params=args.niqe_params, fid_weights=args.fid_weights, device=device)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .cli import report

    check_name_part(args.suffix, "--suffix")
    bench = load_benchmark(args.benchmark)
    sr_dir = Path(args.sr)
    with _Distributed(args.device) as runtime:
        suite = _suite_from(args, runtime.device)
        if args.metrics is None and not any(sr_dir.glob("*_kernel.npy")):
            suite = suite.without_kernel_metrics()  # no estimated kernels there: no kernel metrics by default
        rows, problems = evaluate_results(bench, sr_dir, suite, suffix=args.suffix, runtime=runtime)
        if not runtime.main:
            return 0  # rank 0 reports the problems and carries the exit status
        label = sr_dir.name or str(sr_dir)
        summary = summarize(rows, suite.names)
        if "fid" in suite.names:
            hr_of = {case["name"]: bench.root / case["hr"] for case in bench.cases}
            fid = _set_fid(suite, [sr_dir / row["file"] for row in rows], [hr_of[row["name"]] for row in rows])
            if fid is not None:
                summary["fid"] = fid
        json_path = Path(args.json) if args.json else sr_dir / "metrics.json"
        csv_path = Path(args.csv) if args.csv else sr_dir / "metrics.csv"
        write_json(json_path, {"benchmark": str(bench.root), "sr": str(sr_dir), "suffix": args.suffix,
                               "metrics": list(suite.names), "luma": suite.luma, "mean": summary,
                               "groups": group_summaries(rows, suite.names), "cases": rows, "problems": problems})
        write_csv(csv_path, rows, _row_columns(rows, suite.names) + ["file"])
        print(markdown_table({label: summary}, suite.names), end="")
        if len({row["group"] for row in rows}) > 1:
            print()
            print(markdown_table(group_summaries(rows, suite.names), suite.names, first="kernel"), end="")
        print(f"{len(rows)} of {len(bench.cases)} case(s) scored; per-image results: {json_path}, {csv_path}")
        return report(problems)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 2,5,10") from None


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .cli import report, sample_options_from

    options = sample_options_from(args)
    baselines = () if args.baselines.strip() in ("", "none") else \
        tuple(b.strip() for b in args.baselines.split(",") if b.strip())
    settings = BenchmarkSettings(seed=args.seed, batch_size=args.batch_size, baselines=baselines, limit=args.limit,
                                 trajectory_cases=args.trajectory_cases, trajectory_steps=args.trajectory_steps,
                                 steps_sweep=args.steps_sweep, sweep_cases=args.sweep_cases,
                                 report_cases=args.report_cases)
    settings.check()
    suite = _suite_from(args, torch.device("cpu"))  # validated (and weights checked) before any upscaling
    outcome = run_benchmark(args.benchmark, args.weights, args.out, options=options, settings=settings,
                            suite=suite, device=args.device, precision=args.precision, config=args.config,
                            allow_pickle=args.allow_pt, progress=not args.no_progress)
    if outcome.results is None:
        return 0  # not rank 0: rank 0 reports the problems and carries the exit status
    return report(outcome.problems)


def cmd_bench_speed(args: argparse.Namespace) -> int:
    rows = measure_speed(args.config, size=args.size, steps=args.steps, batch=args.batch,
                         precisions=args.precisions, compile_modes=(False, True) if args.compile else (False,),
                         repeats=args.repeats, device=args.device,
                         log=lambda message: print(message, file=sys.stderr))
    print(f"{args.config}: HR {rows[0]['hr_size']}², batch {args.batch}, {rows[0]['device']}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(speed_table(rows), end="")
    return 0


def add_evaluation_commands(commands: argparse._SubParsersAction) -> None:
    """Register `evaluate`, `benchmark` and `bench-speed` on the CLI's sub-parsers (cli.build_parser)."""
    from .cli import add_sampling_options

    ev = commands.add_parser("evaluate", help="score SR results of a test set (PSNR/SSIM/LPIPS/DISTS/NIQE/FID/kernels)",
                             description="Score a folder of SR results against a make-benchmark test set "
                                         "(SPEC §2 Metrics); works under torchrun.")
    ev.add_argument("--benchmark", required=True, help="test-set folder (holds manifest.json)")
    ev.add_argument("--sr", required=True, help="folder of SR results <name><suffix>.png (+ <name>_kernel.npy)")
    ev.add_argument("--suffix", default="", help="suffix of the SR stems, e.g. _x4")
    ev.add_argument("--json", default=None, help="per-image results as JSON (default SR/metrics.json)")
    ev.add_argument("--csv", default=None, help="per-image results as CSV (default SR/metrics.csv)")
    _add_metric_options(ev)
    ev.set_defaults(run=cmd_evaluate)

    bm = commands.add_parser("benchmark", help="upscale and evaluate a test set, with baselines and report.html",
                             description="Upscale every case of a test set, evaluate it and the baselines, and "
                                         "write results.json/.csv/.md and report.html; resumable; works under "
                                         "torchrun.")
    bm.add_argument("--benchmark", required=True, help="test-set folder (holds manifest.json)")
    bm.add_argument("--out", required=True, help="run folder (re-running it resumes)")
    bm.add_argument("--baselines", default=",".join(BASELINES),
                    help=f"some of {','.join(ALL_BASELINES)}, or none (the peers need `make peers` and ×4)")
    bm.add_argument("--limit", type=int, default=None,
                    help="only N cases, spread evenly over the set (a stated subset of a large set)")
    bm.add_argument("--trajectory-cases", type=int, default=2, help="images traced along the reverse process")
    bm.add_argument("--trajectory-steps", type=int, default=None, help="steps of those traces (default --steps)")
    bm.add_argument("--steps-sweep", type=_int_list, default=(), help="step counts for quality vs steps, e.g. 2,5,10")
    bm.add_argument("--sweep-cases", type=int, default=2, help="images of the steps sweep")
    bm.add_argument("--report-cases", type=int, default=24, help="cases shown in report.html")
    bm.add_argument("--no-progress", action="store_true")
    add_sampling_options(bm, weights_required=True)
    _add_metric_options(bm, device=False)
    bm.set_defaults(run=cmd_benchmark)

    sp = commands.add_parser("bench-speed", help="time forward, guided steps and sampling (random weights)",
                             description="Forward, guided-step and whole-sample time and peak memory per "
                                         "precision and compile mode, measured in one run.")
    sp.add_argument("--config", required=True, help="preset name or YAML file")
    sp.add_argument("--size", type=int, default=None, help="HR size H (default: data.crop); LR is H/scale")
    sp.add_argument("--steps", type=int, default=10, help="steps of the whole sample")
    sp.add_argument("--batch", type=int, default=1)
    sp.add_argument("--modes", dest="precisions", nargs="+", choices=("fp32", "bf16", "fp16"), default=["fp32", "bf16"],
                    help="precisions to time")
    sp.add_argument("--compile", action="store_true", help="also time torch.compile'd variants")
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    sp.set_defaults(run=cmd_bench_speed)
