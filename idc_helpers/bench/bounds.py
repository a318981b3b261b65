"""Bounds benchmark: ``python -m idc_helpers.bench bounds [--rows N] [--slide-rows N ...] [--work-dir DIR]``.

Measures, each command in a fresh child process (wall time and its peak memory, ``VmHWM``; Linux only):

- ``evaluate`` on a synthetic predictions CSV of ``--rows`` patches (default 10 million, 279 patients) with 1,000
  bootstrap resamples, end to end; beside it, in this process on the same table, one resample of the exact
  bootstrap (every patch) against the histogram bootstrap that :func:`idc_helpers.metrics.evaluate` uses above
  :data:`idc_helpers.bootstrap.HISTOGRAM_BOOTSTRAP_PATCHES` patches;
- ``slide`` on one patient of ``--slide-rows`` patches (hard links to one PNG on a square grid, the first size the
  baseline): memory should stay flat as the rows grow, since the picture is the same 2,000 px at most.

The files go to a temporary folder (``--work-dir``), deleted afterwards. Prints a Markdown table naming the machine.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from idc_helpers.cli import OneLineParser

# Peak memory from VmHWM: ru_maxrss would carry over the parent's peak through fork and exec on Linux.
_MEASURE = """
import re, sys, time
from idc_helpers.cli import main
start = time.perf_counter()
status = main(sys.argv[1:])
peak = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
print("MEASURED", status, round(time.perf_counter() - start, 1), peak, file=sys.stderr)
"""


def measure(argv: Sequence[str]) -> dict[str, float]:
    """Run ``python -m idc_helpers ARGV`` in a child process: exit status, seconds, peak memory in MB."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True)
    line = next((ln for ln in reversed(done.stderr.splitlines()) if ln.startswith("MEASURED")), None)
    if line is None:
        raise RuntimeError(f"python -m idc_helpers {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    _, status, seconds, peak = line.split()
    return {"status": int(status), "seconds": float(seconds), "peak_mb": float(peak)}


def predictions_table(n_rows: int, n_patients: int = 279, seed: int = 0) -> pd.DataFrame:
    """A predictions table of ``n_rows`` patches over ``n_patients`` patients with an informative score."""
    rng = np.random.default_rng(seed)
    patient = rng.integers(0, n_patients, n_rows)
    share = rng.uniform(0.05, 0.6, n_patients)[patient]
    label = (rng.random(n_rows) < share).astype(np.int8)
    prob = np.clip(0.35 * label + 0.65 * rng.random(n_rows), 0, 1)
    ids = (10_000 + patient).astype(str)
    row = np.arange(n_rows)
    x, y = 1 + 50 * (row % 1000), 1 + 50 * (row // 1000 % 1000)
    path = pd.Series(ids).str.cat([pd.Series(row.astype(str))], sep="/p") + ".png"
    return pd.DataFrame(
        {
            "path": "/d/" + path,
            "patient_id": ids,
            "x": x,
            "y": y,
            "label": label,
            "prob_idc": prob,
            "pred": (prob >= 0.5).astype(np.int8),
        }
    )


def bootstrap_seconds(table: pd.DataFrame, resamples: int, exact: bool) -> float:
    """Seconds of ``resamples`` bootstrap resamples of ``table``, exact (every patch) or from histograms."""
    from idc_helpers import bootstrap, metrics

    limit = bootstrap.HISTOGRAM_BOOTSTRAP_PATCHES
    bootstrap.HISTOGRAM_BOOTSTRAP_PATCHES = len(table) if exact else 0
    try:
        start = time.perf_counter()
        metrics.evaluate(table, n_bootstrap=resamples)
        with_bootstrap = time.perf_counter() - start
        start = time.perf_counter()
        metrics.evaluate(table, n_bootstrap=0)
        return with_bootstrap - (time.perf_counter() - start)
    finally:
        bootstrap.HISTOGRAM_BOOTSTRAP_PATCHES = limit


_LINKS_PER_FILE = 50_000  # ext4 allows 65,000 hard links to one file


def one_patient_slide(folder: Path, n_rows: int) -> Path:
    """A predictions CSV of one patient with ``n_rows`` patches on a square grid, hard links to one PNG."""
    patch = np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8)
    side = int(np.ceil(np.sqrt(n_rows)))
    rows = []
    (folder / "7" / "0").mkdir(parents=True)
    for i in range(n_rows):
        source = folder / f"patch-{i // _LINKS_PER_FILE}.png"
        if i % _LINKS_PER_FILE == 0:
            cv2.imwrite(str(source), patch)
        x, y = 1 + 50 * (i % side), 1 + 50 * (i // side)
        path = folder / "7" / "0" / f"7_idx5_x{x}_y{y}_class0.png"
        os.link(source, path)
        rows.append((str(path), "7", x, y, 0, (i % 100) / 100, int(i % 100 >= 50)))
    csv = folder / "slide.csv"
    pd.DataFrame(rows, columns=["path", "patient_id", "x", "y", "label", "prob_idc", "pred"]).to_csv(csv, index=False)
    return csv


class _Lines(list):
    """The report's lines, each printed as soon as it is measured."""

    def append(self, line: str) -> None:
        print(line, flush=True)
        super().append(line)

    def __iadd__(self, lines):
        for line in lines:
            self.append(line)
        return self


def run_bounds(rows: int, slide_rows: Sequence[int], work_dir: str | None) -> str:
    """Measure, printing each line of the Markdown report as it comes, and return the report."""
    folder = Path(tempfile.mkdtemp(prefix="idc_bounds_", dir=work_dir))
    lines = _Lines()
    lines += [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads, "
        f"Python {platform.python_version()}",
        "",
        "| measurement | seconds | peak memory (MB) |",
        "| --- | ---: | ---: |",
    ]
    try:
        table = predictions_table(rows)
        exact = bootstrap_seconds(table, 1, exact=True)
        binned = bootstrap_seconds(table, 64, exact=False) / 64
        lines += [
            f"| one exact bootstrap resample of {rows:,} patches (baseline) | {exact:.2f} | |",
            f"| one histogram bootstrap resample of {rows:,} patches | {binned:.3f} | |",
        ]
        csv = folder / "preds.csv"
        table.to_csv(csv, index=False)
        del table
        result = measure(["evaluate", "--predictions", str(csv), "--out", str(folder / "report.json")])
        lines.append(
            f"| `evaluate` on {rows:,} patches, 1,000 resamples, end to end (exit {result['status']}) "
            f"| {result['seconds']:.0f} | {result['peak_mb']:.0f} |"
        )
        csv.unlink()
        for n in slide_rows:
            slide_dir = folder / f"slide_{n}"
            slide_dir.mkdir()
            slide_csv = one_patient_slide(slide_dir, n)
            result = measure(
                ["slide", "--predictions", str(slide_csv), "--patient", "7", "--out", str(slide_dir / "slide.png")]
            )
            lines.append(
                f"| `slide` of one patient, {n:,} patches (exit {result['status']}) "
                f"| {result['seconds']:.0f} | {result['peak_mb']:.0f} |"
            )
            shutil.rmtree(slide_dir)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``python -m idc_helpers.bench bounds``."""
    parser = OneLineParser(prog="python -m idc_helpers.bench bounds", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="patches of the evaluate table")
    parser.add_argument(
        "--slide-rows",
        type=int,
        nargs="+",
        default=[20_000, 200_000],
        help="patches of the one-patient slides; the first is the baseline",
    )
    parser.add_argument("--work-dir", default=None, help="temporary folder (default: the system's)")
    args = parser.parse_args(argv)
    run_bounds(args.rows, args.slide_rows, args.work_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
