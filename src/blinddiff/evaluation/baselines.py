"""The method and the rows it is compared with (docs/method.md §5; paper §4), as a registry.

A producer makes the SR images of a batch of cases: ``produce(lr [B, 3, h, w], cases) → (sr [B, 3, s·h, s·w],
kernels [B, k, k] or None)``. :data:`METHOD` is the blind MAP reverse process (paper Algorithm 2); each entry of
:data:`REGISTRY` is a baseline: plain bicubic ×s; the same model in non-blind mode given the true kernel
(gt-kernel); at scale 1 the blurry input itself and Richardson–Lucy / Wiener deconvolution given the true or our
estimated kernel; at ×4 the peers of ``blinddiff.peers`` (Real-ESRGAN, RealSR, SRMD given the true or our
estimated kernel). Adding a baseline is one entry of :data:`REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..peers import check_deconvolution, check_peers, deconvolution_producers, peer_producers
from ..testsets import BenchmarkSet

if TYPE_CHECKING:
    from ..inference import BlindDiff, SampleOptions

__all__ = ["ALL_BASELINES", "BASELINES", "METHOD", "REGISTRY", "Baseline", "BaselineInputs", "Producer",
           "check_baselines", "default_baselines", "lr_batch", "producer"]

METHOD = "blinddiff"  # the blind MAP reverse process (ours)
BASELINES = ("bicubic", "gt-kernel")  # the default; the peers (blinddiff.peers) need `make peers`

Producer = Callable[[torch.Tensor, list[dict]], "tuple[torch.Tensor, torch.Tensor | None]"]


def lr_batch(bench: BenchmarkSet, cases: Sequence[dict]) -> torch.Tensor:
    """The LR images of ``cases`` (one size) as the [B, 3, h, w] batch in [0, 1] a producer takes."""
    return torch.stack([torch.from_numpy(bench.lr(c)).permute(2, 0, 1) for c in cases]).float() / 255.0


@dataclass(frozen=True)
class BaselineInputs:
    """What a producer is made from: the test set, the blind model with the run's sampling options and seed
    (every image gets the same seed, as `blinddiff upscale --seed`), and the run folder."""

    bench: BenchmarkSet
    model: BlindDiff
    options: SampleOptions
    seed: int
    out: Path

    def upscale(self, lr: torch.Tensor, cases: list[dict],
                kernel: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The blind model's SR and kernels of a batch; given ``kernel`` [B, k, k], the non-blind mode."""
        return self.model.run(lr, [self.seed] * len(cases), self.options, kernel=kernel)

    def estimated_kernel(self, case: dict) -> np.ndarray:
        """Our kernel of ``case`` from this run (:data:`METHOD` runs first): the kernel of the ``*-est`` rows."""
        path = self.out / METHOD / f"{case['name']}_kernel.npy"
        if not path.is_file():
            raise ValueError(f"no estimated kernel {path}: {METHOD} did not finish this case")
        return np.load(path, allow_pickle=False)


Check = Callable[[list[str], BenchmarkSet, "SampleOptions"], None]


@dataclass(frozen=True)
class Baseline:
    """One baseline: ``make(inputs)`` → its producer (built once per run, so loading is not timed);
    ``check(chosen, bench, options)`` refuses, before any work, what it cannot do, given every chosen
    baseline that shares it (one message names them all); ``true_kernel``: it is given the test set's kernel,
    which real LR/HR pairs do not have; ``pictured``: report.html shows its crops."""

    make: Callable[[BaselineInputs], Producer]
    check: Check | None = None
    true_kernel: bool = False
    pictured: bool = True


def _bicubic(inputs: BaselineInputs) -> Producer:
    from ..degradation import upsample_bicubic

    scale = inputs.bench.scale
    return lambda lr, cases: (upsample_bicubic(lr, scale).clamp(0, 1), None)


def _gt_kernel(inputs: BaselineInputs) -> Producer:
    def produce(lr: torch.Tensor, cases: list[dict]) -> tuple[torch.Tensor, None]:
        given = torch.stack([torch.from_numpy(inputs.bench.gt_kernel(c)).float() for c in cases])
        return inputs.upscale(lr, cases, kernel=given)[0], None
    return produce


def _blurry(inputs: BaselineInputs) -> Producer:
    return lambda lr, cases: (lr, None)  # scale 1: the input itself, the deblurring tables' first row


def _peer(name: str) -> Callable[[BaselineInputs], Producer]:
    def make(inputs: BaselineInputs) -> Producer:
        return peer_producers([name], inputs.bench.scale, gt_kernel=inputs.bench.gt_kernel,
                              estimated_kernel=inputs.estimated_kernel)[name]
    return make


def _deconvolution(name: str) -> Callable[[BaselineInputs], Producer]:
    def make(inputs: BaselineInputs) -> Producer:
        return deconvolution_producers([name], inputs.bench.scale, gt_kernel=inputs.bench.gt_kernel,
                                       estimated_kernel=inputs.estimated_kernel)[name]
    return make


def _kernel_used(chosen: list[str], bench: BenchmarkSet, options: SampleOptions) -> None:
    if not options.uses_kernel:
        reason = (f"--zeta {options.zeta:g} turns that off (as --mode fidelity does)" if not options.zeta > 0
                  else f"--guidance {options.guidance} has none")
        raise ValueError(f"baseline gt-kernel would equal {METHOD}: the true kernel enters only the kernel-aware "
                         f"data term, and {reason}; leave gt-kernel out (--baselines bicubic) or pass --zeta > 0 "
                         f"with --guidance noise-aware or kernel-aware")


def _scale_1(chosen: list[str], bench: BenchmarkSet, options: SampleOptions) -> None:
    if bench.scale != 1:
        raise ValueError(f"baseline blurry (the input itself) is for deblurring, but the test set is ×{bench.scale}; "
                         f"use bicubic there")


def _deconvolution_check(chosen: list[str], bench: BenchmarkSet, options: SampleOptions) -> None:
    check_deconvolution(chosen, bench.scale)


def _peers_check(chosen: list[str], bench: BenchmarkSet, options: SampleOptions) -> None:
    check_peers(chosen, bench.scale)  # scale ×4, ncnn and the model files installed


REGISTRY: dict[str, Baseline] = {  # in the order of the tables
    "bicubic": Baseline(_bicubic),
    "gt-kernel": Baseline(_gt_kernel, _kernel_used, true_kernel=True),
    "blurry": Baseline(_blurry, _scale_1, pictured=False),  # the report's LR picture is its output
    "rl-gt": Baseline(_deconvolution("rl-gt"), _deconvolution_check, true_kernel=True),
    "rl-est": Baseline(_deconvolution("rl-est"), _deconvolution_check),
    "wiener-gt": Baseline(_deconvolution("wiener-gt"), _deconvolution_check, true_kernel=True),
    "wiener-est": Baseline(_deconvolution("wiener-est"), _deconvolution_check),
    "realesrgan": Baseline(_peer("realesrgan"), _peers_check),
    "realsr": Baseline(_peer("realsr"), _peers_check),
    "srmd-gt": Baseline(_peer("srmd-gt"), _peers_check, true_kernel=True),
    "srmd-est": Baseline(_peer("srmd-est"), _peers_check),
}
ALL_BASELINES = tuple(REGISTRY)  # blurry and deconvolution: scale 1 only; the peers: ×4 only


def default_baselines(options: SampleOptions) -> tuple[str, ...]:
    """`BASELINES`, without gt-kernel where the options do not use a kernel (it would equal the method)."""
    return BASELINES if options.uses_kernel else tuple(b for b in BASELINES if b != "gt-kernel")


def check_baselines(names: Sequence[str], bench: BenchmarkSet, options: SampleOptions) -> None:
    """Refuse, before any work, baselines that cannot run on this test set with these options."""
    if not bench.has_kernels:  # real LR/HR pairs: nobody knows their blur
        needs_truth = [name for name in names if REGISTRY[name].true_kernel]
        if needs_truth:
            raise ValueError(f"baselines {','.join(needs_truth)} need the true kernel, which the real pairs of "
                             f"{bench.root} do not have; leave them out (e.g. --baselines bicubic,realesrgan)")
    chosen = [name for name in REGISTRY if name in names]
    for check in dict.fromkeys(REGISTRY[name].check for name in chosen if REGISTRY[name].check):
        check([name for name in chosen if REGISTRY[name].check is check], bench, options)


def producer(name: str, inputs: BaselineInputs) -> Producer:
    """The producer of :data:`METHOD` or of a baseline of :data:`REGISTRY`."""
    return inputs.upscale if name == METHOD else REGISTRY[name].make(inputs)

