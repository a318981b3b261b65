"""Synthetic H&E tissue: one whole slide drawn with numpy and OpenCV, for the demo dataset.

A slide is an irregular piece of tissue on white glass, pink stroma with fibres and clefts, fat, lobules of small
ducts, lymphocyte clusters, and one or more irregular IDC regions made of crowded nests of large dark nuclei. Colours
come from a Beer-Lambert model of haematoxylin and eosin with per-patient stain vectors and strengths, so patients
differ the way real stainings do. :mod:`idc_helpers.demo_data` cuts the slides into patches; none of this is real
tissue. The same random stream gives the same slide (with the same OpenCV). This module imports nothing of the
package but the patch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from idc_helpers import PATCH_SIZE

# Reference stain vectors in optical-density space (RGB), as in Macenko et al. 2009's normalisation reference:
# haematoxylin absorbs red and green (nuclei look blue-purple), eosin mostly green (stroma looks pink).
_H_REF = np.array([0.5626, 0.7201, 0.4062])
_E_REF = np.array([0.2159, 0.8012, 0.5581])


@dataclass
class SyntheticSlide:
    """One synthetic slide: ``image`` (H, W, 3) uint8 RGB, boolean masks ``tissue`` and ``idc`` (H, W)."""

    image: np.ndarray
    tissue: np.ndarray
    idc: np.ndarray


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: int) -> np.ndarray:
    """Gaussian noise with features about ``scale`` px across, zero mean and unit std, float32 (H, W)."""
    h, w = shape
    coarse = rng.standard_normal((h // scale + 3, w // scale + 3)).astype(np.float32)
    # Bicubic upsampling of a coarse grid is far cheaper than a wide Gaussian blur of full-size noise.
    fine = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return (fine - fine.mean()) / (fine.std() + 1e-6)


def _fibres(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Wavy collagen-fibre texture, float32 (H, W), zero mean, unit std.

    Noise smeared along three orientations, blended by slowly varying weights so that fibre direction drifts.
    """
    noise = rng.standard_normal(shape, dtype=np.float32)
    base = rng.uniform(0, np.pi)
    tex = np.zeros(shape, np.float32)
    total = np.zeros(shape, np.float32)
    for step in range(3):
        kernel = _line_kernel(base + step * np.pi / 3, length=3.0, width=0.6)
        weight = np.exp(3.0 * _smooth_noise(rng, shape, 50))
        tex += weight * cv2.filter2D(noise, -1, kernel, borderType=cv2.BORDER_REFLECT)
        total += weight
    tex /= total
    return (tex - tex.mean()) / (tex.std() + 1e-6)


def _line_kernel(angle: float, length: float, width: float) -> np.ndarray:
    """An anisotropic Gaussian kernel, ``length``/``width`` sigmas in px, long axis at ``angle`` radians."""
    r = int(np.ceil(2.5 * length))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    across = -xx * np.sin(angle) + yy * np.cos(angle)
    k = np.exp(-0.5 * ((along / length) ** 2 + (across / width) ** 2))
    return (k / k.sum()).astype(np.float32)


def _draw_ellipses(
    canvas: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    angles: np.ndarray,
    values: np.ndarray,
) -> None:
    """Filled, anti-aliased ellipses on a uint8 canvas: centres, semi-axes in px, angles in degrees, values 0-255."""
    f = 16  # cv2's shift=4: 4 fractional bits, so centres and axes keep sub-pixel precision
    for x, y, ax, bx, ang, v in zip(xs, ys, a, b, angles, values, strict=True):
        cv2.ellipse(
            canvas,
            (int(x * f), int(y * f)),
            (max(int(ax * f), 1), max(int(bx * f), 1)),
            float(ang),
            0,
            360,
            int(v),
            -1,
            cv2.LINE_AA,
            4,
        )


def _random_points(rng: np.random.Generator, mask: np.ndarray, density: float) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random points ``(xs, ys)`` inside ``mask``, ``density`` points per px^2 of mask area."""
    h, w = mask.shape
    n = int(rng.poisson(density * h * w))
    xs = rng.uniform(0, w, n)
    ys = rng.uniform(0, h, n)
    keep = mask[ys.astype(int), xs.astype(int)]
    return xs[keep], ys[keep]


def _top_share(score: np.ndarray, within: np.ndarray, share: float) -> np.ndarray:
    """Mask of the top ``share`` of ``score`` inside ``within``: region sizes are set exactly, shapes by the score."""
    if not within.any():
        return within.copy()
    return within & (score > np.quantile(score[within], 1.0 - share))


def _tissue_mask(rng: np.random.Generator, shape: tuple[int, int], cut: tuple[str, int] | None) -> np.ndarray:
    """A distorted ellipse of tissue with ragged edges, holes and islands, covering 50-70% of the glass."""
    h, w = shape
    xn = (np.arange(w, dtype=np.float32) / w)[None, :]
    yn = (np.arange(h, dtype=np.float32) / h)[:, None]
    cx, cy = rng.uniform(0.4, 0.6, 2)
    rx, ry = rng.uniform(0.35, 0.5, 2)
    score = 1.0 - ((xn - cx) / rx) ** 2 - ((yn - cy) / ry) ** 2
    score = score + 0.6 * _smooth_noise(rng, shape, max(shape) // 4) + 0.12 * _smooth_noise(rng, shape, 25)
    if cut is not None:
        # Where a scan ends part-way through a patch it ends in tissue: that is where the real border patches are.
        edge = yn if cut[0] == "bottom" else xn
        score = score + 1.0 * np.clip((edge - 0.85) / 0.15, 0, 1)
    return _top_share(score, np.ones(shape, bool), rng.uniform(0.5, 0.7))


def _idc_mask(rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    """1-3 tumour foci with irregular outlines, together 12-48% of the tissue."""
    h, w = tissue.shape
    x = np.arange(w, dtype=np.float32)[None, :]
    y = np.arange(h, dtype=np.float32)[:, None]
    score = 0.15 * _smooth_noise(rng, tissue.shape, 40) + 0.06 * _smooth_noise(rng, tissue.shape, 12)
    candidates = np.flatnonzero(tissue)
    for c in candidates[rng.integers(0, candidates.size, int(rng.integers(1, 4)))]:
        sigma = rng.uniform(0.12, 0.25) * min(h, w)
        score += rng.uniform(0.6, 1.0) * np.exp(-((x - c % w) ** 2 + (y - c // w) ** 2) / (2 * sigma**2))
    idc = _top_share(score, tissue, rng.uniform(0.12, 0.48)).astype(np.uint8)
    # Drop specks smaller than two patches (or than a quarter of the tumour on tiny slides): real IDC annotations
    # are regions, not scattered cells.
    _, labels, stats, _ = cv2.connectedComponentsWithStats(idc, connectivity=8)
    big = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= min(2 * PATCH_SIZE**2, 0.25 * idc.sum()))
    return np.isin(labels, big[big > 0])


def _fat_septa(rng: np.random.Generator, fat: np.ndarray) -> np.ndarray:
    """Thin walls between polygonal fat cells inside ``fat``: the boundaries of a Voronoi tessellation, bool (H, W)."""
    h, w = fat.shape
    spacing = rng.uniform(14, 21)
    gy, gx = np.mgrid[0:h:spacing, 0:w:spacing]
    sx = np.clip(gx + rng.uniform(-0.35, 0.35, gx.shape) * spacing, 0, w - 1).astype(int).ravel()
    sy = np.clip(gy + rng.uniform(-0.35, 0.35, gy.shape) * spacing, 0, h - 1).astype(int).ravel()
    seeds = np.full(fat.shape, 255, np.uint8)
    seeds[sy, sx] = 0
    # Each pixel gets the label of its nearest seed; walls are where neighbouring labels differ.
    _, labels = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    walls = np.zeros(fat.shape, bool)
    walls[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    walls[1:, :] |= labels[1:, :] != labels[:-1, :]
    return walls & fat


def render_slide(rng: np.random.Generator, cols: int, rows: int, cut: tuple[str, int] | None) -> SyntheticSlide:
    """Draw one synthetic H&E slide of ``cols`` x ``rows`` patches (the last row/column shortened by ``cut``)."""
    h, w = rows * PATCH_SIZE, cols * PATCH_SIZE
    if cut is not None and cut[0] == "bottom":
        h -= PATCH_SIZE - cut[1]
    elif cut is not None:
        w -= PATCH_SIZE - cut[1]
    shape = (h, w)
    tissue = _tissue_mask(rng, shape, cut)
    idc = _idc_mask(rng, tissue)
    margin = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (31, 31))
    benign = tissue & ~(cv2.dilate(idc.astype(np.uint8), margin) > 0)
    # Much of real breast tissue away from a tumour is fat.
    fat = _top_share(_smooth_noise(rng, shape, 70) + 0.3 * _smooth_noise(rng, shape, 20), benign, rng.uniform(0.1, 0.4))
    benign_stroma = benign & ~fat

    # Concentrations of haematoxylin (c_h) and eosin (c_e), in optical-density units along each stain vector.
    fib = _fibres(rng, shape)
    c_e = rng.uniform(0.6, 0.9) * np.clip(0.85 + 0.08 * fib + 0.12 * _smooth_noise(rng, shape, 15), 0.2, 1.5)
    c_h = 0.11 * np.clip(0.8 + 0.3 * fib, 0.2, 1.6)
    cleft = fib < -2.6  # thin white cracks in the stroma, as in real sections
    c_e[cleft] *= 0.2
    # Fat: empty cells (glass shows through) with thin pink walls.
    septa = cv2.GaussianBlur(_fat_septa(rng, fat).astype(np.float32), (0, 0), 0.5) * 1.6
    c_e[fat] = (0.45 * np.minimum(septa, 1))[fat]
    c_h[fat] = (0.05 * np.minimum(septa, 1))[fat]

    nuclei = np.zeros(shape, np.uint8)  # darkness of nuclear haematoxylin, 0-255
    # Stroma: sparse, small, elongated fibroblast nuclei.
    xs, ys = _random_points(rng, benign_stroma, 1 / 250)
    _draw_ellipses(
        nuclei,
        xs,
        ys,
        rng.uniform(1.2, 2.4, xs.size),
        rng.uniform(0.5, 0.9, xs.size),
        rng.uniform(0, 180, xs.size),
        rng.integers(130, 210, xs.size),
    )
    _draw_lobules(rng, benign_stroma, nuclei, c_h, c_e)
    # Lymphocyte aggregates: small, round, very dark nuclei; another purple thing that is not IDC.
    for x0, y0 in zip(*_random_points(rng, benign_stroma, rng.uniform(0, 5) / (h * w)), strict=False):
        n = int(rng.integers(60, 200))
        spread = rng.uniform(8, 20)
        _draw_ellipses(
            nuclei,
            x0 + rng.normal(0, spread, n),
            y0 + rng.normal(0, spread, n),
            rng.uniform(0.9, 1.3, n),
            rng.uniform(0.9, 1.3, n),
            np.zeros(n),
            rng.integers(200, 250, n),
        )

    # IDC: nests of crowded, large, irregular, dark nuclei in purple cytoplasm, between thin strands of stroma.
    # The share of nests drifts across the tumour, so some IDC is sparse and pinker: not every IDC patch is easy.
    nest_level = rng.uniform(-0.9, -0.3) + 0.6 * _smooth_noise(rng, shape, 60)
    nests = idc & (_smooth_noise(rng, shape, 10) > nest_level)
    nest_f = cv2.GaussianBlur(nests.astype(np.float32), (0, 0), 1.0)
    c_h = c_h * (1 - nest_f) + rng.uniform(0.3, 0.45) * nest_f
    c_e = c_e * (1 - nest_f) + rng.uniform(0.2, 0.32) * nest_f
    xs, ys = _random_points(rng, nests, rng.uniform(1 / 16, 1 / 11))
    a = rng.uniform(1.3, 3.0, xs.size)
    _draw_ellipses(
        nuclei,
        xs,
        ys,
        a,
        a * rng.uniform(0.55, 1.0, xs.size),
        rng.uniform(0, 180, xs.size),
        rng.integers(150, 256, xs.size),
    )
    xs, ys = _random_points(rng, idc & ~nests, 1 / 90)  # the stroma between nests is cellular too
    _draw_ellipses(
        nuclei,
        xs,
        ys,
        rng.uniform(1.2, 2.4, xs.size),
        rng.uniform(0.7, 1.4, xs.size),
        rng.uniform(0, 180, xs.size),
        rng.integers(150, 230, xs.size),
    )

    # Chromatin grain, then everything outside the tissue becomes glass (with a slightly soft edge).
    grain = 1.0 + 0.3 * rng.standard_normal(shape, dtype=np.float32)
    c_h = c_h + rng.uniform(0.9, 1.3) * (nuclei.astype(np.float32) / 255) * grain
    soft = cv2.GaussianBlur(tissue.astype(np.float32), (0, 0), 1.5)
    # Labels come from an annotation, and a pathologist's outline is coarser than the tumour: smooth the true
    # region, so that patches at the border of a tumour carry the same uncertainty as in the real data.
    drawn = cv2.GaussianBlur(idc.astype(np.float32), (0, 0), 12) > rng.uniform(0.35, 0.6)
    return SyntheticSlide(image=_stain(rng, c_h * soft, c_e * soft), tissue=tissue, idc=drawn & tissue)


def _draw_lobules(
    rng: np.random.Generator, where: np.ndarray, nuclei: np.ndarray, c_h: np.ndarray, c_e: np.ndarray
) -> None:
    """Benign lobules: clusters of small acini, each a ring of epithelial nuclei around a lumen (in place)."""
    h, w = where.shape
    epi = np.zeros(where.shape, np.uint8)
    lumen = np.zeros(where.shape, np.uint8)
    lx, ly = _random_points(rng, where, rng.uniform(4, 10) / (h * w))
    for x0, y0 in zip(lx, ly, strict=True):
        n = int(rng.integers(4, 14))
        ax, ay = x0 + rng.normal(0, 22, n), y0 + rng.normal(0, 22, n)
        r = rng.uniform(6, 12, n)
        ang = rng.uniform(0, 180, n)
        _draw_ellipses(epi, ax, ay, r, r * rng.uniform(0.6, 1.0, n), ang, np.full(n, 255))
        _draw_ellipses(lumen, ax, ay, r * 0.6, r * 0.4, ang, np.full(n, 255))
        for x1, y1, r1 in zip(ax, ay, r, strict=True):
            t = rng.uniform(0, 2 * np.pi, int(r1 * 3))
            rr = r1 * rng.uniform(0.7, 0.95, t.size)
            _draw_ellipses(
                nuclei,
                x1 + rr * np.cos(t),
                y1 + rr * np.sin(t),
                rng.uniform(1.0, 1.7, t.size),
                rng.uniform(0.8, 1.3, t.size),
                rng.uniform(0, 180, t.size),
                rng.integers(170, 230, t.size),
            )
    epi_f = (epi.astype(np.float32) / 255) * where
    lumen_f = (lumen.astype(np.float32) / 255) * where
    c_h += 0.25 * epi_f
    c_h *= 1 - 0.9 * lumen_f
    c_e *= (1 - 0.4 * epi_f) * (1 - 0.9 * lumen_f)


def _stain(rng: np.random.Generator, c_h: np.ndarray, c_e: np.ndarray) -> np.ndarray:
    """Colour stain concentrations by Beer-Lambert, with this patient's stain vectors, strengths and glass.

    Two (H, W) float32 concentration maps (haematoxylin, eosin) -> (H, W, 3) uint8 RGB.
    """
    h_vec = _unit(_H_REF + rng.normal(0, 0.04, 3)) * rng.uniform(0.75, 1.3)
    e_vec = _unit(_E_REF + rng.normal(0, 0.05, 3)) * rng.uniform(0.75, 1.3)
    od = c_h[..., None] * h_vec.astype(np.float32) + c_e[..., None] * e_vec.astype(np.float32)
    od += 0.025 * rng.standard_normal(od.shape, dtype=np.float32)
    glass = np.float32(rng.uniform(236, 250)) + rng.normal(0, 2, 3).astype(np.float32)
    rgb = glass * np.exp(-np.maximum(od, 0, out=od), out=od)
    rgb = cv2.GaussianBlur(rgb, (0, 0), 0.6)  # optics: real patches are slightly soft
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)
