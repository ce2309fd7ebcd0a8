"""Blind super-resolution and deblurring with trained weights (docs/method.md §4): the Python API.

    from blinddiff import BlindDiff
    model = BlindDiff.from_pretrained("fast-x4")           # shipped weights, or a .safetensors path
    sr, kernel = model.upscale(image, seed=0)              # PIL image / numpy array / tensor in, same kind out

`upscale` runs the MAP reverse process of `blinddiff.sampling.sample`: the network estimates the image and
the kernel at every step, and the kernel-aware gradient of the data term steers the next step. An image
whose reverse process would not fit `max_memory` is processed as overlapping windows
(`blinddiff.sampling.sample_windows`), and its result is written band by band into a buffer in the output's
own pixel type, so any size works in bounded memory (docs/method.md, "Images of any size").
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from .checkpoint import check_state_fits, load_torch, load_weights, prefixed, resolve_weights, sampling_defaults
from .config import Config, config_from_dict, load_config
from .degradation import matlab_bicubic_resize
from .fileio import ResultBuffer, to_tensor
from .hardware import autocast, pick_device, resolve_precision
from .kernels import validate_kernel
from .model import MCFormer
from .sampling import KERNEL_GUIDANCE, PositionalNoise, check_options, check_tile, data_term, known_kernel, \
    noise_weights, sample_windows, sampling_chain

__all__ = ["DEFAULT_DEBLUR_WEIGHTS", "DEFAULT_MAX_MEMORY", "DEFAULT_WEIGHTS", "MAX_PIXELS", "MIN_LR_SIZE", "MODES",
           "BlindDiff", "SampleOptions", "check_lr_size", "load_model", "parse_memory"]

DEFAULT_WEIGHTS = "fast-x4"
DEFAULT_DEBLUR_WEIGHTS = "deblur-motion"  # `blinddiff deblur` (scale 1, BlindDPS motion blur)
MIN_LR_SIZE = 8  # LR pixels per side; smaller inputs carry too little to estimate a kernel from
MAX_PIXELS = 16384 * 16384  # HR pixels at all
DEFAULT_MAX_MEMORY = 1 << 30  # bytes the reverse process may take (beyond the image buffers): a laptop's share
MIN_WINDOW = 64  # HR pixels per side of an automatic window; a smaller budget is refused

# The memory model behind `max_memory` (bytes): what the process holds before any image (interpreter, torch,
# the weights: 270 MiB measured, with room for the input), and per HR pixel of one image while a window runs:
# the data term's tensors (x̂0 blurred and its gradient) plus the network's and the sampler's, which grow with
# the network's width per HR pixel (width / patch_size²; fast-x4: 48 / 4² = 3), plus the float band of rows
# being blended (`BAND_BYTES` per HR pixel of a row). The key is what a step differentiates: nothing, x̂0 or
# the network (x_t). Fitted to peak RSS on CPU in fp32 with fast-x4 (none 494, x0 843, xt 2980 bytes per
# pixel) and the tiny test network (none 1612, u = 16), rounded up (docs/benchmarks.md, "Images of any size").
BASE_MEMORY = 400 << 20
SAMPLER_BYTES = {"none": 0, "x0": 350, "xt": 350}
NETWORK_BYTES = {"none": 200, "x0": 200, "xt": 880}  # per unit of width / patch_size²
BAND_BYTES = 32  # the float band (3 × float32) and the copies of its conversion to the output's type


@dataclass
class SampleOptions:
    """Settings of the reverse process (see `blinddiff.sampling.sample`); the defaults are the perceptual mode.

    Two ends of the perception–distortion trade-off are named (`for_mode`): "perceptual" (the default)
    runs the guided MAP reverse process; "fidelity" takes the network's x̂0 from pure noise in ONE step,
    which for an x0-predicting model is its MMSE estimate (highest PSNR, smooth). The defaults were chosen
    on Set5 with the default model (`benchmarks/sampler_sweep.py`, docs/results.md); each shipped model
    carries its own tuned values in the weights registry (`BlindDiff.options`). Pass `steps=50, zeta=1,
    gradient="xt"` for the paper's setting.
    """

    steps: int = 3
    sampler: str = "ddpm"
    eta: float = 0.0
    zeta: float = 10.0
    guidance: str = "noise-aware"
    gradient: str = "x0"
    x0_norm_weight: float = 0.0
    tile: int | None = None  # HR window side; None: windows only when the image exceeds max_memory
    tile_overlap: int = 64
    max_memory: int | None = DEFAULT_MAX_MEMORY  # bytes (`parse_memory`); None: never tile automatically

    @classmethod
    def for_mode(cls, mode: str = "perceptual", defaults: Mapping[str, Mapping[str, Any]] | None = None,
                 **overrides: Any) -> "SampleOptions":
        """The options of a named mode ("perceptual" | "fidelity"): the project's `MODES`, then the model's own
        tuned `defaults` for that mode (`checkpoint.sampling_defaults`), then any field overridden."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}")
        tuned = dict((defaults or {}).get(mode, {}))
        for source, values in (("the model's sampling defaults", tuned), ("sampling option(s)", overrides)):
            unknown = sorted(set(values) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(f"unknown {source} {', '.join(unknown)}; valid: {', '.join(f.name for f in fields(cls))}")
        return replace(cls(**MODES[mode]), **{**tuned, **overrides})

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
            raise ValueError(f"{path} is a pickle-based torch file; pass allow_pickle=True to read it "
                             f"(weights_only=True), or convert it to .safetensors")
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
            raise ValueError(f"{path} holds no config; pass config=PRESET_OR_FILE with it")
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


def check_lr_size(height: int, width: int, scale: int) -> None:
    """Refuse inputs too small to carry a kernel and results too large to hold at all."""
    if min(height, width) < MIN_LR_SIZE:
        raise ValueError(f"the image is {width}x{height}; it must be at least {MIN_LR_SIZE}x{MIN_LR_SIZE} pixels")
    pixels = height * width * scale * scale
    if pixels > MAX_PIXELS:
        raise ValueError(f"the {width}x{height} image would give {pixels / 1e6:.0f} MP at ×{scale}; "
                         f"the limit is {MAX_PIXELS / 1e6:.0f} MP")


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 1e9, "gb": 1e9,
          "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_memory(text: str | int) -> int:
    """A memory size in bytes from "2GiB", "1.5 GB", "800M", "512MiB" or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match[2].lower() not in _UNITS:
            raise ValueError(f"max_memory={text!r} is not a memory size; write e.g. 2GiB, 1.5GB or 800MiB")
        value = int(float(match[1]) * _UNITS[match[2].lower()])
    if value <= BASE_MEMORY:
        raise ValueError(f"max_memory={text!r} is below the {BASE_MEMORY / 2**20:.0f} MiB the program takes before "
                         f"any image; give more, e.g. 1GiB")
    return value


class BlindDiff:
    """A trained MCFormer with its config, ready to run the blind MAP reverse process."""

    def __init__(self, model: MCFormer, cfg: Config, device: torch.device, precision: str = "fp32",
                 sampling: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.model, self.cfg, self.device = model.to(device), cfg, device
        self.precision = resolve_precision(precision, device)
        self.sampling = dict(sampling or {})  # mode → the options tuned for these weights (SampleOptions.for_mode)

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path = DEFAULT_WEIGHTS, *, device: str = "auto",
                        precision: str = "fp32", config: str | None = None, allow_pickle: bool = False) -> "BlindDiff":
        model, cfg = load_model(path_or_name, config=config, allow_pickle=allow_pickle)
        return cls(model, cfg, pick_device(device), precision, sampling_defaults(path_or_name))

    def options(self, mode: str = "perceptual", **overrides: Any) -> SampleOptions:
        """The sampling options of `mode` for these weights, with any field overridden."""
        return SampleOptions.for_mode(mode, self.sampling, **overrides)

    @property
    def scale(self) -> int:
        return self.cfg.data.scale

    def memory_estimate(self, side: tuple[int, int], hr_width: int, batch: int, options: SampleOptions) -> int:
        """Bytes the reverse process holds for `batch` windows of side = (height, width) HR pixels in an image
        `hr_width` HR pixels wide (the model above)."""
        guided = options.guidance != "none" and options.zeta > 0
        regime = ("xt" if options.gradient == "xt" else "x0") if guided else "none"
        cfg = self.model.cfg
        per_pixel = SAMPLER_BYTES[regime] + NETWORK_BYTES[regime] * cfg.width / cfg.patch_size**2
        return BASE_MEMORY + int(batch * (side[0] * side[1] * per_pixel + side[0] * hr_width * BAND_BYTES))

    def window_size(self, height: int, width: int, batch: int, options: SampleOptions) -> int | None:
        """The HR window side for a batch of LR height×width images: `options.tile` if given, None (one window)
        when the whole image fits `options.max_memory`, else the largest on the grid of the scale and the
        network's size multiple that fits."""
        if options.tile is not None or options.max_memory is None:
            return options.tile
        budget = parse_memory(options.max_memory)
        hr_height, hr_width = self.scale * height, self.scale * width
        if self.memory_estimate((hr_height, hr_width), hr_width, batch, options) <= budget:
            return None
        need = math.lcm(self.scale, self.model.cfg.size_multiple)
        smallest = need * math.ceil(max(MIN_WINDOW, 2 * options.tile_overlap + need) / need)
        side = smallest
        while side + need <= max(hr_height, hr_width) and \
                self.memory_estimate((side + need, side + need), hr_width, batch, options) <= budget:
            side += need
        if self.memory_estimate((side, side), hr_width, batch, options) > budget:
            least = self.memory_estimate((smallest, smallest), hr_width, batch, options)
            raise ValueError(f"max_memory={budget / 2**20:.0f}MiB is too little for windows of {smallest} pixels "
                             f"(the smallest) on this image; give max_memory={math.ceil(least / 2**20)}MiB or more")
        return side

    def stream(self, lr: torch.Tensor, seeds: list[int], options: SampleOptions,
               write: Callable[[int, torch.Tensor], object], *, kernel: torch.Tensor | None = None,
               callback: Callable | None = None, progress: bool = False) -> torch.Tensor:
        """The core: lr [B, 3, h, w] in [0, 1], one seed per image; the result leaves through `write(top, band)`,
        bands [B, 3, rows, s·w] of finished HR rows, top to bottom (`sample_windows`) → kernels [B, k, k]
        (the windows' mean when the image is tiled, weighted by their share of it)."""
        if len(seeds) != lr.shape[0]:
            raise ValueError(f"{lr.shape[0]} images but {len(seeds)} seeds; give one seed per image")
        self.check_options(options, seeds)
        if kernel is not None and not options.uses_kernel:
            raise ValueError(f"a given kernel changes nothing with zeta={options.zeta:g} and guidance "
                             f"{options.guidance!r}: it enters only the kernel-aware data term; use mode "
                             f"'perceptual' (or zeta > 0 with guidance {' or '.join(map(repr, KERNEL_GUIDANCE))})")
        check_lr_size(lr.shape[-2], lr.shape[-1], self.scale)
        chain = sampling_chain(self.cfg.diffusion, options.steps)
        lr = lr.to(self.device)
        denoiser = self.model if kernel is None else known_kernel(self.model, kernel.to(self.device))
        weights = noise_weights(lr) if options.guidance == "noise-aware" else None  # of the whole image
        tile = self.window_size(lr.shape[-2], lr.shape[-1], lr.shape[0], options)

        def term(crop: torch.Tensor) -> Any:
            return data_term(options.guidance, crop, self.scale, self.cfg.data.downsample,
                             x0_norm_weight=options.x0_norm_weight, noise_weights=weights)

        def checked(top: int, band: torch.Tensor) -> None:
            if not bool(torch.isfinite(band).all()):
                raise ValueError(f"the reverse process diverged (NaN or infinite values) with zeta={options.zeta:g}, "
                                 f"steps={options.steps}; try a smaller zeta, or other weights")
            write(top, band)

        with autocast(self.precision, self.device):
            estimated = sample_windows(denoiser, lr, chain, scale=self.scale, write=checked, tile=tile,
                                       overlap=options.tile_overlap, multiple=self.model.cfg.size_multiple,
                                       data_term=term, noise=PositionalNoise(seeds), zeta=options.zeta,
                                       gradient=options.gradient, sampler=options.sampler, eta=options.eta,
                                       callback=callback, progress=progress)
        estimated = estimated.float().cpu()
        if not bool(torch.isfinite(estimated).all()):
            raise ValueError(f"the reverse process diverged (NaN or infinite kernel) with zeta={options.zeta:g}; "
                             f"try a smaller zeta, or other weights")
        return estimated

    def run(self, lr: torch.Tensor, seeds: list[int], options: SampleOptions, *, kernel: torch.Tensor | None = None,
            callback: Callable | None = None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched core: lr [B, 3, h, w] in [0, 1], one seed per image → (sr [B, 3, s·h, s·w], kernel [B, k, k]),
        sr in float32 (`stream` writes the result in any pixel type, band by band)."""
        sr = torch.empty(lr.shape[0], 3, self.scale * lr.shape[-2], self.scale * lr.shape[-1])

        def write(top: int, band: torch.Tensor) -> None:
            sr[:, :, top:top + band.shape[2]] = band

        return sr, self.stream(lr, seeds, options, write, kernel=kernel, callback=callback, progress=progress)

    def check_options(self, options: SampleOptions, seeds: list[int] = ()) -> None:
        """Check the sampling options (and seeds) once, before any image: errors name the option."""
        sampling_chain(self.cfg.diffusion, options.steps)
        check_options(sampler=options.sampler, eta=options.eta, zeta=options.zeta, gradient=options.gradient)
        data_term(options.guidance, torch.zeros(1, 3, 1, 1), 1, self.cfg.data.downsample,
                  x0_norm_weight=options.x0_norm_weight)
        need = math.lcm(self.scale, self.model.cfg.size_multiple)
        check_tile(options.tile if options.tile is not None else need * (options.tile_overlap // need + 1),
                   options.tile_overlap, self.scale, self.model.cfg.size_multiple)
        if options.max_memory is not None:
            parse_memory(options.max_memory)
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
        result = ResultBuffer(kind, rgb.shape[0], self.scale * rgb.shape[-2], self.scale * rgb.shape[-1])

        def write(top: int, band: torch.Tensor) -> None:
            rows = slice(top, top + band.shape[2])
            result.write(top, band, None if alpha is None else self.upscale_alpha(alpha, rows))

        estimated = self.stream(rgb, [seed] * rgb.shape[0], self.options(mode, **options), write,
                                kernel=given, callback=callback, progress=progress)
        out_kernel: Any = estimated if kind.source == "tensor" and kind.ndim == 4 else estimated[0]
        if kind.source != "tensor":
            out_kernel = out_kernel.numpy()
        return result.image(), out_kernel

    def deblur(self, image: Any, **kwargs: Any) -> tuple[Any, Any]:
        """Blind deblurring (a scale-1 model): same as `upscale`."""
        self.check_deblurring()
        return self.upscale(image, **kwargs)

    def check_deblurring(self) -> None:
        """Deblurring needs a scale-1 model; raise a clear error otherwise."""
        if self.scale != 1:
            raise ValueError(f"these weights upscale ×{self.scale}; deblurring needs a scale-1 model "
                             f"(e.g. the shipped {DEFAULT_DEBLUR_WEIGHTS!r}, `deblur`'s default)")

    def upscale_alpha(self, alpha: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """An alpha channel [B, 1, h, w] resized ×s with MATLAB bicubic (not through the diffusion model), or only
        the HR `rows` of it (on the s-grid), computed piece by piece from the LR pixels around them: the same
        values, in memory of the rows' size."""
        scale, (height, width) = self.scale, alpha.shape[-2:]
        if scale == 1:
            return alpha.float()[..., rows or slice(None), :]
        rows = rows or slice(0, scale * height)
        margin, chunk = 4, 512  # LR pixels beyond the bicubic taps (±2); LR columns per piece
        top, bottom = max(0, rows.start // scale - margin), min(height, -(-rows.stop // scale) + margin)
        pieces = []
        for left in range(0, width, chunk):
            first, last = max(0, left - margin), min(width, left + chunk + margin)
            up = matlab_bicubic_resize(alpha[..., top:bottom, first:last].float(), scale=scale)
            pieces.append(up[..., rows.start - scale * top:rows.stop - scale * top,
                             scale * (left - first):scale * (min(width, left + chunk) - first)])
        return torch.cat(pieces, dim=-1).clamp(0, 1)
