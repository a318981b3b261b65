"""The README's command chain runs as printed: every command of its "typical chain" block, in a temporary folder."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
CHAIN_HEADING = "A typical chain"


def chain_commands(text: str) -> list[str]:
    """The commands of the first ```bash block after the line that introduces the typical chain."""
    start = text.find(CHAIN_HEADING)
    assert start >= 0, f"README.md has no paragraph starting {CHAIN_HEADING!r}"
    match = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert match, f"no ```bash block after {CHAIN_HEADING!r} in README.md"
    lines = [line.strip() for line in match.group(1).replace("\\\n", " ").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_chain_block_is_found_and_uses_the_package():
    commands = chain_commands(README.read_text(encoding="utf-8"))
    assert len(commands) >= 3
    assert all(shlex.split(c)[:3] == ["python", "-m", "idc_helpers"] for c in commands), commands


@pytest.mark.slow
def test_readme_chain_runs_as_printed(tmp_path):
    """Each command exits 0 and prints no traceback, run by bash as a user would paste it (a few minutes)."""
    commands = chain_commands(README.read_text(encoding="utf-8"))
    work = tmp_path / "work"
    work.mkdir()
    # `python` is this interpreter; no data folder or Kaggle credentials leak in from the environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAGGLE_", "IDC_DATA_DIR"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", MPLBACKEND="Agg",
               IDC_CACHE_DIR=str(tmp_path / "cache"))
    for command in commands:
        absolute = [arg for arg in shlex.split(command) if arg.startswith("/")]
        assert not absolute, f"README command writes outside the folder it is run in: {command}"
        result = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, f"{command}\nexit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr}"
        assert "Traceback" not in result.stderr, f"{command}\n{result.stderr}"
        assert "deprecated" not in result.stderr, f"the README uses an old spelling: {command}\n{result.stderr}"
