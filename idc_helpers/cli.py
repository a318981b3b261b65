"""Command line: ``python -m idc_helpers <command>`` (or the ``idc`` console script).

Every command's arguments are parsed here, and only here; :func:`main` hands them to the command's handler in
:mod:`idc_helpers.commands` (``cmd_<command>(args)``). Errors the user can fix
(:class:`idc_helpers.errors.UserError`) and outside failures (:class:`idc_helpers.errors.ExternalError`) become one
``error:`` line on stderr and the exit status of :data:`EXIT_CODES`; anything else is a bug and keeps its
traceback. As an entry point, :func:`main` also sets TensorFlow's process-wide log settings
(:func:`idc_helpers.tf_env.quiet_tensorflow`) and the one-line form of warnings.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import NoReturn

from idc_helpers import __version__, commands
from idc_helpers.errors import IdcError, is_disk_full
from idc_helpers.tf_env import quiet_tensorflow
from idc_helpers.validation import AVERAGING_CHOICES, WEIGHTING_CHOICES, arg_type, patient_list

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
    p.add_argument("--dest", action=Refused, old="download --dest DIR", new="download --out DIR")
    p.add_argument("--force", action="store_true", help="download again even when a complete copy is there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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
    p.add_argument(
        "data_dir_positional", nargs="?", action=Refused, old="index DATA_DIR", new="index --data-dir DATA_DIR"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--cache-dir", default=None, help="decoded-patch cache (default: $IDC_CACHE_DIR or ~/.cache/idc_helpers)"
    )
    p.add_argument("--no-decode", action="store_true", help="check names and headers only, do not decode the patches")


def _add_demo_data(sub: argparse._SubParsersAction) -> None:
    from idc_helpers.demo_data import DEFAULT_PATIENTS

    p = sub.add_parser("demo-data", help="write a small SYNTHETIC dataset in the Kaggle layout")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (must not exist or be empty)")
    p.add_argument("dest", nargs="?", action=Refused, old="demo-data DIR", new="demo-data --out DIR")
    p.add_argument(
        "--n-patients",
        type=arg_type("n_patients"),
        default=None,
        metavar="N",
        help=f"number of synthetic patients (default {DEFAULT_PATIENTS})",
    )
    p.add_argument("--patients", action=Refused, old="demo-data --patients N", new="demo-data --n-patients N")
    p.add_argument("--seed", type=arg_type("seed"), default=0, help="random seed (same seed, same files)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model with a patient-level split; writes a run folder",
        description="Train on the training patients to the end of the schedule, keep the moving average of the "
        "weights, choose the decision threshold on the validation patients, never look at the test patients. A "
        "checkpoint is saved after every epoch; `train --resume RUN_DIR` continues an interrupted run.",
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
        "--epochs",
        type=arg_type("epochs"),
        default=None,
        help="epochs to train (default: the measured recipe's); with --averaging none at most this many",
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
    p.add_argument(
        "--averaging",
        choices=AVERAGING_CHOICES,
        default=None,
        help="the final weights: an exponential moving average of the weights over every planned epoch (ema), or "
        "the best validation epoch's, with early stopping (none) (default: ema)",
    )
    p.add_argument(
        "--weighting",
        choices=WEIGHTING_CHOICES,
        default="patch",
        help="how the training patches weigh in the loss: every patch alike within its class (patch), or each "
        "patient's patches one total, whatever their number, before the classes are balanced (patient) "
        "(default: patch)",
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
    "averaging",
    "weighting",
)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict every patch of a dataset folder with a trained run")
    p.add_argument("--run", default=None, metavar="RUN_DIR", help="run folder written by `train` (or a .keras file)")
    p.add_argument("--model", action=Refused, old="predict --model RUN_DIR", new="predict --run RUN_DIR")
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


class Refused(argparse.Action):
    """An old spelling, hidden from the help: refused while parsing, in one line naming the word that replaced it.

    Refused before any check of required options, so ``predict --model RUN_DIR`` alone names ``--run``.
    """

    def __init__(self, option_strings, dest, *, old: str, new: str, nargs=None, **kwargs) -> None:
        self.old, self.new = old, new
        super().__init__(option_strings, dest, nargs=nargs, default=None, help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        """Refuse a given value; a positional left out (``None``) is no mistake."""
        if values is None:
            setattr(namespace, self.dest, None)
            return
        parser.error(f"{self.old} is no longer accepted: use {self.new}.")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose refusals are one ``error:`` line on stderr and exit status 2, as for every mistake.

    argparse's own form is a usage block, then ``prog: error: ...``.
    """

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs) -> None:
        # Options are matched whole: `--epoch 3` is a mistake to name, not a guess at `--epochs`.
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print ``message`` as one line naming the command and the help to read, then exit with status 2."""
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
    "download": commands.cmd_download,
    "index": commands.cmd_index,
    "demo-data": commands.cmd_demo_data,
    "train": commands.cmd_train,
    "predict": commands.cmd_predict,
    "evaluate": commands.cmd_evaluate,
    "slide": commands.cmd_slide,
    "run-notebooks": commands.cmd_run_notebooks,
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
    """Parse ``argv`` and run the command; returns the exit status (see :data:`EXIT_CODES`).

    Ctrl-C at any moment, parsing and imports included, is exit status 130 without a traceback.
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
