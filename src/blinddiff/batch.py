"""Batch processing of image files for `blinddiff upscale` / `deblur`: plan every output up front, decode one
batch at a time, write each result with its kernel and noise estimate (`fileio.write_result`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import fileio
from .degradation import estimate_noise_level
from .fileio import LoadedImage
from .inference import BlindDiff, SampleOptions, check_lr_size

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
                  progress: bool = True, log: Callable[[str], None] = print) -> list[str]:
    """Upscale image files into `out` (module docstring); returns the problems, each naming its input.

    Writes `<stem><suffix>.<ext>`, `<stem>_kernel.npy`, `<stem>_kernel.png` and `<stem>_estimate.json`
    (`file_outputs`); earlier outputs found in folders are not taken as inputs. Grey stays grey, alpha is
    upscaled separately, 16-bit PNG stays 16-bit, EXIF orientation is applied and the rest of the metadata
    kept. Options are checked once, up front; every output is planned before anything is written, and an
    input whose output would overwrite an input or another input's output is refused. Sizes come from the
    file headers; images are decoded one batch at a time. Images of the same size are processed
    `batch_size` at a time, each with the same seed (so batching does not change results).
    """
    from tqdm import tqdm

    if ext not in ("auto", "png", "jpg"):
        raise ValueError(f"ext={ext!r} is unknown; use png, jpg or auto")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid; use 1 or more")
    check_suffix(suffix, ext)
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
    accepted, collisions = fileio.plan_outputs(planned)
    problems += collisions
    jobs: list[FileJob] = []
    for path, outputs in accepted.items():
        try:
            size = fileio.image_size(path)
            check_lr_size(*size, model.scale, options.tile)
        except (fileio.ImageError, ValueError, FileNotFoundError) as err:
            problems.append(str(err) if str(path) in str(err) else f"{path}: {err}")
            continue
        jobs.append(FileJob(path, outputs, size))
    batches = size_batches(jobs, lambda job: job.size, batch_size)
    bar = tqdm(total=len(jobs), desc="images", unit="img", disable=not progress or len(jobs) < 2)
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
        try:
            sr, kernels = model.run(lr, [seed] * len(loaded), options, callback=callback, progress=progress)
        except (ValueError, RuntimeError) as err:
            problems.extend(f"{job.source}: {err}" for job, _ in loaded)
            continue
        noise = estimate_noise_level(lr)
        for (job, image), result, kernel, sigma in zip(loaded, sr, kernels, noise):
            alpha = None
            if image.alpha is not None:
                alpha = model.upscale_alpha(torch.from_numpy(image.alpha)[None, None])[0, 0].numpy()
            target = job.outputs[0]
            estimate = {"noise_sigma": round(float(sigma), 3), "noise_scale": "0-255 (8-bit levels)",
                        "input": job.source.name}
            try:
                fileio.write_result(target, LoadedImage(result.permute(1, 2, 0).numpy(), alpha, image.kind),
                                    kernel.numpy(), stem=job.source.stem, estimate=estimate)
            except OSError as err:  # disk full, a folder in the way, no permission: this input fails, not the run
                problems.append(f"{job.source}: could not write {err.filename or target}: {err.strerror or err}")
                continue
            log(f"{job.source} → {target}")
            print(f"{job.source.name}: estimated noise σ {float(sigma):.2f} (0–255), kernel {job.outputs[2].name}",
                  file=sys.stderr)
            bar.update(1)
    bar.close()
    return problems


def trajectory_writer(out: Path, stems: list[str]) -> Callable:
    """A sampling callback saving x̂0 and k̂_t of every step to `<stem>_trajectory/` (for Fig. 7a-style plots)."""
    from .fileio import tensor_to_rgb, write_npy, write_png

    def write(info: Any) -> None:
        for stem, x0, kernel in zip(stems, info.x0, info.kernel):
            folder = out / f"{stem}_trajectory"
            write_png(folder / f"step_{info.index:04d}_x0.png", tensor_to_rgb(x0.float()))
            write_npy(folder / f"step_{info.index:04d}_kernel.npy", kernel.detach().float().cpu().numpy())

    return write
