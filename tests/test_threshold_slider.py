"""The threshold curve and the slider of notebooks 03 and 04: the static path and the widget's callback."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import patch_name, write_patch
from sklearn import metrics as skm

from idc_helpers import plots, slides, threshold_slider
from idc_helpers.metrics import evaluate, threshold_curve


def _preds(threshold: float = 0.4) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for patient in ("11", "12"):
        for i in range(48):
            x, y = 1 + 50 * (i % 8), 1 + 50 * (i // 8)
            label = int(i % 8 >= 5)
            prob = float(np.clip(0.5 * label + 0.5 * rng.random(), 0, 1))
            rows.append((f"/d/{patient}/{label}/{i}.png", patient, x, y, label, prob, int(prob >= threshold)))
    table = pd.DataFrame(rows, columns=["path", "patient_id", "x", "y", "label", "prob_idc", "pred"])
    return table.assign(threshold=threshold)


def test_threshold_curve_is_sklearns_at_every_threshold():
    preds = _preds()
    curve = threshold_curve(preds["label"], preds["prob_idc"], [0.0, 0.3, 0.55, 1.0])
    for t, row in zip([0.0, 0.3, 0.55, 1.0], curve.itertuples(), strict=True):
        called = preds["prob_idc"] >= t
        assert row.threshold == t
        assert row.recall == pytest.approx(skm.recall_score(preds["label"], called))
        assert row.f1 == pytest.approx(skm.f1_score(preds["label"], called, zero_division=0))
        assert row.balanced_accuracy == pytest.approx(skm.balanced_accuracy_score(preds["label"], called))
        if called.any():
            assert row.precision == pytest.approx(skm.precision_score(preds["label"], called))
        else:
            assert np.isnan(row.precision)  # undefined: nothing called IDC
    assert len(threshold_curve(preds["label"], preds["prob_idc"])) == 101


def test_curve_figure_marks_the_chosen_threshold():
    preds = _preds()
    curve = threshold_curve(preds["label"], preds["prob_idc"])
    fig = plots.plot_threshold_curve(curve, chosen=0.4, current=0.6)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    f1 = skm.f1_score(preds["label"], preds["prob_idc"] >= 0.4)
    bac = skm.balanced_accuracy_score(preds["label"], preds["prob_idc"] >= 0.4)
    assert f"chosen 0.40: F1 {f1:.2f}, balanced accuracy {bac:.2f}" in labels
    assert "now 0.60" in labels and "0.5" in labels and "balanced accuracy" in labels


def test_a_chosen_threshold_off_the_grid_is_marked_with_its_exact_f1():
    preds = _preds()
    chosen = 0.4137  # between two grid points, where the F1 read off the grid differs
    exact = skm.f1_score(preds["label"], preds["prob_idc"] >= chosen)
    curve = threshold_curve(preds["label"], preds["prob_idc"], extra=[chosen])
    assert len(curve) == 102 and curve["threshold"].is_monotonic_increasing
    assert curve.loc[curve["threshold"] == chosen, "f1"].item() == pytest.approx(exact)
    fig = plots.plot_threshold_curve(curve, chosen=chosen)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(label.startswith(f"chosen 0.41: F1 {exact:.2f}, ") for label in labels)


def test_static_path_draws_the_runs_threshold(monkeypatch, tmp_path):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    view = threshold_slider.ThresholdView(_preds(0.4), synthetic=True)
    view.show(interactive=False, save_to=tmp_path / "t.png")
    assert view.threshold == 0.4 and view.drawn == [0.4]  # the threshold the predictions record
    assert len(shown) == 1 and "Threshold 0.40" in shown[0].get_suptitle()
    assert shown[0].get_suptitle().count(plots.SYNTHETIC_MARK) == 1 and (tmp_path / "t.png").is_file()
    assert view.report["confusion_matrix"] == evaluate(_preds(0.4), n_bootstrap=0)["confusion_matrix"]


def test_slider_redraws_matrix_scores_and_slide_when_moved(tmp_path):
    import ipywidgets  # noqa: F401  (a dependency: the test fails, not skips, without it)

    preds = _preds(0.4)
    rows = preds[preds["patient_id"] == "11"].copy()
    rows["path"] = [
        str(write_patch(tmp_path / f"11/{label}/{patch_name('11', x, y, label)}", np.full((50, 50, 3), 200, np.uint8)))
        for x, y, label in rows[["x", "y", "label"]].to_numpy()
    ]
    view = threshold_slider.ThresholdView(rows, mosaic=slides.slide_mosaic(rows, "11"))
    box = view.widget()
    slider = box.children[0]
    assert slider.value == pytest.approx(0.4) and view.drawn == [0.4]
    slider.value = 0.7  # what dragging the slider does: the callback redraws at the new value
    assert view.drawn[-1] == pytest.approx(0.7)
    expected = evaluate(rows, n_bootstrap=0, threshold=0.7)
    assert view.report["confusion_matrix"] == expected["confusion_matrix"]
    fig = view.figure(0.7)
    assert any("called IDC at 0.70" in ax.get_title() for ax in fig.axes)  # the slide map, split at 0.70
    assert "Threshold 0.70 (patient 11" in fig.get_suptitle()
