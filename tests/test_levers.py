"""Levers after training (idc_helpers.bench.levers) on a tiny synthetic cross-validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from idc_helpers.bench import levers, quality

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cv(tmp_path_factory):
    """A 2-fold cross-validation of both models (1 epoch) on six synthetic patients, and its cache folder.

    The best-epoch rule (``averaging="none"``): averaged weights already end with recomputed batch-norm statistics,
    which is what the precise-BN lever would add.
    """
    from idc_helpers.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("cv")
    data = write_demo_dataset(root / "demo", n_patients=6, seed=0, grid=(8, 6))
    quality.run_quality(
        [data],
        root / "quality",
        n_folds=2,
        models=["idc_net", "seed_cnn"],
        epochs=1,
        cache_dir=root / "cache",
        n_bootstrap=10,
        fold_bootstrap=10,
        verbose=0,
        train_options={"averaging": "none"},
    )
    return root / "quality", root / "cache"


def test_every_lever_is_measured_against_the_baseline_on_the_same_patches(cv, tmp_path):
    quality_dir, cache = cv
    result = levers.run_levers(
        [quality_dir], ["idc_net", "seed_cnn"], tmp_path / "levers", cache_dir=cache, n_bootstrap=20
    )
    summary = result["summary"]
    assert summary["folds"] == [0, 1]
    pooled = summary["pooled"]
    for variant in ("baseline", "ensemble", "platt", "precise-bn", "stain"):
        entry = pooled[f"{variant} | all"]
        assert entry["patients"] == 6 and 0 <= entry["metrics"]["f1"]["value"] <= 1
        assert ("minus_baseline" in entry) == (variant != "baseline")
    # The baseline is the first model's own cross-validation predictions, scored as they are.
    oof = pd.concat([quality.read_table(quality_dir / "predictions" / f"idc_net-fold{f}.csv") for f in (0, 1)])
    from idc_helpers.metrics import evaluate

    expected = evaluate(oof, n_bootstrap=0)["metrics"]["roc_auc"]["value"]
    assert pooled["baseline | all"]["metrics"]["roc_auc"]["value"] == pytest.approx(expected)
    # The ensemble averages the two models' probabilities patch by patch.
    tables = [
        quality.read_table(quality_dir / "predictions" / f"{m}-fold0.csv").sort_values("path")
        for m in ("idc_net", "seed_cnn")
    ]
    mean = (tables[0]["prob_idc"].to_numpy() + tables[1]["prob_idc"].to_numpy()) / 2
    fold0 = levers.run_fold(
        [(quality_dir, "idc_net"), (quality_dir, "seed_cnn")],
        0,
        tmp_path / "levers",
        ["ensemble"],
        frame=None,
        cache_dir=cache,
    )
    np.testing.assert_allclose(fold0["ensemble"]["prob_idc"].to_numpy(), mean)
    # Precise BN changes idc_net's predictions (it has batch norm); the variants that ran the model were saved.
    bn = quality.read_table(tmp_path / "levers" / "predictions" / "precise-bn-fold0.csv").sort_values("path")
    assert not np.allclose(bn["prob_idc"].to_numpy(), tables[0]["prob_idc"].to_numpy())
    text = (tmp_path / "levers" / "levers.md").read_text()
    assert "stain-normalised per patient" in text and "F1 - baseline" in text


def test_saved_variants_are_reused_and_a_model_without_batch_norm_is_unchanged(cv, tmp_path):
    quality_dir, cache = cv
    out = tmp_path / "levers"
    levers.run_levers(
        [quality_dir], ["seed_cnn"], out, levers=["precise-bn"], folds=[1], cache_dir=cache, n_bootstrap=0
    )
    saved = out / "predictions" / "precise-bn-fold1.csv"
    base = quality.read_table(quality_dir / "predictions" / "seed_cnn-fold1.csv").sort_values("path")
    # seed_cnn has no batch norm: recomputing its statistics is a no-op.
    np.testing.assert_allclose(
        quality.read_table(saved).sort_values("path")["prob_idc"].to_numpy(), base["prob_idc"].to_numpy(), atol=1e-6
    )
    stamp = saved.stat().st_mtime_ns
    levers.run_levers(
        [quality_dir], ["seed_cnn"], out, levers=["precise-bn"], folds=[1], cache_dir=cache, n_bootstrap=0
    )
    assert saved.stat().st_mtime_ns == stamp


def test_members_with_other_validation_patients_and_unknown_levers_are_refused(cv, tmp_path, capsys):
    quality_dir, _ = cv
    other = tmp_path / "other"
    (other / "predictions").mkdir(parents=True)
    for name in ("config.json", "folds.jsonl"):
        (other / name).write_text((quality_dir / name).read_text())
    val = quality.read_table(quality_dir / "predictions" / "val-idc_net-fold0.csv")
    quality.write_table(val.iloc[1:], other / "predictions" / "val-idc_net-fold0.csv")
    quality.write_table(
        quality.read_table(quality_dir / "predictions" / "idc_net-fold0.csv"),
        other / "predictions" / "idc_net-fold0.csv",
    )
    with pytest.raises(levers.LeversError, match="validation patients differ"):
        levers.run_levers([quality_dir, other], ["idc_net"], tmp_path / "out", levers=["ensemble"], folds=[0])
    assert levers.main(["--quality", str(quality_dir), "--levers", "bagging", "--out", str(tmp_path / "x")]) == 2
    assert "unknown lever(s) bagging" in capsys.readouterr().err
    assert levers.main(["--quality", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "holds no cross-validation" in capsys.readouterr().err
