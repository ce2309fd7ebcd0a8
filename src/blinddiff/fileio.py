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
from PIL import Image, UnidentifiedImageError

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


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) read from the file header only; raises ImageError for unreadable files."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            image.verify()
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: not a readable image ({err}); remove or replace the file") from None
    return height, width


@dataclass
class LoadedImage:
    """A decoded image with what is needed to write the result back in kind (grey, alpha, bit depth)."""

    rgb: np.ndarray  # float32 [H, W, 3] in [0, 1] (grey replicated)
    alpha: np.ndarray | None  # float32 [H, W] in [0, 1], or None
    grey: bool
    bit_depth: int  # 8 or 16

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
        with Image.open(path) as image:
            image.load()
            if image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                grey16 = np.asarray(image, dtype=np.float32) / 65535.0
                return LoadedImage(np.repeat(grey16.clip(0, 1)[..., None], 3, axis=2), None, True, 16)
            grey = image.mode in ("L", "LA", "1")
            alpha = np.asarray(image.getchannel("A"), np.float32) / 255.0 if image.mode in ("LA", "RGBA") else None
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except ImageError:
        raise
    except Exception as err:  # Pillow and pypng raise many kinds of errors for corrupt files
        raise ImageError(f"{path}: not a readable image ({type(err).__name__}: {err}); remove or replace the file") \
            from None
    return LoadedImage(rgb, alpha, grey, 8)


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
    with atomic_write(path) as handle:
        picture.save(handle, format=PIL_FORMATS.get(path.suffix.lower(), "PNG"), **({"quality": quality} if jpeg else {}))


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
