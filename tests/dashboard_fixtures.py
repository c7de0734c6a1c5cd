"""Set-up shared by the dashboard's tests (the fixtures themselves are in ``conftest.py``).

The demo checkpoints of ``demo_checkpoints.py`` are written once per session and dataset, then copied
into a folder of each module's own: the dashboard caches models by file path, so no module finds
another's models in its caches. ``dashboard_env`` points the dashboard
at a module's folders for as long as the module runs; ``start_app`` opens it under ``AppTest``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "dashboard" / "app.py")
SHIPPED = ROOT / "checkpoints"


class DemoCheckpoints:
    """``write_demo_checkpoints`` once per dataset into ``store``; every later call copies those files."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self._written: dict[str, list[Path]] = {}

    def write(self, folder: Path, dataset: str = "shapes") -> list[Path]:
        """The three demo checkpoints of ``dataset`` in ``folder``, as ``write_demo_checkpoints`` writes them."""
        from demo_checkpoints import write_demo_checkpoints

        if dataset not in self._written:
            source = self.store / dataset
            source.mkdir(parents=True, exist_ok=True)
            self._written[dataset] = write_demo_checkpoints(source, dataset=dataset)
        folder.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy(path, folder / path.name)) for path in self._written[dataset]]


def shipped_or_demo(demo: DemoCheckpoints, folder: Path) -> Path:
    """The shipped checkpoints when any of them loads, else the demo ones written to ``folder``."""
    from dashboard.support import scan_checkpoints

    if any(e.usable for e in scan_checkpoints(SHIPPED)):
        return SHIPPED
    demo.write(folder)
    return folder


def write_efficiency(folder: Path, rows: list[dict]) -> Path:
    """A data-efficiency summary of ``rows`` (shapes) in ``folder``, as the dashboard reads results."""
    (folder / "efficiency.json").write_text(json.dumps({"kind": "data-efficiency", "dataset": "shapes",
                                                        "rows": rows}))
    return folder


@contextmanager
def dashboard_env(checkpoints: Path, results: Path | None = None, **more: str | None) -> Iterator[None]:
    """The dashboard's environment while the block runs: its checkpoint folder, its results folder when given,
    the Hugging Face hub offline (nothing is downloaded) and ``more`` (None unsets); all restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITVIZ_CHECKPOINTS", str(checkpoints))
        mp.setenv("HF_HUB_OFFLINE", "1")
        if results is not None:
            mp.setenv("VITVIZ_RESULTS", str(results))
        for name, value in more.items():
            if value is None:
                mp.delenv(name, raising=False)
            else:
                mp.setenv(name, value)
        yield


def start_app(timeout: float, page: str | None = None) -> AppTest:
    """The dashboard under ``AppTest``, run once without an exception, then switched to ``page`` when given."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=timeout)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    if page is not None:
        at.switch_page(page).run()
    return at
