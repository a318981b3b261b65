"""Training: the run folder, patient-level splits, reproducibility, and never overwriting a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from idc_helpers import loader, training
from idc_helpers.inference import predict_probs
from idc_helpers.metrics import pick_threshold
from idc_helpers.run import RUN_FILES, RunExistsError, load_run, partial_dir
from idc_helpers.training import (
    TrainingDataError,
    UnknownModelError,
    class_weights,
    resolve_split,
    subsample_patches,
    train,
)

QUICK = dict(model_name="seed_cnn", epochs=1, batch_size=32, seed=0, verbose=0)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """Six small synthetic patients (about 200 patches): a 4 / 1 / 1 patient split."""
    from idc_helpers.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo", n_patients=6, seed=0, grid=(8, 6))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def run(demo_dir, cache_dir, tmp_path_factory):
    return train(demo_dir, tmp_path_factory.mktemp("runs") / "run", cache_dir=cache_dir, **QUICK)


def _frame(patients: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """A patch index with ``patients[id] = (n_non_idc, n_idc)`` rows."""
    rows = []
    for pid, (n0, n1) in patients.items():
        rows += [(f"/d/{pid}/{i}.png", pid, 1, 1 + 50 * i, int(i >= n0)) for i in range(n0 + n1)]
    return pd.DataFrame(rows, columns=["path", "patient_id", "x", "y", "label"])


def test_run_folder_contents(run):
    files = sorted(p.name for p in run.run_dir.iterdir())
    assert files == sorted(RUN_FILES)
    history = json.loads((run.run_dir / "history.json").read_text())
    for key in ("loss", "accuracy", "val_loss", "val_auc", "val_selection", "val_f1", "val_balanced_accuracy", "lr", "epoch"):
        assert len(history[key]) == 1, key
    config = json.loads((run.run_dir / "config.json").read_text())
    for key in ("model", "data", "split", "seed", "epochs", "batch_size", "versions", "started", "class_weight"):
        assert key in config, key
    assert config["data"]["synthetic"] is True
    assert {"python", "tensorflow", "keras", "numpy", "idc_helpers"} <= set(config["versions"])
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["threshold"] <= 1.0
    assert {"roc_auc", "f1", "balanced_accuracy"} <= set(metrics["validation"])
    assert metrics["threshold"] == run.threshold


def test_split_is_by_patient_and_complete(run, demo_dir):
    from idc_helpers.patch_index import build_index

    lists = run.config["split"]["patients"]
    subsets = [set(lists[name]) for name in ("train", "val", "test")]
    assert all(subsets)
    assert not (subsets[0] & subsets[1] or subsets[0] & subsets[2] or subsets[1] & subsets[2])
    assert set().union(*subsets) == set(build_index(demo_dir).frame["patient_id"])


def test_existing_run_is_never_overwritten(run, demo_dir, cache_dir):
    before = {p.name: p.read_bytes() for p in run.run_dir.iterdir()}
    with pytest.raises(RunExistsError, match="new --out"):
        train(demo_dir, run.run_dir, cache_dir=cache_dir, **QUICK)
    assert {p.name: p.read_bytes() for p in run.run_dir.iterdir()} == before
    # No temporary folder left behind next to it.
    assert [p.name for p in run.run_dir.parent.iterdir()] == [run.run_dir.name]


def test_a_crash_after_training_leaves_a_resumable_partial_run(demo_dir, cache_dir, tmp_path, monkeypatch):
    real = training.choose_threshold

    def fail(*args, **kwargs):
        raise RuntimeError("simulated crash after training")

    monkeypatch.setattr(training, "choose_threshold", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        train(demo_dir, tmp_path / "run", cache_dir=cache_dir, **QUICK)
    # Nothing that looks like a finished run; the hidden partial run holds its config and last checkpoint.
    assert [p.name for p in tmp_path.iterdir()] == [".run.partial"]
    assert {"config.json", "checkpoint.json"} <= {p.name for p in partial_dir(tmp_path / "run").iterdir()}
    with pytest.raises(RunExistsError, match=r"resume with .*--resume .*or delete"):
        train(demo_dir, tmp_path / "run", cache_dir=cache_dir, **QUICK)
    monkeypatch.setattr(training, "choose_threshold", real)
    resumed = train(None, tmp_path / "run", resume=True, cache_dir=cache_dir, verbose=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(RUN_FILES)
    assert resumed.metrics["epochs_run"] == 1
    with pytest.raises(RunExistsError, match="finished run"):
        train(None, tmp_path / "run", resume=True, cache_dir=cache_dir, verbose=0)


def test_a_failure_before_the_first_checkpoint_leaves_nothing(demo_dir, cache_dir, tmp_path):
    # A mistyped model name is caught before anything is written.
    with pytest.raises(UnknownModelError, match="idcnet.*seed_cnn"):
        train(demo_dir, tmp_path / "run", cache_dir=cache_dir, **{**QUICK, "model_name": "idcnet"})
    assert list(tmp_path.iterdir()) == []


def test_save_load_gives_identical_predictions(run, demo_dir, cache_dir):
    from idc_helpers.loader import load_patches
    from idc_helpers.patch_index import build_index

    images = load_patches(build_index(demo_dir).frame, cache_dir=cache_dir).images
    loaded = load_run(run.run_dir)
    assert loaded.threshold == run.threshold and loaded.split == run.split
    np.testing.assert_array_equal(predict_probs(loaded.model, images), predict_probs(run.model, images))


def test_same_seed_same_result(run, demo_dir, cache_dir, tmp_path):
    again = train(demo_dir, tmp_path / "again", cache_dir=cache_dir, **QUICK)
    assert again.split == run.split
    for a, b in zip(again.model.get_weights(), run.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert again.threshold == pytest.approx(run.threshold, abs=1e-5)


def test_subsample_is_per_patient_and_deterministic():
    frame = _frame({"1": (80, 20), "2": (300, 100), "3": (50, 50)})
    a = subsample_patches(frame, 120, seed=3)
    assert a.equals(subsample_patches(frame, 120, seed=3))
    assert not a.equals(subsample_patches(frame, 120, seed=4))
    assert abs(len(a) - 120) <= 6
    counts = a.groupby(["patient_id", "label"]).size()
    assert counts[("2", 1)] == 20 and counts[("3", 0)] == 10  # 20% of every patient and class
    assert subsample_patches(frame, None) is frame


def test_test_patients_override_the_split():
    frame = _frame({str(p): (20, 5 + p % 7) for p in range(100, 112)})
    split = resolve_split(frame, "patients", seed=0, test_patients=["101", "105"])
    assert split["test"] == ["101", "105"]
    assert not {"101", "105"} & (set(split["train"]) | set(split["val"]))
    assert len(split["train"]) + len(split["val"]) == 10 and split["val"]
    with pytest.raises(TrainingDataError, match="999"):
        resolve_split(frame, "patients", test_patients=["999"])


def test_class_weights_balance_the_classes():
    weights = class_weights(np.array([0] * 75 + [1] * 25))
    assert weights[0] * 75 == pytest.approx(weights[1] * 25)
    with pytest.raises(TrainingDataError):
        class_weights(np.zeros(10, dtype=int))


def test_verbose_auto(monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert training._resolve_verbose("auto") == 2
    assert training._resolve_verbose(0) == 0


def test_selection_breaks_auc_ties_with_the_validation_loss():
    labels = np.array([0, 0, 1, 1])
    confident = training._validation_scores(labels, np.array([0.01, 0.02, 0.98, 0.99]))
    timid = training._validation_scores(labels, np.array([0.40, 0.41, 0.42, 0.43]))
    assert confident["val_auc"] == timid["val_auc"] == 1.0
    assert confident["val_selection"] > timid["val_selection"]
    # A real AUC difference outweighs the loss.
    worse = training._validation_scores(labels, np.array([0.01, 0.98, 0.02, 0.99]))
    assert worse["val_selection"] < timid["val_selection"]
