"""Stain colour in haematoxylin/eosin/DAB (HED) optical density, and colour-only normalisation of a slide.

An RGB pixel ``x`` (0..255) has optical density ``od = log(256 / (x + 1))`` per channel (0 for white glass) and
stain concentrations ``hed = od @ HED_FROM_RGB`` (Ruifrok & Johnston 2001's colour deconvolution, the matrices
scikit-image uses). The training augmentation (:mod:`idc_helpers.pipeline`) jitters these concentrations; here
here a slide's mean optical density per channel is measured over its tissue pixels and every channel is rescaled
to a reference, so that every slide reaches the model with the same mean colour (a per-slide, colour-only
normalisation in the spirit of Reinhard et al. 2001: nothing moves, white glass stays white). Per-channel
densities are used rather than H and E concentrations because a patient whose tissue is mostly stroma can have
a mean haematoxylin concentration near zero, or below it, which no factor can rescale.

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
    """Mean R, G, B optical density over the tissue pixels of some patches, and how many pixels that was."""

    mean_od: tuple[float, float, float]
    tissue_pixels: int

    @property
    def mean_hed(self) -> tuple[float, float, float]:
        """The mean haematoxylin, eosin and DAB concentrations of the same pixels."""
        return tuple(float(v) for v in np.asarray(self.mean_od, dtype=np.float32) @ HED_FROM_RGB)


def _check(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise StainError(f"expected patches of shape (N, height, width, 3), got {images.shape}")
    return images


def optical_density(images: np.ndarray) -> np.ndarray:
    """``(N, H, W, 3)`` 0..255 RGB -> ``(N, H, W, 3)`` float32 optical density, 0 for white (255)."""
    return (_LOG256 - np.log1p(_check(images).astype(np.float32))).astype(np.float32)


def stain_stats(images: np.ndarray, *, min_od: float = TISSUE_MIN_OD, batch: int = 4096) -> StainStats:
    """Mean optical density per channel over the tissue pixels of ``images`` ``(N, 50, 50, 3)`` 0..255.

    Tissue pixels have a summed RGB density >= ``min_od``; a memmap is read ``batch`` patches at a time.

    Raises :class:`StainError` when the patches have no tissue pixel (a blank slide cannot be normalised).
    """
    images = _check(images)
    total = np.zeros(3, dtype=np.float64)
    count = 0
    for start in range(0, len(images), batch):
        od = optical_density(images[start : start + batch]).reshape(-1, 3)
        tissue = od[od.sum(axis=1) >= min_od]
        total += tissue.sum(axis=0, dtype=np.float64)
        count += len(tissue)
    if count == 0:
        raise StainError(
            f"none of the {len(images)} patches holds a tissue pixel (optical density >= {min_od}); "
            "there is no stain to measure"
        )
    mean = total / count
    return StainStats(mean_od=(float(mean[0]), float(mean[1]), float(mean[2])), tissue_pixels=int(count))


def normalise_stain(images: np.ndarray, source: StainStats, target: StainStats, *, batch: int = 4096) -> np.ndarray:
    """Rescale each channel's optical density so that patches measured as ``source`` get the mean colour of ``target``.

    Returns ``(N, 50, 50, 3) uint8``.

    Each channel's density is multiplied by ``target / source``, so zero density (white glass) stays white and no
    pixel moves. Give the same ``source`` to every patch of one slide: the slide is normalised as a whole, and how
    much of it is stained (a property of its tissue, e.g. how much IDC it holds) is kept.

    Raises :class:`StainError` when a channel's mean density is not positive (no stained tissue in ``source`` or
    ``target``).
    """
    images = _check(images)
    src, tgt = np.asarray(source.mean_od, dtype=np.float32), np.asarray(target.mean_od, dtype=np.float32)
    if np.any(src <= 0) or np.any(tgt <= 0):
        raise StainError(
            f"a channel has no optical density to rescale (mean {src.round(3).tolist()} -> "
            f"{tgt.round(3).tolist()}); these patches hold no stained tissue"
        )
    factor = tgt / src
    out = np.empty(images.shape, dtype=np.uint8)
    for start in range(0, len(images), batch):
        od = optical_density(images[start : start + batch]) * factor
        rgb = 256.0 * np.exp(-od) - 1.0
        out[start : start + batch] = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return out
