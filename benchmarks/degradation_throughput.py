"""Throughput of training-data degradation (docs/method.md §1): HR patches → blurred, ×1/s, quantised LR.

Default case = the training hot path: 32 × 3 × 128² HR patches, one random isotropic 21×21
Gaussian per patch, MATLAB bicubic ×1/4, 8-bit quantisation; then the stages of the real-world model
(`degrade_real`, data.setting real): its kernel zoo, per-image JPEG through Pillow and the whole
second-order chain with the training settings. The patches are uniform noise low-passed by a σ 1.5
Gaussian, so JPEG sees image-like content (its speed depends on it). Prints the median (and best) time
per batch and patches/s of each stage after a warm-up; `training_throughput.py` gives the share of a
training step.

    python benchmarks/degradation_throughput.py [--batch 32 --size 128 --kernel-size 21 --scale 4]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from timing import time_calls

from blinddiff.degradation import RealDegradation, blur, degrade, degrade_real, downsample, jpeg, quantize
from blinddiff.kernels import isotropic_gaussian, sample_real_kernels


def gaussian_kernels(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random isotropic Gaussians, σ ~ U(0.2, 4) on a size×size grid (docs/method.md §1 setting 1)."""
    sigma = 0.2 + 3.8 * torch.rand(batch, 1, 1, generator=generator)
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    r2 = coords[None, :, None] ** 2 + coords[None, None, :] ** 2
    kernels = torch.exp(-r2 / (2 * sigma**2))
    return kernels / kernels.sum(dim=(1, 2), keepdim=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=128, help="HR patch side")
    parser.add_argument("--kernel-size", type=int, default=21)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed calls of every stage before timing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(args.batch, 3, args.size, args.size, generator=generator)
    hr = blur(noise, isotropic_gaussian(1.5, 9)).to(device, dtype)
    kernels = gaussian_kernels(args.batch, args.kernel_size, generator).to(device, dtype)
    blurred = blur(hr, kernels)

    stages: list[tuple[str, Callable[[], object]]] = [
        ("kernel sampling (Gaussian)",
         lambda: gaussian_kernels(args.batch, args.kernel_size, generator)),
        ("blur, grouped conv2d", lambda: blur(hr, kernels, method="conv")),
        ("blur, FFT", lambda: blur(hr, kernels, method="fft")),
        (f"bicubic resize x1/{args.scale}", lambda: downsample(blurred, args.scale)),
        ("quantize", lambda: quantize(blurred)),
        (f"degrade (auto blur, bicubic x1/{args.scale}, quantize)",
         lambda: degrade(hr, kernels, args.scale)),
        (f"degrade (direct x1/{args.scale}, strided blur, quantize)",
         lambda: degrade(hr, kernels, args.scale, downsample="direct")),
        ("real-world kernels (6 families, random supports)",
         lambda: sample_real_kernels(args.batch, args.kernel_size, generator=generator)),
        ("JPEG q 60, Pillow, per image (HR size)", lambda: jpeg(hr, 60)),
        (f"degrade_real (training settings, x1/{args.scale})",
         lambda: degrade_real(hr, RealDegradation(), args.scale, args.kernel_size, generator)),
    ]
    print(f"batch {args.batch} x 3 x {args.size}^2, kernels {args.kernel_size}^2 per sample, "
          f"scale {args.scale}, {args.dtype} on {device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"{'stage':<52} {'median ms':>9} {'patches/s':>10} {'best ms':>8} {'patches/s':>10}")
    with torch.no_grad():
        # Warm every stage up before timing any: besides one-off setup, the first large
        # frees move glibc's mmap threshold, after which conv2d's buffers stop page-faulting
        # (conv timed cold runs ~2x slower than in a steady training loop).
        for _ in range(args.warmup):
            for _, fn in stages:
                fn()
        sync()
        for name, fn in stages:
            times = time_calls(fn, args.repeats, warmup=0, device=device)  # warmed up above, all stages first
            median, best = statistics.median(times), min(times)
            print(f"{name:<52} {median * 1e3:>9.2f} {args.batch / median:>10.0f} "
                  f"{best * 1e3:>8.2f} {args.batch / best:>10.0f}")


if __name__ == "__main__":
    main()
