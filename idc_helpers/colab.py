"""Where the project lives on GitHub, and the Colab links and setup cell derived from it.

``REPOSITORY`` and ``BRANCH`` are the single source of truth: the Colab badges in the README and in each notebook,
and the repository URL in each notebook's setup cell, are written from them by ``tools/update_notebook_links.py``
(run it after changing either; ``--check`` fails when a file is out of date).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import PurePosixPath

REPOSITORY = "idc-notebooks/idc-detection"
BRANCH = "main"
COLAB_BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
# Where the setup cell clones the repository on Colab.
COLAB_CLONE_DIR = "/content/" + REPOSITORY.split("/")[-1]
#: Where the notebooks suggest a run folder on Google Drive (mounted by the setup cell), to survive a disconnect.
DRIVE_RUN_DIR = "/content/drive/MyDrive/idc-detection/run"


def repository_url() -> str:
    """The repository's GitHub URL (what ``git clone`` takes)."""
    return f"https://github.com/{REPOSITORY}"


def colab_url(notebook_path: str) -> str:
    """Colab URL that opens ``notebook_path``, relative to the repository root (``notebooks/02_training.ipynb``)."""
    path = PurePosixPath(str(notebook_path).replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"give the notebook path relative to the repository root, not {notebook_path!r}")
    return f"https://colab.research.google.com/github/{REPOSITORY}/blob/{BRANCH}/{path}"


def badge_markdown(notebook_path: str) -> str:
    """Markdown for an "Open in Colab" badge linking to ``notebook_path`` (relative to the repository root)."""
    return f"[![Open In Colab]({COLAB_BADGE_IMAGE})]({colab_url(notebook_path)})"


def setup_cell_source() -> str:
    """The source of every notebook's setup cell.

    Everywhere: quiet TensorFlow's start-up lines (before it is imported). On Colab: clone the project, run
    ``colab_setup.sh`` and, when ``MOUNT_DRIVE`` is set to True, mount Google Drive (a run folder there survives a
    disconnect; see :data:`DRIVE_RUN_DIR`). Elsewhere the package is expected to be installed (``pip install -e .``).
    """
    return "\n".join(
        [
            "import os",
            "import sys",
            "",
            "# Before TensorFlow loads: hide its C++ start-up lines (CUDA probing on a CPU machine, oneDNN notices).",
            'os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")',
            'IS_COLAB = "google.colab" in sys.modules',
            "MOUNT_DRIVE = False  # Colab: True mounts Google Drive, so that a RUN_DIR there survives a disconnect",
            "if IS_COLAB:",
            "    # Colab starts empty: fetch the project, install it (and what Colab lacks), then work from its",
            "    # notebooks/ folder so that relative paths mean the same as on your own machine.",
            "    import importlib",
            "",
            f'    REPO_URL = "{repository_url()}"',
            f'    REPO_DIR = "{COLAB_CLONE_DIR}"',
            "    if not os.path.isdir(REPO_DIR):",
            f"        !git clone --depth 1 --branch {BRANCH} {{REPO_URL}} {{REPO_DIR}}",
            "    !bash {REPO_DIR}/colab_setup.sh",
            "    %cd {REPO_DIR}/notebooks",
            "    importlib.invalidate_caches()  # the package was installed after this kernel started",
            "    if MOUNT_DRIVE:",
            "        from google.colab import drive",
            "",
            '        drive.mount("/content/drive")',
            "",
            "from idc_helpers.colab import import_tensorflow_quietly",
            "",
            "import_tensorflow_quietly()",
        ]
    )


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with the process's stderr silenced for the time of the import, for a notebook's setup cell.

    TensorFlow 2.19+ writes some start-up lines (CUDA drivers not found, oneDNN notices) before its logging is set
    up, so ``TF_CPP_MIN_LOG_LEVEL`` cannot hide them; in a notebook they become alarming stderr cells. An import
    error still raises as usual once stderr is back.
    """
    with contextlib.ExitStack() as stack:
        try:
            saved = os.dup(2)
        except OSError:  # no file descriptor 2 (some embedded interpreters): import as it is
            importlib.import_module("tensorflow")
            return
        stack.callback(os.close, saved)
        stack.callback(os.dup2, saved, 2)
        null = os.open(os.devnull, os.O_WRONLY)
        stack.callback(os.close, null)
        os.dup2(null, 2)
        importlib.import_module("tensorflow")
