"""Helpers for the IDC notebook series: detect Invasive Ductal Carcinoma in 50x50 breast-histology patches.

Modules, one concern each:

- ``kaggle_download``: fetch the Kaggle dataset, verified, into a complete folder.
- ``datasource``: decide which data a run uses (argument, ``IDC_DATA_DIR``, ``./data``, Kaggle, demo).
- ``demo_data``: a small synthetic dataset in the Kaggle layout, for runs without the real data.
- ``patch_index``: one row per patch file (path, patient_id, x, y, label), with every problem found.
- ``splits``: patient-level splits (the published Janowczyk & Madabhushi 2016 split, seeded splits, k-fold).
- ``loader``: decode patches into one ``(N, 50, 50, 3) uint8`` array, cached on disk.
- ``pipeline``: ``tf.data`` input pipelines with augmentation.
- ``models``, ``training``, ``prediction``, ``metrics``, ``plots``, ``gradcam``, ``slides``.

Importing the package has no side effects and does not import TensorFlow.
"""

__version__ = "0.1.0"
KAGGLE_DATASET = "paultimothymooney/breast-histopathology-images"
PATCH_SIZE = 50
