"""The package's shape: data flows one way (no import cycle), one job per module, scores in metrics alone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import idc_helpers

PACKAGE = Path(idc_helpers.__file__).parent
MODULES = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
MAX_LINES = 500  # a module that grows past this has a second job (benchmarks aside)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """The package modules and the outside modules ``path`` imports anywhere, function bodies included."""
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "idc_helpers":
                inside |= {a.name for a in node.names if a.name in MODULES}
            elif node.module.startswith("idc_helpers."):
                inside.add(node.module.split(".")[1])
            else:
                outside |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("idc_helpers."):
                    inside.add(alias.name.split(".")[1])
                else:
                    outside.add(alias.name)
    return inside & MODULES.keys(), outside


def _listed_order() -> list[str]:
    """The package's modules in the order of the package docstring's list (data flows down it)."""
    names = [name for name in re.findall(r"``([a-z_]+)``", idc_helpers.__doc__) if name in MODULES]
    return list(dict.fromkeys(names))


def test_the_package_docstring_names_every_module():
    missing = sorted(MODULES.keys() - set(_listed_order()))
    assert not missing, f"add to the module list in idc_helpers/__init__.py: {missing}"


def test_a_module_imports_only_modules_listed_before_it():
    """Data flows one way: no import goes up the list, function bodies included, so there is no import cycle."""
    position = {name: i for i, name in enumerate(_listed_order())}
    upward = [
        f"{name} imports {other}"
        for name, path in sorted(MODULES.items())
        for other in sorted(_imports(path)[0] - {name})
        if position[other] > position[name]
    ]
    assert not upward, upward


def test_every_module_keeps_to_one_job_in_a_few_hundred_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_metrics_is_the_only_module_that_imports_scikit_learns_scores():
    scoring = {
        name for name, path in MODULES.items() if any(m.startswith("sklearn.metrics") for m in _imports(path)[1])
    }
    assert scoring == {"metrics"}
