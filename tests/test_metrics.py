"""Evaluation of a predictions table (metrics, patient bootstrap, threshold choice, CLI) and the evaluation figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # tests only: the package itself never touches the backend

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from idc_helpers.bootstrap import MIN_PATIENTS_FOR_INTERVAL
from idc_helpers.cli import main
from idc_helpers.commands import cmd_evaluate
from idc_helpers.demo_data import DEMO_MARKER
from idc_helpers.errors import UserError
from idc_helpers.metrics import (
    METRIC_LABELS,
    _metric_values,
    binary_scores,
    evaluate,
    log_loss,
    paired_difference,
    per_patient_metrics,
    pick_threshold,
    pr_points,
    ranking_scores,
    roc_points,
)
from idc_helpers.reporting import PUBLISHED, comparison_table, format_report

COLUMNS = ["path", "patient_id", "x", "y", "label", "prob_idc", "pred"]


def make_predictions(n_patients: int = 12, per_patient: int = 60, seed: int = 0) -> pd.DataFrame:
    """A predictions table with patient-dependent IDC shares and an informative but imperfect score."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        share = rng.uniform(0.05, 0.6)
        labels = (rng.random(per_patient) < share).astype(int)
        probs = np.clip(0.35 * labels + 0.65 * rng.random(per_patient), 0, 1)
        for i, (label, prob) in enumerate(zip(labels, probs, strict=True)):
            x, y = 1 + 50 * (i % 8), 1 + 50 * (i // 8)
            rows.append(
                (
                    f"/data/{9000 + p}/{label}/{9000 + p}_idx5_x{x}_y{y}_class{label}.png",
                    str(9000 + p),
                    x,
                    y,
                    label,
                    prob,
                    int(prob >= 0.5),
                )
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def test_point_metrics_are_sklearns():
    preds = make_predictions()
    report = evaluate(preds, n_bootstrap=0)
    y, s, p = preds["label"], preds["prob_idc"], preds["pred"]
    expected = {
        "f1": skm.f1_score(y, p),
        "balanced_accuracy": skm.balanced_accuracy_score(y, p),
        "accuracy": skm.accuracy_score(y, p),
        "precision": skm.precision_score(y, p),
        "recall": skm.recall_score(y, p),
        "specificity": skm.recall_score(y, p, pos_label=0),
        "roc_auc": skm.roc_auc_score(y, s),
        "pr_auc": skm.average_precision_score(y, s),
    }
    for name, value in expected.items():
        assert report["metrics"][name]["value"] == pytest.approx(value, abs=1e-12), name
        assert report["metrics"][name]["ci_low"] is None
    tn, fp, fn, tp = skm.confusion_matrix(y, p).ravel()
    assert report["confusion_matrix"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert report["counts"] == {
        "patches": 720,
        "patients": 12,
        "idc": int(y.sum()),
        "non_idc": int(720 - y.sum()),
        "idc_fraction": pytest.approx(y.mean()),
    }


def test_patient_weights_equal_repeated_patches():
    """A patient drawn k times in a resample counts k times: weights must equal physically repeated rows."""
    preds = make_predictions(n_patients=4, per_patient=30, seed=1)
    counts = {"9000": 2, "9001": 0, "9002": 1, "9003": 3}
    repeated = pd.concat([preds[preds.patient_id == pid] for pid, k in counts.items() for _ in range(k)])
    y, s, p = (repeated[c].to_numpy() for c in ("label", "prob_idc", "pred"))
    direct = _metric_values(skm.confusion_matrix(y, p).ravel(), y, s, None)
    weights = preds["patient_id"].map(counts).to_numpy()
    keep = weights > 0
    cells = skm.confusion_matrix(preds["label"], preds["pred"], sample_weight=weights).ravel()
    weighted = _metric_values(cells, preds["label"].to_numpy()[keep], preds["prob_idc"].to_numpy()[keep], weights[keep])
    assert weighted == pytest.approx(direct, abs=1e-12)


def test_bootstrap_intervals_over_patients():
    preds = make_predictions()
    report = evaluate(preds, n_bootstrap=100, seed=3)
    assert report["bootstrap"]["used"] == 100 and report["bootstrap"]["unit"] == "patient"
    for name in METRIC_LABELS:
        entry = report["metrics"][name]
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"], name
        assert entry["ci_high"] - entry["ci_low"] > 0.005, name  # 12 patients: intervals are not degenerate
    assert evaluate(preds, n_bootstrap=100, seed=3) == report  # same seed, same intervals
    assert evaluate(preds, n_bootstrap=20, seed=4)["metrics"]["f1"] != report["metrics"]["f1"]
    json.dumps(report, allow_nan=False)


def test_one_class_resamples_are_skipped():
    preds = make_predictions(n_patients=3, per_patient=20, seed=2)
    preds["label"] = (preds["patient_id"] == "9000").astype(int)  # every IDC patch belongs to one patient
    report = evaluate(preds, n_bootstrap=100, seed=0, min_patients=1)
    boot = report["bootstrap"]
    # That patient is missing from (2/3)^3 of the resamples and is the only one in (1/3)^3 of them.
    assert 0 < boot["used"] < 100 and boot["used"] + boot["skipped_one_class"] == 100
    assert "resamples used" in format_report(report)


def test_single_class_table_has_undefined_metrics_not_crashes():
    preds = make_predictions(n_patients=3, per_patient=10)
    preds["label"] = 0
    report = evaluate(preds, n_bootstrap=20, min_patients=1)
    for name in ("roc_auc", "pr_auc", "recall", "balanced_accuracy"):
        assert report["metrics"][name]["value"] is None, name
    assert report["metrics"]["specificity"]["value"] == pytest.approx(1 - preds["pred"].mean())
    assert report["bootstrap"]["used"] == 0
    assert "n/a" in format_report(report)
    json.dumps(report, allow_nan=False)


def test_threshold_argument_overrides_pred_column():
    preds = make_predictions()
    report = evaluate(preds, n_bootstrap=0, threshold=0.7)
    assert report["metrics"]["f1"]["value"] == pytest.approx(skm.f1_score(preds["label"], preds["prob_idc"] >= 0.7))
    assert report["threshold"] == 0.7
    with pytest.raises(ValueError, match="pred"):
        evaluate(preds.drop(columns="pred"), n_bootstrap=0)


def test_bad_values_are_refused():
    preds = make_predictions(n_patients=2, per_patient=5)
    with pytest.raises(ValueError, match="prob_idc"):
        evaluate(preds.assign(prob_idc=1.5), n_bootstrap=0)
    with pytest.raises(ValueError, match="label"):
        evaluate(preds.assign(label=2), n_bootstrap=0)
    with pytest.raises(ValueError, match="prob_idc"):
        evaluate(preds.drop(columns="prob_idc"), n_bootstrap=0)


def test_per_patient_metrics():
    preds = make_predictions(n_patients=3, per_patient=40)
    preds.loc[preds.patient_id == "9002", ["label", "pred"]] = 0  # no IDC at all: f1 and AUC undefined
    table = per_patient_metrics(preds)
    assert list(table.columns) == [
        "patient_id",
        "n_patches",
        "n_idc",
        "predicted_idc",
        "accuracy",
        "specificity",
        "f1",
        "roc_auc",
        "mean_prob_idc",
    ]
    assert list(table.patient_id) == ["9000", "9001", "9002"]
    one = preds[preds.patient_id == "9000"]
    row = table.iloc[0]
    assert row.n_patches == 40 and row.n_idc == one.label.sum() and row.predicted_idc == one.pred.sum()
    assert row.f1 == pytest.approx(skm.f1_score(one.label, one.pred))
    assert row.roc_auc == pytest.approx(skm.roc_auc_score(one.label, one.prob_idc))
    assert np.isnan(table.iloc[2].f1) and np.isnan(table.iloc[2].roc_auc)
    # A patient with no IDC has no F1, even when the model called some of its patches IDC; its specificity is defined.
    preds.loc[(preds.patient_id == "9002") & (preds.x == 1), "pred"] = 1
    row = per_patient_metrics(preds).iloc[2]
    assert np.isnan(row.f1) and row.specificity == pytest.approx(1 - row.predicted_idc / row.n_patches)
    assert row.specificity < 1


def test_pick_threshold_maximises_f1_and_youden():
    preds = make_predictions(n_patients=4, per_patient=50, seed=5)
    y, s = preds["label"].to_numpy(), preds["prob_idc"].to_numpy()
    best = pick_threshold(y, s)
    candidates = np.unique(s)
    f1s = [skm.f1_score(y, s >= t) for t in candidates]
    assert skm.f1_score(y, s >= best) == pytest.approx(max(f1s))
    youden = pick_threshold(y, s, criterion="youden")
    baccs = [skm.balanced_accuracy_score(y, s >= t) for t in candidates]
    assert skm.balanced_accuracy_score(y, s >= youden) == pytest.approx(max(baccs))
    with pytest.raises(ValueError, match="both classes"):
        pick_threshold(np.zeros(5), np.linspace(0, 1, 5))
    with pytest.raises(ValueError, match="criterion"):
        pick_threshold(y, s, criterion="accuracy")


def test_format_report_is_a_readable_table():
    text = format_report(evaluate(make_predictions(), n_bootstrap=50))
    for label in METRIC_LABELS.values():
        assert label in text
    assert "95% CI" in text and "720 patches from 12 patients" in text and "Confusion matrix" in text


def test_cmd_evaluate_writes_strict_json(tmp_path, capsys):
    csv = tmp_path / "preds.csv"
    preds = make_predictions()
    preds.loc[preds.patient_id == "9003", "label"] = 0  # a per-patient AUC of NaN must become null
    preds.to_csv(csv, index=False)
    out = tmp_path / "reports" / "report.json"
    assert main(["evaluate", "--predictions", str(csv), "--out", str(out), "--bootstrap", "30"]) == 0
    printed = capsys.readouterr().out
    assert "ROC AUC" in printed and "Per patient" in printed and "9011" in printed
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data["bootstrap"]["requested"] == 30 and len(data["per_patient"]) == 12
    assert {row["patient_id"] for row in data["per_patient"]} == {str(9000 + p) for p in range(12)}
    assert not list(out.parent.glob(".*tmp"))  # no temporary file left behind


def test_cmd_evaluate_errors_name_the_file_and_columns(tmp_path, capsys):
    csv = tmp_path / "bad.csv"
    make_predictions(n_patients=2, per_patient=3).drop(columns=["prob_idc", "pred"]).to_csv(csv, index=False)
    assert main(["evaluate", "--predictions", str(csv)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(csv) in err and "prob_idc" in err and "pred" in err
    assert main(["evaluate", "--predictions", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    csv.write_text("patient_id,label,prob_idc,pred\n1,0,high,0\n")  # not numbers
    with pytest.raises(UserError, match=r"bad\.csv"):
        cmd_evaluate(Namespace(predictions=str(csv), out=None, bootstrap=0, seed=0, threshold=None))


def test_evaluate_out_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys):
    csv = tmp_path / "preds.csv"
    make_predictions(n_patients=2, per_patient=5).to_csv(csv, index=False)
    assert main(["evaluate", "--predictions", str(csv), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr()
    assert err.err.count("\n") == 1 and "is a folder" in err.err and err.out == ""
    assert main(["evaluate", "--predictions", str(csv), "--out", str(csv / "sub" / "r.json")]) == 2
    err = capsys.readouterr()
    assert err.err.count("\n") == 1 and "is a file, not a folder" in err.err and err.out == ""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root may write anywhere: then only the cases above apply
            assert main(["evaluate", "--predictions", str(csv), "--out", str(locked / "sub" / "r.json")]) == 2
            err = capsys.readouterr()
            assert err.err.count("\n") == 1 and str(locked) in err.err and err.out == ""
    finally:
        locked.chmod(0o700)


def test_patient_ids_stay_text(tmp_path):
    csv = tmp_path / "preds.csv"
    preds = make_predictions(n_patients=2, per_patient=5)
    preds["patient_id"] = ["00" + p for p in preds["patient_id"]]
    preds.to_csv(csv, index=False)
    out = tmp_path / "r.json"
    assert cmd_evaluate(Namespace(predictions=str(csv), out=str(out), bootstrap=0, seed=0, threshold=None)) == 0
    assert json.loads(out.read_text())["per_patient"][0]["patient_id"] == "009000"


def test_few_patients_get_no_interval_and_say_so(tmp_path, capsys):
    """With 2 test patients (the demo split) an interval "over patients" is meaningless: none is given."""
    preds = make_predictions(n_patients=MIN_PATIENTS_FOR_INTERVAL - 1)
    report = evaluate(preds, n_bootstrap=200)
    assert report["bootstrap"]["used"] == 0 and "4 patients" in report["bootstrap"]["withheld"]
    assert all(m["ci_low"] is None and m["ci_high"] is None for m in report["metrics"].values())
    assert report["metrics"]["f1"]["value"] is not None
    text = format_report(report)
    assert "none can be estimated" in text and "[" not in text
    enough = evaluate(make_predictions(n_patients=MIN_PATIENTS_FOR_INTERVAL), n_bootstrap=50)
    assert enough["bootstrap"]["withheld"] is None and enough["metrics"]["f1"]["ci_low"] is not None
    csv, out = tmp_path / "preds.csv", tmp_path / "m.json"
    make_predictions(n_patients=2).to_csv(csv, index=False)
    assert main(["evaluate", "--predictions", str(csv), "--out", str(out), "--bootstrap", "50"]) == 0
    assert "none can be estimated" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["metrics"]["f1"]["ci_low"] is None and "2 patients" in data["bootstrap"]["withheld"]


def test_report_json_says_synthetic_and_the_threshold_used(tmp_path, capsys):
    data_dir = tmp_path / "demo"
    data_dir.mkdir()
    (data_dir / DEMO_MARKER).write_text("synthetic")
    preds = make_predictions(n_patients=6)
    preds["path"] = [str(data_dir / Path(p).relative_to("/data")) for p in preds["path"]]
    csv, out = tmp_path / "preds.csv", tmp_path / "m.json"
    preds.to_csv(csv, index=False)
    assert (
        main(["evaluate", "--predictions", str(csv), "--out", str(out), "--bootstrap", "0", "--threshold", "0.6"]) == 0
    )
    assert "SYNTHETIC" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["synthetic"] is True and data["threshold"] == 0.6
    assert data["metrics"]["f1"]["value"] == pytest.approx(skm.f1_score(preds.label, preds.prob_idc >= 0.6))
    assert evaluate(preds, n_bootstrap=0, synthetic=False)["synthetic"] is False
    (data_dir / DEMO_MARKER).unlink()
    assert main(["evaluate", "--predictions", str(csv), "--out", str(out), "--bootstrap", "0"]) == 0
    data = json.loads(out.read_text())
    assert data["synthetic"] is False and data["threshold"] is None


def test_comparison_table_keeps_the_synthetic_label_whole():
    report = evaluate(make_predictions(n_patients=2), n_bootstrap=0, synthetic=True)
    table = comparison_table(report, model="idc_net", test_set="2 test patients (patients split)")
    assert len(table) == len(PUBLISHED) + 1
    ours = table.iloc[-1]
    assert ours["model"].startswith("SYNTHETIC") and ours["test set"].startswith("SYNTHETIC")
    assert ours["F1 (%)"] == pytest.approx(100 * report["metrics"]["f1"]["value"], abs=0.01)
    # What the notebook shows: pandas cuts cells at display.max_colwidth; nothing here is that long.
    width = pd.get_option("display.max_colwidth")
    assert all(len(str(v)) < width for v in table.to_numpy().ravel())
    assert "SYNTHETIC, 2 test patients" in table._repr_html_()
    cruz = table[table["model"] == "Cruz-Roa et al. 2014"].iloc[0]
    assert cruz["F1 (%)"] == 71.8 and cruz["balanced accuracy (%)"] == 84.23
    real = comparison_table(evaluate(make_predictions(), n_bootstrap=0, synthetic=False), model="m", test_set="t")
    assert not real.astype(str).apply(lambda c: c.str.contains("SYNTHETIC")).any().any()


@pytest.mark.parametrize(("module", "allowed"), [("metrics", ("idc_helpers.bootstrap", "sklearn")), ("bootstrap", ())])
def test_metrics_imports_only_the_bootstrap_which_imports_no_scikit_learn(module, allowed):
    code = (
        f"import sys, idc_helpers.{module};"
        "bad = sorted(m for m in sys.modules if m.startswith(('idc_helpers.', 'sklearn'))"
        f" and m != 'idc_helpers.{module}' and not m.startswith({allowed!r}));"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_importing_has_no_side_effects():
    code = (
        "import sys, idc_helpers.metrics, idc_helpers.bootstrap, idc_helpers.reporting, idc_helpers.plots,"
        " idc_helpers.patch_plots, idc_helpers.slides, idc_helpers.slide_plots, idc_helpers.gradcam;"
        "bad = [m for m in ('matplotlib.pyplot', 'tensorflow', 'keras') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_slide_context_columns_are_reported_apart(tmp_path, capsys):
    preds = make_predictions(n_patients=6)
    rng = np.random.default_rng(0)
    preds["prob_idc_context"] = np.clip(preds["prob_idc"] + rng.normal(0, 0.05, len(preds)), 0, 1)
    preds["pred_context"] = (preds["prob_idc_context"] >= 0.45).astype(int)
    report = evaluate(preds, n_bootstrap=0, column="prob_idc_context")
    assert report["column"] == "prob_idc_context"
    assert report["metrics"]["f1"]["value"] == pytest.approx(skm.f1_score(preds.label, preds.pred_context))
    assert "not comparable with patch-only figures" in format_report(report)
    csv, out = tmp_path / "preds.csv", tmp_path / "m.json"
    preds.to_csv(csv, index=False)
    assert main(["evaluate", "--predictions", str(csv), "--out", str(out), "--bootstrap", "0"]) == 0
    assert "Scores: prob_idc_context" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["column"] == "prob_idc" and data["context"]["column"] == "prob_idc_context"
    assert data["context"]["metrics"]["f1"]["value"] == pytest.approx(report["metrics"]["f1"]["value"])


def test_paired_difference_is_the_difference_of_the_point_metrics_with_a_paired_interval():
    base = make_predictions(n_patients=20, seed=1)
    rng = np.random.default_rng(2)
    # A better model: the scores move towards the labels.
    better = base.assign(
        prob_idc=np.clip(base["prob_idc"] + 0.25 * (2 * base["label"] - 1) + rng.normal(0, 0.02, len(base)), 0, 1)
    )
    better = better.assign(pred=(better["prob_idc"] >= 0.5).astype(int))
    diff = paired_difference(base, better, n_bootstrap=200)
    a, b = evaluate(base, n_bootstrap=0)["metrics"], evaluate(better, n_bootstrap=0)["metrics"]
    for name in ("f1", "balanced_accuracy", "roc_auc"):
        assert diff[name]["value"] == pytest.approx(b[name]["value"] - a[name]["value"])
        assert diff[name]["ci_low"] <= diff[name]["value"] <= diff[name]["ci_high"]
    assert diff["roc_auc"]["ci_low"] > 0  # clearly better on every resample of patients
    same = paired_difference(base, base.copy(), n_bootstrap=50)
    assert all(same[k]["value"] == 0 and same[k]["ci_low"] == 0 == same[k]["ci_high"] for k in same)


def test_paired_difference_refuses_tables_of_different_patches_and_withholds_small_intervals():
    base = make_predictions(n_patients=6)
    with pytest.raises(ValueError, match="same patches in the same order"):
        paired_difference(base, base.iloc[::-1].reset_index(drop=True))
    few = base[base["patient_id"].isin(["9000", "9001", "9002"])].reset_index(drop=True)
    assert paired_difference(few, few)["f1"]["ci_low"] is None


def test_paired_difference_of_several_seeds_is_the_difference_of_their_means():
    base = make_predictions(n_patients=15, seed=3)
    rng = np.random.default_rng(4)

    def variant(shift: float) -> pd.DataFrame:
        probs = np.clip(base["prob_idc"] + shift * (2 * base["label"] - 1) + rng.normal(0, 0.05, len(base)), 0, 1)
        return base.assign(prob_idc=probs, pred=(probs >= 0.5).astype(int))

    bases, others = [variant(0.0), variant(0.02)], [variant(0.2), variant(0.25), variant(0.3)]
    diff = paired_difference(bases, others, n_bootstrap=100)
    for name in ("f1", "balanced_accuracy", "roc_auc"):
        mean = [
            np.mean([evaluate(t, n_bootstrap=0)["metrics"][name]["value"] for t in side]) for side in (bases, others)
        ]
        assert diff[name]["value"] == pytest.approx(mean[1] - mean[0])
        assert diff[name]["ci_low"] <= diff[name]["value"] <= diff[name]["ci_high"]
    # One table in a list is the same as the table itself, resamples included.
    assert paired_difference([bases[0]], others[:1], n_bootstrap=50) == paired_difference(
        bases[0], others[0], n_bootstrap=50
    )
    with pytest.raises(ValueError, match="same patches in the same order"):
        paired_difference(bases, [others[0], others[1].iloc[::-1].reset_index(drop=True)])
    with pytest.raises(ValueError, match="at least one predictions table"):
        paired_difference([], others)


def test_the_histogram_bootstrap_of_large_tables_agrees_with_the_exact_one(monkeypatch):
    """Above HISTOGRAM_BOOTSTRAP_PATCHES the resamples' AUCs come from per-patient histograms.

    The same resamples, the same threshold metrics, AUC intervals within 0.001, the same point values.
    """
    from idc_helpers import bootstrap

    preds = make_predictions(n_patients=12, per_patient=300)
    exact = evaluate(preds, n_bootstrap=100, seed=1)
    monkeypatch.setattr(bootstrap, "HISTOGRAM_BOOTSTRAP_PATCHES", 0)
    calls = []
    binned = evaluate(preds, n_bootstrap=100, seed=1, progress=lambda done, total: calls.append((done, total)))
    assert binned["bootstrap"]["used"] == exact["bootstrap"]["used"]
    for name in METRIC_LABELS:
        assert binned["metrics"][name]["value"] == exact["metrics"][name]["value"]
        for end in ("ci_low", "ci_high"):
            tolerance = 1e-3 if name in ("roc_auc", "pr_auc") else 1e-12
            assert binned["metrics"][name][end] == pytest.approx(exact["metrics"][name][end], abs=tolerance), name
    assert calls[0] == (0, 100) and calls[-1] == (100, 100) and calls == sorted(calls)


def test_evaluate_refuses_thresholds_and_counts_out_of_range(tmp_path, cli_error):
    csv = tmp_path / "preds.csv"
    make_predictions(n_patients=2, per_patient=3).to_csv(csv, index=False)
    out = tmp_path / "report.json"
    for option, value, allowed in (
        ("--threshold", "nan", "a finite number in [0, 1]"),
        ("--threshold", "inf", "a finite number in [0, 1]"),
        ("--threshold", "-1", "a finite number in [0, 1]"),
        ("--threshold", "1.5", "a finite number in [0, 1]"),
        ("--bootstrap", "-1", "a whole number of at least 0"),
    ):
        err = cli_error(["evaluate", "--predictions", str(csv), "--out", str(out), option, value])
        assert f"argument {option}: '{value}' is not allowed: use {allowed}" in err
    assert not out.exists()


def test_evaluate_shows_its_progress_on_long_work(tmp_path, monkeypatch, capsys):
    from idc_helpers import commands

    csv = tmp_path / "preds.csv"
    make_predictions().to_csv(csv, index=False)
    monkeypatch.setattr(commands, "_LONG_BOOTSTRAP", 0)  # as if the table were large
    assert main(["evaluate", "--predictions", str(csv), "--bootstrap", "50"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "bootstrap: 0 of 50 resamples" and lines[-1] == "bootstrap: 50 of 50 resamples"
    assert len(lines) <= 11  # a line at each tenth at most
    monkeypatch.setattr(commands, "_LONG_BOOTSTRAP", 10**12)
    assert main(["evaluate", "--predictions", str(csv), "--bootstrap", "50"]) == 0
    assert capsys.readouterr().err == ""  # short work: nothing on stderr


def test_binary_scores_match_sklearn_and_count_the_confusion_cells():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    pred = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    probs = np.array([0.1, 0.6, 0.2, 0.9, 0.7, 0.4, 0.8, 0.3])
    scores = binary_scores(labels, pred, probs)
    assert scores["confusion_matrix"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 3}
    assert scores["f1"] == pytest.approx(skm.f1_score(labels, pred))
    assert scores["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, pred))
    assert scores["specificity"] == pytest.approx(0.75)
    assert scores["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, probs))
    assert "roc_auc" not in binary_scores(labels, pred)
    assert log_loss(labels, probs) == pytest.approx(skm.log_loss(labels, probs))


def test_ranking_scores_are_nan_for_one_class_and_curves_end_at_the_corners():
    assert all(np.isnan(v) for v in ranking_scores([1, 1, 1], [0.2, 0.5, 0.9]).values())
    labels, probs = np.array([0, 1, 0, 1, 1]), np.array([0.1, 0.8, 0.4, 0.35, 0.9])
    fpr, tpr, auc = roc_points(labels, probs)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert auc == pytest.approx(skm.roc_auc_score(labels, probs))
    _precision, recall, ap = pr_points(labels, probs)
    assert recall[0] == 1 and recall[-1] == 0 and ap == pytest.approx(skm.average_precision_score(labels, probs))


def test_run_choices_reads_what_a_run_chose_as_a_table():
    from idc_helpers.reporting import run_choices

    metrics = {
        "threshold": 0.4137,
        "threshold_rule": "maximise the IDC F1",
        "threshold_youden": 0.3,
        "best_epoch": 3,
        "epochs_run": 5,
        "monitor": "val_selection",
        "train_seconds": 61.2,
        "validation": {"patients": 4, "patches": 1200, "idc_patches": 300, "f1": 0.71234, "roc_auc": 0.9},
        "context": {"sigma": 1.5, "threshold": 0.52, "tuned_on": "whole_slides", "patients": ["1", "2", "3"]},
    }
    table = run_choices(metrics)
    assert table.loc["weights kept", "value"] == "best epoch, 3 of 5 (val_selection)"  # a run without "weights"
    averaged = run_choices({**metrics, "weights": "moving average (momentum 0.995) over all 5 epochs"})
    assert averaged.loc["weights kept", "value"].startswith("moving average")
    assert table.loc["threshold", "value"].startswith("0.414 ")
    assert table.loc["Youden threshold", "value"].startswith("0.300 ")  # a run of the F1 rule, before the criterion
    youden = run_choices({**metrics, "threshold_criterion": "youden", "threshold_f1": 0.52})
    assert (
        youden.loc["F1 threshold", "value"] == "0.520 (maximise the IDC F1 on the validation patients' patches)"
        and "Youden threshold" not in youden.index
    )
    assert table.loc["validation patients", "value"] == "4 (1,200 patches, 300 IDC)"
    assert table.loc[f"validation: {METRIC_LABELS['f1']}", "value"] == "0.712"
    assert table.loc["slide context", "value"] == "sigma 1.5 patches, threshold 0.520"
    assert table.loc["slide context chosen on", "value"] == "3 whole-slide validation patients"
    fallback = {"sigma": 0.0, "threshold": 0.4, "tuned_on": "all", "patients": ["1", "2"], "fallback": "1 whole-slide"}
    assert run_choices({**metrics, "context": fallback}).loc["slide context chosen on", "value"] == (
        "2 validation patients (1 whole-slide)"
    )
    unavailable = run_choices({**metrics, "context": {"unavailable": "no whole slide"}})
    assert unavailable.loc["slide context", "value"] == "no whole slide"
