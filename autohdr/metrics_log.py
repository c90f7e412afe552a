"""Moved to :mod:`autohdr.diagnosis.metrics_log`; this alias keeps ``autohdr.metrics_log.read_metrics`` working."""

from autohdr.diagnosis.metrics_log import *  # noqa: F401,F403
from autohdr.diagnosis.metrics_log import MetricsWriter, read_metrics  # noqa: F401
