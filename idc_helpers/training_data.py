"""The patches a training run learns from: the train and validation patients' patches, decoded, never a test one's.

:func:`prepare_data` indexes the dataset folder(s), splits them by patient (:func:`idc_helpers.splits.resolve_split`),
optionally keeps the same share of every patient's patches (:func:`idc_helpers.splits.subsample_patches`), and
decodes the train and validation patches only (cached on disk): training never reads a test patient's file.
:func:`class_weights` weighs the classes of the training patches in the loss; :func:`loss_weights` weighs every
patient alike instead of every patch (``train(weighting="patient")``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from idc_helpers import splits
from idc_helpers.datasource import resolve_data_dir
from idc_helpers.loader import load_patches
from idc_helpers.patch_index import build_index
from idc_helpers.splits import TrainingDataError


@dataclass
class TrainingData:
    """The decoded train and validation patches of a run, and what ``config.json`` records of them.

    ``images`` ``(N, 50, 50, 3)`` uint8 (often a memmap), ``labels`` ``(N,)`` int32, the row positions of each
    subset (``train_idx``, ``val_idx``), the patient lists of every subset, and ``frame``, the patch index rows of
    ``images``.
    """

    images: np.ndarray
    labels: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    patients: dict[str, list[str]]
    record: dict[str, Any]
    synthetic: bool
    frame: pd.DataFrame  # the patch index rows of ``images`` (patient_id, x, y, label, ...)


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Weights ``n / (2 n_c)`` per class so both classes carry the same total weight in the loss."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=2)
    if (counts == 0).any():
        raise TrainingDataError(f"the training patches hold one class only (counts {counts.tolist()})")
    return {c: float(counts.sum() / (2 * counts[c])) for c in range(2)}


def loss_weights(labels: np.ndarray, patient_ids: Sequence[str]) -> np.ndarray:
    """Per-patch loss weights under which every patient counts alike, and both classes too; ``(n,) float32``.

    A patient's patches share one total, whatever their number (29 whole slides would otherwise outweigh 195 thin
    samples); then each class is scaled to the same total, as :func:`class_weights` does for patches, and the
    weights to a mean of 1, so that the loss keeps its scale and the learning rate its meaning.
    """
    labels = np.asarray(labels, dtype=np.int64)
    ids = pd.Series(np.asarray(patient_ids)).astype(str)
    if len(ids) != len(labels) or not len(labels):
        raise TrainingDataError(f"{len(labels)} labels and {len(ids)} patient ids: give one of each per patch")
    per_patch = 1.0 / ids.map(ids.value_counts()).to_numpy(np.float64)
    totals = np.bincount(labels, weights=per_patch, minlength=2)
    if (totals == 0).any():
        raise TrainingDataError(f"the training patches hold one class only (counts {np.bincount(labels).tolist()})")
    weights = per_patch * (totals.sum() / (2 * totals))[labels]
    return (weights / weights.mean()).astype(np.float32)


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

    Raises :class:`~idc_helpers.splits.TrainingDataError` when the split leaves no validation or test patients, or
    validation patches of one class only.
    """
    sources = [resolve_data_dir(d) for d in data_dirs]
    synthetic = any(s.synthetic for s in sources)  # resolve_data_dir has said so, loudly
    index = build_index([s.path for s in sources])
    if index.problems:
        folders = " ".join(f"--data-dir {s.path}" for s in sources)
        say(f"{len(index.problems)} files left out of the index (run `python -m idc_helpers index {folders}`).")
    patients = splits.resolve_split(index.frame, split, seed=seed, test_patients=test_patients, unlisted=unlisted)
    splits.check_split(patients, split, index.frame)
    frame = splits.subsample_patches(index.frame, max_patches, seed=seed)
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
            f"{len(np.unique(labels[val_idx]))} class(es); the validation scores and the threshold need both classes. "
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
