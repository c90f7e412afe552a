"""Diagnosis: observing a training run and judging it. The runbook's instrumentation
(:mod:`.hooks`, :mod:`.instrumentation`), checksums, the metrics log contract (:mod:`.metrics_log`),
signals and verdicts (:mod:`.verdicts`), likely causes (:mod:`.causes`), the run's figures
(:mod:`.plots`, :mod:`.report_html`) and what a run is for (:mod:`.run_intent`).

This layer imports only :mod:`autohdr.lens` and :mod:`autohdr.data`; the debug modes that train
and judge a run live above it, in :mod:`autohdr.runs`."""
