"""Configs, the training loop, checkpoints, exact resume (also after kill -9) and 2-process DDP."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blinddiff.checkpoint import complete_checkpoints, load_sharded, load_weights, prefixed, restore_training_state, \
    save_sharded, save_training_state, save_weights
from blinddiff.cli import main
from blinddiff.config import config_from_dict, config_to_dict, load_config, preset_names
from blinddiff.diffusion import GaussianDiffusion
from blinddiff.losses import loss_settings, training_losses
from blinddiff.model import MCFormer, count_parameters
from blinddiff.train import EMA, StepBatches, build_model, lr_factor, train, train_step

REPO = Path(__file__).resolve().parents[1]


def tiny(hr_folder: Path, *overrides: str):
    return load_config("tiny", [f"data.root={hr_folder}", *overrides])


def test_presets_load_and_round_trip() -> None:
    assert {"paper-iso-x4", "paper-aniso-x4", "paper-ffhq-x4", "paper-deblur", "small-x4", "tiny"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert cfg.name == name
        assert config_from_dict(config_to_dict(cfg)) == cfg
    aniso = load_config("paper-aniso-x4")
    assert aniso.data.setting == "aniso" and aniso.model == load_config("paper-iso-x4").model
    assert aniso.train.init_from
    deblur = load_config("paper-deblur")
    assert deblur.data.scale == 1 and deblur.model.kernel_size == deblur.data.kernel_size == 64


def test_preset_sizes() -> None:
    """The paper's network has 26.5 M parameters (docs/method.md §2: the figure the paper gives, to 0.1 M);
    small-x4 was chosen under a 3 M budget (docs/benchmarks.md)."""
    assert round(count_parameters(MCFormer(load_config("paper-iso-x4").model)) / 1e6, 1) == 26.5
    assert count_parameters(MCFormer(load_config("small-x4").model)) <= 3_000_000


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train.lrr"):
        load_config("tiny", ["train.lrr=1"])
    with pytest.raises(ValueError, match="model.width"):
        load_config("tiny", ["model.width=wide"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config("tiny", ["train.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny\nmodel:\n  colour: red\n")
    with pytest.raises(ValueError, match="model.colour"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="preset"):
        load_config("no-such-preset")
    cfg = load_config("tiny", ["train.lr=2e-4", "model.blocks=[1,2,1,1]", "train.init_from=none"])
    assert cfg.train.lr == 2e-4 and cfg.model.blocks == (1, 2, 1, 1) and cfg.train.init_from is None


def test_step_batches_partition_the_stream() -> None:
    ranks = [StepBatches(10, 3, seed=1, rank=r, world=2) for r in range(2)]
    first_epoch = [key for step in range(2) for r in ranks for key in r.batch(step)][:10]
    assert sorted(index for epoch, index in first_epoch) == list(range(10))  # every image once per epoch
    assert StepBatches(10, 3, seed=1, rank=1, world=2, start_step=5).batch(5) == ranks[1].batch(5)


def test_lr_schedule_halves_at_milestones(hr_folder: Path) -> None:
    cfg = tiny(hr_folder, "train.lr_milestones=[10,20]", "train.warmup_steps=4")
    assert [lr_factor(s, cfg) for s in (0, 3, 9, 10, 19, 20)] == [0.25, 1.0, 1.0, 0.5, 0.5, 0.25]


def one_batch(cfg, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed (hr, lr, kernel) batch of two 16² images for the tiny network."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(2, 3, 16, 16, generator=g)
    kernel = torch.softmax(torch.randn(2, 11 * 11, generator=g), 1).view(2, 11, 11)
    return x0, torch.nn.functional.avg_pool2d(x0, 4), kernel


def batch_loss(model, schedule, batch, cfg, seed: int) -> float:
    """The mean Eq. (13) loss of `batch` at the t and ε that `seed` draws (what train_step sees with that seed)."""
    with torch.no_grad():
        return float(training_losses(schedule, model, *batch, generator=torch.Generator().manual_seed(seed),
                                     **loss_settings(cfg.diffusion))["loss"].mean())


def test_train_step_lowers_the_loss_on_its_batch_and_overfits_it() -> None:
    torch.manual_seed(0)
    cfg = load_config("tiny")
    model, schedule, batch = MCFormer(cfg.model), GaussianDiffusion.from_config(cfg.diffusion), one_batch(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    before = batch_loss(model, schedule, batch, cfg, seed=3)
    result = train_step(model, schedule, batch, optimizer, generator=torch.Generator().manual_seed(3),
                        **loss_settings(cfg.diffusion))
    assert result["loss"] == pytest.approx(before, rel=1e-5) and not result["skipped"]
    assert batch_loss(model, schedule, batch, cfg, seed=3) < before
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):  # the same t and ε every step: the network can overfit them
        train_step(model, schedule, batch, optimizer, generator=torch.Generator().manual_seed(3), grad_clip=1.0,
                   **loss_settings(cfg.diffusion))
    assert batch_loss(model, schedule, batch, cfg, seed=3) < before / 10


def test_train_step_above_the_spike_threshold_changes_nothing() -> None:
    torch.manual_seed(0)
    cfg = load_config("tiny")
    model, schedule = MCFormer(cfg.model), GaussianDiffusion.from_config(cfg.diffusion)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_step(model, schedule, one_batch(cfg), optimizer, generator=torch.Generator().manual_seed(0),
                        skip_above=0.0, **loss_settings(cfg.diffusion))
    assert result["skipped"] and result["loss"] > 0
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not optimizer.state


def test_restore_after_save_gives_a_bit_identical_next_step(tmp_path: Path) -> None:
    """save_training_state → restore_training_state into freshly built objects (other weights, other global RNG
    state): the next step gives the same losses and bit-identical weights, EMA and optimizer state."""
    cfg = load_config("tiny")

    def fresh(seed: int):
        torch.manual_seed(seed)
        model = build_model(cfg)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
        return model, EMA(model, 0.999), optimizer, scheduler

    def step(objects, index: int) -> dict:
        model, ema, optimizer, scheduler = objects
        result = train_step(model, schedule, one_batch(cfg, seed=index), optimizer,
                            generator=torch.Generator().manual_seed(index), grad_clip=1.0, **loss_settings(cfg.diffusion))
        ema.update(model, index)
        scheduler.step()
        return result

    schedule = GaussianDiffusion.from_config(cfg.diffusion)
    first = fresh(0)
    step(first, 0)
    save_training_state(tmp_path, 1, cfg, first[0], first[1].model, first[2], first[3], keep=2, shard_bytes=2**20,
                        loss_avg=0.5, skipped=3)
    expected, after = step(first, 1), torch.rand(3)
    second = fresh(1)  # reseeds the global RNG too: restoring must bring it back
    assert restore_training_state(tmp_path, cfg, second[0], second[1].model, second[2], second[3]) == \
        (1, {"loss_avg": 0.5, "skipped": 3})
    assert step(second, 1) == expected
    assert torch.equal(torch.rand(3), after)
    for a, b in ((first[0], second[0]), (first[1].model, second[1].model)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    for state_a, state_b in zip(first[2].state.values(), second[2].state.values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert restore_training_state(tmp_path / "empty", cfg, second[0], second[1].model, second[2], second[3]) is None


def weights_of(run: Path) -> dict[str, torch.Tensor]:
    return load_weights(run / "weights.safetensors")[0]


def test_train_run_folder_and_exact_resume(hr_folder: Path, tmp_path: Path) -> None:
    cfg = tiny(hr_folder, "train.steps=6", "train.checkpoint_every=3", "train.log_every=3")
    straight = train(cfg, tmp_path / "straight", progress=False)
    assert (tmp_path / "straight" / "config.yaml").is_file()
    assert load_config(str(tmp_path / "straight" / "config.yaml")) == cfg
    assert len((tmp_path / "straight" / "log.jsonl").read_text().splitlines()) == 2
    assert complete_checkpoints(tmp_path / "straight" / "checkpoints") == [3, 6]
    _, _, _, state = load_sharded(tmp_path / "straight" / "checkpoints" / "step_00000006.index.json")
    assert state["step"] == 6 and "optimizer" in state and "rng" in state
    for key, value in straight.metrics.items():
        assert math.isfinite(value), key  # neither NaN nor infinite

    half = tiny(hr_folder, "train.steps=3", "train.checkpoint_every=3", "train.log_every=3")
    train(half, tmp_path / "resumed", progress=False)
    assert main(["train", "--out", str(tmp_path / "resumed"), "--resume", "--set", "train.steps=6",
                 "--no-progress"]) == 0
    a, b = weights_of(tmp_path / "straight"), weights_of(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = "checkpoints/step_00000006.index.json"  # a checkpoint loads like a weights file
    a, b = load_weights(tmp_path / "straight" / ckpt)[0], load_weights(tmp_path / "resumed" / ckpt)[0]
    assert all(torch.equal(a[k], b[k]) for k in a) and prefixed(a, "model.") and prefixed(a, "ema.")


def test_existing_run_needs_resume(hr_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tiny(hr_folder, "train.steps=2", "train.checkpoint_every=2")
    train(cfg, tmp_path / "run", progress=False)
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "run"), "--set", f"data.root={hr_folder}"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_safetensors_round_trip_is_exact(tmp_path: Path) -> None:
    cfg = load_config("tiny")
    model = MCFormer(cfg.model)
    save_weights(tmp_path / "w.safetensors", model.state_dict(), cfg, step=7)
    tensors, loaded_cfg, meta = load_weights(tmp_path / "w.safetensors")
    assert loaded_cfg == cfg and meta == {"step": 7}
    assert all(torch.equal(tensors[k], v) for k, v in model.state_dict().items())
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_weights(tmp_path / "junk.safetensors")


def cli_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


@pytest.mark.slow
def test_resume_after_kill_9(hr_folder: Path, tmp_path: Path) -> None:
    args = [sys.executable, "-m", "blinddiff.cli", "train", "--config", "tiny", "--no-progress",
            "--set", f"data.root={hr_folder}", "--set", "train.steps=8", "--set", "train.checkpoint_every=1",
            "--set", "train.keep_checkpoints=8"]
    run = tmp_path / "killed"
    process = subprocess.Popen([*args, "--out", str(run)], env=cli_env(), stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(complete_checkpoints(run / "checkpoints")) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run / "weights.safetensors").exists()
    subprocess.run([*args, "--out", str(run), "--resume"], env=cli_env(), check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*args, "--out", str(tmp_path / "straight")], env=cli_env(), check=True, stdout=subprocess.DEVNULL)
    a, b = weights_of(run), weights_of(tmp_path / "straight")
    assert all(torch.equal(a[k], b[k]) for k in a)


DDP_SCRIPT = """
import os, sys
from blinddiff.config import load_config
from blinddiff.train import train
from safetensors.torch import save_file
cfg = load_config("tiny", [f"data.root={sys.argv[1]}", "train.steps=4", "train.checkpoint_every=2"])
result = train(cfg, sys.argv[2], progress=False)
rank = os.environ["RANK"]
save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, f"{sys.argv[2]}/rank{rank}.safetensors")
"""


@pytest.mark.slow
def test_two_process_gloo_ddp(hr_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    run = tmp_path / "ddp"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), str(hr_folder), str(run)], env=cli_env(), check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    rank0, rank1 = load_file(run / "rank0.safetensors"), load_file(run / "rank1.safetensors")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert complete_checkpoints(run / "checkpoints") == [2, 4] and (run / "weights.safetensors").is_file()
    halfway = prefixed(load_weights(run / "checkpoints" / "step_00000002.index.json")[0], "model.")
    assert any(not torch.equal(rank0[k], v) for k, v in halfway.items())  # it kept training after step 2


def test_sharded_set_round_trips_tensors_and_state_within_the_size_limit(tmp_path: Path) -> None:
    cfg = load_config("tiny")
    tensors = {f"t{i}": torch.randn(1000) for i in range(10)}  # 4000 bytes each
    state = {"step": 7, "loss": float("nan"), "groups": [{"betas": (0.9, 0.99), "params": [0, 1]}],
             "by_param": {0: {"exp_avg": torch.ones(3)}, 1: {"exp_avg": torch.zeros(2)}}, "name": None}
    index = tmp_path / "ckpt.index.json"
    save_sharded(index, tensors, cfg, shard_bytes=9000, state=state, step=7)
    shards = sorted(tmp_path.glob("ckpt-*.safetensors"))
    assert len(shards) == 5 and all(path.stat().st_size <= 9000 + 1024 for path in shards)  # + header
    loaded, loaded_cfg, meta, back = load_sharded(index)
    assert loaded_cfg == cfg and meta == {"step": 7} and loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert back["step"] == 7 and back["loss"] != back["loss"] and back["name"] is None
    assert back["groups"][0]["betas"] == [0.9, 0.99] and set(back["by_param"]) == {0, 1}  # int keys survive
    assert torch.equal(back["by_param"][0]["exp_avg"], torch.ones(3))
    shards[2].unlink()
    with pytest.raises(ValueError, match="ckpt.index.json"):
        load_sharded(index)


def test_time_boxed_chunks_resume_to_the_same_weights(hr_folder: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    args = ["--set", f"data.root={hr_folder}", "--set", "train.steps=4", "--set", "train.checkpoint_every=100",
            "--set", "train.checkpoint_shard_mb=0.01", "--no-progress"]
    assert main(["train", "--config", "tiny", "--out", str(straight), *args]) == 0
    chunked = tmp_path / "chunked"
    chunk = ["train", "--config", "tiny", "--out", str(chunked), "--resume", "--max-minutes", "1e-6", *args]
    codes = [main(chunk) for _ in range(4)]
    assert codes == [75, 75, 75, 0]  # each call does one step, checkpoints it and stops
    a, b = weights_of(straight), weights_of(chunked)
    largest = max(v.numel() * v.element_size() for v in a.values())  # a tensor is never split
    shards = list((chunked / "checkpoints").glob("*.safetensors"))
    assert len(shards) > 3 and max(p.stat().st_size for p in shards) <= max(0.01 * 2**20, largest) + 4096
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_writes_the_ema_of_a_checkpoint_in_half_precision(hr_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny(hr_folder, "train.steps=2", "train.checkpoint_every=2"), run, progress=False)
    index = run / "checkpoints" / "step_00000002.index.json"
    assert main(["export", str(index), "--out", str(tmp_path / "w.safetensors"), "--dtype", "fp16"]) == 0
    exported, cfg, meta = load_weights(tmp_path / "w.safetensors")
    ema = prefixed(load_weights(index)[0], "ema.")
    assert exported.keys() == ema.keys() and meta["step"] == 2 and cfg == load_config(str(run / "config.yaml"))
    assert all(v.dtype == torch.float16 and torch.allclose(v.float(), ema[k], rtol=1e-3, atol=1e-4)
               for k, v in exported.items() if ema[k].is_floating_point())
    assert main(["export", str(index), "--out", str(index)]) == 2


def test_export_takes_a_shipped_name(tmp_path: Path) -> None:
    from blinddiff.checkpoint import resolve_weights

    assert main(["export", "fast-x4", "--out", str(tmp_path / "f.safetensors")]) == 0
    exported, cfg, _ = load_weights(tmp_path / "f.safetensors")
    shipped, shipped_cfg, _ = load_weights(resolve_weights("fast-x4"))
    assert cfg == shipped_cfg and exported.keys() == shipped.keys()
    assert all(v.dtype == torch.float32 and torch.equal(v, shipped[k].float()) for k, v in exported.items())


def test_setting_presets_on_the_fast_recipe() -> None:
    fast = load_config("fast-x4")
    aniso = load_config("aniso-x4")
    assert aniso.model == fast.model and aniso.diffusion == fast.diffusion  # init_from needs the same network
    assert (aniso.data.setting, aniso.data.scale, aniso.data.kernel_size, aniso.data.downsample) == \
        ("aniso", 4, 21, "bicubic")
    assert aniso.train.init_from in shipped_or_default_names()
    deblur = load_config("deblur-motion")
    assert (deblur.data.setting, deblur.data.scale, deblur.data.noise) == ("motion", 1, 0.02)
    assert deblur.model.kernel_size == deblur.data.kernel_size == 64
    assert deblur.data.crop >= 128 and deblur.data.crop % deblur.model.size_multiple == 0
    assert deblur.model.patch_size == fast.model.patch_size and deblur.diffusion.prediction == "x0"
    assert deblur.train.init_from is None  # 64×64 kernel head: nothing to start from
    model = MCFormer(deblur.model)  # the 64×64 kernel estimator and embedding fit a 128² crop
    x = torch.rand(1, 3, deblur.data.crop, deblur.data.crop)
    with torch.no_grad():
        out, kernel = model(x, torch.tensor([10]), x)
    assert out.shape == x.shape and kernel.shape == (1, 64, 64)
    assert torch.allclose(kernel.sum(dim=(1, 2)), torch.ones(1), atol=1e-5)


def shipped_or_default_names() -> set[str]:
    """The weights a preset may start from: a shipped name, or the recipe's name before its weights ship."""
    from blinddiff.checkpoint import shipped_weights

    return set(shipped_weights()) | {"fast-x4"}


def test_init_from_takes_a_shipped_name_or_a_path(tmp_path: Path, weights: Path) -> None:
    from blinddiff.checkpoint import WEIGHTS_DIR, shipped_weights
    from blinddiff.train import init_weights

    name = next(iter(shipped_weights()))
    assert init_weights(name) == WEIGHTS_DIR / shipped_weights()[name]["file"]  # as `upscale --weights NAME`
    assert init_weights(str(weights)) == weights
    with pytest.raises(FileNotFoundError, match="train.init_from: weights no-such-model not found"):
        init_weights("no-such-model")
