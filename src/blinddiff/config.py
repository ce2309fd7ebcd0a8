"""Run configuration: nested dataclasses loaded from YAML presets (docs/method.md §2–§3 give the paper's values).

`load_config("paper-iso-x4", ["train.lr=1e-4"])` reads a preset shipped in `blinddiff/configs/` (or any
YAML file), applies `--set` style overrides and checks everything: unknown keys and ill-typed values
are errors naming the key. `config_to_dict` / `config_from_dict` round-trip exactly, which is how the
resolved config travels into run folders and into the weights' metadata.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import yaml

from .data import DataConfig
from .diffusion import DiffusionConfig
from .hardware import PRECISIONS
from .model import MCFormerConfig

__all__ = ["Config", "TrainConfig", "apply_override", "config_from_dict", "config_to_dict", "load_config",
           "preset_names", "save_config"]


@dataclass
class TrainConfig:
    """Optimisation (docs/method.md §3): Adam β (0.9, 0.99), lr halved at milestones, EMA 0.999."""

    batch_size: int = 8  # per process
    steps: int = 500_000
    lr: float = 5e-5
    adam_betas: tuple[float, float] = (0.9, 0.99)
    lr_milestones: tuple[int, ...] = (100_000, 200_000, 300_000, 400_000)
    lr_gamma: float = 0.5
    warmup_steps: int = 0
    ema_decay: float = 0.999
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    spike_factor: float = 10.0  # skip a step whose loss exceeds this × the running mean; 0 = off
    precision: str = "auto"  # auto = bf16 autocast where the hardware has it, else fp32
    compile: bool = False
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    checkpoint_shard_mb: float = 16.0  # largest checkpoint file (MiB); larger checkpoints are sharded
    init_from: str | None = None  # weights to start from (e.g. setting 2 from the setting-1 model)
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision {self.precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
        for name in ("batch_size", "steps", "log_every", "checkpoint_every", "keep_checkpoints"):
            _check_range(f"train.{name}", getattr(self, name), low=1)
        for name in ("warmup_steps", "grad_clip", "spike_factor", "seed"):
            _check_range(f"train.{name}", getattr(self, name), low=0)
        _check_range("train.lr", self.lr, low=0, open_low=True)
        _check_range("train.checkpoint_shard_mb", self.checkpoint_shard_mb, low=0, open_low=True)
        _check_range("train.lr_gamma", self.lr_gamma, low=0, high=1, open_low=True)
        _check_range("train.ema_decay", self.ema_decay, low=0, high=1)
        for beta in self.adam_betas:
            _check_range("train.adam_betas", beta, low=0, high=1, open_high=True)
        for milestone in self.lr_milestones:
            _check_range("train.lr_milestones", milestone, low=1)


def _check_range(key: str, value: float, *, low: float, high: float = math.inf, open_low: bool = False,
                 open_high: bool = False) -> None:
    """Raise naming `key` unless low ≤ value ≤ high (< where open); NaN never passes."""
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (above and below):
        bounds = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high or high == math.inf else ']'}"
        raise ValueError(f"{key} {value!r} is out of range; use a value in {bounds}")


@dataclass
class Config:
    """Everything a run needs; the YAML presets fill in what differs from these defaults."""

    name: str = "custom"
    model: MCFormerConfig = field(default_factory=MCFormerConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.model.kernel_size != self.data.kernel_size:
            raise ValueError(f"model.kernel_size {self.model.kernel_size} must equal data.kernel_size "
                             f"{self.data.kernel_size}: the network predicts the training kernels")
        if self.model.learned_variance != self.diffusion.learned_variance:
            raise ValueError("model.learned_variance and diffusion.learned_variance must agree")


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise naming the key."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{key}: cannot be None")
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping of settings, got {value!r}")
        return _from_dict(kind, value, key + ".")
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(args) != len(value):
            raise ValueError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{key}: expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        return number
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"{key}: unsupported config type {kind}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}; "
                         f"valid keys here: {', '.join(prefix + n for n in sorted(names))}")
    values = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**values)
    except ValueError as err:
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def config_from_dict(data: dict) -> Config:
    return _from_dict(Config, data)


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) that YAML/JSON can hold and `config_from_dict` reads back."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("blinddiff").joinpath("configs").iterdir()
                  if p.name.endswith(".yaml"))


def _read_yaml(source: str) -> dict:
    """A preset name (which wins over a file of the same name: a local file needs a path like ./tiny) or a
    YAML file → its mapping; errors name the file."""
    bare = "/" not in source and "\\" not in source and not source.endswith((".yaml", ".yml"))
    preset = resources.files("blinddiff").joinpath("configs", f"{source}.yaml")
    if bare and preset.is_file():
        text, where = preset.read_text(), f"preset {source}"
    else:
        path = Path(source)
        if bare and not path.exists():
            raise ValueError(f"config {source!r} is neither a file nor a preset; presets: {', '.join(preset_names())}")
        if not path.is_file():
            kind = "is a folder, not a YAML file" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"config {source} {kind}; give a YAML file or a preset "
                                    f"({', '.join(preset_names())})")
        text, where = path.read_text(), str(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config {where} is not valid YAML ({str(err).splitlines()[0]}…); fix the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {where}: the top level must be a mapping of settings")
    return data


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b=c` override to a nested dict (values parsed as YAML, typed later)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"override {assignment!r} must look like section.key=value, e.g. train.lr=1e-4")
    node = data
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {assignment!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(text) if text.strip() else ""


def load_config(source: str, overrides: Sequence[str] = (), _chain: tuple[str, ...] = ()) -> Config:
    """A preset name or YAML path, plus `a.b=c` overrides → a checked Config.

    A YAML file may say `base: <preset or file>` to start from another config (a loop is an error).
    """
    source = str(source)
    if source in _chain:
        raise ValueError(f"config {source}: its `base:` chain loops ({' → '.join(_chain + (source,))}); "
                         f"remove one of the base entries")
    data = _read_yaml(source)
    base = data.pop("base", None)
    name = data.pop("name", None) or (Path(source).stem if Path(source).suffix else source)
    if base is not None:
        merged = config_to_dict(load_config(str(base), (), _chain + (source,)))
        _merge(merged, data)
        data = merged
    data["name"] = name
    for assignment in overrides:
        apply_override(data, assignment)
    return config_from_dict(data)


def _merge(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def save_config(path: str | Path, cfg: Config) -> None:
    from .fileio import atomic_write

    with atomic_write(path, "w") as handle:
        yaml.safe_dump(config_to_dict(cfg), handle, sort_keys=False)
