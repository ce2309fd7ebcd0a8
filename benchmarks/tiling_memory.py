"""Peak memory and time of `blinddiff upscale` on photos of given sizes: is memory bounded, is time linear?

Builds a synthetic photo of each size (a scikit-image sample picture resized with Lanczos, plus mild noise and
JPEG-like grain from a fixed seed), runs `blinddiff upscale` on it as a child process with the given flags,
and reads that child's peak RSS (`os.wait4`) and wall time; prints one Markdown row per size and, with
--markdown, appends the rows to that file (docs/benchmarks.md, "Images of any size").

    python benchmarks/tiling_memory.py --sizes 1024x768 2048x1536 --mode fidelity
    python benchmarks/tiling_memory.py --sizes 1024x768 2048x1536 4000x3000 --markdown docs/benchmarks.md

Times are only meaningful on an otherwise idle machine; peak RSS does not depend on contention.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB picture of width×height: a sample picture resized, with sensor-like noise."""
    from skimage import data

    picture = Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.LANCZOS)
    pixels = np.asarray(picture).astype(np.float32)
    pixels += np.random.default_rng(seed).normal(0.0, 2.0, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def run_child(command: list[str]) -> tuple[int, float, int]:
    """(exit status, seconds, peak RSS in bytes) of one child process."""
    started = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.monotonic() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        sys.stderr.write(child.stderr.read().decode(errors="replace")[-2000:] if child.stderr else "")
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # kB on Linux, bytes on macOS
    return child.returncode, seconds, peak


def output_size(path: Path) -> tuple[int, int]:
    """(width, height) of the result, read from its header; the file is then deleted (it can be GBs). The result
    of a 4000×3000 photo at ×4 is 192 MP, above Pillow's decompression-bomb limit, which guards untrusted input,
    not this tool's own output."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as image:
            return image.size
    finally:
        Image.MAX_IMAGE_PIXELS = limit
        path.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1024x768"], help="input sizes WIDTHxHEIGHT")
    parser.add_argument("--weights", default="fast-x4")
    parser.add_argument("--mode", default="perceptual", choices=("perceptual", "fidelity"))
    parser.add_argument("--flags", default="", help="more upscale flags, e.g. '--max-memory 2GiB'")
    parser.add_argument("--markdown", default=None, help="append the rows to this Markdown file")
    args = parser.parse_args()
    rows = []
    header = ("| input | output | mode | flags | peak RSS | seconds | s / output MP |\n"
              "|---|---|---|---|---|---|---|")
    print(header)
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            width, height = (int(part) for part in size.lower().split("x"))
            source = Path(folder) / f"photo_{width}x{height}.png"
            synthetic_photo(width, height).save(source)
            command = [sys.executable, "-m", "blinddiff.cli", "upscale", str(source), "--out", str(Path(folder) / "out"),
                       "--weights", args.weights, "--mode", args.mode, "--no-progress", *args.flags.split()]
            status, seconds, peak = run_child(command)
            out_size = output_size(Path(folder) / "out" / source.name) if status == 0 else (0, 0)
            megapixels = max(out_size[0] * out_size[1], 1) / 1e6
            row = (f"| {width}×{height} | {out_size[0]}×{out_size[1]} | {args.mode} | {args.flags or '(none)'} | "
                   f"{peak / 2**30:.2f} GiB | {seconds:.0f} | {seconds / megapixels:.1f} |" if status == 0 else
                   f"| {width}×{height} | failed (exit {status}) | {args.mode} | {args.flags or '(none)'} | "
                   f"{peak / 2**30:.2f} GiB | | |")
            print(row, flush=True)
            rows.append(row)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as handle:
            handle.write("\n" + header + "\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
