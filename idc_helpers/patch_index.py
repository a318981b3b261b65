"""The patch index: one row per patch file of one or more dataset folders in the Kaggle layout.

Layout: ``<root>/<patient_id>/<0|1>/<patient_id>_idx5_x<X>_y<Y>_class<C>.png``. ``X`` and ``Y`` are the
1-based pixel coordinates of the patch's top-left corner in the patient's slide, on a 50-pixel stride: every
patch of the real data sits at ``x, y = 1, 51, 101, ...`` (checked on all 43,216 patches of 224 patients in the
shared sample and sparse folders).

Everything that cannot be a patch is kept out of the index and reported as a :class:`Problem` naming the file,
what is wrong with it and what to do. The rules are the same for every command (``index``, ``train``,
``predict``, ``slide``): names are parsed strictly, each file's PNG header is checked before anything decodes it
(:func:`check_png_header`; a 20000x20000 "decompression bomb" is refused from its first 33 bytes), entries that
are not regular files are never opened, and :func:`check_index` drops coordinates off the patch grid, the same
position labelled both 0 and 1, and the same patch found in two folders.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from idc_helpers import PATCH_SIZE
from idc_helpers.errors import UserError
from idc_helpers.patch_files import (
    CONFLICTING_LABELS,
    DUPLICATE,
    GRID_OFFSET,
    GRID_STEP,
    MAX_COORDINATE,
    MISLABELLED,
    MISNAMED,
    NOT_A_FILE,
    NOT_PNG,
    OFF_GRID,
    PATIENT_RE,
    UNEXPECTED,
    UNREADABLE,
    WRONG_PATIENT,
    WRONG_SIZE,
    PatchFileError,
    Problem,
    check_png_header,
    is_utf8,
    parse_patch_name,
    printable,
    read_head,
)

INDEX_COLUMNS = ["path", "patient_id", "x", "y", "label", "width", "height"]


@dataclass
class PatchIndex:
    """The result of scanning one or more dataset folders.

    ``frame`` has one row per patch (columns :data:`INDEX_COLUMNS`; ``patient_id`` is a string,
    ``width``/``height`` are read from the PNG header); ``problems`` lists every file left out.
    ``root`` is the first folder, ``roots`` all of them in the order given.
    """

    root: Path
    frame: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)
    roots: list[Path] = field(default_factory=list)

    def problems_frame(self) -> pd.DataFrame:
        """The problems as a DataFrame with columns ``path, kind, message``."""
        return pd.DataFrame([asdict(p) for p in self.problems], columns=["path", "kind", "message"])


class DatasetFolderError(UserError, FileNotFoundError):
    """The dataset folder is missing or holds no patient folders."""


def build_index(
    root: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *more_roots: str | os.PathLike[str],
    read_headers: bool = True,
) -> PatchIndex:
    """Scan one or more dataset folders in the Kaggle layout and return one :class:`PatchIndex` over all of them.

    ``build_index(A)``, ``build_index(A, B)`` and ``build_index([A, B])`` all work. A patient found in several
    folders is one patient (its rows share its ``patient_id``, so a patient split keeps them together); the same
    patch in two folders is kept once, from the first folder, and the later copy reported as ``duplicate``.
    ``read_headers`` reads each PNG's 33-byte header for width/height and to catch files that are empty, not PNGs
    or not patch-sized; with ``False`` those columns hold 50 and only names are checked (faster on slow disks).
    Raises :class:`DatasetFolderError` when a folder does not exist or holds no patient folder.
    Rows are sorted by patient, then y, then x, so the same folders always give the same index.
    """
    roots = [_resolve_root(r) for r in _as_list(root, more_roots)]
    rows: list[tuple] = []
    problems: list[Problem] = []
    for order, folder in enumerate(roots):
        found, found_problems = _scan_root(folder, read_headers)
        rows.extend((*row, order) for row in found)
        problems.extend(found_problems)
    frame = pd.DataFrame(rows, columns=[*INDEX_COLUMNS, "_root"])
    frame = frame.astype(
        {
            "path": str,
            "patient_id": str,
            "x": np.int32,
            "y": np.int32,
            "label": np.int8,
            "width": np.int16,
            "height": np.int16,
        }
    )
    frame["_pid"] = frame["patient_id"].astype(np.int64)
    frame = frame.sort_values(["_pid", "y", "x", "label", "_root"], kind="stable")
    frame = frame.drop(columns=["_pid", "_root"]).reset_index(drop=True)
    frame, rule_problems = check_index(frame)
    problems.extend(rule_problems)
    problems.sort(key=lambda p: p.path)
    return PatchIndex(root=roots[0], frame=frame, problems=problems, roots=roots)


def check_index(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[Problem]]:
    """Apply the rules every command shares to an index-like table (columns ``path, patient_id, x, y, label``).

    Returns the rows that pass (index reset) and one :class:`Problem` per row left out:
    ``off the patch grid`` (x or y not 1, 51, 101, ... or beyond :data:`MAX_COORDINATE`),
    ``conflicting labels`` (the same patient and position labelled both 0 and 1: every copy is left out, since
    which label is right is unknown), ``duplicate`` (the same patient, position and label again, e.g. from a second
    folder: the first row is kept). :func:`build_index` applies it; call it on tables from elsewhere.
    """
    if frame.empty:
        return frame.reset_index(drop=True), []
    x, y = frame["x"].to_numpy(np.int64), frame["y"].to_numpy(np.int64)
    on_grid = ((x - GRID_OFFSET) % GRID_STEP == 0) & ((y - GRID_OFFSET) % GRID_STEP == 0)
    in_range = (x >= 1) & (y >= 1) & (x <= MAX_COORDINATE) & (y <= MAX_COORDINATE)
    bad = ~(on_grid & in_range)
    problems = [
        _off_grid_problem(path, int(a), int(b), bool(r))
        for path, a, b, r in zip(frame["path"][bad], x[bad], y[bad], in_range[bad], strict=True)
    ]
    kept = frame[~bad]
    keys = ["patient_id", "x", "y"]
    repeated = kept[kept.duplicated(keys, keep=False)]
    drop = set()
    for _, group in repeated.groupby(keys, sort=False):
        group_problems = _repeated_position_problems(group)
        drop.update(p.path for p in group_problems)
        problems.extend(group_problems)
    if drop:
        kept = kept[~kept["path"].isin(drop)]
    return kept.reset_index(drop=True), problems


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
    sizes = frame.loc[not_full].groupby(["width", "height"]).size().sort_values(ascending=False)
    n = len(frame)
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


# --- scanning -----------------------------------------------------------------------------------------------------


def _as_list(root, more_roots: Iterable) -> list:
    first = list(root) if isinstance(root, (list, tuple)) else [root]
    roots = first + list(more_roots)
    if not roots:
        raise DatasetFolderError("No dataset folder given: pass at least one folder in the Kaggle layout.")
    return roots


def _resolve_root(root: str | os.PathLike[str]) -> Path:
    root = Path(os.path.abspath(Path(root).expanduser()))
    if not root.is_dir():
        raise DatasetFolderError(
            f"Dataset folder not found: {printable(str(root))}. Point to a folder in the Kaggle layout "
            "(<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<C>.png): download it with "
            "`python -m idc_helpers download`, or write a synthetic demo with "
            "`python -m idc_helpers demo-data --out DIR`."
        )
    return root


def _refuse_one_patient(root: Path, subfolders: list[os.DirEntry]) -> None:
    """Refuse a folder whose only subfolders are the class folders 0/ and 1/: one patient's folder, not a dataset.

    Its class folders would otherwise pass for patients 0 and 1 holding stray files.
    """
    names = {entry.name for entry in subfolders}
    if not names or not names <= {"0", "1"}:
        return
    with os.scandir(subfolders[0].path) as entries:
        holds_patches = any(entry.name.endswith(".png") for entry in entries)
    if holds_patches:
        raise DatasetFolderError(
            f"{printable(str(root))} is the folder of one patient (it holds the class folders "
            f"{' and '.join(sorted(n + '/' for n in names))}), not a dataset folder; give the folder that holds the "
            f"patient folders, e.g. --data-dir {printable(str(root.parent))}"
        )


def _scan_root(root: Path, read_headers: bool) -> tuple[list[tuple], list[Problem]]:
    """Rows ``(path, patient, x, y, label, width, height)`` and problems of one dataset folder."""
    problems: list[Problem] = []
    patient_dirs = []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if _is_dir(entry) and PATIENT_RE.fullmatch(entry.name):
                patient_dirs.append(entry)
            elif _is_dir(entry):
                problems.append(
                    Problem(
                        entry.path,
                        UNEXPECTED,
                        "folder name is not a numeric patient id; skipped. Move it out of the dataset folder",
                    )
                )
    _refuse_one_patient(root, patient_dirs)
    if not patient_dirs:
        raise DatasetFolderError(
            f"No patient folders in {printable(str(root))}: expected numeric folders such as "
            f"{printable(str(root / '8863'))} holding 0/ and 1/. Is this the right folder? The Kaggle archive "
            "unpacks to one folder per patient."
        )
    rows: list[tuple] = []
    for patient_dir in sorted(patient_dirs, key=lambda e: e.name):
        for class_dir in _list_folder(patient_dir.path, problems):
            if not _is_dir(class_dir):
                problems.append(
                    Problem(
                        class_dir.path,
                        UNEXPECTED,
                        "expected only the class folders 0/ and 1/; skipped. Move it out of the patient folder",
                    )
                )
            elif class_dir.name not in ("0", "1"):
                problems.append(
                    Problem(
                        class_dir.path,
                        UNEXPECTED,
                        "class folder must be 0 or 1; skipped. Move its patches into 0/ or 1/",
                    )
                )
            else:
                _scan_class_dir(class_dir.path, patient_dir.name, int(class_dir.name), read_headers, rows, problems)
    return rows, problems


def _scan_class_dir(folder: str, patient: str, label: int, read_headers: bool, rows: list, problems: list) -> None:
    for entry in _list_folder(folder, problems):
        what = _not_a_regular_file(entry)
        if what is not None:
            problems.append(
                Problem(
                    entry.path,
                    NOT_A_FILE,
                    f"is {what}, not a patch file; never opened, left out. Remove it or replace it with the patch file",
                )
            )
            continue
        row, problem = _check_file(entry, patient, label, read_headers)
        if problem is not None:
            problems.append(problem)
        if row is not None:
            rows.append(row)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symbolic link loop, an entry gone meanwhile
        return False


def _list_folder(folder: str, problems: list[Problem]) -> list[os.DirEntry]:
    """The folder's entries, hidden ones left out, sorted by name; a folder that cannot be listed is a problem."""
    try:
        with os.scandir(folder) as entries:
            return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        problems.append(
            Problem(
                folder,
                UNREADABLE,
                f"the folder cannot be read ({exc.strerror}); its patches are left out. Check its permissions",
            )
        )
        return []


def _not_a_regular_file(entry: os.DirEntry) -> str | None:
    """Say what the entry is when it is not a regular file (or a link to one), found without opening it; else None."""
    try:
        if entry.is_file():
            return None
        mode = os.stat(entry.path).st_mode
    except FileNotFoundError:
        return "a symbolic link to nothing" if entry.is_symlink() else "gone (deleted while scanning)"
    except OSError as exc:
        return f"an entry that cannot be examined ({exc.strerror})"
    for test, what in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return what
    return "a special file"


def _check_file(entry: os.DirEntry, patient: str, folder_label: int, read_headers: bool):
    if not is_utf8(entry.name):
        return None, Problem(
            entry.path,
            MISNAMED,
            f"the name {printable(entry.name)!r} is not valid UTF-8; rename "
            "it to <patient>_idx5_x<X>_y<Y>_class<0|1>.png or remove it",
        )
    parsed = parse_patch_name(entry.name)
    if parsed is None:
        if not entry.name.lower().endswith(".png"):
            return None, Problem(entry.path, NOT_PNG, "not a .png file; left out. Move it out of the dataset folder")
        return None, Problem(
            entry.path,
            MISNAMED,
            "name does not match <patient>_idx5_x<X>_y<Y>_class<0|1>.png; rename it or remove it",
        )
    name_patient, x, y, label = parsed
    if name_patient != patient:
        return None, Problem(
            entry.path,
            WRONG_PATIENT,
            f"name says patient {name_patient} but it is in folder "
            f"{patient}; left out. Move it to {name_patient}/{label}/",
        )
    if label != folder_label:
        return None, Problem(
            entry.path,
            MISLABELLED,
            f"name says class{label} but the file is in folder {folder_label}/; the label is ambiguous, left out",
        )
    width = height = PATCH_SIZE
    if read_headers:
        try:
            head, size = read_head(entry.path)
            width, height = check_png_header(head, size)
        except PatchFileError as exc:
            fix = "" if exc.kind == WRONG_SIZE else ". Re-download the dataset or remove the file"
            return None, Problem(entry.path, exc.kind, f"{exc.reason}; left out{fix}")
        except OSError as exc:
            return None, Problem(
                entry.path, UNREADABLE, f"cannot be read ({exc.strerror}); left out. Check its permissions"
            )
    return (entry.path, patient, x, y, label, width, height), None


def _off_grid_problem(path: str, x: int, y: int, in_range: bool) -> Problem:
    if not in_range:
        return Problem(
            path,
            OFF_GRID,
            f"x={x}, y={y} is outside any slide (1..{MAX_COORDINATE:,} pixels); not a "
            "patch of this dataset: left out. Remove it or restore the original name",
        )
    return Problem(
        path,
        OFF_GRID,
        f"x={x}, y={y} is not on the {GRID_STEP}-pixel patch grid (x and y are "
        f"{GRID_OFFSET}, {GRID_OFFSET + GRID_STEP}, {GRID_OFFSET + 2 * GRID_STEP}, ...); "
        "left out. Restore the original name or remove the file",
    )


def _repeated_position_problems(group: pd.DataFrame) -> list[Problem]:
    """Problems for several rows of one patient at one position (rows in index order: the first is kept if alike)."""
    patient, x, y = group.iloc[0][["patient_id", "x", "y"]]
    paths = group["path"].tolist()
    if group["label"].nunique() > 1:
        return [
            Problem(
                path,
                CONFLICTING_LABELS,
                f"patient {patient} at x={x}, y={y} is labelled both 0 and 1 (also: "
                f"{', '.join(p for p in paths if p != path)}); every copy left out. Keep the one with the "
                "right label and remove the other",
            )
            for path in paths
        ]
    return [
        Problem(
            path,
            DUPLICATE,
            f"the same patch (patient {patient}, x={x}, y={y}) as {paths[0]}, which is "
            "kept; this copy is left out. Remove one of them",
        )
        for path in paths[1:]
    ]
