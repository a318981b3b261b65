"""Helpers for the IDC notebook series: detect Invasive Ductal Carcinoma in 50x50 breast-histology patches.

Modules, one job each, in the order data flows (a module imports only modules listed before it;
``tests/test_layout.py`` checks that no import goes back, function bodies included):

- ``errors``, ``atomic``, ``disk``, ``locks``: the error classes every command reports the same way; atomic files and
  folders and checks of an output path; free space and byte counts for messages; the package's one file lock.
- ``validation``: every check of user input (numbers, names, tables, parameter files), shared by the command line,
  the notebooks and a resumed run.
- ``bootstrap``, ``metrics``, ``reporting``: resampling patients for intervals; every score (F1, balanced accuracy,
  AUCs, curves, threshold search), the only module that calls scikit-learn's scorers; reports and outcome tables.
- ``png``: the one PNG header reader (an image's size from its first 33 bytes, checked).
- ``kaggle_errors``, ``kaggle_credentials``, ``kaggle_archive``, ``kaggle_download``: the Kaggle dataset's errors,
  credentials, archive checks and the transfer into a complete, verified folder.
- ``synthetic_tissue``, ``demo_data``: drawing synthetic slides; the demo dataset in the Kaggle layout.
- ``patch_files``, ``patch_index``: what one patch file must be (name, grid position, PNG header, problem kinds);
  the index, one row per patch file (path, patient_id, x, y, label), with every problem found.
- ``decode``, ``patch_cache``, ``loader``: patch files to arrays; the decoded-patch cache on disk, shared safely by
  several processes; ``load_patches``, one ``(N, 50, 50, 3) uint8`` array for a table of patches.
- ``datasource``, ``health``: which data a run uses (argument, ``IDC_DATA_DIR``, ``./data``, Kaggle, demo), with
  the synthetic-data notice whenever it is the demo; the dataset's health report.
- ``stain``: stain colour and per-slide normalisation.
- ``splits``: patient-level splits (the published Janowczyk & Madabhushi 2016 split, seeded splits, k-fold).
- ``pipeline``, ``models``, ``model_file``: ``tf.data`` input pipelines with augmentation; ``seed_cnn`` and
  ``idc_net``; model files checked before Keras loads them.
- ``probabilities``: a model's IDC probabilities of an array of patches, with test-time augmentation.
- ``run_folder``: the run folder ``train`` writes and everything downstream reads, and the ``Run`` it describes.
- ``slide_context``: slide-context smoothing of probabilities from the patch coordinates.
- ``training_data``, ``selection``, ``checkpoints``, ``run_config``, ``training``: the data of a run; what it
  chooses on its validation patients (best epoch, threshold, slide context); the checkpoint after every epoch;
  its ``config.json``; ``train`` itself.
- ``predictions``: the predictions table (one row per patch), the hand-off to everything downstream.
- ``gradcam``, ``plots``, ``patch_plots``, ``slides``, ``slide_plots``: Grad-CAM maps, charts, patch grids, slide
  mosaics and their figures.
- ``compare``, ``examples``, ``threshold_slider``: a second model beside a run; which patches a figure shows; the
  threshold slider of notebooks 03 and 04.
- ``notebook_runner``, ``colab``: the notebook series end to end (the notebooks ship inside the package, so a
  regular install runs them from any folder); the notebooks' setup on Colab.
- ``tf_env``, ``commands``, ``cli``: TensorFlow's process-wide settings for entry points; the command handlers;
  the command line's parsing and exit codes. ``bench/`` holds the benchmarks (``python -m idc_helpers.bench``).

Importing the package has no side effects and does not import TensorFlow.
"""

__version__ = "0.1.0"
KAGGLE_DATASET = "paultimothymooney/breast-histopathology-images"
# The Kaggle dataset's size: a copy with exactly these counts is complete.
KAGGLE_PATIENTS = 279
KAGGLE_PATCHES = 277_524
PATCH_SIZE = 50
