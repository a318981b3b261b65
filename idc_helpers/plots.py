"""Charts for the notebooks, and the one way to save a figure.

The charts: patients and classes, ROC / precision-recall curves and the confusion matrix (from the scores of
:mod:`idc_helpers.metrics`), scores against the threshold, learning curves, and per patient. Figures of patches and
Grad-CAM maps are in :mod:`idc_helpers.patch_plots`, figures of slides in :mod:`idc_helpers.slide_plots`.

Every function returns a :class:`matplotlib.figure.Figure` (drawn on ``ax`` when one is given) and changes no global
matplotlib state; ``pyplot`` is imported only when a figure is made. :func:`save_figure` writes a figure and, for
synthetic data, stamps it with a visible SYNTHETIC mark first, so that no figure of the demo data can pass for tissue.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from idc_helpers import metrics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: A predictions table (``label``, ``prob_idc``) or a ``(labels, probabilities)`` pair.
Scores = pd.DataFrame | tuple[Sequence[int], Sequence[float]]
CLASS_NAMES = ("non-IDC", "IDC")
#: The words on every figure saved from synthetic data.
SYNTHETIC_MARK = "SYNTHETIC DATA: not tissue, numbers mean nothing clinically"


def probability_text(prob: float, threshold: float | None = None) -> str:
    """Write ``prob`` with two decimals, or three where two would print it equal to ``threshold``.

    0.031 against a threshold of 0.033 must not read as "0.03, threshold 0.03".
    """
    if threshold is not None and round(prob, 2) == round(threshold, 2) and prob != threshold:
        return f"{prob:.3f}"
    return f"{prob:.2f}"


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def mark_synthetic(fig: Figure) -> Figure:
    """Stamp ``fig`` with :data:`SYNTHETIC_MARK`, and return it.

    The mark goes in red above everything (before any title it had, so the layout makes room for it) and as a large
    faint diagonal word across the figure.
    """
    existing = fig.get_suptitle()
    fig.suptitle(
        SYNTHETIC_MARK + (f"\n{existing}" if existing else ""), color="crimson", fontweight="bold", fontsize="large"
    )
    fig.text(
        0.5,
        0.5,
        "SYNTHETIC",
        ha="center",
        va="center",
        fontsize=60,
        color="crimson",
        alpha=0.15,
        rotation=25,
        fontweight="bold",
        zorder=10,
    )
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], *, synthetic: bool, dpi: int = 120) -> None:
    """Write ``fig`` to ``path`` (atomically; the format from the suffix), marked SYNTHETIC first when ``synthetic``.

    The mark then shows in the notebook too.
    """
    from idc_helpers.atomic import atomic_path

    if synthetic:
        mark_synthetic(fig)
    # The file name's suffix, not the last dot of the whole path (a folder such as ../outputs has one too).
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)


def _scores(data: Scores) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Return (labels, probabilities, 0/1 predictions or None) from a table or a pair."""
    if isinstance(data, pd.DataFrame):
        missing = [c for c in ("label", "prob_idc") if c not in data.columns]
        if missing:
            raise ValueError(f"predictions table lacks column(s) {', '.join(missing)}")
        pred = data["pred"].to_numpy().astype(int) if "pred" in data.columns else None
        return data["label"].to_numpy().astype(int), data["prob_idc"].to_numpy(dtype=float), pred
    labels, probs = data
    return np.asarray(labels).astype(int), np.asarray(probs, dtype=float), None


def _named_curves(data: Scores | Mapping[str, Scores]) -> dict[str, Scores]:
    return dict(data) if isinstance(data, Mapping) else {"": data}


def plot_roc(data: Scores | Mapping[str, Scores], *, ax: Axes | None = None, title: str = "ROC curve") -> Figure:
    """Draw ROC curve(s) with the AUC in the legend and, when a table has a ``pred`` column, its operating point.

    ``data``: a predictions table, a ``(labels, probs)`` pair, or a dict name -> either.
    """
    fig, ax = _new_axes(ax, (5.0, 5.0))
    for name, curve in _named_curves(data).items():
        labels, probs, pred = _scores(curve)
        fpr_curve, tpr_curve, auc = metrics.roc_points(labels, probs)
        (line,) = ax.plot(fpr_curve, tpr_curve, lw=2, label=f"{name or 'model'} (AUC = {auc:.2f})")
        if pred is not None:
            scores = metrics.binary_scores(labels, pred)
            tpr, fpr = scores["recall"], 1.0 - scores["specificity"]
            ax.plot(
                fpr,
                tpr,
                "o",
                color=line.get_color(),
                ms=7,
                mec="black",
                label=f"{name + ' ' if name else ''}threshold (TPR {tpr:.2f}, FPR {fpr:.2f})",
            )
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance (AUC = 0.5)")
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        aspect="equal",
        title=title,
        xlabel="False positive rate (1 - specificity)",
        ylabel="True positive rate (sensitivity)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return fig


def plot_pr(
    data: Scores | Mapping[str, Scores], *, ax: Axes | None = None, title: str = "Precision-recall curve"
) -> Figure:
    """Draw precision-recall curve(s) as steps, with the average precision and the chance level (the IDC fraction).

    Same inputs as :func:`plot_roc`.
    """
    fig, ax = _new_axes(ax, (5.0, 5.0))
    prevalence = None
    for name, curve in _named_curves(data).items():
        labels, probs, pred = _scores(curve)
        precisions, recalls, average_precision = metrics.pr_points(labels, probs)
        (line,) = ax.plot(
            recalls, precisions, lw=2, drawstyle="steps-post", label=f"{name or 'model'} (AP = {average_precision:.2f})"
        )
        if pred is not None:
            scores = metrics.binary_scores(labels, pred)
            precision, recall = scores["precision"], scores["recall"]
            ax.plot(
                recall,
                precision,
                "o",
                color=line.get_color(),
                ms=7,
                mec="black",
                label=f"{name + ' ' if name else ''}threshold (P {precision:.2f}, R {recall:.2f})",
            )
        prevalence = float(np.mean(labels))
    if prevalence is not None:
        ax.axhline(prevalence, ls="--", color="grey", lw=1, label=f"chance (IDC fraction {prevalence:.2f})")
    ax.set(
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
        aspect="equal",
        title=title,
        xlabel="Recall (sensitivity)",
        ylabel="Precision (PPV)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    return fig


def plot_confusion(
    data: Mapping[str, Any] | pd.DataFrame, *, ax: Axes | None = None, title: str = "Confusion matrix"
) -> Figure:
    """Draw the confusion matrix coloured by the share of each true class, with counts.

    ``data``: a report of :func:`idc_helpers.metrics.evaluate`, a dict with tn, fp, fn, tp, or a table with ``label``
    and ``pred``.
    """
    if isinstance(data, pd.DataFrame):
        cells = metrics.binary_scores(data["label"].astype(int), data["pred"].astype(int))["confusion_matrix"]
    else:
        cells = data.get("confusion_matrix", data)
    cm = np.array([[cells["tn"], cells["fp"]], [cells["fn"], cells["tp"]]])
    fig, ax = _new_axes(ax, (4.6, 4.0))
    totals = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, totals, out=np.zeros(cm.shape, dtype=float), where=totals > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(share):
        ax.text(
            j, i, f"{cm[i, j]:,}\n{value:.1%}", ha="center", va="center", color="white" if value > 0.5 else "#08306b"
        )
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=list(CLASS_NAMES),
        yticklabels=list(CLASS_NAMES),
        xlabel="Predicted",
        ylabel="True",
        title=title,
    )
    fig.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
    return fig


def plot_threshold_curve(
    curve: pd.DataFrame,
    *,
    chosen: float | None = None,
    current: float | None = None,
    ax: Axes | None = None,
    title: str = "Scores of the IDC class against the threshold",
) -> Figure:
    """Draw F1, balanced accuracy, precision and recall of the IDC class against the decision threshold.

    ``curve`` comes from :func:`idc_helpers.metrics.threshold_curve` (a curve without ``balanced_accuracy`` is drawn
    without it); ``chosen`` (the run's threshold) is marked on the F1 and balanced-accuracy curves with both values
    (exact when the curve was scored at it: ``extra=[chosen]``, else read between its neighbours), 0.5 is marked for
    comparison, and ``current`` (a slider's value) as a solid line.
    """
    fig, ax = _new_axes(ax, (7.2, 4.0))
    names = {"f1": "F1", "balanced_accuracy": "balanced accuracy", "precision": "precision", "recall": "recall"}
    drawn = [name for name in names if name in curve]
    for name, style in zip(drawn, ("-", "-", "--", ":"), strict=False):
        ax.plot(curve["threshold"], curve[name], style, lw=2 if style == "-" else 1.5, label=names[name])
    ax.axvline(0.5, color="grey", lw=1, ls="-.", label="0.5")
    if chosen is not None:
        at = np.isclose(curve["threshold"], chosen, rtol=0, atol=1e-12)
        marked = [name for name in ("f1", "balanced_accuracy") if name in curve]
        values = [
            float(curve[name][at].iloc[0]) if at.any() else float(np.interp(chosen, curve["threshold"], curve[name]))
            for name in marked
        ]
        label = f"chosen {chosen:.2f}: " + ", ".join(f"{names[n]} {v:.2f}" for n, v in zip(marked, values, strict=True))
        ax.plot([chosen] * len(values), values, "o", color="crimson", ms=8, zorder=5, label=label)
    if current is not None:
        ax.axvline(current, color="black", lw=1.5, label=f"now {current:.2f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="threshold (IDC when p(IDC) >= threshold)", ylabel="score", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))  # beside: the curves fill the box
    return fig


def plot_patients_and_classes(patients: pd.DataFrame) -> Figure:
    """Draw the patches per patient (stacked IDC / non-IDC, sorted) and a histogram of the patients' IDC shares.

    ``patients`` comes from :func:`idc_helpers.patch_index.patient_table`.
    """
    import matplotlib.pyplot as plt

    ordered = patients.sort_values("n_patches", ascending=False).reset_index(drop=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    left.bar(ordered.index, ordered["n_non_idc"], width=1.0, color="tab:blue", label="non-IDC")
    left.bar(ordered.index, ordered["n_idc"], bottom=ordered["n_non_idc"], width=1.0, color="tab:red", label="IDC")
    left.set(xlabel="patients, sorted by number of patches", ylabel="patches", title="Patches per patient")
    left.legend()
    right.hist(patients["idc_fraction"], bins=20, range=(0, 1), color="tab:red", edgecolor="white")
    right.set(xlabel="IDC share of the patient's patches", ylabel="patients", title="How much of each slide is IDC")
    right.yaxis.get_major_locator().set_params(integer=True)
    return fig


def _best_epoch(history: Mapping[str, Sequence[float]], monitor: str) -> int | None:
    values = np.asarray(history.get(monitor, []), dtype=float)
    if not len(values) or np.isnan(values).all():
        return None
    return int(np.nanargmin(values) if "loss" in monitor else np.nanargmax(values)) + 1


def selection_rule(history: Mapping[str, Sequence[float]], monitor: str) -> str:
    """Say in words the rule that picked the kept epoch, from the ``monitor`` a run stores and its history.

    For ``val_selection`` the weight of the loss is read off the history itself (``val_auc - val_selection`` over
    ``val_loss``), so the words say what the run did, not what the code says today.
    """
    if monitor == "val_selection" and all(k in history for k in ("val_auc", "val_loss", "val_selection")):
        auc, loss, sel = (np.asarray(history[k], dtype=float) for k in ("val_auc", "val_loss", "val_selection"))
        ok = np.isfinite(auc) & (loss > 0)
        if ok.any():
            weight = float(np.median((auc[ok] - sel[ok]) / loss[ok]))
            return f"highest validation ROC AUC - {weight:.3g} x validation loss"
    words = {
        "val_auc": "highest validation ROC AUC",
        "val_loss": "lowest validation loss",
        "val_f1": "highest validation F1",
        "val_pr_auc": "highest validation PR AUC",
    }
    return words.get(monitor, ("lowest " if "loss" in monitor else "highest ") + monitor.replace("_", " "))


def plot_history(
    history: Mapping[str, Sequence[float]],
    *,
    monitor: str = "val_loss",
    best_epoch: int | None = None,
    averaged: bool = False,
) -> Figure:
    """Draw the learning curves: the loss, and the validation scores that chose the kept epoch.

    The training loss is drawn beside the validation loss; the kept epoch is marked and the rule that chose it named
    in plain words (:func:`selection_rule`).

    ``history``: ``history.json`` of a run or Keras ``History.history`` (name -> one value per epoch). ``monitor``:
    the name the run selected on (``config.json``'s ``monitor``); ``best_epoch`` (1-based, ``metrics.json``): the
    kept epoch; default: the best ``monitor`` value. ``averaged``: the run kept the moving average of its weights
    (``train(averaging="ema")``), not one epoch: no epoch is marked, and the title says so. The validation F1 is
    each epoch's F1 at the threshold chosen on the validation patients that epoch (``val_f1``), which is how the kept
    model is used. Accuracy is left out on
    purpose: training accuracy is measured on augmented, class-weighted batches, and any validation accuracy at a
    fixed 0.5 says little about a model whose threshold is chosen elsewhere.
    """
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[tuple[str, str]]]] = [
        ("loss", [("loss", "training (augmented, class-weighted)"), ("val_loss", "validation")]),
        (
            "validation patients: each epoch's own weights"
            if averaged
            else "validation patients: what picks the epoch",
            [
                ("val_auc", "ROC AUC"),
                (monitor, monitor if averaged else f"{monitor} (selects)"),
                ("val_f1", "F1 at that epoch's threshold"),
            ],
        ),
    ]
    panels = [
        (t, list({k: lab for k, lab in curves if k in history and not (t != "loss" and k == "val_loss")}.items()))
        for t, curves in panels
    ]
    panels = [(t, curves) for t, curves in panels if curves]
    if not panels:
        raise ValueError("history has no metric to plot")
    best = None if averaged else best_epoch or _best_epoch(history, monitor)
    rule = selection_rule(history, monitor)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), layout="constrained", squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels, strict=False):
        for (key, label), style in zip(curves, ("o-", "s-", "^-"), strict=False):
            values = np.asarray(history[key], dtype=float)
            ax.plot(np.arange(1, len(values) + 1), values, style, ms=4, label=label)
        if best is not None:
            ax.axvline(best, color="grey", ls=":", lw=1.5, label=f"kept: epoch {best}")
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if averaged:
        epochs = len(next(iter(history.values()), []))
        fig.suptitle(
            f"Kept: the moving average of the weights over all {epochs} epochs, not one epoch", fontsize="medium"
        )
    elif best is not None:
        fig.suptitle(f"Kept epoch {best}: the one with the {rule}", fontsize="medium")
    return fig


def plot_per_patient(table: pd.DataFrame, *, metric: str = "f1") -> Figure:
    """Draw every patient of :func:`idc_helpers.metrics.per_patient_metrics`, with what is defined for it.

    Left: true vs predicted IDC share per patient (on the diagonal = the right amount of IDC found). Right: the IDC
    F1 of each patient with IDC, and, for a patient with no IDC (no F1: nothing to find), its specificity (share of
    its patches rightly called non-IDC), drawn in grey and labelled "no IDC".
    """
    import matplotlib.pyplot as plt

    name = "F1" if metric == "f1" else metric.replace("_", " ")  # short: it labels every bar
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.3 * len(table) + 1.5)), layout="constrained")
    has_idc = table["n_idc"] > 0
    true_share, pred_share = table["n_idc"] / table["n_patches"], table["predicted_idc"] / table["n_patches"]
    sizes = 15 + 80 * table["n_patches"] / table["n_patches"].max()
    points = left.scatter(
        true_share[has_idc],
        pred_share[has_idc],
        s=sizes[has_idc],
        c=table.loc[has_idc, metric],
        cmap="viridis",
        vmin=0,
        vmax=1,
        edgecolor="black",
        lw=0.5,
        label=f"with IDC (colour: {name})",
    )
    if (~has_idc).any():
        left.scatter(
            true_share[~has_idc],
            pred_share[~has_idc],
            s=sizes[~has_idc],
            facecolor="none",
            edgecolor="dimgrey",
            lw=1.2,
            marker="D",
            label="no IDC",
        )
    left.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    left.set(
        xlim=(-0.03, 1.03),
        ylim=(-0.03, 1.03),
        aspect="equal",
        xlabel="true IDC share of patches",
        ylabel="predicted IDC share of patches",
        title="IDC share per patient (size = patches)",
    )
    left.legend(loc="upper left", fontsize="small")
    fig.colorbar(points, ax=left, label=name, shrink=0.8)

    value = table[metric].where(has_idc, table["specificity"])
    order = np.argsort(value.fillna(-1).to_numpy(), kind="stable")
    ordered, shown, idc = table.iloc[order], value.iloc[order], has_idc.iloc[order]
    positions = np.arange(len(ordered))
    right.barh(
        positions,
        shown.fillna(0),
        color=np.where(idc, "tab:blue", "lightgrey"),
        edgecolor=np.where(idc, "tab:blue", "dimgrey"),
        hatch=None,
    )
    for y, v, with_idc in zip(positions, shown, idc, strict=True):
        text = f"{name} {v:.2f}" if with_idc else f"no IDC: specificity {v:.2f}"
        right.text(0.01, y, "n/a" if np.isnan(v) else text, va="center", fontsize="small")
    right.set_yticks(positions, [f"patient {p}" for p in ordered["patient_id"].astype(str)], fontsize="small")
    right.set(
        xlim=(0, 1),
        xlabel=f"{name} (patients with IDC) or specificity (patients without)",
        title=f"Every test patient ({len(table)})",
    )
    right.grid(axis="x", alpha=0.3)
    return fig
