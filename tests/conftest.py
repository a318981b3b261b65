"""Shared fixtures: the real shared sample (skipped when absent), an isolated cache, a tiny generated dataset."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_SAMPLE = Path(os.environ.get("IDC_SAMPLE_DIR", REPO_ROOT.parent / "shared" / "data" / "idc_sample"))


# What a build of the package and colab_setup.sh read: copied for install tests, so that no build output lands in
# the checkout (and nothing else that happens to lie in it is copied).
BUILD_FILES = (
    "pyproject.toml",
    "setup.py",
    "MANIFEST.in",
    "README.md",
    "requirements.txt",
    "colab_setup.sh",
    "idc_helpers/**/*.py",
    "notebooks/*.ipynb",
    "notebooks/params/*.yaml",
)


def copy_checkout(dest: Path) -> Path:
    """Copy the files a build and ``colab_setup.sh`` need (the working tree's, committed or not) into ``dest``."""
    for pattern in BUILD_FILES:
        for path in REPO_ROOT.glob(pattern):
            target = dest / path.relative_to(REPO_ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return dest


@pytest.fixture(scope="session")
def real_sample_dir() -> Path:
    """The shared real sample (29 patients, 25,899 patches); tests using it skip when it is absent."""
    if not REAL_SAMPLE.is_dir():
        pytest.skip(f"real sample not found at {REAL_SAMPLE}")
    return REAL_SAMPLE


@pytest.fixture()
def tmp_cache(tmp_path, monkeypatch) -> Path:
    """An empty decoded-patch cache for this test only (``IDC_CACHE_DIR``)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("IDC_CACHE_DIR", str(cache))
    return cache


def write_patch(path: Path, rgb: np.ndarray) -> Path:
    """Write an RGB uint8 array as a PNG (OpenCV wants BGR)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f"could not write {path}")
    return path


def patch_name(patient: str, x: int, y: int, label: int) -> str:
    return f"{patient}_idx5_x{x}_y{y}_class{label}.png"


@pytest.fixture()
def tiny_dataset(tmp_path) -> Path:
    """A 3-patient Kaggle-layout tree of small generated patches (one 50x30 border patch per patient).

    Patient ids 101, 102, 103; each has a 4x3 grid of patches, the right column IDC (class 1).
    Pixel values encode (patient, x, y) so tests can check which file a row came from.
    """
    root = tmp_path / "tiny"
    rng = np.random.default_rng(0)
    for p_i, patient in enumerate(["101", "102", "103"]):
        for gx in range(4):
            for gy in range(3):
                x, y = 1 + 50 * gx, 1 + 50 * gy
                label = int(gx == 3)
                height = 30 if gy == 2 and gx == 0 else 50
                img = rng.integers(0, 256, size=(height, 50, 3), dtype=np.uint8)
                img[0, 0] = (p_i, gx, gy)
                write_patch(root / patient / str(label) / patch_name(patient, x, y, label), img)
    return root


@pytest.fixture()
def cli_error(capsys):
    """Run the CLI with ``argv``, expect exit status 2 and exactly one ``error:`` line on stderr; return that line."""
    from idc_helpers.cli import main

    def run(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and len(err.splitlines()) == 1, err
        return err

    return run


@pytest.fixture()
def assert_refused():
    """``check(err, message)``: ``err`` is one ``error:`` line on stderr that says ``message`` (an old spelling's)."""

    def check(err: str, message: str) -> None:
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err, err

    return check


@pytest.fixture()
def small_mount(tmp_path):
    """``make(options)`` mounts a small tmpfs of our own there.

    Needs root and mount rights; skipped where they are missing.
    """
    mount = tmp_path / "mnt"
    mount.mkdir()

    def make(options: str) -> Path:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
        return mount

    yield make
    subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """Six small synthetic patients (about 200 patches): a 4 / 1 / 1 patient split."""
    from idc_helpers.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo", n_patients=6, seed=0, grid=(8, 6))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A decoded-patch cache shared by the tests of one module."""
    return tmp_path_factory.mktemp("cache")
