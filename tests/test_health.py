"""Health check CLI: ``python -m idc_helpers index DATA_DIR``: report, JSON, every bad file named, exit codes."""

from __future__ import annotations

import json
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
    return root, {
        truncated.name: "truncated or corrupt",
        empty.name: "empty",
        misnamed.name: "misnamed",
        mislabelled.name: "mislabelled",
        text.name: "not a PNG",
        jpeg.name: "not a PNG",
    }


def test_clean_dataset_report(tiny_dataset, tmp_path, capsys):
    status = main(["index", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert status == 0
    assert "Problems: none found." in out
    assert "patients" in out and " 3" in out and "36" in out
    assert "50x30" in out and "IDC (class 1)" in out and "25.0%" in out


def test_every_bad_file_is_named_and_status_is_1(broken_dataset, tmp_path, capsys):
    root, expected = broken_dataset
    status = main(["index", str(root), "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert status == 1
    for name, kind in expected.items():
        line = next((ln for ln in out.splitlines() if name in ln), None)
        assert line is not None, f"{name} not in report:\n{out}"
        assert f"[{kind}]" in line
    assert f"Problems: {len(expected)} file(s)" in out


def test_json_report(broken_dataset, tmp_path, capsys):
    root, expected = broken_dataset
    status = main(["index", str(root), "--json", "--cache-dir", str(tmp_path / "cache")])
    report = json.loads(capsys.readouterr().out)
    assert status == 1 and report["ok"] is False
    assert {Path(p["path"]).name: p["kind"] for p in report["problems"]} == expected
    assert report["problem_counts"]["not a PNG"] == 2
    assert report["patients"] == 3
    assert report["files_indexed"] == 36  # the truncated file has a valid header, so it is indexed
    assert report["patches"] == 35  # the truncated file is left out after decoding
    assert report["idc"] + report["non_idc"] == 35
    assert report["decoded"] is True and report["cache"]["hit"] is False


def test_health_check_warms_the_cache(tiny_dataset, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["index", str(tiny_dataset), "--cache-dir", str(cache)]) == 0
    assert loader.load_patches(build_index(tiny_dataset).frame, cache_dir=cache).from_cache
    assert health.health_report(tiny_dataset, cache_dir=cache)["cache"]["hit"] is True


def test_no_decode_reads_names_and_headers_only(broken_dataset, tmp_path, capsys):
    root, expected = broken_dataset
    cache = tmp_path / "cache"
    status = main(["index", str(root), "--json", "--no-decode", "--cache-dir", str(cache)])
    report = json.loads(capsys.readouterr().out)
    assert status == 1 and report["decoded"] is False and report["cache"] is None
    found = {Path(p["path"]).name for p in report["problems"]}
    assert found == set(expected) - {n for n, k in expected.items() if k == "truncated or corrupt"}
    assert not cache.exists()


def test_missing_folder_exits_2_with_message(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["index", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "not found" in err


def test_empty_folder_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["index", str(tmp_path / "empty")]) == 2
    assert "No patient folders" in capsys.readouterr().err


def test_module_entry_point(tiny_dataset, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "idc_helpers", "index", str(tiny_dataset), "--json", "--cache-dir", str(tmp_path / "c")],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["patches"] == 36
    assert "decoding" not in result.stderr  # no progress bar when stderr is not a terminal
