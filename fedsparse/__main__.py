"""``python -m fedsparse``: the same as the ``fedsparse`` command."""

import sys

from fedsparse.cli import main

sys.exit(main())
