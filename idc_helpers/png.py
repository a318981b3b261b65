"""The PNG header reader the package shares: the size of an image from its first 33 bytes, checked.

Nothing is decoded: a 20000x20000 "decompression bomb" is recognised from its header alone. This module imports
nothing of the package.
"""

from __future__ import annotations

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Signature, IHDR length and type, the 13 IHDR bytes and its CRC.
PNG_HEADER_BYTES = 33

# What is wrong with a header, in the words the health check prints.
EMPTY = "empty"
NOT_PNG = "not a PNG"
TRUNCATED = "truncated or corrupt"

# Valid bit depths for each PNG colour type (PNG specification, IHDR).
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


class PngHeaderError(ValueError):
    """Bytes that do not start a valid PNG.

    ``kind`` is :data:`EMPTY`, :data:`NOT_PNG` or :data:`TRUNCATED`, ``reason`` says why.
    """

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def read_png_header(head: bytes) -> tuple[int, int]:
    """``(width, height)`` in pixels from the first :data:`PNG_HEADER_BYTES` bytes of a file.

    The bytes are checked first: a PNG signature and a valid IHDR chunk (length, CRC, bit depth and colour type).

    Raises :class:`PngHeaderError` otherwise. Sizes are not judged here.
    """
    if not head:
        raise PngHeaderError(EMPTY, "the file is empty (0 bytes)")
    if not head.startswith(PNG_SIGNATURE[: len(head)]) or (len(head) >= 16 and head[12:16] != b"IHDR"):
        raise PngHeaderError(NOT_PNG, "the file does not start with a PNG header")
    if len(head) < PNG_HEADER_BYTES:
        raise PngHeaderError(TRUNCATED, f"the file ends inside its PNG header ({len(head)} bytes)")
    (length,) = struct.unpack(">I", head[8:12])
    (crc,) = struct.unpack(">I", head[29:33])
    if length != 13 or zlib.crc32(head[12:29]) != crc:
        raise PngHeaderError(TRUNCATED, "the PNG header is damaged (length or checksum wrong)")
    width, height, depth, colour, compression, filter_method, interlace = struct.unpack(">IIBBBBB", head[16:29])
    if width == 0 or height == 0 or width >= 1 << 31 or height >= 1 << 31:
        raise PngHeaderError(TRUNCATED, f"the PNG header gives an impossible size {width}x{height}")
    if depth not in _PNG_DEPTHS.get(colour, ()) or compression or filter_method or interlace > 1:
        raise PngHeaderError(
            NOT_PNG,
            f"the PNG header is invalid (colour type {colour}, bit depth {depth}, compression "
            f"{compression}, filter {filter_method}, interlace {interlace})",
        )
    return int(width), int(height)
