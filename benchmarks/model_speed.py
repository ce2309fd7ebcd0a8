"""Forward and training-step time of MCFormer presets.

For each preset, batch size and mode (fp32 eager, bf16 autocast, torch.compile with fp32 / bf16), times
one forward pass (no grad) and one full training step (degradation excluded; diffusion loss, backward,
Adam) at HR size S×S, and prints a markdown table with patches/s. Median of --repeats after warm-up.

    python benchmarks/model_speed.py --configs paper-iso-x4 small-x4 --size 128 --batch 1 8
"""

from __future__ import annotations

import argparse
import statistics

import torch
from timing import time_calls

from blinddiff.config import load_config
from blinddiff.diffusion import GaussianDiffusion
from blinddiff.hardware import autocast
from blinddiff.losses import loss_settings
from blinddiff.model import MCFormer, count_parameters
from blinddiff.train import train_step

MODES = {"fp32": ("fp32", False), "bf16": ("bf16", False), "compiled-fp32": ("fp32", True),
         "compiled-bf16": ("bf16", True)}


def timed(fn, repeats: int, warmup: int) -> float:
    return statistics.median(time_calls(fn, repeats, warmup=warmup))


def measure(config: str, batch: int, size: int, mode: str, repeats: int, train: bool) -> tuple[float, float | None]:
    cfg = load_config(config)
    precision, compiled = MODES[mode]
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = MCFormer(cfg.model)
    net = torch.compile(model) if compiled else model
    scale = cfg.data.scale
    x = torch.rand(batch, 3, size, size)
    lr = torch.rand(batch, 3, size // scale, size // scale)
    t = torch.randint(0, 1000, (batch,))
    kernel = torch.softmax(torch.randn(batch, cfg.model.kernel_size ** 2), 1).view(batch, cfg.model.kernel_size,
                                                                                   cfg.model.kernel_size)
    warmup = 2 if compiled else 1

    def forward() -> None:
        with torch.no_grad(), autocast(precision, device):
            net(x, t, lr)

    model.eval()
    forward_s = timed(forward, repeats, warmup)
    if not train:
        return forward_s, None
    model.train()
    schedule = GaussianDiffusion.from_config(cfg.diffusion)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)

    def step() -> None:
        train_step(net, schedule, (x, lr, kernel), optimizer, precision=precision, **loss_settings(cfg.diffusion))

    return forward_s, timed(step, repeats, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["paper-iso-x4", "small-x4"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-train", action="store_true", help="forward only")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, HR {args.size}x{args.size}\n")
    print("| config | params | batch | mode | forward (s) | vs fp32 | train step (s) | vs fp32 | train patches/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for config in args.configs:
        params = count_parameters(MCFormer(load_config(config).model))
        for batch in args.batch:
            base: tuple[float, float | None] | None = None
            for mode in args.modes:
                fwd, step = measure(config, batch, args.size, mode, args.repeats, not args.no_train)
                base = base or (fwd, step)
                step_text = f"{step:.3f} | {base[1] / step:.2f}× | {batch / step:.1f}" if step else "– | – | –"
                print(f"| {config} | {params / 1e6:.2f} M | {batch} | {mode} | {fwd:.3f} | {base[0] / fwd:.2f}× | "
                      f"{step_text} |", flush=True)


if __name__ == "__main__":
    main()
