"""A local stand-in for Kaggle's dataset-download API, for tests. Listens on 127.0.0.1 only.

kagglesdk's ``KAGGLE_API_ENVIRONMENT=TEST`` sends requests to http://localhost:7777 (``kagglesdk/kaggle_env.py``).
A dataset download is two requests, as on kaggle.com:

1. ``POST /api/v1/datasets.DatasetApiService/DownloadDataset`` with the JSON body ``{"ownerSlug", "datasetSlug"}``
   and HTTP basic auth (username, API key) or ``Authorization: Bearer <token>``, or no credentials at all. Bad
   credentials get 401 with a JSON error body; good ones a 302 redirect to the archive (Kaggle redirects to a
   signed storage URL). A request without credentials is served like a good one when ``anonymous`` is True (the
   dataset is public), and refused with ``refuse_status`` (401 or 403) otherwise.
2. ``GET`` of the redirect target, answered with the zip and its ``Content-Length``.

``mode`` makes the archive transfer fail the ways real networks do: ``"cut"`` closes the connection halfway,
``"stall"`` sends the headers and a few bytes and then goes silent.
"""

from __future__ import annotations

import base64
import errno
import io
import json
import os
import socket
import threading
import time
import zipfile
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

HOST = "127.0.0.1"
PORT = 7777
DOWNLOAD_PATH = "/api/v1/datasets.DatasetApiService/DownloadDataset"
STORAGE_PATH = "/storage/breast-histopathology-images.zip"
NESTED = "IDC_regular_ps50_idx5"
KAGGLE_DATASET = "paultimothymooney/breast-histopathology-images"


def make_patches(
    patients: tuple[str, ...] = ("8863", "10253", "12901"), per_class: int = 2, seed: int = 0
) -> dict[str, bytes]:
    """PNG patches in the Kaggle layout: ``{"<patient>/<label>/<patient>_idx5_x<X>_y<Y>_class<label>.png": bytes}``.

    Each patient gets ``per_class`` patches of each class; its last patch is a 50x30 border patch, like the real data.
    """
    rng = np.random.default_rng(seed)
    patches: dict[str, bytes] = {}
    for patient in patients:
        for label in (0, 1):
            for i in range(per_class):
                x, y = 1 + 50 * i, 1 + 50 * label
                height = 30 if (label, i) == (1, per_class - 1) else 50
                image = rng.integers(0, 256, size=(height, 50, 3), dtype=np.uint8)
                ok, png = cv2.imencode(".png", image)
                assert ok
                patches[f"{patient}/{label}/{patient}_idx5_x{x}_y{y}_class{label}.png"] = png.tobytes()
    return patches


def build_archive(patches: dict[str, bytes], *, nested: bool = True) -> bytes:
    """A zip shaped like Kaggle's: folder entries, the top-level patient folders and the nested duplicate copy."""
    buffer = io.BytesIO()
    # Stored, not deflated: PNGs hardly compress, and stored bytes let a test damage one member's data in place.
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        prefixes = ["", NESTED + "/"] if nested else [""]
        for prefix in prefixes:
            if prefix:
                zf.writestr(prefix, b"")
            folders = sorted({rel.rsplit("/", 1)[0] for rel in patches})
            for folder in sorted({f.split("/")[0] for f in folders}) + folders:
                zf.writestr(f"{prefix}{folder}/", b"")
            for rel, data in sorted(patches.items()):
                zf.writestr(prefix + rel, data)
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """The first bytes of a PNG that claims ``width`` x ``height`` pixels (signature and IHDR chunk only)."""
    import struct

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))


def hostile_archive(patches: dict[str, bytes], kind: str) -> bytes:
    """:func:`build_archive` (no nested copy) with one member replaced or added as a hostile or broken archive has it.

    ``kind``: ``zeros`` (a patch name holding 5 MB of zeros), ``inflates`` (a patch name holding 60 kB of zeros
    deflated: under the size limit, but a thousandfold compression), ``bomb`` (a small PNG whose header says
    20000x20000), ``not_png``, ``bzip2``, ``encrypted`` (the encryption flag set), ``dotdot``, ``absolute``,
    ``symlink``.
    """
    first = sorted(patches)[0]
    members = dict(patches)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        special: zipfile.ZipInfo | None = None
        data = b""
        if kind == "zeros":
            members[first] = bytes(5_000_000)
        elif kind == "inflates":
            special, data = zipfile.ZipInfo(first), bytes(60_000)
            special.compress_type = zipfile.ZIP_DEFLATED
        elif kind == "bomb":
            members[first] = png_header(20000, 20000) + bytes(100)
        elif kind == "not_png":
            members[first] = b"GIF89a" + bytes(2000)
        elif kind == "bzip2":
            special, data = zipfile.ZipInfo(first), patches[first]
            special.compress_type = zipfile.ZIP_BZIP2
        elif kind == "encrypted":
            special, data = zipfile.ZipInfo(first), patches[first]  # the flag is set below: writestr clears it
        elif kind == "dotdot":
            special, data = zipfile.ZipInfo("8863/0/../../../escaped.png"), patches[first]
        elif kind == "absolute":
            special, data = zipfile.ZipInfo("/tmp/absolute_idx5_x1_y1_class0.png"), patches[first]
        elif kind == "symlink":
            special, data = zipfile.ZipInfo(first), b"/etc/passwd"
            special.external_attr = 0o120777 << 16
        else:
            raise ValueError(kind)
        if special is not None and special.filename == first:
            del members[first]
        for rel, content in sorted(members.items()):
            zf.writestr(rel, content)
        if special is not None:
            zf.writestr(special, data)
    raw = bytearray(buffer.getvalue())
    if kind == "encrypted":  # set bit 0 of the flags in the member's local header and its central directory entry
        local = raw.rindex(b"PK\x03\x04")  # the special member was written last
        central = raw.rindex(first.encode()) - 46  # its name's last occurrence: in the central directory entry
        assert raw[central : central + 4] == b"PK\x01\x02"
        raw[local + 6] |= 0x1
        raw[central + 8] |= 0x1
    return bytes(raw)


def isolate_kaggle_env(monkeypatch, home: os.PathLike[str] | str) -> None:
    """Point the kaggle client at the local server and hide every real credential.

    HOME becomes ``home``, every ``KAGGLE_*`` variable and ``XDG_CONFIG_HOME`` are removed, and localhost bypasses
    any proxy.
    """
    for name in list(os.environ):
        if name.startswith("KAGGLE_") or name.lower() in ("http_proxy", "https_proxy", "all_proxy", "xdg_config_home"):
            monkeypatch.delenv(name)
    os.makedirs(home, exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.1")


def port_in_use(port: int = PORT) -> bool:
    """True when something accepts connections on 127.0.0.1:``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        return probe.connect_ex((HOST, port)) == 0


class FakeKaggle:
    """The fake Kaggle server. Use as a context manager; ``requests`` lists ``(method, path)`` of each request."""

    def __init__(
        self,
        archive: bytes,
        *,
        username: str = "ada",
        key: str = "right-key",
        token: str | None = None,
        dataset: str = KAGGLE_DATASET,
        mode: str = "ok",
        anonymous: bool = False,
        refuse_status: int = 401,
    ) -> None:
        self.archive = archive
        self.anonymous, self.refuse_status = anonymous, refuse_status
        self.username, self.key, self.token = username, key, token
        self.dataset = dataset
        self.mode = mode
        self.requests: list[tuple[str, str]] = []
        self.stop_event = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FakeKaggle:
        handler = type("Handler", (_Handler,), {"fake": self})
        deadline = time.monotonic() + 5
        while True:  # a server from the previous test may still hold the port for a moment
            try:
                self._server = ThreadingHTTPServer((HOST, PORT), handler)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()  # releases a stalled handler
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeKaggle:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def authorised(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        if scheme == "Bearer":
            return self.token is not None and value == self.token
        if scheme == "Basic":
            return base64.b64decode(value).decode() == f"{self.username}:{self.key}"
        return False


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKaggle

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def _json(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.fake.requests.append(("POST", self.path))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != DOWNLOAD_PATH:
            return self._json(404, {"code": 404, "message": f"no such endpoint {self.path}"})
        header = self.headers.get("Authorization")
        if header is None and not self.fake.anonymous:
            status = self.fake.refuse_status
            return self._json(
                status, {"code": status, "message": "Unauthenticated" if status == 401 else "Permission denied"}
            )
        if header is not None and not self.fake.authorised(header):
            return self._json(401, {"code": 401, "message": "Unauthenticated"})
        request = json.loads(body or b"{}")
        if f"{request.get('ownerSlug')}/{request.get('datasetSlug')}" != self.fake.dataset:
            return self._json(404, {"code": 404, "message": "Dataset not found"})
        self.send_response(302)
        self.send_header("Location", STORAGE_PATH + "?signature=test")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self.fake.requests.append(("GET", self.path))
        if self.path.split("?")[0] != STORAGE_PATH:
            return self._json(404, {"code": 404, "message": "not found"})
        data = self.fake.archive
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.fake.mode == "cut":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True  # the client sees fewer bytes than Content-Length promised
        elif self.fake.mode == "stall":
            self.wfile.write(data[:100])
            self.wfile.flush()
            self.fake.stop_event.wait(5)
        else:
            self.wfile.write(data)
