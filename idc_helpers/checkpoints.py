"""The end-of-epoch step of training and its checkpoint, from which an interrupted run resumes to the same result.

After every epoch the callback of :func:`make_loop_callback` scores the validation patients
(:func:`idc_helpers.selection.validation_scores`), keeps the best epoch's weights (and, with ``averaging="none"``,
stops early), and writes a checkpoint into the partial run folder (:func:`save_checkpoint`): the model with its
optimizer state, the best weights so far, and the loop's own state (:class:`LoopState`), naming the other two and
written last, so that a kill at any moment leaves the previous checkpoint intact. :func:`load_checkpoint` reads it
back. The file names and the folder are :mod:`idc_helpers.run_folder`'s.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from idc_helpers.atomic import atomic_path, write_json
from idc_helpers.model_file import load_model_file
from idc_helpers.run_folder import (
    CHECKPOINT_PREFIXES,
    CHECKPOINT_STATE_FILE,
    RunFolderError,
    checkpoint_file,
    checkpoint_names,
    read_json,
)
from idc_helpers.selection import MONITOR, validation_probs, validation_scores
from idc_helpers.training_data import TrainingData

if TYPE_CHECKING:  # TensorFlow is imported only when a function needs it
    import keras


@dataclass
class LoopState:
    """What the training loop carries from epoch to epoch, saved in every checkpoint.

    The epochs done, the history so far, the best epoch (1-based) and its :data:`~idc_helpers.selection.MONITOR`
    value, the epochs since it, whether training stopped, and the seconds spent training.
    """

    epochs_done: int = 0
    history: dict[str, list[float]] | None = None
    best_epoch: int = 0
    best_value: float = -np.inf
    wait: int = 0
    stopped: bool = False
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The state as JSON values (no best value yet: None)."""
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
        """The state that :meth:`to_json` wrote (a checkpoint without ``seconds``: 0)."""
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


def make_loop_callback(data: TrainingData, folder: Path, state: LoopState, patience: int) -> keras.callbacks.Callback:
    """The Keras callback that runs the end of every epoch, updating ``state``.

    It scores the epoch on the validation patients of ``data``, tracks the best epoch (its weights in the
    callback's ``best_weights``), stops after ``patience`` epochs without a better
    :data:`~idc_helpers.selection.MONITOR`, and writes the end-of-epoch checkpoint into the partial run ``folder``.
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
            logs.update(validation_scores(data.labels[data.val_idx], validation_probs(self.model, data)))
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
    """Write the end-of-epoch checkpoint into the partial run ``folder``, and drop the previous epoch's.

    The model with its optimizer state, the best weights so far (None: the model's), then the loop state naming
    both, written last so that a kill at any moment leaves the previous checkpoint intact.
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
    """The last checkpoint of the partial run ``folder``: the model, the best weights, the loop state.

    The model is compiled, with its optimizer state; None when the run was interrupted before its first epoch
    ended.
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
