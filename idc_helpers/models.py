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
multiply-adds, 3.5x the reference network's 13 million.

Measured on the shared sample (2-core CPU, patient split seed 0, at most 10 epochs, 4 test patients never seen):
test F1 0.77 / balanced accuracy 0.88 / ROC AUC 0.944 for ``idc_net`` against 0.72 / 0.82 / 0.930 for
``seed_cnn``, at about 250-440 training patches/s (``seed_cnn``: 1,000-1,500), i.e. 40-75 s per epoch of 18k
patches. In 4-fold patient cross-validation over all 29 patients (``python -m idc_helpers.bench quality``, docs/results.md)
the two are indistinguishable: pooled F1 0.667 / balanced accuracy 0.813 (``idc_net``) against 0.664 / 0.805.
"""

from __future__ import annotations

from typing import Any, Callable

import keras
from keras import layers

INPUT_SHAPE = (50, 50, 3)
N_CLASSES = 2
IDC_CLASS = 1
LOGITS_LAYER = "logits"
PROBS_LAYER = "probs"
INPUT_LAYER = "patch"

# Conv2D layers of each model, first to last (Grad-CAM can use any of them).
CONV_LAYERS: dict[str, tuple[str, ...]] = {
    "seed_cnn": ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6"),
    "idc_net": ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6"),
}
# The layer whose output is each convolution's rectified feature map (the usual Grad-CAM target). In seed_cnn
# the ReLU is part of the Conv2D; in idc_net it comes after batch norm.
FEATURE_LAYERS: dict[str, tuple[str, ...]] = {
    "seed_cnn": CONV_LAYERS["seed_cnn"],
    "idc_net": ("relu1", "relu2", "relu3", "relu4", "relu5", "relu6"),
}
DEFAULT_MODEL = "idc_net"
DEFAULT_LEARNING_RATE = {"seed_cnn": 1e-3, "idc_net": 2e-3}


def _inputs() -> tuple[keras.KerasTensor, keras.KerasTensor]:
    # float32 input: uint8 arrays are cast on the way in, so both raw dtypes work.
    inputs = keras.Input(shape=INPUT_SHAPE, name=INPUT_LAYER)
    scaled = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    return inputs, scaled


def _head(x: keras.KerasTensor) -> keras.KerasTensor:
    logits = layers.Dense(N_CLASSES, name=LOGITS_LAYER)(x)
    # float32 softmax even under a mixed-precision policy, so probabilities are exact enough for thresholds.
    return layers.Activation("softmax", dtype="float32", name=PROBS_LAYER)(logits)


def build_seed_cnn() -> keras.Model:
    """The reference CNN: ``(N, 50, 50, 3)`` 0..255 -> ``(N, 2)`` class probabilities; 105,234 parameters.

    Output shapes 48, 46, 23, 21, 19, 9, 7, 5, 2 (conv1, conv2, pool1, conv3, conv4, pool2, conv5, conv6, pool3).
    """
    inputs, x = _inputs()
    for block, filters in enumerate((16, 32, 64)):
        for j in range(2):
            x = layers.Conv2D(filters, 3, padding="valid", activation="relu", name=f"conv{2 * block + j + 1}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{block + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, activation="relu", name="dense")(x)
    return keras.Model(inputs, _head(x), name="seed_cnn")


def build_idc_net(*, width: int = 1, dropout: float = 0.3, bn_momentum: float = 0.9) -> keras.Model:
    """Our CPU-sized CNN: ``(N, 50, 50, 3)`` 0..255 -> ``(N, 2)`` class probabilities; 272,482 parameters.

    ``width`` multiplies every filter count (1 is the measured default); ``bn_momentum`` is the batch-norm
    moving-average momentum. 0.9 rather than Keras' 0.99: on a small set (the demo data, ~13 steps an epoch) the
    0.99 moving statistics had not settled after 5 epochs and the validation ROC AUC fell to 0.01, while 0.9 reached
    0.998; on two folds of the real sample the change moved F1 by +0.022 and -0.020.
    Stages: conv1 32 @50x50 -> pool 25 -> conv2, conv3 48 @25 -> pool 12 -> conv4, conv5 96 @12 -> pool 6 -> conv6 128 @6 -> global average pool.
    """
    inputs, x = _inputs()
    plan = [(32, True), (48, False), (48, True), (96, False), (96, True), (128, False)]
    for i, (filters, pool_after) in enumerate(plan, start=1):
        # No conv bias: batch norm's beta does that job.
        x = layers.Conv2D(filters * width, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"bn{i}")(x)
        x = layers.Activation("relu", name=f"relu{i}")(x)
        if pool_after:
            x = layers.MaxPooling2D(2, name=f"pool{(i + 1) // 2}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    return keras.Model(inputs, _head(x), name="idc_net")


_BUILDERS: dict[str, Callable[..., keras.Model]] = {"seed_cnn": build_seed_cnn, "idc_net": build_idc_net}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str = DEFAULT_MODEL, **kwargs: Any) -> keras.Model:
    """Build the named model (uncompiled); ``kwargs`` go to its builder (``idc_net``: ``width``, ``dropout``, ``bn_momentum``)."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}") from None
    return builder(**kwargs)


def compile_model(
    model: keras.Model,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = 1e-3,
) -> keras.Model:
    """Compile with Adam and sparse categorical cross-entropy on the softmax output (labels int 0/1)."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    return model
