"""Build step of idc_helpers (everything else is in pyproject.toml): ship the notebook series inside the package.

A regular install (``pip install .``, a wheel) then runs ``python -m idc_helpers run-notebooks`` from any folder:
the build copies ``notebooks/*.ipynb`` and ``notebooks/params/*.yaml`` into ``idc_helpers/notebooks/`` of the built
package. The copies exist only in the build, never in git. An editable install skips the copy: the runner then
uses the checkout's own ``notebooks/``.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

NOTEBOOK_FILES = ("*.ipynb", "params/*.yaml")


class BuildWithNotebooks(build_py):
    """``build_py`` that also copies the notebook series into the built package (not in an editable install)."""

    def run(self) -> None:
        """Build the package, then copy :data:`NOTEBOOK_FILES` into ``idc_helpers/notebooks/``."""
        super().run()
        if getattr(self, "editable_mode", False):
            return
        source = Path(__file__).resolve().parent / "notebooks"
        target = Path(self.build_lib) / "idc_helpers" / "notebooks"
        for pattern in NOTEBOOK_FILES:
            for path in sorted(source.glob(pattern)):
                destination = target / path.relative_to(source)
                self.mkpath(str(destination.parent))
                self.copy_file(str(path), str(destination))


setup(cmdclass={"build_py": BuildWithNotebooks})
