"""Disk space, as the package's messages report it: free bytes of a folder and byte counts for people."""

from __future__ import annotations

import os
import shutil

__all__ = ["format_bytes", "free_bytes"]


def format_bytes(n_bytes: float) -> str:
    """``n_bytes`` in decimal units for a message: ``"3.1 GB"``, ``"420 MB"``, ``"12 kB"``, ``"512 B"``."""
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:.1f} GB"
    if n_bytes >= 1e6:
        return f"{n_bytes / 1e6:.0f} MB"
    if n_bytes >= 1e3:
        return f"{n_bytes / 1e3:.0f} kB"
    return f"{n_bytes:.0f} B"


def free_bytes(folder: str | os.PathLike[str]) -> int:
    """Bytes this process may still write in ``folder``'s file system; 0 when that cannot be asked."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 0
