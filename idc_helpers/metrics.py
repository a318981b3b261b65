"""Patient-aware evaluation of a predictions table, with scikit-learn's metrics.

The input is a predictions table as ``predict`` writes it (``path, patient_id, x, y, label, prob_idc, pred``, one
row per patch); reading files is the caller's job. Every score, the threshold search and the curves come from
:mod:`sklearn.metrics` (only this module calls it). Intervals are bootstrapped over *patients*, not patches, by
:mod:`idc_helpers.bootstrap`, the one module this one imports; :mod:`idc_helpers.reporting` writes reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import sklearn
from sklearn import metrics as skm

from idc_helpers import bootstrap

#: Columns :func:`evaluate` needs (``pred`` is optional when a threshold is given).
REQUIRED_COLUMNS = ("patient_id", "label", "prob_idc")

#: Metric names in report order, with the words :func:`idc_helpers.reporting.format_report` prints.
METRIC_LABELS: dict[str, str] = {
    "f1": "F1 (IDC positive)",
    "balanced_accuracy": "Balanced accuracy",
    "accuracy": "Accuracy",
    "precision": "Precision (PPV)",
    "recall": "Recall (sensitivity)",
    "specificity": "Specificity",
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC (average precision)",
}

#: :func:`pick_threshold`'s criteria, the threshold rules: criterion -> (short name, what the rule maximises).
THRESHOLD_RULES: dict[str, tuple[str, str]] = {
    "f1": ("F1", "maximise the IDC F1 on the validation patients' patches"),
    "youden": ("Youden", "maximise the balanced accuracy (Youden's J) on the validation patients' patches"),
}

# The four (label, pred) cells of a binary confusion matrix in sklearn's ravel() order: tn, fp, fn, tp.
_CELL_LABELS = np.array([0, 0, 1, 1])
_CELL_PREDS = np.array([0, 1, 0, 1])


def _check_columns(preds: pd.DataFrame, required: Sequence[str], source: str = "predictions table") -> None:
    """Raise ``ValueError`` naming ``source`` and every missing column."""
    missing = [c for c in required if c not in preds.columns]
    if missing:
        raise ValueError(
            f"{source}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, preds.columns))}. "
            "Write the table with `python -m idc_helpers predict` (columns path, patient_id, x, y, label, "
            "prob_idc, pred)."
        )


def pred_column(column: str) -> str:
    """Name the decision column of probabilities: ``prob_idc`` -> ``pred``, ``prob_idc_context`` -> ``pred_context``."""
    return "pred" + column[len("prob_idc") :] if column.startswith("prob_idc") else f"{column}_pred"


def threshold_column(column: str) -> str:
    """Name the column that records the threshold a probability column was decided at.

    ``prob_idc`` -> ``threshold``, ``prob_idc_context`` -> ``threshold_context`` (``predict`` writes it beside the
    decisions).
    """
    return "threshold" + column[len("prob_idc") :] if column.startswith("prob_idc") else f"{column}_threshold"


def stored_threshold(preds: pd.DataFrame, column: str = "prob_idc") -> float | None:
    """Return the threshold a predictions table records for ``column`` (one value in its :func:`threshold_column`).

    ``None`` when the table has no such column, holds several values there, or its decisions disagree with it (a
    table whose ``pred`` was replaced after ``predict`` wrote it).
    """
    name, decision = threshold_column(column), pred_column(column)
    if name not in preds.columns or column not in preds.columns or len(preds) == 0:
        return None
    values = pd.unique(preds[name].to_numpy(dtype=np.float64))
    if len(values) != 1 or not np.isfinite(values[0]):
        return None
    threshold = float(values[0])
    if decision in preds.columns and not np.array_equal(
        preds[decision].to_numpy() == 1, preds[column].to_numpy(np.float64) >= threshold
    ):
        return None
    return threshold


def _labels_probs_preds(
    preds: pd.DataFrame, threshold: float | None, column: str = "prob_idc"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return labels (int), probabilities (float) and 0/1 predictions, after checking values."""
    _check_columns(preds, ("patient_id", "label", column))
    if len(preds) == 0:
        raise ValueError("predictions table is empty")
    labels = preds["label"].to_numpy()
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("column 'label' must hold only 0 (non-IDC) and 1 (IDC)")
    probs = preds[column].to_numpy(dtype=np.float64)
    if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
        raise ValueError(f"column {column!r} must hold probabilities in [0, 1] (no NaN)")
    decision = pred_column(column)
    if threshold is None:
        threshold = stored_threshold(preds, column)  # the run's threshold, where the table records it
    if threshold is not None:
        predicted = (probs >= threshold).astype(np.int64)
    elif decision in preds.columns:
        predicted = preds[decision].to_numpy()
        if not np.isin(predicted, (0, 1)).all():
            raise ValueError(f"column {decision!r} must hold only 0 and 1")
    else:
        raise ValueError(f"the table has no {decision!r} column: pass threshold= to turn {column} into predictions")
    return labels.astype(np.int64), probs, predicted.astype(np.int64)


def _metric_values(
    cells: np.ndarray, labels: np.ndarray | None, probs: np.ndarray | None, weights: np.ndarray | None
) -> dict[str, float | None]:
    """Compute all metrics for one (possibly reweighted) set of patches.

    ``cells`` is their confusion matrix (tn, fp, fn, tp): sklearn scores the four cells weighted by their counts,
    exact and much faster than every patch. Ranking metrics need every patch, with ``weights`` (k draws: k times).
    """
    # One call gives precision, recall and F1 of both classes; the recall of non-IDC is the specificity.
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        _CELL_LABELS, _CELL_PREDS, labels=[0, 1], sample_weight=cells, zero_division=0
    )
    has_negatives, has_positives = cells[0] + cells[1] > 0, cells[2] + cells[3] > 0
    both = has_negatives and has_positives
    values: dict[str, float | None] = {
        "f1": float(f1[1]),
        "balanced_accuracy": (
            float(skm.balanced_accuracy_score(_CELL_LABELS, _CELL_PREDS, sample_weight=cells)) if both else None
        ),
        "accuracy": float(skm.accuracy_score(_CELL_LABELS, _CELL_PREDS, sample_weight=cells)),
        "precision": float(precision[1]),
        # sklearn would give 0 (or a warning) for metrics of an absent class; they are undefined, not 0.
        "recall": float(recall[1]) if has_positives else None,
        "specificity": float(recall[0]) if has_negatives else None,
        "roc_auc": None,
        "pr_auc": None,
    }
    if both and labels is not None:  # None: the caller computes the ranking metrics itself
        values["roc_auc"] = float(skm.roc_auc_score(labels, probs, sample_weight=weights))
        values["pr_auc"] = float(skm.average_precision_score(labels, probs, pos_label=1, sample_weight=weights))
    return values


def evaluate(
    preds: pd.DataFrame,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    threshold: float | None = None,
    level: float = 0.95,
    synthetic: bool | None = None,
    min_patients: int = bootstrap.MIN_PATIENTS_FOR_INTERVAL,
    column: str = "prob_idc",
    progress: bootstrap.Progress | None = None,
) -> dict[str, Any]:
    """Score a predictions table, with bootstrap intervals over patients.

    ``preds`` has one row per patch with ``patient_id``, ``label`` (0/1), the probability ``column`` (in [0, 1];
    default ``prob_idc``, e.g. ``prob_idc_context``) and its decisions (:func:`pred_column`, 0/1). Decisions are
    ``column >= threshold``; without ``threshold``, the threshold the table records (:func:`stored_threshold`,
    written by ``predict``), else the table's own decisions. The intervals come from ``n_bootstrap`` patient
    resamples (0: none) seeded with ``seed``, central ``level`` percentile intervals; with fewer than
    ``min_patients`` patients they are withheld (see :mod:`idc_helpers.bootstrap`). ``synthetic`` (whether the
    patches are synthetic demo data) is written into the report; ``progress(done, total)`` is called now and then
    during the bootstrap.

    Returns a JSON-ready dict: ``synthetic``, ``column``, ``counts`` (patches, patients, idc, non_idc,
    idc_fraction), ``threshold`` (``None`` when a ``pred`` column without a recorded threshold decided),
    ``confusion_matrix`` (tn, fp, fn, tp), ``metrics`` (name -> {value, ci_low, ci_high}; ``None`` where a metric
    is undefined, e.g. ROC AUC with one class, and where the interval is withheld) and ``bootstrap`` (unit,
    requested, used, skipped_one_class, seed, level, and ``withheld``: ``None`` or the reason no interval is
    given). A resample is skipped when its pooled patches hold only one class.

    A patient drawn k times counts k times (sample weights, exactly the same as repeating its patches). Cost: about
    30 ms per resample for 80,000 patches on one CPU core, so 1000 resamples of a large test set take ~30 s; above
    :data:`idc_helpers.bootstrap.HISTOGRAM_BOOTSTRAP_PATCHES` patches a resample costs about 40 ms even for 10
    million patches (38 s from every patch; docs/input-checks.md). Precision and F1 follow sklearn's
    ``zero_division=0`` (0 when nothing is predicted IDC).
    """
    labels, probs, predicted = _labels_probs_preds(preds, threshold, column)
    threshold = stored_threshold(preds, column) if threshold is None else threshold
    patient_ids = preds["patient_id"].astype(str).to_numpy()
    codes, uniques = pd.factorize(patient_ids)
    n_patients = len(uniques)

    per_patient = bootstrap.patient_cells(codes, n_patients, labels, predicted)
    cells = per_patient.sum(axis=0)
    point = _metric_values(cells, labels, probs, None)

    withheld = bootstrap.withheld(n_patients, n_bootstrap, min_patients)
    samples = np.empty((0, 0))
    if withheld is None:
        statistic = _resample_metrics(per_patient, codes, labels, probs)
        samples = bootstrap.bootstrap_patients(per_patient, n_bootstrap, seed, statistic, progress)
    used = len(samples)

    n_idc = int(labels.sum())
    tn, fp, fn, tp = (int(v) for v in cells)
    return {
        "synthetic": None if synthetic is None else bool(synthetic),
        "column": column,
        "counts": {
            "patches": len(labels),
            "patients": int(n_patients),
            "idc": n_idc,
            "non_idc": int(len(labels) - n_idc),
            "idc_fraction": n_idc / len(labels),
        },
        "threshold": None if threshold is None else float(threshold),
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "metrics": bootstrap.with_intervals(METRIC_LABELS, [point[n] for n in METRIC_LABELS], samples, level),
        "bootstrap": {
            "unit": "patient",
            "requested": int(n_bootstrap),
            "used": used,
            "skipped_one_class": int(n_bootstrap - used) if withheld is None else 0,
            "seed": int(seed),
            "level": float(level),
            "withheld": withheld,
        },
    }


def _resample_metrics(
    per_patient: np.ndarray, codes: np.ndarray, labels: np.ndarray, probs: np.ndarray
) -> Callable[[np.ndarray], np.ndarray]:
    """The statistic :func:`evaluate` bootstraps: every metric of patient resamples, ``(k, 8)`` in report order.

    The ranking metrics come from every patch (sorted by probability: the same results, faster) or, above
    :data:`idc_helpers.bootstrap.HISTOGRAM_BOOTSTRAP_PATCHES` patches, from per-patient histograms.
    """
    if len(labels) > bootstrap.HISTOGRAM_BOOTSTRAP_PATCHES:
        ranking = bootstrap.HistogramRanking(codes, len(per_patient), labels, probs)

        def from_histograms(counts: np.ndarray) -> np.ndarray:
            auc, ap = ranking(counts)
            rows = []
            for row, cells in enumerate(counts @ per_patient):
                values = {**_metric_values(cells, None, None, None), "roc_auc": auc[row], "pr_auc": ap[row]}
                rows.append([values[name] for name in METRIC_LABELS])
            return np.array(rows)

        return from_histograms
    # sklearn sorts scores (stable) on every call: on sorted input a linear pass, each resample's ranking twice as fast.
    order = np.argsort(probs, kind="stable")
    codes, labels, probs = codes[order], labels[order], probs[order]

    def from_patches(counts: np.ndarray) -> np.ndarray:
        rows = []
        # The inputs were checked by the caller; sklearn's own checks would otherwise cost more than the metrics.
        with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
            for draws in counts:
                weights = draws[codes]
                keep = weights > 0
                values = _metric_values(draws @ per_patient, labels[keep], probs[keep], weights[keep])
                rows.append([values[name] for name in METRIC_LABELS])
        return np.array(rows)

    return from_patches


#: Metrics :func:`paired_difference` compares.
PAIRED_METRICS = ("f1", "balanced_accuracy", "roc_auc")


def paired_difference(
    base: pd.DataFrame | Sequence[pd.DataFrame],
    other: pd.DataFrame | Sequence[pd.DataFrame],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, float | None]]:
    """Compare predictions of the same patches: ``other`` minus ``base``, with a paired interval.

    The differences are those of F1, balanced accuracy and ROC AUC (:data:`PAIRED_METRICS`), with a paired bootstrap
    interval over patients (each resample draws the same patients for every table). ``base`` and ``other`` are
    predictions tables of the same patches in the same order (``path`` or, without it, ``patient_id`` and ``label``
    must match row by row), each with ``prob_idc`` and ``pred`` (its own decisions, e.g. at its own validation
    threshold). Either side may be several tables (e.g. one per model seed): that side then scores the mean of its
    tables' metrics, in every resample too. Returns name -> ``{value, ci_low, ci_high}``; the interval is ``None``
    with fewer than :data:`idc_helpers.bootstrap.MIN_PATIENTS_FOR_INTERVAL` patients. A paired interval is narrower
    than the difference of two unpaired ones: both sides share the patients that make a fold easy or hard.
    """
    sides = [[side] if isinstance(side, pd.DataFrame) else list(side) for side in (base, other)]
    if not sides[0] or not sides[1]:
        raise ValueError("paired_difference needs at least one predictions table on each side")
    first = sides[0][0]
    key = "path" if all("path" in t.columns for side in sides for t in side) else "patient_id"
    labels = first["label"].to_numpy(np.int64)
    for table in (t for side in sides for t in side):
        if len(table) != len(first) or not np.array_equal(
            first[key].astype(str).to_numpy(), table[key].astype(str).to_numpy()
        ):
            raise ValueError(f"paired_difference needs the same patches in the same order (column {key!r} differs)")
        if not np.array_equal(labels, table["label"].to_numpy(np.int64)):
            raise ValueError("paired_difference: the tables disagree on the labels")
    codes, uniques = pd.factorize(first["patient_id"].astype(str).to_numpy())
    n_patients = len(uniques)

    def cells(t: pd.DataFrame) -> np.ndarray:
        return bootstrap.patient_cells(codes, n_patients, labels, t["pred"].to_numpy(np.int64))

    scored = [[(t["prob_idc"].to_numpy(np.float64), cells(t)) for t in side] for side in sides]

    def side_mean(side: list[tuple[np.ndarray, np.ndarray]], counts: np.ndarray | None) -> np.ndarray:
        weights = None if counts is None else counts[codes]
        keep = slice(None) if weights is None else weights > 0
        out = []
        for probs, table_cells in side:
            f1, bac = bootstrap.cell_f1_bac(table_cells.sum(axis=0) if counts is None else counts @ table_cells)
            auc = skm.roc_auc_score(labels[keep], probs[keep], sample_weight=None if weights is None else weights[keep])
            out.append((float(f1), float(bac), float(auc)))
        return np.mean(out, axis=0)

    def difference(counts: np.ndarray | None) -> np.ndarray:
        return side_mean(scored[1], counts) - side_mean(scored[0], counts)

    samples = np.empty((0, 0))
    if bootstrap.withheld(n_patients, n_bootstrap) is None:
        samples = bootstrap.bootstrap_patients(
            scored[0][0][1], n_bootstrap, seed, lambda counts: np.array([difference(draws) for draws in counts])
        )
    return bootstrap.with_intervals(PAIRED_METRICS, [float(v) for v in difference(None)], samples, level)


def per_patient_metrics(preds: pd.DataFrame, *, threshold: float | None = None) -> pd.DataFrame:
    """Score each patient apart: one row per patient, sorted by patient id.

    Columns: patient_id, n_patches, n_idc, predicted_idc, accuracy, specificity, f1, roc_auc, mean_prob_idc.
    ``f1`` is NaN for a patient with no IDC patch (nothing to find: its specificity, the share of its patches called
    non-IDC, is what is defined); ``specificity`` is NaN for a patient with no non-IDC patch; ``roc_auc`` is NaN
    unless the patient has both classes.
    """
    labels, probs, predicted = _labels_probs_preds(preds, threshold)
    frame = pd.DataFrame(
        {"patient_id": preds["patient_id"].astype(str).to_numpy(), "label": labels, "prob": probs, "pred": predicted}
    )
    rows = []
    for patient, group in frame.groupby("patient_id", sort=True):
        y, s, p = group["label"].to_numpy(), group["prob"].to_numpy(), group["pred"].to_numpy()
        has_both = 0 < y.sum() < len(y)
        rows.append(
            {
                "patient_id": patient,
                "n_patches": len(y),
                "n_idc": int(y.sum()),
                "predicted_idc": int(p.sum()),
                "accuracy": skm.accuracy_score(y, p),
                "specificity": float(np.mean(p[y == 0] == 0)) if (y == 0).any() else math.nan,
                "f1": skm.f1_score(y, p, zero_division=0) if y.any() else math.nan,
                "roc_auc": skm.roc_auc_score(y, s) if has_both else math.nan,
                "mean_prob_idc": float(s.mean()),
            }
        )
    return pd.DataFrame(rows)  # the table has rows (checked above), so the keys name the columns


def ranking_scores(labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Return ROC AUC and PR AUC (average precision) of IDC probabilities ``probs`` against 0/1 ``labels``.

    Both are ``(N,)``; the scores are NaN when the labels hold one class only.
    """
    y = np.asarray(labels).astype(np.int64)
    s = np.asarray(probs, dtype=np.float64)
    if not 0 < y.sum() < len(y):
        return {"roc_auc": math.nan, "pr_auc": math.nan}
    return {"roc_auc": float(skm.roc_auc_score(y, s)), "pr_auc": float(skm.average_precision_score(y, s))}


def binary_scores(
    labels: Sequence[int] | np.ndarray,
    pred: Sequence[int] | np.ndarray,
    probs: Sequence[float] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Score 0/1 predictions ``pred`` against 0/1 ``labels`` (both ``(N,)``).

    Returns F1, balanced accuracy, accuracy, precision, recall, specificity and the confusion cells (``tn, fp, fn,
    tp``); with ``probs``, also :func:`ranking_scores`. Precision, recall, F1 and specificity are 0 where undefined
    (sklearn's ``zero_division=0``).
    """
    y = np.asarray(labels).astype(np.int64)
    p = np.asarray(pred).astype(np.int64)
    tn, fp, fn, tp = (int(c) for c in skm.confusion_matrix(y, p, labels=[0, 1]).ravel())
    values: dict[str, Any] = {} if probs is None else ranking_scores(y, probs)
    values.update(
        {
            "f1": float(skm.f1_score(y, p, zero_division=0)),
            "balanced_accuracy": float(skm.balanced_accuracy_score(y, p)),
            "accuracy": float(skm.accuracy_score(y, p)),
            "precision": float(skm.precision_score(y, p, zero_division=0)),
            "recall": float(skm.recall_score(y, p, zero_division=0)),
            "specificity": tn / (tn + fp) if tn + fp else 0.0,
            "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        }
    )
    return values


def log_loss(labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray) -> float:
    """Return the mean binary cross-entropy (nats) of IDC probabilities ``probs`` against 0/1 ``labels``.

    Probabilities are clipped to [1e-7, 1 - 1e-7] as Keras does.
    """
    return float(skm.log_loss(labels, np.clip(np.asarray(probs), 1e-7, 1 - 1e-7), labels=[0, 1]))


def roc_points(
    labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Return the ROC curve of ``probs`` against 0/1 ``labels``, and the area under it.

    False and true positive rates are both ``(k,)``, from (0, 0) to (1, 1).
    """
    fpr, tpr, _ = skm.roc_curve(labels, probs, pos_label=1)
    return fpr, tpr, float(skm.auc(fpr, tpr))


def pr_points(
    labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Return the precision-recall curve of ``probs`` against 0/1 ``labels``, and the average precision.

    Precisions and recalls are both ``(k,)``, recall decreasing.
    """
    precision, recall, _ = skm.precision_recall_curve(labels, probs, pos_label=1)
    return precision, recall, float(skm.average_precision_score(labels, probs, pos_label=1))


def pick_threshold(
    labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray, criterion: str = "f1"
) -> float:
    """Return the decision threshold (predict IDC when ``prob >= threshold``) that maximises ``criterion`` here.

    Meant for the *validation* patients; never pick it on test. ``criterion``: one of :data:`THRESHOLD_RULES`, ``"f1"``
    (from the precision-recall curve) or ``"youden"`` (max TPR - FPR on the ROC curve: the best balanced accuracy).
    Ties go to the lowest threshold.
    """
    y = np.asarray(labels).astype(np.int64)
    s = np.asarray(probs, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1 or len(y) == 0:
        raise ValueError("labels and probs must be 1-D and of the same non-zero length")
    if not (0 < y.sum() < len(y)):
        raise ValueError("picking a threshold needs both classes in labels")
    if criterion == "f1":
        precision, recall, thresholds = skm.precision_recall_curve(y, s, pos_label=1)
        # The last (precision, recall) = (1, 0) point has no threshold.
        precision, recall = precision[:-1], recall[:-1]
        # F1 at every candidate threshold in one pass (f1_score per threshold would be quadratic in the patches).
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
        return float(thresholds[int(np.argmax(f1))])
    if criterion == "youden":
        fpr, tpr, thresholds = skm.roc_curve(y, s, pos_label=1, drop_intermediate=False)
        # roc_curve's thresholds decrease; the first one is +inf (nothing predicted positive).
        j = tpr[1:] - fpr[1:]
        best = np.flatnonzero(j == j.max())[-1] + 1  # lowest threshold among ties
        return float(thresholds[best])
    raise ValueError(f"unknown criterion {criterion!r}: use one of {', '.join(THRESHOLD_RULES)}")


def threshold_curve(
    labels: Sequence[int] | np.ndarray,
    probs: Sequence[float] | np.ndarray,
    thresholds: Sequence[float] | np.ndarray | None = None,
    *,
    extra: Sequence[float] = (),
) -> pd.DataFrame:
    """Score the IDC class at each threshold: precision, recall (sensitivity), specificity, F1, balanced accuracy.

    IDC is predicted when ``prob >= threshold``; default thresholds 0.00, 0.01, ..., 1.00, one row each, in that
    order, with the ``extra`` thresholds (a run's chosen one, so that a figure marks its exact scores) sorted in.
    Precision is NaN where nothing is called IDC (undefined, so a plot leaves a gap) and F1 then 0.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(probs, dtype=np.float64)
    grid = np.linspace(0.0, 1.0, 101) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    if len(extra):
        grid = np.union1d(grid, np.asarray(extra, dtype=np.float64))
    # Counts at every threshold from the sorted scores: O(N log N), not one pass per threshold.
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    tp = len(pos) - np.searchsorted(pos, grid, side="left")
    fp = len(neg) - np.searchsorted(neg, grid, side="left")
    called = tp + fp
    precision = np.divide(tp, called, out=np.full(len(grid), np.nan), where=called > 0)
    recall = tp / len(pos) if len(pos) else np.full(len(grid), np.nan)
    specificity = 1.0 - fp / len(neg) if len(neg) else np.full(len(grid), np.nan)
    denominator = 2 * tp + fp + (len(pos) - tp)
    f1 = np.divide(2 * tp, denominator, out=np.zeros(len(grid)), where=denominator > 0)
    columns = {"threshold": grid, "precision": precision, "recall": recall, "specificity": specificity, "f1": f1}
    return pd.DataFrame({**columns, "balanced_accuracy": (recall + specificity) / 2})
