"""The bootstrap over patients: resamples, the one resampling loop, intervals, and the scores from counts."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from idc_helpers import bootstrap
from idc_helpers.bootstrap import (
    HistogramRanking,
    bootstrap_patients,
    cell_f1_bac,
    patient_cells,
    patient_resamples,
    with_intervals,
    withheld,
)


def _patches(n_patients: int = 6, per_patient: int = 40, seed: int = 0):
    """Patient codes, labels, probabilities and decisions of a small table."""
    rng = np.random.default_rng(seed)
    codes = np.repeat(np.arange(n_patients), per_patient)
    labels = (rng.random(len(codes)) < 0.4).astype(np.int64)
    probs = np.clip(0.3 * labels + 0.7 * rng.random(len(codes)), 0, 1)
    return codes, labels, probs, (probs >= 0.5).astype(np.int64)


def test_patient_resamples_draw_as_many_patients_as_there_are():
    draws = list(patient_resamples(7, 20, np.random.default_rng(3)))
    assert len(draws) == 20 and all(d.shape == (7,) and d.sum() == 7 for d in draws)
    assert len({tuple(d) for d in draws}) > 1


def test_the_loop_scores_usable_resamples_in_batches_and_reports_progress():
    codes, labels, _, predicted = _patches()
    labels[codes != 0] = 0  # every IDC patch belongs to patient 0: resamples without it hold one class
    cells = patient_cells(codes, 6, labels, predicted)
    seen, calls = [], []

    def statistic(counts: np.ndarray) -> np.ndarray:
        seen.append(counts)
        return counts[:, :2].astype(float)

    n = 2 * bootstrap.RESAMPLES_PER_BATCH + 5
    samples = bootstrap_patients(cells, n, 7, statistic, lambda done, total: calls.append((done, total)))
    drawn = np.concatenate(seen)
    assert (drawn[:, 0] > 0).all()  # only resamples that hold patient 0, hence both classes, are scored
    expected = [r for r in patient_resamples(6, n, np.random.default_rng(7)) if r[0] > 0]
    np.testing.assert_array_equal(drawn, expected)  # the same draws as patient_resamples, in order
    assert samples.shape == (len(expected), 2) and 0 < len(expected) < n
    assert all(len(batch) <= bootstrap.RESAMPLES_PER_BATCH for batch in seen)
    assert calls == [(0, n), (64, n), (128, n), (n, n)]
    assert bootstrap_patients(cells, 0, 7, statistic).shape == (0, 0)


def test_intervals_are_percentiles_and_none_without_samples():
    samples = np.column_stack([np.arange(101.0), np.full(101, 3.0)])
    report = with_intervals(("a", "b"), (50.0, None), samples, 0.9)
    assert report["a"] == {"value": 50.0, "ci_low": pytest.approx(5.0), "ci_high": pytest.approx(95.0)}
    assert report["b"] == {"value": None, "ci_low": None, "ci_high": None}  # undefined: no interval
    assert with_intervals(("a",), (1.0,), np.empty((0, 0)), 0.95)["a"]["ci_low"] is None


def test_too_few_patients_withhold_the_interval_and_say_why():
    assert withheld(4, 100) == "only 4 patients: an interval over patients needs at least 5, so none can be estimated"
    assert withheld(1, 10, min_patients=2).startswith("only 1 patient:")
    assert withheld(5, 100) is None and withheld(2, 0) is None  # enough patients, or no interval asked for


def test_scores_from_counts_match_sklearn():
    codes, labels, probs, predicted = _patches()
    cells = patient_cells(codes, 6, labels, predicted)
    np.testing.assert_array_equal(cells.sum(axis=0), skm.confusion_matrix(labels, predicted).ravel())
    f1, bac = cell_f1_bac(cells.sum(axis=0))
    assert f1 == pytest.approx(skm.f1_score(labels, predicted))
    assert bac == pytest.approx(skm.balanced_accuracy_score(labels, predicted))
    counts = np.array([[2, 0, 1, 1, 0, 2], [1, 1, 1, 1, 1, 1]])
    auc, ap = HistogramRanking(codes, 6, labels, probs)(counts)
    for row, draws in enumerate(counts):
        weights = draws[codes]
        assert auc[row] == pytest.approx(skm.roc_auc_score(labels, probs, sample_weight=weights), abs=1e-3)
        assert ap[row] == pytest.approx(skm.average_precision_score(labels, probs, sample_weight=weights), abs=1e-3)
