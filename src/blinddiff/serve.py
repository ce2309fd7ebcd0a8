"""The web UI, `blinddiff serve` (README, "Web UI"): a local Gradio page over the `BlindDiff` API.

Upload a photo, pick a model, the mode (perceptual: the guided MAP reverse process; fidelity: one-step x̂0),
the steps and the seed; the page shows the input upscaled by bicubic beside the blind result (a slider),
the kernel the network estimated, the input's estimated noise level, and offers the result as a PNG.

It binds 127.0.0.1 unless told otherwise, sends no telemetry, makes no share link and fetches nothing from
the internet: Gradio's analytics (and with them its version check) are off, and its page uses only files
the server holds (the default theme's fonts ship with Gradio). `enhance` is the work of one request
without Gradio, so it is tested on its own.
"""

from __future__ import annotations

import html
import itertools
import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .checkpoint import resolve_weights, shipped_weights
from .degradation import estimate_noise_level, matlab_bicubic_resize
from .fileio import ImageError, kernel_picture, rgb_to_tensor, tensor_to_rgb, write_png
from .inference import DEFAULT_WEIGHTS, MODES, BlindDiff, SampleOptions, check_lr_size

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "Enhanced", "ModelCache", "build_app", "default_models", "enhance",
           "serve"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MAX_STEPS = 50  # the paper's setting; more only costs time
KEPT_RESULTS = 16  # result PNGs kept for download; older ones are removed


@dataclass
class Enhanced:
    """What one request produces: uint8 [sH, sW, 3] pictures, the kernel [k, k] and the noise σ (0–255)."""

    bicubic: np.ndarray
    result: np.ndarray
    kernel: np.ndarray
    noise_sigma: float


def enhance(model: BlindDiff, pixels: np.ndarray, *, mode: str = "perceptual", steps: int | None = None,
            seed: int = 0, callback: Callable | None = None) -> Enhanced:
    """Blind ×s super-resolution of uint8 RGB pixels [H, W, 3] (what the page uploads) with its preview.

    Large images are processed in windows within the default memory budget (`BlindDiff.run`), with the
    model's own tuned sampling options for `mode`. Bad input raises ValueError naming
    the problem (too small, too large, an unknown mode, a bad seed). `callback` gets each step's
    `sampling.StepInfo`.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 RGB pixels [H, W, 3], got {pixels.dtype} {tuple(pixels.shape)}")
    height, width = pixels.shape[:2]
    check_lr_size(height, width, model.scale)
    overrides: dict[str, Any] = {} if steps is None else {"steps": steps}
    lr = rgb_to_tensor(pixels)
    sr, kernel = model.run(lr, [seed], model.options(mode, **overrides), callback=callback)
    bicubic = matlab_bicubic_resize(lr, scale=model.scale)
    return Enhanced(bicubic=tensor_to_rgb(bicubic), result=tensor_to_rgb(sr), kernel=kernel[0].numpy(),
                    noise_sigma=float(estimate_noise_level(lr)[0]))


class ModelCache:
    """The offered models by name, each loaded once, when first asked for (requests run in threads)."""

    def __init__(self, names: list[str], device: str = "auto") -> None:
        self.names, self.device = names, device
        self.loaded: dict[str, BlindDiff] = {}
        self.lock = threading.Lock()

    def get(self, name: str) -> BlindDiff:
        if name not in self.names:
            raise ValueError(f"model {name!r} is not offered here; choose one of {', '.join(self.names)}")
        with self.lock:
            if name not in self.loaded:
                self.loaded[name] = BlindDiff.from_pretrained(name, device=self.device)
            return self.loaded[name]


def default_models() -> list[str]:
    """The shipped models, the default one (`inference.DEFAULT_WEIGHTS`) first."""
    names = list(shipped_weights())
    return sorted(names, key=lambda name: name != DEFAULT_WEIGHTS)


def _label(name: str) -> str:
    return Path(name).stem if name not in shipped_weights() else name


def build_app(models: ModelCache, workdir: Path) -> Any:
    """The Gradio page (a `gradio.Blocks`) over `models`; result PNGs are written into `workdir`."""
    import gradio as gr

    perceptual = SampleOptions.for_mode("perceptual")
    counter = itertools.count(1)

    def run(image: np.ndarray | None, name: str, mode: str, steps: float, seed: float | None,
            progress: gr.Progress = gr.Progress()) -> tuple:
        if image is None:
            raise gr.Error("upload a photo first", print_exception=False)
        if seed is None or not float(seed).is_integer() or seed < 0:
            raise gr.Error(f"seed {seed}: give a whole number, 0 or more", print_exception=False)
        try:
            model = models.get(name)
            progress(0, desc=f"{_label(name)}, {mode}")
            enhanced = enhance(model, np.ascontiguousarray(image[..., :3]), mode=mode, steps=int(steps),
                               seed=int(seed), callback=lambda info: progress((info.index + 1, int(steps)),
                                                                             desc="steps"))
            number = next(counter)
            shutil.rmtree(workdir / f"{number - KEPT_RESULTS:06d}", ignore_errors=True)
            target = workdir / f"{number:06d}" / f"blinddiff_x{model.scale}.png"
            write_png(target, enhanced.result)
        except (ValueError, ImageError, FileNotFoundError) as err:
            raise gr.Error(html.escape(str(err)), print_exception=False) from None  # Gradio renders HTML
        except (RuntimeError, MemoryError) as err:  # torch's out-of-memory errors are RuntimeErrors
            first_line = (str(err) or type(err).__name__).splitlines()[0]
            raise gr.Error(html.escape(f"the model failed on this image ({first_line}); try a smaller image"),
                           print_exception=False) from None
        noise = (f"Estimated noise of the input: σ = {enhanced.noise_sigma:.2f} (0–255 levels); "
                 f"kernel {enhanced.kernel.shape[0]}×{enhanced.kernel.shape[1]}, "
                 f"result {enhanced.result.shape[1]}×{enhanced.result.shape[0]}")
        return (enhanced.bicubic, str(target)), kernel_picture(enhanced.kernel), noise, str(target)

    def steps_of(mode: str) -> Any:
        return gr.update(value=SampleOptions.for_mode(mode).steps)

    # delete_cache: uploads and results older than an hour leave Gradio's cache, checked hourly
    with gr.Blocks(title="blinddiff", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown("## blinddiff: blind super-resolution with diffusion\nUpload a photo, then **Upscale**: the "
                    "network estimates the blur kernel and the sharp image together.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Photo", type="numpy", image_mode="RGB", sources=["upload", "clipboard"],
                                 height=320, elem_id="photo")
                model = gr.Dropdown([(_label(name), name) for name in models.names], value=models.names[0],
                                    label="Model", elem_id="model")
                mode = gr.Radio(list(MODES), value="perceptual", label="Mode", elem_id="mode",
                                info="perceptual: the guided reverse process; fidelity: one step, highest PSNR")
                steps = gr.Slider(1, MAX_STEPS, value=perceptual.steps, step=1, label="Steps", elem_id="steps")
                seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="seed")
                button = gr.Button("Upscale", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                slider = gr.ImageSlider(label="Bicubic (left) vs blinddiff (right)", type="numpy", format="png",
                                        interactive=False, elem_id="result")
                with gr.Row():
                    kernel = gr.Image(label="Estimated kernel", format="png", interactive=False, height=200,
                                      buttons=["download", "fullscreen"], elem_id="kernel")
                    with gr.Column():
                        noise = gr.Textbox(label="Estimates", interactive=False, elem_id="noise")
                        download = gr.File(label="Result (PNG)", interactive=False, elem_id="download")
        mode.change(steps_of, mode, steps)
        button.click(run, [image, model, mode, steps, seed], [slider, kernel, noise, download],
                     concurrency_limit=1)  # one image at a time: memory is the model's, not the page's
    return app


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def serve(weights: list[str] | None = None, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          device: str = "auto", log: Any = print) -> None:
    """Check the models and the address, then serve the page until interrupted.

    `weights`: shipped names or weights files to offer (default: every shipped model, `fast-x4` first).
    """
    names = list(dict.fromkeys(weights)) if weights else default_models()
    if not names:
        raise FileNotFoundError("no shipped models in this installation; pass --weights PATH")
    for name in names:
        resolve_weights(name)  # a missing or corrupt file fails now, not at the first request
    if not 0 < port < 65536:
        raise ValueError(f"port={port}: give a TCP port, 1 to 65535")
    if not port_free(host, port):
        raise ValueError(f"port={port}: {host}:{port} is in use or cannot be bound; pick another port")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # also for anything Gradio builds itself
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ImportError("the web UI needs Gradio: run `make venv`, or pip install 'blinddiff[serve]' "
                          "with -c constraints.txt") from None
    models = ModelCache(names, device)
    models.get(names[0])  # bad weights fail before the page is up
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"serving on {host}: anyone who can reach this machine can use the page")
    with tempfile.TemporaryDirectory(prefix="blinddiff-serve-") as folder:
        app = build_app(models, Path(folder))
        log(f"blinddiff web UI: open http://{'[' + host + ']' if ':' in host else host}:{port} (Ctrl+C stops)")
        app.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, share=False,
                                                       inbrowser=False, ssr_mode=False, quiet=True,
                                                       allowed_paths=[folder], show_error=True)
