"""Checks of everything a user hands in: numbers, tables, parameter files, names.

One home for them, shared by the command line (:func:`arg_type` gives argparse ``type=`` functions), the notebooks
(:func:`check_value`, :func:`check_table`, :func:`check_plain_data`) and a resumed run, whose ``config.json`` goes
through :func:`check_run_config` as if its values had been typed again. A refusal is an :class:`InvalidInputError`
(exit status 2 on the command line) whose message names the value, where it came from and what is allowed.

This module imports nothing of the package but :mod:`idc_helpers.errors`, and numpy and pandas only when a table is
checked, so that the command line answers ``--help`` or refuses a number at once.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idc_helpers.errors import UserError

if TYPE_CHECKING:  # numpy and pandas load with the first table checked: the command line starts without them
    import numpy as np
    import pandas as pd

#: Longest text accepted in a path column (Linux's PATH_MAX) and in a patient id.
MAX_PATH_CHARS = 4096
MAX_ID_CHARS = 64
#: Patient ids are the digits of the Kaggle folder names, matched whole.
PATIENT_ID = re.compile(r"[0-9]+")


class InvalidInputError(UserError, ValueError):
    """A value, table or parameters file that breaks the rules; the message names it and what is allowed."""


@dataclass(frozen=True)
class Number:
    """What a numeric setting may hold: a whole number or a finite real, within ``[low, high]``.

    ``high_open``, ``low_open``: ``high``, ``low`` itself is excluded.
    """

    whole: bool
    low: float | None = None
    high: float | None = None
    high_open: bool = False
    low_open: bool = False

    def allowed(self) -> str:
        """What is allowed, as a message says it: ``"a whole number of at least 1"``."""
        kind = "a whole number" if self.whole else "a finite number"
        if self.low is not None and self.high is not None:
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {opening}{self.low:g}, {self.high:g}{closing}"
        if self.low is not None:
            return f"{kind} {'above' if self.low_open else 'of at least'} {self.low:g}"
        return kind

    def accepts(self, value: float) -> bool:
        """Whether ``value`` (already of the right kind) lies in the range."""
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))


#: How a run's final weights are made (:func:`idc_helpers.training.fit`): ``"none"``, the weights of the best
#: validation epoch (early stopping); ``"ema"``, trained to the end of the schedule, an exponential moving average of
#: the weights, batch-norm statistics recomputed.
AVERAGING_CHOICES = ("none", "ema")
#: How the training patches weigh in the loss (:func:`idc_helpers.training_data.loss_weights`): ``"patch"``, every
#: patch alike within its class; ``"patient"``, each patient's patches one total, whatever their number, before the
#: classes are balanced.
WEIGHTING_CHOICES = ("patch", "patient")

#: Every numeric setting of the commands, the notebooks and ``config.json``, by name.
NUMBERS: dict[str, Number] = {
    "epochs": Number(whole=True, low=1),
    "batch_size": Number(whole=True, low=1),
    "max_patches": Number(whole=True, low=1),
    "steps_per_epoch": Number(whole=True, low=1),
    "patience": Number(whole=True, low=1),
    "n_patients": Number(whole=True, low=1),
    "bootstrap": Number(whole=True, low=0),
    "seed": Number(whole=True, low=0),
    "model_seed": Number(whole=True, low=0),
    "threshold": Number(whole=False, low=0.0, high=1.0),
    "label_smoothing": Number(whole=False, low=0.0, high=1.0, high_open=True),
    "learning_rate": Number(whole=False, low=0.0),
    "ema_momentum": Number(whole=False, low=0.0, high=1.0, high_open=True),
    "bn_batches": Number(whole=True, low=1),
    # idc_net's builder options (config.json's model_kwargs, bench quality's --width and --bn-momentum)
    "width": Number(whole=True, low=1),
    "dropout": Number(whole=False, low=0.0, high=1.0, high_open=True),
    "bn_momentum": Number(whole=False, low=0.0, high=1.0, low_open=True, high_open=True),
    "bn_epsilon": Number(whole=False, low=0.0, low_open=True),
}


def shown(value: Any, limit: int = 50) -> str:
    """``value`` as a message shows it: its repr (numpy scalars as Python ones), long text cut with its length."""
    value = value.item() if type(value).__module__ == "numpy" and hasattr(value, "item") else value
    if value is None:  # an empty cell: pandas 2 keeps None in a text column where pandas 3 has NaN
        value = float("nan")
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    text = repr(value)
    return text if len(text) <= 2 * limit else text[: 2 * limit] + "..."


def _as_number(value: Any, whole: bool) -> float | int | None:
    """``value`` (a number or its text) as an int or float, or None when it is not one (bools are not numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text) if whole and re.fullmatch(r"[+-]?[0-9]+", text) else float(text)
        except ValueError:
            return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def check_value(name: str, value: Any, source: str = "the command line") -> int | float:
    """``value`` of the setting ``name`` (a key of :data:`NUMBERS`) as an int or float, its type and range checked.

    Raises :class:`InvalidInputError` naming the value, ``source`` and what is allowed otherwise.
    """
    rule = NUMBERS[name]
    number = _as_number(value, rule.whole)
    ok = number is not None and math.isfinite(number) and rule.accepts(number)
    if ok and rule.whole and not float(number).is_integer():
        ok = False
    if not ok:
        raise InvalidInputError(f"{name.replace('_', '-')} {value!r} ({source}) is not allowed: use {rule.allowed()}")
    return int(number) if rule.whole else float(number)


def arg_type(name: str) -> Callable[[str], int | float]:
    """An argparse ``type=`` function for the setting ``name``: the checked number, or argparse's error naming it."""

    def parse(text: str) -> int | float:
        try:
            return check_value(name, text)
        except InvalidInputError:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: use {NUMBERS[name].allowed()}") from None

    parse.__name__ = name
    return parse


def check_optional(name: str, value: Any, source: str) -> int | float | None:
    """:func:`check_value`, with ``None`` (the default) let through."""
    return None if value is None else check_value(name, value, source)


# --------------------------------------------------------------------------------------------------------------
# Names


def check_choice(option: str, value: Any, allowed: Iterable[str], source: str) -> str:
    """``value`` when it is exactly one of ``allowed`` (no case folding, nothing leading or trailing)."""
    allowed = list(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise InvalidInputError(f"{option} {value!r} ({source}) is not allowed: use one of {', '.join(allowed)}")
    return value


def check_patient_ids(ids: Iterable[Any], source: str) -> list[str]:
    """Patient ids as text, each the digits of a patient folder's name and nothing else."""
    checked = []
    for value in ids:
        text = str(value)
        if not _is_patient_id(text):
            raise InvalidInputError(
                f"patient id {shown(text)} ({source}) is not allowed: use the digits of a patient "
                "folder's name, e.g. 8863, with nothing before or after"
            )
        checked.append(text)
    return checked


def user_path(text: str | os.PathLike[str], source: str) -> Path:
    """``text`` as a path with ``~`` expanded.

    Raises :class:`InvalidInputError` naming ``source`` when ``~user`` names no user (or no home folder can be found).
    """
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise InvalidInputError(
            f"{source} {shown(os.fspath(text))}: the home folder in it is not known on this "
            "machine; give the folder as a full path"
        ) from None


def patient_list(text: str) -> list[str]:
    """Argparse ``type=`` for ``--patients`` / ``--test-patients``: ``ID,ID,...``.

    The ids are checked with :func:`check_patient_ids`.
    """
    try:
        return check_patient_ids(text.split(","), "the command line")
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(" is not allowed: ", 1)[-1] + f" (got {text!r})") from None


# --------------------------------------------------------------------------------------------------------------
# A resumed run's config.json


def check_run_config(
    config: Mapping[str, Any], source: str, *, models: Iterable[str], augments: Iterable[str], splits: Iterable[str]
) -> None:
    """The settings a run resumes with, checked as the command line checks them; ``source`` names the file."""
    if not isinstance(config, Mapping):
        raise InvalidInputError(f"{source}: not a run configuration (a JSON object is expected)")
    for name in (
        "epochs",
        "batch_size",
        "patience",
        "seed",
        "model_seed",
        "label_smoothing",
        "learning_rate",
        "ema_momentum",
        "bn_batches",
    ):
        if name in config:
            check_value(name, config[name], source)
    check_optional("steps_per_epoch", config.get("steps_per_epoch"), source)
    check_optional("max_patches", config.get("max_patches"), source)
    check_choice("model", config.get("model"), models, source)
    check_choice("augment", config.get("augment"), augments, source)
    check_choice("averaging", config.get("averaging", "none"), AVERAGING_CHOICES, source)
    check_choice("weighting", config.get("weighting", "patch"), WEIGHTING_CHOICES, source)
    split = config.get("split")
    check_choice("split", split.get("name") if isinstance(split, Mapping) else split, splits, source)


# --------------------------------------------------------------------------------------------------------------
# Tables


@dataclass(frozen=True)
class Column:
    """What a table column may hold: one of five kinds.

    ``"text"`` (at most ``max_chars``), ``"patient_id"``, ``"coordinate"`` (a whole number of at least 1), ``"binary"``
    (0 or 1) or ``"probability"`` (finite, in [0, 1]).
    """

    kind: str
    max_chars: int = MAX_PATH_CHARS


#: The columns of a predictions table (and of the patch index), by name.
TABLE_COLUMNS: dict[str, Column] = {
    "path": Column("text"),
    "patient_id": Column("patient_id"),
    "x": Column("coordinate"),
    "y": Column("coordinate"),
    "label": Column("binary"),
    "pred": Column("binary"),
    "pred_context": Column("binary"),
    "prob_idc": Column("probability"),
    "prob_idc_context": Column("probability"),
    "threshold": Column("probability"),
    "threshold_context": Column("probability"),
}

_ALLOWED = {
    "text": "text of at most {max_chars:,} characters",
    "patient_id": "a patient id (digits only)",
    "coordinate": "whole numbers of at least 1",
    "binary": "0 or 1",
    "probability": "probabilities in [0, 1] (no NaN)",
}


def _bad_rows(series: pd.Series, column: Column) -> np.ndarray:
    """Boolean mask of the values of ``series`` that ``column`` refuses."""
    import numpy as np
    import pandas as pd

    if column.kind == "patient_id":  # few distinct ids: each is checked once
        codes, uniques = pd.factorize(series, use_na_sentinel=True)
        ok = np.array(
            [isinstance(v, str) and len(v) <= MAX_ID_CHARS and PATIENT_ID.fullmatch(v) is not None for v in uniques],
            dtype=bool,
        )
        return (codes < 0) | ~np.append(ok, False)[codes]
    if column.kind == "text":
        is_text = (
            pd.api.types.infer_dtype(series, skipna=False) == "string" or series.map(lambda v: isinstance(v, str)).all()
        )
        text = series if is_text else series.map(lambda v: v if isinstance(v, str) else None)
        return text.isna().to_numpy() | (text.str.len() > column.max_chars).fillna(True).to_numpy(dtype=bool)
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if pd.api.types.is_bool_dtype(series):
        bad[:] = True
    if column.kind == "probability":
        return bad | (values < 0) | (values > 1)
    bad |= values != np.round(values)
    if column.kind == "binary":
        return bad | ~np.isin(values, (0, 1))
    return bad | (values < 1)


def check_table(
    table: pd.DataFrame,
    required: Iterable[str],
    source: str,
    columns: Mapping[str, Column] = TABLE_COLUMNS,
    first_row: int = 1,
) -> pd.DataFrame:
    """Check ``table`` column by column and return it with the numeric columns as numbers.

    ``x``, ``y``: int64; ``label``, ``pred``: int8; probabilities: float64.

    ``required``: columns that must be there; every column of ``columns`` that is there is checked too. Raises
    :class:`InvalidInputError` naming ``source``, the column, the first bad row (counted from ``first_row``: 1 is
    the first line of a CSV file after its header), its value and what is allowed.
    """
    import numpy as np
    import pandas as pd

    missing = [name for name in required if name not in table.columns]
    if missing:
        raise InvalidInputError(
            f"{source}: missing column(s) {', '.join(missing)}; the table has "
            f"{', '.join(map(str, table.columns)) or 'no columns'}"
        )
    out = {}
    for name, column in columns.items():
        if name not in table.columns:
            continue
        bad = _bad_rows(table[name], column)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InvalidInputError(
                f"{source}: column {name!r} row {row + first_row} holds {shown(table[name].iloc[row])} "
                f"({int(bad.sum()):,} bad row(s) in all); "
                f"the column must hold {_ALLOWED[column.kind].format(max_chars=column.max_chars)}"
            )
        if column.kind == "coordinate":
            out[name] = pd.to_numeric(table[name]).astype(np.int64)
        elif column.kind == "binary":
            out[name] = pd.to_numeric(table[name]).astype(np.int8)
        elif column.kind == "probability":
            out[name] = pd.to_numeric(table[name]).astype(np.float64)
    return table.assign(**out) if out else table


# --------------------------------------------------------------------------------------------------------------
# Parameter files


def check_plain_data(value: Any, where: str) -> None:
    """Refuse anything but JSON's types in a parameters file's ``value``; ``where`` names the file and the key.

    JSON's types are text, finite numbers, true/false, null, lists and maps with text keys. Nothing else may reach a
    notebook, where a value becomes source code.
    """
    if value is None or isinstance(value, (bool, str, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError(f"{where}: {value!r} is not allowed: use a finite number")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            check_plain_data(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInputError(f"{where}: the key {key!r} is not allowed: keys must be text")
            check_plain_data(item, f"{where}.{key}")
        return
    raise InvalidInputError(
        f"{where}: {shown(value)} (a YAML {type(value).__name__}) is not allowed: use text, "
        "numbers, true/false, null, lists or maps (quote a date to pass it as text)"
    )


#: Notebook parameters that are numbers of :data:`NUMBERS` (``None`` keeps a notebook's default).
NOTEBOOK_NUMBERS = {
    "EPOCHS": "epochs",
    "MAX_PATCHES": "max_patches",
    "BATCH_SIZE": "batch_size",
    "SEED": "seed",
    "N_BOOTSTRAP": "bootstrap",
    "N_PATIENTS": "n_patients",
    "GALLERY_SIZE": "n_patients",
    "GRADCAM_EXAMPLES": "n_patients",
}
_MODEL_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _is_patient_id(value: Any) -> bool:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    return isinstance(text, str) and len(text) <= MAX_ID_CHARS and PATIENT_ID.fullmatch(text) is not None


#: Notebook parameters of other kinds: what each may hold (``None`` always keeps a notebook's default).
NOTEBOOK_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "DATA_DIR": ("a folder name (text)", lambda v: isinstance(v, str) and 0 < len(v) <= MAX_PATH_CHARS),
    "PATIENT": ("a patient id", _is_patient_id),
    "PATIENTS": ("a list of patient ids", lambda v: isinstance(v, list) and all(map(_is_patient_id, v))),
    "MODEL": ("a model name (text)", lambda v: isinstance(v, str) and _MODEL_NAME.fullmatch(v) is not None),
    "COMPARE_WITH": ("a model name (text)", lambda v: isinstance(v, str) and _MODEL_NAME.fullmatch(v) is not None),
    "SPLIT": ("patients or janowczyk2016", lambda v: v in ("patients", "janowczyk2016")),
    "SLIDER": ("true or false", lambda v: isinstance(v, bool)),
    "TTA": ("true or false", lambda v: isinstance(v, bool)),
    "SCALE": ("a number in (0, 1]", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1),
}


def check_parameter(name: str, value: Any, source: str) -> None:
    """A notebook parameter from a parameters file, checked: plain data, then a number in range or a value of its kind.

    Plain data as :func:`check_plain_data` sees it; a number of :data:`NOTEBOOK_NUMBERS` within its range or a value of
    :data:`NOTEBOOK_KINDS` of its kind; ``source`` names the file.
    """
    check_plain_data(value, f"{source}: {name}")
    if value is None:
        return
    if name in NOTEBOOK_KINDS:
        allowed, accepts = NOTEBOOK_KINDS[name]
        if not accepts(value):
            raise InvalidInputError(f"{source}: {name} {shown(value)} is not allowed: use {allowed} or null")
        return
    if name not in NOTEBOOK_NUMBERS:
        return
    rule = NOTEBOOK_NUMBERS[name]
    try:
        if isinstance(value, str):  # text that looks like a number is still text in the notebook
            raise InvalidInputError("text")
        check_value(rule, value, source)
    except InvalidInputError:
        quotes = " (without quotes)" if isinstance(value, str) else ""
        raise InvalidInputError(
            f"{source}: {name} {value!r} is not allowed: use {NUMBERS[rule].allowed()}{quotes}"
        ) from None
