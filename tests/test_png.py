"""The shared PNG header reader."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from idc_helpers.png import EMPTY, NOT_PNG, PNG_HEADER_BYTES, TRUNCATED, PngHeaderError, read_png_header


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_size_comes_from_the_first_33_bytes():
    assert read_png_header(_png(37, 50)[:PNG_HEADER_BYTES]) == (37, 50)


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"", EMPTY),
        (b"GIF89a" + bytes(27), NOT_PNG),
        (_png(50, 50)[:20], TRUNCATED),
        (_png(50, 50)[:24] + b"\x10" + _png(50, 50)[25:33], TRUNCATED),  # IHDR byte changed: the CRC disagrees
    ],
)
def test_damaged_headers_are_refused_with_their_kind(head, kind):
    with pytest.raises(PngHeaderError) as caught:
        read_png_header(head)
    assert caught.value.kind == kind and caught.value.reason


def test_an_impossible_bit_depth_is_not_a_png():
    chunk = b"IHDR" + struct.pack(">IIBBBBB", 50, 50, 3, 2, 0, 0, 0)  # RGB at 3 bits a sample does not exist
    head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    with pytest.raises(PngHeaderError) as caught:
        read_png_header(head)
    assert caught.value.kind == NOT_PNG
