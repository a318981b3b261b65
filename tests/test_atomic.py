"""Atomic outputs: the target is the old file/folder or the whole new one, flushed to disk, ordinary permissions."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from idc_helpers import atomic
from idc_helpers.atomic import atomic_path, install_dir, old_copy_path, publish_dir, recover_dir, write_json, write_text


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_write_json_round_trip_and_permissions_follow_the_umask(tmp_path, umask_027):
    target = write_json(tmp_path / "sub" / "report.json", {"f1": 0.5})
    assert json.loads(target.read_text()) == {"f1": 0.5}
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_the_umask_is_never_changed_to_read_it(tmp_path, monkeypatch):
    # Changing the process umask for a moment races with every other thread creating files.
    def forbidden(mask):
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", forbidden)
    write_text(tmp_path / "a.txt", "x")
    with publish_dir(tmp_path / "folder") as tmp:
        (tmp / "f").write_text("y")
    assert (tmp_path / "folder" / "f").read_text() == "y"


def test_files_and_folders_are_flushed_to_disk(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_text(tmp_path / "a.txt", "hello")
    if os.path.exists("/proc/self/fd"):
        assert any(Path(p).name.startswith(".a.txt.") for p in synced)  # the file, before the rename
        assert str(tmp_path) in synced  # the folder, after it
    else:
        assert len(synced) >= 2


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    target = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_concurrent_writers_with_threads_keep_ordinary_permissions(tmp_path, umask_027):
    def work(k):
        for i in range(20):
            write_text(tmp_path / f"t{k}-{i}.txt", "x")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    modes = {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {0o640}


def test_publish_dir_builds_hidden_then_renames(tmp_path, umask_027):
    with publish_dir(tmp_path / "out") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.") and tmp.name.endswith(".partial")
        (tmp / "a.txt").write_text("a")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_publish_dir_failure_removes_the_folder_and_keeps_the_target(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), publish_dir(tmp_path / "out", replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_publish_dir_refuses_a_non_empty_target_unless_replace(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty"), publish_dir(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with publish_dir(tmp_path / "out", replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "empty").mkdir()
    with publish_dir(tmp_path / "empty") as tmp:  # an empty folder may be filled
        (tmp / "x").write_text("x")
    assert (tmp_path / "empty" / "x").is_file()


KILL_DURING_SWAP = """
import os, signal, sys
from pathlib import Path
from idc_helpers import atomic
calls = []
real = os.rename
def rename(a, b):
    calls.append(1)
    real(a, b)
    if len(calls) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename
root = Path(sys.argv[1])
atomic.install_dir(root / "new", root / "out", replace=True)
"""


@pytest.mark.parametrize("killed_after", [1, 2])
def test_a_swap_killed_between_or_after_its_renames_loses_nothing(tmp_path, killed_after):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "new.txt").write_text("new")
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SWAP, str(tmp_path), str(killed_after)])
    assert proc.returncode == -9
    expected = "old.txt" if killed_after == 1 else "new.txt"
    # After the first rename the target is missing, the old copy aside: recovery puts it back.
    assert old_copy_path(tmp_path / "out").exists()
    assert recover_dir(tmp_path / "out") == ("restored" if killed_after == 1 else "removed")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [expected]
    assert not old_copy_path(tmp_path / "out").exists()
    assert recover_dir(tmp_path / "out") is None


def test_install_dir_recovers_an_old_copy_first(tmp_path):
    aside = old_copy_path(tmp_path / "out")
    aside.mkdir()
    (aside / "old.txt").write_text("old")
    (tmp_path / "new").mkdir()
    with pytest.raises(FileExistsError):
        install_dir(tmp_path / "new", tmp_path / "out")  # the old copy came back first, so out is not empty
    assert (tmp_path / "out" / "old.txt").read_text() == "old"
    assert atomic.recover_dir(tmp_path / "out") is None
