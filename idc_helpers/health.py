"""Dataset health check: ``python -m idc_helpers index DATA_DIR [--json] [--cache-dir DIR] [--no-decode]``.

Indexes the folder, decodes every patch through the loader (which also fills the decoded-patch cache, so the next
load is fast), and reports patients, patches, per-class counts, patches smaller than 50x50 with their sizes, and
every problem found, each naming its file (misnamed, mislabelled, not a PNG, empty, truncated or corrupt, ...).

Exit status: 0 when no problem was found, 1 when problems were found (the report lists them; the usable patches
are still indexed and cached), 2 when the folder is missing or holds no patient folders, or the cache cannot be
written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from idc_helpers import PATCH_SIZE
from idc_helpers.loader import load_patches
from idc_helpers.patch_index import DatasetFolderError, build_index, dataset_summary

EXIT_OK, EXIT_PROBLEMS, EXIT_NO_DATASET = 0, 1, 2


def health_report(
    data_dir: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    decode: bool = True,
    progress: bool = False,
) -> dict:
    """Check a dataset folder and return the report as a JSON-ready dict.

    Keys: ``data_dir``; ``patients``, ``patches`` (usable patches: indexed and, with ``decode``, decoded),
    ``non_idc``, ``idc``, ``idc_fraction``, ``not_50x50``, ``not_50x50_sizes`` ({"WxH": count});
    ``files_indexed``; ``decoded`` (bool); ``cache`` ({"path", "hit"} or None); ``problems`` (list of
    {"path", "kind", "message"}, sorted by path); ``problem_counts`` ({kind: count}); ``ok`` (no problems).
    Raises :class:`~idc_helpers.patch_index.DatasetFolderError` when the folder is missing or has no patients.
    """
    index = build_index(data_dir)
    problems = list(index.problems)
    frame = index.frame
    cache = None
    if decode and len(frame):
        loaded = load_patches(frame, cache_dir=cache_dir, progress=progress)
        problems.extend(loaded.problems)
        frame = loaded.frame
        cache = {"path": str(loaded.cache_path), "hit": loaded.from_cache}
    problems.sort(key=lambda p: p.path)
    return {
        "data_dir": str(index.root),
        **dataset_summary(frame),
        "files_indexed": int(len(index.frame)),
        "decoded": bool(decode),
        "cache": cache,
        "problems": [asdict(p) for p in problems],
        "problem_counts": dict(Counter(p.kind for p in problems)),
        "ok": not problems,
    }


def format_report(report: dict) -> str:
    """The report as a human-readable table (file names relative to the data folder)."""
    root = Path(report["data_dir"])
    n = report["patches"]
    lines = [f"Dataset: {root}", ""]

    def row(label: str, value: int, note: str = "") -> None:
        lines.append(f"  {label:<24}{value:>9,}   {note}".rstrip())

    checked = "decoded" if report["decoded"] else "names and headers checked, not decoded (--no-decode)"
    row("patients", report["patients"])
    row("patches", n, checked)
    row("  non-IDC (class 0)", report["non_idc"], _percent(report["non_idc"], n))
    row("  IDC (class 1)", report["idc"], _percent(report["idc"], n))
    row(f"not {PATCH_SIZE}x{PATCH_SIZE}", report["not_50x50"],
        "slide-border patches, padded with white at the bottom/right when loaded" if report["not_50x50"] else "")
    for size, count in report["not_50x50_sizes"].items():
        row(f"  {size}", count)
    if report["cache"]:
        state = "reused" if report["cache"]["hit"] else "written"
        lines.append(f"  decoded-patch cache {state}: {report['cache']['path']}")
    lines.append("")
    problems = report["problems"]
    if not problems:
        lines.append("Problems: none found.")
        return "\n".join(lines)
    counts = ", ".join(f"{count} {kind}" for kind, count in sorted(report["problem_counts"].items()))
    lines.append(f"Problems: {len(problems)} file(s) or folder(s) left out ({counts}):")
    for problem in problems:
        lines.append(f"  [{problem['kind']}] {_relative(problem['path'], root)}")
        lines.append(f"      {problem['message']}")
    return "\n".join(lines)


def run_index(args: argparse.Namespace) -> int:
    """``index`` command: print the health report; exit 0 = no problems, 1 = problems found, 2 = no dataset."""
    try:
        report = health_report(
            args.data_dir,
            cache_dir=args.cache_dir,
            decode=not args.no_decode,
            progress=sys.stderr.isatty(),  # a bar on a terminal only, never in logs or captured output
        )
    except DatasetFolderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_DATASET
    except OSError as exc:  # the cache folder cannot be written
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_DATASET
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return EXIT_OK if report["ok"] else EXIT_PROBLEMS


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else ""


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path
