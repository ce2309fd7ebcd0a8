"""Blind super-resolution and deblurring with trained weights (SPEC §5): the Python API.

    from blinddiff import BlindDiff
    model = BlindDiff.from_pretrained("fast-x4")           # shipped weights, or a .safetensors path
    sr, kernel = model.upscale(image, seed=0)              # PIL image / numpy array / tensor in, same kind out

`upscale` runs the MAP reverse process of `blinddiff.sampling.sample`: the network estimates the image and
the kernel at every step, and the kernel-aware gradient of the data term steers the next step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import check_state_fits, load_torch, load_weights, prefixed, resolve_weights
from .config import Config, config_from_dict, load_config
from .degradation import matlab_bicubic_resize
from .fileio import from_tensor, to_tensor
from .hardware import autocast, pick_device, resolve_precision
from .kernels import validate_kernel
from .model import MCFormer
from .sampling import KERNEL_GUIDANCE, check_options, data_term, known_kernel, sample, sampling_chain, tiled

DEFAULT_WEIGHTS = "fast-x4"
DEFAULT_DEBLUR_WEIGHTS = "deblur-motion"  # `blinddiff deblur` (scale 1, BlindDPS motion blur)
MIN_LR_SIZE = 8  # LR pixels per side; smaller inputs carry too little to estimate a kernel from
MAX_UNTILED_PIXELS = 1024 * 1024  # HR pixels processed in one piece before --tile is required
MAX_PIXELS = 16384 * 16384  # HR pixels at all


@dataclass
class SampleOptions:
    """Settings of the reverse process (see `blinddiff.sampling.sample`); the defaults are the perceptual mode.

    Two ends of the perception–distortion trade-off are named (`for_mode`): "perceptual" (the default)
    runs the guided MAP reverse process; "fidelity" takes the network's x̂0 from pure noise in ONE step,
    which for an x0-predicting model is its MMSE estimate (highest PSNR, smooth). Values chosen on Set5
    with the default model (`benchmarks/sampler_sweep.py`, docs/results.md). Pass `steps=50, zeta=1,
    gradient="xt"` for the paper's setting.
    """

    steps: int = 3
    sampler: str = "ddpm"
    eta: float = 0.0
    zeta: float = 10.0
    guidance: str = "noise-aware"
    gradient: str = "x0"
    x0_norm_weight: float = 0.0
    tile: int | None = None
    tile_overlap: int = 32

    @classmethod
    def for_mode(cls, mode: str = "perceptual", **overrides: Any) -> "SampleOptions":
        """The options of a named mode ("perceptual" | "fidelity"), with any field overridden."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}")
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown sampling option(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(f.name for f in fields(cls))}")
        return replace(cls(**MODES[mode]), **overrides)

    @property
    def uses_kernel(self) -> bool:
        """Whether a given kernel can change the result: the network never takes one, so it enters only
        through a kernel-aware data term (noise-aware or kernel-aware) with ζ > 0 (paper Algorithm 2).
        The fidelity mode (ζ 0) does not use it."""
        return self.zeta > 0 and self.guidance in KERNEL_GUIDANCE


MODES: dict[str, dict[str, Any]] = {
    "perceptual": {},
    "fidelity": {"steps": 1, "zeta": 0.0},
}


def load_model(weights: str | Path, *, config: str | None = None, allow_pickle: bool = False
               ) -> tuple[MCFormer, Config]:
    """Build the network of a weights file (EMA weights preferred) and load it strictly.

    `.safetensors` carry their config; `.pt/.pth` files are read only with `allow_pickle` (and then with
    `weights_only=True`) and need `config` unless they hold one under "config".
    """
    path = resolve_weights(weights)
    if path.suffix in (".pt", ".pth"):
        if not allow_pickle:
            raise ValueError(f"{path} is a pickle-based torch file; pass --allow-pt to read it (weights_only=True), "
                             f"or convert it to .safetensors")
        data = load_torch(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path} does not hold a state dict")
        state = data.get("ema") or data.get("state_dict") or data
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path} does not hold a state dict of tensors")
        if "config" in data and isinstance(data["config"], dict):
            cfg = config_from_dict(data["config"])
        elif config is not None:
            cfg = load_config(config)
        else:
            raise ValueError(f"{path} holds no config; pass --config PRESET_OR_FILE with it")
    else:
        tensors, cfg, _ = load_weights(path)
        if config is not None:
            cfg = load_config(config)
        state = prefixed(tensors, "ema.") or tensors
    with torch.device("meta"):  # shapes only: a config from a file may ask for a huge network
        expected = MCFormer(cfg.model).state_dict()
    check_state_fits(state, expected, f"weights {path}", cfg.name)
    broken = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if broken:
        raise ValueError(f"weights {path} hold NaN or infinite values ({', '.join(broken[:4])}"
                         f"{' …' if len(broken) > 4 else ''}); they come from a diverged run: use other weights")
    model = MCFormer(cfg.model)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval().requires_grad_(False), cfg


def given_kernels(kernel: torch.Tensor | np.ndarray, batch: int) -> torch.Tensor:
    """A non-blind kernel [k, k] or [B, k, k] from the API, checked and normalised → float32 [B, k, k]."""
    array = kernel.detach().cpu().numpy() if isinstance(kernel, torch.Tensor) else np.asarray(kernel)
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"kernel must be a numeric array [k, k] or [B, k, k], got {array.dtype}")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"kernel must be [k, k] or [B, k, k], got shape {array.shape}")
    kernels = torch.stack([validate_kernel(k, "kernel" if len(array) == 1 else f"kernel {i}", square=True)
                           for i, k in enumerate(array)])
    return kernels.expand(batch, -1, -1) if len(kernels) == 1 else kernels


def check_lr_size(height: int, width: int, scale: int, tile: int | None) -> None:
    """Refuse inputs too small to carry a kernel and ones too large to process without (or even with) tiling."""
    if min(height, width) < MIN_LR_SIZE:
        raise ValueError(f"the image is {width}x{height}; it must be at least {MIN_LR_SIZE}x{MIN_LR_SIZE} pixels")
    pixels = height * width * scale * scale
    if pixels > MAX_PIXELS:
        raise ValueError(f"the {width}x{height} image would give {pixels / 1e6:.0f} MP at ×{scale}; "
                         f"the limit is {MAX_PIXELS / 1e6:.0f} MP")
    if tile is None and pixels > MAX_UNTILED_PIXELS:
        raise ValueError(f"the {width}x{height} image gives {pixels / 1e6:.1f} MP at ×{scale}, too large to process "
                         f"in one piece; pass tile=256 to process it in tiles")


class BlindDiff:
    """A trained MCFormer with its config, ready to run the blind MAP reverse process."""

    def __init__(self, model: MCFormer, cfg: Config, device: torch.device, precision: str = "fp32") -> None:
        self.model, self.cfg, self.device = model.to(device), cfg, device
        self.precision = resolve_precision(precision, device)

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path = DEFAULT_WEIGHTS, *, device: str = "auto",
                        precision: str = "fp32", config: str | None = None, allow_pickle: bool = False) -> "BlindDiff":
        model, cfg = load_model(path_or_name, config=config, allow_pickle=allow_pickle)
        return cls(model, cfg, pick_device(device), precision)

    @property
    def scale(self) -> int:
        return self.cfg.data.scale

    def run(self, lr: torch.Tensor, seeds: list[int], options: SampleOptions, *, kernel: torch.Tensor | None = None,
            callback: Callable | None = None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched core: lr [B, 3, h, w] in [0, 1], one seed per image → (sr [B, 3, s·h, s·w], kernel [B, k, k])."""
        if len(seeds) != lr.shape[0]:
            raise ValueError(f"{lr.shape[0]} images but {len(seeds)} seeds; give one seed per image")
        self.check_options(options, seeds)
        if kernel is not None and not options.uses_kernel:
            raise ValueError(f"a given kernel changes nothing with zeta={options.zeta:g} and guidance "
                             f"{options.guidance!r}: it enters only the kernel-aware data term; use mode "
                             f"'perceptual' (or zeta > 0 with guidance {' or '.join(map(repr, KERNEL_GUIDANCE))})")
        check_lr_size(lr.shape[-2], lr.shape[-1], self.scale, options.tile)
        chain = sampling_chain(self.cfg.diffusion, options.steps)
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        lr = lr.to(self.device)
        denoiser = self.model if kernel is None else known_kernel(self.model, kernel.to(self.device))
        if options.tile is not None:
            denoiser = tiled(denoiser, options.tile, options.tile_overlap, self.scale, self.model.cfg.size_multiple)
        energy = data_term(options.guidance, lr, self.scale, self.cfg.data.downsample,
                           x0_norm_weight=options.x0_norm_weight)
        with autocast(self.precision, self.device):
            sr, estimated = sample(denoiser, lr, chain, scale=self.scale, data_term=energy, zeta=options.zeta,
                                   gradient=options.gradient, sampler=options.sampler, eta=options.eta,
                                   generators=generators, callback=callback, progress=progress)
        sr, estimated = sr.float().cpu(), estimated.float().cpu()
        if not (bool(torch.isfinite(sr).all()) and bool(torch.isfinite(estimated).all())):
            raise ValueError(f"the reverse process diverged (NaN or infinite values) with zeta={options.zeta:g}, "
                             f"steps={options.steps}; try a smaller --zeta, or other weights")
        return sr, estimated

    def check_options(self, options: SampleOptions, seeds: list[int] = ()) -> None:
        """Check the sampling options (and seeds) once, before any image: errors name the option."""
        sampling_chain(self.cfg.diffusion, options.steps)
        check_options(sampler=options.sampler, eta=options.eta, zeta=options.zeta, gradient=options.gradient)
        data_term(options.guidance, torch.zeros(1, 3, 1, 1), 1, self.cfg.data.downsample,
                  x0_norm_weight=options.x0_norm_weight)
        if options.tile is not None:
            tiled(self.model, options.tile, options.tile_overlap, self.scale, self.model.cfg.size_multiple)
        for seed in seeds:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
                raise ValueError(f"seed={seed!r}: must be an integer in [0, 2**64)")

    def upscale(self, image: Any, *, mode: str = "perceptual", seed: int = 0,
                kernel: torch.Tensor | np.ndarray | None = None, callback: Callable | None = None,
                progress: bool = False, **options: Any) -> tuple[Any, Any]:
        """Blind ×s super-resolution of one image (or a tensor batch): returns (sr, kernel) in the input's kind.

        `mode` picks "perceptual" (guided reverse process) or "fidelity" (one-step x̂0, highest PSNR);
        `options` override `SampleOptions` fields (steps, sampler, zeta, guidance, gradient, tile, …);
        `kernel` switches to non-blind mode with that kernel. Alpha is upscaled separately (bicubic).
        """
        rgb, alpha, kind = to_tensor(image)
        given = None if kernel is None else given_kernels(kernel, rgb.shape[0])
        sr, estimated = self.run(rgb, [seed] * rgb.shape[0], SampleOptions.for_mode(mode, **options), kernel=given,
                                 callback=callback, progress=progress)
        alpha_up = None if alpha is None else self.upscale_alpha(alpha)
        out_kernel: Any = estimated if kind.source == "tensor" and kind.ndim == 4 else estimated[0]
        if kind.source != "tensor":
            out_kernel = out_kernel.numpy()
        return from_tensor(sr, alpha_up, kind), out_kernel

    def deblur(self, image: Any, **kwargs: Any) -> tuple[Any, Any]:
        """Blind deblurring (a scale-1 model): same as `upscale`."""
        self.check_deblurring()
        return self.upscale(image, **kwargs)

    def check_deblurring(self) -> None:
        """Deblurring needs a scale-1 model; raise a clear error otherwise."""
        if self.scale != 1:
            raise ValueError(f"these weights upscale ×{self.scale}; deblurring needs a scale-1 model "
                             f"(e.g. the shipped {DEFAULT_DEBLUR_WEIGHTS!r}, `deblur`'s default)")

    def upscale_alpha(self, alpha: torch.Tensor) -> torch.Tensor:
        """An alpha channel [B, 1, h, w] resized ×s with MATLAB bicubic (not through the diffusion model)."""
        return matlab_bicubic_resize(alpha.float(), scale=self.scale).clamp(0, 1)
