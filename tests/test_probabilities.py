"""Inference: probabilities batch by batch, rows by index, and test-time augmentation over the 8 views."""

from __future__ import annotations

import numpy as np
import pytest

from idc_helpers.models import build_model
from idc_helpers.probabilities import dihedral_views, predict_probs


@pytest.fixture(scope="module")
def model():
    import keras

    keras.utils.set_random_seed(0)
    return build_model("seed_cnn")


def test_tta_on_a_symmetric_patch_changes_nothing(model):
    i = np.minimum(np.arange(50), 49 - np.arange(50))
    d = np.minimum.outer(i, i)  # the same under every flip and 90-degree rotation
    patch = np.stack([d * 5, 255 - d * 4, (d * 7) % 256], axis=-1).astype(np.uint8)[None]
    assert all(np.array_equal(view, patch) for view in dihedral_views(patch))
    np.testing.assert_allclose(predict_probs(model, patch, tta=True), predict_probs(model, patch), atol=1e-6)


def test_tta_is_invariant_to_rotating_the_input(model):
    patches = np.random.default_rng(1).integers(0, 256, size=(3, 50, 50, 3), dtype=np.uint8)
    rotated = np.ascontiguousarray(np.rot90(patches, 1, axes=(1, 2))[:, ::-1])
    np.testing.assert_allclose(
        predict_probs(model, patches, tta=True), predict_probs(model, rotated, tta=True), atol=1e-5
    )


def test_predict_probs_indices_match_full_prediction(model):
    patches = np.random.default_rng(2).integers(0, 256, size=(10, 50, 50, 3), dtype=np.uint8)
    full = predict_probs(model, patches, batch_size=4)
    assert full.shape == (10,) and full.dtype == np.float32 and ((full >= 0) & (full <= 1)).all()
    np.testing.assert_allclose(
        predict_probs(model, patches, indices=np.array([7, 1, 2, 3]), batch_size=3), full[[7, 1, 2, 3]], atol=1e-6
    )
    np.testing.assert_allclose(
        predict_probs(model, patches, indices=np.arange(2, 9), batch_size=3), full[2:9], atol=1e-6
    )


def test_memmap_input_gives_the_same_probabilities(model, tmp_path):
    patches = np.random.default_rng(3).integers(0, 256, size=(6, 50, 50, 3), dtype=np.uint8)
    np.save(tmp_path / "p.npy", patches)
    mapped = np.load(tmp_path / "p.npy", mmap_mode="r")
    np.testing.assert_array_equal(
        predict_probs(model, mapped, batch_size=4), predict_probs(model, patches, batch_size=4)
    )
