"""The one timing helper of the benchmark scripts: wall times of repeated calls, and memory peaks.

The scripts import it as a sibling (`python benchmarks/<script>.py` puts this folder first on sys.path).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def time_calls(fn: Callable[[], object], repeats: int, *, warmup: int = 1,
               device: torch.device | None = None) -> list[float]:
    """Wall times (s) of `repeats` calls of `fn` after `warmup` untimed ones; CUDA work is synchronised
    before and after each timed call. Report the min (robust to other load on a shared machine) or the median."""
    sync = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _rss_mib(field_name: str) -> float | None:
    """VmRSS / VmHWM of this process in MiB from /proc (Linux), else None."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: CUDA's allocator statistics, or VmHWM (Linux ≥ 4.0) on the CPU; False where the
    peak cannot be reset (it is then the process peak)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def memory_now(device: torch.device) -> float:
    """MiB allocated on CUDA, else the resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    current = _rss_mib("VmRSS")
    if current is not None:
        return current
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # a peak, the best there is


def memory_peak(device: torch.device) -> float:
    """Peak MiB since `reset_peak_memory` (CUDA allocated bytes, or VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _rss_mib("VmHWM")
    return peak if peak is not None else memory_now(device)
