"""Many users at once: concurrent browser sessions uploading images to one dashboard server.

Starts ``streamlit run dashboard/app.py`` on the shipped checkpoints and drives it with N concurrent
headless-Chromium sessions (Debian's ``/usr/bin/chromium`` through Playwright; one browser process
per session, each in the foreground, so sessions share nothing but the server). Session ``i`` uploads ``--images``
different shapes scenes; before image ``j`` it picks shipped model ``(i + j) mod M`` in the sidebar, so
every session walks through different models at the same time as the others; after every third upload
the page is reloaded (a new session). Uploads 1, 4, 7, ... are hurried: the file is dropped as soon as the
model is picked, while that rerun is on its way or under way (after a reload: the session's second run),
as a person would; the others wait for the rerun to finish first. Per upload it checks:

* no error in the page (no exception box, no ``st.error``) and none in the server log;
* the overlay belongs to this session's image: the picture under the map, decoded from the chart's
  SVG and read at each source pixel's centre, equals the session's own image as the model sees it
  (``vitviz.images.fit_image`` at the model's input size) to within 2 of 255 per channel;
* that the page takes the file up at all (its name and size appear under the image);
* the time from handing the file over to the overlay of the new image being drawn (unhurried uploads).

Meanwhile the RSS of the server's process tree is sampled every 0.25 s. At the end Streamlit's own
``/_stcore/metrics`` gives the bytes each cache holds, and the script reports the peak RSS against
the RSS after the first page load, with the caches' ``max_entries`` limits (``dashboard/state.py``).

    python benchmarks/load_test.py [--sessions S] [--images N] [--checkpoints DIR] [--json out.json]  # S=4, N=10

Exits 1 when any upload failed a check.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import signal
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dashboard.harness import CHROMIUM, CHROMIUM_ARGS, DONE, RERUN_DONE, RUNS_FINISHED, StreamlitServer  # noqa: E402

TIMEOUT_MS = 180_000  # one step on a shared 2-core machine with four sessions queued behind each other


# --------------------------------------------------------------------------------------------------
# server memory


def tree_rss(pgid: int) -> int:
    """Bytes resident in every process of the process group ``pgid`` (the server and its children)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # field 5 of stat: the process group
                continue
            with open(f"/proc/{entry.name}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


class Sampler(threading.Thread):
    """Samples :func:`tree_rss` every ``period`` seconds until stopped; keeps (t, bytes)."""

    def __init__(self, pgid: int, period: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pgid, self.period = pgid, period
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._halt.is_set():
            self.samples.append((time.monotonic() - t0, tree_rss(self.pgid)))
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def peak(self) -> int:
        return max((b for _, b in self.samples), default=0)


def cache_metrics(url: str) -> dict[str, int]:
    """Streamlit's cache statistics: {cache function (kind): bytes held}.

    Streamlit measures cached data exactly (its pickled size) but cannot size a torch module, so a
    ``cache_resource`` of models reads near zero: the RSS is the measure for those.
    """
    with urllib.request.urlopen(f"{url}/_stcore/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r'cache_memory_bytes\{cache_type="(\w+)",cache="([^"]+)"\}\s+(\d+)', line)
        if m:
            name = m.group(2).rsplit(".", 1)[-1] + f" ({m.group(1).removeprefix('st_')})"
            out[name] = out.get(name, 0) + int(m.group(3))
    return out


def cache_limits() -> dict[str, int | None]:
    """``max_entries`` of every cached function of dashboard/state.py (None: unbounded)."""
    text = (ROOT / "dashboard" / "state.py").read_text()
    limits: dict[str, int | None] = {}
    for m in re.finditer(r"@st\.cache_(?:data|resource)\(([^)]*(?:\([^)]*\)[^)]*)*)\)\s*\ndef (\w+)", text):
        n = re.search(r"max_entries=(\d+)", m.group(1))
        limits[m.group(2)] = int(n.group(1)) if n else None
    return limits


# --------------------------------------------------------------------------------------------------
# images and models


def scene_png(seed: int, size: int = 64) -> bytes:
    from PIL import Image

    from vitviz.data.shapes import make_shapes

    images, _, _ = make_shapes(1, seed=seed, img_size=size)
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, "PNG")
    return buf.getvalue()


def seen_by_model(png: bytes, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the image as the model sees it, as the dashboard's overlay draws it."""
    from vitviz.images import fit_image, open_image

    return np.asarray(fit_image(open_image(png), size))


def shipped_models(folder: Path) -> list[tuple[str, int]]:
    """(file stem, input size) of every usable checkpoint in ``folder``, in the sidebar's order."""
    from dashboard.support import scan_checkpoints

    return [(Path(e.path).stem, int(e.meta.img_size)) for e in scan_checkpoints(folder) if e.usable]


# --------------------------------------------------------------------------------------------------
# one browser session

UNDER_MAP = """() => {
    const gd = document.querySelector('.st-key-overlay .js-plotly-plot');
    const img = gd && gd.querySelector('image');  // the first trace: the picture (the map comes after it)
    return img ? (img.getAttribute('href') || img.getAttribute('xlink:href')) : null;
}"""


async def next_frame(page) -> None:
    await page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


async def wait_done(page) -> None:
    """Wait until no script run is under way (the page's first run, once its first chart is drawn)."""
    await page.wait_for_selector(DONE, timeout=TIMEOUT_MS)
    await next_frame(page)


async def wait_rerun(page, before: int) -> None:
    """Wait until a run started after ``before = page.evaluate(RUNS_FINISHED)`` has finished (harness.wait_rerun)."""
    await page.wait_for_function(RERUN_DONE, arg=before, timeout=TIMEOUT_MS)
    await next_frame(page)


async def page_problems(page) -> list[str]:
    found = []
    for sel in ("[data-testid=stException]", "[data-testid=stAlertContentError]"):
        for el in await page.locator(sel).all():
            found.append((await el.inner_text())[:300])
    return found


def at_pixel_centres(drawn: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """(h, w, 3): the drawn picture read at the centre of each of the image's own pixels.

    Plotly draws an image trace at the chart's size with nearest-neighbour ("pixelated") scaling, so
    the centre of each source pixel's block holds that pixel's colour.
    """
    h, w = shape[:2]
    rows = ((np.arange(h) + 0.5) * drawn.shape[0] / h).astype(int)
    cols = ((np.arange(w) + 0.5) * drawn.shape[1] / w).astype(int)
    return drawn[rows][:, cols, :3]


async def overlay_pixels(page, shape: tuple[int, int, int], timeout_s: float = 300.0) -> np.ndarray | None:
    """The picture under the overlay's map at the image's resolution; None when none is drawn in time."""
    from PIL import Image

    deadline = time.monotonic() + timeout_s
    while True:
        href = await page.evaluate(UNDER_MAP)
        if href and href.startswith("data:image/png;base64,"):
            drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))).convert("RGB"))
            return at_pixel_centres(drawn, shape)
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.1)


def same_picture(got: np.ndarray | None, want: np.ndarray) -> bool:
    # the browser's canvas may round a colour by one step; another image differs by far more
    return got is not None and int(np.abs(got.astype(int) - want.astype(int)).max()) <= 2


async def pick_model(page, stem: str, wait: bool = True) -> None:
    """Choose checkpoint ``stem`` in the sidebar; ``wait``: until the rerun it starts has finished."""
    box = page.locator(".st-key-ckpt_Shipped")
    if await box.get_by_role("combobox").input_value() == stem:  # already chosen: no rerun to wait for
        return
    runs = await page.evaluate(RUNS_FINISHED)
    await box.click()
    await page.get_by_role("option", name=stem, exact=True).click()
    if wait:
        await wait_rerun(page, runs)  # the page reads "not running" until the server starts the rerun


async def session(p, url: str, index: int, images: int, models: list[tuple[str, int]], report: dict) -> None:
    # A browser of its own: pages sharing one browser take turns at the foreground, and a background
    # page's animation frames (which the waits use) stall.
    browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    context = await browser.new_context(viewport={"width": 1440, "height": 1000})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    rows = report.setdefault("uploads", [])
    try:
        t0 = time.monotonic()
        await page.goto(url)
        await page.wait_for_selector(".st-key-overlay .js-plotly-plot", timeout=TIMEOUT_MS)
        await wait_done(page)
        report.setdefault("first_load_s", []).append(time.monotonic() - t0)
        for j in range(images):
            stem, size = models[(index + j) % len(models)]
            print(f"session {index} upload {j}: {stem}…", flush=True)
            seed = 1000 * (index + 1) + j  # a different image for every session and upload
            png = scene_png(seed)
            hurried = j % 3 == 1  # the file dropped at once after the model is picked, mid-rerun
            row = {"session": index, "upload": j, "model": stem, "seed": seed, "hurried": hurried, "errors": []}
            try:
                row["step"] = "picking the model"
                await pick_model(page, stem, wait=not hurried)
                row["step"] = "uploading"
                runs = await page.evaluate(RUNS_FINISHED)
                start = time.monotonic()
                # strict: exactly one uploader (the page re-mounting it mid-run would show two, and lose the file)
                await page.locator(".st-key-upload [data-testid=stFileUploaderDropzoneInput]").set_input_files(
                    files=[{"name": f"s{index}_{j}.png", "mimeType": "image/png", "buffer": png}])
                await page.get_by_text(re.compile(rf"s{index}_{j}\.png · 64×64 px")).wait_for()
                row["taken_up"] = True
                row["step"] = "waiting for the overlay"
                want = seen_by_model(png, size)
                while time.monotonic() - start < TIMEOUT_MS / 1000:
                    if same_picture(await overlay_pixels(page, want.shape), want):
                        break
                    await asyncio.sleep(0.1)
                await wait_rerun(page, runs)  # the overlay is the upload run's: wait for that run to end
                row["seconds"] = time.monotonic() - start
                got = await overlay_pixels(page, want.shape, timeout_s=5.0)  # after the run: still its own image
                row["own_image"] = same_picture(got, want)
                if not row["own_image"]:
                    diff = None if got is None else int(np.abs(got.astype(int) - want.astype(int)).max())
                    row["errors"].append(f"overlay shows another image (max pixel difference {diff})")
                row["errors"] += await page_problems(page)
            except Exception as err:  # a timeout or a missing element: counted, and the session goes on
                row["errors"].append(f"{type(err).__name__} while {row.get('step')}: "
                                     f"{str(err).splitlines()[0][:200]}")
            rows.append(row)
            print(f"session {index} upload {j} ({stem}): {row.get('seconds', float('nan')):.1f} s"
                  f"{'' if not row['errors'] else ' ERRORS ' + '; '.join(row['errors'])}", flush=True)
            if j > 0 and j % 3 == 0:  # a fresh upload box now and then, as a person removing the file
                await page.reload()
                await page.wait_for_selector(".st-key-overlay .js-plotly-plot", timeout=TIMEOUT_MS)
                await wait_done(page)
    finally:
        await browser.close()


async def drive(url: str, sessions: int, images: int, models: list[tuple[str, int]]) -> dict:
    from playwright.async_api import async_playwright

    report: dict = {}
    async with async_playwright() as p:
        await asyncio.gather(*(session(p, url, i, images, models, report) for i in range(sessions)))
    return report


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=4, help="concurrent browser sessions (default 4)")
    ap.add_argument("--images", type=int, default=10, help="images uploaded per session (default 10)")
    ap.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints", help="checkpoint folder")
    ap.add_argument("--json", type=Path, help="write every figure here too")
    args = ap.parse_args(argv)
    if not os.path.exists(CHROMIUM):
        print(f"{CHROMIUM} is missing: apt-get install chromium", file=sys.stderr)
        return 2
    models = shipped_models(args.checkpoints)
    if not models:
        print(f"no usable checkpoints in {args.checkpoints}", file=sys.stderr)
        return 2
    env = {"VITVIZ_CHECKPOINTS": str(args.checkpoints), "HF_HUB_OFFLINE": "1"}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` or kill: still stop the server
    with StreamlitServer("dashboard/app.py", env=env) as server:
        sampler = Sampler(server.proc.pid)
        sampler.start()
        idle = tree_rss(server.proc.pid)
        t0 = time.monotonic()
        report = asyncio.run(drive(server.url, args.sessions, args.images, models))
        wall = time.monotonic() - t0
        sampler.stop()
        caches = cache_metrics(server.url)
        final = tree_rss(server.proc.pid)
        log = server.log
    uploads = report.get("uploads", [])
    failed = [u for u in uploads if u["errors"]]
    if "Traceback" in log:
        at = log.index("Traceback")
        failed.append({"session": "server", "errors": ["a traceback in the server log: " + log[at:at + 3000]]})
    times = sorted(u["seconds"] for u in uploads if "seconds" in u and not u["hurried"])
    rss = [b for _, b in sampler.samples]
    limits = cache_limits()
    summary = {
        "sessions": args.sessions, "images_per_session": args.images, "models": [m for m, _ in models],
        "uploads": len(uploads), "uploads_with_errors": len(failed), "own_image": sum(bool(u.get("own_image"))
                                                                                     for u in uploads),
        "hurried": sum(u["hurried"] for u in uploads),
        "hurried_taken_up": sum(u["hurried"] and u.get("taken_up", False) for u in uploads),
        "wall_s": wall, "upload_s_median": statistics.median(times) if times else None,
        "upload_s_p95": times[max(0, round(0.95 * len(times)) - 1)] if times else None,
        "upload_s_max": times[-1] if times else None,
        "first_load_s": report.get("first_load_s"),
        "rss_idle_mb": idle / 2**20, "rss_peak_mb": max(rss, default=0) / 2**20, "rss_final_mb": final / 2**20,
        "rss_first_half_peak_mb": max(rss[: len(rss) // 2], default=0) / 2**20,
        "rss_second_half_peak_mb": max(rss[len(rss) // 2:], default=0) / 2**20,
        "cache_mb": sum(caches.values()) / 2**20,
        "caches": {k: {"bytes": v, "max_entries": limits.get(k.split(" ")[0])} for k, v in sorted(caches.items())},
        "failures": failed,
    }
    print(f"\n{len(uploads)} uploads in {args.sessions} concurrent sessions over {len(models)} models, "
          f"{wall:.0f} s wall")
    print(f"errors: {len(failed)}; overlays showing the session's own image: {summary['own_image']}/{len(uploads)}")
    print(f"hurried uploads (dropped during the model's rerun) the page took up: {summary['hurried_taken_up']}/"
          f"{summary['hurried']}")
    if times:
        print(f"unhurried upload -> overlay: median {summary['upload_s_median']:.1f} s, "
              f"p95 {summary['upload_s_p95']:.1f} s, "
              f"max {summary['upload_s_max']:.1f} s ({args.sessions} sessions sharing the server's CPU)")
    print(f"server RSS (process tree): idle {summary['rss_idle_mb']:.0f} MB, peak {summary['rss_peak_mb']:.0f} MB "
          f"(first half {summary['rss_first_half_peak_mb']:.0f}, second half "
          f"{summary['rss_second_half_peak_mb']:.0f}), final {summary['rss_final_mb']:.0f} MB")
    print(f"caches hold {summary['cache_mb']:.1f} MB:")
    for name, c in summary["caches"].items():
        cap = c["max_entries"]
        print(f"  {name:36s} {c['bytes'] / 2**20:8.2f} MB   max_entries {cap if cap is not None else '-'}")
    for f in failed:
        print("FAILED:", f)
    if args.json:
        args.json.write_text(json.dumps({**summary, "rows": uploads, "rss_samples": sampler.samples}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
