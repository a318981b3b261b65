"""Grad-CAM (Selvaraju et al. 2017): where in a 50x50 patch the model found its IDC evidence.

One gradient pass over ``keras.Model(model.inputs, [layer.output, logits])``, as in the keras-io example: the project's
models are Functional, so every layer's symbolic output exists before the first call and after
``keras.models.load_model`` (Sequential models built with an ``Input`` work the same way, branching models too).
The score explained is the IDC *logit* (the log-odds), not the probability: on a confident patch the probability's
gradient is ~0 and its map would be noise.

The maps are returned unscaled, in the units of that logit, so that maps of different patches can be compared on one
colour scale; :func:`idc_helpers.patch_plots.plot_gradcam` draws them that way. Each map's cells are placed at the
centre of their receptive field in the patch (:func:`receptive_field_centres`), not stretched over it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras

#: Smallest spatial size (height and width, in cells) for the default Grad-CAM layer.
MIN_DEFAULT_MAP_SIZE = 9

# Layers that follow a convolution inside one block and keep its shape: the default layer is the block's output.
_BLOCK_FOLLOWERS = ("BatchNormalization", "Activation", "ReLU", "LeakyReLU", "ELU", "PReLU")
_CONV_TYPES = ("Conv2D", "SeparableConv2D", "DepthwiseConv2D")


def conv_layer_names(model: keras.Model) -> list[str]:
    """Names of the convolution layers of ``model``, in order."""
    return [layer.name for layer in model.layers if type(layer).__name__ in _CONV_TYPES]


def default_gradcam_layer(model: keras.Model, min_size: int = MIN_DEFAULT_MAP_SIZE) -> str:
    """The last convolution whose map is at least ``min_size`` cells a side, taken after its batch norm/activation.

    Why not simply the last convolution: the map has the layer's resolution, and in ``seed_cnn`` the last ones are 7x7
    and 5x5 (cells 7-10 px apart on a 50 px patch), which paints a few blobs over a handful of nuclei.
    """
    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    convs = [i for i, layer in enumerate(layers) if type(layer).__name__ in _CONV_TYPES]
    if not convs:
        raise ValueError("the model has no convolution layer for Grad-CAM")
    big = [i for i in convs if min(layers[i].output.shape[1:3]) >= min_size]
    index = big[-1] if big else convs[0]
    while (
        index + 1 < len(layers)
        and type(layers[index + 1]).__name__ in _BLOCK_FOLLOWERS
        and _called_on(layers[index + 1], layers[index])
    ):
        index += 1
    return layers[index].name


def _grad_model(model: keras.Model, layer_name: str) -> tuple[keras.Model, Any]:
    """``keras.Model(model.inputs, [layer output, logits])``, and the last Dense layer if its activation must be undone.

    The layer is returned when its activation must be undone to get the logits (``None`` otherwise).

    A Sequential model is wired anew on a fresh input (same layers, same weights): after ``load_model`` its layers'
    recorded outputs are not connected to ``model.inputs``, and the gradient would be ``None``.
    """
    import keras

    from idc_helpers.models import LOGITS_LAYER  # the pre-softmax layer of the project's models

    inputs = model.inputs
    tensors = {layer.name: (layer.input, layer.output) for layer in model.layers}
    if isinstance(model, keras.Sequential):
        x = inputs = keras.Input(model.inputs[0].shape[1:], dtype=model.inputs[0].dtype)
        for layer in model.layers:
            tensors[layer.name] = (x, x := layer(x))
    last = model.layers[-1]
    activation = last.get_config().get("activation")
    dense = None
    if LOGITS_LAYER in tensors:
        logits = tensors[LOGITS_LAYER][1]
    elif type(last).__name__ == "Softmax" or (type(last).__name__ == "Activation" and activation == "softmax"):
        logits = tensors[last.name][0]
    elif type(last).__name__ == "Dense" and activation in ("softmax", "sigmoid", "linear"):
        logits, dense = tensors[last.name][0], last  # the Dense layer is recomputed without its activation
    else:
        raise ValueError(
            f"cannot find the pre-softmax score: name the Dense layer before the softmax "
            f"{LOGITS_LAYER!r}, or end the model with a Dense layer (softmax, sigmoid or linear)"
        )
    return keras.Model(inputs, [tensors[layer_name][1], logits]), dense


def _idc_score(z: Any, class_index: int) -> Any:
    """The logit of p(class), shape (B,).

    With two softmax outputs the log-odds ``z_c - z_other``, with one sigmoid unit the unit itself (negated for class
    0), with more classes ``z_c``.
    """
    if z.shape[-1] == 1:
        return z[:, 0] if class_index == 1 else -z[:, 0]
    if z.shape[-1] == 2:
        return z[:, class_index] - z[:, 1 - class_index]
    return z[:, class_index]


def gradcam(
    model: keras.Model, images: np.ndarray, *, layer_name: str | None = None, class_index: int = 1, batch_size: int = 64
) -> np.ndarray:
    """Grad-CAM maps of ``class_index`` (1 = IDC) for ``(N, H, W, 3)`` patches (one ``(H, W, 3)`` patch: N = 1).

    Returns ``(N, H, W)`` float32 >= 0: the ReLU of the layer's feature maps weighted by the gradient of the class
    logit (averaged over the map), upsampled bilinearly with each cell at the centre of its receptive field. The
    values are in logit units and are *not* rescaled per patch: a patch with little evidence gets a faint map.
    """
    import tensorflow as tf

    images = np.asarray(images)
    images = images[None] if images.ndim == 3 else images
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, 3), got shape {images.shape}")
    layer_name = layer_name or default_gradcam_layer(model)
    try:
        layer = model.get_layer(layer_name)
    except ValueError:
        raise ValueError(
            f"no layer named {layer_name!r}; convolution layers: {', '.join(conv_layer_names(model))}"
        ) from None
    if len(layer.output.shape) != 4:
        raise ValueError(f"layer {layer_name!r} has output shape {layer.output.shape}; Grad-CAM needs a 4-D map")
    grad_model, dense = _grad_model(model, layer_name)
    maps = []
    for begin in range(0, len(images), batch_size):
        batch = tf.convert_to_tensor(images[begin : begin + batch_size], dtype=tf.float32)
        with tf.GradientTape() as tape:
            features, z = grad_model(batch, training=False)
            if dense is not None:
                z = tf.matmul(z, dense.kernel) + (dense.bias if dense.use_bias else 0.0)
            score = _idc_score(z, class_index)
        weights = tf.reduce_mean(tape.gradient(score, features), axis=(1, 2))
        maps.append(tf.nn.relu(tf.einsum("bhwc,bc->bhw", features, weights)).numpy())
    centres = receptive_field_centres(model, layer_name, images.shape[1:3])
    return np.maximum(upsample(np.concatenate(maps).astype(np.float64), images.shape[1:3], centres), 0.0).astype(
        np.float32
    )


def receptive_field_centres(
    model: keras.Model, layer_name: str, input_hw: tuple[int, int]
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Where the cells of ``layer_name``'s map sit in the input: cell i is centred on pixel ``start + i * step``.

    Returns ``((start_y, start_x), (step_y, step_x))`` from the kernels, strides and paddings of the layers from the
    input to that layer, or ``None`` when they are not a plain chain or a layer changes the size in a way not
    understood here (the caller then stretches the map over the patch).
    """
    start, step, size = [0.0, 0.0], [1.0, 1.0], list(input_hw)  # pixel centres at 0, 1, ..., H - 1
    previous = None
    for layer in model.layers:
        if type(layer).__name__ == "InputLayer":
            continue
        if not _called_on(layer, previous):
            return None  # a branch or a skip connection: the path to this layer is not one chain
        config, out_hw = layer.get_config(), layer.output.shape[1:3]
        kernel = config.get("kernel_size", config.get("pool_size"))
        if kernel is None:
            if len(layer.output.shape) != 4 or list(out_hw) != size:
                return None  # e.g. a resize or crop layer
        else:
            strides, dilation = config.get("strides") or kernel, config.get("dilation_rate", (1, 1))
            for axis in range(2):
                k, s = (kernel[axis] - 1) * dilation[axis] + 1, strides[axis]
                if config.get("padding", "valid") == "same":
                    # TensorFlow pads the extra pixel of an odd total at the end.
                    pad_before = max((math.ceil(size[axis] / s) - 1) * s + k - size[axis], 0) // 2
                    expected = math.ceil(size[axis] / s)
                else:
                    pad_before, expected = 0, (size[axis] - k) // s + 1
                if expected != out_hw[axis]:
                    return None  # a layer whose arithmetic differs from a convolution's
                start[axis] += ((k - 1) / 2 - pad_before) * step[axis]
                step[axis] *= s
            size = list(out_hw)
        previous = layer
        if layer.name == layer_name:
            return (start[0], start[1]), (step[0], step[1])
    return None


def _called_on(layer: Any, previous: Any) -> bool:
    """Whether ``layer`` takes one tensor, made by ``previous`` (``None``: the model's input)."""
    if isinstance(layer.input, (list, tuple, dict)):
        return False
    # Keras records which operation made a symbolic tensor; identity of ``.output`` objects does not survive
    # load_model for Sequential models, this does.
    made_by = layer.input._keras_history.operation
    return type(made_by).__name__ == "InputLayer" if previous is None else made_by is previous


def _interpolation_matrix(n_out: int, n_cells: int, start: float, step: float) -> np.ndarray:
    """(n_out, n_cells) bilinear weights: output pixel u samples the cell grid at (u - start) / step (edges clamped)."""
    coords = np.clip((np.arange(n_out) - start) / step, 0, n_cells - 1)
    low = np.floor(coords).astype(int)
    high = np.minimum(low + 1, n_cells - 1)
    frac = coords - low
    matrix = np.zeros((n_out, n_cells))
    np.add.at(matrix, (np.arange(n_out), low), 1 - frac)
    np.add.at(matrix, (np.arange(n_out), high), frac)
    return matrix


def upsample(
    cams: np.ndarray, out_hw: tuple[int, int], centres: tuple[tuple[float, float], tuple[float, float]] | None
) -> np.ndarray:
    """``(N, h, w)`` maps -> ``(N, H, W)``, bilinear, cell centres at ``centres``.

    ``centres`` comes from :func:`receptive_field_centres`; ``None`` spreads them evenly over the patch, as an image
    resize does.
    """
    h, w = cams.shape[1:]
    if centres is None:
        centres = ((out_hw[0] / h / 2 - 0.5, out_hw[1] / w / 2 - 0.5), (out_hw[0] / h, out_hw[1] / w))
    (start_y, start_x), (step_y, step_x) = centres
    rows = _interpolation_matrix(out_hw[0], h, start_y, step_y)
    cols = _interpolation_matrix(out_hw[1], w, start_x, step_x)
    return np.einsum("yi,nij,xj->nyx", rows, cams, cols)


def overlay(
    image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, cmap: str = "jet", vmax: float = 1.0
) -> np.ndarray:
    """Blend a heatmap over a patch: ``(H, W, 3)`` uint8 RGB + ``(H, W)`` -> ``(H, W, 3)`` uint8 RGB.

    The heatmap is coloured on the scale 0..``vmax`` (values above are clipped). Batches work too: ``(N, H, W, 3)``
    with ``(N, H, W)``. ``alpha`` is the heatmap's opacity.
    """
    import matplotlib

    image = np.asarray(image)
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if image.shape[:-1] != heatmap.shape or image.shape[-1] != 3:
        raise ValueError(f"image {image.shape} and heatmap {heatmap.shape} do not match ((H, W, 3) and (H, W))")
    scaled = np.clip(np.nan_to_num(heatmap) / vmax, 0, 1) if vmax > 0 else np.zeros_like(heatmap)
    colours = matplotlib.colormaps[cmap](scaled)[..., :3] * 255.0
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
