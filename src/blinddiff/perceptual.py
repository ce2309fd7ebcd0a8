"""Former home of LPIPS and DISTS, kept so that ``from blinddiff.perceptual import LPIPS`` still works;
they live in :mod:`blinddiff.metrics.perceptual`."""

from .metrics.perceptual import (
    DISTS,
    LPIPS,
    METRIC_WEIGHTS_COMMAND,
    PERCEPTUAL_METRICS,
    installed_weights,
    load_perceptual,
    read_flax_checkpoint,
)

__all__ = ["DISTS", "LPIPS", "METRIC_WEIGHTS_COMMAND", "PERCEPTUAL_METRICS", "installed_weights", "load_perceptual",
           "read_flax_checkpoint"]
