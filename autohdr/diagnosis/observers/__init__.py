"""The instrumentation's observers: one concern each, composed by :class:`~autohdr.diagnosis.hooks.Instrumentation`.

Each module holds one observer (a subclass of :class:`~autohdr.diagnosis.observers.base.Observer`)
with the hooks its concern needs and, where it has state worth resuming, its own ``state_dict()``:

=================  ====================================================================
``loss``           the step's loss, its parts and ``loss_parts``
``grad_norms``     gradient norms per group before clipping, the total, clip detection
``optimizer``      every param group's lr each step; the optimizer's coverage (run_end)
``residual``       the residual branch's zero flags and the inactivity warning
``batch_sanity``   the batch's value range, non-finite count, fingerprint, bad sample
``param_deltas``   how far each group's weights moved; the jump between epochs
``geometry``       the warp's displacement statistics, parameters at their bounds
``probe``          the fixed probe's figures and the init check
``validation``     validation scores, baselines, the best epoch, the epoch's training figures
``rank_sync``      every rank's parameter and probe checksums (DDP)
``timing``         phase timings and throughput (it brackets the others)
=================  ====================================================================

``docs/hooks.md`` lists the metrics keys each one writes and its state.
"""

from autohdr.diagnosis.observers.base import Observer, StepInfo

__all__ = ["Observer", "StepInfo"]
