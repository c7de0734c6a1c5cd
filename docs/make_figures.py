"""Render README's figures and the dashboard screenshots to PNG.

For every ``results/*/results.json`` of a data-efficiency comparison it draws
``vitviz.plots.data_efficiency_lines`` and saves ``docs/figures/data_efficiency_<dataset>.png``; for a
model comparison, ``accuracy_bars`` as ``docs/figures/compare_<dataset>.png``. The figures are the
dashboard's own plotly figures, drawn by headless Chromium (Debian's ``/usr/bin/chromium`` through
Playwright, plotly.js inlined: no network).

It then runs the dashboard on the shipped checkpoints (``dashboard.harness.StreamlitServer``) and
saves a whole-page screenshot of each page as ``docs/screenshots/{explore,embeddings,compare}.png``:
README's screenshots come from here, never from the test suite.

    python docs/make_figures.py [--results results] [--out docs/figures] [--screenshots docs/screenshots]
                                [--no-figures] [--no-screenshots]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dashboard.harness import StreamlitServer, launch_chromium, screenshot_page, wait_done  # noqa: E402
from dashboard.support import read_results  # noqa: E402
from vitviz.plots import accuracy_bars, data_efficiency_lines  # noqa: E402


def figures(results: Path) -> dict[str, object]:
    """File stem -> plotly figure, one per comparison found under ``results``."""
    out: dict[str, object] = {}
    for summary in read_results(results):
        dataset, rows = summary["dataset"], summary["rows"]
        if summary["kind"] == "data-efficiency":
            out[f"data_efficiency_{dataset}"] = data_efficiency_lines(
                rows, title=f"Data efficiency on {dataset}: test accuracy vs training data")
        else:
            out[f"compare_{dataset}"] = accuracy_bars(rows, title=f"Comparison on {dataset}: test accuracy and F1")
    return out


# page path -> (file stem, what must be drawn before the shot)
PAGES = {"": ("explore", ".st-key-overlay .js-plotly-plot"),
         "embeddings": ("embeddings", ".st-key-dist .js-plotly-plot"),
         "compare": ("compare", ".st-key-bars .js-plotly-plot")}


def screenshots(out: Path, checkpoints: Path = ROOT / "checkpoints", timeout_ms: float = 300_000) -> list[Path]:
    """Whole-page screenshots of the dashboard's pages on ``checkpoints``, as a newcomer first sees them."""
    from playwright.sync_api import sync_playwright

    written = []
    env = {"VITVIZ_CHECKPOINTS": str(checkpoints), "HF_HUB_OFFLINE": "1"}
    with StreamlitServer("dashboard/app.py", env=env) as server, sync_playwright() as pw:
        browser = launch_chromium(pw)
        try:
            for path, (stem, ready) in PAGES.items():
                # a fresh page each: screenshot_page grows the viewport to the page's height, and a page
                # measured in the last one's tall viewport would be as tall, with blank space below
                page = browser.new_page(viewport={"width": 1440, "height": 1000})
                page.set_default_timeout(timeout_ms)
                page.goto(f"{server.url}/{path}")
                page.wait_for_selector(ready)
                wait_done(page, timeout_ms)
                page.mouse.move(0, 0)  # no hover label in the picture
                written.append(screenshot_page(page, out / f"{stem}.png"))
                page.close()
                print(written[-1])
        finally:
            browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "results")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    p.add_argument("--screenshots", type=Path, default=ROOT / "docs" / "screenshots")
    p.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints", help="the models the screenshots show")
    p.add_argument("--no-figures", action="store_true", help="only the screenshots")
    p.add_argument("--no-screenshots", action="store_true", help="only the figures")
    args = p.parse_args(argv)
    if not args.no_figures and _figures(args) != 0:
        return 1
    if not args.no_screenshots:
        screenshots(args.screenshots, args.checkpoints)
    return 0


def _figures(args: argparse.Namespace) -> int:
    figs = figures(args.results)
    if not figs:
        print(f"no results.json under {args.results}; run `vitviz compare` first", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page(viewport={"width": 900, "height": 520}, device_scale_factor=2)
        for stem, fig in figs.items():
            fig.update_layout(width=900, height=520)
            page.set_content(fig.to_html(include_plotlyjs=True, full_html=True, config={"staticPlot": True}))
            page.wait_for_selector(".js-plotly-plot .main-svg")
            page.locator(".js-plotly-plot").first.screenshot(path=str(args.out / f"{stem}.png"))
            print(args.out / f"{stem}.png")
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
