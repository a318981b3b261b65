"""Where data comes from: argument, IDC_DATA_DIR, ./data, a Kaggle download (local fake server), the demo dataset."""

from __future__ import annotations

import shutil
import sys
import types

import pytest
from kaggle_server import FakeKaggle, build_archive, isolate_kaggle_env, make_patches

from idc_helpers.datasource import DataSourceError, resolve_data_dir
from idc_helpers.demo_data import DEMO_MARKER, SYNTHETIC_LINE, SYNTHETIC_NOTICE
from idc_helpers.kaggle_download import DestinationError
from idc_helpers.patch_index import build_index

TINY = {"expected_patients": 3, "expected_patches": 36}  # what the tiny_dataset fixture holds
ARCHIVE = {"expected_patients": 3, "expected_patches": 12}  # what the fake Kaggle archive holds


@pytest.fixture()
def no_kaggle(tmp_path, monkeypatch):
    """No IDC_DATA_DIR, no Kaggle credentials, the client pointed at the local test server."""
    monkeypatch.delenv("IDC_DATA_DIR", raising=False)
    isolate_kaggle_env(monkeypatch, tmp_path / "home")
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)


@pytest.fixture()
def work(tmp_path, no_kaggle):
    """An empty working directory standing for the notebook's current directory."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def test_explicit_argument(work, tiny_dataset, monkeypatch):
    monkeypatch.setenv("IDC_DATA_DIR", str(work))  # the argument wins over the environment
    source = resolve_data_dir(tiny_dataset, cwd=work)
    assert (source.path, source.origin, source.synthetic) == (tiny_dataset, "argument", False)
    (work / "mine").mkdir()
    assert resolve_data_dir("mine", cwd=work).path == work / "mine"  # relative to cwd
    # A path through `..` is printed as the folder it names, not as `.../work/../...`.
    source = resolve_data_dir("../work/mine", cwd=work)
    assert source.path == work / "mine" and ".." not in str(source).split(", from")[0]


def test_explicit_missing_folder_is_an_error(work):
    with pytest.raises(DataSourceError, match="does not exist") as info:
        resolve_data_dir(work / "nowhere", cwd=work)
    assert str(work / "nowhere") in str(info.value) and "demo-data" in str(info.value)


def test_environment_variable(work, tiny_dataset, monkeypatch):
    monkeypatch.setenv("IDC_DATA_DIR", str(tiny_dataset))
    source = resolve_data_dir(cwd=work)
    assert (source.path, source.origin, source.synthetic) == (tiny_dataset, "IDC_DATA_DIR", False)
    monkeypatch.setenv("IDC_DATA_DIR", str(work / "gone"))
    with pytest.raises(DataSourceError, match="IDC_DATA_DIR"):
        resolve_data_dir(cwd=work)


def test_demo_folder_given_explicitly_is_synthetic_and_announced(work, tiny_dataset, capsys):
    (tiny_dataset / DEMO_MARKER).write_text("synthetic")
    source = resolve_data_dir(tiny_dataset, cwd=work)
    assert source.origin == "demo" and source.synthetic and "SYNTHETIC" in source.description
    assert source.description == f"SYNTHETIC demo data in {tiny_dataset}"  # the caller named it
    out = capsys.readouterr().out
    # Named by the user (who wrote it with `demo-data` and saw the notice there): one line, not the 18-line banner.
    assert SYNTHETIC_NOTICE not in out and out.splitlines() == [f"Data: {source}: {SYNTHETIC_LINE}"]


def test_missing_folder_message_describes_the_whole_look_up_order(work):
    with pytest.raises(DataSourceError) as info:
        resolve_data_dir("nowhere", cwd=work)
    message = str(info.value)
    for needle in ("IDC_DATA_DIR", "./data", "Colab", "demo", "download --out DIR", "demo-data --out DIR"):
        assert needle in message


def test_complete_copy_in_data(work, tiny_dataset, tmp_path):
    shutil.copytree(tiny_dataset, work / "data")
    source = resolve_data_dir(cwd=work, **TINY)
    assert (source.path, source.origin, source.synthetic) == (work / "data", "./data", False)
    # Against the real counts (279 patients) the same folder is not complete: the demo is used instead.
    source = resolve_data_dir(cwd=work, download=False, demo_dir=tmp_path / "demo", demo_patients=1)
    assert source.origin == "demo"


def test_download_when_credentials_exist(work, monkeypatch, capsys):
    patches = make_patches()
    monkeypatch.setenv("KAGGLE_USERNAME", "ada")
    monkeypatch.setenv("KAGGLE_KEY", "right-key")
    with FakeKaggle(build_archive(patches), username="ada", key="right-key") as server:
        source = resolve_data_dir(cwd=work, progress=False, **ARCHIVE)
        assert (source.path, source.origin, source.synthetic) == (work / "data", "kaggle", False)
        assert len(build_index(source.path).frame) == len(patches)
        # Next time the complete copy in ./data is found and nothing is requested.
        assert resolve_data_dir(cwd=work, **ARCHIVE).origin == "./data"
        assert len(server.requests) == 2
        # With downloading switched off the credentials are not used.
        source = resolve_data_dir(cwd=work / "elsewhere", download=False, demo_dir=work / "demo", demo_patients=1)
        assert source.origin == "demo" and len(server.requests) == 2
    assert SYNTHETIC_NOTICE in capsys.readouterr().out


def test_incomplete_data_folder_is_not_overwritten_by_download(work, monkeypatch):
    (work / "data" / "8863" / "0").mkdir(parents=True)
    monkeypatch.setenv("KAGGLE_USERNAME", "ada")
    monkeypatch.setenv("KAGGLE_KEY", "right-key")
    with pytest.raises(DestinationError, match="left untouched"):
        resolve_data_dir(cwd=work, **ARCHIVE)
    assert (work / "data" / "8863" / "0").is_dir()


def test_demo_fallback_is_written_once_and_announced(work, tmp_cache, capsys):
    source = resolve_data_dir(cwd=work, demo_patients=1)
    assert source.origin == "demo" and source.synthetic
    assert source.path == tmp_cache / "demo-data" / "1-patients-seed0"
    out = capsys.readouterr().out
    assert SYNTHETIC_NOTICE in out and "no Kaggle credentials: `python -m idc_helpers download` fetches" in out
    assert len(build_index(source.path).frame) > 0
    marker = (source.path / DEMO_MARKER).stat().st_mtime_ns
    again = resolve_data_dir(cwd=work, demo_patients=1)
    assert (again.path, again.origin, again.synthetic) == (source.path, "demo", True)
    assert (
        "reusing" in again.description and (source.path / DEMO_MARKER).stat().st_mtime_ns == marker
    )  # reused, not rewritten
    assert SYNTHETIC_NOTICE in capsys.readouterr().out  # announced every time
    assert not (work / "data").exists()  # the demo never lands where a download would go


@pytest.fixture()
def colab(monkeypatch):
    """A stand-in for Colab's own module, with no secrets set."""
    module = types.ModuleType("google.colab")
    module.userdata = types.SimpleNamespace(get=lambda name: None)
    monkeypatch.setitem(sys.modules, "google.colab", module)


def test_colab_without_credentials_downloads_anonymously(work, colab, capsys):
    patches = make_patches()
    with FakeKaggle(build_archive(patches), anonymous=True) as server:
        source = resolve_data_dir(cwd=work, progress=False, **ARCHIVE)
    assert (source.origin, source.synthetic) == ("kaggle", False) and "anonymously" in source.description
    assert len(build_index(source.path).frame) == len(patches) and len(server.requests) == 2
    assert SYNTHETIC_NOTICE not in capsys.readouterr().out


@pytest.mark.parametrize("status", [401, 403])
def test_colab_anonymous_refusal_falls_back_to_the_demo_with_the_reason(work, colab, tmp_path, capsys, status):
    with FakeKaggle(build_archive(make_patches()), refuse_status=status) as server:
        source = resolve_data_dir(cwd=work, progress=False, demo_dir=tmp_path / "demo", demo_patients=1, **ARCHIVE)
    assert source.origin == "demo" and source.synthetic and len(server.requests) == 1
    out = capsys.readouterr().out
    assert SYNTHETIC_NOTICE in out and "Kaggle refused an anonymous download: add a Kaggle API token" in out
    assert not (work / "data").exists()


def test_local_machine_without_credentials_does_not_download(work, tmp_path):
    with FakeKaggle(build_archive(make_patches()), anonymous=True) as server:
        source = resolve_data_dir(cwd=work, demo_dir=tmp_path / "demo", demo_patients=1, **ARCHIVE)
        assert source.origin == "demo" and server.requests == []
        # Asked for explicitly, the anonymous download happens here too.
        assert resolve_data_dir(cwd=work, anonymous=True, progress=False, **ARCHIVE).origin == "kaggle"
