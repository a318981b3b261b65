"""Figures of patches: the patch grid and the Grad-CAM grids on one colour scale."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # tests only: the package itself never touches the backend

import matplotlib.pyplot as plt
import numpy as np
import pytest
from test_metrics import make_predictions

from idc_helpers import patch_plots
from idc_helpers.reporting import OUTCOME_NAMES, confident_examples


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_patch_grid():
    images = np.zeros((5, 50, 50, 3), dtype=np.uint8)
    fig = patch_plots.plot_patches(images, [f"p{i}" for i in range(5)], n_cols=3, title="five")
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 5 and shown[4].get_title() == "p4" and fig._suptitle.get_text() == "five"


def test_gradcam_grids_share_one_scale():
    preds = make_predictions(n_patients=3, per_patient=40)
    examples = confident_examples(preds, 0.5, per_outcome=2)
    assert list(dict.fromkeys(examples["outcome"])) == [
        o for o in OUTCOME_NAMES.values() if o in set(examples["outcome"])
    ]
    images = np.full((len(examples), 50, 50, 3), 128, dtype=np.uint8)
    heatmaps = np.zeros((len(examples), 50, 50), dtype=np.float32)
    heatmaps[0, :10, :10] = 4.0  # the strongest evidence in the figure
    heatmaps[1:, :10, :10] = 0.04  # a hundred times weaker: must look faint, not "hot"
    fig = patch_plots.plot_gradcam_outcomes(examples, images, heatmaps)
    overlays = [ax for ax in fig.axes if ax.images and ax.get_title().startswith("peak")]
    strong, weak = (np.asarray(ax.images[0].get_array()) for ax in overlays[:2])
    assert not np.array_equal(strong[0, 0], weak[0, 0])  # different colours for different evidence
    # 1% of the largest reads as (almost) nothing: the same colour as no evidence, give or take a few levels.
    assert np.abs(weak[0, 0].astype(int) - weak[-1, -1]).max() <= 5
    assert np.abs(strong[0, 0].astype(int) - strong[-1, -1]).max() > 50
    assert overlays[1].get_title() == "peak 1%"
    assert "one colour scale" in fig._suptitle.get_text()
    assert any("largest" in ax.get_ylabel() for ax in fig.axes)  # the colour bar says what the colours mean
    fig = patch_plots.plot_gradcam(images[:3], heatmaps[:3], titles=["a", "b", "c"])
    assert fig.axes[0].get_title() == "a"
