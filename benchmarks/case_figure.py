"""One case of a `blinddiff benchmark` run as a one-row figure for the README or a paper: centred crops of
the input, bicubic, ours, the other methods of the run and the truth, then the true and the estimated
kernel (the pictures report.html shows for the case, via `evaluation.case_pictures`).

    python benchmarks/case_figure.py runs/final/b100_aniso --case 86000_aniso --crop 128 \
        --methods blinddiff,realesrgan --out docs/images/aniso.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from matplotlib.figure import Figure

from blinddiff.evaluation import METHOD, case_pictures, save_figure
from blinddiff.testsets import load_benchmark

LABELS = {METHOD: "blinddiff (ours)", "gt-kernel": "ours, true kernel given"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a benchmark run folder (holds results.json)")
    parser.add_argument("--case", required=True, help="case name, e.g. 86000_sig2.6")
    parser.add_argument("--methods", default=None, help="methods of the run to show (default: all of them)")
    parser.add_argument("--crop", type=int, default=128, help="HR pixels per side of the crops")
    parser.add_argument("--out", required=True, help="the .png to write")
    args = parser.parse_args()

    run = Path(args.run)
    results_file = run / "results.json"
    if not results_file.is_file():
        raise SystemExit(f"{results_file} not found; pass the folder `blinddiff benchmark --out` wrote")
    results = json.loads(results_file.read_text())
    bench = load_benchmark(results["benchmark"])
    cases = {case["name"]: case for case in bench.cases}
    if args.case not in cases:
        raise SystemExit(f"--case {args.case} is not a case of {bench.root}; e.g. {', '.join(list(cases)[:3])}")
    methods = list(results["methods"]) if args.methods is None else args.methods.split(",")
    unknown = sorted(set(methods) - set(results["methods"]))
    if unknown:
        raise SystemExit(f"--methods {','.join(unknown)}: not in {run} (it has {','.join(results['methods'])})")
    if args.crop < bench.scale:
        raise SystemExit(f"--crop must be at least the scale ({bench.scale})")
    pictures = case_pictures(run, bench, cases[args.case], methods, args.crop)
    widths = [pixels.shape[1] for _, pixels in pictures]
    figure = Figure(figsize=(sum(widths) / 60 + 0.2 * len(pictures), 2.6), dpi=100)
    axes = figure.subplots(1, len(pictures), gridspec_kw={"width_ratios": widths})
    for axis, (label, pixels) in zip(axes, pictures):
        axis.imshow(pixels, interpolation="nearest", cmap="gray" if pixels.ndim == 2 else None)
        axis.set_title(LABELS.get(label, label), fontsize=8)
        axis.axis("off")
    save_figure(figure, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
