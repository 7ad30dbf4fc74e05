"""Artifacts are written whole: a failed write leaves neither the target nor a temporary file."""

from __future__ import annotations

import pytest

from fxquant.atomic_files import PUBLISHED_MODE, written_atomically


def test_a_completed_write_is_renamed_into_place_with_published_permissions(tmp_path):
    target = tmp_path / "sub" / "report.html"
    with written_atomically(target) as tmp:
        tmp.write_text("<p>done</p>")
        assert not target.exists() and tmp.parent == target.parent
    assert target.read_text() == "<p>done</p>"
    assert target.stat().st_mode & 0o777 == PUBLISHED_MODE
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), written_atomically(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
