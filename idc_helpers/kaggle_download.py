"""Download the Kaggle dataset into a verified, complete folder of patient folders: :func:`download_dataset`.

Nothing half-made ever sits at the destination: the archive (about 3.1 GB) is downloaded into a hidden work folder
next to it (``.<dest name>.partial``), checked and extracted there (:func:`idc_helpers.kaggle_archive.extract_verified`:
zip integrity, layout, patient and patch counts, every member checked before it is written) and only then renamed
into place, which is atomic on one file system (:func:`idc_helpers.atomic.install_dir`; ``--force`` swaps the old
copy out so that a kill at any moment leaves the old or the new copy). The download holds a lock in its work folder
(:func:`idc_helpers.locks.file_lock`) until it is done, so a second download into the same place is refused, naming
the process; a work folder nobody holds, left by an interrupted run, is removed by the next one, and an old copy
left aside is put back.

Credentials are optional (:mod:`idc_helpers.kaggle_credentials`): the dataset is public, and without credentials
the request is sent anonymously; when Kaggle refuses that (401/403) the message says how to add a token. Every
failure is a :class:`~idc_helpers.kaggle_errors.DownloadError` (:mod:`idc_helpers.kaggle_errors`).

The HTTP requests go through ``kagglesdk``, the client library of the official ``kaggle`` package (2.x). It is used
directly rather than through ``kaggle.KaggleApi`` for two reasons: importing ``kaggle`` authenticates at import time
(contacting Kaggle, or printing help when there are no credentials), and ``KaggleApi`` always hands its client an
explicit server (production, unless ``--local``-style flags or ``KAGGLE_API_ENVIRONMENT=LOCALHOST``), whereas a bare
``kagglesdk.KaggleClient`` reads ``KAGGLE_API_ENVIRONMENT``, where ``TEST`` means http://localhost:7777: the tests'
local server.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from idc_helpers import KAGGLE_DATASET, KAGGLE_PATCHES, KAGGLE_PATIENTS
from idc_helpers.atomic import install_dir, recover_dir
from idc_helpers.disk import format_bytes
from idc_helpers.kaggle_archive import check_free_space, count_copy, extract_verified, is_complete_copy
from idc_helpers.kaggle_credentials import Credentials, find_credentials, missing_credentials_message
from idc_helpers.kaggle_errors import (
    DATASET_URL,
    SETTINGS_URL,
    ArchiveError,
    DestinationError,
    DownloadError,
    DownloadInterruptedError,
    InsufficientDiskError,
    KaggleCredentialsError,
    NetworkError,
)
from idc_helpers.locks import file_lock, lock_holder

__all__ = [
    "ARCHIVE_BYTES",
    "EXPECTED_PATCHES",
    "EXPECTED_PATIENTS",
    "EXTRACTED_BYTES",
    "REQUIRED_FREE_BYTES",
    "ArchiveError",
    "DestinationError",
    "DownloadError",
    "DownloadInterruptedError",
    "InsufficientDiskError",
    "KaggleCredentialsError",
    "NetworkError",
    "download_dataset",
]

EXPECTED_PATIENTS = KAGGLE_PATIENTS
EXPECTED_PATCHES = KAGGLE_PATCHES

# The archive is about 3.1 GB. One extracted copy is about 1.6 GB of PNG data, but most patches are 4-7 KB and
# each file takes whole 4 KiB blocks, so about 2.3 GB on disk. The archive is deleted once extracted.
ARCHIVE_BYTES = 3_400_000_000
EXTRACTED_BYTES = 2_600_000_000
REQUIRED_FREE_BYTES = ARCHIVE_BYTES + EXTRACTED_BYTES

_REASON_RE = re.compile(r"\[Errno -?\d+\] [^'\")]+|IncompleteRead\([^)]*\)|Read timed out|timed out|Connection refused")
# In the work folder: held by the download filling it, with that process's id written in.
_LOCK_FILE = ".lock"


def download_dataset(
    dest: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: bool = True,
    dataset: str = KAGGLE_DATASET,
    expected_patients: int = EXPECTED_PATIENTS,
    expected_patches: int = EXPECTED_PATCHES,
    required_bytes: int = REQUIRED_FREE_BYTES,
    timeout: float = 60.0,
    anonymous: bool = True,
) -> Path:
    """Make ``dest`` a complete copy of the Kaggle dataset (``<patient>/<0|1>/*.png``, each patch once); return it.

    A complete copy already at ``dest`` is kept and nothing is downloaded, unless ``force``: then a new, verified
    copy replaces that folder (with anything else in it) once the new one is ready. An existing ``dest`` holding
    anything other than a complete copy is never touched: :class:`DestinationError`, as is a download into ``dest``
    that another process is running. ``required_bytes`` of free disk are demanded before downloading; ``timeout``
    (seconds) bounds connecting and each read. ``expected_*`` exist so tests can serve a tiny archive. Without
    credentials the request is anonymous (the dataset is public) unless ``anonymous=False``. Raises a
    :class:`DownloadError` subclass with a message saying what to do; on any failure ``dest`` is as it was and the
    work folder is removed.
    """
    dest = Path(dest).expanduser().resolve()
    counts = {"expected_patients": expected_patients, "expected_patches": expected_patches}
    if recover_dir(dest) == "restored":  # a --force swap was killed between its two renames
        print(f"Restored the previous copy in {dest}, left aside by an interrupted download.")
    replacing = False
    if dest.exists():
        if is_complete_copy(dest, **counts):
            if not force:
                print(f"A complete copy of the dataset is already in {dest}; nothing to download.")
                return dest
            replacing = True
        elif not dest.is_dir():
            raise DestinationError(
                f"{dest} exists and is not a folder, so the dataset cannot be put there. "
                "Choose another place with --out (download_dataset(dest=...))."
            )
        elif any(dest.iterdir()):
            raise DestinationError(_not_empty_message(dest, expected_patients, expected_patches))

    notes: list[str] = []
    credentials = find_credentials(notes)
    if credentials is None and not anonymous:
        raise KaggleCredentialsError(missing_credentials_message(notes))

    dest.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(dest.parent, required_bytes, dest)
    with _claimed_work_dir(dest) as work:
        archive = work / "archive.zip"
        who = credentials or "anonymously: no credentials found; the dataset is public"
        print(f"Downloading {dataset} from Kaggle ({who}) into {dest} ...")
        _fetch_archive(dataset, credentials, archive, dest, progress=progress, timeout=timeout, notes=notes)
        extracted = work / "dataset"
        extract_verified(archive, extracted, dest, progress=progress, **counts)
        archive.unlink()
        install_dir(extracted, dest, replace=replacing)
        if replacing:
            print(f"Replaced the previous copy in {dest}.")
    patients, patches = count_copy(dest)
    print(f"Dataset ready: {dest} ({patients} patients, {patches:,} patches).")
    return dest


def _not_empty_message(dest: Path, expected_patients: int, expected_patches: int) -> str:
    entries = sorted(p.name for p in dest.iterdir())
    shown = ", ".join(repr(e) for e in entries[:5]) + (", ..." if len(entries) > 5 else "")
    patients, patches = count_copy(dest)
    return (
        f"{dest} already exists and is not a complete copy of the dataset: it holds {len(entries)} entries "
        f"({shown}), {patients} patient folders and {patches:,} patches where a complete copy has "
        f"{expected_patients} and {expected_patches:,}. It was left untouched. Move it away or delete it "
        "yourself and run again, or download into another folder with --out (download_dataset(dest=...)); "
        "if it is a copy you want to use as it is, point IDC_DATA_DIR at it."
    )


# --- work folder next to dest ---------------------------------------------------------------------------------


def _work_dir(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.partial"


@contextlib.contextmanager
def _claimed_work_dir(dest: Path) -> Iterator[Path]:
    """Create the hidden work folder next to ``dest`` and hold its lock until the block ends, then remove it.

    A work folder whose lock another process holds is a download still running: :class:`DestinationError`, naming
    that process. One whose lock nobody holds was left by an interrupted run and is removed first.
    """
    work = _work_dir(dest)
    if work.exists():
        with file_lock(work / _LOCK_FILE, blocking=False, record_pid=True) as held:
            if held is False:
                raise DestinationError(_busy_message(dest, work, "is running"))
            print(f"Removing {work}, left over from an interrupted download.")
            shutil.rmtree(work)
    try:
        work.mkdir()
    except FileExistsError:  # another download created it since the check above
        raise DestinationError(_busy_message(dest, work, "has just started")) from None
    # None: a file system without locks, where the download goes on unguarded.
    with file_lock(work / _LOCK_FILE, blocking=False, record_pid=True) as held:
        if held is False:  # another download removed this folder as a leftover and made its own
            raise DestinationError(_busy_message(dest, work, "has just started"))
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _busy_message(dest: Path, work: Path, state: str) -> str:
    pid = lock_holder(work / _LOCK_FILE)
    who = f"process {pid}, " if pid else ""
    return f"Another download into {dest} {state} ({who}work folder {work}). Wait for it to finish."


# --- download -------------------------------------------------------------------------------------------------


def _fetch_archive(
    dataset: str,
    credentials: Credentials | None,
    archive: Path,
    dest: Path,
    *,
    progress: bool,
    timeout: float,
    notes: list[str],
) -> None:
    """Stream the dataset archive into ``archive`` through kagglesdk, mapping failures to our exceptions.

    Without ``credentials`` the request is anonymous. A ``Content-Length`` is checked against the free space first.
    """
    import requests
    from kagglesdk import KaggleClient
    from kagglesdk.datasets.types.dataset_api_service import ApiDownloadDatasetRequest
    from kagglesdk.kaggle_env import get_endpoint, get_env
    from tqdm import tqdm

    try:
        endpoint = get_endpoint(get_env())
    except Exception as exc:
        raise DownloadError(f"{exc}. Unset KAGGLE_API_ENVIRONMENT to download from kaggle.com.") from None
    owner, slug = dataset.split("/", 1)
    request = ApiDownloadDatasetRequest()
    request.owner_slug, request.dataset_slug = owner, slug
    done = total = 0
    response = None
    try:
        # With no credentials kagglesdk sends the request without an Authorization header (it would look for a
        # token and ~/.kaggle/kaggle.json itself, which _find_credentials has already found absent).
        given = (
            {"username": credentials.username, "password": credentials.key, "api_token": credentials.token}
            if credentials is not None
            else {}
        )
        with KaggleClient(**given) as client:
            _set_default_timeout(client, timeout)
            # The server answers with a redirect to the archive, which requests follows; the body is streamed.
            response = client.datasets.dataset_api_client.download_dataset(request)
            total = int(response.headers.get("Content-Length") or 0)
            if total:
                check_free_space(archive.parent, total + total * EXTRACTED_BYTES // ARCHIVE_BYTES, dest)
            with (
                open(archive, "wb") as out,
                tqdm(
                    total=total or None,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc="download",
                    disable=not progress,
                    mininterval=1,
                ) as bar,
            ):
                for chunk in response.iter_content(chunk_size=1 << 16):
                    out.write(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
    except requests.HTTPError as exc:
        raise _http_error(exc, credentials, dataset, dest, notes) from None
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as exc:
        raise DownloadInterruptedError(_interrupted_message(done, total, exc, dest)) from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        if response is not None:  # Kaggle answered, then the transfer broke or stalled
            raise DownloadInterruptedError(_interrupted_message(done, total, exc, dest)) from None
        raise NetworkError(
            f"Could not connect to Kaggle at {endpoint} ({_reason(exc)}). Check that this machine is online (on "
            "Colab the runtime may have lost its connection: reconnect and run the cell again); behind a proxy, set "
            f"HTTPS_PROXY. Nothing was written to {dest}. Without a network, copy the dataset from elsewhere and "
            "point IDC_DATA_DIR at it."
        ) from None
    if total and done != total:
        raise DownloadInterruptedError(_interrupted_message(done, total, "connection closed early", dest))


def _set_default_timeout(client: Any, timeout: float) -> None:
    # kagglesdk sends without a timeout, so a stalled connection would hang forever; give its session an adapter
    # that applies ``timeout`` to connecting and to each read.
    from requests.adapters import HTTPAdapter

    default = timeout

    class _TimeoutAdapter(HTTPAdapter):
        def send(self, request, timeout=None, **kwargs):  # type: ignore[override]
            return super().send(request, timeout=timeout if timeout is not None else default, **kwargs)

    session = getattr(client.http_client(), "_session", None)
    if session is not None:
        session.mount("http://", _TimeoutAdapter())
        session.mount("https://", _TimeoutAdapter())


def _reason(exc: BaseException) -> str:
    # requests nests urllib3 errors several levels deep; the innermost text names the real cause.
    text = str(exc)
    match = _REASON_RE.search(text)
    return match.group(0).strip() if match else (text[:200] or type(exc).__name__)


def _interrupted_message(done: int, total: int, exc: object, dest: Path) -> str:
    of = f" of {format_bytes(total)}" if total else ""
    reason = _reason(exc) if isinstance(exc, BaseException) else str(exc)
    return (
        f"The download from Kaggle was interrupted after {format_bytes(done)}{of} ({reason}). The partial archive was "
        f"deleted and {dest} was not created. Run the same command again (it starts from the beginning); if it "
        "keeps failing, check the connection's stability or download from another network."
    )


def _http_error(exc: Any, credentials: Credentials | None, dataset: str, dest: Path, notes: list[str]) -> DownloadError:
    status = exc.response.status_code if exc.response is not None else None
    if exc.response is not None and exc.response.history:
        # The API accepted us and redirected; the storage link itself failed (it expires after a while).
        return DownloadError(
            f"Kaggle's download link for {dataset} failed (HTTP {status}). Nothing was written to "
            f"{dest}; run again to get a fresh link."
        )
    if status in (401, 403) and credentials is None:
        return KaggleCredentialsError(
            f"Kaggle refused an anonymous download (HTTP {status}); nothing was written to {dest}. "
            + missing_credentials_message(notes)
        )
    if status in (401, 403):
        extra = (
            f" HTTP 403 can also mean your account may not download this dataset yet: open {DATASET_URL} "
            "while signed in, accept any terms shown, and verify your phone number if Kaggle asks."
            if status == 403
            else ""
        )
        return KaggleCredentialsError(
            f"Kaggle rejected the credentials ({credentials}; HTTP {status}). The key may be mistyped, expired or "
            f"revoked: create a new token at {SETTINGS_URL} (API > Create New Token) and replace the old one. "
            "Environment variables and API tokens take precedence over kaggle.json, so remove stale ones."
            + extra
            + f" Nothing was written to {dest}."
        )
    if status == 404:
        return DownloadError(f"Kaggle has no dataset {dataset!r} (HTTP 404); check the name at {DATASET_URL}.")
    if status == 429:
        return DownloadError("Kaggle is rate-limiting this account (HTTP 429). Wait a few minutes and run again.")
    return DownloadError(f"Kaggle answered HTTP {status} ({exc}). Nothing was written to {dest}; try again later.")
