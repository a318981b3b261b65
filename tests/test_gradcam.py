"""Grad-CAM: correct localisation, the same maps whatever the model kind, and maps on one scale.

Localisation is tested on a task whose evidence sits in a known place; the model kinds are Sequential, Functional and
loaded from .keras; one scale means no per-patch rescaling.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras

layers = keras.layers

from idc_helpers.gradcam import (  # noqa: E402
    conv_layer_names,
    default_gradcam_layer,
    gradcam,
    overlay,
    receptive_field_centres,
)

SIZE = 50
SQUARE = 10  # side of the class-deciding white square, px
QUADRANT = SIZE // 2


def make_task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise patches; class 1 iff a white square lies in the top-left quadrant.

    A red square of the same size appears in the bottom-right quadrant of half the patches whatever the class, so a
    map that merely follows bright or contrasting spots would fail. Returns images (N, 50, 50, 3) uint8, labels (N,)
    and the white square's top-left corner (N, 2) (row, col; -1 when absent).
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(40, 170, size=(n, SIZE, SIZE, 3), dtype=np.uint8)
    labels = rng.permutation(np.arange(n) % 2)
    corners = np.full((n, 2), -1)
    for i in range(n):
        if labels[i]:
            r, c = rng.integers(0, QUADRANT - SQUARE + 1, size=2)
            images[i, r : r + SQUARE, c : c + SQUARE] = 255
            corners[i] = r, c
        if rng.random() < 0.5:
            r, c = rng.integers(QUADRANT, SIZE - SQUARE + 1, size=2)
            images[i, r : r + SQUARE, c : c + SQUARE] = (255, 0, 0)
    return images, labels, corners


def feature_layers() -> list:
    return [
        layers.Rescaling(1 / 255.0, name="rescale"),
        layers.Conv2D(8, 3, activation="relu", name="conv1"),
        layers.MaxPooling2D(2, name="pool1"),
        layers.Conv2D(16, 3, activation="relu", name="conv2"),
        layers.Conv2D(16, 3, activation="relu", name="conv3"),
        # Global max pooling: trains to 100 % in seconds from any seed tried (average pooling got stuck at chance
        # for some seeds: a 10 px square is a small share of the average).
        layers.GlobalMaxPooling2D(name="global_pool"),
    ]


def sequential_model() -> keras.Model:
    """Ends in Dense(softmax) with no 'logits' layer: exercises the pre-activation fallback."""
    return keras.Sequential([keras.Input((SIZE, SIZE, 3)), *feature_layers(), layers.Dense(2, activation="softmax")])


def functional_model() -> keras.Model:
    """Same weights layout, with a 'logits' Dense followed by a 'probs' softmax as in idc_helpers.models."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = inputs
    for layer in feature_layers():
        x = layer(x)
    logits = layers.Dense(2, name="logits")(x)
    return keras.Model(inputs, layers.Activation("softmax", name="probs")(logits))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Sequential model trained to ~100 % on the task, a Functional copy and a copy loaded from .keras."""
    keras.utils.set_random_seed(0)
    images, labels, _ = make_task(600, seed=1)
    model = sequential_model()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(images, labels, epochs=8, batch_size=32, verbose=0)
    functional = functional_model()
    functional.set_weights(model.get_weights())
    path = tmp_path_factory.mktemp("gradcam") / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    return {"sequential": model, "functional": functional, "loaded": loaded}


def test_model_learned_the_task(trained):
    images, labels, _ = make_task(200, seed=2)
    probs = trained["sequential"].predict(images, verbose=0)
    assert (probs.argmax(axis=1) == labels).mean() >= 0.97


def test_heatmap_peaks_on_the_deciding_square(trained):
    images, labels, corners = make_task(200, seed=3)
    positives = np.flatnonzero(labels == 1)
    heat = gradcam(trained["sequential"], images[positives])
    assert heat.shape == (len(positives), SIZE, SIZE) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() > 0 and not np.isnan(heat).any()
    good = 0
    for h, (r, c) in zip(heat, corners[positives], strict=True):
        inside = np.zeros((SIZE, SIZE), dtype=bool)
        inside[r : r + SQUARE, c : c + SQUARE] = True
        peak_r, peak_c = np.unravel_index(h.argmax(), h.shape)
        # The peak may sit on the square's border: the receptive fields straddle it.
        peak_near = r - 3 <= peak_r < r + SQUARE + 3 and c - 3 <= peak_c < c + SQUARE + 3
        good += bool(h[inside].mean() > 2 * h[~inside].mean() and peak_near)
    assert good >= 0.9 * len(positives), f"only {good} of {len(positives)} maps peak on the square"


def test_red_distractor_gets_little_heat(trained):
    images, labels, _corners = make_task(200, seed=4)
    heat = gradcam(trained["sequential"], images[labels == 1])
    red = (images[labels == 1] == (255, 0, 0)).all(axis=-1)
    has_red = red.any(axis=(1, 2))
    white = (images[labels == 1] == 255).all(axis=-1)
    on_red = np.array([h[m].mean() for h, m in zip(heat[has_red], red[has_red], strict=True)])
    on_white = np.array([h[m].mean() for h, m in zip(heat[has_red], white[has_red], strict=True)])
    assert (on_white > on_red).mean() >= 0.9


def test_same_maps_for_sequential_functional_and_loaded(trained):
    images, _, _ = make_task(16, seed=5)
    maps = {kind: gradcam(model, images, layer_name="conv2") for kind, model in trained.items()}
    np.testing.assert_allclose(maps["functional"], maps["sequential"], atol=1e-5)
    np.testing.assert_allclose(maps["loaded"], maps["sequential"], atol=1e-5)
    default_maps = {kind: gradcam(model, images, batch_size=5) for kind, model in trained.items()}
    np.testing.assert_allclose(default_maps["loaded"], default_maps["functional"], atol=1e-5)


def test_default_layer_and_layer_choice(trained):
    model = trained["loaded"]
    assert conv_layer_names(model) == ["conv1", "conv2", "conv3"]
    assert default_gradcam_layer(model) == "conv3"  # 20x20, the last conv at least 9x9
    images, _, _ = make_task(3, seed=6)
    assert gradcam(model, images[0], layer_name="conv1").shape == (1, SIZE, SIZE)
    with pytest.raises(ValueError, match="conv1, conv2, conv3"):
        gradcam(model, images, layer_name="nope")
    with pytest.raises(ValueError, match="4-D"):
        gradcam(model, images, layer_name="global_pool")


def seed_like() -> keras.Model:
    """The shapes of seed_cnn (valid 3x3 convs, 2x2 pools): 48, 46, 23, 21, 19, 9, 7, 5, 2."""
    conv = {"kernel_size": 3, "activation": "relu"}
    return keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 3)),
            layers.Rescaling(1 / 255.0),
            layers.Conv2D(4, name="conv1", **conv),
            layers.Conv2D(4, name="conv2", **conv),
            layers.MaxPooling2D(2),
            layers.Conv2D(4, name="conv3", **conv),
            layers.Conv2D(4, name="conv4", **conv),
            layers.MaxPooling2D(2),
            layers.Conv2D(4, name="conv5", **conv),
            layers.Conv2D(4, name="conv6", **conv),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(2, activation="softmax"),
        ]
    )


def test_seed_cnn_geometry_and_default():
    model = seed_like()
    assert default_gradcam_layer(model) == "conv4"  # conv5 (7x7) and conv6 (5x5) are too coarse
    # conv4 cell i looks at input pixels centred on 6.5 + 2 i; conv6 cells only cover the patch centre.
    assert receptive_field_centres(model, "conv4", (SIZE, SIZE)) == ((6.5, 6.5), (2.0, 2.0))
    assert receptive_field_centres(model, "conv6", (SIZE, SIZE)) == ((15.5, 15.5), (4.0, 4.0))


def test_default_layer_is_the_block_output_after_batch_norm():
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Conv2D(4, 3, padding="same", name="c1")(inputs)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.Activation("relu", name="act1")(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(1, activation="sigmoid")(x))
    assert default_gradcam_layer(model) == "act1"
    images, _, _ = make_task(2, seed=7)
    heat = gradcam(model, images)  # one sigmoid unit: its pre-activation is the IDC logit
    assert heat.shape == (2, SIZE, SIZE) and heat.min() >= 0
    assert receptive_field_centres(model, "act1", (SIZE, SIZE)) == ((0.0, 0.0), (1.0, 1.0))  # "same" 3x3


def test_no_evidence_gives_zero_maps_not_nan():
    model = seed_like()
    model.set_weights([np.zeros_like(w) for w in model.get_weights()])
    images, _, _ = make_task(3, seed=8)
    heat = gradcam(model, images)
    assert not np.isnan(heat).any() and (heat == 0).all()


def test_branching_model_works_and_is_stretched():
    """A skip connection: the two-output model handles it; the cells are spread evenly (no chain to follow)."""
    inputs = keras.Input((SIZE, SIZE, 3))
    a = layers.Conv2D(4, 3, strides=2, padding="same", name="a")(inputs)
    b = layers.Conv2D(4, 3, padding="same", name="b")(a)
    x = layers.Add(name="add")([a, b])
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(2, activation="softmax")(x))
    images, _, _ = make_task(2, seed=9)
    assert gradcam(model, images, layer_name="add").shape == (2, SIZE, SIZE)
    assert receptive_field_centres(model, "b", (SIZE, SIZE)) is not None  # a -> b is still a chain
    assert receptive_field_centres(model, "add", (SIZE, SIZE)) is None


def test_maps_share_one_scale_across_patches(trained):
    """Maps are in logit units, not each divided by its own maximum.

    A patch without the deciding square (a true negative) gets a much fainter map than one with it, instead of its own
    "red hot" spots.
    """
    images, labels, _ = make_task(100, seed=11)
    heat = gradcam(trained["functional"], images)
    peaks = heat.max(axis=(1, 2))
    assert np.median(peaks[labels == 0]) < 0.5 * np.median(peaks[labels == 1])
    doubled = gradcam(trained["functional"], np.concatenate([images[:4], images[:4]]))
    np.testing.assert_allclose(doubled[:4], heat[:4], rtol=1e-4, atol=1e-6)  # a batch does not rescale its maps


def test_overlay():
    image = np.full((SIZE, SIZE, 3), 200, dtype=np.uint8)
    heat = np.zeros((SIZE, SIZE), dtype=np.float32)
    heat[:10, :10] = 1.0
    out = overlay(image, heat, alpha=0.4)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out[0, 0], out[-1, -1])  # hot and cold corners differ
    np.testing.assert_array_equal(overlay(image, heat, alpha=0.0), image)
    # On a scale up to 4, a value of 1 is a quarter of the way up the colour map: not the same colour as at scale 1.
    assert not np.array_equal(overlay(image, heat, vmax=4.0)[0, 0], out[0, 0])
    batch = overlay(np.stack([image, image]), np.stack([heat, heat]))
    assert batch.shape == (2, SIZE, SIZE, 3)
    with pytest.raises(ValueError):
        overlay(image, heat[:20])


@pytest.mark.parametrize("name, expected_layer", [("seed_cnn", "conv4"), ("idc_net", None)])
def test_project_models_saved_and_loaded(name, expected_layer, tmp_path):
    """The package's own (Functional) models: default layer, and identical maps after a reload."""
    from idc_helpers import models

    model = models.build_model(name)
    if expected_layer is not None:
        assert default_gradcam_layer(model) == expected_layer
    images, _, _ = make_task(4, seed=10)
    heat = gradcam(model, images)
    model.save(tmp_path / "m.keras")
    np.testing.assert_allclose(gradcam(keras.models.load_model(tmp_path / "m.keras"), images), heat, atol=1e-5)


@pytest.mark.parametrize("name", ["seed_cnn", "idc_net"])
def test_a_model_that_augments_itself_gets_the_same_maps(name, tmp_path):
    """``build_model(augment=...)`` puts an augmentation layer (the identity outside training) after the input.

    The default layer, the cell centres and the maps are those of the same weights without it, also after a reload.
    """
    from idc_helpers import models

    plain, augmenting = models.build_model(name), models.build_model(name, augment="strong", augment_seed=3)
    assert augmenting.layers[1].name == models.AUGMENT_LAYER
    for layer in plain.layers:
        augmenting.get_layer(layer.name).set_weights(layer.get_weights())
    layer_name = default_gradcam_layer(plain)
    assert default_gradcam_layer(augmenting) == layer_name
    assert (
        receptive_field_centres(augmenting, layer_name, (SIZE, SIZE))
        == receptive_field_centres(plain, layer_name, (SIZE, SIZE))
        is not None
    )
    images, _, _ = make_task(4, seed=12)
    heat = gradcam(plain, images)
    assert heat.max() > 0
    np.testing.assert_allclose(gradcam(augmenting, images), heat, atol=1e-5)
    augmenting.save(tmp_path / "m.keras")
    np.testing.assert_allclose(gradcam(keras.models.load_model(tmp_path / "m.keras"), images), heat, atol=1e-5)


def test_outcome_rows_name_the_threshold_that_made_them():
    """A false negative at p(IDC) 0.7 is one only because the threshold is higher: the figure says which."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from idc_helpers import patch_plots

    examples = pd.DataFrame(
        {"outcome": ["false negative", "true positive"], "prob_idc": [0.027, 0.9], "patient_id": ["1", "2"]}
    )
    fig = patch_plots.plot_gradcam_outcomes(
        examples, np.zeros((2, 50, 50, 3), np.uint8), np.zeros((2, 50, 50)), threshold=0.0333
    )
    assert "p(IDC) >= 0.033, the run's threshold" in fig.get_suptitle()
    labels = [text.get_text() for ax in fig.axes for text in ax.texts]  # the row labels
    assert any("p >= 0.033" in label for label in labels) and any("p < 0.033" in label for label in labels)
    assert any(ax.get_title().startswith("p(IDC)=0.027") for ax in fig.axes)  # 0.03 would read as the threshold
    plt.close("all")
