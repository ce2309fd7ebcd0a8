"""`make demo`: blind ×4 super-resolution of a degraded sample picture, with its estimated kernel.

Runs offline: the picture ships with scikit-image and the default model ships with blinddiff. The HR
crop is blurred with a Gaussian8 kernel (docs/method.md §1, Table 1 protocol), MATLAB-bicubic downsampled ×4 and
quantised; the default model then estimates image and kernel together (docs/method.md §4), at both ends of the
perception–distortion trade-off. Writes one PNG: LR | bicubic | fidelity | perceptual | HR, with the GT
and the estimated kernel, and prints PSNR-Y and LPIPS-VGG (the paper's metrics; LPIPS with the weights
of `make metric-weights`) and the seconds of each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .degradation import degrade, estimate_noise_level, upsample_bicubic
from .fileio import expand_path, kernel_picture, read_rgb, rgb_to_tensor, tensor_to_rgb, write_png
from .inference import DEFAULT_WEIGHTS, MODES, BlindDiff
from .kernels import isotropic_gaussian
from .metrics import evaluate_pair, load_perceptual

__all__ = ["main"]

REAL_PHOTO = "${BLINDDIFF_DATA:-../shared/data}/real/RealSRSet+5images/chip.png"  # 120×120, real JPEG damage


def panel(tiles: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """Tiles (uint8 [H, W, 3], any heights) side by side on a white background, top-aligned."""
    height = max(t.shape[0] for t in tiles)
    width = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    left = 0
    for tile in tiles:
        canvas[: tile.shape[0], left: left + tile.shape[1]] = tile
        left += tile.shape[1] + gap
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_output", help="output folder")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS, help="weights file or shipped name")
    parser.add_argument("--sigma", type=float, default=2.6, help="Gaussian8 kernel width of the degradation")
    parser.add_argument("--size", type=int, default=256, help="HR crop size (LR is size/4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", default=REAL_PHOTO, help="a real LR photo to upscale beside bicubic at the end")
    args = parser.parse_args(argv)
    try:
        from skimage import data
    except ImportError:
        print("the demo needs scikit-image for its sample picture: pip install 'blinddiff[demo]'", file=sys.stderr)
        return 2
    try:
        model = BlindDiff.from_pretrained(args.weights, device="cpu")
    except (FileNotFoundError, ValueError) as err:
        print(f"demo: {err}", file=sys.stderr)
        return 2
    scale = model.scale
    size = args.size - args.size % scale
    picture = data.astronaut()  # 512×512 RGB
    top, left = 40, (picture.shape[1] - size) // 2  # the face and the badge, detail at every scale
    hr = torch.from_numpy(np.ascontiguousarray(picture[top: top + size, left: left + size])).permute(2, 0, 1)[None]
    hr = hr.float() / 255
    kernel = isotropic_gaussian(args.sigma, model.cfg.model.kernel_size)
    lr = degrade(hr, kernel, scale, downsample=model.cfg.data.downsample)
    results, seconds = {}, {}
    for mode in MODES:
        start = time.perf_counter()
        results[mode], estimated = model.upscale(lr, mode=mode, seed=args.seed)
        seconds[mode] = time.perf_counter() - start
    bicubic = upsample_bicubic(lr, scale).clamp(0, 1)
    try:
        networks = {"lpips_vgg": load_perceptual("lpips_vgg")}
    except FileNotFoundError as err:
        print(f"demo: no LPIPS: {err}", file=sys.stderr)
        networks = {}
    scores = {name: evaluate_pair(image[0], hr[0], scale=scale, metrics=("psnr", *networks), networks=networks)
              for name, image in (*results.items(), ("bicubic", bicubic))}

    lr_big = np.kron(tensor_to_rgb(lr), np.ones((scale, scale, 1), np.uint8))  # nearest ×s, to compare sizes
    magnify = max(1, size // (2 * kernel.shape[-1]))
    kernels = [np.repeat(kernel_picture(k.numpy(), magnify)[..., None], 3, axis=2) for k in (kernel[0], estimated[0])]
    picture_out = panel([lr_big, tensor_to_rgb(bicubic), *(tensor_to_rgb(sr) for sr in results.values()),
                         tensor_to_rgb(hr), *kernels])
    out = Path(args.out)
    write_png(out / "demo.png", picture_out)
    print(f"blind ×{scale} SR of a {size}x{size} crop of skimage's astronaut, Gaussian kernel σ={args.sigma}")
    for name, score in scores.items():
        lpips = f", LPIPS-VGG {score['lpips_vgg']:.4f}" if "lpips_vgg" in score else ""
        timing = f"  ({model.options(name).steps} steps, {seconds[name]:.1f} s)" if name in seconds else ""
        print(f"{name + ':':<12} PSNR-Y {score['psnr']:.2f} dB{lpips}{timing}")
    print(f"wrote {out / 'demo.png'}: LR (nearest) | bicubic | {' | '.join(MODES)} | HR | GT kernel | "
          f"estimated kernel (perceptual)")
    real_photo(model, Path(expand_path(args.real)), out, args.seed)
    return 0


def real_photo(model: BlindDiff, path: Path, out: Path, seed: int) -> None:
    """A real LR photo (no ground truth): LR (nearest) | bicubic | ours (perceptual) | estimated kernel,
    with the estimated noise level; skipped, saying so, when the photo is not there (a clone without
    the shared data beside it)."""
    if not path.is_file():
        print(f"no real photo at {path} (set BLINDDIFF_DATA to the shared data folder); skipped that part")
        return
    lr = rgb_to_tensor(read_rgb(path))
    sr, estimated = model.upscale(lr, seed=seed)
    scale = model.scale
    sigma = float(estimate_noise_level(lr)[0])
    lr_big = np.kron(tensor_to_rgb(lr), np.ones((scale, scale, 1), np.uint8))
    kernel = np.repeat(kernel_picture(estimated[0].numpy(), 4)[..., None], 3, axis=2)
    bicubic = tensor_to_rgb(upsample_bicubic(lr, scale).clamp(0, 1))
    write_png(out / "demo_real.png", panel([lr_big, bicubic, tensor_to_rgb(sr), kernel]))
    print(f"wrote {out / 'demo_real.png'}: the real photo {path.name} (estimated noise σ {sigma:.1f} on 0–255): "
          f"LR (nearest) | bicubic | perceptual | estimated kernel")


if __name__ == "__main__":
    sys.exit(main())
