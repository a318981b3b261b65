"""Tests for the synthetic demo dataset: Kaggle layout, determinism, a learnable IDC class, safe writing, notices."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from idc_helpers import demo_data
from idc_helpers.cli import main
from idc_helpers.demo_data import (
    DEFAULT_PATIENTS,
    DEMO_MARKER,
    FIRST_PATIENT_ID,
    SYNTHETIC_NOTICE,
    DemoDataError,
    DemoDestinationError,
    is_synthetic,
    write_demo_dataset,
)
from idc_helpers.patch_index import build_index, dataset_summary, patient_table

SMALL_GRID = (8, 6)  # columns, rows: a few dozen patches per patient, enough to check files quickly


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """The default demo dataset (DEFAULT_PATIENTS patients, seed 0), written once for this module."""
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "data")


@pytest.fixture(scope="module")
def demo_frame(demo_dir):
    index = build_index(demo_dir)
    assert index.problems == [], [str(p) for p in index.problems]
    return index.frame


@pytest.fixture(scope="module")
def demo_images(demo_frame) -> np.ndarray:
    """Every patch as (N, 50, 50, 3) uint8 RGB, border patches padded with white at the bottom/right."""
    images = np.full((len(demo_frame), 50, 50, 3), 255, np.uint8)
    for i, path in enumerate(demo_frame["path"]):
        patch = cv2.imread(path, cv2.IMREAD_COLOR)[..., ::-1]
        images[i, : patch.shape[0], : patch.shape[1]] = patch
    return images


def tree_digest(root: Path) -> str:
    """SHA-256 over every file's relative path and bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary folders the writer may have left next to the destination."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_default_dataset_has_the_kaggle_layout_and_no_problems(demo_dir, demo_frame):
    expected = {str(FIRST_PATIENT_ID + k) for k in range(DEFAULT_PATIENTS)}
    assert {p.name for p in demo_dir.iterdir() if p.is_dir()} == expected
    assert set(demo_frame["patient_id"]) == expected
    assert ((demo_frame["x"] - 1) % 50 == 0).all() and ((demo_frame["y"] - 1) % 50 == 0).all()
    assert not demo_frame.duplicated(["patient_id", "x", "y"]).any()
    for path in demo_frame["path"].iloc[::97]:  # names and folders agree (build_index checks it too)
        path = Path(path)
        assert path.name.startswith(f"{path.parents[1].name}_idx5_x")
        assert path.name.endswith(f"_class{path.parent.name}.png")
    summary = dataset_summary(demo_frame)
    assert 2000 <= summary["patches"] <= 4500
    assert 0.18 <= summary["idc_fraction"] <= 0.32


def test_most_patients_have_both_classes(demo_frame):
    table = patient_table(demo_frame)
    both = (table["n_idc"] > 0) & (table["n_non_idc"] > 0)
    assert both.sum() >= DEFAULT_PATIENTS - 1
    assert (table["idc_fraction"] < 0.7).all()
    assert (table["n_patches"] >= 30).all()


def test_border_patches_are_smaller_and_sit_on_the_slide_edge(demo_frame):
    small = (demo_frame["width"] < 50) | (demo_frame["height"] < 50)
    assert 0.005 <= small.mean() <= 0.05
    assert (demo_frame["width"] <= 50).all() and (demo_frame["height"] <= 50).all()
    right = demo_frame.groupby("patient_id")["x"].transform("max")
    bottom = demo_frame.groupby("patient_id")["y"].transform("max")
    on_edge = ((demo_frame["width"] < 50) & (demo_frame["x"] == right)) | (
        (demo_frame["height"] < 50) & (demo_frame["y"] == bottom)
    )
    assert on_edge[small].all()
    row = demo_frame[small].iloc[0]
    assert cv2.imread(row["path"]).shape == (row["height"], row["width"], 3)  # saved at its real size


def test_idc_patches_hold_more_haematoxylin(demo_frame, demo_images):
    # Optical density of the red channel: haematoxylin absorbs red, eosin barely does.
    od_red = -np.log((demo_images[..., 0].astype(np.float32) + 1) / 256).mean(axis=(1, 2))
    labels = demo_frame["label"].to_numpy()
    assert od_red[labels == 1].mean() > 1.8 * od_red[labels == 0].mean()


def test_idc_is_learnable_across_patients_from_colour_alone(demo_frame, demo_images):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    # 16-bin histograms of R, G and B per patch: a deliberately weak model that must still generalise to
    # patients it has not seen, as a CNN will have to.
    n = len(demo_images)
    bins = (demo_images // 16).reshape(n, -1, 3).astype(np.int64) + 16 * np.arange(3)  # channel c -> 16c..16c+15
    bins += 48 * np.arange(n)[:, None, None]  # one block of 48 bins per patch, so one bincount does all
    features = np.bincount(bins.ravel(), minlength=48 * n).reshape(n, 48) / (50 * 50)
    labels = demo_frame["label"].to_numpy()
    test = demo_frame["patient_id"].isin(sorted(demo_frame["patient_id"].unique())[-2:]).to_numpy()
    model = LogisticRegression(max_iter=2000).fit(features[~test], labels[~test])
    assert balanced_accuracy_score(labels[test], model.predict(features[test])) > 0.8


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    a = write_demo_dataset(tmp_path / "a", n_patients=3, seed=7, grid=SMALL_GRID)
    b = write_demo_dataset(tmp_path / "b", n_patients=3, seed=7, grid=SMALL_GRID)
    c = write_demo_dataset(tmp_path / "c", n_patients=3, seed=8, grid=SMALL_GRID)
    assert tree_digest(a) == tree_digest(b)
    assert tree_digest(a) != tree_digest(c)
    # A patient's slide does not depend on how many patients were asked for.
    d = write_demo_dataset(tmp_path / "d", n_patients=1, seed=7, grid=SMALL_GRID)
    assert tree_digest(d / str(FIRST_PATIENT_ID)) == tree_digest(a / str(FIRST_PATIENT_ID))


def test_marker_says_synthetic_and_is_synthetic_finds_it(demo_dir, tmp_path):
    text = (demo_dir / DEMO_MARKER).read_text(encoding="utf-8")
    assert "SYNTHETIC" in text and "seed 0" in text and "not tissue" in text
    assert is_synthetic(demo_dir)
    assert not is_synthetic(tmp_path)
    assert not is_synthetic(demo_dir / str(FIRST_PATIENT_ID))


def test_default_split_holds_out_enough_test_patients_for_an_interval(demo_frame):
    from idc_helpers.splits import make_split

    split = make_split(demo_frame)
    assert len(split["test"]) >= 5 and len(split["val"]) >= 5


@pytest.mark.realdata
def test_real_sample_is_not_synthetic(real_sample_dir):
    assert not is_synthetic(real_sample_dir)


def test_notice_is_a_loud_framed_banner_that_says_how_to_get_real_data():
    lines = SYNTHETIC_NOTICE.splitlines()
    assert len(lines) >= 5
    assert set(lines[0]) == {"!"} and lines[0] == lines[-1]
    assert len({len(line) for line in lines}) == 1
    assert "SYNTHETIC DEMO DATA" in SYNTHETIC_NOTICE
    for needle in ("Kaggle", "python -m idc_helpers download\n", "IDC_DATA_DIR", "KAGGLE_API_TOKEN", "277,524"):
        assert needle.strip() in SYNTHETIC_NOTICE
    assert "looked up in this order" in SYNTHETIC_NOTICE and "./data" in SYNTHETIC_NOTICE


def test_refuses_a_non_empty_folder_and_touches_nothing(tmp_path):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(DemoDestinationError, match="not empty"):
        write_demo_dataset(dest, grid=SMALL_GRID)
    with pytest.raises(DemoDestinationError, match="not a demo dataset"):
        write_demo_dataset(dest, grid=SMALL_GRID, overwrite=True)
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]
    assert leftovers(tmp_path) == []


def test_empty_folder_is_used_and_a_demo_dataset_can_be_overwritten(tmp_path):
    dest = tmp_path / "demo"
    dest.mkdir()
    write_demo_dataset(dest, n_patients=2, seed=1, grid=SMALL_GRID)
    with pytest.raises(DemoDestinationError, match="overwrite=True"):
        write_demo_dataset(dest, n_patients=2, seed=2, grid=SMALL_GRID)
    write_demo_dataset(dest, n_patients=1, seed=2, grid=SMALL_GRID, overwrite=True)
    assert "seed 2" in (dest / DEMO_MARKER).read_text(encoding="utf-8")
    assert set(build_index(dest).frame["patient_id"]) == {str(FIRST_PATIENT_ID)}
    assert leftovers(tmp_path) == []


def test_interrupted_run_leaves_no_half_dataset(tmp_path, monkeypatch):
    real_write = demo_data._write_patches
    calls = []

    def write_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(demo_data, "_write_patches", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_demo_dataset(tmp_path / "demo", n_patients=3, grid=SMALL_GRID)
    assert os.listdir(tmp_path) == []


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(DemoDataError, match="at least 1"):
        write_demo_dataset(tmp_path / "a", n_patients=0)
    with pytest.raises(DemoDataError, match="grid"):
        write_demo_dataset(tmp_path / "b", grid=(2, 5))
    assert os.listdir(tmp_path) == []


def test_cell_fraction_counts_border_cells_over_their_real_area():
    mask = np.zeros((80, 120), bool)  # 2 x 3 cells, the last row 30 px high, the last column 20 px wide
    mask[50:80, 100:120] = True
    mask[0:25, 0:50] = True
    fraction = demo_data._cell_fraction(mask, 50)
    assert fraction.shape == (2, 3)
    assert fraction[1, 2] == 1.0 and fraction[0, 0] == 0.5 and fraction[0, 1] == 0.0


def test_cli_writes_prints_the_notice_and_refuses_a_second_time(tmp_path, capsys):
    dest = tmp_path / "demo"
    assert main(["demo-data", "--out", str(dest), "--n-patients", "2", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC DEMO DATA" in out
    assert "patients: 2" in out and "IDC share" in out
    assert is_synthetic(dest)
    assert main(["demo-data", "--out", str(dest), "--n-patients", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(dest) in err and "not empty" in err and "Traceback" not in err
    assert main(["demo-data", "--out", str(tmp_path / "zero"), "--n-patients", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_cli_refuses_the_old_spellings_with_one_line_naming_the_new_word(tmp_path, capsys, assert_refused):
    dest = tmp_path / "old"
    assert main(["demo-data", str(dest), "--seed", "3"]) == 2
    assert_refused(capsys.readouterr().err, "demo-data DIR is no longer accepted: use demo-data --out DIR.")
    assert main(["demo-data", "--out", str(dest), "--patients", "1"]) == 2
    assert_refused(
        capsys.readouterr().err, "demo-data --patients N is no longer accepted: use demo-data --n-patients N."
    )
    assert not dest.exists()
