"""A small SYNTHETIC dataset in the Kaggle layout, so that the code and notebooks run without the real data.

Each synthetic patient is one whole slide drawn by :func:`idc_helpers.synthetic_tissue.render_slide`, then cut into
50x50 patches exactly like the Kaggle data:

    <dest>/<patient_id>/<0|1>/<patient_id>_idx5_x<X>_y<Y>_class<C>.png

``X``/``Y`` are the 1-based top-left pixel of the patch on a 50-pixel stride; only patches that hold tissue are
written; a patch is IDC (class 1) when most of its pixels lie in an IDC region; some slides end part-way through a
row or column of patches, which gives border patches smaller than 50x50 as in the real data.

None of this is real tissue. The marker file :data:`DEMO_MARKER` at the dataset's root says so, and
:func:`is_synthetic` lets every notebook and command say so too.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import cv2
import numpy as np

from idc_helpers import KAGGLE_DATASET, KAGGLE_PATCHES, KAGGLE_PATIENTS, PATCH_SIZE, __version__
from idc_helpers.atomic import publish_dir
from idc_helpers.errors import UserError
from idc_helpers.synthetic_tissue import SyntheticSlide, render_slide

DEMO_MARKER = "SYNTHETIC_DEMO_DATA.txt"
# 32 patients: the default 70/15/15 patient split then holds out 5 validation and 5 test patients, enough for an
# interval over patients to mean something. Slides are small (about 80 patches each), so the whole set stays
# about as large, and as quick to train on, as a dozen full-size slides.
DEFAULT_PATIENTS = 32
FIRST_PATIENT_ID = 90001  # real Kaggle patient ids are 4-5 digits below 17000: these can never be mistaken for them

# Where a run looks for its data, in order (idc_helpers.datasource.resolve_data_dir follows it).
LOOKUP_ORDER = (
    "the folder given (--data-dir, or DATA_DIR in a notebook); the IDC_DATA_DIR variable; a complete copy in "
    "./data; on Colab, or wherever Kaggle credentials are found, a download into ./data; else the synthetic demo"
)

_NOTICE_LINES = [
    "SYNTHETIC DEMO DATA  -  NOT REAL TISSUE, NOT REAL PATIENTS",
    "",
    "These patches were drawn by idc_helpers.demo_data so that the code runs",
    "without the Kaggle dataset. Every number, figure and model made from them",
    "means nothing clinically: they only show that the pipeline works.",
    "",
    f"To use the real data ({KAGGLE_PATIENTS} patients, {KAGGLE_PATCHES:,} patches), run",
    "    python -m idc_helpers download",
    "It writes ./data (about 3.1 GB). The dataset is public; where Kaggle asks",
    "for a login, add an API token (kaggle.com > Settings > API) as",
    "KAGGLE_API_TOKEN or ~/.kaggle/access_token (on Colab: the notebook secret",
    "KAGGLE_API_TOKEN, or KAGGLE_USERNAME and KAGGLE_KEY).",
    *textwrap.wrap(f"Data is looked up in this order: {LOOKUP_ORDER}.", 74),
]


def _banner(lines: list[str]) -> str:
    width = max(len(line) for line in lines) + 8
    edge = "!" * width
    body = [f"!!  {line.ljust(width - 8)}  !!" for line in lines]
    return "\n".join([edge, *body, edge])


SYNTHETIC_NOTICE: str = _banner(_NOTICE_LINES)

#: One line for a synthetic folder the user named (the banner above is shown where the demo data is written, or
#: chosen for a user who named no data): a reminder, not the whole explanation again.
SYNTHETIC_LINE: str = "not tissue, not patients; numbers and figures made from it mean nothing clinically."

_COLS_RANGE = (10, 16)  # patches across a slide, inclusive
_ROWS_RANGE = (8, 13)
# Widths/heights of the last row or column where a slide ends part-way; the real data's commonest are 42, 30, 1.
_BORDER_SIZES = (42, 30, 34, 41, 32, 12, 1)
_MIN_TISSUE = 0.2  # fraction of a patch that must be tissue for the patch to exist (background is not written)


class DemoDataError(UserError, ValueError):
    """An argument of :func:`write_demo_dataset` is out of range."""


class DemoDestinationError(UserError, FileExistsError):
    """The demo dataset's destination holds something else (or, without ``overwrite``, an earlier demo)."""


def is_synthetic(data_dir: str | os.PathLike[str]) -> bool:
    """True when ``data_dir`` is a demo dataset written by :func:`write_demo_dataset` (its marker file is there)."""
    return (Path(data_dir) / DEMO_MARKER).is_file()


def write_demo_dataset(
    dest: str | os.PathLike[str],
    *,
    n_patients: int = DEFAULT_PATIENTS,
    seed: int = 0,
    overwrite: bool = False,
    grid: tuple[int, int] | None = None,
) -> Path:
    """Write a synthetic dataset in the Kaggle layout to ``dest`` and return its absolute path.

    ``n_patients`` slides, patient ids ``90001, 90002, ...``; ``grid`` = (columns, rows) of 50-px patches per slide,
    or ``None`` for a size drawn per patient (10-16 x 8-13, about 80 tissue patches each). The same ``seed`` gives
    byte-identical files (with the same OpenCV/zlib); patient ``k`` does not depend on ``n_patients``.
    The dataset is built in a hidden folder next to ``dest`` and renamed into place at the end
    (:func:`idc_helpers.atomic.publish_dir`), so an interrupted run leaves no half dataset. ``dest`` must not exist
    or be empty; with ``overwrite=True`` an existing *demo* dataset is replaced, anything else is refused
    (:class:`DemoDestinationError`); bad arguments raise :class:`DemoDataError`.
    """
    if n_patients < 1:
        raise DemoDataError(f"the number of demo patients must be at least 1, got {n_patients}")
    if grid is not None and (grid[0] < 3 or grid[1] < 3):
        raise DemoDataError(f"grid must be at least 3x3 patches (columns, rows), got {grid}")
    dest = Path(os.path.abspath(Path(dest).expanduser()))
    replace_old = _check_destination(dest, overwrite)
    with publish_dir(dest, replace=replace_old) as tmp:
        # One independent random stream per patient: patient k is the same whatever n_patients is.
        streams = np.random.SeedSequence(seed).spawn(n_patients)
        counts = []
        for k, stream in enumerate(streams):
            patient_id = str(FIRST_PATIENT_ID + k)
            rng = np.random.default_rng(stream)
            cols, rows = (
                grid
                if grid is not None
                else (
                    int(rng.integers(_COLS_RANGE[0], _COLS_RANGE[1] + 1)),
                    int(rng.integers(_ROWS_RANGE[0], _ROWS_RANGE[1] + 1)),
                )
            )
            slide = render_slide(rng, cols, rows, cut=_cut_for(k, rng))
            counts.append((patient_id, *_write_patches(slide, tmp / patient_id, patient_id)))
        # The marker goes in last: a folder with a marker is a finished demo dataset.
        (tmp / DEMO_MARKER).write_text(_marker_text(seed, counts), encoding="utf-8")
    return dest


def _check_destination(dest: Path, overwrite: bool) -> bool:
    """Raise unless ``dest`` may be written; return True when an old demo dataset there is to be replaced."""
    if not dest.exists():
        return False
    if not dest.is_dir():
        raise DemoDestinationError(f"{dest} is a file, not a folder: choose another destination for the demo dataset.")
    if not any(dest.iterdir()):
        return False
    if not overwrite:
        raise DemoDestinationError(
            f"{dest} is not empty: the demo dataset needs a new or empty folder. Choose another folder"
            + (
                "; it holds an earlier demo dataset, so you may also delete it, or pass overwrite=True "
                "to write_demo_dataset() to replace it."
                if is_synthetic(dest)
                else "."
            )
        )
    if not is_synthetic(dest):
        raise DemoDestinationError(
            f"{dest} is not empty and has no {DEMO_MARKER}, so it is not a demo dataset: refusing to replace it. "
            "Choose another folder."
        )
    return True


def _cut_for(k: int, rng: np.random.Generator) -> tuple[str, int] | None:
    """Which slides end part-way through a row/column (as ~1% of real patches do) and at what size."""
    if k % 8 == 1:
        return "bottom", int(rng.choice(_BORDER_SIZES))
    if k % 8 == 5:
        return "right", int(rng.choice(_BORDER_SIZES))
    return None


def _marker_text(seed: int, counts: list[tuple[str, int, int, int]]) -> str:
    n = sum(c[1] for c in counts)
    n_idc = sum(c[2] for c in counts)
    table = "\n".join(
        f"  {pid}: {total} patches, {idc} IDC, {small} smaller than 50x50" for pid, total, idc, small in counts
    )
    # No date or host name in here: the same seed must give byte-identical files.
    return (
        f"{SYNTHETIC_NOTICE}\n\n"
        "This folder is a SYNTHETIC demo dataset. The images are drawn by a program; they are not tissue and\n"
        "belong to no patient. Results obtained on it mean nothing clinically.\n\n"
        f"Generated by idc_helpers {__version__} (idc_helpers.demo_data.write_demo_dataset) with seed {seed}.\n"
        f"Layout and names follow the Kaggle dataset {KAGGLE_DATASET}.\n"
        f"Patients: {len(counts)}; patches: {n}; IDC: {n_idc} ({n_idc / max(n, 1):.1%}).\n"
        f"{table}\n\n"
        "idc_helpers.demo_data.is_synthetic() looks for this file: do not delete it.\n"
    )


def _write_patches(slide: SyntheticSlide, patient_dir: Path, patient_id: str) -> tuple[int, int, int]:
    """Cut a slide into patches, write the tissue ones; return (patches, IDC patches, patches smaller than 50x50)."""
    tissue_frac = _cell_fraction(slide.tissue, PATCH_SIZE)
    idc_frac = _cell_fraction(slide.idc, PATCH_SIZE)
    bgr = np.ascontiguousarray(slide.image[..., ::-1])
    n = n_idc = n_small = 0
    for j, i in zip(*np.nonzero(tissue_frac >= _MIN_TISSUE), strict=False):
        x0, y0 = i * PATCH_SIZE, j * PATCH_SIZE
        patch = bgr[y0 : y0 + PATCH_SIZE, x0 : x0 + PATCH_SIZE]
        label = int(idc_frac[j, i] >= 0.5)
        name = f"{patient_id}_idx5_x{x0 + 1}_y{y0 + 1}_class{label}.png"
        path = patient_dir / str(label) / name
        # Class folders are made on first use: in the real data a patient without IDC has no 1/ folder.
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), patch):
            raise OSError(f"could not write {path}: is the disk full or the folder read-only?")
        n += 1
        n_idc += label
        n_small += patch.shape[0] != PATCH_SIZE or patch.shape[1] != PATCH_SIZE
    return n, n_idc, n_small


def _cell_fraction(mask: np.ndarray, size: int) -> np.ndarray:
    """Fraction of True pixels in each ``size``-px grid cell, over the cell's real area (border cells are smaller)."""
    h, w = mask.shape
    rows, cols = -(-h // size), -(-w // size)
    padded = np.zeros((rows * size, cols * size), np.float32)
    padded[:h, :w] = mask
    sums = padded.reshape(rows, size, cols, size).sum(axis=(1, 3))
    heights = np.minimum(size, h - size * np.arange(rows))
    widths = np.minimum(size, w - size * np.arange(cols))
    return sums / np.outer(heights, widths)
