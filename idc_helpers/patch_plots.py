"""Figures of patches: a grid of patches, and Grad-CAM overlays beside the patches they explain.

Like :mod:`idc_helpers.plots` (which saves them, marked SYNTHETIC for demo data), every function returns a
:class:`matplotlib.figure.Figure` and changes no global matplotlib state; ``pyplot`` is imported only when a figure
is made. Images are ``(N, 50, 50, 3)`` uint8 RGB, Grad-CAM maps ``(N, 50, 50)`` from
:func:`idc_helpers.gradcam.gradcam`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from idc_helpers.gradcam import overlay
from idc_helpers.plots import probability_text
from idc_helpers.reporting import OUTCOME_NAMES

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plot_patches(
    images: Sequence[np.ndarray] | np.ndarray,
    titles: Sequence[str] | None = None,
    *,
    n_cols: int = 8,
    title: str | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> Figure:
    """Draw a grid of ``(50, 50, 3)`` uint8 patches with one small title each.

    ``sizes``: each patch's size in its file, ``(width, height)`` in pixels; where it is smaller than 50x50, the
    padding the loader added is hatched and the file's own edge drawn as a dashed line, so that a reader sees where
    the tissue ends and the padding starts.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(images)
    n_cols = max(1, min(n_cols, n))
    n_rows = max(1, math.ceil(n / n_cols))
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(1.5 * n_cols, 1.7 * n_rows + 0.5), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[n:]:
        ax.axis("off")
    for i, (ax, image) in enumerate(zip(axes.flat, images, strict=False)):
        ax.imshow(image, extent=(0, image.shape[1], image.shape[0], 0))
        # A thin frame shows the whole 50x50 input, so that white padding reads as part of the patch.
        ax.set(xticks=[], yticks=[])
        for spine in ax.spines.values():
            spine.set_color("grey")
        if sizes is not None:
            width, height = (int(v) for v in sizes[i])
            full_w, full_h = image.shape[1], image.shape[0]
            for x, y, w, h in ((width, 0, full_w - width, full_h), (0, height, width, full_h - height)):
                if w > 0 and h > 0:
                    ax.add_patch(Rectangle((x, y), w, h, fill=False, hatch="///", edgecolor="silver", lw=0))
            if (width, height) != (full_w, full_h):
                ax.add_patch(Rectangle((0, 0), width, height, fill=False, edgecolor="tab:blue", ls="--", lw=1.5))
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def _gradcam_grid(
    images: np.ndarray,
    heatmaps: np.ndarray,
    titles: Sequence[str],
    row_labels: Sequence[str],
    rows: Sequence[Sequence[int]],
    n_cols: int,
    alpha: float,
) -> Figure:
    """Draw patches above their Grad-CAM overlays, one pair of rows per group, on one colour scale with a colour bar."""
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    vmax = float(np.max(heatmaps)) if len(heatmaps) and np.max(heatmaps) > 0 else 1.0
    fig, axes = plt.subplots(
        2 * len(rows), n_cols, figsize=(1.9 * n_cols + 1.2, 2.1 * 2 * len(rows)), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.axis("off")
    for r, (members, label) in enumerate(zip(rows, row_labels, strict=True)):
        for c, i in enumerate(members[:n_cols]):
            axes[2 * r, c].imshow(images[i])
            axes[2 * r, c].set_title(titles[i], fontsize="small")
            axes[2 * r + 1, c].imshow(overlay(images[i], heatmaps[i], alpha=alpha, vmax=vmax))
            axes[2 * r + 1, c].set_title(f"peak {heatmaps[i].max() / vmax:.0%}", fontsize="small")
        axes[2 * r, 0].text(
            -0.15,
            0.5,
            label,
            transform=axes[2 * r, 0].transAxes,
            rotation=90,
            ha="right",
            va="center",
            fontsize="medium",
            fontweight="bold",
        )
    bar = fig.colorbar(
        ScalarMappable(Normalize(0, 1), "jet"),
        ax=axes[:, -1].tolist(),
        shrink=0.6,
        label="evidence for IDC, share of the figure's largest",
    )
    bar.set_ticks([0, 0.5, 1], labels=["none", "half", "largest"])
    return fig


def plot_gradcam(
    images: np.ndarray,
    heatmaps: np.ndarray,
    *,
    titles: Sequence[str] | None = None,
    alpha: float = 0.4,
    n_cols: int = 6,
) -> Figure:
    """Draw patches (top) and their Grad-CAM overlays (below), every map on one colour scale.

    ``images`` are ``(N, 50, 50, 3)`` uint8, ``heatmaps`` ``(N, 50, 50)`` maps from
    :func:`idc_helpers.gradcam.gradcam`; the scale's top is the largest value in the figure.
    """
    n = len(images)
    n_cols = max(1, min(n_cols, n))
    rows = [list(range(b, min(b + n_cols, n))) for b in range(0, n, n_cols)]
    titles = list(titles) if titles is not None else [f"patch {i}" for i in range(n)]
    return _gradcam_grid(np.asarray(images), np.asarray(heatmaps), titles, [""] * len(rows), rows, n_cols, alpha)


def plot_gradcam_outcomes(
    examples: pd.DataFrame,
    images: np.ndarray,
    heatmaps: np.ndarray,
    *,
    alpha: float = 0.4,
    threshold: float | None = None,
) -> Figure:
    """Draw the Grad-CAM of example patches grouped by outcome (rows: true/false positives/negatives), on one scale.

    ``examples``: rows of :func:`idc_helpers.reporting.confident_examples` (``outcome``, ``prob_idc``, ``patient_id``)
    aligned with ``images`` and ``heatmaps``. One colour scale for the whole figure, so that a patch in which the
    model found little IDC evidence (a confident true negative) shows a faint map, not its own "hot" spots.
    ``threshold``: the decision threshold, named in the title and in each row's label (a false negative at
    p(IDC) = 0.7 is one only because the run's threshold is higher).
    """
    outcome = examples["outcome"].to_numpy()
    groups = [
        (name, list(np.flatnonzero(outcome == name))) for name in OUTCOME_NAMES.values() if (outcome == name).any()
    ]
    if not groups:
        raise ValueError("no examples to draw")
    titles = [
        f"p(IDC)={probability_text(p, threshold)}\npatient {pid}"
        for p, pid in zip(examples["prob_idc"], examples["patient_id"], strict=True)
    ]
    n_cols = max(len(members) for _, members in groups)
    rule = {"true positive": ">=", "false positive": ">=", "false negative": "<", "true negative": "<"}
    shown = (
        None
        if threshold is None
        else probability_text(threshold, threshold + 0.001)
        if any(round(p, 2) == round(threshold, 2) for p in examples["prob_idc"])
        else f"{threshold:.2f}"
    )
    rows = [f"{n}s" + ("" if threshold is None else f"\np {rule[n]} {shown}") for n, _ in groups]
    fig = _gradcam_grid(np.asarray(images), np.asarray(heatmaps), titles, rows, [m for _, m in groups], n_cols, alpha)
    called = "" if threshold is None else f"\nCalled IDC when p(IDC) >= {shown}, the run's threshold"
    fig.suptitle(
        "Grad-CAM of the IDC logit: one colour scale for every map (blue = no evidence for IDC)" + called,
        fontsize="medium",
    )
    return fig
