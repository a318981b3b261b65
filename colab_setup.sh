#!/usr/bin/env bash
# Prepares a Google Colab runtime for the IDC notebooks.
#
# - installs idc_helpers (from this checkout, a regular install that carries the notebooks) and only those
#   requirements that the runtime lacks or has below our lower bound. What is installed already (TensorFlow,
#   Keras, OpenCV, pandas, ...) is never upgraded, downgraded or replaced: every installed distribution is passed
#   to pip as a constraint at its current version, so pip fails rather than change one;
# - tells whether Kaggle credentials are available (the Colab secrets KAGGLE_API_TOKEN, or KAGGLE_USERNAME and
#   KAGGLE_KEY; ~/.kaggle/access_token or kaggle.json), and what happens without them (an anonymous download,
#   then the synthetic demo data if Kaggle refuses it).
#
# Usage (the notebooks' setup cell does this on Colab):  bash colab_setup.sh
set -euo pipefail
cd "$(dirname "$0")"

python - <<'PY'
import importlib.metadata as metadata
import os
import subprocess
import sys
import tempfile

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
    # Pin what is installed: a missing requirement may not pull a new version of anything already there.
    installed = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
                        if d.metadata["Name"] and d.metadata["Name"].lower().replace("_", "-") != "idc-helpers"})
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
        pins.write("\n".join(installed) + "\n")
    print("Installing what this runtime lacks:", ", ".join(to_install))
    try:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-c", pins.name, *to_install])
    finally:
        os.unlink(pins.name)
else:
    print("Every requirement is already met by this runtime.")
# A regular (not editable) install: an editable one is only seen by interpreters started after it, and the
# notebook's kernel is already running.
subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "."])
PY

python - <<'PY'
try:
    import google.colab  # noqa: F401  - loaded, it makes the Colab secrets part of the look-up
except ImportError:
    pass
from idc_helpers.kaggle_credentials import find_credentials

source = find_credentials()
if source:
    print(f"Kaggle credentials found ({source}): the notebooks will download the real dataset.")
else:
    print(
        "No Kaggle credentials found: the notebooks will try an anonymous download of the real dataset (it is "
        "public) and use SYNTHETIC demo data if Kaggle refuses it. To add a token, create one at "
        "https://www.kaggle.com/settings (API, Create New Token), then in Colab open the key icon (Secrets) and "
        "add KAGGLE_API_TOKEN (or KAGGLE_USERNAME and KAGGLE_KEY) with notebook access."
    )
PY
