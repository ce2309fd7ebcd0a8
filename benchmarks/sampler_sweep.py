"""Choose the sampling defaults by measurement (the paper's Table 4 / Fig. 7a analogue).

One factor at a time around a base setting, each a full `blinddiff benchmark` run (resumable) on one test
set — Set5 only, never a reported set:

* reverse steps, at the base ζ and gradient;
* ζ (step size of the kernel-aware gradient, docs/method.md §4), at the base steps, for each gradient variant
  (x_t: back-propagated through the network, the paper; x̂0: taken at the prediction, no backward);
* the deterministic DDIM sampler (η = 0) at the base steps.

Prints (and writes to OUT/sweep.md) one table: PSNR/SSIM-Y, kernel L1, kernel LR-PSNR and wall time per
image, for every setting.

    python benchmarks/sampler_sweep.py --benchmark runs/sets/Set5-s2.6 --out runs/sweep
"""

from __future__ import annotations

import argparse
from pathlib import Path

from blinddiff.evaluation import BenchmarkSettings, markdown_table, run_benchmark
from blinddiff.inference import DEFAULT_WEIGHTS, SampleOptions


def settings_to_try(steps: list[int], zetas: list[float], gradients: list[str], base: SampleOptions) -> list[SampleOptions]:
    """The one-factor-at-a-time design around ``base`` (no setting twice)."""
    tried: list[SampleOptions] = []

    def add(options: SampleOptions) -> None:
        if options not in tried:
            tried.append(options)

    for count in steps:
        add(SampleOptions(steps=count, zeta=base.zeta, gradient=base.gradient))
    for gradient in gradients:
        for zeta in zetas:
            add(SampleOptions(steps=base.steps, zeta=zeta, gradient=gradient))
    add(SampleOptions(steps=base.steps, zeta=base.zeta, gradient=base.gradient, sampler="ddim", eta=0.0))
    return tried


def label(options: SampleOptions) -> str:
    return f"{options.sampler} {options.steps} steps, ζ {options.zeta:g}, grad {options.gradient}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", required=True, help="test-set folder (Set5 only: this tunes the defaults)")
    parser.add_argument("--out", required=True, help="folder of the runs (re-running resumes)")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS)
    parser.add_argument("--steps", default="5,10,20,50,100")
    parser.add_argument("--zetas", default="0,0.1,1,5,10")
    parser.add_argument("--gradients", default="xt,x0")
    parser.add_argument("--base-steps", type=int, default=20)
    parser.add_argument("--base-zeta", type=float, default=1.0)
    parser.add_argument("--base-gradient", choices=("xt", "x0"), default="xt")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    base = SampleOptions(steps=args.base_steps, zeta=args.base_zeta, gradient=args.base_gradient)
    grid = settings_to_try([int(s) for s in args.steps.split(",")], [float(z) for z in args.zetas.split(",")],
                           args.gradients.split(","), base)
    out = Path(args.out)
    settings = BenchmarkSettings(baselines=(), trajectory_cases=0, report_cases=4)
    summaries = {}
    for index, options in enumerate(grid):
        name = f"{options.sampler}-{options.steps}-zeta{options.zeta:g}-{options.gradient}"
        print(f"[{index + 1}/{len(grid)}] {label(options)}", flush=True)
        outcome = run_benchmark(args.benchmark, args.weights, out / name, options=options, settings=settings,
                                device=args.device, log=lambda message: None)
        if outcome.results is None or outcome.problems:
            raise SystemExit(f"{name}: {outcome.problems or 'no results'}")
        summaries[label(options)] = outcome.results["methods"]["blinddiff"]["mean"]
    table = markdown_table(summaries, ["psnr", "ssim", "lpips_vgg", "kernel_l1", "lr_psnr", "seconds"], first="setting")
    (out / "sweep.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
