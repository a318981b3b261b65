"""The command handlers: ``cmd_<command>(args)`` runs one command of :mod:`idc_helpers.cli` and returns its status.

Each handler turns the parsed arguments into calls of the domain modules, imported when the command runs so that
``--help`` stays fast and TensorFlow loads only when needed, and prints what the command reports. Mistakes are
raised as :class:`idc_helpers.errors.UserError`, outside failures as :class:`idc_helpers.errors.ExternalError`;
:func:`idc_helpers.cli.main` turns them into one ``error:`` line and the exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from idc_helpers.atomic import OutputPathError, check_out_file, output_failed, write_json
from idc_helpers.disk import format_bytes
from idc_helpers.errors import IdcError, UserError

__all__ = [
    "cmd_demo_data",
    "cmd_download",
    "cmd_evaluate",
    "cmd_index",
    "cmd_predict",
    "cmd_run_notebooks",
    "cmd_slide",
    "cmd_train",
]

# Work long enough to show progress: files over 100 MB, bootstraps over 10^9 patch-resamples (about 10 s).
_LONG_READ_BYTES = 100_000_000
_LONG_BOOTSTRAP = 1_000_000_000


def cmd_download(args: argparse.Namespace) -> int:
    """``python -m idc_helpers download [--out DIR] [--force]``: a verified copy of the dataset in ``DIR``."""
    from idc_helpers.kaggle_download import download_dataset

    download_dataset(args.out or "data", force=args.force, progress=not args.no_progress)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """``python -m idc_helpers index``: print the health report; 0 = no problems, 1 = problems found."""
    import json

    from idc_helpers.health import format_report, health_report

    data_dirs = list(args.data_dir or [])
    if not data_dirs:
        raise UserError("index needs a dataset folder: index --data-dir DIR (repeat --data-dir for several).")
    report = health_report(
        data_dirs, cache_dir=args.cache_dir, decode=not args.no_decode, progress=sys.stderr.isatty()
    )  # a bar on a terminal only, never in logs
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def cmd_demo_data(args: argparse.Namespace) -> int:
    """``python -m idc_helpers demo-data --out DIR [--n-patients N] [--seed S]``: write it, print notice and counts."""
    import time

    from idc_helpers.demo_data import DEFAULT_PATIENTS, SYNTHETIC_NOTICE, write_demo_dataset
    from idc_helpers.patch_index import build_index, dataset_summary

    out, n_patients = args.out, args.n_patients
    if out is None:
        raise UserError("demo-data needs --out DIR, the folder to write the synthetic dataset to.")
    start = time.perf_counter()
    dest = write_demo_dataset(
        out, n_patients=n_patients if n_patients is not None else DEFAULT_PATIENTS, seed=args.seed
    )
    seconds = time.perf_counter() - start
    summary = dataset_summary(build_index(dest).frame)
    print(SYNTHETIC_NOTICE)
    print(
        f"Wrote a SYNTHETIC demo dataset to {dest} in {seconds:.1f} s (seed {args.seed}):\n"
        f"  patients: {summary['patients']}\n"
        f"  patches:  {summary['patches']:,} ({summary['non_idc']:,} non-IDC, {summary['idc']:,} IDC; "
        f"IDC share {summary['idc_fraction']:.1%})\n"
        f"  smaller than 50x50: {summary['not_50x50']}"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """``python -m idc_helpers train``: write (or finish, with ``--resume``) a run folder."""
    if (args.out is None) == (args.resume is None):
        raise UserError(
            "train needs exactly one of --out RUN_DIR (a new run) and --resume RUN_DIR (continue an interrupted one)."
        )
    from idc_helpers.training import train

    data_dir = args.data_dir[0] if args.data_dir and len(args.data_dir) == 1 else args.data_dir
    if args.resume:
        given = [
            f"--{name.replace('_', '-')}"
            for name, default in args.run_defaults.items()
            if getattr(args, name) != default
        ]
        if given:
            raise UserError(
                f"train --resume continues a run with the arguments it was started with; leave out "
                f"{', '.join(given)} (or start a new run with --out)."
            )
        result = train(data_dir, args.resume, resume=True, cache_dir=args.cache_dir, verbose="auto")
    else:
        test_patients = args.test_patients or None
        result = train(
            data_dir,
            args.out,
            model_name=args.model,
            epochs=args.epochs,
            split=args.split,
            unlisted=args.unlisted,
            max_patches=args.max_patches,
            seed=args.seed,
            model_seed=args.model_seed,
            batch_size=args.batch_size,
            label_smoothing=args.label_smoothing,
            augment=args.augment,
            averaging=args.averaging,
            weighting=args.weighting,
            cache_dir=args.cache_dir,
            test_patients=test_patients,
            verbose="auto",
        )
    folders = " ".join(f"--data-dir {d}" for d in result.config["data"]["data_dirs"])
    print(f"Next: python -m idc_helpers predict --run {result.run_dir} {folders} --subset test --out predictions.csv")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """``python -m idc_helpers predict``: write the predictions CSV."""
    run_dir = args.run
    if run_dir is None:
        raise UserError("predict needs --run RUN_DIR, a run folder written by `python -m idc_helpers train`.")
    out = check_out_file(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite to replace it.")
    from idc_helpers import predictions
    from idc_helpers.demo_data import SYNTHETIC_LINE, is_synthetic
    from idc_helpers.patch_index import build_index
    from idc_helpers.run_folder import load_run

    if any(is_synthetic(folder) for folder in args.data_dir):
        print(f"SYNTHETIC demo data: {SYNTHETIC_LINE}", flush=True)
    index = build_index(args.data_dir)
    run = load_run(run_dir)
    params = run.metrics.get("context") or {"unavailable": "its metrics hold none (a bare .keras file or an older run)"}
    if args.context and "unavailable" in params:
        raise UserError(
            f"predict --context: the run {run_dir} has no slide-context parameters: {params['unavailable']}"
        )
    frame = predictions.select_patients(index.frame, run=run, subset=args.subset, patients=args.patients or None)
    # Patches that fail to decode are warned about (one `warning:` line, main's format) and left out.
    table = predictions.predict_frame(run, frame, tta=args.tta, cache_dir=args.cache_dir)
    if args.context:
        from idc_helpers.slide_context import apply_context

        table = apply_context(table, params)
    try:
        predictions.write_predictions(table, out, overwrite=args.overwrite)
    except OSError as exc:  # a full disk, a folder that became read-only meanwhile
        if isinstance(exc, UserError):
            raise
        raise output_failed(out, exc) from exc
    print(
        f"Wrote {len(table):,} predictions ({table['patient_id'].nunique()} patients, "
        f"{int(table['pred'].sum()):,} predicted IDC at threshold {run.threshold:.3f}"
        + (f"; with slide context at {params['threshold']:.3f}" if args.context else "")
        + f") to {out}"
    )
    if index.problems:
        folders = " ".join(f"--data-dir {d}" for d in args.data_dir)
        print(
            f"{len(index.problems)} files are not patches and were skipped "
            f"(details: python -m idc_helpers index {folders})."
        )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``python -m idc_helpers evaluate``: the report and the per-patient table; JSON with ``--out``."""
    import pandas as pd

    from idc_helpers.metrics import evaluate, per_patient_metrics
    from idc_helpers.predictions import read_predictions, table_is_synthetic
    from idc_helpers.reporting import format_report

    source = Path(args.predictions)
    out = check_out_file(args.out) if args.out else None
    try:
        if source.is_file() and source.stat().st_size > _LONG_READ_BYTES:
            print(f"Reading {source} ({format_bytes(source.stat().st_size)}) ...", file=sys.stderr, flush=True)
        table = read_predictions(source)  # checks columns, types and one row per patch
        progress = _bootstrap_progress("bootstrap") if len(table) * args.bootstrap > _LONG_BOOTSTRAP else None
        report = evaluate(
            table,
            n_bootstrap=args.bootstrap,
            seed=args.seed,
            threshold=args.threshold,
            synthetic=table_is_synthetic(table),
            progress=progress,
        )
        patients = per_patient_metrics(table, threshold=args.threshold)
        # The slide-context columns of `predict --context` are scored apart, at their own (stored) decisions.
        with_context = (
            evaluate(
                table,
                n_bootstrap=args.bootstrap,
                seed=args.seed,
                column="prob_idc_context",
                synthetic=report["synthetic"],
                progress=progress and _bootstrap_progress("context bootstrap"),
            )
            if "prob_idc_context" in table
            else None
        )
    except IdcError:
        raise
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        message = str(exc) if str(source) in str(exc) else f"{source}: {exc}"
        raise UserError(message) from exc
    print(format_report(report))
    if with_context is not None:
        print("\n" + format_report(with_context))
    print("\nPer patient")
    print(patients.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="n/a"))
    if out is not None:
        data = {"predictions": str(source.resolve()), **report}
        # NaN is not valid JSON: undefined per-patient metrics become null.
        data["per_patient"] = patients.astype(object).where(patients.notna(), None).to_dict(orient="records")
        if with_context is not None:
            data["context"] = with_context
        try:
            write_json(out, data)
        except OSError as exc:
            raise output_failed(out, exc) from exc
        print(f"\nReport on {source} written to {out}")
    return 0


def cmd_slide(args: argparse.Namespace) -> int:
    """``python -m idc_helpers slide``: one patient's slide with IDC overlays, into an image file (atomically)."""
    from matplotlib.backend_bases import FigureCanvasBase

    from idc_helpers import plots, slide_plots, slides
    from idc_helpers.predictions import table_is_synthetic

    out = check_out_file(args.out)
    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = out.suffix.lstrip(".").lower()
    if suffix not in formats:
        raise OutputPathError(
            f"--out {out}: {'no' if not suffix else 'the'} file type {suffix!r} is not an image "
            f"format; end the name with one of .{', .'.join(sorted(formats))}"
        )
    source = Path(args.predictions)
    patient = slides.read_patient_rows(source, args.patient)  # every row checked, one chunk at a time
    rows = patient.rows
    mosaic = slides.slide_mosaic(
        rows, args.patient, scale=slides.scale_to_fit(rows, slides.CLI_MAX_SIDE), source=str(source)
    )
    # The run's threshold, recorded in the table by `predict` (else the one its decisions imply).
    threshold = args.threshold if args.threshold is not None else patient.threshold

    import matplotlib.pyplot as plt

    fig = slide_plots.plot_slide(mosaic, threshold=threshold)
    try:
        plots.save_figure(fig, out, synthetic=table_is_synthetic(rows), dpi=150)
    except OSError as exc:
        raise output_failed(out, exc) from exc
    finally:
        plt.close(fig)
    width, height = mosaic.span
    print(
        f"Patient {mosaic.patient_id}: {mosaic.n_patches:,} patches, {mosaic.n_idc:,} IDC; "
        f"patches span {width}x{height} slide px; figure written to {out}"
        + (
            ""
            if threshold is None
            else f"; threshold {threshold:.3f} marked on the colour bar"
            + (
                ""
                if args.threshold is not None
                else " (the run's, recorded in the predictions)"
                if patient.recorded
                else " (the lowest prob_idc the table calls IDC; --threshold gives another)"
            )
        )
    )
    return 0


def cmd_run_notebooks(args: argparse.Namespace) -> int:
    """``python -m idc_helpers run-notebooks``: the series into a fresh folder under ``--out``.

    A failing cell exits 1 (the message names the notebook, the cell and the executed copy); a bad parameters file
    or a missing notebook exits 2 before anything is created.
    """
    from idc_helpers.notebook_runner import run_notebooks

    run_notebooks(
        args.out,
        smoke=args.smoke,
        params_file=args.params,
        data_dir=args.data_dir,
        prepare_only=args.prepare_only,
        notebook_dir=args.notebooks,
    )
    return 0


def _bootstrap_progress(label: str) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` for :func:`idc_helpers.metrics.evaluate`: a stderr line at each further tenth."""
    shown = [-1]

    def report(done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth > shown[0]:
            shown[0] = tenth
            print(f"{label}: {done:,} of {total:,} resamples", file=sys.stderr, flush=True)

    return report
