"""Weights and training state on disk (STYLE §6).

Weights are safetensors with the resolved run config in the metadata, so a weights file alone rebuilds
its network. Training state (optimizer, scheduler, step, RNG states) lives in a separate torch file
that is read with `weights_only=True`. Every write is atomic (temp file + rename), and a checkpoint
counts as complete only once its state file exists, which is written last.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .config import Config, config_from_dict, config_to_dict
from .fileio import atomic_write

FORMAT = "blinddiff-weights-1"
CHECKPOINT_PATTERN = re.compile(r"step_(\d{8})\.state\.pt$")


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], cfg: Config, **metadata: Any) -> None:
    """Write tensors (made contiguous, on CPU) with the config and extra metadata, atomically."""
    meta = {"format": FORMAT, "config": json.dumps(config_to_dict(cfg), sort_keys=True),
            **{key: json.dumps(value) for key, value in metadata.items()}}
    data = save_safetensors_bytes({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=meta)
    with atomic_write(path) as handle:
        handle.write(data)


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, dict[str, Any]]:
    """Read a weights file: (tensors, config, other metadata). Errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        tensors = load_safetensors_bytes(path.read_bytes())
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_size))
    except (SafetensorError, ValueError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"{path} has no blinddiff config in its metadata; it was not written by blinddiff")
    try:
        config = json.loads(meta["config"])
        extra = {key: json.loads(value) for key, value in meta.items() if key not in ("format", "config")}
        if not isinstance(config, dict):
            raise ValueError(f"the config is a {type(config).__name__}, not a mapping of settings")
        cfg = config_from_dict(config)
    except ValueError as err:  # JSONDecodeError is a ValueError too
        raise ValueError(f"{path}: its metadata hold no usable blinddiff config ({err}); the file is damaged or "
                         f"was not written by blinddiff") from None
    return tensors, cfg, extra


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Select and strip one prefix (e.g. 'ema.') from a flat tensor dict."""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def checkpoint_paths(folder: Path, step: int) -> tuple[Path, Path]:
    """(weights, state) file names of the checkpoint at `step`."""
    return folder / f"step_{step:08d}.safetensors", folder / f"step_{step:08d}.state.pt"


def save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_write(path) as handle:
        torch.save(state, handle)


def unreadable_torch_file(what: str | Path, err: BaseException) -> ValueError:
    """The error for a torch file that `weights_only=True` refuses; torch's own message would suggest
    `weights_only=False`, which runs arbitrary code from the file: never that."""
    return ValueError(f"{what} cannot be read as plain tensors ({type(err).__name__}): the file is damaged, not a "
                      f"torch file, or holds Python objects, which are never loaded; use the original weights file "
                      f"(or .safetensors)")


def load_torch(path: Path) -> Any:
    """torch.load with `weights_only=True` on CPU; errors name the file and never suggest unpickling."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # EOFError, UnpicklingError, RuntimeError (zip), …
        raise unreadable_torch_file(path, err) from None


def load_state(path: Path) -> dict[str, Any]:
    return load_torch(path)


def load_latest_checkpoint(folder: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
    """(step, tensors, training state) of the newest checkpoint that reads back whole, or None.

    A damaged newest checkpoint (a truncated file, a bad disk) is skipped with a warning in favour of
    the one before it, so `--resume` loses the steps since then, not the run.
    """
    for step in reversed(complete_checkpoints(folder)):
        weights, state_path = checkpoint_paths(folder, step)
        try:
            tensors, _, _ = load_weights(weights)
            state = load_state(state_path)
        except Exception as err:  # torch and safetensors raise many kinds of errors for damaged files
            warnings.warn(f"checkpoint {state_path} is damaged ({type(err).__name__}); resuming from an earlier one",
                          stacklevel=2)
            continue
        return step, tensors, state
    return None


def complete_checkpoints(folder: Path) -> list[int]:
    """Steps of the checkpoints whose weights and state are both on disk, oldest first."""
    if not folder.is_dir():
        return []
    steps = []
    for path in folder.iterdir():
        match = CHECKPOINT_PATTERN.search(path.name)
        if match and checkpoint_paths(folder, int(match.group(1)))[0].is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints."""
    for step in complete_checkpoints(folder)[:-keep]:
        for path in checkpoint_paths(folder, step):
            path.unlink(missing_ok=True)
