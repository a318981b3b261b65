"""TensorFlow's process-wide settings for entry points: what each command sets, and that a user's own values stay."""

from __future__ import annotations

import os

import pytest

from idc_helpers import tf_env


@pytest.fixture()
def imports(monkeypatch) -> list[str]:
    """Records the quiet TensorFlow imports instead of importing it; the variables start unset."""
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    calls: list[str] = []
    monkeypatch.setattr(tf_env, "import_tensorflow_quietly", lambda: calls.append("tensorflow"))
    return calls


@pytest.mark.parametrize(
    "command, onednn, imported",
    [(None, None, []), ("index", None, []), ("bench", None, ["tensorflow"]), ("train", "1", ["tensorflow"])],
)
def test_each_command_gets_its_settings(imports, command, onednn, imported):
    tf_env.quiet_tensorflow(command)
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
    assert os.environ.get("TF_ENABLE_ONEDNN_OPTS") == onednn and imports == imported


def test_a_users_own_values_stay(imports, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    tf_env.quiet_tensorflow("predict")
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0" and os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"
    assert imports == []  # the user asked to see TensorFlow's lines: it is imported as usual, later
