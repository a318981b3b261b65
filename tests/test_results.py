"""The committed records of the cross-validations (results/): complete, of this machine's layout, and consistent.

Each record reproduces the scores its own log holds from the predictions it holds, so docs/results.md's tables can
be recomputed from results/ alone (`bench seeds`).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from idc_helpers.bench import quality, record, seeds
from idc_helpers.metrics import binary_scores, pick_threshold

RECORDS = sorted(p.parent for p in (Path(__file__).parents[1] / "results").glob("*/config.json"))


def test_results_holds_records():
    assert RECORDS, "results/ holds no record (results/*/config.json)"


@pytest.mark.parametrize("folder", RECORDS, ids=lambda p: p.name)
def test_a_record_holds_each_logged_folds_predictions_of_exactly_its_patients(folder):
    config = json.loads((folder / quality.CONFIG_FILE).read_text(encoding="utf-8"))
    logged = quality.read_log(folder)
    assert logged and len(logged) == len((folder / quality.LOG_FILE).read_text().splitlines())  # no torn line
    tables = {p.name for p in (folder / "predictions").iterdir()}
    assert tables == {f"{pre}{r['model']}-fold{r['fold']}.csv.gz" for r in logged for pre in ("", "val-")}
    for entry in logged:
        assert entry["test_patients"] == config["fold_patients"][entry["fold"]]
        for prefix, patients in (("", entry["test_patients"]), ("val-", entry["val_patients"])):
            table = quality.read_table(folder / "predictions" / f"{prefix}{entry['model']}-fold{entry['fold']}.csv.gz")
            assert list(table.columns) == list(record.COLUMNS)
            assert sorted(table["patient_id"].unique(), key=int) == sorted(patients, key=int)
            assert table["prob_idc"].between(0, 1).all()
            # Relative Kaggle-layout paths whose folder and file name agree with the row.
            parts = table["path"].str.extract(r"^(\d+)/([01])/(\d+)_idx5_x(\d+)_y(\d+)_class([01])\.png$")
            assert parts.notna().all().all(), folder
            assert (parts[0] == table["patient_id"]).all() and (parts[2] == table["patient_id"]).all()
            assert (parts[1].astype(int) == table["label"]).all() and (parts[5].astype(int) == table["label"]).all()
            assert (parts[3].astype(int) == table["x"]).all() and (parts[4].astype(int) == table["y"]).all()


@pytest.mark.parametrize("folder", RECORDS, ids=lambda p: p.name)
def test_a_record_reproduces_the_scores_its_log_holds(folder):
    """Each fold, re-decided at the youden threshold of its validation predictions, scores what was logged.

    That threshold is `train`'s rule, the one the benchmark decided at; `bench seeds` reads every logged fold.
    """
    logged = quality.read_log(folder)
    for entry in logged:
        val, test = (
            quality.read_table(folder / "predictions" / f"{pre}{entry['model']}-fold{entry['fold']}.csv.gz")
            for pre in ("val-", "")
        )
        threshold = pick_threshold(val["label"].to_numpy(), val["prob_idc"].to_numpy(), "youden")
        assert threshold == pytest.approx(entry["threshold_youden"]) == pytest.approx(entry["threshold"])
        labels, probs = test["label"].to_numpy(), test["prob_idc"].to_numpy()
        scores = binary_scores(labels, (probs >= threshold).astype(int), probs)
        for metric in ("f1", "balanced_accuracy", "roc_auc"):
            expected = entry["test"]["groups"]["all"][metric]["value"]
            assert scores[metric] == pytest.approx(expected, abs=1e-9), (folder.name, entry["fold"], metric)
    result = seeds.run_seeds([("r", [folder])], n_bootstrap=0, threshold_rules=["youden"])
    assert result["folds"] == sorted(e["fold"] for e in logged)


#: Each recipe a record may be named after: its averaging, epochs and training options other than the model seed.
RECIPES = {
    "ema12": ("ema", 12, {}),
    "residual": ("ema", 12, {"model_kwargs": {"residual": True}}),
    "patientw": ("ema", 12, {"weighting": "patient"}),
}


def test_record_names_follow_the_recipe_and_model_seed():
    for folder in RECORDS:
        config = json.loads((folder / quality.CONFIG_FILE).read_text(encoding="utf-8"))
        match = re.fullmatch(r"(?P<recipe>[a-z0-9]+)-ms(?P<seed>\d+)", folder.name)
        assert match and match["recipe"] in RECIPES, folder.name
        options = dict(config["train_options"])
        assert int(match["seed"]) == options.pop("model_seed")
        assert (config.get("averaging"), config["epochs"], options) == RECIPES[match["recipe"]], folder.name


def test_the_command_of_results_readme_recomputes_the_tables_from_the_records(capsys, monkeypatch):
    from idc_helpers.bench.__main__ import main

    text = (Path(__file__).parents[1] / "results" / "README.md").read_text(encoding="utf-8")
    commands = [
        shlex.split(line)[4:]
        for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        for line in block.splitlines()
        if line.startswith("python -m idc_helpers.bench seeds ")
    ]
    assert commands
    monkeypatch.chdir(Path(__file__).parents[1])
    for argv in commands:
        assert main(["seeds", *argv]) == 0
        assert "| ema12 | youden | all |" in capsys.readouterr().out
