"""Moved to :mod:`autohdr.diagnosis.debug`; this alias keeps ``autohdr.debug.run_debug_mode`` working."""

from autohdr.diagnosis.debug import *  # noqa: F401,F403
from autohdr.diagnosis.debug import run_debug_mode  # noqa: F401
