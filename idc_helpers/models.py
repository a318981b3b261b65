"""Models, chosen by name: the reference ``seed_cnn`` and our own ``idc_net``.

Both take raw patches, ``(N, 50, 50, 3)`` RGB with values 0..255 (uint8 or float), and scale them to [0, 1]
inside the model (a ``Rescaling`` layer with no weights), so a saved model needs no preprocessing code.
Both end in a linear ``logits`` layer followed by a separate softmax layer ``probs``: Grad-CAM explains the
IDC logit before the softmax, where the gradient does not vanish on confident patches.

Layers are named explicitly (Keras' automatic names shift when a second model is built in the same process),
and the models are Functional so that ``model.inputs`` / ``layer.output`` exist before the first call and
survive ``keras.models.load_model``.

=========  ==========  ===================================================================================
name       parameters  design
=========  ==========  ===================================================================================
seed_cnn   105,234     the reference network: six valid 3x3 ReLU convolutions (16,16,32,32,64,64) with a
                       2x2 max pool after each pair, Flatten, Dense 128 ReLU, Dense 2 softmax.
idc_net    272,482     ours: batch-normalised 3x3 convolutions (32 | 48,48 | 96,96 | 128, "same" padding,
                       no bias) with max pooling between stages, global average pooling, dropout 0.3,
                       Dense 2 (271,586 trainable + 896 batch-norm statistics).
=========  ==========  ===================================================================================

Why ``idc_net`` looks like this: batch norm lets Adam use a higher learning rate and converge in a few epochs
(the CPU budget is minutes, not hours); "same" padding keeps the border pixels that a 50-pixel patch cannot
spare; global average pooling instead of Flatten makes the head tolerant to where a structure sits in the patch
(patches are cut from a fixed grid) and keeps the parameter count small. A convolution at the full 50x50 resolution
costs 4x the same one at 25x25, so only the first, narrow one runs there: a forward pass is about 46 million
multiply-adds, 3.5x the reference network's 13 million. How the two compare in accuracy and speed is measured in
docs/results.md, with the commands that reproduce the figures.

Mixed precision: on GPUs that gain from it (compute capability 7.0 or more) the layers compute in float16
(bfloat16 from 8.0), with float32 weights; the logits and the softmax stay float32. ``mixed_precision=`` of
:func:`build_model` or the environment variable ``IDC_MIXED_PRECISION`` (``0`` turns it off) decide; see
:func:`precision_policy`. The choice is per model, never Keras' global policy.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import keras
from keras import layers

from idc_helpers import PATCH_SIZE
from idc_helpers.errors import UserError
from idc_helpers.pipeline import augment_batch, augment_setting

N_CLASSES = 2
LOGITS_LAYER = "logits"
PROBS_LAYER = "probs"
INPUT_LAYER = "patch"
AUGMENT_LAYER = "augment"
DEFAULT_MODEL = "idc_net"
DEFAULT_LEARNING_RATE = {"seed_cnn": 1e-3, "idc_net": 2e-3}
# Values of IDC_MIXED_PRECISION / ``mixed_precision=`` and the Keras dtype policy each one means.
_PRECISION_WORDS = {
    "0": "float32",
    "off": "float32",
    "false": "float32",
    "no": "float32",
    "float32": "float32",
    "float16": "mixed_float16",
    "mixed_float16": "mixed_float16",
    "bfloat16": "mixed_bfloat16",
    "mixed_bfloat16": "mixed_bfloat16",
}


class UnknownModelError(UserError, ValueError):
    """A model name that :func:`build_model` does not know (the message lists the known ones)."""


def precision_policy(mixed_precision: bool | str | None = None) -> str:
    """The Keras dtype policy a new model gets: ``"float32"``, ``"mixed_float16"`` or ``"mixed_bfloat16"``.

    ``mixed_precision``: ``False`` -> float32; a policy name (``"float16"``, ``"bfloat16"``, ``"float32"``, or
    the ``mixed_`` forms) -> that one; ``True`` or ``None`` -> automatic. ``None`` first reads the environment
    variable ``IDC_MIXED_PRECISION`` (same words; ``0``/``off`` turns it off, ``1``/``auto`` is automatic).
    Automatic: ``mixed_bfloat16`` on a GPU of compute capability >= 8.0, ``mixed_float16`` on 7.x (tensor cores
    without bfloat16, e.g. the T4), float32 otherwise (no GPU, older GPUs, CPUs: no gain there).
    """
    if mixed_precision is None:
        mixed_precision = os.environ.get("IDC_MIXED_PRECISION", "auto")
    if mixed_precision is False:
        return "float32"
    if isinstance(mixed_precision, str) and mixed_precision.strip().lower() not in ("1", "on", "true", "auto", ""):
        word = mixed_precision.strip().lower()
        if word not in _PRECISION_WORDS:
            raise UserError(
                f"unknown mixed precision setting {mixed_precision!r} (from IDC_MIXED_PRECISION or "
                f"mixed_precision=); use one of 0, auto, {', '.join(sorted(set(_PRECISION_WORDS) - {'0'}))}"
            )
        return _PRECISION_WORDS[word]
    capability = _gpu_compute_capability()
    if capability >= (8, 0):
        return "mixed_bfloat16"
    return "mixed_float16" if capability >= (7, 0) else "float32"


def augmentation_placement(placement: str | None = None) -> str:
    """Where training augments: ``"pipeline"`` or ``"model"``.

    ``"pipeline"`` augments in the CPU's tf.data workers (:func:`idc_helpers.pipeline.make_dataset`), ``"model"`` in a
    :class:`TrainingAugmentation` layer, on the accelerator.

    ``placement``: one of those, or ``None``/``"auto"``; ``None`` first reads the environment variable
    ``IDC_AUGMENT_ON``. Automatic: ``"model"`` when a GPU is visible (a 2-core pipeline augments far fewer
    patches/s than it gathers raw ones, see ``python -m idc_helpers.bench speed``), else ``"pipeline"`` (on a CPU
    both compete for the same cores and measured alike).
    """
    word = (os.environ.get("IDC_AUGMENT_ON", "auto") if placement is None else placement).strip().lower()
    if word in ("pipeline", "model"):
        return word
    if word not in ("auto", ""):
        raise UserError(
            f"unknown augmentation placement {word!r} (from IDC_AUGMENT_ON or placement=); use pipeline, model or auto"
        )
    return "model" if _has_gpu() else "pipeline"


def _has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _gpu_compute_capability() -> tuple[int, int]:
    """The lowest compute capability of the visible GPUs, ``(0, 0)`` without one."""
    import tensorflow as tf

    found = []
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability:
            found.append(tuple(capability))
    return min(found) if found else (0, 0)


@keras.saving.register_keras_serializable(package="idc_helpers")
class TrainingAugmentation(layers.Layer):
    """Augmentation inside the model, on the model's device; the identity at inference.

    While training, :func:`idc_helpers.pipeline.augment_batch` of each batch, seeded by ``(seed, batches augmented so
    far)``.

    The count is a (non-trainable) model variable, so a checkpoint of the model carries it and a resumed run
    continues the same sequence of augmentations. On a GPU this takes the augmentation's arithmetic off the CPU,
    whose input pipeline then only gathers pixels (see ``python -m idc_helpers.bench speed``).
    """

    def __init__(self, strength: str = "mild", seed: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")  # pixel arithmetic in float32 under any mixed-precision policy
        super().__init__(**kwargs)
        self.strength = augment_setting(strength)
        if self.strength == "none":
            raise UserError("TrainingAugmentation needs a strength other than 'none'")
        self.seed = int(seed)
        self.batches_seen = self.add_weight(
            name="batches_seen", shape=(), dtype="int64", initializer="zeros", trainable=False
        )

    def call(self, inputs, training=None):
        """``inputs`` augmented while ``training`` (counting the batch), else only cast to the compute dtype."""
        import tensorflow as tf

        if not training:
            return tf.cast(inputs, self.compute_dtype)
        step = tf.identity(self.batches_seen)
        self.batches_seen.assign_add(1)
        return augment_batch(inputs, tf.stack([tf.constant(self.seed, tf.int64), step]), strength=self.strength)

    def compute_output_shape(self, input_shape):
        """The input's shape: augmentation keeps the patch size."""
        return input_shape

    def get_config(self) -> dict[str, Any]:
        """The layer's config with its ``strength`` and ``seed``, for saving."""
        return {**super().get_config(), "strength": self.strength, "seed": self.seed}


def _inputs(policy: str, augment: str | None, augment_seed: int) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    # float32 input: uint8 arrays are cast on the way in, so both raw dtypes work.
    inputs = keras.Input(shape=(PATCH_SIZE, PATCH_SIZE, 3), name=INPUT_LAYER)
    x = inputs
    if augment_setting(augment) != "none":
        x = TrainingAugmentation(augment, augment_seed, name=AUGMENT_LAYER)(x)
    scaled = layers.Rescaling(1.0 / 255.0, name="rescale", dtype=policy)(x)
    return inputs, scaled


def _head(x: keras.KerasTensor) -> keras.KerasTensor:
    # float32 logits and softmax under a mixed-precision policy: probabilities exact enough for thresholds, and
    # the logit that Grad-CAM differentiates in full precision.
    logits = layers.Dense(N_CLASSES, name=LOGITS_LAYER, dtype="float32")(x)
    return layers.Activation("softmax", dtype="float32", name=PROBS_LAYER)(logits)


def build_seed_cnn(*, policy: str = "float32", augment: bool | str | None = None, augment_seed: int = 0) -> keras.Model:
    """The reference CNN: ``(N, 50, 50, 3)`` 0..255 -> ``(N, 2)`` class probabilities; 105,234 parameters.

    Output shapes 48, 46, 23, 21, 19, 9, 7, 5, 2 (conv1, conv2, pool1, conv3, conv4, pool2, conv5, conv6, pool3).
    ``policy``: the Keras dtype policy of the layers before the logits (see :func:`precision_policy`).
    ``augment``: see :func:`build_model`.
    """
    inputs, x = _inputs(policy, augment, augment_seed)
    for block, filters in enumerate((16, 32, 64)):
        for j in range(2):
            x = layers.Conv2D(
                filters, 3, padding="valid", activation="relu", name=f"conv{2 * block + j + 1}", dtype=policy
            )(x)
        x = layers.MaxPooling2D(2, name=f"pool{block + 1}", dtype=policy)(x)
    x = layers.Flatten(name="flatten", dtype=policy)(x)
    x = layers.Dense(128, activation="relu", name="dense", dtype=policy)(x)
    return keras.Model(inputs, _head(x), name="seed_cnn")


def build_idc_net(
    *,
    width: int = 1,
    dropout: float = 0.3,
    bn_momentum: float = 0.9,
    bn_epsilon: float = 1e-3,
    residual: bool = False,
    policy: str = "float32",
    augment: bool | str | None = None,
    augment_seed: int = 0,
) -> keras.Model:
    """Our CPU-sized CNN: ``(N, 50, 50, 3)`` 0..255 -> ``(N, 2)`` class probabilities; 272,482 parameters.

    ``width`` multiplies every filter count (1 is the measured default). ``bn_momentum``: the batch-norm
    moving-average momentum; the moving statistics remember about ``1 / (1 - bn_momentum)`` batches (10 at 0.9,
    Keras' 0.99 needs some hundred steps to settle, more than a short run has). ``bn_epsilon``: added to the batch
    variance. ``policy``: the Keras dtype policy of the layers before the logits (see :func:`precision_policy`).
    ``augment``: see :func:`build_model`. Stages: conv1 32 @50x50 -> pool 25 -> conv2, conv3 48 @25 -> pool 12 ->
    conv4, conv5 96 @12 -> pool 6 -> conv6 128 @6 -> global average pool. ``residual``: conv3 and conv5, which keep
    their input's filters, add that input before their ReLU (``add3``, ``add5``): the same parameters, a shortcut.
    """
    inputs, x = _inputs(policy, augment, augment_seed)
    plan = [(32, True), (48, False), (48, True), (96, False), (96, True), (128, False)]
    previous = None
    for i, (filters, pool_after) in enumerate(plan, start=1):
        shortcut = x if residual and filters == previous else None
        previous = filters
        # No conv bias: batch norm's beta does that job.
        x = layers.Conv2D(filters * width, 3, padding="same", use_bias=False, name=f"conv{i}", dtype=policy)(x)
        x = layers.BatchNormalization(momentum=bn_momentum, epsilon=bn_epsilon, name=f"bn{i}", dtype=policy)(x)
        if shortcut is not None:
            x = layers.Add(name=f"add{i}", dtype=policy)([x, shortcut])
        x = layers.Activation("relu", name=f"relu{i}", dtype=policy)(x)
        if pool_after:
            x = layers.MaxPooling2D(2, name=f"pool{(i + 1) // 2}", dtype=policy)(x)
    x = layers.GlobalAveragePooling2D(name="gap", dtype=policy)(x)
    x = layers.Dropout(dropout, name="dropout", dtype=policy)(x)
    return keras.Model(inputs, _head(x), name="idc_net")


_BUILDERS: dict[str, Callable[..., keras.Model]] = {"seed_cnn": build_seed_cnn, "idc_net": build_idc_net}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str = DEFAULT_MODEL, *, mixed_precision: bool | str | None = None, **kwargs: Any) -> keras.Model:
    """Build the named model (uncompiled).

    ``mixed_precision``: see :func:`precision_policy` (default: automatic, ``IDC_MIXED_PRECISION`` first). ``kwargs`` go
    to its builder: both take ``augment`` (a strength of :func:`idc_helpers.pipeline.augment_setting`: a
    :class:`TrainingAugmentation` layer after the input, which augments while training and is the identity otherwise;
    default none) and ``augment_seed``; ``idc_net`` also ``width``, ``dropout``, ``bn_momentum``, ``bn_epsilon``,
    ``residual``. A name
    not in :data:`MODEL_NAMES` raises :class:`UnknownModelError`.
    """
    try:
        builder = _BUILDERS[name]
    except (KeyError, TypeError):
        raise UnknownModelError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}") from None
    return builder(policy=precision_policy(mixed_precision), **kwargs)


#: Builder arguments that a run sets itself, never through ``model_kwargs``.
_SET_BY_THE_RUN = ("policy", "augment", "augment_seed")


def check_model_kwargs(name: str, kwargs: Any, source: str) -> None:
    """``kwargs`` (a run's ``model_kwargs``) hold only options of model ``name``'s builder, each of an allowed value.

    Numbers go through :func:`idc_helpers.validation.check_value` (exact types: text is not a number here),
    ``residual`` must be true or false, ``mixed_precision`` a value :func:`precision_policy` takes. Raises
    :class:`~idc_helpers.validation.InvalidInputError` naming the key, ``source`` and what is allowed.
    """
    import inspect
    import numbers

    from idc_helpers.validation import NUMBERS, InvalidInputError, check_value

    if not isinstance(kwargs, dict):
        raise InvalidInputError(f"model_kwargs ({source}) must be a JSON object of builder options, not {kwargs!r}")
    builder = _BUILDERS[name]
    options = [p for p in inspect.signature(builder).parameters if p not in _SET_BY_THE_RUN]
    for key, value in kwargs.items():
        if key == "mixed_precision":
            try:
                if value is not None and not isinstance(value, (bool, str)):
                    raise UserError("use true, false, auto or a policy name")
                precision_policy(value if value is not None else False)
            except UserError as exc:
                raise InvalidInputError(f"model_kwargs.mixed_precision {value!r} ({source}): {exc}") from None
        elif key not in options:
            raise InvalidInputError(
                f"model_kwargs.{key} ({source}) is not an option of {name}: "
                f"use {', '.join([*options, 'mixed_precision'])}"
            )
        elif key in NUMBERS:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InvalidInputError(f"model_kwargs.{key} {value!r} ({source}) is not a number")
            check_value(key, value, source)
        elif not isinstance(value, bool):
            raise InvalidInputError(f"model_kwargs.{key} {value!r} ({source}): use true or false")


def uses_mixed_precision(model: keras.Model) -> bool:
    """Whether any layer of ``model`` computes in float16 or bfloat16."""
    return any(layer.dtype_policy.compute_dtype in ("float16", "bfloat16") for layer in model.layers)


class LabelSmoothingError(UserError, ValueError):
    """A label-smoothing factor outside [0, 1)."""


def label_smoothing_setting(label_smoothing: float) -> float:
    """``label_smoothing`` as a float in [0, 1) (0: plain cross-entropy).

    Anything else raises :class:`LabelSmoothingError`. At 1 every target would be uniform, leaving nothing to learn.
    """
    try:
        eps = float(label_smoothing)
    except (TypeError, ValueError):
        eps = float("nan")
    if isinstance(label_smoothing, bool) or not 0.0 <= eps < 1.0:  # NaN fails the comparison too
        raise LabelSmoothingError(
            f"label smoothing must be a number in [0, 1), got {label_smoothing!r}; "
            "0.1 is the usual choice, 0 turns it off"
        )
    return eps


@keras.saving.register_keras_serializable(package="idc_helpers")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of softmax outputs ``(N, C)`` against smoothed integer labels ``(N,)``.

    The labels are smoothed to ``(1 - smoothing) * one_hot + smoothing / C`` (Szegedy et al. 2016): the model is never
    pushed to certainty, which can keep its probabilities less extreme on patients unlike the training ones.
    """

    def __init__(self, smoothing: float = 0.1, name: str = "smoothed_sparse_crossentropy", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.smoothing = label_smoothing_setting(smoothing)

    def call(self, y_true, y_pred):
        """Per-sample cross-entropy of ``y_pred`` ``(N, C)`` against the smoothed targets of ``y_true`` ``(N,)``."""
        n_classes = keras.ops.shape(y_pred)[-1]
        labels = keras.ops.reshape(keras.ops.cast(y_true, "int32"), [-1])
        target = keras.ops.one_hot(labels, n_classes) * (1.0 - self.smoothing) + self.smoothing / n_classes
        return keras.losses.categorical_crossentropy(target, y_pred)

    def get_config(self) -> dict[str, Any]:
        """The loss's config with its ``smoothing``, for saving."""
        return {**super().get_config(), "smoothing": self.smoothing}


def compile_model(
    model: keras.Model,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = 1e-3,
    label_smoothing: float = 0.0,
    ema_momentum: float | None = None,
) -> keras.Model:
    """Compile with Adam and sparse categorical cross-entropy on the softmax output (labels int 0/1).

    With ``label_smoothing`` in (0, 1), :class:`SmoothedSparseCrossentropy` instead (outside [0, 1):
    :class:`LabelSmoothingError`).

    With ``ema_momentum`` (in [0, 1)), the optimizer also keeps an exponential moving average of the weights, which
    ``fit`` writes into the model when it ends (Keras' ``use_ema``); the average spans about
    ``1 / (1 - ema_momentum)`` steps. A model with float16 layers gets Keras' dynamic loss scaling (small float16
    gradients would underflow to 0).
    """
    label_smoothing = label_smoothing_setting(label_smoothing)
    if ema_momentum is None:
        optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=learning_rate, use_ema=True, ema_momentum=float(ema_momentum))
    if any(layer.dtype_policy.compute_dtype == "float16" for layer in model.layers):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=optimizer,
        loss=(
            SmoothedSparseCrossentropy(label_smoothing)
            if label_smoothing
            else keras.losses.SparseCategoricalCrossentropy()
        ),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model


def recompute_batch_norm(model: keras.Model, batches: Iterable[Any], *, max_batches: int = 100) -> int:
    """Replace every batch-norm layer's moving statistics by the plain average of its batch statistics ("precise BN").

    The moving mean and variance become averages over ``batches`` under the model's current weights (Wu & Johnson 2021);
    returns the number of batches used.

    The moving averages that training keeps mix statistics of weights from many steps back; after a large
    learning-rate step they can lag the weights and swing the validation loss from epoch to epoch. Called between
    training and validation (e.g. at each epoch's end) on training batches, this makes the inference statistics
    match the weights being validated. ``batches``: images ``(B, 50, 50, 3)`` or ``(images, labels)`` tuples,
    e.g. ``make_dataset(..., shuffle=False, augment=False)``; at most ``max_batches`` are read. Dropout runs in
    training mode meanwhile; no weight changes. A model without batch norm is left as it is (returns 0).
    """
    norms = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    if not norms:
        return 0
    momenta = [layer.momentum for layer in norms]
    used = 0
    try:
        for batch in batches:
            if used >= max_batches:
                break
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            # moving = moving * m + batch * (1 - m) with m = k / (k + 1) keeps the mean of the first k + 1 batches.
            for layer in norms:
                layer.momentum = used / (used + 1)
            model(images, training=True)
            used += 1
    finally:
        for layer, momentum in zip(norms, momenta, strict=True):
            layer.momentum = momentum
    return used
