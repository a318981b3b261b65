"""Grad-CAM (Selvaraju et al. 2017) for the patch classifiers: where in a 50x50 patch the IDC evidence lies.

The gradient is computed by re-tracing the model's layers one after the other on the input batch under a
``tf.GradientTape``, capturing the chosen layer's output on the way. This avoids the Keras 3 pitfalls of building a
second model from ``model.inputs``/``layer.output``: a Sequential model has no symbolic output until it has been
called ("has never been called"), and after ``keras.models.load_model`` the layers' ``.output`` tensors belong to a
graph that is not connected to the loaded model's input, so gradients come back ``None``. Layers are taken from
``model.layers``, so nothing depends on automatic names (``conv2d_6``...).

Limitation: the model must be a plain chain (each layer feeds the next, as in ``seed_cnn`` and ``idc_net``).
Models with branches (residual additions, concatenations) are detected - the re-traced output would differ from
``model(images)`` - and refused with an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras

#: Smallest spatial size (height and width, in cells) for the default Grad-CAM layer.
MIN_DEFAULT_MAP_SIZE = 9

# Layers that come right after a convolution inside one "conv block" and keep its shape: the default Grad-CAM layer
# is the block's output (after batch norm and activation), which is what the next block sees.
_BLOCK_FOLLOWERS = ("BatchNormalization", "Activation", "ReLU", "LeakyReLU", "ELU", "PReLU")


@dataclass(frozen=True)
class _Geometry:
    """Where the cells of a layer's feature map sit in the input: cell i is centred on input pixel start + i * step."""

    start: tuple[float, float]
    step: tuple[float, float]


def _chain_layers(model: keras.Model) -> list[Any]:
    """The model's layers in call order, without the input layer."""
    import keras

    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def _is_conv(layer: Any) -> bool:
    import keras

    return isinstance(layer, (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D))


_NOT_A_CHAIN = (
    "gradcam re-traces the model's layers one after the other, and that does not reproduce this model: it is not a "
    "plain chain of layers (branches, skip connections or several outputs), which is not supported")


def _retrace(layers: list[Any], x: Any, *, watch_index: int | None = None, tape: Any = None) -> list[Any]:
    """Call every layer on the previous one's output; returns each layer's output (``tape`` watches one of them)."""
    outputs = []
    for i, layer in enumerate(layers):
        try:
            x = layer(x, training=False)
        except (TypeError, ValueError) as exc:  # e.g. an Add layer given one tensor
            raise ValueError(f"{_NOT_A_CHAIN} (layer {layer.name!r}: {exc})") from exc
        if i == watch_index and tape is not None:
            tape.watch(x)
        outputs.append(x)
    return outputs


def _spatial_shapes(model: keras.Model, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Output shape of every chain layer for one dummy input (works for Sequential, Functional and loaded models)."""
    import tensorflow as tf

    outputs = _retrace(_chain_layers(model), tf.zeros((1, *input_shape), dtype=tf.float32))
    return [tuple(int(d) for d in out.shape) for out in outputs]


def conv_layer_names(model: keras.Model) -> list[str]:
    """Names of the convolution layers of ``model``, in order."""
    return [layer.name for layer in _chain_layers(model) if _is_conv(layer)]


def default_gradcam_layer(model: keras.Model, input_shape: tuple[int, int, int] = (50, 50, 3),
                          min_size: int = MIN_DEFAULT_MAP_SIZE) -> str:
    """Name of the layer whose output Grad-CAM explains by default.

    The last convolution whose feature map is at least ``min_size`` x ``min_size`` cells, taken after the batch norm
    and activation that follow it. Why not simply the last convolution: Grad-CAM's map has the resolution of the
    layer, and in ``seed_cnn`` the last convolution (``conv6``) is 5x5 and ``conv5`` 7x7, i.e. cells of 7-10 px
    on a 50 px patch, which paints a few blobs over a patch that holds only a handful of nuclei. ``conv4`` (19x19,
    cells ~2.6 px apart, receptive field 18 px) is the deepest layer that still resolves nucleus-sized structures, and
    it is deep enough to be class-specific. Any 4-D layer can still be chosen by name in :func:`gradcam`.
    """
    layers = _chain_layers(model)
    shapes = _spatial_shapes(model, input_shape)
    candidates = [i for i, layer in enumerate(layers) if _is_conv(layer)]
    if not candidates:
        raise ValueError("the model has no convolution layer for Grad-CAM")
    big_enough = [i for i in candidates if min(shapes[i][1:3]) >= min_size]
    index = big_enough[-1] if big_enough else candidates[0]
    while (index + 1 < len(layers) and type(layers[index + 1]).__name__ in _BLOCK_FOLLOWERS
           and shapes[index + 1] == shapes[index]):
        index += 1
    return layers[index].name


def _geometry(layers: list[Any], shapes: list[tuple[int, ...]], upto: int,
              input_hw: tuple[int, int]) -> _Geometry | None:
    """Receptive-field centres of layer ``upto``'s cells, from the kernels, strides and paddings of the chain.

    Returns ``None`` when a layer changes the spatial size in a way not understood here (the caller then stretches
    the map over the patch instead).
    """
    start = [0.0, 0.0]  # centre of cell 0, in input pixels (pixel centres at 0, 1, ..., 49)
    step = [1.0, 1.0]
    size = list(input_hw)
    for layer, shape in zip(layers[: upto + 1], shapes[: upto + 1]):
        out_hw = shape[1:3]
        config = layer.get_config()
        kernel = config.get("kernel_size", config.get("pool_size"))
        if kernel is None:
            if len(shape) != 4 or tuple(out_hw) != tuple(size):
                return None  # e.g. a resize or crop layer
            continue
        strides = config.get("strides") or kernel
        dilation = config.get("dilation_rate", (1, 1))
        for axis in range(2):
            k = (kernel[axis] - 1) * dilation[axis] + 1
            s = strides[axis]
            if config.get("padding", "valid") == "same":
                # TensorFlow pads the extra pixel of an odd total at the end.
                total = max((math.ceil(size[axis] / s) - 1) * s + k - size[axis], 0)
                pad_before = total // 2
                expected = math.ceil(size[axis] / s)
            else:
                pad_before = 0
                expected = (size[axis] - k) // s + 1
            if expected != out_hw[axis]:
                return None  # a layer type whose arithmetic differs from a convolution's
            start[axis] += ((k - 1) / 2 - pad_before) * step[axis]
            step[axis] *= s
        size = list(out_hw)
    return _Geometry(start=(start[0], start[1]), step=(step[0], step[1]))


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


def _upsample(cams: np.ndarray, out_hw: tuple[int, int], geometry: _Geometry | None) -> np.ndarray:
    """(N, h, w) maps -> (N, H, W), bilinear, each cell placed at the centre of its receptive field."""
    h, w = cams.shape[1:]
    if geometry is None:
        # Plain stretch over the patch (cell centres spread evenly, as an image resize does).
        geometry = _Geometry(start=(out_hw[0] / h / 2 - 0.5, out_hw[1] / w / 2 - 0.5),
                             step=(out_hw[0] / h, out_hw[1] / w))
    rows = _interpolation_matrix(out_hw[0], h, geometry.start[0], geometry.step[0])
    cols = _interpolation_matrix(out_hw[1], w, geometry.start[1], geometry.step[1])
    return np.einsum("yi,nij,xj->nyx", rows, cams, cols)


def _log_odds(logits: Any, class_index: int) -> Any:
    """Score of ``class_index`` from (B, K) pre-softmax logits, shape (B,).

    With two classes, softmax gives p_c = sigmoid(z_c - z_other): the log-odds z_c - z_other is *the* logit of the
    class, and the only thing the prediction depends on (adding a constant to both logits changes nothing). Using z_c
    alone would miss a model that puts its evidence into the other logit. With more classes, z_c is used.
    """
    if logits.shape[-1] == 2:
        return logits[:, class_index] - logits[:, 1 - class_index]
    return logits[:, class_index]


def _class_score(layers: list[Any], outputs: list[Any], class_index: int) -> Any:
    """The pre-softmax score of ``class_index``, shape (B,), from the re-traced outputs of every chain layer."""
    import keras
    import tensorflow as tf

    for layer, out in zip(layers, outputs):
        if layer.name == "logits":
            return _log_odds(out, class_index)
    last = layers[-1]
    if isinstance(last, (keras.layers.Softmax,)) or (
            isinstance(last, keras.layers.Activation) and last.get_config()["activation"] == "softmax"):
        return _log_odds(outputs[-2], class_index)
    if isinstance(last, keras.layers.Dense):
        activation = last.get_config()["activation"]
        if isinstance(activation, dict):  # serialised form after some load paths
            activation = activation.get("config", {}).get("name", activation.get("class_name"))
        features = outputs[-2] if len(outputs) > 1 else None
        if features is None:
            raise ValueError("cannot find the input of the last Dense layer")
        # Recompute the Dense layer without its activation: the logits the softmax/sigmoid would receive.
        z = tf.matmul(features, last.kernel)
        if last.use_bias:
            z = z + last.bias
        if activation in ("softmax", "linear", None):
            return _log_odds(z, class_index)
        if activation == "sigmoid" and z.shape[-1] == 1:
            # One sigmoid unit is the IDC logit; the non-IDC logit is its negative.
            return z[:, 0] if class_index == 1 else -z[:, 0]
        raise ValueError(f"last Dense layer has activation {activation!r}; Grad-CAM needs softmax, sigmoid or linear")
    raise ValueError(
        "cannot find the pre-softmax score: name the Dense layer before the softmax 'logits', or end the model with "
        "a Dense layer (softmax, sigmoid or linear)")


def gradcam(model: keras.Model, images: np.ndarray, *, layer_name: str | None = None, class_index: int = 1,
            batch_size: int = 64) -> np.ndarray:
    """Grad-CAM maps of ``class_index`` (1 = IDC) for a batch of patches.

    Args:
        model: a chain-shaped Keras classifier (Sequential, Functional or loaded from ``.keras``) taking raw patches.
        images: ``(N, H, W, 3)`` patches as the model takes them (uint8 or float 0..255); one ``(H, W, 3)`` patch
            is treated as a batch of one.
        layer_name: layer to explain (any layer with a 4-D output); default :func:`default_gradcam_layer`.
        class_index: output class whose *logit* is explained: with two softmax outputs the log-odds
            ``z[class_index] - z[other]`` (= the logit of p(class)), with one sigmoid unit its pre-activation (negated
            for class 0), with more classes ``z[class_index]``. Explaining the logit rather than the probability avoids
            the softmax saturating: on a confident prediction the probability's gradient is ~0 and the map is noise.
        batch_size: patches per gradient pass.

    Returns:
        ``(N, H, W)`` float32 in [0, 1]: ReLU of the gradient-weighted feature maps, upsampled bilinearly to the patch
        with every cell at the centre of its receptive field, divided by each map's maximum. A map with no positive
        evidence stays all zero. Maps are relative within each patch: compare the model's probabilities, not map
        intensities, across patches.
    """
    import tensorflow as tf

    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, 3), got shape {images.shape}")
    layers = _chain_layers(model)
    names = [layer.name for layer in layers]
    if layer_name is None:
        layer_name = default_gradcam_layer(model, images.shape[1:])
    if layer_name not in names:
        raise ValueError(f"no layer named {layer_name!r}; convolution layers: {', '.join(conv_layer_names(model))}")
    target = names.index(layer_name)
    shapes = _spatial_shapes(model, images.shape[1:])
    if len(shapes[target]) != 4:
        raise ValueError(f"layer {layer_name!r} has output shape {shapes[target]}; Grad-CAM needs a 4-D feature map")
    geometry = _geometry(layers, shapes, target, images.shape[1:3])

    maps = []
    for begin in range(0, len(images), batch_size):
        batch = tf.convert_to_tensor(images[begin: begin + batch_size], dtype=tf.float32)
        with tf.GradientTape() as tape:
            outputs = _retrace(layers, batch, watch_index=target, tape=tape)
            score = _class_score(layers, outputs, class_index)
        if begin == 0:
            _check_chain(model, batch, outputs[-1])
        features = outputs[target]
        grads = tape.gradient(score, features)
        if grads is None:
            raise RuntimeError(f"no gradient from the class score to layer {layer_name!r}")
        # Channel weights: gradients averaged over the map (the "global average pooling" of the paper).
        weights = tf.reduce_mean(grads, axis=(1, 2))
        cams = tf.nn.relu(tf.einsum("bhwc,bc->bhw", features, weights))
        maps.append(cams.numpy().astype(np.float64))
    cams = np.concatenate(maps, axis=0)
    heat = np.maximum(_upsample(cams, images.shape[1:3], geometry), 0.0)
    peak = heat.max(axis=(1, 2), keepdims=True)
    heat = np.divide(heat, peak, out=np.zeros_like(heat), where=peak > 1e-12)
    return heat.astype(np.float32)


def _check_chain(model: keras.Model, batch: Any, retraced: Any) -> None:
    """Refuse models that are not plain chains: re-tracing their layers does not reproduce ``model(batch)``."""
    expected = model(batch, training=False)
    if isinstance(expected, (list, tuple, dict)) or tuple(expected.shape) != tuple(retraced.shape) or not np.allclose(
            np.asarray(expected), np.asarray(retraced), atol=1e-4, rtol=1e-3):
        raise ValueError(_NOT_A_CHAIN)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, cmap: str = "jet") -> np.ndarray:
    """Blend a heatmap over a patch: ``(H, W, 3)`` uint8 RGB + ``(H, W)`` in [0, 1] -> ``(H, W, 3)`` uint8 RGB.

    Batches work too: ``(N, H, W, 3)`` with ``(N, H, W)``. ``alpha`` is the heatmap's opacity.
    """
    import matplotlib

    image = np.asarray(image)
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if image.shape[:-1] != heatmap.shape or image.shape[-1] != 3:
        raise ValueError(f"image {image.shape} and heatmap {heatmap.shape} do not match ((H, W, 3) and (H, W))")
    colours = matplotlib.colormaps[cmap](np.clip(np.nan_to_num(heatmap), 0, 1))[..., :3] * 255.0
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
