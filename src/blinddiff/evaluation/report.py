"""What the benchmark and `evaluate` write (docs/method.md §5; paper §4, Fig. 7): markdown, CSV and HTML
tables, matplotlib plots (Fig. 7a: per-step PSNR of x̂0 and kernel L1 along the reverse process; quality
against the number of steps; perception–distortion, PSNR vs LPIPS-VGG, one point per method), the pictures
of a case (crops and kernels), and :func:`write_outputs`: a run's ``results.json/.csv/.md`` and a
self-contained ``report.html``.
"""

from __future__ import annotations

import csv
import html
import io
import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_write, kernel_picture, read_rgb, tensor_to_rgb, write_json, write_png
from ..metrics import ALL_METRICS, METRICS
from ..testsets import BenchmarkSet
from .baselines import METHOD, REGISTRY, lr_batch
from .context import RunContext, spread
from .scoring import format_metric, group_summaries, metric_mean, summarize_set

__all__ = ["case_pictures", "line_plot", "markdown_table", "null_note", "row_columns", "save_figure", "scatter_plot",
           "write_csv", "write_outputs"]

_LUMA_TEXT = {"studio": "studio-swing Y (BT.601, 16–235)", "full": "full-range luma (0.299R + 0.587G + 0.114B)"}


def column_label(column: str) -> str:
    """A results column's heading: a metric's registered label ("PSNR ↑"), the seconds, or the name itself."""
    if column == "seconds":
        return "s / image ↓"
    return METRICS[column].label if column in METRICS else column


# --------------------------------------------------------------------------------------------
# Tables and result files
# --------------------------------------------------------------------------------------------


def null_note(name: str, nulls: int) -> str:
    """The line that says a JSON file holds null where a value was not a finite number (`fileio.write_json`)."""
    return (f"{name}: {nulls} value(s) that are not finite numbers are null there (JSON has no inf or NaN; "
            f"an inf PSNR means identical images); the tables show them as inf/nan")


def markdown_table(summaries: dict[str, dict[str, float]], metrics: Sequence[str], *, first: str = "method") -> str:
    """Markdown table: one row per entry of ``summaries`` (e.g. method → means), one column per metric."""
    columns = [name for name in metrics if any(name in s for s in summaries.values())]
    lines = ["| " + " | ".join([first, "n", *(column_label(c) for c in columns)]) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for label, summary in summaries.items():
        cells = [label, str(int(summary.get("n", 0))), *(format_metric(c, summary.get(c)) for c in columns)]
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
    """The CSV columns of per-case rows: ``lead``, name, image, group and the metrics some row has."""
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
            means = [metric_mean([float(p[key]) for p in by_steps[s]]) for s in steps]
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


# --------------------------------------------------------------------------------------------
# The pictures of a case
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
    from ..degradation import upsample_bicubic

    name, scale = case["name"], bench.scale
    hr = bench.hr(case)
    top, left, h, w = _crop_box(hr.shape[0], hr.shape[1], crop, scale)
    lr = bench.lr(case)
    lr_crop = lr[top // scale:(top + h) // scale, left // scale:(left + w) // scale]
    lr_label = f"LR (nearest ×{scale})" if scale > 1 else "blurry input"
    pictures = [(lr_label, np.repeat(np.repeat(lr_crop, scale, 0), scale, 1))]
    # LR | bicubic | ours | non-blind bound | the other baselines | HR
    others = [name for name, baseline in REGISTRY.items() if baseline.pictured and name != "bicubic"]
    for method in ("bicubic", METHOD, *others):
        path = out / method / f"{name}.png"
        if method in methods and path.is_file():
            pictures.append((method, read_rgb(path)[top:top + h, left:left + w]))
        elif method == "bicubic" and scale > 1:  # not run as a baseline: made here, the same way
            bicubic = tensor_to_rgb(upsample_bicubic(lr_batch(bench, [case]), scale).clamp(0, 1)[0])
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


def _report_pictures(run: RunContext, case: dict, methods: Sequence[str]) -> list[tuple[str, str]]:
    """`case_pictures` written under ``out/report`` → [(label, path relative to ``out``)]."""
    written = []
    for index, (label, pixels) in enumerate(case_pictures(run.out, run.bench, case, methods, run.settings.crop)):
        relative = f"report/{case['name']}_{index}.png"
        write_png(run.out / relative, np.ascontiguousarray(pixels))
        written.append((label, relative))
    return written


# --------------------------------------------------------------------------------------------
# A run's result files and report.html (self-contained: inline CSS, images referenced by relative paths
# of files written here)
# --------------------------------------------------------------------------------------------


def write_outputs(run: RunContext, method_rows: dict[str, list[dict]], traces: list[dict], sweep: list[dict],
                  problems: list[str]) -> dict:
    """results.json/.csv/.md, plots and report.html of a run (rank 0) from the rows of every method (in
    case order), the Fig. 7a traces and the steps sweep → the results.json content."""
    out, bench, suite = run.out, run.bench, run.suite
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
                f"{len(run.cases)} case(s), {run.options.steps} steps, {_LUMA_TEXT[suite.luma]}\n\n{table}\n"
                f"## By kernel\n\n{markdown_table(by_kernel, metrics, first='kernel · method')}")
    all_rows = [{"method": method, **row} for method, rows in method_rows.items() for row in rows]
    write_csv(out / "results.csv", all_rows, row_columns(all_rows, metrics, lead=("method",)))
    results = {"benchmark": str(bench.root), "protocol": bench.manifest.get("protocol"), "scale": bench.scale,
               "cases": len(run.cases), "metrics": list(metrics), "luma": suite.luma,
               "settings": asdict(run.settings), "fingerprint": run.fingerprint,
               "methods": {m: {"mean": summaries[m], "groups": groups[m], "cases": method_rows[m]}
                           for m in method_rows},
               "trajectory": traces, "steps_sweep": sweep, "problems": problems}
    nulls = write_json(out / "results.json", results)
    if nulls:
        note = null_note("results.json", nulls)
        markdown += f"\n{note}\n"
        run.log(note)
    with atomic_write(out / "results.md", "w") as handle:
        handle.write(markdown)
    plots = _write_plots(out, traces, sweep, summaries, suite.luma)
    _write_report(run, method_rows, summaries, table, plots)
    run.log(table.rstrip())
    run.log(f"wrote {out / 'results.json'}, results.csv, results.md and {out / 'report.html'}")
    return results


_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
figure{display:inline-block;margin:0 6px 6px 0;vertical-align:top;text-align:center}
figcaption{font-size:12px}img.crop{width:192px;image-rendering:pixelated}img.kernel{width:96px;
image-rendering:pixelated}.case{border-top:1px solid #ddd;padding-top:6px;margin-top:10px}
.plot{max-width:520px}"""


def _html_table(summaries: dict[str, dict[str, float]], metrics: Sequence[str], first: str) -> str:
    columns = [m for m in metrics if any(m in s for s in summaries.values())]
    head = "".join(f"<th>{html.escape(column_label(c))}</th>" for c in columns)
    body = "".join(f"<tr><td>{html.escape(label)}</td><td>{int(s.get('n', 0))}</td>"
                   + "".join(f"<td>{format_metric(c, s.get(c))}</td>" for c in columns) + "</tr>"
                   for label, s in summaries.items())
    return f"<table><tr><th>{html.escape(first)}</th><th>n</th>{head}</tr>{body}</table>"


def _write_report(run: RunContext, method_rows: dict[str, list[dict]], summaries: dict[str, dict[str, float]],
                  table: str, plots: list[tuple[str, str]]) -> None:
    """report.html: the means, the plots and the pictures of ``settings.report_cases`` finished cases."""
    bench, settings = run.bench, run.settings
    metrics = [m for m in (*ALL_METRICS, "seconds") if any(m in s for s in summaries.values())]
    methods = list(method_rows)
    finished = [row["name"] for row in method_rows[METHOD]]
    by_name = {case["name"]: case for case in bench.cases}
    esc = html.escape
    sampling = ", ".join(f"{k} {v}" for k, v in asdict(run.options).items() if v not in (None, {}))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>BlindDiff benchmark "
             f"{esc(bench.root.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>BlindDiff on {esc(bench.root.name)} (×{bench.scale}, "
             f"{esc(str(bench.manifest.get('protocol', '?')))})</h1>",
             f"<p>{len(method_rows[METHOD])} case(s); sampling: {esc(sampling)}; seed {settings.seed}. "
             f"PSNR/SSIM on {esc(_LUMA_TEXT[run.suite.luma])}, with the scale cropped at each border "
             f"(docs/method.md §5).</p>",
             "<h2>Means</h2>", _html_table(summaries, metrics, "method"),
             f"<details><summary>markdown</summary><pre>{esc(table)}</pre></details>"]
    if plots:
        parts.append("<h2>Plots</h2>")
        parts += [f"<figure><img class='plot' src='{esc(path)}' alt='{esc(caption)}'>"
                  f"<figcaption>{esc(caption)}</figcaption></figure>" for path, caption in plots]
    parts.append("<h2>Images</h2>")
    rows_by_method = {m: {r["name"]: r for r in rows} for m, rows in method_rows.items()}
    for name in spread(finished, settings.report_cases):
        case = by_name[name]
        scores = "; ".join(
            f"{esc(m)}: " + ", ".join(f"{column_label(k).split()[0]} {format_metric(k, rows_by_method[m][name][k])}"
                                      for k in ("psnr", "ssim", "lpips_vgg", "kernel_l1")
                                      if k in rows_by_method[m][name])
            for m in methods if name in rows_by_method[m])
        parts.append(f"<div class='case'><h3>{esc(name)}</h3><p>{scores}</p>")
        for label, path in _report_pictures(run, case, methods):
            kind = "kernel" if "kernel" in label else "crop"
            parts.append(f"<figure><img class='{kind}' src='{esc(path)}' alt='{esc(label)}'>"
                         f"<figcaption>{esc(label)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("<p>Files: <a href='results.json'>results.json</a>, <a href='results.csv'>results.csv</a>, "
                 "<a href='results.md'>results.md</a>.</p></body></html>\n")
    with atomic_write(run.out / "report.html", "w") as handle:
        handle.write("\n".join(parts))
