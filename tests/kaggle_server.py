"""A local stand-in for Kaggle's dataset-download API, for tests. Listens on 127.0.0.1 only.

kagglesdk's ``KAGGLE_API_ENVIRONMENT=TEST`` sends requests to http://localhost:7777 (``kagglesdk/kaggle_env.py``).
A dataset download is two requests, as on kaggle.com:

1. ``POST /api/v1/datasets.DatasetApiService/DownloadDataset`` with the JSON body ``{"ownerSlug", "datasetSlug"}``
   and HTTP basic auth (username, API key) or ``Authorization: Bearer <token>``. Bad credentials get 401 with a JSON
   error body; good ones a 302 redirect to the archive (Kaggle redirects to a signed storage URL).
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

HOST = "127.0.0.1"
PORT = 7777
DOWNLOAD_PATH = "/api/v1/datasets.DatasetApiService/DownloadDataset"
STORAGE_PATH = "/storage/breast-histopathology-images.zip"
NESTED = "IDC_regular_ps50_idx5"
KAGGLE_DATASET = "paultimothymooney/breast-histopathology-images"


def make_patches(patients: tuple[str, ...] = ("8863", "10253", "12901"), per_class: int = 2,
                 seed: int = 0) -> dict[str, bytes]:
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


def isolate_kaggle_env(monkeypatch, home: os.PathLike[str] | str) -> None:
    """Point the kaggle client at the local server and hide every real credential: HOME becomes ``home``,
    every ``KAGGLE_*`` variable and ``XDG_CONFIG_HOME`` are removed, and localhost bypasses any proxy."""
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

    def __init__(self, archive: bytes, *, username: str = "ada", key: str = "right-key", token: str | None = None,
                 dataset: str = KAGGLE_DATASET, mode: str = "ok") -> None:
        self.archive = archive
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
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
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
        if not self.fake.authorised(self.headers.get("Authorization")):
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
