"""Patient-grouped cross-validation: ``python -m idc_helpers.bench quality --data-dir A [--data-dir B] [options]``.

Every patient of the dataset folders is tested exactly once, by a model that never saw it:

1. the patients of all ``--data-dir`` folders together are cut into ``--folds`` folds
   (:func:`idc_helpers.splits.patient_folds`, stratified by IDC share); every model gets the same folds;
2. for each fold and model, :func:`idc_helpers.training.train` runs with ``test_patients`` = the fold: the other
   patients are split (by patient) into training and validation, and the validation patients alone choose the
   best epoch, the decision threshold and the slide-context parameters (:func:`idc_helpers.slide_context.fit_context`);
3. the fold's test patients are predicted (and, with ``--tta``, again averaging the 8 flips/rotations) and
   scored: F1, balanced accuracy, ROC AUC, PR AUC at the validation threshold (and at the Youden threshold), the
   best F1 any threshold reaches on the test patients (an upper bound, not a result), with bootstrap intervals
   over the fold's patients, for all test patients and for whole-slide and sparse patients apart.

Patch-only figures (each patch judged alone, as in the published work) are the headline; the figures of the
context columns use the patch's neighbours on the slide and are always labelled so.

Each finished (model, fold) is appended as one JSON line to ``OUT/folds.jsonl`` and its predictions (test and
validation) are written to ``OUT/predictions/``, so a run that is killed keeps its finished folds and the same
command resumes it (a fold killed while training continues from its last checkpoint). At the end the out-of-fold
predictions of each model are pooled (``OUT/oof_<model>.csv``) and scored with bootstrap 95% intervals over patients
(:func:`idc_helpers.metrics.evaluate`); the tables are printed as Markdown and written to ``OUT/results.md``
(``OUT/summary.json`` holds the same numbers).

Several ``--data-dir`` folders are read through one merged view: a temporary folder of links to their patient
folders (outside the repository; no patch is copied). A patient id found in two folders is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from idc_helpers.atomic import atomic_path, write_json, write_text
from idc_helpers.bench import print_markdown
from idc_helpers.cli import OneLineParser
from idc_helpers.errors import UserError
from idc_helpers.metrics import evaluate, pick_threshold
from idc_helpers.pipeline import AUGMENT_CHOICES
from idc_helpers.selection import CONTEXT_CRITERION
from idc_helpers.slide_context import ContextError, apply_context, fit_context, whole_slide_patients
from idc_helpers.validation import AVERAGING_CHOICES, WEIGHTING_CHOICES, InvalidInputError

if TYPE_CHECKING:
    from idc_helpers.run_folder import Run

LOG_FILE = "folds.jsonl"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
RESULTS_FILE = "results.md"
# What must match for a rerun to resume from the log instead of refusing the folder.
_RESUME_KEYS = ("data_dirs", "folds", "seed", "epochs", "max_patches", "patients", "train_options")
#: Patient groups reported apart: whole slides (neighbours known) and thin samples.
GROUPS = ("all", "whole slide", "sparse")
#: Prediction variants: (label, predictions file suffix, probability column, decision column).
VARIANTS = (
    ("patch", "", "prob_idc", "pred"),
    ("patch + TTA", "-tta", "prob_idc", "pred"),
    ("context", "", "prob_idc_context", "pred_context"),
    ("context + TTA", "-tta", "prob_idc_context", "pred_context"),
)


class QualityBenchError(UserError, ValueError):
    """The cross-validation cannot run as asked (folders, settings of an earlier run in the same --out)."""


def merged_view(data_dirs: Sequence[str | os.PathLike[str]]) -> Path:
    """One dataset folder holding the patients of all ``data_dirs``.

    The folder itself when there is one, else a folder of symbolic links to every patient folder, under the system's
    temporary folder (its name is a hash of the folders, so the same folders give the same view and the decoded-patch
    cache is reused).

    Raises :class:`QualityBenchError` when a folder does not exist, or a patient id is in two of them.
    """
    dirs = [Path(d).expanduser().absolute() for d in data_dirs]
    for d in dirs:
        if not d.is_dir():
            raise QualityBenchError(
                f"dataset folder not found: {d}; pass folders in the Kaggle layout "
                "(<patient>/<0|1>/*.png) with --data-dir"
            )
    if len(dirs) == 1:
        return dirs[0]
    owner: dict[str, Path] = {}
    for d in dirs:
        for entry in sorted(d.iterdir()):
            if entry.is_dir() and entry.name.isdigit():
                if entry.name in owner:
                    raise QualityBenchError(
                        f"patient {entry.name} is in both {owner[entry.name]} and {d}: a patient "
                        "in two folders could be trained on and tested at once; remove one copy"
                    )
                owner[entry.name] = d
    digest = hashlib.sha256("\n".join(map(str, dirs)).encode()).hexdigest()[:12]
    view = Path(tempfile.gettempdir()) / f"idc-merged-{digest}"
    view.mkdir(exist_ok=True)
    for patient, d in owner.items():
        link = view / patient
        if not link.is_symlink():
            link.symlink_to(d / patient, target_is_directory=True)
        elif Path(os.readlink(link)) != d / patient:
            raise QualityBenchError(f"{link} points to {os.readlink(link)}, not {d / patient}; delete {view}")
    return view


def plan_folds(frame: pd.DataFrame, n_folds: int, seed: int = 0) -> list[list[str]]:
    """Test patient ids of each fold (every patient in exactly one fold), stratified by IDC share."""
    from idc_helpers.splits import patient_folds

    return patient_folds(frame, n_folds=n_folds, seed=seed)


def read_log(out_dir: Path) -> list[dict[str, Any]]:
    """Finished (model, fold) records of ``OUT/folds.jsonl``; a torn last line (killed mid-write) is ignored."""
    path = Path(out_dir) / LOG_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _append_log(out_dir: Path, record: dict[str, Any]) -> None:
    # One write of one line, flushed and synced: a crash loses at most the line being written.
    with open(Path(out_dir) / LOG_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _best_f1(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """The highest F1 any threshold gives on these patches (an upper bound for every threshold rule)."""
    if not 0 < labels.sum() < len(labels):
        return None
    threshold = pick_threshold(labels, probs, "f1")
    return float(skm.f1_score(labels, probs >= threshold))


def score_table(
    preds: pd.DataFrame,
    threshold: float,
    *,
    column: str = "prob_idc",
    threshold_youden: float | None = None,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Patch-level scores of a predictions table, probabilities in ``column`` decided at ``threshold``.

    Returns ``patches``, ``patients``, ``idc_patches``, ``f1``, ``balanced_accuracy``, ``roc_auc``, ``pr_auc``
    (each ``{value, ci_low, ci_high}``, bootstrap over patients), ``f1_best`` (best F1 of any threshold on these
    patches: a bound, not a result) and, with ``threshold_youden``, F1 and balanced accuracy at that threshold.
    """
    table = pd.DataFrame(
        {
            "patient_id": preds["patient_id"].to_numpy(),
            "label": preds["label"].to_numpy(),
            "prob_idc": preds[column].to_numpy(np.float64),
        }
    )
    report = evaluate(table, threshold=threshold, n_bootstrap=n_bootstrap, seed=seed)
    labels, probs = table["label"].to_numpy(np.int64), table["prob_idc"].to_numpy()
    out: dict[str, Any] = {
        "patches": len(table),
        "patients": int(table["patient_id"].nunique()),
        "idc_patches": int(labels.sum()),
        **{k: report["metrics"][k] for k in ("f1", "balanced_accuracy", "roc_auc", "pr_auc")},
        "f1_best": _best_f1(labels, probs),
        "threshold": float(threshold),
    }
    if threshold_youden is not None:
        pred = probs >= threshold_youden
        out["youden"] = {
            "f1": float(skm.f1_score(labels, pred, zero_division=0)),
            "balanced_accuracy": float(skm.balanced_accuracy_score(labels, pred)),
        }
    return out


def _groups(preds: pd.DataFrame, slides: set[str]) -> dict[str, pd.DataFrame]:
    """The table split into :data:`GROUPS` (empty groups left out)."""
    is_slide = preds["patient_id"].astype(str).isin(slides)
    parts = {"all": preds, "whole slide": preds[is_slide], "sparse": preds[~is_slide]}
    return {name: part for name, part in parts.items() if len(part)}


def score_groups(preds: pd.DataFrame, slides: set[str], threshold: float, **kwargs: Any) -> dict[str, Any]:
    """:func:`score_table` for every patient group of :data:`GROUPS` (whole-slide patients = ``slides``)."""
    return {name: score_table(part, threshold, **kwargs) for name, part in _groups(preds, slides).items()}


def _load_or_train(
    data_dir: Path,
    run_dir: Path,
    model_name: str,
    test_patients: Sequence[str],
    *,
    epochs: int,
    seed: int,
    max_patches: int | None,
    cache_dir: Any,
    verbose: int,
    train_options: dict[str, Any],
) -> Run:
    """The fold's run (model, config, metrics, split): trained now, read back, or finished from an interrupted training.

    A run folder an earlier call finished is read back; a training an earlier call left interrupted goes on from its
    last checkpoint (it was started with this folder's options: ``run_quality`` refuses other settings first).
    """
    from idc_helpers.run_folder import has_interrupted_run, load_run
    from idc_helpers.training import train

    if (run_dir / "model.keras").is_file() and (run_dir / "metrics.json").is_file():
        return load_run(run_dir)
    if has_interrupted_run(run_dir):
        print(f"[quality] {model_name}: resuming the interrupted training in {run_dir}", flush=True)
        return train(None, run_dir, resume=True, cache_dir=cache_dir, verbose=verbose)
    return train(
        data_dir,
        run_dir,
        model_name=model_name,
        epochs=epochs,
        seed=seed,
        max_patches=max_patches,
        test_patients=list(test_patients),
        cache_dir=cache_dir,
        verbose=verbose,
        **train_options,
    )


def run_fold(
    data_dir: Path,
    frame: pd.DataFrame,
    model_name: str,
    fold: int,
    test_patients: Sequence[str],
    out_dir: Path,
    *,
    epochs: int,
    seed: int = 0,
    max_patches: int | None = None,
    tta: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    n_bootstrap: int = 200,
    train_options: dict[str, Any] | None = None,
    verbose: int = 2,
) -> dict[str, Any]:
    """Train ``model_name`` on one fold and return the fold's record.

    The model is trained without the fold's test patients; it predicts its validation and test patients, the slide
    context is fitted on the validation patients and the predictions are written. The record holds scores per patient
    group, thresholds, context parameters and seconds. A finished run folder from an interrupted earlier call is reused
    instead of trained again.
    """
    from idc_helpers.predictions import predict_frame

    run_dir = out_dir / "runs" / f"{model_name}-fold{fold}"
    run = _load_or_train(
        data_dir,
        run_dir,
        model_name,
        test_patients,
        epochs=epochs,
        seed=seed,
        max_patches=max_patches,
        cache_dir=cache_dir,
        verbose=verbose,
        train_options=dict(train_options or {}),
    )
    from idc_helpers.training import averages

    model, metrics, split = run.model, run.metrics, run.split
    threshold = float(metrics["threshold"])
    youden = metrics.get("threshold_youden")
    averaged = averages(run.config)
    slides = set(whole_slide_patients(frame))
    val_patients = [str(p) for p in split.get("val", [])]
    record: dict[str, Any] = {
        "model": model_name,
        "fold": fold,
        "test_patients": sorted(test_patients, key=int),
        "test_whole_slide_patients": sorted(set(test_patients) & slides, key=int),
        "val_patients": val_patients,
        "val_whole_slide_patients": sorted(set(val_patients) & slides, key=int),
        "train_patients": len(split.get("train", [])),
        "threshold": threshold,
        "threshold_youden": youden,
        # The epoch whose weights were kept; None for averaged weights (no epoch is kept).
        "best_epoch": None if averaged else metrics.get("best_epoch"),
        "epochs_run": metrics.get("epochs_run"),
        "train_seconds": metrics.get("train_seconds"),
        "validation": metrics.get("validation", {}),
    }
    pred_dir = out_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    for use_tta in [False, True] if tta else [False]:
        suffix = "-tta" if use_tta else ""
        start = time.perf_counter()
        preds = predict_frame(
            model,
            frame[frame["patient_id"].isin(list(test_patients))],
            tta=use_tta,
            threshold=threshold,
            cache_dir=cache_dir,
        )
        seconds = time.perf_counter() - start
        val_preds = predict_frame(
            model, frame[frame["patient_id"].isin(val_patients)], tta=use_tta, threshold=threshold, cache_dir=cache_dir
        )
        key = "test_tta" if use_tta else "test"
        record[key] = {
            "groups": score_groups(
                preds, slides, threshold, threshold_youden=youden, n_bootstrap=n_bootstrap, seed=seed
            ),
            "predict_seconds": round(seconds, 2),
        }
        try:
            params = fit_context(val_preds, criterion=CONTEXT_CRITERION, patch_threshold=threshold)
        except ContextError as exc:
            record[f"context{suffix}"] = {"params": None, "reason": str(exc)}
        else:
            preds = apply_context(preds, params)
            val_preds = apply_context(val_preds, params)
            record[f"context{suffix}"] = {
                "params": params,
                "groups": score_groups(
                    preds, slides, params["threshold"], column="prob_idc_context", n_bootstrap=n_bootstrap, seed=seed
                ),
            }
        write_table(preds, pred_dir / f"{model_name}-fold{fold}{suffix}.csv")
        write_table(val_preds, pred_dir / f"val-{model_name}-fold{fold}{suffix}.csv")
    return record


def pooled_table(
    out_dir: Path, records: list[dict[str, Any]], slides: set[str], *, n_bootstrap: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Pool each model's out-of-fold predictions (``OUT/oof_<model>[_tta].csv``) and evaluate them.

    Bootstrap intervals over patients, per variant of :data:`VARIANTS` and patient group of :data:`GROUPS`.

    Returns ``{"<model> | <variant> | <group>": evaluate-report plus "folds"}``; each fold's decisions use that
    fold's own validation threshold (the context ones its own context threshold). Context variants are pooled
    over the folds whose validation patients held a whole slide (``folds`` says which).
    """
    pooled: dict[str, dict[str, Any]] = {}
    for model in dict.fromkeys(r["model"] for r in records):
        for variant, suffix, prob, pred in VARIANTS:
            mine = sorted((r for r in records if r["model"] == model), key=lambda r: r["fold"])
            if prob == "prob_idc_context":
                mine = [r for r in mine if (r.get(f"context{suffix}") or {}).get("params")]
            files = [out_dir / "predictions" / f"{model}-fold{r['fold']}{suffix}.csv" for r in mine]
            if not files or not all(p.is_file() for p in files):
                continue
            oof = pd.concat([read_table(p) for p in files], ignore_index=True)
            if prob == "prob_idc":
                write_table(oof, out_dir / f"oof_{model}{suffix.replace('-', '_')}.csv")
            table = oof[["patient_id", "label"]].assign(
                prob_idc=oof[prob].to_numpy(np.float64), pred=oof[pred].to_numpy()
            )
            for group, part in _groups(table, slides).items():
                report = evaluate(part, n_bootstrap=n_bootstrap, seed=seed)
                report["folds"] = [r["fold"] for r in mine]
                pooled[f"{model} | {variant} | {group}"] = report
    return pooled


def write_table(table: pd.DataFrame, path: Path) -> None:
    """Write a predictions table with every column it has (the context ones too) as CSV, atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


class TableError(UserError, ValueError):
    """A predictions table that cannot be read: truncated, foreign or not a table."""


def read_table(path: Path, fix: str = "write it again") -> pd.DataFrame:
    """A predictions table written by :func:`write_table`, with or without the context columns, or a record's copy.

    Raises :class:`TableError` naming ``path`` and ``fix`` when the file cannot be read (a truncated or foreign file,
    a broken compressed record, a missing file).
    """
    try:
        return pd.read_csv(path, dtype={"path": str, "patient_id": str})
    except (OSError, ValueError, EOFError) as exc:  # zlib and gzip errors are OSError or EOFError subclasses
        raise TableError(f"{path} cannot be read as a predictions table ({exc}); {fix}") from exc


def _f(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ci(metric: dict[str, Any]) -> str:
    return f"{_f(metric['value'])} [{_f(metric['ci_low'])}, {_f(metric['ci_high'])}]"


def markdown(records: list[dict[str, Any]], pooled: dict[str, dict[str, Any]], n_folds: int) -> str:
    """Pooled (patch-only first, then context) and per-fold Markdown tables."""
    head = (
        "| model | predictions | patients | folds | patients | patches | F1 | balanced accuracy | ROC AUC | PR AUC |",
        "|---|---|---|---|---|---|---|---|---|---|",
    )
    lines = [
        "### Pooled out-of-fold predictions, patch only (95% bootstrap intervals over patients)",
        "",
        "Each patch judged alone, as in the published work; thresholds chosen on each fold's validation patients.",
        "",
        *head,
    ]
    context_lines = [
        "",
        "### Pooled out-of-fold predictions WITH SLIDE CONTEXT (uses each patch's neighbours; "
        "not comparable with patch-level papers)",
        "",
        "Smoothing width and threshold chosen on each fold's validation patients (slide_context.fit_context).",
        "",
        *head,
    ]
    for label, rep in pooled.items():
        model, variant, group = label.split(" | ")
        m = rep["metrics"]
        row = (
            f"| {model} | {variant} | {group} | {len(rep['folds'])} of {n_folds} | {rep['counts']['patients']} "
            f"| {rep['counts']['patches']:,} | {_ci(m['f1'])} | {_ci(m['balanced_accuracy'])} "
            f"| {_ci(m['roc_auc'])} | {_ci(m['pr_auc'])} |"
        )
        (context_lines if variant.startswith("context") else lines).append(row)
    lines += context_lines
    lines += [
        "",
        "### Per fold (test patients never seen in training; intervals over the fold's patients)",
        "",
        "| model | fold | patients | patients (IDC patches / patches) | F1 | BAC | ROC AUC | best-threshold F1 "
        "(bound) | F1 / BAC Youden | F1 TTA | F1 context (sigma) | threshold | kept / run epochs | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["model"], r["fold"])):
        for group, t in r["test"]["groups"].items():
            tt = r.get("test_tta", {}).get("groups", {}).get(group, {})
            ctx = r.get("context") or {}
            cg = (ctx.get("groups") or {}).get(group, {})
            sigma = f" ({_f(ctx['params']['sigma'], 1)})" if ctx.get("params") else ""
            yd = t.get("youden", {})
            lines.append(
                f"| {r['model']} | {r['fold']} | {group} | {t['patients']} ({t['idc_patches']:,} / {t['patches']:,}) "
                f"| {_ci(t['f1'])} | {_f(t['balanced_accuracy']['value'])} | {_f(t['roc_auc']['value'])} "
                f"| {_f(t['f1_best'])} | {_f(yd.get('f1'))} / {_f(yd.get('balanced_accuracy'))} "
                f"| {_f((tt.get('f1') or {}).get('value'))} | {_f((cg.get('f1') or {}).get('value'))}{sigma} "
                f"| {_f(r['threshold'])} | {r['best_epoch'] or 'average'} / {r['epochs_run']} "
                f"| {_f(r['train_seconds'], 0)} |"
            )
    return "\n".join(lines) + "\n"


def run_quality(
    data_dirs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    out_dir: str | os.PathLike[str],
    *,
    n_folds: int = 4,
    models: Sequence[str] = ("seed_cnn", "idc_net"),
    epochs: int | None = None,
    seed: int = 0,
    max_patches: int | None = None,
    tta: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    n_bootstrap: int = 1000,
    fold_bootstrap: int = 200,
    only_folds: Sequence[int] | None = None,
    train_options: dict[str, Any] | None = None,
    verbose: int = 2,
) -> dict[str, Any]:
    """Run (or resume) the cross-validation and write the tables; returns ``{"records", "pooled", "markdown"}``.

    ``data_dirs``: one folder, several (merged, see :func:`merged_view`), or ``None`` (resolved as for
    ``train``). Folds run in order, each model in turn within a fold, so an interrupted run has all models on the
    same folds; ``only_folds`` runs a subset of them (the pooled tables then say how many folds they hold).
    ``train_options``: extra keyword arguments of :func:`idc_helpers.training.train` (for example
    ``{"augment": "none"}``), recorded in the config.

    Raises :class:`QualityBenchError` when ``out_dir`` holds a run with other settings, or the folders cannot be merged.
    """
    from idc_helpers.datasource import resolve_data_dir
    from idc_helpers.patch_index import build_index
    from idc_helpers.run_config import DEFAULT_AVERAGING, DEFAULT_EPOCHS

    if data_dirs is None or isinstance(data_dirs, (str, os.PathLike)):
        data_dirs = [data_dirs] if data_dirs is not None else []
    source = resolve_data_dir(merged_view(data_dirs) if data_dirs else None)
    frame = build_index(source.path).frame
    folds = plan_folds(frame, n_folds, seed)
    slides = set(whole_slide_patients(frame))
    epochs = int(epochs or DEFAULT_EPOCHS)
    out = Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "data_dirs": [str(Path(d).expanduser().absolute()) for d in data_dirs] or [str(source.path)],
        "synthetic": bool(source.synthetic),
        "folds": n_folds,
        "seed": seed,
        "epochs": epochs,
        "max_patches": max_patches,
        "patients": int(frame["patient_id"].nunique()),
        "train_options": dict(train_options or {}),
        # How the final weights are made, resolved: a later default cannot change the recipe of a resumed folder.
        "averaging": (train_options or {}).get("averaging") or DEFAULT_AVERAGING,
        "whole_slide_patients": sorted(slides, key=int),
        "fold_patients": folds,
    }
    config_path = out / CONFIG_FILE
    if config_path.is_file():
        old = json.loads(config_path.read_text(encoding="utf-8"))
        changed = [k for k in _RESUME_KEYS if k != "train_options" and old.get(k) != config.get(k)]
        names = ("averaging", "train_options")
        changed += [k for k, a, b in zip(names, _recipe(old), _recipe(config), strict=True) if a != b]
        if changed:
            averaging = _recipe(old)[0]
            raise QualityBenchError(
                f"{out} holds a cross-validation run with other settings ({', '.join(changed)}); "
                f"resume it with the same options (its weights: --averaging {averaging}, --epochs "
                f"{old.get('epochs')}) or choose a new --out folder."
            )
    else:
        write_json(config_path, {**config, "machine": platform.platform(), "python": sys.version.split()[0]})

    train_options = {**(train_options or {}), "averaging": config["averaging"]}
    done = {(r["model"], r["fold"]) for r in read_log(out)}
    for fold, test_patients in enumerate(folds):
        if only_folds is not None and fold not in only_folds:
            continue
        for model in models:
            if (model, fold) in done:
                print(f"[quality] {model} fold {fold}: already in {out / LOG_FILE}, skipped", flush=True)
                continue
            print(
                f"[quality] {model} fold {fold}: {len(test_patients)} test patients "
                f"({len(set(test_patients) & slides)} whole slides)",
                flush=True,
            )
            record = run_fold(
                source.path,
                frame,
                model,
                fold,
                test_patients,
                out,
                epochs=epochs,
                seed=seed,
                max_patches=max_patches,
                tta=tta,
                cache_dir=cache_dir,
                n_bootstrap=fold_bootstrap,
                train_options=train_options,
                verbose=verbose,
            )
            record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            _append_log(out, record)
            t = record["test"]["groups"]["all"]
            print(
                f"[quality] {model} fold {fold}: F1 {_f(t['f1']['value'])} BAC "
                f"{_f(t['balanced_accuracy']['value'])} ROC AUC {_f(t['roc_auc']['value'])} "
                f"({record['train_seconds']} s training)",
                flush=True,
            )

    records = [r for r in read_log(out) if r["model"] in models]
    pooled = pooled_table(out, records, slides, n_bootstrap=n_bootstrap, seed=seed)
    text = markdown(records, pooled, n_folds)
    write_text(out / RESULTS_FILE, text)
    write_json(out / SUMMARY_FILE, {"config": config, "pooled": pooled, "folds": records})
    return {"records": records, "pooled": pooled, "markdown": text}


def _recipe(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A folder's final-weights rule and its other train options.

    Folders written before ``"averaging"`` was recorded trained the best epoch's weights unless their
    ``train_options`` said otherwise (``"none"``, the default of then).
    """
    options = dict(config.get("train_options") or {})
    given = options.pop("averaging", None)
    return config.get("averaging") or given or "none", options


def _idc_net_kwargs(args: argparse.Namespace, models: list[str]) -> dict[str, Any] | str:
    """idc_net's builder arguments from ``--width``, ``--bn-momentum`` and ``--residual`` (those given), or the error.

    Each is an option of idc_net alone, and its value must be one the builder takes.
    """
    given = {
        "--width": ("width", args.width),
        "--bn-momentum": ("bn_momentum", args.bn_momentum),
        "--residual": ("residual", True if args.residual else None),
    }
    kwargs: dict[str, Any] = {}
    for flag, (name, value) in given.items():
        if value is None:
            continue
        if models != ["idc_net"]:
            return f"{flag} is an option of idc_net: give it with --models idc_net alone"
        kwargs[name] = value
    from idc_helpers.models import check_model_kwargs  # models imports keras: only where it is needed

    try:
        check_model_kwargs("idc_net", kwargs, "the command line")
    except InvalidInputError as exc:
        return str(exc)
    return kwargs


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``python -m idc_helpers.bench quality``."""
    parser = OneLineParser(prog="python -m idc_helpers.bench quality", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir",
        action="append",
        default=None,
        help="dataset folder (Kaggle layout); "
        "repeat for several (e.g. idc_sample and idc_sparse); default: resolved as for `train`",
    )
    parser.add_argument("--folds", type=int, default=4, help="number of patient folds (default 4)")
    parser.add_argument("--only-folds", default=None, help="comma-separated fold numbers to run (default: all)")
    parser.add_argument("--models", default="seed_cnn,idc_net", help="comma-separated model names")
    parser.add_argument("--epochs", type=int, default=None, help="maximum epochs per fold (default: train's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds, the splits and the training")
    parser.add_argument(
        "--model-seed",
        type=int,
        default=None,
        metavar="SEED",
        help="another seed for the training alone (initialisation, order, augmentation), on the "
        "folds and splits of --seed: a member of a seed ensemble (default: --seed)",
    )
    parser.add_argument("--max-patches", type=int, default=None, help="subsample the dataset (quick runs)")
    parser.add_argument(
        "--augment",
        default=None,
        choices=AUGMENT_CHOICES,
        help="training augmentation strength (default: train's, 'mild'); 'light' and 'strong' are "
        "Tellez et al. 2019's HED-light and HED-strong stain jitter",
    )
    parser.add_argument("--no-augment", action="store_true", help=argparse.SUPPRESS)  # refused: now --augment none
    parser.add_argument(
        "--label-smoothing",
        type=float,
        default=None,
        metavar="EPS",
        help="train with targets smoothed by EPS (default: train's, none)",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        metavar="W",
        help="idc_net only: multiply every filter count by W (default: 1)",
    )
    parser.add_argument(
        "--averaging",
        default=None,
        choices=AVERAGING_CHOICES,
        help="final weights: the best validation epoch's (none) or a moving average over every epoch (ema); "
        "default: train's",
    )
    parser.add_argument(
        "--weighting",
        default=None,
        choices=WEIGHTING_CHOICES,
        help="loss weights: every patch alike within its class (patch) or each patient's patches one total before "
        "the classes are balanced (patient); default: train's",
    )
    parser.add_argument(
        "--residual",
        action="store_true",
        help="idc_net only: shortcuts around conv3 and conv5 (the same parameters; default: none)",
    )
    parser.add_argument(
        "--bn-momentum",
        type=float,
        default=None,
        metavar="M",
        help="idc_net only: the batch-norm moving-average momentum, in (0, 1) (default: the model's, 0.9)",
    )
    parser.add_argument("--tta", action="store_true", help="also score test-time augmentation (8 flips/rotations)")
    parser.add_argument("--cache-dir", default=None, help="decoded-patch cache folder")
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient resamples for the pooled intervals")
    parser.add_argument("--out", default="bench-quality", help="results folder (resumed when it exists)")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    from idc_helpers.models import MODEL_NAMES, LabelSmoothingError, label_smoothing_setting

    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODEL_NAMES)}", file=sys.stderr)
        return 2
    only = [int(f) for f in args.only_folds.split(",")] if args.only_folds else None
    if args.no_augment:
        print("error: --no-augment is no longer accepted: use --augment none.", file=sys.stderr)
        return 2
    options: dict[str, Any] = {"augment": args.augment} if args.augment is not None else {}
    model_kwargs = _idc_net_kwargs(args, models)
    if isinstance(model_kwargs, str):
        print(f"error: {model_kwargs}", file=sys.stderr)
        return 2
    if model_kwargs:  # only when given, so folders written before these options still resume
        options["model_kwargs"] = model_kwargs
    if args.averaging is not None:  # only when given, so folders written before the option still resume
        options["averaging"] = args.averaging
    if args.weighting is not None:  # only when given, so folders written before the option still resume
        options["weighting"] = args.weighting
    if args.model_seed is not None:  # only when given, so folders written before the option still resume
        options["model_seed"] = args.model_seed
    if args.label_smoothing is not None:  # only when given, so folders written before the option still resume
        try:  # checked before the folder records it: a folder with a bad value could not be resumed with a good one
            options["label_smoothing"] = label_smoothing_setting(args.label_smoothing)
        except LabelSmoothingError as exc:
            print(f"error: --label-smoothing: {exc}", file=sys.stderr)
            return 2
    return print_markdown(
        lambda: run_quality(
            args.data_dir,
            args.out,
            n_folds=args.folds,
            models=models,
            epochs=args.epochs,
            seed=args.seed,
            max_patches=args.max_patches,
            tta=args.tta,
            cache_dir=args.cache_dir,
            n_bootstrap=args.bootstrap,
            only_folds=only,
            train_options=options,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
