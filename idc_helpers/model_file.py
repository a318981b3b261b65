"""Model files (``.keras``) read as untrusted input: checked first, then loaded in Keras' safe mode.

A run folder is something students download and share, and a ``.keras`` file is a zip whose ``config.json`` names
the Python classes Keras builds. Older Keras versions let such a file run code while loading, even in safe mode
(CVE-2025-1550 up to 3.8, later bypasses through ``Lambda`` arguments and ``TFSMLayer`` up to 3.13.1). So before
Keras sees a file, :func:`check_model_file` reads the archive itself and accepts it only when

- it is a zip of the three members Keras writes (``config.json``, ``metadata.json``, ``model.weights.h5``), each
  of a sane size, with plain names;
- every object its config names is a Keras class of a kind a model is made of (a layer, a model, an initializer,
  a regularizer, a constraint, an optimizer, a learning-rate schedule, a loss, a metric, a dtype policy) from a
  ``keras`` module, or one of this package's registered classes; never a function, never ``Lambda`` (code) or
  ``TFSMLayer`` (another model loaded from a path), never a module outside Keras.

:func:`load_model_file` then loads it with ``safe_mode=True``, after importing :mod:`idc_helpers.models` so that
the package's own layers (:class:`~idc_helpers.models.TrainingAugmentation`) are known in any process. A refused
or unreadable file is a :class:`ModelFileError` (exit 2) naming the file and the entry. Legacy HDF5 models
(``.h5``), for which Keras ignores safe mode, are refused by name.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idc_helpers.errors import UserError

if TYPE_CHECKING:  # TensorFlow loads only when a model is read
    import keras

MEMBER_LIMITS = {"config.json": 8 << 20, "metadata.json": 1 << 20, "model.weights.h5": 1 << 30}
# Class names that Keras itself resolves without a module: the placeholders of a functional model's graph.
_GRAPH_PLACEHOLDERS = {"__keras_tensor__"}
# Keras classes that are layers but carry code or load other files.
_REFUSED_CLASSES = {"Lambda", "TFSMLayer"}
_PACKAGE_PREFIX = "idc_helpers>"
_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class ModelFileError(UserError, ValueError):
    """A model file that is not a ``.keras`` archive this package can load safely."""


def _refuse(path: Path, why: str) -> ModelFileError:
    return ModelFileError(
        f"Refusing the model file {path}: {why}. Load only models written by "
        "`python -m idc_helpers train`, or train one yourself."
    )


def _read_config(path: Path) -> dict[str, Any]:
    if path.suffix != ".keras":
        raise _refuse(path, "only Keras 3 '.keras' files are read (legacy .h5 models can run code while loading)")
    if not path.is_file():
        raise ModelFileError(f"No model file at {path}; check the path or train a run first.")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            names = sorted(info.filename for info in members)
            if names != sorted(MEMBER_LIMITS):
                raise _refuse(path, f"it holds {names}, not the members Keras writes ({sorted(MEMBER_LIMITS)})")
            for info in members:
                if info.file_size > MEMBER_LIMITS[info.filename]:
                    raise _refuse(
                        path,
                        f"its {info.filename} is {info.file_size:,} bytes, over the "
                        f"{MEMBER_LIMITS[info.filename]:,} allowed",
                    )
            config = json.loads(archive.read("config.json").decode("utf-8"))
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _refuse(path, f"it is not a readable .keras archive ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict):
        raise _refuse(path, "its config.json is not a model description")
    return config


def _objects(node: Any, where: str = "config") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every serialised object (a mapping with ``class_name``) in a config, with where it sits."""
    if isinstance(node, dict):
        if "class_name" in node:
            yield where, node
        for key, value in node.items():
            yield from _objects(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _objects(value, f"{where}[{i}]")


def _safe_bases() -> tuple[type, ...]:
    import keras

    return (
        keras.layers.Layer,
        keras.Model,
        keras.initializers.Initializer,
        keras.regularizers.Regularizer,
        keras.constraints.Constraint,
        keras.optimizers.Optimizer,
        keras.optimizers.schedules.LearningRateSchedule,
        keras.losses.Loss,
        keras.metrics.Metric,
        keras.DTypePolicy,
    )


def _check_object(entry: dict[str, Any], safe_bases: tuple[type, ...]) -> str | None:
    """Why ``entry`` is refused, or None when it names a class a model is made of (a subclass of ``safe_bases``)."""
    import keras

    class_name, module = entry.get("class_name"), entry.get("module")
    registered = entry.get("registered_name")
    if class_name in _GRAPH_PLACEHOLDERS and module is None:
        return None
    if not isinstance(class_name, str) or not _CLASS_NAME.fullmatch(class_name):
        return f"class name {class_name!r} is not a class name"
    if class_name in _REFUSED_CLASSES:
        return f"{class_name} layers carry code or load other files"
    if isinstance(registered, str) and registered.startswith(_PACKAGE_PREFIX):
        found = keras.saving.get_registered_object(registered)
        if found is None or found.__module__ != module or found.__name__ != class_name:
            return f"{registered!r} is not a class of this package"
        return None
    if not isinstance(module, str) or not _MODULE_NAME.fullmatch(module) or module.split(".")[0] != "keras":
        return f"{class_name!r} comes from module {module!r}, not from Keras"
    try:
        found = getattr(importlib.import_module(module), class_name)
    except (ImportError, AttributeError):
        return f"Keras has no {module}.{class_name}"
    if not inspect.isclass(found) or not issubclass(found, safe_bases):
        return f"{module}.{class_name} is not a layer, model, optimizer, loss, metric or weight setting"
    return None


def check_model_file(path: str | os.PathLike[str]) -> None:
    """Raise :class:`ModelFileError` unless ``path`` is a ``.keras`` archive naming only safe classes.

    Safe classes are those a model is made of (see the module's docstring). Reads the archive's config; runs nothing
    from it.
    """
    import idc_helpers.models  # noqa: F401  - registers the package's classes before they are looked up

    path = Path(path)
    safe_bases = _safe_bases()
    for where, entry in _objects(_read_config(path)):
        why = _check_object(entry, safe_bases)
        if why:
            raise _refuse(path, f"{why} (at {where})")


def load_model_file(path: str | os.PathLike[str], *, compile: bool = False) -> keras.Model:
    """The model in ``path`` (a ``.keras`` file), checked by :func:`check_model_file` and loaded in safe mode.

    Works in any process, whatever placement of augmentation and mixed-precision policy it was trained with.
    ``compile=True`` restores its optimizer state too (a checkpoint to resume).
    """
    import keras

    path = Path(path)
    check_model_file(path)  # also registers the package's layers and losses, which Keras needs to load the model
    try:
        return keras.models.load_model(path, compile=compile, safe_mode=True)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(
            f"The model file {path} cannot be loaded ({type(exc).__name__}: {detail[:300]}); "
            "it may be damaged or from another version of this package: train it again."
        ) from None
