"""The run folder: a new one is never an existing or interrupted one, and has one writer at a time.

Loading a run names what is missing; publishing one is all or nothing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os

import pytest

from idc_helpers.run_folder import (
    CHECKPOINT_STATE_FILE,
    CONFIG_FILE,
    RUN_FILES,
    RunBusyError,
    RunExistsError,
    RunFolderError,
    check_new_run_dir,
    checkpoint_names,
    claim_run,
    load_run,
    partial_dir,
    publish_run,
    run_writer,
)


def test_partial_dir_is_a_hidden_sibling(tmp_path):
    assert partial_dir(tmp_path / "runs" / "r1") == tmp_path / "runs" / ".r1.partial"


def test_a_new_run_dir_must_be_new(tmp_path):
    assert check_new_run_dir(tmp_path / "r") == tmp_path / "r"
    (tmp_path / "empty").mkdir()
    assert check_new_run_dir(tmp_path / "empty") == tmp_path / "empty"  # an empty folder is fine
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(RunExistsError, match="never overwritten"):
        check_new_run_dir(tmp_path / "full")
    (tmp_path / "file").write_text("")
    with pytest.raises(RunExistsError):
        check_new_run_dir(tmp_path / "file")


def test_an_interrupted_run_blocks_a_new_one_and_says_how_to_go_on(tmp_path):
    partial_dir(tmp_path / "r").mkdir()
    with pytest.raises(RunExistsError, match=r"resume with `python -m idc_helpers train --resume .*r` or delete"):
        check_new_run_dir(tmp_path / "r")


def test_load_run_names_what_is_missing(tmp_path):
    with pytest.raises(RunFolderError, match="train --out RUN_DIR"):
        load_run(tmp_path / "nothing")
    partial_dir(tmp_path / "half").mkdir()
    (partial_dir(tmp_path / "half") / CONFIG_FILE).write_text("{}")
    with pytest.raises(RunFolderError, match=r"interrupted run .*--resume"):
        load_run(tmp_path / "half")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.keras").write_bytes(b"not a model")
    with pytest.raises(RunFolderError, match=r"config\.json is missing"):
        load_run(broken)
    (broken / CONFIG_FILE).write_text("{not json")
    with pytest.raises(RunFolderError, match="cannot be read"):
        load_run(broken)


def test_publish_drops_the_checkpoint_and_renames(tmp_path):
    partial = partial_dir(tmp_path / "r")
    partial.mkdir()
    for name in RUN_FILES:
        (partial / name).write_text("{}")
    for name in (*checkpoint_names(3).values(), CHECKPOINT_STATE_FILE):
        (partial / name).write_text("{}")
    publish_run(partial, tmp_path / "r")
    assert not partial.exists()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(RUN_FILES)


def test_publish_never_replaces_a_run_that_appeared_meanwhile(tmp_path):
    partial = partial_dir(tmp_path / "r")
    partial.mkdir()
    (partial / CONFIG_FILE).write_text(json.dumps({"mine": True}))
    (partial / CHECKPOINT_STATE_FILE).write_text("{}")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / CONFIG_FILE).write_text(json.dumps({"theirs": True}))
    with pytest.raises(RunExistsError, match="appeared while training"):
        publish_run(partial, tmp_path / "r")
    assert json.loads((tmp_path / "r" / CONFIG_FILE).read_text()) == {"theirs": True}
    assert json.loads((partial / CONFIG_FILE).read_text()) == {"mine": True}
    assert (partial / CHECKPOINT_STATE_FILE).is_file()  # still resumable, nothing lost


def test_a_run_dir_that_cannot_be_created_is_refused_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(RunFolderError, match="not a folder you can write to"):
        check_new_run_dir(tmp_path / "a-file" / "runs" / "r")


def test_a_claimed_partial_run_names_its_writer_and_refuses_a_second_claim(tmp_path):
    partial = partial_dir(tmp_path / "r")
    partial.mkdir()
    assert run_writer(partial) is None
    with claim_run(partial, tmp_path / "r"):
        assert run_writer(partial) == os.getpid()
        busy = rf"another train is writing .*r \(pid {os.getpid()}\)"
        with pytest.raises(RunBusyError, match=busy), claim_run(partial, tmp_path / "r"):
            pass
    assert run_writer(partial) is None  # released: an interrupted run, no live writer


def test_a_file_system_without_locks_claims_the_run_unlocked(tmp_path, monkeypatch):
    partial = partial_dir(tmp_path / "r")
    partial.mkdir()

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with claim_run(partial, tmp_path / "r"), claim_run(partial, tmp_path / "r"):
        assert run_writer(partial) is None
