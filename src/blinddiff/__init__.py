"""blinddiff: blind image super-resolution with diffusion (BlindDiff).

The package reads like the method (docs/method.md has the paper element → module table):

- the forward model: `kernels` (blur kernels: sampled, loaded, checked), `degradation` (blur, ↓s, noise,
  JPEG, the real-world chain; paper Eq. 1), `data` (training patches and their degradations);
- the network and the diffusion: `model` (MCFormer, paper §3.3), `diffusion` (the noise schedule: forward
  process, posterior, respacing, the DDPM and DDIM steps), `losses` (the objective of Eq. 13), `train` (the
  training step and loop, DDP, time-boxed chunks), `config` (nested dataclass configs and presets),
  `checkpoint` (weights, sharded training state and its save/restore, the shipped-weights registry);
- the reverse process: `sampling` (paper Algorithm 2, with windows for any image size), `inference` (the
  `BlindDiff` Python API), `batch` (processing image files for `upscale` / `deblur`);
- measuring: `metrics` (one module per family — `fidelity` PSNR/SSIM, `perceptual` LPIPS/DISTS, `niqe`,
  `piqe`, `fid`, `kernel` kernel L1/LR-PSNR — and the `registry` naming them all), `testsets` (building
  test sets), `evaluation` (`scoring` for `evaluate`, `runner` for `benchmark`, the `baselines` registry,
  `report` for the tables, plots and report.html), `peers` (Real-ESRGAN, RealSR, SRMD and classical
  deblurring baselines);
- around them: `fileio` (images, kernels and atomic writes), `hardware` (devices, precision, ranks),
  `demo`, `serve` (the local web UI), `onnx_export` (the fidelity mode as one ONNX graph), and `cli` (the
  `blinddiff` command).
"""

__version__ = "0.1.0"
__all__ = ["BlindDiff", "__version__"]


def __getattr__(name: str):
    if name == "BlindDiff":  # imported lazily so `blinddiff --help` stays fast
        from .inference import BlindDiff

        return BlindDiff
    raise AttributeError(f"module 'blinddiff' has no attribute {name!r}")
