"""Patch index: strict name parsing, the index of a generated tree, every kind of bad input, and the real sample."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import stat
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import patch_name, write_patch

from idc_helpers import patch_files as pf
from idc_helpers import patch_index as pi
from idc_helpers.errors import UserError

# --- names ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("8863_idx5_x51_y1251_class0.png", ("8863", 51, 1251, 0)),
        ("10253_idx5_x1001_y1_class1.png", ("10253", 1001, 1, 1)),
    ],
)
def test_parse_valid_names(name, expected):
    assert pf.parse_patch_name(name) == expected


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
        "8863_idx5_x51_y1251_class0.png\n",  # names are matched whole: nothing may trail, not even a newline
        "\n8863_idx5_x51_y1251_class0.png",
        " 8863_idx5_x51_y1251_class0.png",
    ],
)
def test_parse_invalid_names(name):
    assert pf.parse_patch_name(name) is None


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
    keys = list(zip(frame["patient_id"].astype(int), frame["y"], frame["x"], strict=True))
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
        "patients": 3,
        "patches": 36,
        "non_idc": 27,
        "idc": 9,
        "idc_fraction": 0.25,
        "not_50x50": 3,
        "not_50x50_sizes": {"50x30": 3},
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
    problem = _only_problem(index, pf.MISNAMED)
    assert problem.path == str(bad)
    assert bad.name in str(problem)
    assert len(index.frame) == 36


def test_label_folder_mismatch(tiny_dataset):
    bad = write_patch(tiny_dataset / "101" / "0" / patch_name("101", 501, 1, 1), _good_patch())
    index = pi.build_index(tiny_dataset)
    problem = _only_problem(index, pf.MISLABELLED)
    assert problem.path == str(bad)
    assert "class1" in problem.message and "0/" in problem.message
    assert str(bad) not in set(index.frame["path"])


def test_file_in_wrong_patient_folder(tiny_dataset):
    bad = write_patch(tiny_dataset / "101" / "0" / patch_name("102", 501, 1, 0), _good_patch())
    index = pi.build_index(tiny_dataset)
    problem = _only_problem(index, pf.WRONG_PATIENT)
    assert problem.path == str(bad)
    assert "102" in problem.message and "101" in problem.message


def test_text_file_is_not_a_png(tiny_dataset):
    bad = tiny_dataset / "102" / "1" / "notes.txt"
    bad.write_text("not an image")
    problem = _only_problem(pi.build_index(tiny_dataset), pf.NOT_PNG)
    assert problem.path == str(bad)


def test_jpeg_renamed_png_is_not_a_png(tiny_dataset):
    ok, data = cv2.imencode(".jpg", _good_patch())
    assert ok
    bad = tiny_dataset / "102" / "0" / patch_name("102", 501, 1, 0)
    bad.write_bytes(data.tobytes())
    index = pi.build_index(tiny_dataset)
    problem = _only_problem(index, pf.NOT_PNG)
    assert problem.path == str(bad)
    assert "PNG header" in problem.message
    assert len(index.frame) == 36


def test_zero_byte_file(tiny_dataset):
    bad = tiny_dataset / "103" / "0" / patch_name("103", 501, 1, 0)
    bad.write_bytes(b"")
    problem = _only_problem(pi.build_index(tiny_dataset), pf.EMPTY)
    assert problem.path == str(bad)
    assert "0 bytes" in problem.message


def test_non_numeric_folder_is_reported_and_the_rest_indexed(tiny_dataset):
    odd = tiny_dataset / "IDC_regular_ps50_idx5"
    odd.mkdir()
    index = pi.build_index(tiny_dataset)
    problem = _only_problem(index, pf.UNEXPECTED)
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
    assert sorted(p.kind for p in index.problems) == sorted([pf.NOT_PNG, pf.MISLABELLED, pf.EMPTY])
    assert [p.path for p in index.problems] == sorted(p.path for p in index.problems)
    frame = index.problems_frame()
    assert list(frame.columns) == ["path", "kind", "message"] and len(frame) == 3


def test_missing_folder_names_the_folder(tmp_path):
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(pi.DatasetFolderError, match="no_such_dataset") as info:
        pi.build_index(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, UserError)


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
    assert pf.read_png_size(path) == (41, 30)
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        pf.read_png_size(tmp_path / "b.png")


# --- PNG headers: what the first 33 bytes tell, before anything is decoded -----------------------------------------


def _chunk(kind: bytes, data: bytes, crc_ok: bool = True) -> bytes:
    crc = zlib.crc32(kind + data) ^ (0 if crc_ok else 1)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def make_png(
    width: int,
    height: int,
    *,
    colour: int = 2,
    depth: int = 8,
    rows: int | None = None,
    header_crc_ok: bool = True,
    idat_crc_ok: bool = True,
    cut: int | None = None,
) -> bytes:
    """Make a PNG by hand whose IHDR says ``width x height`` and whose image data holds ``rows`` rows of zeros.

    ``rows`` defaults to ``height``; more rows than the header says makes a PNG that lies about its data. ``cut``
    truncates.
    """
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    row_bytes = 1 + (width * channels * depth + 7) // 8
    compressor = zlib.compressobj(9)
    block = b"\0" * row_bytes * 64
    parts, left = [], height if rows is None else rows
    while left > 0:
        take = min(left, 64)
        parts.append(compressor.compress(block[: take * row_bytes]))
        left -= take
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    chunks = [_chunk(b"IHDR", ihdr, header_crc_ok)]
    if colour == 3:
        chunks.append(_chunk(b"PLTE", bytes(range(3 * 16))))
    chunks += [_chunk(b"IDAT", b"".join(parts), idat_crc_ok), _chunk(b"IEND", b"")]
    data = pf.PNG_SIGNATURE + b"".join(chunks)
    return data[:cut] if cut is not None else data


@pytest.mark.parametrize(
    "data, kind, words",
    [
        (make_png(20000, 20000, rows=1), pf.WRONG_SIZE, "20000x20000"),  # the decompression bomb's header
        (make_png(50, 51), pf.WRONG_SIZE, "50x51"),
        (make_png(50, 50, header_crc_ok=False), pf.TRUNCATED, "damaged"),
        (make_png(50, 50, cut=20), pf.TRUNCATED, "ends inside"),
        (make_png(50, 50, depth=3), pf.NOT_PNG, "bit depth 3"),
        (make_png(0, 50), pf.TRUNCATED, "impossible size"),
        (b"GIF89a" + bytes(100), pf.NOT_PNG, "PNG header"),
        (b"", pf.EMPTY, "0 bytes"),
    ],
)
def test_png_header_is_checked_before_decoding(tiny_dataset, data, kind, words):
    bad = tiny_dataset / "101" / "0" / patch_name("101", 501, 1, 0)
    bad.write_bytes(data)
    index = pi.build_index(tiny_dataset)
    problem = _only_problem(index, kind)
    assert problem.path == str(bad) and words in problem.message
    assert len(index.frame) == 36 and str(bad) not in set(index.frame["path"])


def test_png_headers_of_every_real_colour_type_pass():
    for colour, depth in [(0, 1), (0, 16), (2, 8), (2, 16), (3, 4), (4, 8), (6, 16)]:
        assert pf.check_png_header(make_png(50, 42, colour=colour, depth=depth)) == (50, 42)


def test_file_too_large_for_a_patch_is_not_read(tiny_dataset):
    bad = tiny_dataset / "102" / "1" / patch_name("102", 501, 1, 1)
    bad.write_bytes(make_png(50, 50) + b"\0" * (pf.MAX_PATCH_FILE_BYTES + 1))
    problem = _only_problem(pi.build_index(tiny_dataset), pf.WRONG_SIZE)
    assert problem.path == str(bad) and "MB" in problem.message


# --- the shared rules: grid, conflicting labels, non-regular entries --------------------------------------------------


@pytest.mark.parametrize(
    "x, y, words",
    [(75, 20, "not on the 50-pixel patch grid"), (51, 26, "not on the"), (100_001, 100_001, "outside any slide")],
)
def test_off_grid_coordinates_are_reported(tiny_dataset, x, y, words):
    bad = write_patch(tiny_dataset / "101" / "0" / patch_name("101", x, y, 0), _good_patch())
    index = pi.build_index(tiny_dataset)
    problem = _only_problem(index, pf.OFF_GRID)
    assert problem.path == str(bad) and words in problem.message and f"x={x}" in problem.message
    assert len(index.frame) == 36


def test_real_grid_rule():
    frame = pd.DataFrame(
        {
            "path": ["a", "b", "c", "d"],
            "patient_id": ["1"] * 4,
            "x": [1, 51, 2, 3951],
            "y": [1, 2901, 1, 26],
            "label": [0] * 4,
        }
    )
    kept, problems = pi.check_index(frame)
    assert list(kept["path"]) == ["a", "b"]
    assert sorted(p.path for p in problems) == ["c", "d"]


def test_same_position_in_both_class_folders_is_left_out(tiny_dataset):
    # tiny_dataset has 101 at x=1, y=1 in 0/; put the same position in 1/ too.
    twin = write_patch(tiny_dataset / "101" / "1" / patch_name("101", 1, 1, 1), _good_patch())
    original = tiny_dataset / "101" / "0" / patch_name("101", 1, 1, 0)
    index = pi.build_index(tiny_dataset)
    found = [p for p in index.problems if p.kind == pf.CONFLICTING_LABELS]
    assert sorted(p.path for p in found) == sorted([str(original), str(twin)])
    assert str(twin) in next(p.message for p in found if p.path == str(original))
    assert len(index.frame) == 35
    assert not ((index.frame["patient_id"] == "101") & (index.frame["x"] == 1) & (index.frame["y"] == 1)).any()


def _run_with_alarm(function, seconds=20):
    def hang(signum, frame):
        raise TimeoutError("the scan hung")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        return function()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_entries_that_are_not_regular_files_are_named_and_never_opened(tiny_dataset, tmp_path):
    folder = tiny_dataset / "101" / "0"
    expected = {}
    (folder / patch_name("101", 501, 1, 0)).mkdir()
    expected[patch_name("101", 501, 1, 0)] = "a folder"
    os.symlink(tmp_path / "nowhere.png", folder / patch_name("101", 551, 1, 0))
    expected[patch_name("101", 551, 1, 0)] = "a symbolic link to nothing"
    os.mkfifo(folder / patch_name("101", 601, 1, 0))  # opening it for reading would block forever
    expected[patch_name("101", 601, 1, 0)] = "a named pipe"
    try:  # a character device like /dev/zero, which would never end if read (needs root)
        os.mknod(folder / patch_name("101", 701, 1, 0), 0o600 | stat.S_IFCHR, os.makedev(1, 5))
        expected[patch_name("101", 701, 1, 0)] = "a character device"
    except PermissionError:
        pass
    sock = socket.socket(socket.AF_UNIX)
    sock_path = folder / patch_name("101", 651, 1, 0)
    try:
        sock.bind(str(sock_path))
        expected[sock_path.name] = "a socket"
        index = _run_with_alarm(lambda: pi.build_index(tiny_dataset))
    finally:
        sock.close()
    found = {Path(p.path).name: p for p in index.problems}
    assert set(found) == set(expected)
    for name, what in expected.items():
        assert found[name].kind == pf.NOT_A_FILE and what in found[name].message
    assert len(index.frame) == 36


def test_symlink_to_a_patch_is_indexed(tiny_dataset, tmp_path):
    real = write_patch(tmp_path / "elsewhere.png", _good_patch())
    link = tiny_dataset / "101" / "0" / patch_name("101", 501, 1, 0)
    os.symlink(real, link)
    index = pi.build_index(tiny_dataset)
    assert index.problems == [] and str(link) in set(index.frame["path"])


def test_names_that_are_not_utf8_or_use_other_digits(tiny_dataset):
    folder = os.fsencode(tiny_dataset / "101" / "0")
    with open(folder + b"/101_idx5_x501_y1_class0\xff.png", "wb") as handle:
        handle.write(make_png(50, 50))
    write_patch(tiny_dataset / "101" / "0" / "101_idx5_x\u0665\u0660\u0661_y1_class0.png", _good_patch())
    (tiny_dataset / "\u0668\u0668\u0666\u0663" / "0").mkdir(parents=True)  # Arabic-Indic digits: not a patient id
    index = pi.build_index(tiny_dataset)
    kinds = sorted(p.kind for p in index.problems)
    assert kinds == [pf.MISNAMED, pf.MISNAMED, pf.UNEXPECTED]
    assert any("not valid UTF-8" in p.message and "\\xff" in p.message for p in index.problems)
    assert len(index.frame) == 36


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not stop root")
def test_unreadable_class_folder_is_reported_and_the_rest_indexed(tiny_dataset):
    locked = tiny_dataset / "102" / "1"
    locked.chmod(0)
    try:
        index = pi.build_index(tiny_dataset)
    finally:
        locked.chmod(0o755)
    problem = _only_problem(index, pf.UNREADABLE)
    assert problem.path == str(locked) and "permissions" in problem.message
    assert len(index.frame) == 33


def test_class_folder_that_is_a_symlink_loop_is_reported(tiny_dataset):
    # A class folder replaced by a symbolic link to itself: even asking whether it is a folder fails.
    shutil.rmtree(tiny_dataset / "103" / "1")
    os.symlink(tiny_dataset / "103" / "1", tiny_dataset / "103" / "1")
    index = pi.build_index(tiny_dataset)
    problem = _only_problem(index, pf.UNEXPECTED)
    assert problem.path == str(tiny_dataset / "103" / "1") and len(index.frame) == 33


# --- several folders ----------------------------------------------------------------------------------------------


def test_several_folders_make_one_index(tiny_dataset, tmp_path):
    other = tmp_path / "other"
    # Patient 101 continues in the second folder (new positions), patient 201 is only there.
    extra = write_patch(other / "101" / "1" / patch_name("101", 501, 1, 1), _good_patch())
    write_patch(other / "201" / "0" / patch_name("201", 1, 1, 0), _good_patch())
    # The same file as in the first folder: a duplicate, the first folder's copy is kept.
    dup = write_patch(other / "102" / "0" / patch_name("102", 1, 1, 0), _good_patch())
    # The same position with the other label: both copies left out.
    conflict = write_patch(other / "103" / "1" / patch_name("103", 51, 1, 1), _good_patch())
    for index in (pi.build_index(tiny_dataset, other), pi.build_index([tiny_dataset, other])):
        assert index.roots == [tiny_dataset, other] and index.root == tiny_dataset
        frame = index.frame
        assert sorted(frame["patient_id"].unique()) == ["101", "102", "103", "201"]
        assert (frame["patient_id"] == "101").sum() == 13 and str(extra) in set(frame["path"])
        kinds = {Path(p.path).parent.parent.parent.name + ":" + p.kind for p in index.problems}
        assert kinds == {"other:" + pf.DUPLICATE, "other:" + pf.CONFLICTING_LABELS, "tiny:" + pf.CONFLICTING_LABELS}
        assert str(dup) not in set(frame["path"]) and str(conflict) not in set(frame["path"])
        assert str(tiny_dataset / "102" / "0" / patch_name("102", 1, 1, 0)) in set(frame["path"])
        assert len(frame) == 36 + 2 - 1
        keys = list(zip(frame["patient_id"].astype(int), frame["y"], frame["x"], strict=True))
        assert keys == sorted(keys)


def test_one_missing_folder_of_several_is_named(tiny_dataset, tmp_path):
    with pytest.raises(pi.DatasetFolderError, match="missing_one"):
        pi.build_index(tiny_dataset, tmp_path / "missing_one")


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


@pytest.mark.realdata
def test_real_sample_and_sparse_folders_in_one_index(real_sample_dir):
    sparse = real_sample_dir.parent / "idc_sparse"
    if not sparse.is_dir():
        pytest.skip(f"sparse sample not found at {sparse}")
    index = pi.build_index(real_sample_dir, sparse)
    # Every real patch passes the shared rules (on the grid, one label per position, no duplicates).
    assert index.problems == []
    summary = pi.dataset_summary(index.frame)
    assert (summary["patients"], summary["patches"]) == (29 + 195, 25_899 + 17_317)
    assert (summary["non_idc"], summary["idc"]) == (20_247 + 12_366, 5_652 + 4_951)
    assert index.roots == [real_sample_dir.absolute(), sparse.absolute()]


def test_one_patients_folder_given_as_the_dataset_is_named_as_such(tiny_dataset, cli_error):
    """Its class folders 0/ and 1/ would otherwise pass for patients 0 and 1 holding a file each of problems."""
    with pytest.raises(pi.DatasetFolderError, match="is the folder of one patient .* --data-dir " + str(tiny_dataset)):
        pi.build_index(tiny_dataset / "101")
    err = cli_error(["index", "--data-dir", str(tiny_dataset / "101")])
    assert "folder of one patient" in err
