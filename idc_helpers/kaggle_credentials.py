"""Kaggle credentials: where they are looked for, in the ``kaggle`` client's own order, and what to say without them.

Credentials are optional (the dataset is public and is requested anonymously without them), so a missing one is
never an error here: :func:`find_credentials` returns None and notes the near misses (a half-set variable, a Colab
secret the notebook may not read) for :func:`missing_credentials_message`. A ``kaggle.json`` that exists but
cannot be used is an error (:class:`idc_helpers.kaggle_errors.KaggleCredentialsError`), as is Kaggle's refusal,
which :mod:`idc_helpers.kaggle_download` reports with the help text kept here. Nothing here contacts Kaggle.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from idc_helpers.kaggle_errors import SETTINGS_URL, KaggleCredentialsError

__all__ = ["CREDENTIALS_HELP", "Credentials", "find_credentials", "kaggle_json_paths", "missing_credentials_message"]

#: How to get and install a token, the end of every message about missing or refused credentials.
CREDENTIALS_HELP = (
    "To fix this: sign in at https://www.kaggle.com, open " + SETTINGS_URL + " and, under 'API', click "
    "'Create New Token'. Save the downloaded kaggle.json as ~/.kaggle/kaggle.json and run "
    "`chmod 600 ~/.kaggle/kaggle.json` so only you can read it (or export KAGGLE_USERNAME and KAGGLE_KEY, or "
    "KAGGLE_API_TOKEN). On Colab, add the secrets KAGGLE_USERNAME and KAGGLE_KEY (key icon in the left sidebar) "
    "and switch on 'Notebook access'."
)


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


def find_credentials(notes: list[str] | None = None) -> Credentials | None:
    """Find Kaggle credentials without contacting Kaggle; ``None`` when there are none.

    Order (the ``kaggle`` client's own, so that the credentials reported are the ones sent): an API token
    (``KAGGLE_API_TOKEN``, a token or a path to one, or ``~/.kaggle/access_token``); the legacy ``KAGGLE_USERNAME`` +
    ``KAGGLE_KEY``; ``kaggle.json`` (see :func:`kaggle_json_paths`); Colab secrets ``KAGGLE_API_TOKEN`` or
    ``KAGGLE_USERNAME`` + ``KAGGLE_KEY`` when running in Colab. Near misses (half-set variables, secrets without
    notebook access) are appended to ``notes`` when given, for :func:`missing_credentials_message`.
    Raises :class:`~idc_helpers.kaggle_errors.KaggleCredentialsError` for a ``kaggle.json`` that exists but cannot
    be used.
    """
    from kagglesdk import get_access_token_from_env

    notes = [] if notes is None else notes
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


def missing_credentials_message(notes: list[str]) -> str:
    """The message for no credentials at all: where they were looked for, the near misses, how to add a token."""
    places = ", ".join(str(p) for p in kaggle_json_paths())
    colab = " and Colab secrets" if "google.colab" in sys.modules else ""
    return (
        "No Kaggle API credentials found (looked at the KAGGLE_API_TOKEN, KAGGLE_USERNAME and KAGGLE_KEY "
        f"environment variables, ~/.kaggle/access_token, the kaggle.json files {places}{colab}). "
        + " ".join(notes)
        + (" " if notes else "")
        + CREDENTIALS_HELP
        + " Without credentials, use a copy you already have (IDC_DATA_DIR=/path/to/it) or the synthetic demo data."
    )


def _read_kaggle_json(path: Path) -> Credentials:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        username, key = str(data["username"]), str(data["key"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KaggleCredentialsError(
            f"The Kaggle credentials file {path} cannot be used ({type(exc).__name__}: {exc}). It must be the "
            'JSON file Kaggle gives you, {"username": "...", "key": "..."}. ' + CREDENTIALS_HELP
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
