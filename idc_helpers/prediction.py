"""Predictions: one row per patch, the hand-off between a trained model and everything downstream.

The predictions table has the columns :data:`PREDICTION_COLUMNS`:

=========== ======= ================================================================
path        str     absolute path of the patch file (unique)
patient_id  str     patient id as text (``"8863"``), never a number
x, y        int     1-based top-left pixel of the patch in the patient's slide
label       int     true class from the file name (1 = IDC)
prob_idc    float   the model's IDC probability in [0, 1]
pred        int     ``prob_idc >= threshold`` (the run's threshold, chosen on validation patients)
=========== ======= ================================================================

``python -m idc_helpers predict --model RUN_DIR --data-dir DIR --out preds.csv`` writes it for every patch of a
folder in the Kaggle layout (patients the model never saw, or a subset of the run's split with ``--subset``).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from idc_helpers.atomic import atomic_path

if TYPE_CHECKING:
    import keras

    from idc_helpers.training import Run

PREDICTION_COLUMNS = ["path", "patient_id", "x", "y", "label", "prob_idc", "pred"]
_INT_COLUMNS = ("x", "y", "label", "pred")


# --------------------------------------------------------------------------------------------------------------
# Model outputs


def dihedral_views(images: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/rotations of ``(N, H, W, C)`` images (identity first); histology has no preferred orientation."""
    views = []
    for k in range(4):
        rotated = np.rot90(images, k, axes=(1, 2))
        views += [rotated, rotated[:, :, ::-1]]
    return views


def predict_probs(
    model: keras.Model,
    images: np.ndarray,
    *,
    indices: np.ndarray | None = None,
    tta: bool = False,
    batch_size: int = 512,
) -> np.ndarray:
    """IDC probability of each patch: ``images`` ``(N, 50, 50, 3)`` 0..255 (uint8, may be a memmap) -> ``(N,)``
    float32 (or ``(len(indices),)`` for the rows in ``indices``).

    Reads one batch at a time from ``images``, so a memmapped cache is never loaded whole. With ``tta`` the
    softmax outputs of the 8 dihedral views are averaged.
    """
    rows = np.arange(len(images)) if indices is None else np.asarray(indices)
    out = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        # A contiguous slice of a memmap is a cheap view; fancy indexing copies only this batch.
        batch = images[chunk[0]:chunk[-1] + 1] if _contiguous(chunk) else images[chunk]
        batch = np.asarray(batch, dtype=np.float32)
        views = dihedral_views(batch) if tta else [batch]
        total = np.zeros(len(chunk), dtype=np.float64)
        for view in views:
            probs = model.predict_on_batch(np.ascontiguousarray(view))
            total += np.asarray(probs, dtype=np.float64)[:, 1]
        out[start:start + len(chunk)] = total / len(views)
    return out


def _contiguous(chunk: np.ndarray) -> bool:
    return len(chunk) > 0 and chunk[-1] - chunk[0] == len(chunk) - 1 and bool(np.all(np.diff(chunk) == 1))


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

    ``model_or_run``: a run folder (its stored threshold is used), a loaded :class:`~idc_helpers.training.Run`,
    a ``.keras`` file or a Keras model (threshold 0.5 unless ``threshold`` is given). Patches whose files fail to
    decode are left out, with a warning naming them.
    """
    from idc_helpers.loader import load_patches

    model, stored_threshold = _model_and_threshold(model_or_run)
    threshold = stored_threshold if threshold is None else float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    loaded = load_patches(frame, cache_dir=cache_dir)
    if loaded.problems:
        names = "; ".join(str(p) for p in loaded.problems[:10])
        more = f" (and {len(loaded.problems) - 10} more)" if len(loaded.problems) > 10 else ""
        warnings.warn(f"{len(loaded.problems)} patches could not be decoded and have no prediction: {names}{more}",
                      stacklevel=2)
    probs = predict_probs(model, loaded.images, tta=tta, batch_size=batch_size) if len(loaded.frame) else \
        np.empty(0, dtype=np.float32)
    table = loaded.frame[["path", "patient_id", "x", "y", "label"]].copy()
    table = table.astype({"path": str, "patient_id": str, "x": np.int32, "y": np.int32, "label": np.int8})
    table["prob_idc"] = probs.astype(np.float64)
    table["pred"] = (probs >= threshold).astype(np.int8)
    return table.reset_index(drop=True)


def _model_and_threshold(model_or_run) -> tuple[keras.Model, float]:
    from idc_helpers.training import Run, load_run

    if isinstance(model_or_run, (str, os.PathLike)):
        model_or_run = load_run(model_or_run)
    if isinstance(model_or_run, Run):
        return model_or_run.model, model_or_run.threshold
    return model_or_run, 0.5


def validate_predictions(df: pd.DataFrame, source: str = "predictions table") -> pd.DataFrame:
    """Check a predictions table and return it; raise ``ValueError`` naming ``source`` and what is wrong.

    Checks: the columns of :data:`PREDICTION_COLUMNS`; ``path`` and ``patient_id`` text; ``x, y, label, pred``
    integers; ``prob_idc`` float in [0, 1] without NaN; ``label`` and ``pred`` in {0, 1}; one row per path.
    """
    missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: missing columns {missing}; expected {PREDICTION_COLUMNS}")
    problems = []
    for col in ("path", "patient_id"):
        if not (pd.api.types.is_string_dtype(df[col]) or pd.api.types.is_object_dtype(df[col])) or \
                not df[col].map(lambda v: isinstance(v, str)).all():
            problems.append(f"column {col!r} must hold text (dtype {df[col].dtype})")
    for col in _INT_COLUMNS:
        if not pd.api.types.is_integer_dtype(df[col]):
            problems.append(f"column {col!r} must be integer (dtype {df[col].dtype})")
    prob = df["prob_idc"]
    if not pd.api.types.is_float_dtype(prob):
        problems.append(f"column 'prob_idc' must be float (dtype {prob.dtype})")
    elif prob.isna().any() or ((prob < 0) | (prob > 1)).any():
        bad = df.loc[prob.isna() | (prob < 0) | (prob > 1), "path"].head(3).tolist()
        problems.append(f"'prob_idc' must be in [0, 1] without NaN (e.g. rows {bad})")
    for col in ("label", "pred"):
        if pd.api.types.is_integer_dtype(df[col]) and not df[col].isin([0, 1]).all():
            problems.append(f"column {col!r} must be 0 or 1")
    duplicated = df["path"][df["path"].duplicated()]
    if len(duplicated):
        problems.append(f"{len(duplicated)} duplicated paths, one row per patch expected (e.g. {duplicated.iloc[0]})")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    return df


def write_predictions(df: pd.DataFrame, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Validate and write the table as CSV, atomically; an existing file is kept unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another --out or pass --overwrite to replace it.")
    validate_predictions(df)
    with atomic_path(path) as tmp:
        # Full precision (shortest repr): `prob_idc >= threshold` must give the same `pred` after reading back.
        df[PREDICTION_COLUMNS].to_csv(tmp, index=False)
    return path


def read_predictions(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and validate a predictions CSV (``patient_id`` and ``path`` stay text)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such predictions file; write one with `python -m idc_helpers predict`.")
    df = pd.read_csv(path, dtype={"path": str, "patient_id": str, "x": np.int32, "y": np.int32, "label": np.int8,
                                  "prob_idc": np.float64, "pred": np.int8})
    return validate_predictions(df, source=str(path))


# --------------------------------------------------------------------------------------------------------------
# Command line


def select_patients(frame: pd.DataFrame, *, run: Run | None = None, subset: str | None = None,
                    patients: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows of ``frame`` for a subset of the run's split (``train``/``val``/``test``) and/or given patient ids."""
    keep = np.ones(len(frame), dtype=bool)
    if subset is not None:
        lists = run.split if run is not None else {}
        if subset not in lists:
            raise ValueError(f"--subset {subset}: the model has no stored patient split; "
                             "give the run folder written by `train`, not a bare .keras file")
        keep &= frame["patient_id"].isin(lists[subset]).to_numpy()
    if patients:
        wanted = [p.strip() for p in patients if p.strip()]
        unknown = sorted(set(wanted) - set(frame["patient_id"]))
        if unknown:
            raise ValueError(f"patients not in the dataset folder: {', '.join(unknown)}")
        keep &= frame["patient_id"].isin(wanted).to_numpy()
    return frame[keep].reset_index(drop=True)


def run_predict(args: argparse.Namespace) -> int:
    """``python -m idc_helpers predict``: write the predictions CSV; exit status 2 on a usage error."""
    from idc_helpers.training import enable_onednn

    enable_onednn()  # before TensorFlow is imported by load_run
    from idc_helpers.demo_data import SYNTHETIC_NOTICE, is_synthetic
    from idc_helpers.patch_index import DatasetFolderError, build_index
    from idc_helpers.training import load_run

    out = Path(args.out)
    try:
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite to replace it.")
        if is_synthetic(args.data_dir):
            print(SYNTHETIC_NOTICE, flush=True)
        index = build_index(args.data_dir)
        run = load_run(args.model)
        frame = select_patients(index.frame, run=run, subset=args.subset,
                                patients=args.patients.split(",") if args.patients else None)
        if frame.empty:
            raise ValueError("no patches to predict: the dataset folder holds none of the selected patients")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            table = predict_frame(run, frame, tta=args.tta, cache_dir=args.cache_dir)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        write_predictions(table, out, overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError, DatasetFolderError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Wrote {len(table):,} predictions ({table['patient_id'].nunique()} patients, "
          f"{int(table['pred'].sum()):,} predicted IDC at threshold {run.threshold:.3f}) to {out}")
    if index.problems:
        print(f"{len(index.problems)} files of {args.data_dir} are not patches and were skipped "
              f"(details: python -m idc_helpers index {args.data_dir}).")
    return 0
