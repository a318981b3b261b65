"""Loading patches: decoding (colour order, padding, odd PNG types), bad files, the on-disk cache, the real sample."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT, patch_name, write_patch
from PIL import Image
from test_patch_index import _run_with_alarm, make_png

from idc_helpers import decode, loader, patch_cache
from idc_helpers.errors import ExternalError, UserError
from idc_helpers.patch_files import NOT_PNG, UNREADABLE, WRONG_SIZE
from idc_helpers.patch_index import build_index
from idc_helpers.png import EMPTY, TRUNCATED

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
    patch = decode.read_patch(path)
    assert patch.shape == (50, 50, 3) and patch.dtype == np.uint8
    assert tuple(patch[10, 10]) == RGB


def test_pad_keeps_pixels_top_left_and_fills_white():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, size=(30, 41, 3), dtype=np.uint8)
    out = decode.pad_to_patch(img)
    assert out.shape == (50, 50, 3) and out.dtype == np.uint8
    assert np.array_equal(out[:30, :41], img)
    assert (out[30:] == 255).all() and (out[:, 41:] == 255).all()
    full = rng.integers(0, 255, size=(50, 50, 3), dtype=np.uint8)
    assert np.array_equal(decode.pad_to_patch(full), full)
    with pytest.raises(ValueError, match="larger"):
        decode.pad_to_patch(np.zeros((51, 50, 3), np.uint8))


def test_border_patch_is_padded(tmp_path):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 255, size=(1, 50, 3), dtype=np.uint8)  # a 50x1 patch, as in the real data
    patch = decode.read_patch(write_patch(tmp_path / "a.png", img))
    assert np.array_equal(patch[:1], img)
    assert (patch[1:] == 255).all()


def test_grayscale_png(tmp_path):
    gray = np.arange(2500, dtype=np.uint32).reshape(50, 50).astype(np.uint8)
    path = tmp_path / "gray.png"
    assert cv2.imwrite(str(path), gray)
    patch = decode.read_patch(path)
    assert patch.shape == (50, 50, 3)
    for c in range(3):
        assert np.array_equal(patch[..., c], gray)


def test_16bit_png_is_scaled_to_8bit(tmp_path):
    gray = np.arange(2500, dtype=np.uint32).reshape(50, 50).astype(np.uint8)
    path = tmp_path / "gray16.png"
    assert cv2.imwrite(str(path), gray.astype(np.uint16) * 257)
    assert np.array_equal(decode.read_patch(path)[..., 0], gray)


def test_rgba_png_is_composited_on_white(tmp_path):
    rgba = np.zeros((50, 50, 4), np.uint8)
    rgba[..., :3] = RGB
    rgba[:, :20, 3] = 255  # opaque: the colour itself
    rgba[:, 20:40, 3] = 0  # transparent: white glass
    rgba[:, 40:, 3] = 128  # half: halfway to white
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    patch = decode.read_patch(path)
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
    assert np.array_equal(decode.read_patch(tmp_path / "p.png"), expected)
    Image.new("LA", (50, 50), (90, 255)).save(tmp_path / "la.png")
    assert tuple(decode.read_patch(tmp_path / "la.png")[0, 0]) == (90, 90, 90)


def test_too_large_patch_is_refused(tmp_path):
    path = write_patch(tmp_path / "big.png", np.zeros((50, 60, 3), np.uint8))
    with pytest.raises(decode.PatchReadError, match=r"big\.png") as info:
        decode.read_patch(path)
    assert info.value.kind == WRONG_SIZE
    assert "60x50" in str(info.value)
    # Larger than the first read (64 kB of noise): read whole, then refused for its size.
    noise = np.random.default_rng(0).integers(0, 256, size=(200, 200, 3), dtype=np.uint8)
    huge = write_patch(tmp_path / "huge.png", noise)
    assert huge.stat().st_size > 1 << 16
    with pytest.raises(decode.PatchReadError, match="200x200"):
        decode.read_patch(huge)


def test_read_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(decode.PatchReadError, match=r"empty\.png.*0 bytes"):
        decode.read_patch(empty)
    with pytest.raises(ValueError, match=r"gone\.png"):  # PatchReadError is a ValueError
        decode.read_patch(tmp_path / "gone.png")


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
        [entry.name, entry.with_suffix(".json").name, entry.with_suffix(".stats").name, entry.with_suffix(".lock").name]
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


def test_cache_inside_any_of_several_data_folders_is_refused(tiny_dataset, tmp_path):
    other = tmp_path / "other"
    write_patch(other / "201" / "0" / patch_name("201", 1, 1, 0), np.zeros((50, 50, 3), np.uint8))
    frame = build_index(tiny_dataset, other).frame
    with pytest.raises(patch_cache.CacheError, match=r"inside the dataset folder .*other"):
        loader.load_patches(frame, cache_dir=other / "cache")
    assert not (other / "cache").exists()


def test_cache_inside_the_data_folder_is_refused(tiny_dataset):
    frame = build_index(tiny_dataset).frame
    with pytest.raises(patch_cache.CacheError, match="inside the dataset folder"):
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
    assert kinds == {"empty.png": EMPTY, "gone.png": UNREADABLE, "big.png": WRONG_SIZE}
    assert list(loaded.frame["path"]) == [str(p) for p in good]
    for i, path in enumerate(good):
        assert np.array_equal(loaded.images[i], decode.read_patch(path))


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
    monkeypatch.setattr(decode, "_CHUNK_ROWS", 7)
    paths = []
    for i in range(40):
        paths.append(write_patch(tmp_path / "src" / f"{i}.png", np.full((50, 50, 3), i, np.uint8)))
    loaded = loader.load_patches(_frame_of(paths), cache_dir=tmp_path / "cache", workers=4)
    assert np.array_equal(loaded.images[:, 0, 0, 0], np.arange(40))


def test_interrupted_load_leaves_no_cache(tiny_dataset, tmp_cache, monkeypatch):
    frame = build_index(tiny_dataset).frame

    def boom(paths, out, stats):
        raise KeyboardInterrupt

    monkeypatch.setattr(decode, "_decode_chunk", boom)
    with pytest.raises(KeyboardInterrupt):
        loader.load_patches(frame)
    assert list(tmp_cache.iterdir()) == []  # no images, no temporary file, no lock file
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
    assert patch_cache.clear_cache() == 4  # images, metadata, stats, lock
    assert [p.name for p in tmp_cache.iterdir()] == ["keep.txt"]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("IDC_CACHE_DIR", str(tmp_path / "c"))
    assert patch_cache.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("IDC_CACHE_DIR")
    assert patch_cache.default_cache_dir() == Path.home() / ".cache" / "idc_helpers"


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
    freed = patch_cache.prune_cache(max_bytes=2 * entry)
    assert freed == 0  # within budget
    newest = loader.load_patches(frame.iloc[24:])
    assert patch_cache.prune_cache(max_bytes=2 * entry + 10, keep=newest.cache_path) >= entry
    assert not old.cache_path.exists()
    assert recent.cache_path.exists() and newest.cache_path.exists()
    assert loader.load_patches(frame.iloc[12:24]).from_cache


def test_crash_while_replacing_an_entry_never_serves_old_images(tiny_dataset, tmp_cache, monkeypatch):
    frame = build_index(tiny_dataset).frame
    first = loader.load_patches(frame)
    write_patch(Path(frame.at[0, "path"]), np.full((50, 50, 3), 9, np.uint8))

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(patch_cache, "write_json", crash)  # after the new stats, before the new images
    with pytest.raises(RuntimeError):
        loader.load_patches(frame)
    assert not first.cache_path.exists()
    monkeypatch.undo()
    again = loader.load_patches(frame)
    assert not again.from_cache and (again.images[0] == 9).all()


# --- hostile PNGs: refused from their header or decoded correctly, never a crash or a blow-up ----------------------


@pytest.mark.parametrize(
    "kind_of_lie, data, kind",
    [
        ("a 20000x20000 bomb", lambda: make_png(20000, 20000, rows=2000), WRONG_SIZE),
        ("bad IDAT checksum", lambda: make_png(50, 50, idat_crc_ok=False), TRUNCATED),
        ("IDAT cut short", lambda: make_png(50, 50)[:-30], TRUNCATED),
        ("bad IHDR checksum", lambda: make_png(50, 50, header_crc_ok=False), TRUNCATED),
        ("JPEG bytes named .png", lambda: cv2.imencode(".jpg", np.zeros((50, 50, 3), np.uint8))[1].tobytes(), NOT_PNG),
        ("6 MB of zeros", lambda: make_png(50, 50) + bytes(6 << 20), WRONG_SIZE),
    ],
)
def test_lying_pngs_are_refused_naming_the_file(tmp_path, kind_of_lie, data, kind):
    bad = tmp_path / "liar.png"
    bad.write_bytes(data())
    with pytest.raises(decode.PatchReadError, match=r"liar\.png") as info:
        decode.read_patch(bad)
    assert info.value.kind == kind
    good = write_patch(tmp_path / "good.png", np.full((50, 50, 3), 40, np.uint8))
    loaded = loader.load_patches(_frame_of([bad, good]), cache_dir=tmp_path / "cache")
    assert [(p.path, p.kind) for p in loaded.problems] == [(str(bad), kind)]
    assert len(loaded.images) == 1 and (loaded.images[0] == 40).all()


def test_png_whose_data_inflates_beyond_its_header_decodes_to_its_header_size(tmp_path):
    liar = tmp_path / "liar.png"
    liar.write_bytes(make_png(50, 50, rows=200_000))  # 30 MB of rows behind a 50x50 header
    patch = decode.read_patch(liar)
    assert patch.shape == (50, 50, 3) and (patch == 0).all()


@pytest.mark.parametrize("colour, depth", [(0, 16), (3, 4), (4, 8), (6, 16), (0, 1)])
def test_other_png_types_decode(tmp_path, colour, depth):
    path = tmp_path / "odd.png"
    path.write_bytes(make_png(50, 42, colour=colour, depth=depth))
    patch = decode.read_patch(path)
    assert patch.shape == (50, 50, 3) and (patch[42:] == 255).all()


def test_a_fifo_in_the_frame_does_not_hang_the_load(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    good = write_patch(tmp_path / "good.png", np.full((50, 50, 3), 40, np.uint8))
    loaded = _run_with_alarm(lambda: loader.load_patches(_frame_of([fifo, good]), cache_dir=tmp_path / "cache"))
    assert [(p.path, p.kind) for p in loaded.problems] == [(str(fifo), UNREADABLE)]
    assert "not a regular file" in loaded.problems[0].message


def test_path_that_is_not_utf8_loads(tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"
    with open(raw, "wb") as handle:
        handle.write(cv2.imencode(".png", np.full((50, 50, 3), 7, np.uint8))[1].tobytes())
    loaded = loader.load_patches(_frame_of([Path(os.fsdecode(raw))]), cache_dir=tmp_path / "cache")
    assert loaded.problems == [] and (loaded.images[0] == 7).all()
    assert loader.load_patches(_frame_of([Path(os.fsdecode(raw))]), cache_dir=tmp_path / "cache").from_cache


# --- row positions -------------------------------------------------------------------------------------------------


def test_check_rows():
    assert loader.check_rows(np.array([True, False, True]), 3).tolist() == [0, 2]
    assert loader.check_rows([2, 0], 3).tolist() == [2, 0] and loader.check_rows([], 3).size == 0
    with pytest.raises(ValueError, match="shape"):
        loader.check_rows(np.array([True]), 3)
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        loader.check_rows([3], 3)
    with pytest.raises(IndexError):
        loader.check_rows([-1], 3)  # not counted from the end
    with pytest.raises(TypeError):
        loader.check_rows([0.5], 3)
    with pytest.raises(UserError):  # one line in the CLI, not a traceback
        loader.check_rows([7], 3)


# --- unusable cache folders and full disks --------------------------------------------------------------------------


def test_cache_folder_that_cannot_be_made_falls_back_to_memory(tiny_dataset, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    frame = build_index(tiny_dataset).frame
    with pytest.warns(loader.CacheWarning, match="a_file/cache.*cannot be written.*--cache-dir"):
        loaded = loader.load_patches(frame, cache_dir=blocker / "cache")
    assert loaded.cache_path is None and len(loaded.images) == 36
    assert np.array_equal(loaded.images[:, 0, 0], _expected_encoding(loaded.frame))


def test_cache_folder_that_cannot_be_made_is_one_clear_error_for_large_sets(tiny_dataset, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setattr(loader, "IN_MEMORY_FALLBACK_BYTES", 1000)  # as if the set were larger than memory allows
    with pytest.raises(
        patch_cache.CacheError, match=r"a_file/cache cannot be written.*--cache-dir.*IDC_CACHE_DIR"
    ) as info:
        loader.load_patches(build_index(tiny_dataset).frame, cache_dir=blocker / "cache")
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_read_only_cache_folder_falls_back_to_memory(tiny_dataset, small_mount):
    mount = small_mount("size=1m,ro")
    with pytest.warns(loader.CacheWarning, match=f"{mount}.*cannot be written"):
        loaded = loader.load_patches(build_index(tiny_dataset).frame, cache_dir=mount)
    assert loaded.cache_path is None and len(loaded.images) == 36


def test_full_disk_says_how_much_is_needed_and_free(tiny_dataset, small_mount):
    mount = small_mount("size=100k")
    with pytest.raises(patch_cache.CacheSpaceError) as info:
        loader.load_patches(build_index(tiny_dataset).frame, cache_dir=mount)
    message = str(info.value)
    assert isinstance(info.value, ExternalError) and str(mount) in message
    assert re.search(r"270 kB needed, (9\d|10\d) kB free", message), message
    assert "--cache-dir" in message and "\n" not in message
    assert [p.name for p in mount.iterdir()] == []  # nothing half-written left, and no lock file to trip over


# --- processes sharing a cache: a killed writer, a stalled writer ---------------------------------------------------

_WRITER = """
import json, sys
import numpy as np, pandas as pd
from idc_helpers import decode, loader
paths = sorted(str(p) for p in __import__("pathlib").Path(sys.argv[1]).glob("*.png"))
loaded = loader.load_patches(pd.DataFrame({"path": paths}), cache_dir=sys.argv[2], workers=1)
n = len(loaded.images)
ok = all(np.array_equal(loaded.images[i], decode.read_patch(paths[i])) for i in (0, n // 2, n - 1))
print(json.dumps({"from_cache": loaded.from_cache, "n": n, "ok": ok}))
"""
_N_LINKS = 20_000  # a few seconds of decoding on one thread: time to catch the writer in the middle


@pytest.fixture(scope="module")
def many_patches(tmp_path_factory) -> Path:
    """20,000 hard links to one noisy 50x50 patch (made in well under a second; 150 MB once decoded)."""
    folder = tmp_path_factory.mktemp("many")
    source = write_patch(folder / "00000.png", np.random.default_rng(0).integers(0, 256, (50, 50, 3), np.uint8))
    for i in range(1, _N_LINKS):
        os.link(source, folder / f"{i:05d}.png")
    return folder


def _start_writer(folder: Path, cache: Path, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(folder), str(cache)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def _temps(cache: Path) -> list[Path]:
    return sorted(cache.glob(".patches-*.tmp")) if cache.is_dir() else []


def _decoding(cache: Path) -> list[Path]:
    """The temporary files that have their full (preallocated) size: the writer is decoding into them."""
    return [p for p in _temps(cache) if p.exists() and p.stat().st_size >= _N_LINKS * 7500]


def _wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the writer ended before {what}: {proc.communicate()}")
        time.sleep(0.002)
    pytest.fail(f"timed out waiting for {what}")


def _kill_mid_write(folder: Path, cache: Path) -> Path:
    writer = _start_writer(folder, cache)
    orphan = _wait_until(lambda: _decoding(cache), writer, "the cache write started")[0]
    os.kill(writer.pid, signal.SIGKILL)
    writer.communicate()
    assert orphan.exists() and orphan.stat().st_size >= _N_LINKS * 7500  # the preallocated size, leaked
    return orphan


def test_killed_cache_write_leaves_nothing_once_the_next_load_or_prune_runs(many_patches, tiny_dataset, tmp_path):
    cache = tmp_path / "cache"
    orphan = _kill_mid_write(many_patches, cache)
    assert f".{os.getpid()}." not in orphan.name and re.search(r"\.npy\.\d+\.", orphan.name)  # the writer's pid
    # Another entry's load removes it (its writer's lock is free) ...
    other = loader.load_patches(build_index(tiny_dataset).frame, cache_dir=cache)
    assert _temps(cache) == [] and not other.from_cache
    # ... and so does a load of the same entry, which then writes a valid cache.
    _kill_mid_write(many_patches, cache)
    frame = _frame_of(sorted(many_patches.glob("*.png")))
    loaded = loader.load_patches(frame, cache_dir=cache)
    assert _temps(cache) == [] and not loaded.from_cache and len(loaded.images) == _N_LINKS
    assert loader.load_patches(frame, cache_dir=cache).from_cache


def test_prune_counts_orphans_and_never_keeps_one_over_a_valid_entry(tiny_dataset, many_patches, tmp_path):
    cache = tmp_path / "cache"
    valid = loader.load_patches(build_index(tiny_dataset).frame, cache_dir=cache)
    orphan = _kill_mid_write(many_patches, cache)
    entry_bytes = sum(valid.cache_path.with_suffix(s).stat().st_size for s in (".npy", ".json", ".stats"))
    orphan_bytes = orphan.stat().st_size
    freed = patch_cache.prune_cache(cache, max_bytes=entry_bytes + 1000)  # room for the valid entry, not the orphan
    assert freed == orphan_bytes
    assert not orphan.exists() and valid.cache_path.exists()
    assert loader.load_patches(build_index(tiny_dataset).frame, cache_dir=cache).from_cache


def test_two_writers_of_one_entry_one_stalled(many_patches, tmp_path):
    cache = tmp_path / "cache"
    first = _start_writer(many_patches, cache)
    _wait_until(lambda: _decoding(cache), first, "the first writer started")
    os.kill(first.pid, signal.SIGSTOP)  # stalled in the middle of its write, holding the entry
    log = tmp_path / "second.err"
    try:
        with open(log, "w") as err:
            second = _start_writer(many_patches, cache, stderr=err)
            _wait_until(
                lambda: "waiting for another process" in log.read_text(),
                second,
                "the second writer found the entry busy",
            )
        time.sleep(1.0)
        assert len(_temps(cache)) == 1  # the second waits instead of decoding the same files again
        assert second.poll() is None
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out_first, err_first = first.communicate(timeout=300)
    out_second, _ = second.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, (err_first, log.read_text())
    a, b = json.loads(out_first.splitlines()[-1]), json.loads(out_second.splitlines()[-1])
    assert a == {"from_cache": False, "n": _N_LINKS, "ok": True}
    assert b == {"from_cache": True, "n": _N_LINKS, "ok": True}  # read what the first wrote
    assert _temps(cache) == [] and len(list(cache.glob("patches-*.npy"))) == 1


def test_two_writers_of_different_entries_and_a_pruner_never_crash(many_patches, tiny_dataset, tmp_path):
    # Two entries written at once while a third process prunes with a budget of nothing: every load still succeeds,
    # because each process maps its file before anyone can delete or replace the name.
    cache = tmp_path / "cache"
    writers = [_start_writer(many_patches, cache), _start_writer(tiny_dataset / "101" / "0", cache)]
    for _ in range(20):
        patch_cache.prune_cache(cache, max_bytes=0)
        time.sleep(0.05)
    results = [json.loads(w.communicate(timeout=300)[0].splitlines()[-1]) for w in writers]
    assert all(r["ok"] for r in results) and results[0]["n"] == _N_LINKS and results[1]["n"] == 9


def test_prune_leaves_a_live_writers_files_alone_and_counts_them(tiny_dataset, tmp_path):
    import fcntl

    cache = tmp_path / "cache"
    valid = loader.load_patches(build_index(tiny_dataset).frame, cache_dir=cache)
    key = "0" * 32
    temps = [cache / f".patches-{key}.npy.{os.getpid()}.1.tmp", cache / f".patches-{key}.json.ab12cd.json.tmp"]
    for path in temps:
        path.write_bytes(b"\0" * 300_000)
    with open(cache / f"patches-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a writer of that entry holds it
        entry = sum(valid.cache_path.with_suffix(s).stat().st_size for s in (".npy", ".json", ".stats"))
        assert patch_cache.prune_cache(cache, max_bytes=entry + 1000) == entry  # over budget because of the live write
        assert all(p.exists() for p in temps) and not valid.cache_path.exists()
        assert patch_cache.remove_orphans(cache) == 0
    assert patch_cache.remove_orphans(cache) == 600_000  # the writer is gone
    assert _temps(cache) == []


@pytest.mark.parametrize(
    "folder, named",
    [
        ("/proc", "/proc cannot be written"),
        ("~nosuchuser-idc/cache", "IDC_CACHE_DIR '~nosuchuser-idc/cache': the home folder in it is not known"),
    ],
)
def test_an_odd_cache_folder_in_the_environment_is_one_line(tiny_dataset, monkeypatch, cli_error, folder, named):
    monkeypatch.setenv("IDC_CACHE_DIR", folder)
    assert named in cli_error(["index", "--data-dir", str(tiny_dataset)])
