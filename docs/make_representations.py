"""Measure docs/representations.md: `vitviz represent` on the six shipped checkpoints, and its figures as PNG.

Writes ``results/represent_<dataset>/`` (report.md, report.json, HTML figures) for shapes (2,000 test
scenes, 2,000 training scenes for the probes) and digits (its 361 test images), then renders the CKA
grids and the probe / logit-lens curves to ``docs/figures/represent_*.png`` with headless Chromium
(Debian's /usr/bin/chromium through Playwright, plotly.js inlined: no network). With ``--bench`` the
JSON of benchmarks/bench_cka.py becomes ``docs/figures/represent_bench.png``.

    .venv/bin/python docs/make_representations.py [--n 2000] [--bench bench_cka.json] [--skip-run]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitviz.cli import main as vitviz  # noqa: E402

FAMILIES = ("vit", "hybrid", "resnet")


def run(dataset: str, n: int, out: Path) -> None:
    models = [str(ROOT / "checkpoints" / f"{f}_{dataset}.safetensors") for f in FAMILIES]
    code = vitviz(["represent", "--models", *models, "--dataset", dataset, "--n", str(n), "--n-train", str(n),
                   "--out", str(out), "--gallery", "4", "--no-progress"])
    if code:
        raise SystemExit(code)


def figures(results: Path, bench: Path | None) -> dict[str, object]:
    import numpy as np
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from vitviz.represent.figures import Curve, curves_figure, lens_figure

    figs: dict[str, object] = {}
    probes, lens = [], []
    for dataset in ("shapes", "digits"):
        path = results / f"represent_{dataset}" / "report.json"
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        grids = {(c["a"], c["b"]): c for c in report["cka"]}
        names = [f"{f}_{dataset}" for f in FAMILIES]
        pairs = [(names[0], names[2]), (names[0], names[1]), (names[1], names[2]),
                 (names[0], names[0]), (names[1], names[1]), (names[2], names[2])]
        fig = make_subplots(rows=2, cols=3, horizontal_spacing=0.12, vertical_spacing=0.2,
                            subplot_titles=[f"{a} vs {b}" for a, b in pairs])
        for k, (a, b) in enumerate(pairs):
            c = grids.get((a, b)) or grids.get((b, a))
            z = np.asarray(c["grid"]) if c["a"] == a else np.asarray(c["grid"]).T
            fig.add_trace(go.Heatmap(z=z, zmin=0, zmax=1, colorscale="Magma", showscale=k == 0,
                                     colorbar={"title": "CKA", "len": 0.9}), row=k // 3 + 1, col=k % 3 + 1)
            fig.update_xaxes(title_text=f"{b} layer", row=k // 3 + 1, col=k % 3 + 1)
            fig.update_yaxes(title_text=f"{a} layer", row=k // 3 + 1, col=k % 3 + 1)
        fig.update_layout(title=f"Linear CKA between layers on {dataset} ({report['images']} test images, "
                                f"{report['rep']} features; layer 0 at the bottom left)", width=1200, height=760)
        figs[f"represent_cka_{dataset}"] = fig
        probes += [Curve(p["model"], p["test_accuracy"], labels=p["labels"]) for p in report["probes"]]
        every_layer = {p["model"]: p["labels"] for p in report["probes"]}
        for x in report["lens"]:
            if not x.get("positions") and x["model"] in every_layer:  # where the lens layers sit among all layers
                names = every_layer[x["model"]]
                x = {**x, "positions": [names.index(k) for k in x["labels"]], "layers": len(names)}
            lens.append(x)
    if probes:
        figs["represent_probes"] = curves_figure(probes, "Linear probe test accuracy by depth (six shipped models)")
    if lens:
        figs["represent_lens"] = lens_figure(lens, "Logit lens: top-1 agreement with the final prediction (solid) "
                                                   "and accuracy (dashed)")
    if bench is not None and bench.is_file():
        data = json.loads(bench.read_text())
        fig = make_subplots(rows=1, cols=2, subplot_titles=["time (s)", "peak memory growth (MiB)"])
        for kind in ("streamed", "naive"):
            runs = data[kind]
            fig.add_trace(go.Bar(name=kind, x=[kind], y=[float(np.median([r["seconds"] for r in runs]))]), 1, 1)
            fig.add_trace(go.Bar(name=kind, x=[kind], y=[float(np.median([r["extra_mib"] for r in runs]))],
                                 showlegend=False), 1, 2)
        a = data["args"]
        fig.update_layout(title=f"CKA grid {a['a']} vs {a['b']} over {a['n']} scenes: streamed vs naive", width=900,
                          height=420)
        figs["represent_bench"] = fig
    return figs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--results", type=Path, default=ROOT / "results")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    p.add_argument("--bench", type=Path, help="JSON written by benchmarks/bench_cka.py --json")
    p.add_argument("--skip-run", action="store_true", help="only render the figures of existing reports")
    args = p.parse_args(argv)
    if not args.skip_run:
        for dataset in ("shapes", "digits"):
            run(dataset, args.n, args.results / f"represent_{dataset}")
    figs = figures(args.results, args.bench)
    from playwright.sync_api import sync_playwright

    from dashboard.harness import launch_chromium

    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        page = browser.new_page(viewport={"width": 1200, "height": 760}, device_scale_factor=1.5)
        for stem, fig in figs.items():
            page.set_content(fig.to_html(include_plotlyjs=True, full_html=True, config={"staticPlot": True}))
            page.wait_for_selector(".js-plotly-plot .main-svg")
            page.locator(".js-plotly-plot").first.screenshot(path=str(args.out / f"{stem}.png"))
            print(args.out / f"{stem}.png")
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
