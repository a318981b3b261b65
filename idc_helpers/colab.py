"""Where the project lives on GitHub, and the Colab links and setup cell derived from it.

``REPOSITORY`` and ``BRANCH`` are the single source of truth: the Colab badges in the README and in each notebook,
and the repository URL in each notebook's setup cell, are written from them by ``tools/update_notebook_links.py``
(run it after changing either; ``--check`` fails when a file is out of date).
"""

from __future__ import annotations

from pathlib import PurePosixPath

REPOSITORY = "idc-notebooks/idc-detection"
BRANCH = "main"
COLAB_BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
# Where the setup cell clones the repository on Colab.
COLAB_CLONE_DIR = "/content/" + REPOSITORY.split("/")[-1]


def repository_url() -> str:
    """The repository's GitHub URL (what ``git clone`` takes)."""
    return f"https://github.com/{REPOSITORY}"


def colab_url(notebook_path: str) -> str:
    """Colab URL that opens ``notebook_path`` (relative to the repository root, e.g. ``notebooks/02_training.ipynb``)."""
    path = PurePosixPath(str(notebook_path).replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"give the notebook path relative to the repository root, not {notebook_path!r}")
    return f"https://colab.research.google.com/github/{REPOSITORY}/blob/{BRANCH}/{path}"


def badge_markdown(notebook_path: str) -> str:
    """Markdown for an "Open in Colab" badge linking to ``notebook_path`` (relative to the repository root)."""
    return f"[![Open In Colab]({COLAB_BADGE_IMAGE})]({colab_url(notebook_path)})"


def setup_cell_source() -> str:
    """The source of every notebook's setup cell: on Colab, clone the project and run ``colab_setup.sh``.

    Elsewhere it only sets ``IS_COLAB``: the package is expected to be installed (``pip install -e .``).
    """
    return "\n".join([
        "import sys",
        "",
        'IS_COLAB = "google.colab" in sys.modules',
        "if IS_COLAB:",
        "    # Colab starts empty: fetch the project, install it (and what Colab lacks), then work from its",
        "    # notebooks/ folder so that relative paths mean the same as on your own machine.",
        "    import importlib",
        "    import os",
        "",
        f'    REPO_URL = "{repository_url()}"',
        f'    REPO_DIR = "{COLAB_CLONE_DIR}"',
        "    if not os.path.isdir(REPO_DIR):",
        f"        !git clone --depth 1 --branch {BRANCH} {{REPO_URL}} {{REPO_DIR}}",
        "    !bash {REPO_DIR}/colab_setup.sh",
        "    %cd {REPO_DIR}/notebooks",
        "    importlib.invalidate_caches()  # the package was installed after this kernel started",
    ])
