"""Stain measurement and per-slide colour normalisation (idc_helpers.stain)."""

from __future__ import annotations

import numpy as np
import pytest

from idc_helpers.stain import (
    HED_FROM_RGB,
    RGB_FROM_HED,
    StainError,
    StainStats,
    normalise_stain,
    optical_density,
    stain_stats,
)


def _stained(h: float, e: float, n: int = 4, seed: int = 0) -> np.ndarray:
    """Patches of pure H and E at concentrations around (h, e), half of each patch white glass."""
    rng = np.random.default_rng(seed)
    hed = np.zeros((n, 50, 50, 3), dtype=np.float32)
    hed[:, :25, :, 0] = h * rng.uniform(0.8, 1.2, size=(n, 25, 50))
    hed[:, :25, :, 1] = e * rng.uniform(0.8, 1.2, size=(n, 25, 50))
    rgb = 256.0 * np.exp(-(hed @ RGB_FROM_HED)) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def test_matrices_invert_each_other_and_white_has_zero_density():
    np.testing.assert_allclose(HED_FROM_RGB @ RGB_FROM_HED, np.eye(3), atol=1e-5)
    white = np.full((1, 2, 2, 3), 255, dtype=np.uint8)
    assert np.all(optical_density(white) == 0)


def test_stats_measure_the_stain_of_tissue_pixels_only():
    stats = stain_stats(_stained(0.6, 0.3))
    # White glass (half of every patch) is left out, so the means are those of the stained half.
    assert stats.tissue_pixels == 4 * 25 * 50
    assert stats.mean_hed[0] == pytest.approx(0.6, abs=0.03)
    assert stats.mean_hed[1] == pytest.approx(0.3, abs=0.03)


def test_normalise_moves_a_pale_slide_to_the_target_and_keeps_glass_white():
    pale, target = _stained(0.3, 0.15, seed=1), stain_stats(_stained(0.6, 0.3, seed=2))
    out = normalise_stain(pale, stain_stats(pale), target)
    assert out.dtype == np.uint8 and out.shape == pale.shape
    after = stain_stats(out)
    np.testing.assert_allclose(after.mean_od, target.mean_od, rtol=0.03)
    # Both stains double, as they did from the pale slide to the target.
    assert after.mean_hed[0] == pytest.approx(target.mean_hed[0], rel=0.1)
    assert after.mean_hed[1] == pytest.approx(target.mean_hed[1], rel=0.1)
    assert np.all(out[:, 25:] == 255)  # glass stays glass
    assert out[:, :25].mean() < pale[:, :25].mean() - 20  # the stained half got darker


def test_normalising_a_slide_to_itself_changes_almost_nothing():
    patches = _stained(0.5, 0.25)
    stats = stain_stats(patches)
    out = normalise_stain(patches, stats, stats)
    assert np.abs(out.astype(int) - patches.astype(int)).max() <= 1


def test_the_whole_slide_gets_one_factor_so_its_relative_stain_is_kept():
    light, dark = _stained(0.3, 0.15, n=2, seed=3), _stained(0.9, 0.45, n=2, seed=4)
    slide = np.concatenate([light, dark])
    target = stain_stats(_stained(0.6, 0.3, seed=5))
    out = normalise_stain(slide, stain_stats(slide), target)
    ratio = stain_stats(out[2:]).mean_hed[0] / stain_stats(out[:2]).mean_hed[0]
    assert ratio == pytest.approx(3.0, rel=0.1)  # the darker patches stay three times as dark


def test_blank_patches_and_wrong_shapes_are_refused_with_the_reason():
    with pytest.raises(StainError, match="none of the 2 patches holds a tissue pixel"):
        stain_stats(np.full((2, 50, 50, 3), 255, dtype=np.uint8))
    with pytest.raises(StainError, match="shape"):
        stain_stats(np.zeros((50, 50, 3), dtype=np.uint8))
    bad = StainStats(mean_od=(0.0, 0.2, 0.1), tissue_pixels=10)
    with pytest.raises(StainError, match="no stained tissue"):
        normalise_stain(_stained(0.5, 0.2), bad, stain_stats(_stained(0.5, 0.2)))


def test_a_slide_of_mostly_eosin_is_normalised_although_its_haematoxylin_mean_is_near_zero():
    eosin = _stained(0.0, 0.4, seed=6)
    stats = stain_stats(eosin)
    assert abs(stats.mean_hed[0]) < 0.02 and min(stats.mean_od) > 0
    out = normalise_stain(eosin, stats, stain_stats(_stained(0.6, 0.3, seed=7)))
    assert out.shape == eosin.shape and not np.array_equal(out, eosin)
