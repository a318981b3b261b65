"""The run folder: what ``train`` writes and everything downstream reads.

A finished run folder ``RUN_DIR`` holds :data:`RUN_FILES`:

- ``model.keras``: the best epoch's model (Keras 3 format); it takes raw 0..255 patches;
- ``history.json``: per-epoch ``loss``, ``accuracy``, ``val_loss``, ``val_auc``, ``val_pr_auc``, ``val_f1``,
  ``val_balanced_accuracy``, ``val_selection``, ``lr``, ``seconds``, ``epoch``;
- ``config.json``: what is needed to reproduce (and resume) the run: data folders, split and patient lists,
  seed, model, epochs, batch size, learning rate, software versions, start time;
- ``metrics.json``: ``threshold`` and how it was chosen, ``best_epoch``, ``epochs_run``, ``train_seconds`` and
  ``validation`` (metrics of the validation patients at ``threshold``).

While training, the run is built in the hidden folder :func:`partial_dir` beside ``RUN_DIR``
(``.<name>.partial``), which holds ``config.json`` from the start and, after every epoch, a checkpoint
(:data:`CHECKPOINT_STATE_FILE` and the files it names) from which ``train --resume RUN_DIR`` continues. Only a
finished run is renamed to ``RUN_DIR``, so a folder that looks complete always is, and a finished run is never
overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idc_helpers.atomic import atomic_path, existing_parent, install_dir, write_json
from idc_helpers.errors import UserError
from idc_helpers.locks import file_lock, lock_holder
from idc_helpers.model_file import load_model_file

if TYPE_CHECKING:  # TensorFlow loads only when a model is read
    import keras

MODEL_FILE = "model.keras"
HISTORY_FILE = "history.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
RUN_FILES = (MODEL_FILE, HISTORY_FILE, CONFIG_FILE, METRICS_FILE)
# The end-of-epoch checkpoint of a partial run: the model with its optimizer state and the best epoch's weights
# so far (file names carry the epoch), and the loop's own state naming them (epochs done, history, early-stopping
# counters), written last so that a kill at any moment leaves a consistent checkpoint.
CHECKPOINT_STATE_FILE = "checkpoint.json"
CHECKPOINT_PREFIXES = ("checkpoint-", "best-")


_CHECKPOINT_NAME = {
    "model": re.compile(r"checkpoint-[0-9]{3,6}\.keras"),
    "best": re.compile(r"best-[0-9]{3,6}\.weights\.h5"),
}


def checkpoint_names(epoch: int) -> dict[str, str]:
    """File names of the checkpoint written after ``epoch`` (1-based): ``{"model": ..., "best": ...}``."""
    return {"model": f"checkpoint-{epoch:03d}.keras", "best": f"best-{epoch:03d}.weights.h5"}


def checkpoint_file(folder: Path, state: dict[str, Any], kind: str) -> Path:
    """The checkpoint file of ``kind`` (``"model"`` or ``"best"``) that a checkpoint state names.

    Only a plain name of the form :func:`checkpoint_names` writes, of a regular file inside ``folder``; anything
    else (a path, a link, another name) raises :class:`RunFolderError`, so an edited ``checkpoint.json`` reads
    nothing else.
    """
    name = state.get(kind)
    state_file = folder / CHECKPOINT_STATE_FILE
    if not isinstance(name, str) or not _CHECKPOINT_NAME[kind].fullmatch(name):
        raise RunFolderError(
            f"{state_file} names {name!r} as its {kind} file, not a checkpoint file name like "
            f"{checkpoint_names(1)[kind]!r}; the checkpoint is damaged: delete {folder} and train again."
        )
    path = folder / name
    if path.is_symlink() or not path.is_file():
        raise RunFolderError(
            f"{path}, named by {state_file}, is missing or not a regular file; the checkpoint is "
            f"damaged: delete {folder} and train again."
        )
    return path


class RunExistsError(UserError, FileExistsError):
    """The run folder already exists (or an interrupted run of it does); runs are never overwritten."""


class RunBusyError(RunExistsError):
    """Another live ``train`` process is writing the same run folder."""


class RunFolderError(UserError, FileNotFoundError):
    """A run folder is missing, incomplete, or not a run folder."""


@dataclass
class Run:
    """A trained run: the model, its config, metrics and history, and the decision threshold.

    :func:`idc_helpers.training.train` returns one for the run it wrote, :func:`load_run` for a run folder (or a
    bare model file: no run folder, no config, threshold 0.5). ``history`` is ``history.json``: per-epoch values
    by name.
    """

    run_dir: Path | None
    model: keras.Model
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    threshold: float = 0.5
    history: dict[str, list[float]] = field(default_factory=dict)

    @property
    def split(self) -> dict[str, list[str]]:
        """Patient ids per subset (``train``, ``val``, ``test``), as stored in ``config.json``."""
        return dict(self.config.get("split", {}).get("patients", {}))


def run_path(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir`` as an absolute path, a symbolic link followed to the folder it names.

    A link (a folder on another disk, on Drive) is followed so that the run is built beside that folder and renamed
    into it.
    """
    path = Path(os.path.abspath(Path(run_dir).expanduser()))
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def partial_dir(run_dir: str | os.PathLike[str]) -> Path:
    """The hidden folder ``.<name>.partial`` beside ``run_dir`` (a link followed): the run's building site.

    The run is built and checkpointed there, and renamed to ``run_dir`` once finished.
    """
    run_dir = run_path(run_dir)
    return run_dir.parent / f".{run_dir.name}.partial"


def has_interrupted_run(run_dir: str | os.PathLike[str]) -> bool:
    """True when an interrupted run of ``run_dir`` waits in its :func:`partial_dir`.

    ``train --resume`` continues it; it may hold no checkpoint yet, when it was killed during its first epoch.
    """
    return (partial_dir(run_dir) / CONFIG_FILE).is_file()


LOCK_FILE = ".lock"


def run_writer(partial: Path) -> int | None:
    """The process id of the ``train`` writing the partial run ``partial`` right now, or None.

    The writer holds the lock of :func:`claim_run`; None when no live process does (an interrupted run, or a file
    system without locks), ``0`` when the holder recorded no pid.
    """
    return lock_holder(partial / LOCK_FILE)


@contextlib.contextmanager
def claim_run(partial: Path, run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the partial run ``partial`` for the ``with`` block (its lock file names this process).

    Two processes never train into the same partial run: :class:`RunBusyError` naming the other one's pid.
    """
    with file_lock(partial / LOCK_FILE, blocking=False, record_pid=True) as held:
        # None: a file system without locks (some network mounts); the partial folder's mkdir still guards it.
        if held is False:
            raise RunBusyError(busy_message(run_dir, run_writer(partial)))
        yield


def busy_message(run_dir: Path, pid: int | None) -> str:
    """What a second ``train`` on ``run_dir`` is told while the process ``pid`` (when known) writes it."""
    who = f" (pid {pid})" if pid else ""
    return f"another train is writing {run_dir}{who}; wait for it to finish, or choose another --out for a new run."


def check_new_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Return ``run_dir`` as an absolute path, checked to be a new run folder that can be created.

    Raises :class:`RunExistsError` when it exists and is not empty, or when an interrupted run of it waits in its
    :func:`partial_dir` (:class:`RunBusyError` when a live ``train`` writes it), :class:`RunFolderError` when it
    cannot be created.
    """
    _check_link(Path(os.path.abspath(Path(run_dir).expanduser())))
    out = run_path(run_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunExistsError(
            f"Run folder {out} already exists and is not empty; runs are never overwritten. "
            "Choose a new --out folder (or delete this one yourself if you no longer need it)."
        )
    partial = partial_dir(out)
    writer = run_writer(partial)
    if writer is not None:
        raise RunBusyError(busy_message(out, writer))
    if partial.exists():
        raise RunExistsError(
            f"An interrupted run of {out} is in {partial}: resume with "
            f"`python -m idc_helpers train --resume {out}` or delete {partial}."
        )
    parent = existing_parent(out)  # the missing folders below it are created
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise RunFolderError(
            f"Cannot create the run folder {out}: {parent} is not a folder you can write to; choose another --out."
        )
    return out


def _check_link(path: Path) -> None:
    """Refuse a symbolic link given as the run folder unless it names a folder.

    :class:`RunFolderError` for a dangling link or a link to a file, before any work.
    """
    if not path.is_symlink():
        return
    target = Path(os.path.realpath(path))
    if not target.exists():
        raise RunFolderError(
            f"--out {path} is a symbolic link to {target}, which does not exist; create that folder "
            "first or choose another --out."
        )
    if not target.is_dir():
        raise RunFolderError(
            f"--out {path} is a symbolic link to the file {target}, not to a folder; choose another --out."
        )


def write_run_files(
    folder: Path, model: keras.Model, history: dict[str, Any], config: dict[str, Any], metrics: dict[str, Any]
) -> None:
    """Write the four :data:`RUN_FILES` into ``folder`` (each one atomically)."""
    with atomic_path(folder / MODEL_FILE, suffix=".keras") as tmp:  # Keras wants the suffix
        model.save(tmp)
    write_json(folder / HISTORY_FILE, history)
    write_json(folder / CONFIG_FILE, config)
    write_json(folder / METRICS_FILE, metrics)


def publish_run(partial: Path, run_dir: Path) -> None:
    """Drop the checkpoint files of the finished run in ``partial`` and rename it to ``run_dir``."""
    # Re-check at the end: another process may have created the folder while we trained.
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunExistsError(f"Run folder {run_dir} appeared while training; the finished run stays in {partial}.")
    for path in partial.iterdir():
        if path.name == CHECKPOINT_STATE_FILE or path.name.startswith(CHECKPOINT_PREFIXES):
            path.unlink()
    partial.chmod(0o755)  # a run folder is shared like any output
    install_dir(partial, run_dir)


def discard_partial(partial: Path) -> None:
    """Remove a partial run folder (a run that failed before its first checkpoint: nothing to resume)."""
    shutil.rmtree(partial, ignore_errors=True)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of a run folder; :class:`RunFolderError` naming it when it is missing or unreadable."""
    if not path.is_file():
        raise RunFolderError(f"{path} is missing: the run folder {path.parent} is incomplete; train it again.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path} cannot be read ({exc}); the run folder {path.parent} is damaged.") from None


def load_run(run_dir: str | os.PathLike[str], *, compile: bool = False) -> Run:
    """Load a run folder written by ``train`` (or a bare ``.keras`` file: no split, threshold 0.5).

    Raises :class:`RunFolderError` naming the missing file (and the way to resume an interrupted run).
    """
    path = Path(run_dir).expanduser()
    if path.is_file() and path.suffix == ".keras":
        if path.name == MODEL_FILE and all((path.parent / name).is_file() for name in RUN_FILES):
            path = path.parent  # the model of a run folder: use the run's threshold and split too
        else:
            return Run(run_dir=None, model=load_model_file(path, compile=compile))
    model_path = path / MODEL_FILE
    if not model_path.is_file():
        partial = partial_dir(path)
        hint = (
            f"its interrupted run is in {partial}; finish it with `python -m idc_helpers train --resume {path}`"
            if has_interrupted_run(path)
            else "write one with `python -m idc_helpers train --out RUN_DIR`"
        )
        raise RunFolderError(f"No trained model at {model_path}: {path} is not a finished run folder; {hint}.")
    config = read_json(path / CONFIG_FILE)
    metrics = read_json(path / METRICS_FILE)
    history = read_json(path / HISTORY_FILE) if (path / HISTORY_FILE).is_file() else {}
    model = load_model_file(model_path, compile=compile)
    return Run(
        run_dir=Path(os.path.abspath(path)),
        model=model,
        config=config,
        metrics=metrics,
        threshold=float(metrics.get("threshold", 0.5)),
        history=history,
    )
