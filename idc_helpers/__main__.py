"""``python -m idc_helpers``: see :mod:`idc_helpers.cli`."""

import sys

from idc_helpers.cli import main

sys.exit(main())
