"""Training data (docs/method.md §1 and §3): random HR patches from a folder, degraded on the fly.

`HRPatches` yields augmented HR crops (random position, flips, 90° rotations). Degradation is done
afterwards on a whole batch, on the training device, by `TrainingDegradation`: sample one kernel per
patch (setting 1 isotropic, setting 2 anisotropic, or motion blur), blur, downsample, add noise,
quantise. All randomness is counter-based (derived from the seed, the epoch and the index or step),
so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .degradation import RealDegradation, degrade, degrade_real
from .fileio import ImageError, check_decodes, find_images, image_size, read_rgb
from .kernels import sample_training_kernels

__all__ = ["SETTINGS", "DataConfig", "HRPatches", "TrainingDegradation", "augment", "derive_seed"]

SETTINGS = ("iso", "aniso", "motion", "real")


@dataclass
class DataConfig:
    """Where the HR images are and how they are turned into (hr, lr, kernel) training triplets."""

    root: str = "${BLINDDIFF_DATA:-../shared/data}/train"  # ${VAR:-default} is expanded when read
    crop: int = 128  # HR patch size
    setting: str = "iso"  # "iso" (setting 1) | "aniso" (setting 2) | "motion" (deblurring) | "real" (photos)
    scale: int = 4  # 1 = deblurring
    kernel_size: int = 21
    downsample: str = "bicubic"  # "bicubic" (the release, DAN/IKC benchmarks) | "direct" (paper Eq. 1)
    noise: float = 0.0  # Gaussian noise sigma on [0, 1] images (BlindDPS motion: 0.02)
    skip_bad: bool = False  # skip unreadable / too small images with a warning instead of failing
    cache: bool = False  # keep decoded images in memory
    workers: int = 0  # DataLoader worker processes
    real: RealDegradation = field(default_factory=RealDegradation)  # the pipeline of setting "real"

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"data.setting {self.setting!r} is unknown; use one of {', '.join(SETTINGS)}")
        if self.crop < 8 or self.crop % max(self.scale, 1):
            raise ValueError(f"data.crop {self.crop} must be ≥ 8 and a multiple of data.scale {self.scale}")
        if self.scale < 1:
            raise ValueError(f"data.scale {self.scale} is invalid; use an integer ≥ 1 (1 = deblurring)")
        if self.setting == "real" and self.downsample != "bicubic":
            raise ValueError(f"data.downsample {self.downsample!r}: setting real resizes by its own random modes; "
                             "use the default bicubic")
        if not 0 <= self.noise < 1:
            raise ValueError(f"data.noise {self.noise} is invalid; use a standard deviation in [0, 1), e.g. 0.02")
        if self.workers < 0:
            raise ValueError(f"data.workers {self.workers} is invalid; use 0 (load in the main process) or more")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, index, ...), independent streams for different tuples."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def augment(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal flip, vertical flip and 90° rotation (the 8 dihedral transforms) of an [H, W, C] patch."""
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1, :]
    if rng.random() < 0.5:
        patch = patch.transpose(1, 0, 2)
    return patch


class HRPatches(Dataset):
    """Augmented random HR crops ([3, crop, crop] float in [0, 1]) from every image under a folder.

    Files are checked up front: unreadable images and images smaller than the crop are named in one
    error, or skipped with a warning when `skip_bad` is set.
    """

    def __init__(self, root: str | Path, crop: int = 128, *, augment: bool = True, skip_bad: bool = False,
                 cache: bool = False, seed: int = 0) -> None:
        self.crop, self.augment, self.seed = crop, augment, seed
        self.files: list[Path] = []
        problems: list[str] = []
        for path in find_images(root):
            try:
                height, width = image_size(path)
                check_decodes(path)  # a damaged pixel stream passes the header check; find it now, not mid-run
            except ImageError as err:
                problems.append(str(err))
                continue
            if min(height, width) < crop:
                problems.append(f"{path}: {width}x{height} is smaller than the {crop}x{crop} crop; "
                                f"use a smaller crop or remove the image")
                continue
            self.files.append(path)
        if problems and not skip_bad:
            raise ImageError(f"{len(problems)} unusable training image(s) (set skip_bad to skip them):\n  "
                             + "\n  ".join(problems))
        for problem in problems:
            warnings.warn(f"skipping {problem}", stacklevel=2)
        if not self.files:
            raise ImageError(f"no usable training image under {root}")
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.files)

    def _image(self, index: int) -> np.ndarray:
        if self._cache is None:
            return read_rgb(self.files[index])
        if index not in self._cache:
            self._cache[index] = read_rgb(self.files[index])
        return self._cache[index]

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        """Patch of image `index` in `epoch` for `dataset[epoch, index]` (`dataset[index]`: epoch 0).

        Crops depend on (seed, epoch, index) only: the trainer's sampler hands out (epoch, index) keys.
        """
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng(derive_seed(self.seed, epoch, index))
        image = self._image(index)
        top = int(rng.integers(0, image.shape[0] - self.crop + 1))
        left = int(rng.integers(0, image.shape[1] - self.crop + 1))
        patch = image[top:top + self.crop, left:left + self.crop]
        if self.augment:
            patch = augment(patch, rng)
        return torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1).float().div_(255.0)


class TrainingDegradation:
    """Turn a batch of HR patches into (hr, lr, kernel) on the patches' device (docs/method.md §1 training settings;
    setting "real": the real-world model of `degradation.degrade_real`, whose kernel is the first-order blur)."""

    def __init__(self, setting: str = "iso", scale: int = 4, kernel_size: int = 21,
                 downsample: str = "bicubic", noise: float = 0.0, real: RealDegradation | None = None) -> None:
        if setting not in SETTINGS:
            raise ValueError(f"degradation setting {setting!r} is unknown; use one of {', '.join(SETTINGS)}")
        self.setting, self.scale, self.kernel_size = setting, scale, kernel_size
        self.downsample, self.noise = downsample, noise
        self.real = real if real is not None else RealDegradation()

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "TrainingDegradation":
        return cls(cfg.setting, cfg.scale, cfg.kernel_size, cfg.downsample, cfg.noise, cfg.real)

    def __call__(self, hr: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # hr [B, C, H, W] → lr [B, C, H/s, W/s] (uint8 grid), kernel [B, k, k]
        if self.setting == "real":
            degraded = degrade_real(hr, self.real, self.scale, self.kernel_size, generator)
            return hr, degraded.lr, degraded.kernel
        kernels = sample_training_kernels(self.setting, hr.shape[0], self.kernel_size,
                                          generator=generator, device=hr.device)
        lr = degrade(hr, kernels, self.scale, downsample=self.downsample, noise_sigma=self.noise,
                     quantize=True, generator=generator)
        return hr, lr, kernels
