"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file vitviz writes (checkpoints, training logs, reports) goes through :func:`atomic_path`: the
data is written to a temporary file beside the target, flushed to disk, given ordinary permissions
and renamed over the target; on any failure the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "fsync_dir", "write_bytes_atomic", "write_text_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends without error.

    ``mode``: the permissions of the result (mkstemp's 0600 would hide shared files from other users).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fp:
            os.fsync(fp.fileno())  # the data must be on disk before the rename makes it visible
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders must exist)."""
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (parent folders must exist)."""
    return write_bytes_atomic(path, text.encode("utf-8"), mode)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable; best effort, as not every OS or filesystem allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
