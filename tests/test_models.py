"""Models: the reference network's exact shape and size, our own model, and the layer names other code relies on."""

from __future__ import annotations

import numpy as np
import pytest

import keras

from idc_helpers.models import (  # noqa: E402
    CONV_LAYERS,
    DEFAULT_MODEL,
    FEATURE_LAYERS,
    LOGITS_LAYER,
    MODEL_NAMES,
    PROBS_LAYER,
    build_model,
    compile_model,
)

SEED_CNN_SHAPES = {
    "conv1": (48, 48, 16), "conv2": (46, 46, 16), "pool1": (23, 23, 16),
    "conv3": (21, 21, 32), "conv4": (19, 19, 32), "pool2": (9, 9, 32),
    "conv5": (7, 7, 64), "conv6": (5, 5, 64), "pool3": (2, 2, 64),
    "flatten": (256,), "dense": (128,), "logits": (2,), "probs": (2,),
}


def test_seed_cnn_is_the_reference_network():
    model = build_model("seed_cnn")
    assert model.count_params() == 105_234
    for name, shape in SEED_CNN_SHAPES.items():
        assert tuple(model.get_layer(name).output.shape[1:]) == shape, name
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [layer.name for layer in convs] == list(CONV_LAYERS["seed_cnn"])
    assert all(layer.kernel_size == (3, 3) and layer.padding == "valid" for layer in convs)
    assert [layer.filters for layer in convs] == [16, 16, 32, 32, 64, 64]
    # Only the weightless rescaling sits between the input and conv1.
    assert model.get_layer("rescale").count_params() == 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_take_raw_uint8_patches(name):
    model = build_model(name)
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, size=(4, 50, 50, 3), dtype=np.uint8)
    probs = np.asarray(model.predict_on_batch(patches))
    assert probs.shape == (4, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # uint8 and float inputs of the same values give the same output: scaling happens inside the model.
    np.testing.assert_allclose(probs, model.predict_on_batch(patches.astype(np.float32)), rtol=1e-6)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_layer_names_for_gradcam(name):
    model = build_model(name)
    for layer_name in CONV_LAYERS[name] + FEATURE_LAYERS[name]:
        assert len(model.get_layer(layer_name).output.shape) == 4
    logits = model.get_layer(LOGITS_LAYER)
    assert logits.activation is keras.activations.linear
    assert model.get_layer(PROBS_LAYER).output is model.output
    # Building a second model in the same process must not shift the names.
    assert [layer.name for layer in build_model(name).layers] == [layer.name for layer in model.layers]


def test_idc_net_size_is_cpu_sized():
    model = build_model("idc_net")
    assert DEFAULT_MODEL in MODEL_NAMES
    assert 100_000 <= model.count_params() <= 400_000
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert isinstance(model.get_layer("gap"), keras.layers.GlobalAveragePooling2D)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="seed_cnn"):
        build_model("resnet")


def test_compile_uses_adam_and_sparse_crossentropy():
    model = compile_model(build_model("seed_cnn"), learning_rate=1e-3)
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)
