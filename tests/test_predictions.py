"""Prediction: the predictions table, test-time augmentation, and the CLI chain demo-data -> train -> predict."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from idc_helpers.cli import main
from idc_helpers.models import build_model
from idc_helpers.patch_index import build_index
from idc_helpers.predictions import (
    PREDICTION_COLUMNS,
    PredictionsError,
    PredictionsExistError,
    predict_frame,
    read_predictions,
    select_patients,
    table_is_synthetic,
    validate_predictions,
    write_predictions,
)
from idc_helpers.run_folder import load_run


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
    assert list(preds.columns) == [*PREDICTION_COLUMNS, "threshold"]
    assert (preds["threshold"] == 0.5).all()  # the table carries the threshold its decisions were made at
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


def test_write_read_round_trip(preds, tmp_path):
    path = write_predictions(preds, tmp_path / "preds.csv")
    back = read_predictions(path)
    assert back["patient_id"].tolist() == preds["patient_id"].tolist()
    assert back["patient_id"].map(type).eq(str).all()
    assert (back[["x", "y", "label", "pred"]].to_numpy() == preds[["x", "y", "label", "pred"]].to_numpy()).all()
    np.testing.assert_array_equal(back["prob_idc"], preds["prob_idc"])  # exact: pred must stay consistent
    with pytest.raises(PredictionsExistError, match="--overwrite"):
        write_predictions(preds, path)
    write_predictions(preds, path, overwrite=True)


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda df: df.drop(columns="prob_idc"), "missing columns"),
        (lambda df: df.assign(prob_idc=df["prob_idc"] + 2), r"\[0, 1\]"),
        (lambda df: df.assign(pred=2), "column 'pred' row 1 holds 2 .*must hold 0 or 1"),
        (lambda df: df.assign(patient_id=df["patient_id"].astype(int)), "patient_id"),
        (lambda df: df.assign(x=df["x"] + 0.5), "column 'x' row 1 holds 1.5 .*whole numbers of at least 1"),
        (lambda df: df.assign(label=-1), "column 'label' row 1 holds -1"),
        (lambda df: df.assign(prob_idc=np.nan), "column 'prob_idc' row 1 holds nan .*no NaN"),
        (lambda df: df.assign(path="p" * 200_000), r"row 1 holds 'ppp.*'\.\.\. \(200,000 characters\).*at most 4,096"),
        (lambda df: df.assign(patient_id=" 8863"), "column 'patient_id' row 1 holds ' 8863'"),
        (lambda df: pd.concat([df, df.iloc[:1]]), "duplicated paths"),
        (lambda df: df.assign(threshold=np.linspace(0.1, 0.9, len(df))), "one threshold"),
        (lambda df: df.assign(threshold=0.5, pred=1 - df["pred"]), "disagree with prob_idc >= threshold"),
    ],
)
def test_validate_names_the_problem(preds, breakage, message):
    with pytest.raises(PredictionsError, match=message):
        validate_predictions(breakage(preds))


def test_cli_train_then_predict(tmp_path, tmp_cache, capsys, assert_refused):
    data = tmp_path / "demo"
    assert main(["demo-data", "--out", str(data), "--n-patients", "5"]) == 0
    assert "SYNTHETIC DEMO DATA" in capsys.readouterr().out
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data-dir",
                str(data),
                "--out",
                str(run_dir),
                "--model",
                "seed_cnn",
                "--epochs",
                "1",
                "--max-patches",
                "400",
                "--batch-size",
                "64",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    # A synthetic folder the user named gets one line; the banner was shown once, by demo-data.
    assert "SYNTHETIC" in out and "SYNTHETIC DEMO DATA" not in out

    # Training refuses to overwrite the run; exit status 2 and a message naming the fix.
    assert main(["train", "--data-dir", str(data), "--out", str(run_dir), "--epochs", "1"]) == 2
    assert "new --out" in capsys.readouterr().err

    out = tmp_path / "preds.csv"
    assert main(["predict", "--run", str(run_dir), "--data-dir", str(data), "--out", str(out)]) == 0
    table = read_predictions(out)
    assert len(table) == len(build_index(data).frame)  # every patch, including those training never used
    run = load_run(run_dir)
    assert ((table["prob_idc"] >= run.threshold).astype(int) == table["pred"]).all()

    test_out = tmp_path / "test.csv"
    # The old spelling is refused with one line naming the new word.
    assert main(["predict", "--model", str(run_dir), "--data-dir", str(data), "--out", str(test_out)]) == 2
    assert_refused(capsys.readouterr().err, "predict --model RUN_DIR is no longer accepted: use predict --run RUN_DIR.")
    assert not test_out.exists()
    assert main(["predict", "--model", str(run_dir)]) == 2  # alone: refused before the missing options are named
    assert_refused(capsys.readouterr().err, "use predict --run RUN_DIR.")
    assert (
        main(
            [
                "predict",
                "--run",
                str(run_dir),
                "--data-dir",
                str(data),
                "--out",
                str(test_out),
                "--subset",
                "test",
                "--tta",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert set(read_predictions(test_out)["patient_id"]) == set(run.split["test"])
    assert main(["predict", "--run", str(run_dir), "--data-dir", str(data), "--out", str(test_out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and len(err.strip().splitlines()) == 1


def test_predicting_a_folder_without_the_selected_patients_names_them(tiny_dataset):
    frame = build_index(tiny_dataset).frame
    with pytest.raises(PredictionsError, match=r"901, 902.*101, 102, 103"):
        select_patients(frame, patients=["901", "902"])
    from idc_helpers.run_folder import Run

    run = Run(run_dir=None, model=None, config={"split": {"patients": {"train": ["7"], "val": ["8"], "test": ["9"]}}})
    with pytest.raises(PredictionsError, match=r"test patients of the run \(9\).*101, 102, 103"):
        select_patients(frame, run=run, subset="test")
    empty = Run(
        run_dir=None, model=None, config={"split": {"patients": {"train": ["101"], "val": ["102"], "test": []}}}
    )
    with pytest.raises(PredictionsError, match="no test patients"):
        select_patients(frame, run=empty, subset="test")
    assert set(select_patients(frame, patients=["102"])["patient_id"]) == {"102"}


@pytest.mark.realdata
@pytest.mark.slow
def test_real_sample_better_than_chance(real_sample_dir, tmp_path, tmp_cache):
    """seed_cnn, 2 short epochs on ~2,000 patches of 20 patients, judged on 5 patients it never saw."""
    from sklearn.metrics import roc_auc_score

    from idc_helpers.training import train

    run = train(real_sample_dir, tmp_path / "run", model_name="seed_cnn", epochs=2, max_patches=3000, seed=0, verbose=0)
    frame = build_index(real_sample_dir).frame
    test = frame[frame["patient_id"].isin(run.split["test"])]
    preds = predict_frame(run.run_dir, test)
    assert roc_auc_score(preds["label"], preds["prob_idc"]) > 0.75


def test_predict_context_adds_the_slide_columns(tmp_path, tmp_cache, capsys):
    from idc_helpers.demo_data import write_demo_dataset
    from idc_helpers.training import train

    data = write_demo_dataset(tmp_path / "demo", n_patients=6, seed=0, grid=(8, 6))
    result = train(data, tmp_path / "run", model_name="seed_cnn", epochs=1, batch_size=32, verbose=0)
    params = result.metrics["context"]
    assert (
        "unavailable" not in params and params["patients"] == result.split["val"]
    )  # tuned on every validation patient
    out = tmp_path / "ctx.csv"
    assert (
        main(
            [
                "predict",
                "--run",
                str(result.run_dir),
                "--data-dir",
                str(data),
                "--out",
                str(out),
                "--subset",
                "test",
                "--context",
            ]
        )
        == 0
    )
    table = read_predictions(out)
    assert {"prob_idc_context", "pred_context"} <= set(table.columns)
    assert ((table["prob_idc_context"] >= params["threshold"]).astype(int) == table["pred_context"]).all()
    assert set(table["patient_id"]) == set(result.split["test"])

    # A run without context parameters says why, in one line.
    metrics_path = result.run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["context"] = {"unavailable": "none of the validation patients has a whole slide"}
    metrics_path.write_text(json.dumps(metrics))
    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                "--run",
                str(result.run_dir),
                "--data-dir",
                str(data),
                "--out",
                str(tmp_path / "x.csv"),
                "--context",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: predict --context") and "whole slide" in err and len(err.strip().splitlines()) == 1


def test_predict_checks_its_arguments_before_any_work(tiny_dataset, tmp_path, cli_error):
    base = ["predict", "--data-dir", str(tiny_dataset)]
    assert "is a folder" in cli_error([*base, "--run", str(tmp_path), "--out", str(tmp_path)])
    assert "needs --run" in cli_error([*base, "--out", str(tmp_path / "p.csv")])
    assert "not a finished run folder" in cli_error(
        [*base, "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "p.csv")]
    )
    assert not (tmp_path / "p.csv").exists()


def test_a_table_is_synthetic_when_a_dataset_folder_of_its_patches_carries_the_marker(tmp_path):
    from idc_helpers.demo_data import DEMO_MARKER

    rows = pd.DataFrame(
        {
            "path": [str(tmp_path / d / "9000" / "0" / "a.png") for d in ("real", "demo")],
            "patient_id": ["9000", "9000"],
            "label": [0, 1],  # one file of each patient's class folder is looked at: both datasets here
        }
    )
    assert not table_is_synthetic(rows)
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / DEMO_MARKER).write_text("synthetic")
    assert table_is_synthetic(rows)
    assert not table_is_synthetic(rows.drop(columns=["path"]))


def test_a_full_disk_is_exit_3_in_one_line_for_every_command(tmp_path, monkeypatch, capsys):
    """A full disk is one line for every command: predict/evaluate/slide name their --out.

    Outputs are atomic: nothing half-written stays. Any other command that runs out of space (index, for its cache) says
    so in one line too.
    """
    import errno

    from idc_helpers import cli
    from idc_helpers.atomic import output_failed

    full = OSError(errno.ENOSPC, "No space left on device")
    error = output_failed(tmp_path / "p.csv", full)
    assert error.exit_code == 3 and str(error).startswith(f"--out {tmp_path / 'p.csv'}: the disk is full")

    def out_of_space(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "x.npy"))

    monkeypatch.setitem(cli._HANDLERS, "index", out_of_space)
    assert cli.main(["index", "--data-dir", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: the disk is full") and str(tmp_path / "cache") in err and err.count("\n") == 1


def test_predict_evaluate_and_slide_name_the_same_threshold(tmp_path, tmp_cache, capsys):
    """One run, one threshold: the predictions file records it, and every command that reads it reports it."""
    import re

    from idc_helpers.demo_data import write_demo_dataset
    from idc_helpers.training import train

    data = write_demo_dataset(tmp_path / "demo", n_patients=6, seed=0, grid=(8, 6))
    result = train(data, tmp_path / "run", model_name="seed_cnn", epochs=1, batch_size=32, verbose=0)
    shown = f"{result.metrics['threshold']:.3f}"
    out = tmp_path / "preds.csv"
    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                "--run",
                str(result.run_dir),
                "--data-dir",
                str(data),
                "--out",
                str(out),
                "--subset",
                "test",
                "--context",
            ]
        )
        == 0
    )
    assert f"at threshold {shown}" in capsys.readouterr().out
    table = read_predictions(out)
    assert set(table["threshold"]) == {result.metrics["threshold"]}
    assert set(table["threshold_context"]) == {result.metrics["context"]["threshold"]}

    report = tmp_path / "report.json"
    assert main(["evaluate", "--predictions", str(out), "--bootstrap", "0", "--out", str(report)]) == 0
    printed = re.findall(r"Threshold: (\S+)", capsys.readouterr().out)
    assert printed[0] == shown and printed[1] == f"{result.metrics['context']['threshold']:.3f}"
    saved = json.loads(report.read_text())
    assert saved["threshold"] == result.metrics["threshold"]
    assert saved["context"]["threshold"] == result.metrics["context"]["threshold"]

    patient = table["patient_id"].iloc[0]
    assert main(["slide", "--predictions", str(out), "--patient", patient, "--out", str(tmp_path / "s.png")]) == 0
    assert f"threshold {shown} marked on the colour bar (the run's" in capsys.readouterr().out


def test_a_table_whose_decisions_were_replaced_reports_no_stale_threshold(preds):
    from idc_helpers.metrics import evaluate, stored_threshold

    assert stored_threshold(preds) == 0.5 and evaluate(preds, n_bootstrap=0)["threshold"] == 0.5
    replaced = preds.assign(pred=1 - preds["pred"])  # e.g. decisions from another rule, threshold column left over
    assert stored_threshold(replaced) is None
    report = evaluate(replaced, n_bootstrap=0)
    assert report["threshold"] is None
    assert report["confusion_matrix"]["tp"] == int(((replaced["label"] == 1) & (replaced["pred"] == 1)).sum())
