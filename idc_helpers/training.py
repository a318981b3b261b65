"""Training with a patient-level split, written to a self-describing run folder (see :mod:`idc_helpers.run_folder`).

``train(data_dir, out_dir)`` and ``python -m idc_helpers train --data-dir DIR --out RUN_DIR`` do the same, in
four named steps:

1. :func:`idc_helpers.training_data.prepare_data`: index the dataset folder(s), split by *patient* (``patients``:
   seeded and stratified 70/15/15; ``janowczyk2016``: the published split), optionally hold out given test
   patients, optionally subsample (``max_patches``, the same share from every patient), and decode the train and
   validation patches only (cached on disk): training never reads a test patient's file;
2. :func:`fit`: train with augmentation (in the input pipeline on a CPU, inside the model on a GPU: see
   :func:`idc_helpers.models.augmentation_placement`), class weights from the training patches (or, with
   ``weighting="patient"``, :func:`idc_helpers.training_data.loss_weights`), Adam with a cosine
   learning-rate decay over every planned epoch, and a moving average of the weights as the final ones (or, with
   ``averaging="none"``, early stopping on the validation patients, :data:`idc_helpers.selection.MONITOR`, keeping
   the best epoch's weights); a checkpoint after every epoch (:mod:`idc_helpers.checkpoints`) makes the run
   resumable (``train(..., resume=True)``, ``train --resume RUN_DIR``) to the same result;
3. :func:`idc_helpers.selection.choose_threshold`: the decision threshold that maximises the balanced accuracy
   (Youden's J) on the validation patients (the one maximising the IDC F1 is stored beside it), and the
   validation metrics at it; :func:`idc_helpers.selection.choose_context`: the slide-context smoothing and its own
   threshold, on the validation patients, stored under ``"context"`` for ``predict --context``;
4. :func:`idc_helpers.run_folder.write_run_files` and :func:`idc_helpers.run_folder.publish_run`: the run folder
   appears only when complete.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from idc_helpers.atomic import write_json
from idc_helpers.checkpoints import LoopState, load_checkpoint, make_loop_callback
from idc_helpers.errors import DiskFullError, IdcError, is_disk_full
from idc_helpers.run_config import (
    DEFAULT_PATIENCE,
    augmentation_config,
    check_arguments,
    check_resumed_config,
    resolve_model_name,
    run_config,
)
from idc_helpers.run_folder import (
    CHECKPOINT_STATE_FILE,
    CONFIG_FILE,
    LOCK_FILE,
    Run,
    RunBusyError,
    RunExistsError,
    RunFolderError,
    busy_message,
    check_new_run_dir,
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
from idc_helpers.selection import MONITOR, choose_context, choose_threshold, validation_probs
from idc_helpers.splits import TrainingDataError
from idc_helpers.training_data import TrainingData, loss_weights, prepare_data

if TYPE_CHECKING:  # TensorFlow is imported only when a function needs it
    import keras


def model_seed(config: Mapping[str, Any]) -> int:
    """The seed of a run's initialisation, batch order and augmentation.

    It is ``config["model_seed"]``, or the split seed for runs written before the two could differ.
    """
    return int(config.get("model_seed", config["seed"]))


def build_and_compile(config: Mapping[str, Any], n_train: int) -> keras.Model:
    """The model of ``config`` (seeded), compiled with Adam and a cosine decay to 5% over the planned epochs.

    The decay spans the planned epochs of ``n_train`` patches each (or ``steps_per_epoch`` batches): large steps
    early, fine ones at the end, which the moving average (or early stopping) keeps.
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
    return compile_model(
        model,
        learning_rate=schedule,
        label_smoothing=float(config.get("label_smoothing", 0.0)),
        ema_momentum=config["ema_momentum"] if averages(config) else None,
    )


def averages(config: Mapping[str, Any]) -> bool:
    """True when the run of ``config`` ends on averaged weights (``"averaging": "ema"``) instead of its best epoch."""
    return config.get("averaging", "none") == "ema"


def finish_averaging(model: keras.Model, data: TrainingData, config: Mapping[str, Any]) -> None:
    """Write the optimizer's moving average into ``model`` and recompute its batch-norm statistics.

    The statistics come from ``config["bn_batches"]`` batches of the training patches, shuffled by the model seed
    and not augmented in the pipeline (a model that augments itself still does, as in training). Both steps give
    the same weights when repeated, so a run resumed after its last epoch finishes as an uninterrupted one.
    """
    from idc_helpers.models import recompute_batch_norm
    from idc_helpers.pipeline import make_dataset

    model.optimizer.finalize_variable_values(model.trainable_variables)
    batches = make_dataset(
        images=data.images,
        labels=data.labels,
        indices=data.train_idx,
        batch_size=config["batch_size"],
        shuffle=True,
        augment=False,
        dtype="uint8" if config.get("augment_on") == "model" else "float32",
        seed=model_seed(config),
    )
    recompute_batch_norm(model, batches, max_batches=int(config["bn_batches"]))


def fit(
    model: keras.Model,
    data: TrainingData,
    config: Mapping[str, Any],
    folder: Path,
    state: LoopState | None = None,
    best_weights: list[np.ndarray] | None = None,
    verbose: int = 2,
) -> tuple[keras.Model, LoopState]:
    """Train from ``state`` (a fresh run: None) to the end or to early stopping, checkpointing into ``folder``.

    Returns the model and the final loop state. The model holds the best epoch's weights, or, for a run that
    :func:`averages`, the moving average of its weights over the whole schedule (no early stopping), with
    batch-norm statistics recomputed (:func:`finish_averaging`).
    """
    import keras

    from idc_helpers.pipeline import make_dataset

    state = state or LoopState()
    # An averaged run trains to the end of its schedule: the patience never runs out.
    patience = config["epochs"] + 1 if averages(config) else config["patience"]
    loop = make_loop_callback(data, folder, state, patience)
    loop.best_weights = best_weights
    if not state.stopped and state.epochs_done < config["epochs"]:
        keras.utils.set_random_seed(model_seed(config) + state.epochs_done)
        steps = config["steps_per_epoch"] or int(np.ceil(len(data.train_idx) / config["batch_size"]))
        # Epoch e's order and augmentation depend on (seed, e) alone, so a resumed run draws what an
        # uninterrupted one would; one endless stream, of which each Keras epoch takes `steps` batches. A model
        # that augments itself gets the raw pixels, and counts its batches in a variable its checkpoint keeps.
        in_model = config.get("augment_on") == "model"
        by_patient = config.get("weighting", "patch") == "patient"  # runs before the key weighed patches
        sample_weights = None
        if by_patient:  # one weight per image row; the validation rows' are never drawn
            sample_weights = np.zeros(len(data.images), dtype=np.float32)
            patients = data.frame["patient_id"].to_numpy()[data.train_idx]
            sample_weights[data.train_idx] = loss_weights(data.labels[data.train_idx], patients)
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
            weights=sample_weights,
        )
        weights = None if by_patient else {int(k): v for k, v in config["class_weight"].items()}
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
    if averages(config):
        finish_averaging(model, data, config)
    else:
        model.set_weights(loop.best_weights)
    return model, state


# --------------------------------------------------------------------------------------------------------------
# The whole run


def _resolve_verbose(verbose: int | str) -> int:
    # A live progress bar on a terminal; one line per epoch in notebooks and logs (bars break nbval, bloat logs).
    if verbose == "auto":
        return 1 if sys.stdout.isatty() else 2
    return int(verbose)


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
    averaging: Literal["none", "ema"] | None = None,
    weighting: Literal["patch", "patient"] = "patch",
    steps_per_epoch: int | None = None,
    resume: bool = False,
    verbose: int | Literal["auto"] = "auto",
) -> Run:
    """Train a model on the dataset in ``data_dir`` and write the run folder ``out_dir``; returns the run.

    ``data_dir`` is a dataset folder in the Kaggle layout, or a list of them (one index over all; a patient id is
    one patient wherever its files are); ``None`` resolves it with :func:`idc_helpers.datasource.resolve_data_dir`
    (``IDC_DATA_DIR``, ``./data``, Kaggle, demo). ``out_dir`` is the run folder to create; it must not exist or be
    empty (:class:`~idc_helpers.run_folder.RunExistsError`).

    The model is ``model_name``, one of :data:`idc_helpers.models.MODEL_NAMES` (default
    :data:`~idc_helpers.models.DEFAULT_MODEL`), with ``model_kwargs``, extra arguments of the model builder. It trains
    for ``epochs`` (default :data:`idc_helpers.run_config.DEFAULT_EPOCHS`; with ``averaging="none"`` at most that many,
    stopping early after ``patience`` epochs without a better :data:`idc_helpers.selection.MONITOR` on the validation
    patients), with ``batch_size`` patches per step (default :data:`idc_helpers.run_config.DEFAULT_BATCH_SIZE`) and Adam
    starting at ``learning_rate`` (default per model), decayed along a cosine. ``steps_per_epoch`` caps an epoch at that
    many batches, the first ones of that epoch's shuffled order (benchmarks and quick checks on a large set; default:
    one pass over the training patches).

    ``split`` is ``"patients"`` (seeded, stratified by IDC share) or ``"janowczyk2016"`` (published); with the
    latter, patients outside the published lists go to ``"train"`` or are ``"drop"``ped (``unlisted``).
    ``test_patients`` holds out those patient ids as the test subset (the rest is split into train and
    validation). ``max_patches`` uses at most this many patches, the same share from every patient (quick runs).
    ``seed`` is the one seed for the split, the subsample, initialisation, shuffling and augmentation;
    ``model_seed`` another seed for the initialisation, shuffling and augmentation alone (default: ``seed``): runs
    that differ only in it train on the same patients, e.g. the members of a seed ensemble.

    ``augment`` sets the random flips/rotations and stain jitter of the training batches: ``"mild"`` (``True``, the
    default), ``"light"``, ``"strong"``, ``"geometry"`` (flips/rotations only) or ``"none"`` (``False``); see
    :data:`idc_helpers.pipeline.AUGMENT_STRENGTHS`; where it runs: :func:`idc_helpers.models.augmentation_placement`
    (``IDC_AUGMENT_ON``). ``label_smoothing`` smooths the training targets to ``(1 - eps) * one_hot + eps / 2`` (0, the
    default: plain cross-entropy); see :class:`idc_helpers.models.SmoothedSparseCrossentropy`. ``averaging`` makes the
    final weights: ``"ema"`` (None: :data:`idc_helpers.run_config.DEFAULT_AVERAGING`, this one) trains every planned
    epoch and keeps an exponential moving average of the weights (:func:`idc_helpers.run_config.ema_momentum`), with
    batch-norm statistics recomputed on training batches (see :func:`fit`); ``"none"`` keeps the best validation
    epoch's. ``weighting``: every training patch weighs alike within its class (``"patch"``, the default) or each
    patient's patches share one total before the classes are balanced (``"patient"``;
    :func:`idc_helpers.training_data.loss_weights`; the training loss is then that weighted one).

    ``cache_dir`` is the decoded-patch cache (default ``$IDC_CACHE_DIR`` or ``~/.cache/idc_helpers``). ``resume``
    continues the interrupted run of ``out_dir``: its arguments are read back from the run, and of the arguments
    here only ``data_dir`` (where the data has moved), ``cache_dir`` and ``verbose`` count. ``verbose``: 0 silent,
    1 progress bar, 2 one line per epoch, ``"auto"``: 1 on a terminal, else 2.

    The :class:`~idc_helpers.run_folder.Run` returned holds the run folder, the final model, the history and the JSON
    contents, as :func:`idc_helpers.run_folder.load_run` gives them back later. Same data, arguments and seed give the
    same split and subsample, and on a CPU the same weights, with or without an interruption and ``resume`` in
    between.
    """
    args = {k: v for k, v in locals().items() if k not in ("data_dir", "out_dir", "resume")}
    verbose = _resolve_verbose(verbose)
    say = print if verbose else (lambda *a, **k: None)
    if resume:
        return _resume(data_dir, out_dir, cache_dir=cache_dir, verbose=verbose, say=say)
    return _start(data_dir, out_dir, args, verbose=verbose, say=say)


def _start(data_dir, out_dir, args: dict[str, Any], *, verbose: int, say) -> Run:
    """A new run of ``train``'s arguments ``args`` into ``out_dir``: its config first, then the training."""
    check_arguments(args)
    out = check_new_run_dir(out_dir)
    name = resolve_model_name(args["model_name"])  # typos are reported before the data is read
    from idc_helpers.models import check_model_kwargs, label_smoothing_setting  # models imports keras: only here

    check_model_kwargs(name, dict(args["model_kwargs"] or {}), "train(model_kwargs=...)")
    augmentation_config(args["augment"], args["model_kwargs"])

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
    config = run_config(args, data)
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


def _resume(data_dir, out_dir, *, cache_dir, verbose: int, say) -> Run:
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
    check_resumed_config(config, partial / CONFIG_FILE)
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
) -> Run:
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
) -> Run:
    """Choose the threshold on the validation patients, write the run files and publish the run."""
    probs = validation_probs(model, data)
    chosen = choose_threshold(data, probs)
    metrics = {**chosen, "context": choose_context(data, probs, chosen["threshold"])}
    metrics.update(
        {
            "synthetic": data.synthetic,
            "best_epoch": state.best_epoch,
            "epochs_run": state.epochs_done,
            "monitor": MONITOR,
            "weights": (
                f"moving average (momentum {config['ema_momentum']}) over all {state.epochs_done} epochs"
                if averages(config)
                else f"best epoch, {state.best_epoch} of {state.epochs_done}"
            ),
            "train_seconds": round(state.seconds, 1),
            "seconds_per_epoch": round(state.seconds / max(state.epochs_done, 1), 1),
        }
    )
    config = {**config, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_run_files(partial, model, state.history, config, metrics)
    (partial / LOCK_FILE).unlink(missing_ok=True)
    publish_run(partial, out)
    say(
        f"Weights: {metrics['weights']}. Validation ROC AUC "
        f"{metrics['validation']['roc_auc']:.3f}, F1 {metrics['validation']['f1']:.3f} at threshold "
        f"{metrics['threshold']:.3f}. Run saved to {out} ({state.seconds:.0f} s of training)."
    )
    return Run(
        run_dir=out,
        model=model,
        config=config,
        metrics=metrics,
        threshold=float(metrics["threshold"]),
        history=state.history,
    )
