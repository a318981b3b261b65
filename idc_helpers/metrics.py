"""Patient-aware evaluation of a predictions table, with scikit-learn's metrics.

The input is a predictions table as ``predict`` writes it (a DataFrame with ``path, patient_id, x, y, label,
prob_idc, pred``; one row per patch); reading files is the caller's job, and this module imports nothing of the
package. Every metric comes from :mod:`sklearn.metrics`. Confidence intervals are bootstrapped over *patients*, not
patches: patches of one patient are strongly correlated, so resampling patches would give intervals that are far too
narrow. With fewer than :data:`MIN_PATIENTS_FOR_INTERVAL` patients no interval is given: a resample of 2 or 3
patients can only recombine the same few slides, and its spread says nothing about a new patient.

:data:`PUBLISHED` holds the published figures this series compares with (the one place they are written).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import sklearn
from sklearn import metrics as skm

#: Columns :func:`evaluate` needs (``pred`` is optional when a threshold is given).
REQUIRED_COLUMNS = ("patient_id", "label", "prob_idc")

#: Metric names in report order, with the words :func:`format_report` prints.
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

#: Fewest patients for which :func:`evaluate` gives a bootstrap interval "over patients".
MIN_PATIENTS_FOR_INTERVAL = 5

#: Patches above which the bootstrap computes each resample's ROC and PR AUC from per-patient histograms of the
#: probabilities (:data:`HISTOGRAM_BINS` equal bins in [0, 1]) instead of from every patch: a resample then costs
#: about the same for ten million patches as for a hundred thousand. Patches in one bin count as tied, which moves
#: the intervals' ends by less than 0.001 (tested), far less than their width; the point values stay exact.
HISTOGRAM_BOOTSTRAP_PATCHES = 100_000
HISTOGRAM_BINS = 16_384
_RESAMPLES_PER_BATCH = 64

#: Published results on this dataset (fractions, ``None`` where the paper gives no figure), and on what test set.
#: ``patient_level`` says whether the test patients were unseen in training.
PUBLISHED: tuple[dict[str, Any], ...] = (
    {
        "model": "seed CNN (published, leaky patch split)",
        "test set": "random patches",
        "f1": 0.7533,
        "balanced_accuracy": 0.8314,
        "patient_level": False,
    },
    {
        "model": "Cruz-Roa et al. 2014",
        "test set": "49 patients",
        "f1": 0.718,
        "balanced_accuracy": 0.8423,
        "patient_level": True,
    },
    {
        "model": "Janowczyk & Madabhushi 2016",
        "test set": "49 patients",
        "f1": 0.7648,
        "balanced_accuracy": None,
        "patient_level": True,
    },
    {
        "model": "Romero et al. 2019",
        "test set": "49 patients",
        "f1": None,
        "balanced_accuracy": 0.89,
        "patient_level": True,
    },
)

#: ``progress(done, total)``: what :func:`evaluate` calls now and then during a long bootstrap.
Progress = Callable[[int, int], None]

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
    """The decision column that goes with a probability column: ``prob_idc`` -> ``pred``,
    ``prob_idc_context`` -> ``pred_context``.
    """
    return "pred" + column[len("prob_idc") :] if column.startswith("prob_idc") else f"{column}_pred"


def threshold_column(column: str) -> str:
    """The column that records the threshold a probability column was decided at: ``prob_idc`` -> ``threshold``,
    ``prob_idc_context`` -> ``threshold_context`` (written by ``predict`` beside the decisions).
    """
    return "threshold" + column[len("prob_idc") :] if column.startswith("prob_idc") else f"{column}_threshold"


def stored_threshold(preds: pd.DataFrame, column: str = "prob_idc") -> float | None:
    """The threshold a predictions table records for ``column`` (one value in its :func:`threshold_column`), or
    ``None`` when the table has no such column, holds several values there, or its decisions disagree with it
    (a table whose ``pred`` was replaced after ``predict`` wrote it).
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
    """Labels (int), probabilities (float) and 0/1 predictions, after checking values."""
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
    """All metrics for one (possibly reweighted) set of patches.

    ``cells`` is the confusion matrix (tn, fp, fn, tp) of the same patches: the threshold metrics are computed by
    sklearn on the four cells weighted by their counts, which is exact and much faster than on every patch.
    Ranking metrics need every patch and take ``weights`` (a patient drawn k times counts k times).
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


def _patient_cells(patient_codes: np.ndarray, n_patients: int, labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Per-patient confusion-matrix counts, shape (n_patients, 4) in tn, fp, fn, tp order."""
    cell = 2 * labels + predicted  # 0=tn, 1=fp, 2=fn, 3=tp
    return np.bincount(patient_codes * 4 + cell, minlength=n_patients * 4).reshape(n_patients, 4)


def patient_resamples(n_patients: int, n_bootstrap: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """The bootstrap over patients: ``n_bootstrap`` times, how often each of ``n_patients`` patients is drawn when
    ``n_patients`` are drawn with replacement, a ``(n_patients,)`` int64 array. A paired bootstrap applies each
    array to both tables.
    """
    for _ in range(n_bootstrap):
        yield np.bincount(rng.integers(0, n_patients, size=n_patients), minlength=n_patients)


def _percentile_interval(samples: Sequence[float] | np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap ``samples``."""
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = (float(v) for v in np.percentile(samples, [tail, 100.0 - tail]))
    return low, high


def _bootstrap(
    per_patient: np.ndarray,
    codes: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    n_bootstrap: int,
    rng: np.random.Generator,
    samples: dict[str, list[float]],
    progress: Progress | None = None,
) -> int:
    """Append each metric of ``n_bootstrap`` patient resamples to ``samples``; returns how many were usable."""
    used = 0
    for i, counts in enumerate(patient_resamples(len(per_patient), n_bootstrap, rng)):
        if progress is not None and i % _RESAMPLES_PER_BATCH == 0:
            progress(i, n_bootstrap)
        cells = counts @ per_patient
        if cells[0] + cells[1] == 0 or cells[2] + cells[3] == 0:
            continue  # one class only: AUCs, recall or specificity are undefined
        weights = counts[codes]
        keep = weights > 0
        for name, value in _metric_values(cells, labels[keep], probs[keep], weights[keep]).items():
            samples[name].append(value)  # type: ignore[arg-type]
        used += 1
    return used


def _histograms(
    codes: np.ndarray, n_patients: int, labels: np.ndarray, probs: np.ndarray, bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-patient counts of IDC and of non-IDC patches in ``bins`` equal probability bins: two (n_patients, bins)
    float64 arrays.
    """
    which = np.minimum((probs * bins).astype(np.int64), bins - 1)
    cell = codes.astype(np.int64) * bins + which
    size = n_patients * bins
    positive = np.bincount(cell[labels == 1], minlength=size).reshape(n_patients, bins)
    negative = np.bincount(cell[labels == 0], minlength=size).reshape(n_patients, bins)
    return positive.astype(np.float64), negative.astype(np.float64)


def _ranking_from_histograms(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC and average precision of rows of pooled histograms ``(k, bins)``, patches of one bin tied (as
    sklearn scores equal probabilities): two ``(k,)`` arrays.
    """
    n_pos, n_neg = positive.sum(axis=1), negative.sum(axis=1)
    below = np.cumsum(positive, axis=1) - positive  # IDC patches in lower bins
    # A pair (IDC, non-IDC) is ranked right when the IDC patch lies higher; a tie counts one half.
    auc = (negative * (n_pos[:, None] - below - positive) + 0.5 * negative * positive).sum(axis=1) / (n_pos * n_neg)
    tp = np.cumsum(positive[:, ::-1], axis=1)  # thresholds from the top bin down
    called = tp + np.cumsum(negative[:, ::-1], axis=1)
    precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
    ap = (positive[:, ::-1] * precision).sum(axis=1) / n_pos
    return auc, ap


def _bootstrap_histograms(
    per_patient: np.ndarray,
    codes: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    n_bootstrap: int,
    rng: np.random.Generator,
    samples: dict[str, list[float]],
    progress: Progress | None = None,
) -> int:
    """:func:`_bootstrap` with the ranking metrics of each resample from per-patient histograms (see
    :data:`HISTOGRAM_BOOTSTRAP_PATCHES`), resamples taken in batches; returns how many were usable.
    """
    n_patients = len(per_patient)
    bins = int(np.clip(2**23 // n_patients, 256, HISTOGRAM_BINS))  # at most 64 MB a histogram
    positive, negative = _histograms(codes, n_patients, labels, probs, bins)
    resamples = patient_resamples(n_patients, n_bootstrap, rng)
    used = 0
    for start in range(0, n_bootstrap, _RESAMPLES_PER_BATCH):
        if progress is not None:
            progress(start, n_bootstrap)
        k = min(_RESAMPLES_PER_BATCH, n_bootstrap - start)
        counts = np.stack([next(resamples) for _ in range(k)]).astype(np.float64)
        auc, ap = _ranking_from_histograms(counts @ positive, counts @ negative)
        for row, cells in enumerate(counts.astype(np.int64) @ per_patient):
            if cells[0] + cells[1] == 0 or cells[2] + cells[3] == 0:
                continue  # one class only: AUCs, recall or specificity are undefined
            values = {**_metric_values(cells, None, None, None), "roc_auc": float(auc[row]), "pr_auc": float(ap[row])}
            for name, value in values.items():
                samples[name].append(value)  # type: ignore[arg-type]
            used += 1
    return used


def evaluate(
    preds: pd.DataFrame,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    threshold: float | None = None,
    level: float = 0.95,
    synthetic: bool | None = None,
    min_patients: int = MIN_PATIENTS_FOR_INTERVAL,
    column: str = "prob_idc",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Metrics of a predictions table with bootstrap intervals over patients.

    Args:
        preds: one row per patch with ``patient_id``, ``label`` (0/1), ``prob_idc`` (in [0, 1]) and ``pred`` (0/1).
        n_bootstrap: patient resamples for the intervals (0 = no intervals).
        seed: seed of the resampling.
        threshold: the decision threshold; predictions are ``prob_idc >= threshold``. ``None``: the threshold the
            table records (:func:`stored_threshold`, written by ``predict``), else its ``pred`` column decides.
        level: coverage of the percentile intervals.
        synthetic: whether the patches are synthetic demo data; written into the report as ``"synthetic"``.
        min_patients: fewer patients than this and the intervals are withheld (see the module docstring).
        column: the probability column scored, e.g. ``prob_idc_context`` (its decisions: :func:`pred_column`).
        progress: called as ``progress(done, total)`` with the resamples done, now and then during the bootstrap.

    Returns:
        A JSON-ready dict: ``synthetic``, ``counts`` (patches, patients, idc, non_idc, idc_fraction), ``threshold``
        (``None`` when a ``pred`` column without a recorded threshold decided), ``confusion_matrix`` (tn, fp, fn, tp), ``metrics`` (name ->
        {value, ci_low, ci_high}; ``None`` where a metric is undefined, e.g. ROC AUC with one class, and where the
        interval is withheld) and ``bootstrap`` (unit, requested, used, skipped_one_class, seed, level, and
        ``withheld``: ``None`` or the reason no interval is given). A resample is skipped when its pooled patches
        hold only one class.

    A patient drawn k times counts k times (sample weights, exactly the same as repeating its patches). Cost: about
    30 ms per resample for 80,000 patches on one CPU core, so 1000 resamples of a large test set take ~30 s; above
    :data:`HISTOGRAM_BOOTSTRAP_PATCHES` patches a resample costs about 40 ms even for 10 million patches (38 s from
    every patch; docs/input-checks.md).
    Precision and F1 follow sklearn's ``zero_division=0`` (0 when nothing is predicted IDC).
    """
    labels, probs, predicted = _labels_probs_preds(preds, threshold, column)
    threshold = stored_threshold(preds, column) if threshold is None else threshold
    patient_ids = preds["patient_id"].astype(str).to_numpy()
    codes, uniques = pd.factorize(patient_ids)
    n_patients = len(uniques)

    per_patient = _patient_cells(codes, n_patients, labels, predicted)
    cells = per_patient.sum(axis=0)
    point = _metric_values(cells, labels, probs, None)

    withheld = None
    if n_bootstrap > 0 and n_patients < min_patients:
        withheld = (
            f"only {n_patients} patient{'s' if n_patients != 1 else ''}: an interval over patients needs at "
            f"least {min_patients}, so none can be estimated"
        )
    used = 0
    samples: dict[str, list[float]] = {name: [] for name in METRIC_LABELS}
    if withheld is None:
        if len(labels) > HISTOGRAM_BOOTSTRAP_PATCHES:
            used = _bootstrap_histograms(
                per_patient, codes, labels, probs, n_bootstrap, np.random.default_rng(seed), samples, progress
            )
        else:
            used = _bootstrap_sorted(per_patient, codes, labels, probs, n_bootstrap, seed, samples, progress)
        if progress is not None:
            progress(n_bootstrap, n_bootstrap)

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
        "metrics": _with_intervals(point, samples, used, level),
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


def _with_intervals(
    point: Mapping[str, float | None], samples: Mapping[str, list[float]], used: int, level: float
) -> dict[str, dict[str, float | None]]:
    """Name -> {value, ci_low, ci_high}: percentile intervals of the resamples (``None`` without any)."""
    report: dict[str, dict[str, float | None]] = {}
    for name in METRIC_LABELS:
        low = high = None
        if used and point[name] is not None:
            low, high = _percentile_interval(samples[name], level)
        report[name] = {"value": point[name], "ci_low": low, "ci_high": high}
    return report


def _bootstrap_sorted(
    per_patient: np.ndarray,
    codes: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    n_bootstrap: int,
    seed: int,
    samples: dict[str, list[float]],
    progress: Progress | None = None,
) -> int:
    """:func:`_bootstrap` on the patches sorted by probability (same results, faster); returns the resamples used."""
    # sklearn sorts scores with a stable sort on every call; on already sorted input that is a linear pass,
    # which makes the ranking metrics of each resample about twice as fast.
    order = np.argsort(probs, kind="stable")
    rng = np.random.default_rng(seed)
    # The inputs were checked by the caller; sklearn's own checks would otherwise cost more than the metrics here.
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        return _bootstrap(per_patient, codes[order], labels[order], probs[order], n_bootstrap, rng, samples, progress)


#: Metrics :func:`paired_difference` compares.
PAIRED_METRICS = ("f1", "balanced_accuracy", "roc_auc")


def _cell_f1_bac(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IDC F1 and balanced accuracy of confusion-matrix rows ``(..., 4)`` (tn, fp, fn, tp)."""
    tn, fp, fn, tp = (cells[..., i].astype(np.float64) for i in range(4))
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        bac = (tp / (tp + fn) + tn / (tn + fp)) / 2
    return f1, bac


def paired_difference(
    base: pd.DataFrame, other: pd.DataFrame, *, n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, dict[str, float | None]]:
    """``other`` minus ``base`` for F1, balanced accuracy and ROC AUC (:data:`PAIRED_METRICS`), on the same
    patches, with a paired bootstrap interval over patients (each resample draws the same patients for both).

    ``base`` and ``other``: predictions tables of the same patches in the same order (``path`` or, without it,
    ``patient_id`` and ``label`` must match row by row), each with ``prob_idc`` and ``pred`` (its own decisions,
    e.g. at its own validation threshold). Returns name -> ``{value, ci_low, ci_high}``; the interval is ``None``
    with fewer than :data:`MIN_PATIENTS_FOR_INTERVAL` patients. A paired interval is much narrower than the
    difference of two unpaired ones, because both tables share the patients that make one fold easy or hard.
    """
    key = "path" if "path" in base.columns and "path" in other.columns else "patient_id"
    if len(base) != len(other) or not np.array_equal(
        base[key].astype(str).to_numpy(), other[key].astype(str).to_numpy()
    ):
        raise ValueError(f"paired_difference needs the same patches in the same order (column {key!r} differs)")
    labels = base["label"].to_numpy(np.int64)
    if not np.array_equal(labels, other["label"].to_numpy(np.int64)):
        raise ValueError("paired_difference: the two tables disagree on the labels")
    codes, uniques = pd.factorize(base["patient_id"].astype(str).to_numpy())
    n_patients = len(uniques)
    tables = [(t["prob_idc"].to_numpy(np.float64), t["pred"].to_numpy(np.int64)) for t in (base, other)]
    per_patient = [_patient_cells(codes, n_patients, labels, pred) for _, pred in tables]

    def scores(counts: np.ndarray | None) -> np.ndarray:
        weights = None if counts is None else counts[codes]
        out = []
        for (probs, _), cells in zip(tables, per_patient, strict=True):
            pooled = cells.sum(axis=0) if counts is None else counts @ cells
            f1, bac = _cell_f1_bac(pooled)
            keep = slice(None) if weights is None else weights > 0
            auc = skm.roc_auc_score(labels[keep], probs[keep], sample_weight=None if weights is None else weights[keep])
            out.append((float(f1), float(bac), float(auc)))
        return np.array(out[1]) - np.array(out[0])

    point = scores(None)
    samples = []
    if n_patients >= MIN_PATIENTS_FOR_INTERVAL:
        for counts in patient_resamples(n_patients, n_bootstrap, np.random.default_rng(seed)):
            drawn = labels[counts[codes] > 0]
            if drawn.min() == drawn.max():
                continue  # one class only: the metrics are undefined
            samples.append(scores(counts))
    result: dict[str, dict[str, float | None]] = {}
    for i, name in enumerate(PAIRED_METRICS):
        low = high = None
        if samples:
            low, high = _percentile_interval(np.array(samples)[:, i], level)
        result[name] = {"value": float(point[i]), "ci_low": low, "ci_high": high}
    return result


def per_patient_metrics(preds: pd.DataFrame, *, threshold: float | None = None) -> pd.DataFrame:
    """One row per patient: patient_id, n_patches, n_idc, predicted_idc, accuracy, specificity, f1, roc_auc,
    mean_prob_idc.

    ``f1`` is NaN for a patient with no IDC patch (nothing to find: its specificity, the share of its patches called
    non-IDC, is what is defined); ``specificity`` is NaN for a patient with no non-IDC patch; ``roc_auc`` is NaN
    unless the patient has both classes. Sorted by patient id.
    """
    labels, probs, predicted = _labels_probs_preds(preds, threshold)
    frame = pd.DataFrame(
        {
            "patient_id": preds["patient_id"].astype(str).to_numpy(),
            "label": labels,
            "prob": probs,
            "pred": predicted,
        }
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
    return pd.DataFrame(
        rows,
        columns=[
            "patient_id",
            "n_patches",
            "n_idc",
            "predicted_idc",
            "accuracy",
            "specificity",
            "f1",
            "roc_auc",
            "mean_prob_idc",
        ],
    )


def ranking_scores(labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray) -> dict[str, float]:
    """ROC AUC and PR AUC (average precision) of IDC probabilities ``probs`` against 0/1 ``labels`` (both ``(N,)``);
    NaN when the labels hold one class only.
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
    """F1, balanced accuracy, accuracy, precision, recall, specificity and the confusion cells (``tn, fp, fn, tp``)
    of 0/1 predictions ``pred`` against 0/1 ``labels`` (both ``(N,)``); with ``probs``, also :func:`ranking_scores`.

    Precision, recall, F1 and specificity are 0 where undefined (sklearn's ``zero_division=0``).
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
    """Mean binary cross-entropy (nats) of IDC probabilities ``probs`` against 0/1 ``labels``, probabilities clipped
    to [1e-7, 1 - 1e-7] as Keras does.
    """
    return float(skm.log_loss(labels, np.clip(np.asarray(probs), 1e-7, 1 - 1e-7), labels=[0, 1]))


def roc_points(
    labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """The ROC curve of ``probs`` against 0/1 ``labels``: false positive rates, true positive rates (both
    ``(k,)``, from (0, 0) to (1, 1)) and the area under it.
    """
    fpr, tpr, _ = skm.roc_curve(labels, probs, pos_label=1)
    return fpr, tpr, float(skm.auc(fpr, tpr))


def pr_points(
    labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """The precision-recall curve of ``probs`` against 0/1 ``labels``: precisions, recalls (both ``(k,)``,
    recall decreasing) and the average precision.
    """
    precision, recall, _ = skm.precision_recall_curve(labels, probs, pos_label=1)
    return precision, recall, float(skm.average_precision_score(labels, probs, pos_label=1))


def pick_threshold(
    labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray, criterion: str = "f1"
) -> float:
    """The decision threshold (predict IDC when ``prob >= threshold``) that maximises ``criterion`` on this data.

    Meant for the *validation* patients; never pick it on test. ``criterion`` is ``"f1"`` (F1 of the IDC class,
    from sklearn's precision-recall curve) or ``"youden"`` (max TPR - FPR from the ROC curve, which is the same as
    maximising balanced accuracy). Ties go to the lowest threshold.
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
    raise ValueError(f"unknown criterion {criterion!r}: use 'f1' or 'youden'")


def threshold_curve(
    labels: Sequence[int] | np.ndarray,
    probs: Sequence[float] | np.ndarray,
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> pd.DataFrame:
    """Precision, recall (sensitivity), specificity and F1 of the IDC class at each threshold (predict IDC when
    ``prob >= threshold``); default thresholds 0.00, 0.01, ..., 1.00. One row per threshold, in that order.

    Precision is NaN where nothing is called IDC (undefined, so a plot leaves a gap) and F1 then 0.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(probs, dtype=np.float64)
    grid = np.linspace(0.0, 1.0, 101) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
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
    return pd.DataFrame(
        {"threshold": grid, "precision": precision, "recall": recall, "specificity": specificity, "f1": f1}
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def format_report(report: Mapping[str, Any]) -> str:
    """The report of :func:`evaluate` as a plain-text table (metric, value, 95% CI) with counts and confusion matrix."""
    counts, cm, boot = report["counts"], report["confusion_matrix"], report["bootstrap"]
    level = round(boot["level"] * 100)
    lines = ["SYNTHETIC demo data: these numbers say nothing about real tissue", ""] if report.get("synthetic") else []
    if report.get("column", "prob_idc") != "prob_idc":
        lines += [
            f"Scores: {report['column']} (uses each patch's neighbours on the slide: not comparable with "
            "patch-only figures)",
            "",
        ]
    lines += [
        f"{counts['patches']:,} patches from {counts['patients']} patients; "
        f"IDC {counts['idc']:,} ({counts['idc_fraction']:.1%}), non-IDC {counts['non_idc']:,}",
        "Threshold: "
        + (
            "none recorded (the table's decisions)" if report.get("threshold") is None else f"{report['threshold']:.3f}"
        ),
        "",
    ]
    width = max(len(label) for label in METRIC_LABELS.values())
    ci_header = f"{level}% CI (patients)" + (": none, too few patients" if boot.get("withheld") else "")
    lines.append(f"{'Metric':<{width}}  {'Value':>6}  {ci_header}")
    lines.append("-" * (width + 28))
    for name, label in METRIC_LABELS.items():
        entry = report["metrics"][name]
        ci = "" if entry["ci_low"] is None else f"[{_fmt(entry['ci_low'])}, {_fmt(entry['ci_high'])}]"
        lines.append(f"{label:<{width}}  {_fmt(entry['value']):>6}  {ci}")
    if boot.get("withheld"):
        lines += ["", f"No {level}% interval: {boot['withheld']}."]
    elif boot["requested"]:
        lines += [
            "",
            f"Bootstrap: {boot['used']} of {boot['requested']} patient resamples used"
            + (f" ({boot['skipped_one_class']} had one class only)" if boot["skipped_one_class"] else ""),
        ]
    lines += [
        "",
        "Confusion matrix (rows: true, columns: predicted)",
        f"{'':>10}{'non-IDC':>10}{'IDC':>10}",
        f"{'non-IDC':>10}{cm['tn']:>10,}{cm['fp']:>10,}",
        f"{'IDC':>10}{cm['fn']:>10,}{cm['tp']:>10,}",
    ]
    return "\n".join(lines)


def comparison_table(report: Mapping[str, Any], *, model: str, test_set: str) -> pd.DataFrame:
    """The :data:`PUBLISHED` figures and this report's F1 and balanced accuracy, in percent, one row each.

    ``model`` and ``test_set`` describe this run (e.g. ``"idc_net"``, ``"4 test patients, patients split"``); a
    report of synthetic data says so in both cells, at the start, so that a narrow column cannot cut it off.
    """

    def percent(value: float | None) -> float:
        return math.nan if value is None else round(100.0 * value, 2)

    rows = [
        {
            "model": r["model"],
            "test set": r["test set"],
            "F1 (%)": percent(r["f1"]),
            "balanced accuracy (%)": percent(r["balanced_accuracy"]),
            "unseen patients": "yes" if r["patient_level"] else "no",
        }
        for r in PUBLISHED
    ]
    ours = report["metrics"]
    synthetic = bool(report.get("synthetic"))
    rows.append(
        {
            "model": ("SYNTHETIC data: " if synthetic else "this run: ") + model,
            "test set": ("SYNTHETIC, " if synthetic else "") + test_set,
            "F1 (%)": percent(ours["f1"]["value"]),
            "balanced accuracy (%)": percent(ours["balanced_accuracy"]["value"]),
            "unseen patients": "yes",
        }
    )
    return pd.DataFrame(rows)


#: Outcome names of :func:`outcomes`, by (label, pred).
OUTCOME_NAMES = {(1, 1): "true positive", (0, 1): "false positive", (1, 0): "false negative", (0, 0): "true negative"}


def outcomes(preds: pd.DataFrame) -> pd.Series:
    """Each patch's outcome ("true positive", "false positive", "false negative", "true negative") from ``label``
    and ``pred``, aligned with ``preds``.
    """
    keys = zip(preds["label"].astype(int), preds["pred"].astype(int), strict=True)
    return pd.Series([OUTCOME_NAMES[k] for k in keys], index=preds.index, name="outcome")


def confident_examples(preds: pd.DataFrame, threshold: float, *, per_outcome: int = 6) -> pd.DataFrame:
    """The ``per_outcome`` patches of each outcome farthest from ``threshold`` (the most confident ones), with an
    ``outcome`` column, in the order true positives, false positives, false negatives, true negatives.
    """
    table = preds.assign(outcome=outcomes(preds), confidence=(preds["prob_idc"] - threshold).abs())
    table = table.sort_values("confidence", ascending=False, kind="stable").groupby("outcome").head(per_outcome)
    order = {name: i for i, name in enumerate(OUTCOME_NAMES.values())}
    return table.sort_values("outcome", key=lambda s: s.map(order), kind="stable").drop(columns="confidence")
