"""Images and files in and out: finding, reading and writing images (in kind), and atomic writes.

An input image — a file, a PIL image, a numpy array or a tensor — is turned into float RGB in [0, 1] plus
an alpha channel, and its `ImageKind` remembers how it came (grey or colour, alpha, pixel type, layout,
metadata), so a result goes back out the same way: `load_image`/`save_image` for files,
`to_tensor`/`from_tensor` for the Python API; both share one decoder.

Every file blinddiff writes (images, kernels, manifests, checkpoints) goes through `atomic_write`, so an
interrupted run never leaves a half-written output behind: data go to a temporary file in the same folder,
which then replaces the target in one `os.replace`. A temporary file left by a killed process is named
after the host and the process that wrote it, so later runs remove it (`remove_temporaries`) once that
process is gone, and never touch anything else.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import socket
import struct
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["DEFAULT_JPEG_QUALITY", "IMAGE_EXTENSIONS", "UMASK", "ImageError", "ImageKind", "InputWarning",
           "LoadedImage", "ResultBuffer", "atomic_write", "check_decodes", "check_name_part", "check_output_folder",
           "expand_inputs", "expand_path", "find_images", "finite_or_null", "from_tensor", "image_size", "inside",
           "is_jpeg", "kernel_picture", "load_image", "output_kind", "plan_outputs", "read_rgb", "remove_temporaries",
           "resize_pixels", "rgb_to_tensor", "save_image", "tensor_to_rgb", "to_tensor", "write_json", "write_npy",
           "write_pixels", "write_png", "write_result"]

FLOAT_TOLERANCE = 1e-3  # float pixels this far outside [0, 1] are rounding, not another scale
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
UMASK = os.umask(0o22)  # read the process umask (the only way is to set it) ...
os.umask(UMASK)  # ... and put it back
PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".webp": "WEBP", ".tif": "TIFF",
               ".tiff": "TIFF"}


class ImageError(ValueError):
    """An input image that cannot be used; the message names the file and what to do."""


HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"  # names this machine in temporary file names
TEMPORARY = re.compile(r"\..+\.blinddiff-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[a-z0-9_]+\.tmp")
STALE_SECONDS = 24 * 3600  # a temporary file of another machine this old is no longer being written


class InputWarning(UserWarning):
    """An input used with a caveat the user should know (only its first frame, its alpha dropped, files
    skipped); the command line prints it as one line."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file next to `path`; on success it replaces `path` atomically, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:120]}.blinddiff-{HOST}-{os.getpid()}-",
                               suffix=".tmp")
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


def _process_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill would end the process: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_temporaries(folder: str | os.PathLike) -> None:
    """Delete the temporary files `atomic_write` leaves behind when a process is killed mid-write: those of
    this machine whose process has ended, and those of another machine (a shared folder) older than a day.
    Files that `atomic_write` did not name are never touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.glob(".*.blinddiff-*.tmp"):
        match = TEMPORARY.fullmatch(path.name)
        if match is None:
            continue
        with contextlib.suppress(FileNotFoundError):
            if match["host"] == HOST:
                stale = not _process_alive(int(match["pid"]))
            else:
                stale = time.time() - path.stat().st_mtime > STALE_SECONDS
            if stale and path.is_file():
                path.unlink()


def finite_or_null(data: Any) -> tuple[Any, int]:
    """`data` with every non-finite float (NaN, ±inf) replaced by None, and how many were: JSON has no
    such numbers (Python writes a bare ``NaN`` or ``Infinity`` that other JSON readers refuse)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None, 1
    if isinstance(data, dict):
        items = [(key, *finite_or_null(value)) for key, value in data.items()]
        return {key: value for key, value, _ in items}, sum(n for _, _, n in items)
    if isinstance(data, (list, tuple)):
        items = [finite_or_null(value) for value in data]
        return [value for value, _ in items], sum(n for _, n in items)
    return data, 0


def write_json(path: str | os.PathLike, data: Any) -> int:
    """Write `data` as indented, key-sorted JSON (byte-stable for equal data), atomically; non-finite
    floats are written as null (`finite_or_null`), and their number is returned for the caller to say."""
    data, nulls = finite_or_null(data)
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    with atomic_write(path, "w") as handle:
        handle.write(text)
    return nulls


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


def check_regular_file(path: Path) -> None:
    """Refuse what is not a plain file before opening it: reading a FIFO or a device would wait forever."""
    if not path.exists():
        raise FileNotFoundError(f"image {path} does not exist")
    if not path.is_file():
        raise ImageError(f"{path}: not a regular file (a folder, FIFO, socket or device); pass an image file")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied), from the file header only; raises ImageError
    for unreadable files and for files too large to decode safely (Pillow's decompression-bomb limit)."""
    check_regular_file(Path(path))
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
    check_regular_file(Path(path))
    try:
        with Image.open(path) as image:
            image.load()
            if image.format == "PNG":
                check_png_complete(Path(path))
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(f"{path}: not a readable image ({type(err).__name__}: {err}); remove or replace the file") \
            from None


@dataclass(frozen=True)
class ImageKind:
    """How an input image came, so that its result goes back the same way (files and the Python API alike)."""

    source: str  # "file", "pil", "numpy" or "tensor"
    channels: int  # 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA
    dtype: Any  # the pixels' numpy (or torch) type: uint8, uint16 or a float type (float: values in [0, 1])
    ndim: int = 3  # numpy [H, W] (2) or [H, W, C] (3); tensor [C, H, W] (3) or [B, C, H, W] (4)
    exif: bytes | None = None  # a file's EXIF, orientation applied (so reset) and its pixel size dropped
    icc_profile: bytes | None = None

    @property
    def grey(self) -> bool:
        return self.channels in (1, 2)

    @property
    def bit_depth(self) -> int:
        """8 for uint8 pixels, else 16 (how a file result is written: 16-bit PNG)."""
        return 8 if self.dtype in (np.uint8, torch.uint8) else 16


@dataclass
class LoadedImage:
    """A decoded image file with its kind (what is needed to write the result back in kind)."""

    rgb: np.ndarray  # float32 [H, W, 3] in [0, 1] (grey replicated)
    alpha: np.ndarray | None  # float32 [H, W] in [0, 1], or None
    kind: ImageKind

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]

    @property
    def grey(self) -> bool:
        return self.kind.grey

    @property
    def bit_depth(self) -> int:
        return self.kind.bit_depth


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type → samples per pixel
# Adam7 interlacing: (first column, first row, column step, row step) of each of the 7 passes
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_pixel_bytes(width: int, height: int, depth: int, colour: int, interlaced: bool) -> int:
    """Bytes of a PNG's decompressed pixel data (each row: one filter byte and its packed samples)."""
    def rows(w: int, h: int) -> int:
        return h * (1 + (w * PNG_CHANNELS[colour] * depth + 7) // 8) if w and h else 0

    if not interlaced:
        return rows(width, height)
    return sum(rows(max(0, (width - x + dx - 1) // dx), max(0, (height - y + dy - 1) // dy)) for x, y, dx, dy in ADAM7)


def check_png_complete(path: Path) -> None:
    """Refuse a PNG whose pixel data end before its header's last row. Pillow stops at the end of the
    compressed stream and fills the missing rows with black, without an error (whatever
    `ImageFile.LOAD_TRUNCATED_IMAGES` says), so the data are inflated here and counted, in bounded pieces."""
    with open(path, "rb") as handle:
        if handle.read(8) != PNG_SIGNATURE:
            return
        inflater, found, header = zlib.decompressobj(), 0, None
        while len(head := handle.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IHDR" and length >= 13:
                header = struct.unpack(">IIBBBBB", handle.read(13))
                handle.seek(length - 13 + 4, 1)
            elif kind == b"IDAT":
                pending = handle.read(length)
                while pending and not inflater.eof:
                    found += len(inflater.decompress(pending, 1 << 20))
                    pending = inflater.unconsumed_tail
                handle.seek(4, 1)
            elif kind == b"IEND":
                break
            else:
                handle.seek(length + 4, 1)
    if header is None or header[3] not in PNG_CHANNELS:
        return  # Pillow's own checks refuse such a file
    width, height, depth, colour, _, _, interlace = header
    expected = _png_pixel_bytes(width, height, depth, colour, bool(interlace))
    if found < expected:
        raise ImageError(f"{path}: truncated PNG: its pixel data hold {found} of the {expected} bytes its "
                         f"{width}x{height} header announces; re-save or replace the file")


def _png_bit_depth(path: Path) -> int:
    with open(path, "rb") as handle:
        header = handle.read(26)
    if header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR":
        return header[24]
    return 8


def _load_png16(path: Path) -> np.ndarray:
    """A 16-bit PNG's pixels, uint16 [H, W, planes] (pypng: Pillow decodes 16-bit RGB PNGs to 8 bits)."""
    import png

    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    return np.vstack([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(height, width, info["planes"])


def _pil_pixels(image: Image.Image) -> np.ndarray:
    """A PIL image's pixels in their own type: uint16 (16/32-bit grey), float32 (mode F), else uint8 grey,
    grey + alpha, RGB or RGBA (palettes expanded; a transparent colour becomes an alpha channel)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(image).clip(0, 65535).astype(np.uint16)
    if image.mode == "F":
        return np.asarray(image, dtype=np.float32)
    grey, alpha = image.mode in ("L", "LA", "1"), image.mode in ("LA", "RGBA", "PA") or "transparency" in image.info
    return np.asarray(image.convert(("L" if grey else "RGB") + ("A" if alpha else "")))


def _check_unit_range(values: torch.Tensor | np.ndarray, what: str) -> None:
    """Float pixels must be in [0, 1]: a 0–255 float image would otherwise be clamped to white."""
    low, high = float(values.min()), float(values.max())
    if low < -FLOAT_TOLERANCE or high > 1 + FLOAT_TOLERANCE:
        raise ValueError(f"float {what} must hold values in [0, 1], got [{low:.4g}, {high:.4g}]; divide 0–255 "
                         f"images by 255 (or pass them as uint8)")


def to_tensor(image: Any) -> tuple[torch.Tensor, torch.Tensor | None, ImageKind]:
    """PIL image / numpy array / tensor → (rgb [B, 3, h, w] float in [0, 1], alpha [B, 1, h, w] or None, its kind).

    Integer pixels are scaled by their type's range (uint8 /255, uint16 /65535); float pixels must be in [0, 1].
    `from_tensor` gives a result back in the same kind.
    """
    source = "pil" if isinstance(image, Image.Image) else "numpy"
    if isinstance(image, Image.Image):
        image = _pil_pixels(image)
    if isinstance(image, np.ndarray):
        dtype, ndim = image.dtype, image.ndim
        if image.dtype == np.uint8:
            array = image.astype(np.float32) / 255.0
        elif image.dtype == np.uint16:
            array = image.astype(np.float32) / 65535.0
        elif np.issubdtype(image.dtype, np.floating):
            array = image.astype(np.float32)
        else:
            raise ValueError(f"numpy images must be uint8, uint16 or float in [0, 1], got {image.dtype}")
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
            raise ValueError(f"numpy images must be [H, W] or [H, W, C] with C in 1–4, got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
    elif isinstance(image, torch.Tensor):
        source, dtype, ndim = "tensor", image.dtype, image.dim()
        if image.dim() == 3:
            image = image[None]
        if image.dim() != 4 or image.shape[1] not in (1, 2, 3, 4):
            raise ValueError(f"tensor images must be [C, H, W] or [B, C, H, W] with C in 1–4, got {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            image = image.float() / 255.0
        elif image.is_floating_point():
            image = image.float()
        else:
            raise ValueError(f"tensor images must be uint8 or float in [0, 1], got {image.dtype}")
    else:
        raise ValueError(f"cannot upscale a {type(image).__name__}; pass a PIL image, a numpy array or a tensor")
    channels = image.shape[1]
    if image.numel() == 0:
        raise ValueError(f"the image is empty ({image.shape[-1]}x{image.shape[-2]} pixels, batch {image.shape[0]}); "
                         f"pass an image with pixels")
    if not torch.isfinite(image).all():
        raise ValueError("input contains NaN or infinite values")
    _check_unit_range(image, "images")
    image = image.clamp(0, 1)
    alpha = image[:, channels - 1:] if channels in (2, 4) else None
    colour = image[:, : 3 if channels >= 3 else 1]
    rgb = colour.expand(-1, 3, -1, -1) if colour.shape[1] == 1 else colour
    return rgb.contiguous(), alpha, ImageKind(source, channels, dtype, ndim)


def from_tensor(rgb: torch.Tensor, alpha: torch.Tensor | None, kind: ImageKind) -> Any:
    """Undo `to_tensor`: rgb [B, 3, H, W] (+ alpha [B, 1, H, W]) in the kind, channel layout and type of the input.

    A "file" kind gives numpy pixels [H, W, C] in its type (what `save_image` writes).
    """
    colour = rgb.mean(1, keepdim=True) if kind.grey else rgb
    image = torch.cat([colour, alpha], 1) if alpha is not None else colour
    image = image.clamp(0, 1)
    if kind.source == "tensor":
        out = image.to(kind.dtype) if kind.dtype.is_floating_point else image.mul(255).round().to(torch.uint8)
        return out if kind.ndim == 4 else out[0]
    array = image[0].permute(1, 2, 0).cpu().numpy()
    if kind.dtype == np.uint8:
        array = np.round(array * 255).astype(np.uint8)
    elif kind.dtype == np.uint16:
        array = np.round(array * 65535).astype(np.uint16)
    else:
        array = array.astype(kind.dtype)
    if kind.source in ("numpy", "file"):
        return array[..., 0] if kind.ndim == 2 else array
    return _pil_image(array, kind)


def _pil_image(array: np.ndarray, kind: ImageKind) -> Image.Image:
    """Pixels [H, W, C] in the kind's type as the PIL image `from_tensor` gives for a "pil" kind."""
    if kind.dtype == np.uint16:
        return Image.fromarray(array[..., 0])
    if kind.dtype == np.float32:
        return Image.fromarray(np.ascontiguousarray(array[..., 0]), "F")
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)


class ResultBuffer:
    """A result preallocated in its kind's pixel type and layout and filled band by band (rows of the HR image,
    as `BlindDiff.stream` gives them), so a result of any size is held once, in 8/16 bits when it is written in
    8/16 bits; `image()` is then what `from_tensor` of the whole result gives."""

    def __init__(self, kind: ImageKind, batch: int, height: int, width: int) -> None:
        self.kind = kind
        self.parts = replace(kind, source="numpy", ndim=3) if kind.source in ("pil", "file") else kind
        if kind.source == "tensor":
            dtype = kind.dtype if kind.dtype.is_floating_point else torch.uint8
            shape = (batch, kind.channels, height, width) if kind.ndim == 4 else (kind.channels, height, width)
            self.pixels: Any = torch.empty(shape, dtype=dtype)
        else:
            if batch != 1:
                raise ValueError(f"a {kind.source} result holds one image, not {batch}")
            self.pixels = np.empty((height, width) if self.parts.ndim == 2 else (height, width, kind.channels),
                                   dtype=kind.dtype)

    def write(self, top: int, rgb: torch.Tensor, alpha: torch.Tensor | None = None) -> None:
        """HR rows from `top` on: rgb [B, 3, rows, W] in [0, 1] (+ alpha [B, 1, rows, W] when the kind has one)."""
        part = from_tensor(rgb, alpha if self.kind.channels in (2, 4) else None, self.parts)
        if self.kind.source == "tensor":
            self.pixels[..., top:top + part.shape[-2], :] = part
        else:
            self.pixels[top:top + part.shape[0]] = part

    def image(self) -> Any:
        return _pil_image(self.pixels, self.kind) if self.kind.source == "pil" else self.pixels


def load_image(path: str | os.PathLike) -> LoadedImage:
    """Decode any supported image (grey, grey+alpha, RGB, RGBA, palette, 8 or 16 bits) to float RGB + alpha."""
    path = Path(path)
    check_regular_file(path)
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty (0 bytes); remove or replace it")
    exif = icc = None
    try:
        with Image.open(path) as opened:
            frames = getattr(opened, "n_frames", 1)
            if frames > 1 and opened.format != "MPO":  # MPO: a camera's extra views of the same photo
                warnings.warn(f"{path}: holds {frames} frames or pages (animated or multi-page); only the first is "
                              f"used", InputWarning, stacklevel=2)
            if opened.format == "PNG":
                check_png_complete(path)
            if opened.format == "PNG" and _png_bit_depth(path) == 16:
                pixels = _load_png16(path)
            else:
                opened.load()  # decodes everything now: a damaged or truncated stream raises here
                image = ImageOps.exif_transpose(opened)  # a portrait phone photo is stored sideways
                exif, icc = kept_metadata(opened), opened.info.get("icc_profile")  # after: this drops the orientation
                pixels = _pil_pixels(image)
    except ImageError:
        raise
    except Exception as err:  # Pillow and pypng raise many kinds of errors for corrupt files
        raise ImageError(f"{path}: not a readable image ({type(err).__name__}: {err}); remove or replace the file") \
            from None
    if pixels.dtype == np.float32:
        _check_float_file(path, pixels)
    rgb, alpha, kind = to_tensor(pixels)
    kind = replace(kind, source="file", ndim=3, dtype=np.dtype(np.uint8 if kind.bit_depth == 8 else np.uint16),
                   exif=exif, icc_profile=icc)
    return LoadedImage(rgb[0].permute(1, 2, 0).contiguous().numpy(), None if alpha is None else alpha[0, 0].numpy(),
                       kind)


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


def _check_float_file(path: Path, grey: np.ndarray) -> None:
    """A 32-bit float image (Pillow mode F, e.g. float TIFF) is accepted with values in [0, 1], else refused."""
    low, high = (float(grey.min()), float(grey.max())) if grey.size else (0.0, 0.0)
    if not (np.isfinite(grey).all() and low >= -FLOAT_TOLERANCE and high <= 1 + FLOAT_TOLERANCE):
        raise ImageError(f"{path}: a floating-point image with values in [{low:.4g}, {high:.4g}]; blinddiff reads "
                         f"float images in [0, 1]; rescale it (or save it as 8/16-bit PNG)")


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image as uint8 RGB [H, W, 3]: grey is replicated, alpha dropped, 16 bits rounded to 8."""
    return np.round(load_image(path).rgb * 255.0).astype(np.uint8)


DEFAULT_JPEG_QUALITY = 95


def is_jpeg(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in (".jpg", ".jpeg")


def output_kind(kind: ImageKind, path: str | os.PathLike) -> ImageKind:
    """The kind of a file kind's pixels as written to `path`: [H, W, C] uint8, or uint16 for a 16-bit PNG;
    JPEG drops alpha (and 16 bits)."""
    sixteen = kind.bit_depth == 16 and Path(path).suffix.lower() == ".png"
    if is_jpeg(path) and kind.channels in (2, 4):
        warnings.warn(f"{path}: JPEG has no alpha channel, so the transparency is dropped; write PNG "
                      f"(ext=png) to keep it", InputWarning, stacklevel=2)
    channels = {2: 1, 4: 3}.get(kind.channels, kind.channels) if is_jpeg(path) else kind.channels
    return replace(kind, source="file", ndim=3, channels=channels, dtype=np.dtype(np.uint16 if sixteen else np.uint8))


def save_image(path: str | os.PathLike, image: LoadedImage, quality: int = DEFAULT_JPEG_QUALITY) -> None:
    """Write an image in kind (grey/RGB, alpha, 8/16 bits; JPEG drops alpha and 16 bits), atomically."""
    kind = output_kind(image.kind, path)
    result = ResultBuffer(kind, 1, *image.size)
    result.write(0, torch.from_numpy(np.ascontiguousarray(image.rgb)).permute(2, 0, 1)[None],
                 None if image.alpha is None else torch.from_numpy(np.ascontiguousarray(image.alpha))[None, None])
    write_pixels(path, result.image(), kind, quality)


def write_pixels(path: str | os.PathLike, pixels: np.ndarray, kind: ImageKind,
                 quality: int = DEFAULT_JPEG_QUALITY) -> None:
    """Write pixels [H, W, C] in `output_kind(…, path)` (uint8, or uint16 to a PNG) with the kind's metadata,
    atomically; `quality`: JPEG's, 1–100."""
    path = Path(path)
    jpeg, sixteen = is_jpeg(path), pixels.dtype == np.uint16
    if sixteen:
        import png

        planes = pixels.shape[2]
        writer = png.Writer(pixels.shape[1], pixels.shape[0], greyscale=planes <= 2, alpha=planes in (2, 4),
                            bitdepth=16)
        with atomic_write(path) as handle:
            writer.write(handle, pixels.reshape(pixels.shape[0], -1))
        return
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    picture = Image.fromarray(pixels[..., 0] if mode == "L" else np.ascontiguousarray(pixels), mode)
    options: dict[str, Any] = {"quality": quality} if jpeg else {}
    if kind.exif:
        options["exif"] = kind.exif
    if kind.icc_profile:
        options["icc_profile"] = kind.icc_profile
    save_picture(path, picture, PIL_FORMATS.get(path.suffix.lower(), "PNG"), **options)


class _WriteThrough:
    """A file handle without a descriptor, so that Pillow encodes through `write`, whose short writes are
    retried and whose errors (a full disk) raise, instead of writing to the descriptor itself, where some
    encoders (JPEG) ignore a short write and leave a truncated file that looks complete."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def save_picture(path: str | os.PathLike, picture: Image.Image, format: str, **options: Any) -> None:
    """Encode a PIL image into `path` atomically (every image blinddiff writes with Pillow comes here)."""
    with atomic_write(path) as handle:
        picture.save(_WriteThrough(handle), format=format, **options)


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 [H, W] or [H, W, 3] array as PNG, atomically (same array → same bytes)."""
    if array.dtype != np.uint8:
        raise ValueError(f"write_png expects uint8 pixels, got {array.dtype}")
    save_picture(path, Image.fromarray(array), "PNG")


def kernel_picture(kernel: np.ndarray, magnify: int = 8) -> np.ndarray:
    """A kernel [k, k] as a uint8 picture, scaled to its peak and magnified with nearest-neighbour blocks."""
    peak = float(kernel.max()) or 1.0
    pixels = np.round(np.clip(kernel / peak, 0, 1) * 255).astype(np.uint8)
    return np.kron(pixels, np.ones((magnify, magnify), np.uint8))


def write_result(target: Path, image: LoadedImage | np.ndarray, kernel: np.ndarray | None = None, *,
                 stem: str | None = None, estimate: dict | None = None, kind: ImageKind | None = None,
                 quality: int = DEFAULT_JPEG_QUALITY) -> list[Path]:
    """Write a result and, when given, its estimated kernel as `<stem>_kernel.npy` (the values) and
    `<stem>_kernel.png` (a picture) and the `estimate` (e.g. the noise level) as `<stem>_estimate.json`
    next to it (`stem`: the target's) → the files written. `image`: a `LoadedImage` written in kind, pixels
    in `kind` (`output_kind`, e.g. a filled `ResultBuffer`'s), or uint8 pixels [H, W, 3] written as they
    are. `quality`: of a JPEG target. The image comes last, so its presence means the set is complete. The
    estimate names the result and the kernel, so that later scans of the folder know them as blinddiff's
    outputs, not inputs (`expand_inputs`)."""
    kernel_files = []
    stem = stem or target.stem
    if kernel is not None:
        kernel_files = [target.parent / f"{stem}_kernel.npy", target.parent / f"{stem}_kernel.png"]
        write_npy(kernel_files[0], kernel)
        write_png(kernel_files[1], kernel_picture(kernel))
    if estimate is not None:
        kernel_files.append(target.parent / f"{stem}_estimate.json")
        write_json(kernel_files[-1], {**estimate, "result": target.name,
                                      **({"kernel": kernel_files[0].name} if kernel is not None else {})})
    if isinstance(image, LoadedImage):
        save_image(target, image, quality)
    elif kind is not None:
        write_pixels(target, image, kind, quality)
    else:
        write_png(target, image)
    return [target, *kernel_files]


def resize_pixels(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pixels [H, W, C] (uint8 or uint16) resized to size = (height, width) with Lanczos (Pillow), in their
    type: 8-bit images as a whole, 16-bit ones channel by channel in float (Pillow has no 16-bit RGB)."""
    height, width = size
    if (height, width) == pixels.shape[:2]:
        return pixels
    if pixels.dtype == np.uint8:
        mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
        image = Image.fromarray(pixels[..., 0] if mode == "L" else np.ascontiguousarray(pixels), mode)
        resized = np.asarray(image.resize((width, height), Image.Resampling.LANCZOS))
        return resized[..., None] if resized.ndim == 2 else resized
    top = float(np.iinfo(pixels.dtype).max)
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(pixels[..., c], dtype=np.float32), "F")
                         .resize((width, height), Image.Resampling.LANCZOS)) for c in range(pixels.shape[2])]
    return np.round(np.clip(np.stack(planes, axis=2), 0, top)).astype(pixels.dtype)


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


ESTIMATE_END = "_estimate.json"


def written_by_blinddiff(folders: set[Path]) -> set[Path]:
    """The outputs of earlier runs in `folders`: the result and kernel files named by each `<stem>_estimate.json`
    that `write_result` wrote there, and its `<stem>_trajectory` folder."""
    outputs: set[Path] = set()
    for folder in folders:
        for record in folder.glob(f"*{ESTIMATE_END}"):
            try:
                estimate = json.loads(record.read_text())
            except (OSError, ValueError):
                continue
            if not (isinstance(estimate, dict) and "input" in estimate and "noise_sigma" in estimate):
                continue  # not an estimate blinddiff wrote
            stem = record.name[: -len(ESTIMATE_END)]
            outputs |= {folder / f"{stem}_kernel.png", folder / f"{stem}_trajectory"}
            outputs |= {folder / Path(estimate[key]).name for key in ("result", "kernel")
                        if isinstance(estimate.get(key), str)}
    return outputs


def expand_inputs(inputs: list[str], out: str | os.PathLike | None = None) -> tuple[list[Path], list[str]]:
    """Resolve CLI inputs (files, folders, glob patterns) to image files, in order, without duplicates.

    Returns (files, problems); a problem names an input that matched nothing or is not a regular file, so
    the caller can report it and still process the rest. Files that folders and patterns turn up are
    skipped, with one `InputWarning`, when blinddiff wrote them (`written_by_blinddiff`) or when they lie in
    the output folder `out` inside a scanned folder, so a run never takes earlier outputs as inputs; a file
    named on its own is always taken.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    problems: list[str] = []
    skipped: list[Path] = []
    out_place = Path(out).resolve() if out is not None else None
    for item in inputs:
        path = Path(item)
        named = False
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            root = path.resolve()
            if out_place is not None and out_place != root and root in out_place.parents:
                inner = path / out_place.relative_to(root)  # spelled as rglob spells the files
                skipped += [p for p in found if p.is_relative_to(inner)]
                found = [p for p in found if not p.is_relative_to(inner)]
        elif path.exists():
            found, named = [path], True
        elif any(ch in item for ch in "*?["):
            found = sorted(p for p in Path().glob(item) if p.is_file()) if not path.is_absolute() else \
                sorted(p for p in Path(path.anchor).glob(str(path.relative_to(path.anchor))) if p.is_file())
        else:
            found = []
        if not found:
            problems.append(f"{item}: no such file, folder or matching image")
        elif named and not path.is_file():
            problems.append(f"{item}: not a regular file (a FIFO, socket or device); pass an image file")
            continue
        if not named:
            ours = written_by_blinddiff({p.parent for p in found} | {p.parent.parent for p in found})
            skipped += [p for p in found if p in ours or p.parent in ours]
            found = [p for p in found if p not in ours and p.parent not in ours]
        for p in found:
            if p not in seen:
                seen.add(p)
                files.append(p)
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:3]) + (" …" if len(skipped) > 3 else "")
        warnings.warn(f"skipped {len(skipped)} file(s) that blinddiff wrote ({shown}): outputs are not taken as "
                      f"inputs; name a file on its own to process it", InputWarning, stacklevel=2)
    return files, problems


def check_output_folder(out: str | os.PathLike, option: str = "out") -> None:
    """Refuse, before any work is done, an output folder that is a file, lies below one, or cannot be
    written (the folder, or the nearest existing folder above it, where it would be created)."""
    out = Path(out)
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"{option}={out}: {folder} is a file, not a folder; choose another folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ValueError(f"{option}={out}: {folder} is not writable (permissions or a read-only disk); "
                                 f"make it writable (e.g. chmod u+w {folder}) or choose another folder")
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
