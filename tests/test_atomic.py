"""Atomic writes leave either the old file or the new one, with ordinary permissions."""
import os
import stat

import pytest

from sol.core.atomic import replace, temp_path_for, write_text


def test_written_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.json", "{}")
        tmp = temp_path_for(tmp_path / "b.bin")
        tmp.write_bytes(b"x")
        replace(tmp, tmp_path / "b.bin")
    finally:
        os.umask(old)
    for name in ("a.json", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "keep.txt"
    write_text(target, "old")

    def crash(*a):
        raise OSError("disk full")

    monkeypatch.setattr("sol.core.atomic.os.replace", crash)
    with pytest.raises(OSError):
        write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
