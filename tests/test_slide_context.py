"""Slide-context smoothing on generated slides: a known IDC region plus noise."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from idc_helpers import slide_context
from idc_helpers.metrics import pick_threshold
from idc_helpers.slide_context import ContextError, apply_context, fit_context, neighbour_counts, smooth_probs


def _slide(
    patient: str,
    rng: np.random.Generator,
    size: int = 30,
    keep: float = 1.0,
    noise: float = 0.25,
    blob_radius: float = 7.0,
) -> pd.DataFrame:
    """A ``size`` x ``size`` patch grid with a round IDC region; probabilities = label + Gaussian noise, clipped."""
    gx, gy = np.meshgrid(np.arange(size), np.arange(size))
    gx, gy = gx.ravel(), gy.ravel()
    label = ((gx - size / 2) ** 2 + (gy - size / 2) ** 2 <= blob_radius**2).astype(np.int8)
    prob = np.clip(0.3 + 0.4 * label + rng.normal(0, noise, len(label)), 0, 1)
    table = pd.DataFrame({"patient_id": patient, "x": gx * 50 + 1, "y": gy * 50 + 1, "label": label, "prob_idc": prob})
    return table[rng.random(len(table)) < keep].reset_index(drop=True)


def test_smoothing_raises_auc_on_a_slide_with_a_connected_idc_region():
    table = _slide("p1", np.random.default_rng(0))
    raw = skm.roc_auc_score(table["label"], table["prob_idc"])
    smooth = skm.roc_auc_score(table["label"], smooth_probs(table, sigma=1.5))
    assert smooth > raw + 0.05


def test_absent_neighbours_carry_no_weight_and_patients_do_not_mix():
    # Two patients at the same coordinates: smoothing one must not see the other.
    a = pd.DataFrame({"patient_id": "a", "x": [1, 51, 1001], "y": [1, 1, 1001], "prob_idc": [0.2, 0.6, 0.9]})
    b = a.assign(patient_id="b", prob_idc=[1.0, 1.0, 1.0])
    out = smooth_probs(pd.concat([a, b], ignore_index=True), sigma=1.0, window=3)
    # Each of the two neighbours weighs exp(-1/2) against its own 1; the isolated patch keeps its own value.
    w = np.exp(-0.5)
    assert out[0] == pytest.approx((0.2 + w * 0.6) / (1 + w))
    assert out[1] == pytest.approx((0.6 + w * 0.2) / (1 + w))
    assert out[2] == pytest.approx(0.9)
    assert np.allclose(out[3:], 1.0)


def test_sigma_zero_returns_the_probabilities_unchanged():
    table = _slide("p1", np.random.default_rng(1), size=8)
    assert np.array_equal(smooth_probs(table, 0.0), table["prob_idc"].to_numpy())


def test_smoothing_follows_the_table_row_order():
    table = _slide("p1", np.random.default_rng(2), size=12)
    shuffled = table.sample(frac=1.0, random_state=0)
    assert np.allclose(smooth_probs(shuffled, 1.0), pd.Series(smooth_probs(table, 1.0)).loc[shuffled.index])


def test_neighbour_counts_on_a_full_grid():
    table = _slide("p1", np.random.default_rng(3), size=5)
    counts = neighbour_counts(table).reshape(5, 5)
    assert counts[0, 0] == 3 and counts[0, 2] == 5 and counts[2, 2] == 8


def test_sparse_patient_is_excluded_from_whole_slides():
    rng = np.random.default_rng(4)
    table = pd.concat([_slide("slide", rng), _slide("sparse", rng, keep=0.09)], ignore_index=True)
    assert slide_context.whole_slide_patients(table) == ["slide"]
    params = fit_context(table, tune_on="whole_slides")
    assert params["patients"] == ["slide"] and params["tuned_on"] == "whole_slides"
    assert params["n_patches"] == int((table["patient_id"] == "slide").sum())


def test_fit_chooses_smoothing_on_noisy_slides_and_none_on_noise_free_ones():
    rng = np.random.default_rng(5)
    noisy = pd.concat([_slide(f"p{i}", rng) for i in range(2)], ignore_index=True)
    assert fit_context(noisy)["sigma"] > 0
    # Exact probabilities: smoothing can only blur the region's border, so "no smoothing" must win.
    clean = noisy.assign(prob_idc=noisy["label"].astype(float) * 0.8 + 0.1)
    assert fit_context(clean)["sigma"] == 0.0


def test_the_midpoint_criterion_takes_the_f1_sigma_and_the_threshold_halfway_to_youdens():
    rng = np.random.default_rng(7)
    val = pd.concat([_slide(f"p{i}", rng) for i in range(3)], ignore_index=True)
    by_f1, mid = fit_context(val, criterion="f1"), fit_context(val, criterion="midpoint")
    assert mid["sigma"] == by_f1["sigma"] > 0 and mid["criterion"] == "midpoint"
    probs = smooth_probs(val, mid["sigma"])
    labels = val["label"].to_numpy()
    expected = (pick_threshold(labels, probs, "f1") + pick_threshold(labels, probs, "youden")) / 2
    assert mid["threshold"] == pytest.approx(expected) and mid["threshold"] != pytest.approx(by_f1["threshold"])
    # Every sigma tried is listed with the midpoint threshold and ranked by the F1 at the F1 threshold.
    assert [c["ranking_score"] for c in mid["candidates"]] == [c["f1"] for c in by_f1["candidates"]]
    with pytest.raises(slide_context.ContextError, match="use one of f1, youden, midpoint"):
        fit_context(val, criterion="median")


def test_params_round_trip_through_json_and_give_the_same_columns():
    rng = np.random.default_rng(6)
    val, test = _slide("val", rng), _slide("test", rng)
    params = fit_context(val)
    again = json.loads(json.dumps(params))
    first, second = apply_context(test, params), apply_context(test, again)
    assert np.array_equal(first["prob_idc_context"], second["prob_idc_context"])
    assert np.array_equal(first["pred_context"], second["pred_context"])
    assert set(first["pred_context"]) <= {0, 1}
    assert (first["pred_context"] == (first["prob_idc_context"] >= params["threshold"])).all()
    # Tuned on another slide, the context prediction still beats the raw one on this slide.
    raw_f1 = skm.f1_score(test["label"], test["prob_idc"] >= fit_context(val, sigmas=[0.0])["threshold"])
    assert skm.f1_score(test["label"], first["pred_context"]) > raw_f1


def test_fit_without_whole_slide_patients_says_what_to_do():
    sparse = _slide("sparse", np.random.default_rng(7), keep=0.09)
    with pytest.raises(ContextError, match="tune_on='all'"):
        fit_context(sparse, tune_on="whole_slides")
    assert fit_context(sparse)["patients"] == ["sparse"]  # the default tunes on every validation patient
    params = fit_context(sparse, tune_on="auto")  # "auto" falls back to every validation patient, and says so
    assert params["patients"] == ["sparse"] and params["tuned_on"] == "all"
    assert "fewer than 3" in params["fallback"]


def test_auto_tunes_on_the_whole_slides_when_there_are_enough_and_falls_back_with_too_few():
    rng = np.random.default_rng(9)
    slides = [_slide(f"s{i}", rng) for i in range(3)]
    # Thin samples whose probabilities run high: tuned on them, the threshold would not fit the slides.
    sparse = [
        _slide(f"t{i}", rng, keep=0.09).assign(prob_idc=lambda t: np.clip(t["prob_idc"] + 0.3, 0, 1)) for i in range(6)
    ]
    table = pd.concat(slides + sparse, ignore_index=True)
    auto = fit_context(table, tune_on="auto")
    assert auto["tuned_on"] == "whole_slides" and auto["fallback"] is None
    assert auto["patients"] == ["s0", "s1", "s2"]
    assert auto["threshold"] == fit_context(pd.concat(slides), tune_on="whole_slides")["threshold"]
    everyone = fit_context(table)  # the default
    assert everyone["patients"] == sorted(table["patient_id"].unique()) and everyone["fallback"] is None
    few = fit_context(pd.concat(slides[:2] + sparse, ignore_index=True), tune_on="auto")
    assert few["tuned_on"] == "all" and len(few["patients"]) == 8
    assert few["fallback"].startswith("2 whole-slide validation patient(s), fewer than 3")
    assert fit_context(table, tune_on="auto", min_whole_slides=4)["tuned_on"] == "all"
    with pytest.raises(ContextError, match="unknown tune_on"):
        fit_context(table, tune_on="slides")


def test_without_smoothing_the_context_decisions_are_the_patch_only_ones():
    noisy = _slide("p", np.random.default_rng(10))
    clean = noisy.assign(prob_idc=noisy["label"].astype(float) * 0.8 + 0.1)
    params = fit_context(clean, patch_threshold=0.37)
    assert params["sigma"] == 0.0 and params["threshold"] == 0.37
    out = apply_context(clean, params)
    assert (out["pred_context"] == (clean["prob_idc"] >= 0.37)).all()
    assert fit_context(noisy, patch_threshold=0.37)["threshold"] != 0.37  # smoothing won: its own threshold
    with pytest.raises(ContextError, match=r"patch_threshold 1\.5"):
        fit_context(clean, patch_threshold=1.5)


def test_bad_params_and_missing_columns_are_clear_errors():
    table = _slide("p", np.random.default_rng(8), size=6)
    with pytest.raises(ContextError, match="lack threshold"):
        apply_context(table, {"method": "gaussian_grid", "version": 1, "grid_px": 50, "sigma": 1.0, "window": 3})
    with pytest.raises(ContextError, match="missing column"):
        smooth_probs(table.drop(columns="x"), 1.0)
    with pytest.raises(ContextError, match="odd"):
        smooth_probs(table, 1.0, window=4)


def test_label_boundary_marks_patches_beside_the_other_label_only():
    # A 5 x 5 slide whose middle 3 x 3 block is IDC: the block's 8 outer cells and the 16 around it are on
    # the boundary, the block's centre is not; diagonals count as neighbours.
    gx, gy = np.meshgrid(np.arange(5), np.arange(5))
    gx, gy = gx.ravel(), gy.ravel()
    label = ((abs(gx - 2) <= 1) & (abs(gy - 2) <= 1)).astype(np.int8)
    table = pd.DataFrame({"patient_id": "p", "x": gx * 50 + 1, "y": gy * 50 + 1, "label": label})
    boundary = slide_context.label_boundary(table)
    assert boundary.dtype == bool and boundary.sum() == 24
    assert not boundary[(gx == 2) & (gy == 2)].any()
    # Corners of the slide touch the block only diagonally: still boundary.
    assert boundary[(gx == 0) & (gy == 0)].all()
    # Row order is kept, and another patient at the same coordinates is not a neighbour.
    other = table.assign(patient_id="q", label=0)
    both = pd.concat([other, table], ignore_index=True).sample(frac=1.0, random_state=0)
    marks = slide_context.label_boundary(both)
    assert not marks[both["patient_id"].to_numpy() == "q"].any()
    np.testing.assert_array_equal(
        marks[both["patient_id"].to_numpy() == "p"],
        boundary[both.loc[both["patient_id"] == "p"].index.to_numpy() - len(other)],
    )


def test_label_boundary_ignores_absent_neighbours_and_refuses_soft_labels():
    table = pd.DataFrame({"patient_id": "p", "x": [1, 101, 151], "y": [1, 1, 1], "label": [1, 0, 1]})
    # 0 and 50 px apart would be neighbours; (1, 1) has no neighbour present, the other two touch.
    np.testing.assert_array_equal(slide_context.label_boundary(table), [False, True, True])
    with pytest.raises(ContextError, match="0 or 1"):
        slide_context.label_boundary(table.assign(label=[0.5, 0, 1]))
