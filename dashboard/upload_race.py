"""Keep a file dropped just as a rerun starts: Streamlit's answer with its upload URLs must reach the browser.

The browser's file uploader first asks the server, over the websocket, where to send the file
(``file_urls_request``); the server answers with a ``file_urls_response`` put in the session's outgoing
queue. When a whole-page script run starts, Streamlit empties that queue of every message not yet sent
except a few lifecycle ones (``ForwardMsgQueue.clear(retain_lifecycle_msgs=True)``, Streamlit 1.67), and the
answer is not among them. A file dropped at the moment a rerun starts (a model picked, the file dropped at
once; more likely the busier the server) then waits for an answer that never comes: the uploader shows
nothing and the file is gone, without an error. :func:`keep_upload_answers` makes that clearing keep
the answers; ``benchmarks/load_test.py`` drops files this way under load.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)

KEPT = frozenset({"file_urls_response"})  # ForwardMsg types a rerun's queue clearing must not drop
MARK = "_vitviz_keeps_upload_answers"


def keep_upload_answers() -> bool:
    """Patch ``ForwardMsgQueue.clear`` (once per process) to keep queued upload-URL answers.

    Returns whether the patch is in place; False (and a warning in the log) when this Streamlit has no
    such queue, so the dashboard still runs.
    """
    try:
        from streamlit.runtime.forward_msg_queue import ForwardMsgQueue
    except ImportError:
        log.warning("streamlit.runtime.forward_msg_queue is missing: a file dropped as a rerun starts may be lost")
        return False
    if getattr(ForwardMsgQueue.clear, MARK, False):
        return True
    original = ForwardMsgQueue.clear

    @functools.wraps(original)  # __wrapped__: Streamlit's own clear
    def clear(self: Any, *args: Any, **kwargs: Any) -> None:
        retain = kwargs.get("retain_lifecycle_msgs", args[0] if args else False)
        queued = getattr(self, "_queue", None)
        answers = [m for m in queued if m.WhichOneof("type") in KEPT] if retain and queued else []
        original(self, *args, **kwargs)
        for msg in answers:  # after the lifecycle messages: the browser matches an answer by its request id
            if not any(msg is m for m in self._queue):
                self._queue.append(msg)

    setattr(clear, MARK, True)
    ForwardMsgQueue.clear = clear
    return True
