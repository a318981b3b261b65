"""Where the project lives on GitHub, the Colab links and setup cell derived from it, and the notebooks' setup.

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
    """The source of every notebook's setup cell: install the package on Colab, then :func:`setup_notebook`.

    On Colab, where the kernel starts without the package, the cell clones the project and runs ``colab_setup.sh``
    (once per runtime: not when the package is importable already); the rest is :func:`setup_notebook`, which the
    cell can only call once the package is installed. Elsewhere the package is expected to be installed
    (``pip install -e .``). ``MOUNT_DRIVE`` set to True mounts Google Drive on Colab (a run folder there survives a
    disconnect; see :data:`DRIVE_RUN_DIR`).
    """
    return "\n".join(
        [
            "import importlib.util",
            "import sys",
            "",
            'IS_COLAB = "google.colab" in sys.modules',
            "MOUNT_DRIVE = False  # Colab: True mounts Google Drive, so that a RUN_DIR there survives a disconnect",
            'if IS_COLAB and importlib.util.find_spec("idc_helpers") is None:',
            "    # Colab starts empty: fetch the project and install it (and what Colab lacks).",
            f'    REPO_DIR = "{COLAB_CLONE_DIR}"',
            f"    !test -d {{REPO_DIR}} || git clone --depth 1 --branch {BRANCH} {repository_url()} {{REPO_DIR}}",
            "    !bash {REPO_DIR}/colab_setup.sh",
            "    importlib.invalidate_caches()  # the package was installed after this kernel started",
            "",
            "from idc_helpers.colab import setup_notebook",
            "",
            "setup_notebook(IS_COLAB, mount_drive=MOUNT_DRIVE)",
        ]
    )


def setup_notebook(is_colab: bool, *, mount_drive: bool = False) -> None:
    """The rest of a notebook's setup cell, once the package is installed: quiet TensorFlow, and settle in on Colab.

    Everywhere: ``TF_CPP_MIN_LOG_LEVEL`` is set to 3 unless it is set already, and TensorFlow is imported by
    :func:`import_tensorflow_quietly`, so that its start-up lines (CUDA probing on a CPU machine, oneDNN notices)
    stay out of the notebook. With ``is_colab``: the working folder becomes the clone's ``notebooks/`` (where the
    setup cell put it), so that relative paths mean the same as on your own machine, and ``mount_drive`` mounts
    Google Drive at ``/content/drive``. In a Jupyter kernel, figures are drawn inline (``%matplotlib inline``)
    whatever backend the environment names: a series started from a shell with ``MPLBACKEND=Agg`` (as the test
    command sets) would otherwise leave every figure out of the executed notebooks.

    For a notebook's setup cell only, an entry point: it changes the process (an environment variable, the working
    folder).
    """
    # Before TensorFlow loads: the variable is read once, at its import.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if is_colab:
        notebooks = os.path.join(COLAB_CLONE_DIR, "notebooks")
        if os.path.isdir(notebooks):  # absent when the package was installed some other way
            os.chdir(notebooks)
        if mount_drive:
            from google.colab import drive

            drive.mount("/content/drive")
    _inline_figures()
    import_tensorflow_quietly()


def _inline_figures() -> None:
    """``%matplotlib inline`` in an IPython kernel; nothing elsewhere (a plain Python process, a terminal IPython)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None and getattr(shell, "kernel", None) is not None:
        shell.run_line_magic("matplotlib", "inline")


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
