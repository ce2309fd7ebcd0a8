"""`make demo`'s script runs end to end (here with a tiny random model instead of the shipped one)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from blinddiff.demo import main
from conftest import metric_weights_installed, sample_rgb


def test_demo_writes_the_comparison_picture(weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    Image.fromarray(sample_rgb(24, 32)).save(tmp_path / "photo.png")
    assert main(["--weights", str(weights), "--size", "64", "--out", str(tmp_path / "demo"),
                 "--real", str(tmp_path / "photo.png")]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    lines = [line for line in printed.splitlines() if "PSNR-Y" in line]
    assert [line.split()[0] for line in lines] == ["perceptual:", "fidelity:", "bicubic:"]
    # LPIPS-VGG is printed with weights (`make metric-weights`); without them the demo says why it is not
    assert all(("LPIPS-VGG 0." in line) == metric_weights_installed("vgg") for line in lines)
    assert ("no LPIPS" in captured.err) != metric_weights_installed("vgg")
    picture = Image.open(tmp_path / "demo" / "demo.png")
    assert picture.height == 64 and picture.width > 5 * 64  # LR | bicubic | fidelity | perceptual | HR | kernels
    real = Image.open(tmp_path / "demo" / "demo_real.png")  # LR | bicubic | ours | kernel, at ×4
    assert real.height == 4 * 24 and real.width > 3 * 4 * 32
    assert "photo.png (estimated noise σ" in printed


def test_demo_without_the_real_photo_says_it_skipped_it(weights: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    assert main(["--weights", str(weights), "--size", "64", "--out", str(tmp_path / "demo"),
                 "--real", str(tmp_path / "absent.png")]) == 0
    assert "absent.png" in capsys.readouterr().out and not (tmp_path / "demo" / "demo_real.png").exists()


def test_demo_without_weights_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--weights", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "demo")]) == 2
    assert "none.safetensors" in capsys.readouterr().err
