"""Slide context: smooth each patch's IDC probability with its neighbours' on the slide.

IDC forms connected regions, and on a whole slide every patch's neighbours are known from its coordinates, so a
patch whose neighbours look like IDC is more likely IDC itself. This module averages each patch's probability with
those of the patches around it (Gaussian weights on the 50-px patch grid) and chooses the amount of smoothing and
its own decision threshold on validation patients. Figures computed from these columns use
the slide, not the patch alone: always report them apart from the patch-only figures.

API (all functions take a predictions table with at least ``patient_id, x, y, prob_idc``; ``label`` for fitting)::

    smooth_probs(table, sigma, window=None, column="prob_idc") -> np.ndarray   # (N,) float64, table's row order
    neighbour_counts(table) -> np.ndarray                # (N,) int, how many of the 8 neighbours are in the table
    whole_slide_patients(table, min_neighbours=4, min_share=0.5, min_patches=25) -> list[str]
    fit_context(val_table, sigmas=DEFAULT_SIGMAS, window=None, criterion="f1", tune_on="all",
                patch_threshold=None, ...) -> dict       # JSON-able params
    apply_context(table, params) -> DataFrame            # copy + prob_idc_context (float), pred_context (0/1),
                                                         # threshold_context (the threshold, every row)
    ContextError (UserError): no tuning patient (or one class only), bad parameters, missing columns

``fit_context`` returns e.g. ``{"method": "gaussian_grid", "version": 1, "grid_px": 50, "sigma": 2.0,
"window": 9, "threshold": 0.41, "criterion": "f1", "tuned_on": "all", "fallback": None,
"patients": [...], "n_patches": 7040, "candidates": [...], "whole_slide_rule": {...}}``; store it as it is (for
example under ``"context"`` in a run's metrics.json) and give it back to ``apply_context``. ``sigma == 0`` means
"no smoothing was better on validation": the context column is then the raw probability, at ``patch_threshold`` when
one was given (else re-chosen on the tuning patients).

How it works: per patient, the patches are placed on a dense grid (cell = 50 px) holding the probability and a
presence mask; both are convolved with the same separable Gaussian kernel (``window`` x ``window`` cells), and the
smoothed value is their ratio, so neighbours absent from the table simply don't count (a patch with no neighbour
keeps its own probability). Cost is O(grid cells x window) per patient, not O(patches^2).

Sparse patients (a thin random sample of a slide) have few direct neighbours, but a wide window still averages a
patch with other patches of its region. ``fit_context`` tunes on every validation patient by default; ``tune_on``
also offers the whole-slide validation patients alone (:func:`whole_slide_patients`) and ``"auto"``: those when
there are at least :data:`MIN_WHOLE_SLIDES`, else all. docs/results.md measures the rules against each other. When
no smoothing wins, the context decisions are the patch-only ones (``patch_threshold``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .errors import UserError
from .metrics import binary_scores, pick_threshold

#: Patch side in pixels: the Kaggle patches lie on a 50-px grid (x, y are multiples of 50 plus 1).
GRID_PX = 50

#: Smoothing widths tried by :func:`fit_context`, in patches; 0 = no smoothing.
DEFAULT_SIGMAS: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)

#: How :func:`fit_context` chooses the context threshold at each smoothing width (see there).
CONTEXT_CRITERIA: tuple[str, ...] = ("f1", "youden", "midpoint")

#: Fewest whole-slide validation patients on which :func:`fit_context` tunes with ``tune_on="auto"``; with fewer it
#: tunes on every validation patient.
MIN_WHOLE_SLIDES = 3

#: What :func:`fit_context` may tune on.
TUNE_ON_CHOICES = ("all", "auto", "whole_slides")

#: Version of the parameter dict :func:`fit_context` writes (bumped if its meaning changes).
PARAMS_VERSION = 1
_METHOD = "gaussian_grid"
_PARAM_KEYS = ("method", "version", "grid_px", "sigma", "window", "threshold")


class ContextError(UserError, ValueError):
    """Slide context cannot be fitted or applied (no whole-slide patients, bad parameters, missing columns)."""


def _check_columns(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ContextError(
            f"{what}: missing column(s) {', '.join(missing)}; slide context needs patient_id, x, y and the "
            "probabilities of a predictions table written by `python -m idc_helpers predict`."
        )


def default_window(sigma: float) -> int:
    """Window side (odd, in patches) for a Gaussian of ``sigma`` patches: covers +-2 sigma, at least 3."""
    return max(3, 2 * math.ceil(2 * sigma) + 1)


def _kernel(sigma: float, window: int) -> np.ndarray:
    """1-D Gaussian weights over ``window`` cells (centre weight 1)."""
    if window < 1 or window % 2 == 0:
        raise ContextError(f"window must be a positive odd number of patches, got {window}")
    offsets = np.arange(window) - window // 2
    return np.exp(-0.5 * (offsets / sigma) ** 2)


def _convolve_separable(grid: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``grid`` (H, W) convolved with the odd-length ``kernel`` along both axes, zeros outside (same shape)."""
    from scipy import ndimage

    rows = ndimage.convolve1d(grid, kernel, axis=1, mode="constant", cval=0.0)
    return ndimage.convolve1d(rows, kernel, axis=0, mode="constant", cval=0.0)


def _grid_cells(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Grid column and row of each patch (``x // 50``, ``y // 50``), int64."""
    return (table["x"].to_numpy(np.int64) // GRID_PX), (table["y"].to_numpy(np.int64) // GRID_PX)


def smooth_probs(table: pd.DataFrame, sigma: float, window: int | None = None, column: str = "prob_idc") -> np.ndarray:
    """Each patch's ``column`` averaged with its neighbours' on the same patient's slide.

    ``table`` is a predictions table (``patient_id``, ``x``, ``y`` in pixels, ``column`` in [0, 1]); ``sigma`` the
    Gaussian width in patches (0: no smoothing, the column itself is returned); ``window`` the side of the square
    neighbourhood in patches (odd; ``None``: :func:`default_window`). Returns ``(N,)`` float64 in the table's row
    order; neighbours absent from the table carry no weight.
    """
    _check_columns(table, ("patient_id", "x", "y", column), "table to smooth")
    probs = table[column].to_numpy(np.float64)
    if sigma < 0 or not math.isfinite(sigma):
        raise ContextError(f"sigma must be >= 0 patches, got {sigma}")
    if sigma == 0 or len(table) == 0:
        return probs.copy()
    kernel = _kernel(sigma, default_window(sigma) if window is None else int(window))
    gx, gy = _grid_cells(table)
    out = np.empty(len(table), dtype=np.float64)
    for rows in table.groupby("patient_id", sort=False).indices.values():
        cx, cy = gx[rows] - gx[rows].min(), gy[rows] - gy[rows].min()
        shape = (int(cy.max()) + 1, int(cx.max()) + 1)
        total, present = np.zeros(shape), np.zeros(shape)
        # add.at: a duplicated coordinate (the same patch listed twice) counts as often as it is listed.
        np.add.at(total, (cy, cx), probs[rows])
        np.add.at(present, (cy, cx), 1.0)
        # Only occupied cells are read: there the weight sum includes the patch itself, so it is > 0.
        out[rows] = _convolve_separable(total, kernel)[cy, cx] / _convolve_separable(present, kernel)[cy, cx]
    return out


def _neighbour_sums(table: pd.DataFrame, values: np.ndarray) -> np.ndarray:
    """Each patch's sum of ``values`` over its 8 grid neighbours on the same patient's slide: ``(N,)`` float64.

    Neighbours absent from the table add nothing; the result is in the table's row order.
    """
    gx, gy = _grid_cells(table)
    out = np.zeros(len(table), dtype=np.float64)
    ones = np.ones(3)
    for rows in table.groupby("patient_id", sort=False).indices.values():
        cx, cy = gx[rows] - gx[rows].min(), gy[rows] - gy[rows].min()
        grid = np.zeros((int(cy.max()) + 1, int(cx.max()) + 1))
        grid[cy, cx] = values[rows]
        out[rows] = _convolve_separable(grid, ones)[cy, cx] - values[rows]
    return out


def neighbour_counts(table: pd.DataFrame) -> np.ndarray:
    """How many of each patch's 8 grid neighbours (same patient) are in the table: ``(N,)`` int64 in 0..8."""
    _check_columns(table, ("patient_id", "x", "y"), "table")
    return np.rint(_neighbour_sums(table, np.ones(len(table)))).astype(np.int64)


def label_boundary(table: pd.DataFrame, column: str = "label") -> np.ndarray:
    """Which patches lie on an annotation boundary: ``(N,)`` bool in the table's row order.

    A patch is on the boundary when at least one of its 8 grid neighbours (same patient, in the table) carries the other
    label of ``column`` (0/1).

    The labels of this dataset come from regions outlined by a pathologist at low magnification, so a patch
    beside a patch of the other class is where a label is least certain; a patch without neighbours is never on
    a boundary.
    """
    _check_columns(table, ("patient_id", "x", "y", column), "table")
    labels = table[column].to_numpy(np.float64)
    if len(table) and not np.isin(labels, (0.0, 1.0)).all():
        raise ContextError(f"{column} must hold 0 or 1 for every patch to find the annotation boundaries")
    idc_neighbours = np.rint(_neighbour_sums(table, labels)).astype(np.int64)
    other = np.where(labels == 1, neighbour_counts(table) - idc_neighbours, idc_neighbours)
    return other > 0


def whole_slide_patients(
    table: pd.DataFrame, min_neighbours: int = 4, min_share: float = 0.5, min_patches: int = 25
) -> list[str]:
    """Patients whose patches form a slide, not a sparse sample.

    A slide has at least ``min_patches`` patches, and at least ``min_share`` of them with ``min_neighbours`` or more of
    their 8 neighbours present.

    On the shared data the two kinds separate clearly: whole slides have 71-99% of their patches with >= 4
    neighbours, the ~9% samples of ``idc_sparse`` at most 5%.
    """
    counts = neighbour_counts(table)
    enough = pd.Series(counts >= min_neighbours).groupby(table["patient_id"].to_numpy()).agg(["mean", "size"])
    keep = enough[(enough["mean"] >= min_share) & (enough["size"] >= min_patches)]
    return sorted(map(str, keep.index))


def _tuning_patients(
    val_table: pd.DataFrame, tune_on: str, min_whole_slides: int, rule: dict[str, Any]
) -> tuple[list[str], str | None]:
    """The validation patients ``fit_context`` tunes on, and why it fell back to all of them (or ``None``)."""
    everyone = sorted(map(str, val_table["patient_id"].unique()))
    if tune_on == "all":
        return everyone, None
    slides = whole_slide_patients(val_table, **rule)
    if tune_on == "whole_slides":
        if not slides:
            raise ContextError(
                f"none of the {len(everyone)} validation patients has a whole slide (at least "
                f"{rule['min_patches']} patches, {rule['min_share']:.0%} of them with >= {rule['min_neighbours']} "
                "of 8 neighbours), so slide context cannot be tuned on whole slides: keep some whole-slide patients "
                "(e.g. from idc_sample) for validation, or tune on all validation patients (tune_on='all')."
            )
        return slides, None
    labels = val_table.loc[val_table["patient_id"].astype(str).isin(slides), "label"].to_numpy(np.int64)
    if len(slides) >= min_whole_slides and 0 < labels.sum() < len(labels):
        return slides, None
    if len(slides) < min_whole_slides:
        why = f"{len(slides)} whole-slide validation patient(s), fewer than {min_whole_slides}"
    else:
        why = f"the {len(slides)} whole-slide validation patients hold one class only"
    return everyone, f"{why}: tuned on all {len(everyone)} validation patients"


def fit_context(
    val_table: pd.DataFrame,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    window: int | None = None,
    criterion: str = "f1",
    column: str = "prob_idc",
    tune_on: str = "all",
    patch_threshold: float | None = None,
    min_whole_slides: int = MIN_WHOLE_SLIDES,
    min_neighbours: int = 4,
    min_share: float = 0.5,
    min_patches: int = 25,
) -> dict[str, Any]:
    """Choose the smoothing width and the context threshold on validation patients.

    For every ``sigma`` the probabilities of the tuning patients are smoothed and a threshold is chosen on their
    patches under ``criterion`` (:data:`CONTEXT_CRITERIA`): ``"f1"`` or ``"youden"`` the one maximising that
    (:func:`metrics.pick_threshold`), ``"midpoint"`` halfway between those two. The ``sigma`` with the best F1
    (``"f1"``, ``"midpoint"``) at the F1 threshold, or the best balanced accuracy at the Youden one (``"youden"``),
    wins (ties: the smaller ``sigma``). Only validation patients belong here: never the patients to be evaluated.

    Which validation patients tune (``tune_on``): ``"all"`` (default) every one; ``"whole_slides"`` only those
    :func:`whole_slide_patients` accepts; ``"auto"`` the whole-slide ones when there are at least ``min_whole_slides``
    of them holding both classes, else all of them (the fallback is stated under ``"fallback"``). In
    cross-validation over the 224 shared patients (docs/results.md) the few whole-slide validation patients of a fold
    gave context thresholds that transferred no better, to whole slides or to all test patients, than all of them.

    ``patch_threshold`` (the run's patch-only threshold): when no smoothing wins (``sigma == 0``), the context
    columns are then the patch-only decisions exactly, at that threshold, instead of a re-chosen one: context adds
    nothing rather than a second threshold.

    Returns a JSON-able dict (see the module docstring) for :func:`apply_context`; ``candidates`` lists every ``sigma``
    tried with its threshold, F1, balanced accuracy and ROC AUC on the tuning patients.

    Raises :class:`ContextError` when there is no tuning patient (with ``"whole_slides"``: no whole-slide patient),
    or their patches hold one class only.
    """
    _check_columns(val_table, ("patient_id", "x", "y", "label", column), "validation table")
    if criterion not in CONTEXT_CRITERIA:
        raise ContextError(f"unknown criterion {criterion!r}: use one of {', '.join(CONTEXT_CRITERIA)}")
    if tune_on not in TUNE_ON_CHOICES:
        raise ContextError(f"unknown tune_on {tune_on!r}: use one of {', '.join(TUNE_ON_CHOICES)}")
    if patch_threshold is not None and not 0.0 <= float(patch_threshold) <= 1.0:
        raise ContextError(f"patch_threshold {patch_threshold} is not a probability in [0, 1]")
    rule = {"min_neighbours": min_neighbours, "min_share": min_share, "min_patches": min_patches}
    patients, fallback = _tuning_patients(val_table, tune_on, min_whole_slides, rule)
    tuning = val_table[val_table["patient_id"].astype(str).isin(patients)]
    labels = tuning["label"].to_numpy(np.int64)
    if not 0 < labels.sum() < len(labels):
        raise ContextError(
            f"the validation patients {', '.join(patients[:10])} hold one class only: "
            "slide context needs IDC and non-IDC patches to choose a threshold."
        )
    candidates = []
    for sigma in sorted({float(s) for s in sigmas}):
        win = default_window(sigma) if window is None else int(window)
        probs = smooth_probs(tuning, sigma, win, column)
        ranked_by = "youden" if criterion == "youden" else "f1"
        optimum = pick_threshold(labels, probs, ranked_by)
        threshold = (optimum + pick_threshold(labels, probs, "youden")) / 2 if criterion == "midpoint" else optimum
        at_optimum = binary_scores(labels, (probs >= optimum).astype(np.int64))
        scores = binary_scores(labels, (probs >= threshold).astype(np.int64), probs)
        candidates.append(
            {
                "sigma": sigma,
                "window": win if sigma > 0 else 1,
                "threshold": float(threshold),
                "f1": scores["f1"],
                "balanced_accuracy": scores["balanced_accuracy"],
                "roc_auc": scores["roc_auc"],
                # what ranks the sigmas: the F1 at the F1 threshold, or the balanced accuracy at the Youden one
                "ranking_score": at_optimum["balanced_accuracy" if ranked_by == "youden" else "f1"],
            }
        )
    best = max(candidates, key=lambda c: (c["ranking_score"], -c["sigma"]))
    threshold = best["threshold"]
    if best["sigma"] == 0 and patch_threshold is not None:
        threshold = float(patch_threshold)
    return {
        "method": _METHOD,
        "version": PARAMS_VERSION,
        "grid_px": GRID_PX,
        "sigma": best["sigma"],
        "window": best["window"],
        "threshold": threshold,
        "criterion": criterion,
        "tuned_on": "whole_slides" if fallback is None and tune_on != "all" else "all",
        "fallback": fallback,
        "patients": patients,
        "n_patches": len(tuning),
        "candidates": candidates,
        "whole_slide_rule": {**rule, "min_whole_slides": min_whole_slides},
    }


def check_params(params: Mapping[str, Any]) -> None:
    """Raise :class:`ContextError` unless ``params`` is a parameter dict written by :func:`fit_context`."""
    missing = [k for k in _PARAM_KEYS if k not in params]
    if missing:
        raise ContextError(
            f"slide-context parameters lack {', '.join(missing)}: fit them with fit_context "
            "(train stores them in the run's metrics.json)"
        )
    if params["method"] != _METHOD or params["version"] != PARAMS_VERSION or params["grid_px"] != GRID_PX:
        raise ContextError(
            f"slide-context parameters of an unknown kind ({params['method']!r} version "
            f"{params['version']}, grid {params['grid_px']} px); this version reads {_METHOD!r} "
            f"version {PARAMS_VERSION}, grid {GRID_PX} px: refit them with fit_context"
        )
    if not 0.0 <= float(params["threshold"]) <= 1.0 or float(params["sigma"]) < 0:
        raise ContextError(
            f"slide-context parameters out of range: sigma {params['sigma']}, threshold {params['threshold']}"
        )


def apply_context(table: pd.DataFrame, params: Mapping[str, Any], column: str = "prob_idc") -> pd.DataFrame:
    """A copy of ``table`` with the context columns added, from the ``params`` of :func:`fit_context`.

    The columns are ``prob_idc_context`` (float64, smoothed ``column``), ``pred_context`` (int8, ``prob_idc_context >=
    params["threshold"]``) and ``threshold_context`` (that threshold, on every row).
    """
    check_params(params)
    out = table.copy()
    out["prob_idc_context"] = smooth_probs(table, float(params["sigma"]), int(params["window"]), column)
    out["pred_context"] = (out["prob_idc_context"] >= float(params["threshold"])).astype(np.int8)
    out["threshold_context"] = float(params["threshold"])
    return out
