#!/usr/bin/env bash
# The project's test command (README, "Run the tests"; CI runs it through .ci/run):
#  0. ruff: the formatter (checked, not applied) and the linter over the whole tree, notebooks included;
#  1. the whole pytest suite, the `slow` tests included (the notebook runner's smoke series, the real-sample
#     quality test): unit tests on generated data, real-data tests on ../shared/data/idc_sample when present,
#     the Kaggle download against a local server, the commands printed in README.md and docs/, a regular install;
#  2. the four notebooks, in order, through nbval: papermill first writes them with small CI parameters
#     (notebooks/params/ci.yaml) and the run folder chained from 02 to 03 and 04, then `pytest --nbval-lax`
#     executes every cell and compares the cells marked `# NBVAL_CHECK_OUTPUT`. A failing cell fails the run.
# Extra arguments go to the first pytest call (e.g. `-m "not realdata"`).
set -euo pipefail
cd "$(dirname "$0")/.."
export MPLBACKEND=Agg
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The decoded-patch cache and demo data go to a temporary folder: ../shared is read-only in CI.
export IDC_CACHE_DIR="${IDC_CACHE_DIR:-$work/cache}"

python -m ruff format --check .  # one layout (pyproject.toml, [tool.ruff])
python -m ruff check .  # the linter's rules, docstrings included (pyproject.toml, [tool.ruff.lint])
python -m pytest -q "$@"

sample="../shared/data/idc_sample"
data_args=()
if [ -d "$sample" ]; then
  data_args=(--data-dir "$sample")
else
  echo "Real sample $sample not found: the notebooks run on the synthetic demo data."
fi
python -m idc_helpers run-notebooks --prepare-only --params notebooks/params/ci.yaml --out "$work/notebooks" "${data_args[@]}"
python -m pytest -p no:cacheprovider --nbval-lax --nbval-current-env "$work"/notebooks/*/notebooks/
