"""Run the dashboard for real and drive it with headless Chromium (tests/test_browser.py, benchmarks).

``StreamlitServer`` starts ``streamlit run <script>`` from the repository root (so Streamlit reads
``.streamlit/config.toml`` there) on a free localhost port and stops it again; the helpers wait for
a script run to finish and take screenshots of whole pages. Chromium is Debian's
(``/usr/bin/chromium``), driven by Playwright; no browser is ever downloaded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
DONE = "[data-testid=stApp][data-test-script-state=notRunning]"
# How many script runs (whole page or fragment) the page has finished; the first call installs the counter.
# A widget change does not mark the page as running until the server answers (a few hundred ms on a busy
# machine), so waiting for DONE right after a click can pass before the rerun has even begun: count
# finished runs before the action and wait for the count to grow (RERUN_DONE) instead.
RUNS_FINISHED = """() => {
    if (!window.__vitvizRuns) {
        const runs = window.__vitvizRuns = {finished: 0};
        const now = () => {
            const app = document.querySelector('[data-testid=stApp]');
            return app && app.getAttribute('data-test-script-state');
        };
        // Records arrive in batches: each one's oldValue is the state before it, the next one's the state
        // after it, and the page's attribute the state after the last one.
        new MutationObserver(records => {
            const states = records.map(r => r.oldValue).concat([now()]);
            for (let i = 1; i < states.length; i++) {
                if (states[i - 1] !== 'notRunning' && states[i] === 'notRunning') runs.finished++;
            }
        }).observe(document.documentElement, {subtree: true, attributes: true, attributeOldValue: true,
                                              attributeFilter: ['data-test-script-state']});
    }
    return window.__vitvizRuns.finished;
}"""
RERUN_DONE = """(before) => window.__vitvizRuns !== undefined && window.__vitvizRuns.finished > before
    && document.querySelector('[data-testid=stApp][data-test-script-state=notRunning]') !== null"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StreamlitServer:
    """``streamlit run script`` on 127.0.0.1:<free port>, as a context manager; the log is kept in ``log``."""

    def __init__(self, script: str | Path = "dashboard/app.py", env: dict[str, str] | None = None,
                 log_path: str | Path | None = None, start_timeout: float = 120.0) -> None:
        self.script = str(script)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.log_path = Path(log_path) if log_path else None
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self._log = None

    def __enter__(self) -> StreamlitServer:
        import tempfile

        self._log = open(self.log_path, "w+b") if self.log_path else tempfile.TemporaryFile()  # noqa: SIM115
        cmd = [sys.executable, "-m", "streamlit", "run", self.script, "--server.port", str(self.port),
               "--server.address", "127.0.0.1"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited with {self.proc.returncode}:\n{self.log}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return self
            time.sleep(0.25)
        self.__exit__(None, None, None)
        raise RuntimeError(f"streamlit did not answer within {self.start_timeout:.0f} s:\n{self.log}")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: the server and nothing else
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)

    @property
    def log(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")


def launch_chromium(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def wait_done(page: Any, timeout_ms: float = 120_000) -> None:
    """Wait until the script run the page triggered has finished (and the frame after it is drawn)."""
    page.wait_for_selector(DONE, timeout=timeout_ms)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def runs_finished(page: Any) -> int:
    """Script runs the page has finished so far: take it before an action, then :func:`wait_rerun`."""
    return int(page.evaluate(RUNS_FINISHED))


def wait_rerun(page: Any, before: int, timeout_ms: float = 120_000) -> None:
    """Wait until a run the page started after ``before = runs_finished(page)`` has finished, and is drawn."""
    page.wait_for_function(RERUN_DONE, arg=before, timeout=timeout_ms)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def screenshot_page(page: Any, path: str | Path, width: int = 1440) -> Path:
    """A screenshot of the whole page: the viewport grows to the height of Streamlit's scrolling main area."""
    height = page.evaluate(
        "() => { const m = document.querySelector('[data-testid=stMain]');"
        " return Math.ceil(m ? m.scrollHeight : document.body.scrollHeight); }")
    page.set_viewport_size({"width": width, "height": max(900, min(int(height) + 40, 8000))})
    page.wait_for_timeout(400)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    return path


def plot_point(page: Any, container: str, x: float, y: float) -> tuple[float, float]:
    """Viewport pixel of data point (x, y) in the plotly chart inside ``container`` (a CSS selector)."""
    return tuple(page.evaluate(
        """([sel, x, y]) => {
            const gd = document.querySelector(sel + ' .js-plotly-plot');
            const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
            return [r.left + xa._offset + xa.l2p(x), r.top + ya._offset + ya.l2p(y)];
        }""", [container, x, y]))
