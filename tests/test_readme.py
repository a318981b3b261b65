"""Every command printed in README.md, docs/ and results/README.md runs as printed.

- Each ``python -m idc_helpers ...`` and ``python -m idc_helpers.bench ...`` line of a ```bash block is given to the
  command's own argument parser, which must accept it (a renamed option or an old spelling fails here); the
  benchmarks are parsed, not run (they train for hours on the shared folders).
- The typical chain of docs/cli.md runs end to end in an empty folder (slow).
- The series command with a data folder really passes that folder on (it once ran on the synthetic data).
- The README is a landing page (at most about 1,000 words) and the results page at most about 4,000.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
DOCS = [*sorted((REPO_ROOT / "docs").glob("*.md")), REPO_ROOT / "results" / "README.md"]
CLI_DOC = REPO_ROOT / "docs" / "cli.md"
CHAIN_HEADING = "A typical chain"


def bash_lines(text: str) -> list[str]:
    """The commands of every ```bash block: continuation lines joined, comments and blank lines dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.strip().startswith("#"):
                lines.append(line.strip())
    return lines


def package_commands(line: str) -> list[list[str]]:
    """The ``python -m idc_helpers[.bench]`` commands of a line (``a && b`` gives several), as argv lists."""
    commands = []
    for part in line.split("&&"):
        words = shlex.split(part)
        if words[:2] == ["python", "-m"] and words[2] in ("idc_helpers", "idc_helpers.bench"):
            commands.append(words[2:])
    return commands


def documented() -> list[tuple[str, list[str]]]:
    return [
        (path.name, argv)
        for path in [README, *DOCS]
        for line in bash_lines(path.read_text(encoding="utf-8"))
        for argv in package_commands(line)
    ]


class _Parsed(Exception):
    """Raised instead of running a command once its arguments parsed."""


def parse_only(argv: list[str], monkeypatch) -> argparse.Namespace:
    """Parse ``argv`` with the command's own parser and stop there; a rejected argument exits with status 2.

    ``argv`` is ``["idc_helpers", ...]`` or ``["idc_helpers.bench", NAME, ...]``.
    """
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    if argv[0] == "idc_helpers":
        from idc_helpers.cli import main

        rest = argv[1:]
    else:
        from idc_helpers.bench import BENCHMARKS

        assert argv[1] in BENCHMARKS, f"no benchmark {argv[1]!r}"
        main = importlib.import_module(BENCHMARKS[argv[1]]).main
        rest = argv[2:]
    try:
        status = main(rest)
    except _Parsed as parsed:
        return parsed.args[0]
    raise SystemExit(status)  # the command refused its arguments: one error: line, exit status 2


def test_the_documents_print_commands_of_every_kind():
    commands = documented()
    assert len(commands) >= 30
    files = {name for name, _ in commands}
    assert {"README.md", "cli.md", "results.md"} <= files
    assert any(argv[0] == "idc_helpers.bench" for _, argv in commands)


@pytest.mark.parametrize("where, argv", documented(), ids=lambda v: v if isinstance(v, str) else " ".join(v[:3]))
def test_every_documented_command_parses_as_printed(where, argv, monkeypatch, capsys):
    try:
        parse_only(argv, monkeypatch)
    except SystemExit:  # argparse's refusal: exit 2 and a usage line
        pytest.fail(f"{where}: `python -m {' '.join(argv)}` is refused: {capsys.readouterr().err.strip()}")


def test_parse_only_catches_a_wrong_option(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parse_only(["idc_helpers", "evaluate", "--predictions", "p.csv", "--threshhold", "0.5"], monkeypatch)
    with pytest.raises(SystemExit):
        parse_only(["idc_helpers.bench", "quality", "--data-dir", "d", "--no-such-option"], monkeypatch)


def test_readme_and_results_are_short():
    assert len(README.read_text(encoding="utf-8").split()) <= 1000
    assert len((REPO_ROOT / "docs" / "results.md").read_text(encoding="utf-8").split()) <= 4000
    for doc in ("cli.md", "data.md", "colab.md", "development.md", "results.md"):
        assert f"(docs/{doc})" in README.read_text(encoding="utf-8"), f"README does not link docs/{doc}"


def test_the_data_folder_reaches_the_series_as_printed(tiny_dataset, tmp_path, monkeypatch):
    """The README's series command for a data folder: the folder is an argument of run-notebooks itself.

    Not an `IDC_DATA_DIR=... python3 -m venv ...` prefix: that applied to venv only, and the series ran on synthetic
    data.
    """
    lines = bash_lines(README.read_text(encoding="utf-8"))
    assert not [line for line in lines if re.match(r"^\w+=\S+ python3 -m venv", line)]
    with_data = [
        argv
        for line in lines
        for argv in package_commands(line)
        if argv[:2] == ["idc_helpers", "run-notebooks"] and "--data-dir" in argv
    ]
    assert len(with_data) == 1, "the README prints one series command with a data folder"
    argv = [str(tiny_dataset) if word == "/path/to/patches" else word for word in with_data[0]]
    assert str(tiny_dataset) in argv, "the placeholder folder of the README is /path/to/patches"
    monkeypatch.chdir(tmp_path)
    from idc_helpers.cli import main

    assert main([*argv[1:], "--prepare-only", "--out", str(tmp_path / "out")]) == 0
    recorded = json.loads(next((tmp_path / "out").glob("*/parameters.json")).read_text())
    assert recorded["data"]["path"] == str(tiny_dataset.resolve()) and recorded["data"]["synthetic"] is False
    assert recorded["notebooks"]["01_data_exploration"]["DATA_DIR"] == str(tiny_dataset.resolve())


def chain_commands(text: str) -> list[str]:
    """The commands of the first ```bash block after the line that introduces the typical chain."""
    start = text.find(CHAIN_HEADING)
    assert start >= 0, f"docs/cli.md has no paragraph starting {CHAIN_HEADING!r}"
    match = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert match, f"no ```bash block after {CHAIN_HEADING!r} in docs/cli.md"
    return bash_lines(match.group(0))


def test_the_chain_block_is_found_and_uses_the_package():
    commands = chain_commands(CLI_DOC.read_text(encoding="utf-8"))
    assert len(commands) >= 3
    assert all(shlex.split(c)[:3] == ["python", "-m", "idc_helpers"] for c in commands), commands


@pytest.mark.slow
def test_chain_runs_as_printed(tmp_path):
    """Each command exits 0 and prints no traceback, run by bash as a user would paste it (a few minutes).

    The synthetic-data banner is shown once, by demo-data; the later commands name the demo data in one line.
    """
    commands = chain_commands(CLI_DOC.read_text(encoding="utf-8"))
    work = tmp_path / "work"
    work.mkdir()
    # `python` is this interpreter; no data folder or Kaggle credentials leak in from the environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAGGLE_", "IDC_DATA_DIR"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        MPLBACKEND="Agg",
        IDC_CACHE_DIR=str(tmp_path / "cache"),
    )
    banners = []
    for command in commands:
        absolute = [arg for arg in shlex.split(command) if arg.startswith("/")]
        assert not absolute, f"documented command writes outside the folder it is run in: {command}"
        result = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}\nexit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr}"
        assert "Traceback" not in result.stderr, f"{command}\n{result.stderr}"
        banners.append(result.stdout.count("SYNTHETIC DEMO DATA"))
    assert banners[0] == 1 and not any(banners[1:]), banners
