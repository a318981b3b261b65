"""Structure of the notebook series: cell order, no committed outputs, parameters, Colab links up to date.

These read the notebooks as JSON and run no kernel; executing them is the job of nbval in CI (see
``idc_helpers.notebook_runner``).
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tokenize
import types
from pathlib import Path

import nbformat
import papermill
import pytest

from idc_helpers import colab
from idc_helpers.notebook_runner import NOTEBOOKS, RUNNER_PARAMETERS, SMOKE_PARAMS, load_params_file, plan_parameters

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO_ROOT / "notebooks"
PATHS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
CHECK_OUTPUT = "# NBVAL_CHECK_OUTPUT"
COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/github/([^/\s)]+/[^/\s)]+)/blob/([^/\s)]+)/([^\s)]+)")


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def test_the_series_is_the_one_the_runner_runs():
    assert [p.stem for p in PATHS] == list(NOTEBOOKS)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_cell_order(path):
    """title, Colab badge, overview, setup (IS_COLAB), parameters-tagged cell, then the body."""
    cells = read(path).cells
    kinds = [c.cell_type for c in cells[:5]]
    assert kinds == ["markdown", "markdown", "markdown", "code", "code"], kinds
    assert cells[0].source.startswith("# "), "cell 1 must be the title (a level-1 heading)"
    assert "colab-badge.svg" in cells[1].source, "cell 2 must be the Colab badge"
    assert cells[2].source.startswith("## Overview"), "cell 3 must be the overview"
    assert "what you will learn" in cells[2].source.lower()
    assert re.search(r"\bCPU\b", cells[2].source) and re.search(r"\bGPU\b", cells[2].source), (
        "the overview says how long it takes on a CPU and on a GPU"
    )
    assert 'IS_COLAB = "google.colab" in sys.modules' in cells[3].source
    assert "parameters" in cells[4].metadata.get("tags", []), "cell 5 must be tagged 'parameters'"
    others = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    assert others == [4], "exactly one parameters cell"
    setup_cells = [i for i, c in enumerate(cells) if "IS_COLAB =" in c.source]
    assert setup_cells == [3], "exactly one setup cell"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_no_outputs_committed(path):
    """Outputs and execution counts are stripped, except in ``# NBVAL_CHECK_OUTPUT`` cells.

    Their expected output stays, with an execution count because nbval skips the comparison for a cell without one.
    """
    for i, cell in enumerate(read(path).cells, start=1):
        if cell.cell_type != "code":
            continue
        checked = cell.source.lstrip().startswith(CHECK_OUTPUT)
        if not checked:
            assert cell.execution_count is None, f"cell {i} has an execution count"
            assert not cell.outputs, f"cell {i} carries outputs"
        if cell.outputs:
            for output in cell.outputs:
                assert output.get("execution_count") is None, f"cell {i}: output has an execution count"
                assert output.output_type != "error", f"cell {i}: committed an error"
        assert not cell.metadata.get("papermill") and not cell.metadata.get("execution"), (
            f"cell {i} carries execution metadata"
        )
    assert "papermill" not in read(path).metadata


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_check_output_cells_hold_their_expected_output(path):
    for i, cell in enumerate(read(path).cells, start=1):
        if cell.cell_type == "code" and cell.source.lstrip().startswith(CHECK_OUTPUT):
            assert cell.outputs, f"cell {i} is checked by nbval but has no expected output"
            assert cell.execution_count is not None, f"cell {i}: nbval does not compare a cell without execution count"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_habits(path):
    """No sys.path hacks, Keras progress with verbose=2, figures saved for the runner."""
    source = "\n".join(c.source for c in read(path).cells if c.cell_type == "code")
    assert "sys.path" not in source
    assert "verbose=1" not in source
    assert "import *" not in source


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_parameters_cell_defines_what_the_runner_passes(path):
    defined = papermill.inspect_notebook(str(path))
    for name in RUNNER_PARAMETERS[path.stem]:
        assert name in defined, f"{path.name}: the runner sets {name}, the parameters cell must define it"


@pytest.mark.parametrize("params", [SMOKE_PARAMS, NOTEBOOK_DIR / "params" / "ci.yaml"], ids=lambda p: p.name)
def test_parameter_files_only_name_known_parameters(params):
    defined = {p.stem: list(papermill.inspect_notebook(str(p))) for p in PATHS}
    overrides = load_params_file(params)
    overrides.pop("DATA_DIR", None)
    plan_parameters(overrides, defined, {}, source=str(params))  # raises on an unknown name


def colab_links() -> list[tuple[str, str]]:
    files = [REPO_ROOT / "README.md", *PATHS]
    return [(f.name, m) for f in files if f.exists() for m in COLAB_LINK.findall(f.read_text(encoding="utf-8"))]


def test_every_colab_link_points_at_an_existing_notebook():
    links = colab_links()
    assert len(links) >= len(PATHS)
    for where, (repository, branch, rel) in links:
        assert repository == colab.REPOSITORY and branch == colab.BRANCH, f"{where}: link to {repository}@{branch}"
        assert (REPO_ROOT / rel).is_file(), f"{where}: Colab badge for {rel}, which does not exist"


def test_each_notebook_badge_opens_itself():
    for path in PATHS:
        assert read(path).cells[1].source == colab.badge_markdown(f"notebooks/{path.name}")


def test_colab_url():
    assert colab.colab_url("notebooks/02_training.ipynb") == (
        f"https://colab.research.google.com/github/{colab.REPOSITORY}/blob/{colab.BRANCH}/notebooks/02_training.ipynb"
    )
    with pytest.raises(ValueError):
        colab.colab_url("../02_training.ipynb")


def test_links_are_up_to_date():
    """``tools/update_notebook_links.py --check`` passes (run the tool without --check to fix)."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "update_notebook_links.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def load_tool():
    spec = importlib.util.spec_from_file_location(
        "update_notebook_links", REPO_ROOT / "tools" / "update_notebook_links.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_rewrites_stale_badges_setup_cells_and_readme_table(tmp_path, capsys):
    (tmp_path / "notebooks").mkdir()
    for path in PATHS:
        shutil.copy(path, tmp_path / "notebooks" / path.name)
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\n<!-- notebooks:start -->\nold table\n<!-- notebooks:end -->\n\nRest.\n")
    stale = tmp_path / "notebooks" / PATHS[0].name
    nb = read(stale)
    nb.cells[1].source = "[![Open In Colab](x.svg)](https://colab.research.google.com/github/a/b/blob/dev/nb.ipynb)"
    nb.cells[3].source = nb.cells[3].source.replace(colab.repository_url(), "https://github.com/someone/else")
    nbformat.write(nb, stale)

    tool = load_tool()
    assert tool.main(["--check"], root=tmp_path) == 1
    assert "out of date: notebooks/" + stale.name in capsys.readouterr().out
    assert tool.main([], root=tmp_path) == 0
    assert tool.main(["--check"], root=tmp_path) == 0
    fixed = read(stale)
    assert fixed.cells[1].source == colab.badge_markdown(f"notebooks/{stale.name}")
    assert colab.repository_url() in fixed.cells[3].source
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# Title") and text.rstrip().endswith("Rest.")
    for path in PATHS:
        assert colab.colab_url(f"notebooks/{path.name}") in text


def test_tool_without_readme_markers_says_what_to_add(tmp_path, capsys):
    (tmp_path / "notebooks").mkdir()
    shutil.copy(PATHS[0], tmp_path / "notebooks" / PATHS[0].name)
    (tmp_path / "README.md").write_text("# Title\n")
    assert load_tool().main(["--check"], root=tmp_path) == 1
    assert "<!-- notebooks:start -->" in capsys.readouterr().err


def _code_cells(path: Path) -> list[str]:
    return [c.source for c in read(path).cells if c.cell_type == "code"]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_cells_are_a_few_lines_of_package_calls(path):
    """A notebook cell calls the package and shows the result.

    No cell but setup and parameters is over 10 lines, no function or class is defined in a notebook, and nothing reads
    a run's JSON files by hand. Lines are logical lines: a call or an import that ``ruff format`` spreads over several
    lines (one name per line once it passes the line length) counts once.
    """
    cells = [c for c in read(path).cells if c.cell_type == "code"]
    for i, cell in enumerate(cells[1:], start=2):  # the setup cell aside
        if "parameters" in cell.metadata.get("tags", []):
            continue  # the list of knobs papermill may set
        source = cell.source
        tokens = tokenize.generate_tokens(io.StringIO(source + "\n").readline)
        lines = sum(token.type == tokenize.NEWLINE for token in tokens)
        assert lines <= 10, f"code cell {i} has {lines} lines"
        assert not re.search(r"^\s*(def|class) ", source, re.M), f"code cell {i} defines a function"
        assert "config.json" not in source and "json.loads" not in source, f"code cell {i} reads JSON by hand"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_every_saved_figure_goes_through_save_figure(path):
    """plots.save_figure marks figures of synthetic data; a bare savefig would not."""
    source = "\n".join(_code_cells(path))
    assert ".savefig(" not in source
    saves = re.findall(r"plots\.save_figure\((.*?)synthetic=", source, re.S)
    assert saves or (path.stem == "02_training" and "save_figure" in source)


def test_setup_cell_installs_only_on_colab_then_calls_the_package():
    source = colab.setup_cell_source()
    lines = source.splitlines()
    install = [i for i, line in enumerate(lines) if "colab_setup.sh" in line or "git clone" in line]
    guard = next(i for i, line in enumerate(lines) if line.startswith("if "))
    assert lines[guard].startswith("if IS_COLAB and ") and install and min(install) > guard
    assert all(lines[i].startswith("    ") for i in install)  # only on Colab
    first_import = next(i for i, line in enumerate(lines) if line.startswith("from idc_helpers"))
    assert first_import > max(install)  # on Colab the package exists only after the install
    assert "tensorflow" not in source  # setup_notebook quiets it before importing it
    assert lines[-1] == "setup_notebook(IS_COLAB, mount_drive=MOUNT_DRIVE)"
    assert "MOUNT_DRIVE = False" in source
    assert len([line for line in lines if line.strip()]) <= 12
    for path in PATHS:
        assert _code_cells(path)[0] == source


def test_setup_notebook_on_colab_works_from_the_clone_and_mounts_drive_when_asked(tmp_path, monkeypatch):
    clone = tmp_path / "clone"
    (clone / "notebooks").mkdir(parents=True)
    mounted, imported = [], []
    drive = types.ModuleType("google.colab.drive")
    drive.mount = mounted.append
    monkeypatch.setitem(sys.modules, "google.colab.drive", drive)
    monkeypatch.setitem(sys.modules, "google.colab", types.SimpleNamespace(drive=drive))
    monkeypatch.setattr(colab, "COLAB_CLONE_DIR", str(clone))
    monkeypatch.setattr(colab, "import_tensorflow_quietly", lambda: imported.append(True))
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.chdir(tmp_path)

    colab.setup_notebook(False, mount_drive=True)
    assert Path.cwd().resolve() == tmp_path.resolve() and not mounted and imported == [True]
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    colab.setup_notebook(True)
    assert Path.cwd().resolve() == (clone / "notebooks").resolve() and not mounted
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"  # the user's own setting stays
    colab.setup_notebook(True, mount_drive=True)
    assert mounted == ["/content/drive"] and len(imported) == 3


def test_tensorflow_start_up_lines_do_not_reach_stderr():
    """The setup cell's setup_notebook hides TensorFlow's start-up lines, and stderr works again afterwards.

    TensorFlow 2.19+ prints CUDA/oneDNN lines at import whatever TF_CPP_MIN_LOG_LEVEL says: the variable alone is
    not enough, the import itself runs with stderr silenced.
    """
    code = (
        "import os, sys; os.environ.pop('TF_CPP_MIN_LOG_LEVEL', None);"
        "from idc_helpers.colab import setup_notebook; setup_notebook(False);"
        "assert 'tensorflow' in sys.modules and os.environ['TF_CPP_MIN_LOG_LEVEL'] == '3';"
        "print('still here', file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr == "still here\n"


def test_training_notebook_resumes_and_shows_the_drive_path():
    cells = _code_cells(NOTEBOOK_DIR / "02_training.ipynb")
    assert colab.DRIVE_RUN_DIR in cells[1]  # the parameters cell
    train = next(c for c in cells if "training.train(" in c)
    assert "resume=resume" in train and "interrupted run" in train
    text = "\n".join(c.source for c in read(NOTEBOOK_DIR / "02_training.ipynb").cells if c.cell_type == "markdown")
    assert "--resume" in text


def test_words_agree_with_the_code():
    """The notebooks' words agree with the code: idc_net's head and what the published split compares.

    idc_net's head is one dense layer, not seed_cnn's two; the published split's test patients are what is comparable,
    not the whole experiment (unlisted patients go to training).
    """
    from idc_helpers import models

    idc_net = models.build_model("idc_net")
    dense = [layer.name for layer in idc_net.layers if type(layer).__name__ == "Dense"]
    assert dense == [models.LOGITS_LAYER]
    texts = {p.stem: "\n".join(c.source for c in read(p).cells if c.cell_type == "markdown") for p in PATHS}
    assert "same two-layer head" not in texts["02_training"] and "single dense layer" in texts["02_training"]
    assert "directly comparable" not in texts["01_data_exploration"]
    assert "117" in texts["01_data_exploration"] and "unlisted" in texts["01_data_exploration"]
    from idc_helpers import selection

    # The selection rule, as selection.py has it.
    assert f"{selection.SELECTION_LOSS_WEIGHT:g} x the validation loss" in texts["02_training"]
