"""How fast the dashboard answers in a real browser: upload -> overlay, and a parameter change -> re-render.

Starts ``streamlit run dashboard/app.py`` and a baseline page that only draws the uploaded image with
plotly (``benchmarks/baseline_app.py``), both warm (models loaded once), and drives them with headless
Chromium (Debian's ``/usr/bin/chromium`` through Playwright). Each upload happens in a freshly
opened page and uses a new image, so nothing of it is cached:

* warm-up: the first upload on each fresh server, timed like the others but after the page load
  (which loads the model) and not counted in the medians: first code paths, plotly's first load;
* upload: from the file input's change event until the overlay figure shows the new image and the
  script run it triggers is over (the heads and patch figures of the new image included), then the
  next frame;
* parameter change on an already explained image: an explanation parameter (start layer / discard
  ratio, recomputed) and a display-only one (overlay opacity, nothing recomputed), each from the key
  press until the overlay is redrawn with the new content and the (fragment) run is over.

What is waited for is what the user sees: the plotly figure in the overlay's container (``st-key-overlay``),
watched with a MutationObserver armed before the interaction, must differ from its state before it (for
opacity: carry a trace with the new opacity) and have stopped changing, and the script must be idle.
Streamlit's run indicator alone is not enough: a fragment rerun does not reliably toggle it, and the
remounted chart is drawn after the run has ended.

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

# Each timed step waits for what the user sees, not for Streamlit's run indicator alone: the stApp
# element's data-test-script-state does not reliably toggle for a fast fragment rerun (both changes can
# land in one React commit, so no "running" is ever seen), and when it does toggle, the overlay figure
# is still being redrawn after "notRunning" (Streamlit remounts the plotly chart, which draws after the
# run). ARM is evaluated BEFORE the interaction: it fingerprints the figure in the watched container and
# starts recording (a) every DOM mutation inside that container, with the frame painted after it,
# (b) the script-state changes and (c) the first input event (the key press / file handed over).
ARM = """([sel, expectOpacity]) => {
    if (window.__watch) window.__watch.stop();
    const app = document.querySelector('[data-testid=stApp]');
    const main = document.querySelector('[data-testid=stMain]') || document.body;
    const t0 = performance.now();
    const w = {sel, expectOpacity, t0, input: null, runs: [], first: null, last: null, drawn: null};
    const plot = () => document.querySelector(sel + ' .js-plotly-plot');
    // The figure as drawn: the SVG of the plotly chart (image hrefs and styles included), without the
    // random ids of the plot and of its traces (Streamlit remounts the chart on a rerun: new ids).
    w.sig = () => {
        const gd = plot(), box = gd && gd.querySelector('.svg-container');
        if (!box || !gd._fullLayout) return '';
        let text = box.outerHTML;
        for (const id of [gd._fullLayout._uid, ...(gd._fullData || []).map(t => t.uid)]) {
            if (id) text = text.split(id).join('');
        }
        let h = 0x811c9dc5;
        for (let i = 0; i < text.length; i++) h = Math.imul(h ^ text.charCodeAt(i), 0x01000193);
        return text.length + ':' + (h >>> 0).toString(16);
    };
    w.hasExpected = () => {
        if (expectOpacity === null) return true;
        const gd = plot();
        return !!gd && Array.isArray(gd.data)
            && gd.data.some(t => Math.abs((t.opacity === undefined ? 1 : t.opacity) - expectOpacity) < 1e-6);
    };
    w.before = w.sig();
    const inside = n => n && n.nodeType === 1 && (n.closest(sel) || n.querySelector(sel));
    const painted = () => requestAnimationFrame(() => setTimeout(() => { w.drawn = performance.now(); }));
    const mo = new MutationObserver(ms => {
        if (!ms.some(m => inside(m.target) || [...m.addedNodes, ...m.removedNodes].some(inside))) return;
        const now = performance.now();
        if (w.first === null) w.first = now;
        w.last = now;
        w.drawn = null;
        painted();
    });
    mo.observe(main, {attributes: true, childList: true, subtree: true, characterData: true});
    const so = new MutationObserver(() => {
        const run = [app.getAttribute('data-test-script-state'), performance.now()];
        w.runs.push(run);
        requestAnimationFrame(() => setTimeout(() => { run[2] = performance.now(); }));
    });
    so.observe(app, {attributes: true, attributeFilter: ['data-test-script-state']});
    const onInput = e => { if (w.input === null) w.input = performance.now(); };
    for (const type of ['keydown', 'change', 'input']) document.addEventListener(type, onInput, true);
    w.stop = () => {
        mo.disconnect(); so.disconnect();
        for (const type of ['keydown', 'change', 'input']) document.removeEventListener(type, onInput, true);
    };
    window.__watch = w;
    return t0;
}"""

# Resolves once the figure in the watched container shows new content (a fingerprint different from the
# one taken before the interaction; for an opacity change, a trace with the new opacity), nothing in the
# container has changed for QUIET_MS (plotly draws a remounted chart in a few passes), and the script
# run is over (stApp notRunning). The time reported is the later of the frame painted after the
# container's last change and the frame painted after the run ended, measured from the input event.
SETTLED = """([quietMs, timeoutMs]) => new Promise((resolve, reject) => {
    const w = window.__watch;
    const app = document.querySelector('[data-testid=stApp]');
    const check = () => {
        const now = performance.now();
        const idle = app.getAttribute('data-test-script-state') === 'notRunning';
        if (now - w.t0 > timeoutMs) {
            w.stop();
            const sig = w.sig();
            return reject(new Error(`${w.sel}: nothing settled within ${timeoutMs / 1000} s: ` +
                `container changed: ${w.last !== null}, figure changed: ${sig !== w.before}, ` +
                `expected content: ${w.hasExpected()}, script idle: ${idle}, ` +
                `script states: ${JSON.stringify(w.runs.map(r => [r[0], Math.round(r[1] - w.t0)]))}`));
        }
        const quiet = w.last !== null && now - w.last >= quietMs && w.drawn !== null;
        const ended = w.runs.filter(r => r[0] === 'notRunning');
        const end = ended.length ? ended[ended.length - 1] : null;
        if (!quiet || !idle || (end && end[2] === undefined) || w.sig() === w.before || !w.hasExpected()) {
            return setTimeout(check, quiet ? 50 : 20);
        }
        w.stop();
        const from = w.input !== null ? w.input : w.t0;
        const started = w.runs.find(r => r[0] === 'running');
        const done = Math.max(w.drawn, end ? end[2] : 0);
        resolve({total: done - from, input: from - w.t0, start: started ? started[1] - from : null,
                 first: w.first - from, shown: w.drawn - from, end: end ? end[2] - from : null});
    };
    check();
})"""

QUIET_MS = 800
TIMEOUT_MS = 60_000


def photo(i: int) -> bytes:
    """A distinct 512x384 JPEG per repeat (a crop of scikit-learn's bundled photos): never cached."""
    from PIL import Image

    from vitviz.data.samples import sklearn_image_dir

    src = Image.open(sklearn_image_dir() / ("china.jpg" if i % 2 == 0 else "flower.jpg")).convert("RGB")
    box = (8 * i, 4 * i, 8 * i + 600, 4 * i + 420)
    buf = io.BytesIO()
    src.crop(box).resize((512, 384)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def settled(page, label: str) -> float:
    """Wait until the figure ARM watches shows the new content and the run is over; seconds from the input."""
    phases = page.evaluate(SETTLED, [QUIET_MS, TIMEOUT_MS])
    PHASES.append((label, phases))
    return phases["total"] / 1000.0


def timed_upload(page, url: str, ready: str, watch: str, data: bytes, name: str) -> float:
    """Hand a new image to the file input; time until ``watch``'s figure shows it and the run is over."""
    page.goto(url)
    page.wait_for_selector(ready)
    page.wait_for_selector("[data-testid=stApp][data-test-script-state=notRunning]")
    page.wait_for_timeout(300)  # let the first page settle: we time the upload, not the page load
    page.evaluate(ARM, [watch, None])
    page.locator("[data-testid=stFileUploaderDropzoneInput]").set_input_files(
        files=[{"name": name, "mimeType": "image/jpeg", "buffer": data}])
    took = settled(page, "upload")
    page.get_by_text(name).first.wait_for()
    return took


def timed_key(page, slider_key: str, watch: str, opacity: bool = False) -> float:
    """Press → (← at the maximum) on a slider; time until ``watch``'s figure is redrawn and the run is over.

    ``opacity``: the slider sets the opacity of a trace of that figure; also wait for a trace with the new value.
    """
    thumb = page.locator(f".st-key-{slider_key} input[type=range]").first
    value, step, top = thumb.evaluate("e => [Number(e.value), Number(e.step) || 1, Number(e.max)]")
    at_max = value >= top
    expect = round(value + (-step if at_max else step), 6) if opacity else None
    thumb.focus()
    page.evaluate(ARM, [watch, expect])
    page.keyboard.press("ArrowLeft" if at_max else "ArrowRight")
    return settled(page, slider_key)


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
    app_ready, app_fig = ".st-key-overlay .js-plotly-plot", ".st-key-overlay"  # the overlay (Explore page)
    base_ready, base_fig = "[data-testid=stFileUploaderDropzone]", ".st-key-image"
    with StreamlitServer("dashboard/app.py", env=env) as app, \
            StreamlitServer("benchmarks/baseline_app.py", env=env) as base, sync_playwright() as p:
        browser = launch_chromium(p)

        def fresh():
            ctx = browser.new_context(viewport={"width": 1440, "height": 1000})
            page = ctx.new_page()
            page.set_default_timeout(300_000)
            return ctx, page

        # warm both servers (imports, model loading, first compilation of code paths)
        warmup = {}
        for name, url, ready, fig in (("app", app.url, app_ready, app_fig), ("base", base.url, base_ready, base_fig)):
            ctx, page = fresh()
            warmup[name] = timed_upload(page, url, ready, fig, photo(99), "warmup.jpg")
            ctx.close()

        uploads, baselines, base_redraw, recompute, display = [], [], [], [], []
        for i in range(args.repeats):
            ctx, page = fresh()
            baselines.append(timed_upload(page, base.url, base_ready, base_fig, photo(2 * i + 1), f"base_{i}.jpg"))
            page.wait_for_timeout(1500)
            for _ in range(2):
                base_redraw.append(timed_key(page, "opacity", base_fig, opacity=True))
                page.wait_for_timeout(1000)
            ctx.close()
            ctx, page = fresh()
            uploads.append(timed_upload(page, app.url, app_ready, app_fig, photo(2 * i), f"upload_{i}.jpg"))
            page.wait_for_timeout(1500)  # an already explained image: the upload's figures have settled
            param = "discard" if page.locator(".st-key-discard").count() else page.evaluate(
                "() => [...document.querySelector('[class*=\"st-key-start_\"]').classList]"
                ".find(c => c.startsWith('st-key-start_')).slice('st-key-'.length)")
            for _ in range(2):
                recompute.append(timed_key(page, param, app_fig))
                page.wait_for_timeout(1000)
                display.append(timed_key(page, "opacity", app_fig, opacity=True))
                page.wait_for_timeout(1000)
            ctx.close()
        browser.close()

    def line(name: str, values: list[float], target: float | None, base: float | None = None) -> str:
        """Median, range, ratio to a baseline median and the verdict against a target."""
        med = statistics.median(values)
        parts = [f"{name:<41} median {med:6.3f} s   (min {min(values):.3f}, max {max(values):.3f})"]
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
    print(f"warm-up (first upload on a fresh server, page load not timed): dashboard {warmup['app']:.3f} s, "
          f"baseline {warmup['base']:.3f} s")
    print(line("baseline: upload -> image drawn", baselines, None))
    print(line("baseline: slider -> image redrawn", base_redraw, None))
    print(line("dashboard: upload -> overlay drawn", uploads, 2.0, b))
    print(line("dashboard: explanation parameter change", recompute, 0.5, b))
    print(line("dashboard: display-only change (opacity)", display, 0.5, b))
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"(each time: from the input event until the watched figure shows the new content and the run is over, "
          f"then the next frame; ratios to the baseline's upload; the baseline's own slider redraw resends the "
          f"full-size image: {r:.3f} s. Load average {load} on {os.cpu_count()} cores)")
    if args.v:
        def ms(x: float | None) -> str:
            return "     -" if x is None else f"{x:6.1f}"

        print("  ms after the input event (arm->input: Playwright's own delay, not counted):")
        print("  step         arm->input   run start  1st change  fig. drawn  run ended     total")
        for key, ph in PHASES:
            print(f"  {key:<12} {ms(ph['input']):>10}  {ms(ph['start']):>10}  {ms(ph['first']):>10}"
                  f"  {ms(ph['shown']):>10}  {ms(ph['end']):>10}  {ph['total']:8.1f}")


if __name__ == "__main__":
    main()
