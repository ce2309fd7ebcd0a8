"""Cost of the MAP reverse process (SPEC §5): forward vs guided steps vs a whole sample, per precision/compile mode.

For each config and HR size, times in ONE run (so the ratios compare like with like): a plain forward (no grad),
one guided step back-propagating the data term through the network to x_t (the paper), one guided step taking the
gradient at x̂0 (no backward through the network), and a whole N-step sample; fp32 and bf16, eager and (with
--compile) torch.compile. Random weights of the config — no trained weights needed. Peak memory: allocated bytes on
CUDA, peak RSS (VmHWM, reset per variant) on the CPU. Prints one markdown table per config and size
(`blinddiff bench-speed` prints the same for one of them).

    python benchmarks/sampling_speed.py --configs tiny small-x4 --sizes 64 128 --steps 10
    python benchmarks/sampling_speed.py --configs paper-iso-x4 --sizes 256 --compile --device cuda
"""

from __future__ import annotations

import argparse
import json

import torch

from blinddiff.evaluation import measure_speed, speed_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["small-x4"], help="presets or YAML files")
    parser.add_argument("--sizes", nargs="+", type=int, default=[64], help="HR sizes H (LR is H/scale)")
    parser.add_argument("--steps", type=int, default=10, help="steps of the whole sample")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd variants")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write all rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    rows = []
    for config in args.configs:
        for size in args.sizes:
            measured = measure_speed(config, size=size, steps=args.steps, batch=args.batch, precisions=args.modes,
                                     compile_modes=(False, True) if args.compile else (False,),
                                     repeats=args.repeats, device=args.device)
            print(f"## {config}, HR {size}x{size}, batch {args.batch}, {measured[0]['device']}\n")
            print(speed_table(measured), flush=True)
            rows += measured
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
