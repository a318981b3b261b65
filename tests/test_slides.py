"""Whole-slide mosaics: exact placement from the patch coordinates, masks, the `slide` command, and a real slide."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # tests only: the package itself never touches the backend

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from conftest import patch_name, write_patch  # noqa: E402

from idc_helpers.cli import main  # noqa: E402
from idc_helpers.slides import SlideError, plot_slide, slide_mosaic  # noqa: E402

PATIENT = "42"
# (x, y, width, height, label, prob, colour): a 3x2 grid starting at x=201, y=51 with the middle of the bottom row
# missing; the right column holds border patches narrower (and one shorter) than 50 px.
LAYOUT = [
    (201, 51, 50, 50, 0, 0.10, (200, 10, 10)),
    (251, 51, 50, 50, 1, 0.80, (10, 200, 10)),
    (301, 51, 30, 50, 1, 0.95, (10, 10, 200)),
    (201, 101, 50, 50, 0, 0.20, (120, 60, 30)),
    (301, 101, 30, 20, 0, 0.40, (30, 60, 120)),
]


@pytest.fixture()
def slide_table(tmp_path) -> pd.DataFrame:
    """Predictions-like rows for patient 42 (files written) and one patch of patient 7."""
    rows = []
    for x, y, w, h, label, prob, colour in LAYOUT + [(1, 1, 50, 50, 0, 0.3, (0, 0, 0))]:
        patient = PATIENT if x > 1 else "7"
        image = np.empty((h, w, 3), dtype=np.uint8)
        image[:] = colour
        path = write_patch(tmp_path / patient / str(label) / patch_name(patient, x, y, label), image)
        rows.append((str(path), patient, x, y, label, prob, int(prob >= 0.5)))
    return pd.DataFrame(rows, columns=["path", "patient_id", "x", "y", "label", "prob_idc", "pred"])


def test_patches_land_exactly_at_their_coordinates(slide_table):
    mosaic = slide_mosaic(slide_table, PATIENT)
    assert mosaic.image.shape == (100, 130, 3) and mosaic.image.dtype == np.uint8
    assert mosaic.origin == (201, 51) and mosaic.n_patches == 5 and mosaic.n_idc == 2
    assert mosaic.extent == (201, 331, 151, 51)
    for x, y, w, h, label, prob, colour in LAYOUT:
        r, c = y - 51, x - 201
        block = mosaic.image[r:r + h, c:c + w]
        assert (block == colour).all(), (x, y)
        assert (mosaic.truth[r:r + h, c:c + w] == label).all()
        assert np.allclose(mosaic.prob[r:r + h, c:c + w], prob)
    # The missing patch and the space under the short border patch are glass: white, no label, no probability.
    for rows, cols in [(slice(50, 100), slice(50, 100)), (slice(70, 100), slice(100, 130))]:
        assert (mosaic.image[rows, cols] == 255).all()
        assert np.isnan(mosaic.truth[rows, cols]).all() and np.isnan(mosaic.prob[rows, cols]).all()
    assert np.nansum(mosaic.truth) == 50 * 50 + 30 * 50  # IDC area in pixels


def test_given_images_padded_patches_are_cropped(slide_table):
    # The other patient's row comes first: images are aligned with the whole table, as LoadedPatches are.
    table = slide_table.iloc[[5, 0, 1, 2, 3, 4]].reset_index(drop=True)
    table["width"] = [50] + [w for _, _, w, *_ in LAYOUT]
    table["height"] = [50] + [h for _, _, _, h, *_ in LAYOUT]
    padded = np.full((6, 50, 50, 3), 255, dtype=np.uint8)  # as the loader pads border patches
    padded[0] = 0
    for i, (_, _, w, h, _, _, colour) in enumerate(LAYOUT, start=1):
        padded[i, :h, :w] = colour
    from_files = slide_mosaic(slide_table, PATIENT)
    from_arrays = slide_mosaic(table.drop(columns="path"), PATIENT, images=padded)
    np.testing.assert_array_equal(from_arrays.image, from_files.image)
    np.testing.assert_array_equal(from_arrays.truth, from_files.truth)


def test_scale_and_missing_value_column(slide_table):
    half = slide_mosaic(slide_table, PATIENT, scale=0.5)
    assert half.image.shape == (50, 65, 3) and half.extent == (201, 331, 151, 51)
    assert set(np.unique(half.truth[~np.isnan(half.truth)])) <= {0.0, 1.0}
    no_prob = slide_mosaic(slide_table.drop(columns="prob_idc"), PATIENT)
    assert no_prob.prob is None and no_prob.value_column is None


def test_errors_name_the_patient_or_file(slide_table, tmp_path):
    with pytest.raises(SlideError, match="patients in the table: 42, 7"):
        slide_mosaic(slide_table, "999")
    broken = slide_table.copy()
    broken.loc[0, "path"] = str(tmp_path / "gone.png")
    with pytest.raises(SlideError, match="gone.png"):
        slide_mosaic(broken, PATIENT)
    twice = pd.concat([slide_table, slide_table.iloc[[1]]])
    with pytest.raises(SlideError, match="several patches at x=251, y=51"):
        slide_mosaic(twice, PATIENT)


def test_plot_slide_panels(slide_table):
    import matplotlib.pyplot as plt

    fig = plot_slide(slide_mosaic(slide_table, PATIENT))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("Patient 42") and titles[1].startswith("True IDC") and "probability" in titles[2]
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    assert fig.axes[0].get_xlabel() == "x (slide pixels)"
    fig = plot_slide(slide_mosaic(slide_table.drop(columns="prob_idc"), PATIENT))
    assert len(fig.axes) == 2  # no probability panel without probabilities
    _, axes = plt.subplots(1, 2)
    assert plot_slide(slide_mosaic(slide_table, PATIENT), ax=axes, show=("truth", "prob")) is axes[0].figure
    with pytest.raises(ValueError, match="show"):
        plot_slide(slide_mosaic(slide_table, PATIENT), show=("nope",))
    plt.close("all")


def test_slide_command_writes_a_png(slide_table, tmp_path, capsys):
    csv = tmp_path / "preds.csv"
    slide_table.to_csv(csv, index=False)
    out = tmp_path / "figs" / "slide.png"
    assert main(["slide", "--predictions", str(csv), "--patient", PATIENT, "--out", str(out)]) == 0
    image = cv2.imread(str(out))
    assert image is not None and image.shape[0] > 200 and image.shape[1] > 600
    assert "figure written" in capsys.readouterr().out
    assert not list(out.parent.glob(".*tmp"))
    # Overwriting a figure is fine (it is a derived output), and still atomic.
    assert main(["slide", "--predictions", str(csv), "--patient", PATIENT, "--out", str(out)]) == 0


def test_slide_command_errors(slide_table, tmp_path, capsys):
    csv = tmp_path / "preds.csv"
    slide_table.to_csv(csv, index=False)
    out = tmp_path / "slide.png"
    assert main(["slide", "--predictions", str(csv), "--patient", "999", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "999" in err and "42" in err and str(csv) in err
    assert not out.exists()
    assert main(["slide", "--predictions", str(tmp_path / "none.csv"), "--patient", PATIENT, "--out", str(out)]) == 2
    assert "none.csv" in capsys.readouterr().err


@pytest.mark.realdata
def test_real_slide_geometry(real_sample_dir):
    from idc_helpers.patch_index import build_index, patient_table

    frame = build_index(real_sample_dir).frame
    patients = patient_table(frame)
    # The smallest patient that has both classes and border patches: exercises every case at little cost.
    candidates = patients[(patients.n_not_50x50 > 0) & (patients.n_idc > 0) & (patients.n_non_idc > 0)]
    patient = candidates.sort_values("n_patches").iloc[0]["patient_id"]
    rows = frame[frame.patient_id == patient].copy()
    rows["prob_idc"] = rows["label"].astype(float)
    mosaic = slide_mosaic(rows, patient)

    x0, y0 = rows.x.min(), rows.y.min()
    assert mosaic.origin == (x0, y0)
    assert mosaic.image.shape == ((rows.y - y0 + rows.height).max(), (rows.x - x0 + rows.width).max(), 3)
    area = (rows.width.astype(int) * rows.height.astype(int))
    assert (~np.isnan(mosaic.truth)).sum() == area.sum()  # patches do not overlap
    assert np.nansum(mosaic.truth) == area[rows.label == 1].sum()
    np.testing.assert_array_equal(np.isnan(mosaic.prob), np.isnan(mosaic.truth))
    assert np.nansum(mosaic.prob) == np.nansum(mosaic.truth)
    first = rows.iloc[0]
    patch = cv2.imread(first.path)[..., ::-1]
    r, c = first.y - y0, first.x - x0
    np.testing.assert_array_equal(mosaic.image[r:r + first.height, c:c + first.width], patch)
