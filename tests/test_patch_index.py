"""Patch index: strict name parsing, the index of a generated tree, every kind of bad input, and the real sample."""

from __future__ import annotations

import csv
import shutil

import cv2
import numpy as np
import pytest

from conftest import patch_name, write_patch
from idc_helpers import patch_index as pi


# --- names ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("8863_idx5_x51_y1251_class0.png", ("8863", 51, 1251, 0)),
        ("10253_idx5_x1001_y1_class1.png", ("10253", 1001, 1, 1)),
    ],
)
def test_parse_valid_names(name, expected):
    assert pi.parse_patch_name(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "8863_idx5_x51_y1251_class2.png",  # label must be 0 or 1
        "8863_idx5_x51_y1251_class0.PNG",  # the dataset's names are lower case
        "8863_idx5_x51_y1251_class0.png.bak",
        "8863_idx5_x51_y1251_class0 (1).png",
        "8863_idx5_x51_y1251.png",
        "8863_idx4_x51_y1251_class0.png",
        "8863_idx5_x-51_y1251_class0.png",
        "abc_idx5_x51_y1251_class0.png",
        "8863_idx5_x51_y1251_class0.jpg",
        "",
    ],
)
def test_parse_invalid_names(name):
    assert pi.parse_patch_name(name) is None


# --- the index of a generated tree ------------------------------------------------------------------------------


def test_index_of_tiny_dataset(tiny_dataset):
    index = pi.build_index(tiny_dataset)
    frame = index.frame
    assert index.problems == []
    assert list(frame.columns) == pi.INDEX_COLUMNS
    assert len(frame) == 36
    assert sorted(frame["patient_id"].unique()) == ["101", "102", "103"]
    assert frame["patient_id"].map(type).eq(str).all()
    assert frame["x"].dtype == np.int32 and frame["label"].dtype == np.int8
    # Sorted by patient, then y, then x.
    keys = list(zip(frame["patient_id"].astype(int), frame["y"], frame["x"]))
    assert keys == sorted(keys)
    # The right column (x = 151) is IDC; the label agrees with the folder.
    assert ((frame["x"] == 151) == (frame["label"] == 1)).all()
    for row in frame.itertuples():
        assert row.path.endswith(f"/{row.patient_id}/{row.label}/{patch_name(row.patient_id, row.x, row.y, row.label)}")
    short = frame[(frame["width"] != 50) | (frame["height"] != 50)]
    assert len(short) == 3
    assert (short["width"] == 50).all() and (short["height"] == 30).all()
    assert (short["x"] == 1).all() and (short["y"] == 101).all()


def test_patient_table_and_summary(tiny_dataset):
    frame = pi.build_index(tiny_dataset).frame
    table = pi.patient_table(frame)
    assert list(table["patient_id"]) == ["101", "102", "103"]
    assert (table["n_patches"] == 12).all()
    assert (table["n_idc"] == 3).all() and (table["n_non_idc"] == 9).all()
    assert np.allclose(table["idc_fraction"], 0.25)
    assert (table["n_not_50x50"] == 1).all()
    summary = pi.dataset_summary(frame)
    assert summary == {
        "patients": 3, "patches": 36, "non_idc": 27, "idc": 9, "idc_fraction": 0.25,
        "not_50x50": 3, "not_50x50_sizes": {"50x30": 3},
    }


def test_headers_not_read(tiny_dataset):
    frame = pi.build_index(tiny_dataset, read_headers=False).frame
    assert len(frame) == 36
    assert (frame["width"] == 50).all() and (frame["height"] == 50).all()


# --- bad inputs: each reported by name, none crashes the scan ------------------------------------------------------


def _only_problem(index, kind):
    found = [p for p in index.problems if p.kind == kind]
    assert len(found) == 1, index.problems
    return found[0]


def _good_patch():
    return np.full((50, 50, 3), 120, np.uint8)


def test_misnamed_file(tiny_dataset):
    bad = write_patch(tiny_dataset / "101" / "0" / "101_idx5_x1_y1_class0 (copy).png", _good_patch())
    index = pi.build_index(tiny_dataset)
    problem = _only_problem(index, pi.MISNAMED)
    assert problem.path == str(bad)
    assert bad.name in str(problem)
    assert len(index.frame) == 36


def test_label_folder_mismatch(tiny_dataset):
    bad = write_patch(tiny_dataset / "101" / "0" / patch_name("101", 501, 1, 1), _good_patch())
    index = pi.build_index(tiny_dataset)
    problem = _only_problem(index, pi.MISLABELLED)
    assert problem.path == str(bad)
    assert "class1" in problem.message and "0/" in problem.message
    assert str(bad) not in set(index.frame["path"])


def test_file_in_wrong_patient_folder(tiny_dataset):
    bad = write_patch(tiny_dataset / "101" / "0" / patch_name("102", 501, 1, 0), _good_patch())
    index = pi.build_index(tiny_dataset)
    problem = _only_problem(index, pi.WRONG_PATIENT)
    assert problem.path == str(bad)
    assert "102" in problem.message and "101" in problem.message


def test_text_file_is_not_a_png(tiny_dataset):
    bad = tiny_dataset / "102" / "1" / "notes.txt"
    bad.write_text("not an image")
    problem = _only_problem(pi.build_index(tiny_dataset), pi.NOT_PNG)
    assert problem.path == str(bad)


def test_jpeg_renamed_png_is_not_a_png(tiny_dataset):
    ok, data = cv2.imencode(".jpg", _good_patch())
    assert ok
    bad = tiny_dataset / "102" / "0" / patch_name("102", 501, 1, 0)
    bad.write_bytes(data.tobytes())
    index = pi.build_index(tiny_dataset)
    problem = _only_problem(index, pi.NOT_PNG)
    assert problem.path == str(bad)
    assert "PNG header" in problem.message
    assert len(index.frame) == 36


def test_zero_byte_file(tiny_dataset):
    bad = tiny_dataset / "103" / "0" / patch_name("103", 501, 1, 0)
    bad.write_bytes(b"")
    problem = _only_problem(pi.build_index(tiny_dataset), pi.EMPTY)
    assert problem.path == str(bad)
    assert "0 bytes" in problem.message


def test_non_numeric_folder_is_reported_and_the_rest_indexed(tiny_dataset):
    odd = tiny_dataset / "IDC_regular_ps50_idx5"
    odd.mkdir()
    index = pi.build_index(tiny_dataset)
    problem = _only_problem(index, pi.UNEXPECTED)
    assert problem.path == str(odd)
    assert len(index.frame) == 36


def test_hidden_files_are_ignored(tiny_dataset):
    (tiny_dataset / "101" / "0" / ".DS_Store").write_bytes(b"\0")
    index = pi.build_index(tiny_dataset)
    assert index.problems == [] and len(index.frame) == 36


def test_all_problems_together_are_listed(tiny_dataset):
    (tiny_dataset / "101" / "0" / "readme.txt").write_text("x")
    (tiny_dataset / "101" / "1" / patch_name("101", 501, 1, 0)).write_bytes(b"")  # mislabelled wins over empty
    (tiny_dataset / "102" / "0" / patch_name("102", 501, 1, 0)).write_bytes(b"")
    index = pi.build_index(tiny_dataset)
    assert sorted(p.kind for p in index.problems) == sorted([pi.NOT_PNG, pi.MISLABELLED, pi.EMPTY])
    assert [p.path for p in index.problems] == sorted(p.path for p in index.problems)
    frame = index.problems_frame()
    assert list(frame.columns) == ["path", "kind", "message"] and len(frame) == 3


def test_missing_folder_names_the_folder(tmp_path):
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(pi.DatasetFolderError, match="no_such_dataset") as info:
        pi.build_index(missing)
    assert isinstance(info.value, FileNotFoundError)


def test_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(pi.DatasetFolderError, match="No patient folders"):
        pi.build_index(empty)


def test_patient_folder_with_no_patches(tiny_dataset):
    shutil.rmtree(tiny_dataset / "103")
    (tiny_dataset / "103" / "0").mkdir(parents=True)
    frame = pi.build_index(tiny_dataset).frame
    assert sorted(frame["patient_id"].unique()) == ["101", "102"]


def test_read_png_size(tmp_path):
    path = write_patch(tmp_path / "a.png", np.zeros((30, 41, 3), np.uint8))
    assert pi.read_png_size(path) == (41, 30)
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        pi.read_png_size(tmp_path / "b.png")


# --- the real sample ----------------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_sample_facts(real_sample_dir):
    index = pi.build_index(real_sample_dir)
    assert index.problems == []
    summary = pi.dataset_summary(index.frame)
    assert summary["patients"] == 29
    assert summary["patches"] == 25_899
    assert (summary["non_idc"], summary["idc"]) == (20_247, 5_652)
    assert summary["not_50x50"] == 240
    assert summary["not_50x50_sizes"]["50x42"] == 75 and summary["not_50x50_sizes"]["50x1"] == 67
    # Per-patient counts agree with the table shipped with the sample.
    counts_csv = real_sample_dir.parent / "idc_sample_counts.csv"
    if counts_csv.is_file():
        with counts_csv.open() as handle:
            expected = {r["patient_id"]: (int(r["class0"]), int(r["class1"])) for r in csv.DictReader(handle)}
        table = pi.patient_table(index.frame)
        got = {r.patient_id: (r.n_non_idc, r.n_idc) for r in table.itertuples()}
        assert got == expected
