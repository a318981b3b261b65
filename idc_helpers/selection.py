"""What a training run chooses on its validation patients: the best epoch, the decision threshold, the slide context.

Every score comes from :mod:`idc_helpers.metrics`; this module says which scores decide. After each epoch
:func:`validation_scores` scores the validation patches and :data:`MONITOR` picks the best epoch of a run that keeps one
(``averaging="none"``: early stopping follows it too). Once training ends, :func:`choose_threshold` picks the decision
threshold (:data:`THRESHOLD_RULE`) and records the validation metrics at it, and :func:`choose_context` fits the
slide-context smoothing with its own threshold (:data:`CONTEXT_CRITERION`,
:func:`idc_helpers.slide_context.fit_context`). Test patients play no part in any of these choices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from idc_helpers import slide_context
from idc_helpers.metrics import THRESHOLD_RULES, binary_scores, log_loss, pick_threshold, ranking_scores
from idc_helpers.probabilities import predict_probs
from idc_helpers.training_data import TrainingData

if TYPE_CHECKING:  # TensorFlow is imported only when a function needs it
    import keras

# metrics.pick_threshold criterion: maximise the balanced accuracy (Youden's J) on the validation patches. Unlike the
# F1's, its optimum does not move with the share of IDC patches; measured against the F1 rule on the same predictions
# in docs/results.md (section 1), it transferred better to the test patients.
THRESHOLD_RULE = "youden"
# The slide context's width maximises the F1 on the validation patients, its threshold lies halfway between the F1
# and the Youden ones there: in the cross-validation each of those two thresholds, chosen on validation patients
# most of whom are thin samples, put context below patch only on the whole slides of some run; the midpoint in none
# (docs/results.md, section 1).
CONTEXT_CRITERION = "midpoint"
# Early stopping and the best-epoch choice follow the validation ROC AUC (threshold-free, so it does not depend on
# calibration), with the validation loss as a tie-breaker: on easy data (the demo) the AUC reaches 1.0 in the first
# epoch while the probabilities are still poor, and a bare AUC would keep that first epoch forever.
MONITOR = "val_selection"
SELECTION_LOSS_WEIGHT = 0.01  # val_selection = val_auc - 0.01 * val_loss


def validation_scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """The scores an epoch adds to the history, from the validation patches' 0/1 ``labels`` and ``probs`` ``(N,)``.

    ``val_loss``, ``val_auc``, ``val_pr_auc``, :data:`MONITOR`, and ``val_f1`` and ``val_balanced_accuracy`` at the
    threshold :data:`THRESHOLD_RULE` would pick that epoch, i.e. what the stored threshold will give.
    """
    ranking = ranking_scores(labels, probs)
    both = 0 < labels.sum() < len(labels)
    at_threshold = binary_scores(labels, probs >= (pick_threshold(labels, probs, THRESHOLD_RULE) if both else 0.5))
    scores = {
        "val_loss": log_loss(labels, probs),
        "val_auc": ranking["roc_auc"],
        "val_pr_auc": ranking["pr_auc"],
        "val_balanced_accuracy": at_threshold["balanced_accuracy"],
    }
    auc = scores["val_auc"]
    scores["val_selection"] = (auc if np.isfinite(auc) else 0.0) - SELECTION_LOSS_WEIGHT * scores["val_loss"]
    scores["val_f1"] = at_threshold["f1"]
    return scores


def validation_probs(model: keras.Model, data: TrainingData) -> np.ndarray:
    """The model's IDC probabilities of the validation patches, ``(len(data.val_idx),)`` float32."""
    return predict_probs(model, data.images, indices=data.val_idx, batch_size=512)


def choose_threshold(data: TrainingData, probs: np.ndarray) -> dict[str, Any]:
    """The threshold chosen on the validation patients' patches, and the validation metrics at it.

    ``probs`` are the validation patches' probabilities, aligned with ``data.val_idx``; the threshold follows
    :data:`THRESHOLD_RULE` (named under ``threshold_criterion``); the thresholds of both rules are stored beside it
    (``threshold_f1``, ``threshold_youden``). Test patients play no part.
    """
    y = data.labels[data.val_idx]
    threshold = pick_threshold(y, probs, THRESHOLD_RULE)
    scores = binary_scores(y, (probs >= threshold).astype(np.int64), probs)
    return {
        "threshold": threshold,
        "threshold_rule": f"{THRESHOLD_RULES[THRESHOLD_RULE][1]} ({THRESHOLD_RULE})",
        "threshold_criterion": THRESHOLD_RULE,
        **{f"threshold_{rule}": pick_threshold(y, probs, rule) for rule in THRESHOLD_RULES},
        "validation": {
            "patients": len(data.patients["val"]),
            "patches": len(y),
            "idc_patches": int(y.sum()),
            "threshold": threshold,
            # All of metrics.binary_scores, in its order, but the specificity (metrics.json has never held it).
            **{key: value for key, value in scores.items() if key != "specificity"},
        },
    }


def choose_context(data: TrainingData, probs: np.ndarray, patch_threshold: float) -> dict[str, Any]:
    """Slide-context parameters (smoothing width and their own threshold) chosen on the validation patients.

    They are what :func:`idc_helpers.slide_context.fit_context` returns under :data:`CONTEXT_CRITERION` with its
    default choice of patients (every validation patient tunes: docs/results.md measures the rules), and the
    patch-only decisions at ``patch_threshold`` when no smoothing helps there; ``{"unavailable": reason}`` when they
    cannot be chosen (e.g. the validation patches hold one class only).
    """
    rows = data.frame.iloc[data.val_idx]
    table = pd.DataFrame(
        {
            "patient_id": rows["patient_id"].astype(str).to_numpy(),
            "x": rows["x"].to_numpy(),
            "y": rows["y"].to_numpy(),
            "label": data.labels[data.val_idx],
            "prob_idc": probs.astype(np.float64),
        }
    )
    try:
        return slide_context.fit_context(table, criterion=CONTEXT_CRITERION, patch_threshold=patch_threshold)
    except slide_context.ContextError as exc:
        return {"unavailable": str(exc)}
