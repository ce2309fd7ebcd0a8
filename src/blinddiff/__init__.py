"""blinddiff: blind image super-resolution with diffusion (BlindDiff).

The package reads like the method: `kernels` and `degradation` (the forward model, SPEC §2), `data`,
`model` (MCFormer, §3), `diffusion` (§4), `train`, `sampling` (the MAP reverse process, §5), `inference`
(the `BlindDiff` API), `metrics`, and `cli`.
"""

__version__ = "0.1.0"
__all__ = ["BlindDiff", "__version__"]


def __getattr__(name: str):
    if name == "BlindDiff":  # imported lazily so `blinddiff --help` stays fast
        from .inference import BlindDiff

        return BlindDiff
    raise AttributeError(f"module 'blinddiff' has no attribute {name!r}")
