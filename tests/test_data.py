"""Training data: HR patches with counter-based randomness and batched on-the-fly degradation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blinddiff.data import DataConfig, HRPatches, TrainingDegradation, augment
from blinddiff.degradation import degrade
from blinddiff.fileio import ImageError, expand_inputs, read_rgb
from conftest import sample_rgb


def test_patches_shape_range_and_determinism(hr_folder: Path) -> None:
    patches = HRPatches(hr_folder, crop=32, seed=3)
    assert len(patches) == 2
    first = patches[0]
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, HRPatches(hr_folder, crop=32, seed=3)[0])  # same (seed, epoch, index)
    assert torch.equal(first, patches[0, 0])  # a plain index is epoch 0
    assert not torch.equal(first, patches[1, 0])  # a new epoch gives new crops
    grey = patches[1]  # camera.png is single-channel: replicated to RGB
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_patches_are_crops_of_the_image(hr_folder: Path) -> None:
    image = read_rgb(hr_folder / "astronaut.png")
    patch = (HRPatches(hr_folder, crop=16, augment=False)[0] * 255).round().byte().permute(1, 2, 0).numpy()
    windows = np.lib.stride_tricks.sliding_window_view(image, (16, 16, 3))[..., 0, :, :, :]
    assert (windows == patch).all(axis=(-1, -2, -3)).any()


def test_augment_gives_exactly_the_eight_dihedral_transforms() -> None:
    def key(array: np.ndarray) -> tuple:
        return array.shape, np.ascontiguousarray(array).tobytes()

    patch = np.arange(2 * 3 * 2).reshape(2, 3, 2)  # non-square, distinct values: the 8 transforms all differ
    dihedral = {key(np.rot90(flipped, turns)) for flipped in (patch, patch[:, ::-1]) for turns in range(4)}
    seen = {key(augment(patch, np.random.default_rng(i))) for i in range(200)}
    assert len(dihedral) == 8 and seen == dihedral


def test_rgba_and_16_bit_images_are_converted(tmp_path: Path) -> None:
    rgba = np.dstack([sample_rgb(40, 40), np.full((40, 40), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((40, 40), 65535, np.uint16)).save(tmp_path / "deep.png")
    assert np.array_equal(read_rgb(tmp_path / "rgba.png"), rgba[..., :3])
    assert (read_rgb(tmp_path / "deep.png") == 255).all()


def test_bad_training_images_are_named(hr_folder: Path) -> None:
    (hr_folder / "sub").mkdir()
    (hr_folder / "sub" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    Image.fromarray(np.zeros((20, 50, 3), np.uint8)).save(hr_folder / "sub" / "small.webp")
    with pytest.raises(ImageError) as err:
        HRPatches(hr_folder, crop=32)
    assert "corrupt.jpg" in str(err.value) and "small.webp" in str(err.value) and "skip_bad" in str(err.value)
    with pytest.warns(UserWarning) as caught:
        patches = HRPatches(hr_folder, crop=32, skip_bad=True)
    assert any("corrupt.jpg" in str(w.message) for w in caught) and any("small.webp" in str(w.message) for w in caught)
    assert [p.name for p in patches.files] == ["astronaut.png", "camera.png"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HRPatches(hr_folder / "nope")


@pytest.mark.parametrize("setting, scale, size", [("iso", 4, 21), ("aniso", 2, 15), ("motion", 1, 16)])
def test_training_degradation(setting: str, scale: int, size: int) -> None:
    hr = torch.rand(3, 3, 32, 32)
    degradation = TrainingDegradation(setting, scale, size)
    out_hr, lr, kernels = degradation(hr, torch.Generator().manual_seed(0))
    assert out_hr is hr and lr.shape == (3, 3, 32 // scale, 32 // scale) and kernels.shape == (3, size, size)
    assert torch.allclose(kernels.sum((-1, -2)), torch.ones(3), atol=1e-5)
    assert torch.equal(lr, (lr * 255).round() / 255)  # quantised to 8 bits
    assert kernels.min() >= 0
    # The kernel returned is the one that made the LR: the triplet is the forward model of docs/method.md §1.
    torch.testing.assert_close(lr, degrade(hr, kernels, scale, quantize=True), atol=0, rtol=0)
    again = degradation(hr, torch.Generator().manual_seed(0))
    assert torch.equal(lr, again[1]) and torch.equal(kernels, again[2])
    assert not torch.equal(kernels[0], kernels[1])  # one kernel per sample


def test_data_config_validation() -> None:
    with pytest.raises(ValueError, match="setting"):
        DataConfig(setting="gauss")
    with pytest.raises(ValueError, match="multiple"):
        DataConfig(crop=130, scale=4)
    with pytest.raises(ValueError, match="scale"):
        DataConfig(crop=128, scale=0)


def test_expand_inputs(hr_folder: Path) -> None:
    files, problems = expand_inputs([str(hr_folder), str(hr_folder / "camera.png"), str(hr_folder / "*.png"),
                                     str(hr_folder / "missing.png")])
    assert [f.name for f in files] == ["astronaut.png", "camera.png"]
    assert len(problems) == 1 and "missing.png" in problems[0]


def test_atomic_writes_leave_no_temporary_files_and_usual_permissions(tmp_path: Path) -> None:
    from blinddiff.fileio import UMASK, atomic_write

    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "out.bin") as handle:
            handle.write(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    with atomic_write(tmp_path / "out.bin") as handle:
        handle.write(b"whole")
    assert (tmp_path / "out.bin").read_bytes() == b"whole"
    assert (tmp_path / "out.bin").stat().st_mode & 0o777 == 0o666 & ~UMASK
