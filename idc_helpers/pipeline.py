"""``tf.data`` input pipelines that read batches straight from the decoded ``(N, 50, 50, 3) uint8`` patch array.

The array is usually the loader's read-only ``np.memmap`` (2.1 GB for the full dataset). Building a dataset with
``from_tensor_slices`` would copy all of it into the graph; here only row positions go through ``tf.data``, and
each batch of pixels is gathered from the array on demand (positions sorted within the batch, so a memmap is read
in file order), converted to float32 per batch, optionally augmented, and prefetched.

Every epoch is a pure function of ``(seed, epoch)``: its order is ``np.random.default_rng([seed, epoch])``'s
permutation of the rows, and batch ``b`` of it is augmented with stateless random ops seeded by
``(seed, epoch * batches_per_epoch + b)``. So a training run resumed at epoch ``e`` (``initial_epoch=e``) draws
exactly the batches an uninterrupted run draws there.

The 8 symmetries of a square patch are defined once, in :func:`dihedral_views`; the augmentation's pixel
permutations are built from it, and test-time augmentation uses it directly.

Augmentation (:func:`augment_batch`, strengths in :data:`AUGMENT_STRENGTHS`) runs here, on the CPU, or inside the
model on the accelerator (:class:`idc_helpers.models.TrainingAugmentation`, fed ``dtype="uint8"`` batches): the
same function either way; :func:`idc_helpers.models.augmentation_placement` says which.

TensorFlow is imported by the functions that build tensors, so importing this module is cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from idc_helpers import PATCH_SIZE
from idc_helpers.errors import UserError
from idc_helpers.loader import check_rows
from idc_helpers.stain import HED_FROM_RGB, RGB_FROM_HED

if TYPE_CHECKING:
    import tensorflow as tf


class PipelineArgumentError(UserError, ValueError):
    """An argument of :func:`make_dataset` or :func:`augment_batch` that cannot work (the message says which)."""


def dihedral_views(images: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/rotations of ``(N, H, W, C)`` images, identity first.

    Rotation by ``k`` quarter turns (k = 0..3), each without and with a left-right mirror. Histology has no preferred
    orientation.
    """
    views = []
    for k in range(4):
        rotated = np.rot90(images, k, axes=(1, 2))
        views += [rotated, rotated[:, :, ::-1]]
    return views


# Output pixel p of view k is input pixel _DIHEDRAL_SOURCE[k, p] (row-major over 50x50), derived from
# dihedral_views so that augmentation and TTA cannot disagree about what the 8 views are.
_GRID = np.arange(PATCH_SIZE * PATCH_SIZE, dtype=np.int32).reshape(1, PATCH_SIZE, PATCH_SIZE, 1)
_DIHEDRAL_SOURCE = np.stack([view.reshape(-1) for view in dihedral_views(_GRID)])


@dataclass(frozen=True)
class StainJitter:
    """How strongly :func:`augment_batch` varies colour, per image, each factor drawn uniformly.

    ``stain_scale``: each of the haematoxylin, eosin and DAB optical densities is multiplied by
    U(1 - stain_scale, 1 + stain_scale); ``stain_shift``: and shifted by U(-stain_shift, stain_shift) (optical
    density, natural log; 0 is white glass, a typical nucleus is 0.5-1.5). ``brightness``: a shift of
    U(-brightness, brightness) * 255; ``contrast``: a factor U(1 - contrast, 1 + contrast) about the image mean.
    """

    stain_scale: float
    stain_shift: float
    brightness: float
    contrast: float


# ``True`` means "mild": the settings the project trained with before strengths were selectable. "light" and
# "strong" follow Tellez et al. 2019 (Medical Image Analysis 58, 101544), whose HED-light and HED-strong draw
# the stain factors from +-0.05 and +-0.2 for both the scale and the shift.
AUGMENT_STRENGTHS: dict[str, StainJitter] = {
    "mild": StainJitter(stain_scale=0.05, stain_shift=0.02, brightness=0.04, contrast=0.08),
    "light": StainJitter(stain_scale=0.05, stain_shift=0.05, brightness=0.04, contrast=0.08),
    "strong": StainJitter(stain_scale=0.2, stain_shift=0.2, brightness=0.04, contrast=0.08),
}
AUGMENT_CHOICES: tuple[str, ...] = ("none", "geometry", *AUGMENT_STRENGTHS)


def augment_setting(augment: bool | str | None) -> str:
    """The canonical name of an ``augment`` argument.

    ``False``/``None``/``"none"`` -> ``"none"``, ``True`` -> ``"mild"``, ``"geometry"`` (flips/rotations only),
    ``"mild"``, ``"light"``, ``"strong"``.
    """
    if augment is None or augment is False:
        return "none"
    if augment is True:
        return "mild"
    if isinstance(augment, str) and augment.lower() in AUGMENT_CHOICES:
        return augment.lower()
    raise PipelineArgumentError(
        f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENT_CHOICES)} (or True / False)"
    )


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray | Sequence[int],
    indices: np.ndarray | Sequence[int] | None = None,
    *,
    batch_size: int = 128,
    shuffle: bool = True,
    augment: bool | str = False,
    seed: int = 0,
    repeat: bool = False,
    drop_remainder: bool = False,
    initial_epoch: int = 0,
    steps_per_epoch: int | None = None,
    dtype: str = "float32",
    weights: np.ndarray | Sequence[float] | None = None,
) -> tf.data.Dataset:
    """Batches ``(float32 (B, 50, 50, 3) in [0, 255], int32 (B,))`` of ``images[indices]`` and their labels.

    ``images``: ``(N, 50, 50, 3) uint8`` (an ``np.memmap`` is read batch by batch, never copied whole).
    ``labels``: ``(N,)`` 0/1, aligned with ``images``. ``indices``: the rows to use (integer positions or a boolean
    mask of length N; default all), e.g. the training patients' rows. ``weights``: ``(N,)`` loss weights aligned
    with ``images`` (e.g. :func:`idc_helpers.training_data.loss_weights`): each batch then also holds its rows'
    weights, ``float32 (B,)``, which Keras takes as sample weights.

    Epoch ``e`` is a pure function of ``(seed, e)``: with ``shuffle`` its order is :func:`epoch_order`, and
    ``augment`` (``True``/``"mild"``, ``"light"``, ``"strong"``, ``"geometry"``; see :data:`AUGMENT_STRENGTHS`)
    applies :func:`augment_batch` seeded by ``(seed, e * batches_per_epoch + b)`` to batch ``b``.
    ``steps_per_epoch``: use only the first that many batches of each epoch's order (a subsample that differs from
    epoch to epoch); default the whole pass. ``dtype="uint8"`` (without ``augment``) delivers the raw pixels, a
    quarter of the bytes to copy to a GPU, e.g. for a model that augments on the device
    (:class:`idc_helpers.models.TrainingAugmentation`).

    ``repeat=True``: one endless stream, epoch ``initial_epoch``, then the next, ...: give Keras the same
    ``steps_per_epoch`` and ``initial_epoch``. This is the form to train with, since resuming depends on nothing
    but these arguments. ``repeat=False``: one epoch, with known cardinality; each pass over the dataset (each Keras
    epoch) is the next epoch, starting at ``initial_epoch`` (the dataset counts its own passes).
    """
    import tensorflow as tf

    images, labels_arr, positions = _check_inputs(images, labels, indices)
    setting = augment_setting(augment)
    batch_size, initial_epoch = int(batch_size), int(initial_epoch)
    if dtype not in ("float32", "uint8") or (dtype == "uint8" and setting != "none"):
        raise PipelineArgumentError(
            f"dtype must be 'float32', or 'uint8' without augmentation; got {dtype!r} with augment={augment!r}"
        )
    n_batches = _n_batches(len(positions), batch_size, drop_remainder)
    steps = n_batches if steps_per_epoch is None else int(steps_per_epoch)
    if not 1 <= steps <= n_batches:
        raise PipelineArgumentError(
            f"steps_per_epoch must lie in [1, {n_batches}] (batches in one pass over "
            f"{len(positions)} rows), got {steps_per_epoch}"
        )
    ds = _row_batches(positions, int(seed), shuffle, batch_size, n_batches, steps, repeat, initial_epoch)
    gather = _gatherer(images, labels_arr)
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float32).reshape(-1)
        if len(weights) != len(images) or not np.isfinite(weights).all() or (weights < 0).any():
            raise PipelineArgumentError(
                f"weights must hold {len(images)} finite, non-negative numbers, one per image row; got {len(weights)}"
            )
        if not weights[positions].sum() > 0:
            raise PipelineArgumentError("weights are 0 on every row to use: nothing would be learned")
    static_batch = batch_size if drop_remainder or len(positions) == batch_size * n_batches else None

    def load(rows: tf.Tensor, batch_seed: tf.Tensor) -> tuple[tf.Tensor, ...]:
        x, y = tf.numpy_function(gather, [rows], (tf.uint8, tf.int32), name="gather_patches")
        x.set_shape([static_batch, PATCH_SIZE, PATCH_SIZE, 3])
        y.set_shape([static_batch])
        # augment_batch moves the uint8 pixels before converting them (a quarter of the bytes of float32).
        if setting != "none":
            x = augment_batch(x, batch_seed, strength=setting)
        elif dtype == "float32":
            x = tf.cast(x, tf.float32)
        return (x, y) if weights is None else (x, y, tf.gather(weights, rows))

    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def _row_batches(
    positions: np.ndarray,
    seed: int,
    shuffle: bool,
    batch_size: int,
    n_batches: int,
    steps: int,
    repeat: bool,
    initial_epoch: int,
) -> tf.data.Dataset:
    """``(rows int64 (B,), batch seed int64 (2,))`` for the first ``steps`` batches of each epoch.

    One epoch, or endless epochs from ``initial_epoch`` with ``repeat``.
    """
    import tensorflow as tf

    if initial_epoch < 0:
        raise PipelineArgumentError(f"initial_epoch must be >= 0, got {initial_epoch}")
    if seed < 0:
        raise PipelineArgumentError(f"seed must be >= 0, got {seed}")
    if repeat:
        epochs = tf.data.Dataset.counter(initial_epoch, dtype=tf.int64)
    else:
        # The only state: how many passes this dataset has started (tf.data re-runs this map on every pass).
        passes = tf.Variable(initial_epoch, dtype=tf.int64, trainable=False, name="epochs_started")
        epochs = tf.data.Dataset.range(1).map(lambda _: passes.assign_add(1) - 1)

    def rows_of_epoch(epoch: np.ndarray) -> np.ndarray:
        return epoch_order(positions, seed, int(epoch), shuffle=shuffle)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.numpy_function(rows_of_epoch, [epoch], tf.int64, stateful=False, name="epoch_order")
        order.set_shape([len(positions)])

        def batch(b: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            rows = order[b * batch_size : (b + 1) * batch_size]
            # Sorted within the batch: a memmap is then read in file order.
            return (tf.sort(rows) if shuffle else rows), tf.stack([tf.constant(seed, tf.int64), epoch * n_batches + b])

        return tf.data.Dataset.range(steps).map(batch)

    ds = epochs.flat_map(one_epoch)
    return ds if repeat else ds.apply(tf.data.experimental.assert_cardinality(steps))


def epoch_order(positions: np.ndarray, seed: int, epoch: int, *, shuffle: bool = True) -> np.ndarray:
    """The rows of epoch ``epoch`` in the order :func:`make_dataset` draws them.

    ``positions`` ``(M,)`` int64 permuted by ``np.random.default_rng([seed, epoch])`` (unchanged without ``shuffle``).
    """
    positions = np.asarray(positions, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(positions) if shuffle else positions


def augment_batch(
    images: tf.Tensor,
    seed: tf.Tensor | Sequence[int] | int,
    *,
    jitter: bool = True,
    strength: str | StainJitter = "mild",
) -> tf.Tensor:
    """Random dihedral transform and stain/colour jitter of each image of a batch -> ``(B, 50, 50, 3)`` float32.

    The output is in [0, 255]. ``images``: ``(B, 50, 50, 3)`` RGB in [0, 255], uint8 (cheapest: pixels move as bytes) or
    float. ``seed``: an int or a shape-[2] integer tensor; the same seed gives the same output (stateless random ops).

    Geometry: one of the 8 :func:`dihedral_views`, uniformly (a patch's label does not depend on them). With ``jitter``:
    HED stain augmentation (convert to haematoxylin/eosin/DAB optical densities, scale and shift each, convert back),
    then brightness and contrast, with the ranges of ``strength`` (a name in :data:`AUGMENT_STRENGTHS` or a
    :class:`StainJitter`): differences in staining and scanning, as between labs.
    """
    import tensorflow as tf

    if isinstance(strength, str):
        name = augment_setting(strength)
        if name == "none":
            raise PipelineArgumentError("augment_batch needs a strength other than 'none'")
        jitter = jitter and name != "geometry"
        strength = AUGMENT_STRENGTHS.get(name, AUGMENT_STRENGTHS["mild"])
    x = tf.convert_to_tensor(images)
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank == 0:
        seed = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
    seed = tf.cast(seed, tf.int64)
    geometry_seed, stain_seed, shift_seed, colour_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    n = tf.shape(x)[0]
    pixels = PATCH_SIZE * PATCH_SIZE

    # One gather of whole pixels through a precomputed permutation per view, on the input dtype (uint8 moves a
    # quarter of the bytes of float32); computing all 8 transforms and selecting with tf.where is ~5x slower.
    which = tf.random.stateless_uniform([n], geometry_seed, minval=0, maxval=8, dtype=tf.int32)
    source = tf.gather(tf.constant(_DIHEDRAL_SOURCE), which) + pixels * tf.range(n)[:, None]
    x = tf.gather(tf.reshape(x, [-1, 3]), source)  # (B, 2500, 3)
    if not jitter:
        return tf.reshape(tf.cast(x, tf.float32), [n, PATCH_SIZE, PATCH_SIZE, 3])
    return tf.reshape(
        _colour_jitter(tf.cast(x, tf.float32), strength, stain_seed, shift_seed, colour_seed),
        [n, PATCH_SIZE, PATCH_SIZE, 3],
    )


def _colour_jitter(x: tf.Tensor, s: StainJitter, stain_seed, shift_seed, colour_seed) -> tf.Tensor:
    """HED stain jitter, contrast and brightness of ``(B, P, 3)`` float32 pixels, folded into few full passes.

    With L = log(1 + x) and the optical density od = log 256 - L (0 for white glass), the stain jitter is
    od' = od @ M + t, M = HED_FROM_RGB diag(scale) RGB_FROM_HED, t = shift @ RGB_FROM_HED, and
    x' = 256 exp(-od') - 1. Contrast g about the mean and brightness b then give g x' + (1 - g) mean(x') + b.
    Since g (x' + 1) = exp(L @ M + log g + log 256 (1 - colsum M) - t) =: E, the output is
    E + (1 - g) (mean(E) / g - 1) - g + b: one matmul, one exp and one mean over the pixels.
    """
    import tensorflow as tf

    n = tf.shape(x)[0]
    scale = tf.random.stateless_uniform([n, 3], stain_seed, 1.0 - s.stain_scale, 1.0 + s.stain_scale)
    shift = tf.random.stateless_uniform([n, 1, 3], shift_seed, -s.stain_shift, s.stain_shift)
    factors = tf.random.stateless_uniform([n, 1, 2], colour_seed, -1.0, 1.0)
    gain = 1.0 + s.contrast * factors[..., 0:1]  # (B, 1, 1)
    bright = 255.0 * s.brightness * factors[..., 1:2]
    to_rgb = tf.broadcast_to(tf.constant(RGB_FROM_HED), [n, 3, 3])
    mix = tf.matmul(tf.constant(HED_FROM_RGB)[None] * scale[:, None, :], to_rgb)  # (B, 3, 3)
    log256 = float(np.log(256.0))
    bias = tf.math.log(gain) + log256 * (1.0 - tf.reduce_sum(mix, axis=1, keepdims=True)) - tf.matmul(shift, to_rgb)
    e = tf.exp(tf.matmul(tf.math.log1p(x), mix) + bias)
    offset = (1.0 - gain) * (tf.reduce_mean(e, axis=[1, 2], keepdims=True) / gain - 1.0) - gain + bright
    return tf.clip_by_value(e + offset, 0.0, 255.0)


def _check_inputs(images, labels, indices) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    if images.ndim != 4 or tuple(images.shape[1:]) != (PATCH_SIZE, PATCH_SIZE, 3):
        raise PipelineArgumentError(f"images must have shape (N, {PATCH_SIZE}, {PATCH_SIZE}, 3), got {images.shape}")
    n = len(images)
    labels_arr = None
    if labels is not None:
        labels_arr = np.asarray(labels).astype(np.int32, copy=False).reshape(-1)
        if len(labels_arr) != n:
            raise PipelineArgumentError(f"labels has {len(labels_arr)} entries but images has {n} rows")
    positions = np.arange(n, dtype=np.int64) if indices is None else check_rows(indices, n)
    if positions.size == 0:
        raise PipelineArgumentError("no rows to iterate over (indices is empty)")
    return images, labels_arr, positions


def _n_batches(n: int, batch_size: int, drop_remainder: bool) -> int:
    if batch_size < 1:
        raise PipelineArgumentError(f"batch_size must be >= 1, got {batch_size}")
    n_batches = n // batch_size if drop_remainder else -(-n // batch_size)
    if n_batches == 0:
        raise PipelineArgumentError(f"{n} rows make no full batch of {batch_size} with drop_remainder=True")
    return n_batches


def _gatherer(images: np.ndarray, labels: np.ndarray):
    """A function ``rows -> (images[rows], labels[rows])`` returning plain contiguous arrays for TensorFlow."""
    return lambda rows: (np.ascontiguousarray(images[rows]), labels[rows])
