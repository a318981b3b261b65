"""Atomic writes: the target is the old file or the whole new one, with ordinary permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest

from idc_helpers.atomic import atomic_path, write_json, write_text


def test_write_json_round_trip_and_permissions(tmp_path):
    target = write_json(tmp_path / "sub" / "report.json", {"f1": 0.5})
    assert json.loads(target.read_text()) == {"f1": 0.5}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    target = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
