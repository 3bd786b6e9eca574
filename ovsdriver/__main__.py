"""``python3 -m ovsdriver status``: the ``ovsdriver`` command without its script."""

import sys

from ovsdriver.cli import main

sys.exit(main())
