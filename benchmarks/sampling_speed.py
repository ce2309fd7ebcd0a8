"""Cost of the MAP reverse process (docs/method.md §4): forward vs guided steps vs a whole sample, per precision/compile mode.

For each config and HR size, times in ONE run (so the ratios compare like with like): a plain forward (no grad),
one guided step back-propagating the data term through the network to x_t (the paper), one guided step taking the
gradient at x̂0 (no backward through the network), and a whole N-step sample; fp32 and bf16, eager and (with
--compile) torch.compile. Random weights of the config — no trained weights needed. Peak memory: allocated bytes on
CUDA, peak RSS (VmHWM, reset per variant) on the CPU. Prints one markdown table per config and size.

    python benchmarks/sampling_speed.py --configs tiny small-x4 --sizes 64 128 --steps 10
    python benchmarks/sampling_speed.py --configs paper-iso-x4 --sizes 256 --compile --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from collections.abc import Callable, Sequence

import torch
from timing import memory_now, memory_peak, reset_peak_memory, time_calls

from blinddiff.config import load_config
from blinddiff.hardware import autocast, pick_device, resolve_precision
from blinddiff.inference import BlindDiff, SampleOptions
from blinddiff.model import MCFormer

SPEED_VARIANTS = ("forward", "guided step (∂/∂x_t)", "guided step (∂/∂x̂0)", "sample")


def measure_speed(config: str, *, size: int | None = None, steps: int = 10, batch: int = 1,
                  precisions: Sequence[str] = ("fp32", "bf16"), compile_modes: Sequence[bool] = (False,),
                  repeats: int = 3, device: str = "auto", seed: int = 0,
                  log: Callable[[str], None] | None = None) -> list[dict]:
    """Time the pieces of the reverse process with random weights of ``config`` (docs/method.md §4), in one run.

    Per (precision, eager/compiled): a plain forward (no grad), one guided step with ∂E/∂x_t through
    the network (the paper), one with ∂E/∂x̂0, and a whole ``steps``-step sample, on a batch of HR
    ``size``² images (LR size/scale). ``seconds`` is the best of ``repeats`` after a warm-up (robust to
    other load on shared machines; the median is kept too). Memory: peak allocated on CUDA; elsewhere
    peak RSS (VmHWM, reset before each variant) and its increase over the RSS before the variant — the
    allocator keeps freed memory, so on the CPU later variants show only what they add beyond it.
    Returns one dict per (mode, variant).
    """
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
                resettable = reset_peak_memory(target)
                before = memory_now(target)
                times = time_calls(fn, repeats, warmup=2 if compiled else 1, device=target)
                peak = memory_peak(target)
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
