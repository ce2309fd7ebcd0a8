"""Files in and out: finding and reading images, and atomic writes.

Every file blinddiff writes (images, kernels, manifests, checkpoints) goes through `atomic_write`, so an
interrupted run never leaves a half-written output behind: data go to a temporary file in the same folder,
which then replaces the target in one `os.replace`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

FLOAT_TOLERANCE = 1e-3  # float pixels this far outside [0, 1] are rounding, not another scale
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
UMASK = os.umask(0o22)  # read the process umask (the only way is to set it) ...
os.umask(UMASK)  # ... and put it back
PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".webp": "WEBP", ".tif": "TIFF",
               ".tiff": "TIFF"}


class ImageError(ValueError):
    """An input image that cannot be used; the message names the file and what to do."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file next to `path`; on success it replaces `path` atomically, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_temporaries(folder: str | os.PathLike) -> None:
    """Delete the temporary files `atomic_write` leaves behind when a process is killed mid-write."""
    folder = Path(folder)
    if folder.is_dir():
        for path in folder.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented, key-sorted JSON (byte-stable for equal data), atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save one array as .npy, atomically."""
    with atomic_write(path) as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def expand_path(text: str | os.PathLike) -> Path:
    """Expand `~`, `$VAR` and shell-style `${VAR:-default}` in a configured path."""
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m.group(1)) or m.group(2), str(text))
    return Path(os.path.expanduser(os.path.expandvars(text)))


def find_images(root: str | os.PathLike) -> list[Path]:
    """All image files under `root` (recursive), sorted; raises if `root` is missing or holds no image."""
    root = expand_path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; pass a folder that holds images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return files


EXIF_ORIENTATION = 0x0112
EXIF_IFD = 0x8769
EXIF_SIZE_TAGS = (0xA002, 0xA003)  # PixelXDimension / PixelYDimension: wrong once the image is resized


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied), from the file header only; raises ImageError
    for unreadable files and for files too large to decode safely (Pillow's decompression-bomb limit)."""
    try:
        with Image.open(path) as image:
            image.verify()  # must come first, right after opening
        with Image.open(path) as image:
            width, height = image.size
            # Pillow decodes a whole PNG to look for a late eXIf chunk: read only one that precedes the pixels
            early = image.format != "PNG" or "exif" in image.info
            if early and image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):  # a quarter turn swaps the sides
                width, height = height, width
    except FileNotFoundError:
        raise
    except Exception as err:  # Pillow raises many kinds of errors (DecompressionBombError among them)
        raise ImageError(f"{path}: not a readable image ({type(err).__name__}: {err}); remove or replace the file") \
            from None
    return height, width


def check_decodes(path: str | os.PathLike) -> None:
    """Decode the whole file once (without keeping the pixels); raises ImageError naming it if that fails.

    `image_size` trusts the header and the checksums; a damaged compressed stream only shows when decoding.
    """
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as err:
        raise ImageError(f"{path}: not a readable image ({type(err).__name__}: {err}); remove or replace the file") \
            from None


@dataclass
class LoadedImage:
    """A decoded image with what is needed to write the result back in kind (grey, alpha, bit depth)."""

    rgb: np.ndarray  # float32 [H, W, 3] in [0, 1] (grey replicated)
    alpha: np.ndarray | None  # float32 [H, W] in [0, 1], or None
    grey: bool
    bit_depth: int  # 8 or 16
    exif: bytes | None = None  # the source's EXIF, orientation applied (so reset) and its pixel size dropped
    icc_profile: bytes | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]


def _png_bit_depth(path: Path) -> int:
    with open(path, "rb") as handle:
        header = handle.read(26)
    if header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR":
        return header[24]
    return 8


def _load_png16(path: Path) -> LoadedImage:
    import png  # pypng: Pillow decodes 16-bit RGB PNGs to 8 bits

    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    planes = info["planes"]
    array = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(height, width, planes)
    array = array.astype(np.float32) / 65535.0
    alpha = array[..., -1] if info["alpha"] else None
    colour = array[..., : planes - (1 if info["alpha"] else 0)]
    grey = colour.shape[-1] == 1
    rgb = np.repeat(colour, 3, axis=2) if grey else colour
    return LoadedImage(np.ascontiguousarray(rgb), alpha, grey, 16)


def load_image(path: str | os.PathLike) -> LoadedImage:
    """Decode any supported image (grey, grey+alpha, RGB, RGBA, palette, 8 or 16 bits) to float RGB + alpha."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty (0 bytes); remove or replace it")
    try:
        if path.suffix.lower() == ".png" and _png_bit_depth(path) == 16:
            return _load_png16(path)
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)  # a portrait phone photo is stored sideways
            exif, icc = kept_metadata(opened), opened.info.get("icc_profile")  # after: this drops the orientation
            if image.mode == "F":
                return _float_image(path, np.asarray(image, dtype=np.float32), exif, icc)
            if image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                grey16 = np.asarray(image, dtype=np.float32) / 65535.0
                return LoadedImage(np.repeat(grey16.clip(0, 1)[..., None], 3, axis=2), None, True, 16, exif, icc)
            grey = image.mode in ("L", "LA", "1")
            alpha = np.asarray(image.getchannel("A"), np.float32) / 255.0 if image.mode in ("LA", "RGBA") else None
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except ImageError:
        raise
    except Exception as err:  # Pillow and pypng raise many kinds of errors for corrupt files
        raise ImageError(f"{path}: not a readable image ({type(err).__name__}: {err}); remove or replace the file") \
            from None
    return LoadedImage(rgb, alpha, grey, 8, exif, icc)


def kept_metadata(image: Image.Image) -> bytes | None:
    """The EXIF block still true of a processed copy: orientation reset (it is applied) and pixel size dropped."""
    exif = image.getexif()
    if not exif:
        return None
    exif.pop(EXIF_ORIENTATION, None)
    sub = exif.get_ifd(EXIF_IFD)
    for tag in EXIF_SIZE_TAGS:
        sub.pop(tag, None)
    return exif.tobytes()


def _float_image(path: Path, grey: np.ndarray, exif: bytes | None, icc: bytes | None) -> LoadedImage:
    """A 32-bit float image (Pillow mode F, e.g. float TIFF): accepted with values in [0, 1], else refused."""
    low, high = (float(grey.min()), float(grey.max())) if grey.size else (0.0, 0.0)
    if not (np.isfinite(grey).all() and low >= -FLOAT_TOLERANCE and high <= 1 + FLOAT_TOLERANCE):
        raise ImageError(f"{path}: a floating-point image with values in [{low:.4g}, {high:.4g}]; blinddiff reads "
                         f"float images in [0, 1]; rescale it (or save it as 8/16-bit PNG)")
    return LoadedImage(np.repeat(grey.clip(0, 1)[..., None], 3, axis=2), None, True, 16, exif, icc)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image as uint8 RGB [H, W, 3]: grey is replicated, alpha dropped, 16 bits rounded to 8."""
    return np.round(load_image(path).rgb * 255.0).astype(np.uint8)


def save_image(path: str | os.PathLike, image: LoadedImage, quality: int = 95) -> None:
    """Write an image in kind (grey/RGB, alpha, 8/16 bits; JPEG drops alpha and 16 bits), atomically."""
    path = Path(path)
    rgb = np.clip(image.rgb, 0.0, 1.0)
    colour = rgb.mean(axis=2, keepdims=True) if image.grey else rgb
    channels = [colour] + ([np.clip(image.alpha, 0, 1)[..., None]] if image.alpha is not None else [])
    array = np.concatenate(channels, axis=2)
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    if image.bit_depth == 16 and path.suffix.lower() == ".png":
        import png

        planes = array.shape[2]
        data = np.round(array * 65535.0).astype(np.uint16).reshape(array.shape[0], -1)
        writer = png.Writer(array.shape[1], array.shape[0], greyscale=planes <= 2, alpha=planes in (2, 4),
                            bitdepth=16)
        with atomic_write(path) as handle:
            writer.write(handle, data)
        return
    if jpeg:
        array = array[..., : colour.shape[2]]
    pixels = np.round(array * 255.0).astype(np.uint8)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    picture = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
    options: dict[str, Any] = {"quality": quality} if jpeg else {}
    if image.exif:
        options["exif"] = image.exif
    if image.icc_profile:
        options["icc_profile"] = image.icc_profile
    with atomic_write(path) as handle:
        picture.save(handle, format=PIL_FORMATS.get(path.suffix.lower(), "PNG"), **options)


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 [H, W] or [H, W, 3] array as PNG, atomically (same array → same bytes)."""
    if array.dtype != np.uint8:
        raise ValueError(f"write_png expects uint8 pixels, got {array.dtype}")
    image = Image.fromarray(array)
    with atomic_write(path) as handle:
        image.save(handle, format="PNG")


def rgb_to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, C] → float32 [1, C, H, W] in [0, 1]."""
    return torch.from_numpy(np.require(array, requirements=["C", "W"])).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def tensor_to_rgb(image: torch.Tensor) -> np.ndarray:
    """float [C, H, W] or [1, C, H, W] in [0, 1] → uint8 [H, W, C] (clamped, rounded half to even)."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"tensor_to_rgb takes one image, got a batch of {image.shape[0]}")
        image = image[0]
    pixels = image.detach().float().clamp(0, 1).mul(255.0).round().to("cpu", dtype=torch.uint8)
    return pixels.permute(1, 2, 0).contiguous().numpy()


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Resolve CLI inputs (files, folders, glob patterns) to image files, in order, without duplicates.

    Returns (files, problems); a problem names an input that matched nothing, so the caller can report it
    and still process the rest.
    """
    files: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.exists():
            found = [path]
        elif any(ch in item for ch in "*?["):
            found = sorted(p for p in Path().glob(item) if p.is_file()) if not path.is_absolute() else \
                sorted(p for p in Path(path.anchor).glob(str(path.relative_to(path.anchor))) if p.is_file())
        else:
            found = []
        if not found:
            problems.append(f"{item}: no such file, folder or matching image")
        files.extend(p for p in found if p not in files)
    return files, problems


def check_output_folder(out: str | os.PathLike, option: str = "out") -> None:
    """Refuse, before any work is done, an output folder that is a file or lies below one."""
    out = Path(out)
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"{option}={out}: {folder} is a file, not a folder; choose another folder")
            return


def check_name_part(text: str, option: str) -> None:
    """A piece of a file name given as an option (e.g. suffix) must not lead out of the output folder."""
    if any(char in text for char in ("/", "\\", "\0")) or text in (".", ".."):
        raise ValueError(f"{option}={text!r} is part of a file name and must not hold '/', '\\' or be '.'/'..'; "
                         f"use e.g. _x4")


def inside(root: Path, relative: Any, what: str) -> Path:
    """`root / relative` for a path read from a file (a manifest): refused unless it is a relative path
    that stays inside `root` (no absolute path, drive or '..')."""
    if not isinstance(relative, str) or not relative.strip() or "\0" in relative:
        raise ValueError(f"{what} must be a relative path, got {relative!r}")
    pure = Path(relative.replace("\\", "/"))
    if pure.is_absolute() or pure.anchor or ".." in pure.parts:
        raise ValueError(f"{what} {relative!r} leads outside {root}; paths must stay inside the folder")
    return root / pure


def _same_file_key(path: Path) -> str:
    return os.path.normcase(str(path.resolve()))


def plan_outputs(outputs: dict[Path, list[Path]], option: str = "out"
                 ) -> tuple[dict[Path, list[Path]], list[str]]:
    """Check, before anything is written, the files each input would write (input → its outputs).

    An input is refused, with a problem naming the files, when one of its outputs is an input of the run
    (itself included), is also an output of another input, or is an existing folder. Returns (the
    accepted inputs with their outputs, in order; the problems).
    """
    inputs = {_same_file_key(path): path for path in outputs}
    writers: dict[str, list[Path]] = {}
    for source, targets in outputs.items():
        for target in targets:
            writers.setdefault(_same_file_key(target), []).append(source)
    accepted: dict[Path, list[Path]] = {}
    problems: list[str] = []
    for source, targets in outputs.items():
        problem = None
        for target in targets:
            key = _same_file_key(target)
            others = [other for other in writers[key] if other != source]
            if key in inputs:
                problem = f"{source}: its output {target} would overwrite the input {inputs[key]}; " \
                          f"use another {option} folder (or a suffix)"
            elif others:
                problem = f"{source}: its output {target} would also be written for {', '.join(map(str, others))}; " \
                          f"rename one of them or process them separately"
            elif target.is_dir():
                problem = f"{source}: its output {target} is a folder; remove it or use another {option} folder"
            if problem:
                break
        if problem:
            problems.append(problem)
        else:
            accepted[source] = targets
    return accepted, problems
