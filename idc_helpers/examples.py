"""Which patches a figure shows: border patches, augmented views and the mistakes of the worst test patients.

The border patches are those that hold tissue; the augmented views show a few patches as training sees them.

Each gallery returns :class:`Examples`: the chosen rows, their ``(N, 50, 50, 3) uint8`` RGB patches (read without
the cache: a gallery is a handful of files) and one short title per patch, ready for
:func:`idc_helpers.patch_plots.plot_patches`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd

from idc_helpers import PATCH_SIZE
from idc_helpers.loader import load_patches
from idc_helpers.metrics import stored_threshold
from idc_helpers.plots import probability_text
from idc_helpers.reporting import outcomes

#: A pixel more saturated than this (HSV saturation, 0-255) counts as tissue: haematoxylin and eosin stain it purple
#: and pink, while glass, the slide's edge and dust are grey.
TISSUE_SATURATION = 40


@dataclass
class Examples:
    """Patches chosen for a figure: ``frame`` (one row each, in figure order), ``images`` and ``titles``."""

    frame: pd.DataFrame
    images: np.ndarray
    titles: list[str]


def tissue_share(images: np.ndarray, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """(N,) float: the share of each patch's own pixels (its file's ``(width, height)``, top-left) that is tissue."""
    shares = np.zeros(len(images))
    for i, (image, (width, height)) in enumerate(zip(images, sizes, strict=True)):
        own = np.ascontiguousarray(image[: int(height), : int(width)])
        if own.size:
            shares[i] = float((cv2.cvtColor(own, cv2.COLOR_RGB2HSV)[..., 1] > TISSUE_SATURATION).mean())
    return shares


def border_examples(frame: pd.DataFrame, n: int = 8, *, seed: int = 0, pool: int = 80) -> Examples:
    """Up to ``n`` border patches (smaller than 50x50) that hold tissue, as varied in size as the data allows.

    The slide's edge cut these patches short. Of a random pool of ``pool`` such patches, the one with the most tissue
    (:func:`tissue_share`) of each size that holds any, then the rest by tissue share. Most border patches are glass at
    the slide's edge, so a random pick mostly shows glass.

    ``frame``: a patch index with ``width`` and ``height``. Titles give the size and the class.
    """
    border = frame[(frame["width"] < PATCH_SIZE) | (frame["height"] < PATCH_SIZE)]
    if border.empty:
        return Examples(border.copy(), np.zeros((0, PATCH_SIZE, PATCH_SIZE, 3), np.uint8), [])
    loaded = load_patches(border.sample(min(pool, len(border)), random_state=seed), use_cache=False)
    table = loaded.frame.reset_index(drop=True)
    table["tissue"] = tissue_share(loaded.images, table[["width", "height"]].to_numpy())
    table["row"] = np.arange(len(table))
    ranked = table.sort_values("tissue", ascending=False, kind="stable")
    first = ranked[ranked["tissue"] > 0.05].groupby(["width", "height"], sort=False).head(1)
    chosen = pd.concat([first, ranked.drop(first.index)]).head(n)
    titles = [f"{w}x{h}, class {c}" for w, h, c in chosen[["width", "height", "label"]].to_numpy()]
    return Examples(chosen.drop(columns="row").reset_index(drop=True), loaded.images[chosen["row"].to_numpy()], titles)


def augmented_views(images: np.ndarray, n_views: int = 5, *, seed: int = 0, strength: str = "mild") -> Examples:
    """Each patch of ``images`` ``(N, 50, 50, 3) uint8`` followed by ``n_views`` random augmentations of it.

    The views are drawn as training draws them (:func:`idc_helpers.pipeline.augment_batch`: a flip/rotation and stain
    jitter of ``strength``); one row of ``n_views + 1`` per patch.
    """
    from idc_helpers.pipeline import augment_batch

    rows, titles = [], []
    for i, image in enumerate(np.asarray(images, dtype=np.uint8)):
        views = augment_batch(np.repeat(image[None], n_views, axis=0), [seed, i], strength=strength).numpy()
        rows += [image, *np.clip(np.round(views), 0, 255).astype(np.uint8)]
        titles += ["original"] + [f"augmented {k + 1}" for k in range(n_views)]
    frame = pd.DataFrame({"source": np.repeat(np.arange(len(images)), n_views + 1)})
    return Examples(frame, np.stack(rows) if rows else np.zeros((0, PATCH_SIZE, PATCH_SIZE, 3), np.uint8), titles)


def worst_patients(per_patient: pd.DataFrame, n: int = 3, *, min_idc: int = 10) -> pd.DataFrame:
    """The ``n`` patients with the lowest F1 among those with at least ``min_idc`` IDC patches, the lowest first.

    A patient with a handful of IDC patches has an F1 that a single patch swings. The F1 comes from
    :func:`idc_helpers.metrics.per_patient_metrics`.
    """
    eligible = per_patient[per_patient["n_idc"] >= min_idc]
    if eligible.empty:
        eligible = per_patient[per_patient["n_idc"] > 0]
    return eligible.sort_values(["f1", "n_idc"], ascending=[True, False], kind="stable").head(n)


def patient_mistakes(preds: pd.DataFrame, patients: Sequence[str], per_patient: int = 4) -> Examples:
    """Each patient's ``per_patient`` most confident mistakes.

    Missed IDC with the lowest ``prob_idc`` and false alarms with the highest, half and half where both exist.

    ``preds``: a predictions table (its ``pred`` decides; titles give ``p`` and the threshold the table records).
    """
    table = preds.assign(outcome=outcomes(preds))
    threshold = stored_threshold(preds)
    chosen = []
    for patient in patients:
        mine = table[table["patient_id"] == str(patient)]
        missed = mine[mine["outcome"] == "false negative"].sort_values("prob_idc", kind="stable")
        alarms = mine[mine["outcome"] == "false positive"].sort_values("prob_idc", ascending=False, kind="stable")
        half = per_patient // 2
        take_missed = min(len(missed), max(half, per_patient - len(alarms)))
        chosen.append(pd.concat([missed.head(take_missed), alarms.head(per_patient - take_missed)]))
    rows = pd.concat(chosen) if chosen else table.head(0)
    loaded = load_patches(rows, use_cache=False)
    short = {"false negative": "missed IDC", "false positive": "false alarm"}
    close = threshold is not None and any(round(p, 2) == round(threshold, 2) for p in loaded.frame["prob_idc"])
    at = "" if threshold is None else f" (t {threshold:.3f})" if close else f" (t {threshold:.2f})"
    titles = [
        f"{pid}: {short[o]}\np {probability_text(p, threshold)}{at}"
        for pid, o, p in loaded.frame[["patient_id", "outcome", "prob_idc"]].to_numpy()
    ]
    return Examples(loaded.frame.reset_index(drop=True), loaded.images, titles)
