"""Write the Colab links of the notebook series from ``idc_helpers.colab`` (the single place naming the repository).

Rewrites, for every ``notebooks/NN_*.ipynb``:
  - the badge cell (the second cell) with a badge opening that notebook on Colab,
  - the setup cell (the one defining ``IS_COLAB``) with the current repository URL and branch,
and the notebook table of README.md between ``<!-- notebooks:start -->`` and ``<!-- notebooks:end -->``.

    python tools/update_notebook_links.py           # rewrite what is out of date
    python tools/update_notebook_links.py --check   # exit 1 and name the files that are out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

from idc_helpers.atomic import write_text
from idc_helpers.colab import badge_markdown, setup_cell_source

REPO_ROOT = Path(__file__).resolve().parents[1]
README_START = "<!-- notebooks:start -->"
README_END = "<!-- notebooks:end -->"
BADGE_CELL = 1  # title, badge, overview, setup, parameters, body


def notebook_paths(root: Path = REPO_ROOT) -> list[Path]:
    """The numbered notebooks of the series, in order."""
    return sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def relative(path: Path, root: Path = REPO_ROOT) -> str:
    """``path`` relative to ``root``, with forward slashes (as badges and links name it)."""
    return path.relative_to(root).as_posix()


def title_and_summary(nb: nbformat.NotebookNode) -> tuple[str, str]:
    """The title cell's heading and its first paragraph (used in the README table)."""
    lines = [line.strip() for line in nb.cells[0].source.splitlines()]
    title = next((line.lstrip("#").strip() for line in lines if line.startswith("#")), "")
    summary = next((line for line in lines if line and not line.startswith("#")), "")
    return title, summary


def updated_notebook(path: Path, root: Path = REPO_ROOT) -> tuple[str, str]:
    """(current text, text with the badge and setup cell rewritten) of one notebook."""
    text = path.read_text(encoding="utf-8")
    nb = nbformat.reads(text, as_version=4)
    if len(nb.cells) <= BADGE_CELL or nb.cells[BADGE_CELL].cell_type != "markdown":
        raise SystemExit(f"{path}: cell {BADGE_CELL + 1} must be the markdown badge cell (see STYLE.md cell order)")
    nb.cells[BADGE_CELL].source = badge_markdown(relative(path, root))
    setup = [c for c in nb.cells if c.cell_type == "code" and "IS_COLAB =" in c.source]
    if len(setup) != 1:
        raise SystemExit(f"{path}: expected exactly one setup cell defining IS_COLAB, found {len(setup)}")
    setup[0].source = setup_cell_source()
    return text, nbformat.writes(nb) + "\n"


def readme_table(paths: list[Path], root: Path = REPO_ROOT) -> str:
    """The Markdown table of notebooks with their Colab badges."""
    rows = ["| Notebook | What it covers | Colab |", "| --- | --- | --- |"]
    for path in paths:
        title, summary = title_and_summary(nbformat.read(path, as_version=4))
        rel = relative(path, root)
        rows.append(f"| [{title}]({rel}) | {summary} | {badge_markdown(rel)} |")
    return "\n".join(rows)


def updated_readme(readme: Path, paths: list[Path], root: Path = REPO_ROOT) -> tuple[str, str] | None:
    """(current text, text with the table rewritten), or None when the README lacks the markers."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return None
    new = text[: start + len(README_START)] + "\n" + readme_table(paths, root) + "\n" + text[end:]
    return text, new


def main(argv: list[str] | None = None, root: Path = REPO_ROOT) -> int:
    """Rewrite the stale badges, setup cells and README table; with ``--check`` change nothing and exit 1 if any."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a file is out of date")
    args = parser.parse_args(argv)

    paths = notebook_paths(root)
    if not paths:
        print(f"no notebooks found in {root / 'notebooks'}", file=sys.stderr)
        return 1
    stale: list[Path] = []
    for path in paths:
        old, new = updated_notebook(path, root)
        if old != new:
            stale.append(path)
            if not args.check:
                write_text(path, new)

    readme = root / "README.md"
    result = updated_readme(readme, paths, root) if readme.exists() else None
    missing_markers = result is None
    if result is not None and result[0] != result[1]:
        stale.append(readme)
        if not args.check:
            write_text(readme, result[1])

    for path in stale:
        print(f"{'out of date' if args.check else 'updated'}: {relative(path, root)}")
    if missing_markers:
        print(
            f"{relative(readme, root)} has no notebook table yet; add these two lines where it belongs and run "
            f"this tool again:\n{README_START}\n{README_END}",
            file=sys.stderr,
        )
    if args.check and stale:
        print("run `python tools/update_notebook_links.py` to update them", file=sys.stderr)
        return 1
    return 1 if args.check and missing_markers else 0


if __name__ == "__main__":
    sys.exit(main())
