"""The metric registry: every metric by name, with what it is and how it is computed (docs/method.md §5).

One :class:`Metric` entry per name drives all that surrounds the metrics: the names ``--metrics``
accepts (:func:`parse_metrics`), what a command loads once (:func:`build_metric_suite` →
:class:`MetricSuite`) and the per-image values of one SR result (:func:`evaluate_pair`). Adding a
metric is one entry in ``_REGISTRY``, next to its function in the module of its family.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import unreadable_torch_file
from ..degradation import check_scale
from ..fileio import read_rgb
from .fid import FID_WEIGHTS_NAME, fid_from_images
from .fidelity import psnr, ssim
from .images import LUMA, ImageLike, to_levels
from .kernel import kernel_l1, lr_psnr
from .niqe import load_niqe_params, niqe
from .perceptual import DISTS, LPIPS, load_perceptual, pretrained_installed
from .piqe import piqe, require_pypiqe

__all__ = [
    "ALL_METRICS",
    "DEFAULT_METRICS",
    "KERNEL_METRICS",
    "LUMA_METRICS",
    "METRICS",
    "METRIC_NAMES",
    "SET_METRICS",
    "Metric",
    "MetricOptions",
    "MetricSuite",
    "Pair",
    "build_metric_suite",
    "evaluate_pair",
    "parse_metrics",
    "set_fid",
]

Kind = Literal["full-reference", "no-reference", "kernel", "set-level"]
"""Against the HR image; of the SR image alone; of the estimated kernel against the true one (docs/method.md
§5, Fig. 7b); one value per test set, not per image."""


@dataclass(frozen=True)
class Metric:
    """One metric: its name (in ``--metrics`` and the reports), kind and direction, and how it is computed.

    ``compute(pair, name)`` gives the value [1] of one SR result (None for set-level metrics, which
    the evaluation computes over a whole test set); ``load(suite, options, name)`` puts what it needs
    into a :class:`MetricSuite` once, failing early and naming a missing file or package;
    ``available(name)`` says whether a ``default`` metric can run here (left out of the defaults if not).
    """

    name: str
    kind: Kind
    higher_is_better: bool
    compute: Callable[[Pair, str], Tensor] | None
    load: Callable[[MetricSuite, MetricOptions, str], None] | None = None
    available: Callable[[str], bool] | None = None
    uses_luma: bool = False  # computed on Y, so its value depends on the luma
    default: bool = False  # computed when --metrics is not given
    title: str = ""  # its name in tables ("PSNR"); the name itself if empty

    @property
    def label(self) -> str:
        """The column heading of reports: the title and the better direction, "PSNR ↑", "LPIPS-VGG ↓"."""
        return f"{self.title or self.name} {'↑' if self.higher_is_better else '↓'}"


@dataclass(frozen=True)
class Pair:
    """One SR result as every per-image metric sees it: SR and HR as uint8 [1, C, H, W] of equal size,
    the protocol (scale, border crop, Y channel and its luma, downsampler) and what some metrics need."""

    sr: Tensor
    hr: Tensor
    scale: int
    crop: int
    y_channel: bool
    luma: str
    downsample: str
    kernel: Tensor | None = None  # estimated
    gt_kernel: Tensor | None = None
    networks: Mapping[str, Callable[..., Tensor]] = field(default_factory=dict)  # metric name → network
    niqe_params: str | os.PathLike | None = None

    def kernels(self) -> tuple[Tensor, Tensor]:
        if self.kernel is None or self.gt_kernel is None:
            raise ValueError(f"{list(KERNEL_METRICS)} need both kernel= (estimated) and gt_kernel=")
        return self.kernel, self.gt_kernel

    def network(self, name: str) -> Callable[..., Tensor]:
        if name not in self.networks:
            raise ValueError(f"{name!r} needs its network: networks={{{name!r}: load_perceptual({name!r})}}")
        return self.networks[name]

    def niqe_file(self) -> str | os.PathLike:
        if self.niqe_params is None:
            raise ValueError("'niqe' needs niqe_params=PATH, e.g. ../shared/weights/niqe/niqe_pris_params.npz")
        return self.niqe_params


def _unit(levels: Tensor) -> Tensor:
    """uint8 levels → float64 in [0, 1]."""
    return levels.to(torch.float64) / 255


def _psnr(pair: Pair, name: str) -> Tensor:
    return psnr(pair.sr, pair.hr, crop=pair.crop, y_channel=pair.y_channel, luma=pair.luma)


def _ssim(pair: Pair, name: str) -> Tensor:
    return ssim(pair.sr, pair.hr, crop=pair.crop, y_channel=pair.y_channel, luma=pair.luma)


@torch.no_grad()
def _network_distance(pair: Pair, name: str) -> Tensor:
    network = pair.network(name)
    device = next(network.parameters()).device  # type: ignore[attr-defined]
    return network(_unit(pair.sr).to(device), _unit(pair.hr).to(device), crop=pair.crop)


def _niqe(pair: Pair, name: str) -> Tensor:
    return niqe(pair.sr, pair.niqe_file(), crop=pair.crop)


def _piqe(pair: Pair, name: str) -> Tensor:
    return piqe(pair.sr, crop=pair.crop)


def _kernel_l1(pair: Pair, name: str) -> Tensor:
    return kernel_l1(*pair.kernels())


def _lr_psnr(pair: Pair, name: str) -> Tensor:
    return lr_psnr(_unit(pair.hr), *pair.kernels(), pair.scale, pair.downsample, y_channel=pair.y_channel,
                   luma=pair.luma)


@dataclass(frozen=True)
class MetricOptions:
    """The options of :func:`build_metric_suite` that say where a metric's files are."""

    lpips_backbone: str | None = None  # torchvision weights, with lpips_linear: replace the installed LPIPS
    lpips_linear: str | None = None
    lpips_net: str = "vgg"  # the LPIPS those two files are for, and what `lpips` stands for
    niqe_params: str | None = None
    fid_weights: str | None = None


@dataclass
class MetricSuite:
    """The metrics asked for, with what they need loaded once (LPIPS/DISTS networks, NIQE and FID files)."""

    names: tuple[str, ...]
    networks: dict[str, LPIPS | DISTS] = field(default_factory=dict)  # metric name → network
    luma: str = "studio"  # Y of PSNR/SSIM/LR-PSNR: "studio" (16–235, the paper's) or "full"
    niqe_params: Path | None = None
    fid_weights: Path | None = None
    device: torch.device = torch.device("cpu")

    @property
    def image_metrics(self) -> tuple[str, ...]:
        return tuple(name for name in self.names if METRICS[name].kind != "set-level")

    @property
    def needs_kernels(self) -> bool:
        return any(METRICS[name].kind == "kernel" for name in self.names)

    def without_kernel_metrics(self) -> MetricSuite:
        """For methods without an estimated kernel (the baselines)."""
        return replace(self, names=tuple(n for n in self.names if METRICS[n].kind != "kernel"))

    def score(self, sr: np.ndarray, hr: np.ndarray, *, scale: int, downsample: str,
              kernel: np.ndarray | None = None, gt_kernel: np.ndarray | None = None,
              names: Sequence[str] | None = None) -> dict[str, float]:
        """Per-image metrics (docs/method.md §5) of a uint8 SR [H, W, 3] against its HR."""
        names = tuple(self.image_metrics if names is None else names)
        return evaluate_pair(sr, hr, scale=scale, metrics=names, networks=self.networks, luma=self.luma,
                             niqe_params=self.niqe_params, downsample=downsample,
                             kernel=None if kernel is None else torch.as_tensor(kernel, dtype=torch.float32),
                             gt_kernel=None if gt_kernel is None else torch.as_tensor(gt_kernel, dtype=torch.float32))


def _load_network(suite: MetricSuite, options: MetricOptions, name: str) -> None:
    if options.lpips_backbone and options.lpips_linear and name == f"lpips_{options.lpips_net}":
        try:
            network: torch.nn.Module = LPIPS.from_weights(options.lpips_backbone, options.lpips_linear,
                                                          net=options.lpips_net)  # type: ignore[arg-type]
        except (FileNotFoundError, ValueError):
            raise
        except Exception as err:  # a damaged or malicious file: name both, never suggest unpickling
            raise unreadable_torch_file(f"--lpips-backbone {options.lpips_backbone} or --lpips-linear "
                                        f"{options.lpips_linear}", err) from None
    else:
        network = load_perceptual(name)  # FileNotFoundError naming `make metric-weights`
    suite.networks[name] = network.to(suite.device)  # type: ignore[assignment]


def _load_niqe_params(suite: MetricSuite, options: MetricOptions, name: str) -> None:
    if not options.niqe_params:
        raise ValueError("metric niqe needs --niqe-params PATH (e.g. ../shared/weights/niqe/niqe_pris_params.npz)")
    try:
        load_niqe_params(options.niqe_params)  # raises FileNotFoundError naming the file
    except (FileNotFoundError, ValueError):
        raise
    except Exception as err:  # not an .npz at all (a .npy, text, a damaged archive)
        raise ValueError(f"--niqe-params {options.niqe_params} is not a NIQE parameter .npz ({type(err).__name__}: "
                         f"{err}); pass BasicSR's niqe_pris_params.npz") from None
    suite.niqe_params = Path(options.niqe_params)


def _check_pypiqe(suite: MetricSuite, options: MetricOptions, name: str) -> None:
    require_pypiqe()  # fails now, naming the install, not after the first method has run


def _load_fid_weights(suite: MetricSuite, options: MetricOptions, name: str) -> None:
    if not options.fid_weights:
        raise ValueError(f"metric fid needs --fid-weights PATH (pytorch-fid's {FID_WEIGHTS_NAME})")
    if not Path(options.fid_weights).is_file():
        raise FileNotFoundError(f"FID Inception weights not found: {options.fid_weights}; pass the local "
                                f"{FID_WEIGHTS_NAME}")
    try:
        import pytorch_fid  # noqa: F401
    except ImportError:
        raise ValueError("metric fid needs the optional package pytorch-fid (pip install pytorch-fid); "
                         "or leave fid out of --metrics") from None
    suite.fid_weights = Path(options.fid_weights)


_REGISTRY = (
    Metric("psnr", "full-reference", True, _psnr, uses_luma=True, default=True, title="PSNR"),
    Metric("ssim", "full-reference", True, _ssim, uses_luma=True, default=True, title="SSIM"),
    Metric("lpips_vgg", "full-reference", False, _network_distance, load=_load_network,
           available=pretrained_installed, default=True, title="LPIPS-VGG"),
    Metric("lpips_alex", "full-reference", False, _network_distance, load=_load_network,
           available=pretrained_installed, title="LPIPS-Alex"),
    Metric("dists", "full-reference", False, _network_distance, load=_load_network, available=pretrained_installed,
           title="DISTS"),
    Metric("niqe", "no-reference", False, _niqe, load=_load_niqe_params, title="NIQE"),
    Metric("piqe", "no-reference", False, _piqe, load=_check_pypiqe, title="PIQE"),
    Metric("kernel_l1", "kernel", False, _kernel_l1, default=True, title="kernel L1"),
    Metric("lr_psnr", "kernel", True, _lr_psnr, uses_luma=True, default=True, title="LR-PSNR"),
    Metric("fid", "set-level", False, None, load=_load_fid_weights, title="FID"),
)
METRICS: Mapping[str, Metric] = {metric.name: metric for metric in _REGISTRY}
"""Every metric by name, in the order of the reports."""

ALL_METRICS = tuple(METRICS)
METRIC_NAMES = tuple(name for name, metric in METRICS.items() if metric.kind != "set-level")
"""Names accepted by :func:`evaluate_pair` (one value per image)."""
KERNEL_METRICS = tuple(name for name, metric in METRICS.items() if metric.kind == "kernel")
SET_METRICS = tuple(name for name, metric in METRICS.items() if metric.kind == "set-level")
DEFAULT_METRICS = tuple(name for name, metric in METRICS.items() if metric.default)
LUMA_METRICS = tuple(name for name, metric in METRICS.items() if metric.uses_luma)


def evaluate_pair(sr: ImageLike, hr: ImageLike, *, scale: int,
                  metrics: Sequence[str] = ("psnr", "ssim"), crop: int | None = None,
                  y_channel: bool = True, luma: str = "studio", kernel: Tensor | None = None,
                  gt_kernel: Tensor | None = None,
                  networks: Mapping[str, Callable[..., Tensor]] | None = None,
                  niqe_params: str | os.PathLike | None = None,
                  downsample: str = "bicubic") -> dict[str, float]:
    """The requested ``metrics`` (names in :data:`METRIC_NAMES`) of one SR image against its HR.

    ``sr``/``hr``: one image (tensor [C, H, W] / [1, C, H, W] in [0, 1], or uint8 numpy
    [H, W, C]) of equal size. ``crop`` defaults to ``scale`` (the paper's protocol) for PSNR,
    SSIM, LPIPS/DISTS (on the uint8-rounded images) and NIQE (of ``sr``); ``luma`` is the Y of
    PSNR, SSIM and LR-PSNR (``images.rgb_to_y``). ``kernel_l1`` and ``lr_psnr`` need ``kernel``
    (estimated) and ``gt_kernel``; each of ``PERCEPTUAL_METRICS`` needs its network in
    ``networks`` (e.g. ``{"lpips_vgg": load_perceptual("lpips_vgg")}``); ``niqe`` needs
    ``niqe_params`` (path).
    """
    unknown = [name for name in metrics if name not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {METRIC_NAMES}")
    scale = check_scale(scale)
    if luma not in LUMA:
        raise ValueError(f"luma {luma!r} is invalid; use one of {LUMA}")
    sr_levels, hr_levels = to_levels(sr, "sr"), to_levels(hr, "hr")
    if sr_levels.shape[0] != 1 or sr_levels.shape != hr_levels.shape:
        raise ValueError(f"evaluate_pair takes one SR image and its HR image of the same size, got "
                         f"{tuple(sr_levels.shape)} and {tuple(hr_levels.shape)} as [B, C, H, W]")
    pair = Pair(sr_levels.to(torch.uint8), hr_levels.to(torch.uint8), scale=scale,
                crop=int(scale) if crop is None else crop, y_channel=y_channel, luma=luma, downsample=downsample,
                kernel=kernel, gt_kernel=gt_kernel, networks=networks or {}, niqe_params=niqe_params)
    results: dict[str, float] = {}
    for name in metrics:
        compute = METRICS[name].compute
        assert compute is not None  # set-level metrics are not in METRIC_NAMES
        results[name] = float(compute(pair, name).reshape(-1)[0])
    return results


def parse_metrics(text: str | Sequence[str] | None, lpips_net: str = "vgg") -> tuple[str, ...]:
    """``"psnr,ssim"`` or a sequence → validated names (no duplicates; ``lpips`` stands for
    ``lpips_<lpips_net>``); None → the defaults that can run here (LPIPS-VGG only if its weights are
    installed)."""
    if text is None:
        return tuple(name for name in DEFAULT_METRICS
                     if METRICS[name].available is None or METRICS[name].available(name))  # type: ignore[misc]
    items = [part.strip() for part in (text.split(",") if isinstance(text, str) else text) if part.strip()]
    items = [f"lpips_{lpips_net}" if name == "lpips" else name for name in items]
    unknown = [name for name in items if name not in METRICS]
    if unknown or not items:
        raise ValueError(f"--metrics {text!r}: unknown or empty {unknown}; choose from lpips,"
                         f"{','.join(ALL_METRICS)}")
    return tuple(dict.fromkeys(items))


def build_metric_suite(metrics: str | Sequence[str] | None = None, *, lpips_backbone: str | None = None,
                       lpips_linear: str | None = None, lpips_net: str = "vgg", luma: str = "studio",
                       niqe_params: str | None = None, fid_weights: str | None = None,
                       device: torch.device | str = "cpu") -> MetricSuite:
    """Validate the metric names and load what they need; fails early, naming a missing file.

    ``metrics=None``: PSNR, SSIM, LPIPS-VGG (when installed), kernel L1, LR-PSNR, plus LPIPS-``lpips_net``
    / NIQE / FID when their files are given. LPIPS and DISTS use the weights installed by ``make
    metric-weights``; ``lpips_backbone`` + ``lpips_linear`` (torchvision and official LPIPS files)
    replace them for ``lpips_<lpips_net>``. NIQE and FID need their local files.
    """
    if lpips_net not in ("vgg", "alex"):
        raise ValueError(f"--lpips-net {lpips_net!r} is invalid; use vgg (the paper's) or alex")
    if luma not in LUMA:
        raise ValueError(f"--luma {luma!r} is invalid; use one of {', '.join(LUMA)}")
    if bool(lpips_backbone) != bool(lpips_linear):
        raise ValueError("give both --lpips-backbone and --lpips-linear (torchvision and LPIPS v0.1 files), or "
                         "neither for the installed weights")
    names = list(parse_metrics(metrics, lpips_net))
    if metrics is None:
        names += [name for name, given in ((f"lpips_{lpips_net}", lpips_backbone), ("niqe", niqe_params),
                                           ("fid", fid_weights)) if given and name not in names]
    options = MetricOptions(lpips_backbone=lpips_backbone, lpips_linear=lpips_linear, lpips_net=lpips_net,
                            niqe_params=niqe_params, fid_weights=fid_weights)
    suite = MetricSuite(tuple(names), luma=luma, device=torch.device(device))
    for name, metric in METRICS.items():  # registry order: the same first failure whatever the order asked
        if name in names and metric.load is not None:
            metric.load(suite, options, name)
    return suite


def set_fid(suite: MetricSuite, sr_paths: Sequence[Path], hr_paths: Sequence[Path]) -> float | None:
    """FID of the SR images against the HR of each case (docs/method.md §5: over the whole test set)."""
    if suite.fid_weights is None or len(sr_paths) < 2:
        return None
    return fid_from_images((read_rgb(p) for p in sr_paths), (read_rgb(p) for p in hr_paths),
                           inception_weights=suite.fid_weights, device=suite.device)
