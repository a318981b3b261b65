"""Stain colour in haematoxylin/eosin/DAB (HED) optical density, and colour-only normalisation of a slide.

An RGB pixel ``x`` (0..255) has optical density ``od = log(256 / (x + 1))`` per channel (0 for white glass) and
stain concentrations ``hed = od @ HED_FROM_RGB`` (Ruifrok & Johnston 2001's colour deconvolution, the matrices
scikit-image uses). The training augmentation (:mod:`idc_helpers.pipeline`) jitters these concentrations; here
they are measured over a slide's tissue pixels and rescaled to a reference, so that every slide reaches the
model with the same mean haematoxylin and eosin intensity (a per-slide, colour-only normalisation in the spirit
of Reinhard et al. 2001: nothing moves, white glass stays white).

numpy only; ``(N, 50, 50, 3) uint8`` in and out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from idc_helpers.errors import UserError

#: Rows: the RGB optical density of one unit of haematoxylin, eosin and DAB.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED).astype(np.float32)
#: Pixels whose optical density summed over R, G and B is below this are glass or fat, not stained tissue.
TISSUE_MIN_OD = 0.3
_LOG256 = float(np.log(256.0))


class StainError(UserError, ValueError):
    """Patches that cannot be measured or normalised (wrong shape, no tissue pixel)."""


@dataclass(frozen=True)
class StainStats:
    """Mean H, E and D concentrations over the tissue pixels of some patches, and how many pixels that was."""

    mean_hed: tuple[float, float, float]
    tissue_pixels: int


def _check(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise StainError(f"expected patches of shape (N, height, width, 3), got {images.shape}")
    return images


def optical_density(images: np.ndarray) -> np.ndarray:
    """``(N, H, W, 3)`` 0..255 RGB -> ``(N, H, W, 3)`` float32 optical density, 0 for white (255)."""
    return (_LOG256 - np.log1p(_check(images).astype(np.float32))).astype(np.float32)


def stain_stats(images: np.ndarray, *, min_od: float = TISSUE_MIN_OD, batch: int = 4096) -> StainStats:
    """Mean HED concentrations over the tissue pixels (summed RGB optical density >= ``min_od``) of ``images``
    ``(N, 50, 50, 3)`` 0..255 (a memmap is read ``batch`` patches at a time).

    Raises:
        StainError: the patches have no tissue pixel (a blank slide cannot be normalised).
    """
    images = _check(images)
    total = np.zeros(3, dtype=np.float64)
    count = 0
    for start in range(0, len(images), batch):
        od = optical_density(images[start:start + batch]).reshape(-1, 3)
        tissue = od[od.sum(axis=1) >= min_od]
        total += (tissue @ HED_FROM_RGB).sum(axis=0, dtype=np.float64)
        count += len(tissue)
    if count == 0:
        raise StainError(f"none of the {len(images)} patches holds a tissue pixel (optical density >= {min_od}); "
                         "there is no stain to measure")
    mean = total / count
    return StainStats(mean_hed=(float(mean[0]), float(mean[1]), float(mean[2])), tissue_pixels=int(count))


def normalise_stain(images: np.ndarray, source: StainStats, target: StainStats, *, batch: int = 4096) -> np.ndarray:
    """Rescale the haematoxylin and eosin concentrations of ``images`` so that patches measured as ``source``
    have the mean H and E of ``target`` -> ``(N, 50, 50, 3) uint8``.

    Each of H and E is multiplied by ``target / source`` (DAB, absent from H&E slides, is left as it is), so
    zero density (white glass) stays white and no pixel moves. Give the same ``source`` to every patch of one
    slide: the slide is normalised as a whole, and how much of it is stained (a property of its tissue, e.g.
    how much IDC it holds) is kept.
    """
    images = _check(images)
    factor = np.ones(3, dtype=np.float32)
    for i in (0, 1):
        if source.mean_hed[i] <= 0 or target.mean_hed[i] <= 0:
            raise StainError(f"stain {'HE'[i]} has a non-positive mean ({source.mean_hed[i]:.3g} -> "
                             f"{target.mean_hed[i]:.3g}); these are not H&E-stained patches")
        factor[i] = target.mean_hed[i] / source.mean_hed[i]
    # od' = od @ HED_FROM_RGB diag(factor) RGB_FROM_HED: one 3x3 matrix for the whole slide.
    mix = (HED_FROM_RGB * factor[None, :]) @ RGB_FROM_HED
    out = np.empty(images.shape, dtype=np.uint8)
    for start in range(0, len(images), batch):
        od = optical_density(images[start:start + batch]) @ mix
        rgb = 256.0 * np.exp(-np.maximum(od, 0.0)) - 1.0
        out[start:start + batch] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return out
