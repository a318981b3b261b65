"""Figures: ROC/PR/confusion, learning curves, per patient, patch grids, Grad-CAM grids, the SYNTHETIC mark."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # tests only: the package itself never touches the backend

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from idc_helpers import plots  # noqa: E402
from idc_helpers.metrics import evaluate, per_patient_metrics  # noqa: E402
from test_metrics import make_predictions  # noqa: E402


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


