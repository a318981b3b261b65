"""Figures of whole slides: a patient's mosaic drawn as tissue, true IDC regions and predicted IDC probability.

The mosaics (:class:`idc_helpers.slides.SlideMosaic`) come from :func:`idc_helpers.slides.slide_mosaic`; the axes
read slide pixels, as in the patch file names. Every function returns a
:class:`matplotlib.figure.Figure` (drawn on the given axes when there are some) and changes no global matplotlib
state; ``pyplot`` is imported only when a figure is made. Legends sit under the panels, never over the tissue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd

from idc_helpers.slides import SlideMosaic, with_values

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# The words for a probability column on a figure.
_BAR_NAMES = {"prob_idc": "p(IDC)", "prob_idc_context": "p(IDC),\ncontext"}
_VALUE_NAMES = {"prob_idc": "predicted IDC probability", "prob_idc_context": "IDC probability with slide context"}

#: Width of a slide figure in inches: about 1,000 px where a notebook shows it (100 dpi).
FIGURE_WIDTH = 10.5


def _slide_axes(
    mosaic: SlideMosaic, ax: Axes | Sequence[Axes] | None, n_panels: int, panel_width: float | None
) -> tuple[Figure, list[Axes]]:
    """Return the given axes (one per panel), or a new figure sized for the slide's aspect.

    A new figure is :data:`FIGURE_WIDTH` wide unless ``panel_width`` (inches) says otherwise.
    """
    import matplotlib.pyplot as plt

    if ax is not None:
        axes = list(np.ravel(ax)) if isinstance(ax, (Sequence, np.ndarray)) else [ax]
        if len(axes) != n_panels:
            raise ValueError(f"{n_panels} panels need {n_panels} axes, got {len(axes)}")
        return axes[0].figure, axes
    panel_width = panel_width or (FIGURE_WIDTH - 0.5) / n_panels
    fig, axes = plt.subplots(
        1,
        n_panels,
        figsize=(panel_width * n_panels + 0.5, _panel_height(mosaic, panel_width)),
        squeeze=False,
        layout="constrained",
    )
    return fig, list(axes[0])


def _panel_height(mosaic: SlideMosaic, panel_width: float) -> float:
    """Return the figure height for panels ``panel_width`` inches wide.

    The image keeps its aspect (about 1.1 in of the width goes to tick labels and a colour bar), with room for a
    title above and a legend below.
    """
    h, w = mosaic.truth.shape
    return min(max((panel_width - 1.1) * h / w, 1.5), 2.2 * panel_width) + 2.0


def threshold_colormap(threshold: float, n: int = 256):
    """Make a colour map for probabilities on a *linear* 0-1 scale whose colours change at ``threshold``.

    Blues below it (darkest at 0), reds from it (darkest at 1), palest at the threshold itself.
    """
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    base = colormaps["coolwarm"]
    values = np.linspace(0.0, 1.0, n)
    below = 0.5 * values / threshold
    above = 0.5 + 0.5 * (values - threshold) / (1.0 - threshold)
    return ListedColormap(
        base(np.where(values < threshold, np.minimum(below, 0.499), np.maximum(above, 0.501))),
        name=f"split_at_{threshold:.3f}",
    )


def _legend_below(axis: Axes, handles: list) -> None:
    """Put a legend under the axes (never over the tissue)."""
    axis.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        ncol=len(handles),
        fontsize="small",
        frameon=False,
    )


def _outline(axis: Axes, mosaic: SlideMosaic, mask: np.ndarray, **style) -> bool:
    """Draw the contour of a 0/1 mask of the mosaic, in slide coordinates; return whether there was anything."""
    if not mask.any():
        return False
    h, w = mask.shape
    left, _, _, top = mosaic.extent
    axis.contour(
        left + (np.arange(w) + 0.5) / mosaic.scale,
        top + (np.arange(h) + 0.5) / mosaic.scale,
        mask.astype(np.float32),
        levels=[0.5],
        linewidths=1.2,
        **style,
    )
    return True


def _draw_probability(axis: Axes, mosaic: SlideMosaic, threshold: float | None, title: str | None) -> None:
    """Draw the probability panel: colours over faded tissue, split at ``threshold``, with the decision outlined.

    The colour bar is linear and marks the threshold.
    """
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    # Faded grey tissue underneath so that the colours read as probabilities, not as stain.
    axis.imshow(cv2.cvtColor(mosaic.image, cv2.COLOR_RGB2GRAY), cmap="gray", vmin=-200, vmax=255, extent=mosaic.extent)
    split = threshold is not None and 0.0 < threshold < 1.0
    cmap = threshold_colormap(threshold) if split else "viridis"
    image = axis.imshow(
        np.ma.masked_invalid(mosaic.prob),
        cmap=cmap,
        norm=Normalize(0.0, 1.0),
        alpha=0.75 if split else 0.6,
        extent=mosaic.extent,
        interpolation="nearest",
    )
    name = _VALUE_NAMES.get(mosaic.value_column, mosaic.value_column)
    axis.set_title(
        title
        or ("Predicted p(IDC)" if mosaic.value_column == "prob_idc" else name[0].upper() + name[1:])
        + (f"\nred: called IDC (p >= {threshold:.2f})" if split else ""),
        fontsize="medium",
    )
    # An inset colour bar follows the image's own height (the axes box around an equal-aspect image is taller).
    bar = axis.figure.colorbar(image, cax=axis.inset_axes([1.03, 0.0, 0.045, 1.0], label="<colorbar>"))
    # Named on top, not along its side, where the label would sit beside the next panel's axis.
    bar.ax.set_title(_BAR_NAMES.get(mosaic.value_column, name), fontsize="x-small", loc="left")
    bar.ax.tick_params(labelsize="x-small")
    handles = []
    if _outline(axis, mosaic, np.nan_to_num(mosaic.truth, nan=0.0) > 0, colors="black"):
        handles.append(Line2D([], [], color="black", lw=1.2, label="true IDC outline"))
    if split:
        # The colour bar is linear: its colours change at the threshold, wherever that lies.
        ticks = [t for t in (0.0, 0.25, 0.5, 0.75, 1.0) if abs(t - threshold) > 0.07]
        bar.set_ticks([*ticks, threshold], labels=[f"{t:g}" for t in ticks] + [f"threshold {threshold:.2f}"])
        bar.ax.axhline(threshold, color="black", lw=2)
        # The decision beside the probability: pale patches just above the threshold are called IDC too.
        if _outline(
            axis, mosaic, np.nan_to_num(mosaic.prob, nan=0.0) >= threshold, colors="darkred", linestyles="dashed"
        ):
            handles.append(Line2D([], [], color="darkred", lw=1.2, ls="--", label="called IDC"))
    if handles:
        _legend_below(axis, handles)


def plot_slide(
    mosaic: SlideMosaic,
    *,
    ax: Axes | Sequence[Axes] | None = None,
    show: Sequence[str] = ("tissue", "truth", "prob"),
    threshold: float | None = None,
    panel_width: float | None = None,
    title: str | None = None,
) -> Figure:
    """Draw side-by-side panels of a :class:`SlideMosaic`; axes in slide pixels (as in the patch file names).

    ``show``: any of ``"tissue"`` (the rebuilt slide), ``"truth"`` (tissue with IDC patches tinted red and
    outlined) and ``"prob"`` (predicted IDC probability over faded tissue, true IDC outlined, with a colour bar).
    ``threshold``: the run's decision threshold; the colours then split there (blue: called non-IDC, red: called
    IDC) on a linear colour bar that marks it, and the called-IDC region is outlined. ``title``: the probability
    panel's title. ``ax``: one axes per panel; without it the figure is :data:`FIGURE_WIDTH` inches wide (or
    ``panel_width`` inches a panel). Legends sit under the panels, never over the tissue.
    """
    from matplotlib.patches import Patch

    panels = [p for p in show if not (p == "prob" and mosaic.prob is None)]
    unknown = set(panels) - {"tissue", "truth", "prob"}
    if unknown or not panels:
        raise ValueError(f"show must name some of 'tissue', 'truth', 'prob' (got {list(show)})")
    fig, axes = _slide_axes(mosaic, ax, len(panels), panel_width)
    idc = np.nan_to_num(mosaic.truth, nan=0.0) > 0
    for axis, panel in zip(axes, panels, strict=False):
        if panel == "tissue":
            axis.imshow(mosaic.image, extent=mosaic.extent)
            axis.set_title(f"Patient {mosaic.patient_id}\ntissue ({mosaic.n_patches:,} patches)", fontsize="medium")
        elif panel == "truth":
            axis.imshow(mosaic.image, extent=mosaic.extent)
            tint = np.zeros((*idc.shape, 4), dtype=np.float32)
            tint[idc] = (1.0, 0.0, 0.0, 0.35)
            axis.imshow(tint, extent=mosaic.extent)
            _outline(axis, mosaic, idc, colors="red")
            share = mosaic.n_idc / mosaic.n_patches
            axis.set_title(f"True IDC regions\n{mosaic.n_idc:,} patches ({share:.0%})", fontsize="medium")
            _legend_below(axis, [Patch(facecolor=(1, 0, 0, 0.35), edgecolor="red", label="IDC (label 1)")])
        else:
            _draw_probability(axis, mosaic, threshold, title)
        axis.set_xlabel("x (slide pixels)", fontsize="small")
        axis.set_ylabel("y (slide pixels)", fontsize="small")
        axis.tick_params(labelsize="x-small")
    return fig


def plot_raw_and_context(
    mosaic: SlideMosaic,
    table: pd.DataFrame,
    *,
    threshold: float,
    context_threshold: float,
    panel_width: float | None = None,
) -> Figure:
    """Draw the patch-only and the slide-context probability (``prob_idc_context``) of one mosaic side by side.

    Each is split at its own threshold, with the true IDC regions outlined (the patch-only one is what the papers
    measured; the context one uses the neighbouring patches on the slide). :data:`FIGURE_WIDTH` wide.
    """
    import matplotlib.pyplot as plt

    panel_width = panel_width or (FIGURE_WIDTH - 0.5) / 2
    fig, axes = plt.subplots(
        1, 2, figsize=(2 * panel_width + 0.5, _panel_height(mosaic, panel_width)), layout="constrained"
    )
    plot_slide(
        mosaic, ax=axes[0], show=("prob",), threshold=threshold, title=f"Patch only\n(p >= {threshold:.2f} called IDC)"
    )
    context = with_values(mosaic, table, "prob_idc_context")
    same = bool(np.allclose(np.nan_to_num(context.prob), np.nan_to_num(mosaic.prob)))
    plot_slide(
        context,
        ax=axes[1],
        show=("prob",),
        threshold=context_threshold,
        title=(
            "Slide context: none chosen (no smoothing\nbeat patch-only on the validation patients)"
            if same
            else f"With slide context: neighbours on the slide\n(p >= {context_threshold:.2f} called IDC)"
        ),
    )
    share = mosaic.n_idc / mosaic.n_patches
    fig.suptitle(f"Patient {mosaic.patient_id}: {mosaic.n_patches:,} patches, {mosaic.n_idc:,} IDC ({share:.0%})")
    return fig
