"""Loading benchmark: the package's first load and cached reload against a plain ``cv2.imread`` loop.

Run as ``python -m idc_helpers.bench load [--data-dir DIR ...] [--full-size] [--repeats N] [--out FILE]``.

Measures, on the same files in the same run: a plain single-threaded loop of ``cv2.imread`` (the baseline), the
package's first load (``load_patches`` with an empty cache: decode in parallel, write the cache), and a cached
reload; each in a fresh child process so that timings and peak memory (``ru_maxrss`` of that child) do not mix.
All runs read files already in the page cache (the tree is read once first), so the disk's speed does not favour
whichever step runs second. With ``--full-size`` the same is done on a synthetic tree of 277,524 patches (the
full Kaggle dataset's count) made of hard links to the sample's files under new patient ids in a temporary folder,
deleted afterwards. Goals (issue 2): first load >= 1.7x the plain loop on 2 cores, cached reload >= 30x, peak
memory of the full-size load < 3.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from idc_helpers import KAGGLE_PATCHES
from idc_helpers.cli import OneLineParser

FULL_SIZE_PATCHES = KAGGLE_PATCHES
GOAL_FIRST_LOAD = 1.7
GOAL_CACHED = 30.0
GOAL_PEAK_MB = 3500.0

# mode -> description printed in the table
STEPS = {
    "plain": "plain loop: `[cv2.imread(p) for p in paths]`, 1 thread",
    "first": "`load_patches`, first load (empty cache)",
    "cached": "`load_patches`, cached reload",
    "cached_read": "cached reload + read every pixel once",
    "idle": "child baseline: imports + index, nothing loaded",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print a Markdown table; returns 0."""
    parser = OneLineParser(prog="python -m idc_helpers.bench load", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir",
        action="append",
        default=None,
        metavar="DIR",
        help="dataset folder; repeat for several, indexed as one "
        "(default: $IDC_DATA_DIR, else ../shared/data/idc_sample)",
    )
    parser.add_argument(
        "--full-size",
        action="store_true",
        help=f"also run once on a synthetic tree of {FULL_SIZE_PATCHES:,} patches (temp folder)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs of each step on the sample; best is reported")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: the loader's)")
    parser.add_argument(
        "--out", default=None, help="also write the report here (.json: the raw numbers; else Markdown)"
    )
    parser.add_argument("--child", choices=sorted(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--frame", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, Path(args.frame), args.cache_dir, args.workers)))
        return 0

    from idc_helpers.patch_index import build_index

    data_dirs = [Path(d) for d in args.data_dir] if args.data_dir else [_data_dir(None)]
    missing = [str(d) for d in data_dirs if not d.is_dir()]
    if missing:
        print(
            f"error: dataset folder not found: {', '.join(missing)}; pass --data-dir or set IDC_DATA_DIR",
            file=sys.stderr,
        )
        return 2
    machine = machine_info()
    results = []
    index_start = time.perf_counter()
    frame = build_index(data_dirs).frame
    index_seconds = time.perf_counter() - index_start
    title = f"sample: {', '.join(map(str, data_dirs))}"
    results.append(_run_set(title, frame, index_seconds, args.repeats, args.workers))
    if args.full_size:
        with tempfile.TemporaryDirectory(prefix="idc_fullsize_") as tmp:
            made = time.perf_counter()
            root = make_full_size_tree(frame, Path(tmp) / "data")
            print(f"full-size tree: {FULL_SIZE_PATCHES:,} links in {time.perf_counter() - made:.1f} s", file=sys.stderr)
            index_start = time.perf_counter()
            big = build_index(root).frame
            results.append(
                _run_set(
                    "full-size synthetic tree (hard links to the sample)",
                    big,
                    time.perf_counter() - index_start,
                    1,
                    args.workers,
                )
            )
    machine["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    report = _markdown(machine, results)
    print(report)
    if args.out:
        from idc_helpers.atomic import write_json, write_text

        if args.out.endswith(".json"):
            write_json(args.out, {"machine": machine, "results": results})
        else:
            write_text(args.out, report + "\n")
    return 0


def _data_dir(explicit: str | None) -> Path:
    if explicit or os.environ.get("IDC_DATA_DIR"):
        return Path(explicit or os.environ["IDC_DATA_DIR"])
    relative = Path("../shared/data/idc_sample")  # from the repository root
    beside_repo = Path(__file__).resolve().parents[3] / "shared" / "data" / "idc_sample"
    return relative if relative.is_dir() or not beside_repo.is_dir() else beside_repo


def make_full_size_tree(frame: pd.DataFrame, dest: Path, n_patches: int = FULL_SIZE_PATCHES) -> Path:
    """Fill ``dest`` with ``n_patches`` patches in the Kaggle layout by hard-linking ``frame``'s files repeatedly.

    Copy ``k`` of patient ``p`` becomes patient ``k * 100000 + p``, so names and folders stay valid and distinct.
    Falls back to copying where hard links are not possible (another file system).
    """
    made_dirs: set[Path] = set()
    rows = list(frame[["path", "patient_id", "x", "y", "label"]].itertuples(index=False))
    made = 0
    copy = 0
    while made < n_patches:
        copy += 1
        for path, patient, x, y, label in rows:
            if made == n_patches:
                break
            pid = str(copy * 100_000 + int(patient))
            folder = dest / pid / str(label)
            if folder not in made_dirs:
                folder.mkdir(parents=True, exist_ok=True)
                made_dirs.add(folder)
            target = folder / f"{pid}_idx5_x{x}_y{y}_class{label}.png"
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
            made += 1
    return dest


def _run_set(title: str, frame: pd.DataFrame, index_seconds: float, repeats: int, workers: int | None) -> dict:
    """Every step on one index; the sample's files are read once first so all steps start from the page cache."""
    for path in frame["path"]:
        with open(path, "rb") as handle:
            handle.read()
    runs: dict[str, list[dict]] = {mode: [] for mode in STEPS}
    before = effective_cores()
    with tempfile.TemporaryDirectory(prefix="idc_bench_") as tmp:
        frame_file = Path(tmp) / "frame.pkl"
        frame.to_pickle(frame_file)
        runs["idle"].append(_spawn("idle", frame_file, None, workers))
        for rep in range(max(1, repeats)):
            # The plain loop runs next to the package's steps, before them and after them in turn, so that
            # each repeat gives paired ratios measured under the same (shared) machine load.
            cache = Path(tmp) / "cache"
            order = ["plain", "first", "cached", "cached_read"]
            for mode in order if rep % 2 == 0 else order[1:] + order[:1]:
                runs[mode].append(_spawn(mode, frame_file, None if mode == "plain" else cache, workers))
            shutil.rmtree(cache)
    return {
        "title": title,
        "patches": len(frame),
        "index_seconds": index_seconds,
        "runs": runs,
        "effective_cores": [round(before, 2), round(effective_cores(), 2)],
    }


def _spawn(mode: str, frame_file: Path, cache: Path | None, workers: int | None) -> dict:
    cmd = [sys.executable, "-m", "idc_helpers.bench.load", "--child", mode, "--frame", str(frame_file)]
    if cache is not None:
        cmd += ["--cache-dir", str(cache)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark step {mode!r} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {mode:<12} {result['seconds']:8.3f} s  peak RSS {result['peak_rss_mb']:7.0f} MB", file=sys.stderr)
    return result


def _child(mode: str, frame_file: Path, cache_dir: str | None, workers: int | None) -> dict:
    """One measured step in this (fresh) process: wall and CPU seconds, peak RSS of the whole process."""
    import cv2

    from idc_helpers.decode import default_workers as _default_workers
    from idc_helpers.loader import load_patches

    frame = pd.read_pickle(frame_file)
    paths = frame["path"].tolist()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    extra: dict = {}
    if mode == "plain":
        images = [cv2.imread(p) for p in paths]
        extra["decoded"] = sum(img is not None for img in images)
    elif mode in ("first", "cached", "cached_read"):
        loaded = load_patches(frame, cache_dir=cache_dir, workers=workers)
        if loaded.from_cache != (mode != "first"):
            raise RuntimeError(f"{mode}: expected from_cache={mode != 'first'}, got {loaded.from_cache}")
        extra["decoded"] = len(loaded.images)
        extra["workers"] = workers or _default_workers()
        if mode == "cached_read":
            step = 4096
            extra["checksum"] = sum(
                int(loaded.images[s : s + step].sum(dtype=np.uint64)) for s in range(0, len(loaded.images), step)
            )
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "mode": mode,
        "seconds": seconds,
        "cpu_seconds": (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime),
        "peak_rss_mb": after.ru_maxrss / 1024.0,  # Linux reports KiB
        **extra,
    }


# A fixed CPU-bound job (pure Python, no imports) for measuring how many cores are really free right now.
_SPIN = "import time\nt = time.perf_counter()\nx = 0\nfor i in range(4_000_000): x += i\nprint(time.perf_counter() - t)"


def effective_cores(trials: int = 3) -> float:
    """How many cores two CPU-bound processes get at once: 2 x (time alone) / (time side by side), median of trials.

    About 2 on an idle 2-core machine; lower when other work (or the host of a virtual machine) takes CPU time. A
    parallel loader cannot beat a single-threaded loop by more than this.
    """

    def run(k: int) -> float:
        procs = [
            subprocess.Popen([sys.executable, "-S", "-c", _SPIN], stdout=subprocess.PIPE, text=True) for _ in range(k)
        ]
        return max(float(p.communicate()[0]) for p in procs)

    return statistics.median(2 * run(1) / run(2) for _ in range(trials))


def machine_info() -> dict:
    """CPU model, core count, memory and library versions of this machine, for the heads of benchmark tables."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    import cv2

    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "opencv": cv2.__version__,
        "numpy": np.__version__,
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
    }


def _markdown(machine: dict, results: list[dict]) -> str:
    lines = [
        "## Loading benchmark",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cpus_usable']} usable CPUs (cpu_count {machine['cpu_count']}), "
        f"{machine['memory_gb']} GB; Python {machine['python']}, OpenCV {machine['opencv']}, numpy {machine['numpy']}. "
        f"Load average (1, 5, 15 min) at start {machine['load_average_start']}, at end {machine['load_average_end']} "
        "(other work on the machine slows every step).",
        "Each step runs in a fresh child process, files already in the page cache. Ratios: the median over repeats of "
        "plain-loop seconds / step seconds, each pair measured back to back; then best time / best time. "
        "Peak RSS is the child's whole process (imports and index included).",
    ]
    for result in results:
        runs = result["runs"]
        plain = min(r["seconds"] for r in runs["plain"])
        n = result["patches"]
        lines += [
            "",
            f"### {result['title']}: {n:,} patches, {len(runs['plain'])} run(s) per step",
            "",
            f"Effective cores (two CPU-bound processes side by side vs one alone) before and after: "
            f"{result['effective_cores'][0]} and {result['effective_cores'][1]}.",
            "",
            "| step | best s (median; CPU s) | patches/s | vs plain loop (paired median; best/best) "
            "| peak RSS (MB) | goal |",
            "|---|---:|---:|---:|---:|---|",
            f"| index: `build_index` (names + PNG headers), in the parent | {result['index_seconds']:.2f} | "
            f"{n / result['index_seconds']:,.0f} | | | |",
        ]
        for mode, label in STEPS.items():
            measured = runs[mode]
            peak = max(r["peak_rss_mb"] for r in measured)
            if mode == "idle":
                lines.append(f"| {label} | | | | {peak:,.0f} | |")
                continue
            best = min(r["seconds"] for r in measured)
            median = statistics.median(r["seconds"] for r in measured)
            cpu = statistics.median(r["cpu_seconds"] for r in measured)
            paired = statistics.median(
                p["seconds"] / r["seconds"] for p, r in zip(runs["plain"], measured, strict=False)
            )
            if mode == "first":
                label += f", {measured[0]['workers']} threads"
            lines.append(
                f"| {label} | {best:.3f} ({median:.3f}; {cpu:.2f}) | {n / best:,.0f} | "
                f"{paired:.2f}x; {plain / best:.2f}x | {peak:,.0f} | {_goal(mode, paired, peak, n)} |"
            )
    lines += ["", "Goals are judged on the paired median ratio and the largest peak RSS."]
    return "\n".join(lines)


def _goal(mode: str, ratio: float, peak_mb: float, n: int) -> str:
    parts = []
    if mode == "first":
        parts.append(f">= {GOAL_FIRST_LOAD}x: {'met' if ratio >= GOAL_FIRST_LOAD else 'NOT met'}")
    if mode == "cached":
        parts.append(f">= {GOAL_CACHED:.0f}x: {'met' if ratio >= GOAL_CACHED else 'NOT met'}")
    if mode in ("first", "cached", "cached_read") and n >= FULL_SIZE_PATCHES:
        parts.append(f"< {GOAL_PEAK_MB:,.0f} MB: {'met' if peak_mb < GOAL_PEAK_MB else 'NOT met'}")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
