"""The validation module: numbers, names, tables, parameter files, a resumed run's config; one rule per setting."""

from __future__ import annotations

import argparse
import datetime
import math

import numpy as np
import pandas as pd
import pytest

from idc_helpers.validation import (
    NUMBERS,
    InvalidInputError,
    arg_type,
    check_patient_ids,
    check_plain_data,
    check_run_config,
    check_table,
    check_value,
    patient_list,
    user_path,
)


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("epochs", "3", 3),
        ("epochs", 3.0, 3),
        ("batch_size", np.int64(16), 16),
        ("seed", "0", 0),
        ("threshold", "0", 0.0),
        ("threshold", "1", 1.0),
        ("threshold", 0.25, 0.25),
        ("label_smoothing", "0.1", 0.1),
        ("bootstrap", "0", 0),
    ],
)
def test_numbers_in_range_are_taken(name, value, expected):
    assert check_value(name, value) == expected and type(check_value(name, value)) is type(expected)


@pytest.mark.parametrize(
    "name, value",
    [
        ("epochs", "0"),
        ("epochs", "-3"),
        ("epochs", "1.5"),
        ("epochs", "three"),
        ("epochs", True),
        ("epochs", None),
        ("batch_size", -5),
        ("max_patches", 0),
        ("seed", -1),
        ("threshold", "nan"),
        ("threshold", "inf"),
        ("threshold", "-1"),
        ("threshold", 1.0000001),
        ("label_smoothing", 1.0),
        ("bootstrap", "-1"),
        ("learning_rate", float("inf")),
        ("epochs", "1e400"),
    ],
)
def test_numbers_out_of_range_or_of_another_type_are_refused_naming_value_source_and_rule(name, value):
    with pytest.raises(InvalidInputError) as info:
        check_value(name, value, "config.json")
    message = str(info.value)
    assert f"{name.replace('_', '-')} {value!r} (config.json) is not allowed: use {NUMBERS[name].allowed()}" == message


def test_argparse_types_refuse_in_argparse_terms():
    parse = arg_type("epochs")
    assert parse("4") == 4
    with pytest.raises(argparse.ArgumentTypeError, match="'0' is not allowed: use a whole number of at least 1"):
        parse("0")
    assert patient_list("8863,10253") == ["8863", "10253"]
    for text in ("8863, 10253", "8863,", "x8863", "8863\n"):
        with pytest.raises(argparse.ArgumentTypeError, match="digits of a patient folder's name"):
            patient_list(text)


def test_patient_ids_are_matched_whole():
    assert check_patient_ids([8863, "10253"], "here") == ["8863", "10253"]
    for bad in (" 8863", "8863 ", "8863\n", "88-63", "", "9" * 65):
        with pytest.raises(InvalidInputError, match=r"patient id .* \(here\) is not allowed"):
            check_patient_ids([bad], "here")


def _config(**changes):
    config = {
        "model": "seed_cnn",
        "augment": "mild",
        "split": {"name": "patients"},
        "epochs": 3,
        "batch_size": 32,
        "patience": 4,
        "seed": 0,
        "model_seed": 0,
        "label_smoothing": 0.0,
        "learning_rate": 0.001,
        "steps_per_epoch": None,
        "max_patches": None,
    }
    return {**config, **changes}


def test_a_run_config_passes_the_command_lines_checks():
    rules = {"models": ("seed_cnn", "idc_net"), "augments": ("none", "mild"), "splits": ("patients",)}
    check_run_config(_config(), "config.json", **rules)
    for changes, named in (
        ({"epochs": -1}, "epochs -1"),
        ({"model": "seed_cnn "}, "model 'seed_cnn '"),
        ({"augment": "MILD"}, "augment 'MILD'"),
        ({"split": {"name": "random"}}, "split 'random'"),
        ({"steps_per_epoch": 0}, "steps-per-epoch 0"),
        ({"learning_rate": -1}, "learning-rate -1"),
        ({"weighting": "slide"}, "weighting 'slide'"),
    ):
        with pytest.raises(InvalidInputError, match=f"{named} \\(config.json\\) is not allowed"):
            check_run_config(_config(**changes), "config.json", **rules)
    with pytest.raises(InvalidInputError, match="not a run configuration"):
        check_run_config([1, 2], "config.json", **rules)


def _table(**changes) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "path": ["/d/1/0/a.png", "/d/1/1/b.png"],
            "patient_id": ["1", "1"],
            "x": [1, 51],
            "y": [1, 1],
            "label": [0, 1],
            "prob_idc": [0.2, 0.9],
            "pred": [0, 1],
        }
    )
    return table.astype(dict.fromkeys(changes, object)).assign(**changes) if changes else table


def test_a_good_table_comes_back_with_numeric_columns_as_numbers():
    checked = check_table(_table(x=["1", "51"], label=[0.0, 1.0]), ("x", "label"), "t.csv")
    assert checked["x"].dtype == np.int64 and checked["label"].dtype == np.int8
    assert checked["x"].tolist() == [1, 51] and checked["label"].tolist() == [0, 1]


@pytest.mark.parametrize(
    "column, values, shown",
    [
        ("prob_idc", [0.2, -5], "-5.0"),
        ("prob_idc", [0.2, math.nan], "nan"),
        ("prob_idc", [0.2, "high"], "'high'"),
        ("label", [0, -1], "-1"),
        ("pred", [0, 7], "7"),
        ("x", [1, "abc"], "'abc'"),
        ("x", [1, 0], "0"),
        ("y", [1, 2.5], "2.5"),
        ("patient_id", ["1", 1], "1"),
        ("patient_id", ["1", "1 "], "'1 '"),
        ("path", ["/a.png", None], "nan"),
    ],
)
def test_a_bad_value_is_named_with_its_file_column_and_row(column, values, shown):
    with pytest.raises(InvalidInputError) as info:
        check_table(_table(**{column: values}), ("path",), "t.csv", first_row=10)
    assert str(info.value).startswith(
        f"t.csv: column {column!r} row 11 holds {shown} (1 bad row(s) in all); the column must hold"
    )


def test_missing_columns_are_named():
    with pytest.raises(InvalidInputError, match=r"t\.csv: missing column\(s\) label, x; the table has path"):
        check_table(pd.DataFrame({"path": ["a"]}), ("label", "x"), "t.csv")


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        3,
        0.5,
        "text",
        [1, "a", None],
        {"a": {"b": [1.5]}},
    ],
)
def test_plain_data_is_accepted(value):
    check_plain_data(value, "p.yaml: X")


@pytest.mark.parametrize(
    "value, named",
    [
        (datetime.date(2024, 1, 1), "datetime.date(2024, 1, 1) (a YAML date)"),
        (b"\x00", "b'\\x00' (a YAML bytes)"),
        ({1, 2}, "(a YAML set)"),
        ((1, 2), "(a YAML tuple)"),
        (math.inf, "inf is not allowed"),
        ({"a": [object()]}, "p.yaml: X.a[0]: <object object"),
        ({3: 1}, "the key 3 is not allowed"),
    ],
)
def test_anything_but_plain_data_is_refused(value, named):
    with pytest.raises(InvalidInputError, match=r"^p\.yaml: X") as info:
        check_plain_data(value, "p.yaml: X")
    assert named in str(info.value)


def test_a_home_folder_that_does_not_exist_is_named():
    with pytest.raises(InvalidInputError, match="IDC_CACHE_DIR '~nosuchuser-idc/x': the home folder in it is not"):
        user_path("~nosuchuser-idc/x", "IDC_CACHE_DIR")


def test_the_command_line_loads_without_numpy_or_pandas():
    """A refusal of a number is immediate: the command line imports the validation module, not the table stack."""
    import subprocess
    import sys

    code = "import sys, idc_helpers.cli; print('numpy' in sys.modules, 'pandas' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "False"], done.stderr
