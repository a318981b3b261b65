"""Figures for the notebooks: ROC and precision-recall curves, confusion matrix, training history, per patient, Grad-CAM.

Every function returns a :class:`matplotlib.figure.Figure` (drawn on ``ax`` when one is given) and changes no global
matplotlib state; ``pyplot`` is imported only when a figure is made.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

import numpy as np
import pandas as pd
from sklearn import metrics as skm

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: A predictions table (``label``, ``prob_idc``) or a ``(labels, probabilities)`` pair.
Scores = Union[pd.DataFrame, tuple[Sequence[int], Sequence[float]]]
CLASS_NAMES = ("non-IDC", "IDC")


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def _scores(data: Scores) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(labels, probabilities, 0/1 predictions or None) from a table or a pair."""
    if isinstance(data, pd.DataFrame):
        missing = [c for c in ("label", "prob_idc") if c not in data.columns]
        if missing:
            raise ValueError(f"predictions table lacks column(s) {', '.join(missing)}")
        pred = data["pred"].to_numpy().astype(int) if "pred" in data.columns else None
        return data["label"].to_numpy().astype(int), data["prob_idc"].to_numpy(dtype=float), pred
    labels, probs = data
    return np.asarray(labels).astype(int), np.asarray(probs, dtype=float), None


def _named_curves(data: Scores | Mapping[str, Scores]) -> dict[str, Scores]:
    if isinstance(data, Mapping):
        return dict(data)
    return {"": data}


def plot_roc(data: Scores | Mapping[str, Scores], *, ax: Axes | None = None, title: str = "ROC curve") -> Figure:
    """ROC curve(s) with the AUC in the legend.

    ``data``: a predictions table, a ``(labels, probs)`` pair, or a dict name -> either (one curve each, e.g. to
    compare models). When a table has a ``pred`` column its operating point is marked.
    """
    fig, ax = _new_axes(ax, (5.0, 5.0))
    for name, curve in _named_curves(data).items():
        labels, probs, pred = _scores(curve)
        fpr, tpr, _ = skm.roc_curve(labels, probs)
        auc = skm.roc_auc_score(labels, probs)
        (line,) = ax.plot(fpr, tpr, lw=2, label=f"{name + ': ' if name else ''}AUC = {auc:.3f}")
        if pred is not None:
            point_tpr = skm.recall_score(labels, pred, zero_division=0)
            point_fpr = 1.0 - skm.recall_score(labels, pred, pos_label=0, zero_division=0)
            ax.plot(point_fpr, point_tpr, "o", color=line.get_color(), ms=7, mec="black",
                    label=f"{name + ' ' if name else ''}threshold (TPR {point_tpr:.2f}, FPR {point_fpr:.2f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance (AUC = 0.5)")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", title=title,
           xlabel="False positive rate (1 - specificity)", ylabel="True positive rate (sensitivity)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return fig


def plot_pr(data: Scores | Mapping[str, Scores], *, ax: Axes | None = None,
            title: str = "Precision-recall curve") -> Figure:
    """Precision-recall curve(s) with the average precision (PR AUC) in the legend and the chance level.

    Same inputs as :func:`plot_roc`. The chance level is the IDC fraction: with ~28 % IDC patches, PR curves show
    the cost of false positives more plainly than ROC curves.
    """
    fig, ax = _new_axes(ax, (5.0, 5.0))
    prevalence = None
    for name, curve in _named_curves(data).items():
        labels, probs, pred = _scores(curve)
        precision, recall, _ = skm.precision_recall_curve(labels, probs)
        ap = skm.average_precision_score(labels, probs)
        (line,) = ax.plot(recall, precision, lw=2, drawstyle="steps-post",
                          label=f"{name + ': ' if name else ''}AP = {ap:.3f}")
        if pred is not None:
            point_p = skm.precision_score(labels, pred, zero_division=0)
            point_r = skm.recall_score(labels, pred, zero_division=0)
            ax.plot(point_r, point_p, "o", color=line.get_color(), ms=7, mec="black",
                    label=f"{name + ' ' if name else ''}threshold (P {point_p:.2f}, R {point_r:.2f})")
        prevalence = float(np.mean(labels))
    if prevalence is not None:
        ax.axhline(prevalence, ls="--", color="grey", lw=1, label=f"chance (IDC fraction {prevalence:.2f})")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", title=title,
           xlabel="Recall (sensitivity)", ylabel="Precision (PPV)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    return fig


def plot_confusion(data: Mapping[str, Any] | pd.DataFrame, *, ax: Axes | None = None,
                   title: str = "Confusion matrix") -> Figure:
    """Confusion matrix with counts and row percentages (share of each true class).

    ``data``: a report from :func:`idc_helpers.metrics.evaluate` (its ``confusion_matrix``), a dict with
    tn, fp, fn, tp, or a predictions table with ``label`` and ``pred``.
    """
    if isinstance(data, pd.DataFrame):
        cm = skm.confusion_matrix(data["label"].astype(int), data["pred"].astype(int), labels=[0, 1])
    else:
        cells = data.get("confusion_matrix", data)
        cm = np.array([[cells["tn"], cells["fp"]], [cells["fn"], cells["tp"]]])
    fig, ax = _new_axes(ax, (4.6, 4.0))
    row_totals = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, row_totals, out=np.zeros(cm.shape, dtype=float), where=row_totals > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{cm[i, j]:,}\n{share[i, j]:.1%}", ha="center", va="center", fontsize=11,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASS_NAMES, yticklabels=CLASS_NAMES,
           xlabel="Predicted", ylabel="True", title=title)
    fig.colorbar(image, ax=ax, label="share of true class", shrink=0.8)
    return fig


def plot_history(history: Mapping[str, Sequence[float]], *, metrics: Sequence[str] | None = None,
                 monitor: str = "val_loss") -> Figure:
    """Training curves: one panel per metric, training and validation together, epochs from 1.

    ``history``: Keras ``History.history`` or ``history.json`` (name -> one value per epoch). ``metrics``: which
    ones (default: every name without a ``val_`` prefix). The best epoch by ``monitor`` is marked when present.
    """
    import matplotlib.pyplot as plt

    names = list(metrics) if metrics is not None else [
        k for k in history if not k.startswith("val_") and k not in ("learning_rate", "lr")]
    if not names:
        raise ValueError("history has no metric to plot")
    n_cols = min(len(names), 3)
    n_rows = math.ceil(len(names) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.2 * n_rows), layout="constrained",
                             squeeze=False)
    best = None
    if monitor in history and len(history[monitor]):
        values = np.asarray(history[monitor], dtype=float)
        best = int(np.nanargmax(values) if "loss" not in monitor else np.nanargmin(values)) + 1
    for ax, name in zip(axes.flat, names):
        train = np.asarray(history[name], dtype=float)
        epochs = np.arange(1, len(train) + 1)
        ax.plot(epochs, train, "o-", ms=3, label="training")
        if f"val_{name}" in history:
            ax.plot(epochs, np.asarray(history[f"val_{name}"], dtype=float), "s-", ms=3, label="validation")
        if best is not None:
            ax.axvline(best, color="grey", ls=":", lw=1, label=f"best epoch ({best}, {monitor})")
        ax.set(title=name.replace("_", " "), xlabel="epoch", ylabel=name.replace("_", " "))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    return fig


def plot_per_patient(table: pd.DataFrame, *, metric: str = "f1") -> Figure:
    """Per-patient view from :func:`idc_helpers.metrics.per_patient_metrics`.

    Left: true vs predicted IDC share per patient (points on the diagonal = right amount of IDC found).
    Right: ``metric`` per patient, sorted, so that the weak patients stand out.
    """
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.22 * len(table) + 1.2)), layout="constrained")
    true_share = table["n_idc"] / table["n_patches"]
    pred_share = table["predicted_idc"] / table["n_patches"]
    points = left.scatter(true_share, pred_share, s=12 + 60 * table["n_patches"] / table["n_patches"].max(),
                          c=table[metric], cmap="viridis", vmin=0, vmax=1, edgecolor="black", lw=0.5)
    left.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    left.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal", xlabel="true IDC share of patches",
             ylabel="predicted IDC share of patches", title="IDC share per patient (size = patches)")
    fig.colorbar(points, ax=left, label=metric, shrink=0.8)
    ordered = table.sort_values(metric, na_position="first")
    positions = np.arange(len(ordered))
    right.barh(positions, ordered[metric].fillna(0), color="tab:blue")
    right.set_yticks(positions, ordered["patient_id"].astype(str), fontsize="small")
    right.set(xlim=(0, 1), xlabel=metric, ylabel="patient", title=f"{metric} per patient (n/a drawn as 0)")
    right.grid(axis="x", alpha=0.3)
    return fig


def plot_gradcam(images: np.ndarray, heatmaps: np.ndarray, *, titles: Sequence[str] | None = None,
                 alpha: float = 0.4, n_cols: int = 6) -> Figure:
    """Grid of patches (top) and their Grad-CAM overlays (below), for ``(N, 50, 50, 3)`` uint8 and ``(N, 50, 50)`` maps."""
    import matplotlib.pyplot as plt

    from idc_helpers.gradcam import overlay

    n = len(images)
    n_cols = max(1, min(n_cols, n))
    n_rows = math.ceil(n / n_cols)
    fig, axes = plt.subplots(2 * n_rows, n_cols, figsize=(1.9 * n_cols, 2.0 * 2 * n_rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        row, col = 2 * (i // n_cols), i % n_cols
        axes[row, col].imshow(images[i])
        axes[row, col].set_title(titles[i] if titles is not None else f"patch {i}", fontsize="small")
        axes[row + 1, col].imshow(overlay(images[i], heatmaps[i], alpha=alpha))
        axes[row + 1, col].set_title("Grad-CAM", fontsize="small")
    return fig
