"""Module hooks that act only in the thread that put them on.

A model is shared by threads where a server serves several users from one loaded copy (the dashboard
caches one per process). Hooks live on the module, so a recording or a rule put on for one call would
otherwise also run in another thread's forward pass at the same moment: its attention would land in
the wrong recording, its gradients would follow the wrong rules. Every hook vitviz registers is
wrapped by :func:`this_thread`, so other threads run the model as if the hook were not there.

Some calls also switch a module's attributes for their duration (timm's ``fused_attn``, a transformers
config's attention implementation). Two such calls at once would restore each other's switches in the
wrong order, so they take :func:`exclusive` for their whole duration: one at a time per process.
Plain forward passes take no lock; a switch changes only how they compute, never what.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

__all__ = ["Installed", "exclusive", "this_thread"]

_SWITCHES = threading.RLock()  # re-entrant: a call may nest another (a recording inside AttnLRP's rules)

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


@contextmanager
def exclusive() -> Iterator[None]:
    """Hold the process-wide lock of calls that switch module attributes for their duration."""
    with _SWITCHES:
        yield


class Installed:
    """The hooks and attribute switches one call puts on a model; :meth:`undo` removes them all, last first.

    Hooks act in the installing thread only (:func:`this_thread`); a switch is an instance attribute
    (``fused_attn``, a wrapped method, a config's attention implementation) whose previous value comes back.
    """

    _MISSING = object()

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._saved: list[tuple[Any, str, object]] = []

    def forward(self, module: Any, hook: Callable) -> None:
        self._handles.append(module.register_forward_hook(this_thread(hook)))

    def pre(self, module: Any, hook: Callable) -> None:
        self._handles.append(module.register_forward_pre_hook(this_thread(hook)))

    def set(self, obj: Any, name: str, value: object) -> None:
        """Set an instance attribute for the call; :meth:`undo` restores it (or removes it if it was not set)."""
        self._saved.append((obj, name, obj.__dict__.get(name, self._MISSING)))
        setattr(obj, name, value)

    def around(self, module: Any, context: Callable[[], AbstractContextManager]) -> None:
        """Run ``module``'s forward inside ``context()`` (a fresh one per call), in the installing thread only.

        For rules on functions a module calls rather than on its children (a TorchFunctionMode); the
        forward is wrapped as an instance attribute, so an exception inside leaves nothing behind.
        """
        original, owner = module.forward, threading.get_ident()

        def forward(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != owner:
                return original(*args, **kwargs)
            with context():
                return original(*args, **kwargs)

        self.set(module, "forward", forward)

    def undo(self) -> None:
        for h in reversed(self._handles):
            h.remove()
        for obj, name, previous in reversed(self._saved):
            if previous is self._MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = previous
        self._handles.clear()
        self._saved.clear()
