"""`make demo`'s script runs end to end (here with a tiny random model instead of the shipped one)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from blinddiff.demo import main
from conftest import metric_weights_installed


def test_demo_writes_the_comparison_picture(weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--weights", str(weights), "--size", "64", "--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if "PSNR-Y" in line]
    assert [line.split()[0] for line in lines] == ["perceptual:", "fidelity:", "bicubic:"]
    if metric_weights_installed("vgg"):  # by `make metric-weights`: LPIPS-VGG is printed too
        assert all("LPIPS-VGG 0." in line for line in lines)
    picture = Image.open(tmp_path / "demo" / "demo.png")
    assert picture.height == 64 and picture.width > 5 * 64  # LR | bicubic | fidelity | perceptual | HR | kernels


def test_demo_without_weights_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--weights", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "demo")]) == 2
    assert "none.safetensors" in capsys.readouterr().err
