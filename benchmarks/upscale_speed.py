"""Seconds per image of the shipped models through the Python API, as a user runs them (`BlindDiff.upscale`).

For each model and mode, upscales the first --images LR images of a folder (sorted; e.g. the 128² camera LR
of DRealSR) with the model's own sampling defaults, each timed after one untimed warm-up, and prints one
Markdown row per model and mode: median and min seconds per image and the LR size. Includes everything
`upscale` does (noise estimate, the reverse process, the kernel head), not image decoding. Meaningful only on
an otherwise idle machine.

    python benchmarks/upscale_speed.py --lr ../shared/data/benchmarks/DRealSR/LR --weights fast-x4 real-x4
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from blinddiff.fileio import find_images, read_rgb
from blinddiff.inference import BlindDiff


def lr_images(folder: Path, count: int) -> list[np.ndarray]:
    """The first `count` images of `folder` (sorted by path) as HxWx3 uint8 arrays."""
    return [read_rgb(path) for path in find_images(folder)[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lr", type=Path, required=True, help="a folder of LR images")
    parser.add_argument("--weights", nargs="+", default=["fast-x4"], help="shipped names or weight files")
    parser.add_argument("--modes", nargs="+", default=["fidelity", "perceptual"], choices=("fidelity", "perceptual"))
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        images = lr_images(args.lr, args.images)
    except FileNotFoundError as err:
        raise SystemExit(f"error: --lr: {err}") from None
    sizes = sorted({f"{image.shape[1]}×{image.shape[0]}" for image in images})
    print(f"{len(images)} LR images ({', '.join(sizes)}), {torch.get_num_threads()} threads\n")
    print("| model | mode | sampling | s / image (median) | min |\n|---|---|---|---:|---:|")
    for weights in args.weights:
        model = BlindDiff.from_pretrained(weights, device="cpu")
        for mode in args.modes:
            options = model.options(mode)
            model.upscale(images[0], mode=mode)  # warm-up
            seconds = []
            for image in images:
                start = time.perf_counter()
                model.upscale(image, mode=mode)
                seconds.append(time.perf_counter() - start)
            sampling = f"{options.steps} step(s), {options.sampler}, ζ {options.zeta:g}"
            print(f"| `{weights}` | {mode} | {sampling} | {statistics.median(seconds):.3f} | {min(seconds):.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
