"""vitviz.atomic: a failed write leaves the old file and no temporary file; a good one replaces it whole."""

from __future__ import annotations

import stat

import pytest

from vitviz.atomic import atomic_path, write_text_atomic


def test_a_write_replaces_the_file_whole_with_readable_permissions(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    write_text_atomic(target, "new ünïcode")
    assert target.read_text(encoding="utf-8") == "new ünïcode"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"the old weights")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"the old weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
