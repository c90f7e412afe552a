"""Moved to :mod:`autohdr.runs.debug`; this alias keeps ``autohdr.debug.run_debug_mode`` working."""

from autohdr.runs.debug import *  # noqa: F401,F403
from autohdr.runs.debug import run_debug_mode  # noqa: F401
