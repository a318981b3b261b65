"""Command line: ``python -m idc_helpers <command>`` (or the ``idc`` console script).

Argument parsing and the ``run_<command>(args)`` handlers live here, and only here; the handlers call the domain
modules, imported when the command runs so that ``--help`` stays fast and TensorFlow loads only when needed.
Errors the user can fix (:class:`idc_helpers.errors.UserError`) and outside failures
(:class:`idc_helpers.errors.ExternalError`) become one ``error:`` line on stderr and the exit status of
:data:`EXIT_CODES`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import NoReturn

from idc_helpers import __version__
from idc_helpers.errors import DiskFullError, IdcError, UserError, is_disk_full
from idc_helpers.validation import arg_type, patient_list

EXIT_CODES = {
    0: "success",
    1: "the command ran and found problems (index: files that are not usable patches; run-notebooks: a notebook "
    "cell failed, the executed copy shows where)",
    2: "a mistake the message names and says how to fix: an argument, a number out of range, a table or "
    "parameters file that breaks the rules, a missing or unusable file or folder, an output that already exists "
    "or is being written by another train, missing credentials (checked before any folder is written; see "
    "docs/input-checks.md)",
    3: "an outside failure: the server refused or broke off a download, the disk is full (train keeps a run that "
    "--resume continues)",
    130: "interrupted (Ctrl-C) at any moment; nothing half-written is left looking complete",
}


def _exit_code_help() -> str:
    return "exit status:\n" + "\n".join(f"  {code:>3}  {meaning}" for code, meaning in EXIT_CODES.items())


def _refuse_old_spelling(old: object, old_spelling: str, new_spelling: str) -> None:
    """Refuse an old spelling that was given (``old`` not ``None``) with a line naming the word that replaced it."""
    if old is not None:
        raise UserError(f"{old_spelling} is no longer accepted: use {new_spelling}.")


# The commands that run a model: TensorFlow is imported for them up front, quietly.
_TENSORFLOW_COMMANDS = ("train", "predict")


def quiet_tensorflow(command: str | None = None) -> None:
    """Hide TensorFlow's C++ start-up lines (CUDA probing on a CPU machine, oneDNN notices) unless the user set
    ``TF_CPP_MIN_LOG_LEVEL``; an entry point calls this before TensorFlow is imported. TensorFlow 2.19+ prints some
    of them before its logging reads that variable, so a command that needs TensorFlow (``train``, ``predict``, and
    ``"bench"`` for the benchmarks, which keep TensorFlow's own oneDNN default) imports it here with stderr silenced
    for the time of the import.
    """
    if command in _TENSORFLOW_COMMANDS:
        # oneDNN's CPU kernels train 2-4x faster on a CPU; TensorFlow enables them by itself only on CPUs with
        # AVX512-VNNI/BF16/AMX. The variable counts only before TensorFlow is imported; a user's "0" stays.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if command in (*_TENSORFLOW_COMMANDS, "bench"):
        from idc_helpers.colab import import_tensorflow_quietly

        import_tensorflow_quietly()


# --------------------------------------------------------------------------------------------------------------
# download


def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download",
        help="download the Kaggle dataset (public: a Kaggle API token helps where Kaggle asks for one)",
        description="Download and verify the Kaggle dataset into a folder of patient folders. Credentials, in this "
        "order: KAGGLE_API_TOKEN, ~/.kaggle/access_token, KAGGLE_USERNAME + KAGGLE_KEY, kaggle.json, "
        "the Colab secrets; without any, the request is sent anonymously.",
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="folder that will hold the patient folders (default: ./data)"
    )
    p.add_argument("--dest", default=None, help=argparse.SUPPRESS)  # refused: now --out
    p.add_argument("--force", action="store_true", help="download again even when a complete copy is there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_download(args: argparse.Namespace) -> int:
    """``python -m idc_helpers download [--out DIR] [--force]``: a verified copy of the dataset in ``DIR``."""
    from idc_helpers.kaggle_download import download_dataset

    _refuse_old_spelling(args.dest, "download --dest DIR", "download --out DIR")
    download_dataset(args.out or "data", force=args.force, progress=not args.no_progress)
    return 0


# --------------------------------------------------------------------------------------------------------------
# index


def _add_index(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="health check of dataset folders: counts, sizes and every problem found",
        description="Decode every patch (warming the cache) and report the dataset's counts and every problem, "
        "each with the file's name and what to do. Several --data-dir folders are checked as one "
        "dataset (a patient in two folders is one patient; the same patch twice is a duplicate). "
        "Exit status: 0 no problems, 1 problems found, 2 a folder is missing or holds no patient "
        "folders, or the cache folder cannot be used; 3 the cache's disk is full.",
    )
    p.add_argument(
        "--data-dir",
        action="append",
        default=None,
        metavar="DIR",
        help="folder in the Kaggle layout (<patient>/<0|1>/*.png); repeat for several folders",
    )
    p.add_argument("data_dir_positional", nargs="?", default=None, help=argparse.SUPPRESS)  # refused: now --data-dir
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--cache-dir", default=None, help="decoded-patch cache (default: $IDC_CACHE_DIR or ~/.cache/idc_helpers)"
    )
    p.add_argument("--no-decode", action="store_true", help="check names and headers only, do not decode the patches")


def run_index(args: argparse.Namespace) -> int:
    """``python -m idc_helpers index``: print the health report; 0 = no problems, 1 = problems found."""
    import json

    from idc_helpers.health import format_report, health_report

    _refuse_old_spelling(args.data_dir_positional, "index DATA_DIR", "index --data-dir DATA_DIR")
    data_dirs = list(args.data_dir or [])
    if not data_dirs:
        raise UserError("index needs a dataset folder: index --data-dir DIR (repeat --data-dir for several).")
    report = health_report(
        data_dirs, cache_dir=args.cache_dir, decode=not args.no_decode, progress=sys.stderr.isatty()
    )  # a bar on a terminal only, never in logs
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["ok"] else 1


# --------------------------------------------------------------------------------------------------------------
# demo-data


def _add_demo_data(sub: argparse._SubParsersAction) -> None:
    from idc_helpers.demo_data import DEFAULT_PATIENTS

    p = sub.add_parser("demo-data", help="write a small SYNTHETIC dataset in the Kaggle layout")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (must not exist or be empty)")
    p.add_argument("dest", nargs="?", default=None, help=argparse.SUPPRESS)  # refused: now --out
    p.add_argument(
        "--n-patients",
        type=arg_type("n_patients"),
        default=None,
        metavar="N",
        help=f"number of synthetic patients (default {DEFAULT_PATIENTS})",
    )
    p.add_argument(
        "--patients", type=arg_type("n_patients"), default=None, help=argparse.SUPPRESS
    )  # refused: now --n-patients
    p.add_argument("--seed", type=arg_type("seed"), default=0, help="random seed (same seed, same files)")


def run_demo_data(args: argparse.Namespace) -> int:
    """``python -m idc_helpers demo-data --out DIR [--n-patients N] [--seed S]``: write, then print the notice and
    the counts.
    """
    import time

    from idc_helpers.demo_data import DEFAULT_PATIENTS, SYNTHETIC_NOTICE, write_demo_dataset
    from idc_helpers.patch_index import build_index, dataset_summary

    _refuse_old_spelling(args.dest, "demo-data DIR", "demo-data --out DIR")
    _refuse_old_spelling(args.patients, "demo-data --patients N", "demo-data --n-patients N")
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


# --------------------------------------------------------------------------------------------------------------
# train


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model with a patient-level split; writes a run folder",
        description="Train on the training patients, stop early and choose the decision threshold "
        "on the validation patients, never look at the test patients. A checkpoint is "
        "saved after every epoch; `train --resume RUN_DIR` continues an interrupted run.",
    )
    p.add_argument(
        "--data-dir",
        action="append",
        default=None,
        metavar="DIR",
        help="dataset folder; repeat it to train on several folders as one dataset "
        "(default: see docs/data.md, 'Where the data comes from')",
    )
    p.add_argument(
        "--out", default=None, metavar="RUN_DIR", help="run folder to create (refuses to overwrite an existing one)"
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the interrupted run of RUN_DIR with the arguments it was started with",
    )
    p.add_argument("--model", default=None, help="model name (default: the best measured configuration)")
    p.add_argument(
        "--epochs", type=arg_type("epochs"), default=None, help="maximum epochs (early stopping on validation patients)"
    )
    p.add_argument(
        "--split",
        choices=["janowczyk2016", "patients"],
        default="patients",
        help="patient split: the published one or a seeded stratified one (default: patients)",
    )
    p.add_argument(
        "--unlisted",
        choices=["train", "drop"],
        default="train",
        help="janowczyk2016 only: patients outside the published lists go to training (default) or are left out",
    )
    p.add_argument(
        "--max-patches",
        type=arg_type("max_patches"),
        default=None,
        help="use at most this many patches (for quick runs)",
    )
    p.add_argument("--batch-size", type=arg_type("batch_size"), default=None, help="batch size")
    p.add_argument(
        "--seed", type=arg_type("seed"), default=0, help="random seed for split, initialisation and shuffling"
    )
    p.add_argument(
        "--model-seed",
        type=arg_type("model_seed"),
        default=None,
        metavar="SEED",
        help="another seed for initialisation, shuffling and augmentation only, on the split of --seed "
        "(another member of a seed ensemble; default: --seed)",
    )
    p.add_argument(
        "--label-smoothing",
        type=arg_type("label_smoothing"),
        default=0.0,
        metavar="EPS",
        help="train towards targets smoothed by EPS, between 0 and 1 (default: 0, none)",
    )
    p.add_argument("--cache-dir", default=None, help="decoded-patch cache folder")
    p.add_argument(
        "--test-patients",
        type=patient_list,
        default=None,
        metavar="ID,ID",
        help="comma-separated patient ids held out as test (overrides the split's test subset)",
    )
    p.add_argument(
        "--augment",
        choices=["none", "geometry", "mild", "light", "strong"],
        default="mild",
        help="augmentation of the training batches: flips/rotations only (geometry), with mild, light "
        "or strong stain jitter, or none (default: mild)",
    )
    # What a resumed run reads back from its config.json instead (so giving them with --resume is a mistake).
    p.set_defaults(run_defaults={name: p.get_default(name) for name in _RUN_OPTIONS})


# The options of a run, stored in its config.json.
_RUN_OPTIONS = (
    "model",
    "epochs",
    "split",
    "unlisted",
    "max_patches",
    "batch_size",
    "seed",
    "model_seed",
    "label_smoothing",
    "test_patients",
    "augment",
)


def run_train(args: argparse.Namespace) -> int:
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
            cache_dir=args.cache_dir,
            test_patients=test_patients,
            verbose="auto",
        )
    folders = " ".join(f"--data-dir {d}" for d in result.config["data"]["data_dirs"])
    print(f"Next: python -m idc_helpers predict --run {result.run_dir} {folders} --subset test --out predictions.csv")
    return 0


# --------------------------------------------------------------------------------------------------------------
# predict


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict every patch of a dataset folder with a trained run")
    p.add_argument("--run", default=None, metavar="RUN_DIR", help="run folder written by `train` (or a .keras file)")
    p.add_argument("--model", default=None, dest="model_folder", help=argparse.SUPPRESS)  # refused: now --run
    p.add_argument(
        "--data-dir",
        action="append",
        required=True,
        metavar="DIR",
        help="dataset folder in the Kaggle layout; repeat it for several folders",
    )
    p.add_argument("--out", required=True, help="predictions CSV to write")
    p.add_argument("--tta", action="store_true", help="average the 8 flips/rotations of each patch")
    p.add_argument(
        "--context",
        action="store_true",
        help="add prob_idc_context and pred_context: probabilities smoothed with each patch's "
        "neighbours on the slide, at the context threshold stored in the run (uses the slide, "
        "not the patch alone)",
    )
    p.add_argument(
        "--subset",
        default=None,
        choices=["train", "val", "test"],
        help="predict only this subset of the run's patient split",
    )
    p.add_argument(
        "--patients", type=patient_list, default=None, metavar="ID,ID", help="comma-separated patient ids to predict"
    )
    p.add_argument("--cache-dir", default=None, help="decoded-patch cache folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing predictions file")


def run_predict(args: argparse.Namespace) -> int:
    """``python -m idc_helpers predict``: write the predictions CSV."""
    from pathlib import Path

    _refuse_old_spelling(args.model_folder, "predict --model RUN_DIR", "predict --run RUN_DIR")
    run_dir = args.run
    if run_dir is None:
        raise UserError("predict needs --run RUN_DIR, a run folder written by `python -m idc_helpers train`.")
    out = Path(_check_out_file(args.out))
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite to replace it.")
    from idc_helpers import prediction
    from idc_helpers.demo_data import SYNTHETIC_LINE, is_synthetic
    from idc_helpers.patch_index import build_index
    from idc_helpers.run import load_run

    if any(is_synthetic(folder) for folder in args.data_dir):
        print(f"SYNTHETIC demo data: {SYNTHETIC_LINE}", flush=True)
    index = build_index(args.data_dir)
    run = load_run(run_dir)
    params = run.metrics.get("context") or {"unavailable": "its metrics hold none (a bare .keras file or an older run)"}
    if args.context and "unavailable" in params:
        raise UserError(
            f"predict --context: the run {run_dir} has no slide-context parameters: {params['unavailable']}"
        )
    frame = prediction.select_patients(index.frame, run=run, subset=args.subset, patients=args.patients or None)
    # Patches that fail to decode are warned about (one `warning:` line, main's format) and left out.
    table = prediction.predict_frame(run, frame, tta=args.tta, cache_dir=args.cache_dir)
    if args.context:
        from idc_helpers.context import apply_context

        table = apply_context(table, params)
    try:
        prediction.write_predictions(table, out, overwrite=args.overwrite)
    except OSError as exc:  # a full disk, a folder that became read-only meanwhile
        if isinstance(exc, UserError):
            raise
        raise _output_failed(out, exc) from exc
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


# --------------------------------------------------------------------------------------------------------------
# evaluate


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics of a predictions table, with 95%% intervals over patients")
    p.add_argument("--predictions", required=True, help="predictions CSV written by `predict`")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument(
        "--bootstrap", type=arg_type("bootstrap"), default=1000, help="bootstrap resamples over patients (default 1000)"
    )
    p.add_argument("--seed", type=arg_type("seed"), default=0, help="bootstrap seed")
    p.add_argument(
        "--threshold",
        type=arg_type("threshold"),
        default=None,
        help="decide IDC when prob_idc >= THRESHOLD (default: the run's threshold, recorded in the table by `predict`)",
    )


class OutputPathError(UserError, OSError):
    """``--out`` names something that cannot be written (a folder, a read-only place)."""


def _output_failed(out: os.PathLike[str], exc: OSError) -> IdcError:
    """The error for an output that could not be written: a full disk (exit 3, nothing half-written is left: outputs
    are atomic) or a place that cannot be written (exit 2).
    """
    if is_disk_full(exc):
        return DiskFullError(
            f"--out {out}: the disk is full; nothing was written. Free some space and run the command again."
        )
    return OutputPathError(f"--out {out}: {exc.strerror or exc}")


def _check_out_file(out: str, option: str = "--out") -> os.PathLike[str]:
    """``out`` as a Path after checking, before any work, that a file can be written there."""
    from pathlib import Path

    path = Path(out)
    if path.is_dir():
        raise OutputPathError(f"{option} {path}: is a folder; give a file name inside it, e.g. {path / 'out.json'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the nearest folder that exists: missing ones are created on writing
    if not parent.is_dir():
        raise OutputPathError(f"{option} {path}: {parent} is a file, not a folder; choose another place")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"{option} {path}: cannot write into {parent} (read-only or not yours); choose a folder you can write to"
        )
    return path


def _table_is_synthetic(table) -> bool:  # table: a predictions DataFrame
    """Whether the patches of a predictions table come from a synthetic demo dataset (its marker file)."""
    from pathlib import Path

    from idc_helpers.demo_data import is_synthetic

    # <dataset>/<patient>/<0|1>/<file>.png: the dataset folder is three levels up; one file of each patient's class
    # folder says where that folder is (a patient may lie in several datasets), without a Path per row.
    if "path" not in table or "patient_id" not in table:
        return False
    keys = ["patient_id", "label"] if "label" in table else ["patient_id"]
    firsts = table.drop_duplicates(keys)["path"].astype(str)
    roots = {Path(p).parent.parent.parent for p in firsts}
    return any(is_synthetic(root) for root in roots)


# Work long enough to show progress: files over 100 MB, bootstraps over 10^9 patch-resamples (about 10 s).
_LONG_READ_BYTES = 100_000_000
_LONG_BOOTSTRAP = 1_000_000_000


def _progress(label: str):
    """A ``progress(done, total)`` that prints a line on stderr at each further tenth of the work."""
    shown = [-1]

    def report(done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth > shown[0]:
            shown[0] = tenth
            print(f"{label}: {done:,} of {total:,} resamples", file=sys.stderr, flush=True)

    return report


def run_evaluate(args: argparse.Namespace) -> int:
    """``python -m idc_helpers evaluate``: the report and the per-patient table; JSON with ``--out``."""
    from pathlib import Path

    import pandas as pd

    from idc_helpers.atomic import write_json
    from idc_helpers.metrics import evaluate, per_patient_metrics
    from idc_helpers.prediction import read_predictions
    from idc_helpers.reporting import format_report

    source = Path(args.predictions)
    out = _check_out_file(args.out) if args.out else None
    try:
        if source.is_file() and source.stat().st_size > _LONG_READ_BYTES:
            print(f"Reading {source} ({source.stat().st_size / 1e6:,.0f} MB) ...", file=sys.stderr, flush=True)
        table = read_predictions(source)  # checks columns, types and one row per patch
        progress = _progress("bootstrap") if len(table) * args.bootstrap > _LONG_BOOTSTRAP else None
        report = evaluate(
            table,
            n_bootstrap=args.bootstrap,
            seed=args.seed,
            threshold=args.threshold,
            synthetic=_table_is_synthetic(table),
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
                progress=progress and _progress("context bootstrap"),
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
            raise _output_failed(out, exc) from exc
        print(f"\nReport on {source} written to {out}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# slide


def _add_slide(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slide", help="rebuild a patient's slide from patch coordinates, with IDC overlays")
    p.add_argument(
        "--predictions", required=True, help="predictions CSV (or any table with path, patient_id, x, y, label)"
    )
    p.add_argument("--patient", required=True, help="patient id")
    p.add_argument("--out", required=True, help="image file to write (.png, .pdf, .svg, .jpg)")
    p.add_argument(
        "--threshold",
        type=arg_type("threshold"),
        default=None,
        help="decision threshold marked on the colour bar (default: the run's, recorded in the table by `predict`)",
    )


def run_slide(args: argparse.Namespace) -> int:
    """``python -m idc_helpers slide``: one patient's slide with IDC overlays, into an image file (atomically)."""
    from pathlib import Path

    from matplotlib.backend_bases import FigureCanvasBase

    from idc_helpers import plots, slide_plots, slides

    out = Path(_check_out_file(args.out))
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
        plots.save_figure(fig, out, synthetic=_table_is_synthetic(rows), dpi=150)
    except OSError as exc:
        raise _output_failed(out, exc) from exc
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


# --------------------------------------------------------------------------------------------------------------
# run-notebooks


def _add_run_notebooks(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run-notebooks", help="run the notebook series end to end with papermill")
    p.add_argument("--smoke", action="store_true", help="tiny parameters: a few minutes on a CPU")
    p.add_argument("--params", default=None, help="YAML or JSON file of parameters for every notebook")
    p.add_argument(
        "--out", default="outputs", help="folder for executed notebooks, figures and metrics (default ./outputs)"
    )
    p.add_argument(
        "--data-dir", default=None, help="dataset folder (default: see docs/data.md, 'Where the data comes from')"
    )
    p.add_argument(
        "--notebooks",
        default=None,
        metavar="DIR",
        help="folder holding the notebook series and its params/ (default: this checkout's notebooks/, "
        "or the copy installed with the package)",
    )
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="write the parameterised notebooks without running them (CI runs them with pytest --nbval-lax)",
    )


def run_run_notebooks(args: argparse.Namespace) -> int:
    """``python -m idc_helpers run-notebooks``: the series into a fresh folder under ``--out``. A failing cell
    exits 1 (the message names the notebook, the cell and the executed copy); a bad parameters file or a missing
    notebook exits 2 before anything is created.
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


# --------------------------------------------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose refusals are one ``error:`` line on stderr and exit status 2, like every other
    mistake (argparse's own form is a usage block, then ``prog: error: ...``).
    """

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs) -> None:
        # Options are matched whole: `--epoch 3` is a mistake to name, not a guess at `--epochs`.
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog.split(' ', 2)[-1]}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    parser = OneLineParser(
        prog="python -m idc_helpers",
        description="IDC detection in breast histopathology patches: data, training, evaluation, slides, notebooks.",
        epilog=_exit_code_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"idc_helpers {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_download(sub)
    _add_index(sub)
    _add_demo_data(sub)
    _add_train(sub)
    _add_predict(sub)
    _add_evaluate(sub)
    _add_slide(sub)
    _add_run_notebooks(sub)
    return parser


_HANDLERS = {
    "download": run_download,
    "index": run_index,
    "demo-data": run_demo_data,
    "train": run_train,
    "predict": run_predict,
    "evaluate": run_evaluate,
    "slide": run_slide,
    "run-notebooks": run_run_notebooks,
}


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    # On the command line a warning is a message for the user, not a pointer into the source.
    return f"warning: {message}\n"


_interrupted = False


def _on_interrupt(signum, frame) -> None:
    # Remembered because an interrupt during a C extension's import (numpy's) surfaces as an ImportError.
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit status (see :data:`EXIT_CODES`). Ctrl-C at any moment,
    parsing and imports included, is exit status 130 without a traceback.
    """
    global _interrupted
    _interrupted = False
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_interrupt) if in_main_thread else None
    try:
        return _run(argv)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)


def _run(argv: Sequence[str] | None) -> int:
    """:func:`main` without its interrupt handler: the command, its errors turned into exit statuses."""
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help, --version, or argparse's one-line refusal (OneLineParser)
            return int(exc.code or 0)
        quiet_tensorflow(args.command)
        warnings.formatwarning = _one_line_warning
        return int(_HANDLERS[args.command](args) or 0)
    except IdcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except Exception as exc:
        if _interrupted:
            print("Interrupted.", file=sys.stderr)
            return 130
        if not is_disk_full(exc):
            raise
        print(
            f"error: the disk is full ({getattr(exc, 'filename', None) or exc}): free some space and run the "
            "command again",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
