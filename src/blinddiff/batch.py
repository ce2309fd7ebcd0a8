"""Batch processing of image files for `blinddiff upscale` / `deblur`: plan every output up front, decode one
batch at a time, fill each result band by band in its output's pixel type (`fileio.ResultBuffer`), and write it
with its kernel and noise estimate (`fileio.write_result`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import fileio
from .degradation import estimate_noise_level
from .inference import MAX_PIXELS, BlindDiff, SampleOptions, check_lr_size

__all__ = ["FileJob", "check_suffix", "file_outputs", "size_batches", "trajectory_writer", "upscale_files"]


def size_batches(items: list, size: Callable[[Any], Any], batch_size: int) -> list[list]:
    """Items whose `size` is equal (so they stack into one tensor), `batch_size` at a time, in first-seen order."""
    groups: dict[Any, list] = {}
    for item in items:
        groups.setdefault(size(item), []).append(item)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def file_outputs(out: Path, stem: str, suffix: str, extension: str) -> list[Path]:
    """What one input writes: the result `<stem><suffix>.<extension>`, its kernel (.npy and picture) and its
    noise estimate (`fileio.write_result`)."""
    return [out / f"{stem}{suffix}.{extension}", out / f"{stem}_kernel.npy", out / f"{stem}_kernel.png",
            out / f"{stem}_estimate.json"]


def check_suffix(suffix: str, ext: str) -> None:
    """Refuse a suffix whose result would overwrite its own kernel or estimate file (e.g. `_kernel`)."""
    fileio.check_name_part(suffix, "suffix")
    for extension in ("png", "jpg") if ext == "auto" else (ext,):
        result, *companions = [path.name for path in file_outputs(Path(), "x", suffix, extension)]
        if result.casefold() in {name.casefold() for name in companions}:
            raise ValueError(f"suffix={suffix!r} names each result like its own kernel or estimate file "
                             f"({result}); choose another suffix, e.g. _x4")


@dataclass
class FileJob:
    source: Path
    outputs: list[Path]  # the result, <stem>_kernel.npy and <stem>_kernel.png
    size: tuple[int, int]  # (height, width) from the file header


def upscale_files(model: BlindDiff, inputs: list[str], out: str | Path, options: SampleOptions, *, seed: int = 0,
                  batch_size: int = 1, suffix: str = "", ext: str = "auto", save_trajectory: bool = False,
                  progress: bool = True, log: Callable[[str], None] = print, quality: int | None = None,
                  outscale: float | None = None) -> list[str]:
    """Upscale image files into `out` (module docstring); returns the problems, each naming its input.

    Writes `<stem><suffix>.<ext>`, `<stem>_kernel.npy`, `<stem>_kernel.png` and `<stem>_estimate.json`
    (`file_outputs`); earlier outputs found in folders are not taken as inputs. Grey stays grey, alpha is
    upscaled separately, 16-bit PNG stays 16-bit, EXIF orientation is applied and the rest of the metadata
    kept. Options are checked once, up front; every output is planned before anything is written, and an
    input whose output would overwrite an input or another input's output is refused. Sizes come from the
    file headers; images are decoded one batch at a time. Images of the same size are processed
    `batch_size` at a time, each with the same seed (so batching does not change results). `quality`: of the
    JPEG outputs (1–100, default 95; refused when no output is JPEG); `outscale`: the result resized (Lanczos)
    to `outscale` × the input's size after the model, e.g. 3.5 with a ×4 model (the kernel files unchanged).
    """
    from tqdm import tqdm

    if ext not in ("auto", "png", "jpg"):
        raise ValueError(f"ext={ext!r} is unknown; use png, jpg or auto")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid; use 1 or more")
    check_suffix(suffix, ext)
    if quality is not None and (isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100):
        raise ValueError(f"quality={quality!r}: JPEG quality must be an integer from 1 to 100 (default "
                         f"{fileio.DEFAULT_JPEG_QUALITY})")
    if outscale is not None and not (isinstance(outscale, (int, float)) and 0 < outscale <= 64):
        raise ValueError(f"outscale={outscale!r}: must be a number > 0 and ≤ 64, the output's size as a multiple "
                         f"of the input's (e.g. 3.5 with a ×4 model)")
    model.check_options(options, [seed])
    out = Path(out)
    fileio.check_output_folder(out)
    for folder in (out, *out.glob("*_trajectory")):
        fileio.remove_temporaries(folder)  # left by a process killed mid-write
    files, problems = fileio.expand_inputs(inputs, out)
    planned = {}
    for path in files:
        extension = ext if ext != "auto" else ("jpg" if path.suffix.lower() in (".jpg", ".jpeg") else "png")
        planned[path] = file_outputs(out, path.stem, suffix, extension)
    if quality is not None and planned and not any(fileio.is_jpeg(outputs[0]) for outputs in planned.values()):
        raise ValueError(f"quality={quality} sets the JPEG quality, but no output is JPEG here; leave it out, or "
                         f"pass --ext jpg")
    accepted, collisions = fileio.plan_outputs(planned)
    problems += collisions
    jobs: list[FileJob] = []
    for path, outputs in accepted.items():
        try:
            size = fileio.image_size(path)
            check_lr_size(*size, model.scale)
            final = size if outscale is None else _outscaled(size, outscale)
            if final[0] * final[1] > MAX_PIXELS:
                raise ValueError(f"outscale={outscale:g} would make it {final[1]}x{final[0]}, over the "
                                 f"{MAX_PIXELS / 1e6:.0f} MP limit")
        except (fileio.ImageError, ValueError, FileNotFoundError) as err:
            problems.append(str(err) if str(path) in str(err) else f"{path}: {err}")
            continue
        jobs.append(FileJob(path, outputs, size))
    batches = size_batches(jobs, lambda job: job.size, batch_size)
    # on a terminal only: elsewhere each image's own line is the progress (no escape codes in a log)
    bar = tqdm(total=len(jobs), desc="images", unit="img",
               disable=not progress or len(jobs) < 2 or not sys.stderr.isatty())
    for batch in batches:
        loaded: list[tuple[FileJob, fileio.LoadedImage]] = []
        for job in batch:  # decoded now, not up front: memory holds one batch
            try:
                image = fileio.load_image(job.source)
                if image.size != job.size:
                    raise fileio.ImageError(f"{job.source}: decodes to {image.size[1]}x{image.size[0]}, not the "
                                            f"{job.size[1]}x{job.size[0]} of its header; re-save the file")
            except (fileio.ImageError, FileNotFoundError) as err:
                problems.append(str(err) if str(job.source) in str(err) else f"{job.source}: {err}")
                continue
            loaded.append((job, image))
        if not loaded:
            continue
        lr = torch.stack([torch.from_numpy(image.rgb).permute(2, 0, 1) for _, image in loaded])
        callback = trajectory_writer(out, [job.source.stem for job, _ in loaded]) if save_trajectory else None
        kinds = [fileio.output_kind(image.kind, job.outputs[0]) for job, image in loaded]
        height, width = model.scale * lr.shape[-2], model.scale * lr.shape[-1]
        results = [fileio.ResultBuffer(kind, 1, height, width) for kind in kinds]
        alphas = [None if image.alpha is None or kind.channels not in (2, 4) else
                  torch.from_numpy(image.alpha)[None, None] for (_, image), kind in zip(loaded, kinds)]

        def write(top: int, band: torch.Tensor) -> None:
            rows = slice(top, top + band.shape[2])
            for i, (result, alpha) in enumerate(zip(results, alphas)):
                result.write(top, band[i:i + 1], None if alpha is None else model.upscale_alpha(alpha, rows))

        try:
            kernels = model.stream(lr, [seed] * len(loaded), options, write, callback=callback, progress=progress)
        except (ValueError, RuntimeError) as err:
            problems.extend(f"{job.source}: {err}" for job, _ in loaded)
            continue
        noise = estimate_noise_level(lr)
        del lr
        for (job, image), result, kind, kernel, sigma in zip(loaded, results, kinds, kernels, noise):
            pixels = result.image()
            if outscale is not None:
                pixels = fileio.resize_pixels(pixels, _outscaled(job.size, outscale))
            target = job.outputs[0]
            estimate = {"noise_sigma": round(float(sigma), 3), "noise_scale": "0-255 (8-bit levels)",
                        "input": job.source.name}
            try:
                fileio.write_result(target, pixels, kernel.numpy(), stem=job.source.stem, estimate=estimate,
                                    kind=kind, quality=quality or fileio.DEFAULT_JPEG_QUALITY)
            except OSError as err:  # disk full, a folder in the way, no permission: this input fails, not the run
                problems.append(f"{job.source}: could not write {err.filename or target}: {err.strerror or err}")
                continue
            log(f"{job.source} → {target}")
            print(f"{job.source.name}: estimated noise σ {float(sigma):.2f} (0–255), kernel {job.outputs[2].name}",
                  file=sys.stderr)
            bar.update(1)
        del results
    bar.close()
    return problems


def _outscaled(size: tuple[int, int], outscale: float) -> tuple[int, int]:
    """(height, width) of an LR image of `size` resized to `outscale` × its size."""
    return max(1, round(size[0] * outscale)), max(1, round(size[1] * outscale))


def trajectory_writer(out: Path, stems: list[str]) -> Callable:
    """A sampling callback saving x̂0 and k̂_t of every step to `<stem>_trajectory/` (for Fig. 7a-style plots)."""
    from .fileio import tensor_to_rgb, write_npy, write_png

    def write(info: Any) -> None:
        for stem, x0, kernel in zip(stems, info.x0, info.kernel):
            folder = out / f"{stem}_trajectory"
            write_png(folder / f"step_{info.index:04d}_x0.png", tensor_to_rgb(x0.float()))
            write_npy(folder / f"step_{info.index:04d}_kernel.npy", kernel.detach().float().cpu().numpy())

    return write
