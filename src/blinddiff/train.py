"""Training MCFormer (docs/method.md §3, paper Eq. 13): one flat loop, from a laptop CPU to torchrun DDP clusters.

`train_step` is one optimisation step on the objective of `losses.training_losses` (the benchmarks call it
too); `train` is the loop around it: data, degradations, EMA, learning-rate schedule, logging and the
checkpoints of `checkpoint.save_training_state` / `restore_training_state`.

Every source of randomness is derived from (seed, step, rank) or (seed, epoch, index): the batch a
step sees does not depend on what ran before it, so `--resume` after any interruption (even `kill -9`)
continues bit-identically from the last checkpoint. Rank 0 logs and writes checkpoints; the others wait
at barriers around each save.
"""

from __future__ import annotations

import bisect
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from .checkpoint import complete_checkpoints, load_matching, load_weights, prefixed, resolve_weights, \
    restore_training_state, save_training_state, save_weights
from .config import Config, load_config, save_config
from .data import HRPatches, TrainingDegradation, derive_seed
from .diffusion import GaussianDiffusion
from .fileio import finite_or_null, remove_temporaries
from .hardware import autocast, resolve_precision, setup_runtime
from .kernels import fit_kernel_pca
from .losses import loss_settings, training_losses
from .model import MCFormer

__all__ = ["EMA", "LOGGED_LOSSES", "StepBatches", "TrainResult", "build_model", "init_weights", "lr_factor",
           "prepare_run", "train", "train_step"]


class StepBatches(Sampler):
    """Batches of (epoch, index) keys for one rank, from `start_step` on, forever.

    The global stream is a fresh permutation of the dataset per epoch (seeded by (seed, epoch)); step s
    of rank r takes positions [(s·world + r)·B, … + B) of that stream, so ranks never share a patch
    and the data position of a run is just its step.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 start_step: int = 0) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world, self.start_step = rank, world, start_step
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(derive_seed(self.seed, epoch)).permutation(self.size)}
        return self._perms[epoch]

    def batch(self, step: int) -> list[tuple[int, int]]:
        first = (step * self.world + self.rank) * self.batch_size
        keys = []
        for position in range(first, first + self.batch_size):
            epoch, offset = divmod(position, self.size)
            keys.append((epoch, int(self._permutation(epoch)[offset])))
        return keys

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


def build_model(cfg: Config) -> MCFormer:
    """The network of a config; a PCA kernel head gets its basis fitted on the training kernel sampler."""
    model = MCFormer(cfg.model)
    if cfg.model.kernel_head == "pca":
        pca = fit_kernel_pca(cfg.data.setting, size=cfg.model.kernel_size, code_length=cfg.model.pca_code_length,
                             seed=cfg.train.seed)
        model.set_kernel_basis(pca.mean, pca.components)
    return model


class EMA:
    """Exponential moving average of the (unwrapped) model's parameters (docs/method.md §3: decay 0.999).

    The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates n, so short runs do not
    export weights that are still mostly the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        ema = list(self.model.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1.0 - decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warm-up, then ×gamma at every milestone passed (docs/method.md §3: halve every 100 k iterations)."""
    warm = min(1.0, (step + 1) / cfg.train.warmup_steps) if cfg.train.warmup_steps else 1.0
    return warm * cfg.train.lr_gamma ** bisect.bisect_right(cfg.train.lr_milestones, step)


class Logger:
    """Rank-0 logging to stdout, `RUN/log.jsonl` and TensorBoard (when installed)."""

    def __init__(self, run: Path, enabled: bool) -> None:
        self.enabled, self.path, self.board = enabled, run / "log.jsonl", None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.board = SummaryWriter(str(run / "tensorboard"))
            except ImportError:
                pass

    def log(self, record: dict, quiet: bool = False) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(finite_or_null(record)[0], allow_nan=False) + "\n")  # a NaN loss: null
        if self.board is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.board.add_scalar(key, value, record["step"])
        if not quiet:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                  flush=True)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def prepare_run(run: Path, config: str | None, overrides: list[str], resume: bool) -> Config:
    """Resolve the config of a run folder: a new run writes it, a resumed run reads it back (plus overrides)."""
    saved = run / "config.yaml"
    if run.exists() and not run.is_dir():
        raise FileExistsError(f"--out {run} is a file, not a run folder; choose another --out")
    if resume and saved.is_file():
        return load_config(str(saved), overrides)
    if config is None:
        raise ValueError(f"no --config given and {saved} does not exist; pass --config PRESET_OR_FILE")
    if complete_checkpoints(run / "checkpoints") and not resume:
        raise FileExistsError(f"run folder {run} already has checkpoints; pass --resume to continue it "
                              f"or choose another --out")
    earlier = [name for name in ("config.yaml", "log.jsonl") if (run / name).exists()]
    if earlier and not resume:  # another run's files: never overwritten or appended to
        raise FileExistsError(f"run folder {run} already holds {' and '.join(earlier)} of another run; pass --resume "
                              f"to continue it or choose another --out")
    return load_config(config, overrides)


def init_weights(name_or_path: str) -> Path:
    """The file `train.init_from` names: a shipped model (as `upscale --weights`) or a weights path."""
    try:
        return resolve_weights(name_or_path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"train.init_from: {err}") from None


LOGGED_LOSSES = ("loss", "mse", "vb", "kernel", "perceptual")  # the terms of training_losses in the log
NONFINITE_LIMIT = 5  # losses in a row that are NaN/inf before a run counts as diverged


def train_step(model: nn.Module, schedule: GaussianDiffusion, batch: tuple[Tensor, Tensor, Tensor | None],
               optimizer: torch.optim.Optimizer, *, generator: torch.Generator | None = None,
               precision: str = "fp32", grad_clip: float = 0.0, skip_above: float = math.inf,
               perceptual: Callable[[Tensor, Tensor], Tensor] | None = None, **loss_options: Any) -> dict[str, Any]:
    """One optimisation step on paper Eq. (13) (docs/method.md §3; paper Algorithm 1).

    `batch` is (hr, lr, kernel) from the degradation; `losses.training_losses` draws t and ε from `generator`
    and runs `model` (unwrapped, DDP or compiled) under `precision`'s autocast; `loss_options` are its loss
    weights (`losses.loss_settings(cfg.diffusion)`). After the backward pass the batch means of the terms are
    averaged over the DDP ranks, so every rank takes the same decision: a mean loss that is not finite or
    above `skip_above` skips the update (gradients dropped), otherwise the gradients are clipped to norm
    `grad_clip` (when > 0) and the optimizer steps. Returns the mean of each of `LOGGED_LOSSES`, "grad_norm"
    (before clipping; 0 without clipping or when skipped) and "skipped".
    """
    hr, lr, kernel = batch
    with autocast(precision, hr.device):
        losses = training_losses(schedule, model, hr, lr, kernel, generator=generator, perceptual=perceptual,
                                 **loss_options)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].mean().backward()
    summary = torch.stack([losses[k].detach().mean() for k in LOGGED_LOSSES])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(summary)
        summary /= dist.get_world_size()
    result: dict[str, Any] = dict(zip(LOGGED_LOSSES, summary.tolist()))
    skipped = not math.isfinite(result["loss"]) or result["loss"] > skip_above
    grad_norm = 0.0
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        if grad_clip > 0:
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
        optimizer.step()
    return {**result, "grad_norm": grad_norm, "skipped": skipped}


@dataclass
class TrainResult:
    model: MCFormer  # this rank's trained (unwrapped) network
    ema: MCFormer
    metrics: dict  # the last logged record
    finished: bool  # False when max_seconds stopped the run early (resume it to continue)


def train(cfg: Config, run: str | Path, resume: bool = False, progress: bool = True,
          max_seconds: float | None = None) -> TrainResult:
    """Train `cfg` into the run folder (module docstring); every rank returns its own result.

    `max_seconds` time-boxes this call: once that much wall time has passed, the current step is
    checkpointed and the run stops unfinished, to be continued with ``resume=True`` (GPU leases, job
    schedulers, spot machines).
    """
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds={max_seconds!r}: must be a positive number of seconds")
    started = time.perf_counter()
    runtime = setup_runtime(cfg.train.device)
    run = Path(run)
    ckpt_dir = run / "checkpoints"
    device, tc = runtime.device, cfg.train
    precision = resolve_precision(tc.precision, device)
    if precision == "fp16":
        raise ValueError("train.precision fp16 is not supported for training (no loss scaling); use bf16 or fp32")

    torch.manual_seed(derive_seed(tc.seed))  # the same initial weights on every rank
    model = build_model(cfg).to(device)
    if tc.init_from:
        tensors, _, _ = load_weights(init_weights(tc.init_from))
        load_matching(model, prefixed(tensors, "ema.") or tensors, f"train.init_from {tc.init_from}", cfg.name)
    ema = EMA(model, tc.ema_decay)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=tc.adam_betas, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    start, loss_avg, skipped = 0, math.nan, 0
    if resume and runtime.main:
        remove_temporaries(run)  # left by a kill -9 during a write
        remove_temporaries(ckpt_dir)
    runtime.barrier()
    restored = restore_training_state(ckpt_dir, cfg, model, ema.model, optimizer, scheduler) if resume else None
    if restored is not None:
        start, counters = restored
        loss_avg, skipped = counters["loss_avg"], counters["skipped"]
    elif resume and runtime.main:
        print(f"no checkpoint in {ckpt_dir}: starting from step 0", flush=True)
    schedule = GaussianDiffusion.from_config(cfg.diffusion)
    perceptual = None
    if cfg.diffusion.perceptual_loss_weight > 0:  # frozen LPIPS (the installed weights), a loss on x̂0
        from .metrics.perceptual import LPIPS

        perceptual = LPIPS.pretrained(cfg.diffusion.perceptual_loss_net).to(device)
    degradation = TrainingDegradation.from_config(cfg.data)
    dataset = HRPatches(cfg.data.root, cfg.data.crop, skip_bad=cfg.data.skip_bad, cache=cfg.data.cache,
                        seed=tc.seed)
    if runtime.main:  # only now that the network, the checkpoint, the loss weights and the data are checked
        run.mkdir(parents=True, exist_ok=True)
        save_config(run / "config.yaml", cfg)

    wrapped: nn.Module = model
    if runtime.world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = torch.compile(wrapped) if tc.compile else wrapped

    batches = StepBatches(len(dataset), tc.batch_size, tc.seed, runtime.rank, runtime.world, start)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.data.workers,
                        persistent_workers=cfg.data.workers > 0, pin_memory=device.type == "cuda")
    logger = Logger(run, runtime.main)
    bar = None
    if runtime.main and progress:
        from tqdm import tqdm
        bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

    metrics: dict = {}
    bad_in_a_row = 0
    window = {**dict.fromkeys(LOGGED_LOSSES, 0.0), "n": 0}
    tic = time.perf_counter()
    model.train()
    data_iter = iter(loader)
    for step in range(start, tc.steps):
        hr = next(data_iter).to(device, non_blocking=True)
        generator = torch.Generator().manual_seed(derive_seed(tc.seed, step, runtime.rank, 1))
        with torch.no_grad():
            batch = degradation(hr, generator)
        settled = tc.spike_factor > 0 and step - start >= 20 and math.isfinite(loss_avg)  # a spike is measurable
        result = train_step(step_model, schedule, batch, optimizer, generator=generator, precision=precision,
                            grad_clip=tc.grad_clip, skip_above=tc.spike_factor * loss_avg if settled else math.inf,
                            perceptual=perceptual, **loss_settings(cfg.diffusion))
        value = result["loss"]
        bad_in_a_row = bad_in_a_row + 1 if not math.isfinite(value) else 0
        if bad_in_a_row >= NONFINITE_LIMIT:  # a diverged run does not recover: stop before exporting garbage
            raise FloatingPointError(f"training stopped at step {step + 1}: the loss was not finite for "
                                     f"{NONFINITE_LIMIT} steps in a row (train.lr={tc.lr:g}); lower train.lr or "
                                     f"check the data; the checkpoints in {ckpt_dir} are intact")
        if result["skipped"]:  # all ranks see the same reduced loss, so they skip together
            skipped += 1
            if runtime.main:
                logger.log({"step": step + 1, "skipped_loss": value, "skipped_total": skipped})
        else:
            ema.update(model, step)
            loss_avg = value if not math.isfinite(loss_avg) else 0.98 * loss_avg + 0.02 * value
            for key in LOGGED_LOSSES:
                window[key] += result[key]
            window["n"] += 1
            window["grad_norm"] = result["grad_norm"]
        scheduler.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.4f}")
        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            elapsed = time.perf_counter() - tic
            n = max(window["n"], 1)
            metrics = {"step": done, **{k: window[k] / n for k in LOGGED_LOSSES},
                       "grad_norm": window.get("grad_norm", 0.0), "lr": optimizer.param_groups[0]["lr"],
                       "patches_per_s": window["n"] * tc.batch_size * runtime.world / max(elapsed, 1e-9),
                       "skipped": skipped}
            logger.log(metrics, quiet=bar is not None)
            window = {**dict.fromkeys(LOGGED_LOSSES, 0.0), "n": 0}
            tic = time.perf_counter()
        out_of_time = max_seconds is not None and time.perf_counter() - started > max_seconds
        if max_seconds is not None and runtime.world > 1:  # every rank stops at the same step
            flag = torch.tensor([float(out_of_time)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        if done % tc.checkpoint_every == 0 or done == tc.steps or out_of_time:
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # the same on every rank
                raise FloatingPointError(f"training stopped at step {done}: the weights are no longer finite "
                                         f"(train.lr={tc.lr:g} is probably too high); nothing was saved, the "
                                         f"checkpoints in {ckpt_dir} are intact")
            runtime.barrier()
            if runtime.main:
                save_training_state(ckpt_dir, done, cfg, model, ema.model, optimizer, scheduler,
                                    keep=tc.keep_checkpoints, shard_bytes=int(tc.checkpoint_shard_mb * 2**20),
                                    loss_avg=loss_avg, skipped=skipped, world=runtime.world)
            runtime.barrier()
        if out_of_time:
            break
    if bar is not None:
        bar.close()
    finished = start >= tc.steps or done == tc.steps  # `done` exists only when the loop ran
    if runtime.main and not finished:
        print(f"time box of {max_seconds:g} s reached at step {done} of {tc.steps}; checkpoint saved, "
              f"continue with --resume", flush=True)
    if runtime.main and start < tc.steps and finished:
        if not all(bool(torch.isfinite(p).all()) for p in ema.model.parameters()):
            raise FloatingPointError(f"training ended with non-finite EMA weights; {run / 'weights.safetensors'} "
                                     f"was not written; lower train.lr")
        save_weights(run / "weights.safetensors", ema.model.state_dict(), cfg, step=tc.steps, kind="ema")
    logger.close()
    runtime.barrier()
    if runtime.world > 1:
        dist.destroy_process_group()
    return TrainResult(model, ema.model, metrics, finished)
