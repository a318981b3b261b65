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
