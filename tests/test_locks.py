"""The one file lock (idc_helpers.locks) and the disk helpers, across real processes."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from idc_helpers.disk import format_bytes, free_bytes
from idc_helpers.locks import file_lock, lock_holder


def _hold(path, *, shared=False, record_pid=True):
    """Start a process that holds a lock on ``path`` until its stdin closes; return it once it holds it."""
    code = textwrap.dedent(
        f"""
        import sys
        from idc_helpers.locks import file_lock
        with file_lock({str(path)!r}, shared={shared}, record_pid={record_pid}) as held:
            print(held, flush=True)
            sys.stdin.read()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "True"
    return proc


def _release(proc):
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


def test_an_exclusive_lock_excludes_another_process_and_names_it(tmp_path):
    path = tmp_path / "x.lock"
    proc = _hold(path)
    try:
        assert lock_holder(path) == proc.pid
        with file_lock(path, blocking=False) as held:
            assert held is False
        with file_lock(path, shared=True, blocking=False) as held:
            assert held is False
    finally:
        _release(proc)
    assert lock_holder(path) is None
    with file_lock(path, blocking=False) as held:
        assert held is True


def test_readers_share_and_keep_a_writer_out(tmp_path):
    path = tmp_path / "x.lock"
    proc = _hold(path, shared=True, record_pid=False)
    try:
        with file_lock(path, shared=True, blocking=False) as held:
            assert held is True
        with file_lock(path, blocking=False) as held:
            assert held is False
        assert lock_holder(path) is None  # a reader is not an exclusive holder
    finally:
        _release(proc)


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    path = tmp_path / "x.lock"
    proc = _hold(path)
    proc.kill()
    proc.wait(timeout=30)
    assert lock_holder(path) is None
    with file_lock(path, blocking=False) as held:
        assert held is True


def test_a_waiting_lock_says_so_once_and_gets_it_when_released(tmp_path):
    path = tmp_path / "x.lock"
    proc = _hold(path)
    said = []

    def release_soon():
        said.append("waiting")
        proc.stdin.close()

    start = time.monotonic()
    with file_lock(path, on_wait=release_soon) as held:
        assert held is True
    assert said == ["waiting"]
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - start < 30


def test_a_lock_file_replaced_while_waiting_is_locked_anew(tmp_path):
    path = tmp_path / "x.lock"
    proc = _hold(path)

    def replace_and_release():
        os.unlink(path)  # as the cache pruner does while it holds the lock
        proc.stdin.close()

    with file_lock(path, on_wait=replace_and_release) as held:
        assert held is True
        assert path.exists()
        assert os.stat(path).st_size == 0  # the new file, not the one the other process wrote its pid into
    assert proc.wait(timeout=30) == 0


def test_no_lock_in_an_unwritable_folder_without_the_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with file_lock(folder / "x.lock") as held:
            assert held is None
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize(
    ("n", "text"), [(3_400_000_000, "3.4 GB"), (420_000_000, "420 MB"), (12_300, "12 kB"), (512, "512 B")]
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_free_bytes(tmp_path):
    assert free_bytes(tmp_path) > 0
    assert free_bytes(tmp_path / "missing") == 0
