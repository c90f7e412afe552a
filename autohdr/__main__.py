"""``python -m autohdr`` is the ``autohdr`` command."""

import sys

from autohdr.cli import main

sys.exit(main())
