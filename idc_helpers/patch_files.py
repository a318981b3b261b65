"""What one patch file must be: its name, its place on the patch grid, its PNG header, and the problem kinds.

The rules every command applies to a file before it enters the patch index (:mod:`idc_helpers.patch_index`) or is
decoded (:mod:`idc_helpers.decode`): names are parsed strictly (:data:`FILENAME_RE`), each file's PNG header is
checked before anything decodes it (:func:`check_png_header`; a 20000x20000 "decompression bomb" is refused from its
first 33 bytes), and what is wrong is reported as a :class:`Problem` of one of the kinds below.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from idc_helpers import PATCH_SIZE
from idc_helpers.disk import format_bytes
from idc_helpers.png import EMPTY as EMPTY  # the header problem kinds are patch problem kinds too
from idc_helpers.png import NOT_PNG as NOT_PNG
from idc_helpers.png import PNG_HEADER_BYTES, PngHeaderError, read_png_header
from idc_helpers.png import PNG_SIGNATURE as PNG_SIGNATURE
from idc_helpers.png import TRUNCATED as TRUNCATED

FILENAME_RE = re.compile(r"^(?P<patient>\d+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<label>[01])\.png$", re.ASCII)
PATIENT_RE = re.compile(r"\d+", re.ASCII)

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
            f"the file is {format_bytes(file_size)}; a {PATCH_SIZE}x{PATCH_SIZE} patch is a few kB. "
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
    head, _ = read_head(os.fspath(path))
    return parse_png_header(head)


def read_head(path: str) -> tuple[bytes, int]:
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


def is_utf8(name: str) -> bool:
    """Whether a file name is valid UTF-8 (the file system keeps undecodable bytes as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept by the file system encoding as surrogates
        return False
    return True


def printable(text: str) -> str:
    r"""``text`` (a path or name) safe to print and encode: bytes that are not UTF-8 shown as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
