"""Patient-level splits, and the patches of each patient a training run keeps.

A patient is never in two subsets: patches of one slide are strongly correlated, and a patch-level split lets a
model recognise the patient rather than the cancer (the reference model's 75.33% F1 was measured on such a leaky
split).

- :data:`JANOWCZYK2016`: the published split of Janowczyk & Madabhushi (2016), "Deep learning for digital
  pathology image analysis: A comprehensive tutorial with selected use cases", J Pathol Inform 7:29 (84 train /
  29 validation / 49 test patients of the original 162), also used by Romero et al. (2019).
- :func:`patient_split`: a seeded split by patient with given fractions, stratified on each patient's IDC share.
- :func:`patient_folds`: patient-grouped folds for cross-validation, stratified the same way.
- :func:`resolve_split`: the split a training run makes (a named one, or given test patients and the rest split
  into train and validation), and :func:`check_split`, which refuses one that leaves a subset empty.
- :func:`subsample_patches`: the same share of every patient's patches, for quick runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd

from idc_helpers.errors import UserError
from idc_helpers.validation import check_patient_ids


class SplitError(UserError, ValueError):
    """A split that cannot be made as asked (unknown name, bad fractions or fold count, overlapping subsets)."""


class TrainingDataError(UserError, ValueError):
    """The data cannot support a training run (e.g. no validation patients, one class only)."""


SUBSETS = ("train", "val", "test")
SPLIT_NAMES = ("janowczyk2016", "patients")
DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}
VAL_FRACTION_WITH_TEST_PATIENTS = 0.18  # of the non-test patients, when --test-patients replaces the test subset
# Candidate assignments tried by the stratified splitters; the best balanced one wins.
_CANDIDATES = 2000

JANOWCZYK2016: dict[str, tuple[str, ...]] = {
    "train": (
        "10304",
        "9346",
        "9029",
        "12911",
        "9043",
        "9044",
        "12884",
        "12752",
        "12819",
        "12890",
        "9024",
        "9124",
        "9178",
        "10291",
        "12871",
        "9257",
        "9323",
        "8974",
        "10302",
        "12932",
        "9266",
        "9325",
        "10285",
        "14079",
        "14304",
        "9037",
        "8980",
        "10264",
        "12749",
        "12891",
        "8915",
        "15633",
        "13024",
        "10288",
        "9081",
        "12820",
        "12930",
        "9255",
        "12882",
        "9267",
        "9177",
        "8865",
        "10262",
        "8957",
        "12811",
        "12901",
        "9259",
        "13692",
        "14213",
        "12931",
        "10256",
        "10254",
        "9174",
        "9041",
        "9175",
        "9321",
        "12818",
        "8951",
        "9173",
        "9126",
        "12872",
        "10275",
        "12900",
        "10293",
        "10308",
        "10268",
        "12869",
        "9320",
        "9228",
        "8975",
        "10258",
        "8955",
        "13689",
        "9256",
        "14212",
        "9383",
        "12822",
        "9123",
        "9265",
        "9083",
        "12750",
        "10257",
        "8913",
        "15902",
    ),
    "val": (
        "13688",
        "9381",
        "16554",
        "12867",
        "12880",
        "9076",
        "12626",
        "10299",
        "8959",
        "9023",
        "15473",
        "12896",
        "13591",
        "13461",
        "9078",
        "9324",
        "9022",
        "8956",
        "9036",
        "10260",
        "10269",
        "10261",
        "8917",
        "10277",
        "12875",
        "16896",
        "9345",
        "8914",
        "8867",
    ),
    "test": (
        "12909",
        "9382",
        "9075",
        "9290",
        "12881",
        "12895",
        "8864",
        "14191",
        "10259",
        "10274",
        "10303",
        "12907",
        "9225",
        "13402",
        "10295",
        "10306",
        "9176",
        "13023",
        "12821",
        "10307",
        "9322",
        "9073",
        "12905",
        "13106",
        "12906",
        "13401",
        "13403",
        "10292",
        "9261",
        "8916",
        "8918",
        "9254",
        "15515",
        "13458",
        "16550",
        "9250",
        "9347",
        "14081",
        "12826",
        "13460",
        "10276",
        "10273",
        "14189",
        "9181",
        "13687",
        "10286",
        "10255",
        "10301",
        "9125",
    ),
}


def _patients(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-patient patch and IDC counts, sorted by numeric patient id (a stable order on any machine)."""
    table = frame.groupby("patient_id")["label"].agg(n="size", idc="sum").reset_index()
    order = np.argsort(table["patient_id"].astype(np.int64).to_numpy(), kind="stable")
    return table.iloc[order].reset_index(drop=True)


def janowczyk2016_split(frame: pd.DataFrame, unlisted: Literal["train", "drop"] = "train") -> dict[str, list[str]]:
    """The published split restricted to the patients in ``frame``.

    The published lists name 162 patients; the Kaggle copy has 279. ``unlisted`` says where the other 117 go:
    ``"train"`` (default) adds them to training, so validation and test are exactly the published patients that
    ``frame`` holds while training sees more patients than the paper's; ``"drop"`` leaves them out, so every
    subset is the published one (restricted to ``frame``), as in the paper. Either way the test figures are
    comparable with published ones only when ``frame`` holds all 49 published test patients.
    Subsets may be empty on a partial dataset.
    """
    if unlisted not in ("train", "drop"):
        raise SplitError(f"unlisted must be 'train' or 'drop', got {unlisted!r}")
    present = set(frame["patient_id"].astype(str))
    split = {name: sorted((p for p in JANOWCZYK2016[name] if p in present), key=int) for name in SUBSETS}
    if unlisted == "train":
        listed = set().union(*JANOWCZYK2016.values())
        split["train"] = sorted(set(split["train"]) | (present - listed), key=int)
    return split


def _counts(fractions: Mapping[str, float], n: int) -> dict[str, int]:
    names = list(fractions)
    total = sum(fractions.values())
    if total <= 0 or any(f < 0 for f in fractions.values()):
        raise SplitError(f"fractions must be non-negative and not all zero: {dict(fractions)}")
    raw = np.array([fractions[k] / total * n for k in names])
    counts = np.floor(raw).astype(int)
    # Largest remainders get the patients left over.
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    # Every subset asked for gets at least one patient when there are enough patients.
    for i, name in enumerate(names):
        if fractions[name] > 0 and counts[i] == 0 and n >= len(names):
            donor = int(np.argmax(counts))
            counts[donor] -= 1
            counts[i] += 1
    return dict(zip(names, counts.tolist(), strict=True))


def _imbalance(groups: np.ndarray, n: np.ndarray, idc: np.ndarray, n_groups: int) -> float:
    """How far the groups' IDC shares are from the overall share (max absolute difference)."""
    overall = idc.sum() / max(n.sum(), 1)
    worst = 0.0
    for g in range(n_groups):
        mask = groups == g
        if mask.any() and n[mask].sum() > 0:
            worst = max(worst, abs(idc[mask].sum() / n[mask].sum() - overall))
    return worst


def patient_split(
    frame: pd.DataFrame, fractions: Mapping[str, float] | None = None, seed: int = 0
) -> dict[str, list[str]]:
    """Split patients into subsets with the given patient fractions, stratified by IDC share.

    Among a fixed number of seeded random assignments with the right subset sizes, the one whose subsets'
    IDC shares (by patch) are closest to the whole dataset's is kept. Same frame and seed, same split.
    Returns ``{subset: sorted patient ids}``.
    """
    fractions = dict(fractions or DEFAULT_FRACTIONS)
    table = _patients(frame)
    counts = _counts(fractions, len(table))
    base = np.concatenate([np.full(c, i) for i, c in enumerate(counts.values())]).astype(int)
    groups = _best_assignment(base, table, len(counts), seed)
    ids = table["patient_id"].to_numpy()
    return {name: sorted(ids[groups == i].tolist(), key=int) for i, name in enumerate(counts)}


def patient_folds(frame: pd.DataFrame, n_folds: int = 5, seed: int = 0) -> list[list[str]]:
    """Patient-grouped folds for cross-validation: each patient is in exactly one fold's test list.

    Folds differ in size by at most one patient and are stratified by IDC share like :func:`patient_split`.
    (scikit-learn's ``StratifiedGroupKFold`` stratifies as well, but its ``shuffle`` only breaks ties between
    patients of equal class balance, so different seeds give the same folds; cross-validation over seeds needs
    seeds that matter.)
    """
    table = _patients(frame)
    if not 2 <= n_folds <= len(table):
        raise SplitError(f"n_folds must be between 2 and the number of patients ({len(table)}), got {n_folds}")
    base = np.arange(len(table)) % n_folds
    groups = _best_assignment(base, table, n_folds, seed)
    ids = table["patient_id"].to_numpy()
    return [sorted(ids[groups == f].tolist(), key=int) for f in range(n_folds)]


def _best_assignment(base: np.ndarray, table: pd.DataFrame, n_groups: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = table["n"].to_numpy()
    idc = table["idc"].to_numpy()
    best, best_score = base, np.inf
    for _ in range(_CANDIDATES):
        candidate = rng.permutation(base)
        score = _imbalance(candidate, n, idc, n_groups)
        if score < best_score:
            best, best_score = candidate, score
    return best


def make_split(
    frame: pd.DataFrame, name: str = "patients", seed: int = 0, unlisted: Literal["train", "drop"] = "train"
) -> dict[str, list[str]]:
    """The named split: ``"janowczyk2016"`` or ``"patients"``.

    ``"janowczyk2016"`` is the published one (``unlisted`` as in :func:`janowczyk2016_split`), ``"patients"`` the
    seeded one, stratified 70/15/15.
    """
    if name == "janowczyk2016":
        return janowczyk2016_split(frame, unlisted=unlisted)
    if name == "patients":
        return patient_split(frame, seed=seed)
    raise SplitError(f"unknown split {name!r}; choose one of {', '.join(SPLIT_NAMES)}")


def resolve_split(
    frame: pd.DataFrame,
    split: str = "patients",
    seed: int = 0,
    test_patients: Sequence[str] | None = None,
    unlisted: Literal["train", "drop"] = "train",
) -> dict[str, list[str]]:
    """Patient ids per subset ``{"train", "val", "test"}``: the split a training run makes.

    With ``test_patients`` those patients are the test subset and the other patients are split into train and
    validation (``patients``: seeded and stratified; ``janowczyk2016``: the published lists minus the test ones).
    ``unlisted``: see :func:`janowczyk2016_split`.
    Raises :class:`TrainingDataError` naming unknown patient ids.
    """
    if not test_patients:
        return {k: list(v) for k, v in make_split(frame, split, seed=seed, unlisted=unlisted).items()}
    given = set(check_patient_ids(test_patients, "test patients"))
    unknown = sorted(given - set(frame["patient_id"]))  # before sorting by number: an id may not be one
    if unknown:
        raise TrainingDataError(
            f"test patients not in the dataset: {', '.join(unknown)}; check the ids against the patient folders."
        )
    test = sorted(given, key=int)
    rest = frame[~frame["patient_id"].isin(test)]
    if split == "janowczyk2016":
        published = janowczyk2016_split(rest, unlisted=unlisted)
        result = {"train": sorted(published["train"] + published["test"], key=int), "val": published["val"]}
    elif split == "patients":
        fractions = {"train": 1 - VAL_FRACTION_WITH_TEST_PATIENTS, "val": VAL_FRACTION_WITH_TEST_PATIENTS}
        result = patient_split(rest, fractions, seed=seed)
    else:
        raise TrainingDataError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_NAMES)}")
    return {"train": list(result["train"]), "val": list(result["val"]), "test": test}


def check_split(patients: Mapping[str, list[str]], split: str, frame: pd.DataFrame) -> None:
    """Refuse a split of ``frame`` that leaves a subset empty, with its cause (for the published split: unlisted ids).

    ``patients`` is what :func:`resolve_split` returned for the split named ``split``; raises
    :class:`TrainingDataError` naming the empty subsets and the fix.
    """
    empty = [name for name in SUBSETS if not patients.get(name)]
    if not empty:
        return
    n = frame["patient_id"].nunique()
    if split == "janowczyk2016":
        listed = set().union(*JANOWCZYK2016.values())
        outside = sorted(set(frame["patient_id"]) - listed, key=int)
        cause = (
            f"{len(outside)} of the {n} patients of this data are not in the published janowczyk2016 lists "
            f"(e.g. {', '.join(outside[:5])}), and none of the listed ones falls in {' or '.join(empty)}"
        )
        fix = "use --split patients, or give --test-patients"
    else:
        cause = f"the {n} patients are too few to fill every subset"
        fix = "use more patients"
    raise TrainingDataError(f"the split {split!r} leaves the {' and '.join(empty)} subset empty: {cause}; {fix}.")


def subsample_patches(frame: pd.DataFrame, max_patches: int | None, seed: int = 0) -> pd.DataFrame:
    """At most ``max_patches`` rows of the patch index ``frame``, the same share from every patient (and class).

    The rows are chosen at random but deterministically from ``seed`` and keep their order; the patient split is not
    affected. ``None`` (or a number of at least ``len(frame)``) returns ``frame`` itself.
    """
    if max_patches is None or max_patches >= len(frame):
        return frame
    if max_patches < 1:
        raise TrainingDataError(f"max_patches must be at least 1, got {max_patches}")
    share = max_patches / len(frame)
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    # Groups in a fixed order so the same frame and seed give the same rows.
    for _, rows in sorted(
        frame.groupby(["patient_id", "label"], sort=False).indices.items(), key=lambda kv: (int(kv[0][0]), kv[0][1])
    ):
        n = max(1, round(len(rows) * share))
        keep.append(rng.choice(rows, size=min(n, len(rows)), replace=False))
    chosen = np.sort(np.concatenate(keep))
    return frame.iloc[chosen].reset_index(drop=True)


def check_disjoint(split: Mapping[str, list[str]]) -> None:
    """Raise :class:`SplitError` naming the patients that are in more than one subset."""
    seen: dict[str, str] = {}
    for name, ids in split.items():
        for pid in ids:
            if pid in seen:
                raise SplitError(f"patient {pid} is in both {seen[pid]!r} and {name!r}")
            seen[pid] = name


def subset_of(frame: pd.DataFrame, split: Mapping[str, list[str]]) -> pd.Series:
    """The subset name of each row of ``frame`` (``None`` for patients outside the split)."""
    check_disjoint(split)
    lookup = {pid: name for name, ids in split.items() for pid in ids}
    return frame["patient_id"].astype(str).map(lookup).rename("subset")


def split_summary(frame: pd.DataFrame, split: Mapping[str, list[str]]) -> pd.DataFrame:
    """Patients, patches and IDC share per subset, for tables in notebooks and reports."""
    subset = subset_of(frame, split)
    rows = []
    for name, ids in split.items():
        part = frame[subset == name]
        rows.append(
            {
                "subset": name,
                "patients": len(ids),
                "patches": len(part),
                "idc": int((part["label"] == 1).sum()),
                "idc_fraction": float((part["label"] == 1).mean()) if len(part) else float("nan"),
            }
        )
    return pd.DataFrame(rows)
