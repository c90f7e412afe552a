"""Diagnosis: the runbook's instrumentation (:mod:`.instrumentation`), checksums, the metrics log
contract (:mod:`.metrics_log`), signals and verdicts (:mod:`.verdicts`), the debug-mode presets,
the debug modes themselves (:mod:`.debug`), the run's figures (:mod:`.plots`) and the identity
comparison (:mod:`.compare`)."""
