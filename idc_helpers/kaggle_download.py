"""Download the Kaggle dataset into a verified, complete folder of patient folders.

The archive (``breast-histopathology-images.zip``, about 3.1 GB) holds every patch twice: once under
``<patient>/<0|1>/`` and once more under ``IDC_regular_ps50_idx5/<patient>/<0|1>/``. The result keeps each patch
once, in the Kaggle layout that :mod:`idc_helpers.patch_index` reads.

Nothing half-made ever sits at the destination: the archive is downloaded into a hidden folder next to it
(``.<dest name>.partial``), checked (zip integrity, layout, patient and patch counts; before a member is written:
no absolute or ``..`` names, no links, no encryption, stored or deflated only, at most :data:`MAX_PATCH_BYTES`, a
PNG signature and a header of at most 50x50 pixels; every member's CRC while extracting) and only then renamed
into place, which is atomic on one file system (:func:`idc_helpers.atomic.install_dir`; ``--force`` swaps the old
copy out so that a kill at any moment leaves the old or the new copy). A leftover hidden folder from an
interrupted run is removed, and an old copy left aside is put back, by the next run.

Credentials are optional: the dataset is public, and without credentials the request is sent anonymously; when
Kaggle refuses that (401/403) the message says how to add a token.

The HTTP requests go through ``kagglesdk``, the client library of the official ``kaggle`` package (2.x). It is used
directly rather than through ``kaggle.KaggleApi`` for two reasons: importing ``kaggle`` authenticates at import time
(contacting Kaggle, or printing help when there are no credentials), and ``KaggleApi`` always hands its client an
explicit server (production, unless ``--local``-style flags or ``KAGGLE_API_ENVIRONMENT=LOCALHOST``), whereas a bare
``kagglesdk.KaggleClient`` reads ``KAGGLE_API_ENVIRONMENT``, where ``TEST`` means http://localhost:7777: the tests'
local server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import sys
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idc_helpers import KAGGLE_DATASET, KAGGLE_PATCHES, KAGGLE_PATIENTS, PATCH_SIZE
from idc_helpers.atomic import install_dir, recover_dir
from idc_helpers.errors import ExternalError, UserError
from idc_helpers.png import PNG_HEADER_BYTES, PngHeaderError, read_png_header

EXPECTED_PATIENTS = KAGGLE_PATIENTS
EXPECTED_PATCHES = KAGGLE_PATCHES
NESTED_COPY = "IDC_regular_ps50_idx5"

# The archive is about 3.1 GB. One extracted copy is about 1.6 GB of PNG data, but most patches are 4-7 KB and
# each file takes whole 4 KiB blocks, so about 2.3 GB on disk. The archive is deleted once extracted.
ARCHIVE_BYTES = 3_400_000_000
EXTRACTED_BYTES = 2_600_000_000
REQUIRED_FREE_BYTES = ARCHIVE_BYTES + EXTRACTED_BYTES

SETTINGS_URL = "https://www.kaggle.com/settings"
DATASET_URL = f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}"

# Members kept from the archive: optional nested prefix, numeric patient folder, class folder, PNG file name.
_MEMBER_RE = re.compile(rf"^(?:{NESTED_COPY}/)?(?P<rel>(?P<patient>\d+)/(?P<label>[01])/[^/\\:]+\.png)$")
_REASON_RE = re.compile(r"\[Errno -?\d+\] [^'\")]+|IncompleteRead\([^)]*\)|Read timed out|timed out|Connection refused")
_OWNER_FILE = "OWNER.json"
_BLOCK = 4096
# The largest member accepted as a patch. Real patches are 1-8 KB; even an uncompressed 16-bit RGBA 50x50 PNG is
# under 21 KB, so anything larger is not a patch of this dataset (a decompression bomb, or not an image at all).
MAX_PATCH_BYTES = 65_536
# A PNG hardly deflates further; a member that inflates more than this is hostile, whatever its size.
MAX_COMPRESSION_RATIO = 50

_CREDENTIALS_HELP = (
    "To fix this: sign in at https://www.kaggle.com, open " + SETTINGS_URL + " and, under 'API', click "
    "'Create New Token'. Save the downloaded kaggle.json as ~/.kaggle/kaggle.json and run "
    "`chmod 600 ~/.kaggle/kaggle.json` so only you can read it (or export KAGGLE_USERNAME and KAGGLE_KEY, or "
    "KAGGLE_API_TOKEN). On Colab, add the secrets KAGGLE_USERNAME and KAGGLE_KEY (key icon in the left sidebar) "
    "and switch on 'Notebook access'."
)


class DownloadError(ExternalError, RuntimeError):
    """The dataset could not be downloaded; the message says why and what to do. Nothing was left at ``dest``."""


class KaggleCredentialsError(UserError, DownloadError):
    """A credentials file is malformed, or Kaggle refused the credentials or the anonymous request (401/403)."""


class NetworkError(DownloadError):
    """Kaggle could not be reached (no network, DNS, proxy, timeout)."""


class DownloadInterruptedError(NetworkError):
    """The connection broke or stalled while the archive was being transferred."""


class InsufficientDiskError(DownloadError):
    """Not enough free disk space for the archive and the extracted patches."""


class ArchiveError(DownloadError):
    """The downloaded archive is corrupt or does not hold the expected layout and counts."""


class DestinationError(UserError, DownloadError):
    """The destination holds something other than a complete copy, or another download is using it."""


@dataclass(frozen=True)
class Credentials:
    """Kaggle credentials and where they came from. Either ``token`` or ``username`` + ``key`` is set.

    ``str()`` describes the source without the secret, e.g. ``API key of user 'ada' from ~/.kaggle/kaggle.json``.
    """

    source: str
    username: str | None = None
    key: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        if self.token:
            return f"API token from {self.source}"
        return f"API key of user {self.username!r} from {self.source}"


def kaggle_json_paths() -> list[Path]:
    """Where ``kaggle.json`` is looked for, in order: ``$KAGGLE_CONFIG_DIR``, ``~/.kaggle``, ``~/.config/kaggle``."""
    paths = []
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        paths.append(Path(os.environ["KAGGLE_CONFIG_DIR"]).expanduser() / "kaggle.json")
    paths.append(Path.home() / ".kaggle" / "kaggle.json")
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    paths.append(Path(config_home).expanduser() / "kaggle" / "kaggle.json")
    return list(dict.fromkeys(paths))


def find_credentials() -> Credentials | None:
    """Find Kaggle credentials without contacting Kaggle; ``None`` when there are none.

    Order (the ``kaggle`` client's own, so that the credentials reported are the ones sent): an API token
    (``KAGGLE_API_TOKEN``, a token or a path to one, or ``~/.kaggle/access_token``); the legacy ``KAGGLE_USERNAME`` +
    ``KAGGLE_KEY``; ``kaggle.json`` (see :func:`kaggle_json_paths`); Colab secrets ``KAGGLE_API_TOKEN`` or
    ``KAGGLE_USERNAME`` + ``KAGGLE_KEY`` when running in Colab.
    Raises :class:`KaggleCredentialsError` for a ``kaggle.json`` that exists but cannot be used.
    """
    return _find_credentials(notes=[])


def _find_credentials(notes: list[str]) -> Credentials | None:
    # ``notes`` collects near misses (half-set variables, secrets without access) for the "missing" message.
    from kagglesdk import get_access_token_from_env

    token, token_source = get_access_token_from_env()
    if token:
        names = {"access_token": "~/.kaggle/access_token", "KAGGLE_API_TOKEN": "the KAGGLE_API_TOKEN variable"}
        return Credentials(source=names.get(token_source, str(token_source)), token=token)

    username, key = os.environ.get("KAGGLE_USERNAME"), os.environ.get("KAGGLE_KEY")
    if username and key:
        return Credentials(
            source="the KAGGLE_USERNAME and KAGGLE_KEY environment variables", username=username, key=key
        )
    if username or key:
        notes.append(
            f"{'KAGGLE_USERNAME' if username else 'KAGGLE_KEY'} is set but "
            f"{'KAGGLE_KEY' if username else 'KAGGLE_USERNAME'} is not."
        )

    for path in kaggle_json_paths():
        if path.is_file():
            return _read_kaggle_json(path)

    if "google.colab" in sys.modules:
        return _colab_credentials(notes)
    return None


def _read_kaggle_json(path: Path) -> Credentials:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        username, key = str(data["username"]), str(data["key"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KaggleCredentialsError(
            f"The Kaggle credentials file {path} cannot be used ({type(exc).__name__}: {exc}). It must be the "
            'JSON file Kaggle gives you, {"username": "...", "key": "..."}. ' + _CREDENTIALS_HELP
        ) from None
    if os.name != "nt" and path.stat().st_mode & 0o077:
        warnings.warn(f"{path} can be read by other users of this machine; run `chmod 600 {path}`.", stacklevel=3)
    return Credentials(source=str(path), username=username, key=key)


def _colab_credentials(notes: list[str]) -> Credentials | None:
    from google.colab import userdata  # type: ignore[import-not-found]  # only importable inside Colab

    def secret(name: str) -> str | None:
        try:
            return userdata.get(name) or None
        except Exception as exc:
            if type(exc).__name__ == "NotebookAccessError":
                notes.append(
                    f"The Colab secret {name} exists but this notebook may not read it: switch on "
                    "'Notebook access' for it in the secrets panel."
                )
            return None

    token = secret("KAGGLE_API_TOKEN")
    if token:
        return Credentials(source="the Colab secret KAGGLE_API_TOKEN", token=token)
    username, key = secret("KAGGLE_USERNAME"), secret("KAGGLE_KEY")
    if username and key:
        return Credentials(source="the Colab secrets KAGGLE_USERNAME and KAGGLE_KEY", username=username, key=key)
    return None


def count_copy(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Return ``(patient folders, patches)`` of a folder in the Kaggle layout: numeric folders and the
    ``*.png`` files in their ``0/`` and ``1/`` subfolders. Other entries are not counted. ``(0, 0)`` if missing.
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
    expected_patients: int = EXPECTED_PATIENTS,
    expected_patches: int = EXPECTED_PATCHES,
) -> bool:
    """True when ``path`` holds exactly the expected patient folders and patches (the whole dataset by default)."""
    return count_copy(path) == (expected_patients, expected_patches)


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
    anything other than a complete copy is never touched: :class:`DestinationError`. ``required_bytes`` of free
    disk are demanded before downloading; ``timeout`` (seconds) bounds connecting and each read. ``expected_*``
    exist so tests can serve a tiny archive. Without credentials the request is anonymous (the dataset is public)
    unless ``anonymous=False``. Raises a :class:`DownloadError` subclass with a message saying what to do; on any
    failure ``dest`` is as it was and the temporary folder is removed.
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
    credentials = _find_credentials(notes)
    if credentials is None and not anonymous:
        raise KaggleCredentialsError(_missing_credentials_message(notes))

    dest.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(dest.parent, required_bytes, dest)
    work = _claim_work_dir(dest)
    try:
        archive = work / "archive.zip"
        who = credentials or "anonymously: no credentials found; the dataset is public"
        print(f"Downloading {dataset} from Kaggle ({who}) into {dest} ...")
        _fetch_archive(dataset, credentials, archive, dest, progress=progress, timeout=timeout, notes=notes)
        extracted = work / "dataset"
        _extract_verified(archive, extracted, dest, progress=progress, **counts)
        archive.unlink()
        install_dir(extracted, dest, replace=replacing)
        if replacing:
            print(f"Replaced the previous copy in {dest}.")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    patients, patches = count_copy(dest)
    print(f"Dataset ready: {dest} ({patients} patients, {patches:,} patches).")
    return dest


# --- messages -------------------------------------------------------------------------------------------------


def _missing_credentials_message(notes: list[str]) -> str:
    places = ", ".join(str(p) for p in kaggle_json_paths())
    colab = " and Colab secrets" if "google.colab" in sys.modules else ""
    return (
        "No Kaggle API credentials found (looked at the KAGGLE_API_TOKEN, KAGGLE_USERNAME and KAGGLE_KEY "
        f"environment variables, ~/.kaggle/access_token, the kaggle.json files {places}{colab}). "
        + " ".join(notes)
        + (" " if notes else "")
        + _CREDENTIALS_HELP
        + " Without credentials, use a copy you already have (IDC_DATA_DIR=/path/to/it) or the synthetic demo data."
    )


def _anonymous_refused_message(status: int | None, notes: list[str], dest: Path) -> str:
    return (
        f"Kaggle refused an anonymous download (HTTP {status}); nothing was written to {dest}. "
        + _missing_credentials_message(notes)
    )


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


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _check_free_space(folder: Path, needed: int, dest: Path) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise InsufficientDiskError(
            f"Not enough free disk space in {folder}: {_size(free)} free, about {_size(needed)} needed (the "
            f"~3.1 GB archive plus the extracted patches, kept once). Nothing was downloaded and {dest} was not "
            "created. Free some space, or download to a disk with more room with --out (download_dataset("
            "dest=...)) and point IDC_DATA_DIR at it."
        )


# --- work folder next to dest ---------------------------------------------------------------------------------


def _work_dir(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.partial"


def _claim_work_dir(dest: Path) -> Path:
    """Create the hidden work folder next to ``dest``; remove one left by an interrupted run first.

    The folder records its owner (host, process id) so that a download still running elsewhere on this
    machine is not destroyed by a second one.
    """
    work = _work_dir(dest)
    if work.exists():
        owner = _read_owner(work)
        if (
            owner
            and owner.get("host") == socket.gethostname()
            and owner.get("pid") != os.getpid()
            and _pid_alive(owner.get("pid"))
        ):
            raise DestinationError(
                f"Another download into {dest} is running (process {owner['pid']}, work folder {work}). Wait for "
                "it to finish; if no download is running, delete that folder and run again."
            )
        print(f"Removing {work}, left over from an interrupted download.")
        shutil.rmtree(work)
    try:
        work.mkdir()
    except FileExistsError:
        raise DestinationError(f"Another download into {dest} has just started ({work}); wait for it.") from None
    (work / _OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}), encoding="utf-8")
    return work


def _read_owner(work: Path) -> dict[str, Any] | None:
    try:
        return json.loads((work / _OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _pid_alive(pid: Any) -> bool:
    import psutil  # os.kill(pid, 0) would terminate the process on Windows

    return isinstance(pid, int) and psutil.pid_exists(pid)


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
    """Stream the dataset archive into ``archive`` through kagglesdk (anonymously when ``credentials`` is None),
    mapping failures to our exceptions.
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
                _check_free_space(archive.parent, total + total * EXTRACTED_BYTES // ARCHIVE_BYTES, dest)
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
    of = f" of {_size(total)}" if total else ""
    reason = _reason(exc) if isinstance(exc, BaseException) else str(exc)
    return (
        f"The download from Kaggle was interrupted after {_size(done)}{of} ({reason}). The partial archive was "
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
        return KaggleCredentialsError(_anonymous_refused_message(status, notes, dest))
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


# --- verify and extract ---------------------------------------------------------------------------------------


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


class _Refused(Exception):
    """An archive member that is not a patch; becomes the "damaged archive" :class:`ArchiveError`."""


def _check_declared_size(info: zipfile.ZipInfo) -> None:
    if info.file_size > MAX_PATCH_BYTES:
        raise _Refused(f"{info.filename!r} would be {info.file_size:,} bytes; a patch is at most {MAX_PATCH_BYTES:,}")
    if info.compress_size and info.file_size > MAX_COMPRESSION_RATIO * info.compress_size:
        raise _Refused(
            f"{info.filename!r} inflates {info.file_size / info.compress_size:.0f}-fold; a PNG hardly compresses"
        )


def _check_patch_bytes(name: str, data: bytes) -> None:
    """A patch is a PNG whose header says at most 50x50 pixels; read nothing else from it."""
    if len(data) > MAX_PATCH_BYTES:
        raise _Refused(f"{name!r} holds more than {MAX_PATCH_BYTES:,} bytes")
    try:
        width, height = read_png_header(data[:PNG_HEADER_BYTES])
    except PngHeaderError:
        raise _Refused(f"{name!r} is named like a patch but is not a PNG image") from None
    if not (1 <= width <= PATCH_SIZE and 1 <= height <= PATCH_SIZE):
        raise _Refused(f"{name!r} is a {width}x{height} image; a patch is at most {PATCH_SIZE}x{PATCH_SIZE}")


class _MemberError(Exception):
    """Reading the archive member ``name`` failed (CRC mismatch, bad data, unsupported feature)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


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


def _extract_verified(
    archive: Path, out: Path, dest: Path, *, progress: bool, expected_patients: int, expected_patches: int
) -> None:
    """Check the archive's members, layout and counts, extract each patch once into ``out`` (each checked by
    :func:`_check_declared_size` before and :func:`_check_patch_bytes` after reading, CRC-checked), recount.
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
        _check_free_space(out.parent, on_disk, dest)
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
