"""A second model trained beside a run on the same patients, and the table that sets the two side by side."""

from __future__ import annotations

import pytest

from idc_helpers.compare import CompareError, compare_runs, sibling_run_dir, train_alongside
from idc_helpers.demo_data import write_demo_dataset
from idc_helpers.training import train


def test_train_alongside_uses_the_same_patients_and_is_not_trained_twice(tmp_path, tmp_cache):
    data = write_demo_dataset(tmp_path / "demo", n_patients=6, seed=0, grid=(8, 6))
    base = train(data, tmp_path / "run", model_name="seed_cnn", epochs=1, batch_size=32, seed=3, verbose=0)
    other = train_alongside(base, tmp_path / "run", "seed_cnn", verbose=0)
    assert other.run_dir == sibling_run_dir(tmp_path / "run", "seed_cnn") == tmp_path / "run-seed_cnn"
    assert other.split == base.split and other.config["arguments"]["seed"] == 3
    assert other.config["arguments"]["batch_size"] == 32
    again = train_alongside(base, tmp_path / "run", "seed_cnn", verbose=0)  # finished: loaded, not retrained
    assert again.metrics == other.metrics and type(again).__name__ == "Run"

    table = compare_runs([base, other])
    assert table["model"].tolist() == ["seed_cnn", "seed_cnn"]
    assert table["parameters"].tolist() == [105_234, 105_234]
    assert table.loc[0, "val roc auc"] == base.metrics["validation"]["roc_auc"]
    assert table.loc[1, "threshold"] == other.metrics["threshold"]

    # A sibling trained on other patients (another test patient held out) is refused, not compared.
    other_test = list(base.split["train"])[:1]
    other_split = train(
        data,
        tmp_path / "other",
        model_name="seed_cnn",
        epochs=1,
        batch_size=32,
        seed=3,
        test_patients=other_test,
        verbose=0,
    )
    assert other_split.split != base.split
    with pytest.raises(CompareError, match="other patients"):
        train_alongside(other_split, tmp_path / "run", "seed_cnn", verbose=0)
