"""Installing the package: declared dependencies, Colab's package set, and colab_setup.sh on a Colab-like runtime."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import tomllib
from conftest import copy_checkout
from packaging.requirements import Requirement
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parents[1]
# Import names whose distribution is named otherwise.
DISTRIBUTION_OF = {
    "cv2": "opencv-python-headless",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "jupyter_client": "jupyter-client",
}
# Only importable where they run: Colab's own module, and the test tools (extra "test").
NOT_DEPENDENCIES = {"google", "pytest", "nbval", "idc_helpers"}


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def requirement_lines(path: Path) -> list[str]:
    lines = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


def colab_versions() -> dict[str, Version]:
    pins = [Requirement(line) for line in requirement_lines(REPO_ROOT / "tools" / "colab-constraints.txt")]
    return {normalised(pin.name): Version(next(iter(pin.specifier)).version) for pin in pins}


def third_party_imports() -> set[str]:
    """Top-level modules imported anywhere in the package (function-level imports included) and colab_setup.sh."""
    stdlib = set(sys.stdlib_module_names)
    names: set[str] = set()
    sources = [p.read_text(encoding="utf-8") for p in (REPO_ROOT / "idc_helpers").rglob("*.py")]
    script = (REPO_ROOT / "colab_setup.sh").read_text(encoding="utf-8")
    sources += [block.split("\nPY\n", 1)[0] for block in script.split("<<'PY'\n")[1:]]
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - stdlib - NOT_DEPENDENCIES - {"__future__"}


def test_requirements_txt_lists_exactly_the_pyproject_dependencies():
    assert requirement_lines(REPO_ROOT / "requirements.txt") == pyproject()["project"]["dependencies"]


def test_every_imported_package_is_declared():
    declared = {normalised(Requirement(r).name) for r in pyproject()["project"]["dependencies"]}
    missing = {name for name in third_party_imports() if normalised(DISTRIBUTION_OF.get(name, name)) not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def test_kaggle_is_never_imported():
    # `import kaggle` authenticates at import time and exits the process without credentials.
    assert "kaggle" not in third_party_imports()


def test_no_lower_bound_is_above_what_colab_ships():
    colab = colab_versions()
    assert {"tensorflow", "keras", "numpy", "pandas", "kagglesdk"} <= set(colab)
    for line in pyproject()["project"]["dependencies"]:
        requirement = Requirement(line)
        shipped = colab.get(normalised(requirement.name))
        if requirement.name == "opencv-python-headless":
            shipped = colab["opencv-python"]
        if shipped is not None:
            assert requirement.specifier.contains(shipped), f"{line} excludes Colab's {requirement.name} {shipped}"
        assert all(spec.operator == ">=" for spec in requirement.specifier), f"{line}: lower bounds only"


def test_the_ci_constraints_do_not_pin_the_project_itself():
    pins = {normalised(Requirement(line).name) for line in requirement_lines(REPO_ROOT / "tools" / "constraints.txt")}
    assert "idc-helpers" not in pins
    declared = {normalised(Requirement(r).name) for r in pyproject()["project"]["dependencies"]}
    assert declared <= pins, f"not pinned for CI: {sorted(declared - pins)}"


# google/ stays a namespace package (no __init__.py), as it is where protobuf lives too.
COLAB_STAND_IN = {
    "google/colab/__init__.py": "from google.colab import userdata  # noqa: F401\n",
    "google/colab/userdata.py": (
        "class SecretNotFoundError(Exception):\n    pass\n\n\ndef get(name):\n    raise SecretNotFoundError(name)\n"
    ),
}


def freeze(python: Path) -> list[str]:
    out = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--all", "--exclude", "idc_helpers"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.splitlines()
    return sorted(line for line in out if "idc_helpers" not in line.lower().replace("-", "_"))


def test_colab_setup_installs_nothing_that_is_met_and_changes_no_version(tmp_path):
    """colab_setup.sh on a runtime that has every requirement, inside a stand-in for Colab's own module.

    The runtime is this environment's packages, seen through a fresh virtual environment so that nothing here is
    touched.
    """
    env_dir = tmp_path / "runtime"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # This environment's packages (pip included) are the runtime's preinstalled ones.
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (purelib / "preinstalled.pth").write_text("\n".join(sorted(paths)) + "\n")
    stand_in = tmp_path / "colab"
    for rel, text in COLAB_STAND_IN.items():
        (stand_in / rel).parent.mkdir(parents=True, exist_ok=True)
        (stand_in / rel).write_text(text)
    checkout = copy_checkout(tmp_path / "checkout")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAGGLE_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}", PYTHONPATH=str(stand_in), HOME=str(home))

    before = freeze(python)
    assert any(line.lower().startswith("tensorflow") for line in before)
    result = subprocess.run(
        ["bash", str(checkout / "colab_setup.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Every requirement is already met by this runtime." in result.stdout
    assert "No Kaggle credentials found: the notebooks will try an anonymous download" in result.stdout
    assert freeze(python) == before  # no version changed, nothing added (idc_helpers aside)
    installed = subprocess.run(
        [str(python), "-c", "import idc_helpers.notebook_runner as r; print(r.default_notebook_dir())"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(installed) == purelib / "idc_helpers" / "notebooks"  # the regular install, with its notebooks


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_colab_setup_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(REPO_ROOT / "colab_setup.sh")]).returncode == 0
