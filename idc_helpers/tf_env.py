"""TensorFlow's process-wide settings for an entry point: quiet start-up, oneDNN kernels for the commands that train.

These are environment variables that TensorFlow reads once, when it is imported, and they hold for the whole
process, so only entry points (the command line, ``python -m idc_helpers.bench``) call :func:`quiet_tensorflow`,
before anything imports TensorFlow; library calls never do. A user's own value of either variable is kept.
"""

from __future__ import annotations

import os

from idc_helpers.colab import import_tensorflow_quietly

__all__ = ["TENSORFLOW_COMMANDS", "quiet_tensorflow"]

#: The commands that run a model: TensorFlow is imported for them up front, quietly, with oneDNN on.
TENSORFLOW_COMMANDS = ("train", "predict")


def quiet_tensorflow(command: str | None = None) -> None:
    """Hide TensorFlow's C++ start-up lines unless the user set ``TF_CPP_MIN_LOG_LEVEL``; call before importing it.

    The lines are CUDA probing on a CPU machine and oneDNN notices. TensorFlow 2.19+ prints some of them before its
    logging reads that variable, so for a ``command`` that needs TensorFlow (``train``, ``predict``, and
    ``"bench"`` for the benchmarks, which keep TensorFlow's own oneDNN default) it is imported here with stderr
    silenced for the time of the import. ``train`` and ``predict`` also switch on oneDNN's CPU kernels unless
    ``TF_ENABLE_ONEDNN_OPTS`` is set.
    """
    if command in TENSORFLOW_COMMANDS:
        # oneDNN's CPU kernels train 2-4x faster on a CPU; TensorFlow enables them by itself only on CPUs with
        # AVX512-VNNI/BF16/AMX. The variable counts only before TensorFlow is imported; a user's "0" stays.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if command in (*TENSORFLOW_COMMANDS, "bench"):
        import_tensorflow_quietly()
