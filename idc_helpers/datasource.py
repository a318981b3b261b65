"""Which dataset folder a run uses, decided in one place so that every notebook and command agrees.

Order (:data:`idc_helpers.demo_data.LOOKUP_ORDER`): an explicit argument; the ``IDC_DATA_DIR`` environment
variable; a complete copy of the Kaggle dataset in ``./data``; a Kaggle download into ``./data`` when Kaggle
credentials exist, or on Colab without them (anonymously: the dataset is public); otherwise the synthetic demo
dataset. Whenever the data is synthetic, here and only here the loud notice is printed, so that nobody mistakes its
numbers for real ones; the :class:`DataSource` says so too (``synthetic``, ``origin == "demo"``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from idc_helpers.errors import UserError
from idc_helpers.kaggle_archive import count_copy, is_complete_copy
from idc_helpers.kaggle_credentials import find_credentials
from idc_helpers.kaggle_download import EXPECTED_PATCHES, EXPECTED_PATIENTS, download_dataset
from idc_helpers.kaggle_errors import KaggleCredentialsError

ORIGINS = ("argument", "IDC_DATA_DIR", "./data", "kaggle", "demo")
DATA_DIR_ENV = "IDC_DATA_DIR"
DOWNLOAD_COMMAND = "python -m idc_helpers download"


class DataSourceError(UserError, FileNotFoundError):
    """The folder named by the argument or by ``IDC_DATA_DIR`` does not exist or is not a folder."""


@dataclass(frozen=True)
class DataSource:
    """The dataset folder a run uses.

    ``origin`` is one of :data:`ORIGINS`, and ``"demo"`` for every synthetic dataset (wherever it was named);
    ``synthetic`` is True for demo data; ``description`` says where the folder came from.
    """

    path: Path
    origin: str
    synthetic: bool
    description: str

    def __str__(self) -> str:
        return self.description


def in_colab() -> bool:
    """True inside a Google Colab runtime (its ``google.colab`` module is loaded)."""
    return "google.colab" in sys.modules


def resolve_data_dir(
    explicit: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    anonymous: bool | None = None,
    demo_dir: str | os.PathLike[str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    demo_patients: int | None = None,
    progress: bool = True,
    expected_patients: int = EXPECTED_PATIENTS,
    expected_patches: int = EXPECTED_PATCHES,
) -> DataSource:
    """Decide which dataset folder to use (see the module docstring for the order) and return it.

    ``explicit`` and ``IDC_DATA_DIR`` must name an existing folder (else :class:`DataSourceError`); relative paths
    are taken from ``cwd`` (default: the current directory), as is ``./data``. ``download=False`` skips the Kaggle
    step; ``anonymous`` (default: only on Colab) tries an anonymous download when no credentials are found, and
    falls back to the demo with the reason when Kaggle refuses it. The demo dataset (``demo_patients`` patients,
    seed 0) is written once into ``demo_dir`` (default: a folder under the decoded-patch cache, ``$IDC_CACHE_DIR``
    or ``~/.cache/idc_helpers``) and reused afterwards; it is kept out of ``./data`` so that it never blocks a
    later download there. Other download failures are raised (:class:`idc_helpers.kaggle_download.DownloadError`),
    not replaced by demo data: the user asked for the real data. ``expected_*`` define a complete copy (tests use
    tiny ones). Demo data chosen here is announced with :data:`idc_helpers.demo_data.SYNTHETIC_NOTICE` and a
    ``Data:`` line; a synthetic folder that was named (argument or ``IDC_DATA_DIR``) with the one-line
    :data:`idc_helpers.demo_data.SYNTHETIC_LINE`.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()
    if explicit is not None and str(explicit) != "":
        return _given_folder(base / Path(explicit).expanduser(), "argument", "the folder given")
    env_value = os.environ.get(DATA_DIR_ENV)
    if env_value:
        return _given_folder(base / Path(env_value).expanduser(), DATA_DIR_ENV, f"{DATA_DIR_ENV}={env_value}")

    local = Path(os.path.abspath(base / "data"))
    counts = {"expected_patients": expected_patients, "expected_patches": expected_patches}
    if is_complete_copy(local, **counts):
        return DataSource(local, "./data", False, f"the complete Kaggle dataset in {local}")

    reasons = [f"no folder given (argument or {DATA_DIR_ENV})"]
    patients, patches = count_copy(local)
    reasons.append(
        f"{local} holds {patients} patients and {patches:,} patches, not a complete copy"
        if local.exists()
        else f"no dataset in {local}"
    )
    if download:
        credentials = find_credentials()
        anonymous = in_colab() if anonymous is None else anonymous
        if credentials is not None or anonymous:
            try:
                path = download_dataset(local, progress=progress, anonymous=anonymous, **counts)
            except KaggleCredentialsError:
                if credentials is not None:
                    raise
                reasons.append(
                    f"Kaggle refused an anonymous download: add a Kaggle API token (see `{DOWNLOAD_COMMAND} --help`)"
                )
            else:
                how = credentials or "anonymously"
                return DataSource(path, "kaggle", False, f"the Kaggle dataset, downloaded into {path} ({how})")
        else:
            reasons.append(f"no Kaggle credentials: `{DOWNLOAD_COMMAND}` fetches the real data into ./data")
    else:
        reasons.append("downloading was switched off")
    if demo_patients is None:
        from idc_helpers.demo_data import DEFAULT_PATIENTS as demo_patients
    return _demo(demo_dir, demo_patients, reasons)


def _given_folder(path: Path, origin: str, named: str) -> DataSource:
    from idc_helpers.demo_data import LOOKUP_ORDER, is_synthetic

    path = Path(os.path.abspath(path))
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise DataSourceError(
            f"The data folder {path}, from {named}, {what}. Give a folder in the Kaggle layout "
            f"(<patient>/<0|1>/*.png): download one with `{DOWNLOAD_COMMAND} --out DIR`, write a synthetic one "
            f"with `python -m idc_helpers demo-data --out DIR`, or leave it unset: data is then looked up in this "
            f"order: {LOOKUP_ORDER}."
        )
    # A folder passed as an argument needs no "from": the caller knows; the variable is worth naming.
    where = "" if origin == "argument" else f", from {named}"
    if is_synthetic(path):
        from idc_helpers.demo_data import SYNTHETIC_LINE

        source = DataSource(path, "demo", True, f"SYNTHETIC demo data in {path}{where}")
        # The user named this folder (written with `demo-data`, which showed the whole notice): one line, not the
        # banner.
        print(f"Data: {source}: {SYNTHETIC_LINE}", flush=True)
        return source
    return DataSource(path, origin, False, f"data in {path}{where}")


def _announce(source: DataSource) -> DataSource:
    from idc_helpers.demo_data import SYNTHETIC_NOTICE

    print(SYNTHETIC_NOTICE)
    print(f"Data: {source}.", flush=True)
    return source


def _demo(demo_dir: str | os.PathLike[str] | None, n_patients: int, reasons: list[str]) -> DataSource:
    from idc_helpers.demo_data import is_synthetic, write_demo_dataset

    if demo_dir is None:
        from idc_helpers.patch_cache import default_cache_dir

        demo_dir = default_cache_dir() / "demo-data" / f"{n_patients}-patients-seed0"
    path = Path(os.path.abspath(Path(demo_dir).expanduser()))
    if is_synthetic(path):
        action = "reusing the SYNTHETIC demo dataset"
    else:
        write_demo_dataset(path, n_patients=n_patients, seed=0)
        action = "wrote a SYNTHETIC demo dataset"
    return _announce(DataSource(path, "demo", True, f"{action} in {path}, because: {'; '.join(reasons)}"))
