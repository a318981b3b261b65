"""Loader: decoding (colour order, padding, odd PNG types), bad files, the on-disk cache, and the real sample."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import patch_name, write_patch
from idc_helpers import loader
from idc_helpers.patch_index import TRUNCATED, UNREADABLE, build_index

RGB = (200, 100, 50)


def _listing_hash(root: Path) -> str:
    """Names, sizes and mtimes of everything under ``root``: changes if anything is written there."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        st = path.stat()
        digest.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _expected_encoding(frame: pd.DataFrame) -> np.ndarray:
    """The pixel (0, 0) that tiny_dataset wrote for each row: (patient number, grid x, grid y)."""
    p = frame["patient_id"].map({"101": 0, "102": 1, "103": 2}).to_numpy()
    return np.stack([p, (frame["x"].to_numpy() - 1) // 50, (frame["y"].to_numpy() - 1) // 50], axis=1)


def _frame_of(paths: list[Path]) -> pd.DataFrame:
    return pd.DataFrame({"path": [str(p) for p in paths], "label": np.zeros(len(paths), np.int8)})


# --- single patches -----------------------------------------------------------------------------------------------


def test_rgb_channel_order(tmp_path):
    # Written by Pillow, which knows nothing of OpenCV's BGR: the loader must hand back R, G, B.
    path = tmp_path / "a.png"
    Image.new("RGB", (50, 50), RGB).save(path)
    patch = loader.read_patch(path)
    assert patch.shape == (50, 50, 3) and patch.dtype == np.uint8
    assert tuple(patch[10, 10]) == RGB


def test_pad_keeps_pixels_top_left_and_fills_white():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, size=(30, 41, 3), dtype=np.uint8)
    out = loader.pad_to_patch(img)
    assert out.shape == (50, 50, 3) and out.dtype == np.uint8
    assert np.array_equal(out[:30, :41], img)
    assert (out[30:] == 255).all() and (out[:, 41:] == 255).all()
    full = rng.integers(0, 255, size=(50, 50, 3), dtype=np.uint8)
    assert np.array_equal(loader.pad_to_patch(full), full)
    with pytest.raises(ValueError, match="larger"):
        loader.pad_to_patch(np.zeros((51, 50, 3), np.uint8))


def test_border_patch_is_padded(tmp_path):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, size=(1, 50, 3), dtype=np.uint8)  # a 50x1 patch, as in the real data
    patch = loader.read_patch(write_patch(tmp_path / "a.png", img))
    assert np.array_equal(patch[:1], img)
    assert (patch[1:] == 255).all()


def test_grayscale_png(tmp_path):
    gray = np.arange(2500, dtype=np.uint32).reshape(50, 50).astype(np.uint8)
    path = tmp_path / "gray.png"
    assert cv2.imwrite(str(path), gray)
    patch = loader.read_patch(path)
    assert patch.shape == (50, 50, 3)
    for c in range(3):
        assert np.array_equal(patch[..., c], gray)


def test_16bit_png_is_scaled_to_8bit(tmp_path):
    gray = np.arange(2500, dtype=np.uint32).reshape(50, 50).astype(np.uint8)
    path = tmp_path / "gray16.png"
    assert cv2.imwrite(str(path), gray.astype(np.uint16) * 257)
    assert np.array_equal(loader.read_patch(path)[..., 0], gray)


def test_rgba_png_is_composited_on_white(tmp_path):
    rgba = np.zeros((50, 50, 4), np.uint8)
    rgba[..., :3] = RGB
    rgba[:, :20, 3] = 255  # opaque: the colour itself
    rgba[:, 20:40, 3] = 0  # transparent: white glass
    rgba[:, 40:, 3] = 128  # half: halfway to white
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    patch = loader.read_patch(path)
    assert patch.shape == (50, 50, 3)
    assert (patch[:, :20] == RGB).all()
    assert (patch[:, 20:40] == 255).all()
    expected = np.rint(np.array(RGB) * 128 / 255 + 255 * (1 - 128 / 255))
    assert np.abs(patch[:, 40:].astype(int) - expected).max() <= 1


def test_palette_and_gray_alpha_pngs(tmp_path):
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)).quantize(16).save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as palette:
        assert palette.mode == "P"
        expected = np.asarray(palette.convert("RGB"))
    assert np.array_equal(loader.read_patch(tmp_path / "p.png"), expected)
    Image.new("LA", (50, 50), (90, 255)).save(tmp_path / "la.png")
    assert tuple(loader.read_patch(tmp_path / "la.png")[0, 0]) == (90, 90, 90)


def test_too_large_patch_is_refused(tmp_path):
    path = write_patch(tmp_path / "big.png", np.zeros((50, 60, 3), np.uint8))
    with pytest.raises(loader.PatchReadError, match="big.png") as info:
        loader.read_patch(path)
    assert info.value.kind == loader.WRONG_SIZE
    assert "60x50" in str(info.value)
    # Larger than the first read (64 kB of noise): read whole, then refused for its size.
    noise = np.random.default_rng(0).integers(0, 256, size=(200, 200, 3), dtype=np.uint8)
    huge = write_patch(tmp_path / "huge.png", noise)
    assert huge.stat().st_size > 1 << 16
    with pytest.raises(loader.PatchReadError, match="200x200"):
        loader.read_patch(huge)


def test_read_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(loader.PatchReadError, match="empty.png.*0 bytes"):
        loader.read_patch(empty)
    with pytest.raises(ValueError, match="gone.png"):  # PatchReadError is a ValueError
        loader.read_patch(tmp_path / "gone.png")


# --- whole datasets -----------------------------------------------------------------------------------------------


def test_load_tiny_dataset(tiny_dataset, tmp_cache):
    frame = build_index(tiny_dataset).frame
    loaded = loader.load_patches(frame)
    assert loaded.images.shape == (36, 50, 50, 3) and loaded.images.dtype == np.uint8
    assert loaded.problems == [] and not loaded.from_cache
    assert loaded.cache_path.parent == tmp_cache
    pd.testing.assert_frame_equal(loaded.frame, frame)
    # Row i of the images is the file of row i of the frame.
    assert np.array_equal(loaded.images[:, 0, 0], _expected_encoding(loaded.frame))
    assert np.array_equal(loaded.labels, frame["label"].to_numpy(np.int32))
    # The 50x30 border patches: the original 30 rows, then white.
    short = np.flatnonzero(frame["height"] == 30)
    for i in short:
        original = cv2.imread(frame.at[i, "path"])[..., ::-1]
        assert np.array_equal(loaded.images[i, :30], original)
        assert (loaded.images[i, 30:] == 255).all()


def test_second_load_hits_the_cache(tiny_dataset, tmp_cache):
    frame = build_index(tiny_dataset).frame
    first = loader.load_patches(frame)
    second = loader.load_patches(frame)
    assert second.from_cache and second.cache_path == first.cache_path
    assert np.array_equal(first.images, second.images)
    assert isinstance(second.images, np.memmap) and not second.images.flags.writeable
    entry = first.cache_path
    assert sorted(p.name for p in tmp_cache.iterdir()) == sorted(
        [entry.name, entry.with_suffix(".json").name, entry.with_suffix(".stats").name]
    )  # no temporary files left behind


@pytest.mark.parametrize("change", ["rewrite", "touch", "add", "remove"])
def test_cache_invalidated_when_files_change(tiny_dataset, tmp_cache, change):
    frame = build_index(tiny_dataset).frame
    first = loader.load_patches(frame)
    target = Path(frame.at[0, "path"])
    if change == "rewrite":
        write_patch(target, np.full((50, 50, 3), 7, np.uint8))
    elif change == "touch":
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    elif change == "add":
        write_patch(tiny_dataset / "101" / "0" / patch_name("101", 501, 1, 0), np.zeros((50, 50, 3), np.uint8))
    else:
        target.unlink()
    again = loader.load_patches(build_index(tiny_dataset).frame)
    assert not again.from_cache
    if change in ("rewrite", "touch"):
        # Same paths: the entry is replaced, not duplicated.
        assert again.cache_path == first.cache_path
        assert len(list(tmp_cache.glob("patches-*.npy"))) == 1
    else:
        assert again.cache_path != first.cache_path
    if change == "rewrite":
        assert (again.images[0] == 7).all()
    assert loader.load_patches(build_index(tiny_dataset).frame).from_cache


def test_source_folder_is_not_modified(tiny_dataset, tmp_cache):
    before = _listing_hash(tiny_dataset)
    frame = build_index(tiny_dataset).frame
    loader.load_patches(frame)
    loader.load_patches(frame)
    assert _listing_hash(tiny_dataset) == before


def test_cache_inside_the_data_folder_is_refused(tiny_dataset):
    frame = build_index(tiny_dataset).frame
    with pytest.raises(ValueError, match="inside the dataset folder"):
        loader.load_patches(frame, cache_dir=tiny_dataset / ".cache")
    assert not (tiny_dataset / ".cache").exists()


def test_truncated_png_is_reported_and_the_rest_loads(tiny_dataset, tmp_cache):
    frame = build_index(tiny_dataset).frame
    bad = Path(frame.at[5, "path"])
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    loaded = loader.load_patches(build_index(tiny_dataset).frame)
    assert len(loaded.problems) == 1
    problem = loaded.problems[0]
    assert problem.path == str(bad) and problem.kind == TRUNCATED
    assert bad.name in str(problem)
    assert loaded.images.shape[0] == len(loaded.frame) == 35
    assert str(bad) not in set(loaded.frame["path"])
    assert np.array_equal(loaded.images[:, 0, 0], _expected_encoding(loaded.frame))
    # The failure is cached too: the second load reports the same problem without decoding.
    again = loader.load_patches(build_index(tiny_dataset).frame)
    assert again.from_cache and again.problems == loaded.problems
    assert np.array_equal(again.images, loaded.images)


def test_empty_missing_and_oversized_files_are_reported(tiny_dataset, tmp_path):
    good = sorted(tiny_dataset.rglob("*.png"))[:3]
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    big = write_patch(tmp_path / "big.png", np.zeros((60, 60, 3), np.uint8))
    gone = tmp_path / "gone.png"
    frame = _frame_of([good[0], empty, good[1], gone, big, good[2]])
    loaded = loader.load_patches(frame, cache_dir=tmp_path / "cache")
    kinds = {Path(p.path).name: p.kind for p in loaded.problems}
    assert kinds == {"empty.png": TRUNCATED, "gone.png": UNREADABLE, "big.png": loader.WRONG_SIZE}
    assert list(loaded.frame["path"]) == [str(p) for p in good]
    for i, path in enumerate(good):
        assert np.array_equal(loaded.images[i], loader.read_patch(path))


def test_all_files_bad(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    loaded = loader.load_patches(_frame_of([bad]), cache_dir=tmp_path / "cache")
    assert loaded.images.shape == (0, 50, 50, 3) and len(loaded.frame) == 0
    assert [p.path for p in loaded.problems] == [str(bad)]
    again = loader.load_patches(_frame_of([bad]), cache_dir=tmp_path / "cache")
    assert again.from_cache and again.images.shape == (0, 50, 50, 3)


def test_empty_frame(tmp_path):
    loaded = loader.load_patches(_frame_of([]), cache_dir=tmp_path / "cache")
    assert loaded.images.shape == (0, 50, 50, 3) and loaded.problems == []
    assert not (tmp_path / "cache").exists()


def test_parallel_equals_serial(tiny_dataset, tmp_path):
    frame = build_index(tiny_dataset).frame
    serial = loader.load_patches(frame, cache_dir=tmp_path / "a", workers=1)
    parallel = loader.load_patches(frame, cache_dir=tmp_path / "b", workers=4)
    in_memory = loader.load_patches(frame, workers=3, use_cache=False)
    assert np.array_equal(serial.images, parallel.images)
    assert np.array_equal(serial.images, in_memory.images)
    assert in_memory.cache_path is None and not (tmp_path / "c").exists()


def test_many_chunks_keep_row_order(tmp_path, monkeypatch):
    # More rows than one decoding task, finishing out of order: rows must still land in place.
    monkeypatch.setattr(loader, "_CHUNK_ROWS", 7)
    paths = []
    for i in range(40):
        paths.append(write_patch(tmp_path / "src" / f"{i}.png", np.full((50, 50, 3), i, np.uint8)))
    loaded = loader.load_patches(_frame_of(paths), cache_dir=tmp_path / "cache", workers=4)
    assert np.array_equal(loaded.images[:, 0, 0, 0], np.arange(40))


def test_interrupted_load_leaves_no_cache(tiny_dataset, tmp_cache, monkeypatch):
    frame = build_index(tiny_dataset).frame

    def boom(paths, out, stats):
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "_decode_chunk", boom)
    with pytest.raises(KeyboardInterrupt):
        loader.load_patches(frame)
    assert list(tmp_cache.iterdir()) == []
    monkeypatch.undo()
    assert not loader.load_patches(frame, cache_dir=tmp_cache).from_cache


def test_select_and_clear_cache(tiny_dataset, tmp_cache):
    frame = build_index(tiny_dataset).frame
    loaded = loader.load_patches(frame)
    mask = (loaded.frame["patient_id"] == "102").to_numpy()
    images, sub = loaded.select(mask)
    assert images.shape == (12, 50, 50, 3) and not isinstance(images, np.memmap)
    assert (sub["patient_id"] == "102").all() and list(sub.index) == list(range(12))
    assert np.array_equal(images, np.asarray(loaded.images)[mask])
    images, sub = loaded.select([3, 1])
    assert list(sub["path"]) == [frame.at[3, "path"], frame.at[1, "path"]]
    with pytest.raises(ValueError):
        loaded.select(mask[:5])
    (tmp_cache / "keep.txt").write_text("not ours")
    assert loader.clear_cache() == 3
    assert [p.name for p in tmp_cache.iterdir()] == ["keep.txt"]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("IDC_CACHE_DIR", str(tmp_path / "c"))
    assert loader.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("IDC_CACHE_DIR")
    assert loader.default_cache_dir() == Path.home() / ".cache" / "idc_helpers"


# --- the real sample ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_load(real_sample_dir, tmp_path_factory):
    """The real sample decoded once into a cache of its own (a few seconds on 2 cores)."""
    cache = tmp_path_factory.mktemp("real_cache")
    frame = build_index(real_sample_dir).frame
    return frame, loader.load_patches(frame, cache_dir=cache), cache


@pytest.mark.realdata
def test_real_sample_loads(real_load):
    frame, loaded, _ = real_load
    assert loaded.problems == []
    assert loaded.images.shape == (25_899, 50, 50, 3)
    assert loaded.frame["patient_id"].nunique() == 29
    assert np.bincount(loaded.labels).tolist() == [20_247, 5_652]
    # Full-size patches are exactly what OpenCV reads, in RGB order.
    for i in np.random.default_rng(0).choice(len(frame), 20, replace=False):
        assert np.array_equal(loaded.images[i], cv2.imread(frame.at[i, "path"])[..., ::-1])


@pytest.mark.realdata
def test_real_border_patches_padded_with_pixels_intact(real_load):
    frame, loaded, _ = real_load
    short = np.flatnonzero((frame["width"] != 50) | (frame["height"] != 50))
    assert len(short) == 240
    for i in short:
        original = cv2.imread(frame.at[i, "path"])[..., ::-1]
        h, w = original.shape[:2]
        assert (w, h) == (frame.at[i, "width"], frame.at[i, "height"]) and (h < 50 or w < 50)
        patch = loaded.images[i]
        assert np.array_equal(patch[:h, :w], original)
        assert (patch[h:] == 255).all() and (patch[:, w:] == 255).all()


@pytest.mark.realdata
def test_real_second_load_hits_the_cache(real_load):
    frame, first, cache = real_load
    second = loader.load_patches(frame, cache_dir=cache)
    assert second.from_cache and second.cache_path == first.cache_path
    assert np.array_equal(second.images, first.images)


def test_prune_cache_drops_least_recently_used(tiny_dataset, tmp_cache):
    frame = build_index(tiny_dataset).frame
    old = loader.load_patches(frame.iloc[:12])
    recent = loader.load_patches(frame.iloc[12:24])
    os.utime(old.cache_path.with_suffix(".json"), ns=(1, 1))  # long unused
    loader.load_patches(frame.iloc[12:24])  # a hit marks it used now
    entry = sum(old.cache_path.with_suffix(suffix).stat().st_size for suffix in (".npy", ".json", ".stats"))
    freed = loader.prune_cache(max_bytes=2 * entry)
    assert freed == 0  # within budget
    newest = loader.load_patches(frame.iloc[24:])
    assert loader.prune_cache(max_bytes=2 * entry + 10, keep=newest.cache_path) >= entry
    assert not old.cache_path.exists()
    assert recent.cache_path.exists() and newest.cache_path.exists()
    assert loader.load_patches(frame.iloc[12:24]).from_cache


def test_crash_while_replacing_an_entry_never_serves_old_images(tiny_dataset, tmp_cache, monkeypatch):
    frame = build_index(tiny_dataset).frame
    first = loader.load_patches(frame)
    write_patch(Path(frame.at[0, "path"]), np.full((50, 50, 3), 9, np.uint8))

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(loader, "write_json", crash)  # after the new stats, before the new images
    with pytest.raises(RuntimeError):
        loader.load_patches(frame)
    assert not first.cache_path.exists()
    monkeypatch.undo()
    again = loader.load_patches(frame)
    assert not again.from_cache and (again.images[0] == 9).all()
