"""What every step of a benchmark run gets: the settings and the run context.

A module of its own so that the runner, which makes a :class:`RunContext`, and the report writer, which reads
one, both import it without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..hardware import Runtime, shard
from ..metrics import MetricSuite
from ..testsets import BenchmarkSet
from .baselines import BASELINES, REGISTRY, BaselineInputs

if TYPE_CHECKING:
    from ..inference import BlindDiff, SampleOptions

__all__ = ["BenchmarkSettings", "RunContext", "spread"]


@dataclass
class BenchmarkSettings:
    """What `run_benchmark` does besides the sampling options (see the `benchmark` command's help)."""

    seed: int = 0
    batch_size: int = 1
    baselines: tuple[str, ...] = BASELINES
    limit: int | None = None  # only this many cases, spread evenly over the set
    trajectory_cases: int = 2  # images whose reverse process is traced (Fig. 7a)
    trajectory_steps: int | None = None  # steps of those traces (default: the sampling steps)
    steps_sweep: tuple[int, ...] = ()  # numbers of steps for the quality-vs-steps plot
    sweep_cases: int = 2
    report_cases: int = 24  # cases shown in report.html
    crop: int = 96  # HR pixels per side of the report crops

    def check(self) -> None:
        unknown = [b for b in self.baselines if b not in REGISTRY]
        if unknown:
            raise ValueError(f"baselines={','.join(self.baselines)}: unknown {unknown}; use some of "
                             f"{','.join(REGISTRY)} (or 'none')")
        for name in ("batch_size", "crop"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; use 1 or more")
        for name in ("trajectory_cases", "sweep_cases", "report_cases"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; use 0 or more")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} is invalid; use 1 or more (or leave it out for all cases)")
        if self.trajectory_steps is not None and self.trajectory_steps < 1:
            raise ValueError(f"trajectory_steps={self.trajectory_steps} is invalid; use 1 or more")
        bad = [s for s in self.steps_sweep if s < 1]
        if bad:
            raise ValueError(f"steps_sweep has invalid step counts {bad}; use positive integers, e.g. 2,5,10")


def spread(items: Sequence[Any], count: int) -> list[Any]:
    """``count`` items evenly spread over the sequence (first and last included): the cases of ``limit``,
    of the traces and sweep, of the report."""
    if count >= len(items):
        return list(items)
    if count <= 0:
        return []
    if count == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


@dataclass(frozen=True)
class RunContext:
    """One benchmark run as its steps see it: the test set and the cases run (all ranks), the run folder,
    the model and its sampling options, the settings, the metric suite (on this rank's device), this
    process's rank and the run's fingerprint (what the saved results depend on). ``log`` prints on rank 0
    only; ``progress`` shows bars there."""

    bench: BenchmarkSet
    cases: list[dict]
    out: Path
    model: BlindDiff
    options: SampleOptions
    settings: BenchmarkSettings
    suite: MetricSuite
    runtime: Runtime
    fingerprint: dict
    log: Callable[[str], None]
    progress: bool

    @property
    def my_cases(self) -> list[dict]:
        """This rank's share of the cases (case i → rank i mod world)."""
        return shard(self.cases, self.runtime)

    @property
    def baseline_inputs(self) -> BaselineInputs:
        return BaselineInputs(self.bench, self.model, self.options, self.settings.seed, self.out)
