"""How fast the dashboard answers in a real browser: upload -> overlay, and a parameter change -> re-render.

Starts ``streamlit run dashboard/app.py`` and a baseline page that only draws the uploaded image with
plotly (``benchmarks/baseline_app.py``), both warm (models loaded once), and drives them with headless
Chromium (Debian's ``/usr/bin/chromium`` through Playwright). Each upload happens in a freshly
opened page and uses a new image, so nothing of it is cached:

* upload: from handing the file to the file input until the script run it triggers has finished
  and the next frame is drawn (the overlay, heads and patch figures of the new image);
* parameter change on an already explained image: an explanation parameter (start layer / discard
  ratio, recomputed) and a display-only one (overlay opacity, nothing recomputed).

Prints medians and the ratio to the baseline, measured side by side in one run. Targets (2-core
CPU): upload <= 2 s, parameter change <= 0.5 s.

    python benchmarks/bench_dashboard.py [--repeats 5] [--checkpoints DIR]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dashboard.harness import StreamlitServer, launch_chromium  # noqa: E402

WATCH = """() => {
    const app = document.querySelector('[data-testid=stApp]');
    window.__runs = [];
    new MutationObserver(() => window.__runs.push([app.getAttribute('data-test-script-state'), performance.now()]))
        .observe(app, {attributes: true, attributeFilter: ['data-test-script-state']});
    return performance.now();
}"""

# Resolves with the time of the first frame drawn after a run that started after t0 has finished.
FINISHED = """(t0) => new Promise((resolve, reject) => {
    const check = () => {
        if (performance.now() - t0 > 60000) return reject(new Error('no script run finished within 60 s'));
        const runs = window.__runs.filter(r => r[1] >= t0);
        const started = runs.findIndex(r => r[0] === 'running');
        const done = started >= 0 ? runs.slice(started).find(r => r[0] === 'notRunning') : undefined;
        if (done) requestAnimationFrame(() => requestAnimationFrame(() => {
            window.__phases = [runs[started][1] - t0, done[1] - runs[started][1], performance.now() - done[1]];
            resolve(performance.now());
        }));
        else setTimeout(check, 5);
    };
    check();
})"""


def photo(i: int) -> bytes:
    """A distinct 512x384 JPEG per repeat (a crop of scikit-learn's bundled photos): never cached."""
    from PIL import Image

    from vitviz.dashboard_support import sklearn_image_dir

    src = Image.open(sklearn_image_dir() / ("china.jpg" if i % 2 == 0 else "flower.jpg")).convert("RGB")
    box = (8 * i, 4 * i, 8 * i + 600, 4 * i + 420)
    buf = io.BytesIO()
    src.crop(box).resize((512, 384)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def timed_upload(page, url: str, ready: str, data: bytes, name: str) -> float:
    page.goto(url)
    page.wait_for_selector(ready)
    page.wait_for_selector("[data-testid=stApp][data-test-script-state=notRunning]")
    page.wait_for_timeout(300)  # let the first page settle: we time the upload, not the page load
    t0 = page.evaluate(WATCH)
    page.locator("[data-testid=stFileUploaderDropzoneInput]").set_input_files(
        files=[{"name": name, "mimeType": "image/jpeg", "buffer": data}])
    t1 = page.evaluate(FINISHED, t0)
    page.get_by_text(name).first.wait_for()
    return (t1 - t0) / 1000.0


def timed_key(page, slider_key: str) -> float:
    """Press → (← at the maximum) on a slider; time until the run it triggers has finished and is drawn."""
    thumb = page.locator(f".st-key-{slider_key} input[type=range]").first
    at_max = thumb.evaluate("e => Number(e.value) >= Number(e.max)")
    thumb.focus()
    t0 = page.evaluate(WATCH)
    page.keyboard.press("ArrowLeft" if at_max else "ArrowRight")
    t1 = page.evaluate(FINISHED, t0)
    PHASES.append((slider_key, page.evaluate("() => window.__phases")))
    return (t1 - t0) / 1000.0


PHASES: list = []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("-v", action="store_true", help="also print where the time of each change goes")
    ap.add_argument("--checkpoints", help="checkpoint folder (default: the shipped checkpoints/)")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    env = {"HF_HUB_OFFLINE": "1"}
    if args.checkpoints:
        env["VITVIZ_CHECKPOINTS"] = str(Path(args.checkpoints).resolve())
    app_ready = ".st-key-overlay .js-plotly-plot"
    base_ready = "[data-testid=stFileUploaderDropzone]"
    with StreamlitServer("dashboard/app.py", env=env) as app, \
            StreamlitServer("benchmarks/baseline_app.py", env=env) as base, sync_playwright() as p:
        browser = launch_chromium(p)

        def fresh():
            ctx = browser.new_context(viewport={"width": 1440, "height": 1000})
            page = ctx.new_page()
            page.set_default_timeout(300_000)
            return ctx, page

        # warm both servers (imports, model loading, first compilation of code paths)
        for url, ready in ((app.url, app_ready), (base.url, base_ready)):
            ctx, page = fresh()
            timed_upload(page, url, ready, photo(99), "warmup.jpg")
            ctx.close()

        uploads, baselines, base_redraw, recompute, display = [], [], [], [], []
        for i in range(args.repeats):
            ctx, page = fresh()
            baselines.append(timed_upload(page, base.url, base_ready, photo(2 * i + 1), f"base_{i}.jpg"))
            page.wait_for_timeout(1500)
            for _ in range(2):
                base_redraw.append(timed_key(page, "opacity"))
                page.wait_for_timeout(1000)
            ctx.close()
            ctx, page = fresh()
            uploads.append(timed_upload(page, app.url, app_ready, photo(2 * i), f"upload_{i}.jpg"))
            page.wait_for_timeout(1500)  # an already explained image: the upload's figures have settled
            param = "discard" if page.locator(".st-key-discard").count() else next(
                (k for k in ("start_12", "start_8", "start_6", "start_4", "start_2")
                 if page.locator(f".st-key-{k}").count()), "discard")
            for _ in range(2):
                recompute.append(timed_key(page, param))
                page.wait_for_timeout(1000)
                display.append(timed_key(page, "opacity"))
                page.wait_for_timeout(1000)
            ctx.close()
        browser.close()

    def line(name: str, values: list[float], target: float | None, base: float | None = None) -> str:
        """Median, range, ratio to a baseline median and the verdict against a target."""
        med = statistics.median(values)
        parts = [f"{name:<38} median {med:6.3f} s   (min {min(values):.3f}, max {max(values):.3f})"]
        if base:
            parts.append(f"  {med / base:4.2f}x baseline")
        else:
            parts.append(" " * 16)
        if target:
            parts.append(f"  target <= {target} s: {'ok' if med <= target else 'MISSED'}")
        return "".join(parts)

    b, r = statistics.median(baselines), statistics.median(base_redraw)
    print(f"bench_dashboard: {args.repeats} repeats, fresh Chromium page per upload, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(line("baseline: upload -> image drawn", baselines, None))
    print(line("baseline: slider -> image redrawn", base_redraw, None))
    print(line("dashboard: upload -> overlay drawn", uploads, 2.0, b))
    print(line("dashboard: explanation parameter change", recompute, 0.5, b))
    print(line("dashboard: display-only change (opacity)", display, 0.5, b))
    print(f"(ratios to the baseline's upload; the baseline's own slider redraw resends the full-size image: "
          f"{r:.3f} s. Load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores)")
    if "-v" in sys.argv:
        for key, (start, run, draw) in PHASES:
            print(f"  {key:<10} key->run start {start:6.1f} ms, run {run:6.1f} ms, last frame {draw:5.1f} ms")


if __name__ == "__main__":
    main()
