"""Evaluation of a predictions table (metrics, patient bootstrap, threshold choice, CLI) and the evaluation figures."""

from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace

import matplotlib

matplotlib.use("Agg")  # tests only: the package itself never touches the backend

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from idc_helpers import plots  # noqa: E402
from idc_helpers.cli import main  # noqa: E402
from idc_helpers.metrics import (  # noqa: E402
    METRIC_LABELS, _metric_values, evaluate, format_report, per_patient_metrics, pick_threshold, run_evaluate)

COLUMNS = ["path", "patient_id", "x", "y", "label", "prob_idc", "pred"]


def make_predictions(n_patients: int = 12, per_patient: int = 60, seed: int = 0) -> pd.DataFrame:
    """A predictions table with patient-dependent IDC shares and an informative but imperfect score."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        share = rng.uniform(0.05, 0.6)
        labels = (rng.random(per_patient) < share).astype(int)
        probs = np.clip(0.35 * labels + 0.65 * rng.random(per_patient), 0, 1)
        for i, (label, prob) in enumerate(zip(labels, probs)):
            x, y = 1 + 50 * (i % 8), 1 + 50 * (i // 8)
            rows.append((f"/data/{9000 + p}/{label}/{9000 + p}_idx5_x{x}_y{y}_class{label}.png", str(9000 + p),
                         x, y, label, prob, int(prob >= 0.5)))
    return pd.DataFrame(rows, columns=COLUMNS)


def test_point_metrics_are_sklearns():
    preds = make_predictions()
    report = evaluate(preds, n_bootstrap=0)
    y, s, p = preds["label"], preds["prob_idc"], preds["pred"]
    expected = {
        "f1": skm.f1_score(y, p), "balanced_accuracy": skm.balanced_accuracy_score(y, p),
        "accuracy": skm.accuracy_score(y, p), "precision": skm.precision_score(y, p),
        "recall": skm.recall_score(y, p), "specificity": skm.recall_score(y, p, pos_label=0),
        "roc_auc": skm.roc_auc_score(y, s), "pr_auc": skm.average_precision_score(y, s),
    }
    for name, value in expected.items():
        assert report["metrics"][name]["value"] == pytest.approx(value, abs=1e-12), name
        assert report["metrics"][name]["ci_low"] is None
    tn, fp, fn, tp = skm.confusion_matrix(y, p).ravel()
    assert report["confusion_matrix"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert report["counts"] == {"patches": 720, "patients": 12, "idc": int(y.sum()), "non_idc": int(720 - y.sum()),
                                "idc_fraction": pytest.approx(y.mean())}


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
    weighted = _metric_values(cells, preds["label"].to_numpy()[keep], preds["prob_idc"].to_numpy()[keep],
                              weights[keep])
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
    report = evaluate(preds, n_bootstrap=100, seed=0)
    boot = report["bootstrap"]
    # That patient is missing from (2/3)^3 of the resamples and is the only one in (1/3)^3 of them.
    assert 0 < boot["used"] < 100 and boot["used"] + boot["skipped_one_class"] == 100
    assert "resamples used" in format_report(report)


def test_single_class_table_has_undefined_metrics_not_crashes():
    preds = make_predictions(n_patients=3, per_patient=10)
    preds["label"] = 0
    report = evaluate(preds, n_bootstrap=20)
    for name in ("roc_auc", "pr_auc", "recall", "balanced_accuracy"):
        assert report["metrics"][name]["value"] is None, name
    assert report["metrics"]["specificity"]["value"] == pytest.approx(1 - preds["pred"].mean())
    assert report["bootstrap"]["used"] == 0
    assert "n/a" in format_report(report)
    json.dumps(report, allow_nan=False)


def test_threshold_argument_overrides_pred_column():
    preds = make_predictions()
    report = evaluate(preds, n_bootstrap=0, threshold=0.7)
    assert report["metrics"]["f1"]["value"] == pytest.approx(
        skm.f1_score(preds["label"], preds["prob_idc"] >= 0.7))
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
    assert list(table.columns) == ["patient_id", "n_patches", "n_idc", "predicted_idc", "accuracy", "f1", "roc_auc",
                                   "mean_prob_idc"]
    assert list(table.patient_id) == ["9000", "9001", "9002"]
    one = preds[preds.patient_id == "9000"]
    row = table.iloc[0]
    assert row.n_patches == 40 and row.n_idc == one.label.sum() and row.predicted_idc == one.pred.sum()
    assert row.f1 == pytest.approx(skm.f1_score(one.label, one.pred))
    assert row.roc_auc == pytest.approx(skm.roc_auc_score(one.label, one.prob_idc))
    assert np.isnan(table.iloc[2].f1) and np.isnan(table.iloc[2].roc_auc)


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


def test_run_evaluate_writes_strict_json(tmp_path, capsys):
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


def test_run_evaluate_errors_name_the_file_and_columns(tmp_path, capsys):
    csv = tmp_path / "bad.csv"
    make_predictions(n_patients=2, per_patient=3).drop(columns=["prob_idc", "pred"]).to_csv(csv, index=False)
    args = Namespace(predictions=str(csv), out=None, bootstrap=10, seed=0)
    assert run_evaluate(args) == 2
    err = capsys.readouterr().err
    assert str(csv) in err and "prob_idc" in err and "pred" in err
    args.predictions = str(tmp_path / "missing.csv")
    assert run_evaluate(args) == 2
    assert "missing.csv" in capsys.readouterr().err


def test_patient_ids_stay_text(tmp_path):
    csv = tmp_path / "preds.csv"
    preds = make_predictions(n_patients=2, per_patient=5)
    preds["patient_id"] = ["00" + p for p in preds["patient_id"]]
    preds.to_csv(csv, index=False)
    out = tmp_path / "r.json"
    assert run_evaluate(Namespace(predictions=str(csv), out=str(out), bootstrap=0, seed=0)) == 0
    assert json.loads(out.read_text())["per_patient"][0]["patient_id"] == "009000"


# Figures -----------------------------------------------------------------------------------------------------------

def _legend_texts(fig) -> str:
    return " ".join(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())


def test_curves_accept_tables_pairs_and_dicts():
    import matplotlib.pyplot as plt

    preds = make_predictions()
    auc = skm.roc_auc_score(preds.label, preds.prob_idc)
    fig = plots.plot_roc(preds)
    assert f"AUC = {auc:.3f}" in _legend_texts(fig) and "threshold" in _legend_texts(fig)
    assert fig.axes[0].get_xlabel() and fig.axes[0].get_title()
    fig = plots.plot_pr((preds.label, preds.prob_idc))
    assert "AP = " in _legend_texts(fig) and "chance" in _legend_texts(fig)
    fig = plots.plot_roc({"a": preds, "b": (preds.label, 1 - preds.prob_idc)})
    assert "a: AUC" in _legend_texts(fig) and "b: AUC" in _legend_texts(fig)
    _, ax = plt.subplots()
    assert plots.plot_pr(preds, ax=ax) is ax.figure
    plt.close("all")


def test_confusion_history_per_patient_figures():
    import matplotlib.pyplot as plt

    preds = make_predictions()
    report = evaluate(preds, n_bootstrap=0)
    for fig in (plots.plot_confusion(report), plots.plot_confusion(preds)):
        texts = [t.get_text() for t in fig.axes[0].texts]
        assert f"{report['confusion_matrix']['tp']:,}" in " ".join(texts)
    history = {"loss": [0.6, 0.5, 0.45], "val_loss": [0.62, 0.5, 0.55], "accuracy": [0.7, 0.8, 0.85],
               "val_accuracy": [0.7, 0.78, 0.77], "learning_rate": [1e-3] * 3}
    fig = plots.plot_history(history)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["loss", "accuracy"]
    assert "best epoch (2, val_loss)" in _legend_texts(fig)
    fig = plots.plot_per_patient(per_patient_metrics(preds))
    assert len(fig.axes) >= 2
    images = np.zeros((3, 50, 50, 3), dtype=np.uint8)
    fig = plots.plot_gradcam(images, np.zeros((3, 50, 50)), titles=["a", "b", "c"])
    assert fig.axes[0].get_title() == "a"
    plt.close("all")


def test_importing_has_no_side_effects():
    code = ("import sys, idc_helpers.metrics, idc_helpers.plots, idc_helpers.slides, idc_helpers.gradcam;"
            "bad = [m for m in ('matplotlib.pyplot', 'tensorflow', 'keras') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
