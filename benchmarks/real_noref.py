"""NIQE of blind ×4 SR on real LR photos without ground truth (issues 6 and 9; e.g. RealSRSet+5images).

For every image of --images (or the ones with at most --max-lr-pixels LR pixels: large real photos cost
minutes each on a CPU), upscales with the model, with plain MATLAB bicubic and with the peers of
--peers (Real-ESRGAN, RealSR: `make peers`), and scores each with NIQE (no reference; BasicSR's
Y-channel NIQE, no border crop). Writes OUT/<method>/<stem>.png (+ the estimated kernel for ours,
+ <stem>_seconds.json for every network) and OUT/results.md/.json; re-running skips what is done.

    python benchmarks/real_niqe.py --out runs/real --niqe-params ../shared/weights/niqe/niqe_pris_params.npz \
        --max-lr-pixels 40000 --peers realesrgan,realsr
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from blinddiff.degradation import upsample_bicubic
from blinddiff.evaluation import markdown_table, summarize
from blinddiff.fileio import (ImageError, expand_path, read_rgb, rgb_to_tensor, tensor_to_rgb, write_json,
                              write_png, write_result)
from blinddiff.inference import DEFAULT_WEIGHTS, MODES, BlindDiff, SampleOptions
from blinddiff.metrics import niqe
from blinddiff.peers import NcnnUpscaler, PeersMissing, check_peers

REAL = "${BLINDDIFF_DATA:-../shared/data}/real/RealSRSet+5images"
PLAIN_PEERS = ("realesrgan", "realsr")  # blind peers that need no kernel


def parse_peers(text: str) -> list[str]:
    peers = [name for name in text.split(",") if name]
    unknown = sorted(set(peers) - set(PLAIN_PEERS))
    if unknown:
        raise SystemExit(f"--peers {','.join(unknown)} is not a blind ×4 peer; use some of {','.join(PLAIN_PEERS)}")
    return peers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=REAL, help="folder of real LR photos")
    parser.add_argument("--out", required=True)
    parser.add_argument("--niqe-params", required=True, help="NIQE pristine parameters (.npz)")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS)
    parser.add_argument("--peers", default="", help=f"also some of {','.join(PLAIN_PEERS)} (`make peers`)")
    parser.add_argument("--max-lr-pixels", type=int, default=None, help="skip larger LR images (a stated subset)")
    parser.add_argument("--mode", choices=tuple(MODES), default="perceptual")
    parser.add_argument("--steps", type=int, default=None, help="override the mode's reverse-process steps")
    parser.add_argument("--zeta", type=float, default=None, help="override the mode's ζ")
    parser.add_argument("--gradient", choices=("xt", "x0"), default=None, help="override the mode's gradient")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    folder = Path(expand_path(args.images))
    if not folder.is_dir():
        raise SystemExit(f"--images {folder} is not a folder; pass the folder of real LR photos")
    peers = parse_peers(args.peers)
    out = Path(args.out)
    model = BlindDiff.from_pretrained(args.weights, device="cpu")
    overrides = {k: v for k, v in (("steps", args.steps), ("zeta", args.zeta), ("gradient", args.gradient))
                 if v is not None}
    options = SampleOptions.for_mode(args.mode, **overrides)
    networks: dict[str, Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray | None]]] = {}
    if peers:
        try:
            check_peers(peers, model.scale)
        except (PeersMissing, ValueError) as err:
            raise SystemExit(f"--peers: {err}") from None
        for name in peers:
            upscaler = NcnnUpscaler(name)
            networks[name] = lambda lr, upscaler=upscaler: (
                tensor_to_rgb(torch.from_numpy(upscaler.upscale(lr[0].numpy()))), None)

    def ours(lr: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        sr, kernel = model.run(lr, [args.seed], options)
        return tensor_to_rgb(sr[0]), kernel[0].numpy()

    networks = {"blinddiff": ours, **networks}
    methods = ["bicubic", *networks]
    folders = {"bicubic": "bicubic", "blinddiff": "ours", **{name: name for name in peers}}
    rows: dict[str, list[dict]] = {method: [] for method in methods}
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
        targets = {method: out / folders[method] / f"{path.stem}.png" for method in methods}
        timings = {method: out / folders[method] / f"{path.stem}_seconds.json" for method in methods}
        for method, produce in networks.items():
            if not targets[method].is_file():
                started = time.perf_counter()
                rgb, kernel = produce(lr_tensor)
                write_json(timings[method], {"seconds": time.perf_counter() - started})
                write_result(targets[method], rgb, kernel)
        if not targets["bicubic"].is_file():
            write_png(targets["bicubic"], tensor_to_rgb(upsample_bicubic(lr_tensor, model.scale)))
        for method, target in targets.items():
            row = {"name": path.stem, "group": "all", "niqe": float(niqe(read_rgb(target), args.niqe_params)[0])}
            if timings[method].is_file():
                row["seconds"] = json.loads(timings[method].read_text())["seconds"]
            rows[method].append(row)
        print(f"{path.name}: NIQE " + ", ".join(f"{m} {rows[m][-1]['niqe']:.3f}" for m in methods), flush=True)
    summaries = {method: summarize(method_rows, ["niqe", "seconds"]) for method, method_rows in rows.items()}
    table = markdown_table(summaries, ["niqe", "seconds"])
    header = (f"# NIQE on {folder.name}, ×{model.scale}, blinddiff {args.mode}: {options.sampler} "
              f"{options.steps} steps, ζ {options.zeta:g}, gradient {options.gradient}\n\n")
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
