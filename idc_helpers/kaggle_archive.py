"""The dataset archive: which members are patches, the checks each passes before it is written, and the copy made.

The archive (``breast-histopathology-images.zip``) holds every patch twice: once under ``<patient>/<0|1>/`` and
once more under :data:`NESTED_COPY`. :func:`extract_verified` keeps each patch once, in the Kaggle layout that
:mod:`idc_helpers.patch_index` reads, and refuses the whole archive when any member is hostile: an absolute or
``..`` name, a link, encryption, a compression other than stored or deflated, more than :data:`MAX_PATCH_BYTES`,
or (read before it is written) anything but a PNG of at most 50x50 pixels; zipfile checks each member's CRC as it
is read. Then the copy is counted again (:func:`is_complete_copy`). Every refusal is an
:class:`~idc_helpers.kaggle_errors.ArchiveError` that says the archive is damaged or is not the dataset.
"""

from __future__ import annotations

import os
import re
import stat
import zipfile
import zlib
from pathlib import Path

from idc_helpers import KAGGLE_PATCHES, KAGGLE_PATIENTS, PATCH_SIZE
from idc_helpers.disk import format_bytes, free_bytes
from idc_helpers.kaggle_errors import DATASET_URL, ArchiveError, InsufficientDiskError
from idc_helpers.png import PNG_HEADER_BYTES, PngHeaderError, read_png_header

__all__ = [
    "MAX_COMPRESSION_RATIO",
    "MAX_PATCH_BYTES",
    "NESTED_COPY",
    "check_free_space",
    "count_copy",
    "extract_verified",
    "is_complete_copy",
]

#: The archive's second copy of every patch, left out.
NESTED_COPY = "IDC_regular_ps50_idx5"
# The largest member accepted as a patch. Real patches are 1-8 KB; even an uncompressed 16-bit RGBA 50x50 PNG is
# under 21 KB, so anything larger is not a patch of this dataset (a decompression bomb, or not an image at all).
MAX_PATCH_BYTES = 65_536
# A PNG hardly deflates further; a member that inflates more than this is hostile, whatever its size.
MAX_COMPRESSION_RATIO = 50

# Members kept from the archive: optional nested prefix, numeric patient folder, class folder, PNG file name.
_MEMBER_RE = re.compile(rf"^(?:{NESTED_COPY}/)?(?P<rel>(?P<patient>\d+)/(?P<label>[01])/[^/\\:]+\.png)$")
_BLOCK = 4096


def count_copy(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Return ``(patient folders, patches)`` of a folder in the Kaggle layout; ``(0, 0)`` if it is missing.

    Counted are the numeric folders and the ``*.png`` files in their ``0/`` and ``1/`` subfolders; other entries
    are not.
    """
    root = Path(path)
    if not root.is_dir():
        return 0, 0
    patients = patches = 0
    with os.scandir(root) as entries:
        for entry in entries:
            if not (entry.is_dir() and entry.name.isdigit()):
                continue
            patients += 1
            for label in ("0", "1"):
                try:
                    with os.scandir(os.path.join(entry.path, label)) as files:
                        patches += sum(1 for f in files if f.name.endswith(".png") and f.is_file())
                except (FileNotFoundError, NotADirectoryError):
                    pass
    return patients, patches


def is_complete_copy(
    path: str | os.PathLike[str],
    *,
    expected_patients: int = KAGGLE_PATIENTS,
    expected_patches: int = KAGGLE_PATCHES,
) -> bool:
    """True when ``path`` holds exactly the expected patient folders and patches (the whole dataset by default)."""
    return count_copy(path) == (expected_patients, expected_patches)


def check_free_space(folder: Path, needed: int, dest: Path) -> None:
    """Raise :class:`~idc_helpers.kaggle_errors.InsufficientDiskError` unless ``folder`` has ``needed`` bytes free."""
    free = free_bytes(folder)
    if free < needed:
        raise InsufficientDiskError(
            f"Not enough free disk space in {folder}: {format_bytes(free)} free, about {format_bytes(needed)} "
            f"needed (the ~3.1 GB archive plus the extracted patches, kept once). Nothing was downloaded and {dest} "
            "was not created. Free some space, or download to a disk with more room with --out (download_dataset("
            "dest=...)) and point IDC_DATA_DIR at it."
        )


def extract_verified(
    archive: Path, out: Path, dest: Path, *, progress: bool, expected_patients: int, expected_patches: int
) -> None:
    """Extract each patch of ``archive`` once into the new folder ``out``, every member checked first; recount.

    The members are planned (hostile ones refuse the archive), their declared sizes checked, the layout and the
    counts compared with ``expected_*`` and the free space of ``out``'s disk checked before anything is written;
    each member is then read (CRC-checked), checked as a patch and written. ``dest`` is the folder the messages
    name. Raises :class:`~idc_helpers.kaggle_errors.ArchiveError` or
    :class:`~idc_helpers.kaggle_errors.InsufficientDiskError`.
    """

    def corrupt(reason: object) -> ArchiveError:
        return ArchiveError(
            f"The downloaded archive is damaged or is not the dataset ({reason}). It was deleted and {dest} was not "
            "created. This usually means a transfer cut short or altered on the way (a proxy, a full disk): run "
            f"again; if it happens again, the file served is not Kaggle's dataset ({DATASET_URL})."
        )

    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise corrupt(exc) from None
    with zf:
        try:
            kept, duplicates, other = _plan_members(zf)
            for info in kept.values():
                _check_declared_size(info)
        except _Refused as exc:
            raise corrupt(exc) from None
        patients = len({rel.split("/", 1)[0] for rel in kept})
        if (patients, len(kept)) != (expected_patients, expected_patches):
            raise ArchiveError(
                f"The archive holds {patients} patient folders and {len(kept):,} distinct patches; the dataset has "
                f"{expected_patients} and {expected_patches:,}. It may have changed on Kaggle ({DATASET_URL}). "
                f"Nothing was written to {dest}. Please report this at the project's issue tracker."
            )
        on_disk = sum(-(-info.file_size // _BLOCK) * _BLOCK for info in kept.values()) + 3 * patients * _BLOCK
        check_free_space(out.parent, on_disk, dest)
        if duplicates or other:
            skipped = f"{duplicates:,} duplicate patches (the nested {NESTED_COPY}/ copy)" if duplicates else ""
            if other:
                skipped += ("; " if skipped else "") + f"{len(other)} other files ({other[0]!r}, ...)"
            print(f"Skipping {skipped}.")
        try:
            _write_members(zf, kept, out, progress=progress)
        except _Refused as exc:
            raise corrupt(exc) from None
        except _MemberError as exc:
            raise corrupt(f"{exc.name}: {exc.__cause__}") from None
    if not is_complete_copy(out, expected_patients=expected_patients, expected_patches=expected_patches):
        found = count_copy(out)
        raise ArchiveError(
            f"After extraction {out} holds {found[0]} patients and {found[1]:,} patches instead of "
            f"{expected_patients} and {expected_patches:,}; nothing was written to {dest}. Run again."
        )


class _Refused(Exception):
    """An archive member that is not a patch; becomes the "damaged archive" :class:`ArchiveError`."""


class _MemberError(Exception):
    """Reading the archive member ``name`` failed (CRC mismatch, bad data, unsupported feature)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _hostile_member(info: zipfile.ZipInfo) -> str | None:
    """Why this member must not be extracted (an unsafe name, a link, encryption, an unknown compression), or None."""
    name = info.filename
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return f"{name!r} has an absolute path"
    if ".." in parts:
        return f"{name!r} points outside the dataset folder ('..')"
    if stat.S_ISLNK(info.external_attr >> 16):
        return f"{name!r} is a symbolic link"
    if info.flag_bits & 0x1:
        return f"{name!r} is encrypted"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) and not info.is_dir():
        return f"{name!r} uses compression method {info.compress_type} (Kaggle's archives are stored or deflated)"
    return None


def _plan_members(zf: zipfile.ZipFile) -> tuple[dict[str, zipfile.ZipInfo], int, list[str]]:
    """Map each patch's relative path to one archive member, preferring the top-level copy over the nested one.

    Returns ``(kept, duplicates skipped, other file names)``; directory entries are ignored. Raises
    :class:`_Refused` for any member that is unsafe to extract, kept or not (see :func:`_hostile_member`).
    """
    kept: dict[str, zipfile.ZipInfo] = {}
    duplicates = 0
    other: list[str] = []
    for info in zf.infolist():
        reason = _hostile_member(info)
        if reason is not None:
            raise _Refused(reason)
        if info.is_dir():
            continue
        match = _MEMBER_RE.fullmatch(info.filename)
        if match is None:
            other.append(info.filename)
            continue
        rel = match["rel"]
        if rel in kept:
            duplicates += 1
            if not info.filename.startswith(NESTED_COPY + "/"):
                kept[rel] = info
        else:
            kept[rel] = info
    return kept, duplicates, other


def _check_declared_size(info: zipfile.ZipInfo) -> None:
    """Refuse a member whose declared size is larger than a patch, or which would inflate like no PNG does."""
    if info.file_size > MAX_PATCH_BYTES:
        raise _Refused(f"{info.filename!r} would be {info.file_size:,} bytes; a patch is at most {MAX_PATCH_BYTES:,}")
    if info.compress_size and info.file_size > MAX_COMPRESSION_RATIO * info.compress_size:
        raise _Refused(
            f"{info.filename!r} inflates {info.file_size / info.compress_size:.0f}-fold; a PNG hardly compresses"
        )


def _check_patch_bytes(name: str, data: bytes) -> None:
    """Refuse a member's bytes unless they are a PNG whose header says at most 50x50 pixels; read nothing else."""
    if len(data) > MAX_PATCH_BYTES:
        raise _Refused(f"{name!r} holds more than {MAX_PATCH_BYTES:,} bytes")
    try:
        width, height = read_png_header(data[:PNG_HEADER_BYTES])
    except PngHeaderError:
        raise _Refused(f"{name!r} is named like a patch but is not a PNG image") from None
    if not (1 <= width <= PATCH_SIZE and 1 <= height <= PATCH_SIZE):
        raise _Refused(f"{name!r} is a {width}x{height} image; a patch is at most {PATCH_SIZE}x{PATCH_SIZE}")


def _write_members(zf: zipfile.ZipFile, kept: dict[str, zipfile.ZipInfo], out: Path, *, progress: bool) -> None:
    """Write each kept member to ``out/<rel>``, each checked by :func:`_check_patch_bytes` before it is written."""
    from tqdm import tqdm

    made: set[Path] = set()
    for rel, info in tqdm(sorted(kept.items()), unit="file", desc="extract", disable=not progress, mininterval=1):
        target = out / rel
        if target.parent not in made:
            target.parent.mkdir(parents=True, exist_ok=True)
            made.add(target.parent)
        # zipfile checks each member's CRC-32 as it is read and raises BadZipFile on a mismatch; reading one byte
        # more than allowed catches a member whose data outgrows its declared size.
        try:
            with zf.open(info) as src:
                data = src.read(MAX_PATCH_BYTES + 1)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
            raise _MemberError(info.filename) from exc
        _check_patch_bytes(info.filename, data)
        target.write_bytes(data)
