"""A small, portable record of a `bench quality` folder, from which ``bench seeds`` recomputes its tables.

Run as ``python -m idc_helpers.bench record OUT --out RECORD``.

A cross-validation folder holds trained models (megabytes per fold) and prediction tables that name every patch by
its path on the machine that ran it. Its record keeps what ``bench seeds`` reads and nothing that runs code:
``config.json`` and ``folds.jsonl`` as they are, and each prediction table compressed (``predictions/*.csv.gz``)
with the columns the tables are computed from (the patch file relative to the dataset folder, patient, coordinates,
label and probability). ``bench seeds`` reads a record as it reads the folder, and compares records with folders
patch by patch (by the path relative to the dataset folder, :func:`dataset_path`), so the records of earlier runs
can be committed and the tables recomputed in seconds on another machine.

Recording again after more folds have finished adds their tables. A table already in the record is kept when it
holds the same predictions and refused otherwise (a record never changes silently); the source folder is only read.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from idc_helpers.atomic import atomic_path, write_text
from idc_helpers.bench.quality import CONFIG_FILE, LOG_FILE, read_log, read_table
from idc_helpers.cli import OneLineParser
from idc_helpers.errors import UserError

#: The prediction columns a record keeps: what ``bench seeds`` needs to re-decide thresholds and refit slide context.
COLUMNS = ("path", "patient_id", "x", "y", "label", "prob_idc")


class RecordError(UserError, ValueError):
    """The folder is not a `bench quality` folder, or the record already holds other predictions under a name."""


def dataset_path(path: str) -> str:
    """``<patient>/<0|1>/<file>``: a patch's path relative to its dataset folder (the Kaggle layout)."""
    parts = Path(path).parts
    if len(parts) < 3:
        raise RecordError(f"{path!r} is not a patch path of the Kaggle layout <patient>/<0|1>/<file>")
    return "/".join(parts[-3:])


def dataset_paths(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with each patch path made relative to its dataset folder (:func:`dataset_path`)."""
    return table.assign(path=[dataset_path(p) for p in table["path"].astype(str)])


def slim_table(table: pd.DataFrame, source: Path) -> pd.DataFrame:
    """The record's columns of a predictions table, each patch named relative to the dataset folder."""
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise RecordError(
            f"{source} lacks the column(s) {', '.join(missing)}: is it a `bench quality` prediction table?"
        )
    return dataset_paths(table.loc[:, list(COLUMNS)])


def _same_predictions(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    if len(a) != len(b) or list(a["path"]) != list(b["path"]):
        return False
    return bool(np.array_equal(a["label"].to_numpy(), b["label"].to_numpy())) and bool(
        np.allclose(a["prob_idc"].to_numpy(np.float64), b["prob_idc"].to_numpy(np.float64), rtol=0, atol=1e-8)
    )


def record_folder(source: str | Path, dest: str | Path) -> dict[str, Any]:
    """Write (or extend) the record of the `bench quality` folder ``source`` at ``dest``; returns a summary.

    Raises :class:`RecordError` when ``source`` is not such a folder, or ``dest`` already holds a table of the same
    name with other predictions, or another cross-validation's config.
    """
    source, dest = Path(source), Path(dest)
    config_path = source / CONFIG_FILE
    if not config_path.is_file() or not (source / LOG_FILE).is_file():
        raise RecordError(
            f"{source} holds no {CONFIG_FILE} and {LOG_FILE}: give an --out folder of "
            "`python -m idc_helpers.bench quality` with at least one finished fold"
        )
    config_text = config_path.read_text(encoding="utf-8")
    if (dest / CONFIG_FILE).is_file() and (dest / CONFIG_FILE).read_text(encoding="utf-8") != config_text:
        raise RecordError(
            f"{dest / CONFIG_FILE} records another cross-validation than {config_path}; choose another --out"
        )
    records = read_log(source)
    tables = []
    for record in records:
        for prefix in ("", "val-"):
            name = f"{prefix}{record['model']}-fold{record['fold']}.csv"
            if not (source / "predictions" / name).is_file():
                raise RecordError(
                    f"{source / 'predictions' / name} is missing although {source / LOG_FILE} lists the fold: "
                    f"rerun `bench quality ... --only-folds {record['fold']} --out {source}`"
                )
            tables.append(name)
    written, kept = [], []
    for name in tables:
        slim = slim_table(read_table(source / "predictions" / name), source / "predictions" / name)
        target = dest / "predictions" / f"{name}.gz"
        if target.is_file():
            there = read_table(target, fix="record into a new --out folder")
            if not _same_predictions(there, slim):
                raise RecordError(
                    f"{target} holds other predictions than {source / 'predictions' / name}: a record is never "
                    "overwritten; record into a new --out folder"
                )
            kept.append(name)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target, suffix=".csv.gz") as tmp:
            slim.to_csv(tmp, index=False, compression={"method": "gzip", "mtime": 0})
        written.append(name)
    # The log last: a record interrupted before it lists no fold whose tables it lacks.
    write_text(dest / CONFIG_FILE, config_text)
    write_text(dest / LOG_FILE, "".join(json.dumps(record) + "\n" for record in records))
    return {"written": written, "kept": kept, "folds": len(records)}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write or extend the record of one `bench quality` folder."""
    parser = OneLineParser(prog="python -m idc_helpers.bench record", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="an --out folder of `python -m idc_helpers.bench quality`")
    parser.add_argument("--out", required=True, help="the record's folder (created, or extended with new folds)")
    args = parser.parse_args(argv)
    try:
        summary = record_folder(args.folder, args.out)
    except (UserError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: {summary['folds']} finished fold run(s) of {args.folder}; "
        f"{len(summary['written'])} table(s) written, {len(summary['kept'])} already there"
    )
    return 0
