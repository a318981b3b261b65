"""Patient-grouped cross-validation: ``python -m idc_helpers.bench quality [options]``.

Every patient of the dataset is tested exactly once, by a model that never saw it:

1. the patients are cut into ``--folds`` folds (:func:`idc_helpers.splits.patient_folds`, stratified by IDC share);
   every model gets the same folds;
2. for each fold and model, :func:`idc_helpers.training.train` runs with ``test_patients`` = the fold: the other
   patients are split (by patient) into training and validation, and the validation patients alone choose the
   best epoch and the decision threshold;
3. the fold's test patients are predicted (and, with ``--tta``, predicted again averaging the 8 flips/rotations)
   and scored: F1, balanced accuracy, ROC AUC, PR AUC at the validation threshold (and at the Youden threshold
   stored beside it), plus the training time.

Each finished (model, fold) is appended as one JSON line to ``OUT/folds.jsonl`` and its predictions are written
to ``OUT/predictions/``, so a run that is killed keeps its finished folds and the same command resumes it.
At the end the out-of-fold predictions of each model are pooled (``OUT/oof_<model>.csv``) and scored with
bootstrap 95% intervals over patients (:func:`idc_helpers.metrics.evaluate`); the per-fold and pooled tables are
printed as Markdown and written to ``OUT/results.md`` (``OUT/summary.json`` holds the same numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from idc_helpers.atomic import write_json, write_text

LOG_FILE = "folds.jsonl"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
RESULTS_FILE = "results.md"
# What must match for a rerun to resume from the log instead of refusing the folder.
_RESUME_KEYS = ("data_dir", "folds", "seed", "epochs", "max_patches", "patients")


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


def _scores(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    from sklearn import metrics as skm

    pred = probs >= threshold
    return {"f1": float(skm.f1_score(labels, pred, zero_division=0)),
            "balanced_accuracy": float(skm.balanced_accuracy_score(labels, pred))}


def score_fold(preds: pd.DataFrame, threshold: float, threshold_youden: float | None = None) -> dict[str, Any]:
    """Patch-level scores of one fold's predictions table: F1 and balanced accuracy at ``threshold`` (and at the
    Youden threshold when given), ROC AUC and PR AUC."""
    from sklearn import metrics as skm

    y = preds["label"].to_numpy(dtype=np.int64)
    p = preds["prob_idc"].to_numpy(dtype=np.float64)
    both = 0 < y.sum() < len(y)
    out: dict[str, Any] = {"patches": int(len(y)), "idc_patches": int(y.sum()), **_scores(y, p, threshold),
                           "roc_auc": float(skm.roc_auc_score(y, p)) if both else None,
                           "pr_auc": float(skm.average_precision_score(y, p)) if both else None}
    if threshold_youden is not None:
        out["youden"] = _scores(y, p, threshold_youden)
    return out


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
    verbose: int = 2,
) -> dict[str, Any]:
    """Train ``model_name`` without the fold's test patients, predict them, write the predictions and return the
    fold's record (scores, thresholds, seconds). A finished run folder from an interrupted earlier call is reused
    instead of trained again."""
    from idc_helpers.prediction import predict_frame, write_predictions
    from idc_helpers.training import load_run, train

    run_dir = out_dir / "runs" / f"{model_name}-fold{fold}"
    if (run_dir / "model.keras").is_file() and (run_dir / "metrics.json").is_file():
        run = load_run(run_dir)
        model, metrics, split = run.model, run.metrics, run.split
    else:
        result = train(data_dir, run_dir, model_name=model_name, epochs=epochs, seed=seed,
                       max_patches=max_patches, test_patients=list(test_patients), cache_dir=cache_dir,
                       verbose=verbose)
        model, metrics, split = result.model, result.metrics, result.split
    threshold = float(metrics["threshold"])
    youden = metrics.get("threshold_youden")
    test_frame = frame[frame["patient_id"].isin(list(test_patients))]
    record: dict[str, Any] = {
        "model": model_name, "fold": fold, "test_patients": sorted(test_patients, key=int),
        "val_patients": split.get("val", []), "train_patients": len(split.get("train", [])),
        "threshold": threshold, "threshold_youden": youden,
        "best_epoch": metrics.get("best_epoch"), "epochs_run": metrics.get("epochs_run"),
        "train_seconds": metrics.get("train_seconds"), "validation": metrics.get("validation", {}),
    }
    pred_dir = out_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    for use_tta in ([False, True] if tta else [False]):
        start = time.perf_counter()
        preds = predict_frame(model, test_frame, tta=use_tta, threshold=threshold, cache_dir=cache_dir)
        seconds = time.perf_counter() - start
        key = "test_tta" if use_tta else "test"
        write_predictions(preds, pred_dir / f"{model_name}-fold{fold}{'-tta' if use_tta else ''}.csv",
                          overwrite=True)
        record[key] = {**score_fold(preds, threshold, youden), "predict_seconds": round(seconds, 2)}
    return record


def pooled_table(out_dir: Path, records: list[dict[str, Any]], *, n_bootstrap: int = 1000,
                 seed: int = 0) -> dict[str, dict[str, Any]]:
    """Pool each model's out-of-fold predictions (``OUT/oof_<model>[_tta].csv``) and evaluate them with bootstrap
    intervals over patients. Returns ``{"<model>" or "<model> + TTA": evaluate-report plus "folds"}``."""
    from idc_helpers.metrics import evaluate
    from idc_helpers.prediction import read_predictions, write_predictions

    pooled: dict[str, dict[str, Any]] = {}
    models = list(dict.fromkeys(r["model"] for r in records))
    for model in models:
        for suffix, label in (("", model), ("-tta", f"{model} + TTA")):
            folds = sorted(r["fold"] for r in records if r["model"] == model)
            files = [out_dir / "predictions" / f"{model}-fold{f}{suffix}.csv" for f in folds]
            if not files or not all(p.is_file() for p in files):
                continue
            # Each fold's ``pred`` uses that fold's own validation threshold.
            oof = pd.concat([read_predictions(p) for p in files], ignore_index=True)
            write_predictions(oof, out_dir / f"oof_{model}{suffix.replace('-', '_')}.csv", overwrite=True)
            report = evaluate(oof, n_bootstrap=n_bootstrap, seed=seed)
            report["folds"] = folds
            pooled[label] = report
    return pooled


def _f(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(records: list[dict[str, Any]], pooled: dict[str, dict[str, Any]], n_folds: int) -> str:
    """Per-fold and pooled Markdown tables."""
    lines = ["### Per fold (test patients never seen in training; threshold chosen on validation patients)", "",
             "| model | fold | test patients | patches (IDC) | F1 | BAC | ROC AUC | PR AUC | F1 TTA | BAC TTA "
             "| threshold | F1 / BAC at Youden thr. | best / run epochs | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["model"], r["fold"])):
        t, tt = r["test"], r.get("test_tta", {})
        yd = t.get("youden", {})
        lines.append(
            f"| {r['model']} | {r['fold']} | {', '.join(r['test_patients'])} | {t['patches']:,} ({t['idc_patches']:,}) "
            f"| {_f(t['f1'])} | {_f(t['balanced_accuracy'])} | {_f(t['roc_auc'])} | {_f(t['pr_auc'])} "
            f"| {_f(tt.get('f1'))} | {_f(tt.get('balanced_accuracy'))} | {_f(r['threshold'])} "
            f"| {_f(yd.get('f1'))} / {_f(yd.get('balanced_accuracy'))} | {r['best_epoch']} / {r['epochs_run']} "
            f"| {_f(r['train_seconds'], 0)} |")
    lines += ["", "### Pooled out-of-fold predictions (95% bootstrap intervals over patients)", "",
              "| model | folds | patients | patches | F1 | balanced accuracy | ROC AUC | PR AUC | mean train s / fold |",
              "|---|---|---|---|---|---|---|---|---|"]
    for label, rep in pooled.items():
        m = rep["metrics"]
        cell = lambda k: f"{_f(m[k]['value'])} [{_f(m[k]['ci_low'])}, {_f(m[k]['ci_high'])}]"  # noqa: E731
        model = label.split(" ")[0]
        secs = [r["train_seconds"] for r in records if r["model"] == model and r.get("train_seconds") is not None]
        lines.append(f"| {label} | {len(rep['folds'])} of {n_folds} | {rep['counts']['patients']} "
                     f"| {rep['counts']['patches']:,} | {cell('f1')} | {cell('balanced_accuracy')} "
                     f"| {cell('roc_auc')} | {cell('pr_auc')} | {_f(np.mean(secs) if secs else None, 0)} |")
    return "\n".join(lines) + "\n"


def run_quality(
    data_dir: str | os.PathLike[str] | None,
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
    verbose: int = 2,
) -> dict[str, Any]:
    """Run (or resume) the cross-validation and write the tables; returns ``{"records", "pooled", "markdown"}``.

    Folds run in order, each model in turn within a fold, so an interrupted run has both models on the same
    folds. Raises ``FileExistsError`` when ``out_dir`` holds a run with other settings.
    """
    from idc_helpers.datasource import resolve_data_dir
    from idc_helpers.patch_index import build_index
    from idc_helpers.training import DEFAULT_EPOCHS, enable_onednn

    enable_onednn()
    source = resolve_data_dir(data_dir)
    frame = build_index(source.path).frame
    folds = plan_folds(frame, n_folds, seed)
    epochs = int(epochs or DEFAULT_EPOCHS)
    out = Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    config = {"data_dir": str(source.path), "synthetic": bool(source.synthetic), "folds": n_folds, "seed": seed,
              "epochs": epochs, "max_patches": max_patches, "patients": int(frame["patient_id"].nunique()),
              "fold_patients": folds}
    config_path = out / CONFIG_FILE
    if config_path.is_file():
        old = json.loads(config_path.read_text(encoding="utf-8"))
        changed = [k for k in _RESUME_KEYS if old.get(k) != config.get(k)]
        if changed:
            raise FileExistsError(
                f"{out} holds a cross-validation run with other settings ({', '.join(changed)}); "
                "resume it with the same options or choose a new --out folder.")
    else:
        write_json(config_path, {**config, "machine": platform.platform(), "python": sys.version.split()[0]})

    done = {(r["model"], r["fold"]) for r in read_log(out)}
    for fold, test_patients in enumerate(folds):
        for model in models:
            if (model, fold) in done:
                print(f"[quality] {model} fold {fold}: already in {out / LOG_FILE}, skipped", flush=True)
                continue
            print(f"[quality] {model} fold {fold}: test patients {', '.join(test_patients)}", flush=True)
            record = run_fold(source.path, frame, model, fold, test_patients, out, epochs=epochs, seed=seed,
                              max_patches=max_patches, tta=tta, cache_dir=cache_dir, verbose=verbose)
            record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            _append_log(out, record)
            t = record["test"]
            print(f"[quality] {model} fold {fold}: F1 {t['f1']:.3f} BAC {t['balanced_accuracy']:.3f} "
                  f"ROC AUC {_f(t['roc_auc'])} ({record['train_seconds']} s training)", flush=True)

    records = [r for r in read_log(out) if r["model"] in models]
    pooled = pooled_table(out, records, n_bootstrap=n_bootstrap, seed=seed)
    text = markdown(records, pooled, n_folds)
    write_text(out / RESULTS_FILE, text)
    summary = {"config": config, "pooled": pooled, "folds": records}
    write_json(out / SUMMARY_FILE, summary)
    return {"records": records, "pooled": pooled, "markdown": text}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``python -m idc_helpers.bench quality``."""
    parser = argparse.ArgumentParser(prog="python -m idc_helpers.bench quality", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="dataset folder (Kaggle layout); default: resolved as "
                        "for `train` (IDC_DATA_DIR, ./data, Kaggle, demo)")
    parser.add_argument("--folds", type=int, default=4, help="number of patient folds (default 4)")
    parser.add_argument("--models", default="seed_cnn,idc_net", help="comma-separated model names")
    parser.add_argument("--epochs", type=int, default=None, help="maximum epochs per fold (default: train's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-patches", type=int, default=None, help="subsample the dataset (quick runs)")
    parser.add_argument("--tta", action="store_true", help="also score test-time augmentation (8 flips/rotations)")
    parser.add_argument("--cache-dir", default=None, help="decoded-patch cache folder")
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient resamples for the intervals")
    parser.add_argument("--out", default="bench-quality", help="results folder (resumed when it exists)")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    from idc_helpers.models import MODEL_NAMES

    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODEL_NAMES)}", file=sys.stderr)
        return 2
    try:
        result = run_quality(args.data_dir, args.out, n_folds=args.folds, models=models, epochs=args.epochs,
                             seed=args.seed, max_patches=args.max_patches, tta=args.tta, cache_dir=args.cache_dir,
                             n_bootstrap=args.bootstrap)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
