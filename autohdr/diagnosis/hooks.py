"""The runbook's instrumentation as hooks any PyTorch training loop can call.

autohdr's own :class:`~autohdr.training.trainer.Trainer` calls exactly these hooks; a
hand-written loop calls them at the same points and gets the same ``metrics.jsonl``, so
``autohdr judge RUN`` gives the same verdicts::

    hooks = Instrumentation(model, optimizer, "runs/mine", stage="stage2_hybrid",
                            groups={"backbone": "net.encoder", "param_head": "net.head"})
    hooks.on_train_start(val_loader)                  # run_start + the identity-at-init check
    for epoch in range(epochs):
        hooks.on_train_epoch_start(epoch)
        for batch in train_loader:
            hooks.on_train_batch_start(batch)         # data time ends here; value range, repeats
            correction = correct(model, batch["input_image"], residual_active=True)
            loss, parts = composite_loss(correction.loss_prediction, batch["target_image"], ...)
            optimizer.zero_grad(); loss.backward()
            hooks.on_after_backward()                 # gradient norms per group, before clipping
            optimizer.step()
            hooks.on_train_batch_end(loss, correction, components=parts, batch_size=len(batch["input_image"]))
        hooks.on_validation(val_loader, final=epoch == epochs - 1)  # val proxy, baselines, probe
        hooks.on_train_epoch_end()
    hooks.on_train_end()

Where each figure is taken (one host read per step, after the optimizer)::

    [data] -> forward -> backward -> [grad norms] -> clip -> optimizer -> [param deltas, geometry]

Each concern is one small observer (:mod:`autohdr.diagnosis.observers`: throughput, gradient norms,
parameter deltas, batch sanity, the optimizer, residual activity, geometry, the probe, validation,
rank sync); this class owns the run's step and epoch counters and the metrics file, and calls its
observers at each hook. The loop owns the model, the optimizer, the schedule and the checkpoints.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from autohdr.diagnosis.instrumentation import GROUP_NAMES, GroupMembers, group_summary, parameter_groups, unwrap_model
from autohdr.diagnosis.metrics_log import MetricsWriter
from autohdr.diagnosis.observers.base import LossFn, Observer, StepInfo, default_loss_fn, overrides, read_once
from autohdr.diagnosis.observers.batch_sanity import (  # noqa: F401  (re-exported)
    RANGE_TOLERANCE, BatchSanityObserver, batch_identity, batch_range_tensors,
)
from autohdr.diagnosis.observers.geometry import GeometryObserver, geometry_figures
from autohdr.diagnosis.observers.grad_norms import CLIP_DETECT_RTOL, GradNormObserver  # noqa: F401
from autohdr.diagnosis.observers.loss import LossObserver
from autohdr.diagnosis.observers.optimizer import OptimizerCoverage, OptimizerObserver, optimizer_groups  # noqa: F401
from autohdr.diagnosis.observers.param_deltas import ParamDeltaObserver
from autohdr.diagnosis.observers.probe import IDENTITY_PARAMS, ProbeObserver  # noqa: F401
from autohdr.diagnosis.observers.rank_sync import RankSyncObserver, parameter_checksum
from autohdr.diagnosis.observers.residual import ResidualActivityObserver
from autohdr.diagnosis.observers.timing import PerfTotals, ThroughputObserver  # noqa: F401
from autohdr.diagnosis.observers.validation import ValidationObserver, validation_fingerprint  # noqa: F401
from autohdr.diagnosis.ranks import SINGLE, DistContext
from autohdr.diagnosis.run_intent import refuse_existing_run
from autohdr.lens.evaluation import Correction
from autohdr.lens.model import check_param_bounds, resolve_param_bounds
from autohdr.lens.stages import stage_spec

__all__ = ["Instrumentation", "InstrumentationConfig", "LossFn", "NonFiniteLossError", "default_loss_fn",
           "STATE_VERSION"]

#: The shape of :meth:`Instrumentation.state_dict`: 2 = per-observer states under ``observers``.
#: A dict without ``version`` is the flat shape of earlier releases (and of their Trainer
#: checkpoints), still read; a newer version is refused by name.
STATE_VERSION = 2

#: Which observers' step figures are read, in the order they appear in a ``train_step`` record ...
TENSOR_ORDER = ("loss", "grad_norms", "batch_sanity", "param_deltas", "geometry")
#: ... and which add plain fields after the read, in order (the throughput's come last).
FIELD_ORDER = ("grad_norms", "loss", "optimizer", "residual_activity", "batch_sanity", "validation")


class NonFiniteLossError(RuntimeError):
    """Raised when a loss, gradient norm or model output stops being finite; the run cannot recover."""


@dataclass(frozen=True)
class InstrumentationConfig:
    """What the hooks measure. ``TrainConfig``'s ``debug_*`` fields map onto these one to one."""

    instrument: bool = True                      # grad norms, deltas, geometry, probe, checksums
    perf: bool = True                            # per-step timings and throughput
    perf_warmup_steps: int = 3                   # steps excluded from the run's samples/sec
    residual_inactive_threshold_px: float = 0.05  # residual contribution below this is "inactive"
    residual_inactive_patience: int = 20         # consecutive inactive steps before a warning
    probe_max_samples: int = 4                   # the fixed probe: the first N validation samples
    checksum_decimals: int = 4                   # checksums round to this many decimals first

    @classmethod
    def from_train_config(cls, cfg: Any) -> "InstrumentationConfig":
        return cls(instrument=cfg.debug_instrumentation, perf=cfg.debug_perf_enabled,
                   perf_warmup_steps=cfg.debug_perf_warmup_steps,
                   residual_inactive_threshold_px=cfg.debug_residual_inactive_threshold_px,
                   residual_inactive_patience=cfg.debug_residual_inactive_patience,
                   probe_max_samples=cfg.debug_probe_max_samples, checksum_decimals=cfg.debug_checksum_decimals)


class Instrumentation:
    """Stateful hooks that write the runbook's metrics for any training loop.

    Args:
        model: returns ``{"params": (B, 8)}`` and optionally ``"residual_flow_lowres": (B, 2, h, w)``
            (a DDP / DataParallel wrapper is unwrapped).
        optimizer: used to check that the optimized parameters are the ones that get gradients.
        out_dir: the run folder; ``metrics.jsonl`` is written there (rank 0 only).
        stage: ``stage1_param_only`` (residual off), ``stage2_hybrid`` or ``stage3_finetune``.
        groups: group name -> module prefix(es) or parameters; default: the model's
            ``parameter_groups()`` method, else submodules named ``backbone`` / ``param_head`` /
            ``residual_head``. A group left empty is reported as not judged, never as bad.
        config: what to measure (:class:`InstrumentationConfig`).
        loss_fn: ``(correction, target) -> (total, components)``, used for the init check and the
            validation loss; default autohdr's composite loss for ``stage``.
        param_bounds: 8 ``(lo, hi)`` pairs for the saturation figure; default the model's documented
            ``param_bounds`` attribute, else autohdr's defaults (with a notice, see
            :func:`~autohdr.lens.model.resolve_param_bounds`).
        ground_truth: ``image_id -> (8,)`` parameters, to score the ground-truth warp as a baseline.
        device: where probes and validation run (default: the model's).
        dist: the torchrun context; only rank 0 writes.
        log: one-line messages (default: stderr).
        non_finite_hint: what the error says to do when a loss or output stops being finite.

    ``observers`` holds the observers by name, in the order they are called (see
    :mod:`autohdr.diagnosis.observers`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, out_dir: str | Path, *,
                 stage: str = "stage2_hybrid", groups: Mapping[str, GroupMembers] | None = None,
                 config: InstrumentationConfig | None = None, loss_fn: LossFn | None = None,
                 param_bounds=None, ground_truth: Mapping[str, torch.Tensor] | None = None,
                 device: torch.device | str | None = None, dist: DistContext = SINGLE,
                 log: Callable[[str], None] | None = None,
                 non_finite_hint: str = "Lower the learning rate or check the inputs") -> None:
        self.model = model
        self.non_finite_hint = non_finite_hint
        #: written into ``run_start``: what the run is (``intent``: overfit / probe / training, the
        #: ``mode`` of a debug run) and the ``judge_config`` in effect, so ``autohdr judge`` judges it
        #: as what it is (see :func:`autohdr.diagnosis.run_intent.judge_config_for`).
        self.run_info: dict[str, Any] = {"intent": "training"}
        self.core = unwrap_model(model)
        self.optimizer = optimizer
        self.spec = stage_spec(stage)
        self.config = config or InstrumentationConfig()
        self.loss_fn = loss_fn or default_loss_fn(self.spec)
        self.ground_truth = ground_truth
        self.dist = dist
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        first = next(self.core.parameters(), None)
        self.device = torch.device(device) if device is not None else (
            first.device if first is not None else torch.device("cpu"))
        self.groups = parameter_groups(self.core, groups)
        # A top-level submodule named like a group that holds no parameters (a head replaced by a
        # parameter-free module) is measured as such: zero gradients, not "not named".
        modules = dict(self.core.named_children())
        self._measured = {n: ps for n, ps in self.groups.items() if ps or n in modules}
        self.notices: list[str] = []
        for name in GROUP_NAMES:
            if name not in self._measured and (name != "residual_head" or self.spec.residual_active):
                self.notices.append(
                    f"no parameters in group {name!r}: its signals are not judged; name its modules with "
                    f"--groups {name}=MODULE.PATH (Python: groups={{'{name}': 'module.path'}}) or give the model "
                    f"a parameter_groups() method")
        if param_bounds is not None:
            self.param_bounds = check_param_bounds(param_bounds, "param_bounds")
        else:
            self.param_bounds, notice = resolve_param_bounds(self.core)
            if notice:
                self.notices.append(notice)
        self.metrics = MetricsWriter(Path(out_dir) / "metrics.jsonl", enabled=dist.is_main)
        self.epoch = 0
        self.global_step = 0
        self._epoch_started = False
        self._batch: Mapping | None = None
        self._build_observers()

    def set_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Observe ``optimizer`` from now on (a loop that builds it after the hooks, before the first step)."""
        self.optimizer = optimizer
        self.optimizer_observer.set_optimizer(optimizer)

    def _build_observers(self) -> None:
        cfg, spec, instrument = self.config, self.spec, self.config.instrument
        self.timing = ThroughputObserver(self.device, perf=cfg.perf, timed=cfg.perf or instrument,
                                         warmup_steps=cfg.perf_warmup_steps, world_size=self.dist.world_size)
        self.probe = ProbeObserver(self.core, spec, self.device, loss_fn=self.loss_fn,
                                   max_samples=cfg.probe_max_samples, checksum_decimals=cfg.checksum_decimals,
                                   param_bounds=self.param_bounds)
        self.validation = ValidationObserver(self.core, spec, self.device, loss_fn=self.loss_fn,
                                             ground_truth=self.ground_truth, detailed=instrument,
                                             on_non_finite=self._fail_non_finite_outputs)
        self.rank_sync = RankSyncObserver(self.dist, self.parameter_checksum)
        self.optimizer_observer = OptimizerObserver(
            self.optimizer, self.core, coverage=instrument,
            skip=() if spec.residual_active else tuple(self.groups.get("residual_head", ())))
        self.batch_sanity = BatchSanityObserver() if instrument else None
        per_step: list[Observer | None] = [
            LossObserver(),
            GradNormObserver(self._measured, per_group=instrument),
            self.optimizer_observer,
            ResidualActivityObserver(spec.residual_active, threshold_px=cfg.residual_inactive_threshold_px,
                                     patience=cfg.residual_inactive_patience, write=self.write, info=self.info)
            if instrument else None,
            self.batch_sanity,
            ParamDeltaObserver(self._measured) if instrument else None,
            GeometryObserver(self.param_bounds) if instrument else None,
            self.validation,
        ]
        steps = [o for o in per_step if o is not None]
        #: every observer by name
        self.observers: dict[str, Observer] = {o.name: o for o in steps + [self.probe, self.rank_sync, self.timing]}
        self._at = {hook: [o for o in steps if overrides(o, hook)]
                    for hook in ("on_train_start", "on_train_epoch_start", "on_train_batch_start", "on_after_backward")}
        # The records' key order: the step's figures are read in TENSOR_ORDER, its plain fields added in FIELD_ORDER.
        self._at["step_tensors"] = [self.observers[n] for n in TENSOR_ORDER if n in self.observers]
        self._at["step_fields"] = [self.observers[n] for n in FIELD_ORDER if n in self.observers]

    # ------------------------------------------------------------------ state the observers keep
    @property
    def best_score(self) -> float:
        return self.validation.best_score

    @best_score.setter
    def best_score(self, value: float) -> None:
        self.validation.best_score = value

    @property
    def best_epoch(self) -> int:
        return self.validation.best_epoch

    @best_epoch.setter
    def best_epoch(self, value: int) -> None:
        self.validation.best_epoch = value

    @property
    def measured_groups(self) -> dict[str, list[nn.Parameter]]:
        """The groups whose gradient norms and deltas are measured (named, or a parameter-free head)."""
        return self._measured

    @property
    def perf(self) -> PerfTotals:
        """The run's throughput totals (what ``epoch_end`` / ``run_end`` summarize)."""
        return self.timing.totals

    # ------------------------------------------------------------------ messages
    def info(self, message: str) -> None:
        if self.dist.is_main:
            self._log(message)

    def write(self, record: dict) -> None:
        """Write one record (any ``kind``) to ``metrics.jsonl``."""
        self.metrics.write(record)

    # ------------------------------------------------------------------ run
    def on_train_start(self, val_batches: Iterable[Mapping] | None = None, *, resume_step: int | None = None,
                       check_init: bool = True, info: Mapping[str, Any] | None = None) -> None:
        """Open ``metrics.jsonl`` (fresh, or kept up to ``resume_step``), write ``run_start`` and,
        unless resuming, the ``init`` record: does the untrained model predict the identity warp?

        ``val_batches`` gives the fixed probe (its first ``probe_max_samples`` samples).
        """
        if resume_step is None and self.dist.is_main:
            refuse_existing_run(self.metrics.path.parent)
        if val_batches is not None:
            self.probe_batch(val_batches)
        if resume_step is not None:
            self.global_step = resume_step
            self.metrics.continue_from(resume_step)
        else:
            self.metrics.start_fresh()
        record = {"kind": "run_start", "stage": self.spec.name, "residual_branch_active": self.spec.residual_active,
                  "residual_terms": self.spec.residual_terms, "jacobian_term": self.spec.jacobian_term,
                  "device": str(self.device), "world_size": self.dist.world_size,
                  "parameter_groups": {n: {**summary, "measured": n in self._measured}
                                       for n, summary in group_summary(self.groups).items()},
                  "notices": list(self.notices),
                  "trainable_params": {n: sum(p.numel() for p in ps if p.requires_grad)
                                       for n, ps in self.groups.items()},
                  "optimizer_groups": optimizer_groups(self.optimizer, self.groups)}
        record.update(self.run_info)
        record.update(info or {})
        self.write(record)
        for notice in self.notices:
            self.info("notice: " + notice)
        if resume_step is None and check_init and self.probe.batch is not None:
            init = self.init_check()
            init.update({"kind": "init", "from_checkpoint": bool((info or {}).get("init_from"))})
            self.write(init)
        for observer in self._at["on_train_start"]:
            observer.on_train_start()

    def on_train_end(self, *, interrupted: bool = False, **fields: Any) -> dict:
        """Write ``run_end`` (throughput summary, best score) and close the file; returns the summary."""
        summary = self.timing.summary()
        self.write({"kind": "run_end", "epoch": self.epoch, "step": self.global_step,
                    "best_val_proxy_total": self.best_score, "best_epoch": self.best_epoch,
                    "interrupted": interrupted, "optimizer_coverage": self.optimizer_coverage(), **fields, **summary})
        self.metrics.close()
        return summary

    # ------------------------------------------------------------------ epochs
    def on_train_epoch_start(self, epoch: int | None = None) -> None:
        """Mark the epoch (default: 0, then the one after the last) and start timing the data wait."""
        if epoch is None:
            epoch = self.epoch + 1 if self._epoch_started else 0
        self.epoch, self._epoch_started = epoch, True
        for observer in self._at["on_train_epoch_start"]:
            observer.on_train_epoch_start(epoch)
        self.timing.restart()

    def on_train_epoch_end(self) -> None:
        """Write ``epoch_end`` with the throughput so far (the epoch stays current until the next starts)."""
        self.write({"kind": "epoch_end", "epoch": self.epoch, "step": self.global_step, **self.timing.summary()})

    # ------------------------------------------------------------------ steps
    def on_train_batch_start(self, batch: Mapping | None = None) -> None:
        """The batch is on the device: the time since the last step ended was data time.

        With ``batch`` (``input_image`` / ``target_image`` ``(B, 3, H, W)``, optionally ``image_id``)
        its value range, non-finite count and fingerprint are recorded (the batch sanity signals).
        """
        if not self.timing.started:  # no epoch start (a loop that steps by hand)
            self.on_train_epoch_start()
        self.timing.mark("data")
        self._batch = batch if self.config.instrument else None
        for observer in self._at["on_train_batch_start"]:
            observer.on_train_batch_start(self._batch)
        if self.config.instrument:
            self.timing.mark("instrumentation")

    def on_after_forward(self) -> None:
        """Optional: splits forward from backward time (otherwise both count as backward)."""
        self.timing.mark("forward")

    def on_after_backward(self, group_grad_norms: Mapping[str, torch.Tensor] | None = None) -> None:
        """Gradient norms per group, read here: after backward (and DDP's all-reduce), before clipping.

        ``group_grad_norms``: the norms measured elsewhere (``autohdr.attach`` takes them as each
        gradient is accumulated, before the loop clips), instead of reading the gradients now."""
        self.timing.mark("backward")
        for observer in self._at["on_after_backward"]:
            observer.on_after_backward(group_grad_norms)
        if self.config.instrument:
            self.timing.mark("instrumentation")

    def on_train_batch_end(self, loss: torch.Tensor, correction: Correction | None = None, *,
                           components: Mapping[str, torch.Tensor] | None = None, batch_size: int | None = None,
                           lr: float | None = None, grad_norm_total: torch.Tensor | None = None,
                           clip_norm: float | None = None, grad_norm_at_step: torch.Tensor | None = None) -> dict:
        """After the optimizer step: parameter deltas, geometry, flags; writes the ``train_step`` record.

        Args:
            loss: the step's total loss (0-d; already averaged over ranks under DDP).
            correction: the step's :class:`~autohdr.lens.evaluation.Correction` (geometry figures).
            components: loss components, raw and ``*_weighted`` (0-d tensors).
            batch_size: samples in this rank's batch (default: from ``correction``).
            lr: the learning rate this step used (default: the optimizer's first group's).
            grad_norm_total: the norm ``clip_grad_norm_`` returned (default: from the group norms).
            clip_norm: the clip threshold, for ``grad_clipped``.
            grad_norm_at_step: the norm of the gradients the optimizer stepped with (after any
                clipping); without ``clip_norm``, a step whose norm is below ``grad_norm_total`` was
                clipped, and that norm is recorded as the step's observed ``clip_norm``.

        Returns the record (plain floats), as written.
        """
        self.timing.mark("optim_step")
        step = StepInfo(loss, correction, components or {}, self._batch, grad_norm_total=grad_norm_total,
                        clip_norm=clip_norm, grad_norm_at_step=grad_norm_at_step, epoch=self.epoch)
        tensors: dict[str, torch.Tensor] = {}
        for observer in self._at["step_tensors"]:
            tensors.update(observer.step_tensors(step))
        step.host = read_once(tensors, self.device)  # the step's one host read
        if batch_size is None:
            batch_size = int(correction.params.shape[0]) if correction is not None else 0
        if lr is None and self.optimizer is not None:
            lr = self.optimizer.param_groups[0]["lr"]
        self.global_step += 1
        step.step = self.global_step
        record = {"kind": "train_step", "epoch": self.epoch, "step": self.global_step, "lr": lr,
                  "batch_size": int(batch_size), "batch_size_global": int(batch_size) * self.dist.world_size,
                  "residual_branch_active": self.spec.residual_active}
        record.update((name, value) for name, value in step.host.items() if not name.startswith("_"))
        for observer in self._at["step_fields"]:
            observer.step_fields(record, step)
        if self.config.instrument:
            self.timing.mark("instrumentation")
        self._batch = None
        self.timing.step_fields(record, step)
        self.write(record)
        self.timing.restart()
        return record

    # ------------------------------------------------------------------ failures
    def fail_non_finite(self, what: str, value: float, components: Mapping[str, Any] | None = None, *,
                        step: int | None = None, hint: str | None = None) -> None:
        """Write an ``error`` record naming what stopped being finite, then raise :class:`NonFiniteLossError`."""
        step = self.global_step + 1 if step is None else step
        finite = {k: float(v) for k, v in (components or {}).items()}
        bad = sorted(k for k, v in finite.items() if not math.isfinite(v))
        detail = f"; non-finite components: {bad or 'none'}" if components else ""
        # The step's own batch: a NaN or out-of-range input explains the failure better than the lr.
        batch_fields = self.batch_sanity.exact_fields() if self.batch_sanity is not None else {}
        sample = batch_fields.get("batch_bad_sample")
        if sample:
            name = sample.get("image_id") or f"#{sample['index']}"
            hint = (f"The input batch is bad: sample {name} holds "
                    + ("non-finite values" if sample["nonfinite"] else
                       f"values in [{sample['min']:.4g}, {sample['max']:.4g}], expected [0, 1]")
                    + "; check the data loader")
        message = (f"non-finite {what} ({value}) at epoch {self.epoch + 1}, step {step}{detail}. "
                   f"{hint or self.non_finite_hint}.")
        self.write({"kind": "error", "name": "non_finite", "epoch": self.epoch, "step": step,
                    "message": message, **finite, **batch_fields})
        raise NonFiniteLossError(message)

    def _fail_non_finite_outputs(self, names: list[str]) -> None:
        self.fail_non_finite(f"model outputs in validation after the update: {', '.join(names)}", math.nan,
                             step=self.global_step)

    # ------------------------------------------------------------------ validation
    def probe_batch(self, val_batches: Iterable[Mapping] | None = None) -> dict:
        """The first ``probe_max_samples`` validation samples, fixed for the whole run."""
        return self.probe.probe_batch(val_batches)

    def init_check(self) -> dict:
        """Before any step: does the model predict the identity warp, with identity's proxy and loss?"""
        return self.probe.init_check()

    def on_validation(self, val_batches: Iterable[Mapping], *, final: bool = False) -> dict:
        """Score the model (and, once, identity and ground truth) on the validation batches and the
        fixed probe, and track the best score. Writes and returns the ``val_epoch`` record
        (``is_best``: this epoch's score is the best so far).

        ``final=True`` on the run's last validation also scores the *constant lens* (the model's
        mean predicted parameters applied to every image) for ``beats_constant_lens``: a second
        pass over ``val_batches``, which must then be iterable twice (a ``DataLoader`` is)."""
        record = self.evaluate(val_batches, final=final)
        self.validation.track_best(record, self.epoch)
        self.write(record)
        return record

    @torch.no_grad()
    def evaluate(self, val_batches: Iterable[Mapping], *, final: bool = False) -> dict:
        """The ``val_epoch`` figures of the model as it is now, without writing or best tracking
        (``final``: see :meth:`on_validation`)."""
        record: dict = {"kind": "val_epoch", "epoch": self.epoch, "step": self.global_step}
        if self.config.instrument:
            self.probe_batch(val_batches)  # fixed at the first call: the first samples of the first pass
        record.update(self.validation.evaluate(val_batches, final=final))
        if self.config.instrument:
            record.update(self.probe_metrics())
        record.update(self.rank_sync.validation_fields(record))
        return record

    def probe_metrics(self) -> dict:
        """The fixed probe's ``val_epoch`` figures for the model as it is now."""
        return self.probe.metrics()

    def parameter_checksum(self) -> str:
        """Digest of every parameter and floating-point buffer (batch-norm statistics), rounded like
        the probe at two more decimals, to compare ranks and runs."""
        return parameter_checksum(self.core, self.config.checksum_decimals + 2)

    def optimizer_coverage(self) -> dict | None:
        """``run_end.optimizer_coverage`` as it reads now (``None`` without instrumentation or steps)."""
        return self.optimizer_observer.report()

    def _geometry(self, correction: Correction) -> dict[str, torch.Tensor]:
        return geometry_figures(correction, self.param_bounds)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """What a checkpoint must hold for a resumed run to continue these metrics exactly: the
        counters and each observer's own state (``observers``, by name; plain values only, so a
        ``torch.load(..., weights_only=True)`` reads it)."""
        states = {name: observer.state_dict() for name, observer in self.observers.items()}
        return {"version": STATE_VERSION, "global_step": self.global_step, "epoch": self.epoch,
                "observers": {name: state for name, state in states.items() if state is not None}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back :meth:`state_dict` (or the flat state of an earlier release, or such a
        release's Trainer checkpoint). Raises ``ValueError`` for a state of a newer version."""
        version = state.get("version")
        if version is None:
            state = _from_flat_state(state)
        elif not isinstance(version, int) or version > STATE_VERSION:
            raise ValueError(f"instrumentation state version {version!r} is newer than this autohdr reads "
                             f"({STATE_VERSION}): resume it with the autohdr that wrote it")
        self.global_step = int(state.get("global_step", 0))
        self.epoch = int(state.get("epoch", 0))
        self._epoch_started = True
        for name, observer_state in (state.get("observers") or {}).items():
            if name in self.observers and observer_state is not None:
                self.observers[name].load_state_dict(observer_state)
        self.validation.resume_in(self.epoch)  # its next on_train_epoch_start continues this epoch's figures


def _from_flat_state(state: Mapping[str, Any]) -> dict:
    """The flat state of earlier releases (``Instrumentation.state_dict()`` before version 2, or a
    Trainer checkpoint's top level) in version 2's shape."""
    observers: dict[str, Any] = {"validation": {
        "best_score": state.get("best_score", -math.inf), "best_epoch": state.get("best_epoch", -1),
        "epoch_losses": state.get("epoch_losses", []), "epoch_ids": state.get("epoch_ids", [])}}
    if state.get("inactivity_monitor") is not None:
        observers["residual_activity"] = dict(state["inactivity_monitor"])
    return {"version": STATE_VERSION, "global_step": state.get("global_step", 0), "epoch": state.get("epoch", 0),
            "observers": observers}
