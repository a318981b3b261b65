"""Training: the run folder, patient-level splits, reproducibility, and never overwriting a run."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from idc_helpers import checkpoints, decode, loader, run_config, selection, training, training_data
from idc_helpers.errors import DiskFullError, UserError
from idc_helpers.metrics import pick_threshold
from idc_helpers.models import AUGMENT_LAYER, UnknownModelError
from idc_helpers.probabilities import predict_probs
from idc_helpers.run_folder import RUN_FILES, Run, RunBusyError, RunExistsError, load_run, partial_dir
from idc_helpers.slide_context import fit_context
from idc_helpers.splits import TrainingDataError
from idc_helpers.training import train
from idc_helpers.training_data import class_weights, loss_weights
from idc_helpers.validation import InvalidInputError

QUICK = {"model_name": "seed_cnn", "epochs": 1, "batch_size": 32, "seed": 0, "verbose": 0}


@pytest.fixture(scope="module")
def run(demo_dir, cache_dir, tmp_path_factory):
    return train(demo_dir, tmp_path_factory.mktemp("runs") / "run", cache_dir=cache_dir, **QUICK)


def test_run_folder_contents(run):
    files = sorted(p.name for p in run.run_dir.iterdir())
    assert files == sorted(RUN_FILES)
    history = json.loads((run.run_dir / "history.json").read_text())
    for key in (
        "loss",
        "accuracy",
        "val_loss",
        "val_auc",
        "val_selection",
        "val_f1",
        "val_balanced_accuracy",
        "lr",
        "epoch",
    ):
        assert len(history[key]) == 1, key
    config = json.loads((run.run_dir / "config.json").read_text())
    for key in ("model", "data", "split", "seed", "epochs", "batch_size", "versions", "started", "class_weight"):
        assert key in config, key
    assert config["data"]["synthetic"] is True and config["synthetic"] is True
    # What a CPU-only run does: augments in the input pipeline, computes in float32.
    assert (config["augment"], config["augment_on"], config["precision_policy"]) == ("mild", "pipeline", "float32")
    assert config["selection_loss_weight"] == selection.SELECTION_LOSS_WEIGHT
    assert {"python", "tensorflow", "keras", "numpy", "idc_helpers"} <= set(config["versions"])
    metrics = json.loads((run.run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["threshold"] <= 1.0
    assert {"roc_auc", "f1", "balanced_accuracy"} <= set(metrics["validation"])
    assert metrics["threshold"] == run.threshold


def test_train_returns_the_run_that_load_run_gives_back(run):
    loaded = load_run(run.run_dir)
    assert type(run) is type(loaded) is Run
    assert (loaded.run_dir, loaded.threshold, loaded.split) == (run.run_dir, run.threshold, run.split)
    assert loaded.history == run.history and run.history["epoch"] == [1]
    # What train holds in memory is what the JSON files hold (JSON turns the class weights' keys into strings).
    assert loaded.config == json.loads(json.dumps(run.config))
    assert loaded.metrics == json.loads(json.dumps(run.metrics))
    assert list(run.metrics["validation"]) == [
        "patients",
        "patches",
        "idc_patches",
        "threshold",
        "roc_auc",
        "pr_auc",
        "f1",
        "balanced_accuracy",
        "accuracy",
        "precision",
        "recall",
        "confusion_matrix",
    ]


def test_split_is_by_patient_and_complete(run, demo_dir):
    from idc_helpers.patch_index import build_index

    lists = run.config["split"]["patients"]
    subsets = [set(lists[name]) for name in ("train", "val", "test")]
    assert all(subsets)
    assert not (subsets[0] & subsets[1] or subsets[0] & subsets[2] or subsets[1] & subsets[2])
    assert set().union(*subsets) == set(build_index(demo_dir).frame["patient_id"])


def test_existing_run_is_never_overwritten(run, demo_dir, cache_dir):
    before = {p.name: p.read_bytes() for p in run.run_dir.iterdir()}
    with pytest.raises(RunExistsError, match="new --out"):
        train(demo_dir, run.run_dir, cache_dir=cache_dir, **QUICK)
    assert {p.name: p.read_bytes() for p in run.run_dir.iterdir()} == before
    # No temporary folder left behind next to it.
    assert [p.name for p in run.run_dir.parent.iterdir()] == [run.run_dir.name]


def test_an_interrupt_after_training_leaves_a_resumable_partial_run(run, demo_dir, cache_dir, tmp_path, monkeypatch):
    real = checkpoints.save_checkpoint

    def interrupt_after_the_last_epoch(folder, model, best_weights, state):
        real(folder, model, best_weights, state)
        raise KeyboardInterrupt  # as Ctrl-C right after the last checkpoint, before the threshold is chosen

    monkeypatch.setattr(checkpoints, "save_checkpoint", interrupt_after_the_last_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(demo_dir, tmp_path / "run", cache_dir=cache_dir, **QUICK)
    # Nothing that looks like a finished run; the hidden partial run holds its config and last checkpoint.
    assert [p.name for p in tmp_path.iterdir()] == [".run.partial"]
    assert {"config.json", "checkpoint.json"} <= {p.name for p in partial_dir(tmp_path / "run").iterdir()}
    with pytest.raises(RunExistsError, match=r"resume with .*--resume .*or delete"):
        train(demo_dir, tmp_path / "run", cache_dir=cache_dir, **QUICK)
    monkeypatch.setattr(checkpoints, "save_checkpoint", real)
    resumed = train(None, tmp_path / "run", resume=True, cache_dir=cache_dir, verbose=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(RUN_FILES)
    assert resumed.metrics["epochs_run"] == 1
    assert resumed.threshold == pytest.approx(run.threshold, abs=1e-5)  # as if never interrupted
    with pytest.raises(RunExistsError, match="finished run"):
        train(None, tmp_path / "run", resume=True, cache_dir=cache_dir, verbose=0)


def test_a_failure_before_the_first_checkpoint_leaves_nothing(demo_dir, cache_dir, tmp_path):
    # A mistyped model name is caught before anything is written.
    with pytest.raises(UnknownModelError, match=r"idcnet.*seed_cnn"):
        train(demo_dir, tmp_path / "run", cache_dir=cache_dir, **{**QUICK, "model_name": "idcnet"})
    with pytest.raises(UserError, match=r"'heavy'.*geometry.*strong"):  # and so is an unknown augmentation
        train(demo_dir, tmp_path / "run", cache_dir=cache_dir, augment="heavy", **QUICK)
    assert list(tmp_path.iterdir()) == []


def test_save_load_gives_identical_predictions(run, demo_dir, cache_dir):
    from idc_helpers.loader import load_patches
    from idc_helpers.patch_index import build_index

    images = load_patches(build_index(demo_dir).frame, cache_dir=cache_dir).images
    loaded = load_run(run.run_dir)
    assert loaded.threshold == run.threshold and loaded.split == run.split
    np.testing.assert_array_equal(predict_probs(loaded.model, images), predict_probs(run.model, images))


def test_same_seed_same_result(run, demo_dir, cache_dir, tmp_path):
    again = train(demo_dir, tmp_path / "again", cache_dir=cache_dir, **QUICK)
    assert again.split == run.split
    for a, b in zip(again.model.get_weights(), run.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert again.threshold == pytest.approx(run.threshold, abs=1e-5)


def test_model_seed_trains_another_model_on_the_same_split(run, demo_dir, cache_dir, tmp_path):
    assert run.config["model_seed"] == run.config["seed"] == 0  # default: the split seed
    member = train(demo_dir, tmp_path / "member", cache_dir=cache_dir, model_seed=1, **QUICK)
    assert member.config["model_seed"] == 1 and member.config["seed"] == 0
    assert member.split == run.split  # same patients in every subset
    assert not all(np.allclose(a, b) for a, b in zip(member.model.get_weights(), run.model.get_weights(), strict=True))
    # model_seed equal to the seed is the run without it.
    same = train(demo_dir, tmp_path / "same", cache_dir=cache_dir, model_seed=0, **QUICK)
    for a, b in zip(same.model.get_weights(), run.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_a_run_config_without_model_seed_uses_the_split_seed(run):
    """Runs written before model_seed existed resume as they were started."""
    old = {k: v for k, v in run.config.items() if k != "model_seed"}
    assert training.model_seed(old) == run.config["seed"]
    assert training.model_seed({**old, "seed": 3}) == 3 and training.model_seed({**old, "model_seed": 5}) == 5
    a = training.build_and_compile(old, 100).get_weights()
    b = training.build_and_compile(run.config, 100).get_weights()
    c = training.build_and_compile({**run.config, "model_seed": 1}, 100).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_label_smoothing_is_recorded_and_trains_with_the_smoothed_loss(run, demo_dir, cache_dir, tmp_path):
    assert json.loads((run.run_dir / "config.json").read_text())["label_smoothing"] == 0.0
    smoothed = train(demo_dir, tmp_path / "smoothed", cache_dir=cache_dir, label_smoothing=0.1, **QUICK)
    assert json.loads((smoothed.run_dir / "config.json").read_text())["label_smoothing"] == 0.1
    # Same seed and data, another loss: other weights.
    assert not all(
        np.allclose(a, b) for a, b in zip(smoothed.model.get_weights(), run.model.get_weights(), strict=True)
    )
    with pytest.raises(
        InvalidInputError, match=r"label-smoothing 1.5 .* is not allowed: use a finite number in \[0, 1\)"
    ):
        train(demo_dir, tmp_path / "bad", cache_dir=cache_dir, label_smoothing=1.5, **QUICK)
    assert not (tmp_path / "bad").exists()


def test_class_weights_balance_the_classes():
    weights = class_weights(np.array([0] * 75 + [1] * 25))
    assert weights[0] * 75 == pytest.approx(weights[1] * 25)
    with pytest.raises(TrainingDataError):
        class_weights(np.zeros(10, dtype=int))


def test_loss_weights_count_every_patient_and_both_classes_alike():
    # Patient "a": 90 patches (30 IDC); "b": 9 (3 IDC), the same share; "c": 1 non-IDC patch.
    labels = np.array([1] * 30 + [0] * 60 + [1] * 3 + [0] * 6 + [0])
    patients = ["a"] * 90 + ["b"] * 9 + ["c"]
    w = loss_weights(labels, patients)
    assert w.dtype == np.float32 and w.shape == (100,) and w.mean() == pytest.approx(1.0)
    assert w[labels == 1].sum() == pytest.approx(w[labels == 0].sum())  # both classes carry the same total
    # Same patient and class: the same weight; a patient of 10x the patches: a tenth per patch, the same total.
    assert np.ptp(w[:30]) == 0 and np.ptp(w[30:90]) == 0
    assert w[0] == pytest.approx(w[90] / 10) and w[:90].sum() == pytest.approx(w[90:99].sum())
    with pytest.raises(TrainingDataError):
        loss_weights(np.zeros(5, dtype=int), ["a"] * 5)
    with pytest.raises(TrainingDataError):
        loss_weights(np.array([0, 1]), ["a"])


def test_a_patient_weighted_run_records_it_and_resumes_to_the_uninterrupted_result(
    demo_dir, cache_dir, tmp_path, monkeypatch
):
    settings = {**QUICK, "epochs": 2, "weighting": "patient"}
    whole = train(demo_dir, tmp_path / "whole", cache_dir=cache_dir, **settings)
    assert whole.config["weighting"] == "patient"
    resumed = _interrupted_and_resumed(demo_dir, cache_dir, tmp_path / "resumed", monkeypatch, settings)
    for a, b in zip(resumed.model.get_weights(), whole.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The weights reach the loss row by row: where loss_weights gives each patch its class weight, the run is the
    # one that weighs patches; with the patient weights it ends elsewhere.
    plain = train(demo_dir, tmp_path / "plain", cache_dir=cache_dir, **{**settings, "weighting": "patch"})
    assert plain.config["weighting"] == "patch" and whole.config["class_weight"] is None
    assert not np.allclose(plain.history["loss"], whole.history["loss"])
    by_class = {int(k): v for k, v in plain.config["class_weight"].items()}
    monkeypatch.setattr(training, "loss_weights", lambda labels, _: np.where(labels == 1, by_class[1], by_class[0]))
    as_patches = train(demo_dir, tmp_path / "as-patches", cache_dir=cache_dir, **settings)
    np.testing.assert_allclose(as_patches.history["loss"], plain.history["loss"], rtol=1e-5)
    for a, b in zip(as_patches.model.get_weights(), plain.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(InvalidInputError, match=r"weighting 'slide'.*patch, patient"):
        train(demo_dir, tmp_path / "bad", cache_dir=cache_dir, **{**settings, "weighting": "slide"})


def test_verbose_auto(monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert training._resolve_verbose("auto") == 2
    assert training._resolve_verbose(0) == 0


def test_selection_breaks_auc_ties_with_the_validation_loss():
    labels = np.array([0, 0, 1, 1])
    confident = selection.validation_scores(labels, np.array([0.01, 0.02, 0.98, 0.99]))
    timid = selection.validation_scores(labels, np.array([0.40, 0.41, 0.42, 0.43]))
    assert confident["val_auc"] == timid["val_auc"] == 1.0
    assert confident["val_selection"] > timid["val_selection"]
    # A real AUC difference outweighs the loss.
    worse = selection.validation_scores(labels, np.array([0.01, 0.98, 0.02, 0.99]))
    assert worse["val_selection"] < timid["val_selection"]


def test_saved_weights_are_the_best_epochs(demo_dir, cache_dir, tmp_path):
    # Which epoch peaks depends on the CPU's arithmetic (AVX2 and AVX-512 round differently), so the first seed whose
    # run peaks before its last epoch is the one checked: its saved model must be an earlier epoch's.
    for seed in range(6):
        result = train(
            demo_dir,
            tmp_path / f"run{seed}",
            cache_dir=cache_dir,
            **{**QUICK, "epochs": 4, "seed": seed},
            patience=10,
            averaging="none",
        )
        history, metrics = result.history, result.metrics
        assert metrics["epochs_run"] == 4 == len(history["epoch"])
        best = int(np.argmax(history["val_selection"])) + 1
        assert metrics["best_epoch"] == best
        if best < metrics["epochs_run"]:
            break
    assert best < metrics["epochs_run"], "no seed's run peaked before its last epoch"
    run = load_run(result.run_dir)
    data = training_data.prepare_data([demo_dir], seed=seed, cache_dir=cache_dir, say=lambda *a: None)
    scores = selection.validation_scores(data.labels[data.val_idx], selection.validation_probs(run.model, data))
    assert scores["val_loss"] == pytest.approx(history["val_loss"][best - 1], abs=1e-5)
    assert scores["val_loss"] != pytest.approx(history["val_loss"][-1], abs=1e-4)


def test_training_never_decodes_a_test_patients_file(demo_dir, tmp_path, monkeypatch):
    read: list[str] = []
    real_read = decode._read_file

    def spy(path, *args, **kwargs):  # records, then reads the file as the loader always does
        read.append(str(path))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(decode, "_read_file", spy)
    result = train(demo_dir, tmp_path / "run", cache_dir=tmp_path / "fresh-cache", **QUICK)
    split = result.split
    read_patients = {Path(p).parent.parent.name for p in read}
    assert read_patients == set(split["train"]) | set(split["val"])  # everything else was decoded...
    assert not read_patients & set(split["test"])  # ... and never a test patient's file
    assert len(read) == sum(result.config["data"]["patches"].values())

    # The stored threshold is the Youden rule applied to the validation patients' predictions, nothing else; the F1
    # rule's is stored beside it.
    from idc_helpers.patch_index import build_index

    frame = build_index(demo_dir).frame
    val = frame[frame["patient_id"].isin(split["val"])].reset_index(drop=True)
    images = loader.load_patches(val, cache_dir=tmp_path / "fresh-cache").images
    probs = predict_probs(load_run(result.run_dir).model, images)
    assert result.threshold == pick_threshold(val["label"].to_numpy(), probs, "youden")
    stored = json.loads((result.run_dir / "metrics.json").read_text())
    assert stored["threshold"] == result.threshold and stored["threshold_criterion"] == "youden"
    assert stored["threshold_f1"] == pick_threshold(val["label"].to_numpy(), probs, "f1")
    # The slide context is fitted on the same predictions under selection.CONTEXT_CRITERION, the midpoint one.
    table = val[["x", "y", "label"]].assign(patient_id=val["patient_id"].astype(str), prob_idc=probs.astype(np.float64))
    expected = fit_context(table, criterion="midpoint", patch_threshold=result.threshold)
    assert stored["context"]["criterion"] == "midpoint" and stored["context"]["sigma"] == expected["sigma"]
    assert stored["context"]["threshold"] == pytest.approx(expected["threshold"])


def test_published_split_on_unlisted_patients_says_so(demo_dir, cache_dir, tmp_path):
    with pytest.raises(TrainingDataError, match=r"not in the published janowczyk2016 lists.*--split patients"):
        train(demo_dir, tmp_path / "run", split="janowczyk2016", cache_dir=cache_dir, **QUICK)
    assert list(tmp_path.iterdir()) == []


def test_several_folders_train_as_one_dataset(tmp_path, cache_dir):
    from idc_helpers.demo_data import write_demo_dataset
    from idc_helpers.patch_index import build_index

    first = write_demo_dataset(tmp_path / "a", n_patients=4, seed=0, grid=(8, 6))
    second = write_demo_dataset(tmp_path / "b", n_patients=6, seed=0, grid=(8, 6))  # 90001-90004 again, + 2 more
    result = train([first, second], tmp_path / "run", cache_dir=cache_dir, **QUICK)
    assert result.config["data"]["data_dirs"] == [str(first), str(second)]
    patients = [p for ids in result.split.values() for p in ids]
    assert len(patients) == len(set(patients)) == 6  # a patient in both folders is one patient, in one subset
    assert result.config["data"]["patches_in_folders"] == len(build_index(second).frame)


def _train_command(data: Path, cache: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "idc_helpers",
        "train",
        "--data-dir",
        str(data),
        "--cache-dir",
        str(cache),
        "--model",
        "seed_cnn",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--seed",
        "0",
        *args,
    ]


def test_a_killed_run_resumes_to_the_uninterrupted_result(demo_dir, cache_dir, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    whole = tmp_path / "whole"
    subprocess.run(
        _train_command(demo_dir, cache_dir, "--out", str(whole), "--augment", "geometry"),
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )

    killed = tmp_path / "killed"
    state = partial_dir(killed) / "checkpoint.json"
    proc = subprocess.Popen(
        _train_command(demo_dir, cache_dir, "--out", str(killed), "--augment", "geometry"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not (state.is_file() and json.loads(state.read_text())["epochs_done"] >= 1):
            assert proc.poll() is None and time.monotonic() < deadline, "training ended before its first checkpoint"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # in epoch 2 of 3
    finally:
        proc.kill()
        proc.wait()
    assert not killed.exists() and json.loads(state.read_text())["epochs_done"] == 1
    done = subprocess.run(
        [sys.executable, "-m", "idc_helpers", "train", "--resume", str(killed), "--cache-dir", str(cache_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Resuming" in done.stdout and "after epoch 1 of 3" in done.stdout
    assert not partial_dir(killed).exists()

    assert json.loads((killed / "config.json").read_text())["augment"] == "geometry"
    a, b = (json.loads((run / "metrics.json").read_text()) for run in (whole, killed))
    assert (a["epochs_run"], a["best_epoch"]) == (b["epochs_run"], b["best_epoch"]) and a["epochs_run"] == 3
    assert b["threshold"] == pytest.approx(a["threshold"], abs=1e-4)
    for key in ("roc_auc", "pr_auc", "f1", "balanced_accuracy"):
        assert b["validation"][key] == pytest.approx(a["validation"][key], abs=1e-4), key
    ha, hb = (json.loads((run / "history.json").read_text()) for run in (whole, killed))
    for key in ("loss", "val_loss", "val_auc", "lr"):
        np.testing.assert_allclose(hb[key], ha[key], atol=1e-4, err_msg=key)
    # A finished run stays refused.
    again = subprocess.run(
        [sys.executable, "-m", "idc_helpers", "train", "--resume", str(killed)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "finished run" in again.stderr


def test_cli_mistakes_get_one_error_line_and_exit_2(demo_dir, tmp_path, cli_error):
    err = cli_error(["train", "--data-dir", str(demo_dir), "--out", str(tmp_path / "r"), "--model", "idcnet"])
    assert "'idcnet'" in err and "seed_cnn" in err and "idc_net" in err
    err = cli_error(["train", "--data-dir", str(demo_dir), "--out", str(tmp_path / "r"), "--split", "janowczyk2016"])
    assert "not in the published janowczyk2016 lists" in err
    assert "exactly one of --out" in cli_error(["train", "--data-dir", str(demo_dir)])
    assert "No interrupted run" in cli_error(["train", "--resume", str(tmp_path / "never")])
    # A resumed run reads its arguments back: giving others is refused, not silently ignored.
    err = cli_error(["train", "--resume", str(tmp_path / "never"), "--epochs", "3", "--augment", "strong"])
    assert "leave out --epochs, --augment" in err
    err = cli_error(["train", "--resume", str(tmp_path / "never"), "--model-seed", "2", "--label-smoothing", "0.1"])
    assert "leave out --model-seed, --label-smoothing" in err
    err = cli_error(["train", "--data-dir", str(demo_dir), "--out", str(tmp_path / "r"), "--label-smoothing", "1.5"])
    assert "--label-smoothing: '1.5' is not allowed: use a finite number in [0, 1)" in err
    assert list(tmp_path.iterdir()) == []


def test_train_augment_choices_are_the_pipelines():
    from idc_helpers.cli import build_parser
    from idc_helpers.pipeline import AUGMENT_CHOICES

    args = build_parser().parse_args(["train", "--out", "r"])
    assert args.augment == "mild"  # the augmentation runs trained with before strengths were selectable
    for choice in AUGMENT_CHOICES:
        assert build_parser().parse_args(["train", "--out", "r", "--augment", choice]).augment == choice
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--out", "r", "--augment", "heavy"])


def test_a_run_killed_in_its_first_epoch_resumes_from_its_config(run, demo_dir, cache_dir, tmp_path):
    # What a kill before the first checkpoint leaves: the partial folder with config.json only.
    partial = partial_dir(tmp_path / "again")
    partial.mkdir()
    (partial / "config.json").write_text((run.run_dir / "config.json").read_text())
    with pytest.raises(RunExistsError, match="--resume"):
        train(demo_dir, tmp_path / "again", cache_dir=cache_dir, **QUICK)
    resumed = train(None, tmp_path / "again", resume=True, cache_dir=cache_dir, verbose=0)
    assert resumed.split == run.split and resumed.metrics["epochs_run"] == run.metrics["epochs_run"]
    assert resumed.threshold == pytest.approx(run.threshold, abs=1e-5)
    assert not partial.exists()


def _interrupted_and_resumed(demo_dir, cache_dir, out: Path, monkeypatch, settings: dict):
    """Train ``out`` with ``settings``, interrupted right after the checkpoint of epoch 1, then resume it."""
    real = checkpoints.save_checkpoint

    def interrupt_after_epoch_1(folder, model, best_weights, state):
        real(folder, model, best_weights, state)
        if state.epochs_done == 1:
            raise KeyboardInterrupt  # as Ctrl-C right after the checkpoint

    monkeypatch.setattr(checkpoints, "save_checkpoint", interrupt_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(demo_dir, out, cache_dir=cache_dir, **settings)
    monkeypatch.setattr(checkpoints, "save_checkpoint", real)
    return train(None, out, resume=True, cache_dir=cache_dir, verbose=0)


def test_a_resumed_idc_net_draws_the_same_dropout_masks(demo_dir, cache_dir, tmp_path, monkeypatch):
    """idc_net's dropout draws from a random-seed state that model.save leaves out; the checkpoint keeps it."""
    settings = {**QUICK, "model_name": "idc_net", "epochs": 2, "batch_size": 16}
    whole = train(demo_dir, tmp_path / "whole", cache_dir=cache_dir, **settings)
    resumed = _interrupted_and_resumed(demo_dir, cache_dir, tmp_path / "resumed", monkeypatch, settings)
    np.testing.assert_allclose(resumed.history["loss"], whole.history["loss"], atol=1e-5)
    for a, b in zip(resumed.model.get_weights(), whole.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_two_processes_never_train_the_same_partial_run(run, demo_dir, cache_dir, tmp_path):
    import fcntl

    partial = partial_dir(tmp_path / "r")
    partial.mkdir()
    (partial / "config.json").write_text((run.run_dir / "config.json").read_text())
    with open(partial / ".lock", "w") as other:  # another process resuming it right now
        fcntl.flock(other, fcntl.LOCK_EX)
        other.write("4242\n")
        other.flush()
        with pytest.raises(RunBusyError, match=f"another train is writing {tmp_path / 'r'} \\(pid 4242\\)"):
            train(None, tmp_path / "r", resume=True, cache_dir=cache_dir, verbose=0)
        # A new run on the same --out is told the same, not that the live run was interrupted.
        with pytest.raises(RunBusyError, match=r"another train is writing .*\(pid 4242\)"):
            train(demo_dir, tmp_path / "r", cache_dir=cache_dir, **QUICK)
    assert (partial / "config.json").is_file()  # left as it was, still resumable
    with pytest.raises(RunExistsError, match="interrupted run") as info:  # once nobody holds it: interrupted
        train(demo_dir, tmp_path / "r", cache_dir=cache_dir, **QUICK)
    assert not isinstance(info.value, RunBusyError)


def test_the_run_config_decides_the_label_smoothing(run):
    """build_and_compile is what a new run and a run resumed before its first checkpoint compile with."""
    import keras

    from idc_helpers.models import SmoothedSparseCrossentropy

    old = {k: v for k, v in run.config.items() if k != "label_smoothing"}  # written before the option existed
    assert type(training.build_and_compile(old, 100).loss) is keras.losses.SparseCategoricalCrossentropy
    smoothed = training.build_and_compile({**old, "label_smoothing": 0.2}, 100).loss
    assert isinstance(smoothed, SmoothedSparseCrossentropy) and smoothed.smoothing == pytest.approx(0.2)


def test_a_smoothed_run_resumes_with_its_smoothing(demo_dir, cache_dir, tmp_path, monkeypatch):
    """The checkpoint is reloaded compiled: epoch 2 of the resumed run must use the smoothed loss again."""
    settings = {**QUICK, "epochs": 2, "label_smoothing": 0.2}
    whole = train(demo_dir, tmp_path / "whole", cache_dir=cache_dir, **settings)
    resumed = _interrupted_and_resumed(demo_dir, cache_dir, tmp_path / "resumed", monkeypatch, settings)
    assert resumed.config["label_smoothing"] == 0.2
    np.testing.assert_allclose(resumed.history["loss"], whole.history["loss"], atol=1e-5)
    for a, b in zip(resumed.model.get_weights(), whole.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_model_that_augments_itself_resumes_to_the_uninterrupted_result(demo_dir, cache_dir, tmp_path, monkeypatch):
    """IDC_AUGMENT_ON=model (what a GPU gets): a resumed run augments epoch 2 as an uninterrupted one does.

    The model augments its batches, seeded by a batch count that its checkpoint carries, so the resumed run does not
    augment epoch 2 as epoch 1 again.
    """
    monkeypatch.setenv("IDC_AUGMENT_ON", "model")
    # A steps_per_epoch beyond one pass is one pass.
    settings = {**QUICK, "epochs": 2, "augment": "strong", "steps_per_epoch": 10_000}
    whole = train(demo_dir, tmp_path / "whole", cache_dir=cache_dir, **settings)
    assert (whole.config["augment"], whole.config["augment_on"]) == ("strong", "model")
    assert whole.config["steps_per_epoch"] is None
    layer = whole.model.get_layer(AUGMENT_LAYER)
    steps = int(np.ceil(whole.config["split"]["patches"]["train"] / QUICK["batch_size"]))
    assert (layer.strength, layer.seed) == ("strong", 0) and int(layer.batches_seen.numpy()) in (steps, 2 * steps)
    resumed = _interrupted_and_resumed(demo_dir, cache_dir, tmp_path / "resumed", monkeypatch, settings)
    np.testing.assert_allclose(resumed.history["loss"], whole.history["loss"], atol=1e-5)
    for a, b in zip(resumed.model.get_weights(), whole.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert load_run(resumed.run_dir).model.get_layer(AUGMENT_LAYER).batches_seen.numpy() == layer.batches_seen.numpy()


def test_the_moving_average_spans_an_epoch_of_a_long_run_and_a_share_of_a_short_one():
    # 12 epochs of ~210 steps (a cross-validation fold of the shared data): the measured 0.995, ~200 steps.
    assert run_config.ema_momentum(12 * 210) == run_config.DEFAULT_EMA_MOMENTUM == 0.995
    assert run_config.ema_momentum(100) == pytest.approx(1 - 1 / (run_config.EMA_SHARE * 100))
    assert run_config.ema_momentum(10) == 0.0  # fewer steps than one averaged: the last weights themselves
    momenta = [run_config.ema_momentum(n) for n in range(1, 4000, 7)]
    assert momenta == sorted(momenta)


def test_an_averaged_run_trains_to_the_end_and_keeps_the_moving_average(demo_dir, cache_dir, tmp_path):
    # The default, averaging="ema": every planned epoch (patience plays no part), the optimizer's average as the final
    # weights, its momentum one that averages the last ~8% of this short run's steps.
    settings = {**QUICK, "model_name": "idc_net", "epochs": 3, "batch_size": 16, "patience": 1}
    run = train(demo_dir, tmp_path / "ema", cache_dir=cache_dir, **settings)
    steps = 3 * int(np.ceil(run.config["data"]["patches"]["train"] / 16))
    momentum = run_config.ema_momentum(steps)
    assert 0 < momentum < run_config.DEFAULT_EMA_MOMENTUM
    assert (run.config["averaging"], run.config["ema_momentum"], run.config["bn_batches"]) == ("ema", momentum, 60)
    assert run.metrics["epochs_run"] == 3
    assert run.metrics["weights"] == f"moving average (momentum {momentum}) over all 3 epochs"
    average = run.model.optimizer._model_variables_moving_average
    assert len(average) == len(run.model.trainable_variables)
    for v, a in zip(run.model.trainable_variables, average, strict=True):
        np.testing.assert_array_equal(v.numpy(), a.numpy())
    # The saved model is that one, batch-norm statistics included, and they are recomputed ones: not those of the
    # raw weights' last training steps, which the same run without averaging keeps.
    saved = load_run(run.run_dir)
    for a, b in zip(saved.model.get_weights(), run.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    plain = train(demo_dir, tmp_path / "plain", cache_dir=cache_dir, **{**settings, "patience": 10}, averaging="none")
    assert plain.config["averaging"] == "none" and "ema_momentum" not in plain.config
    assert plain.metrics["weights"] == f"best epoch, {plain.metrics['best_epoch']} of 3"
    mean = {w.path: w.numpy() for w in run.model.weights if w.path.endswith("moving_mean")}
    plain_mean = {w.path: w.numpy() for w in plain.model.weights if w.path.endswith("moving_mean")}
    assert mean.keys() == plain_mean.keys() and mean
    assert any(not np.allclose(mean[k], plain_mean[k], atol=1e-4) for k in mean)


def test_an_averaged_run_resumes_to_the_uninterrupted_result(demo_dir, cache_dir, tmp_path, monkeypatch):
    """The moving average lives in the optimizer's state, which the checkpoint keeps."""
    settings = {**QUICK, "model_name": "idc_net", "epochs": 2, "batch_size": 16, "averaging": "ema"}
    whole = train(demo_dir, tmp_path / "whole", cache_dir=cache_dir, **settings)
    resumed = _interrupted_and_resumed(demo_dir, cache_dir, tmp_path / "resumed", monkeypatch, settings)
    assert resumed.config["averaging"] == "ema"
    for a, b in zip(resumed.model.get_weights(), whole.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_cli_averaging_reaches_the_run_and_is_not_given_again_on_resume(demo_dir, cache_dir, tmp_path, cli_error):
    out = tmp_path / "run"
    args = ["--model", "seed_cnn", "--epochs", "1", "--batch-size", "32", "--averaging", "ema"]
    done = subprocess.run(
        _train_command(demo_dir, cache_dir, "--out", str(out), *args), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert load_run(out).config["averaging"] == "ema"
    # A resumed run reads its averaging back from its config.json: giving it again is refused, as any such option.
    assert "--averaging" in cli_error(["train", "--resume", str(out), "--averaging", "ema"])
    assert "'swa'" in cli_error(
        ["train", "--data-dir", str(demo_dir), "--out", str(tmp_path / "x"), "--averaging", "swa"]
    )


def test_cli_weighting_is_one_of_its_choices_and_not_given_again_on_resume(run, demo_dir, tmp_path, cli_error):
    assert "'slide'" in cli_error(
        ["train", "--data-dir", str(demo_dir), "--out", str(tmp_path / "x"), "--weighting", "slide"]
    )
    assert "--weighting" in cli_error(["train", "--resume", str(run.run_dir), "--weighting", "patient"])


def test_averaging_is_one_of_its_choices(demo_dir, cache_dir, tmp_path):
    with pytest.raises(InvalidInputError, match=r"averaging 'swa'.*none, ema"):
        train(demo_dir, tmp_path / "run", cache_dir=cache_dir, averaging="swa", **QUICK)
    assert not (tmp_path / "run").exists()


# --- input checks: numbers, an edited config, a full disk -------------------------------------------------------


@pytest.mark.parametrize(
    "bad, named",
    [
        ({"epochs": 0}, "epochs 0"),
        ({"epochs": -3}, "epochs -3"),
        ({"batch_size": -5}, "batch-size -5"),
        ({"max_patches": 0}, "max-patches 0"),
        ({"seed": -1}, "seed -1"),
        ({"steps_per_epoch": 0}, "steps-per-epoch 0"),
        ({"label_smoothing": float("nan")}, "label-smoothing nan"),
        ({"test_patients": ["8863 "]}, "'8863 '"),
    ],
)
def test_numbers_are_checked_before_anything_is_written(demo_dir, cache_dir, tmp_path, bad, named):
    with pytest.raises(InvalidInputError, match=re.escape(named) + r".* is not allowed: use"):
        train(demo_dir, tmp_path / "r", cache_dir=cache_dir, **{**QUICK, **bad})
    assert list(tmp_path.iterdir()) == []


def test_cli_epochs_below_one_are_refused_and_block_nothing(demo_dir, tmp_path, cli_error):
    for value in ("-3", "0", "1.5", "three"):
        err = cli_error(["train", "--data-dir", str(demo_dir), "--out", str(tmp_path / "r"), "--epochs", value])
        assert f"--epochs: '{value}' is not allowed: use a whole number of at least 1" in err
    assert list(tmp_path.iterdir()) == []  # no hidden partial folder to block the next train


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("epochs", -1, "a whole number of at least 1"),
        ("batch_size", 0, "a whole number of at least 1"),
        ("model", "idc_net2", "one of seed_cnn"),
        ("label_smoothing", 1.0, r"in \[0, 1\)"),
    ],
)
def test_an_edited_config_is_refused_on_resume(run, cache_dir, tmp_path, key, value, allowed):
    partial = partial_dir(tmp_path / "r")
    partial.mkdir()
    config = {**json.loads((run.run_dir / "config.json").read_text()), key: value}
    (partial / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match=allowed) as info:
        train(None, tmp_path / "r", resume=True, cache_dir=cache_dir, verbose=0)
    assert str(partial / "config.json") in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"widht": 2}, "model_kwargs.widht (PATH) is not an option of idc_net: use width, dropout"),
        ({"width": "2"}, "model_kwargs.width '2' (PATH) is not a number"),
        ({"width": 1.5}, "width 1.5 (PATH) is not allowed: use a whole number of at least 1"),
        ({"bn_momentum": 1.0}, "bn-momentum 1.0 (PATH) is not allowed: use a finite number in (0, 1)"),
        ({"bn_epsilon": 0}, "bn-epsilon 0 (PATH) is not allowed: use a finite number above 0"),
        ({"residual": "yes"}, "model_kwargs.residual 'yes' (PATH): use true or false"),
        ({"mixed_precision": "fp8"}, "model_kwargs.mixed_precision 'fp8' (PATH): unknown mixed precision"),
        ({"augment": "strong"}, "model_kwargs.augment (PATH) is not an option of idc_net"),
    ],
)
def test_edited_model_options_are_refused_on_resume_before_the_data_is_read(run, tmp_path, kwargs, message):
    partial = partial_dir(tmp_path / "r")
    partial.mkdir()
    config = {**json.loads((run.run_dir / "config.json").read_text()), "model": "idc_net", "model_kwargs": kwargs}
    (partial / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError) as info:  # no data folder: the refusal comes before any is read
        train(None, tmp_path / "r", resume=True, cache_dir=tmp_path / "no-cache", verbose=0)
    assert message.replace("PATH", str(partial / "config.json")) in str(info.value)
    assert not (tmp_path / "no-cache").exists()


def test_model_options_of_another_model_are_refused_before_anything_is_written(demo_dir, cache_dir, tmp_path):
    with pytest.raises(
        InvalidInputError, match=r"model_kwargs.residual \(train\(model_kwargs=...\)\) is not an option"
    ):
        train(demo_dir, tmp_path / "r", cache_dir=cache_dir, **QUICK, model_kwargs={"residual": True})
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_after_training_is_exit_3_and_the_run_resumes(
    run, demo_dir, cache_dir, tmp_path, monkeypatch, capsys
):
    from idc_helpers.cli import main
    from idc_helpers.run_folder import run_writer

    real = training.write_run_files

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training, "write_run_files", disk_full)
    code = main(
        [
            "train",
            "--data-dir",
            str(demo_dir),
            "--out",
            str(tmp_path / "r"),
            "--cache-dir",
            str(cache_dir),
            "--model",
            "seed_cnn",
            "--epochs",
            "1",
            "--batch-size",
            "32",
        ]
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 3 and len(errors) == 1, errors
    assert errors[0].startswith("error: the disk is full") and f"train --resume {tmp_path / 'r'}" in errors[0]
    partial = partial_dir(tmp_path / "r")
    assert run_writer(partial) is None  # no live lock left: the resume is not told another train writes it
    monkeypatch.setattr(training, "write_run_files", real)
    resumed = train(None, tmp_path / "r", resume=True, cache_dir=cache_dir, verbose=0)
    assert resumed.threshold == pytest.approx(run.threshold, abs=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_a_disk_full_before_the_first_checkpoint_leaves_nothing(demo_dir, cache_dir, small_mount):
    mount = small_mount("size=300k")  # room for the config, not for a checkpoint
    with pytest.raises(DiskFullError, match=r"disk is full.*train again") as info:
        train(demo_dir, mount / "r", cache_dir=cache_dir, **QUICK)
    assert "\n" not in str(info.value)
    assert list(mount.iterdir()) == []


def test_out_a_link_to_an_empty_folder_trains_into_that_folder(run, demo_dir, cache_dir, tmp_path):
    (tmp_path / "bigger_disk" / "runs").mkdir(parents=True)
    link = tmp_path / "r"
    link.symlink_to(tmp_path / "bigger_disk" / "runs")
    result = train(demo_dir, link, cache_dir=cache_dir, **QUICK)
    assert link.is_symlink() and result.run_dir == (tmp_path / "bigger_disk" / "runs")
    assert sorted(p.name for p in link.iterdir()) == sorted(RUN_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bigger_disk", "r"]  # nothing hidden left beside either
    assert sorted(p.name for p in (tmp_path / "bigger_disk").iterdir()) == ["runs"]
    assert load_run(link).threshold == pytest.approx(run.threshold, abs=1e-5)


@pytest.mark.parametrize("target, message", [("missing", "which does not exist"), ("a_file", "not to a folder")])
def test_out_a_dangling_link_or_a_link_to_a_file_is_refused_before_work(demo_dir, tmp_path, cli_error, target, message):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "r").symlink_to(tmp_path / target)
    before = sorted(p.name for p in tmp_path.iterdir())
    err = cli_error(["train", "--data-dir", str(demo_dir), "--out", str(tmp_path / "r"), "--epochs", "1"])
    assert f"--out {tmp_path / 'r'} is a symbolic link to" in err and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_ctrl_c_while_the_command_line_loads_is_exit_130_without_a_traceback(monkeypatch, capsys):
    from idc_helpers import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for where in ("build_parser", "quiet_tensorflow"):
        with monkeypatch.context() as patch:
            patch.setattr(cli, where, interrupted)
            assert cli.main(["train", "--out", "r"]) == 130
        assert capsys.readouterr().err == "Interrupted.\n"


@pytest.mark.parametrize("delay", [0.3, 2.0, 6.0])
def test_ctrl_c_at_any_moment_of_train_is_exit_130_without_a_traceback(demo_dir, cache_dir, tmp_path, delay):
    """While Python loads the package, while TensorFlow loads, and while data is read or the model trains."""
    env = {**os.environ, "IDC_CACHE_DIR": str(cache_dir)}
    # As from a terminal: a test session started in the background (`pytest &`) ignores SIGINT, and a child would
    # inherit that; a handled SIGINT is the default again after exec.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    process = subprocess.Popen(
        _train_command(demo_dir, cache_dir, "--out", str(tmp_path / "r")),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    signal.signal(signal.SIGINT, handler)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    if process.returncode == 0:
        pytest.fail(f"the run finished within {delay} s: the interrupt came too late to test anything")
    # 130 from main, or death by SIGINT itself, which a shell reports as 130 too (Python ends that way when the
    # interrupt lands in its own shutdown): either way no traceback.
    assert process.returncode in (130, -signal.SIGINT) and "Traceback" not in err, err
    assert "Interrupted." in err


def test_options_are_matched_whole(demo_dir, tmp_path, cli_error):
    err = cli_error(["train", "--data-dir", str(demo_dir), "--out", str(tmp_path / "r"), "--epoch", "3"])
    assert "unrecognized arguments: --epoch 3" in err
    assert list(tmp_path.iterdir()) == []


def test_a_train_started_meanwhile_on_the_same_folder_is_named(demo_dir, cache_dir, tmp_path, monkeypatch):
    """The other train created the partial run while this one read the data."""
    real = training.prepare_data

    def other_train_starts(*args, **kwargs):
        partial_dir(tmp_path / "r").mkdir()
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "prepare_data", other_train_starts)
    with pytest.raises(RunBusyError, match=f"another train is writing {tmp_path / 'r'}; wait for it"):
        train(demo_dir, tmp_path / "r", cache_dir=cache_dir, **QUICK)
