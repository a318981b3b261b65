"""Training recipes over several model seeds: their spread, their paired differences, and slide context fold by fold.

Run as ``python -m idc_helpers.bench seeds --recipe default=OUT0,OUT1,OUT2 --recipe ema=OUT3,OUT4,OUT5``.

Each ``OUT`` is a folder ``python -m idc_helpers.bench quality`` wrote with one ``--model-seed`` on the same folds
(same ``--seed``, folders and ``--folds``); a recipe is the list of its seeds' folders. Only the folds that every
folder finished are used. The benchmark reads the predictions the folders hold (it trains nothing) and prints:

1. per recipe, threshold rule and model seed, the patch-only F1, balanced accuracy and ROC AUC of the pooled
   out-of-fold predictions, for all test patients and the whole-slide ones, with the mean, the standard deviation and
   the range (largest minus smallest) over seeds. Each fold is decided at a threshold chosen on its own validation
   patients under each rule of ``--threshold-rules`` (:func:`idc_helpers.metrics.pick_threshold` criteria: ``f1``
   maximises the IDC F1 there, ``youden`` the balanced accuracy), so rules are compared on the same predictions;
2. each (recipe, rule) against the first: the difference of the seed means, with a paired 95% bootstrap interval
   over patients (:func:`idc_helpers.metrics.paired_difference`, every seed of both sides scored on each resample);
3. slide context on the whole-slide test patients, fold by fold and seed by seed, refitted from each fold's
   validation predictions under every rule of :data:`CONTEXT_RULES` (:func:`idc_helpers.slide_context.fit_context`:
   each context criterion, and ``train``'s tuned on the whole-slide validation patients), beside the patch-only F1 at
   the threshold rule's threshold: how often context scores below patch only.

``--out FILE`` also writes the tables to ``FILE`` (Markdown).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from idc_helpers.atomic import write_text
from idc_helpers.bench import print_markdown
from idc_helpers.bench.levers import by_path, member_tables, same_patches
from idc_helpers.bench.quality import CONFIG_FILE, read_log
from idc_helpers.bench.record import dataset_paths
from idc_helpers.cli import OneLineParser
from idc_helpers.errors import UserError
from idc_helpers.metrics import PAIRED_METRICS, THRESHOLD_RULES, binary_scores, paired_difference, pick_threshold
from idc_helpers.selection import CONTEXT_CRITERION
from idc_helpers.slide_context import CONTEXT_CRITERIA, ContextError, apply_context, fit_context

#: Context rules refitted on each fold's validation predictions: name -> keyword arguments of ``fit_context``, every
#: context criterion on all validation patients (``train``'s first), then ``train``'s on the whole-slide ones.
CONTEXT_RULES: dict[str, dict[str, Any]] = {
    **{
        f"all validation patients, {criterion} criterion{' (train)' if criterion == CONTEXT_CRITERION else ''}": {
            "tune_on": "all",
            "criterion": criterion,
        }
        for criterion in sorted(CONTEXT_CRITERIA, key=lambda rule: rule != CONTEXT_CRITERION)
    },
    f"whole slides, else all, {CONTEXT_CRITERION} criterion": {"tune_on": "auto", "criterion": CONTEXT_CRITERION},
}
_NAMES = {"f1": "F1", "balanced_accuracy": "balanced accuracy", "roc_auc": "ROC AUC"}
# What the folders of one comparison must share: the patients, their folds and the whole-slide ones.
_SAME = ("data_dirs", "folds", "seed", "patients", "fold_patients", "whole_slide_patients")


class SeedsError(UserError, ValueError):
    """The folders cannot be compared: other folds or patients, no common fold, a recipe named twice."""


def parse_recipe(text: str) -> tuple[str, list[Path]]:
    """``NAME=DIR[,DIR...]`` -> ``(NAME, [DIR, ...])``; raises :class:`SeedsError` on another shape."""
    name, sep, dirs = text.partition("=")
    folders = [Path(d.strip()).expanduser() for d in dirs.split(",") if d.strip()]
    if not sep or not name.strip() or not folders:
        raise SeedsError(f"--recipe {text!r}: write NAME=DIR[,DIR...], one folder of `bench quality` per model seed")
    return name.strip(), folders


def _model_seed(config: Mapping[str, Any]) -> int:
    return int(config.get("train_options", {}).get("model_seed", config["seed"]))


def _load(folder: Path, model: str) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise SeedsError(
            f"{folder} holds no {CONFIG_FILE}: give --out folders of `python -m idc_helpers.bench quality`"
        )
    config = json.loads(path.read_text(encoding="utf-8"))
    return config, {int(r["fold"]): r for r in read_log(folder) if r["model"] == model}


def _stats(values: Sequence[float]) -> str:
    v = np.asarray(values, dtype=np.float64)
    sd = f"{v.std(ddof=1):.3f}" if len(v) > 1 else "–"
    return f"{v.mean():.3f} | {sd} | {v.max() - v.min():.3f}"


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _arm(name: str, rule: str) -> str:
    """How a recipe decided under one threshold rule is named in the tables."""
    return f"{name} / {rule}"


def _decided(val: pd.DataFrame, test: pd.DataFrame, rule: str) -> tuple[float, pd.DataFrame]:
    """The threshold ``rule`` picks on the validation patches, and ``test`` with its ``pred`` column at it."""
    threshold = pick_threshold(val["label"].to_numpy(np.int64), val["prob_idc"].to_numpy(np.float64), rule)
    return threshold, test.assign(pred=(test["prob_idc"] >= threshold).astype(np.int64))


def _pooled_scores(table: pd.DataFrame) -> dict[str, float]:
    labels = table["label"].to_numpy(np.int64)
    return binary_scores(labels, table["pred"].to_numpy(np.int64), table["prob_idc"].to_numpy(np.float64))


def run_seeds(
    recipes: Sequence[tuple[str, Sequence[Path]]],
    *,
    model: str = "idc_net",
    n_bootstrap: int = 1000,
    threshold_rules: Sequence[str] = THRESHOLD_RULES,
    out_file: str | Path | None = None,
) -> dict[str, Any]:
    """Read the recipes' folders, score them and return ``{"markdown", "seeds", "paired", "context", "folds"}``.

    ``paired`` is keyed by ``"RECIPE / RULE"`` (the first recipe under the first rule is the baseline).

    Raises :class:`SeedsError` when a folder is not a `bench quality` folder, the folders were cut into other folds,
    a recipe or rule appears twice, a rule is unknown or no fold was finished by every folder.
    """
    names = [name for name, _ in recipes]
    if len(set(names)) != len(names) or not recipes:
        raise SeedsError(f"name each recipe once (got {', '.join(names) or 'none'})")
    rules = list(threshold_rules)
    unknown = [r for r in rules if r not in THRESHOLD_RULES]
    if unknown or not rules or len(set(rules)) != len(rules):
        raise SeedsError(
            f"threshold rules {', '.join(rules) or 'none'}: name each of {', '.join(THRESHOLD_RULES)} at most once"
        )
    loaded = {name: [(folder, *_load(Path(folder), model)) for folder in folders] for name, folders in recipes}
    first_folder, first_config, _ = loaded[names[0]][0]
    for name in names:
        for folder, config, _ in loaded[name]:
            differ = [k for k in _SAME if config.get(k) != first_config.get(k)]
            if differ:
                raise SeedsError(
                    f"{folder} differs from {first_folder} in {', '.join(differ)}: compare folders of the same "
                    "patients and folds (the same data folders, --folds and --seed)"
                )
    folds = sorted(set.intersection(*(set(logs) for runs in loaded.values() for _, _, logs in runs)))
    if not folds:
        raise SeedsError(f"no fold of {model} was finished in every folder: run `bench quality` on the same folds")
    slides = {str(p) for p in first_config["whole_slide_patients"]}

    # Pooled out-of-fold predictions, one table per (recipe, rule, seed), rows in the same order for every table.
    tables: dict[str, list[tuple[int, pd.DataFrame]]] = {_arm(n, r): [] for n in names for r in rules}
    context_rows = []
    for name in names:
        for folder, config, _ in loaded[name]:
            parts: dict[str, list[pd.DataFrame]] = {rule: [] for rule in rules}
            for fold in folds:
                # Patches named relative to the dataset folder, as a record names them (`bench record`).
                val, test = (by_path(dataset_paths(t)) for t in member_tables(Path(folder), model, fold))
                for rule in rules:
                    threshold, decided = _decided(val, test, rule)
                    parts[rule].append(decided)
                    context_rows += _context_rows(name, rule, _model_seed(config), fold, val, test, threshold, slides)
            for rule in rules:
                tables[_arm(name, rule)].append((_model_seed(config), pd.concat(parts[rule], ignore_index=True)))
    arms = list(tables)
    reference = tables[arms[0]][0][1]
    for name in names:
        for (folder, _, _), (_, table) in zip(loaded[name], tables[_arm(name, rules[0])], strict=True):
            if not same_patches(table, reference):
                raise SeedsError(
                    f"{folder} predicted other test patches than {first_folder} on folds {', '.join(map(str, folds))}: "
                    "were they written from other data folders?"
                )

    seeds_rows, paired = [], {}
    for name in names:
        for rule in rules:
            runs = tables[_arm(name, rule)]
            for group in ("all", "whole slide"):
                scores = [
                    _pooled_scores(t if group == "all" else t[t["patient_id"].astype(str).isin(slides)])
                    for _, t in runs
                ]
                seeds_rows.append(
                    {"recipe": name, "rule": rule, "group": group, "seeds": [s for s, _ in runs], "scores": scores}
                )
    base = [t for _, t in tables[arms[0]]]
    for arm in arms[1:]:
        paired[arm] = paired_difference(base, [t for _, t in tables[arm]], n_bootstrap=n_bootstrap)
    n_patients = int(tables[arms[0]][0][1]["patient_id"].nunique())
    text = _markdown(arms[0], folds, model, seeds_rows, paired, context_rows, n_patients)
    if out_file is not None:
        write_text(Path(out_file), text)
    return {"markdown": text, "seeds": seeds_rows, "paired": paired, "context": context_rows, "folds": folds}


def _context_rows(
    name: str,
    criterion: str,
    seed: int,
    fold: int,
    val: pd.DataFrame,
    test: pd.DataFrame,
    threshold: float,
    slides: set[str],
) -> list[dict[str, Any]]:
    """Patch-only and context F1 on the fold's whole-slide test patients, context refitted under each rule.

    ``threshold`` is the patch-only one ``criterion`` chose on all validation patients; the context threshold is
    chosen under the context rule's own criterion (``criterion`` for a rule that names none).

    The F1 of all the fold's test patients is kept beside it (``*_all``): a rule that helps the slides may cost the
    thin samples. A context rule that comes to the same fit as an earlier one under ``criterion`` is left out.
    """
    on_slides = test[test["patient_id"].astype(str).isin(slides)]
    if on_slides.empty or not 0 < on_slides["label"].sum() < len(on_slides):
        return []
    labels = on_slides["label"].to_numpy(np.int64)
    patch = binary_scores(labels, (on_slides["prob_idc"] >= threshold).to_numpy(np.int64))["f1"]
    all_labels = test["label"].to_numpy(np.int64)
    patch_all = binary_scores(all_labels, (test["prob_idc"] >= threshold).to_numpy(np.int64))["f1"]
    # The patch-only threshold chosen on the whole-slide validation patients instead, for comparison.
    val_slides = val[val["patient_id"].astype(str).isin(slides)]
    patch_slides = None
    if 0 < val_slides["label"].sum() < len(val_slides):
        cut = pick_threshold(
            val_slides["label"].to_numpy(np.int64), val_slides["prob_idc"].to_numpy(np.float64), criterion
        )
        patch_slides = binary_scores(labels, (on_slides["prob_idc"] >= cut).to_numpy(np.int64))["f1"]
    rows, fitted = [], []
    for rule, kwargs in CONTEXT_RULES.items():
        key = {"recipe": name, "threshold_rule": criterion, "seed": seed, "fold": fold, "rule": rule}
        arguments = {"criterion": criterion, **kwargs}
        if arguments in fitted:
            continue
        fitted.append(arguments)
        try:
            params = fit_context(val, **arguments, patch_threshold=threshold)
        except ContextError as exc:
            rows.append({**key, "reason": str(exc)})
            continue
        out = apply_context(test, params)
        context = binary_scores(labels, out.loc[on_slides.index, "pred_context"].to_numpy(np.int64))["f1"]
        context_all = binary_scores(all_labels, out["pred_context"].to_numpy(np.int64))["f1"]
        rows.append(
            {
                **key,
                "patients": int(on_slides["patient_id"].nunique()),
                "patch_f1": float(patch),
                "patch_f1_slide_threshold": patch_slides,
                "context_f1": float(context),
                "patch_f1_all": float(patch_all),
                "context_f1_all": float(context_all),
                "sigma": float(params["sigma"]),
                "threshold": threshold,
                "context_threshold": float(params["threshold"]),
                "tuned_on": f"{params['tuned_on']} ({len(params['patients'])})",
            }
        )
    return rows


def _markdown(
    baseline: str,
    folds: Sequence[int],
    model: str,
    seeds_rows: Sequence[Mapping[str, Any]],
    paired: Mapping[str, Mapping[str, Any]],
    context_rows: Sequence[Mapping[str, Any]],
    n_patients: int,
) -> str:
    which = f"fold {folds[0]}" if len(folds) == 1 else f"folds {', '.join(map(str, folds))} pooled"
    lines = [
        f"### {model} over model seeds, patch only: {which} ({n_patients} test patients)",
        "",
        "Each fold decided at a threshold chosen on its own validation patients under the rule named (f1: the best "
        "IDC F1 there; youden: the best balanced accuracy). Mean | SD | range = largest minus smallest, over seeds.",
        "",
        "| recipe | threshold rule | patients | model seeds | F1 per seed | F1 mean | SD | range "
        "| balanced accuracy mean | SD | range | ROC AUC mean | SD | range |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in seeds_rows:
        f1s = [s["f1"] for s in row["scores"]]
        lines.append(
            f"| {row['recipe']} | {row['rule']} | {row['group']} | {', '.join(map(str, row['seeds']))} "
            f"| {', '.join(f'{v:.3f}' for v in f1s)} | {_stats(f1s)} "
            f"| {_stats([s['balanced_accuracy'] for s in row['scores']])} "
            f"| {_stats([s['roc_auc'] for s in row['scores']])} |"
        )
    if paired:
        lines += [
            "",
            f"### Paired differences from {baseline} (mean over its seeds), 95% bootstrap intervals over patients",
            "",
            "| recipe / threshold rule | " + " | ".join(_NAMES[m] for m in PAIRED_METRICS) + " |",
            "|---|" + "---|" * len(PAIRED_METRICS),
        ]
        for name, diff in paired.items():
            cells = []
            for m in PAIRED_METRICS:
                d = diff[m]
                interval = "" if d["ci_low"] is None else f" [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
                cells.append(f"{d['value']:+.3f}{interval}")
            lines.append(f"| {name} - {baseline} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Slide context on the whole-slide test patients, fold by fold (F1; refitted on each fold's validation)",
        "",
        "Patch only at the threshold rule's threshold (chosen on all validation patients) and, for comparison, at one "
        "chosen under the same rule on the whole-slide validation patients; context at the threshold its context rule "
        "chose (under the threshold rule's criterion unless it names one).",
        "",
        "| recipe | threshold rule | seed | fold | slides | patch only | patch only, whole-slide threshold "
        "| context rule | tuned on (patients) | sigma | thresholds patch / context | context | context - patch "
        "| all test patients: patch only / context |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in context_rows:
        head = f"| {r['recipe']} | {r['threshold_rule']} | {r['seed']} | {r['fold']} |"
        if "reason" in r:
            lines.append(f"{head} | | | {r['rule']} | {r['reason']} | | | | | |")
            continue
        lines.append(
            f"{head} {r['patients']} | {r['patch_f1']:.3f} "
            f"| {_f(r['patch_f1_slide_threshold'])} | {r['rule']} | {r['tuned_on']} | {r['sigma']:.1f} "
            f"| {r['threshold']:.3f} / {r['context_threshold']:.3f} | {r['context_f1']:.3f} "
            f"| {r['context_f1'] - r['patch_f1']:+.3f} | {r['patch_f1_all']:.3f} / {r['context_f1_all']:.3f} |"
        )
    lines += [
        "",
        "| threshold rule | context rule | fold x seed runs | on whole slides: context below patch only "
        "| mean context - patch | all test patients: mean context - patch |",
        "|---|---|---|---|---|---|",
    ]
    for criterion in dict.fromkeys(r["threshold_rule"] for r in context_rows):
        for rule in CONTEXT_RULES:
            mine = [
                r for r in context_rows if r["threshold_rule"] == criterion and r["rule"] == rule and "reason" not in r
            ]
            if mine:
                gaps = np.array([r["context_f1"] - r["patch_f1"] for r in mine])
                overall = np.mean([r["context_f1_all"] - r["patch_f1_all"] for r in mine])
                lines.append(
                    f"| {criterion} | {rule} | {len(mine)} | {int((gaps < 0).sum())} | {gaps.mean():+.3f} "
                    f"| {overall:+.3f} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``python -m idc_helpers.bench seeds``."""
    parser = OneLineParser(prog="python -m idc_helpers.bench seeds", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--recipe",
        action="append",
        required=True,
        metavar="NAME=DIR[,DIR...]",
        help="a recipe and its `bench quality` folders, one per model seed; repeat; the first is the baseline",
    )
    parser.add_argument("--model", default="idc_net", help="the model the folders trained (default idc_net)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient resamples for the paired intervals")
    parser.add_argument(
        "--threshold-rules",
        default=",".join(THRESHOLD_RULES),
        metavar="RULE[,RULE]",
        help="threshold rules to compare, each chosen on every fold's validation patients (default: all of them)",
    )
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)

    def run() -> dict[str, Any]:
        recipes = [parse_recipe(text) for text in args.recipe]
        rules = [r.strip() for r in args.threshold_rules.split(",") if r.strip()]
        return run_seeds(
            recipes, model=args.model, n_bootstrap=args.bootstrap, threshold_rules=rules, out_file=args.out
        )

    return print_markdown(run)


if __name__ == "__main__":
    sys.exit(main())
