"""``tf.data`` input pipelines that read batches straight from the decoded ``(N, 50, 50, 3) uint8`` patch array.

The array is usually the loader's read-only ``np.memmap`` (2.1 GB for the full dataset). Building a dataset with
``from_tensor_slices`` would copy all of it into the graph (it peaked at 6.5 GB); here only batches of row positions
go through ``tf.data``, and each batch of pixels is gathered from the array on demand (positions sorted within the
batch, so a memmap is read in file order), converted to float32 per batch, optionally augmented, and prefetched.
"""

from __future__ import annotations

import itertools
import threading
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from idc_helpers import PATCH_SIZE

# Ruifrok & Johnston (2001) optical-density vectors of haematoxylin, eosin and DAB (rows), as used for
# HED colour augmentation (Tellez et al. 2018/2019).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)
# The 8 symmetries of a square patch (4 rotations, with and without a mirror) as source-pixel permutations:
# output pixel p of symmetry k is input pixel _DIHEDRAL_SOURCE[k, p] (row-major over 50x50).
_GRID = np.arange(PATCH_SIZE * PATCH_SIZE, dtype=np.int32).reshape(PATCH_SIZE, PATCH_SIZE)
_DIHEDRAL_SOURCE = np.stack([np.rot90(g, k).reshape(-1) for g in (_GRID, _GRID[:, ::-1]) for k in range(4)])


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray | Sequence[int],
    indices: np.ndarray | Sequence[int] | None = None,
    *,
    batch_size: int = 128,
    shuffle: bool = True,
    augment: bool = False,
    seed: int = 0,
    repeat: bool = False,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """Batches ``(float32 (B, 50, 50, 3) in [0, 255], int32 (B,))`` of ``images[indices]`` and their labels.

    ``images``: ``(N, 50, 50, 3) uint8`` (an ``np.memmap`` is read batch by batch, never copied whole).
    ``labels``: ``(N,)`` 0/1, aligned with ``images``. ``indices``: the rows to use (integer positions or a boolean
    mask of length N; default all), e.g. the training patients' rows.
    With ``shuffle``, each pass over the dataset (each Keras epoch) gets a new order; the sequence of orders is
    the same for the same ``seed``. ``augment`` applies :func:`augment_batch` with per-batch seeds derived from
    ``seed``, so augmented batches are reproducible too. ``repeat`` makes one endless dataset (give Keras
    ``steps_per_epoch``); otherwise the dataset is one epoch and its cardinality is known.
    """
    images, labels_arr, positions = _check_inputs(images, labels, indices)
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_batches = _n_batches(len(positions), batch_size, drop_remainder)
    iterations = itertools.count()
    lock = threading.Lock()

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        # One call per pass over the dataset: the pass number picks the epoch's permutation.
        with lock:
            first_epoch = next(iterations)
        epochs = itertools.count(first_epoch) if repeat else (first_epoch,)
        for epoch in epochs:
            order = np.random.default_rng([seed, epoch]).permutation(positions) if shuffle else positions
            for b in range(n_batches):
                rows = order[b * batch_size:(b + 1) * batch_size]
                yield (np.sort(rows) if shuffle else rows), np.array([seed, epoch * n_batches + b], np.int64)

    ds = tf.data.Dataset.from_generator(
        batches,
        output_signature=(tf.TensorSpec([None], tf.int64), tf.TensorSpec([2], tf.int64)),
    )
    if not repeat:
        ds = ds.apply(tf.data.experimental.assert_cardinality(n_batches))
    gather = _gatherer(images, labels_arr)
    static_batch = batch_size if drop_remainder or len(positions) == batch_size * n_batches else None

    def load(rows: tf.Tensor, batch_seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x, y = tf.numpy_function(gather, [rows], (tf.uint8, tf.int32), name="gather_patches")
        x.set_shape([static_batch, PATCH_SIZE, PATCH_SIZE, 3])
        y.set_shape([static_batch])
        x = tf.cast(x, tf.float32)
        if augment:
            x = augment_batch(x, batch_seed)
        return x, y

    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def make_eval_dataset(
    images: np.ndarray,
    batch_size: int = 256,
    indices: np.ndarray | Sequence[int] | None = None,
) -> tf.data.Dataset:
    """Batches ``float32 (B, 50, 50, 3)`` in [0, 255] of ``images[indices]`` in order, for prediction.

    No labels, no shuffling, no augmentation: output row ``i`` is ``images[indices[i]]``.
    """
    images, _, positions = _check_inputs(images, None, indices)
    batch_size = int(batch_size)
    n_batches = _n_batches(len(positions), batch_size, drop_remainder=False)
    pixels = _gatherer(images, None)
    starts = np.arange(n_batches, dtype=np.int64) * batch_size

    def rows_of(start: np.int64) -> np.ndarray:
        return positions[int(start):int(start) + batch_size]

    def load(start: tf.Tensor) -> tf.Tensor:
        x = tf.numpy_function(lambda s: pixels(rows_of(s)), [start], tf.uint8, name="gather_patches")
        x.set_shape([None, PATCH_SIZE, PATCH_SIZE, 3])
        return tf.cast(x, tf.float32)

    ds = tf.data.Dataset.from_tensor_slices(starts)  # only the batch starts go into the graph
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def augment_batch(
    images: tf.Tensor,
    seed: tf.Tensor | Sequence[int] | int,
    *,
    jitter: bool = True,
    stain_sigma: float = 0.05,
    stain_shift: float = 0.02,
    brightness: float = 0.04,
    contrast: float = 0.08,
) -> tf.Tensor:
    """Random dihedral transform and mild stain/colour jitter of a batch, per image; values stay in [0, 255].

    ``images``: ``(B, 50, 50, 3)`` float32 RGB in [0, 255]. ``seed``: an int or a shape-[2] integer tensor; the same
    seed gives the same output (stateless random ops).
    Geometry: one of the 8 flips/rotations of the square, uniformly (a patch's label does not depend on them).
    With ``jitter``: HED stain augmentation (convert to haematoxylin/eosin/DAB optical densities, scale each by
    U(1 - stain_sigma, 1 + stain_sigma) and shift by U(-stain_shift, stain_shift), convert back), then a brightness
    shift U(-brightness, brightness) * 255 and a contrast factor U(1 - contrast, 1 + contrast) about the image mean:
    mild differences in staining and scanning, as between labs.
    """
    x = tf.convert_to_tensor(images, dtype=tf.float32)
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank == 0:
        seed = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
    seed = tf.cast(seed, tf.int64)
    geometry_seed, stain_seed, shift_seed, colour_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    n = tf.shape(x)[0]

    # One gather through a precomputed pixel permutation per symmetry: a single pass over the batch (computing
    # every transform and selecting with tf.where measured ~10x slower on CPU).
    which = tf.random.stateless_uniform([n], geometry_seed, minval=0, maxval=8, dtype=tf.int32)
    source = tf.gather(tf.constant(_DIHEDRAL_SOURCE), which)  # (B, 2500) source pixel of each output pixel
    pixels = tf.reshape(x, [n, PATCH_SIZE * PATCH_SIZE, 3])
    x = tf.reshape(tf.gather(pixels, source, batch_dims=1), [n, PATCH_SIZE, PATCH_SIZE, 3])
    if not jitter:
        return x

    # HED jitter, folded into one 3x3 matrix and offset per image: od' = od @ (HED_FROM_RGB diag(scale) RGB_FROM_HED)
    # + shift @ RGB_FROM_HED, with od = -log((x + 1) / 256) the optical density (0 for white glass).
    scale = tf.random.stateless_uniform([n, 3], stain_seed, 1.0 - stain_sigma, 1.0 + stain_sigma)
    shift = tf.random.stateless_uniform([n, 1, 3], shift_seed, -stain_shift, stain_shift)
    to_rgb = tf.constant(_RGB_FROM_HED)
    mix = tf.matmul(tf.constant(_HED_FROM_RGB)[None] * scale[:, None, :], tf.broadcast_to(to_rgb, [n, 3, 3]))
    od = tf.math.log(256.0) - tf.math.log1p(tf.reshape(x, [n, -1, 3]))
    od = tf.matmul(od, mix) + tf.matmul(shift, tf.broadcast_to(to_rgb, [n, 3, 3]))
    x = tf.reshape(256.0 * tf.exp(-od) - 1.0, [n, PATCH_SIZE, PATCH_SIZE, 3])

    # Contrast about the image mean and a brightness shift, as one multiply-add per image.
    factors = tf.random.stateless_uniform([n, 1, 1, 2], colour_seed, -1.0, 1.0)
    gain = 1.0 + contrast * factors[..., 0:1]
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    x = x * gain + (mean * (1.0 - gain) + 255.0 * brightness * factors[..., 1:2])
    return tf.clip_by_value(x, 0.0, 255.0)


def _check_inputs(images, labels, indices) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    if images.ndim != 4 or tuple(images.shape[1:]) != (PATCH_SIZE, PATCH_SIZE, 3):
        raise ValueError(f"images must have shape (N, {PATCH_SIZE}, {PATCH_SIZE}, 3), got {images.shape}")
    n = len(images)
    labels_arr = None
    if labels is not None:
        labels_arr = np.asarray(labels).astype(np.int32, copy=False).reshape(-1)
        if len(labels_arr) != n:
            raise ValueError(f"labels has {len(labels_arr)} entries but images has {n} rows")
    if indices is None:
        positions = np.arange(n, dtype=np.int64)
    else:
        positions = np.asarray(indices)
        if positions.dtype == bool:
            if positions.shape != (n,):
                raise ValueError(f"boolean indices have shape {positions.shape}; expected ({n},)")
            positions = np.flatnonzero(positions)
        positions = positions.astype(np.int64, copy=False).reshape(-1)
        if positions.size and (positions.min() < 0 or positions.max() >= n):
            raise IndexError(f"indices must lie in [0, {n}), got {positions.min()}..{positions.max()}")
    if positions.size == 0:
        raise ValueError("no rows to iterate over (indices is empty)")
    return images, labels_arr, positions


def _n_batches(n: int, batch_size: int, drop_remainder: bool) -> int:
    n_batches = n // batch_size if drop_remainder else -(-n // batch_size)
    if n_batches == 0:
        raise ValueError(f"{n} rows make no full batch of {batch_size} with drop_remainder=True")
    return n_batches


def _gatherer(images: np.ndarray, labels: np.ndarray | None):
    """A function ``rows -> images[rows]`` (and labels) that returns plain contiguous arrays for TensorFlow."""
    if labels is None:
        return lambda rows: np.ascontiguousarray(images[rows])
    return lambda rows: (np.ascontiguousarray(images[rows]), labels[rows])
