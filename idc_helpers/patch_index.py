"""The patch index: one row per patch file of a dataset folder in the Kaggle layout.

Layout: ``<root>/<patient_id>/<0|1>/<patient_id>_idx5_x<X>_y<Y>_class<C>.png``. ``X`` and ``Y`` are the
1-based pixel coordinates of the patch's top-left corner in the patient's slide, on a 50-pixel stride.

File names are parsed strictly. Nothing is dropped silently: every file that cannot be a patch is kept out
of the index and reported as a :class:`Problem` naming the file and what is wrong with it.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from idc_helpers import PATCH_SIZE

FILENAME_RE = re.compile(r"^(?P<patient>\d+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<label>[01])\.png$")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INDEX_COLUMNS = ["path", "patient_id", "x", "y", "label", "width", "height"]

# Problem kinds, in the words the health check prints.
MISNAMED = "misnamed"
MISLABELLED = "mislabelled"
NOT_PNG = "not a PNG"
EMPTY = "empty"
TRUNCATED = "truncated or corrupt"
WRONG_PATIENT = "wrong patient folder"
UNEXPECTED = "unexpected entry"
UNREADABLE = "unreadable"
# Found when decoding (idc_helpers.loader): a patch larger than 50x50 in either dimension.
WRONG_SIZE = "wrong size"


@dataclass(frozen=True)
class Problem:
    """One file that is not a usable patch: which file, what kind of problem, and a readable message."""

    path: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}: {self.message}"


@dataclass
class PatchIndex:
    """The result of scanning a dataset folder.

    ``frame`` has one row per patch (columns :data:`INDEX_COLUMNS`; ``patient_id`` is a string,
    ``width``/``height`` are read from the PNG header); ``problems`` lists every file left out.
    """

    root: Path
    frame: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)

    def problems_frame(self) -> pd.DataFrame:
        """The problems as a DataFrame with columns ``path, kind, message``."""
        return pd.DataFrame([asdict(p) for p in self.problems], columns=["path", "kind", "message"])


class DatasetFolderError(FileNotFoundError):
    """The dataset folder is missing or holds no patient folders."""


def parse_patch_name(name: str) -> tuple[str, int, int, int] | None:
    """Parse ``<patient>_idx5_x<X>_y<Y>_class<C>.png`` into ``(patient_id, x, y, label)``; ``None`` if it does not match."""
    match = FILENAME_RE.match(name)
    if match is None:
        return None
    return match["patient"], int(match["x"]), int(match["y"]), int(match["label"])


def read_png_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Return ``(width, height)`` from a PNG header.

    Raises ``ValueError`` with the reason when the file is empty or does not start like a PNG.
    """
    with open(path, "rb") as handle:
        head = handle.read(24)
    if not head:
        raise ValueError("the file is empty (0 bytes)")
    if not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR" or len(head) < 24:
        raise ValueError("the file does not start with a PNG header")
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def build_index(root: str | os.PathLike[str], *, read_headers: bool = True) -> PatchIndex:
    """Scan a dataset folder in the Kaggle layout and return its :class:`PatchIndex`.

    ``read_headers`` reads each PNG's 24-byte header for width/height and to catch files that are empty or
    not PNGs; with ``False`` those columns hold 50 and only names are checked (faster on slow disks).
    Raises :class:`DatasetFolderError` when ``root`` does not exist or holds no patient folder.
    Rows are sorted by patient, then y, then x, so the same folder always gives the same index.
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DatasetFolderError(
            f"Dataset folder not found: {root}. Point to a folder in the Kaggle layout "
            "(<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<C>.png): download it with "
            "`python -m idc_helpers download`, or write a synthetic demo with `python -m idc_helpers demo-data DIR`."
        )
    rows: list[tuple[str, str, int, int, int, int, int]] = []
    problems: list[Problem] = []
    patient_dirs = []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.is_dir() and entry.name.isdigit():
                patient_dirs.append(entry)
            elif entry.is_dir() and not entry.name.startswith("."):
                problems.append(Problem(entry.path, UNEXPECTED, "folder name is not a numeric patient id; skipped"))
    if not patient_dirs:
        raise DatasetFolderError(
            f"No patient folders in {root}: expected numeric folders such as {root / '8863'} holding 0/ and 1/. "
            "Is this the right folder? The Kaggle archive unpacks to one folder per patient."
        )
    for patient_dir in patient_dirs:
        for class_dir in sorted(os.scandir(patient_dir.path), key=lambda e: e.name):
            if not class_dir.is_dir():
                if not class_dir.name.startswith("."):
                    problems.append(Problem(class_dir.path, UNEXPECTED, "expected only the class folders 0/ and 1/"))
                continue
            if class_dir.name not in ("0", "1"):
                problems.append(Problem(class_dir.path, UNEXPECTED, "class folder must be 0 or 1; skipped"))
                continue
            folder_label = int(class_dir.name)
            with os.scandir(class_dir.path) as files:
                for entry in files:
                    if entry.name.startswith(".") or not entry.is_file():
                        continue
                    row, problem = _check_file(entry, patient_dir.name, folder_label, read_headers)
                    if problem is not None:
                        problems.append(problem)
                    if row is not None:
                        rows.append(row)
    frame = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    frame = frame.astype({"path": str, "patient_id": str, "x": np.int32, "y": np.int32, "label": np.int8,
                          "width": np.int16, "height": np.int16})
    frame["_pid"] = frame["patient_id"].astype(np.int64)
    frame = frame.sort_values(["_pid", "y", "x", "label"], kind="stable").drop(columns="_pid").reset_index(drop=True)
    problems.sort(key=lambda p: p.path)
    return PatchIndex(root=root, frame=frame, problems=problems)


def _check_file(entry: os.DirEntry, patient: str, folder_label: int, read_headers: bool):
    parsed = parse_patch_name(entry.name)
    if parsed is None:
        if not entry.name.lower().endswith(".png"):
            return None, Problem(entry.path, NOT_PNG, "not a .png file; left out")
        return None, Problem(
            entry.path, MISNAMED,
            "name does not match <patient>_idx5_x<X>_y<Y>_class<0|1>.png; rename it or remove it",
        )
    name_patient, x, y, label = parsed
    if name_patient != patient:
        return None, Problem(entry.path, WRONG_PATIENT, f"name says patient {name_patient} but it is in folder {patient}")
    if label != folder_label:
        return None, Problem(
            entry.path, MISLABELLED,
            f"name says class{label} but the file is in folder {folder_label}/; the label is ambiguous, left out",
        )
    width = height = PATCH_SIZE
    if read_headers:
        try:
            width, height = read_png_size(entry.path)
        except ValueError as exc:
            kind = EMPTY if "empty" in str(exc) else NOT_PNG
            return None, Problem(entry.path, kind, f"{exc}; left out")
        except OSError as exc:
            return None, Problem(entry.path, UNREADABLE, f"cannot be read ({exc.strerror}); left out")
    return (entry.path, patient, x, y, label, width, height), None


def patient_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-patient counts: ``patient_id, n_patches, n_idc, n_non_idc, idc_fraction, n_not_50x50``, sorted by id."""
    not_full = (frame["width"] != PATCH_SIZE) | (frame["height"] != PATCH_SIZE)
    table = (
        frame.assign(idc=frame["label"] == 1, not_full=not_full)
        .groupby("patient_id", sort=False)
        .agg(n_patches=("label", "size"), n_idc=("idc", "sum"), n_not_50x50=("not_full", "sum"))
        .reset_index()
    )
    table["n_non_idc"] = table["n_patches"] - table["n_idc"]
    table["idc_fraction"] = table["n_idc"] / table["n_patches"]
    table = table[["patient_id", "n_patches", "n_idc", "n_non_idc", "idc_fraction", "n_not_50x50"]]
    order = table["patient_id"].astype(np.int64).argsort(kind="stable")
    return table.iloc[order].reset_index(drop=True)


def dataset_summary(frame: pd.DataFrame) -> dict:
    """Headline statistics of an index: patients, patches, per-class counts, IDC share, patch sizes."""
    not_full = (frame["width"] != PATCH_SIZE) | (frame["height"] != PATCH_SIZE)
    sizes = (
        frame.loc[not_full].groupby(["width", "height"]).size().sort_values(ascending=False)
    )
    n = int(len(frame))
    n_idc = int((frame["label"] == 1).sum())
    return {
        "patients": int(frame["patient_id"].nunique()),
        "patches": n,
        "non_idc": n - n_idc,
        "idc": n_idc,
        "idc_fraction": (n_idc / n) if n else 0.0,
        "not_50x50": int(not_full.sum()),
        "not_50x50_sizes": {f"{w}x{h}": int(c) for (w, h), c in sizes.items()},
    }
