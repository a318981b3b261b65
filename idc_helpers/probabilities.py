"""A model's IDC probabilities for an array of patches, with optional test-time augmentation (TTA).

Sits between the models and everything that reads probabilities (validation during training, the predictions
table): it knows nothing of files, runs or splits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from idc_helpers.pipeline import dihedral_views

if TYPE_CHECKING:  # TensorFlow loads only when a model is there to run
    import keras


def predict_probs(
    model: keras.Model,
    images: np.ndarray,
    *,
    indices: np.ndarray | None = None,
    tta: bool = False,
    batch_size: int = 512,
) -> np.ndarray:
    """IDC probability of each patch: ``images`` ``(N, 50, 50, 3)`` 0..255 -> ``(N,)`` float32.

    ``images`` is uint8 and may be a memmap; with ``indices``, only those rows are predicted (``(len(indices),)``).

    Reads one batch at a time from ``images``, so a memmapped cache is never loaded whole. With ``tta`` the
    softmax outputs of the 8 views of :func:`idc_helpers.pipeline.dihedral_views` are averaged.
    """
    rows = np.arange(len(images)) if indices is None else np.asarray(indices)
    out = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        # A contiguous slice of a memmap is a cheap view; fancy indexing copies only this batch.
        batch = images[chunk[0] : chunk[-1] + 1] if _contiguous(chunk) else images[chunk]
        batch = np.asarray(batch, dtype=np.float32)
        views = dihedral_views(batch) if tta else [batch]
        total = np.zeros(len(chunk), dtype=np.float64)
        for view in views:
            probs = model.predict_on_batch(np.ascontiguousarray(view))
            total += np.asarray(probs, dtype=np.float64)[:, 1]
        out[start : start + len(chunk)] = total / len(views)
    return out


def _contiguous(chunk: np.ndarray) -> bool:
    return len(chunk) > 0 and chunk[-1] - chunk[0] == len(chunk) - 1 and bool(np.all(np.diff(chunk) == 1))
