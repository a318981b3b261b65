"""Speed and memory of training and prediction: ``python -m idc_helpers.bench speed [options]``.

Measured side by side in one run, printed (and with ``--out`` written) as a Markdown table:

(a) **training throughput** (patches/s of ``model.fit``) of the package's input pipeline
    (:func:`idc_helpers.pipeline.make_dataset`: batches gathered from the memmapped decoded-patch cache, shuffled,
    with and without the training augmentation) against the same model fed from an in-memory tensor
    (``tf.data.Dataset.from_tensor_slices`` of a small array held in RAM, with and without the same augmentation):
    the compute limit of the model on this machine. Same model, batch size and number of steps; the variants run
    in turn, ``--repeats`` times, and the median is reported, so that load from other processes hits all of them;
(a0) the **input pipeline alone** (patches/s of iterating :func:`~idc_helpers.pipeline.make_dataset` with no model),
    without augmentation and with each augmentation strength, printed beside the training rate of (a): when the
    pipeline with augmentation delivers less than the model consumes, the pipeline sets the pace;
(b) **prediction throughput** (patches/s of :func:`idc_helpers.predictions.predict_probs`), with and without
    test-time augmentation (8 flips/rotations);
(c) the **notebook series** ``python -m idc_helpers run-notebooks --smoke`` timed as a subprocess (and on the full
    shared sample with ``--notebooks-full``);
(d) **peak memory** (``ru_maxrss`` of a fresh process) of :func:`idc_helpers.training.train` on a full-size
    synthetic set of 277,524 patches (the sample's files hard-linked under new patient ids in a temporary folder,
    decoded into a temporary cache): once including the decoding, once from the finished cache (the training
    path proper: the cache memmapped whole, batches gathered from it), each limited to ``--memory-steps`` steps.
    The temporary tree and cache are deleted afterwards.

From (a) it estimates one epoch over the full dataset on this machine.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from idc_helpers import KAGGLE_PATCHES
from idc_helpers.cli import OneLineParser

FULL_DATASET_PATCHES = KAGGLE_PATCHES
# Share of patients (hence roughly of patches) that the default 70/15/15 patient split trains on.
TRAIN_SHARE = 0.70


# --------------------------------------------------------------------------------------------------------------
# (a) training throughput


def training_throughput(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    model_name: str = "idc_net",
    batch_size: int = 128,
    steps: int = 40,
    repeats: int = 3,
    in_memory_patches: int = 4096,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Training patches/s of one model fed four ways, and of the same architecture augmenting inside the model.

    The in-model variant is :class:`~idc_helpers.models.TrainingAugmentation`, fed raw uint8 batches. Each rate is the
    median of ``repeats`` rounds of ``steps`` steps each.

    ``images``: ``(N, 50, 50, 3) uint8`` (the memmapped cache); ``labels``: ``(N,)``. The in-memory variants use
    the first ``in_memory_patches`` rows copied into RAM. Returns ``{variant: {"patches_per_s", "runs"}}``.
    """
    import keras
    import tensorflow as tf

    from idc_helpers.models import build_model, compile_model
    from idc_helpers.pipeline import augment_batch, make_dataset

    keras.utils.set_random_seed(seed)
    model = compile_model(build_model(model_name), learning_rate=1e-4)
    augmenting = compile_model(build_model(model_name, augment="mild", augment_seed=seed), learning_rate=1e-4)
    labels = np.asarray(labels, dtype=np.int32)
    k = min(in_memory_patches, len(images))
    x_mem, y_mem = np.array(images[:k]), labels[:k].copy()

    def in_memory(augment: bool) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices((x_mem, y_mem)).shuffle(k, seed=seed).repeat().batch(batch_size)
        ds = ds.enumerate().map(
            lambda i, xy: (
                (
                    augment_batch(xy[0], tf.stack([tf.constant(seed, tf.int64), i]))
                    if augment
                    else tf.cast(xy[0], tf.float32)
                ),
                xy[1],
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return ds.prefetch(tf.data.AUTOTUNE)

    variants = {
        "in-memory tensor, no augmentation": in_memory(False),
        "pipeline (memmap), no augmentation": make_dataset(
            images, labels, batch_size=batch_size, shuffle=True, augment=False, seed=seed, repeat=True
        ),
        "in-memory tensor + augmentation": in_memory(True),
        "pipeline (memmap) + augmentation": make_dataset(
            images, labels, batch_size=batch_size, shuffle=True, augment=True, seed=seed, repeat=True
        ),
        "pipeline (memmap, uint8) + augmentation in the model": make_dataset(
            images, labels, batch_size=batch_size, shuffle=True, seed=seed, repeat=True, dtype="uint8"
        ),
    }
    model_of = {name: augmenting if name.endswith("in the model") else model for name in variants}
    for name, ds in variants.items():  # trace the train step and fill each pipeline's buffers before timing
        model_of[name].fit(ds, steps_per_epoch=3, epochs=1, verbose=0, shuffle=False)
    runs: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(repeats):
        # Rotate the order each round so no variant always follows the same one.
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            model_of[name].fit(variants[name], steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
            runs[name].append(steps * batch_size / (time.perf_counter() - start))
    return {name: {"patches_per_s": statistics.median(r), "runs": [round(v, 1) for v in r]} for name, r in runs.items()}


def pipeline_throughput(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int = 128,
    batches: int = 200,
    repeats: int = 3,
    settings: Sequence[str] = ("none", "geometry", "mild", "strong"),
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Patches/s of :func:`~idc_helpers.pipeline.make_dataset` alone (batches drawn, no model) per augmentation setting.

    Median of ``repeats`` rounds of ``batches`` batches (settings in turn within a round, so that load from other
    processes hits all of them). Returns ``{setting: {"patches_per_s", "runs", "ratio_to_none"}}``; ``ratio_to_none`` is
    the median of the per-round ratios to the un-augmented pipeline.
    """
    from idc_helpers.pipeline import make_dataset

    labels = np.asarray(labels, dtype=np.int32)
    iterators = {
        name: iter(
            make_dataset(images, labels, batch_size=batch_size, shuffle=True, augment=name, seed=seed, repeat=True)
        )
        for name in settings
    }
    for it in iterators.values():  # trace the functions and fill the prefetch buffers before timing
        for _ in range(5):
            next(it)
    runs: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(repeats):
        for name, it in iterators.items():
            start = time.perf_counter()
            drawn = sum(int(next(it)[1].shape[0]) for _ in range(batches))
            runs[name].append(drawn / (time.perf_counter() - start))
    base = runs.get("none")
    return {
        name: {
            "patches_per_s": statistics.median(r),
            "runs": [round(v, 1) for v in r],
            "ratio_to_none": statistics.median(v / b for v, b in zip(r, base, strict=False)) if base else None,
        }
        for name, r in runs.items()
    }


# --------------------------------------------------------------------------------------------------------------
# (b) prediction throughput


def prediction_throughput(
    images: np.ndarray, *, model_name: str = "idc_net", patches: int = 4096, repeats: int = 2, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Patches/s of :func:`~idc_helpers.predictions.predict_probs` on the memmapped cache, without and with TTA.

    ``patches`` rows, median of ``repeats``; an untrained model costs the same as a trained one.
    """
    import keras

    from idc_helpers.models import build_model
    from idc_helpers.probabilities import predict_probs

    keras.utils.set_random_seed(seed)
    model = build_model(model_name)
    rows = np.arange(min(patches, len(images)))
    predict_probs(model, images, indices=rows[:512])  # warm-up: first call traces the model
    result = {}
    for tta in (False, True):
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            predict_probs(model, images, indices=rows, tta=tta)
            rates.append(len(rows) / (time.perf_counter() - start))
        result["with TTA (8 views)" if tta else "no TTA"] = {
            "patches_per_s": statistics.median(rates),
            "runs": [round(v, 1) for v in rates],
        }
    return result


# --------------------------------------------------------------------------------------------------------------
# (c) notebooks


def time_notebooks(
    out_dir: Path, *, smoke: bool = True, data_dir: str | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """Wall seconds of ``python -m idc_helpers run-notebooks [--smoke]`` in a subprocess, and its exit status."""
    cmd = [sys.executable, "-m", "idc_helpers", "run-notebooks", "--out", str(out_dir)]
    if smoke:
        cmd.append("--smoke")
    if data_dir:
        cmd += ["--data-dir", str(data_dir)]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        status, tail = done.returncode, (done.stdout + done.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        status, tail = None, f"timed out after {timeout} s"
    return {
        "command": " ".join(["python", *cmd[1:]]),
        "seconds": time.perf_counter() - start,
        "returncode": status,
        "tail": tail,
    }


# --------------------------------------------------------------------------------------------------------------
# (d) peak memory on a full-size set


def _memory_child(data_dir: str, cache_dir: str, model_name: str, steps: int) -> dict[str, Any]:
    """In a fresh process: one limited epoch of :func:`~idc_helpers.training.train`; peak RSS and seconds."""
    from idc_helpers.training import train

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="idc_speed_run_") as tmp:
        result = train(
            data_dir,
            Path(tmp) / "run",
            model_name=model_name,
            epochs=1,
            steps_per_epoch=steps,
            cache_dir=cache_dir,
            verbose=0,
        )
        split = result.config["split"]["patches"]
        steps_run = result.config["steps_per_epoch"]  # what train() really used, not what was asked
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        **_rss_parts(),
        "train_patches": split["train"],
        "val_patches": split["val"],
        "steps": steps_run,
    }


def _rss_parts() -> dict[str, float]:
    """Resident memory now in MB, split into anonymous and file-backed.

    Anonymous is the heap (the process's own), file-backed the memmapped cache pages, which the kernel can drop and
    re-read. Read from ``/proc/self/status`` (Linux; empty elsewhere).
    """
    parts = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                parts[f"{key.lower()}_end_mb"] = int(value.split()[0]) / 1024.0
    except OSError:
        pass
    return parts


def peak_memory(
    sample_frame,
    work_dir: Path,
    *,
    model_name: str = "seed_cnn",
    steps: int = 200,
    n_patches: int = FULL_DATASET_PATCHES,
) -> dict[str, Any]:
    """Peak RSS of training on a full-size hard-linked copy of ``sample_frame``'s files, decoding and from the cache.

    First with decoding, then from the cache. ``work_dir`` (same file system as the sample, for hard links) is emptied
    afterwards.
    """
    from idc_helpers.bench.load import make_full_size_tree

    tree, cache = work_dir / "data", work_dir / "cache"
    try:
        start = time.perf_counter()
        make_full_size_tree(sample_frame, tree, n_patches)
        result: dict[str, Any] = {
            "patches": n_patches,
            "tree_seconds": time.perf_counter() - start,
            "model": model_name,
        }
        for phase in ("decode and train", "train from cache"):
            cmd = [
                sys.executable,
                "-m",
                "idc_helpers.bench.speed",
                "--memory-child",
                str(tree),
                str(cache),
                model_name,
                str(steps),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"memory measurement ({phase}) failed:\n{done.stderr[-3000:]}")
            result[phase] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  memory, {phase}: {result[phase]}", file=sys.stderr, flush=True)
        result["cache_bytes"] = sum(p.stat().st_size for p in cache.glob("*.npy"))
        return result
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# (e) accelerator check: tools/gpu_check.sh


class _GpuSampler:
    """Samples ``nvidia-smi``'s GPU utilisation (%) every ``interval_ms`` while active; no samples without it."""

    def __init__(self, interval_ms: int = 200) -> None:
        self.interval_ms, self.samples, self._proc = interval_ms, [], None

    def __enter__(self) -> _GpuSampler:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    f"--loop-ms={self.interval_ms}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            out, _ = self._proc.communicate(timeout=10)
            self.samples = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_median": None, "samples": 0}
        return {
            "gpu_util_mean": statistics.fmean(self.samples),
            "gpu_util_median": statistics.median(self.samples),
            "samples": len(self.samples),
        }


def synthetic_patches(path: Path, n: int, *, seed: int = 0, chunk: int = 20_000) -> np.ndarray:
    """A full-size stand-in for the decoded cache: ``(n, 50, 50, 3) uint8`` random pixels, memmapped read-only.

    Written to ``path`` as ``.npy`` and returned memmapped, as training reads the real cache (content does not change
    speed).
    """
    rng = np.random.default_rng(seed)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 50, 50, 3))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        out[start:stop] = rng.integers(0, 256, size=(stop - start, 50, 50, 3), dtype=np.uint8)
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


def gpu_check(
    work_dir: str | os.PathLike[str],
    *,
    patches: int = FULL_DATASET_PATCHES,
    epochs: int = 2,
    batch_sizes: Sequence[int] = (128, 512),
    model_name: str = "idc_net",
    augment: str = "mild",
    pipeline_batches: int = 300,
    seed: int = 0,
    time_budget_s: float = 200.0,
    placements: Sequence[str] = ("pipeline", "model"),
) -> dict[str, Any]:
    """Training speed on the machine's accelerator per batch size, beside the input pipeline's own rate.

    ``model_name`` trains for ``epochs`` epochs over the training share of a full-size synthetic set (``patches``
    patches, 70% trained on), with GPU utilisation sampled from ``nvidia-smi``; the pipeline alone runs with the same
    augmentation. A run counts as pipeline-bound when training reaches 80% of what the pipeline alone delivers. A batch
    size is skipped (listed in ``"skipped"``) once ``time_budget_s`` seconds have passed, and so is each later run.
    ``work_dir`` holds the temporary array (2.1 GB at full size), deleted afterwards. ``placements``: where the
    augmentation runs, ``"pipeline"`` (the CPU's tf.data workers) and/or ``"model"``
    (:class:`~idc_helpers.models.TrainingAugmentation`, on the accelerator).
    """
    import tensorflow as tf

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    array = work / "synthetic_patches.npy"
    start = time.perf_counter()
    images = synthetic_patches(array, patches, seed=seed)
    labels = np.random.default_rng(seed + 1).integers(0, 2, size=patches).astype(np.int32)
    train_idx = np.arange(int(patches * TRAIN_SHARE))
    gpus = [tf.config.experimental.get_device_details(g) for g in tf.config.list_physical_devices("GPU")]
    report: dict[str, Any] = {
        "machine": _machine(),
        "gpu_details": gpus,
        "patches": patches,
        "train_patches": len(train_idx),
        "model": model_name,
        "augment": augment,
        "epochs": epochs,
        "data_seconds": time.perf_counter() - start,
        "runs": [],
        "skipped": [],
    }
    try:
        for batch_size in batch_sizes:
            if time.perf_counter() - start > time_budget_s:
                report["skipped"] += [f"batch {batch_size}, augmentation in the {p}" for p in placements]
                continue
            alone = pipeline_throughput(
                images,
                labels,
                batch_size=batch_size,
                batches=max(1, pipeline_batches * 128 // batch_size),
                repeats=1,
                settings=("none", augment),
            )
            for placement in placements:
                if time.perf_counter() - start > time_budget_s:
                    report["skipped"].append(f"batch {batch_size}, augmentation in the {placement}")
                    continue
                run = _timed_fit(
                    images,
                    labels,
                    train_idx,
                    model_name=model_name,
                    augment=augment,
                    placement=placement,
                    batch_size=batch_size,
                    epochs=epochs,
                    seed=seed,
                )
                # The pipeline delivers augmented batches, or raw ones when the model augments.
                feed = alone[augment if placement == "pipeline" else "none"]["patches_per_s"]
                run.update(
                    {
                        "pipeline_alone_patches_per_s": {k: v["patches_per_s"] for k, v in alone.items()},
                        "pipeline_bound": run["train_patches_per_s"][-1] >= 0.8 * feed,
                    }
                )
                report["runs"].append(run)
                print(
                    f"[gpu-check] batch {batch_size}, augmentation in the {placement}: "
                    f"{run['train_patches_per_s'][-1]:.0f} patches/s training, pipeline alone {feed:.0f}, "
                    f"GPU utilisation {run['gpu_util_mean']}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        array.unlink(missing_ok=True)
    report["markdown"] = gpu_check_markdown(report)
    return report


def _timed_fit(
    images, labels, train_idx, *, model_name: str, augment: str, placement: str, batch_size: int, epochs: int, seed: int
) -> dict[str, Any]:
    """``epochs`` epochs of a fresh model over ``train_idx``, augmenting in the pipeline or in the model.

    Returns each epoch's seconds and patches/s, and the GPU utilisation meanwhile.
    """
    import keras

    from idc_helpers.models import build_model, compile_model, uses_mixed_precision
    from idc_helpers.pipeline import make_dataset

    keras.utils.set_random_seed(seed)
    in_model = placement == "model"
    model = compile_model(
        build_model(model_name, augment=augment if in_model else None, augment_seed=seed), learning_rate=1e-4
    )
    steps = -(-len(train_idx) // batch_size)
    ds = make_dataset(
        images,
        labels,
        train_idx,
        batch_size=batch_size,
        augment=False if in_model else augment,
        seed=seed,
        repeat=True,
        steps_per_epoch=steps,
        dtype="uint8" if in_model else "float32",
    )
    timer = _epoch_timer()
    with _GpuSampler() as sampler:
        model.fit(ds, epochs=epochs, steps_per_epoch=steps, verbose=0, callbacks=[timer], shuffle=False)
    # The first epoch includes tracing and compiling; the last one is the steady rate.
    return {
        "batch_size": batch_size,
        "augmentation_in": placement,
        "mixed_precision": uses_mixed_precision(model),
        "epoch_seconds": timer.seconds,
        "train_patches_per_s": [len(train_idx) / t for t in timer.seconds],
        **sampler.summary(),
    }


def _epoch_timer():
    """A Keras callback that records each epoch's wall seconds in ``.seconds``."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []
            self._start = 0.0

        def on_epoch_begin(self, epoch, logs=None) -> None:
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None) -> None:
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def gpu_check_markdown(report: dict[str, Any]) -> str:
    """The accelerator check as a Markdown table."""
    m = report["machine"]
    names = (
        ", ".join(
            str(d.get("device_name", "GPU")) + f" (compute capability {d.get('compute_capability')})"
            for d in report["gpu_details"]
        )
        or "no GPU (CPU only)"
    )
    lines = [
        "## Accelerator check",
        "",
        f"Device: {names}; CPU {m['cpu_model']}, {m['cpus_usable']} usable CPUs; TensorFlow {m['tensorflow']}. "
        f"{report['model']} on a synthetic set of {report['patches']:,} patches, {report['epochs']} epoch(s) over "
        f"the {report['train_patches']:,} training patches, augmentation '{report['augment']}' in the input "
        "pipeline (CPU) or in the model (the accelerator).",
        "",
        "| batch | augmentation in the | mixed precision | training patches/s (last epoch) | each epoch (s) | "
        "pipeline alone, no augmentation / augmented (patches/s) | GPU utilisation (mean %) | pipeline-bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        alone = r["pipeline_alone_patches_per_s"]
        util = "–" if r["gpu_util_mean"] is None else f"{r['gpu_util_mean']:.0f}"
        lines.append(
            f"| {r['batch_size']} | {r['augmentation_in']} | {'yes' if r['mixed_precision'] else 'no'} | "
            f"{r['train_patches_per_s'][-1]:.0f} | {', '.join(f'{t:.1f}' for t in r['epoch_seconds'])} | "
            f"{alone['none']:.0f} / {alone[report['augment']]:.0f} | {util} | "
            f"{'yes' if r['pipeline_bound'] else 'no'} |"
        )
    if report["skipped"]:
        lines += ["", f"Skipped for time: {'; '.join(report['skipped'])}."]
    return "\n".join([*lines, ""])


# --------------------------------------------------------------------------------------------------------------
# Report


def _machine() -> dict[str, Any]:
    import platform

    import tensorflow as tf

    from idc_helpers.bench.load import machine_info

    info = machine_info()
    info.update(
        {
            "tensorflow": tf.__version__,
            "gpus": len(tf.config.list_physical_devices("GPU")),
            "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
            "platform": platform.platform(),
        }
    )
    return info


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def _pipeline_markdown(report: dict[str, Any]) -> list[str]:
    """Section (a0), and which of pipeline and model sets the training pace."""
    p = report.get("pipeline")
    if not p:
        return []
    cfg = report["pipeline_config"]
    lines = [
        f"### (a0) Input pipeline alone: `make_dataset` from the memmapped cache, batch {cfg['batch_size']}, "
        f"{cfg['batches']} batches per run, median of {cfg['repeats']} runs",
        "",
        "| augmentation | patches/s (median) | runs | ratio to no augmentation (median of per-round ratios) |",
        "|---|---|---|---|",
    ]
    for name, v in p.items():
        ratio = "–" if v["ratio_to_none"] is None else f"{v['ratio_to_none']:.2f}"
        lines.append(f"| {name} | {v['patches_per_s']:.0f} | {', '.join(f'{r:.0f}' for r in v['runs'])} | {ratio} |")
    a = report.get("training")
    if a and "mild" in p:
        train_rate = a["pipeline (memmap) + augmentation"]["patches_per_s"]
        feed = p["mild"]["patches_per_s"]
        # Within 80% of the pipeline's own ceiling, the model waits for batches: the pipeline sets the pace.
        bound = "the input pipeline" if train_rate >= 0.8 * feed else "the model (compute), not the input pipeline"
        lines += [
            "",
            f"Training from the pipeline with augmentation ran at {train_rate:.0f} patches/s, "
            f"{train_rate / feed:.0%} of what the pipeline alone delivers with the same augmentation "
            f"({feed:.0f} patches/s): the pace is set by {bound}. On a CPU both share the same cores.",
        ]
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    """The speed report as Markdown tables."""
    m = report["machine"]
    lines = [
        "## Speed",
        "",
        f"Machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs, {m['memory_gb']} GB RAM, "
        f"{m['gpus']} GPU; TensorFlow {m['tensorflow']} (TF_ENABLE_ONEDNN_OPTS={m['tf_enable_onednn_opts']}); "
        f"load average at start {m['load_average_start']}.",
        "",
    ]
    lines += _pipeline_markdown(report)
    a = report.get("training")
    if a:
        cfg = report["training_config"]
        lines += [
            f"### (a) Training throughput: {cfg['model']}, batch {cfg['batch_size']}, {cfg['steps']} steps "
            f"per run, median of {cfg['repeats']} runs",
            "",
            "| input | patches/s (median) | runs | ratio to in-memory tensor, same augmentation "
            "(median of per-round ratios) |",
            "|---|---|---|---|",
        ]
        base = {
            False: a["in-memory tensor, no augmentation"]["runs"],
            True: a["in-memory tensor + augmentation"]["runs"],
        }
        for name, v in a.items():
            # Runs of the same round were timed back to back, under the same load: compare them pairwise.
            ratio = statistics.median(r / b for r, b in zip(v["runs"], base["+ augmentation" in name], strict=False))
            lines.append(
                f"| {name} | {v['patches_per_s']:.0f} | {', '.join(f'{r:.0f}' for r in v['runs'])} | {ratio:.2f} |"
            )
        est = report["full_epoch_estimate"]
        lines += [
            "",
            f"One epoch of the full dataset at the pipeline's measured rate with augmentation "
            f"({est['patches_per_s']:.0f} patches/s): about {est['train_share_minutes']:.0f} min for the "
            f"training share ({est['train_share_patches']:,} patches, 70% of {FULL_DATASET_PATCHES:,}), "
            f"{est['all_minutes']:.0f} min for all {FULL_DATASET_PATCHES:,} patches (CPU; no GPU measured).",
            "",
        ]
    b = report.get("prediction")
    if b:
        lines += [
            f"### (b) Prediction throughput: {report['training_config']['model']}, "
            f"{report['prediction_patches']:,} patches from the memmapped cache",
            "",
            "| mode | patches/s (median) | runs |",
            "|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['patches_per_s']:.0f} | {', '.join(f'{r:.0f}' for r in v['runs'])} |" for k, v in b.items()
        ]
        lines.append("")
    c = report.get("notebooks")
    if c:
        lines += ["### (c) Notebook series (papermill)", "", "| command | seconds | exit status |", "|---|---|---|"]
        lines += [f"| `{v['command']}` | {v['seconds']:.0f} | {v['returncode']} |" for v in c]
        lines.append("")
    d = report.get("memory")
    if d:
        lines += [
            f"### (d) Peak memory: `train` on a full-size set of {d['patches']:,} patches "
            f"({d['model']}, {d['train from cache']['steps']} steps, then the validation pass)",
            "",
            "| phase | peak RSS (MB) | at the end: anonymous / file-backed RSS (MB) | seconds "
            "| train / validation patches |",
            "|---|---|---|---|---|",
        ]
        for phase in ("decode and train", "train from cache"):
            v = d[phase]
            lines.append(
                f"| {phase} | {v['peak_rss_mb']:.0f} | {_f(v.get('rssanon_end_mb'))} / "
                f"{_f(v.get('rssfile_end_mb'))} | {v['seconds']:.0f} | {v['train_patches']:,} / "
                f"{v['val_patches']:,} |"
            )
        lines += [
            "",
            f"Decoded cache: {d['cache_bytes'] / 1e9:.2f} GB on disk, memmapped (its pages count in RSS "
            "only once touched, and the kernel can drop them: they are file-backed).",
            "",
        ]
    return "\n".join(lines)


def run_speed(
    data_dir: str | os.PathLike[str] | None,
    *,
    model_name: str = "idc_net",
    batch_size: int = 128,
    steps: int = 40,
    repeats: int = 3,
    predict_patches: int = 4096,
    notebooks: bool = True,
    notebooks_full: bool = False,
    memory: bool = True,
    memory_steps: int = 200,
    memory_model: str = "seed_cnn",
    work_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    pipeline_batches: int = 200,
) -> dict[str, Any]:
    """Run the measurements (a0), (a)-(d) and return the report (``markdown`` key included)."""
    from idc_helpers.datasource import resolve_data_dir
    from idc_helpers.loader import load_patches
    from idc_helpers.patch_index import build_index

    source = resolve_data_dir(data_dir)
    frame = build_index(source.path).frame
    loaded = load_patches(frame, cache_dir=cache_dir)
    report: dict[str, Any] = {"machine": _machine(), "data_dir": str(source.path), "patches": len(loaded.images)}
    say = lambda msg: print(f"[speed] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    if pipeline_batches > 0:
        say("(a0) input pipeline alone")
        report["pipeline_config"] = {"batch_size": batch_size, "batches": pipeline_batches, "repeats": repeats}
        report["pipeline"] = pipeline_throughput(
            loaded.images, loaded.labels, batch_size=batch_size, batches=pipeline_batches, repeats=repeats
        )
    if steps > 0:
        say("(a) training throughput")
        report["training_config"] = {"model": model_name, "batch_size": batch_size, "steps": steps, "repeats": repeats}
        report["training"] = training_throughput(
            loaded.images, loaded.labels, model_name=model_name, batch_size=batch_size, steps=steps, repeats=repeats
        )
        rate = report["training"]["pipeline (memmap) + augmentation"]["patches_per_s"]
        train_share = int(FULL_DATASET_PATCHES * TRAIN_SHARE)
        report["full_epoch_estimate"] = {
            "patches_per_s": rate,
            "train_share_patches": train_share,
            "train_share_minutes": train_share / rate / 60,
            "all_minutes": FULL_DATASET_PATCHES / rate / 60,
        }
        say("(b) prediction throughput")
        report["prediction_patches"] = min(predict_patches, len(loaded.images))
        report["prediction"] = prediction_throughput(loaded.images, model_name=model_name, patches=predict_patches)
    if notebooks or notebooks_full:
        report["notebooks"] = []
        with tempfile.TemporaryDirectory(prefix="idc_speed_nb_") as tmp:
            if notebooks:
                say("(c) notebooks --smoke")
                report["notebooks"].append(time_notebooks(Path(tmp) / "smoke", smoke=True))
            if notebooks_full:
                say("(c) notebooks on the data folder")
                report["notebooks"].append(time_notebooks(Path(tmp) / "full", smoke=False, data_dir=str(source.path)))
    if memory:
        say("(d) peak memory on a full-size set")
        # Hard links need the same file system as the sample: default to a folder beside the system temp dir.
        base = Path(work_dir) if work_dir else Path(tempfile.gettempdir())
        report["memory"] = peak_memory(
            frame,
            Path(tempfile.mkdtemp(prefix="idc_speed_full_", dir=base)),
            model_name=memory_model,
            steps=memory_steps,
        )
    report["markdown"] = markdown(report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``python -m idc_helpers.bench speed``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--memory-child"]:
        data_dir, cache_dir, model_name, steps = argv[1:5]
        print(json.dumps(_memory_child(data_dir, cache_dir, model_name, int(steps))))
        return 0
    if argv[:1] == ["--gpu-check"]:
        return _gpu_check_main(argv[1:])
    parser = OneLineParser(prog="python -m idc_helpers.bench speed", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="dataset folder (default: resolved as for `train`)")
    parser.add_argument("--model", default="idc_net", help="model for (a) and (b)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="training steps per timed run in (a); 0 skips (a), (b)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per input variant in (a)")
    parser.add_argument("--predict-patches", type=int, default=4096)
    parser.add_argument("--no-notebooks", action="store_true", help="skip (c)")
    parser.add_argument("--notebooks-full", action="store_true", help="also run the notebooks on --data-dir")
    parser.add_argument("--no-memory", action="store_true", help="skip (d)")
    parser.add_argument("--memory-steps", type=int, default=200)
    parser.add_argument("--memory-model", default="seed_cnn", help="model trained in (d)")
    parser.add_argument(
        "--pipeline-batches",
        type=int,
        default=200,
        help="batches per timed run of the pipeline alone in (a0); 0 skips (a0)",
    )
    parser.add_argument("--work-dir", default=None, help="temporary folder for (d), on the data's file system")
    parser.add_argument("--cache-dir", default=None, help="decoded-patch cache of the data folder")
    parser.add_argument("--out", default=None, help="also write the Markdown here (and the JSON beside it)")
    args = parser.parse_args(argv)
    report = run_speed(
        args.data_dir,
        model_name=args.model,
        batch_size=args.batch_size,
        steps=args.steps,
        repeats=args.repeats,
        predict_patches=args.predict_patches,
        notebooks=not args.no_notebooks,
        notebooks_full=args.notebooks_full,
        memory=not args.no_memory,
        memory_steps=args.memory_steps,
        memory_model=args.memory_model,
        work_dir=args.work_dir,
        cache_dir=args.cache_dir,
        pipeline_batches=args.pipeline_batches,
    )
    print(report["markdown"])
    if args.out:
        from idc_helpers.atomic import write_json, write_text

        out = Path(args.out)
        write_text(out, report["markdown"])
        write_json(out.with_suffix(".json"), report)
    return 0


def _gpu_check_main(argv: Sequence[str]) -> int:
    """``python -m idc_helpers.bench speed --gpu-check --out DIR [...]`` (run by tools/gpu_check.sh)."""
    parser = OneLineParser(
        prog="python -m idc_helpers.bench speed --gpu-check",
        description="training speed on the accelerator, pipeline-bound or not",
    )
    parser.add_argument("--out", required=True, help="folder for gpu_check.md and gpu_check.json")
    parser.add_argument("--patches", type=int, default=FULL_DATASET_PATCHES, help="size of the synthetic set")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, action="append", default=None, help="repeatable; default 128 and 512")
    parser.add_argument("--model", default="idc_net")
    parser.add_argument("--augment", default="mild", help="augmentation strength")
    parser.add_argument(
        "--placement",
        action="append",
        choices=("pipeline", "model"),
        default=None,
        help="where the augmentation runs (repeatable; default both)",
    )
    parser.add_argument("--pipeline-batches", type=int, default=300)
    parser.add_argument(
        "--work-dir",
        default=None,
        help="folder for the temporary synthetic array (default: the system's temporary folder)",
    )
    args = parser.parse_args(argv)
    from idc_helpers.atomic import write_json, write_text

    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="idc_gpu_check_", dir=args.work_dir) as work:
        report = gpu_check(
            work,
            patches=args.patches,
            epochs=args.epochs,
            batch_sizes=args.batch_size or (128, 512),
            model_name=args.model,
            augment=args.augment,
            pipeline_batches=args.pipeline_batches,
            placements=args.placement or ("pipeline", "model"),
        )
    print(report["markdown"])
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "gpu_check.md", report["markdown"])
    write_json(out / "gpu_check.json", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
