"""Shared test fixtures and helpers: small images and files made on the fly (no files from outside the
repository), the CLI as `blinddiff` runs it, and which optional weights and peers are installed."""

from __future__ import annotations

import os
import random
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same random state, whatever worker or order runs it.

    Set BLINDDIFF_TEST_SEED to run the suite under another seed (to find tests that only
    pass by luck).
    """
    seed = int(os.environ.get("BLINDDIFF_TEST_SEED", "0"))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sample_rgb(height: int, width: int, which: str = "astronaut") -> np.ndarray:
    """A crop of a scikit-image sample picture (ships with scikit-image), uint8 [H, W, 3]."""
    from skimage import data

    image = getattr(data, which)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[:height, :width, :3])


def one_image_testset(tmp_path: Path, name: str, protocol: str, scale: int, kernel_size: int) -> Path:
    """A synthetic test set `tmp_path/name` (`blinddiff.testsets.build_testset`) of one 32×32 picture, hr/a.png."""
    from blinddiff.testsets import build_testset

    hr = tmp_path / "hr"
    if not hr.is_dir():
        hr.mkdir()
        Image.fromarray(sample_rgb(32, 32)).save(hr / "a.png")
    build_testset(hr, tmp_path / name, protocol, scale, kernel_size=kernel_size, log=lambda message: None)
    return tmp_path / name


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run benchmarks/<name> as `python benchmarks/<name> args…` → its exit status."""
    monkeypatch.setattr(sys, "argv", [name, *args])
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as `python benchmarks/<name>` does: finds timing.py
    try:
        runpy.run_path(str(BENCHMARKS / name), run_name="__main__")
    except SystemExit as exit_:
        if isinstance(exit_.code, str):  # as the interpreter does: the message to stderr, status 1
            print(exit_.code, file=sys.stderr)
            return 1
        return int(exit_.code or 0)
    return 0


def run_cli(*argv: str) -> int:
    """The commands as `blinddiff` runs them (cli.main adds them to its parser; errors → exceptions here)."""
    from blinddiff.cli import build_parser

    args = build_parser().parse_args(list(argv))
    return args.run(args)


def sample_options(**kwargs: object):
    """`blinddiff.inference.SampleOptions` with these fields (the sampling options of a benchmark run)."""
    from blinddiff.inference import SampleOptions

    return SampleOptions(**kwargs)


def niqe_window() -> np.ndarray:
    """NIQE's 7×7 Gaussian window, σ 7/6 (BasicSR's), normalised to sum 1."""
    x = np.arange(7) - 3.0
    g = np.exp(-x**2 / (2 * (7 / 6) ** 2))
    w = np.outer(g, g)
    return w / w.sum()


def natural_luma(size: int, which: str, top: int = 0, left: int = 0) -> torch.Tensor:
    """Rounded BT.601 Y (16…235) of a size×size crop of a scikit-image sample picture, float64 [size, size]."""
    from blinddiff.metrics import rgb_to_y

    rgb = sample_rgb(top + size, left + size, which)[top:, left:]
    y = rgb_to_y(torch.from_numpy(rgb).permute(2, 0, 1).double(), data_range=255.0)[0]
    return torch.round(y)


def write_niqe_params(path: Path, block: int) -> Path:
    """Pristine NIQE model fitted to blocks of natural sample pictures (format of BasicSR's file) → path."""
    from blinddiff.metrics import niqe_features

    window = niqe_window()
    feats = torch.cat([niqe_features(natural_luma(128, which, top, left), window, block_size=block)
                       for which in ("astronaut", "coffee", "chelsea")
                       for top, left in ((0, 0), (150, 150))]).numpy()
    feats = feats[~np.isnan(feats).any(axis=1)]
    np.savez(path, mu_pris_param=feats.mean(0)[None], cov_pris_param=np.cov(feats, rowvar=False),
             gaussian_window=window)
    return path


def peers_installed(*methods: str) -> bool:
    """Whether `make peers` installed the ×4 peer baselines `methods` (blinddiff.peers.PEERS names)."""
    from blinddiff import peers

    try:
        peers.check_peers(methods, 4)
    except (FileNotFoundError, ValueError):
        return False
    return True


def metric_weights_installed(*names: str) -> bool:
    """Whether `make metric-weights` installed these LPIPS/DISTS weight files ("vgg", "alex", "dists")."""
    from blinddiff.metrics import installed_weights

    try:
        for name in names:
            installed_weights(name)
    except FileNotFoundError:
        return False
    return True


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random MCFormer saved as blinddiff weights (config in the metadata)."""
    from blinddiff.checkpoint import save_weights
    from blinddiff.config import load_config
    from blinddiff.model import MCFormer

    torch.manual_seed(0)
    cfg = load_config("tiny")
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(path, MCFormer(cfg.model).state_dict(), cfg)
    return path


@pytest.fixture
def hr_folder(tmp_path: Path) -> Path:
    """Two small HR images: an RGB one with sizes not divisible by 4 and a grey one."""
    folder = tmp_path / "hr"
    folder.mkdir()
    Image.fromarray(sample_rgb(70, 83)).save(folder / "astronaut.png")
    Image.fromarray(sample_rgb(64, 64, "camera")[..., 0]).save(folder / "camera.png")
    return folder
