"""The Kaggle download, for real, against a local server that answers as Kaggle's API does (tests/kaggle_server.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import pytest
from kaggle_server import (
    DOWNLOAD_PATH,
    NESTED,
    STORAGE_PATH,
    FakeKaggle,
    build_archive,
    hostile_archive,
    isolate_kaggle_env,
    make_patches,
    port_in_use,
)

from idc_helpers.atomic import old_copy_path
from idc_helpers.cli import main
from idc_helpers.kaggle_archive import is_complete_copy
from idc_helpers.kaggle_credentials import find_credentials
from idc_helpers.kaggle_download import (
    ArchiveError,
    DestinationError,
    DownloadError,
    DownloadInterruptedError,
    InsufficientDiskError,
    KaggleCredentialsError,
    NetworkError,
    download_dataset,
)
from idc_helpers.patch_index import build_index

# The test archive: 3 patients x 4 patches, each also in the nested duplicate copy.
SMALL = {"expected_patients": 3, "expected_patches": 12, "required_bytes": 1_000_000, "progress": False}
USER, KEY, TOKEN = "ada", "right-key", "kaggle-test-token"


@pytest.fixture(scope="module")
def patches() -> dict[str, bytes]:
    return make_patches()


@pytest.fixture(scope="module")
def archive(patches) -> bytes:
    return build_archive(patches)


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """An empty HOME and no KAGGLE_* variables: no real credentials can leak in."""
    home = tmp_path / "home"
    isolate_kaggle_env(monkeypatch, home)
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    return home


@pytest.fixture()
def env_credentials(home, monkeypatch) -> None:
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)


@pytest.fixture()
def server(archive):
    with FakeKaggle(archive, username=USER, key=KEY, token=TOKEN) as fake:
        yield fake


def leftovers(folder) -> list[str]:
    """Entries of ``folder`` other than the test's HOME: the dataset and any temporary folder."""
    return sorted(name for name in os.listdir(folder) if name != "home")


def tree(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_download_keeps_each_patch_once(server, env_credentials, tmp_path, patches):
    dest = tmp_path / "data"
    assert download_dataset(dest, **SMALL) == dest
    assert tree(dest) == patches  # each patch once, byte for byte, nested copy dropped
    assert not (dest / NESTED).exists()
    assert leftovers(tmp_path) == ["data"]  # the temporary folder is gone
    assert server.requests == [("POST", DOWNLOAD_PATH), ("GET", STORAGE_PATH + "?signature=test")]
    index = build_index(dest)
    assert len(index.frame) == 12 and index.problems == []
    assert is_complete_copy(dest, expected_patients=3, expected_patches=12)
    assert not is_complete_copy(dest)  # far from the real 279 patients


def test_second_call_downloads_nothing_and_force_replaces(server, env_credentials, tmp_path, patches, capsys):
    dest = tmp_path / "data"
    download_dataset(dest, **SMALL)
    assert len(server.requests) == 2
    download_dataset(dest, **SMALL)
    assert len(server.requests) == 2
    assert "already" in capsys.readouterr().out
    (dest / "8863" / "0" / "notes.txt").write_text("replaced by --force")
    download_dataset(dest, force=True, **SMALL)
    assert len(server.requests) == 4
    assert tree(dest) == patches
    assert leftovers(tmp_path) == ["data"]


@pytest.mark.parametrize("where", ["~/.kaggle/kaggle.json", "~/.config/kaggle/kaggle.json", "KAGGLE_API_TOKEN"])
def test_credentials_sources(where, server, home, tmp_path, monkeypatch):
    if where == "KAGGLE_API_TOKEN":
        monkeypatch.setenv("KAGGLE_API_TOKEN", TOKEN)
    else:
        path = home / where.removeprefix("~/")
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"username": USER, "key": KEY}))
        path.chmod(0o600)
    found = find_credentials()
    assert found is not None and KEY not in str(found) and TOKEN not in str(found)
    assert (where if where == "KAGGLE_API_TOKEN" else str(home / where.removeprefix("~/"))) in str(found)
    download_dataset(tmp_path / "data", **SMALL)
    assert is_complete_copy(tmp_path / "data", expected_patients=3, expected_patches=12)


def test_environment_wins_over_kaggle_json(home, monkeypatch):
    (home / ".kaggle").mkdir()
    (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "old", "key": "old-key"}))
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    assert find_credentials().username == USER


def test_wrong_credentials(server, home, tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", "wrong-key")
    with pytest.raises(KaggleCredentialsError) as info:
        download_dataset(tmp_path / "data", **SMALL)
    message = str(info.value)
    assert "rejected" in message and "401" in message and "KAGGLE_USERNAME" in message
    assert "kaggle.com/settings" in message and "wrong-key" not in message
    assert leftovers(tmp_path) == []


def test_missing_credentials_refused_anonymously(server, home, tmp_path):
    assert find_credentials() is None
    with pytest.raises(KaggleCredentialsError) as info:
        download_dataset(tmp_path / "data", **SMALL)
    message = str(info.value)
    assert "refused an anonymous download (HTTP 401)" in message and "No Kaggle API credentials" in message
    assert str(home / ".kaggle" / "kaggle.json") in message and "chmod 600" in message
    assert "KAGGLE_USERNAME" in message and "KAGGLE_API_TOKEN" in message and "Colab" in message
    assert server.requests == [("POST", DOWNLOAD_PATH)] and leftovers(tmp_path) == []


def test_anonymous_download_where_the_server_allows_it(server, home, tmp_path, patches, capsys):
    server.anonymous = True
    download_dataset(tmp_path / "data", **SMALL)
    assert tree(tmp_path / "data") == patches
    assert "anonymously" in capsys.readouterr().out


def test_anonymous_403_is_a_credentials_error_and_can_be_switched_off(server, home, tmp_path):
    server.refuse_status = 403
    with pytest.raises(KaggleCredentialsError, match="HTTP 403"):
        download_dataset(tmp_path / "data", **SMALL)
    with pytest.raises(KaggleCredentialsError, match="No Kaggle API credentials"):
        download_dataset(tmp_path / "data", anonymous=False, **SMALL)
    assert len(server.requests) == 1 and leftovers(tmp_path) == []


def test_access_token_file_and_legacy_json(server, home, tmp_path, patches):
    (home / ".kaggle").mkdir()
    (home / ".kaggle" / "access_token").write_text(TOKEN)
    found = find_credentials()
    assert found.token == TOKEN and "~/.kaggle/access_token" in str(found)
    download_dataset(tmp_path / "data", **SMALL)
    assert tree(tmp_path / "data") == patches


def test_half_set_environment_is_named(home, tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    with pytest.raises(KaggleCredentialsError, match="KAGGLE_KEY is not"):
        download_dataset(tmp_path / "data", anonymous=False, **SMALL)


def test_malformed_kaggle_json_names_the_file(home, tmp_path):
    path = home / ".kaggle" / "kaggle.json"
    path.parent.mkdir()
    path.write_text('{"username": "ada"}')
    with pytest.raises(KaggleCredentialsError, match=r"kaggle\.json cannot be used"):
        find_credentials()


def test_colab_secret_api_token(home, monkeypatch):
    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get={"KAGGLE_API_TOKEN": TOKEN}.get)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    found = find_credentials()
    assert found.token == TOKEN and "Colab secret KAGGLE_API_TOKEN" in str(found)


def test_colab_secrets(home, monkeypatch):
    class NotebookAccessError(Exception):
        pass

    secrets = {"KAGGLE_USERNAME": USER}

    def get(name):
        if name == "KAGGLE_KEY":
            raise NotebookAccessError(name)
        if name not in secrets:
            raise KeyError(name)
        return secrets[name]

    colab = types.ModuleType("google.colab")
    colab.userdata = types.SimpleNamespace(get=get)
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    with pytest.raises(KaggleCredentialsError, match="Colab secret KAGGLE_KEY exists but"):
        download_dataset(home.parent / "data", anonymous=False, **SMALL)
    secrets["KAGGLE_KEY"] = KEY
    colab.userdata = types.SimpleNamespace(get=secrets.get)
    found = find_credentials()
    assert found.key == KEY and "Colab secrets" in str(found)


def test_interrupted_download_leaves_nothing_and_retry_succeeds(server, env_credentials, tmp_path, patches):
    server.mode = "cut"
    with pytest.raises(DownloadInterruptedError) as info:
        download_dataset(tmp_path / "data", **SMALL)
    assert isinstance(info.value, DownloadError) and "interrupted" in str(info.value)
    assert leftovers(tmp_path) == []
    server.mode = "ok"
    download_dataset(tmp_path / "data", **SMALL)
    assert tree(tmp_path / "data") == patches


def test_stalled_download_times_out(server, env_credentials, tmp_path):
    server.mode = "stall"
    start = time.monotonic()
    with pytest.raises(DownloadInterruptedError):
        download_dataset(tmp_path / "data", timeout=0.5, **SMALL)
    assert time.monotonic() - start < 4
    assert leftovers(tmp_path) == []


def test_leftover_from_a_killed_run_is_removed(server, env_credentials, tmp_path, patches, capsys):
    # A run killed hard (no cleanup) leaves its hidden work folder, possibly with a full extracted tree.
    work = tmp_path / ".data.partial"
    for rel, data in patches.items():
        (work / "dataset" / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / "dataset" / rel).write_bytes(data)
    assert not is_complete_copy(tmp_path / "data", expected_patients=3, expected_patches=12)
    download_dataset(tmp_path / "data", **SMALL)
    assert "left over" in capsys.readouterr().out
    assert leftovers(tmp_path) == ["data"] and len(server.requests) == 2


def test_running_download_is_not_disturbed_and_its_leftover_is_removed(server, env_credentials, tmp_path, capsys):
    """A second download into the same place is refused, naming the process that holds the work folder's lock.

    Once that process is gone (killed: its work folder stays), the next download removes the folder and goes on.
    """
    work = tmp_path / ".data.partial"
    work.mkdir()
    (work / "archive.zip").write_bytes(b"half an archive")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from idc_helpers.locks import file_lock\n"
            "with file_lock(sys.argv[1], blocking=False, record_pid=True) as held:\n"
            "    print(held, flush=True); sys.stdin.read()",
            str(work / ".lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "True\n"
        with pytest.raises(DestinationError) as info:
            download_dataset(tmp_path / "data", **SMALL)
        message = str(info.value)
        assert message.startswith(f"Another download into {tmp_path / 'data'} is running (process {holder.pid}, ")
        assert (work / "archive.zip").exists() and server.requests == []
    finally:
        holder.kill()
        holder.wait()
    assert (work / ".lock").read_text().strip() == str(holder.pid)  # a pid recorded, but nobody holds the lock
    download_dataset(tmp_path / "data", **SMALL)
    assert "left over" in capsys.readouterr().out
    assert leftovers(tmp_path) == ["data"] and len(server.requests) == 2


def test_a_download_holds_its_work_folder_until_done(server, env_credentials, tmp_path, monkeypatch):
    from idc_helpers import kaggle_download
    from idc_helpers.locks import lock_holder

    seen = []
    original = kaggle_download.extract_verified

    def extract(archive, out, dest, **kwargs):
        seen.append(lock_holder(archive.parent / ".lock"))
        original(archive, out, dest, **kwargs)

    monkeypatch.setattr(kaggle_download, "extract_verified", extract)
    download_dataset(tmp_path / "data", **SMALL)
    assert seen == [os.getpid()] and leftovers(tmp_path) == ["data"]


def test_no_server_is_a_network_error(env_credentials, tmp_path):
    if port_in_use():
        pytest.skip("something else listens on 127.0.0.1:7777")
    with pytest.raises(NetworkError) as info:
        download_dataset(tmp_path / "data", **SMALL)
    assert not isinstance(info.value, DownloadInterruptedError)
    assert "Could not connect" in str(info.value) and "localhost:7777" in str(info.value)
    assert leftovers(tmp_path) == []


def test_not_enough_disk(server, env_credentials, tmp_path):
    with pytest.raises(InsufficientDiskError, match="Not enough free disk space"):
        download_dataset(tmp_path / "data", **{**SMALL, "required_bytes": 10**18})
    assert server.requests == [] and leftovers(tmp_path) == []


def test_corrupt_archive(server, env_credentials, tmp_path):
    server.archive = b"PK\x03\x04" + os.urandom(5000)
    with pytest.raises(ArchiveError, match="damaged"):
        download_dataset(tmp_path / "data", **SMALL)
    assert leftovers(tmp_path) == []


def test_damaged_member_fails_its_crc(server, env_credentials, tmp_path, archive):
    damaged = bytearray(archive)
    damaged[archive.index(b"\x89PNG") + 60] ^= 0xFF
    server.archive = bytes(damaged)
    with pytest.raises(ArchiveError, match="CRC"):
        download_dataset(tmp_path / "data", **SMALL)
    assert leftovers(tmp_path) == []


def test_unexpected_counts(server, env_credentials, tmp_path):
    with pytest.raises(ArchiveError, match="12 distinct patches"):
        download_dataset(tmp_path / "data", **{**SMALL, "expected_patches": 13})
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("zeros", "would be 5,000,000 bytes"),
        ("inflates", "inflates"),
        ("bomb", "20000x20000 image"),
        ("not_png", "not a PNG"),
        ("bzip2", "compression method 12"),
        ("encrypted", "is encrypted"),
        ("dotdot", "outside the dataset folder"),
        ("absolute", "absolute path"),
        ("symlink", "symbolic link"),
    ],
)
def test_what_is_not_a_patch_is_never_installed(kind, reason, server, env_credentials, tmp_path, patches):
    server.archive = hostile_archive(patches, kind)
    with pytest.raises(ArchiveError) as info:
        download_dataset(tmp_path / "data", **SMALL)
    message = str(info.value)
    assert reason in message and "damaged or is not the dataset" in message and "\n" not in message
    assert leftovers(tmp_path) == []  # nothing extracted anywhere, the work folder removed
    assert not (tmp_path.parent / "escaped.png").exists()


def test_a_force_swap_killed_between_its_renames_is_restored(server, env_credentials, tmp_path, patches, capsys):
    dest = tmp_path / "data"
    download_dataset(dest, **SMALL)
    dest.rename(old_copy_path(dest))  # what a kill right after the first rename of a --force swap leaves
    assert download_dataset(dest, **SMALL) == dest
    assert "Restored the previous copy" in capsys.readouterr().out
    assert tree(dest) == patches and leftovers(tmp_path) == ["data"] and len(server.requests) == 2


def test_existing_folder_is_left_alone(server, env_credentials, tmp_path):
    dest = tmp_path / "data"
    (dest / "8863" / "0").mkdir(parents=True)
    (dest / "my_notes.txt").write_text("mine")
    with pytest.raises(DestinationError, match="left untouched"):
        download_dataset(dest, force=True, **SMALL)
    assert sorted(os.listdir(dest)) == ["8863", "my_notes.txt"] and server.requests == []


def test_empty_folder_is_filled(server, env_credentials, tmp_path, patches):
    (tmp_path / "data").mkdir()
    download_dataset(tmp_path / "data", **SMALL)
    assert tree(tmp_path / "data") == patches


def test_cli_prints_one_line_without_traceback(server, home, tmp_path, capsys, assert_refused):
    assert main(["download", "--out", str(tmp_path / "data"), "--no-progress"]) == 2  # a user's fix: credentials
    err = capsys.readouterr().err
    assert err.startswith("error: Kaggle refused an anonymous download") and "Traceback" not in err
    assert err.count("\n") == 1
    assert main(["download", "--dest", str(tmp_path / "data"), "--no-progress"]) == 2  # the old spelling
    assert_refused(capsys.readouterr().err, "download --dest DIR is no longer accepted: use download --out DIR.")


def test_cli_outside_failure_exits_3(server, env_credentials, tmp_path, capsys):
    server.mode = "cut"
    assert main(["download", "--out", str(tmp_path / "data"), "--no-progress"]) == 3
    assert capsys.readouterr().err.startswith("error: The download from Kaggle was interrupted")
