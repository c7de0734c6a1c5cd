"""vitviz dashboard: ``streamlit run dashboard/app.py`` from the repository root.

Run it from the repository root so that Streamlit reads ``.streamlit/config.toml`` there (headless,
no usage statistics, no file watcher — the watcher trips over ``torch.classes``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run dashboard/app.py` puts dashboard/, not the root, on the path
    sys.path.insert(0, str(ROOT))

# Every session's script thread passes pandas' import lock here, before any page draws a figure: plotly
# looks pandas up in sys.modules without that lock, so two sessions opening at once could otherwise see it
# half-imported ("partially initialized module 'pandas'"; benchmarks/load_test.py found it).
import pandas  # noqa: E402, F401
import streamlit as st  # noqa: E402

from dashboard.upload_race import keep_upload_answers  # noqa: E402
from vitviz.runtime import tune_allocator  # noqa: E402

tune_allocator()  # keep freed tensor memory for reuse: faster forwards and explanations (vitviz/runtime.py)
keep_upload_answers()  # a file dropped just as a rerun starts is not lost (dashboard/upload_race.py)
st.set_page_config(page_title="vitviz — what Vision Transformers see", page_icon=":material/blur_on:", layout="wide")

LOADED_ONCE = "vitviz.loaded_once"  # session_state: the session's first run has finished
# The placeholder is made on every run, not only the first: an element the first run alone drew would shift
# every later element by one on the second run, and React would re-mount them all, the file uploader too,
# dropping a file still uploading when the session's second run began (a model picked, a file dropped at once).
loading = st.empty()
if not st.session_state.get(LOADED_ONCE):
    # The first run imports PyTorch and loads a model (seconds): say so at once instead of a blank page.
    loading.markdown(":material/hourglass_top: **Loading vitviz…** The first open imports PyTorch and loads a "
                     "model; this takes a few seconds.")

if st.get_option("server.fileWatcherType") != "none":
    # Started without the repository's .streamlit/config.toml: keep the module watcher away from
    # torch.classes, whose __path__ it cannot read (run from the root, or `python -m dashboard`).
    import torch

    torch.classes.__path__ = []

HERE = Path(__file__).parent
PAGES = [
    st.Page(HERE / "pages" / "explore.py", title="Explore", icon=":material/visibility:", default=True),
    st.Page(HERE / "pages" / "embeddings.py", title="Embeddings", icon=":material/grid_view:"),
    st.Page(HERE / "pages" / "compare.py", title="Compare", icon=":material/compare:"),
    st.Page(HERE / "pages" / "representations.py", title="Representations", icon=":material/stacked_line_chart:"),
]

# Each page draws the sidebar itself (ui.sidebar()), so a page script works on its own too: AppTest
# re-runs only the page file on reruns when the pages live in a folder named pages/.
try:
    st.navigation(PAGES, position="top").run()
finally:  # also when the page stops early (st.stop: no model yet) or fails
    loading.empty()
    st.session_state[LOADED_ONCE] = True
