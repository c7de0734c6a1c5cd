"""Process-level settings that make PyTorch on CPU faster: for applications (CLI, dashboard), not on import.

glibc's malloc serves every allocation above a threshold with a fresh ``mmap`` and returns it to the
OS on free, and it trims the heap top back to the OS whenever more than 128 kB are free. A ViT forward
pass allocates and frees several MB-sized tensors per layer (MLP activations, attention weights), so
each call pays for page faults and zero-filling of memory the process just gave back. Measured on
ViT-B/16 at 224 px, one thread: a plain forward 572 -> 527 ms, and capturing every layer's attention
(which keeps 12 x 1.9 MB alive) went from 1.078x to 0.985x of it. PyTorch's CPU performance guide
recommends a caching allocator (jemalloc, tcmalloc) for the same reason; this gets most of it from
glibc's own knobs, with no preload.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["tune_allocator"]

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit; larger blocks still use mmap
TRIM_THRESHOLD = 512 * 1024 * 1024  # keep up to this much freed memory for reuse before returning it

_tuned: bool | None = None


def tune_allocator(libc_name: str | None = None) -> bool:
    """Keep freed CPU memory in the process for reuse (glibc Linux only); True if the settings took.

    Idempotent. Elsewhere (macOS, Windows, musl) it changes nothing and returns False. ``libc_name``
    is for tests.
    """
    global _tuned
    if _tuned is not None and libc_name is None:
        return _tuned
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(libc_name)  # None: the process's own symbols, the C library it runs on included
            mallopt = libc.mallopt  # AttributeError where the C library has no mallopt (e.g. musl)
            ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        except (OSError, AttributeError):
            ok = False
    if libc_name is None:
        _tuned = ok
    return ok
