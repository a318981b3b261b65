"""Which patches figures show: border patches with tissue, the worst test patients and their mistakes."""

from __future__ import annotations

import numpy as np
import pandas as pd
from conftest import patch_name, write_patch

from idc_helpers import examples, patch_plots, plots
from idc_helpers.patch_index import build_index

GLASS = (228, 228, 230)
PINK = (215, 120, 180)


def _border_dataset(root):
    """One patient: 50x42 and 31x50 patches of glass, and the same sizes half covered with stained tissue."""
    for i, (width, height, tissue) in enumerate(
        [(50, 42, False), (50, 42, True), (31, 50, False), (31, 50, True), (50, 50, True)]
    ):
        image = np.empty((height, width, 3), np.uint8)
        image[:] = GLASS
        if tissue:
            image[: height // 2] = PINK
        write_patch(root / "7" / "0" / patch_name("7", 1 + 50 * i, 1, 0), image)
    return root


def test_border_examples_show_tissue_of_each_size_first(tmp_path):
    frame = build_index(_border_dataset(tmp_path / "data")).frame
    shown = examples.border_examples(frame, n=3, seed=0)
    sizes = [tuple(v) for v in shown.frame[["width", "height"]].to_numpy()]
    assert sorted(sizes[:2]) == [(31, 50), (50, 42)]  # one of each size, the ones with tissue
    assert (shown.frame["tissue"].to_numpy()[:2] > 0.4).all() and shown.frame["tissue"].iloc[2] == 0.0
    assert shown.images.shape == (3, 50, 50, 3) and (shown.images[0, -1, -1] == 255).all()  # padded with white
    assert shown.titles[0].endswith("class 0") and len(shown.titles) == 3


def test_padding_is_hatched_and_the_file_edge_dashed():
    images = np.full((2, 50, 50, 3), 255, np.uint8)
    fig = patch_plots.plot_patches(images, ["a", "b"], sizes=[(50, 30), (50, 50)])
    first, second = fig.axes[0].patches, fig.axes[1].patches
    hatched = [p for p in first if p.get_hatch()]
    assert len(hatched) == 1 and hatched[0].get_y() == 30 and hatched[0].get_height() == 20
    assert [p.get_linestyle() for p in first if not p.get_hatch()] == ["--"]
    assert not second  # a full 50x50 patch has no padding to mark


def _preds() -> pd.DataFrame:
    rows = []
    for patient, labels, probs in [
        ("1", [1, 1, 1, 0, 0], [0.9, 0.2, 0.1, 0.8, 0.3]),
        ("2", [1, 1, 0, 0, 0], [0.9, 0.8, 0.1, 0.2, 0.3]),
    ]:
        for i, (label, prob) in enumerate(zip(labels, probs, strict=True)):
            rows.append((f"/d/{patient}/{label}/{i}.png", patient, 1 + 50 * i, 1, label, prob, int(prob >= 0.5)))
    return pd.DataFrame(rows, columns=["path", "patient_id", "x", "y", "label", "prob_idc", "pred"])


def test_worst_patients_are_those_with_the_lowest_f1():
    from idc_helpers.metrics import per_patient_metrics

    table = per_patient_metrics(_preds())
    assert examples.worst_patients(table, n=1, min_idc=1)["patient_id"].tolist() == ["1"]
    # Patients with too few IDC patches for a stable F1 are passed over while others qualify.
    assert examples.worst_patients(table, n=2, min_idc=3)["patient_id"].tolist() == ["1"]


def test_patient_mistakes_are_the_most_confident_ones(tmp_path, monkeypatch):
    preds = _preds()
    preds["path"] = [str(write_patch(tmp_path / p.lstrip("/"), np.zeros((50, 50, 3), np.uint8))) for p in preds["path"]]
    preds["threshold"] = 0.5
    shown = examples.patient_mistakes(preds, ["1"], per_patient=2)
    assert shown.frame["prob_idc"].tolist() == [0.1, 0.8]  # the surest miss, then the surest false alarm
    assert shown.titles[0] == "1: missed IDC\np 0.10 (t 0.50)" and "false alarm" in shown.titles[1]
    assert examples.patient_mistakes(preds, ["2"], per_patient=2).frame.empty  # patient 2 has no mistake


def test_augmented_views_follow_each_original():
    images = np.zeros((2, 50, 50, 3), np.uint8)
    images[:, :10] = (200, 80, 150)  # a stained band at the top: flips and rotations move it
    shown = examples.augmented_views(images, n_views=3, seed=0)
    assert shown.images.shape == (8, 50, 50, 3) and shown.images.dtype == np.uint8
    assert shown.titles[:4] == ["original", "augmented 1", "augmented 2", "augmented 3"]
    assert (shown.images[0] == images[0]).all() and (shown.images[4] == images[1]).all()
    assert any(not np.array_equal(view, images[0]) for view in shown.images[1:4])


def test_a_probability_beside_its_threshold_gets_a_third_decimal(tmp_path):
    assert plots.probability_text(0.031, 0.033) == "0.031" and plots.probability_text(0.5, 0.033) == "0.50"
    preds = _preds()
    preds["path"] = [str(write_patch(tmp_path / p.lstrip("/"), np.zeros((50, 50, 3), np.uint8))) for p in preds["path"]]
    preds = preds.assign(prob_idc=preds["prob_idc"].replace(0.1, 0.031), threshold=0.033)
    preds["pred"] = (preds["prob_idc"] >= 0.033).astype(int)
    shown = examples.patient_mistakes(preds, ["1"], per_patient=2)
    assert shown.titles[0] == "1: missed IDC\np 0.031 (t 0.033)"
