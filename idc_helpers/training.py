"""Training with a patient-level split, written to a self-describing run folder.

``train(data_dir, out_dir)`` and ``python -m idc_helpers train --data-dir DIR --out RUN_DIR`` do the same:

1. index the dataset folder, split it by *patient* (``patients``: seeded and stratified 70/15/15;
   ``janowczyk2016``: the published split), optionally hold out given test patients;
2. optionally subsample patches (``max_patches``), the same share from every patient, deterministically;
3. decode the train and validation patches (cached on disk) and train with augmentation, class weights from
   the training patches, Adam with a cosine learning-rate decay, and early stopping on the validation
   patients' ROC AUC, keeping the best epoch's weights;
4. pick the decision threshold on the validation patients: the one that maximises the IDC F1, the project's
   headline metric (the Youden threshold, which maximises balanced accuracy, is stored beside it); test
   patients are never looked at.

The run folder (``RUN_DIR``) holds:

- ``model.keras``: the best model (Keras 3 format); it takes raw 0..255 patches;
- ``history.json``: per-epoch ``loss``, ``accuracy``, ``val_loss``, ``val_auc``, ``val_pr_auc``, ``val_f1``,
  ``val_balanced_accuracy``, ``lr``, ``seconds``;
- ``config.json``: what is needed to reproduce the run (data folder and origin, split name and patient lists,
  seed, model, epochs, batch size, learning rate, software versions, start time);
- ``metrics.json``: ``threshold``, ``threshold_rule``, ``threshold_youden``, ``best_epoch``, ``epochs_run``,
  ``train_seconds`` and ``validation`` (ROC/PR AUC, F1, balanced accuracy, ... at ``threshold``).

The folder is built under a hidden temporary name next to ``RUN_DIR`` and renamed at the end, so an interrupted
run never leaves a folder that looks complete; an existing non-empty ``RUN_DIR`` is refused.

Speed: TensorFlow's oneDNN kernels matter on a CPU. Measured on the project's 2-core AMD EPYC (TF 2.21, augmented
batches of 128 from the shared sample, other users on the machine): ``TF_ENABLE_ONEDNN_OPTS=0`` gave 410-430
patches/s for ``seed_cnn`` and 125 for ``idc_net``; ``=1`` gave 1,000-1,600 and 250-440 (2.0-3.7x). With TF 2.21
on this CPU (AVX512-VNNI) an unset variable already means "on" (TensorFlow's start-up log says so); TensorFlow
before 2.9, and CPUs without AVX512-VNNI/BF16/AMX, default to off. The variable must be set before TensorFlow is
imported, so :func:`train`, :func:`load_run` and the ``predict`` command set it (unless the user already chose,
``0`` included) before their first TensorFlow import; importing this module does not import TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import numpy as np
import pandas as pd

import idc_helpers

if TYPE_CHECKING:  # TensorFlow is imported only when a function needs it
    import keras

MODEL_FILE = "model.keras"
HISTORY_FILE = "history.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
RUN_FILES = (MODEL_FILE, HISTORY_FILE, CONFIG_FILE, METRICS_FILE)

# idc_net on the shared sample's ~17k training patches: 70-160 s an epoch on 2 busy CPU cores, so 8 epochs keep
# training under 20 minutes with other work on the machine (10 took 1,123 s under heavy load); the cosine schedule
# spans the planned epochs, so fewer epochs still end at a small learning rate.
DEFAULT_EPOCHS = 8
DEFAULT_BATCH_SIZE = 128
DEFAULT_PATIENCE = 4
THRESHOLD_RULE = "f1"  # metrics.pick_threshold criterion: maximise the IDC F1 on validation patches
# Early stopping and the best-epoch choice follow the validation ROC AUC (threshold-free, so it does not depend on
# calibration), with the validation loss as a tie-breaker: on easy data (the demo) the AUC reaches 1.0 in the first
# epoch while the probabilities are still poor, and a bare AUC would keep that first epoch forever.
MONITOR = "val_selection"
SELECTION_LOSS_WEIGHT = 0.01  # val_selection = val_auc - 0.01 * val_loss
VAL_FRACTION_WITH_TEST_PATIENTS = 0.18  # of the non-test patients, when --test-patients replaces the test subset


class RunExistsError(FileExistsError):
    """The run folder already exists and is not empty; runs are never overwritten."""


class TrainingDataError(ValueError):
    """The data cannot support a training run (e.g. no validation patients, one class only)."""


@dataclass
class Run:
    """A trained run loaded back: the model, its config and metrics, and the decision threshold."""

    run_dir: Path | None
    model: keras.Model
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    threshold: float = 0.5

    @property
    def split(self) -> dict[str, list[str]]:
        """Patient ids per subset (``train``, ``val``, ``test``), as stored in ``config.json``."""
        return dict(self.config.get("split", {}).get("patients", {}))


@dataclass
class TrainResult:
    """What :func:`train` produced: the run folder and, in memory, the best model and the JSON contents."""

    run_dir: Path
    model: keras.Model
    history: dict[str, list[float]]
    config: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def threshold(self) -> float:
        return float(self.metrics["threshold"])

    @property
    def split(self) -> dict[str, list[str]]:
        return dict(self.config["split"]["patients"])


# --------------------------------------------------------------------------------------------------------------
# Environment


def enable_onednn() -> bool:
    """Ask for TensorFlow's oneDNN CPU kernels; returns True when the setting can still take effect.

    Sets ``TF_ENABLE_ONEDNN_OPTS=1`` unless the user set it already (``0`` is respected). It only works before
    TensorFlow is first imported in the process, hence False when TensorFlow is already loaded.
    """
    already_loaded = "tensorflow" in sys.modules
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    # Quiet TensorFlow's C++ start-up banners unless the user asked for them.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return not already_loaded


def _versions() -> dict[str, str]:
    import keras
    import sklearn
    import tensorflow as tf

    return {
        "python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
        "numpy": np.__version__, "pandas": pd.__version__, "scikit-learn": sklearn.__version__,
        "idc_helpers": idc_helpers.__version__, "platform": platform.platform(),
    }


def _resolve_verbose(verbose: int | str) -> int:
    # A live progress bar on a terminal; one line per epoch in notebooks and logs (bars break nbval, bloat logs).
    if verbose == "auto":
        return 1 if sys.stdout.isatty() else 2
    return int(verbose)


# --------------------------------------------------------------------------------------------------------------
# Run folder


def check_new_run_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Return ``out_dir`` as an absolute path; raise :class:`RunExistsError` when it exists and is not empty."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunExistsError(
            f"Run folder {out} already exists and is not empty; runs are never overwritten. "
            "Choose a new --out folder (or delete this one yourself if you no longer need it)."
        )
    return out


def _publish(tmp: Path, out: Path) -> None:
    # Re-check at the end: another process may have created the folder while we trained.
    check_new_run_dir(out)
    if out.is_dir():
        out.rmdir()  # empty: os.replace onto a directory is not portable
    os.replace(tmp, out)


def load_run(run_dir: str | os.PathLike[str], *, compile: bool = False) -> Run:
    """Load a run folder written by :func:`train` (or a bare ``.keras`` file: no split, threshold 0.5).

    Raises ``FileNotFoundError`` naming the missing file.
    """
    enable_onednn()
    import keras

    path = Path(run_dir).expanduser()
    if path.is_file() and path.suffix == ".keras":
        if path.name == MODEL_FILE and all((path.parent / name).is_file() for name in RUN_FILES):
            path = path.parent  # the model of a run folder: use the run's threshold and split too
        else:
            return Run(run_dir=None, model=keras.models.load_model(path, compile=compile))
    model_path = path / MODEL_FILE
    if not model_path.is_file():
        raise FileNotFoundError(
            f"No trained model at {model_path}: {path} is not a run folder written by "
            "`python -m idc_helpers train --out RUN_DIR` (or the run was interrupted)."
        )
    config = _read_json(path / CONFIG_FILE)
    metrics = _read_json(path / METRICS_FILE)
    model = keras.models.load_model(model_path, compile=compile)
    return Run(run_dir=path.absolute(), model=model, config=config, metrics=metrics,
               threshold=float(metrics.get("threshold", 0.5)))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run folder {path.parent} is incomplete; train it again.")
    return json.loads(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------------------
# Data


def resolve_split(
    frame: pd.DataFrame, split: str = "patients", seed: int = 0, test_patients: Sequence[str] | None = None
) -> dict[str, list[str]]:
    """Patient ids per subset ``{"train", "val", "test"}``.

    With ``test_patients`` those patients are the test subset and the other patients are split into train and
    validation (``patients``: seeded and stratified; ``janowczyk2016``: the published lists minus the test ones).
    Raises :class:`TrainingDataError` naming unknown patient ids.
    """
    from idc_helpers import splits

    if not test_patients:
        return {k: list(v) for k, v in splits.make_split(frame, split, seed=seed).items()}
    test = sorted({str(p).strip() for p in test_patients if str(p).strip()}, key=int)
    present = set(frame["patient_id"])
    unknown = [p for p in test if p not in present]
    if unknown:
        raise TrainingDataError(
            f"test patients not in the dataset: {', '.join(unknown)}; check the ids against the patient folders."
        )
    rest = frame[~frame["patient_id"].isin(test)]
    if split == "janowczyk2016":
        published = splits.janowczyk2016_split(rest)
        result = {"train": published["train"] + published["test"], "val": published["val"]}
        result["train"] = sorted(result["train"], key=int)
    elif split == "patients":
        fractions = {"train": 1 - VAL_FRACTION_WITH_TEST_PATIENTS, "val": VAL_FRACTION_WITH_TEST_PATIENTS}
        result = splits.patient_split(rest, fractions, seed=seed)
    else:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(splits.SPLIT_NAMES)}")
    return {"train": list(result["train"]), "val": list(result["val"]), "test": test}


def subsample_patches(frame: pd.DataFrame, max_patches: int | None, seed: int = 0) -> pd.DataFrame:
    """At most ``max_patches`` rows, the same share from every patient (and class), chosen at random but
    deterministically from ``seed``; rows keep their order. The patient split is not affected."""
    if max_patches is None or max_patches >= len(frame):
        return frame
    if max_patches < 1:
        raise ValueError(f"max_patches must be at least 1, got {max_patches}")
    share = max_patches / len(frame)
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    # Groups in a fixed order so the same frame and seed give the same rows.
    for _, rows in sorted(frame.groupby(["patient_id", "label"], sort=False).indices.items(),
                          key=lambda kv: (int(kv[0][0]), kv[0][1])):
        n = max(1, int(round(len(rows) * share)))
        keep.append(rng.choice(rows, size=min(n, len(rows)), replace=False))
    chosen = np.sort(np.concatenate(keep))
    return frame.iloc[chosen].reset_index(drop=True)


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Weights ``n / (2 n_c)`` per class so both classes carry the same total weight in the loss."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=2)
    if (counts == 0).any():
        raise TrainingDataError(f"the training patches hold one class only (counts {counts.tolist()})")
    return {c: float(counts.sum() / (2 * counts[c])) for c in range(2)}


# --------------------------------------------------------------------------------------------------------------
# Validation during training


def _validation_scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    from sklearn import metrics as skm

    from idc_helpers.metrics import pick_threshold

    both = 0 < labels.sum() < len(labels)
    scores = {
        "val_loss": float(skm.log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "val_auc": float(skm.roc_auc_score(labels, probs)) if both else float("nan"),
        "val_pr_auc": float(skm.average_precision_score(labels, probs)) if both else float("nan"),
        "val_balanced_accuracy": float(skm.balanced_accuracy_score(labels, probs >= 0.5)),
    }
    auc = scores["val_auc"]
    scores["val_selection"] = (auc if np.isfinite(auc) else 0.0) - SELECTION_LOSS_WEIGHT * scores["val_loss"]
    # Best achievable F1 on validation: what the stored threshold will give.
    threshold = pick_threshold(labels, probs, THRESHOLD_RULE) if both else 0.5
    scores["val_f1"] = float(skm.f1_score(labels, probs >= threshold, zero_division=0))
    return scores


def _make_validation_callback(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, batch_size: int):
    import keras

    from idc_helpers.prediction import predict_probs

    class ValidationScores(keras.callbacks.Callback):
        """Adds validation loss, ROC/PR AUC, best F1 and balanced accuracy (sklearn) to the epoch logs,
        plus the epoch's learning rate and wall-clock seconds.

        One forward pass over the validation patients per epoch, instead of Keras' ``validation_data`` (which
        would give only the loss and accuracy) plus a second pass for the AUC.
        """

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if logs is None:
                return
            probs = predict_probs(self.model, images, indices=indices, batch_size=batch_size)
            logs.update(_validation_scores(labels[indices], probs))
            lr = self.model.optimizer.learning_rate
            logs["lr"] = float(np.asarray(lr.value if hasattr(lr, "value") else lr))
            logs["seconds"] = time.perf_counter() - self._start

    return ValidationScores()


# --------------------------------------------------------------------------------------------------------------
# Training


def train(
    data_dir: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    epochs: int | None = None,
    split: Literal["patients", "janowczyk2016"] = "patients",
    max_patches: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    patience: int = DEFAULT_PATIENCE,
    augment: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    test_patients: Sequence[str] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    steps_per_epoch: int | None = None,
    verbose: int | Literal["auto"] = "auto",
) -> TrainResult:
    """Train a model on the dataset in ``data_dir`` and write the run folder ``out_dir``.

    Args:
        data_dir: dataset folder in the Kaggle layout; ``None`` resolves it with
            :func:`idc_helpers.datasource.resolve_data_dir` (``IDC_DATA_DIR``, ``./data``, Kaggle, demo).
        out_dir: the run folder to create; must not exist or be empty (:class:`RunExistsError`).
        model_name: one of :data:`idc_helpers.models.MODEL_NAMES` (default :data:`~idc_helpers.models.DEFAULT_MODEL`).
        epochs: maximum epochs (early stopping on validation patients; default :data:`DEFAULT_EPOCHS`).
        split: ``"patients"`` (seeded, stratified by IDC share) or ``"janowczyk2016"`` (published).
        max_patches: use at most this many patches, the same share from every patient (quick runs).
        seed: one seed for the split, the subsample, initialisation, shuffling and augmentation.
        batch_size: patches per step (default :data:`DEFAULT_BATCH_SIZE`).
        learning_rate: Adam's initial rate, decayed along a cosine (default per model).
        patience: epochs without a better validation ROC AUC before stopping.
        augment: random flips/rotations and stain jitter on training batches.
        cache_dir: decoded-patch cache (default ``$IDC_CACHE_DIR`` or ``~/.cache/idc_helpers``).
        test_patients: patient ids to hold out as the test subset (the rest is split into train/validation).
        model_kwargs: extra arguments of the model builder.
        steps_per_epoch: at most this many batches per epoch, drawn from an endless shuffled stream of the
            training patches (benchmarks and quick checks on a large set); default: one pass over them.
        verbose: 0 silent, 1 progress bar, 2 one line per epoch, ``"auto"``: 1 on a terminal, else 2.

    Returns:
        :class:`TrainResult` with the run folder, the best model and the JSON contents.

    Same data, arguments and seed give the same split and subsample, and on a CPU the same weights.
    """
    started = datetime.now(timezone.utc)
    onednn_effective = enable_onednn()
    out = check_new_run_dir(out_dir)
    verbose = _resolve_verbose(verbose)
    say = print if verbose else (lambda *a, **k: None)

    from idc_helpers.datasource import resolve_data_dir
    from idc_helpers.demo_data import SYNTHETIC_NOTICE
    from idc_helpers.loader import load_patches
    from idc_helpers.patch_index import build_index
    from idc_helpers.splits import subset_of

    source = resolve_data_dir(data_dir)
    if source.synthetic:
        print(SYNTHETIC_NOTICE, flush=True)

    index = build_index(source.path)
    if index.problems:
        say(f"{len(index.problems)} files left out of the index (run `python -m idc_helpers index {source.path}`).")
    patient_lists = resolve_split(index.frame, split, seed=seed, test_patients=test_patients)
    frame = subsample_patches(index.frame, max_patches, seed=seed)
    subset = subset_of(frame, patient_lists)
    # Only train and validation patches are decoded: training never looks at test patients.
    frame = frame[subset.isin(["train", "val"]).to_numpy()].reset_index(drop=True)
    loaded = load_patches(frame, cache_dir=cache_dir, progress=bool(verbose) and sys.stderr.isatty())
    if loaded.problems:
        say(f"{len(loaded.problems)} patches could not be decoded and are left out, e.g. {loaded.problems[0]}")
    frame = loaded.frame
    subset = subset_of(frame, patient_lists).to_numpy()
    labels = frame["label"].to_numpy(dtype=np.int32)
    train_idx = np.flatnonzero(subset == "train")
    val_idx = np.flatnonzero(subset == "val")
    if len(val_idx) == 0 or len(np.unique(labels[val_idx])) < 2:
        raise TrainingDataError(
            f"the validation patients {patient_lists['val']} hold {len(val_idx)} patches and "
            f"{len(np.unique(labels[val_idx]))} class(es); early stopping and the threshold need both classes. "
            "Use more patients (or another --seed / --split)."
        )
    weights = class_weights(labels[train_idx])

    import keras
    import tensorflow as tf

    from idc_helpers.models import DEFAULT_LEARNING_RATE, DEFAULT_MODEL, build_model, compile_model
    from idc_helpers.pipeline import make_dataset

    model_name = model_name or DEFAULT_MODEL
    epochs = int(epochs or DEFAULT_EPOCHS)
    batch_size = int(batch_size or DEFAULT_BATCH_SIZE)
    learning_rate = float(learning_rate or DEFAULT_LEARNING_RATE.get(model_name, 1e-3))
    keras.utils.set_random_seed(seed)
    model = build_model(model_name, **dict(model_kwargs or {}))
    if steps_per_epoch is not None and int(steps_per_epoch) < 1:
        raise ValueError(f"steps_per_epoch must be at least 1, got {steps_per_epoch}")
    full_pass = int(np.ceil(len(train_idx) / batch_size))
    limited = steps_per_epoch is not None and int(steps_per_epoch) < full_pass
    steps_per_epoch = int(steps_per_epoch) if limited else full_pass
    # Cosine decay to 5% over the planned epochs: large steps early, fine ones for the epochs that early
    # stopping is likely to keep.
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=epochs * steps_per_epoch, alpha=0.05)
    compile_model(model, learning_rate=schedule)
    train_ds = make_dataset(images=loaded.images, labels=labels, indices=train_idx, batch_size=batch_size,
                            shuffle=True, augment=augment, seed=seed, repeat=limited)

    config: dict[str, Any] = {
        "model": model_name,
        "model_kwargs": dict(model_kwargs or {}),
        "parameters": int(model.count_params()),
        "data": {"data_dir": str(source.path), "origin": source.origin, "synthetic": bool(source.synthetic),
                 "patches_in_folder": int(len(index.frame)), "files_left_out": len(index.problems),
                 "patches_not_decoded": len(loaded.problems)},
        "split": {"name": split, "seed": seed,
                  "test_patients_given": bool(test_patients),
                  "patients": patient_lists,
                  "patches": {name: int((subset == name).sum()) for name in ("train", "val")},
                  "idc_patches": {name: int(labels[subset == name].sum()) for name in ("train", "val")}},
        "max_patches": max_patches,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "steps_per_epoch": steps_per_epoch,
        "learning_rate": learning_rate,
        "lr_schedule": "cosine decay to 5% over the planned epochs",
        "patience": patience,
        "monitor": MONITOR,
        "augment": augment,
        "class_weight": weights,
        "threshold_rule": THRESHOLD_RULE,
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "onednn_setting_effective": onednn_effective,
        "versions": _versions(),
        "cpu_threads": os.cpu_count(),
        "started": started.isoformat(timespec="seconds"),
    }
    say(f"Training {model_name} ({config['parameters']:,} parameters) on {len(train_idx):,} patches of "
        f"{len(patient_lists['train'])} patients; validation {len(val_idx):,} patches of "
        f"{len(patient_lists['val'])} patients; test patients held out: {len(patient_lists['test'])}.")

    callbacks = [
        # Order matters: the scores must be in the logs before early stopping reads them.
        _make_validation_callback(loaded.images, labels, val_idx, batch_size=512),
        keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=patience, restore_best_weights=True,
                                      verbose=0),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        fit_start = time.perf_counter()
        # The dataset shuffles itself (seeded); Keras cannot shuffle a tf.data.Dataset.
        history = model.fit(train_ds, epochs=epochs, steps_per_epoch=steps_per_epoch if limited else None,
                            class_weight=weights, callbacks=callbacks, verbose=verbose, shuffle=False)
        train_seconds = time.perf_counter() - fit_start
        hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
        hist["epoch"] = [i + 1 for i in range(len(next(iter(history.history.values()), [])))]
        best = int(np.nanargmax(hist[MONITOR])) if hist.get(MONITOR) else len(hist["epoch"]) - 1
        metrics = _final_metrics(model, loaded.images, labels, val_idx, patient_lists["val"])
        metrics.update({"best_epoch": best + 1, "epochs_run": len(hist["epoch"]), "monitor": MONITOR,
                        "train_seconds": round(train_seconds, 1),
                        "seconds_per_epoch": round(train_seconds / max(len(hist["epoch"]), 1), 1)})
        config["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")

        from idc_helpers.atomic import write_json

        model.save(tmp / MODEL_FILE)
        write_json(tmp / HISTORY_FILE, hist)
        write_json(tmp / CONFIG_FILE, config)
        write_json(tmp / METRICS_FILE, metrics)
        tmp.chmod(0o755)  # mkdtemp makes it private; a run folder is shared like any output
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"Best epoch {metrics['best_epoch']} of {metrics['epochs_run']}: validation ROC AUC "
        f"{metrics['validation']['roc_auc']:.3f}, F1 {metrics['validation']['f1']:.3f} at threshold "
        f"{metrics['threshold']:.3f}. Run saved to {out} ({train_seconds:.0f} s of training).")
    return TrainResult(run_dir=out, model=model, history=hist, config=config, metrics=metrics)


def _final_metrics(model: keras.Model, images: np.ndarray, labels: np.ndarray, val_idx: np.ndarray,
                   val_patients: list[str]) -> dict[str, Any]:
    """Threshold picked on the validation patches, and the validation metrics at it."""
    from sklearn import metrics as skm

    from idc_helpers.metrics import pick_threshold
    from idc_helpers.prediction import predict_probs

    y = labels[val_idx]
    probs = predict_probs(model, images, indices=val_idx, batch_size=512)
    threshold = pick_threshold(y, probs, THRESHOLD_RULE)
    pred = (probs >= threshold).astype(np.int64)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {
        "threshold": threshold,
        "threshold_rule": f"maximise the IDC F1 on the validation patients' patches ({THRESHOLD_RULE})",
        "threshold_youden": pick_threshold(y, probs, "youden"),
        "validation": {
            "patients": len(val_patients), "patches": int(len(y)), "idc_patches": int(y.sum()),
            "roc_auc": float(skm.roc_auc_score(y, probs)),
            "pr_auc": float(skm.average_precision_score(y, probs)),
            "f1": float(skm.f1_score(y, pred, zero_division=0)),
            "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
            "accuracy": float(skm.accuracy_score(y, pred)),
            "precision": float(skm.precision_score(y, pred, zero_division=0)),
            "recall": float(skm.recall_score(y, pred, zero_division=0)),
            "confusion_matrix": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
        },
    }


# --------------------------------------------------------------------------------------------------------------
# Command line


def run_train(args: argparse.Namespace) -> int:
    """``python -m idc_helpers train``: train and write the run folder; exit status 2 on a usage error."""
    test_patients = args.test_patients.split(",") if args.test_patients else None
    try:
        result = train(
            args.data_dir, args.out, model_name=args.model, epochs=args.epochs, split=args.split,
            max_patches=args.max_patches, seed=args.seed, batch_size=args.batch_size, cache_dir=args.cache_dir,
            test_patients=test_patients, verbose="auto",
        )
    except (RunExistsError, FileNotFoundError, TrainingDataError) as exc:  # missing folders and files included
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Next: python -m idc_helpers predict --model {result.run_dir} --data-dir {result.config['data']['data_dir']}"
          " --subset test --out predictions.csv")
    return 0
