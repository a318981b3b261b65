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
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from idc_helpers import PATCH_SIZE
from idc_helpers.errors import UserError
from idc_helpers.png import EMPTY as EMPTY  # the header problem kinds are patch problem kinds too
from idc_helpers.png import NOT_PNG, PNG_HEADER_BYTES, PngHeaderError, read_png_header
from idc_helpers.png import PNG_SIGNATURE as PNG_SIGNATURE
from idc_helpers.png import TRUNCATED as TRUNCATED

FILENAME_RE = re.compile(r"^(?P<patient>\d+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<label>[01])\.png$", re.ASCII)
PATIENT_RE = re.compile(r"\d+", re.ASCII)
INDEX_COLUMNS = ["path", "patient_id", "x", "y", "label", "width", "height"]

# The patch grid: x and y are GRID_OFFSET + k * GRID_STEP (1, 51, 101, ...).
GRID_STEP = PATCH_SIZE
GRID_OFFSET = 1
# The largest real slides are about 4,000 pixels wide (3,951 in the shared folders); a coordinate five times
# beyond that is not a slide position but a name that would make a mosaic of gigabytes.
MAX_COORDINATE = 20_001
# Real patch files are 2-10 kB; a 50x50 PNG of any colour type and depth, even stored uncompressed with large
# ancillary chunks, stays far below this. Larger files are not patches and are never read whole.
MAX_PATCH_FILE_BYTES = 2 << 20

# Problem kinds, in the words the health check prints.
MISNAMED = "misnamed"
MISLABELLED = "mislabelled"
WRONG_PATIENT = "wrong patient folder"
UNEXPECTED = "unexpected entry"
UNREADABLE = "unreadable"
WRONG_SIZE = "wrong size"
NOT_A_FILE = "not a regular file"
OFF_GRID = "off the patch grid"
CONFLICTING_LABELS = "conflicting labels"
DUPLICATE = "duplicate"


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


class PatchFileError(PngHeaderError):
    """A file whose first bytes show it is not a usable patch; ``kind`` is a problem kind, ``reason`` says why."""


def parse_patch_name(name: str) -> tuple[str, int, int, int] | None:
    """Parse ``<patient>_idx5_x<X>_y<Y>_class<C>.png`` into ``(patient_id, x, y, label)``; ``None`` if no match."""
    match = FILENAME_RE.fullmatch(name)
    if match is None:
        return None
    return match["patient"], int(match["x"]), int(match["y"]), int(match["label"])


def parse_png_header(head: bytes) -> tuple[int, int]:
    """Return ``(width, height)`` from the first :data:`PNG_HEADER_BYTES` bytes of a file.

    The bytes are read by :func:`idc_helpers.png.read_png_header`. Raises :class:`PatchFileError` (kind ``empty``,
    ``not a PNG`` or ``truncated or corrupt``) when they are not a valid PNG header. Sizes are not judged here (see
    :func:`check_png_header`).
    """
    try:
        return read_png_header(head)
    except PngHeaderError as exc:
        raise PatchFileError(exc.kind, exc.reason) from None


def check_png_header(head: bytes, file_size: int | None = None) -> tuple[int, int]:
    """Read a header as :func:`parse_png_header` does, and refuse what cannot be a patch.

    A patch is at most 50 pixels wide and tall, and its file at most :data:`MAX_PATCH_FILE_BYTES` (else kind
    ``wrong size``). Nothing is decoded, so a 20000x20000 image compressed into a small file costs 33 bytes of
    reading.
    """
    if file_size is not None and file_size > MAX_PATCH_FILE_BYTES:
        raise PatchFileError(
            WRONG_SIZE,
            f"the file is {file_size / 1e6:.1f} MB; a {PATCH_SIZE}x{PATCH_SIZE} patch is a few kB. "
            "Replace it with the dataset's original file or remove it",
        )
    width, height = parse_png_header(head)
    if width > PATCH_SIZE or height > PATCH_SIZE:
        raise PatchFileError(
            WRONG_SIZE,
            f"is {width}x{height} pixels, larger than the {PATCH_SIZE}x{PATCH_SIZE} patches of this "
            "dataset; left out rather than cropped (or decoded), since which part is the patch is "
            "unknown. Replace it with the dataset's original file",
        )
    return width, height


def read_png_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Return ``(width, height)`` from a PNG file's header (any size).

    Raises ``ValueError`` with the reason when the file is empty, not a PNG, or its header is damaged, and
    ``OSError`` when it is not a regular file.
    """
    head, _ = _read_head(os.fspath(path))
    return parse_png_header(head)


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
    if not _is_utf8(entry.name):
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
            head, size = _read_head(entry.path)
            width, height = check_png_header(head, size)
        except PatchFileError as exc:
            fix = "" if exc.kind == WRONG_SIZE else ". Re-download the dataset or remove the file"
            return None, Problem(entry.path, exc.kind, f"{exc.reason}; left out{fix}")
        except OSError as exc:
            return None, Problem(
                entry.path, UNREADABLE, f"cannot be read ({exc.strerror}); left out. Check its permissions"
            )
    return (entry.path, patient, x, y, label, width, height), None


def _read_head(path: str) -> tuple[bytes, int]:
    """The first :data:`PNG_HEADER_BYTES` bytes and the size of a regular file; ``OSError`` for anything else.

    Opened non-blocking, so a named pipe put in a patch's place cannot hang the scan.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        return os.read(fd, PNG_HEADER_BYTES), st.st_size
    finally:
        os.close(fd)


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


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept by the file system encoding as surrogates
        return False
    return True


def printable(text: str) -> str:
    r"""``text`` (a path or name) safe to print and encode: bytes that are not UTF-8 shown as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
