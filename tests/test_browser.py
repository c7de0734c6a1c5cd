"""The dashboard in a real browser: `streamlit run dashboard/app.py` + Debian's headless Chromium.

Uploads an image, waits for the overlay, clicks a patch on the image, checks that a bad file is
refused in the page, and takes a screenshot of each page into a temporary folder (the suite never
writes into the checkout). Uses the shipped
checkpoints when there are any (tiny untrained ones otherwise). Skipped only when /usr/bin/chromium
is missing (`apt-get install chromium`; never `playwright install`).
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dashboard.harness import (
    CHROMIUM,
    StreamlitServer,
    launch_chromium,
    plot_point,
    runs_finished,
    screenshot_page,
    wait_done,
    wait_rerun,
)

if not os.path.exists(CHROMIUM):
    pytest.skip(
        f"\n\n*** {CHROMIUM} IS MISSING: the real-browser dashboard test is SKIPPED. ***\n"
        "*** Install it with `apt-get install -y chromium` (never `playwright install`). ***\n",
        allow_module_level=True,
    )

from playwright.sync_api import expect, sync_playwright  # noqa: E402

TIMEOUT_MS = 180_000  # first page loads import torch and load models on a slow, shared CPU


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def server(shipped_or_demo_folder):
    env = {"VITVIZ_CHECKPOINTS": str(shipped_or_demo_folder), "HF_HUB_OFFLINE": "1"}
    with StreamlitServer("dashboard/app.py", env=env) as srv:
        yield srv
    log = srv.log
    assert "Traceback" not in log, log
    assert "__path__._path" not in log, log  # the torch.classes / file-watcher error
    assert "Collecting usage statistics" not in log, log  # telemetry off, no prompt


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    yield pg
    context.close()


def shapes_png(seed: int = 7) -> bytes:
    from vitviz.data.shapes import make_shapes

    images, _, _ = make_shapes(1, seed=seed, img_size=64)
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, "PNG")
    return buf.getvalue()


def no_exceptions(page) -> None:
    assert page.locator("[data-testid=stException]").count() == 0


def open_page(page, url: str, ready: str) -> None:
    page.goto(url)
    page.wait_for_selector(f"{ready} .js-plotly-plot")
    wait_done(page, TIMEOUT_MS)
    no_exceptions(page)


def test_explore_upload_click_and_screenshot(server, page, shots):
    open_page(page, server.url, ".st-key-overlay")
    page.locator("[data-testid=stFileUploaderDropzoneInput]").set_input_files(
        files=[{"name": "my_scene.png", "mimeType": "image/png", "buffer": shapes_png()}])
    page.get_by_text(re.compile(r"my_scene\.png · 64×64 px")).wait_for()
    wait_done(page, TIMEOUT_MS)
    expect(page.locator(".st-key-overlay .js-plotly-plot")).to_be_visible()
    no_exceptions(page)

    # click a patch on the image: its attention map is drawn and the sliders follow
    grid_text = page.get_by_text(re.compile(r"Attention of patch \(\d+, \d+\)")).inner_text()
    assert grid_text
    page.locator(".st-key-patch_pick").scroll_into_view_if_needed()
    size = page.evaluate("() => document.querySelector('.st-key-patch_pick .js-plotly-plot')"
                         "._fullLayout.xaxis.range.map(Math.abs).reduce((a, b) => Math.max(a, b))")
    x, y = plot_point(page, ".st-key-patch_pick", 0.8 * size, 0.1 * size)  # near the top-right corner
    page.mouse.move(x, y)
    page.wait_for_timeout(300)  # plotly picks the point under the pointer on hover
    page.mouse.click(x, y)
    page.get_by_text(re.compile(r"Attention of patch \(0, [1-9]\d*\)")).wait_for()
    wait_done(page, TIMEOUT_MS)
    no_exceptions(page)
    page.mouse.move(0, 0)
    screenshot_page(page, shots / "explore.png")

    # the downloads: overlay PNG and the map as NPY
    with page.expect_download() as dl:
        page.locator(".st-key-dl_png button").click()
    png = Image.open(dl.value.path())
    assert png.format == "PNG" and png.size[0] >= 224
    with page.expect_download() as dl:
        page.locator(".st-key-dl_npy button").click()
    saliency = np.load(dl.value.path())
    assert saliency.ndim == 2 and saliency.min() >= 0.0 and saliency.max() <= 1.0

    # a file that is not an image is refused in the page, with the reason
    page.locator("[data-testid=stFileUploaderDropzoneInput]").set_input_files(
        files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"plain text, not pixels\n" * 8}])
    page.get_by_text("This file can't be used.").wait_for()
    wait_done(page, TIMEOUT_MS)
    no_exceptions(page)


def test_model_choice_follows_to_other_pages(server, page):
    open_page(page, server.url, ".st-key-overlay")
    page.locator(".st-key-ckpt_Shipped").click()
    option = page.get_by_role("option").filter(has_text=re.compile("hybrid_shapes"))
    before = runs_finished(page)
    option.first.click()
    wait_rerun(page, before, TIMEOUT_MS)  # the run the choice started, not the state before it began
    page.get_by_role("link", name="Embeddings").click()
    page.get_by_text("Position embeddings", exact=True).wait_for()
    wait_done(page, TIMEOUT_MS)
    page.get_by_text("A hybrid's tokens come from a CNN feature map").wait_for()  # the hybrid is still chosen
    no_exceptions(page)


def test_embeddings_screenshot(server, page, shots):
    open_page(page, f"{server.url}/embeddings", ".st-key-dist")
    assert page.locator("[data-testid=stPlotlyChart]").count() >= 3
    screenshot_page(page, shots / "embeddings.png")


def test_compare_screenshot(server, page, shots):
    open_page(page, f"{server.url}/compare", ".st-key-faith_curves")
    assert page.locator("[data-testid=stPlotlyChart]").count() >= 6
    screenshot_page(page, shots / "compare.png")
    shot = np.asarray(Image.open(shots / "compare.png"))
    assert shot.shape[0] > 1500 and shot.std() > 10  # a long, non-blank page


def test_clicking_a_point_of_the_embedding_map_shows_that_image_and_its_explanation(server, page):
    page.goto(f"{server.url}/representations")
    page.wait_for_selector(".st-key-rep_map .js-plotly-plot")
    wait_done(page, TIMEOUT_MS)
    no_exceptions(page)
    page.locator(".st-key-rep_map").scroll_into_view_if_needed()
    # the point farthest (in screen pixels) from every other, so that the click cannot land
    # on a neighbour, and the test image it stands for (its hover text)
    px, py, name = page.evaluate("""() => {
        const gd = document.querySelector('.st-key-rep_map .js-plotly-plot');
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
        const pts = gd._fullData.filter(d => d.x && d.x.length).flatMap(
            d => Array.from(d.x, (x, i) => [xa.l2p(x), ya.l2p(d.y[i]), x, d.y[i], d.text[i]]));  // x may be typed
        let best = pts[0], gap = -1;
        for (const p of pts) {
            const g = Math.min(...pts.filter(q => q !== p).map(q => Math.hypot(p[0] - q[0], p[1] - q[1])));
            if (g > gap) { gap = g; best = p; }
        }
        return [best[2], best[3], best[4]];
    }""")
    x, y = plot_point(page, ".st-key-rep_map", px, py)
    page.mouse.move(x, y)
    page.wait_for_timeout(300)  # plotly picks the point under the pointer on hover
    page.mouse.click(x, y)
    caption = page.locator(".st-key-rep_picked").get_by_text(re.compile(r"^test #\d+: ")).first
    caption.wait_for()
    wait_done(page, TIMEOUT_MS)
    no_exceptions(page)
    assert name.startswith("test #")  # each point's hover text names its test image ...
    assert caption.inner_text().startswith(f"{name}: ")  # ... and the image shown is the one clicked
    assert page.get_by_text(re.compile(r": predicts ")).count() >= 1  # beside it, its explanation
