"""Training with a patient-level split, written to a self-describing run folder (see :mod:`idc_helpers.run`).

``train(data_dir, out_dir)`` and ``python -m idc_helpers train --data-dir DIR --out RUN_DIR`` do the same, in
four named steps:

1. :func:`prepare_data`: index the dataset folder(s), split by *patient* (``patients``: seeded and stratified
   70/15/15; ``janowczyk2016``: the published split), optionally hold out given test patients, optionally
   subsample (``max_patches``, the same share from every patient), and decode the train and validation patches
   only (cached on disk): training never reads a test patient's file;
2. :func:`fit`: train with augmentation (in the input pipeline on a CPU, inside the model on a GPU: see
   :func:`idc_helpers.models.augmentation_placement`), class weights from the training patches, Adam with a cosine
   learning-rate decay, and early stopping on the validation patients (:data:`MONITOR`), keeping the best
   epoch's weights; a checkpoint after every epoch makes the run resumable (``train(..., resume=True)``,
   ``train --resume RUN_DIR``) to the same result;
3. :func:`choose_threshold`: the decision threshold that maximises the IDC F1 on the validation patients (the
   Youden threshold, which maximises balanced accuracy, is stored beside it), and the validation metrics at it;
   :func:`choose_context`: the slide-context smoothing and its own threshold, on the validation patients
   (:func:`idc_helpers.context.fit_context`), stored under ``"context"`` for ``predict --context``;
4. :func:`idc_helpers.run.write_run_files` and :func:`idc_helpers.run.publish_run`: the run folder appears only
   when complete.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

import idc_helpers
from idc_helpers import context, splits
from idc_helpers.atomic import atomic_path, write_json
from idc_helpers.datasource import resolve_data_dir
from idc_helpers.errors import DiskFullError, IdcError, UserError, is_disk_full
from idc_helpers.inference import predict_probs
from idc_helpers.loader import load_patches
from idc_helpers.metrics import binary_scores, log_loss, pick_threshold, ranking_scores
from idc_helpers.model_file import load_model_file
from idc_helpers.patch_index import build_index
from idc_helpers.run import (
    CHECKPOINT_PREFIXES,
    CHECKPOINT_STATE_FILE,
    CONFIG_FILE,
    LOCK_FILE,
    RunBusyError,
    RunExistsError,
    RunFolderError,
    busy_message,
    check_new_run_dir,
    checkpoint_file,
    checkpoint_names,
    claim_run,
    discard_partial,
    has_interrupted_run,
    partial_dir,
    publish_run,
    read_json,
    run_path,
    run_writer,
    write_run_files,
)
from idc_helpers.validation import check_optional, check_patient_ids, check_run_config, check_value

if TYPE_CHECKING:  # TensorFlow is imported only when a function needs it
    import keras

# The cosine schedule spans the planned epochs, so fewer epochs still end at a small learning rate; the time an
# epoch takes is measured in docs/results.md.
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


class TrainingDataError(UserError, ValueError):
    """The data cannot support a training run (e.g. no validation patients, one class only)."""


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


@dataclass
class TrainingData:
    """The decoded train and validation patches: ``images`` ``(N, 50, 50, 3)`` uint8 (often a memmap), ``labels``
    ``(N,)`` int32, row positions of each subset, the patient lists, and what ``config.json`` records of the data.
    """

    images: np.ndarray
    labels: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    patients: dict[str, list[str]]
    record: dict[str, Any]
    synthetic: bool
    frame: pd.DataFrame  # the patch index rows of ``images`` (patient_id, x, y, label, ...)


# --------------------------------------------------------------------------------------------------------------
# Step 1: data


def resolve_split(
    frame: pd.DataFrame,
    split: str = "patients",
    seed: int = 0,
    test_patients: Sequence[str] | None = None,
    unlisted: Literal["train", "drop"] = "train",
) -> dict[str, list[str]]:
    """Patient ids per subset ``{"train", "val", "test"}``.

    With ``test_patients`` those patients are the test subset and the other patients are split into train and
    validation (``patients``: seeded and stratified; ``janowczyk2016``: the published lists minus the test ones).
    ``unlisted``: see :func:`idc_helpers.splits.janowczyk2016_split`.
    Raises :class:`TrainingDataError` naming unknown patient ids.
    """
    if not test_patients:
        return {k: list(v) for k, v in splits.make_split(frame, split, seed=seed, unlisted=unlisted).items()}
    given = set(check_patient_ids(test_patients, "test patients"))
    unknown = sorted(given - set(frame["patient_id"]))  # before sorting by number: an id may not be one
    if unknown:
        raise TrainingDataError(
            f"test patients not in the dataset: {', '.join(unknown)}; check the ids against the patient folders."
        )
    test = sorted(given, key=int)
    rest = frame[~frame["patient_id"].isin(test)]
    if split == "janowczyk2016":
        published = splits.janowczyk2016_split(rest, unlisted=unlisted)
        result = {"train": sorted(published["train"] + published["test"], key=int), "val": published["val"]}
    elif split == "patients":
        fractions = {"train": 1 - VAL_FRACTION_WITH_TEST_PATIENTS, "val": VAL_FRACTION_WITH_TEST_PATIENTS}
        result = splits.patient_split(rest, fractions, seed=seed)
    else:
        raise TrainingDataError(f"unknown split {split!r}; choose one of {', '.join(splits.SPLIT_NAMES)}")
    return {"train": list(result["train"]), "val": list(result["val"]), "test": test}


def subsample_patches(frame: pd.DataFrame, max_patches: int | None, seed: int = 0) -> pd.DataFrame:
    """At most ``max_patches`` rows, the same share from every patient (and class), chosen at random but
    deterministically from ``seed``; rows keep their order. The patient split is not affected.
    """
    if max_patches is None or max_patches >= len(frame):
        return frame
    if max_patches < 1:
        raise TrainingDataError(f"max_patches must be at least 1, got {max_patches}")
    share = max_patches / len(frame)
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    # Groups in a fixed order so the same frame and seed give the same rows.
    for _, rows in sorted(
        frame.groupby(["patient_id", "label"], sort=False).indices.items(), key=lambda kv: (int(kv[0][0]), kv[0][1])
    ):
        n = max(1, round(len(rows) * share))
        keep.append(rng.choice(rows, size=min(n, len(rows)), replace=False))
    chosen = np.sort(np.concatenate(keep))
    return frame.iloc[chosen].reset_index(drop=True)


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Weights ``n / (2 n_c)`` per class so both classes carry the same total weight in the loss."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=2)
    if (counts == 0).any():
        raise TrainingDataError(f"the training patches hold one class only (counts {counts.tolist()})")
    return {c: float(counts.sum() / (2 * counts[c])) for c in range(2)}


def prepare_data(
    data_dirs: Sequence[str | os.PathLike[str] | None],
    *,
    split: str = "patients",
    seed: int = 0,
    test_patients: Sequence[str] | None = None,
    unlisted: Literal["train", "drop"] = "train",
    max_patches: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    say=print,
) -> TrainingData:
    """Index, split by patient, subsample, and decode the train and validation patches (test patches never).

    Raises :class:`TrainingDataError` when the split leaves no validation or test patients, or validation
    patches of one class only.
    """
    sources = [resolve_data_dir(d) for d in data_dirs]
    synthetic = any(s.synthetic for s in sources)  # resolve_data_dir has said so, loudly
    index = build_index([s.path for s in sources])
    if index.problems:
        folders = " ".join(f"--data-dir {s.path}" for s in sources)
        say(f"{len(index.problems)} files left out of the index (run `python -m idc_helpers index {folders}`).")
    patients = resolve_split(index.frame, split, seed=seed, test_patients=test_patients, unlisted=unlisted)
    _check_split(patients, split, index.frame)
    frame = subsample_patches(index.frame, max_patches, seed=seed)
    # Only train and validation patches are decoded: training never looks at test patients.
    frame = frame[splits.subset_of(frame, patients).isin(["train", "val"]).to_numpy()].reset_index(drop=True)
    loaded = load_patches(frame, cache_dir=cache_dir, progress=say is print and sys.stderr.isatty())
    if loaded.problems:
        say(f"{len(loaded.problems)} patches could not be decoded and are left out, e.g. {loaded.problems[0]}")
    subset = splits.subset_of(loaded.frame, patients).to_numpy()
    labels = loaded.frame["label"].to_numpy(dtype=np.int32)
    val_idx = np.flatnonzero(subset == "val")
    if len(val_idx) == 0 or len(np.unique(labels[val_idx])) < 2:
        raise TrainingDataError(
            f"the validation patients {patients['val']} hold {len(val_idx)} patches and "
            f"{len(np.unique(labels[val_idx]))} class(es); early stopping and the threshold need both classes. "
            "Use more patients (or another --seed / --split)."
        )
    record = {
        "data_dirs": [str(s.path) for s in sources],
        "origins": [s.origin for s in sources],
        "synthetic": synthetic,
        "patches_in_folders": len(index.frame),
        "files_left_out": len(index.problems),
        "patches_not_decoded": len(loaded.problems),
        "patches": {name: int((subset == name).sum()) for name in ("train", "val")},
        "idc_patches": {name: int(labels[subset == name].sum()) for name in ("train", "val")},
    }
    return TrainingData(
        images=loaded.images,
        labels=labels,
        train_idx=np.flatnonzero(subset == "train"),
        val_idx=val_idx,
        patients=patients,
        record=record,
        synthetic=synthetic,
        frame=loaded.frame,
    )


def _check_split(patients: dict[str, list[str]], split: str, frame: pd.DataFrame) -> None:
    """A split that leaves a subset empty is refused with its cause (for the published split: unlisted ids)."""
    empty = [name for name in splits.SUBSETS if not patients.get(name)]
    if not empty:
        return
    n = frame["patient_id"].nunique()
    if split == "janowczyk2016":
        listed = set().union(*splits.JANOWCZYK2016.values())
        outside = sorted(set(frame["patient_id"]) - listed, key=int)
        cause = (
            f"{len(outside)} of the {n} patients of this data are not in the published janowczyk2016 lists "
            f"(e.g. {', '.join(outside[:5])}), and none of the listed ones falls in {' or '.join(empty)}"
        )
        fix = "use --split patients, or give --test-patients"
    else:
        cause = f"the {n} patients are too few to fill every subset"
        fix = "use more patients"
    raise TrainingDataError(f"the split {split!r} leaves the {' and '.join(empty)} subset empty: {cause}; {fix}.")


# --------------------------------------------------------------------------------------------------------------
# Step 2: fit


def _validation_scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    ranking = ranking_scores(labels, probs)
    scores = {
        "val_loss": log_loss(labels, probs),
        "val_auc": ranking["roc_auc"],
        "val_pr_auc": ranking["pr_auc"],
        "val_balanced_accuracy": binary_scores(labels, probs >= 0.5)["balanced_accuracy"],
    }
    auc = scores["val_auc"]
    scores["val_selection"] = (auc if np.isfinite(auc) else 0.0) - SELECTION_LOSS_WEIGHT * scores["val_loss"]
    # Best achievable F1 on validation: what the stored threshold will give.
    both = 0 < labels.sum() < len(labels)
    threshold = pick_threshold(labels, probs, THRESHOLD_RULE) if both else 0.5
    scores["val_f1"] = binary_scores(labels, probs >= threshold)["f1"]
    return scores


@dataclass
class LoopState:
    """What the training loop carries from epoch to epoch, saved in every checkpoint: epochs done, the history
    so far, the best epoch (1-based) and its :data:`MONITOR` value, epochs since it, and whether training stopped.
    """

    epochs_done: int = 0
    history: dict[str, list[float]] | None = None
    best_epoch: int = 0
    best_value: float = -np.inf
    wait: int = 0
    stopped: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "epochs_done": self.epochs_done,
            "history": self.history or {},
            "best_epoch": self.best_epoch,
            "best_value": self.best_value if np.isfinite(self.best_value) else None,
            "wait": self.wait,
            "stopped": self.stopped,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LoopState:
        best = data.get("best_value")
        return cls(
            epochs_done=int(data["epochs_done"]),
            history={k: list(v) for k, v in data["history"].items()},
            best_epoch=int(data["best_epoch"]),
            best_value=-np.inf if best is None else float(best),
            wait=int(data["wait"]),
            stopped=bool(data["stopped"]),
            seconds=float(data.get("seconds", 0.0)),
        )


def _unsaved_variables(model: keras.Model) -> list:
    # Variables that model.save leaves out: the dropout layers' random-seed state. Without them a resumed run
    # would draw other dropout masks than an uninterrupted one. Their names change when a model is loaded in a
    # process that built one before, their order does not.
    saved = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in saved]


def _model_state(model: keras.Model) -> list[list]:
    return [np.asarray(v.numpy()).tolist() for v in _unsaved_variables(model)]


def _restore_model_state(model: keras.Model, state: Sequence[list]) -> None:
    variables = _unsaved_variables(model)
    if len(variables) != len(state):
        raise RunFolderError(
            f"the checkpoint holds {len(state)} random-seed states where the model has "
            f"{len(variables)}; it was not written by this version: delete the partial run."
        )
    for v, value in zip(variables, state, strict=True):
        v.assign(np.asarray(value, dtype=v.dtype))


def _make_loop_callback(data: TrainingData, folder: Path, state: LoopState, patience: int):
    """The callback that scores each epoch on the validation patients, tracks the best epoch, stops early, and
    writes the end-of-epoch checkpoint into the partial run ``folder``.
    """
    import keras

    class TrainingLoop(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.best_weights: list[np.ndarray] | None = None

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs if logs is not None else {}
            probs = predict_probs(self.model, data.images, indices=data.val_idx, batch_size=512)
            logs.update(_validation_scores(data.labels[data.val_idx], probs))
            lr = self.model.optimizer.learning_rate
            logs["lr"] = float(np.asarray(lr.value if hasattr(lr, "value") else lr))
            logs["seconds"] = time.perf_counter() - self._start
            history = state.history if state.history is not None else {}
            for key, value in logs.items():
                history.setdefault(key, []).append(float(value))
            history.setdefault("epoch", []).append(epoch + 1)
            state.history, state.epochs_done = history, epoch + 1
            state.seconds += logs["seconds"]
            value = float(logs[MONITOR])
            if value > state.best_value:
                state.best_epoch, state.best_value, state.wait = epoch + 1, value, 0
                self.best_weights = self.model.get_weights()
            else:
                state.wait += 1
            if state.wait >= patience:
                state.stopped = self.model.stop_training = True
            save_checkpoint(folder, self.model, self.best_weights, state)

    return TrainingLoop()


def save_checkpoint(folder: Path, model: keras.Model, best_weights: list[np.ndarray] | None, state: LoopState) -> None:
    """Write the end-of-epoch checkpoint: the model with its optimizer state, the best weights so far, then the
    loop state naming both (written last, so a kill at any moment leaves the previous checkpoint intact).
    """
    import keras

    names = checkpoint_names(state.epochs_done)
    with atomic_path(folder / names["model"], suffix=".keras") as tmp:
        model.save(tmp)
    best = keras.models.clone_model(model)
    best.set_weights(best_weights if best_weights is not None else model.get_weights())
    with atomic_path(folder / names["best"], suffix=".weights.h5") as tmp:
        best.save_weights(tmp)
    write_json(folder / CHECKPOINT_STATE_FILE, {**state.to_json(), **names, "model_state": _model_state(model)})
    for old in folder.iterdir():  # the previous epoch's files
        if old.name.startswith(CHECKPOINT_PREFIXES) and old.name not in names.values():
            old.unlink(missing_ok=True)


def load_checkpoint(folder: Path) -> tuple[keras.Model, list[np.ndarray], LoopState] | None:
    """The last checkpoint of a partial run: model (compiled, with its optimizer state), best weights, loop state;
    None when the run was interrupted before its first epoch ended.
    """
    import keras

    if not (folder / CHECKPOINT_STATE_FILE).is_file():
        return None
    saved = read_json(folder / CHECKPOINT_STATE_FILE)
    model_path, best_path = checkpoint_file(folder, saved, "model"), checkpoint_file(folder, saved, "best")
    model = load_model_file(model_path, compile=True)
    _restore_model_state(model, saved["model_state"])
    best = keras.models.clone_model(model)
    best.load_weights(best_path)
    return model, best.get_weights(), LoopState.from_json(saved)


def model_seed(config: Mapping[str, Any]) -> int:
    """The seed of a run's initialisation, batch order and augmentation: ``config["model_seed"]``, or the split
    seed for runs written before the two could differ.
    """
    return int(config.get("model_seed", config["seed"]))


def build_and_compile(config: Mapping[str, Any], n_train: int) -> keras.Model:
    """The model of ``config`` (seeded), compiled with Adam and a cosine decay to 5% over the planned epochs:
    large steps early, fine ones for the epochs that early stopping is likely to keep.
    """
    import keras

    from idc_helpers.models import build_model, compile_model

    seed = model_seed(config)
    keras.utils.set_random_seed(seed)
    kwargs = {k: v for k, v in config["model_kwargs"].items() if k != "mixed_precision"}
    if config.get("augment_on") == "model":
        kwargs.update(augment=config["augment"], augment_seed=seed)
    # A run resumed before its first checkpoint, maybe on another machine, computes as it was started to.
    model = build_model(config["model"], mixed_precision=config.get("precision_policy"), **kwargs)
    steps = config["steps_per_epoch"] or int(np.ceil(n_train / config["batch_size"]))
    schedule = keras.optimizers.schedules.CosineDecay(
        config["learning_rate"], decay_steps=config["epochs"] * steps, alpha=0.05
    )
    return compile_model(model, learning_rate=schedule, label_smoothing=float(config.get("label_smoothing", 0.0)))


def fit(
    model: keras.Model,
    data: TrainingData,
    config: Mapping[str, Any],
    folder: Path,
    state: LoopState | None = None,
    best_weights: list[np.ndarray] | None = None,
    verbose: int = 2,
) -> tuple[keras.Model, LoopState]:
    """Train from ``state`` (a fresh run: None) to the end or to early stopping, checkpointing into ``folder``;
    returns the model holding the best epoch's weights and the final loop state.
    """
    import keras

    from idc_helpers.pipeline import make_dataset

    state = state or LoopState()
    loop = _make_loop_callback(data, folder, state, config["patience"])
    loop.best_weights = best_weights
    if not state.stopped and state.epochs_done < config["epochs"]:
        keras.utils.set_random_seed(model_seed(config) + state.epochs_done)
        steps = config["steps_per_epoch"] or int(np.ceil(len(data.train_idx) / config["batch_size"]))
        # Epoch e's order and augmentation depend on (seed, e) alone, so a resumed run draws what an
        # uninterrupted one would; one endless stream, of which each Keras epoch takes `steps` batches. A model
        # that augments itself gets the raw pixels, and counts its batches in a variable its checkpoint keeps.
        in_model = config.get("augment_on") == "model"
        train_ds = make_dataset(
            images=data.images,
            labels=data.labels,
            indices=data.train_idx,
            batch_size=config["batch_size"],
            shuffle=True,
            augment=False if in_model else config["augment"],
            dtype="uint8" if in_model else "float32",
            seed=model_seed(config),
            repeat=True,
            initial_epoch=state.epochs_done,
            steps_per_epoch=steps,
        )
        weights = {int(k): v for k, v in config["class_weight"].items()}
        model.fit(
            train_ds,
            epochs=config["epochs"],
            initial_epoch=state.epochs_done,
            steps_per_epoch=steps,
            class_weight=weights,
            callbacks=[loop],
            verbose=verbose,
            shuffle=False,
        )
    model.set_weights(loop.best_weights)
    return model, state


# --------------------------------------------------------------------------------------------------------------
# Step 3: threshold


def validation_probs(model: keras.Model, data: TrainingData) -> np.ndarray:
    """The model's IDC probabilities of the validation patches, ``(len(data.val_idx),)`` float32."""
    return predict_probs(model, data.images, indices=data.val_idx, batch_size=512)


#: The validation scores :func:`choose_threshold` records, in this order.
_VALIDATION_SCORES = (
    "roc_auc",
    "pr_auc",
    "f1",
    "balanced_accuracy",
    "accuracy",
    "precision",
    "recall",
    "confusion_matrix",
)


def choose_threshold(data: TrainingData, probs: np.ndarray) -> dict[str, Any]:
    """The threshold chosen on the validation patients' patches (:data:`THRESHOLD_RULE`) from their
    probabilities ``probs`` (aligned with ``data.val_idx``), and the validation metrics at it; test patients play
    no part.
    """
    y = data.labels[data.val_idx]
    threshold = pick_threshold(y, probs, THRESHOLD_RULE)
    scores = binary_scores(y, (probs >= threshold).astype(np.int64), probs)
    return {
        "threshold": threshold,
        "threshold_rule": f"maximise the IDC F1 on the validation patients' patches ({THRESHOLD_RULE})",
        "threshold_youden": pick_threshold(y, probs, "youden"),
        "validation": {
            "patients": len(data.patients["val"]),
            "patches": len(y),
            "idc_patches": int(y.sum()),
            "threshold": threshold,
            **{key: scores[key] for key in _VALIDATION_SCORES},
        },
    }


def choose_context(data: TrainingData, probs: np.ndarray) -> dict[str, Any]:
    """Slide-context parameters (smoothing width and their own threshold) chosen on the validation patients, as
    :func:`idc_helpers.context.fit_context` returns them (its default tunes on every validation patient: measured
    in docs/results.md, that transferred better than a fold's few whole slides); ``{"unavailable": reason}`` when
    they cannot be chosen (e.g. the validation patches hold one class only).
    """
    rows = data.frame.iloc[data.val_idx]
    table = pd.DataFrame(
        {
            "patient_id": rows["patient_id"].astype(str).to_numpy(),
            "x": rows["x"].to_numpy(),
            "y": rows["y"].to_numpy(),
            "label": data.labels[data.val_idx],
            "prob_idc": probs.astype(np.float64),
        }
    )
    try:
        return context.fit_context(table)
    except context.ContextError as exc:
        return {"unavailable": str(exc)}


# --------------------------------------------------------------------------------------------------------------
# The whole run


def _versions() -> dict[str, str]:
    import keras
    import sklearn
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "scikit-learn": sklearn.__version__,
        "idc_helpers": idc_helpers.__version__,
        "platform": platform.platform(),
    }


def _resolve_verbose(verbose: int | str) -> int:
    # A live progress bar on a terminal; one line per epoch in notebooks and logs (bars break nbval, bloat logs).
    if verbose == "auto":
        return 1 if sys.stdout.isatty() else 2
    return int(verbose)


def _run_config(args: Mapping[str, Any], data: TrainingData) -> dict[str, Any]:
    """``config.json``: the arguments (all a resume needs), the data and split, and the software."""
    from idc_helpers.models import DEFAULT_LEARNING_RATE

    model_name = _model_name(args["model_name"])
    batch_size = int(args["batch_size"] or DEFAULT_BATCH_SIZE)
    steps = args["steps_per_epoch"]
    if steps is not None and int(steps) < 1:
        raise TrainingDataError(f"steps_per_epoch must be at least 1, got {steps}")
    full_pass = int(np.ceil(len(data.train_idx) / batch_size))
    return {
        "model": model_name,
        "model_kwargs": dict(args["model_kwargs"] or {}),
        "synthetic": data.synthetic,
        "data": data.record,
        "split": {
            "name": args["split"],
            "seed": args["seed"],
            "unlisted": args["unlisted"],
            "test_patients_given": bool(args["test_patients"]),
            "patients": data.patients,
            "patches": data.record["patches"],
            "idc_patches": data.record["idc_patches"],
        },
        "max_patches": args["max_patches"],
        "seed": args["seed"],
        "model_seed": int(args["seed"] if args["model_seed"] is None else args["model_seed"]),
        "epochs": int(args["epochs"] or DEFAULT_EPOCHS),
        "batch_size": batch_size,
        # None: one pass over the training patches per epoch.
        "steps_per_epoch": int(steps) if steps is not None and int(steps) < full_pass else None,
        "learning_rate": float(args["learning_rate"] or DEFAULT_LEARNING_RATE.get(model_name, 1e-3)),
        "lr_schedule": "cosine decay to 5% over the planned epochs",
        "patience": int(args["patience"]),
        "label_smoothing": float(args["label_smoothing"]),
        "monitor": MONITOR,
        "selection_loss_weight": SELECTION_LOSS_WEIGHT,
        **_augmentation_config(args["augment"], args["model_kwargs"]),
        "class_weight": class_weights(data.labels[data.train_idx]),
        "threshold_rule": THRESHOLD_RULE,
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "versions": _versions(),
        "cpu_threads": os.cpu_count(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "arguments": {k: v for k, v in args.items() if k not in ("cache_dir", "verbose")},
    }


def _augmentation_config(augment: bool | str | None, model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """What ``config.json`` records of augmentation and arithmetic: the strength (``"augment"``, a name of
    :data:`idc_helpers.pipeline.AUGMENT_CHOICES`), where it runs (``"augment_on"``: ``"pipeline"`` or ``"model"``,
    None without augmentation) and the Keras dtype policy the model computes in (``"precision_policy"``).
    """
    from idc_helpers.models import augmentation_placement, precision_policy
    from idc_helpers.pipeline import augment_setting

    strength = augment_setting(augment)
    return {
        "augment": strength,
        "augment_on": augmentation_placement() if strength != "none" else None,
        "precision_policy": precision_policy((model_kwargs or {}).get("mixed_precision")),
    }


def _model_name(name: str | None) -> str:
    """The model to build (default :data:`idc_helpers.models.DEFAULT_MODEL`);
    :class:`idc_helpers.models.UnknownModelError` naming the known ones for a name that is not one of them.
    """
    from idc_helpers.models import DEFAULT_MODEL, MODEL_NAMES, UnknownModelError

    name = name or DEFAULT_MODEL
    if name not in MODEL_NAMES:
        raise UnknownModelError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)} (--model NAME)")
    return name


def _check_arguments(args: Mapping[str, Any]) -> None:
    """Every number of a new run, checked as on the command line, before any folder or cache entry is written."""
    for name in ("epochs", "batch_size", "max_patches", "steps_per_epoch", "model_seed", "learning_rate"):
        check_optional(name, args[name], f"train({name}=...)")
    for name in ("seed", "patience", "label_smoothing"):
        check_value(name, args[name], f"train({name}=...)")
    if args["test_patients"]:
        check_patient_ids(args["test_patients"], "train(test_patients=...)")


def _check_resumed_config(config: dict[str, Any], path: Path) -> None:
    """A resumed run's settings pass the checks of the command line (an edited config.json may not)."""
    from idc_helpers.models import MODEL_NAMES
    from idc_helpers.pipeline import AUGMENT_CHOICES

    check_run_config(config, str(path), models=MODEL_NAMES, augments=AUGMENT_CHOICES, splits=splits.SPLIT_NAMES)


def _raise_disk_full(exc: BaseException, out: Path, partial: Path | None) -> None:
    """Turn "no space left" into :class:`DiskFullError` saying what is kept: a resumable run, or nothing."""
    if not is_disk_full(exc):
        return
    then = (
        f"then continue with `python -m idc_helpers train --resume {out}` (its last checkpoint is in {partial})"
        if partial is not None
        else "then train again (nothing was kept: no epoch had finished)"
    )
    raise DiskFullError(f"the disk is full while writing the run {out}: free some space, {then}") from exc


def train(
    data_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    out_dir: str | os.PathLike[str],
    *,
    model_name: str | None = None,
    epochs: int | None = None,
    split: Literal["patients", "janowczyk2016"] = "patients",
    unlisted: Literal["train", "drop"] = "train",
    max_patches: int | None = None,
    seed: int = 0,
    model_seed: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    patience: int = DEFAULT_PATIENCE,
    augment: bool | str = "mild",
    cache_dir: str | os.PathLike[str] | None = None,
    test_patients: Sequence[str] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    label_smoothing: float = 0.0,
    steps_per_epoch: int | None = None,
    resume: bool = False,
    verbose: int | Literal["auto"] = "auto",
) -> TrainResult:
    """Train a model on the dataset in ``data_dir`` and write the run folder ``out_dir``.

    Args:
        data_dir: dataset folder in the Kaggle layout, or a list of them (one index over all; a patient id is
            one patient wherever its files are); ``None`` resolves it with
            :func:`idc_helpers.datasource.resolve_data_dir` (``IDC_DATA_DIR``, ``./data``, Kaggle, demo).
        out_dir: the run folder to create; must not exist or be empty (:class:`~idc_helpers.run.RunExistsError`).
        model_name: one of :data:`idc_helpers.models.MODEL_NAMES` (default :data:`~idc_helpers.models.DEFAULT_MODEL`).
        epochs: maximum epochs (early stopping on validation patients; default :data:`DEFAULT_EPOCHS`).
        split: ``"patients"`` (seeded, stratified by IDC share) or ``"janowczyk2016"`` (published).
        unlisted: with ``janowczyk2016``, patients outside the published lists go to ``"train"`` or are ``"drop"``ped.
        max_patches: use at most this many patches, the same share from every patient (quick runs).
        seed: one seed for the split, the subsample, initialisation, shuffling and augmentation.
        model_seed: another seed for the initialisation, shuffling and augmentation alone (default: ``seed``):
            runs that differ only in it train on the same patients, e.g. the members of a seed ensemble.
        batch_size: patches per step (default :data:`DEFAULT_BATCH_SIZE`).
        learning_rate: Adam's initial rate, decayed along a cosine (default per model).
        patience: epochs without a better :data:`MONITOR` before stopping.
        augment: random flips/rotations and stain jitter of the training batches: ``"mild"`` (``True``, the
            default), ``"light"``, ``"strong"``, ``"geometry"`` (flips/rotations only) or ``"none"`` (``False``);
            see :data:`idc_helpers.pipeline.AUGMENT_STRENGTHS`. Where it runs:
            :func:`idc_helpers.models.augmentation_placement` (``IDC_AUGMENT_ON``).
        cache_dir: decoded-patch cache (default ``$IDC_CACHE_DIR`` or ``~/.cache/idc_helpers``).
        test_patients: patient ids to hold out as the test subset (the rest is split into train/validation).
        model_kwargs: extra arguments of the model builder.
        label_smoothing: smooth the training targets to ``(1 - eps) * one_hot + eps / 2`` (0, the default: plain
            cross-entropy); see :class:`idc_helpers.models.SmoothedSparseCrossentropy`.
        steps_per_epoch: at most this many batches per epoch, the first ones of that epoch's shuffled order
            (benchmarks and quick checks on a large set); default: one pass over the training patches.
        resume: continue the interrupted run of ``out_dir`` (its arguments are read back from the run; of the
            arguments here only ``data_dir``, where the data has moved, ``cache_dir`` and ``verbose`` count).
        verbose: 0 silent, 1 progress bar, 2 one line per epoch, ``"auto"``: 1 on a terminal, else 2.

    Returns:
        :class:`TrainResult` with the run folder, the best model and the JSON contents.

    Same data, arguments and seed give the same split and subsample, and on a CPU the same weights, with or
    without an interruption and ``resume`` in between.
    """
    args = {k: v for k, v in locals().items() if k not in ("data_dir", "out_dir", "resume")}
    verbose = _resolve_verbose(verbose)
    say = print if verbose else (lambda *a, **k: None)
    if resume:
        return _resume(data_dir, out_dir, cache_dir=cache_dir, verbose=verbose, say=say)
    return _start(data_dir, out_dir, args, verbose=verbose, say=say)


def _start(data_dir, out_dir, args: dict[str, Any], *, verbose: int, say) -> TrainResult:
    """A new run of ``train``'s arguments ``args`` into ``out_dir``: its config first, then the training."""
    _check_arguments(args)
    out = check_new_run_dir(out_dir)
    _model_name(args["model_name"])  # typos are reported before the data is read
    _augmentation_config(args["augment"], args["model_kwargs"])
    from idc_helpers.models import label_smoothing_setting  # models imports keras: only where it is needed

    args["label_smoothing"] = label_smoothing_setting(args["label_smoothing"])
    test_patients = args["test_patients"] = list(args["test_patients"]) if args["test_patients"] else None
    folders = list(data_dir) if isinstance(data_dir, (list, tuple)) else [data_dir]
    args["data_dirs"] = [None if d is None else str(d) for d in folders]
    data = prepare_data(
        folders,
        split=args["split"],
        seed=args["seed"],
        test_patients=test_patients,
        unlisted=args["unlisted"],
        max_patches=args["max_patches"],
        cache_dir=args["cache_dir"],
        say=say,
    )
    config = _run_config(args, data)
    partial = partial_dir(out)
    try:
        partial.mkdir(parents=True)
    except FileExistsError:  # another train started on the same folder while this one read the data
        raise RunBusyError(busy_message(out, run_writer(partial))) from None
    except OSError as exc:
        _raise_disk_full(exc, out, None)
        raise
    try:
        write_json(partial / CONFIG_FILE, config)
    except BaseException as exc:
        discard_partial(partial)  # no config: nothing a resume could continue, and nothing may block the next run
        _raise_disk_full(exc, out, None)
        raise
    return _train_in(partial, out, config, data, resumed=False, verbose=verbose, say=say)


def _resume(data_dir, out_dir, *, cache_dir, verbose: int, say) -> TrainResult:
    out = run_path(out_dir)
    partial = partial_dir(out)
    if (out / CONFIG_FILE).is_file():
        raise RunExistsError(f"{out} is a finished run; runs are never overwritten. Train a new one with --out.")
    if not has_interrupted_run(out):
        raise RunFolderError(
            f"No interrupted run of {out} to resume: {partial / CONFIG_FILE} does not exist. "
            "Start a new run with `python -m idc_helpers train --out RUN_DIR`."
        )
    config = read_json(partial / CONFIG_FILE)
    _check_resumed_config(config, partial / CONFIG_FILE)
    args = config["arguments"]
    folders = (list(data_dir) if isinstance(data_dir, (list, tuple)) else [data_dir]) if data_dir else args["data_dirs"]
    data = prepare_data(
        folders,
        split=args["split"],
        seed=args["seed"],
        test_patients=args["test_patients"],
        unlisted=args["unlisted"],
        max_patches=args["max_patches"],
        cache_dir=cache_dir,
        say=say,
    )
    if data.patients != config["split"]["patients"]:
        raise TrainingDataError(
            f"the data in {', '.join(map(str, folders))} does not give the patient split the "
            f"interrupted run {out} was started with; resume it on the same data."
        )
    return _train_in(partial, out, config, data, resumed=True, verbose=verbose, say=say)


def _train_in(
    partial: Path, out: Path, config: dict[str, Any], data: TrainingData, *, resumed: bool, verbose: int, say
) -> TrainResult:
    """Fit (from the last checkpoint when ``resumed``), choose the threshold and publish the run."""
    with claim_run(partial, out):
        try:
            model, state = _fit_from_checkpoint(partial, out, config, data, resumed=resumed, verbose=verbose, say=say)
        except BaseException as exc:
            resumable = resumed or (partial / CHECKPOINT_STATE_FILE).is_file()
            if not resumable:
                discard_partial(partial)  # nothing to resume from (a resumed run keeps its config: it can resume)
            _raise_disk_full(exc, out, partial if resumable else None)
            if resumable and not isinstance(exc, IdcError):  # an IdcError's own message says what to do
                print(
                    f"Training stopped; its last end-of-epoch checkpoint is in {partial}: continue with "
                    f"`python -m idc_helpers train --resume {out}` (or delete that folder).",
                    file=sys.stderr,
                )
            raise
        try:
            return _finish(partial, out, config, data, model, state, say=say)
        except BaseException as exc:
            _raise_disk_full(exc, out, partial)
            raise


def _fit_from_checkpoint(
    partial: Path, out: Path, config: dict[str, Any], data: TrainingData, *, resumed: bool, verbose: int, say
) -> tuple[keras.Model, LoopState]:
    """Build the model (or load the last checkpoint when ``resumed``) and fit it to the end."""
    checkpoint = load_checkpoint(partial) if resumed else None
    if checkpoint is None:
        model, best_weights, state = build_and_compile(config, len(data.train_idx)), None, None
    else:
        model, best_weights, state = checkpoint
        say(f"Resuming {out} after epoch {state.epochs_done} of {config['epochs']}.")
    if state is None:
        say(
            f"Training {config['model']} ({model.count_params():,} parameters) on {len(data.train_idx):,} "
            f"patches of {len(data.patients['train'])} patients; validation {len(data.val_idx):,} patches of "
            f"{len(data.patients['val'])} patients; test patients held out: {len(data.patients['test'])}."
        )
    return fit(model, data, config, partial, state, best_weights, verbose=verbose)


def _finish(
    partial: Path, out: Path, config: dict[str, Any], data: TrainingData, model: keras.Model, state: LoopState, *, say
) -> TrainResult:
    """Choose the threshold on the validation patients, write the run files and publish the run."""
    probs = validation_probs(model, data)
    metrics = {**choose_threshold(data, probs), "context": choose_context(data, probs)}
    metrics.update(
        {
            "synthetic": data.synthetic,
            "best_epoch": state.best_epoch,
            "epochs_run": state.epochs_done,
            "monitor": MONITOR,
            "train_seconds": round(state.seconds, 1),
            "seconds_per_epoch": round(state.seconds / max(state.epochs_done, 1), 1),
        }
    )
    config = {**config, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_run_files(partial, model, state.history, config, metrics)
    (partial / LOCK_FILE).unlink(missing_ok=True)
    publish_run(partial, out)
    say(
        f"Best epoch {metrics['best_epoch']} of {metrics['epochs_run']}: validation ROC AUC "
        f"{metrics['validation']['roc_auc']:.3f}, F1 {metrics['validation']['f1']:.3f} at threshold "
        f"{metrics['threshold']:.3f}. Run saved to {out} ({state.seconds:.0f} s of training)."
    )
    return TrainResult(run_dir=out, model=model, history=state.history, config=config, metrics=metrics)
