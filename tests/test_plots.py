"""Charts: ROC/PR/confusion, learning curves, per patient, and the SYNTHETIC mark on saved figures."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # tests only: the package itself never touches the backend

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
from sklearn import metrics as skm
from test_metrics import make_predictions

from idc_helpers import plots
from idc_helpers.metrics import evaluate, per_patient_metrics


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _legend_texts(fig) -> str:
    return " ".join(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())


def _all_texts(fig) -> str:
    texts = [t.get_text() for t in fig.texts] + [fig._suptitle.get_text() if fig._suptitle else ""]
    for ax in fig.axes:
        texts += [t.get_text() for t in ax.texts] + [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        texts += [t.get_text() for t in ax.get_yticklabels()]
    return " ".join(texts) + " " + _legend_texts(fig)


def test_curves_accept_tables_pairs_and_dicts():
    preds = make_predictions()
    auc = skm.roc_auc_score(preds.label, preds.prob_idc)
    fig = plots.plot_roc(preds)
    assert f"AUC = {auc:.2f}" in _legend_texts(fig) and "threshold" in _legend_texts(fig)
    assert fig.axes[0].get_xlabel() and fig.axes[0].get_title()
    fig = plots.plot_pr((preds.label, preds.prob_idc))
    ap = skm.average_precision_score(preds.label, preds.prob_idc)
    assert f"AP = {ap:.2f}" in _legend_texts(fig) and "chance" in _legend_texts(fig)
    fig = plots.plot_roc({"a": preds, "b": (preds.label, 1 - preds.prob_idc)})
    assert "a (AUC" in _legend_texts(fig) and "b (AUC" in _legend_texts(fig)
    _, ax = plt.subplots()
    assert plots.plot_pr(preds, ax=ax) is ax.figure


def test_confusion_matrix_counts_and_shares():
    preds = make_predictions()
    report = evaluate(preds, n_bootstrap=0)
    cm = report["confusion_matrix"]
    for fig in (plots.plot_confusion(report), plots.plot_confusion(preds)):
        texts = " ".join(t.get_text() for t in fig.axes[0].texts)
        assert f"{cm['tp']:,}\n{cm['tp'] / (cm['tp'] + cm['fn']):.1%}" in texts


def test_learning_curves_show_validation_and_name_the_rule():
    """What decides (validation AUC, the selection score) is plotted, validation beside training.

    The legend says the rule in words read from the history, not the bare name 'val_selection'. No accuracy at a
    fixed 0.5: the F1 shown is each epoch's F1 at its own validation threshold.
    """
    auc = np.array([0.80, 0.90, 0.88])
    loss = np.array([0.60, 0.40, 0.50])
    history = {
        "loss": [0.7, 0.5, 0.45],
        "accuracy": [0.7, 0.8, 0.85],
        "val_loss": list(loss),
        "val_auc": list(auc),
        "val_balanced_accuracy": [0.52, 0.53, 0.52],
        "val_f1": [0.6, 0.7, 0.69],
        "val_selection": list(auc - 0.01 * loss),
        "lr": [1e-3] * 3,
    }
    fig = plots.plot_history(history, monitor="val_selection", best_epoch=2)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["loss", "validation patients: what picks the epoch"]
    labels = [[line.get_label() for line in ax.get_lines()] for ax in fig.axes]
    assert "validation" in labels[0] and "training (augmented, class-weighted)" in labels[0]
    assert labels[1][:3] == ["ROC AUC", "val_selection (selects)", "F1 at that epoch's threshold"]
    plotted = [tuple(np.round(line.get_ydata(), 3)) for ax in fig.axes for line in ax.get_lines()]
    assert (0.52, 0.53, 0.52) not in plotted and (0.7, 0.8, 0.85) not in plotted  # no accuracy panel
    assert "kept: epoch 2" in _legend_texts(fig)
    assert "highest validation ROC AUC - 0.01 x validation loss" in fig._suptitle.get_text()
    assert plots.selection_rule({**history, "val_selection": list(auc - 0.05 * loss)}, "val_selection") == (
        "highest validation ROC AUC - 0.05 x validation loss"
    )
    plain = plots.plot_history({"loss": [0.6, 0.5, 0.45], "val_loss": [0.62, 0.5, 0.55]})
    assert "lowest validation loss" in plain._suptitle.get_text() and "kept: epoch 2" in _legend_texts(plain)
    # Averaged weights come from every epoch: no epoch is marked as kept, and nothing claims to select one.
    averaged = plots.plot_history(history, monitor="val_selection", best_epoch=3, averaged=True)
    assert "kept: epoch" not in _legend_texts(averaged) and "ROC AUC" in _legend_texts(averaged)
    assert "val_selection (selects)" not in _legend_texts(averaged)
    assert averaged._suptitle.get_text().startswith("Kept: the moving average of the weights over all 3 epochs")


def test_per_patient_figure_shows_every_patient():
    preds = make_predictions(n_patients=4, per_patient=40)
    preds.loc[preds.patient_id == "9002", "label"] = 0  # no IDC: no F1, but the patient must still be drawn
    table = per_patient_metrics(preds)
    fig = plots.plot_per_patient(table)
    right = fig.axes[1]
    assert len(right.patches) == 4
    ticks = [t.get_text() for t in right.get_yticklabels()]
    assert sorted(ticks) == [f"patient {p}" for p in ("9000", "9001", "9002", "9003")]
    spec = table.set_index("patient_id").loc["9002", "specificity"]
    assert f"no IDC: specificity {spec:.2f}" in _all_texts(fig)
    f1 = table.set_index("patient_id").loc["9000", "f1"]
    assert f"F1 {f1:.2f}" in _all_texts(fig) and right.get_xlabel().startswith("F1 ")
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections) == 4  # every patient in the scatter too


def test_saved_synthetic_figures_carry_a_visible_mark(tmp_path):
    preds = make_predictions()
    plain, marked = tmp_path / "real.png", tmp_path / "synthetic.png"
    plots.save_figure(plots.plot_roc(preds), plain, synthetic=False)
    fig = plots.plot_roc(preds)
    plots.save_figure(fig, marked, synthetic=True)
    assert fig.get_suptitle().startswith(plots.SYNTHETIC_MARK) and "SYNTHETIC" in fig.texts[-1].get_text()
    a, b = matplotlib.image.imread(plain), matplotlib.image.imread(marked)
    assert a.shape == b.shape
    # The mark is drawn in red where the plain figure has none.
    red = lambda im: ((im[..., 0] > 0.7) & (im[..., 1] < 0.3) & (im[..., 2] < 0.3)).sum()  # noqa: E731
    assert red(b) > red(a) + 500
    assert not list(tmp_path.glob(".*tmp"))


def test_a_figure_without_suffix_in_a_dotted_folder_is_saved_as_png(tmp_path):
    path = tmp_path / "run.v2" / "figure"
    path.parent.mkdir()
    plots.save_figure(plots.plot_roc(make_predictions()), path, synthetic=False)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_synthetic_mark_keeps_the_title_and_is_laid_out_above_it(tmp_path):
    fig = plots.plot_history({"loss": [0.6, 0.5], "val_loss": [0.7, 0.6]})
    title = fig.get_suptitle()
    plots.save_figure(fig, tmp_path / "h.png", synthetic=True)
    assert fig.get_suptitle() == f"{plots.SYNTHETIC_MARK}\n{title}"
