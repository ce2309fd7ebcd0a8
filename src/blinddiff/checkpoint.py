"""Weights and training state on disk (STYLE §6).

Weights are safetensors with the resolved run config in the metadata, so a weights file alone rebuilds
its network. A training checkpoint is a sharded set (safetensors shards of at most
``train.checkpoint_shard_mb`` each plus a JSON index, as large-model repositories ship weights) holding
the model, its EMA and the training state (optimizer, scheduler, RNG states) as tensors under a JSON
skeleton, so resuming never unpickles anything (`save_training_state` / `restore_training_state`). Every
write is atomic (temp file + rename), and a checkpoint counts as complete only once its index exists, which is
written last.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save as save_safetensors_bytes

from .config import Config, config_from_dict, config_to_dict
from .fileio import atomic_write, expand_path

__all__ = [
    "EXPORT_DTYPES", "FORMAT", "INDEX_SUFFIX", "MAX_WEIGHTS_BYTES", "WEIGHTS_DIR", "check_state_fits",
    "checkpoint_index", "complete_checkpoints", "export_weights", "load_latest_checkpoint", "load_matching",
    "load_sharded", "load_torch", "load_weights", "prefixed", "prune_checkpoints", "resolve_weights",
    "restore_training_state", "rng_state", "safetensors_header", "sampling_defaults", "save_sharded",
    "save_training_state", "save_weights", "set_rng_state", "sha256_of", "sharded_files", "shipped_weights",
    "unreadable_torch_file",
]

FORMAT = "blinddiff-weights-1"
CHECKPOINT_PATTERN = re.compile(r"step_(\d{8})\.index\.json")
WEIGHTS_DIR = Path(__file__).parent / "weights"  # shipped weights and their registry


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], cfg: Config, **metadata: Any) -> None:
    """Write tensors (made contiguous, on CPU) with the config and extra metadata, atomically."""
    meta = {"format": FORMAT, "config": json.dumps(config_to_dict(cfg), sort_keys=True),
            **{key: json.dumps(value) for key, value in metadata.items()}}
    data = save_safetensors_bytes({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=meta)
    with atomic_write(path) as handle:
        handle.write(data)


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Config, dict[str, Any]]:
    """Read a weights file, or a sharded set by its ``.index.json``: (tensors, config, other metadata).
    Errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.name.endswith(INDEX_SUFFIX):
        tensors, cfg, metadata, _ = load_sharded(path)
        return tensors, cfg, metadata
    try:
        header = safetensors_header(path)
    except OSError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"{path} has no blinddiff config in its metadata; it was not written by blinddiff")
    try:
        config = json.loads(meta["config"])
        extra = {key: json.loads(value) for key, value in meta.items() if key not in ("format", "config")}
        if not isinstance(config, dict):
            raise ValueError(f"the config is a {type(config).__name__}, not a mapping of settings")
        cfg = config_from_dict(config)
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError; a value that is not text: TypeError
        raise ValueError(f"{path}: its metadata hold no usable blinddiff config ({err}); the file is damaged or "
                         f"was not written by blinddiff") from None
    try:
        tensors = load_safetensors_file(path)  # only now that the header is checked; no whole-file read
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    return tensors, cfg, extra


MAX_WEIGHTS_BYTES = 2 * 2**30  # 10× the paper's network (26.5 M parameters) with its EMA in fp32
MAX_HEADER_BYTES = 100 * 2**20  # the limit of the safetensors library itself


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size before any tensor is read.

    A file larger than `MAX_WEIGHTS_BYTES`, a header size field past the file or the header limit, a
    header that is not a JSON mapping, or tensors that do not end exactly where the file ends (truncated,
    padded) raise ValueError naming the file.
    """
    size = path.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise ValueError(f"{path} is {size / 2**30:.1f} GiB, more than the {MAX_WEIGHTS_BYTES / 2**30:.0f} GiB any "
                         f"blinddiff weights file needs (the paper's network with its EMA: 0.2 GiB); it is not "
                         f"blinddiff weights: pass the weights.safetensors a training run wrote")
    problem = None
    with open(path, "rb") as handle:
        field = handle.read(8)
        header_size = int.from_bytes(field, "little")
        if len(field) < 8 or not 2 <= header_size <= min(size - 8, MAX_HEADER_BYTES):
            problem = f"its header size field says {header_size:,} bytes in a file of {size:,} bytes"
        else:
            try:
                header = json.loads(handle.read(header_size))
            except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                problem = f"its header is not JSON ({err})"
    if problem is None and not isinstance(header, dict):
        problem = f"its header is a JSON {type(header).__name__}, not a mapping of tensors"
    if problem is None:
        try:
            end = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                      default=0)
            if 8 + header_size + end != size:
                problem = f"its header describes {8 + header_size + end:,} bytes but the file holds {size:,}"
        except (TypeError, KeyError, IndexError, ValueError):
            problem = "its header does not describe tensors (no data_offsets)"
    if problem is not None:
        raise ValueError(f"{path} is not a readable safetensors file ({problem}): it is truncated, damaged or of "
                         f"another format; replace it with an intact copy")
    return header


EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_weights(source: str | Path, out: str | Path, dtype: str = "fp32") -> int:
    """Write the EMA weights (the plain weights when there is no EMA) of shipped weights (by name), a weights
    file or a checkpoint's ``.index.json`` as one safetensors file with its config, floating tensors cast to
    `dtype` (fp16 halves the size for shipping; loading casts back to fp32). Returns the size in bytes."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is unknown; use one of {', '.join(EXPORT_DTYPES)}")
    tensors, cfg, metadata = load_weights(resolve_weights(source))
    weights = prefixed(tensors, "ema.") or {k: v for k, v in tensors.items() if not k.startswith("model.")}
    if not weights:
        raise ValueError(f"{source} holds no network weights")
    cast = {k: v.to(EXPORT_DTYPES[dtype]) if v.is_floating_point() else v for k, v in weights.items()}
    save_weights(out, cast, cfg, **{k: v for k, v in metadata.items() if k == "step"}, kind="ema", source=str(source))
    return Path(out).stat().st_size


def shipped_weights() -> dict[str, dict]:
    """Name → {"file", "sha256"} of the weights that ship inside the package (`weights/registry.json`)."""
    registry = WEIGHTS_DIR / "registry.json"
    return json.loads(registry.read_text()) if registry.is_file() else {}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sampling_defaults(name_or_path: str | Path) -> dict[str, dict[str, Any]]:
    """Mode → the sampling options tuned for a shipped model (its registry entry's "sampling"); {} for a file,
    which then samples with the project's defaults (`inference.MODES`)."""
    entry = shipped_weights().get(name_or_path) if isinstance(name_or_path, str) else None
    return {mode: dict(values) for mode, values in (entry or {}).get("sampling", {}).items()}


def resolve_weights(name_or_path: str | Path) -> Path:
    """The file of shipped weights (checked against its recorded sha256) or a weights file path.

    A shipped name always means the shipped weights, whatever lies in the working directory; a local
    file of the same name is reached with a path (`./fast-x4`).
    """
    shipped = shipped_weights()
    if isinstance(name_or_path, str) and name_or_path in shipped:
        entry = shipped[name_or_path]
        file = WEIGHTS_DIR / entry["file"]
        if not file.is_file():
            raise FileNotFoundError(f"shipped weights {name_or_path!r} ({file}) are missing from the installation; "
                                    f"reinstall blinddiff or give the path of a weights file")
        if sha256_of(file) != entry["sha256"]:
            raise ValueError(f"shipped weights {file} fail their sha256 check (corrupt or replaced); reinstall blinddiff")
        return file
    path = expand_path(name_or_path)
    if path.is_file():
        return path
    names = ", ".join(sorted(shipped)) or "none in this installation"
    raise FileNotFoundError(f"weights {name_or_path} not found: give a .safetensors file or a shipped name ({names})")


def check_state_fits(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str,
                     config_name: str) -> None:
    """Refuse a state dict whose names or shapes differ from the network's, in one line naming the source."""
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    mismatched = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        details = "; ".join(f"{label}: {', '.join(sorted(keys)[:4])}{' …' if len(keys) > 4 else ''}"
                            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                ("wrong shape", mismatched)) if keys)
        raise ValueError(f"{where} does not fit the network of config {config_name!r} ({details}); the model "
                         f"settings must be the ones it was trained with")


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], where: str, config_name: str) -> None:
    """load_state_dict after `check_state_fits` (one line naming the source, not a page of mismatches)."""
    check_state_fits(state, model.state_dict(), where, config_name)
    model.load_state_dict(state)


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Select and strip one prefix (e.g. 'ema.') from a flat tensor dict."""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


# --------------------------------------------------------------------------- sharded files
#
# Large-model repositories split weights into safetensors shards plus a JSON index that maps every
# tensor to its shard (``model.safetensors.index.json``). Training checkpoints use the same layout so
# that no file exceeds a size limit (e.g. 16 MiB per file to leave a time-boxed GPU machine) and so that
# no pickle is ever read back: the optimizer/scheduler/RNG state is stored as tensors plus a JSON skeleton.

INDEX_SUFFIX = ".index.json"


def _flatten_state(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of a nested state (dicts with int/str keys, lists, tuples, numbers, strings, None,
    tensors); tensors go into `tensors` under their path and are referenced from the skeleton."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree
        return {"tensor": prefix}
    if isinstance(tree, dict):
        return {"dict": [[key, _flatten_state(value, f"{prefix}.{key}", tensors)] for key, value in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return {"list": [_flatten_state(value, f"{prefix}.{i}", tensors) for i, value in enumerate(tree)]}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return {"value": tree}
    raise TypeError(f"cannot store a {type(tree).__name__} at {prefix} in a checkpoint")


def _unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    (kind, content), = skeleton.items()
    if kind == "tensor":
        return tensors[content]
    if kind == "dict":
        return {key: _unflatten_state(value, tensors) for key, value in content}
    if kind == "list":
        return [_unflatten_state(value, tensors) for value in content]
    return content


def save_sharded(index: str | Path, tensors: dict[str, torch.Tensor], cfg: Config, *, shard_bytes: int,
                 state: Any = None, **metadata: Any) -> None:
    """Write tensors as ``<stem>-0000i-of-0000n.safetensors`` shards of at most `shard_bytes` each (a larger
    single tensor gets a shard of its own) and the index ``<stem>.index.json`` last, so a complete index
    means a complete set. `state` (optimizer, RNG, …) is stored too, as tensors plus a JSON skeleton."""
    index = Path(index)
    if not index.name.endswith(INDEX_SUFFIX):
        raise ValueError(f"{index}: a sharded file set is named by its index, <stem>{INDEX_SUFFIX}")
    stem = index.name[: -len(INDEX_SUFFIX)]
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    skeleton = _flatten_state(state, "state", tensors) if state is not None else None
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with atomic_write(index.parent / name) as handle:
            handle.write(save_safetensors_bytes(shard, metadata={"format": FORMAT}))
        weight_map.update({key: name for key in shard})
    record = {"format": FORMAT, "config": config_to_dict(cfg), "metadata": metadata, "state": skeleton,
              "weight_map": weight_map}
    with atomic_write(index, "w") as handle:
        json.dump(record, handle)


def sharded_files(index: Path) -> list[Path]:
    """The shard files an index names (for deleting a set); empty when the index is unreadable."""
    try:
        return sorted({index.parent / name for name in json.loads(index.read_text())["weight_map"].values()})
    except (OSError, ValueError, KeyError, TypeError):
        return []


def load_sharded(index: str | Path) -> tuple[dict[str, torch.Tensor], Config, dict[str, Any], Any]:
    """Read a sharded set: (tensors, config, metadata, state). Errors name the file and the fix."""
    index = Path(index)
    try:
        record = json.loads(index.read_text())
        cfg = config_from_dict(record["config"])
        tensors: dict[str, torch.Tensor] = {}
        for name in sorted(set(record["weight_map"].values())):
            if Path(name).name != name:
                raise ValueError(f"shard name {name!r} is not a plain file name")
            shard = index.parent / name
            safetensors_header(shard)
            tensors.update(load_safetensors_file(shard))
        if set(tensors) != set(record["weight_map"]):
            raise ValueError("the shards do not hold the tensors the index names")
        state_tensors = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith("state.")]}
        state = _unflatten_state(record["state"], state_tensors) if record["state"] is not None else None
        return tensors, cfg, record.get("metadata", {}), state
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as err:
        raise ValueError(f"{index} is not a complete blinddiff sharded file set ({type(err).__name__}: {err}); "
                         f"use an earlier checkpoint or the original files") from None


# --------------------------------------------------------------------------- training checkpoints


def checkpoint_index(folder: Path, step: int) -> Path:
    """The index file of the checkpoint at `step` (its shards sit beside it)."""
    return folder / f"step_{step:08d}{INDEX_SUFFIX}"


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


def load_latest_checkpoint(folder: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
    """(step, tensors, training state) of the newest checkpoint that reads back whole, or None.

    A damaged newest checkpoint (a truncated file, a bad disk) is skipped with a warning in favour of
    the one before it, so `--resume` loses the steps since then, not the run.
    """
    for step in reversed(complete_checkpoints(folder)):
        try:
            tensors, _, _, state = load_sharded(checkpoint_index(folder, step))
        except ValueError as err:
            warnings.warn(f"{err}; resuming from an earlier checkpoint", stacklevel=2)
            continue
        return step, tensors, state
    return None


def complete_checkpoints(folder: Path) -> list[int]:
    """Steps of the checkpoints whose index is on disk (written after their shards), oldest first."""
    if not folder.is_dir():
        return []
    return sorted(int(match.group(1)) for path in folder.iterdir()
                  if (match := CHECKPOINT_PATTERN.fullmatch(path.name)))


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (the index first, so none is left half-complete)."""
    for step in complete_checkpoints(folder)[:-keep]:
        index = checkpoint_index(folder, step)
        shards = sharded_files(index)
        index.unlink(missing_ok=True)
        for path in shards:
            path.unlink(missing_ok=True)


def rng_state() -> dict:
    """Every global RNG, in a form `torch.load(weights_only=True)` accepts."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(folder: Path, step: int, cfg: Config, model: nn.Module, ema: nn.Module,
                        optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, *,
                        keep: int, shard_bytes: int, **counters: Any) -> None:
    """Checkpoint `step` of a run into `folder`: the (unwrapped) model and its EMA as ``model.*`` / ``ema.*``
    tensors, the optimizer, the scheduler, every global RNG and `counters` (plain numbers such as the loss
    average), as one sharded set (`save_sharded`); then only the newest `keep` checkpoints are kept.
    `restore_training_state` reads it back so that the next step is bit-identical."""
    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
               **{f"ema.{k}": v for k, v in ema.state_dict().items()}}
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_state(), **counters}
    save_sharded(checkpoint_index(folder, step), tensors, cfg, state=state, step=step, shard_bytes=shard_bytes)
    prune_checkpoints(folder, keep)


def restore_training_state(folder: Path, cfg: Config, model: nn.Module, ema: nn.Module,
                           optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[int, dict[str, Any]] | None:
    """Load the newest readable checkpoint of `folder` (`load_latest_checkpoint`) into the model, its EMA, the
    optimizer, the scheduler and the global RNGs: (its step, the counters `save_training_state` was given), or
    None when there is none. Weights that do not fit the network of `cfg` raise ValueError naming the file."""
    latest = load_latest_checkpoint(folder)
    if latest is None:
        return None
    step, tensors, state = latest
    where = f"checkpoint {checkpoint_index(folder, step)} (the run's config plus --set)"
    load_matching(model, prefixed(tensors, "model."), where, cfg.name)
    load_matching(ema, prefixed(tensors, "ema."), where, cfg.name)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return step, {k: v for k, v in state.items() if k not in ("step", "optimizer", "scheduler", "rng")}
