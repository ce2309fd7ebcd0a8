"""Synthetic test sets with known kernels (docs/method.md §1: the Gaussian8 benchmark of Table 1, the anisotropic
setting of Table 2, motion-blur deblurring of Table 5, real camera shake of Levin et al. 2009) and
one-off degradation of single images.

Protocols (kernels per image): `gaussian8` (the 8 σ of Table 1), `iso:SIGMA`, `aniso` (one fixed-seed
setting-2 kernel per image, Table 2), `motion` (one fixed-seed BlindDPS kernel per image, intensity 0.5,
Table 5), `real` (one fixed-seed draw of the real-world chain per image, `real_test_degradation`: blur,
resize, noise σ ≤ 12, JPEG 35–90, second order; its kernel is the first-order blur and the manifest
records the effective noise σ), `levin` (every image with each of the 8 real camera-shake kernels of
Levin et al. 2009, `LEVIN_KERNELS`) and `kernels:FILE` (every image with each kernel of a .npy/.png/.mat
file). `build_pair_set` makes a test set of real LR/HR pairs instead (no kernels).
Table 2 uses the first 50 Urban100 images (`limit`); Table 5 uses 256x256 centre crops (`crop`).

A test set folder holds `HR/<stem>.png` (centre-cropped to `crop`×`crop` if asked, then mod-cropped to a
multiple of the scale, top-left),
`LR/<stem>_<tag>.png` (uint8), `kernels/<stem>_<tag>.npy` (float32 k×k) and `manifest.json` with one
record per case. Everything is a pure function of the arguments: same arguments, same bytes.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__
from .data import derive_seed
from .degradation import DOWNSAMPLE_MODES, RealDegradation, degrade, degrade_real, real_test_degradation
from .fileio import ImageError, check_name_part, check_output_folder, expand_inputs, expand_path, find_images, \
    inside, plan_outputs, read_rgb, remove_temporaries, rgb_to_tensor, tensor_to_rgb, write_json, write_npy, write_png
from .kernels import GAUSSIAN8_SIGMAS, isotropic_gaussian, load_kernels, motion_blur, parse_kernel_spec, \
    sample_anisotropic

__all__ = ["LEVIN_KERNELS", "BenchmarkSet", "build_pair_set", "build_testset", "case_group", "degrade_files",
           "load_benchmark"]

LEVIN_KERNELS = "${BLINDDIFF_DATA:-../shared/data}/kernels/KAIR/Levin09.mat"  # 8 real camera-shake kernels
MOTION_KERNEL_SIZE = 64  # BlindDPS's motion kernels
MAX_KERNEL_SIZE = 256  # far beyond any blur in the paper; bounds the memory a typo can ask for
REAL_KERNEL_SIZE = 21  # the first-order kernels of the real-world protocol (the SR models' kernel size)
# One case of a protocol: (tag, parameters for the manifest, kernel [k, k]).
Case = tuple[str, dict, torch.Tensor]


def stem_seed(seed: int, name: str) -> int:
    """Per-image seed: depends on the image name, not on its position, so adding images changes nothing else."""
    return derive_seed(seed, zlib.crc32(name.encode()))


def file_protocol(protocol: str) -> str | None:
    """The kernel file of a `levin` / `kernels:FILE` protocol, else None."""
    if protocol == "levin":
        return LEVIN_KERNELS
    return protocol[len("kernels:"):] if protocol.startswith("kernels:") else None


def default_kernel_size(kind: str, kernel_size: int | None) -> int | None:
    """The kernel size asked for (checked), else 64 for motion blur (BlindDPS) and 21 for Gaussians (docs/method.md §1);
    None for kernels read from a file, which keep their own sizes."""
    if file_protocol(kind) is not None:
        if kernel_size is not None:
            raise ValueError(f"--kernel-size {kernel_size}: protocol {kind} uses the kernels of a file at their "
                             "own sizes; leave --kernel-size out")
        return None
    if kernel_size is None:
        return MOTION_KERNEL_SIZE if kind.startswith(("motion", "random-motion")) else 21
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or not 3 <= kernel_size <= MAX_KERNEL_SIZE:
        raise ValueError(f"--kernel-size {kernel_size} is invalid; use 3 to {MAX_KERNEL_SIZE} (odd for Gaussians), "
                         f"e.g. 21, or leave it out for the default")
    return kernel_size


def file_kernels(path: str, convolution: bool) -> list[torch.Tensor]:
    """The kernels of a file ([k, k] each, own sizes). `convolution`: the file holds convolution kernels (as
    Levin's, whose blurred images were made with conv2); they are rotated by 180° so that blinddiff's
    correlation (docs/method.md §1) gives the same blur (up to the centre of even kernels)."""
    kernels = load_kernels(expand_path(path))
    return [torch.flip(k, (0, 1)) for k in kernels] if convolution else kernels


def protocol_cases(protocol: str, size: int | None) -> Callable[[str, int], list[Case]]:
    """Parse `gaussian8 | aniso | motion | real | iso:SIGMA | levin | kernels:FILE` into a function (stem, seed)
    → cases for that image (module docstring); a case of `real` has no kernel yet (`degrade_case`)."""
    source = file_protocol(protocol)
    if source is not None:
        kernels = file_kernels(source, convolution=protocol == "levin")
        kind = "levin" if protocol == "levin" else "file"
        cases = [(f"k{i + 1}", {"kernel_type": kind, "kernel_index": i + 1}, k) for i, k in enumerate(kernels)]
        return lambda stem, seed: cases
    assert size is not None
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
    if protocol == "real":  # kernels drawn per case by the real-world chain (`degrade_case`)
        return lambda stem, seed: [("real", {"kernel_type": "real"}, None)]
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
    raise ValueError(f"protocol {protocol!r} is unknown; use gaussian8, aniso, motion, real, levin, iso:SIGMA "
                     f"(e.g. iso:2.6) or kernels:FILE")


def check_degradation_args(scale: int, downsample: str, noise: float) -> None:
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale {scale} is invalid; use an integer ≥ 1 (1 = deblurring)")
    if downsample not in DOWNSAMPLE_MODES:
        raise ValueError(f"downsample {downsample!r} is unknown; use one of {', '.join(DOWNSAMPLE_MODES)}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise {noise} is invalid; use a standard deviation ≥ 0 on the [0, 1] scale, e.g. 0.01")


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The centred size×size window of [H, W, C] (Table 5's 256x256 crops); smaller images are an error."""
    height, width = image.shape[:2]
    if min(height, width) < size:
        raise ImageError(f"image of {width}x{height} is smaller than the {size}x{size} crop; use a smaller --crop")
    top, left = (height - size) // 2, (width - size) // 2
    return image[top:top + size, left:left + size]


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


def degrade_case(hr: np.ndarray, tag: str, params: dict, kernel: torch.Tensor | None, scale: int, downsample: str,
                 noise: float, seed: int) -> tuple[str, dict, torch.Tensor, np.ndarray]:
    """One case of a protocol → (tag, parameters, kernel, uint8 LR); a case without a kernel is the real-world
    protocol's, whose first-order kernel is drawn with the rest of its chain (`degrade_real_image`)."""
    if kernel is None:
        lr, kernel, drawn = degrade_real_image(hr, scale, seed)
        return tag, {**params, **drawn}, kernel, lr
    return tag, params, kernel, degrade_image(hr, kernel, scale, downsample, noise, seed)


def ensure_empty(out: Path, force: bool) -> None:
    """`out` must be a writable folder, empty unless `force`; the temporary files a killed run left in it
    (and in its HR/, LR/ and kernels/) are removed first."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a folder; choose another --out")
    check_output_folder(out)
    for folder in (out, out / "HR", out / "LR", out / "kernels"):
        remove_temporaries(folder)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"output folder {out} is not empty; choose another --out or pass --force to overwrite")


def check_outside_sources(hr_dir: Path, out: Path) -> None:
    """What make-benchmark writes (HR/, LR/, kernels/, manifest.json) must not touch the --hr folder."""
    source = hr_dir.resolve()
    for written in (out / "HR", out / "LR", out / "kernels", out / "manifest.json"):
        place = written.resolve()
        if place == source or source in place.parents or place in source.parents:
            raise ValueError(f"--out {out} would write {written}, which overlaps --hr {hr_dir}; the source images "
                             f"are never written: choose an --out outside {hr_dir}")


def previous_testset_files(out: Path) -> set[Path]:
    """The files a previous make-benchmark listed in `out/manifest.json` (and the manifest); empty if none."""
    path = out / "manifest.json"
    try:
        cases = json.loads(path.read_text())["cases"]
        listed = {out / case[key] for case in cases for key in ("hr", "lr", "kernel") if case.get(key)}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {p.resolve() for p in listed | {path}}


def check_force_targets(out: Path, targets: list[Path]) -> None:
    """--force replaces only the files of a previous test set: any other file in the way is refused."""
    ours = previous_testset_files(out)
    foreign = [t for t in targets if (t.exists() or t.is_symlink()) and t.resolve() not in ours]
    if foreign:
        shown = ", ".join(str(t) for t in foreign[:4]) + (" …" if len(foreign) > 4 else "")
        raise FileExistsError(f"--force replaces only files of a previous test set, but {shown} "
                              f"{'is' if len(foreign) == 1 else 'are'} not listed in {out / 'manifest.json'}; "
                              f"move {'it' if len(foreign) == 1 else 'them'} away or choose another --out")


def build_testset(hr_dir: str | Path, out: str | Path, protocol: str = "gaussian8", scale: int = 4, *,
                  downsample: str = "bicubic", noise: float = 0.0, seed: int = 0, kernel_size: int | None = None,
                  crop: int | None = None, limit: int | None = None, force: bool = False,
                  log: Callable[[str], None] = print) -> tuple[list[dict], list[str]]:
    """Write a synthetic test set (module docstring); returns (manifest records, problems with named inputs).

    `crop`: centre-crop every image to crop×crop first; `limit`: only the first `limit` images in name
    order (e.g. the first 50 of Urban100). Nothing is written inside `hr_dir`, and with `force` only files
    of a previous test set are replaced.
    """
    check_degradation_args(scale, downsample, noise)
    for name, value in (("crop", crop), ("limit", limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value} is invalid; use a positive integer (or leave it out)")
    if crop is not None and crop % scale:
        raise ValueError(f"crop={crop} must be a multiple of the scale {scale}")
    kernel_size = default_kernel_size(protocol, kernel_size)
    cases_for = protocol_cases(protocol, kernel_size)
    files = find_images(hr_dir)[:limit]
    out = Path(out)
    ensure_empty(out, force)
    check_outside_sources(Path(hr_dir), out)
    records: list[dict] = []
    problems: list[str] = []
    seen: dict[str, Path] = {}
    plan: list[tuple[Path, list[Case]]] = []
    for path in files:
        stem = path.stem
        if stem in seen:
            problems.append(f"{path}: same name as {seen[stem]}; rename one of them")
            continue
        seen[stem] = path
        plan.append((path, cases_for(stem, seed)))
    targets = [out / "manifest.json"]
    for path, cases in plan:
        targets += [out / "HR" / f"{path.stem}.png"]
        targets += [out / folder / f"{path.stem}_{tag}.{ext}" for tag, _, _ in cases
                    for folder, ext in (("LR", "png"), ("kernels", "npy"))]
    check_force_targets(out, targets)
    for path, planned in plan:
        stem = path.stem
        try:
            hr = read_rgb(path)
            hr = mod_crop(centre_crop(hr, crop) if crop else hr, scale)
            cases = [degrade_case(hr, tag, params, kernel, scale, downsample, noise, stem_seed(seed, f"{stem}_{tag}"))
                     for tag, params, kernel in planned]
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
                "noise": noise, "seed": seed, "kernel_size": kernel_size, "crop": crop, "limit": limit,
                "cases": records}
    write_json(out / "manifest.json", manifest)
    return records, problems


def degrade_real_image(hr: np.ndarray, scale: int, seed: int, settings: RealDegradation | None = None
                       ) -> tuple[np.ndarray, torch.Tensor, dict]:
    """uint8 HR [H, W, 3] → (uint8 LR, first-order kernel [21, 21], manifest parameters) by the real-world
    model (`degradation.degrade_real`; default the held-out protocol `real_test_degradation`), drawn from
    `seed`. The parameters record the effective noise σ (0–255: RMS of the LR minus the same chain without
    noise and JPEG) and the JPEG qualities."""
    settings = settings or real_test_degradation()
    generator = torch.Generator().manual_seed(seed)
    out = degrade_real(rgb_to_tensor(hr), settings, scale, REAL_KERNEL_SIZE, generator, measure_noise=True)
    assert out.noise_sigma is not None
    params = {"kernel_type": "real", "noise_sigma": round(float(out.noise_sigma[0]), 4), "seed": seed}
    return tensor_to_rgb(out.lr), out.kernel[0], params


def build_pair_set(hr_dir: str | Path, lr_dir: str | Path, out: str | Path, *, force: bool = False,
                   log: Callable[[str], None] = print) -> tuple[list[dict], list[str]]:
    """A test set of real LR/HR pairs (two folders, the same file names; e.g. DRealSR's camera pairs): the
    images are copied as PNG into `out` with a manifest whose cases have no kernel (`"kernel": null`). The
    scale is HR size / LR size, which must be the same integer for every pair; pairs that disagree, or
    have no partner, are named in the problems and left out."""
    out = Path(out)
    ensure_empty(out, force)
    check_outside_sources(Path(hr_dir), out)
    check_outside_sources(Path(lr_dir), out)
    hr_files = {path.name: path for path in find_images(hr_dir)}
    lr_files = {path.name: path for path in find_images(lr_dir)}
    problems = [f"{hr_files[name]}: no LR image of the same name in {lr_dir}" for name in sorted(hr_files)
                if name not in lr_files]
    problems += [f"{lr_files[name]}: no HR image of the same name in {hr_dir}" for name in sorted(lr_files)
                 if name not in hr_files]
    names = sorted(set(hr_files) & set(lr_files))
    check_force_targets(out, [out / "manifest.json"] + [out / folder / f"{Path(name).stem}.png"
                                                        for name in names for folder in ("HR", "LR")])
    records: list[dict] = []
    scale: int | None = None
    for name in names:
        try:
            hr, lr = read_rgb(hr_files[name]), read_rgb(lr_files[name])
        except ImageError as err:
            problems.append(str(err))
            continue
        ratio = hr.shape[0] / lr.shape[0]
        if not ratio.is_integer() or hr.shape[1] != ratio * lr.shape[1] or (scale is not None and ratio != scale):
            problems.append(f"{hr_files[name]}: HR {hr.shape[1]}x{hr.shape[0]} is not "
                            f"{'an integer multiple' if scale is None else f'{scale}×'} of LR "
                            f"{lr.shape[1]}x{lr.shape[0]}; crop the pair to matching sizes")
            continue
        scale = int(ratio)
        stem = Path(name).stem
        write_png(out / "HR" / f"{stem}.png", hr)
        write_png(out / "LR" / f"{stem}.png", lr)
        records.append({"name": stem, "hr": f"HR/{stem}.png", "lr": f"LR/{stem}.png", "kernel": None,
                        "scale": scale, "kernel_type": "real pair"})
        log(f"{name}: LR {lr.shape[1]}x{lr.shape[0]} → HR {hr.shape[1]}x{hr.shape[0]}")
    if not records:
        raise ImageError(f"no usable LR/HR pair in {lr_dir} and {hr_dir}: " + "; ".join(problems[:3]))
    manifest = {"blinddiff": __version__, "protocol": "pairs", "scale": scale, "downsample": "unknown (real pairs)",
                "lr_source": str(lr_dir), "hr_source": str(hr_dir), "cases": records}
    write_json(out / "manifest.json", manifest)
    return records, problems


def degrade_files(inputs: list[str], out: str | Path, scale: int, kernel_spec: str | None, *,
                  downsample: str = "bicubic", noise: float = 0.0, seed: int = 0, kernel_size: int | None = None,
                  pipeline: str = "paper", real_config: str | None = None,
                  log: Callable[[str], None] = print) -> list[str]:
    """Degrade single images: writes `<stem>.png` (LR) and `<stem>_kernel.npy` per input; returns problems.

    `pipeline="paper"`: blur with `kernel_spec`, downsample, noise (docs/method.md §1). `pipeline="real"`: the
    real-world chain (`degrade_real_image`) with the `data.real` settings of `real_config` (a preset or
    YAML file; default `real_test_degradation`); `<stem>_degradation.json` records its noise σ."""
    check_degradation_args(scale, downsample, noise)
    if pipeline not in ("paper", "real"):
        raise ValueError(f"pipeline {pipeline!r} is unknown; use paper or real")
    settings = None
    if pipeline == "real":
        if kernel_spec is not None or noise:
            raise ValueError("pipeline=real draws its own kernels and noise; leave out kernel and noise")
        if real_config is not None:
            from .config import load_config

            settings = load_config(real_config).data.real
    else:
        if kernel_spec is None:
            raise ValueError("pipeline=paper needs a kernel (e.g. iso:2.6 or random-iso)")
        size = default_kernel_size(kernel_spec, kernel_size)
        parse_kernel_spec(kernel_spec, size, generator=torch.Generator().manual_seed(seed))  # fail early
    out = Path(out)
    check_output_folder(out)
    files, problems = expand_inputs(inputs, out)
    record = ["_degradation.json"] if pipeline == "real" else []  # what the real-world chain drew
    accepted, collisions = plan_outputs({path: [out / f"{path.stem}{end}" for end in (".png", "_kernel.npy", *record)]
                                         for path in files})
    problems += collisions
    for path, (target, kernel_file, *record_file) in accepted.items():
        try:
            hr = mod_crop(read_rgb(path), scale)
            if pipeline == "real":
                lr, kernel, params = degrade_real_image(hr, scale, stem_seed(seed, path.stem), settings)
                write_json(record_file[0], {"input": path.name, "scale": scale, "pipeline": "real", **params})
            else:
                generator = torch.Generator().manual_seed(stem_seed(seed, path.stem))
                kernel = parse_kernel_spec(kernel_spec, size, generator=generator)[0]
                lr = degrade_image(hr, kernel, scale, downsample, noise, stem_seed(seed + 1, path.stem))
            write_png(target, lr)
            write_npy(kernel_file, kernel.float().numpy())
        except (ImageError, FileNotFoundError) as err:
            problems.append(str(err) if str(path) in str(err) else f"{path}: {err}")
            continue
        except OSError as err:  # disk full, no permission: this input fails, not the run
            problems.append(f"{path}: could not write {err.filename or target}: {err.strerror or err}")
            continue
        log(f"{path} → {target} ({lr.shape[1]}x{lr.shape[0]})")
    return problems


# --------------------------------------------------------------------------------------------
# Reading a test set back (what `evaluate` and `benchmark` score against)
# --------------------------------------------------------------------------------------------


@dataclass
class BenchmarkSet:
    """A synthetic test set written by `build_testset`: its folder, its manifest and the per-case records."""

    root: Path
    manifest: dict
    _hr: tuple[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def cases(self) -> list[dict]:
        return self.manifest["cases"]

    @property
    def scale(self) -> int:
        return int(self.manifest["scale"])

    @property
    def downsample(self) -> str:
        return str(self.manifest.get("downsample", "bicubic"))

    def hr(self, case: dict) -> np.ndarray:
        """uint8 HR [H, W, 3] of a case (the last one is cached: the cases of one image are adjacent)."""
        if self._hr is None or self._hr[0] != case["hr"]:
            self._hr = (case["hr"], read_rgb(self.root / case["hr"]))
        return self._hr[1]

    def lr(self, case: dict) -> np.ndarray:
        return read_rgb(self.root / case["lr"])

    @property
    def has_kernels(self) -> bool:
        """False for real LR/HR pairs (`build_pair_set`), whose blur nobody knows."""
        return all(case.get("kernel") for case in self.cases)

    def gt_kernel(self, case: dict) -> np.ndarray:
        if not case.get("kernel"):
            raise ValueError(f"case {case['name']} is a real LR/HR pair without a ground-truth kernel; leave out "
                             f"the kernel metrics and the baselines that need the true kernel")
        return np.load(self.root / case["kernel"], allow_pickle=False)


def load_benchmark(root: str | os.PathLike) -> BenchmarkSet:
    """Read ``root/manifest.json``; errors name the file and how to make one."""
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; build the test set with `blinddiff make-benchmark --hr HR_DIR "
                                f"--out {root}` (or pass the folder that holds manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rebuild it with blinddiff make-benchmark") from None
    cases = manifest.get("cases") if isinstance(manifest, dict) else None
    needed = ("name", "hr", "lr")  # and "kernel", null for real pairs
    if not isinstance(cases, list) or "scale" not in manifest or \
            not all(isinstance(c, dict) and all(k in c for k in needed) for c in cases):
        raise ValueError(f"{path} is not a blinddiff test-set manifest (needs 'scale' and 'cases' with "
                         f"{', '.join(needed)}); rebuild it with blinddiff make-benchmark")
    if not cases:
        raise ValueError(f"{path} lists no cases; rebuild the test set from a folder of HR images")
    scale = manifest["scale"]
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"{path}: scale {scale!r} is not a positive integer; rebuild it with blinddiff make-benchmark")
    for index, case in enumerate(cases):  # every path stays inside the test set, every name is a file name
        try:
            if not isinstance(case["name"], str) or not case["name"]:
                raise ValueError(f"name {case['name']!r} is not a file name")
            check_name_part(case["name"], "name")
            for key in ("hr", "lr", "kernel"):
                if key != "kernel" or case.get(key):
                    inside(root, case[key], key)
        except ValueError as err:
            raise ValueError(f"{path}: case {index + 1}: {err}; fix or rebuild the manifest") from None
    return BenchmarkSet(root, manifest)


def case_group(case: dict) -> str:
    """The kernel a case belongs to, for per-kernel means (σ of Gaussian8, else the kernel type)."""
    if "sigma" in case:
        return f"sigma {float(case['sigma']):g}"
    return str(case.get("kernel_type", "all"))
