"""Device and precision choice (STYLE §5): CUDA → MPS → CPU unless told, bf16 autocast where it is fast."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


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
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision {precision!r} is unknown; use auto, fp32, bf16 or fp16")
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
