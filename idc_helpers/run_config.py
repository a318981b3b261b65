"""A run's ``config.json``: every setting of :func:`idc_helpers.training.train` a resume needs, the data, the software.

:func:`check_arguments` checks the numbers of a new run as the command line does, before anything is written;
:func:`run_config` resolves the defaults (:data:`DEFAULT_EPOCHS`, :data:`DEFAULT_BATCH_SIZE`, the model's learning
rate), records the data and the patient split, and the versions of the software; :func:`check_resumed_config` checks
the settings read back when an interrupted run resumes.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import idc_helpers
from idc_helpers import splits
from idc_helpers.selection import MONITOR, SELECTION_LOSS_WEIGHT, THRESHOLD_RULE
from idc_helpers.splits import TrainingDataError
from idc_helpers.training_data import TrainingData, class_weights
from idc_helpers.validation import (
    AVERAGING_CHOICES,
    WEIGHTING_CHOICES,
    check_choice,
    check_optional,
    check_patient_ids,
    check_run_config,
    check_value,
)

# The cosine schedule spans the planned epochs, so fewer epochs still end at a small learning rate; the time an
# epoch takes is measured in docs/results.md.
DEFAULT_EPOCHS = 12
DEFAULT_BATCH_SIZE = 128
DEFAULT_PATIENCE = 4
#: The final weights: an average over the whole schedule (``"ema"``, trained to its end) or those of the best
#: validation epoch (``"none"``, early stopping); see :data:`idc_helpers.validation.AVERAGING_CHOICES`. Measured
#: against each other in docs/results.md.
DEFAULT_AVERAGING = "ema"
#: With ``"ema"``: the momentum of the moving average, per step, which averages about ``1 / (1 - momentum)`` steps (200,
#: an epoch of the shared data) ...
DEFAULT_EMA_MOMENTUM = 0.995
#: ... or, in a run of fewer steps, about this share of them (a short run's average would otherwise remember its
#: first, untrained weights); and the un-augmented training batches the batch-norm statistics are recomputed on.
EMA_SHARE = 0.08
DEFAULT_BN_BATCHES = 60
#: How the training patches weigh in the loss: :data:`idc_helpers.validation.WEIGHTING_CHOICES`.
DEFAULT_WEIGHTING = "patch"


def software_versions() -> dict[str, str]:
    """The versions of Python, the libraries that train and this package, and the platform, by name."""
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


def run_config(args: Mapping[str, Any], data: TrainingData) -> dict[str, Any]:
    """The ``config.json`` of a new run: the arguments (all a resume needs), the data and split, the software.

    ``args`` are :func:`~idc_helpers.training.train`'s arguments by name (with ``data_dirs``), ``data`` what
    :func:`~idc_helpers.training_data.prepare_data` gave; defaults are resolved here.
    """
    from idc_helpers.models import DEFAULT_LEARNING_RATE

    model_name = resolve_model_name(args["model_name"])
    batch_size = int(args["batch_size"] or DEFAULT_BATCH_SIZE)
    steps = args["steps_per_epoch"]
    if steps is not None and int(steps) < 1:
        raise TrainingDataError(f"steps_per_epoch must be at least 1, got {steps}")
    full_pass = int(np.ceil(len(data.train_idx) / batch_size))
    steps_per_epoch = int(steps) if steps is not None and int(steps) < full_pass else None  # None: one full pass
    epochs = int(args["epochs"] or DEFAULT_EPOCHS)
    weighting = args.get("weighting") or DEFAULT_WEIGHTING
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
        "epochs": epochs,
        "batch_size": batch_size,
        "steps_per_epoch": steps_per_epoch,
        "learning_rate": float(args["learning_rate"] or DEFAULT_LEARNING_RATE.get(model_name, 1e-3)),
        "lr_schedule": "cosine decay to 5% over the planned epochs",
        "patience": int(args["patience"]),
        **averaging_config(args.get("averaging"), epochs * (steps_per_epoch or full_pass)),
        "label_smoothing": float(args["label_smoothing"]),
        "monitor": MONITOR,
        "selection_loss_weight": SELECTION_LOSS_WEIGHT,
        **augmentation_config(args["augment"], args["model_kwargs"]),
        # With "weighting": "patient", training_data.loss_weights in place of class weights (None).
        "class_weight": None if weighting == "patient" else class_weights(data.labels[data.train_idx]),
        "weighting": weighting,
        "threshold_rule": THRESHOLD_RULE,
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "versions": software_versions(),
        "cpu_threads": os.cpu_count(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "arguments": {k: v for k, v in args.items() if k not in ("cache_dir", "verbose")},
    }


def augmentation_config(augment: bool | str | None, model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """What ``config.json`` records of augmentation and arithmetic.

    The strength (``"augment"``, a name of :data:`idc_helpers.pipeline.AUGMENT_CHOICES`), where it runs
    (``"augment_on"``: ``"pipeline"`` or ``"model"``, None without augmentation) and the Keras dtype policy the
    model computes in (``"precision_policy"``).
    """
    from idc_helpers.models import augmentation_placement, precision_policy
    from idc_helpers.pipeline import augment_setting

    strength = augment_setting(augment)
    return {
        "augment": strength,
        "augment_on": augmentation_placement() if strength != "none" else None,
        "precision_policy": precision_policy((model_kwargs or {}).get("mixed_precision")),
    }


def averaging_config(averaging: str | None, total_steps: int) -> dict[str, Any]:
    """What ``config.json`` records of how the final weights are made (``"averaging"``).

    With ``"ema"``, also the moving average's momentum (:func:`ema_momentum` of the run's ``total_steps``) and the
    batches that recompute the batch-norm statistics.
    """
    averaging = averaging or DEFAULT_AVERAGING
    if averaging == "none":
        return {"averaging": "none"}
    return {"averaging": averaging, "ema_momentum": ema_momentum(total_steps), "bn_batches": DEFAULT_BN_BATCHES}


def ema_momentum(total_steps: int) -> float:
    """The moving average's momentum for a run of ``total_steps`` training steps.

    :data:`DEFAULT_EMA_MOMENTUM`, or, where that would average more than :data:`EMA_SHARE` of the steps, the momentum
    that averages that share (0, the last weights themselves, for a run of a handful of steps).
    """
    horizon = EMA_SHARE * max(int(total_steps), 1)
    return round(min(DEFAULT_EMA_MOMENTUM, max(0.0, 1.0 - 1.0 / horizon)), 6)


def resolve_model_name(name: str | None) -> str:
    """The model to build: ``name``, or :data:`idc_helpers.models.DEFAULT_MODEL` for None.

    Raises :class:`idc_helpers.models.UnknownModelError` naming the known ones for a name that is not one of them.
    """
    from idc_helpers.models import DEFAULT_MODEL, MODEL_NAMES, UnknownModelError

    name = name or DEFAULT_MODEL
    if name not in MODEL_NAMES:
        raise UnknownModelError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)} (--model NAME)")
    return name


def check_arguments(args: Mapping[str, Any]) -> None:
    """Every number of a new run, checked as on the command line, before any folder or cache entry is written."""
    for name in ("epochs", "batch_size", "max_patches", "steps_per_epoch", "model_seed", "learning_rate"):
        check_optional(name, args[name], f"train({name}=...)")
    for name in ("seed", "patience", "label_smoothing"):
        check_value(name, args[name], f"train({name}=...)")
    check_choice("averaging", args.get("averaging") or DEFAULT_AVERAGING, AVERAGING_CHOICES, "train(averaging=...)")
    check_choice("weighting", args.get("weighting") or DEFAULT_WEIGHTING, WEIGHTING_CHOICES, "train(weighting=...)")
    if args["test_patients"]:
        check_patient_ids(args["test_patients"], "train(test_patients=...)")


def check_resumed_config(config: dict[str, Any], path: Path) -> None:
    """A resumed run's settings pass the checks of the command line (an edited config.json may not)."""
    from idc_helpers.models import MODEL_NAMES, check_model_kwargs
    from idc_helpers.pipeline import AUGMENT_CHOICES

    check_run_config(config, str(path), models=MODEL_NAMES, augments=AUGMENT_CHOICES, splits=splits.SPLIT_NAMES)
    check_model_kwargs(config["model"], config.get("model_kwargs", {}), str(path))
