"""What can go wrong getting the Kaggle dataset: one exception class per cause, and the pages the messages name.

Every class is a :class:`DownloadError`. Those the user can fix (credentials, the destination) are also a
:class:`idc_helpers.errors.UserError` (exit status 2), the others an :class:`idc_helpers.errors.ExternalError`
(exit status 3). :mod:`idc_helpers.kaggle_credentials`, :mod:`idc_helpers.kaggle_archive` and
:mod:`idc_helpers.kaggle_download` raise them; each message says what happened to the destination and what to do.
"""

from __future__ import annotations

from idc_helpers import KAGGLE_DATASET
from idc_helpers.errors import ExternalError, UserError

__all__ = [
    "DATASET_URL",
    "SETTINGS_URL",
    "ArchiveError",
    "DestinationError",
    "DownloadError",
    "DownloadInterruptedError",
    "InsufficientDiskError",
    "KaggleCredentialsError",
    "NetworkError",
]

#: Where a Kaggle user creates an API token.
SETTINGS_URL = "https://www.kaggle.com/settings"
#: The dataset's page on Kaggle (its terms, its current contents).
DATASET_URL = f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}"


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
