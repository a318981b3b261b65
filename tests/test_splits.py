"""Patient-level splits: disjoint, complete, stratified, deterministic; the published split's facts; a run's split."""

from __future__ import annotations

import csv
import functools
import operator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from idc_helpers import splits
from idc_helpers.patch_index import build_index
from idc_helpers.validation import InvalidInputError

PUBLISHED_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "janowczyk2016_patient_split.csv"


def synthetic_frame(n_patients: int = 40, seed: int = 1) -> pd.DataFrame:
    """An index-like frame: patients with 20-200 patches and IDC shares between 0 and 0.6."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        n = int(rng.integers(20, 200))
        share = rng.uniform(0, 0.6)
        labels = (rng.random(n) < share).astype(int)
        rows += [(f"/d/{1000 + p}/{i}.png", str(1000 + p), 1 + 50 * i, 1, lab) for i, lab in enumerate(labels)]
    return pd.DataFrame(rows, columns=["path", "patient_id", "x", "y", "label"])


def test_published_split_sizes_and_disjoint():
    sizes = {name: len(ids) for name, ids in splits.JANOWCZYK2016.items()}
    assert sizes == {"train": 84, "val": 29, "test": 49}
    all_ids = [p for ids in splits.JANOWCZYK2016.values() for p in ids]
    assert len(all_ids) == len(set(all_ids)) == 162


@pytest.mark.skipif(not PUBLISHED_CSV.exists(), reason="published split CSV not present")
def test_published_split_matches_shared_csv():
    with open(PUBLISHED_CSV, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for name in splits.SUBSETS:
        expected = {r["patient_id"] for r in rows if r["subset"] == name}
        assert set(splits.JANOWCZYK2016[name]) == expected


def test_janowczyk_split_sends_unlisted_patients_to_train_or_drops_them():
    frame = pd.DataFrame({"patient_id": ["8863", "12909", "13688", "99999", "10304"], "label": [0, 1, 0, 1, 0]})
    split = splits.janowczyk2016_split(frame)
    assert split == {"train": ["8863", "10304", "99999"], "val": ["13688"], "test": ["12909"]}
    dropped = splits.janowczyk2016_split(frame, unlisted="drop")
    assert dropped == {"train": ["10304"], "val": ["13688"], "test": ["12909"]}
    assert splits.make_split(frame, "janowczyk2016", unlisted="drop") == dropped
    with pytest.raises(splits.SplitError, match="unlisted"):
        splits.janowczyk2016_split(frame, unlisted="val")


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_patient_split_is_disjoint_complete_and_sized(seed):
    frame = synthetic_frame()
    split = splits.patient_split(frame, seed=seed)
    splits.check_disjoint(split)
    assert sorted(functools.reduce(operator.iadd, split.values(), []), key=int) == sorted(
        frame["patient_id"].unique(), key=int
    )
    assert [len(split[k]) for k in splits.SUBSETS] == [28, 6, 6]
    # No patch of a test patient is in train: the point of a patient split.
    subset = splits.subset_of(frame, split)
    for pid, group in subset.groupby(frame["patient_id"]):
        assert group.nunique() == 1, pid


def test_patient_split_is_stratified():
    frame = synthetic_frame()
    overall = frame["label"].mean()
    summary = splits.split_summary(frame, splits.patient_split(frame, seed=0))
    assert (summary["idc_fraction"] - overall).abs().max() < 0.03


def test_patient_split_is_deterministic_and_seed_dependent():
    frame = synthetic_frame()
    assert splits.patient_split(frame, seed=3) == splits.patient_split(frame.sample(frac=1, random_state=0), seed=3)
    assert splits.patient_split(frame, seed=3) != splits.patient_split(frame, seed=4)


def test_patient_folds_cover_each_patient_once_and_are_stratified():
    frame = synthetic_frame(23)
    folds = splits.patient_folds(frame, n_folds=5, seed=0)
    flat = [p for fold in folds for p in fold]
    assert len(flat) == len(set(flat)) == 23 and all(folds)
    assert sorted(len(f) for f in folds) == [4, 4, 5, 5, 5]
    overall = frame["label"].mean()
    for fold in folds:
        share = frame.loc[frame["patient_id"].isin(fold), "label"].mean()
        assert abs(share - overall) < 0.03, (fold, share, overall)
    # Same folds whatever the row order; another seed, other folds.
    assert splits.patient_folds(frame.sample(frac=1, random_state=1), n_folds=5, seed=0) == folds
    assert splits.patient_folds(frame, n_folds=5, seed=1) != folds
    with pytest.raises(splits.SplitError, match="n_folds"):
        splits.patient_folds(frame, n_folds=30)


def test_check_disjoint_names_the_patient():
    with pytest.raises(ValueError, match="patient 5 is in both 'train' and 'test'"):
        splits.check_disjoint({"train": ["5", "6"], "test": ["5"]})


def test_make_split_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown split"):
        splits.make_split(synthetic_frame(), "random_patches")


def _frame(patients: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """A patch index with ``patients[id] = (n_non_idc, n_idc)`` rows."""
    rows = []
    for pid, (n0, n1) in patients.items():
        rows += [(f"/d/{pid}/{i}.png", pid, 1, 1 + 50 * i, int(i >= n0)) for i in range(n0 + n1)]
    return pd.DataFrame(rows, columns=["path", "patient_id", "x", "y", "label"])


def test_subsample_is_per_patient_and_deterministic():
    frame = _frame({"1": (80, 20), "2": (300, 100), "3": (50, 50)})
    a = splits.subsample_patches(frame, 120, seed=3)
    assert a.equals(splits.subsample_patches(frame, 120, seed=3))
    assert not a.equals(splits.subsample_patches(frame, 120, seed=4))
    assert abs(len(a) - 120) <= 6
    counts = a.groupby(["patient_id", "label"]).size()
    assert counts[("2", 1)] == 20 and counts[("3", 0)] == 10  # 20% of every patient and class
    assert splits.subsample_patches(frame, None) is frame


def test_test_patients_override_the_split():
    frame = _frame({str(p): (20, 5 + p % 7) for p in range(100, 112)})
    split = splits.resolve_split(frame, "patients", seed=0, test_patients=["101", "105"])
    assert split["test"] == ["101", "105"]
    assert not {"101", "105"} & (set(split["train"]) | set(split["val"]))
    assert len(split["train"]) + len(split["val"]) == 10 and split["val"]
    with pytest.raises(splits.TrainingDataError, match="999"):
        splits.resolve_split(frame, "patients", test_patients=["999"])
    with pytest.raises(InvalidInputError, match="p101"):  # not a patient id: reported, not a ValueError from sorting
        splits.resolve_split(frame, "patients", test_patients=["p101", "105"])


def test_an_empty_test_subset_is_refused():
    frame = _frame({"10304": (20, 5), "9346": (15, 6), "13688": (20, 8), "9381": (10, 4)})  # train and val only
    split = splits.resolve_split(frame, "janowczyk2016")
    assert split["test"] == []
    with pytest.raises(splits.TrainingDataError, match=r"test subset empty.*--test-patients"):
        splits.check_split(split, "janowczyk2016", frame)


@pytest.mark.realdata
def test_real_sample_splits(real_sample_dir):
    frame = build_index(real_sample_dir).frame
    published = splits.janowczyk2016_split(frame)
    # 27 of the sample's 29 patients are in the published lists (17 train, 10 val, none test); 2 are not.
    assert [len(published[k]) for k in splits.SUBSETS] == [19, 10, 0]
    split = splits.patient_split(frame, seed=0)
    assert [len(split[k]) for k in splits.SUBSETS] == [20, 5, 4]
    summary = splits.split_summary(frame, split)
    assert summary["patches"].sum() == 25_899
    assert (summary["idc_fraction"] - frame["label"].mean()).abs().max() < 0.02
