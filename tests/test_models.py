"""Models: the reference network's exact shape and size, our own model, and the layer names other code relies on."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from idc_helpers.errors import UserError
from idc_helpers.model_file import load_model_file
from idc_helpers.models import (
    DEFAULT_MODEL,
    LOGITS_LAYER,
    MODEL_NAMES,
    PROBS_LAYER,
    LabelSmoothingError,
    SmoothedSparseCrossentropy,
    UnknownModelError,
    build_model,
    compile_model,
    precision_policy,
    recompute_batch_norm,
    uses_mixed_precision,
)

SEED_CNN_SHAPES = {
    "conv1": (48, 48, 16),
    "conv2": (46, 46, 16),
    "pool1": (23, 23, 16),
    "conv3": (21, 21, 32),
    "conv4": (19, 19, 32),
    "pool2": (9, 9, 32),
    "conv5": (7, 7, 64),
    "conv6": (5, 5, 64),
    "pool3": (2, 2, 64),
    "flatten": (256,),
    "dense": (128,),
    "logits": (2,),
    "probs": (2,),
}
CONVS = ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6")


def test_seed_cnn_is_the_reference_network():
    model = build_model("seed_cnn")
    assert model.count_params() == 105_234
    for name, shape in SEED_CNN_SHAPES.items():
        assert tuple(model.get_layer(name).output.shape[1:]) == shape, name
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [layer.name for layer in convs] == list(CONVS)
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
    features = CONVS if name == "seed_cnn" else tuple(f"relu{i}" for i in range(1, 7))
    for layer_name in CONVS + features:
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


def test_batch_norm_settings_reach_the_layers():
    model = build_model("idc_net", bn_momentum=0.97, bn_epsilon=1e-5)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 6 and all(n.momentum == 0.97 and n.epsilon == 1e-5 for n in norms)


def test_residual_idc_net_adds_shortcuts_with_the_same_parameters(tmp_path):
    from idc_helpers.model_file import load_model_file

    plain, residual = build_model("idc_net"), build_model("idc_net", residual=True)
    assert residual.count_params() == plain.count_params()
    adds = [layer.name for layer in residual.layers if isinstance(layer, keras.layers.Add)]
    assert adds == ["add3", "add5"] and not any(isinstance(layer, keras.layers.Add) for layer in plain.layers)
    residual.set_weights(plain.get_weights())  # the same weights, another function: the shortcuts are used
    x = np.random.default_rng(0).integers(0, 256, (4, 50, 50, 3)).astype("float32")
    assert not np.allclose(plain.predict(x, verbose=0), residual.predict(x, verbose=0))
    residual.save(tmp_path / "residual.keras")  # a file of it passes the checks of a model file and loads
    np.testing.assert_allclose(
        load_model_file(tmp_path / "residual.keras").predict(x, verbose=0), residual.predict(x, verbose=0), atol=1e-6
    )


def test_unknown_model_name_is_a_user_error_listing_the_names():
    with pytest.raises(UnknownModelError, match=r"seed_cnn.*idc_net|idc_net.*seed_cnn") as caught:
        build_model("resnet")
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)


def test_compile_uses_adam_and_sparse_crossentropy():
    model = compile_model(build_model("seed_cnn"), learning_rate=1e-3)
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)


_PROBS = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], dtype=np.float32)
_LABELS = np.array([0, 1, 1, 0])


@pytest.mark.parametrize("eps", [0.1, 0.2, 0.5])
def test_label_smoothing_is_the_cross_entropy_of_smoothed_targets(eps):
    target = np.eye(2)[_LABELS] * (1 - eps) + eps / 2  # e.g. label 1 at eps 0.2 -> (0.1, 0.9)
    expected = -(target * np.log(_PROBS)).sum(axis=1).mean()
    assert float(SmoothedSparseCrossentropy(eps)(_LABELS, _PROBS)) == pytest.approx(expected, rel=1e-5)
    # Labels shaped (N, 1), as a dataset may yield them, mean the same.
    assert float(SmoothedSparseCrossentropy(eps)(_LABELS[:, None], _PROBS)) == pytest.approx(expected, rel=1e-5)


def test_no_label_smoothing_is_the_plain_sparse_cross_entropy():
    plain = float(keras.losses.SparseCategoricalCrossentropy()(_LABELS, _PROBS))
    assert plain == pytest.approx(-np.log(_PROBS[np.arange(4), _LABELS]).mean(), rel=1e-5)
    assert float(SmoothedSparseCrossentropy(0.0)(_LABELS, _PROBS)) == pytest.approx(plain, rel=1e-6)
    # compile_model keeps today's loss object at 0, so runs without smoothing are unchanged.
    loss = compile_model(build_model("seed_cnn")).loss
    assert type(loss) is keras.losses.SparseCategoricalCrossentropy
    assert type(compile_model(build_model("seed_cnn"), label_smoothing=0.1).loss) is SmoothedSparseCrossentropy


def test_a_model_compiled_with_label_smoothing_saves_and_loads(tmp_path):
    model = compile_model(build_model("seed_cnn"), label_smoothing=0.2)
    model.save(tmp_path / "m.keras")
    compiled = load_model_file(tmp_path / "m.keras", compile=True)  # what resuming from a checkpoint does
    assert isinstance(compiled.loss, SmoothedSparseCrossentropy) and compiled.loss.smoothing == pytest.approx(0.2)
    assert float(compiled.loss(_LABELS, _PROBS)) == pytest.approx(float(model.loss(_LABELS, _PROBS)), rel=1e-6)
    plain = load_model_file(tmp_path / "m.keras", compile=False)  # what load_run does
    images = np.random.default_rng(0).integers(0, 256, (3, 50, 50, 3)).astype(np.uint8)
    np.testing.assert_allclose(plain.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)


@pytest.mark.parametrize("eps", [-0.1, 1.0, 1.5, float("nan"), "a lot", True])
def test_label_smoothing_outside_0_to_1_is_a_user_error(eps):
    with pytest.raises(LabelSmoothingError, match=r"label smoothing must be a number in \[0, 1\)") as caught:
        compile_model(build_model("seed_cnn"), label_smoothing=eps)
    assert isinstance(caught.value, UserError)
    with pytest.raises(LabelSmoothingError):
        SmoothedSparseCrossentropy(eps)


# --- mixed precision ----------------------------------------------------------------------------------------------


def test_precision_policy_words_and_environment(monkeypatch):
    monkeypatch.delenv("IDC_MIXED_PRECISION", raising=False)
    assert precision_policy(False) == "float32"
    assert precision_policy("float16") == "mixed_float16"
    assert precision_policy("bfloat16") == "mixed_bfloat16"
    monkeypatch.setenv("IDC_MIXED_PRECISION", "0")
    assert precision_policy() == "float32"
    monkeypatch.setenv("IDC_MIXED_PRECISION", "bfloat16")
    assert precision_policy() == "mixed_bfloat16"
    assert precision_policy(False) == "float32"  # the argument wins over the environment
    monkeypatch.setenv("IDC_MIXED_PRECISION", "half")
    with pytest.raises(UserError, match="IDC_MIXED_PRECISION"):
        precision_policy()


def test_automatic_precision_follows_the_gpu(monkeypatch):
    import tensorflow as tf

    monkeypatch.delenv("IDC_MIXED_PRECISION", raising=False)
    expected = "float32"
    capabilities = [
        tf.config.experimental.get_device_details(g).get("compute_capability", (0, 0))
        for g in tf.config.list_physical_devices("GPU")
    ]
    if capabilities and min(capabilities) >= (8, 0):
        expected = "mixed_bfloat16"
    elif capabilities and min(capabilities) >= (7, 0):
        expected = "mixed_float16"
    assert precision_policy() == precision_policy(True) == expected


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_mixed_precision_model_keeps_float32_logits_and_probabilities(name):
    model = build_model(name, mixed_precision="bfloat16")
    assert uses_mixed_precision(model) and not uses_mixed_precision(build_model(name, mixed_precision=False))
    assert model.get_layer("conv1").compute_dtype == "bfloat16"
    assert model.get_layer("conv1").kernel.dtype == "float32"  # weights stay float32
    assert model.get_layer(LOGITS_LAYER).compute_dtype == "float32"
    probs = model.predict_on_batch(np.zeros((2, 50, 50, 3), np.uint8))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(np.asarray(probs).sum(axis=1), 1.0, rtol=1e-5)


def test_float16_model_compiles_with_loss_scaling():
    model = compile_model(build_model("seed_cnn", mixed_precision="float16"))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert not isinstance(
        compile_model(build_model("seed_cnn", mixed_precision="bfloat16")).optimizer,
        keras.optimizers.LossScaleOptimizer,
    )


# --- batch-norm statistics ----------------------------------------------------------------------------------------


def test_recompute_batch_norm_sets_the_average_of_the_batch_statistics():
    keras.utils.set_random_seed(0)
    model = build_model("idc_net", mixed_precision=False)
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, size=(16, 50, 50, 3)).astype(np.float32) for _ in range(3)]
    kernel = np.asarray(model.get_layer("conv1").kernel).copy()
    assert recompute_batch_norm(model, ((b, np.zeros(16)) for b in batches), max_batches=2) == 2
    # bn1 sees conv1 of the scaled input: its moving mean is the mean over the 2 batches of the batch means.
    conv1 = keras.Model(model.input, model.get_layer("conv1").output)
    means = [np.asarray(conv1(b)).mean(axis=(0, 1, 2)) for b in batches[:2]]
    np.testing.assert_allclose(
        np.asarray(model.get_layer("bn1").moving_mean), np.mean(means, axis=0), rtol=1e-4, atol=1e-5
    )
    assert model.get_layer("bn1").momentum == 0.9  # restored
    assert np.array_equal(np.asarray(model.get_layer("conv1").kernel), kernel)  # no weight changed
    assert recompute_batch_norm(build_model("seed_cnn"), batches) == 0


# --- augmentation inside the model ----------------------------------------------------------------------------------


def test_training_augmentation_layer_is_seeded_by_its_batch_count(tmp_path):
    from idc_helpers.pipeline import augment_batch

    model = compile_model(build_model("seed_cnn", augment="strong", augment_seed=3))
    layer = model.get_layer("augment")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(8, 50, 50, 3)).astype(np.float32)
    assert np.array_equal(np.asarray(layer(x, training=False)), x)  # identity at inference: no count
    first, second = np.asarray(layer(x, training=True)), np.asarray(layer(x, training=True))
    assert np.array_equal(first, np.asarray(augment_batch(x, [3, 0], strength="strong")))
    assert np.array_equal(second, np.asarray(augment_batch(x, [3, 1], strength="strong")))
    model.fit(x.astype(np.uint8), np.zeros(8, np.int32), batch_size=4, epochs=1, verbose=0, shuffle=False)
    assert int(layer.batches_seen.numpy()) == 4  # 2 calls above + 2 training steps
    # A saved model (a checkpoint) carries the count; prediction does not augment.
    model.save(tmp_path / "m.keras")
    loaded = load_model_file(tmp_path / "m.keras")
    assert int(loaded.get_layer("augment").batches_seen.numpy()) == 4
    assert loaded.get_layer("augment").strength == "strong"
    np.testing.assert_allclose(loaded.predict_on_batch(x), model.predict_on_batch(x), rtol=1e-6)
    assert "augment" not in [layer.name for layer in build_model("seed_cnn").layers]


def test_augmentation_placement(monkeypatch):
    import tensorflow as tf

    from idc_helpers.models import augmentation_placement

    monkeypatch.delenv("IDC_AUGMENT_ON", raising=False)
    assert augmentation_placement() == ("model" if tf.config.list_physical_devices("GPU") else "pipeline")
    assert augmentation_placement("model") == "model"
    monkeypatch.setenv("IDC_AUGMENT_ON", "pipeline")
    assert augmentation_placement() == "pipeline" and augmentation_placement("model") == "model"
    monkeypatch.setenv("IDC_AUGMENT_ON", "gpu")
    with pytest.raises(UserError, match="IDC_AUGMENT_ON"):
        augmentation_placement()
