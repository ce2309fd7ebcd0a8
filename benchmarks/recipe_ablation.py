"""Equal-budget recipe ablation.

Every candidate is trained by the real trainer on the same number of HR patches (``--patches``) and
scored on one held-out set: a fixed Set14 Gaussian8 subset of 14 cases (image i at σ number i mod 8,
so all eight blurs appear), built once by `held_out_set`. Scores are those of `blinddiff benchmark`
at the default sampling settings: PSNR/SSIM-Y, LPIPS-VGG, kernel LR-PSNR. Reference rows: the
small-x4 recipe, and a plain LR-domain regression CNN (12 dense 3×3 convs of 64 channels,
pixel-shuffle out, residual over ↑y, L1 loss) trained on the same pipeline and patch count.
Throughput is NOT measured here (runs may share the CPU): see benchmarks/training_throughput.py.

Resumable: a candidate whose run or scores exist is not redone.

    python benchmarks/recipe_ablation.py --patches 19200 --out runs/ablation
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blinddiff.config import load_config
from blinddiff.data import HRPatches, TrainingDegradation, derive_seed
from blinddiff.fileio import read_rgb, rgb_to_tensor, tensor_to_rgb, write_json, write_png

# name → (preset, overrides); "lr-cnn" is the regression reference, trained below
CANDIDATES = {
    "small-x4": ("small-x4", []),
    "fast-x4": ("fast-x4", []),
    "fast-x4, eps-prediction": ("fast-x4", ["diffusion.prediction=eps", "model.residual_over=x_t"]),
    "fast-x4, 64² crops": ("fast-x4", ["data.crop=64"]),
    "lr-cnn": None,
}
HELD_OUT_CASES = 14


def held_out_set(gaussian8: Path, out: Path) -> Path:
    """A copy of `HELD_OUT_CASES` cases of a make-benchmark Gaussian8 folder: image i at σ number i mod 8."""
    if (out / "manifest.json").is_file():
        return out
    manifest = json.loads((gaussian8 / "manifest.json").read_text())
    by_image: dict[str, list[dict]] = {}
    for case in manifest["cases"]:
        by_image.setdefault(case["hr"], []).append(case)
    chosen = [sorted(cases, key=lambda c: c["sigma"])[i % len(cases)]
              for i, (_, cases) in enumerate(sorted(by_image.items()))][:HELD_OUT_CASES]
    for case in chosen:
        for key in ("hr", "lr", "kernel"):
            (out / case[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(gaussian8 / case[key], out / case[key])
    write_json(out / "manifest.json", {**manifest, "cases": chosen})
    return out


class LRRegressionCNN(nn.Module):
    """The yardstick: 12 dense 3×3 convs (64 ch, ReLU) at LR resolution, pixel-shuffle out, + bicubic ↑y."""

    def __init__(self, scale: int = 4, width: int = 64, depth: int = 12) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        layers += [nn.Conv2d(width, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale)]
        self.body, self.scale = nn.Sequential(*layers), scale

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return up + self.body(lr.contiguous(memory_format=torch.channels_last))


def train_cnn(patches: int, run: Path, data_root: str) -> Path:
    weights = run / "cnn.pt"
    if weights.is_file():
        return weights
    cfg = load_config("fast-x4")  # its data settings: setting 1, 128² crops, batch 16
    batch = cfg.train.batch_size
    dataset = HRPatches(data_root, cfg.data.crop, cache=True, seed=0)
    degradation = TrainingDegradation.from_config(cfg.data)
    torch.manual_seed(0)
    model = LRRegressionCNN(cfg.data.scale).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
    steps = patches // batch
    start = time.perf_counter()
    for step in range(steps):
        keys = [((step * batch + i) // len(dataset), (step * batch + i) % len(dataset)) for i in range(batch)]
        hr = torch.stack([dataset[key] for key in keys])
        hr, lr, _ = degradation(hr, torch.Generator().manual_seed(derive_seed(0, step)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.l1_loss(model(lr).float(), hr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 200 == 0:
            print(f"lr-cnn step {step + 1}/{steps} loss {loss.item():.4f} "
                  f"{(step + 1) * batch / (time.perf_counter() - start):.1f} patches/s", flush=True)
    run.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    return weights


def score_cnn(weights: Path, held_out: Path, out: Path) -> dict:
    model = LRRegressionCNN()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    sr_dir = out / "sr"
    sr_dir.mkdir(parents=True, exist_ok=True)
    for case in json.loads((held_out / "manifest.json").read_text())["cases"]:
        with torch.no_grad():
            sr = model(rgb_to_tensor(read_rgb(held_out / case["lr"])))[0]
        write_png(sr_dir / f"{case['name']}.png", tensor_to_rgb(sr.clamp(0, 1)))
    subprocess.run([sys.executable, "-m", "blinddiff.cli", "evaluate", "--benchmark", str(held_out), "--sr",
                    str(sr_dir), "--metrics", "psnr,ssim,lpips", "--json", str(out / "metrics.json")], check=True)
    records = json.loads((out / "metrics.json").read_text())
    rows = records["cases"] if isinstance(records, dict) else records
    return {key: sum(r[key] for r in rows) / len(rows) for key in ("psnr", "ssim", "lpips_vgg")}


def train_candidate(preset: str, overrides: list[str], patches: int, run: Path) -> Path:
    weights = run / "weights.safetensors"
    if weights.is_file():
        return weights
    cfg = load_config(preset, overrides)
    steps = patches // cfg.train.batch_size
    settings = [*overrides, f"train.steps={steps}", f"train.lr_milestones=[{int(0.8 * steps)}]",
                f"train.checkpoint_every={max(steps // 4, 1)}", "train.log_every=50"]
    command = [sys.executable, "-m", "blinddiff.cli", "train", "--config", preset, "--out", str(run), "--resume",
               "--no-progress"]
    for setting in settings:
        command += ["--set", setting]
    subprocess.run(command, check=True)
    return weights


def score_candidate(weights: Path, held_out: Path, out: Path, mode: str) -> dict:
    """Mean scores of `blinddiff benchmark --mode MODE` (the mode's default sampling settings)."""
    results = out / "results.json"
    if not results.is_file():
        subprocess.run([sys.executable, "-m", "blinddiff.cli", "benchmark", "--benchmark", str(held_out), "--out",
                        str(out), "--weights", str(weights), "--mode", mode,
                        "--baselines", "bicubic" if mode == "fidelity" else "none",
                        "--trajectory-cases", "0", "--no-progress",
                        "--metrics", "psnr,ssim,lpips,lr_psnr,kernel_l1"], check=True)
    methods = json.loads(results.read_text())["methods"]
    bicubic = {f"bicubic_{k}": methods["bicubic"]["mean"][k] for k in ("psnr", "lpips_vgg")} if "bicubic" in methods \
        else {}
    return {**methods["blinddiff"]["mean"], **bicubic}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=int, default=19200, help="training patches per candidate")
    parser.add_argument("--gaussian8", type=Path, default=Path("runs/bench/set14_g8"),
                        help="make-benchmark --protocol gaussian8 folder of Set14")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--only", nargs="*", help="candidate names to run (default: all)")
    parser.add_argument("--train-only", action="store_true", help="train, score later")
    args = parser.parse_args()
    data_root = os.path.expandvars(load_config("fast-x4").data.root)
    held_out = held_out_set(args.gaussian8, args.out / "held_out")
    rows = []
    for name, recipe in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        folder = args.out / name.replace(", ", "_").replace(" ", "-").replace("²", "")
        if recipe is None:
            weights = train_cnn(args.patches, folder, data_root)
            if not args.train_only:
                rows.append((name, "regression", score_cnn(weights, held_out, folder / "eval")))
            continue
        weights = train_candidate(*recipe, args.patches, folder)
        if not args.train_only:
            for mode in ("perceptual", "fidelity"):
                rows.append((name, mode, score_candidate(weights, held_out, folder / f"eval_{mode}", mode)))
    if rows:
        bicubic = next(r for _, _, r in rows if "bicubic_psnr" in r)
        print(f"\nheld-out: {HELD_OUT_CASES} Set14 Gaussian8 cases; {args.patches} training patches per candidate; "
              f"bicubic PSNR-Y {bicubic['bicubic_psnr']:.2f} dB, LPIPS-VGG {bicubic['bicubic_lpips_vgg']:.4f}\n")
        print("| recipe | sampling | PSNR-Y | Δ bicubic | SSIM-Y | LPIPS-VGG | kernel LR-PSNR | kernel L1 |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for name, mode, r in rows:
            kernel = f"{r['lr_psnr']:.2f} | {r['kernel_l1']:.3f}" if "lr_psnr" in r else "– | –"
            print(f"| {name} | {mode} | {r['psnr']:.2f} | {r['psnr'] - bicubic['bicubic_psnr']:+.2f} | {r['ssim']:.4f} "
                  f"| {r['lpips_vgg']:.4f} | {kernel} |")


if __name__ == "__main__":
    main()
