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

The hooks own the run's step and epoch counters and the metrics file; the loop owns the model,
the optimizer, the schedule and the checkpoints.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from autohdr.data.dataset import check_batch_range
from autohdr.diagnosis.checksum import tensor_checksum
from autohdr.diagnosis.instrumentation import (
    GROUP_NAMES, GroupMembers, ParamDeltaTracker, ResidualInactivityMonitor, StepTimer, cuda_memory_mb,
    grad_norms, group_summary, params_at_bound_fraction, parameter_groups, unwrap_model,
)
from autohdr.diagnosis.metrics_log import MetricsWriter
from autohdr.diagnosis.run_intent import refuse_existing_run
from autohdr.lens.evaluation import Correction, correct, score_subset
from autohdr.lens.geometry import WarpResult, apply_correction, grid_statistics, identity_params
from autohdr.lens.losses import LossWeights, composite_loss
from autohdr.lens.model import check_param_bounds, resolve_param_bounds
from autohdr.lens.proxy import proxy_score_batch
from autohdr.lens.stages import StageSpec, stage_spec
from autohdr.diagnosis.ranks import SINGLE, DistContext, gather_objects

#: ``loss_fn(correction, target) -> (total (0-d), {component: 0-d tensor})``
LossFn = Callable[[Correction, torch.Tensor], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]

#: a step whose gradient norm at the optimizer is this much (relative) below the norm after
#: backward was clipped by the loop (float32 summation order differs by far less)
CLIP_DETECT_RTOL = 1e-3

IDENTITY_PARAMS: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)


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


def default_loss_fn(spec: StageSpec, weights: LossWeights | None = None) -> LossFn:
    """autohdr's composite loss for ``spec``'s stage (the trainer's loss, with default weights)."""
    weights = weights or LossWeights()

    def loss_fn(correction: Correction, target: torch.Tensor):
        return composite_loss(correction.loss_prediction.float(), target.float(), weights=weights,
                              residual_flow_lowres=correction.residual_flow_lowres,
                              final_grid=correction.warp.final_grid if spec.jacobian_term else None,
                              residual_terms=spec.residual_terms, jacobian_term=spec.jacobian_term)
    return loss_fn


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
        self.best_score = -math.inf
        self.best_epoch = -1
        self._timer = StepTimer(self.device, enabled=self.config.perf or self.config.instrument)
        self._tracker: ParamDeltaTracker | None = None
        self._monitor = (ResidualInactivityMonitor(self.config.residual_inactive_threshold_px,
                                                   self.config.residual_inactive_patience)
                         if self.config.instrument and self.spec.residual_active else None)
        self._grad_tensors: dict[str, torch.Tensor] = {}
        self._probe: dict | None = None
        self._baselines: dict[str, float] | None = None
        self.perf = PerfTotals(self.config.perf_warmup_steps)
        self._step_wall_start: float | None = None
        self._epoch_started = False
        self._epoch_jump_due = False           # the next batch start measures the weights' change since the last step
        self._epoch_jump: torch.Tensor | None = None
        self._epoch_ids: set[str] = set()
        self._epoch_losses: list[float] = []
        self._batch: Mapping | None = None
        self._batch_tensors: dict[str, torch.Tensor] = {}
        self._coverage = OptimizerCoverage(optimizer, skip=() if self.spec.residual_active
                                           else tuple(self.groups.get("residual_head", ())))

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
                  "trainable_params": {n: sum(p.numel() for p in ps if p.requires_grad) for n, ps in self.groups.items()},
                  "optimizer_groups": optimizer_groups(self.optimizer, self.groups)}
        record.update(self.run_info)
        record.update(info or {})
        self.write(record)
        for notice in self.notices:
            self.info("notice: " + notice)
        if resume_step is None and check_init and self._probe is not None:
            init = self.init_check()
            init.update({"kind": "init", "from_checkpoint": bool((info or {}).get("init_from"))})
            self.write(init)
        self._tracker = None  # deltas start from the weights as they are now (after any loading)

    def on_train_end(self, *, interrupted: bool = False, **fields: Any) -> dict:
        """Write ``run_end`` (throughput summary, best score) and close the file; returns the summary."""
        summary = self.perf.summary()
        coverage = self._coverage.report(self.core) if self.config.instrument else None
        self.write({"kind": "run_end", "epoch": self.epoch, "step": self.global_step,
                    "best_val_proxy_total": self.best_score, "best_epoch": self.best_epoch,
                    "interrupted": interrupted, "optimizer_coverage": coverage, **fields, **summary})
        self.metrics.close()
        return summary

    # ------------------------------------------------------------------ epochs
    def on_train_epoch_start(self, epoch: int | None = None) -> None:
        """Mark the epoch (default: 0, then the one after the last) and start timing the data wait."""
        if epoch is None:
            epoch = self.epoch + 1 if self._epoch_started else 0
        self.epoch, self._epoch_started = epoch, True
        if epoch != getattr(self, "_resumed_epoch", None):
            self._epoch_ids, self._epoch_losses = set(), []  # this epoch's training samples and losses
        self._resumed_epoch = None
        self._epoch_jump_due = True
        self._timer.start()
        self._step_wall_start = _now()

    def on_train_epoch_end(self) -> None:
        """Write ``epoch_end`` with the throughput so far (the epoch stays current until the next starts)."""
        self.write({"kind": "epoch_end", "epoch": self.epoch, "step": self.global_step, **self.perf.summary()})

    # ------------------------------------------------------------------ steps
    def on_train_batch_start(self, batch: Mapping | None = None) -> None:
        """The batch is on the device: the time since the last step ended was data time.

        With ``batch`` (``input_image`` / ``target_image`` ``(B, 3, H, W)``, optionally ``image_id``)
        its value range, non-finite count and fingerprint are recorded (the batch sanity signals).
        """
        if self._step_wall_start is None:  # no epoch start (a loop that steps by hand)
            self.on_train_epoch_start()
        self._timer.mark("data")
        if self.config.instrument and self._tracker is None:
            self._tracker = ParamDeltaTracker(self._measured)
        elif self.config.instrument and self._epoch_jump_due:
            # the weights' change between the last step of the previous epoch and this epoch's first
            # (0 unless something between epochs loads or edits them): weights_continue_across_epochs
            jumps = list(self._tracker.measure().values())
            self._epoch_jump = torch.stack(jumps).square().sum().sqrt() if jumps else None
        self._epoch_jump_due = False
        self._batch = batch if self.config.instrument else None
        if self._batch is not None:
            self._batch_tensors = batch_range_tensors(batch)
            self._timer.mark("instrumentation")

    def on_after_forward(self) -> None:
        """Optional: splits forward from backward time (otherwise both count as backward)."""
        self._timer.mark("forward")

    def on_after_backward(self, group_grad_norms: Mapping[str, torch.Tensor] | None = None) -> None:
        """Gradient norms per group, read here: after backward (and DDP's all-reduce), before clipping.

        ``group_grad_norms``: the norms measured elsewhere (``autohdr.attach`` takes them as each
        gradient is accumulated, before the loop clips), instead of reading the gradients now."""
        self._timer.mark("backward")
        self._grad_tensors = {}
        if self.config.instrument:
            measured = group_grad_norms if group_grad_norms is not None else grad_norms(self._measured)
            for name, value in measured.items():
                self._grad_tensors[f"grad_norm_{name}"] = value.detach().float()
            self._coverage.observe(self.core)
            self._timer.mark("instrumentation")

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
        self._timer.mark("optim_step")
        tensors: dict[str, torch.Tensor] = {"loss": loss.detach()}
        tensors.update({k: v for k, v in (components or {}).items()})
        tensors.update(self._grad_tensors)
        if grad_norm_total is None and self._grad_tensors:
            grad_norm_total = torch.stack(list(self._grad_tensors.values())).square().sum().sqrt()
        if grad_norm_total is not None:
            tensors["grad_norm_total"] = grad_norm_total.detach()
        if grad_norm_at_step is not None:
            tensors["optimizer_grad_norm"] = grad_norm_at_step.detach()
        tensors.update(self._batch_tensors)
        if self._epoch_jump is not None:
            tensors["weights_jump_before_epoch"], self._epoch_jump = self._epoch_jump, None
        if self.config.instrument:
            tracker = self._tracker or ParamDeltaTracker(self._measured)
            self._tracker = tracker
            for name, value in tracker.measure().items():
                tensors[f"param_delta_{name}"] = value
            if correction is not None:
                tensors.update(self._geometry(correction))
        names = list(tensors)
        values = torch.stack([tensors[n].detach().to(self.device, torch.float64).reshape(())
                              for n in names]).cpu().tolist() if names else []
        if batch_size is None:
            batch_size = int(correction.params.shape[0]) if correction is not None else 0
        if lr is None and self.optimizer is not None:
            lr = self.optimizer.param_groups[0]["lr"]
        self.global_step += 1
        record = {"kind": "train_step", "epoch": self.epoch, "step": self.global_step, "lr": lr,
                  "batch_size": int(batch_size), "batch_size_global": int(batch_size) * self.dist.world_size,
                  "residual_branch_active": self.spec.residual_active}
        record.update(zip(names, values))
        if "grad_norm_total" in record:
            record["grad_clipped"] = bool(clip_norm is not None and record["grad_norm_total"] > clip_norm)
            if clip_norm is not None:
                record["clip_norm"] = float(clip_norm)
            if clip_norm is None and "optimizer_grad_norm" in record:
                clipped = record["optimizer_grad_norm"] < record["grad_norm_total"] * (1.0 - CLIP_DETECT_RTOL)
                record["grad_clipped"] = bool(clipped)
                record["clip_norm"] = record["optimizer_grad_norm"] if clipped else None
        if components:
            record["loss_parts"] = sorted(components)  # which fields are the loss's parts (loss_not_regularizer_bound)
        if self.optimizer is not None and "lr_groups" not in record:
            record["lr_groups"] = [float(group["lr"]) for group in self.optimizer.param_groups]
        self._epoch_losses.append(record["loss"])
        if self._batch is not None:
            self._epoch_ids.update(str(i) for i in self._batch.get("image_id", []))
        if self.config.instrument:
            self._residual_flags(record)
            if self._batch is not None:
                record.update(batch_identity(self._batch, record))
            self._timer.mark("instrumentation")
        self._batch, self._batch_tensors = None, {}
        wall_ms = (_now() - (self._step_wall_start or _now())) * 1000.0
        phases = self._timer.phases
        if self.config.perf:
            record.update(self._perf_fields(phases, wall_ms, int(batch_size)))
        self.perf.add(record["batch_size_global"], wall_ms, phases)
        self.write(record)
        self._timer.start()
        self._step_wall_start = _now()
        return record

    def _geometry(self, correction: Correction) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            warp = correction.warp
            fused = warp.final_grid is not warp.param_grid  # fuse_grid returns the parametric grid alone
            stats = grid_statistics(warp.param_grid.detach().float(),
                                    warp.final_grid.detach().float() if fused else None)
            stats["params_at_bound_frac"] = params_at_bound_fraction(correction.params.detach().float(),
                                                                     self.param_bounds)
            if correction.residual_flow_lowres is not None:
                stats["residual_flow_abs_mean_px"] = correction.residual_flow_lowres.detach().abs().mean()
        return stats

    def _residual_flags(self, record: dict) -> None:
        """Zero-gradient / zero-delta flags and the inactivity warning, aware of the stage."""
        if not self.spec.residual_active or "grad_norm_residual_head" not in record:
            # The stage switches the branch off (or no residual group was named): not a failure.
            record["residual_head_grad_is_zero"] = None
            record["residual_head_param_delta_is_zero"] = None
        else:
            record["residual_head_grad_is_zero"] = record["grad_norm_residual_head"] == 0.0
            record["residual_head_param_delta_is_zero"] = record["param_delta_residual_head"] == 0.0
        monitor = self._monitor
        if monitor is not None and "residual_contrib_px_mean" in record and monitor.update(record["residual_contrib_px_mean"]):
            message = (f"residual branch inactive: contribution below {monitor.threshold_px} px for "
                       f"{monitor.patience} consecutive steps (warning #{monitor.fired})")
            self.write({"kind": "warning", "name": "residual_inactive", "epoch": self.epoch,
                        "step": record["step"], "message": message,
                        "residual_contrib_px_mean": record["residual_contrib_px_mean"]})
            self.info("WARNING " + message)

    def _perf_fields(self, phases: dict[str, float], wall_ms: float, batch: int) -> dict:
        fields = {
            "data_time_ms": phases.get("data", 0.0),
            "timing_forward_ms": phases.get("forward", 0.0),
            "timing_backward_ms": phases.get("backward", 0.0),
            "timing_optim_step_ms": phases.get("optim_step", 0.0),
            "instrumentation_ms": phases.get("instrumentation", 0.0),
            "batch_time_ms": wall_ms,
            "samples_per_sec": batch * self.dist.world_size / max(wall_ms / 1000.0, 1e-9),
        }
        fields["unaccounted_ms"] = wall_ms - sum(phases.values())
        fields.update(cuda_memory_mb(self.device))
        return fields

    # ------------------------------------------------------------------ failures
    def fail_non_finite(self, what: str, value: float, components: Mapping[str, Any] | None = None, *,
                        step: int | None = None, hint: str | None = None) -> None:
        """Write an ``error`` record naming what stopped being finite, then raise :class:`NonFiniteLossError`."""
        step = self.global_step + 1 if step is None else step
        finite = {k: float(v) for k, v in (components or {}).items()}
        bad = sorted(k for k, v in finite.items() if not math.isfinite(v))
        detail = f"; non-finite components: {bad or 'none'}" if components else ""
        batch_fields: dict[str, Any] = {}
        if self._batch is not None and self._batch_tensors:
            # The step's own batch: a NaN or out-of-range input explains the failure better than the lr.
            batch_fields = {k: float(v) for k, v in self._batch_tensors.items()}
            batch_fields.update(batch_identity(self._batch, batch_fields))
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

    # ------------------------------------------------------------------ validation
    def probe_batch(self, val_batches: Iterable[Mapping] | None = None) -> dict:
        """The first ``probe_max_samples`` validation samples, fixed for the whole run."""
        if self._probe is None:
            if val_batches is None:
                raise ValueError("the probe needs validation batches: call on_train_start(val_loader) first")
            inputs, targets, ids = [], [], []
            need = self.config.probe_max_samples
            for index, batch in enumerate(val_batches):
                check_batch_range(batch, f"validation batch {index} (the probe)")  # not "pred" in the proxy
                inputs.append(batch["input_image"])
                targets.append(batch["target_image"])
                ids.extend(list(batch.get("image_id", [])))
                if sum(x.shape[0] for x in inputs) >= need:
                    break
            if not inputs:
                raise ValueError("the validation loader is empty; the probe needs at least one sample")
            self._probe = {"input_image": torch.cat(inputs)[:need].to(self.device),
                           "target_image": torch.cat(targets)[:need].to(self.device), "image_id": ids[:need]}
        return self._probe

    @torch.no_grad()
    def init_check(self) -> dict:
        """Before any step: does the model predict the identity warp, with identity's proxy and loss?"""
        probe = self.probe_batch()
        with _eval_mode(self.core):
            image, target = probe["input_image"], probe["target_image"]
            correction = correct(self.core, image, self.spec.residual_active)
            identity_warp = _identity_warp(image)
            identity = identity_warp.prediction
            model_loss, _ = self.loss_fn(correction, target)
            # The same loss on the identity warp, given the outputs the model gives: a model that
            # passes a (zero) flow is compared with identity passing a zero flow of the same shape, so
            # a regularizer with a floor at zero flow (sqrt(x^2 + eps)) counts the same on both sides.
            flow = correction.residual_flow_lowres
            identity_flow = torch.zeros_like(flow) if flow is not None else None
            identity_loss, _ = self.loss_fn(Correction(_identity_params(image), identity_flow, identity_warp, image),
                                            target)
            return {
                "init_image_height": int(image.shape[-2]), "init_image_width": int(image.shape[-1]),
                "init_pred_max_abs_diff": float((correction.prediction - identity).abs().max()),
                "init_proxy_total": proxy_score_batch(correction.prediction.float(), target.float())["total"],
                "identity_proxy_total": proxy_score_batch(identity.float(), target.float())["total"],
                "init_loss": float(model_loss),
                "identity_loss": float(identity_loss),
                "init_params_max_abs_dev": float((correction.params - correction.params.new_tensor(
                    IDENTITY_PARAMS)).abs().max()),
            }

    def on_validation(self, val_batches: Iterable[Mapping], *, final: bool = False) -> dict:
        """Score the model (and, once, identity and ground truth) on the validation batches and the
        fixed probe, and track the best score. Writes and returns the ``val_epoch`` record
        (``is_best``: this epoch's score is the best so far).

        ``final=True`` on the run's last validation also scores the *constant lens* (the model's
        mean predicted parameters applied to every image) for ``beats_constant_lens``: a second
        pass over ``val_batches``, which must then be iterable twice (a ``DataLoader`` is)."""
        record = self.evaluate(val_batches, final=final)
        improved = record["val_proxy_total"] > self.best_score
        if improved:
            self.best_score, self.best_epoch = record["val_proxy_total"], self.epoch
        record.update({"best_val_proxy_total": self.best_score, "is_best": improved})
        self.write(record)
        return record

    @torch.no_grad()
    def evaluate(self, val_batches: Iterable[Mapping], *, final: bool = False) -> dict:
        """The ``val_epoch`` figures of the model as it is now, without writing or best tracking
        (``final``: see :meth:`on_validation`)."""
        record: dict = {"kind": "val_epoch", "epoch": self.epoch, "step": self.global_step}
        if self.config.instrument:
            self.probe_batch(val_batches)  # fixed at the first call: the first samples of the first pass
        loss_fn = self.loss_fn

        def val_loss(pred, target, correction):
            return {"val_loss": loss_fn(correction, target)[0]}

        need_baselines = self._baselines is None
        if self.config.instrument:
            record.update(validation_fingerprint(val_batches))
            val_batches = _IdTap(val_batches)
        # A finite last training loss does not make the updated weights usable (a huge step can
        # overflow the next forward): outputs are checked so such a run stops with a clear error.
        used = ("params", "residual_flow_lowres") if self.spec.residual_active else ("params",)
        checked = _FiniteOutputs(self.core, used, self._fail_non_finite_outputs).train(self.core.training)
        scores = score_subset(checked, val_batches, residual_active=self.spec.residual_active,
                              device=self.device, ground_truth=self.ground_truth, loss_fn=val_loss,
                              with_baselines=need_baselines, constant_lens=final and self.config.instrument)
        if need_baselines:
            self._baselines = {f"identity_proxy_{k}": v for k, v in scores.identity.items()}
            if scores.ground_truth is not None:
                self._baselines.update({f"gt_proxy_{k}": v for k, v in scores.ground_truth.items()})
        record.update({f"val_proxy_{k}": v for k, v in scores.model.items()})
        # beats_constant_lens: the model's own mean lens on every image; where ground truth is known,
        # the per-parameter correlation of the predictions with it
        record.update({f"constant_lens_proxy_{k}": v for k, v in (scores.constant_lens or {}).items()})
        record.update({f"pred_gt_corr_{k}": v for k, v in (scores.param_correlations or {}).items()})
        record.update(self._baselines)
        if self.spec.residual_active and self.config.instrument and final:
            # The same model with its residual zeroed (the parametric warp alone): does the residual help?
            # residual_helps judges the last validation only, so only the final one pays this pass.
            without = score_subset(self.core, val_batches, residual_active=False, device=self.device,
                                   with_baselines=False)
            record.update({f"val_proxy_no_residual_{k}": v for k, v in without.model.items()})
        record["val_sample_count"] = scores.sample_count
        record["val_loss"] = scores.loss_sums["val_loss"] / max(1, scores.sample_count)
        if isinstance(val_batches, _IdTap) and val_batches.ids and self._epoch_losses:
            # train == val (overfit modes): the epoch's mean training loss on the same samples
            record["val_ids_match_train"] = set(val_batches.ids) == self._epoch_ids
            record["train_epoch_loss_mean"] = sum(self._epoch_losses) / len(self._epoch_losses)
            record["train_epoch_steps"] = len(self._epoch_losses)
        if self.config.instrument:
            record.update(self.probe_metrics())
        if self.dist.enabled:
            record.update(self._rank_checksums(record))
        return record

    def probe_metrics(self) -> dict:
        probe = self.probe_batch()
        decimals = self.config.checksum_decimals
        with _eval_mode(self.core):
            correction = correct(self.core, probe["input_image"], self.spec.residual_active)
            again = correct(self.core, probe["input_image"], self.spec.residual_active)  # same input, same weights
            _, components = default_loss_fn(self.spec)(correction, probe["target_image"])
            geometry = self._geometry(correction)
        flow_modes = self._flow_train_vs_eval(probe["input_image"], correction) if self.spec.residual_active else {}
        proxy = proxy_score_batch(correction.prediction.float(), probe["target_image"].float())
        return {
            "probe_repeat_max_abs_diff": float((again.prediction - correction.prediction).abs().max()),
            "probe_residual_contrib_px_mean": float(geometry["residual_contrib_px_mean"]),
            "probe_param_grid_disp_px_mean": float(geometry["param_grid_disp_px_mean"]),
            "probe_pred_checksum": tensor_checksum(correction.prediction, decimals),
            "probe_final_grid_checksum": tensor_checksum(correction.warp.final_grid.permute(0, 3, 1, 2), decimals),
            "probe_params_checksum": tensor_checksum(correction.params, decimals + 1),
            "probe_proxy_total_score": proxy["total"],
            "probe_pixel": float(components["pixel"]),
            "probe_ssim": float(components["ssim"]),
            "probe_edge": float(components["edge"]),
            "probe_sample_count": int(probe["input_image"].shape[0]),
            "param_checksum": self.parameter_checksum(),
            **flow_modes,
        }

    def _flow_train_vs_eval(self, image: torch.Tensor, at_eval: Correction) -> dict:
        """The probe's residual flow in train mode vs eval mode, by value: their cosine and both
        checksums. Buffers (batch-norm statistics) and the random state are restored afterwards,
        so the train-mode pass leaves the run exactly as it was."""
        if at_eval.residual_flow_lowres is None:
            return {}
        buffers = [b.detach().clone() for b in self.core.buffers()]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            was_training = self.core.training
            self.core.train()
            try:
                in_train = correct(self.core, image, True).residual_flow_lowres
            finally:
                self.core.train(was_training)
                for saved, buffer in zip(buffers, self.core.buffers()):
                    buffer.copy_(saved)
        if in_train is None:
            return {}
        a, b = in_train.detach().float().reshape(-1), at_eval.residual_flow_lowres.detach().float().reshape(-1)
        norms = float(a.norm() * b.norm())
        decimals = self.config.checksum_decimals
        return {"probe_flow_cosine_train_eval": float(a @ b) / norms if norms > 0 else None,
                "probe_flow_checksum_train": tensor_checksum(in_train, decimals),
                "probe_flow_checksum_eval": tensor_checksum(at_eval.residual_flow_lowres, decimals)}

    def parameter_checksum(self) -> str:
        """Digest of every parameter and floating-point buffer (batch-norm statistics), rounded like
        the probe at two more decimals, to compare ranks and runs."""
        tensors = [t for t in self.core.state_dict().values() if t.is_floating_point()]
        flat = torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])
        return tensor_checksum(flat, self.config.checksum_decimals + 2)

    def _rank_checksums(self, record: dict) -> dict:
        """Every rank's parameter (and probe prediction) checksum, gathered: ranks_in_sync judges them."""
        mine = (record.get("param_checksum") or self.parameter_checksum(), record.get("probe_pred_checksum"))
        gathered = gather_objects(mine, self.dist)
        out = {"rank_param_checksums": [g[0] for g in gathered]}
        if mine[1] is not None:
            out["rank_probe_checksums"] = [g[1] for g in gathered]
        return out

    def _fail_non_finite_outputs(self, names: list[str]) -> None:
        self.fail_non_finite(f"model outputs in validation after the update: {', '.join(names)}", math.nan,
                             step=self.global_step)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """What a checkpoint must hold for a resumed run to continue these metrics exactly."""
        return {"global_step": self.global_step, "epoch": self.epoch, "best_score": self.best_score,
                "best_epoch": self.best_epoch,
                "inactivity_monitor": ({"consecutive": self._monitor.consecutive, "fired": self._monitor.fired}
                                       if self._monitor is not None else None),
                # the epoch in hand's training losses and samples (train_val_agree after a mid-epoch resume)
                "epoch_losses": [float(x) for x in self._epoch_losses], "epoch_ids": sorted(self._epoch_ids)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.global_step = int(state.get("global_step", 0))
        self.epoch = int(state.get("epoch", 0))
        self._epoch_started = True
        self.best_score = float(state.get("best_score", -math.inf))
        self.best_epoch = int(state.get("best_epoch", -1))
        self._epoch_losses = [float(x) for x in state.get("epoch_losses", [])]
        self._epoch_ids = {str(i) for i in state.get("epoch_ids", [])}
        self._resumed_epoch = self.epoch  # its next on_train_epoch_start continues this epoch's figures
        monitor = state.get("inactivity_monitor")
        if self._monitor is not None and monitor is not None:
            self._monitor.consecutive = int(monitor["consecutive"])
            self._monitor.fired = int(monitor["fired"])


class PerfTotals:
    """Run-level throughput: samples over wall time after ``warmup`` steps, warm-up reported apart."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.steps = 0
        self.samples = 0
        self.wall_ms = 0.0
        self.warm_samples = 0
        self.warm_wall_ms = 0.0
        self.phases: dict[str, float] = {}

    def add(self, samples: int, wall_ms: float, phases: dict[str, float]) -> None:
        self.steps += 1
        if self.steps <= self.warmup:
            self.warm_samples += samples
            self.warm_wall_ms += wall_ms
            return
        self.samples += samples
        self.wall_ms += wall_ms
        for key, value in phases.items():
            self.phases[key] = self.phases.get(key, 0.0) + value

    def summary(self) -> dict:
        out: dict = {"steps": self.steps, "warmup_steps": min(self.steps, self.warmup),
                     "warmup_wall_ms": self.warm_wall_ms}
        if self.wall_ms > 0:
            measured = self.steps - min(self.steps, self.warmup)
            out["samples_per_sec"] = self.samples / (self.wall_ms / 1000.0)
            out["step_time_ms_mean"] = self.wall_ms / measured
            for key, value in self.phases.items():
                out[f"{key}_ms_mean"] = value / measured
            if "instrumentation" in self.phases:
                out["instrumentation_overhead_frac"] = self.phases["instrumentation"] / self.wall_ms
        return out


class _FiniteOutputs(nn.Module):
    """Runs ``model`` unchanged and calls ``on_fail(names)`` when one of the outputs ``names`` it
    returns is not finite (one device-wide check per output and batch)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], on_fail: Callable[[list[str]], None]) -> None:
        super().__init__()
        self.model = model
        self._names = names
        self._on_fail = on_fail

    def forward(self, image: torch.Tensor):
        outputs = self.model(image)
        if isinstance(outputs, Mapping):
            bad = [name for name in self._names
                   if isinstance(outputs.get(name), torch.Tensor) and not bool(torch.isfinite(outputs[name]).all())]
            if bad:
                self._on_fail(bad)
        return outputs


class _eval_mode:
    """``with _eval_mode(model):`` evaluates in eval mode and restores the previous mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self.was_training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


def _identity_params(image: torch.Tensor) -> torch.Tensor:
    return identity_params(image.shape[0], device=image.device, dtype=image.dtype)


def _identity_warp(image: torch.Tensor) -> WarpResult:
    """The identity warp of ``image`` ``(B, 3, H, W)``, through the same code path as every prediction."""
    return apply_correction(image, _identity_params(image), None)


def _now() -> float:
    return time.perf_counter()


def batch_range_tensors(batch: Mapping) -> dict[str, torch.Tensor]:
    """``batch_min`` / ``batch_max`` over input and target images and ``batch_nonfinite`` (count), 0-d."""
    images = [batch[k] for k in ("input_image", "target_image") if isinstance(batch.get(k), torch.Tensor)]
    if not images:
        return {}
    finite = [torch.nan_to_num(x.detach(), nan=0.5, posinf=0.5, neginf=0.5) for x in images]
    return {"batch_min": torch.stack([x.amin() for x in finite]).amin().float(),
            "batch_max": torch.stack([x.amax() for x in finite]).amax().float(),
            "batch_nonfinite": sum((~torch.isfinite(x.detach())).sum() for x in images).float()}


def batch_identity(batch: Mapping, record: Mapping[str, Any]) -> dict[str, Any]:
    """``batch_fingerprint`` (16 hex digits of the ordered sample ids, else of the pooled input) and,
    when the batch is out of ``[0, 1]`` or not finite, ``batch_bad_sample`` naming the first bad sample."""
    ids = [str(i) for i in batch.get("image_id", [])]
    if ids:
        fingerprint = hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:16]
    else:
        fingerprint = tensor_checksum(batch["input_image"].detach().float(), 3)
    out: dict[str, Any] = {"batch_fingerprint": fingerprint}
    out_of_range = record.get("batch_min", 0.0) < -RANGE_TOLERANCE or record.get("batch_max", 1.0) > 1 + RANGE_TOLERANCE
    if out_of_range or record.get("batch_nonfinite", 0.0) > 0:
        worst = None
        for index in range(int(batch["input_image"].shape[0])):
            sample = [batch[k][index] for k in ("input_image", "target_image") if isinstance(batch.get(k), torch.Tensor)]
            nonfinite = any(not bool(torch.isfinite(x).all()) for x in sample)
            low = min(float(torch.nan_to_num(x, nan=0.5).amin()) for x in sample)
            high = max(float(torch.nan_to_num(x, nan=0.5).amax()) for x in sample)
            if nonfinite or low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
                worst = {"index": index, "image_id": ids[index] if index < len(ids) else None,
                         "nonfinite": nonfinite, "min": low, "max": high}
                break
        out["batch_bad_sample"] = worst
    return out


def optimizer_groups(optimizer: torch.optim.Optimizer | None,
                     groups: Mapping[str, list[nn.Parameter]]) -> list[dict[str, Any]] | None:
    """Each optimizer param group's hyperparameters (``lr``, ``eps``, ``betas``, ``weight_decay``,
    ``momentum`` where it has them), its tensor count and the named groups its parameters belong to."""
    if optimizer is None:
        return None
    owner = {id(p): name for name, params in groups.items() for p in params}
    out = []
    for group in optimizer.param_groups:
        item: dict[str, Any] = {"tensors": len(group["params"]),
                                "groups": sorted({owner[id(p)] for p in group["params"] if id(p) in owner})}
        for key in ("lr", "eps", "betas", "weight_decay", "momentum"):
            value = group.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                item[key] = float(value)
            elif isinstance(value, (tuple, list)):
                item[key] = [float(v) for v in value]
            elif isinstance(value, torch.Tensor) and value.numel() == 1:
                item[key] = float(value)
        out.append(item)
    return out


def validation_fingerprint(val_batches: Iterable[Mapping]) -> dict[str, str]:
    """``val_batch_fingerprint``: 16 hex digits of the first validation batch (its sample ids and
    its input pixels to 3 decimals), to check that validation scores the same data every epoch."""
    first = next(iter(val_batches), None)
    if first is None or not isinstance(first.get("input_image"), torch.Tensor):
        return {}
    ids = "\n".join(str(i) for i in first.get("image_id", []))
    pixels = tensor_checksum(first["input_image"].detach().float(), 3)
    return {"val_batch_fingerprint": hashlib.sha256(f"{ids}|{pixels}".encode("utf-8")).hexdigest()[:16]}


class _IdTap:
    """Re-iterable view of validation batches that collects their sample ids as they pass."""

    def __init__(self, batches: Iterable[Mapping]) -> None:
        self.batches = batches
        self.ids: list[str] = []

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self):
        self.ids = []
        for batch in self.batches:
            self.ids.extend(str(i) for i in batch.get("image_id", []))
            yield batch


#: Images are ``[0, 1]``; resampling may overshoot by float rounding only.
RANGE_TOLERANCE = 1e-3


class OptimizerCoverage:
    """Which parameters got a gradient (at any step) versus which the optimizer updates.

    ``observe`` after each backward; ``report`` names parameters with gradients the optimizer does
    not hold (created after it, or left out of it) and optimized parameters that never got a
    gradient (``skip``: parameters the stage switches off, e.g. the residual head in stage 1).
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None, skip: Iterable[nn.Parameter] = ()) -> None:
        self.optimizer = optimizer
        self._skip = {id(p) for p in skip}
        self._with_grad: set[int] = set()
        self.steps = 0

    def observe(self, model: nn.Module) -> None:
        self.steps += 1
        for param in model.parameters():
            if param.grad is not None:
                self._with_grad.add(id(param))

    def report(self, model: nn.Module) -> dict[str, Any] | None:
        if self.optimizer is None or self.steps == 0:
            return None
        optimized = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        names = [(name, id(p)) for name, p in model.named_parameters()]
        return {
            "steps_observed": self.steps,
            "optimized_tensors": len(optimized),
            "grad_not_optimized": [n for n, i in names if i in self._with_grad and i not in optimized],
            "optimized_never_grad": [n for n, i in names if i in optimized and i not in self._with_grad
                                     and i not in self._skip],
        }
