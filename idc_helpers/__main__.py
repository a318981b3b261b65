"""``python -m idc_helpers``: see :mod:`idc_helpers.cli`."""

import sys

try:
    from idc_helpers.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command line loads: the same exit as later on, no traceback
    print("Interrupted.", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
