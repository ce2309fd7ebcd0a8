"""FID: the Fréchet distance of Inception pool features, over a whole test set against its HR images
(docs/method.md §5).

Features may be pre-computed (:func:`fid_from_features`), or the optional ``pytorch_fid`` InceptionV3
computes them from images with a local weight file (:func:`fid_from_images`; nothing is downloaded).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn

from .images import ImageLike, to_levels

__all__ = ["FID_WEIGHTS_NAME", "feature_statistics", "fid_from_features", "fid_from_images", "frechet_distance"]


def feature_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N ≥ 2."""
    if isinstance(features, Tensor):
        features = features.detach().cpu().double().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N ≥ 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], -1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     *, eps: float = 1e-6) -> float:
    """Fréchet distance ‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½) between two Gaussians (FID).

    As the reference implementation: if the matrix square root is not finite (singular product)
    ``eps`` is added to both diagonals; a complex result whose diagonal imaginary part is below
    1e-3 is taken as real, a larger one raises ValueError.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) \
            or sigma2.shape != (dim, dim):
        raise ValueError(f"inconsistent shapes: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 "
                         f"{mu2.shape}, sigma2 {sigma2.shape}; expected [D] and [D, D]")
    diff = mu1 - mu2
    with np.errstate(all="ignore"):
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(dim) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = np.abs(np.diagonal(covmean).imag).max()
        if imaginary > 1e-3:
            raise ValueError(f"matrix square root has an imaginary component {imaginary:.3g}; "
                             "the covariances are not valid (use more samples)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(sr_features: Tensor | np.ndarray, hr_features: Tensor | np.ndarray) -> float:
    """FID between two pre-computed feature sets [N, D] (e.g. Inception pool features)."""
    return frechet_distance(*feature_statistics(sr_features), *feature_statistics(hr_features))


FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
_FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                    + FID_WEIGHTS_NAME)


def _fid_inception(weights: Path) -> nn.Module:
    """pytorch_fid's InceptionV3 (2048-d pool features) with weights read from a local file."""
    try:
        from pytorch_fid import inception as fid_inception
    except ImportError as error:
        raise ImportError("fid_from_images needs the optional package pytorch-fid (with "
                          "torchvision): pip install pytorch-fid; or compute Inception features "
                          "elsewhere and call fid_from_features") from error

    def load_local(*args: object, **kwargs: object) -> dict[str, Tensor]:
        return torch.load(weights, map_location="cpu", weights_only=True)

    # pytorch_fid fetches its weights by URL inside InceptionV3(); serve the local file instead.
    fetch = fid_inception.load_state_dict_from_url
    fid_inception.load_state_dict_from_url = load_local
    try:
        model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    finally:
        fid_inception.load_state_dict_from_url = fetch
    return model.eval()


def _as_image_batches(images: ImageLike | Iterable[ImageLike], name: str) -> Iterable[Tensor]:
    if isinstance(images, (Tensor, np.ndarray)):
        images = [images]
    for item in images:
        batch = to_levels(item, name) / 255.0
        yield batch.expand(-1, 3, -1, -1) if batch.shape[1] == 1 else batch


@torch.no_grad()
def fid_from_images(sr_images: ImageLike | Iterable[ImageLike],
                    hr_images: ImageLike | Iterable[ImageLike], *,
                    inception_weights: str | os.PathLike,
                    device: torch.device | str | None = None, batch_size: int = 16) -> float:
    """FID between two image sets (docs/method.md §5) with pytorch_fid's InceptionV3.

    Each set is a tensor/array batch or an iterable of images or batches of any size (images
    are rounded to uint8 like saved PNGs; pytorch_fid resizes them to 299² itself).
    ``inception_weights`` is the local ``pt_inception-2015-12-05-6726825d.pth``. Raises
    FileNotFoundError / ImportError naming the missing file or package; never downloads.
    """
    weights = Path(inception_weights)
    if not weights.is_file():
        raise FileNotFoundError(f"FID Inception weights not found: {weights}. Download "
                                f"{FID_WEIGHTS_NAME} (on a machine with internet) from "
                                f"{_FID_WEIGHTS_URL} and pass its local path")
    model = _fid_inception(weights).to(device or "cpu")
    parameter = next(model.parameters())

    def features(images: ImageLike | Iterable[ImageLike], name: str) -> Tensor:
        pooled = []
        for batch in _as_image_batches(images, name):
            for chunk in batch.split(batch_size):
                out = model(chunk.to(parameter.device, parameter.dtype))[0]
                pooled.append(out.flatten(1).double().cpu())
        if not pooled:
            raise ValueError(f"{name}: no images given")
        return torch.cat(pooled)

    return fid_from_features(features(sr_images, "sr_images"), features(hr_images, "hr_images"))

