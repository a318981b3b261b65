"""The threshold slider of notebooks 03 and 04: move the decision threshold and see what it changes.

:class:`ThresholdView` draws, at any threshold, F1 / precision / recall against the threshold (the run's choice
marked), the confusion matrix and the scores, and, given a slide mosaic, the slide's probability map split at that
threshold. ``view.show(interactive=True)`` puts an ipywidgets slider above the figure, redrawn when the slider
moves (Jupyter, Colab); ``interactive=False``, or without ipywidgets, draws the static figure at the run's
threshold, which is what papermill and nbval record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from idc_helpers import plots, slide_plots
from idc_helpers.metrics import evaluate, stored_threshold, threshold_curve

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from idc_helpers.slides import SlideMosaic


def widgets_available() -> bool:
    """Whether ipywidgets can be imported (Colab and Jupyter installs have it)."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class ThresholdView:
    """What a predictions table gives at any threshold.

    ``preds``: a predictions table (``label``, ``prob_idc``; its recorded ``threshold`` is the run's, else 0.5 or
    ``threshold``); ``mosaic``: a slide of one patient of ``preds`` (:func:`idc_helpers.slides.slide_mosaic`), drawn
    beside the scores; ``synthetic``: mark every figure SYNTHETIC. ``drawn`` lists the thresholds drawn so far, and
    ``report`` is the :func:`idc_helpers.metrics.evaluate` report at the last one.
    """

    preds: pd.DataFrame
    threshold: float | None = None
    mosaic: SlideMosaic | None = None
    synthetic: bool = False
    drawn: list[float] = field(default_factory=list)
    report: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.threshold is None:
            recorded = stored_threshold(self.preds)
            self.threshold = 0.5 if recorded is None else recorded
        self.curve = threshold_curve(self.preds["label"], self.preds["prob_idc"], extra=[self.threshold])

    def figure(self, threshold: float) -> Figure:
        """The curve, the confusion matrix (and the slide) at ``threshold``, with the scores in the title."""
        import matplotlib.pyplot as plt

        threshold = float(threshold)
        self.report = evaluate(self.preds, n_bootstrap=0, threshold=threshold)
        self.drawn.append(threshold)
        if self.mosaic is None:
            fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2), layout="constrained", width_ratios=[1.4, 1])
            curve_ax, confusion_ax = axes
        else:  # the slide across the top, the curve and the confusion matrix under it
            fig, named = plt.subplot_mosaic(
                [["slide", "slide"], ["curve", "confusion"]],
                figsize=(10.5, 8.4),
                layout="constrained",
                width_ratios=[1.4, 1],
                height_ratios=[1.1, 1],
            )
            slide_plots.plot_slide(
                self.mosaic,
                ax=named["slide"],
                show=("prob",),
                threshold=threshold,
                title=f"Patient {self.mosaic.patient_id}: red = called IDC at {threshold:.2f}",
            )
            curve_ax, confusion_ax = named["curve"], named["confusion"]
        plots.plot_threshold_curve(
            self.curve, chosen=self.threshold, current=threshold, ax=curve_ax, title="Scores against the threshold"
        )
        plots.plot_confusion(self.report, ax=confusion_ax, title=f"At threshold {threshold:.2f}")
        values = self.report["metrics"]
        scores = ", ".join(
            f"{label} {values[name]['value']:.2f}"
            for name, label in (
                ("f1", "F1"),
                ("precision", "precision"),
                ("recall", "recall"),
                ("balanced_accuracy", "balanced accuracy"),
            )
            if values[name]["value"] is not None
        )
        who = (
            f"patient {self.mosaic.patient_id}"
            if self.mosaic is not None
            else f"{self.report['counts']['patients']} patients"
        )
        fig.suptitle(
            f"Threshold {threshold:.2f} ({who}, {self.report['counts']['patches']:,} patches): {scores}"
            f"\nThe run chose {self.threshold:.2f} on its validation patients",
            fontsize="medium",
        )
        return fig

    def widget(self):
        """A slider (0-1, step 0.01, starting at the run's threshold) above the figure, redrawn when it moves."""
        import ipywidgets as widgets
        import matplotlib.pyplot as plt
        from IPython.display import display

        slider = widgets.FloatSlider(
            value=round(self.threshold, 2),
            min=0.0,
            max=1.0,
            step=0.01,
            description="threshold",
            readout_format=".2f",
            continuous_update=False,
        )
        output = widgets.Output()

        def redraw(change: Any = None) -> None:
            fig = self.figure(slider.value)
            if self.synthetic:
                plots.mark_synthetic(fig)
            with output:
                output.clear_output(wait=True)
                display(fig)
            plt.close(fig)

        slider.observe(redraw, names="value")
        redraw()
        return widgets.VBox([slider, output])

    def show(self, interactive: bool = True, *, save_to: str | os.PathLike[str] | None = None) -> None:
        """Display the slider (``interactive`` and ipywidgets installed) or the static figure at the run's threshold.

        The figure is written to ``save_to`` too when given (:func:`idc_helpers.plots.save_figure`).
        """
        import matplotlib.pyplot as plt
        from IPython.display import display

        if interactive and widgets_available():
            display(self.widget())
            return
        fig = self.figure(self.threshold)
        if save_to is not None:
            plots.save_figure(fig, save_to, synthetic=self.synthetic)
        elif self.synthetic:
            plots.mark_synthetic(fig)
        display(fig)
        plt.close(fig)  # shown once, not again by the inline backend at the end of the cell
