"""The notebook runner: parameters, fresh output folders, chaining, failures; the real series in smoke mode (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import nbformat
import pytest
from conftest import copy_checkout
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from idc_helpers import notebook_runner
from idc_helpers.cli import main
from idc_helpers.notebook_runner import (
    NOTEBOOKS,
    NotebookFailed,
    ParametersError,
    fresh_output_dir,
    load_params_file,
    plan_parameters,
    run_notebooks,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

DEFINED = {"01_a": ["DATA_DIR", "OUT_DIR", "SEED"], "02_b": ["DATA_DIR", "OUT_DIR", "RUN_DIR", "EPOCHS", "SEED"]}


def write_notebook(path: Path, parameters: str, *body: str) -> Path:
    nb = new_notebook(cells=[new_markdown_cell("# toy")])
    cell = new_code_cell(parameters)
    cell.metadata["tags"] = ["parameters"]
    nb.cells.append(cell)
    nb.cells += [new_code_cell(source) for source in body]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


# ---------------------------------------------------------------------------------------------------- parameters


def test_plan_applies_global_values_sections_and_runner_paths():
    overrides = {"SEED": 3, "EPOCHS": 1, "02_b": {"EPOCHS": 5}}
    runner = {"01_a": {"OUT_DIR": "/o"}, "02_b": {"OUT_DIR": "/o", "RUN_DIR": "/o/run"}}
    plan = plan_parameters(overrides, DEFINED, runner)
    assert plan["01_a"] == {"SEED": 3, "OUT_DIR": "/o"}  # EPOCHS is not a parameter of 01_a: not passed
    assert plan["02_b"] == {"SEED": 3, "EPOCHS": 5, "OUT_DIR": "/o", "RUN_DIR": "/o/run"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"EPOCH": 1}, "EPOCH is not a parameter of any notebook"),
        ({"01_a": {"EPOCHS": 1}}, "EPOCHS in section '01_a' is not a parameter of that notebook"),
        ({"RUN_DIR": "x"}, "RUN_DIR is set by the runner"),
        ({"02_b": 3}, "must be a mapping"),
    ],
)
def test_plan_refuses_unknown_or_reserved_names(overrides, message):
    with pytest.raises(ParametersError, match=message):
        plan_parameters(overrides, DEFINED, {}, source="my.yaml")


def test_params_files(tmp_path):
    (tmp_path / "p.yaml").write_text("EPOCHS: 2\n02_b:\n  SEED: 1\n")
    (tmp_path / "p.json").write_text('{"EPOCHS": 3}')
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    (tmp_path / "list.yaml").write_text("- 1\n")
    (tmp_path / "broken.yaml").write_text("EPOCHS: [1\n")
    assert load_params_file(tmp_path / "p.yaml") == {"EPOCHS": 2, "02_b": {"SEED": 1}}
    assert load_params_file(tmp_path / "p.json") == {"EPOCHS": 3}
    assert load_params_file(tmp_path / "empty.yaml") == {}
    with pytest.raises(ParametersError, match=r"list\.yaml: expected a mapping"):
        load_params_file(tmp_path / "list.yaml")
    with pytest.raises(ParametersError, match=r"missing\.yaml"):
        load_params_file(tmp_path / "missing.yaml")
    with pytest.raises(ParametersError, match=r"broken\.yaml: not valid YAML"):
        load_params_file(tmp_path / "broken.yaml")


def test_fresh_output_dir_never_reuses_a_folder(tmp_path):
    now = datetime(2025, 1, 2, 3, 4, 5)
    first = fresh_output_dir(tmp_path / "out", now=now)
    (first / "run").mkdir()
    second = fresh_output_dir(tmp_path / "out", now=now)
    assert first.name == "20250102-030405" and second.name == "20250102-030405-2"
    assert (first / "run").is_dir() and not any(second.iterdir())


# ------------------------------------------------------------------------------------------- toy notebooks, kernel


@pytest.fixture()
def toy_series(tmp_path) -> Path:
    folder = tmp_path / "nbs"
    folder.mkdir()
    write_notebook(
        folder / "01_a.ipynb",
        "DATA_DIR = None\nOUT_DIR = None\nSEED = 0",
        "from pathlib import Path\n"
        "Path(OUT_DIR, 'from_01.json').write_text(__import__('json').dumps([DATA_DIR, SEED]))",
    )
    write_notebook(
        folder / "02_b.ipynb",
        "OUT_DIR = None\nRUN_DIR = None\nEPOCHS = 9",
        "from pathlib import Path\nPath(RUN_DIR).mkdir()\nPath(RUN_DIR, 'epochs.txt').write_text(str(EPOCHS))",
    )
    write_notebook(folder / "03_fails.ipynb", "OUT_DIR = None", "x = 1", "raise ValueError('boom in the body')")
    # Lists the folder while its kernel runs: the kernel's socket files must not be there.
    write_notebook(
        folder / "04_cwd.ipynb",
        "OUT_DIR = None",
        "import os, json, pathlib\npathlib.Path(OUT_DIR, 'cwd.json').write_text(json.dumps(os.listdir('.')))",
    )
    return folder


def test_runs_in_order_passes_paths_and_parameters(toy_series, tiny_dataset, tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("SEED: 7\n02_b:\n  EPOCHS: 2\n")
    messages = []
    executed = run_notebooks(
        tmp_path / "out",
        params_file=params,
        data_dir=tiny_dataset,
        notebook_dir=toy_series,
        notebooks=["01_a", "02_b.ipynb"],
        log=messages.append,
    )
    root = executed[0].parents[1]
    assert [p.name for p in executed] == ["01_a.ipynb", "02_b.ipynb"]
    assert json.loads((root / "from_01.json").read_text()) == [str(tiny_dataset.resolve()), 7]
    assert (root / "run" / "epochs.txt").read_text() == "2"
    recorded = json.loads((root / "parameters.json").read_text())
    assert recorded["notebooks"]["02_b"]["RUN_DIR"] == str(root / "run")
    assert any(str(root) in m for m in messages)
    # The executed copies carry their outputs; the sources are untouched.
    assert nbformat.read(executed[1], as_version=4).cells[-1].execution_count is not None
    assert nbformat.read(toy_series / "02_b.ipynb", as_version=4).cells[-1].execution_count is None
    cwd = run_notebooks(
        tmp_path / "out", data_dir=tiny_dataset, notebook_dir=toy_series, notebooks=["04_cwd"], log=messages.append
    )[0].parents[1]
    assert not [n for n in json.loads((cwd / "cwd.json").read_text()) if "ipc" in n]  # no kernel sockets there

    # A second run goes to a new folder: the first run's RUN_DIR is never touched.
    again = run_notebooks(
        tmp_path / "out", data_dir=tiny_dataset, notebook_dir=toy_series, notebooks=["02_b"], log=messages.append
    )
    assert again[0].parents[1] != root and (root / "run" / "epochs.txt").read_text() == "2"


def test_demo_chosen_for_the_user_is_not_passed_on(toy_series, tmp_path, monkeypatch):
    """Without a data folder the notebooks find the demo by themselves, so none says "from the folder given"."""
    for name in ("IDC_DATA_DIR", "KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(name, raising=False)
    from idc_helpers import datasource

    monkeypatch.setattr(datasource, "find_credentials", lambda: None)  # no ~/.kaggle credentials either
    monkeypatch.setenv("IDC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    executed = run_notebooks(tmp_path / "out", notebook_dir=toy_series, notebooks=["01_a"], log=lambda m: None)
    root = executed[0].parents[1]
    assert json.loads((root / "from_01.json").read_text()) == [None, 0]
    recorded = json.loads((root / "parameters.json").read_text())["data"]
    assert recorded["synthetic"] is True and recorded["path"].startswith(str(tmp_path / "cache"))


def test_a_failing_cell_names_notebook_and_cell(toy_series, tiny_dataset, tmp_path):
    with pytest.raises(NotebookFailed) as caught:
        run_notebooks(
            tmp_path / "out", data_dir=tiny_dataset, notebook_dir=toy_series, notebooks=["03_fails"], log=lambda m: None
        )
    message = str(caught.value)
    assert "03_fails.ipynb failed in cell [" in message and "ValueError: boom in the body" in message
    assert caught.value.executed.is_file()  # kept, with the traceback, for the user to open


def test_cli_exit_status(toy_series, tiny_dataset, tmp_path, monkeypatch, capsys):
    args = [
        "run-notebooks",
        "--out",
        str(tmp_path / "out"),
        "--data-dir",
        str(tiny_dataset),
        "--notebooks",
        str(toy_series),
    ]
    monkeypatch.setattr(notebook_runner, "NOTEBOOKS", ("03_fails",))
    assert main(args) == 1
    assert "03_fails.ipynb failed in cell" in capsys.readouterr().err

    runs = set((tmp_path / "out").iterdir())
    bad = tmp_path / "bad.yaml"
    bad.write_text("EPOCH: 1\n")
    monkeypatch.setattr(notebook_runner, "NOTEBOOKS", ("01_a",))
    assert main([*args, "--params", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "EPOCH is not a parameter" in err
    assert main([*args[:-1], str(tmp_path / "nowhere")]) == 2
    assert "notebooks not found" in capsys.readouterr().err
    assert set((tmp_path / "out").iterdir()) == runs  # nothing created for a run that could not start


def test_unknown_parameter_creates_nothing(toy_series, tiny_dataset, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("EPOCH: 1\n")
    with pytest.raises(ParametersError, match="EPOCH is not a parameter"):
        run_notebooks(
            tmp_path / "out",
            params_file=bad,
            data_dir=tiny_dataset,
            notebook_dir=toy_series,
            notebooks=["01_a"],
            log=lambda m: None,
        )
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------- the real notebooks


def test_prepare_only_injects_ci_parameters_for_nbval(tiny_dataset, tmp_path):
    """What CI hands to nbval: the real notebooks with the CI parameters and chained paths injected, not run."""
    params = Path(notebook_runner.NOTEBOOK_DIR) / "params" / "ci.yaml"
    prepared = run_notebooks(
        tmp_path / "out", params_file=params, data_dir=tiny_dataset, prepare_only=True, log=lambda m: None
    )
    assert [p.stem for p in prepared] == list(NOTEBOOKS)
    root = prepared[0].parents[1]
    for path in prepared:
        nb = nbformat.read(path, as_version=4)
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1
        assert f'OUT_DIR = "{root}"' in injected[0].source
        checked = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("# NBVAL_CHECK_OUTPUT")]
        assert all(c.execution_count is None for c in nb.cells if c.cell_type == "code" and c not in checked)
        assert all(c.outputs and c.execution_count for c in checked), "nbval needs the expected outputs"
    training = nbformat.read(root / "notebooks" / "02_training.ipynb", as_version=4)
    injected = next(c for c in training.cells if "injected-parameters" in c.metadata.get("tags", []))
    ci = load_params_file(params)
    assert f'RUN_DIR = "{root / "run"}"' in injected.source and f"EPOCHS = {ci['EPOCHS']}" in injected.source
    for name in ("03_evaluation_and_gradcam", "04_whole_slide_heatmaps"):  # no slider without a screen
        nb = nbformat.read(root / "notebooks" / f"{name}.ipynb", as_version=4)
        assert (
            "SLIDER = False" in next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])).source
        )


def test_a_regular_install_runs_the_series_from_any_folder(tmp_path, tiny_dataset):
    """`pip install .` (not editable) carries the notebooks and their parameter files inside the package."""
    source = copy_checkout(tmp_path / "checkout")
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(source)],
        check=True,
        timeout=300,
    )
    packaged = target / "idc_helpers" / "notebooks"
    assert sorted(p.stem for p in packaged.glob("*.ipynb")) == list(NOTEBOOKS)
    assert (packaged / "params" / "smoke.yaml").is_file() and (packaged / "params" / "ci.yaml").is_file()
    assert not (target / "notebooks").exists()  # nothing outside the package

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "IDC_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "idc_helpers",
            "run-notebooks",
            "--smoke",
            "--prepare-only",
            "--out",
            "out",
            "--data-dir",
            str(tiny_dataset),
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    prepared = sorted((elsewhere / "out").glob("*/notebooks/*.ipynb"))
    assert [p.stem for p in prepared] == list(NOTEBOOKS)
    recorded = json.loads((prepared[0].parents[1] / "parameters.json").read_text())
    assert recorded["parameter_files"] == [str(packaged / "params" / "smoke.yaml")]
    smoke = load_params_file(REPO_ROOT / "notebooks" / "params" / "smoke.yaml")
    assert recorded["notebooks"]["02_training"]["EPOCHS"] == smoke["EPOCHS"]


@pytest.mark.slow
def test_smoke_run_of_the_series_on_demo_data(tmp_path, monkeypatch):
    """The README's command in smoke mode, end to end on a small demo dataset (about 1.5 minutes on 2 cores)."""
    from idc_helpers.demo_data import write_demo_dataset

    monkeypatch.setenv("IDC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MPLBACKEND", "Agg")  # as tools/run_tests.sh sets it: the figures must still be in the notebooks
    data = write_demo_dataset(tmp_path / "demo", n_patients=12, seed=0)
    executed = run_notebooks(tmp_path / "out", smoke=True, data_dir=data, log=lambda m: None)
    root = executed[0].parents[1]
    for path in executed:
        nb = nbformat.read(path, as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"], path.name
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} shows no figure"
    assert (root / "run" / "model.keras").is_file()
    assert (root / "predictions.csv").is_file() and (root / "metrics.json").is_file()
    printed = {
        path.stem[:2]: "".join(
            o.get("text", "")
            for c in nbformat.read(path, as_version=4).cells
            if c.cell_type == "code"
            for o in c.outputs
        )
        for path in executed
    }
    # The data is named once per notebook; a folder that was given gets the one-line notice, not the banner.
    assert printed["01"].count("Data: ") == 1 and "SYNTHETIC demo data in" in printed["01"]
    assert "SYNTHETIC DEMO DATA  -" not in printed["01"] + printed["02"]
    assert "from the folder given" not in printed["01"] + printed["02"]
    figures_of = {p.name for p in (root / "figures").glob("*.png")}
    assert {"02_threshold.png", "02_augmentation.png", "03_threshold.png", "03_worst_patients.png"} <= figures_of
    figures = {p.name for p in (root / "figures").glob("*.png")}
    assert {"01_patients_and_classes.png", "02_learning_curves.png", "03_roc_pr_confusion.png"} <= figures
    assert any(name.startswith("04_slide_") for name in figures)


@pytest.mark.parametrize(
    "text, named",
    [
        ("SEED: 2024-01-01\n", "SEED: datetime.date(2024, 1, 1) (a YAML date) is not allowed"),
        ("SEED: !!binary aGVsbG8=\n", "SEED: b'hello' (a YAML bytes) is not allowed"),
        ("SEED: !!set {a: null}\n", "(a YAML set) is not allowed"),
        ("02_b:\n  EPOCHS: .nan\n", "EPOCHS: nan is not allowed: use a finite number"),
        ("02_b:\n  SEED: {1: 2}\n", "the key 1 is not allowed: keys must be text"),
        ("02_b:\n  {1: 2}: 3\n", "not valid YAML (while constructing a mapping found unhashable key"),
        ("EPOCHS: '3'\n", "EPOCHS '3' is not allowed: use a whole number of at least 1 (without quotes)"),
        ("EPOCHS: -1\n", "EPOCHS -1 is not allowed: use a whole number of at least 1"),
        ("02_b:\n  EPOCHS: 2.5\n", "[02_b]: EPOCHS 2.5 is not allowed"),
        ("SEED: [1, 2020-01-01]\n", "SEED[1]: datetime.date(2020, 1, 1)"),
        ("DATA_DIR: [1, {a: b}]\n", "DATA_DIR [1, {'a': 'b'}] is not allowed: use a folder name (text) or null"),
        ("SLIDER: 'yes'\n", "SLIDER 'yes' is not allowed: use true or false or null"),
        ("02_b:\n  GRADCAM_EXAMPLES: 0\n", "GRADCAM_EXAMPLES 0 is not allowed: use a whole number of at least 1"),
        ("PATIENTS: [8863, ' 8864']\n", "PATIENTS [8863, ' 8864'] is not allowed: use a list of patient ids or null"),
        ("SCALE: 0\n", "SCALE 0 is not allowed: use a number in (0, 1] or null"),
    ],
)
def test_a_parameters_file_holds_plain_data_only(toy_series, tiny_dataset, tmp_path, monkeypatch, capsys, text, named):
    """Only JSON's types reach a notebook (papermill writes other values into its code), each in range.

    A refusal is one line and creates no output folder.
    """
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    monkeypatch.setattr(notebook_runner, "NOTEBOOKS", ("01_a", "02_b"))
    assert (
        main(
            [
                "run-notebooks",
                "--out",
                str(tmp_path / "out"),
                "--data-dir",
                str(tiny_dataset),
                "--notebooks",
                str(toy_series),
                "--params",
                str(bad),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}") and len(err.splitlines()) == 1 and named in err, err
    assert not (tmp_path / "out").exists()
