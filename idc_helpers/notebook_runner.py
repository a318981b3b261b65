"""Run the notebook series end to end with papermill: ``python -m idc_helpers run-notebooks``.

Every call writes a new folder ``<out>/<YYYYmmdd-HHMMSS>/`` and never touches an earlier one, so a trained model is
never overwritten and two runs can be compared side by side::

    <out>/20250101-120000/
        notebooks/01_data_exploration.ipynb ...   the executed notebooks, with their outputs
        figures/*.png                             the key figures, saved by the notebooks
        run/                                      the training run of 02 (model.keras, history.json, config.json, ...)
        predictions.csv, metrics.json             written by 03 and read by 04
        parameters.json                           the data source and the parameters each notebook received

The data folder is resolved once (:func:`idc_helpers.datasource.resolve_data_dir`) and handed to every notebook;
02 trains into ``run/``, 03 evaluates that run and writes ``predictions.csv``, 04 draws slides from it.

Where the notebooks come from (:func:`default_notebook_dir`): in a checkout, its ``notebooks/``; after a regular
install, the copy the build put inside the package (``idc_helpers/notebooks/``, with ``params/``); ``--notebooks
DIR`` names another folder.

Parameters: each notebook's ``parameters`` cell holds defaults meant for users (the full dataset, real training).
``--smoke`` applies ``params/smoke.yaml`` of the notebook folder (a run of a few minutes); ``--params FILE`` (YAML or
JSON) applies a file on top. Such a file maps parameter names to values for every notebook that has the parameter,
and may hold a section per notebook (``02_training: {EPOCHS: 3}``). A name that no notebook defines is an error,
so a typo cannot silently do nothing.

How CI runs the notebooks (nbval, with papermill's parameters): nbval cannot pass parameters, and the
notebooks' defaults are for users, not for a 2-core CI machine. So CI asks this runner to *prepare* the series
(``prepare_only=True``, CLI ``--prepare-only``): papermill writes each notebook with a cell of injected CI
parameters (``notebooks/params/ci.yaml``) and the chained paths, without running it, and
``pytest --nbval-lax --nbval-current-env <out>/*/notebooks/`` then executes them in order, once: a failing cell
fails CI and the ``# NBVAL_CHECK_OUTPUT`` cells are compared with their committed outputs. The notebooks are
never edited by text substitution, and users and CI run the very same files.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from idc_helpers.errors import IdcError, UserError
from idc_helpers.validation import check_parameter

NOTEBOOKS = (
    "01_data_exploration",
    "02_training",
    "03_evaluation_and_gradcam",
    "04_whole_slide_heatmaps",
)
# The notebooks and parameter files ship inside the package (the build copies notebooks/*.ipynb and
# notebooks/params/*.yaml into idc_helpers/notebooks/), so a regular install runs the series from any folder; in a
# checkout (an editable install) the checkout's own notebooks/ is used, so edits there count at once.
PACKAGED_NOTEBOOK_DIR = Path(__file__).resolve().parent / "notebooks"
CHECKOUT_NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def _has_series(folder: Path) -> bool:
    return all((folder / f"{name}.ipynb").is_file() for name in NOTEBOOKS)


def default_notebook_dir() -> Path:
    """Where the notebook series is: the checkout's ``notebooks/``, else the copy inside the installed package.

    The checkout's folder is used when this package runs from a checkout; the installed copy may be missing only in a
    broken install.
    """
    return CHECKOUT_NOTEBOOK_DIR if _has_series(CHECKOUT_NOTEBOOK_DIR) else PACKAGED_NOTEBOOK_DIR


NOTEBOOK_DIR = default_notebook_dir()
SMOKE_PARAMS = NOTEBOOK_DIR / "params" / "smoke.yaml"
# The parameters the runner itself sets in each notebook (a test checks each parameters cell defines them).
RUNNER_PARAMETERS: dict[str, tuple[str, ...]] = {
    "01_data_exploration": ("DATA_DIR", "OUT_DIR"),
    "02_training": ("DATA_DIR", "OUT_DIR", "RUN_DIR"),
    "03_evaluation_and_gradcam": ("DATA_DIR", "OUT_DIR", "RUN_DIR", "PREDICTIONS", "SLIDER"),
    "04_whole_slide_heatmaps": ("OUT_DIR", "RUN_DIR", "PREDICTIONS", "SLIDER"),
}
# Set only by the runner: a parameters file may not move the outputs (use --out).
_RESERVED = {"OUT_DIR", "RUN_DIR", "PREDICTIONS"}


class NotebookFailed(IdcError, RuntimeError):
    """A cell of a notebook raised; the message names the notebook, the cell and the executed copy (exit 1)."""

    exit_code = 1

    def __init__(self, message: str, executed: Path):
        super().__init__(message)
        self.executed = executed


class ParametersError(UserError, ValueError):
    """A parameters file is missing, is not a mapping, or names a parameter no notebook has."""


class NotebooksNotFoundError(UserError, FileNotFoundError):
    """The notebooks to run are not where they were looked for."""


def load_params_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON parameters file into a dict (empty file: ``{}``)."""
    path = Path(path)
    if not path.is_file():
        raise ParametersError(f"parameters file {path} not found; pass an existing YAML or JSON file to --params")
    text = path.read_text(encoding="utf-8")
    import yaml

    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    try:
        data = (json.loads(text) if text.strip() else {}) if kind == "JSON" else (yaml.safe_load(text) or {})
    except (ValueError, yaml.YAMLError) as exc:
        raise ParametersError(f"{path}: not valid {kind} ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise ParametersError(f"{path}: expected a mapping of parameter names to values, got {type(data).__name__}")
    return data


def notebook_parameters(notebook: str | os.PathLike[str]) -> dict[str, Any]:
    """The names and default values (as source text) of a notebook's ``parameters`` cell."""
    import papermill

    return {name: info["default"] for name, info in papermill.inspect_notebook(str(notebook)).items()}


def plan_parameters(
    overrides: Mapping[str, Any],
    defined: Mapping[str, Sequence[str]],
    runner: Mapping[str, Mapping[str, Any]],
    source: str = "parameters",
) -> dict[str, dict[str, Any]]:
    """The parameters to inject into each notebook.

    ``overrides``: a parameters file's content (global names, and per-notebook sections keyed by notebook name);
    ``defined``: the parameter names each notebook's parameters cell defines; ``runner``: the values the runner
    sets per notebook (data and output paths). Raises :class:`ParametersError` for a name no notebook defines or one
    reserved for the runner; ``source`` names the file in the message.
    """
    global_values = {k: v for k, v in overrides.items() if k not in defined}
    sections = {k: v for k, v in overrides.items() if k in defined}
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise ParametersError(f"{source}: the section {name!r} must be a mapping of parameter names to values")
    known = set().union(*map(set, defined.values()))
    problems = []
    for where, values, names in [("", global_values, known)] + [
        (f" in section {nb!r}", sec, set(defined[nb])) for nb, sec in sections.items()
    ]:
        for key in values:
            if key in _RESERVED:
                problems.append(f"{key}{where} is set by the runner; use --out to choose where outputs go")
            elif key not in names:
                problems.append(
                    f"{key}{where} is not a parameter of {'any notebook' if not where else 'that notebook'}"
                )
    if problems:
        raise ParametersError(f"{source}: " + "; ".join(problems) + f". Known parameters: {', '.join(sorted(known))}")

    plan = {}
    for nb, names in defined.items():
        values = {k: v for k, v in global_values.items() if k in names}
        values.update(sections.get(nb, {}))
        values.update(runner.get(nb, {}))
        plan[nb] = values
    return plan


def fresh_output_dir(out_dir: str | os.PathLike[str], now: datetime | None = None) -> Path:
    """Create and return a new, empty ``out_dir/<YYYYmmdd-HHMMSS>`` (suffixed ``-2``, ``-3``... if taken)."""
    out_dir = Path(out_dir)
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = out_dir / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate.resolve()
    raise RuntimeError(f"could not create a fresh folder in {out_dir}; remove old runs there")


def _current_env_kernel_manager():
    """A KernelManager class that always starts ipykernel with *this* interpreter.

    The notebooks name the kernel ``python3``; a user-level kernelspec of that name may point at another Python
    without the package, so the runner does not look kernelspecs up at all.
    """
    import ipykernel.kernelspec
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.localinterfaces import localhost
    from jupyter_client.manager import KernelManager
    from jupyter_core.paths import jupyter_runtime_dir
    from traitlets import default

    class CurrentEnvKernelSpecManager(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            return KernelSpec(resource_dir=ipykernel.kernelspec.RESOURCES, **ipykernel.kernelspec.get_kernel_dict())

    class CurrentEnvKernelManager(KernelManager):
        @default("kernel_spec_manager")
        def _default_ksm(self):
            return CurrentEnvKernelSpecManager(data_dir=self.data_dir)

        @default("transport")
        def _default_transport(self):
            # Local sockets where there are any: nothing listens on the network (and ipykernel does not warn).
            return "ipc" if os.name == "posix" else "tcp"

        @default("ip")
        def _default_ip(self):
            # jupyter_client would put the socket files beside the kernel's working directory (the notebooks'
            # folder); the runtime folder is Jupyter's place for them, and they are removed with the kernel.
            if self.transport != "ipc":
                return localhost()
            runtime = jupyter_runtime_dir()
            os.makedirs(runtime, exist_ok=True)
            return os.path.join(runtime, f"idc-kernel-{uuid.uuid4().hex[:12]}-ipc")

    return CurrentEnvKernelManager


@dataclass
class _Series:
    """What a run needs before anything is created: the sources, their parameters, the data folder's source."""

    names: list[str]
    sources: dict[str, Path]
    files: list[Path]
    overrides: dict[str, Any]
    defined: dict[str, list[str]]
    data_dir: str | os.PathLike[str] | None


def _find_sources(notebook_dir: Path, notebooks: Sequence[str] | None) -> tuple[list[str], dict[str, Path]]:
    names = [Path(n).stem for n in (notebooks or NOTEBOOKS)]
    sources = {name: notebook_dir / f"{name}.ipynb" for name in names}
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise NotebooksNotFoundError(
            f"notebooks not found: {', '.join(missing)}. Reinstall the package (`pip install .` in a checkout "
            "copies them into it) or point --notebooks at a folder holding the series."
        )
    return names, sources


def _merge_parameter_files(files: Sequence[Path]) -> dict[str, Any]:
    """The files' contents, later files winning; per-notebook sections are merged key by key."""
    overrides: dict[str, Any] = {}
    for path in files:
        for key, value in load_params_file(path).items():
            _check_values(key, value, path)
            if isinstance(value, dict) and isinstance(overrides.get(key), dict):
                overrides[key] = {**overrides[key], **value}
            else:
                overrides[key] = value
    return overrides


def _check_values(key: Any, value: Any, path: Path) -> None:
    """Check that every value of a parameters file is plain data in range.

    Each value goes through :func:`idc_helpers.validation.check_parameter`; a notebook's section (a map) is checked name
    by name.
    """
    if not isinstance(key, str):
        raise ParametersError(f"{path}: the name {key!r} is not allowed: parameter names are text")
    check_parameter(key, value, str(path))
    if isinstance(value, dict):
        for name, item in value.items():
            check_parameter(name, item, f"{path} [{key}]")


def _plan_series(
    notebook_dir: Path,
    notebooks: Sequence[str] | None,
    smoke: bool,
    params_file: str | os.PathLike[str] | None,
    data_dir: str | os.PathLike[str] | None,
) -> _Series:
    """Find the notebooks and check every parameter name, before anything is downloaded or created."""
    names, sources = _find_sources(notebook_dir, notebooks)
    files = ([notebook_dir / "params" / "smoke.yaml"] if smoke else []) + ([Path(params_file)] if params_file else [])
    overrides = _merge_parameter_files(files)
    file_data_dir = overrides.pop("DATA_DIR", None)
    defined = {name: list(notebook_parameters(src)) for name, src in sources.items()}
    plan_parameters(overrides, defined, {}, source=_label(files))  # a typo must not cost a run
    return _Series(names, sources, files, overrides, defined, data_dir if data_dir is not None else file_data_dir)


def _label(files: Sequence[Path]) -> str:
    return " + ".join(str(f) for f in files) or "parameters"


def _prepare_output(
    series: _Series, out_dir: str | os.PathLike[str], log: Callable[[str], object]
) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Resolve the data once, create the fresh output folder, record and return the per-notebook parameters."""
    from idc_helpers.atomic import write_json
    from idc_helpers.datasource import resolve_data_dir

    source = resolve_data_dir(series.data_dir)  # announces synthetic data itself
    if not source.synthetic:
        log(f"Data: {source}")
    run_root = fresh_output_dir(out_dir)
    # Data the notebooks find by themselves (the demo, chosen because no folder was named) is not passed on: a
    # notebook then says where its data came from as it would when opened by hand, not "from the folder given".
    chosen_for_user = source.synthetic and series.data_dir is None
    paths = {
        "DATA_DIR": None if chosen_for_user else str(Path(source.path).resolve()),
        "OUT_DIR": str(run_root),
        "RUN_DIR": str(run_root / "run"),
        "PREDICTIONS": str(run_root / "predictions.csv"),
        # Nobody moves a slider in a papermill run: the notebooks draw the static figure at the run's threshold.
        "SLIDER": False,
    }
    # Each notebook gets the paths its parameters cell defines.
    runner = {name: {k: v for k, v in paths.items() if k in series.defined[name]} for name in series.names}
    plan = plan_parameters(series.overrides, series.defined, runner, source=_label(series.files))
    write_json(
        run_root / "parameters.json",
        {
            "data": {
                "path": str(Path(source.path).resolve()),
                "origin": source.origin,
                "synthetic": bool(source.synthetic),
            },
            "parameter_files": [str(f) for f in series.files],
            "notebooks": plan,
        },
    )
    log(f"Output folder: {run_root}")
    return run_root, plan


def _execute(
    name: str, source: Path, target: Path, parameters: dict[str, Any], *, cwd: Path, prepare_only: bool
) -> None:
    """Run (or only parameterise) one notebook with papermill; a failure becomes :class:`NotebookFailed`."""
    import papermill

    try:
        papermill.execute_notebook(
            str(source),
            str(target),
            parameters=parameters,
            prepare_only=prepare_only,
            cwd=str(cwd),
            progress_bar=sys.stderr.isatty(),
            request_save_on_cell_execute=True,
            kernel_manager_class=_current_env_kernel_manager(),
        )
    except papermill.PapermillExecutionError as err:
        first_line = next((ln for ln in err.source.splitlines() if ln.strip()), "")
        raise NotebookFailed(
            f"{name}.ipynb failed in cell [{err.exec_count}] ({first_line.strip()!r}): {err.ename}: {err.evalue}\n"
            f"The executed notebook, with the traceback, is {target}",
            target,
        ) from None
    except Exception as err:  # the kernel died (e.g. out of memory), a timeout, an unreadable notebook...
        raise NotebookFailed(
            f"{name}.ipynb stopped: {type(err).__name__}: {err}\nWhat ran is saved in {target}", target
        ) from err


def _report(run_root: Path, executed_dir: Path, prepare_only: bool, log: Callable[[str], object]) -> None:
    log(("Prepared notebooks (not executed): " if prepare_only else "Executed notebooks: ") + str(executed_dir))
    if prepare_only:
        return
    figures = sorted((run_root / "figures").glob("*.png"))
    log(f"Figures ({len(figures)}): {run_root / 'figures'}")
    for item in ("run", "predictions.csv", "metrics.json"):
        if (run_root / item).exists():
            log(f"{item}: {run_root / item}")


def run_notebooks(
    out_dir: str | os.PathLike[str] = "outputs",
    *,
    smoke: bool = False,
    params_file: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    notebooks: Sequence[str] | None = None,
    prepare_only: bool = False,
    notebook_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], object] = print,
) -> list[Path]:
    """Run the notebooks in order into a fresh ``out_dir/<timestamp>/``; return the executed notebooks' paths.

    ``notebooks``: names (``"02_training"`` or ``"02_training.ipynb"``) to run, default all four; a later
    notebook needs the outputs of the earlier ones in the same folder, so subsets are for debugging.
    ``prepare_only``: write the parameterised notebooks without executing them (for nbval).
    ``notebook_dir``: where the source notebooks and ``params/`` are (default :func:`default_notebook_dir`);
    ``log``: where progress messages go. A checkout's notebooks run with their own folder as the working
    directory (relative paths mean what they mean to a user who opens them there); packaged ones with the
    executed copies' folder. Raises :class:`NotebookFailed` when a cell fails (the executed copy up to the
    failure is kept), :class:`ParametersError` / :class:`NotebooksNotFoundError` before anything is created.
    """
    notebook_dir = Path(notebook_dir) if notebook_dir is not None else default_notebook_dir()
    series = _plan_series(notebook_dir, notebooks, smoke, params_file, data_dir)
    run_root, plan = _prepare_output(series, out_dir, log)
    executed_dir = run_root / "notebooks"
    executed_dir.mkdir()
    cwd = executed_dir if notebook_dir.resolve() == PACKAGED_NOTEBOOK_DIR else notebook_dir
    results = []
    for name in series.names:
        target = executed_dir / f"{name}.ipynb"
        started = time.perf_counter()
        if not prepare_only:
            log(f"Running {name} ...")
        _execute(name, series.sources[name], target, plan[name], cwd=cwd, prepare_only=prepare_only)
        results.append(target)
        if not prepare_only:
            log(f"  {name} done in {time.perf_counter() - started:.0f} s")
    _report(run_root, executed_dir, prepare_only, log)
    return results
