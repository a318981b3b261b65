"""Reports for people: an evaluation as text, the published figures beside it, and patches by outcome.

The input is a report of :func:`idc_helpers.metrics.evaluate` or a predictions table; nothing is scored here.
:func:`format_report` prints a report as a table, :func:`comparison_table` sets its F1 and balanced accuracy beside
the published ones, :func:`outcomes` names each patch's outcome and :func:`confident_examples` picks the most
confident patches of each outcome for a figure. :data:`PUBLISHED` holds the published figures this series compares
with (the one place they are written).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

from idc_helpers.metrics import METRIC_LABELS, THRESHOLD_RULES

#: Published results on this dataset (fractions, ``None`` where the paper gives no figure), and on what test set.
#: ``patient_level`` says whether the test patients were unseen in training.
PUBLISHED: tuple[dict[str, Any], ...] = (
    {
        "model": "seed CNN (published, leaky patch split)",
        "test set": "random patches",
        "f1": 0.7533,
        "balanced_accuracy": 0.8314,
        "patient_level": False,
    },
    {
        "model": "Cruz-Roa et al. 2014",
        "test set": "49 patients",
        "f1": 0.718,
        "balanced_accuracy": 0.8423,
        "patient_level": True,
    },
    {
        "model": "Janowczyk & Madabhushi 2016",
        "test set": "49 patients",
        "f1": 0.7648,
        "balanced_accuracy": None,
        "patient_level": True,
    },
    {
        "model": "Romero et al. 2019",
        "test set": "49 patients",
        "f1": None,
        "balanced_accuracy": 0.89,
        "patient_level": True,
    },
)


def _fmt(value: float | None) -> str:
    """A metric with three decimals, ``n/a`` where it is undefined."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def format_report(report: Mapping[str, Any]) -> str:
    """Write a report of :func:`idc_helpers.metrics.evaluate` as a plain-text table, with counts and confusion matrix.

    One line per metric: name, value and its interval over patients (or why there is none).
    """
    counts, cm, boot = report["counts"], report["confusion_matrix"], report["bootstrap"]
    level = round(boot["level"] * 100)
    lines = ["SYNTHETIC demo data: these numbers say nothing about real tissue", ""] if report.get("synthetic") else []
    if report.get("column", "prob_idc") != "prob_idc":
        lines += [
            f"Scores: {report['column']} (uses each patch's neighbours on the slide: not comparable with "
            "patch-only figures)",
            "",
        ]
    lines += [
        f"{counts['patches']:,} patches from {counts['patients']} patients; "
        f"IDC {counts['idc']:,} ({counts['idc_fraction']:.1%}), non-IDC {counts['non_idc']:,}",
        "Threshold: "
        + (
            "none recorded (the table's decisions)" if report.get("threshold") is None else f"{report['threshold']:.3f}"
        ),
        "",
    ]
    width = max(len(label) for label in METRIC_LABELS.values())
    ci_header = f"{level}% CI (patients)" + (": none, too few patients" if boot.get("withheld") else "")
    lines.append(f"{'Metric':<{width}}  {'Value':>6}  {ci_header}")
    lines.append("-" * (width + 28))
    for name, label in METRIC_LABELS.items():
        entry = report["metrics"][name]
        ci = "" if entry["ci_low"] is None else f"[{_fmt(entry['ci_low'])}, {_fmt(entry['ci_high'])}]"
        lines.append(f"{label:<{width}}  {_fmt(entry['value']):>6}  {ci}")
    if boot.get("withheld"):
        lines += ["", f"No {level}% interval: {boot['withheld']}."]
    elif boot["requested"]:
        lines += [
            "",
            f"Bootstrap: {boot['used']} of {boot['requested']} patient resamples used"
            + (f" ({boot['skipped_one_class']} had one class only)" if boot["skipped_one_class"] else ""),
        ]
    lines += [
        "",
        "Confusion matrix (rows: true, columns: predicted)",
        f"{'':>10}{'non-IDC':>10}{'IDC':>10}",
        f"{'non-IDC':>10}{cm['tn']:>10,}{cm['fp']:>10,}",
        f"{'IDC':>10}{cm['fn']:>10,}{cm['tp']:>10,}",
    ]
    return "\n".join(lines)


def _other_threshold(metrics: Mapping[str, Any]) -> tuple[str, str]:
    """The row of the threshold the other rule would have chosen (runs before ``threshold_criterion``: the F1 rule)."""
    rule = metrics.get("threshold_criterion", "f1")
    other = next(name for name in THRESHOLD_RULES if name != rule)
    short, text = THRESHOLD_RULES[other]
    return f"{short} threshold", f"{metrics.get(f'threshold_{other}', float('nan')):.3f} ({text})"


def run_choices(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """What a run chose on its validation patients, one row each, from its ``metrics.json`` (``Run.metrics``).

    The weights kept (best epoch or moving average), the decision threshold with the validation scores at it, the
    threshold of the other rule beside it, and the slide context's width and threshold and the patients they were
    chosen on; values rounded for reading (the file keeps every digit).
    """
    validation = metrics.get("validation", {})
    context = metrics.get("context", {})
    rows = [
        (
            "weights kept",
            metrics.get("weights")  # runs before the key: always their best epoch
            or f"best epoch, {metrics.get('best_epoch')} of {metrics.get('epochs_run')} ({metrics.get('monitor')})",
        ),
        ("training time", f"{metrics.get('train_seconds', float('nan')):.0f} s"),
        ("threshold", f"{metrics['threshold']:.3f} ({metrics.get('threshold_rule', '')})"),
        _other_threshold(metrics),
        (
            "validation patients",
            f"{validation.get('patients')} ({validation.get('patches', 0):,} patches, "
            f"{validation.get('idc_patches', 0):,} IDC)",
        ),
    ]
    for key in ("f1", "balanced_accuracy", "roc_auc", "precision", "recall"):
        if validation.get(key) is not None:
            rows.append((f"validation: {METRIC_LABELS.get(key, key)}", f"{validation[key]:.3f}"))
    if "sigma" in context:
        rows.append(("slide context", f"sigma {context['sigma']:g} patches, threshold {context['threshold']:.3f}"))
        if "patients" in context:
            kind = "whole-slide " if context.get("tuned_on") == "whole_slides" else ""
            why = f" ({context['fallback']})" if context.get("fallback") else ""
            rows.append(("slide context chosen on", f"{len(context['patients'])} {kind}validation patients{why}"))
    elif context.get("unavailable"):
        rows.append(("slide context", str(context["unavailable"])))
    return pd.DataFrame(rows, columns=["choice", "value"]).set_index("choice")


def comparison_table(report: Mapping[str, Any], *, model: str, test_set: str) -> pd.DataFrame:
    """Set the :data:`PUBLISHED` figures and this report's F1 and balanced accuracy side by side, in percent.

    ``model`` and ``test_set`` describe this run (e.g. ``"idc_net"``, ``"4 test patients, patients split"``); a
    report of synthetic data says so in both cells, at the start, so that a narrow column cannot cut it off.
    """

    def percent(value: float | None) -> float:
        return math.nan if value is None else round(100.0 * value, 2)

    rows = [
        {
            "model": r["model"],
            "test set": r["test set"],
            "F1 (%)": percent(r["f1"]),
            "balanced accuracy (%)": percent(r["balanced_accuracy"]),
            "unseen patients": "yes" if r["patient_level"] else "no",
        }
        for r in PUBLISHED
    ]
    ours = report["metrics"]
    synthetic = bool(report.get("synthetic"))
    rows.append(
        {
            "model": ("SYNTHETIC data: " if synthetic else "this run: ") + model,
            "test set": ("SYNTHETIC, " if synthetic else "") + test_set,
            "F1 (%)": percent(ours["f1"]["value"]),
            "balanced accuracy (%)": percent(ours["balanced_accuracy"]["value"]),
            "unseen patients": "yes",
        }
    )
    return pd.DataFrame(rows)


#: Outcome names of :func:`outcomes`, by (label, pred).
OUTCOME_NAMES = {(1, 1): "true positive", (0, 1): "false positive", (1, 0): "false negative", (0, 0): "true negative"}


def outcomes(preds: pd.DataFrame) -> pd.Series:
    """Name each patch's outcome from its ``label`` and ``pred``: a Series aligned with ``preds``.

    The names are those of :data:`OUTCOME_NAMES`: "true positive", "false positive", "false negative",
    "true negative".
    """
    keys = zip(preds["label"].astype(int), preds["pred"].astype(int), strict=True)
    return pd.Series([OUTCOME_NAMES[k] for k in keys], index=preds.index, name="outcome")


def confident_examples(preds: pd.DataFrame, threshold: float, *, per_outcome: int = 6) -> pd.DataFrame:
    """Pick the ``per_outcome`` patches of each outcome farthest from ``threshold`` (the most confident ones).

    Returns those rows of ``preds`` with an ``outcome`` column, in the order true positives, false positives, false
    negatives, true negatives.
    """
    table = preds.assign(outcome=outcomes(preds), confidence=(preds["prob_idc"] - threshold).abs())
    table = table.sort_values("confidence", ascending=False, kind="stable").groupby("outcome").head(per_outcome)
    order = {name: i for i, name in enumerate(OUTCOME_NAMES.values())}
    return table.sort_values("outcome", key=lambda s: s.map(order), kind="stable").drop(columns="confidence")
