"""Whole-slide mosaics: exact placement from the patch coordinates, masks, the `slide` command, and a real slide."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # tests only: the package itself never touches the backend

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import patch_name, write_patch

from idc_helpers import slides
from idc_helpers.cli import main
from idc_helpers.slide_plots import plot_slide
from idc_helpers.slides import MAX_SLIDE_SIDE, SlideError, decision_threshold, slide_mosaic

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
    for x, y, w, h, label, prob, colour in [*LAYOUT, (1, 1, 50, 50, 0, 0.3, (0, 0, 0))]:
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
        block = mosaic.image[r : r + h, c : c + w]
        assert (block == colour).all(), (x, y)
        assert (mosaic.truth[r : r + h, c : c + w] == label).all()
        assert np.allclose(mosaic.prob[r : r + h, c : c + w], prob)
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
    with pytest.raises(SlideError, match=r"gone\.png"):
        slide_mosaic(broken, PATIENT)
    twice = pd.concat([slide_table, slide_table.iloc[[1]]])
    with pytest.raises(SlideError, match="several patches at x=251, y=51"):
        slide_mosaic(twice, PATIENT)


def test_plot_slide_panels(slide_table):
    import matplotlib.pyplot as plt

    fig = plot_slide(slide_mosaic(slide_table, PATIENT))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("Patient 42") and titles[1].startswith("True IDC") and "p(IDC)" in titles[2]
    assert _colour_bars(fig)
    assert fig.axes[0].get_xlabel() == "x (slide pixels)"
    fig = plot_slide(slide_mosaic(slide_table.drop(columns="prob_idc"), PATIENT))
    assert len(fig.axes) == 2  # no probability panel without probabilities
    _, axes = plt.subplots(1, 2)
    assert plot_slide(slide_mosaic(slide_table, PATIENT), ax=axes, show=("truth", "prob")) is axes[0].figure
    with pytest.raises(ValueError, match="show"):
        plot_slide(slide_mosaic(slide_table, PATIENT), show=("nope",))
    plt.close("all")


def test_slide_panels_without_a_colour_bar_keep_their_titles_inside_the_figure(tmp_path):
    import matplotlib.pyplot as plt

    # Two patches spanning a slide of a real one's size (3,600 x 2,700 px, 4-digit tick labels).
    rows = []
    for x, y, label in ((1, 1, 0), (3551, 2651, 1)):
        image = np.full((50, 50, 3), 180, dtype=np.uint8)
        path = write_patch(tmp_path / PATIENT / str(label) / patch_name(PATIENT, x, y, label), image)
        rows.append((str(path), PATIENT, x, y, label))
    table = pd.DataFrame(rows, columns=["path", "patient_id", "x", "y", "label"])
    fig = plot_slide(slide_mosaic(table, PATIENT), show=("tissue", "truth"))
    fig.canvas.draw()
    for ax in fig.axes:
        assert ax.title.get_window_extent().y1 <= fig.bbox.y1, ax.get_title()
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


def _far_table(tmp_path, far: int) -> pd.DataFrame:
    """Patient 5: one patch at the origin and one at (far, far), both written as files."""
    rows = []
    for x in (1, far):
        image = np.full((50, 50, 3), 90, dtype=np.uint8)
        path = write_patch(tmp_path / "5" / "0" / patch_name("5", x, x, 0), image)
        rows.append((str(path), "5", x, x, 0, 0.2, 0))
    return pd.DataFrame(rows, columns=["path", "patient_id", "x", "y", "label", "prob_idc", "pred"])


def test_absurd_extent_is_refused_before_reading_naming_the_file(tmp_path, capsys):
    """One misnamed patch at x100001_y100001 must not make a 27 GB mosaic: refused, naming the outlying file."""
    table = _far_table(tmp_path, 100_001)
    with pytest.raises(SlideError, match="x100001_y100001") as err:
        slide_mosaic(table, "5", scale=0.02)
    assert f"{MAX_SLIDE_SIDE:,}" in str(err.value)
    csv = tmp_path / "preds.csv"
    table.to_csv(csv, index=False)
    assert main(["slide", "--predictions", str(csv), "--patient", "5", "--out", str(tmp_path / "s.png")]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and str(csv) in message and "x100001_y100001" in message


def test_mosaic_is_painted_at_its_scale(tmp_path):
    """A 20,050 px wide box at scale 0.05: memory for a 1,003 px mosaic, not the 4 GB of the full resolution."""
    import tracemalloc

    table = _far_table(tmp_path, 20_001)
    tracemalloc.start()
    mosaic = slide_mosaic(table, "5", scale=0.05)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert mosaic.image.shape == (1002, 1002, 3) and mosaic.extent == (1, 20051, 20051, 1)
    assert peak < 50e6, f"{peak / 1e6:.0f} MB for a 1000 px mosaic"
    assert (mosaic.image[:2, :2] == 90).all() and (mosaic.image[-2:, -2:] == 90).all()
    # Each 50 px patch covers [x * 0.05, (x + 50) * 0.05) rounded: 0..2 and 1000..1002, 2 x 2 cells each.
    assert (~np.isnan(mosaic.truth)).sum() == 8


def test_threshold_is_marked_on_the_colour_bar(slide_table):
    import matplotlib.pyplot as plt

    assert decision_threshold(slide_table) == pytest.approx(0.80)  # the lowest probability called IDC
    fig = plot_slide(slide_mosaic(slide_table, PATIENT), threshold=0.3)
    bar = _colour_bars(fig)[0]
    assert "threshold 0.30" in [t.get_text() for t in bar.get_yticklabels()]
    assert "called IDC (p >= 0.30)" in fig.axes[2].get_title()
    legend = [t.get_text() for t in fig.axes[2].get_legend().get_texts()]
    assert legend == ["true IDC outline", "called IDC"]  # the decision drawn beside the probability
    prob = fig.axes[2].images[-1]
    below, above = prob.to_rgba(np.array([0.29])), prob.to_rgba(np.array([0.31]))
    assert below[0, 2] > below[0, 0] and above[0, 0] > above[0, 2]  # blue just below the threshold, red above
    # The colour bar is linear (0.5 halfway up), not stretched so that the threshold sits in the middle.
    assert prob.norm(0.5) == pytest.approx(0.5) and prob.norm(0.3) == pytest.approx(0.3)
    assert bar.get_title(loc="left") == "p(IDC)"  # named on top, short enough to stay inside the figure
    # Legends lie under the panels, outside the tissue.
    for axis in (fig.axes[1], fig.axes[2]):
        anchor = axis.get_legend().get_bbox_to_anchor().transformed(axis.transAxes.inverted())
        assert anchor.y1 < 0
    assert fig.get_figwidth() * 100 <= 1100
    plt.close("all")


def test_slide_out_that_is_not_an_image_file_is_one_line(slide_table, tmp_path, capsys):
    csv = tmp_path / "preds.csv"
    slide_table.to_csv(csv, index=False)
    for out, words in [
        (tmp_path / "x.txt", "not an image format"),
        (tmp_path, "is a folder"),
        (csv / "x.png", "is a file, not a folder"),
    ]:
        assert main(["slide", "--predictions", str(csv), "--patient", PATIENT, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and err.startswith("error: --out"), err
    assert not (tmp_path / "x.txt").exists()


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
    area = rows.width.astype(int) * rows.height.astype(int)
    assert (~np.isnan(mosaic.truth)).sum() == area.sum()  # patches do not overlap
    assert np.nansum(mosaic.truth) == area[rows.label == 1].sum()
    np.testing.assert_array_equal(np.isnan(mosaic.prob), np.isnan(mosaic.truth))
    assert np.nansum(mosaic.prob) == np.nansum(mosaic.truth)
    first = rows.iloc[0]
    patch = cv2.imread(first.path)[..., ::-1]
    r, c = first.y - y0, first.x - x0
    np.testing.assert_array_equal(mosaic.image[r : r + first.height, c : c + first.width], patch)


def test_raw_and_context_maps_side_by_side(slide_table):
    import matplotlib.pyplot as plt

    from idc_helpers.slide_plots import plot_raw_and_context
    from idc_helpers.slides import with_values

    table = slide_table.assign(prob_idc_context=1.0 - slide_table["prob_idc"])
    mosaic = slide_mosaic(table, PATIENT)
    context = with_values(mosaic, table, "prob_idc_context")
    np.testing.assert_allclose(context.prob, 1.0 - mosaic.prob, rtol=1e-6)  # same cells, the other column
    assert context.value_column == "prob_idc_context" and context.image is mosaic.image
    fig = plot_raw_and_context(mosaic, table, threshold=0.5, context_threshold=0.4)
    titles = [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert titles[0].startswith("Patch only") and "0.50" in titles[0]
    assert titles[1].startswith("With slide context") and "0.40" in titles[1] and "Identical" not in titles[1]
    same = plot_raw_and_context(
        mosaic, table.assign(prob_idc_context=table["prob_idc"]), threshold=0.5, context_threshold=0.5
    )
    assert "Slide context: none chosen" in [ax for ax in same.axes if ax.get_label() != "<colorbar>"][1].get_title()
    bars = _colour_bars(fig)
    assert [t.get_text() for t in bars[1].get_yticklabels()][-1] == "threshold 0.40"
    assert fig.get_figwidth() * 100 <= 1100  # readable where a notebook shows it (about 1,000 px at 100 dpi)
    plt.close("all")


@pytest.mark.parametrize(
    "column, value, named",
    [
        ("prob_idc", -5, "column 'prob_idc' row 2 holds -5"),
        ("prob_idc", 11, "column 'prob_idc' row 2 holds 11"),
        ("prob_idc", np.nan, "column 'prob_idc' row 2 holds nan"),
        ("label", -1, "column 'label' row 2 holds -1"),
        ("pred", 7, "column 'pred' row 2 holds 7"),
        ("x", "abc", "column 'x' row 2 holds 'abc'"),
        ("x", np.nan, "column 'x' row 2 holds nan"),
        ("y", 0, "column 'y' row 2 holds 0"),
        ("path", "p" * 200_000, "column 'path' row 2 holds 'ppp"),
    ],
)
def test_slide_checks_every_column_of_the_table(slide_table, tmp_path, capsys, column, value, named):
    table = slide_table.astype({column: object})
    table.loc[1, column] = value
    csv = tmp_path / "preds.csv"
    table.to_csv(csv, index=False)
    out = tmp_path / "slide.png"
    assert main(["slide", "--predictions", str(csv), "--patient", PATIENT, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {csv}: {named}") and err.count("\n") == 1, err
    assert not out.exists()


def test_slide_reads_the_file_in_chunks_and_numbers_rows_across_them(slide_table, tmp_path, monkeypatch):
    monkeypatch.setattr(slides, "CHUNK_ROWS", 2)
    csv = tmp_path / "preds.csv"
    slide_table.to_csv(csv, index=False)
    read = slides.read_patient_rows(csv, PATIENT)
    pd.testing.assert_frame_equal(
        read.rows.reset_index(drop=True), slide_table.iloc[:5].reset_index(drop=True), check_dtype=False
    )
    assert read.threshold == pytest.approx(0.80)  # the lowest prob_idc called IDC, over every chunk
    bad = slide_table.copy()
    bad.loc[4, "label"] = 3
    bad.to_csv(csv, index=False)
    with pytest.raises(SlideError, match="column 'label' row 5 holds 3"):
        slides.read_patient_rows(csv, PATIENT)


def test_slide_holds_one_patch_at_a_time(slide_table, monkeypatch):
    """Memory follows the picture: each patch is read, painted and dropped, never all of them at once."""
    import gc
    import weakref

    real, refs, most = slides._read_rgb, [], []

    class Pixels(np.ndarray):
        pass

    def tracked(path):
        gc.collect()
        pixels = real(path).view(Pixels)
        refs.append(weakref.ref(pixels))
        most.append(sum(ref() is not None for ref in refs))
        return pixels

    monkeypatch.setattr(slides, "_read_rgb", tracked)
    mosaic = slide_mosaic(slide_table, PATIENT)
    assert mosaic.n_patches == 5 and len(most) == 5 and max(most) <= 2  # the patch painted last and the next one


def _colour_bars(fig) -> list:
    """The colour bars of a figure, inset in their panels."""
    return [child for ax in fig.axes for child in [ax, *ax.child_axes] if child.get_label() == "<colorbar>"]
