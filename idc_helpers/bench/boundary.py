"""Where the errors are: whole-slide patches on and off an annotation boundary, and per-patient oracle thresholds.

Run as ``python -m idc_helpers.bench boundary --quality OUT [--quality OUT2] [--models idc_net] --out BOUNDARY``.

It reads the test predictions that ``python -m idc_helpers.bench quality`` wrote (``OUT/predictions/``), keeps
the whole-slide patients (:func:`idc_helpers.slide_context.whole_slide_patients`: only there are a patch's neighbours
known) and splits their patches with :func:`idc_helpers.slide_context.label_boundary`: a *boundary* patch has a
neighbour of the other label, an *interior* one has none. Each part is scored at the thresholds the folds chose on
their validation patients (the ``pred`` column), with 95% intervals over patients. Tables go to
``BOUNDARY/boundary.md`` and ``boundary.json``.

The labels come from regions outlined at low magnification, so the boundary is where they are least certain; a
model that is much better inside the regions than on their edges is limited by the labels there, not only by what
it learnt.

A second table takes all test patients (whole slides and sparse) and decides each patient at a threshold of its
own chosen on its own labels (:func:`patient_oracle_predictions`): not a result, but what a per-patient
recalibration of the same probabilities could give at best by that rule; where it stays below a goal, the ranking
within patients is what stands in the way.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from idc_helpers.atomic import write_json, write_text
from idc_helpers.bench import print_markdown
from idc_helpers.bench.quality import CONFIG_FILE, read_log, read_table
from idc_helpers.cli import OneLineParser
from idc_helpers.errors import UserError
from idc_helpers.metrics import evaluate

PARTS = ("interior", "boundary", "all")
_METRICS = ("f1", "balanced_accuracy", "roc_auc")


class BoundaryBenchError(UserError, ValueError):
    """The cross-validation folder holds no predictions to split, or none of whole slides."""


def fold_predictions(quality_dir: str | Path, model: str) -> pd.DataFrame:
    """The test predictions of ``model`` on every finished fold of ``quality_dir`` (all patients), with ``fold``."""
    folder = Path(quality_dir).expanduser().absolute()
    if not (folder / CONFIG_FILE).is_file():
        raise BoundaryBenchError(
            f"{folder} holds no cross-validation ({CONFIG_FILE} missing); give the --out "
            "folder of `python -m idc_helpers.bench quality`"
        )
    folds = sorted({r["fold"] for r in read_log(folder) if r["model"] == model})
    tables = []
    for fold in folds:
        path = folder / "predictions" / f"{model}-fold{fold}.csv"
        if not path.is_file():
            raise BoundaryBenchError(
                f"{path} is missing although fold {fold} of {model} is logged as finished; "
                f"rerun `python -m idc_helpers.bench quality ... --out {folder}`"
            )
        tables.append(read_table(path).assign(fold=fold))
    if not tables:
        raise BoundaryBenchError(f"{folder} has no finished fold of {model}; run `bench quality --models {model}`")
    return pd.concat(tables, ignore_index=True)


def whole_slide_part(table: pd.DataFrame, source: str | Path = "the table") -> pd.DataFrame:
    """The whole-slide patients' rows of a :func:`fold_predictions` table, with the bool column ``boundary``.

    ``source`` names the table in the error.
    """
    from idc_helpers.slide_context import label_boundary, whole_slide_patients

    slides = set(whole_slide_patients(table))
    table = table[table["patient_id"].astype(str).isin(slides)].reset_index(drop=True)
    if table.empty:
        raise BoundaryBenchError(f"the test patients of {source} include no whole slide; nothing to split")
    return table.assign(boundary=label_boundary(table))


def patient_oracle_predictions(table: pd.DataFrame) -> np.ndarray:
    """0/1 decisions with one threshold per patient, chosen on that patient's own labels.

    The threshold maximises the patient's correct IDC calls minus its wrong calls (true positives - false positives -
    false negatives, the patient's share of what a pooled F1 counts). Uses the labels it is scored on: an oracle, never
    a result.
    """
    out = np.zeros(len(table), dtype=np.int8)
    labels, probs = table["label"].to_numpy(np.int64), table["prob_idc"].to_numpy(np.float64)
    for rows in table.groupby("patient_id", sort=False).indices.values():
        order = rows[np.argsort(-probs[rows], kind="stable")]
        tp = np.cumsum(labels[order] == 1)
        fp = np.cumsum(labels[order] == 0)
        gain = 2 * tp - fp  # TP - FP - FN, up to the patient's constant number of IDC patches
        # Cut only between different probabilities, so tied patches get the same decision.
        ends = np.flatnonzero(np.r_[probs[order][1:] != probs[order][:-1], True])
        best = ends[np.argmax(gain[ends])]
        if gain[best] > 0:  # otherwise calling nothing IDC is at least as good
            out[order[: best + 1]] = 1
    return out


def _scores(part: pd.DataFrame, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """Patients, patches and F1 / balanced accuracy / ROC AUC (with patient intervals) of ``part``."""
    report = evaluate(part, n_bootstrap=n_bootstrap, seed=seed)
    return {
        "patients": int(part["patient_id"].nunique()),
        "patches": len(part),
        "metrics": {k: report["metrics"][k] for k in _METRICS},
    }


def split_scores(table: pd.DataFrame, *, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Scores of the ``interior``, ``boundary`` and ``all`` patches of a :func:`whole_slide_part` table.

    F1, balanced accuracy and ROC AUC (with patient intervals), the IDC share and the errors of each part.
    """
    errors = table["pred"].to_numpy() != table["label"].to_numpy()
    picks = {
        "interior": ~table["boundary"].to_numpy(),
        "boundary": table["boundary"].to_numpy(),
        "all": np.ones(len(table), dtype=bool),
    }
    out = {}
    for name, pick in picks.items():
        part = table[pick]
        if part.empty:
            continue
        out[name] = {
            **_scores(part, n_bootstrap, seed),
            "idc_share": float(part["label"].mean()),
            "errors": int(errors[pick].sum()),
            "error_share": float(errors[pick].sum() / max(int(errors.sum()), 1)),
        }
    return out


def threshold_scores(table: pd.DataFrame, *, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """F1, balanced accuracy and ROC AUC of a :func:`fold_predictions` table at two kinds of threshold.

    At the folds' thresholds (``"fold thresholds"``) and at each patient's own (``"own threshold per patient
    (oracle)"``, see :func:`patient_oracle_predictions`).
    """
    variants = {
        "fold thresholds": table,
        "own threshold per patient (oracle)": table.assign(pred=patient_oracle_predictions(table)),
    }
    return {name: _scores(part, n_bootstrap, seed) for name, part in variants.items()}


def _ci(m: dict[str, Any]) -> str:
    if m["value"] is None:
        return "–"
    if m.get("ci_low") is None:
        return f"{m['value']:.3f}"
    return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def markdown(results: dict[str, dict[str, Any]], bounds: dict[str, dict[str, Any]]) -> str:
    """Two tables: each member's scores on whole-slide patch groups, and at its thresholds against each patient's own.

    The first holds every member's interior, boundary and all whole-slide patches.
    """
    lines = [
        "### Whole-slide test patches on and off the annotation boundary",
        "",
        "Boundary: a patch with a neighbour of the other label; thresholds chosen on each fold's validation "
        "patients; 95% bootstrap intervals over patients.",
        "",
        "| model | part | patients | patches | IDC share | F1 | BAC | ROC AUC | errors (share of the model's) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for member, parts in results.items():
        for name in PARTS:
            if name not in parts:
                continue
            e = parts[name]
            lines.append(
                f"| {member} | {name} | {e['patients']} | {e['patches']:,} | {e['idc_share']:.3f} | "
                f"{_ci(e['metrics']['f1'])} | {_ci(e['metrics']['balanced_accuracy'])} | "
                f"{_ci(e['metrics']['roc_auc'])} | {e['errors']:,} ({e['error_share']:.0%}) |"
            )
    lines += [
        "",
        "### All test patients: the folds' thresholds against each patient's own (an oracle)",
        "",
        "Own threshold: chosen on the patient's own labels (true minus false IDC calls), so not a result; "
        "ROC AUC is the same for both (the probabilities do not change).",
        "",
        "| model | thresholds | patients | patches | F1 | BAC | ROC AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for member, variants in bounds.items():
        for name, e in variants.items():
            lines.append(
                f"| {member} | {name} | {e['patients']} | {e['patches']:,} | {_ci(e['metrics']['f1'])} | "
                f"{_ci(e['metrics']['balanced_accuracy'])} | {_ci(e['metrics']['roc_auc'])} |"
            )
    return "\n".join(lines) + "\n"


def run_boundary(
    quality_dirs: Sequence[str | Path], models: Sequence[str], out_dir: str | Path, *, n_bootstrap: int = 1000
) -> dict[str, Any]:
    """Score every (folder, model) member and write ``boundary.md`` and ``boundary.json`` into ``out_dir``.

    The scores are those of :func:`split_scores` and :func:`threshold_scores`.
    """
    results, bounds = {}, {}
    for folder in quality_dirs:
        for model in models:
            member = f"{model} ({Path(folder).name})"
            table = fold_predictions(folder, model)  # read once, for both tables
            results[member] = split_scores(whole_slide_part(table, folder), n_bootstrap=n_bootstrap)
            bounds[member] = threshold_scores(table, n_bootstrap=n_bootstrap)
    text = markdown(results, bounds)
    out = Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "boundary.md", text)
    write_json(out / "boundary.json", {"boundary": results, "thresholds": bounds})
    return {"results": results, "bounds": bounds, "markdown": text}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``python -m idc_helpers.bench boundary``."""
    parser = OneLineParser(prog="python -m idc_helpers.bench boundary", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quality",
        action="append",
        required=True,
        metavar="OUT",
        help="--out folder of `bench quality`; repeat for several",
    )
    parser.add_argument("--models", default="idc_net", help="comma-separated models (default: idc_net)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient resamples for the intervals")
    parser.add_argument("--out", required=True, help="results folder")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    return print_markdown(lambda: run_boundary(args.quality, models, args.out, n_bootstrap=args.bootstrap))


if __name__ == "__main__":
    sys.exit(main())
