"""Dataset health check, the engine of ``python -m idc_helpers index --data-dir DIR [--data-dir DIR2 ...]``.

Indexes the folders (one index over all of them, see :func:`idc_helpers.patch_index.build_index`), decodes every
patch through the loader (which also fills the decoded-patch cache, so the next load is fast), and reports
patients, patches, per-class counts, patches smaller than 50x50 with their sizes, and every problem found, each
naming its file and what to do (misnamed, mislabelled, not a PNG, empty, truncated or corrupt, wrong size, not a
regular file, off the patch grid, conflicting labels, duplicate, ...). The rules are those of
:mod:`idc_helpers.patch_index`, the same that ``train``, ``predict`` and ``slide`` apply.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from idc_helpers import PATCH_SIZE
from idc_helpers.loader import load_patches
from idc_helpers.patch_files import printable
from idc_helpers.patch_index import build_index, dataset_summary


def health_report(
    data_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    decode: bool = True,
    progress: bool = False,
) -> dict:
    """Check one dataset folder (or a list of them, indexed as one) and return the report as a JSON-ready dict.

    Keys: ``data_dir`` (the first folder) and ``data_dirs`` (all); ``patients``, ``patches`` (usable patches:
    indexed and, with ``decode``, decoded), ``non_idc``, ``idc``, ``idc_fraction``, ``not_50x50``,
    ``not_50x50_sizes`` ({"WxH": count}); ``files_indexed``; ``decoded`` (bool); ``cache`` ({"path", "hit"} or
    None); ``problems`` (list of {"path", "kind", "message"}, sorted by path); ``problem_counts`` ({kind: count});
    ``ok`` (no problems).
    Raises :class:`~idc_helpers.patch_index.DatasetFolderError` when a folder is missing or has no patients, and
    the loader's cache errors when the cache can be neither written nor replaced by memory.
    """
    index = build_index(data_dir)
    problems = list(index.problems)
    frame = index.frame
    cache = None
    if decode and len(frame):
        loaded = load_patches(frame, cache_dir=cache_dir, progress=progress)
        problems.extend(loaded.problems)
        frame = loaded.frame
        cache = {"path": str(loaded.cache_path), "hit": loaded.from_cache} if loaded.cache_path else None
    problems.sort(key=lambda p: p.path)
    return {
        "data_dir": str(index.root),
        "data_dirs": [str(root) for root in index.roots],
        **dataset_summary(frame),
        "files_indexed": len(index.frame),
        "decoded": bool(decode),
        "cache": cache,
        "problems": [asdict(p) for p in problems],
        "problem_counts": dict(Counter(p.kind for p in problems)),
        "ok": not problems,
    }


def format_report(report: dict) -> str:
    """The report as a human-readable table (file names relative to their data folder).

    Safe to print even when a file name is not valid UTF-8.
    """
    roots = [Path(d) for d in report.get("data_dirs", [report["data_dir"]])]
    n = report["patches"]
    lines = [f"Dataset: {', '.join(map(str, roots))}", ""]

    def row(label: str, value: int, note: str = "") -> None:
        lines.append(f"  {label:<24}{value:>9,}   {note}".rstrip())

    checked = "decoded" if report["decoded"] else "names and headers checked, not decoded (--no-decode)"
    row("patients", report["patients"])
    row("patches", n, checked)
    row("  non-IDC (class 0)", report["non_idc"], _percent(report["non_idc"], n))
    row("  IDC (class 1)", report["idc"], _percent(report["idc"], n))
    row(
        f"not {PATCH_SIZE}x{PATCH_SIZE}",
        report["not_50x50"],
        "slide-border patches, padded with white at the bottom/right when loaded" if report["not_50x50"] else "",
    )
    for size, count in report["not_50x50_sizes"].items():
        row(f"  {size}", count)
    if report["cache"]:
        state = "reused" if report["cache"]["hit"] else "written"
        lines.append(f"  decoded-patch cache {state}: {report['cache']['path']}")
    lines.append("")
    problems = report["problems"]
    if not problems:
        lines.append("Problems: none found.")
        return printable("\n".join(lines))
    counts = ", ".join(f"{count} {kind}" for kind, count in sorted(report["problem_counts"].items()))
    lines.append(f"Problems: {len(problems)} file(s) or folder(s) left out ({counts}):")
    for problem in problems:
        lines.append(f"  [{problem['kind']}] {_relative(problem['path'], roots)}")
        lines.append(f"      {problem['message']}")
    return printable("\n".join(lines))


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else ""


def _relative(path: str, roots: list[Path]) -> str:
    for root in roots:
        try:
            relative = str(Path(path).relative_to(root))
        except ValueError:
            continue
        return relative if len(roots) == 1 else f"{root.name}/{relative}"
    return path
