"""Two runs side by side: a second model trained on the same patients, and a table of what each run measured.

Notebook 02 trains our ``idc_net`` and then, with :func:`train_alongside`, the reference ``seed_cnn`` with the same
split, seed and settings into a sibling folder (``RUN_DIR-seed_cnn``), so that :func:`compare_runs` sets their
validation scores side by side. Both thresholds are chosen on the same validation patients; neither run has seen
a test patient.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from idc_helpers.errors import UserError
from idc_helpers.run_folder import CONFIG_FILE, load_run, partial_dir
from idc_helpers.training import train


class CompareError(UserError, ValueError):
    """The run beside a run was trained on other patients, so the two cannot be compared."""


class _RunLike(Protocol):
    model: Any
    config: dict[str, Any]
    metrics: dict[str, Any]


def sibling_run_dir(run_dir: str | os.PathLike[str], model_name: str) -> Path:
    """Where the run of ``model_name`` beside ``run_dir`` lives: ``<run_dir>-<model_name>``."""
    run_dir = Path(run_dir)
    return run_dir.with_name(f"{run_dir.name}-{model_name}")


def train_alongside(
    base: _RunLike, run_dir: str | os.PathLike[str], model_name: str, *, verbose: int | str = 2
) -> _RunLike:
    """The run of ``model_name`` with the data, split, seed, epochs, subsample and batch size of ``base``.

    ``base`` is a :class:`~idc_helpers.run_folder.Run`, as :func:`~idc_helpers.training.train` or
    :func:`~idc_helpers.run_folder.load_run` gives it; the run lives in :func:`sibling_run_dir`.

    A finished sibling run is loaded, not trained again (runs are never overwritten); an interrupted one is
    resumed.
    """
    out = sibling_run_dir(run_dir, model_name)
    if (out / CONFIG_FILE).is_file():
        finished = load_run(out)
        if finished.split != base.config["split"]["patients"]:
            raise CompareError(
                f"{out} holds a {model_name} run on other patients than the run it should be compared "
                "with; choose another RUN_DIR (runs are never overwritten)."
            )
        return finished
    args = base.config["arguments"]
    resume = (partial_dir(out) / CONFIG_FILE).is_file()
    return train(
        args["data_dirs"],
        out,
        model_name=model_name,
        epochs=args["epochs"],
        split=args["split"],
        unlisted=args["unlisted"],
        max_patches=args["max_patches"],
        seed=args["seed"],
        batch_size=args["batch_size"],
        augment=args["augment"],
        test_patients=args["test_patients"],
        resume=resume,
        verbose=verbose,
    )


def compare_runs(runs: Sequence[_RunLike]) -> pd.DataFrame:
    """One row per run: model, parameters, epochs, training seconds and the validation patients' scores.

    The epochs are those run and kept; the scores are ROC AUC, F1, precision, recall and balanced accuracy at the run's
    own threshold (from ``metrics.json``).
    """
    rows = []
    for run in runs:
        metrics, validation = run.metrics, run.metrics.get("validation", {})
        rows.append(
            {
                "model": run.config["model"],
                "parameters": run.model.count_params(),
                "epochs run": metrics.get("epochs_run"),
                "kept epoch": metrics.get("best_epoch"),
                "training s": None if metrics.get("train_seconds") is None else round(metrics["train_seconds"]),
                "threshold": metrics.get("threshold"),
                **{
                    f"val {name.replace('_', ' ')}": validation.get(name)
                    for name in ("roc_auc", "f1", "precision", "recall", "balanced_accuracy")
                },
            }
        )
    return pd.DataFrame(rows)
