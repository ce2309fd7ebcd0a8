"""How well `degradation.estimate_noise_level` measures the noise of LR images with a known level.

On a test set built by `make-benchmark --protocol real` (its manifest holds each case's effective noise
σ: the RMS of the LR minus the same chain without noise and JPEG), and on clean LR images with Gaussian
noise of known σ added (Set5 at σ 2.6, say), prints the mean absolute error, the bias and the
correlation of σ̂ against the truth, by noise band.

    python benchmarks/noise_estimation.py --real /work/bench/b100real --clean /work/bench/set5_26
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from blinddiff.degradation import estimate_noise_level
from blinddiff.fileio import read_rgb, rgb_to_tensor
from blinddiff.testsets import load_benchmark

ADDED_SIGMAS = (0.0, 3.0, 8.0, 12.0)


def report(label: str, truth: np.ndarray, estimate: np.ndarray) -> dict:
    error = estimate - truth
    row = {"set": label, "cases": int(truth.size), "mae": float(np.abs(error).mean()), "bias": float(error.mean()),
           "corr": float(np.corrcoef(truth, estimate)[0, 1]) if truth.std() > 0 else float("nan")}
    print(f"| {label} | {row['cases']} | {row['mae']:.2f} | {row['bias']:+.2f} | {row['corr']:.3f} |")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", help="a make-benchmark --protocol real test set")
    parser.add_argument("--clean", help="a test set of clean LR images (e.g. --protocol iso:2.6)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    print("| set | cases | MAE (0–255) | bias | correlation |\n|---|---:|---:|---:|---:|")
    if args.real:
        bench = load_benchmark(args.real)
        truth = np.array([case["noise_sigma"] for case in bench.cases])
        estimate = np.array([float(estimate_noise_level(rgb_to_tensor(bench.lr(case)))[0]) for case in bench.cases])
        rows.append(report(f"{Path(args.real).name} (all)", truth, estimate))
        for low, high in ((0, 4), (4, 8), (8, 100)):
            band = (truth >= low) & (truth < high)
            if band.any():
                rows.append(report(f"{Path(args.real).name} σ ∈ [{low}, {high})", truth[band], estimate[band]))
    if args.clean:
        bench = load_benchmark(args.clean)
        generator = torch.Generator().manual_seed(0)
        for sigma in ADDED_SIGMAS:
            truth, estimate = [], []
            for case in bench.cases:
                lr = rgb_to_tensor(bench.lr(case))
                noisy = torch.round((lr + sigma / 255 * torch.randn(lr.shape, generator=generator)).clamp(0, 1) * 255)
                truth.append(sigma)
                estimate.append(float(estimate_noise_level(noisy / 255)[0]))
            rows.append(report(f"{Path(args.clean).name} + σ {sigma:g}", np.array(truth), np.array(estimate)))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
