"""The models that ship inside the package: registry, names, tuned sampling defaults, and their quality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blinddiff import BlindDiff, checkpoint
from blinddiff.cli import build_parser, main, sample_options_from
from blinddiff.degradation import degrade, upsample_bicubic
from blinddiff.inference import DEFAULT_DEBLUR_WEIGHTS, DEFAULT_WEIGHTS, SampleOptions
from blinddiff.kernels import isotropic_gaussian, motion_blur
from blinddiff.metrics import psnr
from blinddiff.model import MCFormer
from conftest import sample_rgb

# The setting each shipped name stands for (README "The paper's other settings") and its golden fidelity
# PSNR-Y on a fixed degraded crop of skimage's astronaut (`golden_case`): the value measured when the
# weights were shipped, minus 0.3 dB, so a broken weights file or a silent change in preprocessing fails.
SHIPPED = {"fast-x4": ("iso", 4, 29.0), "aniso-x4": ("aniso", 4, 28.8), "real-x4": ("real", 4, 28.3),
           "deblur-motion": ("motion", 1, 20.3)}


def test_the_registry_lists_exactly_the_shipped_models_and_checks_them() -> None:
    registry = checkpoint.shipped_weights()
    assert {DEFAULT_WEIGHTS, DEFAULT_DEBLUR_WEIGHTS} <= set(registry) and set(registry) == set(SHIPPED)
    for name in registry:
        path = checkpoint.resolve_weights(name)  # checks the recorded sha256
        assert path.parent == checkpoint.WEIGHTS_DIR and path.stat().st_size <= 10 * 1024 * 1024
        model = BlindDiff.from_pretrained(name, device="cpu")
        assert (model.cfg.data.setting, model.scale) == SHIPPED[name][:2]


def golden_case(scale: int, kernel_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lr, hr): ×4 — a 256² crop blurred by a σ 2 Gaussian, bicubic ↓4 (64² LR); ×1 — a 128² crop blurred by
    one seeded camera-shake kernel; 8-bit quantised like a saved image."""
    hr = torch.from_numpy(sample_rgb(288, 384)[32:, 128:]).permute(2, 0, 1)[None].float() / 255
    if scale == 1:
        hr = hr[..., 64:192, 64:192]
        kernel = motion_blur(1, kernel_size, 0.5, generator=torch.Generator().manual_seed(0))
    else:
        kernel = isotropic_gaussian(2.0, kernel_size)
    lr = degrade(hr, kernel, scale).clamp(0, 1)
    return (lr * 255).round() / 255, hr


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_each_shipped_model_keeps_its_golden_quality(name: str) -> None:
    model = BlindDiff.from_pretrained(name, device="cpu")
    lr, hr = golden_case(model.scale, model.cfg.model.kernel_size)
    sr, kernel = model.upscale(lr, mode="fidelity", seed=0)
    baseline = upsample_bicubic(lr, model.scale).clamp(0, 1) if model.scale > 1 else lr
    quality = float(psnr(sr, hr, crop=model.scale))
    assert quality >= SHIPPED[name][2], f"{name}: fidelity PSNR-Y {quality:.2f} dB fell below its golden value"
    assert quality >= float(psnr(baseline, hr, crop=model.scale)) + 2.5  # far above the input / bicubic
    assert torch.allclose(kernel.sum(dim=(-2, -1)), torch.ones(1), atol=1e-4)


def test_models_lists_each_shipped_model_with_its_size_and_defaults(capsys) -> None:
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(SHIPPED)
    assert rows[DEFAULT_WEIGHTS]["default_for"] == "upscale" and rows[DEFAULT_DEBLUR_WEIGHTS]["default_for"] == "deblur"
    for name, row in rows.items():
        cfg = checkpoint.load_weights(row["file"])[1]
        with torch.device("meta"):
            parameters = sum(p.numel() for p in MCFormer(cfg.model).parameters())
        assert row["parameters"] == parameters and row["scale"] == SHIPPED[name][1]
        assert row["sha256"] == checkpoint.sha256_of(Path(row["file"])) == checkpoint.shipped_weights()[name]["sha256"]
        assert row["sampling"]["fidelity"]["steps"] == 1
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in SHIPPED)


def fake_registry(tmp_path: Path, monkeypatch, weights: Path, sampling: dict) -> None:
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "tiny.safetensors").write_bytes(weights.read_bytes())
    entry = {"file": "tiny.safetensors", "sha256": checkpoint.sha256_of(weights), "sampling": sampling}
    (shipped / "registry.json").write_text(json.dumps({"tiny": entry}))
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", shipped)


def test_a_models_tuned_sampling_defaults_apply_unless_a_flag_overrides_them(tmp_path: Path, monkeypatch,
                                                                             weights: Path) -> None:
    fake_registry(tmp_path, monkeypatch, weights, {"perceptual": {"steps": 2, "zeta": 4.0}})
    parse = build_parser(["upscale"]).parse_args
    tuned = sample_options_from(parse(["upscale", "x.png", "--out", "o", "--weights", "tiny"]))
    assert (tuned.steps, tuned.zeta) == (2, 4.0)
    assert BlindDiff.from_pretrained("tiny", device="cpu").options() == tuned
    flagged = sample_options_from(parse(["upscale", "x.png", "--out", "o", "--weights", "tiny", "--steps", "5"]))
    assert (flagged.steps, flagged.zeta) == (5, 4.0)
    # A weights file outside the registry samples with the project's defaults.
    plain = sample_options_from(parse(["upscale", "x.png", "--out", "o", "--weights", str(weights)]))
    assert plain == SampleOptions.for_mode("perceptual")
    fidelity = sample_options_from(parse(["upscale", "x.png", "--out", "o", "--weights", "tiny", "--mode", "fidelity"]))
    assert fidelity == SampleOptions.for_mode("fidelity")  # the entry tunes only the perceptual mode


def test_unknown_tuned_defaults_are_refused_by_name(tmp_path: Path, monkeypatch, weights: Path) -> None:
    fake_registry(tmp_path, monkeypatch, weights, {"perceptual": {"stepz": 2}})
    with pytest.raises(ValueError, match="sampling defaults stepz"):
        BlindDiff.from_pretrained("tiny", device="cpu").options()


def test_every_sampling_option_has_a_command_line_flag() -> None:
    from dataclasses import fields

    args = build_parser(["upscale"]).parse_args(["upscale", "x.png", "--out", "o"])
    assert all(hasattr(args, f.name) for f in fields(SampleOptions))
