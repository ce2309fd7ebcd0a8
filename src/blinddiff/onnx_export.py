"""The fidelity mode as one ONNX graph, for deployment tools (README, "Export to ONNX").

`SampleOptions.for_mode("fidelity")` is one step of the reverse process (`blinddiff.sampling.sample`,
paper Algorithm 2 with ζ = 0): MCFormer at t = T−1 on x_T ~ N(0, I) and the bicubic↑ input, then x̂0
clipped to [0, 1] (for an x0-predicting model the network's output; for an ε-predicting one the
schedule's x̂0 from ε̂). That step, the padding to the network's size multiple and the crop back are
exported as they run in PyTorch:

    image  [N, 3, H, W] float32 in [0, 1]  →  result [N, 3, s·H, s·W] in [0, 1], kernel [N, k, k] (sums to 1)

with N, H and W dynamic. x_T is Gaussian noise; `noise` picks where it comes from:

* "graph" (the default): drawn inside the graph (RandomNormalLike), so the model has the single image
  input that chaiNNer, onnxruntime and TensorRT users expect; each run is like another `--seed`.
* "input": a second input ``noise`` [N, 3, s·H, s·W]; fed the x_T of `upscale --mode fidelity --seed S`
  the graph reproduces that output to float rounding.

Both come from one traced graph with the noise as an input; "graph" then draws it in front
(`draw_noise_in_graph`). On Set5 σ 2.6 the seed moves PSNR-Y by hundredths of a dB per image
(`benchmarks/onnx_parity.py` measures both forms against `upscale`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor, nn

from . import __version__
from .checkpoint import resolve_weights, sha256_of, shipped_weights
from .config import Config
from .fileio import atomic_write
from .inference import MIN_LR_SIZE, SampleOptions, load_model
from .model import MCFormer
from .sampling import reverse_step, sampling_chain

if TYPE_CHECKING:
    import onnx

__all__ = ["NOISE_SOURCES", "FidelityStep", "draw_noise_in_graph", "export_onnx", "min_input_size",
           "name_output_axes"]

NOISE_SOURCES = ("graph", "input")
OPSET = 18  # has every operator used (LayerNormalization, Mish, …) without asking for the newest runtimes
INSTALL_HINT = "pip install blinddiff[onnx]"


class FidelityStep(nn.Module):
    """`upscale(..., mode="fidelity")` as a module: (image [N, 3, h, w], x_T [N, 3, s·h, s·w]) → (result
    [N, 3, s·h, s·w], kernel [N, k, k]); the calls of the one step of `sample`."""

    def __init__(self, model: MCFormer, cfg: Config) -> None:
        super().__init__()
        self.network = model
        self.options = SampleOptions.for_mode("fidelity")
        self.chain = sampling_chain(cfg.diffusion, self.options.steps)
        self.timestep = int(self.chain.timestep_map[0])  # T−1: one jump from pure noise
        self.update = reverse_step(self.chain, self.options.sampler, self.options.eta)

    def forward(self, image: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.full((image.shape[0],), self.timestep, dtype=torch.long, device=image.device)
        out, kernel = self.network(noise, t, image)
        p = self.chain.p_mean_variance(out, noise, 0, clip_x0=True)
        result = self.update(p, noise, 0)
        return result.clamp(0.0, 1.0), kernel


def min_input_size(cfg: Config) -> int:
    """The smallest input side the graph takes: `upscale`'s minimum, and at least one size multiple of the
    network at the output (its padding reflects, which needs a pad narrower than the image)."""
    return max(MIN_LR_SIZE, math.ceil(cfg.model.size_multiple / cfg.data.scale))


def export_onnx(weights: str | Path, out: str | Path, *, noise: str = "graph") -> int:
    """Write the fidelity mode of `weights` (a shipped name, a weights file or a checkpoint's ``.index.json``)
    as an ONNX file (opset `OPSET`, float32, dynamic batch and size; see the module docstring), atomically.
    Returns its size in bytes. Needs the `onnx` extra (torch's exporter runs on onnxscript)."""
    if noise not in NOISE_SOURCES:
        raise ValueError(f"noise={noise!r} is unknown; use one of {', '.join(NOISE_SOURCES)}")
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter imports it; fail here with the fix)
    except ImportError as err:
        raise ImportError(f"ONNX export needs the onnx and onnxscript packages ({err.name} is missing): "
                          f"{INSTALL_HINT}") from None
    path = resolve_weights(weights)
    model, cfg = load_model(path)
    scale, side, channels = cfg.data.scale, min_input_size(cfg), cfg.model.channels
    # an example off the size multiple and a batch of 2, so that neither is traced as a constant
    image = torch.rand(2, channels, side + 3, side + 5)
    x_t = torch.randn(2, channels, scale * image.shape[2], scale * image.shape[3])
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            FidelityStep(model, cfg).eval(), (image, x_t), dynamo=True, verbose=False, opset_version=OPSET,
            dynamic_shapes=({0: "batch", 2: "height", 3: "width"}, {0: "batch", 2: "out_height", 3: "out_width"}),
            input_names=["image", "noise"], output_names=["result", "kernel"])
    proto = program.model_proto
    name_output_axes(proto, scale)
    if noise == "graph":
        draw_noise_in_graph(proto, scale)
    onnx.helper.set_model_props(proto, {
        "blinddiff_version": __version__, "mode": "fidelity", "noise": noise, "scale": str(scale),
        "kernel_size": str(cfg.model.kernel_size), "min_input_size": str(side),
        "weights": str(weights) if str(weights) in shipped_weights() else path.name,
        "weights_sha256": sha256_of(path), "config": cfg.name,
    })
    onnx.checker.check_model(proto, full_check=True)
    with atomic_write(out) as handle:
        handle.write(proto.SerializeToString())
    return Path(out).stat().st_size


def name_output_axes(proto: "onnx.ModelProto", scale: int) -> None:
    """Name the output-sized axes of the inputs and outputs (traced free of the input's, and on the result
    as the crop's ``Min(out_height, 16*…)``) after the input's: ``4*height``, ``4*width``."""
    for value in [*proto.graph.input, *proto.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            for axis in ("height", "width"):
                if f"out_{axis}" in dim.dim_param:  # (assigning to a fixed axis would clear its size)
                    dim.dim_param = f"{scale}*{axis}"


def draw_noise_in_graph(proto: "onnx.ModelProto", scale: int, seed: float | None = None) -> None:
    """Turn the ``noise`` input of an exported graph into x_T ~ N(0, I) drawn inside it, shaped
    [N, C, s·H, s·W] after the ``image`` input (Shape → ×[1, 1, s, s] → ConstantOfShape → RandomNormalLike);
    the rest of the graph, traced and verified once, is left as it is. `seed`: the draw's seed (a runtime
    then repeats its sequence of draws in every new session); None: the runtime picks one."""
    from onnx import TensorProto, helper

    graph = proto.graph
    (noise,) = [value for value in graph.input if value.name == "noise"]
    graph.input.remove(noise)
    nodes = [
        helper.make_node("Shape", ["image"], ["noise_image_shape"]),
        helper.make_node("Constant", [], ["noise_scale"],
                         value=helper.make_tensor("noise_scale", TensorProto.INT64, [4], [1, 1, scale, scale])),
        helper.make_node("Mul", ["noise_image_shape", "noise_scale"], ["noise_shape"]),
        helper.make_node("ConstantOfShape", ["noise_shape"], ["noise_zeros"],
                         value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("RandomNormalLike", ["noise_zeros"], ["noise"], dtype=TensorProto.FLOAT,
                         **({} if seed is None else {"seed": float(seed)})),
    ]
    for index, node in enumerate(nodes):
        graph.node.insert(index, node)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence torch's exporter while it runs: it warns about torchvision operators it cannot register
    (none is used here), about axis names, and once per multi-output Split its optimiser leaves alone
    (hundreds of lines, all harmless)."""
    loggers = [logging.getLogger(name) for name in ("onnxscript.optimizer._constant_folding",
                                                     "torch.onnx._internal.exporter._registration")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
