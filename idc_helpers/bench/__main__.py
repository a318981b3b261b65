"""``python -m idc_helpers.bench <name> [options]``: run one benchmark (``--help`` after the name for its options)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from idc_helpers.bench import BENCHMARKS
from idc_helpers.tf_env import quiet_tensorflow

# The benchmarks that train or predict: TensorFlow is imported for them up front, with its start-up lines hidden.
_TENSORFLOW_BENCHMARKS = ("boundary", "levers", "quality", "speed")


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to the benchmark module of that name; returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        names = ", ".join(sorted(BENCHMARKS))
        print(f"usage: python -m idc_helpers.bench {{{names}}} [options]", file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown benchmark {argv[0]!r}; choose one of: {names}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    quiet_tensorflow("bench" if argv[0] in _TENSORFLOW_BENCHMARKS else None)
    module = importlib.import_module(BENCHMARKS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
