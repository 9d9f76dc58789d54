"""End to end in a real browser: the app on localhost, headless Chromium (Debian's, /usr/bin/chromium) driven by
Playwright. Load a generated case, click on the lesion in the axial view, see the mask in all three views, undo,
redo, download the NIfTI and check it against the lesion; a 2D picture upload is a message, not a crash.

Screenshots of every step go to `test-artifacts/app/` at the top of the repository (or `$SAM3D_APP_ARTIFACTS`); the
path is printed. The test fails, with the reason, when the browser cannot start: it never skips.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_app import ball_model, free_port, lesion_centre, red_pixels, write_png

from sam3d_hf.app import VIEWS, ViewGeometry
from sam3d_hf.synthetic import generate_case

REPOSITORY = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("SAM3D_CHROMIUM", "/usr/bin/chromium")
# Without the networking flags Chromium keeps calling Google's hosts, which this closed network refuses.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
SEED, ORIENTATION = 7, "oblique"
DISPLAY_SIZE = 400


@pytest.fixture(scope="module")
def artifacts() -> Path:
    folder = Path(os.environ.get("SAM3D_APP_ARTIFACTS", REPOSITORY / "test-artifacts" / "app"))
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    print(f"\nbrowser screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def app_url():
    from sam3d_hf.app import build_app

    model, processor = ball_model(delay=3.0)  # a slow "encoder", so the progress message can be seen
    page = build_app("ball", models={"ball": (model, processor)}, display_size=DISPLAY_SIZE)
    page.queue()
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    page.close()


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        pytest.fail(f"the browser test needs Playwright (pip install -e '.[dev]'): {error}")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: install it with `apt-get install chromium` (.ci/run does)")
    with sync_playwright() as playwright:
        try:
            context = playwright.chromium.launch_persistent_context(
                str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
                args=CHROMIUM_FLAGS, viewport={"width": 1500, "height": 1300}, accept_downloads=True,
            )  # fmt: skip
        except Exception as error:
            pytest.fail(f"Chromium ({CHROMIUM}) could not start under Playwright: {error}")
        try:
            yield context.new_page()
        finally:
            context.close()


def view_picture(page, view: str) -> np.ndarray:
    """What the browser shows of a view, as RGB (a screenshot of its image element)."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.locator(f"#view-{view} img").screenshot())).convert("RGB"))


def wait_for_red(page, view: str, present: bool, timeout: float = 20.0) -> int:
    """Wait until the view shows the mask (or no longer does); returns its red pixel count."""
    deadline = time.monotonic() + timeout
    while True:
        count = red_pixels(view_picture(page, view))
        if (count > 20) == present or time.monotonic() > deadline:
            return count
        time.sleep(0.25)


def wait_for_status(page, text: str, timeout: float = 60_000) -> str:
    page.wait_for_function(
        "text => document.querySelector('#status')?.innerText.includes(text)", arg=text, timeout=timeout
    )
    return page.locator("#status").inner_text()


def click_pixel(page, view: str, x: float, y: float) -> None:
    """Click where pixel (x, y) of the view's picture is on the screen (the image is scaled to fit, centred)."""
    box = page.evaluate(
        """view => {
            const img = document.querySelector(`#view-${view} img`);
            const r = img.getBoundingClientRect();
            const scale = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
            return {left: r.left + (r.width - img.naturalWidth * scale) / 2,
                    top: r.top + (r.height - img.naturalHeight * scale) / 2, scale: scale,
                    width: img.naturalWidth, height: img.naturalHeight};
        }""",
        view,
    )
    page.mouse.click(box["left"] + (x + 0.5) * box["scale"], box["top"] + (y + 0.5) * box["scale"])


def test_click_undo_redo_download_in_chromium(app_url, browser_page, artifacts, tmp_path):
    page = browser_page
    image, label = generate_case(SEED, orientation=ORIENTATION, num_lesions=1)
    lesion = np.asarray(label.dataobj) == 2
    target = lesion_centre(np.asarray(label.dataobj))

    page.goto(app_url)
    page.wait_for_function("() => document.querySelector('#model-info')?.innerText.includes('ball')", timeout=60_000)
    page.screenshot(path=artifacts / "01_opened.png", full_page=True)

    page.locator("#seed input").fill(str(SEED))
    page.click("#load-generated")
    wait_for_status(page, f"loaded synthetic_seed{SEED}.nii.gz")
    assert f"voxel (i, j, k) = {target}" in page.locator("#cursor").inner_text()  # opened on the lesion's slice
    page.wait_for_function("() => document.querySelector('#view-axial img')?.naturalWidth > 0")
    assert all(wait_for_red(page, view, present=False) <= 20 for view in VIEWS)
    page.screenshot(path=artifacts / "02_case_loaded.png", full_page=True)

    # A positive click on the lesion in the axial view: first the encoder's progress message, then the mask.
    axial = ViewGeometry.build("axial", image.affine, image.shape, DISPLAY_SIZE)
    click_pixel(page, "axial", *axial.voxel_to_pixel(target))
    notice = wait_for_status(page, "Encoding a new 32×32×32 patch", timeout=20_000)
    assert "a minute or more for ViT-B on a CPU" in notice
    page.screenshot(path=artifacts / "03_encoding.png", full_page=True)
    status = wait_for_status(page, "click 1 (positive)")
    assert "ran the encoder" in status
    counts = {view: wait_for_red(page, view, present=True) for view in VIEWS}
    assert all(count > 20 for count in counts.values()), counts
    table = page.locator("#clicks").inner_text().split()
    assert "ran" in table and all(str(v) in table for v in target), table  # the click's row: i, j, k, encoder
    page.screenshot(path=artifacts / "04_clicked.png", full_page=True)

    page.click("#undo")
    wait_for_status(page, "undone: 0 clicks")
    assert all(wait_for_red(page, view, present=False) <= 20 for view in VIEWS)
    page.screenshot(path=artifacts / "05_undone.png", full_page=True)

    page.click("#redo")
    wait_for_status(page, "redone: 1 click")
    assert all(wait_for_red(page, view, present=True) > 20 for view in VIEWS)
    page.screenshot(path=artifacts / "06_redone.png", full_page=True)

    page.click("#save")
    wait_for_status(page, "saved synthetic_seed7_sam3d_mask.nii.gz")
    link = page.locator("#mask-file a").first
    link.wait_for(timeout=20_000)
    with page.expect_download() as download_info:
        link.click()
    downloaded = tmp_path / download_info.value.suggested_filename
    download_info.value.save_as(downloaded)
    assert downloaded.name.endswith(".nii.gz")
    mask_image = nib.load(downloaded)
    mask = np.asarray(mask_image.dataobj).astype(bool)
    assert mask_image.shape == image.shape
    np.testing.assert_allclose(mask_image.affine, image.affine, atol=1e-6)
    assert int(mask_image.header["qform_code"]) == int(image.header["qform_code"])
    overlap = (mask & lesion).sum()
    assert overlap > 0.5 * mask.sum() and overlap > 100, (overlap, mask.sum(), lesion.sum())
    page.screenshot(path=artifacts / "07_saved.png", full_page=True)

    # An upload that is not a scan: a message in the page, and the session keeps its scan and mask.
    page.locator("#upload input[type=file]").set_input_files(str(write_png(tmp_path / "picture.png")))
    status = wait_for_status(page, "Error:")
    assert "could not be read as a scan" in status and "Traceback" not in page.content()
    assert all(wait_for_red(page, view, present=True) > 20 for view in VIEWS)
    page.screenshot(path=artifacts / "08_bad_upload.png", full_page=True)
