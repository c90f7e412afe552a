"""``python -m autohdr`` is the ``autohdr`` command."""

from autohdr.cli import entry

entry()
