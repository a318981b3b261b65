#!/usr/bin/env bash
# Prepares a Google Colab runtime for the IDC notebooks.
#
# - installs idc_helpers (from this checkout) and only those requirements that Colab lacks or has in a
#   version below our lower bound: what Colab already ships (TensorFlow, Keras, OpenCV, pandas, ...) is never
#   downgraded or replaced;
# - tells whether Kaggle credentials are available (Colab secrets KAGGLE_USERNAME and KAGGLE_KEY, or a
#   kaggle.json), and how to add them if not.
#
# Usage (the notebooks' setup cell does this on Colab):  bash colab_setup.sh
set -euo pipefail
cd "$(dirname "$0")"

python - <<'PY'
import importlib.metadata as metadata
import subprocess
import sys

from packaging.requirements import Requirement

# A requirement counts as met by any of these distributions: Colab ships opencv-python, and installing the
# headless wheel beside it would overwrite the same cv2 module.
ALTERNATIVES = {"opencv-python-headless": ["opencv-python", "opencv-contrib-python", "opencv-contrib-python-headless"]}

to_install = []
with open("requirements.txt", encoding="utf-8") as handle:
    for line in handle:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        met = False
        for name in [requirement.name, *ALTERNATIVES.get(requirement.name, [])]:
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
            met = requirement.specifier.contains(version, prereleases=True)
            break
        if not met:
            to_install.append(line)

if to_install:
    print("Installing what this runtime lacks:", ", ".join(to_install))
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *to_install])
else:
    print("Every requirement is already met by this runtime.")
# A regular (not editable) install: an editable one is only seen by interpreters started after it, and the
# notebook's kernel is already running.
subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "."])
PY

python - <<'PY'
from idc_helpers.kaggle_download import find_credentials

source = find_credentials()
if source:
    print(f"Kaggle credentials found ({source}): the notebooks will download the real dataset.")
else:
    print(
        "No Kaggle credentials found. To use the real dataset, create an API token at "
        "https://www.kaggle.com/settings (Create New Token), then in Colab open the key icon (Secrets) and add "
        "KAGGLE_USERNAME and KAGGLE_KEY with notebook access. Without them the notebooks run on SYNTHETIC demo data."
    )
PY
