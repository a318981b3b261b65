"""A run loads anywhere it was saved, whatever placement of augmentation and precision trained it.

Every door (`predict`, `evaluate`, `slide`, `run_folder.load_run`, `train --resume`) opens it in a fresh process,
one that never defined the model's layers. What a GPU does by default (augmentation inside the model, mixed
precision) is forced here on the CPU through the same environment variables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from idc_helpers import checkpoints
from idc_helpers.run_folder import partial_dir
from idc_helpers.training import train

pytestmark = pytest.mark.slow

# The settings a run can be trained with; "cpu" is what a CPU gets, the others what a GPU gets (float16 on a
# T4-class GPU, bfloat16 from compute capability 8.0 on).
SETTINGS = {
    "cpu": {"IDC_AUGMENT_ON": "pipeline", "IDC_MIXED_PRECISION": "0"},
    "model-augment": {"IDC_AUGMENT_ON": "model", "IDC_MIXED_PRECISION": "0"},
    "bfloat16": {"IDC_AUGMENT_ON": "model", "IDC_MIXED_PRECISION": "bfloat16"},
    "float16": {"IDC_AUGMENT_ON": "model", "IDC_MIXED_PRECISION": "float16"},
}
TRAIN = {"model_name": "idc_net", "epochs": 2, "batch_size": 32, "seed": 0, "augment": "mild", "verbose": 0}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "idc_helpers", *args], env=env, capture_output=True, text=True, timeout=600
    )


def _interrupted_run(demo_dir: Path, cache_dir: Path, out: Path, setting: dict[str, str]) -> Path:
    """Train ``out`` in this process with ``setting``, stopped right after the checkpoint of epoch 1 of 2."""
    real = checkpoints.save_checkpoint

    def stop_after_epoch_1(folder, model, best_weights, state):
        real(folder, model, best_weights, state)
        if state.epochs_done == 1:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        for name, value in setting.items():
            patch.setenv(name, value)
        patch.setattr(checkpoints, "save_checkpoint", stop_after_epoch_1)
        with pytest.raises(KeyboardInterrupt):
            train(demo_dir, out, cache_dir=cache_dir, **TRAIN)
    assert (partial_dir(out) / "checkpoint.json").is_file() and not out.exists()
    return out


@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_door_opens_the_run_in_a_fresh_process(name, demo_dir, cache_dir, tmp_path):
    setting = SETTINGS[name]
    run_dir = _interrupted_run(demo_dir, cache_dir, tmp_path / name, setting)

    # train --resume, in a process that never built the model: the checkpoint holds the model's own layers.
    # The environment now says "CPU": a run computes as it was started, whatever the resuming machine would pick.
    resumed = _cli(
        "train",
        "--resume",
        str(run_dir),
        "--cache-dir",
        str(cache_dir),
        env={"IDC_AUGMENT_ON": "pipeline", "IDC_MIXED_PRECISION": "0"},
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stdout and "after epoch 1 of 2" in resumed.stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["augment_on"] == setting["IDC_AUGMENT_ON"]
    expected_policy = {"0": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
    assert config["precision_policy"] == expected_policy[setting["IDC_MIXED_PRECISION"]]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs_run"] == 2

    preds = tmp_path / f"{name}.csv"
    predicted = _cli(
        "predict", "--run", str(run_dir), "--data-dir", str(demo_dir), "--subset", "test", "--out", str(preds)
    )
    assert predicted.returncode == 0, predicted.stderr
    table = pd.read_csv(preds)
    assert len(table) > 0 and table["prob_idc"].between(0, 1).all()

    report = tmp_path / f"{name}.json"
    evaluated = _cli("evaluate", "--predictions", str(preds), "--out", str(report))
    assert evaluated.returncode == 0, evaluated.stderr
    assert 0.0 <= json.loads(report.read_text())["metrics"]["roc_auc"]["value"] <= 1.0

    slide = tmp_path / f"{name}.png"
    drawn = _cli(
        "slide", "--predictions", str(preds), "--patient", str(table["patient_id"].iloc[0]), "--out", str(slide)
    )
    assert drawn.returncode == 0, drawn.stderr
    assert slide.stat().st_size > 0

    # run.load_run, as notebooks 03 and 04 call it: the same probabilities as `predict` wrote.
    script = (
        "import sys, numpy as np, pandas as pd\n"
        "from idc_helpers.run_folder import load_run\n"
        "from idc_helpers.decode import read_patch\n"
        "from idc_helpers.models import AUGMENT_LAYER, uses_mixed_precision\n"
        "run = load_run(sys.argv[1])\n"
        "table = pd.read_csv(sys.argv[2]).head(16)\n"
        "probs = run.model.predict(np.stack([read_patch(p) for p in table['path']]), verbose=0)[:, 1]\n"
        "print(uses_mixed_precision(run.model), any(l.name == AUGMENT_LAYER for l in run.model.layers),\n"
        "      float(np.max(np.abs(probs - table['prob_idc'].to_numpy()))))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script, str(run_dir), str(preds)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert loaded.returncode == 0, loaded.stderr
    mixed, augments, difference = loaded.stdout.split()
    assert mixed == str(setting["IDC_MIXED_PRECISION"] != "0")
    assert augments == str(setting["IDC_AUGMENT_ON"] == "model")
    assert float(difference) < 1e-3  # the predictions file holds rounded probabilities


def _probabilities(demo_dir: Path, cache_dir: Path, out: Path, precision: str) -> tuple[np.ndarray, dict]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IDC_AUGMENT_ON", "model")
        patch.setenv("IDC_MIXED_PRECISION", precision)
        # The best epoch's weights, as docs/colab.md measured them (averaged weights: see there).
        result = train(demo_dir, out, cache_dir=cache_dir, **{**TRAIN, "epochs": 3}, averaging="none")
    from idc_helpers.loader import load_patches
    from idc_helpers.patch_index import build_index

    frame = build_index(demo_dir).frame.sort_values("path").reset_index(drop=True)
    images = load_patches(frame, cache_dir=cache_dir).images
    return result.model.predict(images, verbose=0)[:, 1], result.metrics["validation"]


def test_mixed_precision_training_agrees_with_float32(demo_dir, cache_dir, tmp_path, capsys):
    """Mixed-precision training ends with nearly the same model as float32 training.

    The same small training (idc_net, 3 epochs, same seed, augmentation in the model) in float32 and in each
    mixed-precision policy: the IDC probability of every patch agrees closely. The bounds are a few times what was
    measured (docs/colab.md gives the figures). The validation scores are printed, not compared: on this
    one-patient validation set a shift of 0.005 reorders near-tied patches.
    """
    reference, reference_scores = _probabilities(demo_dir, cache_dir, tmp_path / "float32", "0")
    for precision, mean_bound, max_bound in (("float16", 0.01, 0.03), ("bfloat16", 0.05, 0.15)):
        probs, scores = _probabilities(demo_dir, cache_dir, tmp_path / precision, precision)
        difference = np.abs(probs - reference)
        with capsys.disabled():
            print(
                f"\n{precision} vs float32 on {len(probs)} patches: mean |dp| {difference.mean():.4f}, "
                f"max {difference.max():.4f}; validation ROC AUC {scores['roc_auc']:.4f} vs "
                f"{reference_scores['roc_auc']:.4f}"
            )
        assert difference.mean() < mean_bound and difference.max() < max_bound, precision
