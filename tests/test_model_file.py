"""Model files are untrusted input: a crafted ``.keras`` file or checkpoint state runs no code through any door."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from idc_helpers.model_file import ModelFileError, check_model_file, load_model_file
from idc_helpers.run_folder import RunFolderError, checkpoint_file, checkpoint_names, partial_dir

EVIL_MODULE = """
import keras
from pathlib import Path

Path({marker!r}).write_text("imported")


class Evil(keras.layers.Layer):
    def __init__(self, **kwargs):
        Path({marker!r}).write_text("built")
        super().__init__(**kwargs)

    def call(self, inputs):
        return inputs
"""


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    from idc_helpers.models import build_model, compile_model

    path = tmp_path_factory.mktemp("model") / "model.keras"
    compile_model(build_model("seed_cnn", mixed_precision=False)).save(path)
    return path


def _rewrite(source: Path, dest: Path, edit=None, extra: dict[str, bytes] | None = None) -> Path:
    """A copy of the model file ``source`` whose config.json went through ``edit`` (and with ``extra`` members)."""
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    if edit:
        config = json.loads(members["config.json"])
        edit(config)
        members["config.json"] = json.dumps(config).encode()
    members.update(extra or {})
    with zipfile.ZipFile(dest, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return dest


def _layer(config: dict, name: str) -> dict:
    return next(layer for layer in config["config"]["layers"] if layer["config"]["name"] == name)


def _with_layer(module, class_name, registered=None, **config):
    def edit(model_config):
        layer = _layer(model_config, "rescale")
        layer.update(module=module, class_name=class_name, registered_name=registered)
        layer["config"].update(config)

    return edit


CRAFTED = {
    "module outside Keras": _with_layer("evil_layer", "Evil"),
    "os.system": _with_layer("os", "system"),
    "Lambda with code": _with_layer(
        "keras.layers", "Lambda", function={"class_name": "__lambda__", "config": {"code": "AAAA"}}
    ),
    "TFSMLayer": _with_layer("keras.layers", "TFSMLayer", filepath="/tmp/elsewhere"),
    "a Keras function": _with_layer("keras.utils", "get_file"),
    "a function by name": _with_layer("keras.models", "function", config="load_model"),
    "another package's registration": _with_layer("evil_layer", "Evil", registered="idc_helpers>Evil"),
    "a dotted class name": _with_layer("keras", "layers.Dense.__init__"),
}


def test_a_model_written_by_keras_passes_and_loads(model_path):
    check_model_file(model_path)
    assert load_model_file(model_path).count_params() == 105_234


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_configs_are_refused(case, model_path, tmp_path):
    crafted = _rewrite(model_path, tmp_path / "model.keras", CRAFTED[case])
    with pytest.raises(ModelFileError, match="Refusing the model file"):
        load_model_file(crafted)


def test_archives_other_than_keras_writes_are_refused(model_path, tmp_path):
    with pytest.raises(ModelFileError, match="members Keras writes"):
        check_model_file(_rewrite(model_path, tmp_path / "a.keras", extra={"../escape.py": b"x"}))
    legacy = tmp_path / "model.h5"
    shutil.copy(model_path, legacy)
    with pytest.raises(ModelFileError, match=r"legacy \.h5"):
        check_model_file(legacy)
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match=r"not a readable \.keras archive"):
        check_model_file(junk)


def test_checkpoint_states_name_only_checkpoint_files_inside_the_run(tmp_path):
    names = checkpoint_names(3)
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    assert checkpoint_file(tmp_path, names, "model") == tmp_path / names["model"]
    outside = tmp_path.parent / "outside.keras"
    outside.write_bytes(b"x")
    for bad in (str(outside), "../outside.keras", "checkpoint-003.keras/..", "model.keras", 7, None):
        with pytest.raises(RunFolderError, match="not a checkpoint file name"):
            checkpoint_file(tmp_path, {**names, "model": bad}, "model")
    (tmp_path / names["model"]).unlink()
    (tmp_path / names["model"]).symlink_to(outside)
    with pytest.raises(RunFolderError, match="not a regular file"):
        checkpoint_file(tmp_path, names, "model")


@pytest.mark.slow
def test_no_door_runs_a_crafted_model(model_path, tmp_path):
    """Model files naming a class of an importable module are refused before the module runs.

    A run folder and an interrupted run whose model files name a layer class of a module that writes a marker file
    when imported or built: predict, load_run and train --resume refuse them in one line, exit 2, and the marker never
    appears.
    """
    from idc_helpers.demo_data import write_demo_dataset
    from idc_helpers.training import train

    marker = tmp_path / "marker"
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "evil_layer.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    # TF_CPP_MIN_LOG_LEVEL unset, as for a user: the CLI then hides TensorFlow's start-up lines itself.
    env = {
        **{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
        "PYTHONPATH": os.pathsep.join([str(modules), os.environ.get("PYTHONPATH", "")]),
    }
    # The module is live: anything that imported it would leave the marker.
    subprocess.run([sys.executable, "-c", "import evil_layer"], env=env, check=True)
    assert marker.read_text() == "imported"
    marker.unlink()

    data = write_demo_dataset(tmp_path / "demo", n_patients=6, seed=0, grid=(8, 6))
    run_dir = train(
        data, tmp_path / "run", model_name="seed_cnn", epochs=1, batch_size=32, verbose=0, cache_dir=tmp_path / "cache"
    ).run_dir
    _rewrite(run_dir / "model.keras", run_dir / "crafted.keras", CRAFTED["module outside Keras"])
    os.replace(run_dir / "crafted.keras", run_dir / "model.keras")
    partial = partial_dir(tmp_path / "resumable")
    partial.mkdir()
    shutil.copy(run_dir / "config.json", partial / "config.json")
    names = checkpoint_names(1)
    shutil.copy(run_dir / "model.keras", partial / names["model"])
    (partial / names["best"]).write_bytes(b"")
    (partial / "checkpoint.json").write_text(json.dumps({**names, "epochs_done": 1}))

    doors = {
        "predict": [
            "-m",
            "idc_helpers",
            "predict",
            "--run",
            str(run_dir),
            "--data-dir",
            str(data),
            "--out",
            str(tmp_path / "p.csv"),
        ],
        "load_run": ["-c", f"from idc_helpers.run_folder import load_run; load_run({str(run_dir)!r})"],
        "resume": [
            "-m",
            "idc_helpers",
            "train",
            "--resume",
            str(tmp_path / "resumable"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
    }
    for door, args in doors.items():
        done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
        assert not marker.exists(), door
        if door == "load_run":
            assert done.returncode == 1 and "ModelFileError: Refusing the model file" in done.stderr, door
        else:
            assert done.returncode == 2, (door, done.stderr)
            assert done.stderr.startswith("error: Refusing the model file"), (door, done.stderr)
            assert len(done.stderr.strip().splitlines()) == 1, (door, done.stderr)
    assert not (tmp_path / "p.csv").exists() and (partial / "config.json").is_file()

    # A checkpoint state pointing outside the run folder is refused before anything is read.
    (partial / "checkpoint.json").write_text(
        json.dumps({"model": str(model_path), "best": names["best"], "epochs_done": 1})
    )
    done = subprocess.run([sys.executable, *doors["resume"]], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "not a checkpoint file name" in done.stderr, done.stderr
