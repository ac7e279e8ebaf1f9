"""Atomic writes: whole files or none, with ordinary permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from stages_of_inference._utils import atomic_path, atomic_write_json, atomic_write_text


def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        written = atomic_write_text(tmp_path / "a.txt", "hello")
        atomic_write_json(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert written.read_text() == "hello"
    for name in ("a.txt", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "table"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table"]
