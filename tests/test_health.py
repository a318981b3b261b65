"""Health check CLI: ``python -m idc_helpers index --data-dir DIR``: report, JSON, every bad file named, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO_ROOT, patch_name, write_patch

from idc_helpers import health, loader
from idc_helpers.cli import main
from idc_helpers.patch_index import build_index


@pytest.fixture()
def broken_dataset(tiny_dataset) -> tuple[Path, dict[str, str]]:
    """tiny_dataset with one bad file of each kind; returns the root and {file name: expected kind}."""
    root = tiny_dataset
    truncated = next((root / "101" / "0").glob("*.png"))
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    empty = root / "102" / "0" / patch_name("102", 501, 1, 0)
    empty.write_bytes(b"")
    misnamed = write_patch(root / "102" / "1" / "102_idx5_x1_y1_class1 copy.png", np.zeros((50, 50, 3), np.uint8))
    mislabelled = write_patch(root / "103" / "0" / patch_name("103", 501, 1, 1), np.zeros((50, 50, 3), np.uint8))
    text = root / "103" / "1" / "notes.txt"
    text.write_text("hello")
    jpeg = root / "101" / "1" / patch_name("101", 501, 1, 1)
    jpeg.write_bytes(cv2.imencode(".jpg", np.zeros((50, 50, 3), np.uint8))[1].tobytes())
    off_grid = write_patch(root / "101" / "0" / patch_name("101", 75, 20, 0), np.zeros((50, 50, 3), np.uint8))
    both = write_patch(root / "102" / "1" / patch_name("102", 1, 51, 1), np.zeros((50, 50, 3), np.uint8))
    fifo = root / "103" / "1" / patch_name("103", 551, 1, 1)
    os.mkfifo(fifo)
    return root, {
        off_grid.name: "off the patch grid",
        both.name: "conflicting labels",
        patch_name("102", 1, 51, 0): "conflicting labels",
        fifo.name: "not a regular file",
        truncated.name: "truncated or corrupt",
        empty.name: "empty",
        misnamed.name: "misnamed",
        mislabelled.name: "mislabelled",
        text.name: "not a PNG",
        jpeg.name: "not a PNG",
    }


def test_clean_dataset_report(tiny_dataset, tmp_path, capsys):
    status = main(["index", "--data-dir", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert status == 0
    assert "Problems: none found." in out
    assert "patients" in out and " 3" in out and "36" in out
    assert "50x30" in out and "IDC (class 1)" in out and "25.0%" in out


def test_every_bad_file_is_named_and_status_is_1(broken_dataset, tmp_path, capsys):
    root, expected = broken_dataset
    status = main(["index", "--data-dir", str(root), "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert status == 1
    for name, kind in expected.items():
        line = next((ln for ln in out.splitlines() if ln.startswith("  [") and name in ln), None)
        assert line is not None, f"{name} not in report:\n{out}"
        assert f"[{kind}]" in line
    assert f"Problems: {len(expected)} file(s)" in out


def test_json_report(broken_dataset, tmp_path, capsys):
    root, expected = broken_dataset
    status = main(["index", "--data-dir", str(root), "--json", "--cache-dir", str(tmp_path / "cache")])
    report = json.loads(capsys.readouterr().out)
    assert status == 1 and report["ok"] is False
    assert {Path(p["path"]).name: p["kind"] for p in report["problems"]} == expected
    assert report["problem_counts"]["not a PNG"] == 2 and report["problem_counts"]["conflicting labels"] == 2
    assert report["patients"] == 3
    assert report["files_indexed"] == 35  # the truncated file has a valid header, so it is indexed; 102's x1 y51 not
    assert report["patches"] == 34  # the truncated file is left out after decoding
    assert report["idc"] + report["non_idc"] == 34
    assert report["decoded"] is True and report["cache"]["hit"] is False


def test_health_check_warms_the_cache(tiny_dataset, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["index", "--data-dir", str(tiny_dataset), "--cache-dir", str(cache)]) == 0
    assert loader.load_patches(build_index(tiny_dataset).frame, cache_dir=cache).from_cache
    assert health.health_report(tiny_dataset, cache_dir=cache)["cache"]["hit"] is True


def test_no_decode_reads_names_and_headers_only(broken_dataset, tmp_path, capsys):
    root, expected = broken_dataset
    cache = tmp_path / "cache"
    status = main(["index", "--data-dir", str(root), "--json", "--no-decode", "--cache-dir", str(cache)])
    report = json.loads(capsys.readouterr().out)
    assert status == 1 and report["decoded"] is False and report["cache"] is None
    found = {Path(p["path"]).name for p in report["problems"]}
    assert found == set(expected) - {n for n, k in expected.items() if k == "truncated or corrupt"}
    assert not cache.exists()


def test_missing_folder_exits_2_with_message(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["index", "--data-dir", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "not found" in err


def test_empty_folder_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["index", "--data-dir", str(tmp_path / "empty")]) == 2
    assert "No patient folders" in capsys.readouterr().err


def test_module_entry_point(tiny_dataset, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "idc_helpers",
            "index",
            "--data-dir",
            str(tiny_dataset),
            "--json",
            "--cache-dir",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["patches"] == 36
    assert "decoding" not in result.stderr  # no progress bar when stderr is not a terminal


def test_old_positional_form_is_refused_with_one_line_naming_data_dir(tiny_dataset, tmp_path, capsys, assert_refused):
    assert main(["index", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_refused(captured.err, "index DATA_DIR is no longer accepted: use index --data-dir DATA_DIR.")
    assert main(["index"]) == 2 and "--data-dir" in capsys.readouterr().err


def test_several_folders_are_checked_as_one_dataset(tiny_dataset, tmp_path, capsys):
    other = tmp_path / "other"
    write_patch(other / "101" / "1" / patch_name("101", 501, 1, 1), np.zeros((50, 50, 3), np.uint8))
    write_patch(other / "201" / "0" / patch_name("201", 1, 1, 0), np.zeros((50, 50, 3), np.uint8))
    dup = write_patch(other / "102" / "0" / patch_name("102", 1, 1, 0), np.zeros((50, 50, 3), np.uint8))
    status = main(
        [
            "index",
            "--data-dir",
            str(tiny_dataset),
            "--data-dir",
            str(other),
            "--json",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert status == 1 and report["patients"] == 4 and report["patches"] == 38
    assert report["data_dirs"] == [str(tiny_dataset), str(other)]
    assert [(p["path"], p["kind"]) for p in report["problems"]] == [(str(dup), "duplicate")]
    assert (
        main(
            ["index", "--data-dir", str(tiny_dataset), "--data-dir", str(other), "--cache-dir", str(tmp_path / "cache")]
        )
        == 1
    )
    assert "[duplicate] other/102/0/" in capsys.readouterr().out


def test_report_of_a_name_that_is_not_utf8_prints(tiny_dataset, tmp_path, capsys):
    with open(os.fsencode(tiny_dataset / "101" / "0") + b"/\xff\xfe.png", "wb") as handle:
        handle.write(b"x")
    assert main(["index", "--data-dir", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache")]) == 1
    out = capsys.readouterr().out
    assert "\\xff\\xfe.png" in out and "not valid UTF-8" in out


def test_unusable_cache_folder_is_one_line_naming_it(tiny_dataset, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setattr(loader, "IN_MEMORY_FALLBACK_BYTES", 0)
    assert main(["index", "--data-dir", str(tiny_dataset), "--cache-dir", str(blocker / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(blocker / "c") in err and "--cache-dir" in err


_MEASURE = """
import resource, sys
from idc_helpers.cli import main
status = main(["index", "--data-dir", sys.argv[1], "--json", "--cache-dir", sys.argv[2]])
print(status, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, file=sys.stderr)
"""


def _index_peak_mb(data_dir: Path, cache: Path) -> tuple[int, int, dict]:
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(data_dir), str(cache)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    status, peak = map(int, done.stderr.strip().splitlines()[-1].split())
    return status, peak, json.loads(done.stdout)


def test_decompression_bomb_costs_no_more_memory_than_a_patch(tiny_dataset, tmp_path):
    from test_patch_index import make_png

    _, clean_peak, _ = _index_peak_mb(tiny_dataset, tmp_path / "c1")
    bomb = tiny_dataset / "101" / "0" / patch_name("101", 501, 1, 0)
    bomb.write_bytes(make_png(10_000, 10_000))  # 300 MB of pixels in about 0.3 MB
    assert bomb.stat().st_size < 1_000_000
    status, bomb_peak, report = _index_peak_mb(tiny_dataset, tmp_path / "c2")
    assert status == 1 and [(p["path"], p["kind"]) for p in report["problems"]] == [(str(bomb), "wrong size")]
    assert "10000x10000" in report["problems"][0]["message"]
    assert bomb_peak - clean_peak < 100, (clean_peak, bomb_peak)  # decoding it would take 300 MB and more


def test_dataset_folder_whose_name_is_not_utf8(tiny_dataset, tmp_path, capsys):
    odd = os.fsdecode(os.fsencode(tmp_path) + b"/data\xff")
    assert main(["index", "--data-dir", odd]) == 2
    assert "data\\xff" in capsys.readouterr().err
    os.rename(tiny_dataset, odd)
    assert main(["index", "--data-dir", odd, "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "data\\xff" in capsys.readouterr().out
    assert main(["index", "--data-dir", odd, "--json", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert json.loads(capsys.readouterr().out)["cache"]["hit"] is True
