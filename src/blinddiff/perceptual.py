"""Former home of LPIPS and DISTS, kept so that ``from blinddiff.perceptual import LPIPS`` still works;
they live in :mod:`blinddiff.metrics.perceptual`."""

from .metrics.perceptual import *  # noqa: F403 (the same public names, nothing else)
from .metrics.perceptual import __all__  # noqa: F401
