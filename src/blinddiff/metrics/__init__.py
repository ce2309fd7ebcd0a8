"""Evaluation metrics of BlindDiff, computed as the paper's numbers are (docs/method.md §5, §6).

One module per family, and a registry that names them all:

- ``images`` — what every image metric does first: uint8 levels, the border crop, BT.601 Y (``rgb_to_y``);
- ``fidelity`` — PSNR and SSIM in the BasicSR convention of the paper's tables;
- ``perceptual`` — LPIPS v0.1 and DISTS, pretrained networks in plain torch;
- ``niqe`` and ``piqe`` — the no-reference scores of the real-world sets;
- ``fid`` — the Fréchet distance of Inception features, over a whole test set;
- ``kernel`` — kernel accuracy (paper Fig. 7b): kernel L1 and LR-PSNR;
- ``registry`` — every metric by name (``METRICS``: kind, direction, how it is computed and what it needs
  loaded), which drives ``parse_metrics``, ``build_metric_suite`` / ``MetricSuite`` and ``evaluate_pair``.

Image inputs (all image metrics): float tensors ``[B, C, H, W]`` / ``[C, H, W]`` in [0, 1] (clamped and
rounded to uint8 levels first), uint8 tensors, or numpy arrays ``[H, W]``, ``[H, W, C]`` or
``[B, H, W, C]`` (uint8, or float in [0, 1]); C is 1 (grey) or 3 (RGB). Per-image metrics return a
float64 tensor ``[B]`` on the input's device (the CPU for MPS inputs, which lack float64).
"""

from .fid import feature_statistics, fid_from_features, fid_from_images, frechet_distance
from .fidelity import psnr, ssim
from .images import LUMA, rgb_to_y
from .kernel import kernel_l1, lr_psnr
from .niqe import NIQEParams, load_niqe_params, niqe, niqe_features
from .perceptual import (
    DISTS,
    LPIPS,
    METRIC_WEIGHTS_COMMAND,
    PERCEPTUAL_METRICS,
    installed_weights,
    load_perceptual,
    read_flax_checkpoint,
)
from .piqe import piqe
from .registry import (
    ALL_METRICS,
    DEFAULT_METRICS,
    KERNEL_METRICS,
    LUMA_METRICS,
    METRIC_NAMES,
    METRICS,
    SET_METRICS,
    Metric,
    MetricSuite,
    build_metric_suite,
    evaluate_pair,
    parse_metrics,
    set_fid,
)

__all__ = [
    "ALL_METRICS",
    "DEFAULT_METRICS",
    "DISTS",
    "KERNEL_METRICS",
    "LPIPS",
    "LUMA",
    "LUMA_METRICS",
    "METRICS",
    "METRIC_NAMES",
    "METRIC_WEIGHTS_COMMAND",
    "Metric",
    "MetricSuite",
    "NIQEParams",
    "PERCEPTUAL_METRICS",
    "SET_METRICS",
    "build_metric_suite",
    "evaluate_pair",
    "feature_statistics",
    "fid_from_features",
    "fid_from_images",
    "frechet_distance",
    "installed_weights",
    "kernel_l1",
    "load_niqe_params",
    "load_perceptual",
    "lr_psnr",
    "niqe",
    "niqe_features",
    "parse_metrics",
    "piqe",
    "psnr",
    "read_flax_checkpoint",
    "rgb_to_y",
    "set_fid",
    "ssim",
]
