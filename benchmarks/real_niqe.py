"""NIQE of blind ×4 SR on real LR photos without ground truth (issue 6; e.g. RealSRSet+5images).

For every image of --images (or the ones with at most --max-lr-pixels LR pixels: large real photos cost
minutes each on a CPU), upscales with the model and with plain MATLAB bicubic, and scores both with NIQE
(no reference; BasicSR's Y-channel NIQE, no border crop). Writes OUT/ours/<stem>.png (+ the estimated
kernel), OUT/bicubic/<stem>.png and OUT/results.md/.json; re-running skips the images already upscaled.

    python benchmarks/real_niqe.py --out runs/real --niqe-params ../shared/weights/niqe/niqe_pris_params.npz \
        --max-lr-pixels 40000 --steps 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from blinddiff.degradation import upsample_bicubic
from blinddiff.evaluation import markdown_table, summarize
from blinddiff.fileio import (ImageError, expand_path, read_rgb, rgb_to_tensor, tensor_to_rgb, write_json,
                              write_png, write_result)
from blinddiff.inference import DEFAULT_WEIGHTS, BlindDiff, SampleOptions
from blinddiff.metrics import niqe

REAL = "${BLINDDIFF_DATA:-../shared/data}/real/RealSRSet+5images"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=REAL, help="folder of real LR images")
    parser.add_argument("--out", required=True)
    parser.add_argument("--niqe-params", required=True, help="NIQE pristine parameters (.npz)")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS)
    parser.add_argument("--max-lr-pixels", type=int, default=None, help="skip larger LR images (a stated subset)")
    parser.add_argument("--steps", type=int, default=SampleOptions.steps)
    parser.add_argument("--zeta", type=float, default=SampleOptions.zeta)
    parser.add_argument("--gradient", choices=("xt", "x0"), default=SampleOptions.gradient)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    folder = Path(expand_path(args.images))
    if not folder.is_dir():
        raise SystemExit(f"--images {folder} is not a folder; pass the folder of real LR photos")
    out = Path(args.out)
    model = BlindDiff.from_pretrained(args.weights, device="cpu")
    options = SampleOptions(steps=args.steps, zeta=args.zeta, gradient=args.gradient)
    rows: dict[str, list[dict]] = {"bicubic": [], "blinddiff": []}
    skipped: list[str] = []
    problems: list[str] = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")):
        try:
            lr = read_rgb(path)
        except ImageError as err:
            problems.append(str(err))
            continue
        if args.max_lr_pixels and lr.shape[0] * lr.shape[1] > args.max_lr_pixels:
            skipped.append(path.name)
            continue
        lr_tensor = rgb_to_tensor(lr)
        targets = {"bicubic": out / "bicubic" / f"{path.stem}.png", "blinddiff": out / "ours" / f"{path.stem}.png"}
        timing = out / "ours" / f"{path.stem}_seconds.json"
        if not targets["blinddiff"].is_file():
            started = time.perf_counter()
            sr, kernel = model.run(lr_tensor, [args.seed], options)
            write_json(timing, {"seconds": time.perf_counter() - started})
            write_result(targets["blinddiff"], tensor_to_rgb(sr[0]), kernel[0].numpy())
        if not targets["bicubic"].is_file():
            write_png(targets["bicubic"], tensor_to_rgb(upsample_bicubic(lr_tensor, model.scale)))
        for method, target in targets.items():
            score = float(niqe(read_rgb(target), args.niqe_params)[0])
            row = {"name": path.stem, "group": "all", "niqe": score}
            if method == "blinddiff" and timing.is_file():
                row["seconds"] = json.loads(timing.read_text())["seconds"]
            rows[method].append(row)
        print(f"{path.name}: NIQE bicubic {rows['bicubic'][-1]['niqe']:.3f}, "
              f"ours {rows['blinddiff'][-1]['niqe']:.3f}", flush=True)
    summaries = {method: summarize(method_rows, ["niqe", "seconds"]) for method, method_rows in rows.items()}
    table = markdown_table(summaries, ["niqe", "seconds"])
    header = (f"# NIQE on {folder.name}, ×{model.scale}, {options.sampler} {options.steps} steps, "
              f"ζ {options.zeta:g}, gradient {options.gradient}\n\n")
    if skipped:
        header += f"Skipped (more than {args.max_lr_pixels} LR pixels): {', '.join(skipped)}\n\n"
    (out / "results.md").write_text(header + table)
    write_json(out / "results.json", {"images": str(folder), "options": vars(args), "skipped": skipped,
                                      "mean": summaries, "cases": rows})
    print(header + table)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
