"""Module hooks that act only in the thread that put them on.

A model is shared by threads where a server serves several users from one loaded copy (the dashboard
caches one per process). Hooks live on the module, so a recording or a rule put on for one call would
otherwise also run in another thread's forward pass at the same moment: its attention would land in
the wrong recording, its gradients would follow the wrong rules. Every hook vitviz registers is
wrapped by :func:`this_thread`, so other threads run the model as if the hook were not there.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["this_thread"]

F = TypeVar("F", bound=Callable[..., Any])


def this_thread(hook: F) -> F:
    """``hook``, acting only when called in the current thread (elsewhere it returns None: no change)."""
    owner = threading.get_ident()

    @functools.wraps(hook)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != owner:
            return None
        return hook(*args, **kwargs)

    return wrapped  # type: ignore[return-value]
