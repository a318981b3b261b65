"""Structure of the notebook series: cell order, no committed outputs, parameters, Colab links up to date.

These read the notebooks as JSON and run no kernel; executing them is the job of nbval in CI (see
``idc_helpers.notebook_runner``).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
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
    assert re.search(r"\bCPU\b", cells[2].source) and re.search(r"\bGPU\b", cells[2].source), \
        "the overview says how long it takes on a CPU and on a GPU"
    assert 'IS_COLAB = "google.colab" in sys.modules' in cells[3].source
    assert "parameters" in cells[4].metadata.get("tags", []), "cell 5 must be tagged 'parameters'"
    others = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    assert others == [4], "exactly one parameters cell"
    setup_cells = [i for i, c in enumerate(cells) if "IS_COLAB =" in c.source]
    assert setup_cells == [3], "exactly one setup cell"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_no_outputs_committed(path):
    """Outputs and execution counts are stripped, except in ``# NBVAL_CHECK_OUTPUT`` cells: their expected output
    stays, with an execution count because nbval skips the comparison for a cell without one."""
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
        assert not cell.metadata.get("papermill") and not cell.metadata.get("execution"), \
            f"cell {i} carries execution metadata"
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
        f"https://colab.research.google.com/github/{colab.REPOSITORY}/blob/{colab.BRANCH}/notebooks/02_training.ipynb")
    with pytest.raises(ValueError):
        colab.colab_url("../02_training.ipynb")


def test_links_are_up_to_date():
    """``tools/update_notebook_links.py --check`` passes (run the tool without --check to fix)."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "update_notebook_links.py"), "--check"],
                            capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def load_tool():
    spec = importlib.util.spec_from_file_location("update_notebook_links", REPO_ROOT / "tools" / "update_notebook_links.py")
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
