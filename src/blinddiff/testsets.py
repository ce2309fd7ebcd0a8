"""Synthetic test sets with known kernels (SPEC §2: the Gaussian8 benchmark of Table 1, the anisotropic
setting of Table 2, motion-blur deblurring) and one-off degradation of single images.

A test set folder holds `HR/<stem>.png` (mod-cropped to a multiple of the scale, top-left),
`LR/<stem>_<tag>.png` (uint8), `kernels/<stem>_<tag>.npy` (float32 k×k) and `manifest.json` with one
record per case. Everything is a pure function of the arguments: same arguments, same bytes.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__
from .data import derive_seed
from .degradation import degrade
from .fileio import ImageError, expand_inputs, find_images, read_rgb, rgb_to_tensor, tensor_to_rgb, write_json, \
    write_npy, write_png
from .kernels import GAUSSIAN8_SIGMAS, isotropic_gaussian, motion_blur, parse_kernel_spec, sample_anisotropic

DOWNSAMPLE_MODES = ("bicubic", "direct")
MOTION_KERNEL_SIZE = 64  # BlindDPS's motion kernels
# One case of a protocol: (tag, parameters for the manifest, kernel [k, k]).
Case = tuple[str, dict, torch.Tensor]


def stem_seed(seed: int, name: str) -> int:
    """Per-image seed: depends on the image name, not on its position, so adding images changes nothing else."""
    return derive_seed(seed, zlib.crc32(name.encode()))


def default_kernel_size(kind: str, kernel_size: int | None) -> int:
    """The kernel size asked for, else 64 for motion blur (BlindDPS) and 21 for Gaussians (SPEC §2)."""
    return kernel_size or (MOTION_KERNEL_SIZE if kind.startswith(("motion", "random-motion")) else 21)


def protocol_cases(protocol: str, size: int) -> Callable[[str, int], list[Case]]:
    """Parse `gaussian8 | aniso | motion | iso:SIGMA` into a function (stem, seed) → cases for that image."""
    if protocol == "gaussian8":
        kernels = isotropic_gaussian(torch.tensor(GAUSSIAN8_SIGMAS, dtype=torch.float64), size)
        cases = [(f"sig{s}", {"kernel_type": "iso", "sigma": s}, k) for s, k in zip(GAUSSIAN8_SIGMAS, kernels)]
        return lambda stem, seed: cases
    if protocol.startswith("iso:"):
        try:
            sigma = float(protocol[4:])
        except ValueError:
            sigma = math.nan
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"protocol {protocol!r}: sigma must be a positive number, e.g. iso:2.6")
        case = (f"sig{sigma:g}", {"kernel_type": "iso", "sigma": sigma}, isotropic_gaussian(sigma, size)[0])
        return lambda stem, seed: [case]
    if protocol == "aniso":
        def aniso(stem: str, seed: int) -> list[Case]:
            case_seed = stem_seed(seed, stem)
            kernel = sample_anisotropic(1, size, generator=torch.Generator().manual_seed(case_seed))[0]
            return [("aniso", {"kernel_type": "aniso", "seed": case_seed}, kernel)]
        return aniso
    if protocol == "motion":
        def motion(stem: str, seed: int) -> list[Case]:
            case_seed = stem_seed(seed, stem)
            kernel = motion_blur(1, size, intensity=0.5, generator=torch.Generator().manual_seed(case_seed))[0]
            return [("motion", {"kernel_type": "motion", "intensity": 0.5, "seed": case_seed}, kernel)]
        return motion
    raise ValueError(f"protocol {protocol!r} is unknown; use gaussian8, aniso, motion or iso:SIGMA (e.g. iso:2.6)")


def check_degradation_args(scale: int, downsample: str, noise: float) -> None:
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale {scale} is invalid; use an integer ≥ 1 (1 = deblurring)")
    if downsample not in DOWNSAMPLE_MODES:
        raise ValueError(f"downsample {downsample!r} is unknown; use one of {', '.join(DOWNSAMPLE_MODES)}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise {noise} is invalid; use a standard deviation ≥ 0 on the [0, 1] scale, e.g. 0.01")


def mod_crop(image: np.ndarray, scale: int) -> np.ndarray:
    """Crop [H, W, C] to multiples of `scale`, keeping the top-left corner."""
    height, width = (image.shape[0] // scale) * scale, (image.shape[1] // scale) * scale
    if height == 0 or width == 0:
        raise ImageError(f"image of {image.shape[1]}x{image.shape[0]} is smaller than the scale {scale}")
    return image[:height, :width]


def degrade_image(hr: np.ndarray, kernel: torch.Tensor, scale: int, downsample: str, noise: float,
                  seed: int) -> np.ndarray:
    """uint8 HR [H, W, 3] → uint8 LR with one kernel; noise (if any) drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    if min(hr.shape[:2]) <= kernel.shape[-1] // 2:
        raise ImageError(f"image of {hr.shape[1]}x{hr.shape[0]} is too small for a {kernel.shape[-1]}x"
                         f"{kernel.shape[-1]} kernel; use a larger image")
    lr = degrade(rgb_to_tensor(hr), kernel.float()[None], scale, downsample=downsample, noise_sigma=noise,
                 quantize=True, generator=generator)
    return tensor_to_rgb(lr)


def ensure_empty(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"output folder {out} is not empty; choose another --out or pass --force to overwrite")


def build_testset(hr_dir: str | Path, out: str | Path, protocol: str = "gaussian8", scale: int = 4, *,
                  downsample: str = "bicubic", noise: float = 0.0, seed: int = 0, kernel_size: int | None = None,
                  force: bool = False, log: Callable[[str], None] = print) -> tuple[list[dict], list[str]]:
    """Write a synthetic test set (module docstring); returns (manifest records, problems with named inputs)."""
    check_degradation_args(scale, downsample, noise)
    kernel_size = default_kernel_size(protocol, kernel_size)
    cases_for = protocol_cases(protocol, kernel_size)
    files = find_images(hr_dir)
    out = Path(out)
    ensure_empty(out, force)
    records: list[dict] = []
    problems: list[str] = []
    seen: dict[str, Path] = {}
    for path in files:
        stem = path.stem
        if stem in seen:
            problems.append(f"{path}: same name as {seen[stem]}; rename one of them")
            continue
        seen[stem] = path
        try:
            hr = mod_crop(read_rgb(path), scale)
            cases = [(tag, params, kernel, degrade_image(hr, kernel, scale, downsample, noise,
                                                         stem_seed(seed, f"{stem}_{tag}")))
                     for tag, params, kernel in cases_for(stem, seed)]
        except (ImageError, ValueError) as err:
            problems.append(f"{path}: {err}" if str(path) not in str(err) else str(err))
            continue
        write_png(out / "HR" / f"{stem}.png", hr)
        for tag, params, kernel, lr in cases:
            name = f"{stem}_{tag}"
            write_png(out / "LR" / f"{name}.png", lr)
            write_npy(out / "kernels" / f"{name}.npy", kernel.float().numpy())
            records.append({"name": name, "hr": f"HR/{stem}.png", "lr": f"LR/{name}.png",
                            "kernel": f"kernels/{name}.npy", "scale": scale, "downsample": downsample,
                            "noise": noise, **params})
        log(f"{path.name}: {hr.shape[1]}x{hr.shape[0]} → {len(cases)} case(s)")
    manifest = {"blinddiff": __version__, "protocol": protocol, "scale": scale, "downsample": downsample,
                "noise": noise, "seed": seed, "kernel_size": kernel_size, "cases": records}
    write_json(out / "manifest.json", manifest)
    return records, problems


def degrade_files(inputs: list[str], out: str | Path, scale: int, kernel_spec: str, *, downsample: str = "bicubic",
                  noise: float = 0.0, seed: int = 0, kernel_size: int | None = None,
                  log: Callable[[str], None] = print) -> list[str]:
    """Degrade single images: writes `<stem>.png` (LR) and `<stem>_kernel.npy` per input; returns problems."""
    check_degradation_args(scale, downsample, noise)
    size = default_kernel_size(kernel_spec, kernel_size)
    parse_kernel_spec(kernel_spec, size, generator=torch.Generator().manual_seed(seed))  # fail early on a bad spec
    out = Path(out)
    files, problems = expand_inputs(inputs)
    for index, path in enumerate(files):
        target = out / f"{path.stem}.png"
        try:
            if target.exists() and target.resolve() == path.resolve():
                raise ImageError(f"{path}: the output would overwrite this input; choose another --out")
            generator = torch.Generator().manual_seed(stem_seed(seed, path.stem))
            kernel = parse_kernel_spec(kernel_spec, size, generator=generator)[0]
            lr = degrade_image(mod_crop(read_rgb(path), scale), kernel, scale, downsample, noise,
                               stem_seed(seed + 1, path.stem))
        except (ImageError, FileNotFoundError) as err:
            problems.append(str(err) if str(path) in str(err) else f"{path}: {err}")
            continue
        write_png(target, lr)
        write_npy(out / f"{path.stem}_kernel.npy", kernel.float().numpy())
        log(f"{path} → {target} ({lr.shape[1]}x{lr.shape[0]})")
    return problems
