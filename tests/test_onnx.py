"""`blinddiff export --format onnx`: the fidelity mode as one ONNX graph, run with onnxruntime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blinddiff.cli import main
from blinddiff.sampling import PositionalNoise
from conftest import one_image_testset, run_script

SEED = 5


@pytest.fixture(scope="module")
def x0_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test network as the shipped models are built: x0-predicting over ↑y, space-to-depth stem
    (size multiple 16). The ε-predicting `weights` fixture clips 98 % of its random output to 0 or 1, which
    would leave little for a comparison to see."""
    from blinddiff.checkpoint import save_weights
    from blinddiff.config import load_config
    from blinddiff.model import MCFormer

    torch.manual_seed(0)
    cfg = load_config("tiny", ["diffusion.prediction=x0", "model.residual_over=lr", "model.learned_variance=false",
                               "diffusion.learned_variance=false", "model.patch_size=2"])
    assert cfg.model.size_multiple == 16
    path = tmp_path_factory.mktemp("x0") / "tiny-x0.safetensors"
    save_weights(path, MCFormer(cfg.model).state_dict(), cfg)
    return path


@pytest.fixture(scope="module")
def exported(x0_weights: Path) -> Path:
    """One export through the CLI (the slow part: torch.export + onnxscript), with the noise as an input."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    out = x0_weights.parent / "tiny-x0.onnx"
    assert main(["export", str(x0_weights), "--out", str(out), "--format", "onnx", "--noise", "input"]) == 0
    return out


def session(model: Path | bytes):
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model) if isinstance(model, Path) else model, options,
                                providers=["CPUExecutionProvider"])


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 8, 8), (2, 9, 13)], ids=["8x8 (HR a multiple of 16)", "2x9x13 (not)"])
def test_onnx_graph_reproduces_upscale_fidelity(exported: Path, x0_weights: Path, shape: tuple[int, int, int]
                                                ) -> None:
    from blinddiff.inference import BlindDiff

    batch, height, width = shape
    lr = torch.rand(batch, 3, height, width)
    sr, kernel = BlindDiff.from_pretrained(x0_weights, device="cpu").upscale(lr, mode="fidelity", seed=SEED)
    # x_T of `upscale --seed SEED`: draw 0 of every image's positional noise, seeded SEED
    noise = PositionalNoise([SEED] * batch)(0, 3, (0, 0, 4 * height, 4 * width), torch.device("cpu"), torch.float32)
    result, onnx_kernel = session(exported).run(None, {"image": lr.numpy(), "noise": noise.numpy()})
    assert result.shape == (batch, 3, 4 * height, 4 * width) and onnx_kernel.shape == (batch, 11, 11)
    assert ((sr > 0) & (sr < 1)).float().mean() > 0.5  # most pixels not clipped: the comparison sees them
    np.testing.assert_allclose(result, sr.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(onnx_kernel, kernel.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(onnx_kernel.sum(axis=(1, 2)), 1.0, atol=1e-5)
    assert (onnx_kernel >= 0).all()


@pytest.mark.slow
def test_noise_drawn_in_the_graph_leaves_one_input(exported: Path) -> None:
    import onnx

    from blinddiff.onnx_export import draw_noise_in_graph

    proto = onnx.load(str(exported))
    assert {p.key: p.value for p in proto.metadata_props}["noise"] == "input"
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    draw_noise_in_graph(proto, 4)
    onnx.checker.check_model(proto, full_check=True)
    graph = session(proto.SerializeToString())
    (image,) = graph.get_inputs()
    assert image.name == "image" and image.shape == ["batch", 3, "height", "width"]
    assert [o.shape for o in graph.get_outputs()] == [["batch", 3, "4*height", "4*width"], ["batch", 11, 11]]
    lr = np.random.default_rng(0).random((2, 3, 9, 13), dtype=np.float32)
    first, kernel = graph.run(None, {"image": lr})
    second, _ = graph.run(None, {"image": lr})
    assert first.shape == (2, 3, 36, 52) and 0 <= first.min() and first.max() <= 1
    np.testing.assert_allclose(kernel.sum(axis=(1, 2)), 1.0, atol=1e-5)
    assert np.abs(first - second).mean() > 1e-3  # a fresh x_T at every run, like another --seed


def test_onnx_export_without_its_packages_names_the_extra(x0_weights: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if it were not installed
    out = tmp_path / "m.onnx"
    assert main(["export", str(x0_weights), "--out", str(out), "--format", "onnx"]) == 2
    assert "pip install blinddiff[onnx]" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("flags", [["--format", "onnx", "--dtype", "fp16"], ["--noise", "input"]])
def test_export_refuses_options_of_the_other_format(x0_weights: Path, tmp_path: Path, flags: list[str],
                                                    capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(x0_weights), "--out", str(tmp_path / "m"), *flags]) == 2
    assert "applies to --format" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_help_imports_neither_torch_nor_onnx() -> None:
    check = ("import sys, contextlib\nfrom blinddiff.cli import main\n"
             "with contextlib.suppress(SystemExit):\n    main(sys.argv[1:])\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnx', 'onnxscript', 'onnxruntime'}))")
    src = str(Path(__file__).resolve().parents[1] / "src")
    loaded = [subprocess.run([sys.executable, "-c", check, *argv], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": src}).stdout.splitlines()[-1]
              for argv in (["--help"], ["export", "--help"])]
    assert loaded == ["[]", "['torch']"]  # `export --help` reads the dtypes from checkpoint, never onnx


@pytest.mark.slow
def test_parity_script_finds_the_graph_fed_torchs_noise_equal(exported: Path, x0_weights: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    one_image_testset(tmp_path, "set", "iso:2.0", 4, kernel_size=11)
    args = ["--benchmark", str(tmp_path / "set"), "--weights", str(x0_weights), "--onnx", str(exported),
            "--draws", "2", "--out", str(tmp_path / "parity.json")]
    assert run_script("onnx_parity.py", *args, monkeypatch=monkeypatch) == 0
    result = json.loads((tmp_path / "parity.json").read_text())
    (case,) = result["cases"]
    assert abs(case["onnx_input_noise"] - case["torch"]) < 1e-3 and case["max_pixel_difference"] < 1e-5
    assert len(result["onnx_graph_noise_means"]) == 2
    assert result["onnx_graph_noise_means"][0] != result["onnx_graph_noise_means"][1]  # seeded draws differ
