"""Prediction: the predictions table, test-time augmentation, and the CLI chain demo-data -> train -> predict."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from idc_helpers.training import enable_onednn

enable_onednn()

from idc_helpers.cli import main  # noqa: E402
from idc_helpers.models import build_model  # noqa: E402
from idc_helpers.patch_index import build_index  # noqa: E402
from idc_helpers.prediction import (  # noqa: E402
    PREDICTION_COLUMNS,
    dihedral_views,
    predict_frame,
    predict_probs,
    read_predictions,
    validate_predictions,
    write_predictions,
)


@pytest.fixture(scope="module")
def model():
    import keras

    keras.utils.set_random_seed(0)
    return build_model("seed_cnn")


@pytest.fixture()
def preds(model, tiny_dataset, tmp_cache) -> pd.DataFrame:
    return predict_frame(model, build_index(tiny_dataset).frame, threshold=0.5)


def test_one_row_per_patch(preds, tiny_dataset):
    frame = build_index(tiny_dataset).frame
    assert list(preds.columns) == PREDICTION_COLUMNS
    assert len(preds) == len(frame) == 36 and preds["path"].is_unique
    assert preds["path"].tolist() == frame["path"].tolist()
    assert preds["label"].tolist() == frame["label"].tolist()
    assert preds["patient_id"].map(type).eq(str).all()
    assert ((preds["prob_idc"] >= 0.5).astype(int) == preds["pred"]).all()
    validate_predictions(preds)


def test_undecodable_patch_is_left_out_and_named(model, tiny_dataset, tmp_cache):
    broken = next((tiny_dataset / "101" / "0").glob("*.png"))
    broken.write_bytes(broken.read_bytes()[:60])  # a valid header, then nothing
    with pytest.warns(UserWarning, match=broken.name):
        preds = predict_frame(model, build_index(tiny_dataset).frame)
    assert len(preds) == 35 and str(broken) not in set(preds["path"])


def test_tta_on_a_symmetric_patch_changes_nothing(model):
    i = np.minimum(np.arange(50), 49 - np.arange(50))
    d = np.minimum.outer(i, i)  # the same under every flip and 90-degree rotation
    patch = np.stack([d * 5, 255 - d * 4, (d * 7) % 256], axis=-1).astype(np.uint8)[None]
    assert all(np.array_equal(view, patch) for view in dihedral_views(patch))
    np.testing.assert_allclose(predict_probs(model, patch, tta=True), predict_probs(model, patch), atol=1e-6)


def test_tta_is_invariant_to_rotating_the_input(model):
    patches = np.random.default_rng(1).integers(0, 256, size=(3, 50, 50, 3), dtype=np.uint8)
    rotated = np.ascontiguousarray(np.rot90(patches, 1, axes=(1, 2))[:, ::-1])
    np.testing.assert_allclose(predict_probs(model, patches, tta=True), predict_probs(model, rotated, tta=True),
                               atol=1e-5)


def test_predict_probs_indices_match_full_prediction(model):
    patches = np.random.default_rng(2).integers(0, 256, size=(10, 50, 50, 3), dtype=np.uint8)
    full = predict_probs(model, patches, batch_size=4)
    np.testing.assert_allclose(predict_probs(model, patches, indices=np.array([7, 1, 2, 3]), batch_size=3),
                               full[[7, 1, 2, 3]], atol=1e-6)


def test_write_read_round_trip(preds, tmp_path):
    path = write_predictions(preds, tmp_path / "preds.csv")
    back = read_predictions(path)
    assert back["patient_id"].tolist() == preds["patient_id"].tolist()
    assert back["patient_id"].map(type).eq(str).all()
    assert (back[["x", "y", "label", "pred"]].to_numpy() == preds[["x", "y", "label", "pred"]].to_numpy()).all()
    np.testing.assert_array_equal(back["prob_idc"], preds["prob_idc"])  # exact: pred must stay consistent
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_predictions(preds, path)
    write_predictions(preds, path, overwrite=True)


@pytest.mark.parametrize("breakage, message", [
    (lambda df: df.drop(columns="prob_idc"), "missing columns"),
    (lambda df: df.assign(prob_idc=df["prob_idc"] + 2), r"\[0, 1\]"),
    (lambda df: df.assign(pred=2), "'pred' must be 0 or 1"),
    (lambda df: df.assign(patient_id=df["patient_id"].astype(int)), "patient_id"),
    (lambda df: df.assign(x=df["x"].astype(float)), "'x' must be integer"),
    (lambda df: pd.concat([df, df.iloc[:1]]), "duplicated paths"),
])
def test_validate_names_the_problem(preds, breakage, message):
    with pytest.raises(ValueError, match=message):
        validate_predictions(breakage(preds))


def test_cli_train_then_predict(tmp_path, tmp_cache, capsys):
    data = tmp_path / "demo"
    assert main(["demo-data", str(data), "--patients", "5"]) == 0
    run_dir = tmp_path / "run"
    assert main(["train", "--data-dir", str(data), "--out", str(run_dir), "--model", "seed_cnn", "--epochs", "1",
                 "--max-patches", "400", "--batch-size", "64"]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out

    # Training refuses to overwrite the run; exit status 2 and a message naming the fix.
    assert main(["train", "--data-dir", str(data), "--out", str(run_dir), "--epochs", "1"]) == 2
    assert "new --out" in capsys.readouterr().err

    out = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(run_dir), "--data-dir", str(data), "--out", str(out)]) == 0
    table = read_predictions(out)
    assert len(table) == len(build_index(data).frame)  # every patch, including those training never used

    from idc_helpers.training import load_run

    run = load_run(run_dir)
    assert ((table["prob_idc"] >= run.threshold).astype(int) == table["pred"]).all()

    test_out = tmp_path / "test.csv"
    assert main(["predict", "--model", str(run_dir), "--data-dir", str(data), "--out", str(test_out),
                 "--subset", "test", "--tta"]) == 0
    assert set(read_predictions(test_out)["patient_id"]) == set(run.split["test"])
    assert main(["predict", "--model", str(run_dir), "--data-dir", str(data), "--out", str(test_out)]) == 2


@pytest.mark.realdata
@pytest.mark.slow
def test_real_sample_better_than_chance(real_sample_dir, tmp_path, tmp_cache):
    """seed_cnn, 2 short epochs on ~2,000 patches of 20 patients, judged on 5 patients it never saw."""
    from sklearn.metrics import roc_auc_score

    from idc_helpers.training import train

    run = train(real_sample_dir, tmp_path / "run", model_name="seed_cnn", epochs=2, max_patches=3000, seed=0,
                verbose=0)
    frame = build_index(real_sample_dir).frame
    test = frame[frame["patient_id"].isin(run.split["test"])]
    preds = predict_frame(run.run_dir, test)
    assert roc_auc_score(preds["label"], preds["prob_idc"]) > 0.75
