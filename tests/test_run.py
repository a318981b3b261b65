"""The run folder: a new one is never an existing or interrupted one, loading names what is missing, publishing is
all or nothing.
"""

from __future__ import annotations

import json

import pytest

from idc_helpers.run import (
    CHECKPOINT_STATE_FILE,
    CONFIG_FILE,
    RUN_FILES,
    RunExistsError,
    RunFolderError,
    check_new_run_dir,
    checkpoint_names,
    load_run,
    partial_dir,
    publish_run,
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
    with pytest.raises(RunFolderError, match="config.json is missing"):
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
