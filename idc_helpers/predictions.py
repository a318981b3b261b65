"""Predictions: one row per patch, the hand-off between a trained model and everything downstream.

The predictions table has the columns :data:`PREDICTION_COLUMNS`:

=========== ======= ================================================================
path        str     absolute path of the patch file (unique)
patient_id  str     patient id as text (``"8863"``), never a number
x, y        int     1-based top-left pixel of the patch in the patient's slide
label       int     true class from the file name (1 = IDC)
prob_idc    float   the model's IDC probability in [0, 1]
pred        int     ``prob_idc >= threshold`` (the run's threshold, chosen on validation patients)
threshold   float   that threshold, the same on every row: the table carries the number it was decided at
=========== ======= ================================================================

``threshold`` is optional when reading (tables written before it existed decide by ``pred`` alone); where it is
present, ``pred`` must agree with it. ``evaluate``, ``slide`` and the notebooks report this number.

``predict --context`` adds :data:`CONTEXT_COLUMNS`: ``prob_idc_context`` (the probability smoothed with the
patch's neighbours on the slide, :mod:`idc_helpers.slide_context`) and ``pred_context`` (at the context threshold
chosen on the validation patients, recorded in ``threshold_context``). Figures from them use the slide, not the patch
alone.

``python -m idc_helpers predict --run RUN_DIR --data-dir DIR --out preds.csv`` writes it for every patch of a
folder in the Kaggle layout (patients the model never saw, or a subset of the run's split with ``--subset``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from idc_helpers.atomic import atomic_path
from idc_helpers.demo_data import is_synthetic
from idc_helpers.errors import UserError
from idc_helpers.loader import load_patches
from idc_helpers.metrics import pred_column, threshold_column
from idc_helpers.probabilities import predict_probs
from idc_helpers.run_folder import Run, load_run
from idc_helpers.validation import InvalidInputError, check_patient_ids, check_table

if TYPE_CHECKING:
    import keras


class PredictionsError(UserError, ValueError):
    """A predictions table that breaks the format, or a selection of patients that selects nothing usable."""


class PredictionsExistError(UserError, FileExistsError):
    """The predictions file to write exists already (kept unless asked to replace it)."""


class PredictionsFileError(UserError, FileNotFoundError):
    """The predictions file to read does not exist."""


PREDICTION_COLUMNS = ["path", "patient_id", "x", "y", "label", "prob_idc", "pred"]
CONTEXT_COLUMNS = ["prob_idc_context", "pred_context"]
#: Columns read as text whatever they hold (the other columns are checked as numbers after reading).
TEXT_COLUMNS = {"path": str, "patient_id": str}
#: The thresholds the decisions were made at, one value per table (optional when reading older tables).
THRESHOLD_COLUMNS = ["threshold", "threshold_context"]
_DTYPES = {
    "path": str,
    "patient_id": str,
    "x": np.int32,
    "y": np.int32,
    "label": np.int8,
    "prob_idc": np.float64,
    "pred": np.int8,
    "prob_idc_context": np.float64,
    "pred_context": np.int8,
    "threshold": np.float64,
    "threshold_context": np.float64,
}


# --------------------------------------------------------------------------------------------------------------
# Predictions table


def predict_frame(
    model_or_run: keras.Model | Run | str | os.PathLike[str],
    frame: pd.DataFrame,
    *,
    tta: bool = False,
    threshold: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 512,
) -> pd.DataFrame:
    """Predict every patch of a patch index ``frame`` and return the predictions table (one row per patch).

    ``model_or_run``: a run folder (its stored threshold is used), a loaded :class:`~idc_helpers.run_folder.Run`,
    a ``.keras`` file or a Keras model (threshold 0.5 unless ``threshold`` is given). Patches whose files fail to
    decode are left out, with a warning naming them.
    """
    model, stored_threshold = _model_and_threshold(model_or_run)
    threshold = stored_threshold if threshold is None else float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise PredictionsError(f"threshold must be in [0, 1], got {threshold}")
    loaded = load_patches(frame, cache_dir=cache_dir)
    if loaded.problems:
        names = "; ".join(str(p) for p in loaded.problems[:10])
        more = f" (and {len(loaded.problems) - 10} more)" if len(loaded.problems) > 10 else ""
        warnings.warn(
            f"{len(loaded.problems)} patches could not be decoded and have no prediction: {names}{more}", stacklevel=2
        )
    probs = (
        predict_probs(model, loaded.images, tta=tta, batch_size=batch_size)
        if len(loaded.frame)
        else np.empty(0, dtype=np.float32)
    )
    table = loaded.frame[["path", "patient_id", "x", "y", "label"]].copy()
    table = table.astype({"path": str, "patient_id": str, "x": np.int32, "y": np.int32, "label": np.int8})
    table["prob_idc"] = probs.astype(np.float64)
    table["pred"] = (probs >= threshold).astype(np.int8)
    table["threshold"] = threshold
    return table.reset_index(drop=True)


def _model_and_threshold(model_or_run) -> tuple[keras.Model, float]:
    if isinstance(model_or_run, (str, os.PathLike)):
        model_or_run = load_run(model_or_run)
    if isinstance(model_or_run, Run):
        return model_or_run.model, model_or_run.threshold
    return model_or_run, 0.5


def validate_predictions(df: pd.DataFrame, source: str = "predictions table") -> pd.DataFrame:
    """Check a predictions table and return it with the dtypes of the format.

    Raises :class:`PredictionsError` naming ``source`` and what is wrong.

    Every column of :data:`PREDICTION_COLUMNS` (and :data:`CONTEXT_COLUMNS`, which come together, and
    :data:`THRESHOLD_COLUMNS`) is checked value by value by :func:`idc_helpers.validation.check_table`: text paths
    and patient ids of sane length, coordinates whole numbers of at least 1, ``label`` and ``pred`` in {0, 1},
    probabilities and thresholds in [0, 1] without NaN; then, where the table records a threshold, one value that
    its decisions agree with; then one row per path.
    """
    missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
    if missing:
        raise PredictionsError(f"{source}: missing columns {missing}; expected {PREDICTION_COLUMNS}")
    context = [c for c in CONTEXT_COLUMNS if c in df.columns]
    if len(context) == 1:
        raise PredictionsError(f"{source}: columns {CONTEXT_COLUMNS} come together; the table has only {context[0]!r}")
    try:
        df = check_table(df, PREDICTION_COLUMNS, source)
    except InvalidInputError as exc:
        raise PredictionsError(str(exc)) from None
    df = df.astype({c: t for c, t in _DTYPES.items() if c in df.columns and c not in ("path", "patient_id")})
    problems = [p for prob in ("prob_idc", *context[:1]) for p in _threshold_problems(df, prob)]
    if problems:
        raise PredictionsError(f"{source}: {'; '.join(problems)}")
    duplicated = df["path"][df["path"].duplicated()]
    if len(duplicated):
        raise PredictionsError(
            f"{source}: {len(duplicated)} duplicated paths, one row per patch expected (e.g. {duplicated.iloc[0]})"
        )
    return df


def _threshold_problems(df: pd.DataFrame, prob: str) -> list[str]:
    """What is wrong with the threshold column recorded for ``prob`` (none when the table has no such column)."""
    name, decision = threshold_column(prob), pred_column(prob)
    if name not in df.columns:
        return []
    if not pd.api.types.is_float_dtype(df[name]):
        return [f"column {name!r} must be float (dtype {df[name].dtype})"]
    values = pd.unique(df[name])
    if len(df) and (len(values) != 1 or not 0.0 <= float(values[0]) <= 1.0):
        return [f"column {name!r} must hold one threshold in [0, 1] on every row (found {values[:3].tolist()})"]
    if pd.api.types.is_float_dtype(df[prob]) and pd.api.types.is_integer_dtype(df[decision]) and len(df):
        wrong = int(((df[prob] >= float(values[0])).astype(int) != df[decision]).sum())
        if wrong:
            return [
                f"{wrong} rows of {decision!r} disagree with {prob} >= {name} ({float(values[0]):.3f}); "
                f"write the table again with `python -m idc_helpers predict`"
            ]
    return []


def write_predictions(df: pd.DataFrame, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Validate and write the table as CSV, atomically; an existing file is kept unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise PredictionsExistError(f"{path} already exists; choose another --out or pass --overwrite to replace it.")
    validate_predictions(df)
    with atomic_path(path) as tmp:
        # Full precision (shortest repr): `prob_idc >= threshold` must give the same `pred` after reading back.
        columns = PREDICTION_COLUMNS + [c for c in CONTEXT_COLUMNS + THRESHOLD_COLUMNS if c in df.columns]
        df[columns].to_csv(tmp, index=False)
    return path


def read_predictions(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and validate a predictions CSV (``patient_id`` and ``path`` stay text)."""
    path = Path(path)
    if not path.is_file():
        raise PredictionsFileError(f"{path}: no such predictions file; write one with `python -m idc_helpers predict`.")
    try:
        # round_trip: the probabilities read back are the very floats written (pandas 2's default parser can
        # differ in the last bit, which could flip `pred` at the threshold).
        df = pd.read_csv(path, dtype=TEXT_COLUMNS, float_precision="round_trip")
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:  # EmptyDataError is a ValueError
        raise PredictionsError(f"{path}: not a predictions table written by `predict` ({exc})") from None
    return validate_predictions(df, source=str(path))


def table_is_synthetic(table: pd.DataFrame) -> bool:
    """Whether the patches of a predictions table (or of any rows with ``path`` and ``patient_id``) are demo data.

    True when a dataset folder the rows' paths lie in carries the synthetic marker
    (:func:`idc_helpers.demo_data.is_synthetic`); False for a table without those columns.
    """
    # <dataset>/<patient>/<0|1>/<file>.png: the dataset folder is three levels up; one file of each patient's class
    # folder says where that folder is (a patient may lie in several datasets), without a Path per row.
    if "path" not in table or "patient_id" not in table:
        return False
    keys = ["patient_id", "label"] if "label" in table else ["patient_id"]
    firsts = table.drop_duplicates(keys)["path"].astype(str)
    roots = {Path(p).parent.parent.parent for p in firsts}
    return any(is_synthetic(root) for root in roots)


# --------------------------------------------------------------------------------------------------------------
# Which patches


def select_patients(
    frame: pd.DataFrame, *, run: Run | None = None, subset: str | None = None, patients: Sequence[str] | None = None
) -> pd.DataFrame:
    """Rows of ``frame`` for a subset of the run's split (``train``/``val``/``test``) and/or given patient ids.

    Raises :class:`PredictionsError` naming the patients asked for and those the folder holds when the
    selection is empty.
    """
    keep = np.ones(len(frame), dtype=bool)
    present = sorted(set(frame["patient_id"]), key=_patient_order)
    held = _listing(present)
    if subset is not None:
        lists = run.split if run is not None else {}
        if subset not in lists:
            raise PredictionsError(
                f"--subset {subset}: the model has no stored patient split; "
                "give the run folder written by `train`, not a bare .keras file"
            )
        if not lists[subset]:
            raise PredictionsError(
                f"the run has no {subset} patients (its split left that subset empty); "
                "select patients with --patients instead"
            )
        keep &= frame["patient_id"].isin(lists[subset]).to_numpy()
        if not keep.any():
            raise PredictionsError(
                f"the dataset folder holds none of the {subset} patients of the run "
                f"({_listing(lists[subset])}); it holds {held}. Give the folder the run was "
                "trained on with --data-dir."
            )
    if patients:
        wanted = check_patient_ids(patients, "patients")
        unknown = sorted(set(wanted) - set(present), key=_patient_order)
        if unknown:
            raise PredictionsError(f"patients not in the dataset: {', '.join(unknown)}; it holds {held}.")
        keep &= frame["patient_id"].isin(wanted).to_numpy()
        if not keep.any():
            raise PredictionsError(f"none of the patients {', '.join(wanted)} is in the run's {subset} subset.")
    if not keep.any():
        raise PredictionsError("no patches to predict: the dataset folder holds no patches.")
    return frame[keep].reset_index(drop=True)


def _patient_order(pid: str) -> tuple[int, str]:
    return (int(pid), pid) if pid.isdigit() else (10**18, pid)


def _listing(ids: Sequence[str], limit: int = 10) -> str:
    ids = list(ids)
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more if ids else "no patients"
