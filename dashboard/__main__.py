"""``python -m dashboard [streamlit options]``: the dashboard from any directory, configured as from the root.

Streamlit reads ``.streamlit/config.toml`` only from the current directory (and ``~/.streamlit``), so
``streamlit run dashboard/app.py`` started elsewhere would prompt for an e-mail, gather usage
statistics and watch files (which trips over ``torch.classes``). This launcher passes the same
settings on the command line; extra arguments (e.g. ``--server.port 8502``) are handed on.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"
SETTINGS = {
    "browser.gatherUsageStats": "false",
    "browser.serverAddress": "localhost",
    "server.headless": "true",
    "server.showEmailPrompt": "false",
    "server.fileWatcherType": "none",
    "server.runOnSave": "false",
    "server.maxUploadSize": "50",
    "client.toolbarMode": "minimal",
    "global.showWarningOnDirectExecution": "false",
    "theme.base": "light",
    "theme.primaryColor": "#2563eb",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    given = {a.split("=", 1)[0].removeprefix("--") for a in argv if a.startswith("--")}
    flags = [f"--{k}={v}" for k, v in SETTINGS.items() if k not in given]
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP), *flags, *argv]
    os.chdir(APP.parent.parent)  # the repository root, where .streamlit/config.toml lives
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()
