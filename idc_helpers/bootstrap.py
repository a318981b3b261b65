"""The bootstrap over patients: resamples of a test set's patients, and percentile intervals of what they score.

Patches of one patient are strongly correlated, so resampling patches would give intervals that are far too narrow;
each resample here draws *patients* with replacement, and a patient drawn k times counts k times. With fewer than
:data:`MIN_PATIENTS_FOR_INTERVAL` patients no interval is given: a resample of 2 or 3 patients can only recombine the
same few slides, and its spread says nothing about a new patient.

:func:`bootstrap_patients` is the one resampling loop; what each resample scores is the caller's
(:func:`idc_helpers.metrics.evaluate`, :func:`idc_helpers.metrics.paired_difference`, with scikit-learn). What
follows from pooled counts alone is computed here with numpy: per-patient confusion cells, F1 and balanced accuracy
from them (:func:`cell_f1_bac`), and, for large tables, ROC AUC and average precision from per-patient histograms
of the probabilities (:class:`HistogramRanking`). This module imports nothing of the package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

#: Fewest patients for which an interval "over patients" is given.
MIN_PATIENTS_FOR_INTERVAL = 5

#: Patches above which :func:`idc_helpers.metrics.evaluate` computes each resample's ROC and PR AUC from per-patient
#: histograms of the probabilities (:class:`HistogramRanking`, at most :data:`HISTOGRAM_BINS` equal bins in [0, 1])
#: instead of from every patch: a resample then costs about the same for ten million patches as for a hundred
#: thousand. Patches in one bin count as tied, which moves the intervals' ends by less than 0.001 (tested), far less
#: than their width; the point values stay exact.
HISTOGRAM_BOOTSTRAP_PATCHES = 100_000
HISTOGRAM_BINS = 16_384

#: Resamples drawn and scored together by :func:`bootstrap_patients` (and between two calls of its ``progress``).
RESAMPLES_PER_BATCH = 64

#: ``progress(done, total)``: what a long bootstrap calls now and then with the resamples done.
Progress = Callable[[int, int], None]


def withheld(n_patients: int, n_bootstrap: int, min_patients: int = MIN_PATIENTS_FOR_INTERVAL) -> str | None:
    """Say why no interval over ``n_patients`` patients is given, or return ``None`` when one can be (or none is asked).

    Fewer than ``min_patients`` patients (default :data:`MIN_PATIENTS_FOR_INTERVAL`) give no interval.
    """
    if n_bootstrap > 0 and n_patients < min_patients:
        return (
            f"only {n_patients} patient{'s' if n_patients != 1 else ''}: an interval over patients needs at "
            f"least {min_patients}, so none can be estimated"
        )
    return None


def patient_resamples(n_patients: int, n_bootstrap: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Yield how often each patient is drawn, ``n_bootstrap`` times, when ``n_patients`` are drawn with replacement.

    Each item is a ``(n_patients,)`` int64 array summing to ``n_patients``. A paired bootstrap applies each array to
    both tables.
    """
    for _ in range(n_bootstrap):
        yield np.bincount(rng.integers(0, n_patients, size=n_patients), minlength=n_patients)


def patient_cells(codes: np.ndarray, n_patients: int, labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Count each patient's confusion-matrix cells: a ``(n_patients, 4)`` int64 array in tn, fp, fn, tp order.

    ``codes`` are the patches' patient numbers (0 to ``n_patients - 1``), ``labels`` and ``predicted`` their 0/1
    truth and decisions, all ``(N,)``.
    """
    cell = 2 * labels + predicted  # 0=tn, 1=fp, 2=fn, 3=tp
    return np.bincount(codes * 4 + cell, minlength=n_patients * 4).reshape(n_patients, 4)


def cell_f1_bac(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compute the IDC F1 and the balanced accuracy of confusion-matrix rows ``(..., 4)`` (tn, fp, fn, tp).

    F1 is 0 where nothing is IDC on either side (as sklearn's ``zero_division=0``); balanced accuracy is NaN where
    a class is absent.
    """
    tn, fp, fn, tp = (cells[..., i].astype(np.float64) for i in range(4))
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        bac = (tp / (tp + fn) + tn / (tn + fp)) / 2
    return f1, bac


def _percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """Return the central ``level`` percentile interval ``(low, high)`` of bootstrap ``samples``."""
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = (float(v) for v in np.percentile(samples, [tail, 100.0 - tail]))
    return low, high


def with_intervals(
    names: Sequence[str], values: Sequence[float | None], samples: np.ndarray, level: float
) -> dict[str, dict[str, float | None]]:
    """Pair each point value with the central ``level`` percentile interval of its bootstrap samples.

    ``values`` and the columns of ``samples`` (``(used, m)``, as :func:`bootstrap_patients` returns them) follow
    ``names``. Returns name -> ``{value, ci_low, ci_high}``; the interval is ``None`` without any sample or where
    the value is ``None`` (undefined).
    """
    report: dict[str, dict[str, float | None]] = {}
    for i, (name, value) in enumerate(zip(names, values, strict=True)):
        low = high = None
        if len(samples) and value is not None:
            low, high = _percentile_interval(samples[:, i], level)
        report[name] = {"value": value, "ci_low": low, "ci_high": high}
    return report


def bootstrap_patients(
    cells: np.ndarray,
    n_bootstrap: int,
    seed: int,
    statistic: Callable[[np.ndarray], np.ndarray],
    progress: Progress | None = None,
) -> np.ndarray:
    """Score ``n_bootstrap`` resamples of the patients with ``statistic``: a ``(used, m)`` float64 array.

    ``cells`` are the per-patient confusion cells (:func:`patient_cells`, ``(n_patients, 4)``); a resample whose
    pooled patches hold one class only is skipped (AUCs, recall or specificity are undefined there), so ``used``
    may be less than ``n_bootstrap``. ``statistic`` gets a ``(k, n_patients)`` int64 array, how often each patient
    is drawn in each of ``k`` usable resamples, and returns ``(k, m)`` values. Resamples come from
    :func:`patient_resamples` seeded with ``seed``, :data:`RESAMPLES_PER_BATCH` at a time; ``progress(done, total)``
    is called before each batch and once at the end.
    """
    resamples = patient_resamples(len(cells), n_bootstrap, np.random.default_rng(seed))
    scored = []
    for start in range(0, n_bootstrap, RESAMPLES_PER_BATCH):
        if progress is not None:
            progress(start, n_bootstrap)
        counts = np.stack([next(resamples) for _ in range(min(RESAMPLES_PER_BATCH, n_bootstrap - start))])
        pooled = counts @ cells
        both = (pooled[:, 0] + pooled[:, 1] > 0) & (pooled[:, 2] + pooled[:, 3] > 0)
        if both.any():
            scored.append(np.asarray(statistic(counts[both]), dtype=np.float64))
    if progress is not None:
        progress(n_bootstrap, n_bootstrap)
    return np.concatenate(scored) if scored else np.empty((0, 0))


class HistogramRanking:
    """ROC AUC and average precision of patient resamples from per-patient histograms of the probabilities.

    Built once from the patches (``codes``: patient numbers, ``labels``: 0/1, ``probs``: IDC probabilities in
    [0, 1], all ``(N,)``) with up to :data:`HISTOGRAM_BINS` equal bins (at most 64 MB a histogram); calling it with
    ``(k, n_patients)`` draw counts gives two ``(k,)`` arrays, the AUCs and the average precisions, patches of one
    bin tied (as sklearn scores equal probabilities).
    """

    def __init__(self, codes: np.ndarray, n_patients: int, labels: np.ndarray, probs: np.ndarray) -> None:
        bins = int(np.clip(2**23 // n_patients, 256, HISTOGRAM_BINS))
        which = np.minimum((probs * bins).astype(np.int64), bins - 1)
        cell = codes.astype(np.int64) * bins + which
        size = n_patients * bins
        positive = np.bincount(cell[labels == 1], minlength=size).reshape(n_patients, bins)
        negative = np.bincount(cell[labels == 0], minlength=size).reshape(n_patients, bins)
        self.positive, self.negative = positive.astype(np.float64), negative.astype(np.float64)

    def __call__(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the ROC AUCs and average precisions of the resamples ``counts`` (``(k, n_patients)``)."""
        weights = counts.astype(np.float64)
        positive, negative = weights @ self.positive, weights @ self.negative
        n_pos, n_neg = positive.sum(axis=1), negative.sum(axis=1)
        below = np.cumsum(positive, axis=1) - positive  # IDC patches in lower bins
        # A pair (IDC, non-IDC) is ranked right when the IDC patch lies higher; a tie counts one half.
        right = negative * (n_pos[:, None] - below - positive) + 0.5 * negative * positive
        auc = right.sum(axis=1) / (n_pos * n_neg)
        tp = np.cumsum(positive[:, ::-1], axis=1)  # thresholds from the top bin down
        called = tp + np.cumsum(negative[:, ::-1], axis=1)
        precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
        ap = (positive[:, ::-1] * precision).sum(axis=1) / n_pos
        return auc, ap
