"""Recipes over model seeds (idc_helpers.bench.seeds) on tiny synthetic cross-validations."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from idc_helpers.bench import quality, seeds
from idc_helpers.metrics import binary_scores, pick_threshold

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three 2-fold cross-validations of idc_net (1 epoch) on six synthetic whole slides, model seeds 0, 1 and 2."""
    from idc_helpers.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("seeds")
    data = write_demo_dataset(root / "demo", n_patients=6, seed=0, grid=(8, 6))
    folders = []
    for model_seed in (0, 1, 2):
        folders.append(root / f"quality-ms{model_seed}")
        quality.run_quality(
            [data],
            folders[-1],
            n_folds=2,
            models=["idc_net"],
            epochs=1,
            cache_dir=root / "cache",
            n_bootstrap=0,
            fold_bootstrap=0,
            train_options={"model_seed": model_seed},
            verbose=0,
        )
    return folders


def _decided(folder, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """The folder's pooled test labels and decisions, each fold at the threshold ``rule`` picks on its validation."""
    labels, decided = [], []
    for fold in (0, 1):
        val = quality.read_table(folder / "predictions" / f"val-idc_net-fold{fold}.csv")
        test = quality.read_table(folder / "predictions" / f"idc_net-fold{fold}.csv")
        cut = pick_threshold(val["label"], val["prob_idc"], rule)
        labels.append(test["label"].to_numpy())
        decided.append((test["prob_idc"] >= cut).to_numpy())
    return np.concatenate(labels), np.concatenate(decided)


def test_seeds_are_scored_one_by_one_and_recipes_by_the_difference_of_their_means(runs, tmp_path):
    out = tmp_path / "seeds.md"
    result = seeds.run_seeds([("a", runs[:2]), ("b", runs[2:])], n_bootstrap=20, out_file=out)
    assert result["folds"] == [0, 1]
    for rule in seeds.THRESHOLD_RULES:  # every fold re-decided at the threshold the rule picks on its validation
        row = next(r for r in result["seeds"] if (r["recipe"], r["rule"], r["group"]) == ("a", rule, "all"))
        assert row["seeds"] == [0, 1]
        f1 = [binary_scores(*_decided(folder, rule))["f1"] for folder in runs[:2]]
        assert [s["f1"] for s in row["scores"]] == pytest.approx(f1)
    # Each (recipe, rule) against the first recipe under the first rule: the difference of the seed means.
    assert set(result["paired"]) == {"a / youden", "b / f1", "b / youden"}
    baseline = np.mean([binary_scores(*_decided(folder, "f1"))["f1"] for folder in runs[:2]])
    for rule in seeds.THRESHOLD_RULES:
        expected = binary_scores(*_decided(runs[2], rule))["f1"] - baseline
        assert result["paired"][f"b / {rule}"]["f1"]["value"] == pytest.approx(expected)
    # Every fold's whole slides are scored under every threshold and context rule (train's first, the context
    # criterion it names), beside patch only.
    assert next(iter(seeds.CONTEXT_RULES)).endswith(f"{seeds.CONTEXT_CRITERION} criterion (train)")
    rows = [(r["recipe"], r["seed"], r["threshold_rule"], r["fold"], r["rule"]) for r in result["context"]]
    assert len(rows) == len(set(rows)) and {row[:2] for row in rows} == {("a", 0), ("a", 1), ("b", 2)}
    expected = {(t, f, rule) for t in seeds.THRESHOLD_RULES for f in (0, 1) for rule in seeds.CONTEXT_RULES}
    assert {row[2:] for row in rows} == expected
    text = out.read_text()
    assert text == result["markdown"] and "| b / f1 - a / f1 |" in text and "context below patch only" in text


def test_folders_of_other_folds_or_of_no_benchmark_are_refused_by_name(runs, tmp_path):
    other = tmp_path / "other-folds"
    shutil.copytree(runs[1], other)
    config = json.loads((other / quality.CONFIG_FILE).read_text())
    config["fold_patients"] = config["fold_patients"][::-1]
    (other / quality.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(seeds.SeedsError, match=r"other-folds differs from .*fold_patients"):
        seeds.run_seeds([("a", [runs[0], other])], n_bootstrap=0)
    with pytest.raises(seeds.SeedsError, match=r"holds no config\.json"):
        seeds.run_seeds([("a", [tmp_path])], n_bootstrap=0)
    with pytest.raises(seeds.SeedsError, match="name each recipe once"):
        seeds.run_seeds([("a", runs[:1]), ("a", runs[1:2])], n_bootstrap=0)
    with pytest.raises(seeds.SeedsError, match="threshold rules accuracy: name each of f1, youden"):
        seeds.run_seeds([("a", runs[:1])], n_bootstrap=0, threshold_rules=["accuracy"])
    with pytest.raises(seeds.SeedsError, match="NAME=DIR"):
        seeds.parse_recipe("default")
    assert seeds.parse_recipe("ema = x, y") == ("ema", [seeds.Path("x"), seeds.Path("y")])


def test_the_command_line_prints_the_tables_or_one_error_line(runs, capsys):
    from idc_helpers.bench.__main__ import main

    assert main(["seeds", "--recipe", f"a={runs[0]},{runs[1]}", "--bootstrap", "0", "--threshold-rules", "youden"]) == 0
    out = capsys.readouterr().out
    assert "F1 per seed" in out and "| a | youden | all |" in out and "| a | f1 |" not in out
    assert main(["seeds", "--recipe", "a"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --recipe 'a': write NAME=DIR") and len(err.strip().splitlines()) == 1


def _tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_record_gives_the_folders_tables_and_is_extended_but_never_overwritten(runs, tmp_path):
    from idc_helpers.bench import record

    before = _tree(runs[0])
    records = [tmp_path / f"record-ms{seed}" for seed in (0, 1, 2)]
    for folder, out in zip(runs, records, strict=True):
        assert record.record_folder(folder, out)["written"] == [
            "idc_net-fold0.csv",
            "val-idc_net-fold0.csv",
            "idc_net-fold1.csv",
            "val-idc_net-fold1.csv",
        ]
    assert _tree(runs[0]) == before  # the source is only read
    # JSON and compressed tables of the columns the tables need; no model, no path of this machine.
    files = set(_tree(records[0]))
    assert files == {"config.json", "folds.jsonl"} | {
        f"predictions/{p}idc_net-fold{f}.csv.gz" for p in ("", "val-") for f in (0, 1)
    }
    table = quality.read_table(records[0] / "predictions" / "idc_net-fold1.csv.gz")
    assert list(table.columns) == list(record.COLUMNS)
    paths = zip(table["path"], table["patient_id"], strict=True)
    assert all(p.count("/") == 2 and p.split("/")[0] == pid for p, pid in paths)
    live = quality.read_table(runs[0] / "predictions" / "idc_net-fold1.csv")
    assert np.array_equal(table["prob_idc"].to_numpy(), live["prob_idc"].to_numpy())  # float32 values, exactly

    # The same tables from the records as from the folders, and a record beside a folder compares patch by patch.
    kwargs = {"n_bootstrap": 20, "threshold_rules": ["youden"]}
    from_folders = seeds.run_seeds([("a", runs[:2]), ("b", runs[2:])], **kwargs)
    from_records = seeds.run_seeds([("a", records[:2]), ("b", records[2:])], **kwargs)
    mixed = seeds.run_seeds([("a", [runs[0], records[1]]), ("b", records[2:])], **kwargs)
    assert from_records["markdown"] == from_folders["markdown"] == mixed["markdown"]

    # Recording again keeps what is there; a record whose table differs, or of another folder, is refused by name.
    again = record.record_folder(runs[0], records[0])
    assert again["written"] == [] and len(again["kept"]) == 4 and _tree(records[0])["config.json"]
    changed = records[0] / "predictions" / "idc_net-fold1.csv.gz"
    table.assign(prob_idc=table["prob_idc"] * 0.5).to_csv(changed, index=False)
    saved = changed.read_bytes()
    with pytest.raises(
        record.RecordError, match=r"idc_net-fold1\.csv\.gz holds other predictions .* never overwritten"
    ):
        record.record_folder(runs[0], records[0])
    assert changed.read_bytes() == saved
    changed.write_bytes(saved[: len(saved) // 2])  # a truncated copy: named, not a traceback, by both commands
    with pytest.raises(quality.TableError, match=r"idc_net-fold1\.csv\.gz cannot be read .* new --out folder"):
        record.record_folder(runs[0], records[0])
    with pytest.raises(seeds.UserError, match=r"idc_net-fold1\.csv\.gz cannot be read as a predictions table"):
        seeds.run_seeds([("a", records[:1])], n_bootstrap=0)
    with pytest.raises(record.RecordError, match="records another cross-validation"):
        record.record_folder(runs[1], records[0])
    with pytest.raises(record.RecordError, match=r"holds no config\.json and folds\.jsonl"):
        record.record_folder(tmp_path / "nothing", tmp_path / "out")


def test_the_record_command_prints_one_line_or_one_error_line(runs, tmp_path, capsys):
    from idc_helpers.bench.__main__ import main

    assert main(["record", str(runs[0]), "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip().endswith("4 table(s) written, 0 already there")
    assert main(["record", str(tmp_path), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bench quality" in err and len(err.strip().splitlines()) == 1
