"""No-reference quality of blind ×4 SR on real LR photos without ground truth (e.g. RealSRSet+5images,
RealSet65): NIQE and PIQE.

For every image of --images (or the ones with at most --max-lr-pixels LR pixels: large real photos cost
minutes each on a CPU), upscales with each model of --weights, with plain MATLAB bicubic and with the
peers of --peers (Real-ESRGAN, RealSR: `make peers`), and scores each with NIQE (BasicSR's Y-channel
NIQE) and PIQE (`blinddiff.metrics.piqe`), no border crop; lower is better for both. Writes
OUT/<method>/<stem>.png (+ the estimated kernel and noise level for ours, + <stem>_seconds.json for every
network) and OUT/results.md/.json; re-running skips what is done.

    python benchmarks/real_noref.py --out runs/real --niqe-params ../shared/weights/niqe/niqe_pris_params.npz \
        --weights fast-x4,real-x4 --max-lr-pixels 40000 --peers realesrgan,realsr
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
from blinddiff.inference import DEFAULT_WEIGHTS, MODES, BlindDiff
from blinddiff.degradation import estimate_noise_level
from blinddiff.metrics import niqe, piqe
from blinddiff.peers import NcnnUpscaler, PeersMissing, check_peers

REAL = "${BLINDDIFF_DATA:-../shared/data}/real/RealSRSet+5images"
PLAIN_PEERS = ("realesrgan", "realsr")  # blind peers that need no kernel


def parse_peers(text: str) -> list[str]:
    peers = [name for name in text.split(",") if name]
    unknown = sorted(set(peers) - set(PLAIN_PEERS))
    if unknown:
        raise SystemExit(f"--peers {','.join(unknown)} is not a blind ×4 peer; use some of {','.join(PLAIN_PEERS)}")
    return peers


def draw_figure(path: Path, out: Path, folder: Path, stems: list[str], methods: list[str], folders: dict[str, str],
                rows: dict[str, dict[str, dict]]) -> None:
    """One row per image: the LR photo (nearest ×s), then every method's result with its NIQE / PIQE, ours
    with the estimated kernel inset and the estimated noise level in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from blinddiff.evaluation import save_figure
    from blinddiff.fileio import kernel_picture

    sources = {p.stem: p for p in folder.iterdir()}
    missing = [stem for stem in stems if stem not in sources or stem not in rows["bicubic"]]
    if missing:
        raise SystemExit(f"--figure {','.join(missing)}: not among the scored images of {folder}")
    columns = 1 + len(methods)
    fig, axes = plt.subplots(len(stems), columns, figsize=(2.6 * columns, 2.8 * len(stems)), squeeze=False)
    for row, stem in zip(axes, stems):
        lr = read_rgb(sources[stem])
        scale = read_rgb(out / folders["bicubic"] / f"{stem}.png").shape[0] // lr.shape[0]
        row[0].imshow(np.repeat(np.repeat(lr, scale, 0), scale, 1))
        row[0].set_title(f"LR {lr.shape[1]}×{lr.shape[0]}\nσ̂ {rows['bicubic'][stem]['noise_sigma']:.1f}", fontsize=8)
        for axis, method in zip(row[1:], methods):
            axis.imshow(read_rgb(out / folders[method] / f"{stem}.png"))
            scores = rows[method][stem]
            axis.set_title(f"{method}\nNIQE {scores['niqe']:.2f} · PIQE {scores['piqe']:.0f}", fontsize=8)
            kernel_file = out / folders[method] / f"{stem}_kernel.npy"
            if kernel_file.is_file():
                inset = axis.inset_axes([0.72, 0.0, 0.28, 0.28])
                inset.imshow(kernel_picture(np.load(kernel_file)), cmap="gray")
                inset.set_xticks([]), inset.set_yticks([])
        for axis in row:
            axis.set_xticks([]), axis.set_yticks([])
    fig.tight_layout()
    save_figure(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=REAL, help="folder of real LR photos")
    parser.add_argument("--out", required=True)
    parser.add_argument("--niqe-params", required=True, help="NIQE pristine parameters (.npz)")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS, help="one or more weights, comma-separated")
    parser.add_argument("--peers", default="", help=f"also some of {','.join(PLAIN_PEERS)} (`make peers`)")
    parser.add_argument("--max-lr-pixels", type=int, default=None, help="skip larger LR images (a stated subset)")
    parser.add_argument("--mode", choices=tuple(MODES), default="perceptual")
    parser.add_argument("--steps", type=int, default=None, help="override the mode's reverse-process steps")
    parser.add_argument("--zeta", type=float, default=None, help="override the mode's ζ")
    parser.add_argument("--gradient", choices=("xt", "x0"), default=None, help="override the mode's gradient")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", default=None, help="also draw these images (comma-separated stems) as a figure")
    parser.add_argument("--figure-out", default=None, help="where the figure goes (default OUT/figure.png)")
    args = parser.parse_args()

    folder = Path(expand_path(args.images))
    if not folder.is_dir():
        raise SystemExit(f"--images {folder} is not a folder; pass the folder of real LR photos")
    peers = parse_peers(args.peers)
    out = Path(args.out)
    weights = [name for name in args.weights.split(",") if name]
    models = {name: BlindDiff.from_pretrained(name, device="cpu") for name in weights}
    model = next(iter(models.values()))
    overrides = {k: v for k, v in (("steps", args.steps), ("zeta", args.zeta), ("gradient", args.gradient))
                 if v is not None}
    options = model.options(args.mode, **overrides)  # as tuned for the first model (the header names them)
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

    def ours(blind: BlindDiff) -> Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]:
        def run(lr: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
            sr, kernel = blind.run(lr, [args.seed], blind.options(args.mode, **overrides))
            return tensor_to_rgb(sr[0]), kernel[0].numpy()
        return run

    labels = {name: "blinddiff" if len(models) == 1 else f"blinddiff {Path(name).stem}" for name in models}
    networks = {**{labels[name]: ours(blind) for name, blind in models.items()}, **networks}
    methods = ["bicubic", *networks]
    folders = {"bicubic": "bicubic", **{labels[name]: "ours" if len(models) == 1 else f"ours-{Path(name).stem}"
                                        for name in models}, **{name: name for name in peers}}
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
        sigma = float(estimate_noise_level(lr_tensor)[0])
        for method, target in targets.items():
            result = read_rgb(target)
            row = {"name": path.stem, "group": "all", "niqe": float(niqe(result, args.niqe_params)[0]),
                   "piqe": float(piqe(result)[0]), "noise_sigma": sigma}
            if timings[method].is_file():
                row["seconds"] = json.loads(timings[method].read_text())["seconds"]
            rows[method].append(row)
        print(f"{path.name} (noise σ̂ {sigma:.1f}): NIQE / PIQE " +
              ", ".join(f"{m} {rows[m][-1]['niqe']:.3f} / {rows[m][-1]['piqe']:.1f}" for m in methods), flush=True)
    columns = ["niqe", "piqe", "seconds"]
    summaries = {method: summarize(method_rows, columns) for method, method_rows in rows.items()}
    table = markdown_table(summaries, columns)
    header = (f"# NIQE and PIQE on {folder.name}, ×{model.scale}, blinddiff {args.mode}: {options.sampler} "
              f"{options.steps} steps, ζ {options.zeta:g}, guidance {options.guidance}, gradient "
              f"{options.gradient}\n\n")
    if skipped:
        header += f"Skipped (more than {args.max_lr_pixels} LR pixels): {', '.join(skipped)}\n\n"
    (out / "results.md").write_text(header + table)
    write_json(out / "results.json", {"images": str(folder), "options": vars(args), "skipped": skipped,
                                      "mean": summaries, "cases": rows})
    print(header + table)
    if args.figure:
        stems = [stem for stem in args.figure.split(",") if stem]
        figure = Path(args.figure_out) if args.figure_out else out / "figure.png"
        draw_figure(figure, out, folder, stems, methods, folders, {m: {r["name"]: r for r in rows[m]} for m in methods})
        print(f"wrote {figure}")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
