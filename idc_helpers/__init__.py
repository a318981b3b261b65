"""Helpers for the IDC notebook series: detect Invasive Ductal Carcinoma in 50x50 breast-histology patches.

Modules, one concern each:

- ``errors``, ``atomic``: the error classes every command reports the same way; atomic files and folders.
- ``validation``: every check of user input (numbers, names, tables, parameter files), shared by the command line,
  the notebooks and a resumed run.
- ``png``: the PNG header reader (an image's size from its first 33 bytes, checked) the download and the index share.
- ``kaggle_download``: fetch the Kaggle dataset (anonymously where allowed), verified, into a complete folder.
- ``datasource``: decide which data a run uses (argument, ``IDC_DATA_DIR``, ``./data``, Kaggle, demo) and say
  so, with the synthetic-data notice whenever the data is the demo.
- ``demo_data``: a small synthetic dataset in the Kaggle layout, for runs without the real data.
- ``patch_index``: one row per patch file (path, patient_id, x, y, label), with every problem found.
- ``splits``: patient-level splits (the published Janowczyk & Madabhushi 2016 split, seeded splits, k-fold).
- ``loader``: decode patches into one ``(N, 50, 50, 3) uint8`` array, cached on disk.
- ``pipeline``: ``tf.data`` input pipelines with augmentation.
- ``models``: the reference ``seed_cnn`` and ``idc_net`` (mixed precision, augmentation inside the model on a GPU).
- ``inference``: IDC probabilities of a batch of patches, with test-time augmentation.
- ``run``: the run folder ``train`` writes and everything downstream reads (model, config, metrics, checkpoint).
- ``training``: train with a patient split, a checkpoint every epoch, resume, threshold chosen on validation patients.
- ``prediction``: the predictions table (one row per patch), the hand-off to everything downstream.
- ``context``: slide-context smoothing of predictions from the patch coordinates.
- ``metrics``: every score (F1, balanced accuracy, AUCs, curves, threshold search, the bootstrap over patients), the
  only module that calls scikit-learn's scorers (imports nothing of the package).
- ``plots``, ``gradcam``, ``slides``: figures, Grad-CAM maps, slide mosaics and heatmaps.
- ``notebook_runner``: the notebook series end to end (the notebooks ship inside the package, so a regular
  install runs them from any folder); ``cli``: every command's arguments and handler.

Importing the package has no side effects and does not import TensorFlow.
"""

__version__ = "0.1.0"
KAGGLE_DATASET = "paultimothymooney/breast-histopathology-images"
# The Kaggle dataset's size: a copy with exactly these counts is complete.
KAGGLE_PATIENTS = 279
KAGGLE_PATCHES = 277_524
PATCH_SIZE = 50
