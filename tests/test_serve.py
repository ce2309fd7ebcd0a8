"""The web UI (blinddiff.serve): one request's work without Gradio, the command's checks before it serves, and
the page itself in a real headless browser (Debian's Chromium driven by Playwright; `make browser`)."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blinddiff.cli import main
from blinddiff.inference import BlindDiff
from blinddiff.serve import enhance
from conftest import sample_rgb


@pytest.fixture(scope="module")
def tiny(weights: Path) -> BlindDiff:
    return BlindDiff.from_pretrained(weights, device="cpu")


def test_enhance_gives_what_the_api_gives_with_its_bicubic_preview(tiny: BlindDiff) -> None:
    pixels = sample_rgb(32, 32)
    out = enhance(tiny, pixels, mode="fidelity", seed=3)
    sr, kernel = tiny.upscale(pixels, mode="fidelity", seed=3)
    np.testing.assert_array_equal(out.result, sr)
    np.testing.assert_allclose(out.kernel, kernel)
    assert out.bicubic.shape == out.result.shape == (128, 128, 3) and out.bicubic.dtype == np.uint8
    # the preview is the input enlarged: each 4×4 block of it averages to the input pixel under it
    blocks = out.bicubic.astype(float).reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
    assert np.abs(blocks - pixels).mean() < 4


def test_enhance_reports_the_noise_of_the_input_in_8_bit_levels(tiny: BlindDiff) -> None:
    flat = np.full((32, 32, 3), 128.0)
    noisy = np.clip(flat + np.random.default_rng(0).normal(0, 8, flat.shape), 0, 255).round().astype(np.uint8)
    assert enhance(tiny, flat.astype(np.uint8), mode="fidelity").noise_sigma < 1
    assert 4 < enhance(tiny, noisy, mode="fidelity").noise_sigma < 10  # σ 8 (its estimator runs low on 32²)


def test_enhance_refuses_bad_input_with_a_message(tiny: BlindDiff) -> None:
    with pytest.raises(ValueError, match="4x4; it must be at least 8x8"):
        enhance(tiny, sample_rgb(4, 4))
    with pytest.raises(ValueError, match="mode 'sharp' is unknown"):
        enhance(tiny, sample_rgb(16, 16), mode="sharp")
    with pytest.raises(ValueError, match=r"seed=-1"):
        enhance(tiny, sample_rgb(16, 16), mode="fidelity", seed=-1)


def test_serve_checks_weights_and_port_before_serving(weights: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--weights", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors not found" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--weights", str(weights), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}: 127.0.0.1:{port} is in use" in err and len(err.strip().splitlines()) == 1


def test_help_imports_neither_torch_nor_gradio() -> None:
    code = ("import sys\nfrom blinddiff.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'gradio') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "serve" in done.stdout and done.stdout.strip().endswith("[]"), done.stdout + done.stderr


@pytest.fixture
def chromium() -> str:
    """The system's Chromium (never Playwright's own download); skips, saying why, where it or Playwright is missing."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (run `make browser`)")
    path = os.environ.get("BLINDDIFF_CHROMIUM") or shutil.which("chromium")
    if path is None:
        pytest.skip("no Chromium for the browser test (run `make browser`, or set BLINDDIFF_CHROMIUM)")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(weights: Path, tmp_path: Path):
    """`blinddiff serve` with the tiny weights on a free port → its URL; stopped afterwards."""
    pytest.importorskip("gradio", reason="gradio is not installed (`make venv` installs it)")
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    process = subprocess.Popen([sys.executable, "-m", "blinddiff.cli", "serve", "--weights", str(weights),
                                "--port", str(port), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"blinddiff serve exited with {process.returncode}:\n{log.read()}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("blinddiff serve did not answer within 120 s")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.slow
def test_the_page_upscales_an_upload_in_a_real_browser(chromium: str, server: str, tmp_path: Path) -> None:
    from playwright import sync_api

    photo, tiny_photo = tmp_path / "photo.png", tmp_path / "tiny.png"
    Image.fromarray(sample_rgb(32, 32)).save(photo)
    Image.fromarray(sample_rgb(4, 4)).save(tiny_photo)
    with sync_api.sync_playwright() as playwright:
        # flags of a machine without internet: Chromium's own background connections stay off
        browser = playwright.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        try:
            page = browser.new_page()
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            page.goto(server)
            page.set_input_files("#photo input[type=file]", str(photo))
            page.get_by_label("fidelity").check()
            sync_api.expect(page.locator("#steps input[type=number]")).to_have_value("1")  # the mode's steps
            page.click("#run")
            sync_api.expect(page.locator("#result img")).to_have_count(2, timeout=120_000)  # bicubic | result
            sync_api.expect(page.locator("#kernel img")).to_have_count(1, timeout=30_000)
            sync_api.expect(page.locator("#noise textarea")).to_have_value(re.compile(r"σ = \d+\.\d\d \(0–255"))
            link = page.locator("#download a").first.get_attribute("href")
            with urllib.request.urlopen(link, timeout=30) as response:
                result = Image.open(io.BytesIO(response.read()))
            assert (result.format, result.size) == ("PNG", (128, 128))
            kernel = page.locator("#kernel img").evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert kernel == [88, 88]  # the tiny model's 11×11 kernel, magnified 8×

            page.set_input_files("#photo input[type=file]", str(tiny_photo))
            page.click("#run")
            toast = page.locator(".toast-body").first
            sync_api.expect(toast).to_contain_text("4x4; it must be at least 8x8", timeout=30_000)
            assert "Traceback" not in toast.inner_text()
        finally:
            browser.close()
    elsewhere = sorted({url for url in requested if not url.startswith((server, "data:", "blob:"))})
    assert not elsewhere, f"the page fetched from elsewhere: {elsewhere}"
