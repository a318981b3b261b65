"""The two kinds of failure every command reports the same way (see the exit-code table in ``cli.py``).

- :class:`UserError`: something the user can fix (a missing folder, a file that is not a patch, an output that
  already exists, a mistyped model name, missing credentials). The CLI prints its message on one line and exits 2.
- :class:`ExternalError`: something outside the user's input failed (the server refused or broke off a download,
  the disk is full). The CLI prints its message on one line and exits 3.

Each module defines its own exceptions as subclasses of these (``RunExistsError``, ``DatasetFolderError``, ...),
so library callers can catch them precisely and the CLI needs one ``except`` for all. Messages name the file
concerned and the fix. This module imports nothing.
"""

from __future__ import annotations


class IdcError(Exception):
    """Base class of every error ``idc_helpers`` raises on purpose."""

    exit_code = 1


class UserError(IdcError):
    """A mistake in the input or the arguments that the user can fix; the message says how (exit status 2)."""

    exit_code = 2


class ExternalError(IdcError):
    """A failure outside the user's input: network, server, disk (exit status 3)."""

    exit_code = 3


class DiskFullError(ExternalError, OSError):
    """The disk (or the user's quota) ran out while writing; the message says what was kept and how to go on."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the operating system's "no space left" (or "quota exceeded")."""
    import errno

    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
