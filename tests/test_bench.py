"""Benchmarks: the cross-validation and speed commands' core functions on a tiny synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from idc_helpers.bench import quality


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """Six small synthetic patients (about 200 patches)."""
    from idc_helpers.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo", n_patients=6, seed=0, grid=(8, 6))


def test_quality_cross_validation_tests_every_patient_once_and_resumes(demo_dir, tmp_path, capsys):
    out = tmp_path / "cv"
    args = dict(n_folds=2, models=["seed_cnn"], epochs=1, cache_dir=tmp_path / "cache", n_bootstrap=20, verbose=0)
    result = quality.run_quality(demo_dir, out, **args)
    records = result["records"]
    assert [r["fold"] for r in records] == [0, 1]
    tested = [p for r in records for p in r["test_patients"]]
    assert sorted(tested) == sorted({p.name for p in demo_dir.iterdir() if p.is_dir()})  # each patient once
    for r in records:
        assert not set(r["test_patients"]) & set(r["val_patients"])
        assert 0.0 <= r["test"]["f1"] <= 1.0 and r["train_seconds"] is not None
    assert "seed_cnn" in result["pooled"] and result["pooled"]["seed_cnn"]["counts"]["patients"] == 6
    assert (out / "oof_seed_cnn.csv").is_file() and "| seed_cnn | 0 |" in (out / "results.md").read_text()

    # A rerun with the same settings resumes from the log (nothing retrained) ...
    again = quality.run_quality(demo_dir, out, **args)
    assert len(again["records"]) == 2 and "already in" in capsys.readouterr().out
    assert len((out / quality.LOG_FILE).read_text().splitlines()) == 2
    # ... and other settings are refused instead of mixed into the same log.
    with pytest.raises(FileExistsError, match="other settings"):
        quality.run_quality(demo_dir, out, **{**args, "epochs": 2})


def test_read_log_ignores_a_torn_last_line(tmp_path):
    (tmp_path / quality.LOG_FILE).write_text(json.dumps({"model": "m", "fold": 0}) + "\n{\"model\": ")
    assert quality.read_log(tmp_path) == [{"model": "m", "fold": 0}]


def test_speed_measurements_run_and_print_a_table(demo_dir, tmp_path):
    from idc_helpers.bench import speed
    from idc_helpers.loader import load_patches
    from idc_helpers.patch_index import build_index

    frame = build_index(demo_dir).frame
    loaded = load_patches(frame, cache_dir=tmp_path / "cache")
    training = speed.training_throughput(loaded.images, loaded.labels, model_name="seed_cnn", batch_size=16,
                                         steps=2, repeats=1, in_memory_patches=64)
    assert len(training) == 4 and all(v["patches_per_s"] > 0 for v in training.values())
    prediction = speed.prediction_throughput(loaded.images, model_name="seed_cnn", patches=64, repeats=1)
    assert set(prediction) == {"no TTA", "with TTA (8 views)"}

    # Full-size memory measurement, shrunk: hard-linked copies under new patient ids, two fresh processes.
    memory = speed.peak_memory(frame, tmp_path / "full", model_name="seed_cnn", steps=2, n_patches=len(frame) * 2)
    assert not (tmp_path / "full").exists()  # the temporary tree and cache are deleted
    for phase in ("decode and train", "train from cache"):
        assert memory[phase]["peak_rss_mb"] > 0 and memory[phase]["steps"] == 2
    report = {"machine": speed._machine(), "training_config": {"model": "seed_cnn", "batch_size": 16, "steps": 2,
                                                               "repeats": 1},
              "training": training, "prediction": prediction, "prediction_patches": 64, "memory": memory,
              "full_epoch_estimate": {"patches_per_s": 100.0, "train_share_patches": 10, "train_share_minutes": 1.0,
                                      "all_minutes": 2.0}}
    text = speed.markdown(report)
    assert "| pipeline (memmap) + augmentation |" in text and "Peak memory" in text
