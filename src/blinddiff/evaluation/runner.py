"""`run_benchmark`: the blind method and its baselines over a whole test set (docs/method.md §5; paper §4).

Every method's cases are first resumed from the records of finished ones (:func:`_resume`), then the rest
are upscaled and scored (:func:`_compute`); then the Fig. 7a traces and the steps sweep; rank 0 writes the
tables and report.html (`report.write_outputs`). The steps share one :class:`~.context.RunContext`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..fileio import ImageError, image_size, tensor_to_rgb, write_json, write_result
from ..hardware import distributed, gather, shard
from ..metrics import LUMA_METRICS, MetricSuite, build_metric_suite, kernel_l1, psnr
from ..testsets import BenchmarkSet, load_benchmark
from .baselines import METHOD, REGISTRY, Producer, check_baselines, lr_batch, producer
from .context import BenchmarkSettings, RunContext, spread
from .report import write_outputs
from .scoring import case_order, case_row, format_metric, in_case_order, score_file

if TYPE_CHECKING:
    from ..inference import SampleOptions

__all__ = ["BenchmarkOutcome", "run_benchmark"]


@dataclass
class BenchmarkOutcome:
    """What a rank did: results (the results.json content; rank 0 only), problems, cases computed/resumed."""

    results: dict | None
    problems: list[str]
    computed: dict[str, int]
    resumed: dict[str, int]


def run_benchmark(benchmark: str | os.PathLike, weights: str | os.PathLike, out: str | os.PathLike, *,
                  options: SampleOptions | None = None, settings: BenchmarkSettings | None = None,
                  suite: MetricSuite | None = None,
                  device: str = "auto", precision: str = "fp32", config: str | None = None,
                  allow_pickle: bool = False, progress: bool = False,
                  log: Callable[[str], None] = print) -> BenchmarkOutcome:
    """Upscale and evaluate a whole test set with the blind model and the baselines (`blinddiff.evaluation`).

    ``options``: `inference.SampleOptions` (steps, sampler, ζ, guidance, gradient, tiles). Every image
    gets the same ``settings.seed`` (as `blinddiff upscale --seed`), drawn per image, so batching and
    sharding change nothing. Under torchrun the cases (and the plot jobs) are sharded across ranks and
    rank 0 writes results.json/.csv/.md, the plots and report.html.
    """
    from ..checkpoint import resolve_weights
    from ..inference import BlindDiff, SampleOptions

    options = options or SampleOptions()
    settings = settings or BenchmarkSettings()
    settings.check()
    bench = load_benchmark(benchmark)
    check_baselines(settings.baselines, bench, options)  # before any upscaling
    if not bench.has_kernels:
        settings = replace(settings, trajectory_cases=0)  # the traces score k̂_t against the true kernel
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={out} exists and is not a folder; choose another out folder")
    with distributed(device) as runtime:
        suite = suite or build_metric_suite()
        if not bench.has_kernels:
            suite = suite.without_kernel_metrics()
        suite = replace(suite, device=runtime.device,
                        networks={name: network.to(runtime.device) for name, network in suite.networks.items()})
        model = BlindDiff.from_pretrained(weights, device=str(runtime.device), precision=precision, config=config,
                                          allow_pickle=allow_pickle)
        model.check_options(options, [settings.seed])  # once, up front: not once per case
        if model.scale != bench.scale:
            raise ValueError(f"weights {weights} upscale ×{model.scale} but the test set {bench.root} is "
                             f"×{bench.scale}; use matching weights or rebuild the test set with "
                             f"--scale {model.scale}")
        cases = spread(bench.cases, settings.limit) if settings.limit else list(bench.cases)
        run = RunContext(bench=bench, cases=cases, out=out, model=model, options=options, settings=settings,
                         suite=suite, runtime=runtime,
                         fingerprint=_fingerprint(resolve_weights(weights), bench, options, settings, model.precision),
                         log=log if runtime.main else _silent, progress=progress and runtime.main)
        return _benchmark(run)


def _silent(message: str) -> None:
    """The log of ranks other than 0."""


def _benchmark(run: RunContext) -> BenchmarkOutcome:
    """Every method over the run's cases, the plot jobs, and (rank 0) the outputs."""
    if run.runtime.main:
        run.out.mkdir(parents=True, exist_ok=True)
    run.runtime.barrier()
    _check_run_folder(run)
    methods = [METHOD] + [b for b in REGISTRY if b in run.settings.baselines]  # in the order of the tables
    producers = {method: producer(method, run.baseline_inputs) for method in methods}
    method_rows: dict[str, list[dict]] = {}
    problems: list[str] = []
    computed: dict[str, int] = {}
    resumed: dict[str, int] = {}
    for method in methods:
        suite = run.suite if method == METHOD else run.suite.without_kernel_metrics()
        rows, failed, pending = _resume(run, method, suite)
        new_rows, new_failed = _compute(run, method, suite, producers[method], pending)
        method_rows[method] = in_case_order(gather(run.runtime, rows + new_rows), run.bench)
        problems += failed + new_failed
        computed[method], resumed[method] = len(pending), len(rows)
        if resumed[method]:
            where = "" if run.runtime.world == 1 else " (rank 0's shard)"
            run.log(f"{method}: {resumed[method]} finished case(s) resumed, {computed[method]} computed{where}")
    traces, sweep = _plot_jobs(run)
    problems = gather(run.runtime, problems)
    results = write_outputs(run, method_rows, traces, sweep, problems) if run.runtime.main else None
    return BenchmarkOutcome(results, problems, computed, resumed)


# --------------------------------------------------------------------------------------------
# One method: resuming the finished cases, computing the others
# --------------------------------------------------------------------------------------------


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


def _resume(run: RunContext, method: str, suite: MetricSuite) -> tuple[list[dict], list[str], list[dict]]:
    """This rank's finished cases of one method → (their rows, problems, the cases still to compute).

    A case is finished once ``<method>/records/<name>.json`` exists (written last, atomically) and the
    files it lists exist; finished cases only get metrics they lack computed, from their files (and the Y
    metrics again if the record was scored with another ``luma``).
    """
    folder = run.out / method
    names = suite.image_metrics
    rows: list[dict] = []
    problems: list[str] = []
    pending: list[dict] = []
    for case in run.my_cases:
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
                record["metrics"].update(score_file(run.bench, case, folder / f"{case['name']}.png",
                                                    kernel_file if kernel_file.is_file() else None, suite, missing))
            except (ImageError, ValueError) as err:
                problems.append(f"{method} {case['name']}: {err}")
                continue
        if missing or other_luma:
            write_json(record_path, record)
        rows.append({**case_row(case), **{n: record["metrics"][n] for n in names if n in record["metrics"]},
                     **({"seconds": record["seconds"]} if "seconds" in record else {})})
    return rows, problems, pending


def _compute(run: RunContext, method: str, suite: MetricSuite, produce: Producer,
             cases: list[dict]) -> tuple[list[dict], list[str]]:
    """Upscale and score ``cases`` with one method, in batches of one LR and kernel size → (rows, problems);
    each case's files are written, then its record."""
    from tqdm import tqdm

    from ..batch import size_batches

    bench, folder = run.bench, run.out / method
    bar = tqdm(total=len(cases), desc=method, unit="img", disable=not run.progress or not cases)

    def size(case: dict) -> tuple:  # LR size and kernel size: one tensor per batch
        return image_size(bench.root / case["lr"]), bench.gt_kernel(case).shape if bench.has_kernels else None

    rows: list[dict] = []
    problems: list[str] = []
    for batch in size_batches(cases, size, run.settings.batch_size):
        started = time.perf_counter()
        try:
            sr, kernels = produce(lr_batch(bench, batch), batch)
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
            rows.append({**case_row(case), **metrics, "seconds": seconds})
            run.log(f"{method} {name}: " + ", ".join(f"{k} {format_metric(k, v)}" for k, v in metrics.items()))
            bar.update(1)
    bar.close()
    return rows, problems


# --------------------------------------------------------------------------------------------
# The run folder: resumed only with the same weights, test set and options
# --------------------------------------------------------------------------------------------


def _fingerprint(weights: Path, bench: BenchmarkSet, options: SampleOptions, settings: BenchmarkSettings,
                 precision: str) -> dict:
    """What the saved results depend on: a run folder is resumed only with the same values."""
    from ..checkpoint import sha256_of

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


def _check_run_folder(run: RunContext) -> None:
    path = run.out / "run.json"
    if path.is_file():
        try:
            previous = json.loads(path.read_text()).get("fingerprint", {})
        except ValueError:
            previous = {}
        current = json.loads(json.dumps(run.fingerprint))  # tuples → lists, as stored
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if changed:
            raise ValueError(f"{run.out} holds a benchmark run made with other settings (changed: "
                             f"{', '.join(changed)}); resume it with the same weights, test set and sampling "
                             "options, or choose another --out")
    run.runtime.barrier()  # every rank has compared before rank 0 (re)writes it
    if run.runtime.main:
        write_json(path, {"fingerprint": run.fingerprint})


# --------------------------------------------------------------------------------------------
# The plot jobs: Fig. 7a traces and the steps sweep
# --------------------------------------------------------------------------------------------


def _trace_reverse_process(run: RunContext, case: dict, steps: int) -> dict:
    """Fig. 7a: PSNR (Y, border ``scale``) of x̂0 and kernel L1 of k̂_t at every reverse step of one image."""
    bench = run.bench
    hr = bench.hr(case)
    gt = torch.from_numpy(bench.gt_kernel(case))
    points: list[dict] = []

    def record(info: Any) -> None:
        points.append({"step": info.index + 1, "t": int(info.t),
                       "psnr_x0": float(psnr(info.x0[:1].float().cpu(), hr, crop=bench.scale)[0]),
                       "kernel_l1": float(kernel_l1(info.kernel[:1].float().cpu(), gt)[0]),
                       "energy": float(info.energy.reshape(-1)[0])})

    run.model.run(lr_batch(bench, [case]), [run.settings.seed], replace(run.options, steps=steps), callback=record)
    return {"name": case["name"], "steps": steps, "points": points}


def _sweep_point(run: RunContext, case: dict, steps: int) -> dict:
    """Quality of one image upscaled with ``steps`` reverse steps (the quality-vs-steps plot)."""
    bench, suite = run.bench, run.suite
    sr, kernel = run.model.run(lr_batch(bench, [case]), [run.settings.seed], replace(run.options, steps=steps))
    names = [n for n in suite.image_metrics if n not in ("niqe", "piqe")]
    known = bench.has_kernels
    metrics = suite.score(tensor_to_rgb(sr[0]), bench.hr(case), scale=bench.scale, downsample=bench.downsample,
                          kernel=kernel[0].numpy() if known else None, gt_kernel=bench.gt_kernel(case) if known else None,
                          names=list(dict.fromkeys(names + ["psnr"] + (["kernel_l1"] if known else []))))
    return {"name": case["name"], "steps": steps, "luma": suite.luma, **metrics}


def _plot_jobs(run: RunContext) -> tuple[list[dict], list[dict]]:
    """Traces (Fig. 7a) and the steps sweep, sharded like the cases and resumable (plots/records/)."""
    settings = run.settings
    trace_steps = settings.trajectory_steps or run.options.steps
    jobs = [("trace", case, trace_steps) for case in spread(run.cases, settings.trajectory_cases)]
    jobs += [("sweep", case, steps) for steps in settings.steps_sweep for case in spread(run.cases, settings.sweep_cases)]
    done: list[tuple[str, dict]] = []
    for kind, case, steps in shard(jobs, run.runtime):
        path = run.out / "plots" / "records" / f"{kind}_{case['name']}_steps{steps}.json"
        if path.is_file():
            try:
                record = json.loads(path.read_text())
            except ValueError:
                record = None  # damaged: computed again
            if isinstance(record, dict) and (kind == "trace" or record.get("luma", "studio") == run.suite.luma):
                done.append((kind, record))
                continue
        run.log(f"{'tracing' if kind == 'trace' else 'steps sweep:'} {case['name']} with {steps} step(s)")
        result = _trace_reverse_process(run, case, steps) if kind == "trace" else _sweep_point(run, case, steps)
        write_json(path, result)
        done.append((kind, result))
    gathered = gather(run.runtime, done)
    order = case_order(run.bench)
    traces = sorted((r for k, r in gathered if k == "trace"), key=lambda r: order.get(r["name"], 0))
    sweep = sorted((r for k, r in gathered if k == "sweep"), key=lambda r: (r["steps"], order.get(r["name"], 0)))
    return traces, sweep
