"""tf.data pipeline: batches aligned with labels, deterministic epoch-wise shuffling, augmentation, no whole copy."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from idc_helpers import pipeline
from idc_helpers.stain import RGB_FROM_HED

N = 300


def _encoded(n: int = N) -> np.ndarray:
    """Images whose pixel (0, 0) encodes their row number: channel 0 = i % 256, channel 1 = i // 256."""
    images = np.zeros((n, 50, 50, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 0, 1] = np.arange(n) // 256
    return images


def _labels(n: int = N) -> np.ndarray:
    return (np.arange(n) * 7 % 3 == 0).astype(np.int32)


def _rows(x) -> np.ndarray:
    x = x.numpy()
    return (x[:, 0, 0, 0] + 256 * x[:, 0, 0, 1]).astype(np.int64)


def _epoch(ds) -> list[int]:
    rows = []
    for x, y in ds:
        r = _rows(x)
        assert np.array_equal(y.numpy(), _labels()[r])  # labels travel with their images
        rows.extend(r.tolist())
    return rows


def test_batches_shapes_dtypes_and_alignment():
    ds = pipeline.make_dataset(_encoded(), _labels(), batch_size=64, shuffle=False)
    assert ds.cardinality().numpy() == 5
    batches = list(ds)
    assert [b[0].shape[0] for b in batches] == [64, 64, 64, 64, 44]
    x, y = batches[0]
    assert x.dtype == tf.float32 and x.shape[1:] == (50, 50, 3) and y.dtype == tf.int32
    assert _epoch(ds) == list(range(N))  # unshuffled: in order


def test_values_are_raw_pixels():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 50, 50, 3), dtype=np.uint8)
    x, _ = next(iter(pipeline.make_dataset(images, np.zeros(10), batch_size=10, shuffle=False)))
    assert np.array_equal(x.numpy(), images.astype(np.float32))


def test_drop_remainder_gives_static_batches():
    ds = pipeline.make_dataset(_encoded(), _labels(), batch_size=64, drop_remainder=True)
    assert ds.element_spec[0].shape.as_list() == [64, 50, 50, 3]
    assert ds.cardinality().numpy() == 4
    assert len(set(_epoch(ds))) == 256


def test_shuffle_covers_every_row_once_and_reshuffles_each_epoch():
    ds = pipeline.make_dataset(_encoded(), _labels(), batch_size=32, seed=3)
    first, second = _epoch(ds), _epoch(ds)
    assert sorted(first) == list(range(N)) and sorted(second) == list(range(N))
    assert first != second and first != list(range(N))


def test_shuffle_is_deterministic_per_seed():
    def two_epochs(seed):
        ds = pipeline.make_dataset(_encoded(), _labels(), batch_size=32, seed=seed)
        return _epoch(ds) + _epoch(ds)

    assert two_epochs(5) == two_epochs(5)
    assert two_epochs(5) != two_epochs(6)


def test_repeat_runs_epoch_after_epoch():
    ds = pipeline.make_dataset(_encoded(), _labels(), batch_size=50, seed=1, repeat=True)
    rows = _epoch(ds.take(12))  # 6 batches per epoch
    assert sorted(rows[:N]) == list(range(N)) and sorted(rows[N:]) == list(range(N))
    separate = pipeline.make_dataset(_encoded(), _labels(), batch_size=50, seed=1)
    assert rows == _epoch(separate) + _epoch(separate)


def test_indices_subset_integer_and_mask():
    subset = np.arange(0, N, 3)
    ds = pipeline.make_dataset(_encoded(), _labels(), subset, batch_size=16, seed=0)
    assert sorted(_epoch(ds)) == subset.tolist()
    mask = np.zeros(N, bool)
    mask[subset] = True
    ds = pipeline.make_dataset(_encoded(), _labels(), mask, batch_size=16, seed=0)
    assert sorted(_epoch(ds)) == subset.tolist()
    with pytest.raises(IndexError):
        pipeline.make_dataset(_encoded(), _labels(), [N], batch_size=16)
    with pytest.raises(ValueError, match="labels"):
        pipeline.make_dataset(_encoded(), _labels()[:-1])


def test_reads_a_read_only_memmap(tmp_path):
    np.save(tmp_path / "images.npy", _encoded())
    images = np.load(tmp_path / "images.npy", mmap_mode="r")
    ds = pipeline.make_dataset(images, _labels(), batch_size=64, seed=0, augment=True)
    for x, _ in ds:
        assert x.shape[1:] == (50, 50, 3)


class _BatchOnlyArray:
    """Array stand-in that records each read and refuses to be converted whole (as from_tensor_slices would)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.shape, self.ndim, self.reads = data, data.shape, data.ndim, []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, rows):
        rows = np.asarray(rows)
        self.reads.append(rows.size)
        return self.data[rows]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole image array was converted")


def test_never_copies_the_whole_array():
    images = _BatchOnlyArray(_encoded())
    ds = pipeline.make_dataset(images, _labels(), batch_size=32, seed=0)
    assert sorted(_epoch(ds)) == list(range(N))
    assert max(images.reads) <= 32 and sum(images.reads) == N


# --- resumable epochs ---------------------------------------------------------------------------------------------


def _stream(ds, batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in ds.take(batches)]


def _same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(xa, xb) and np.array_equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("augment", [False, True, "strong"])
def test_resumed_stream_draws_what_an_uninterrupted_one_draws(augment):
    """Epochs 0..2 in one go, then epoch 2 alone with initial_epoch=2: the same images, labels and augmentation."""
    subset = np.arange(0, N, 2)  # 150 rows: 5 batches of 32, the last one short
    kwargs = {"batch_size": 32, "shuffle": True, "augment": augment, "seed": 11, "repeat": True}
    whole = _stream(pipeline.make_dataset(_encoded(), _labels(), subset, **kwargs), 15)
    resumed = _stream(pipeline.make_dataset(_encoded(), _labels(), subset, initial_epoch=2, **kwargs), 5)
    assert _same_batches(whole[10:], resumed)
    assert not _same_batches(whole[5:10], resumed)  # epochs differ
    # A one-epoch dataset started at epoch 2 is that same epoch.
    single = pipeline.make_dataset(_encoded(), _labels(), subset, initial_epoch=2, **{**kwargs, "repeat": False})
    assert _same_batches(_stream(single, 5), resumed)


def test_epoch_order_is_what_the_dataset_draws():
    subset = np.arange(N)[::-3]
    ds = pipeline.make_dataset(_encoded(), _labels(), subset, batch_size=N, seed=4, initial_epoch=7)
    drawn = _epoch(ds)
    assert sorted(drawn) == sorted(pipeline.epoch_order(subset, seed=4, epoch=7).tolist())
    order = pipeline.epoch_order(subset, seed=4, epoch=7)
    assert not np.array_equal(order, pipeline.epoch_order(subset, seed=4, epoch=8))
    ds = pipeline.make_dataset(_encoded(), _labels(), subset, batch_size=10, seed=4, initial_epoch=7)
    # Batches hold consecutive slices of the epoch's order (sorted within the batch for file-order reads).
    batches = [sorted(_rows(x).tolist()) for x, _ in ds]
    assert batches == [sorted(order[i : i + 10].tolist()) for i in range(0, len(order), 10)]


def test_steps_per_epoch_takes_the_start_of_each_epochs_order():
    ds = pipeline.make_dataset(_encoded(), _labels(), batch_size=30, seed=2, repeat=True, steps_per_epoch=3)
    rows = _epoch(ds.take(6))
    assert sorted(rows[:90]) == sorted(pipeline.epoch_order(np.arange(N), 2, 0)[:90].tolist())
    assert sorted(rows[90:]) == sorted(pipeline.epoch_order(np.arange(N), 2, 1)[:90].tolist())
    with pytest.raises(ValueError, match="steps_per_epoch"):
        pipeline.make_dataset(_encoded(), _labels(), batch_size=30, steps_per_epoch=11)


def test_weights_travel_with_their_rows():
    weights = np.arange(N, dtype=np.float32) / 10
    ds = pipeline.make_dataset(_encoded(), _labels(), batch_size=64, shuffle=True, seed=3, weights=weights)
    seen = []
    for x, y, w in ds:
        rows = _rows(x)
        assert np.array_equal(y.numpy(), _labels()[rows]) and np.array_equal(w.numpy(), weights[rows])
        seen.extend(rows.tolist())
    assert sorted(seen) == list(range(N)) and w.dtype == tf.float32


def test_bad_arguments_are_user_errors():
    from idc_helpers.errors import UserError

    for kwargs in (
        {"augment": "strongest"},
        {"initial_epoch": -1},
        {"batch_size": 0},
        {"seed": -3},
        {"weights": np.ones(N - 1)},
        {"weights": np.r_[np.ones(N - 1), np.nan]},
        {"weights": np.r_[np.ones(N - 1), -1.0]},
        {"weights": np.zeros(N)},
    ):
        with pytest.raises(UserError):
            pipeline.make_dataset(_encoded(), _labels(), **kwargs)


# --- augmentation -------------------------------------------------------------------------------------------------


def _dihedral(img: np.ndarray) -> list[np.ndarray]:
    return [np.rot90(f, k) for f in (img, img[:, ::-1]) for k in range(4)]


def test_augmentation_without_jitter_is_a_dihedral_transform():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 50, 50, 3)).astype(np.float32)
    out = pipeline.augment_batch(images, seed=7, jitter=False).numpy()
    used = set()
    for img, aug in zip(images, out, strict=True):
        matches = [k for k, d in enumerate(_dihedral(img)) if np.array_equal(d, aug)]
        assert len(matches) == 1
        used.add(matches[0])
    assert used == set(range(8))  # all 8 flips/rotations occur


def test_augmentation_is_seeded_in_range_and_mild():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(32, 50, 50, 3)).astype(np.float32)
    a = pipeline.augment_batch(images, seed=[1, 2]).numpy()
    b = pipeline.augment_batch(images, seed=[1, 2]).numpy()
    c = pipeline.augment_batch(images, seed=[1, 3]).numpy()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.min() >= 0.0 and a.max() <= 255.0
    # Colour jitter is mild: undo the geometry, then compare pixel by pixel.
    geometry = pipeline.augment_batch(images, seed=[1, 2], jitter=False).numpy()
    change = np.abs(a - geometry)
    assert 0.5 < change.mean() < 25.0
    white = np.full((4, 50, 50, 3), 255.0, np.float32)
    assert pipeline.augment_batch(white, seed=0).numpy().min() > 200.0  # glass stays near white


def test_augmented_dataset_is_reproducible():
    def first_batch(seed):
        ds = pipeline.make_dataset(_encoded(), _labels(), batch_size=64, seed=seed, augment=True)
        return next(iter(ds))[0].numpy()

    assert np.array_equal(first_batch(2), first_batch(2))
    assert not np.array_equal(first_batch(2), first_batch(3))


@pytest.mark.parametrize("strength", ["mild", "strong"])
def test_colour_jitter_is_the_hed_formula(strength):
    """The folded computation equals the textbook one: optical density, HED scale/shift, back, contrast, brightness."""
    s = pipeline.AUGMENT_STRENGTHS[strength]
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=(6, 2500, 3)).astype(np.float32)
    seeds = [tf.constant([5, k], tf.int64) for k in range(3)]
    out = pipeline._colour_jitter(tf.constant(x), s, *seeds).numpy()
    scale = tf.random.stateless_uniform([6, 3], seeds[0], 1 - s.stain_scale, 1 + s.stain_scale).numpy()
    shift = tf.random.stateless_uniform([6, 1, 3], seeds[1], -s.stain_shift, s.stain_shift).numpy()
    f = tf.random.stateless_uniform([6, 1, 2], seeds[2], -1.0, 1.0).numpy()
    hed_from_rgb = np.linalg.inv(RGB_FROM_HED)
    expected = []
    for i in range(6):
        od = np.log(256.0) - np.log1p(x[i].astype(np.float64))
        hed = od @ hed_from_rgb * scale[i] + shift[i]
        rgb = 256.0 * np.exp(-(hed @ RGB_FROM_HED)) - 1.0
        gain = 1 + s.contrast * f[i, 0, 0]
        expected.append(np.clip(rgb * gain + rgb.mean() * (1 - gain) + 255 * s.brightness * f[i, 0, 1], 0, 255))
    np.testing.assert_allclose(out, np.stack(expected), atol=0.05)
    assert np.abs(out - x).mean() > 0.5  # it did change the colours


def test_strong_augmentation_varies_more_than_light():
    rng = np.random.default_rng(2)
    images = rng.integers(40, 230, size=(64, 50, 50, 3)).astype(np.uint8)
    geometry = pipeline.augment_batch(images, seed=[4, 4], strength="geometry").numpy()
    change = {
        name: np.abs(pipeline.augment_batch(images, seed=[4, 4], strength=name).numpy() - geometry).mean()
        for name in ("light", "strong")
    }
    assert change["strong"] > 2 * change["light"] > 0


def test_uint8_output_for_augmentation_on_the_device():
    x, _ = next(iter(pipeline.make_dataset(_encoded(), _labels(), batch_size=16, shuffle=False, dtype="uint8")))
    assert x.dtype == tf.uint8 and np.array_equal(x.numpy(), _encoded()[:16])
    with pytest.raises(ValueError, match="uint8"):
        pipeline.make_dataset(_encoded(), _labels(), augment=True, dtype="uint8")
