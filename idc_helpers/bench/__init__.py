"""Benchmarks (not tests): ``python -m idc_helpers.bench <name> [options]``.

Each benchmark is a module of this package with ``main(argv) -> int``; :data:`BENCHMARKS` maps the command-line
name to the module. Results are printed as Markdown tables that name the machine they ran on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from idc_helpers.errors import UserError

# name -> module with main(argv: list[str] | None) -> int; add new benchmarks here.
BENCHMARKS: dict[str, str] = {
    "boundary": "idc_helpers.bench.boundary",
    "bounds": "idc_helpers.bench.bounds",
    "levers": "idc_helpers.bench.levers",
    "load": "idc_helpers.bench.load",
    "quality": "idc_helpers.bench.quality",
    "record": "idc_helpers.bench.record",
    "seeds": "idc_helpers.bench.seeds",
    "speed": "idc_helpers.bench.speed",
}


def print_markdown(run: Callable[[], dict[str, Any]]) -> int:
    """Call ``run`` and print the ``"markdown"`` of its result; return the exit status.

    0 on success, or 2 with one ``error:`` line on stderr when ``run`` raises a user error (bad folders, settings that
    contradict an earlier run).
    """
    try:
        result = run()
    except (UserError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result["markdown"])
    return 0
