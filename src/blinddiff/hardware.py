"""Where the work runs (STYLE §5): CUDA → MPS → CPU unless told, bf16 autocast where it is fast, and the
torchrun ranks (read from its variables, nanoGPT style) with the sharding of work items across them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.distributed as dist

__all__ = ["DEVICES", "PRECISIONS", "Runtime", "autocast", "distributed", "gather", "pick_device", "resolve_precision",
           "setup_runtime", "shard"]

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit device that is missing is an error."""
    kind = preference.split(":")[0]
    if kind not in DEVICES:
        raise ValueError(f"device {preference!r} is unknown; use one of {', '.join(DEVICES)}")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        return torch.device(preference if ":" in preference else f"cuda:{local_rank}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps was asked for but MPS is not available; use --device cpu")
    return torch.device(kind)


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matrix units (AVX512-BF16 / AMX), where bf16 autocast pays off."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` → bf16 where the hardware runs it fast (CUDA with bf16, CPUs with AMX/AVX512-BF16), else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def autocast(precision: str, device: torch.device) -> ContextManager:
    """Autocast context for a resolved precision (fp32 → no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- torchrun ranks


@dataclass
class Runtime:
    """Where this process stands in a (possibly distributed) run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_runtime(device: str = "auto") -> Runtime:
    """Read the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK) and start the process group if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Runtime(rank, world, local_rank, chosen)


def shard(items: Sequence[Any], runtime: Runtime) -> list[Any]:
    """This rank's share of the work: item i goes to rank i mod world."""
    return list(items[runtime.rank::runtime.world])


def gather(runtime: Runtime, items: list[Any]) -> list[Any]:
    """Every rank's list, concatenated (the same on every rank); order is restored by the caller."""
    if runtime.world == 1:
        return items
    parts: list[list[Any] | None] = [None] * runtime.world
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in (part or [])]


class distributed:  # noqa: N801 (used like a function: `with distributed(device) as runtime`)
    """The torchrun runtime for one command; tears down the process group only if it started it."""

    def __init__(self, device: str) -> None:
        self.started = dist.is_available() and not dist.is_initialized()
        self.runtime = setup_runtime(device)

    def __enter__(self) -> Runtime:
        return self.runtime

    def __exit__(self, *exc: object) -> None:
        if self.runtime.world > 1 and self.started and dist.is_initialized():
            if exc[0] is None:
                dist.barrier()
            dist.destroy_process_group()
