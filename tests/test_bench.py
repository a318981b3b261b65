"""Benchmarks: the cross-validation and speed commands' core functions on a tiny synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from idc_helpers.bench import quality


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """Six small synthetic patients (about 200 patches)."""
    from idc_helpers.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("data") / "demo", n_patients=6, seed=0, grid=(8, 6))


def _split_into_two_folders(demo_dir: Path, root: Path) -> list[Path]:
    """The demo patients shared out over two dataset folders (links, as two downloads would be)."""
    patients = sorted(p for p in demo_dir.iterdir() if p.is_dir())
    folders = [root / "a", root / "b"]
    for i, patient in enumerate(patients):
        folders[i % 2].mkdir(parents=True, exist_ok=True)
        (folders[i % 2] / patient.name).symlink_to(patient, target_is_directory=True)
    return folders


def test_quality_cross_validation_tests_every_patient_once_and_resumes(demo_dir, tmp_path, capsys):
    out = tmp_path / "cv"
    folders = _split_into_two_folders(demo_dir, tmp_path / "data")
    args = {
        "n_folds": 2,
        "models": ["seed_cnn"],
        "epochs": 1,
        "cache_dir": tmp_path / "cache",
        "n_bootstrap": 20,
        "fold_bootstrap": 10,
        "tta": True,
        "verbose": 0,
    }
    result = quality.run_quality(folders, out, **args)
    records = result["records"]
    assert [r["fold"] for r in records] == [0, 1]
    tested = [p for r in records for p in r["test_patients"]]
    assert sorted(tested) == sorted({p.name for p in demo_dir.iterdir() if p.is_dir()})  # each patient once
    for r in records:
        assert not set(r["test_patients"]) & set(r["val_patients"])
        f1 = r["test"]["groups"]["all"]["f1"]
        assert 0.0 <= f1["value"] <= 1.0 and r["train_seconds"] is not None
        assert f1["ci_low"] is None or f1["ci_low"] <= f1["value"] <= f1["ci_high"]
        # The demo patients are whole slides: the context step is fitted on the validation slides.
        assert r["test"]["groups"]["whole slide"]["patches"] == r["test"]["groups"]["all"]["patches"]
        assert r["context"]["params"]["patients"] == sorted(r["val_patients"], key=str)
    pooled = result["pooled"]
    assert pooled["seed_cnn | patch | all"]["counts"]["patients"] == 6
    assert pooled["seed_cnn | context + TTA | whole slide"]["counts"]["patients"] == 6
    text = (out / "results.md").read_text()
    assert (out / "oof_seed_cnn.csv").is_file() and "| seed_cnn | 0 | all |" in text
    assert text.index("patch only") < text.index("WITH SLIDE CONTEXT")

    # A rerun with the same settings resumes from the log (nothing retrained) ...
    again = quality.run_quality(folders, out, **args)
    assert len(again["records"]) == 2 and "already in" in capsys.readouterr().out
    assert len((out / quality.LOG_FILE).read_text().splitlines()) == 2
    # ... and other settings are refused instead of mixed into the same log.
    with pytest.raises(quality.QualityBenchError, match="other settings"):
        quality.run_quality(folders, out, **{**args, "epochs": 2})
    # The final-weights rule is recorded resolved: a folder written before it was (the best epoch's weights, the
    # default of then) resumes only when that rule is given, never under today's default.
    config = json.loads((out / quality.CONFIG_FILE).read_text())
    assert config["averaging"] == "ema" and config["train_options"] == {}
    assert all(r["best_epoch"] is None for r in records) and "| average / 1 |" in text  # no epoch was kept
    del config["averaging"]
    (out / quality.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(quality.QualityBenchError, match=r"\(averaging\).*--averaging none, --epochs 1"):
        quality.run_quality(folders, out, **args)
    capsys.readouterr()
    quality.run_quality(folders, out, **args, train_options={"averaging": "none"})
    assert "already in" in capsys.readouterr().out


def test_quality_finishes_a_fold_whose_training_was_interrupted_from_its_checkpoint(
    demo_dir, tmp_path, capsys, monkeypatch
):
    from idc_helpers import checkpoints
    from idc_helpers.run_folder import has_interrupted_run

    out = tmp_path / "cv"
    args = {"n_folds": 2, "models": ["seed_cnn"], "epochs": 2, "cache_dir": tmp_path / "cache"}
    args.update(n_bootstrap=0, fold_bootstrap=0, only_folds=[0], verbose=0)
    real = checkpoints.save_checkpoint

    def interrupt_after_epoch_1(folder, model, best_weights, state):
        real(folder, model, best_weights, state)
        if state.epochs_done == 1:
            raise KeyboardInterrupt  # as a kill right after the first epoch's checkpoint

    monkeypatch.setattr(checkpoints, "save_checkpoint", interrupt_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        quality.run_quality([demo_dir], out, **args)
    run_dir = out / "runs" / "seed_cnn-fold0"
    assert has_interrupted_run(run_dir) and not (out / quality.LOG_FILE).exists()
    monkeypatch.setattr(checkpoints, "save_checkpoint", real)
    result = quality.run_quality([demo_dir], out, **args)  # the same command again: the fold goes on, not over
    assert "resuming the interrupted training" in capsys.readouterr().out
    assert [r["fold"] for r in result["records"]] == [0] and not has_interrupted_run(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    assert metrics["epochs_run"] == 2 and len(history["loss"]) == 2  # epoch 1 from before the kill, epoch 2 now


def test_merged_view_links_every_patient_and_refuses_one_patient_in_two_folders(tmp_path):
    for folder, patients in (("a", ["1", "2"]), ("b", ["3"]), ("c", ["2"])):
        for p in patients:
            (tmp_path / folder / p / "0").mkdir(parents=True)
    view = quality.merged_view([tmp_path / "a", tmp_path / "b"])
    assert sorted(p.name for p in view.iterdir()) == ["1", "2", "3"]
    assert (view / "3").resolve() == (tmp_path / "b" / "3").resolve()
    assert quality.merged_view([tmp_path / "a"]) == (tmp_path / "a").absolute()  # one folder: used as it is
    with pytest.raises(quality.QualityBenchError, match="patient 2 is in both"):
        quality.merged_view([tmp_path / "a", tmp_path / "c"])


def test_score_groups_reports_whole_slide_and_sparse_patients_apart():
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    preds = pd.DataFrame(
        {"patient_id": np.repeat(["1", "2", "3", "4"], 50), "label": np.tile([0, 1], 100), "prob_idc": rng.random(200)}
    )
    preds.loc[preds["patient_id"].isin(["1", "2"]), "prob_idc"] = preds["label"] * 0.8 + 0.1  # perfect slides
    groups = quality.score_groups(preds, {"1", "2"}, 0.5, n_bootstrap=10)
    assert groups["all"]["patches"] == 200 and groups["whole slide"]["patients"] == 2
    assert groups["whole slide"]["f1"]["value"] == 1.0 and groups["sparse"]["f1"]["value"] < 0.8
    assert groups["sparse"]["f1_best"] >= groups["sparse"]["f1"]["value"]


def test_read_log_ignores_a_torn_last_line(tmp_path):
    (tmp_path / quality.LOG_FILE).write_text(json.dumps({"model": "m", "fold": 0}) + '\n{"model": ')
    assert quality.read_log(tmp_path) == [{"model": "m", "fold": 0}]


def test_read_table_names_an_unreadable_table_and_the_fix(tmp_path):
    table = pd.DataFrame({"path": ["1/0/a.png"], "patient_id": ["1"], "prob_idc": [0.25]})
    quality.write_table(table, tmp_path / "idc_net-fold0.csv")
    assert quality.read_table(tmp_path / "idc_net-fold0.csv").equals(table)
    truncated = tmp_path / "idc_net-fold0.csv.gz"
    truncated.write_bytes(b"\x1f\x8b\x08\x00 truncated")
    with pytest.raises(quality.TableError, match=r"idc_net-fold0\.csv\.gz cannot be read .*; write it again$"):
        quality.read_table(truncated)
    with pytest.raises(quality.TableError, match=r"absent\.csv cannot be read .*; rerun the fold$"):
        quality.read_table(tmp_path / "absent.csv", fix="rerun the fold")


def test_quality_augment_option_reaches_training_and_the_config(demo_dir, tmp_path, capsys):
    out = tmp_path / "cv"
    common = [
        "--data-dir",
        str(demo_dir),
        "--folds",
        "2",
        "--only-folds",
        "0",
        "--models",
        "seed_cnn",
        "--epochs",
        "1",
        "--max-patches",
        "60",
        "--bootstrap",
        "10",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert quality.main([*common, "--augment", "strong", "--out", str(out)]) == 0
    config = json.loads((out / quality.CONFIG_FILE).read_text())
    assert config["train_options"] == {"augment": "strong"}
    run_config = json.loads((out / "runs" / "seed_cnn-fold0" / "config.json").read_text())
    assert run_config["augment"] == "strong"
    # Resuming the folder with another strength is refused rather than mixed into its log.
    assert quality.main([*common, "--augment", "light", "--out", str(out)]) == 2
    assert "other settings (train_options)" in capsys.readouterr().err
    # Label smoothing reaches training when given (and only then: the folder above recorded no such key).
    smooth = tmp_path / "smooth"
    assert quality.main([*common, "--label-smoothing", "0.1", "--out", str(smooth)]) == 0
    assert json.loads((smooth / quality.CONFIG_FILE).read_text())["train_options"] == {"label_smoothing": 0.1}
    assert json.loads((smooth / "runs" / "seed_cnn-fold0" / "config.json").read_text())["label_smoothing"] == 0.1
    # A model seed: another member on the same folds and splits.
    member = tmp_path / "member"
    assert quality.main([*common, "--model-seed", "1", "--out", str(member)]) == 0
    assert json.loads((member / quality.CONFIG_FILE).read_text())["train_options"] == {"model_seed": 1}
    member_run = json.loads((member / "runs" / "seed_cnn-fold0" / "config.json").read_text())
    assert (member_run["model_seed"], member_run["seed"]) == (1, 0)
    assert member_run["split"]["patients"] == run_config["split"]["patients"]
    capsys.readouterr()
    # Width reaches idc_net's builder; refused for a model that has no width, before a folder is written.
    wide = tmp_path / "wide"
    idc = [*common[: common.index("--models")], "--models", "idc_net", *common[common.index("--models") + 2 :]]
    assert quality.main([*idc, "--width", "2", "--out", str(wide)]) == 0
    wide_run = json.loads((wide / "runs" / "idc_net-fold0" / "config.json").read_text())
    assert wide_run["model_kwargs"] == {"width": 2}
    assert quality.main([*common, "--width", "2", "--out", str(tmp_path / "narrow")]) == 2
    assert "with --models idc_net alone" in capsys.readouterr().err and not (tmp_path / "narrow").exists()


def test_quality_takes_the_model_study_options_only_where_they_apply(tmp_path, capsys):
    out = tmp_path / "cv"
    assert quality.main(["--data-dir", str(tmp_path), "--models", "seed_cnn", "--residual", "--out", str(out)]) == 2
    assert "--residual is an option of idc_net" in capsys.readouterr().err and not out.exists()
    # Each idc_net option, refused for another model and for a value the builder cannot take, before any folder.
    for flags, message in (
        (["--models", "seed_cnn", "--bn-momentum", "0.99"], "--bn-momentum is an option of idc_net"),
        (["--models", "idc_net,seed_cnn", "--width", "2"], "--width is an option of idc_net"),
        (["--models", "idc_net", "--width", "0"], "width 0 (the command line) is not allowed: use a whole number of"),
        (["--models", "idc_net", "--bn-momentum", "1"], "bn-momentum 1.0 (the command line) is not allowed: use a"),
    ):
        assert quality.main(["--data-dir", str(tmp_path), *flags, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as exited:
        quality.main(["--data-dir", str(tmp_path), "--weighting", "slide", "--out", str(out)])
    assert exited.value.code == 2 and "'slide'" in capsys.readouterr().err and not out.exists()


def test_quality_refuses_the_old_no_augment_with_one_line_naming_the_new_word(tmp_path, capsys):
    out = tmp_path / "cv"
    assert quality.main(["--data-dir", str(tmp_path), "--no-augment", "--out", str(out)]) == 2
    assert capsys.readouterr().err == "error: --no-augment is no longer accepted: use --augment none.\n"
    assert not out.exists()


def test_quality_refuses_a_label_smoothing_outside_0_to_1_before_writing_anything(tmp_path, capsys):
    # Refused up front: a results folder that recorded the bad value could not be resumed with a good one.
    out = tmp_path / "cv"
    assert quality.main(["--data-dir", str(tmp_path), "--label-smoothing", "1.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --label-smoothing: label smoothing must be a number in [0, 1), got 1.5")
    assert len(err.splitlines()) == 1 and not out.exists()


def test_speed_measurements_run_and_print_a_table(demo_dir, tmp_path):
    from idc_helpers.bench import speed
    from idc_helpers.loader import load_patches
    from idc_helpers.patch_index import build_index

    frame = build_index(demo_dir).frame
    loaded = load_patches(frame, cache_dir=tmp_path / "cache")
    training = speed.training_throughput(
        loaded.images, loaded.labels, model_name="seed_cnn", batch_size=16, steps=2, repeats=1, in_memory_patches=64
    )
    assert len(training) == 5 and all(v["patches_per_s"] > 0 for v in training.values())
    prediction = speed.prediction_throughput(loaded.images, model_name="seed_cnn", patches=64, repeats=1)
    assert set(prediction) == {"no TTA", "with TTA (8 views)"}

    # Full-size memory measurement, shrunk: hard-linked copies under new patient ids, two fresh processes.
    memory = speed.peak_memory(frame, tmp_path / "full", model_name="seed_cnn", steps=2, n_patches=len(frame) * 2)
    assert not (tmp_path / "full").exists()  # the temporary tree and cache are deleted
    for phase in ("decode and train", "train from cache"):
        assert memory[phase]["peak_rss_mb"] > 0 and memory[phase]["steps"] == 2
    report = {
        "machine": speed._machine(),
        "training_config": {"model": "seed_cnn", "batch_size": 16, "steps": 2, "repeats": 1},
        "training": training,
        "prediction": prediction,
        "prediction_patches": 64,
        "memory": memory,
        "full_epoch_estimate": {
            "patches_per_s": 100.0,
            "train_share_patches": 10,
            "train_share_minutes": 1.0,
            "all_minutes": 2.0,
        },
    }
    text = speed.markdown(report)
    assert "| pipeline (memmap) + augmentation |" in text and "Peak memory" in text


def test_speed_pipeline_alone_is_measured_beside_training(demo_dir, tmp_path):
    from idc_helpers.bench import speed
    from idc_helpers.loader import load_patches
    from idc_helpers.patch_index import build_index

    loaded = load_patches(build_index(demo_dir).frame, cache_dir=tmp_path / "cache")
    alone = speed.pipeline_throughput(
        loaded.images, loaded.labels, batch_size=16, batches=3, repeats=2, settings=("none", "mild")
    )
    assert set(alone) == {"none", "mild"} and all(
        len(v["runs"]) == 2 and v["patches_per_s"] > 0 for v in alone.values()
    )
    assert alone["none"]["ratio_to_none"] == 1.0
    training = {"pipeline (memmap) + augmentation": {"patches_per_s": alone["mild"]["patches_per_s"] / 10}}
    text = "\n".join(
        speed._pipeline_markdown(
            {"pipeline": alone, "training": training, "pipeline_config": {"batch_size": 16, "batches": 3, "repeats": 2}}
        )
    )
    assert "| mild |" in text and "the pace is set by the model" in text
    training["pipeline (memmap) + augmentation"]["patches_per_s"] = alone["mild"]["patches_per_s"]
    text = "\n".join(
        speed._pipeline_markdown(
            {"pipeline": alone, "training": training, "pipeline_config": {"batch_size": 16, "batches": 3, "repeats": 2}}
        )
    )
    assert "the pace is set by the input pipeline" in text


def test_gpu_check_runs_on_a_cpu_with_tiny_settings(tmp_path):
    from idc_helpers.bench import speed

    report = speed.gpu_check(
        tmp_path / "work",
        patches=200,
        epochs=2,
        batch_sizes=(32, 64),
        model_name="seed_cnn",
        pipeline_batches=2,
        time_budget_s=1e9,
    )
    assert not (tmp_path / "work" / "synthetic_patches.npy").exists()  # the 2 GB stand-in is deleted
    assert [(r["batch_size"], r["augmentation_in"]) for r in report["runs"]] == [
        (32, "pipeline"),
        (32, "model"),
        (64, "pipeline"),
        (64, "model"),
    ]
    assert report["train_patches"] == 140
    for run in report["runs"]:
        assert len(run["epoch_seconds"]) == 2 and all(r > 0 for r in run["train_patches_per_s"])
        assert set(run["pipeline_alone_patches_per_s"]) == {"none", "mild"}
        assert isinstance(run["pipeline_bound"], bool)
    assert "| 32 |" in report["markdown"] and "pipeline-bound" in report["markdown"]
    skipped = speed.gpu_check(
        tmp_path / "work",
        patches=200,
        epochs=1,
        batch_sizes=(32,),
        model_name="seed_cnn",
        pipeline_batches=1,
        time_budget_s=0,
        placements=("model",),
    )
    assert skipped["runs"] == [] and skipped["skipped"] == ["batch 32, augmentation in the model"]
    assert "Skipped for time" in skipped["markdown"]


# --- loading benchmark ---------------------------------------------------------------------------------------------


def test_full_size_tree_is_hard_links_under_new_patient_ids(tiny_dataset, tmp_path):
    import os

    from idc_helpers.bench import load
    from idc_helpers.patch_index import build_index

    frame = build_index(tiny_dataset).frame
    root = load.make_full_size_tree(frame, tmp_path / "full", n_patches=100)
    big = build_index(root)
    assert big.problems == [] and len(big.frame) == 100  # valid names, no duplicate positions
    assert big.frame["patient_id"].nunique() == 9  # 3 copies of the 3 patients (the third one partial)
    first = big.frame.iloc[0]
    assert os.stat(first["path"]).st_ino in {os.stat(p).st_ino for p in frame["path"]}


def test_load_benchmark_runs_on_several_folders_and_prints_a_table(tiny_dataset, tmp_path, capsys):
    import shutil

    from idc_helpers.bench import load

    other = tmp_path / "other"
    shutil.move(str(tiny_dataset / "103"), other / "103")
    out = tmp_path / "load.json"
    assert (
        load.main(["--data-dir", str(tiny_dataset), "--data-dir", str(other), "--repeats", "1", "--out", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "## Loading benchmark" in text and "36 patches" in text
    report = json.loads(out.read_text())
    runs = report["results"][0]["runs"]
    assert runs["first"][0]["decoded"] == 36 and runs["cached"][0]["decoded"] == 36
    assert runs["plain"][0]["decoded"] == 36


def test_boundary_splits_the_whole_slide_test_patches_and_names_a_wrong_folder(demo_dir, tmp_path, capsys):
    from idc_helpers.bench import boundary
    from idc_helpers.slide_context import label_boundary

    out = tmp_path / "cv"
    assert (
        quality.main(
            [
                "--data-dir",
                str(demo_dir),
                "--folds",
                "2",
                "--only-folds",
                "0",
                "--models",
                "seed_cnn",
                "--epochs",
                "1",
                "--bootstrap",
                "10",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    table = boundary.whole_slide_part(boundary.fold_predictions(out, "seed_cnn"), out)
    test_patients = quality.read_log(out)[0]["test_patients"]
    assert sorted(table["patient_id"].astype(str).unique()) == sorted(test_patients)  # demo patients are slides
    np.testing.assert_array_equal(table["boundary"].to_numpy(), label_boundary(table))
    assert 0 < table["boundary"].sum() < len(table)

    capsys.readouterr()
    assert (
        boundary.main(
            ["--quality", str(out), "--models", "seed_cnn", "--bootstrap", "10", "--out", str(tmp_path / "b")]
        )
        == 0
    )
    written = json.loads((tmp_path / "b" / "boundary.json").read_text())
    results = written["boundary"]["seed_cnn (cv)"]
    assert results["interior"]["patches"] + results["boundary"]["patches"] == results["all"]["patches"] == len(table)
    assert results["interior"]["errors"] + results["boundary"]["errors"] == results["all"]["errors"]
    assert results["all"]["errors"] == int((table["pred"] != table["label"]).sum())
    bounds = written["thresholds"]["seed_cnn (cv)"]
    assert set(bounds) == {"fold thresholds", "own threshold per patient (oracle)"}
    everyone = boundary.fold_predictions(out, "seed_cnn")
    y, oracle = everyone["label"].to_numpy(), boundary.patient_oracle_predictions(everyone)

    def gain(pred):  # what the oracle maximises patient by patient, so also in total
        return int(((pred == 1) & (y == 1)).sum() - ((pred == 1) & (y == 0)).sum() - ((pred == 0) & (y == 1)).sum())

    assert gain(oracle) >= gain(everyone["pred"].to_numpy())
    assert bounds["fold thresholds"]["patients"] == len(test_patients)  # all test patients, not slides only
    printed = capsys.readouterr().out
    assert "| seed_cnn (cv) | boundary |" in printed
    assert "| seed_cnn (cv) | own threshold per patient (oracle) |" in printed

    assert boundary.main(["--quality", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    assert "holds no cross-validation" in capsys.readouterr().err
    assert boundary.main(["--quality", str(out), "--models", "idc_net", "--out", str(tmp_path / "c")]) == 2
    assert "no finished fold of idc_net" in capsys.readouterr().err


def test_patient_oracle_threshold_is_each_patients_best_cut_and_keeps_ties_together():
    import pandas as pd

    from idc_helpers.bench.boundary import patient_oracle_predictions

    rng = np.random.default_rng(1)
    rows = []
    for pid, shift in (("1", 0.0), ("2", 0.4), ("3", -0.3)):  # the same ranking on three probability scales
        label = rng.random(80) < 0.4
        rows.append(
            pd.DataFrame(
                {
                    "patient_id": pid,
                    "label": label.astype(int),
                    "prob_idc": np.clip(0.3 + 0.3 * label + shift + rng.normal(0, 0.15, 80), 0, 1),
                }
            )
        )
    table = pd.concat(rows, ignore_index=True)
    oracle = patient_oracle_predictions(table)

    def gain(pred, rows):
        y = table["label"].to_numpy()[rows]
        return int(((pred == 1) & (y == 1)).sum() - ((pred == 1) & (y == 0)).sum() - ((pred == 0) & (y == 1)).sum())

    for rows in table.groupby("patient_id").indices.values():
        probs = table["prob_idc"].to_numpy()[rows]
        best_any = max(gain((probs >= t).astype(int), rows) for t in np.r_[probs, 2.0])
        assert gain(oracle[rows], rows) == best_any  # no single cut of this patient does better
    # Tied probabilities get one decision; a patient without IDC is called IDC nowhere.
    tied = pd.DataFrame(
        {
            "patient_id": ["a"] * 4 + ["b"] * 3,
            "label": [1, 0, 1, 0, 0, 0, 0],
            "prob_idc": [0.9, 0.5, 0.5, 0.1, 0.8, 0.7, 0.2],
        }
    )
    decided = patient_oracle_predictions(tied)
    assert decided[1] == decided[2] and decided[0] == 1 and not decided[4:].any()


def test_a_benchmark_prints_no_tensorflow_start_up_lines(tmp_path):
    """A benchmark that trains imports TensorFlow quietly: a mistake is the one error line, nothing above it."""
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "idc_helpers.bench",
            "quality",
            "--data-dir",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "q"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    unknown = subprocess.run(
        [sys.executable, "-m", "idc_helpers.bench", "nope"], capture_output=True, text=True, timeout=60
    )
    assert unknown.returncode == 2 and unknown.stderr.splitlines()[-1].startswith("error: unknown benchmark 'nope'")
    bogus = subprocess.run(
        [sys.executable, "-m", "idc_helpers.bench", "load", "--bogus"], capture_output=True, text=True, timeout=60
    )
    assert bogus.returncode == 2 and bogus.stderr.startswith("error: ") and bogus.stderr.count("\n") == 1


def test_every_message_of_the_package_says_error_in_lower_case():
    """One spelling for every refusal, `error:` (argparse's own and the benchmarks' included)."""
    import re

    package = Path(__file__).resolve().parents[1] / "idc_helpers"
    found = [
        f"{path.name}: {match}"
        for path in package.rglob("*.py")
        for match in re.findall(r"[\"'](?:Error|ERROR): ", path.read_text(encoding="utf-8"))
    ]
    assert found == []
