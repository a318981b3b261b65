"""Levers applied after training, on the folds of a cross-validation.

Run as ``python -m idc_helpers.bench levers --quality OUT [--quality OUT2] --models idc_net[,seed_cnn] --out LEVERS``.

It reads what ``python -m idc_helpers.bench quality`` wrote (``OUT/config.json``, ``OUT/predictions/``, ``OUT/runs/``)
and measures, per fold and pooled over folds, each variant against the first model's own predictions (the baseline),
always with the decision threshold chosen on the fold's validation patients:

- ``ensemble``: the mean probability of all given models (members must share the fold's validation patients, i.e. the
  same ``--seed``);
- ``platt, threshold 0.5``: the baseline's probabilities calibrated on the validation patients (logistic regression on
  the logit, Platt 1999), decided at 0.5 instead of at the F1 threshold;
- ``precise BN``: the baseline model with its batch-norm statistics recomputed on its training patches
  (:func:`idc_helpers.models.recompute_batch_norm`, no augmentation);
- ``stain-normalised``: every validation and test patient's patches rescaled to the training patients' mean optical
  density per channel (:func:`idc_helpers.stain.normalise_stain`, one factor per patient and channel), predicted by the
  unchanged baseline model.

Every variant is compared with the baseline on the same patches by a paired patient bootstrap
(:func:`idc_helpers.metrics.paired_difference`). Tables go to ``LEVERS/levers.md`` (and ``levers.json``); each variant's
test predictions to ``LEVERS/predictions/``, which a rerun reuses.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from idc_helpers.atomic import write_json, write_text
from idc_helpers.bench import print_markdown
from idc_helpers.bench.quality import CONFIG_FILE, merged_view, read_log, read_table, write_table
from idc_helpers.cli import OneLineParser
from idc_helpers.errors import UserError
from idc_helpers.metrics import evaluate, paired_difference, pick_threshold

BASELINE = "baseline"
LEVERS = ("ensemble", "platt", "precise-bn", "stain")
_LABELS = {
    "ensemble": "ensemble (mean probability)",
    "platt": "Platt-calibrated, threshold 0.5",
    "precise-bn": "precise BN (recomputed on training patches)",
    "stain": "stain-normalised per patient (mean optical density)",
}
#: Training batches of 128 patches read to recompute the batch-norm statistics.
PRECISE_BN_BATCHES = 200


class LeversError(UserError, ValueError):
    """The cross-validation folders cannot be compared as asked (missing folds, different validation patients)."""


# --------------------------------------------------------------------------------------------------------------
# Variants that need no model


def decide(val: pd.DataFrame, test: pd.DataFrame, probs_val: np.ndarray, probs_test: np.ndarray) -> pd.DataFrame:
    """``test`` with ``prob_idc`` = ``probs_test``, decided at the threshold that ``train`` would choose on ``val``.

    The threshold follows :data:`idc_helpers.selection.THRESHOLD_RULE` on the ``val`` labels and ``probs_val``.
    """
    from idc_helpers.selection import THRESHOLD_RULE

    threshold = pick_threshold(val["label"].to_numpy(), probs_val, THRESHOLD_RULE)
    return test.assign(prob_idc=probs_test, pred=(probs_test >= threshold).astype(np.int8))


def ensemble(vals: Sequence[pd.DataFrame], tests: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Mean probability of the members' aligned tables, thresholded on the mean validation probabilities."""
    mean_val = np.mean([v["prob_idc"].to_numpy(np.float64) for v in vals], axis=0)
    mean_test = np.mean([t["prob_idc"].to_numpy(np.float64) for t in tests], axis=0)
    return decide(vals[0], tests[0], mean_val, mean_test)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def platt(val: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    """``test`` with probabilities calibrated on ``val`` and decided at 0.5.

    The calibration is a logistic regression of the label on the logit; 0.5 is the rule "call IDC when it is more likely
    than not", after calibration.
    """
    from sklearn.linear_model import LogisticRegression

    fit = LogisticRegression(C=1e6).fit(_logit(val["prob_idc"])[:, None], val["label"].to_numpy())
    probs = fit.predict_proba(_logit(test["prob_idc"])[:, None])[:, 1]
    return test.assign(prob_idc=probs, pred=(probs >= 0.5).astype(np.int8))


# --------------------------------------------------------------------------------------------------------------
# Variants that run the model again


def _load(frame: pd.DataFrame, cache_dir: Any):
    from idc_helpers.loader import load_patches

    loaded = load_patches(frame, cache_dir=cache_dir)
    return loaded.images, loaded.frame


def _aligned(rows: pd.DataFrame, probs: np.ndarray, like: pd.DataFrame) -> np.ndarray:
    """``probs`` (row for row with ``rows``) in the order of ``like``'s ``path`` column."""
    by_path = pd.Series(probs, index=rows["path"].astype(str).to_numpy())
    return by_path.reindex(like["path"].astype(str).to_numpy()).to_numpy(np.float64)


def precise_bn_probs(
    model, train_images: np.ndarray, parts: Sequence[tuple[np.ndarray, pd.DataFrame]], *, seed: int = 0
) -> list[np.ndarray]:
    """Predict each ``(images, rows)`` of ``parts`` after recomputing ``model``'s batch-norm statistics.

    The statistics come from shuffled, unaugmented training batches. Returns one probability array per part.
    """
    from idc_helpers.models import recompute_batch_norm
    from idc_helpers.probabilities import predict_probs

    order = np.random.default_rng(seed).permutation(len(train_images))

    def batches():
        for start in range(0, len(order), 128):
            rows = np.sort(order[start : start + 128])
            yield np.asarray(train_images[rows], dtype=np.float32)

    recompute_batch_norm(model, batches(), max_batches=PRECISE_BN_BATCHES)
    return [predict_probs(model, images) for images, _ in parts]


def stain_probs(model, train_images: np.ndarray, parts: Sequence[tuple[np.ndarray, pd.DataFrame]]) -> list[np.ndarray]:
    """Predict each ``(images, rows)`` part with ``model`` after normalising its stain to the training patches'.

    Each patient of each part is normalised to the training patches' mean H and E. Returns one probability array per
    part.
    """
    from idc_helpers.probabilities import predict_probs
    from idc_helpers.stain import normalise_stain, stain_stats

    target = stain_stats(train_images)
    out = []
    for images, rows in parts:
        probs = np.empty(len(rows), dtype=np.float32)
        for _, where in rows.groupby("patient_id").indices.items():
            patient = np.asarray(images[np.sort(where)])
            normalised = normalise_stain(patient, stain_stats(patient), target)
            probs[np.sort(where)] = predict_probs(model, normalised)
        out.append(probs)
    return out


# --------------------------------------------------------------------------------------------------------------
# One fold, all folds


def _table_file(quality_dir: Path, name: str) -> Path:
    """``predictions/NAME`` of a `bench quality` folder, or ``NAME.gz`` where only that is there (a `bench record`)."""
    path = quality_dir / "predictions" / name
    packed = path.with_name(name + ".gz")
    return packed if not path.is_file() and packed.is_file() else path


def member_tables(quality_dir: Path, model: str, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The validation and test predictions ``model`` wrote for ``fold`` in a `bench quality` folder."""
    test, val = (_table_file(quality_dir, f"{prefix}{model}-fold{fold}.csv") for prefix in ("", "val-"))
    for path in (test, val):
        if not path.is_file():
            raise LeversError(
                f"{path} is missing: run `python -m idc_helpers.bench quality ... --models {model} "
                f"--only-folds {fold} --out {quality_dir}` first"
            )
    return read_table(val), read_table(test)


def by_path(table: pd.DataFrame) -> pd.DataFrame:
    """A predictions table in the order of its patch paths, so that tables of the same patches align row by row."""
    return table.sort_values("path", kind="stable").reset_index(drop=True)


def same_patches(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Whether two tables sorted by :func:`by_path` hold the same patches in the same rows."""
    return bool(np.array_equal(a["path"].to_numpy(), b["path"].to_numpy()))


def _same_rows(tables: Sequence[pd.DataFrame], what: str, fold: int) -> list[pd.DataFrame]:
    """The tables sorted by path; refused unless they hold the same patches."""
    tables = [by_path(t) for t in tables]
    if not all(same_patches(t, tables[0]) for t in tables[1:]):
        raise LeversError(
            f"fold {fold}: the models' {what} patients differ, so they cannot be compared or "
            "averaged; run the cross-validations with the same --seed and folds"
        )
    return tables


def run_fold(
    members: Sequence[tuple[Path, str]],
    fold: int,
    out: Path,
    levers: Sequence[str],
    *,
    frame: pd.DataFrame,
    cache_dir: Any,
) -> dict[str, pd.DataFrame]:
    """Test tables of every variant of one fold (baseline and members included), computed or read back."""
    pairs = [member_tables(d, m, fold) for d, m in members]
    vals = _same_rows([v for v, _ in pairs], "validation", fold)
    tests = _same_rows([t for _, t in pairs], "test", fold)
    tables = {BASELINE: tests[0]}
    for (d, m), t in list(zip(members, tests, strict=False))[1:]:
        tables[f"member {m} ({d.name})"] = t
    if "ensemble" in levers and len(members) > 1:
        tables["ensemble"] = ensemble(vals, tests)
    if "platt" in levers:
        tables["platt"] = platt(vals[0], tests[0])
    needs_model = [lever for lever in ("precise-bn", "stain") if lever in levers]
    cached = {lever: out / "predictions" / f"{lever}-fold{fold}.csv" for lever in needs_model}
    for lever in [x for x in needs_model if cached[x].is_file()]:
        tables[lever] = by_path(read_table(cached[lever]))
    todo = [x for x in needs_model if not cached[x].is_file()]
    if todo:
        tables.update(_model_variants(members[0], fold, todo, vals[0], tests[0], frame=frame, cache_dir=cache_dir))
        for lever in todo:
            write_table(tables[lever], cached[lever])
    return tables


def _model_variants(
    member: tuple[Path, str],
    fold: int,
    todo: Sequence[str],
    val: pd.DataFrame,
    test: pd.DataFrame,
    *,
    frame: pd.DataFrame,
    cache_dir: Any,
) -> dict[str, pd.DataFrame]:
    from idc_helpers.run_folder import load_run

    quality_dir, model_name = member
    run = load_run(quality_dir / "runs" / f"{model_name}-fold{fold}")
    train_ids = set(map(str, run.split.get("train", [])))
    train_images, _ = _load(frame[frame["patient_id"].isin(train_ids)], cache_dir)
    parts = [_load(frame[frame["path"].isin(set(t["path"]))], cache_dir) for t in (val, test)]
    compute: dict[str, Callable[[], list[np.ndarray]]] = {
        "stain": lambda: stain_probs(run.model, train_images, parts),
        # Last: it changes the model's statistics in place.
        "precise-bn": lambda: precise_bn_probs(run.model, train_images, parts),
    }
    out = {}
    for lever in sorted(todo, key=lambda x: x == "precise-bn"):
        probs_val, probs_test = (
            _aligned(rows, p, t) for (_, rows), p, t in zip(parts, compute[lever](), (val, test), strict=False)
        )
        out[lever] = decide(val, test, probs_val, probs_test)
    return out


def summarise(
    per_fold: dict[int, dict[str, pd.DataFrame]], slides: set[str], *, n_bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Pooled and per-fold scores of every variant, and its paired difference from the baseline."""
    variants = [v for v in next(iter(per_fold.values())) if all(v in t for t in per_fold.values())]
    groups = {"all": lambda t: t, "whole slide": lambda t: t[t["patient_id"].astype(str).isin(slides)]}
    result: dict[str, Any] = {"folds": sorted(per_fold), "pooled": {}, "per_fold": {}}
    for variant in variants:
        pooled = pd.concat([per_fold[f][variant] for f in sorted(per_fold)], ignore_index=True)
        base = pd.concat([per_fold[f][BASELINE] for f in sorted(per_fold)], ignore_index=True)
        for group, pick in groups.items():
            part, base_part = pick(pooled), pick(base)
            if part["patient_id"].nunique() == 0:
                continue
            report = evaluate(part, n_bootstrap=n_bootstrap, seed=seed)
            entry = {
                "patients": int(part["patient_id"].nunique()),
                "patches": len(part),
                "metrics": {k: report["metrics"][k] for k in ("f1", "balanced_accuracy", "roc_auc")},
            }
            if variant != BASELINE:
                entry["minus_baseline"] = paired_difference(base_part, part, n_bootstrap=n_bootstrap, seed=seed)
            result["pooled"][f"{variant} | {group}"] = entry
        result["per_fold"][variant] = {
            str(f): {
                k: v["value"]
                for k, v in evaluate(per_fold[f][variant], n_bootstrap=0)["metrics"].items()
                if k in ("f1", "balanced_accuracy", "roc_auc")
            }
            for f in sorted(per_fold)
        }
    return result


def _f(value: float | None, sign: bool = False) -> str:
    return "–" if value is None else (f"{value:+.3f}" if sign else f"{value:.3f}")


def markdown(summary: dict[str, Any], baseline_name: str) -> str:
    """The pooled table (with paired differences) and the per-fold F1 of every variant."""
    folds = summary["folds"]
    lines = [
        f"### Levers after training, pooled over folds {', '.join(map(str, folds))} (baseline: {baseline_name})",
        "",
        "Patch only; thresholds chosen on each fold's validation patients; 95% bootstrap intervals over "
        "patients; differences paired (same patients and patches).",
        "",
        "| variant | patients | patches | F1 | BAC | ROC AUC | F1 - baseline | BAC - baseline | AUC - baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def ci(m: dict[str, Any], sign: bool = False) -> str:
        if m["ci_low"] is None:
            return _f(m["value"], sign)
        return f"{_f(m['value'], sign)} [{_f(m['ci_low'], sign)}, {_f(m['ci_high'], sign)}]"

    for label, e in summary["pooled"].items():
        variant, group = label.split(" | ")
        name = _LABELS.get(variant, baseline_name if variant == BASELINE else variant)
        diff = e.get("minus_baseline")
        cells = [ci(diff[k], True) for k in ("f1", "balanced_accuracy", "roc_auc")] if diff else ["", "", ""]
        lines.append(
            f"| {name}, {group} | {e['patients']} | {e['patches']:,} | {ci(e['metrics']['f1'])} "
            f"| {ci(e['metrics']['balanced_accuracy'])} | {ci(e['metrics']['roc_auc'])} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "Per fold, F1 / BAC / ROC AUC:",
        "",
        "| variant | " + " | ".join(f"fold {f}" for f in folds) + " |",
        "|---|" + "---|" * len(folds),
    ]
    for variant, by_fold in summary["per_fold"].items():
        name = _LABELS.get(variant, baseline_name if variant == BASELINE else variant)
        lines.append(
            f"| {name} | "
            + " | ".join(f"{_f(m['f1'])} / {_f(m['balanced_accuracy'])} / {_f(m['roc_auc'])}" for m in by_fold.values())
            + " |"
        )
    return "\n".join(lines) + "\n"


def run_levers(
    quality_dirs: Sequence[str | Path],
    models: Sequence[str],
    out_dir: str | Path,
    *,
    levers: Sequence[str] = LEVERS,
    folds: Sequence[int] | None = None,
    cache_dir: Any = None,
    n_bootstrap: int = 1000,
) -> dict[str, Any]:
    """Measure ``levers`` on the folds every member finished; returns the summary (also written to ``out_dir``).

    Members: every model of ``models`` in every folder of ``quality_dirs`` (the first one is the baseline).

    Raises :class:`LeversError` when no fold is finished by every member, or the members' patients differ.
    """
    from idc_helpers.patch_index import build_index
    from idc_helpers.slide_context import whole_slide_patients

    dirs = [Path(d).expanduser().absolute() for d in quality_dirs]
    for d in dirs:
        if not (d / CONFIG_FILE).is_file():
            raise LeversError(
                f"{d} holds no cross-validation ({CONFIG_FILE} missing); give the --out folder of "
                "`python -m idc_helpers.bench quality`"
            )
    members = [(d, m) for d in dirs for m in models]
    finished = [{r["fold"] for r in read_log(d) if r["model"] == m} for d, m in members]
    common = sorted(set.intersection(*finished) & (set(folds) if folds is not None else set.union(*finished)))
    if not common:
        raise LeversError("no fold is finished by every model asked for; finish them with `bench quality` first")
    config = json.loads((dirs[0] / CONFIG_FILE).read_text(encoding="utf-8"))
    frame = build_index(merged_view(config["data_dirs"])).frame
    slides = set(whole_slide_patients(frame))
    out = Path(out_dir).expanduser().absolute()
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    per_fold = {}
    for fold in common:
        print(f"[levers] fold {fold}", flush=True)
        per_fold[fold] = run_fold(members, fold, out, levers, frame=frame, cache_dir=cache_dir)
    summary = summarise(per_fold, slides, n_bootstrap=n_bootstrap)
    summary["members"] = [f"{m} ({d})" for d, m in members]
    text = markdown(summary, f"{members[0][1]} ({members[0][0].name})")
    write_text(out / "levers.md", text)
    write_json(out / "levers.json", summary)
    return {"summary": summary, "markdown": text}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``python -m idc_helpers.bench levers``."""
    parser = OneLineParser(prog="python -m idc_helpers.bench levers", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quality",
        action="append",
        required=True,
        metavar="OUT",
        help="--out folder of `bench quality`; repeat to add its models to the ensemble",
    )
    parser.add_argument("--models", default="idc_net", help="comma-separated models; the first is the baseline")
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, of {', '.join(LEVERS)}")
    parser.add_argument("--folds", default=None, help="comma-separated folds (default: all that every model finished)")
    parser.add_argument("--cache-dir", default=None, help="decoded-patch cache folder")
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient resamples for the intervals")
    parser.add_argument("--out", required=True, help="results folder")
    args = parser.parse_args(argv)
    levers = [x.strip() for x in args.levers.split(",") if x.strip()]
    unknown = [x for x in levers if x not in LEVERS]
    if unknown:
        print(f"error: unknown lever(s) {', '.join(unknown)}; choose from {', '.join(LEVERS)}", file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    folds = [int(f) for f in args.folds.split(",")] if args.folds else None
    return print_markdown(
        lambda: run_levers(
            args.quality,
            models,
            args.out,
            levers=levers,
            folds=folds,
            cache_dir=args.cache_dir,
            n_bootstrap=args.bootstrap,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
