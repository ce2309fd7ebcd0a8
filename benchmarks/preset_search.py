"""Pick the `small-x4` shape by measurement: equal CPU time, best held-out loss.

Each candidate network (≤ 3 M parameters) trains for the same wall-clock budget on the training images
(setting 1, ×4, bf16 autocast, Adam 2e-4), then is scored on fixed validation patches cut from Set14
(tuning sets only: Set5/Set14) with fixed timesteps and noise: ε-MSE and kernel L1 (paper Eq. 13
terms). A short budget is a proxy for the 2-hour run: it ranks how fast each shape learns per second.

    python benchmarks/preset_search.py --minutes 4 --val ../shared/data/benchmarks/Set14
"""

from __future__ import annotations

import argparse
import time

import torch

from blinddiff.config import load_config
from blinddiff.data import HRPatches, TrainingDegradation, derive_seed
from blinddiff.diffusion import GaussianDiffusion
from blinddiff.hardware import autocast
from blinddiff.losses import loss_settings, training_losses
from blinddiff.model import MCFormer, count_parameters
from blinddiff.train import StepBatches, train_step

CANDIDATES = {
    "w16-b1224-r1": ["model.width=16", "model.blocks=[1,2,2,4]", "model.refinement_blocks=1",
                     "model.estimator_width=24"],
    "w16-b2234-r2": ["model.width=16", "model.blocks=[2,2,3,4]", "model.refinement_blocks=2",
                     "model.estimator_width=24"],
    "w24-b1122-r1": ["model.width=24", "model.blocks=[1,1,2,2]", "model.refinement_blocks=1",
                     "model.estimator_width=24"],
}


def validation_set(root: str, crop: int, count: int, cfg) -> tuple[torch.Tensor, ...]:
    patches = HRPatches(root, crop, augment=False, seed=123)
    hr = torch.stack([patches[(0, i % len(patches))] if i < len(patches) else patches[(1, i % len(patches))]
                      for i in range(count)])
    generator = torch.Generator().manual_seed(99)
    hr, lr, kernel = TrainingDegradation.from_config(cfg.data)(hr, generator)
    t = torch.linspace(0, cfg.diffusion.train_steps - 1, count).long()
    noise = torch.randn(hr.shape, generator=generator)
    return hr, lr, kernel, t, noise


def evaluate(model, schedule, cfg, val) -> dict[str, float]:
    hr, lr, kernel, t, noise = val
    model.eval()
    with torch.no_grad(), autocast("bf16", torch.device("cpu")):
        losses = training_losses(schedule, model, hr, lr, kernel, t=t, noise=noise, **loss_settings(cfg.diffusion))
    model.train()
    return {k: float(v.mean()) for k, v in losses.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train", default="../shared/data/train")
    parser.add_argument("--val", default="../shared/data/benchmarks/Set14")
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    print("| candidate | params | steps | patches/s | val ε-MSE | val kernel L1 | val loss |")
    print("|---|---|---|---|---|---|---|")
    for name, overrides in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        cfg = load_config("paper-iso-x4", [*overrides, f"data.crop={args.crop}", f"data.root={args.train}"])
        torch.manual_seed(0)
        model = MCFormer(cfg.model)
        schedule = GaussianDiffusion.from_config(cfg.diffusion)
        degradation = TrainingDegradation.from_config(cfg.data)
        data = HRPatches(cfg.data.root, args.crop, cache=True, seed=0)
        batches = StepBatches(len(data), args.batch, seed=0)
        val = validation_set(args.val, args.crop, 64, cfg)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.99))
        step, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.minutes * 60:
            hr = torch.stack([data[key] for key in batches.batch(step)])
            generator = torch.Generator().manual_seed(derive_seed(0, step))
            train_step(model, schedule, degradation(hr, generator), optimizer, generator=generator, precision="bf16",
                       grad_clip=1.0, **loss_settings(cfg.diffusion))
            step += 1
        elapsed = time.perf_counter() - start
        scores = evaluate(model, schedule, cfg, val)
        print(f"| {name} | {count_parameters(model) / 1e6:.2f} M | {step} | {step * args.batch / elapsed:.1f} | "
              f"{scores['mse']:.4f} | {scores['kernel']:.4f} | {scores['loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
