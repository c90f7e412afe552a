"""The training loop, with the runbook's instrumentation attached at fixed points.

``Trainer(model, config, train_loader, val_loader, out_dir=...)`` trains any ``nn.Module`` whose
forward returns ``params`` (and optionally ``residual_flow_lowres``) on any iterables of batch
dicts (``input_image``, ``target_image`` ``(B, 3, H, W)``, optionally ``image_id``).

One step, and where each figure is taken::

    data -> forward (warp + loss) -> finite check -> backward -> [grad norms, before clipping]
         -> clip -> optimizer + scheduler -> [param deltas, geometry, inactivity] -> one host read

Every step and every validation epoch goes to ``metrics.jsonl`` (see :mod:`autohdr.diagnosis.metrics_log`).
Only rank 0 writes files under torchrun.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn

from autohdr.training import checkpoint as ckpt
from autohdr.diagnosis.checksum import tensor_checksum
from autohdr.training.config import TrainConfig, to_dict
from autohdr.training.distributed import SINGLE, DistContext, all_reduce_mean, broadcast_buffers, gather_objects
from autohdr.lens.evaluation import Correction, correct, identity_prediction, score_subset
from autohdr.lens.geometry import grid_statistics
from autohdr.training.interrupts import StopRequest
from autohdr.diagnosis.instrumentation import (
    GROUP_NAMES, ParamDeltaTracker, ResidualInactivityMonitor, StepTimer, cuda_memory_mb, grad_norms,
    params_at_bound_fraction, parameter_groups, unwrap_model,
)
from autohdr.lens.losses import composite_loss
from autohdr.diagnosis.metrics_log import MetricsWriter
from autohdr.lens.model import DEFAULT_PARAM_BOUNDS
from autohdr.lens.proxy import proxy_score_batch


#: Key of the all-reduced stop request inside a DDP train step's reduced values (not logged).
_STOP_KEY = "_stop_requested_any_rank"


class NonFiniteLossError(RuntimeError):
    """Raised when a loss or gradient norm stops being finite; the run cannot recover."""


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    metrics_path: Path
    best_score: float
    best_epoch: int
    epochs_completed: int
    global_step: int
    samples_per_sec: float | None
    interrupted: bool


def cosine_lr_factor(step: int, total_steps: float, warmup_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine from 1 down to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _set_epoch(loader, epoch: int) -> None:
    """Reseed per-epoch shuffling where the loader or its sampler supports it."""
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                getattr(loader, "dataset", None)):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def _steps_per_epoch(loader, cap: int | None) -> int | None:
    try:
        n = len(loader)
    except TypeError:
        return cap
    return min(n, cap) if cap else n


class Trainer:
    """Stateful trainer: the model, the optimizer, the instrumentation and the run's files."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_loader: Iterable[Mapping],
        val_loader: Iterable[Mapping],
        *,
        out_dir: str | Path,
        device: str | torch.device = "cpu",
        ground_truth: Mapping[str, torch.Tensor] | None = None,
        dist_ctx: DistContext = SINGLE,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.spec = config.spec
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.out_dir = Path(out_dir)
        self.ground_truth = ground_truth
        self.dist = dist_ctx
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.core = unwrap_model(model)
        self.groups = parameter_groups(self.core)
        self.param_bounds = getattr(self.core, "param_bounds", DEFAULT_PARAM_BOUNDS)
        self.trainable = [p for name, ps in self.groups.items() for p in ps
                          if p.requires_grad and (self.spec.residual_active or name != "residual_head")]
        if not self.trainable:
            raise ValueError("the model has no trainable parameters for stage " + config.stage)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr * self.spec.lr_scale,
                                           weight_decay=config.weight_decay)
        self.steps_per_epoch = _steps_per_epoch(train_loader, config.max_steps_per_epoch)
        # A loader without len() (and no max_steps_per_epoch): the schedule's length is learnt from
        # the first epoch, which runs at the peak rate after warm-up.
        self.schedule_total_steps: int | None = (self.steps_per_epoch * config.epochs
                                                 if self.steps_per_epoch is not None else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.amp_enabled = config.amp and self.device.type == "cuda"
        # torch 2.13's CPU backward of a strided 1x1 conv on channels_last tensors crashes: CUDA only.
        self.memory_format = (torch.channels_last if config.channels_last and self.device.type == "cuda"
                              else torch.preserve_format)
        if self.memory_format is torch.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.epoch = 0
        self.global_step = 0
        self.best_score = -math.inf
        self.best_epoch = -1
        self.metrics = MetricsWriter(self.out_dir / "metrics.jsonl", enabled=self.dist.is_main)
        self._probe: dict | None = None
        self._tools: _StepTools | None = None
        self._stop = StopRequest(self.info, self.dist, self.device)  # installed by fit() only
        self._stop_any_rank: bool | None = None  # under DDP: the last step's all-reduced stop request
        # Where an interrupted epoch stands (saved in checkpoints): interrupted.pt resumes there.
        self._steps_done_in_epoch = 0
        self._epoch_complete = True
        self._baselines: dict[str, float] | None = None
        # One monitor for the whole run (its count spans epochs); saved in checkpoints for resume.
        self._monitor = (ResidualInactivityMonitor(config.debug_residual_inactive_threshold_px,
                                                   config.debug_residual_inactive_patience)
                         if config.debug_instrumentation and self.spec.residual_active else None)

    # ------------------------------------------------------------------ helpers
    def _lr_factor(self, step: int) -> float:
        """LambdaLR multiplier of optimizer step ``step`` (0-based)."""
        cfg = self.config
        # Length unknown until the first epoch ends: an endless schedule (warm-up, then the peak).
        total = math.inf if self.schedule_total_steps is None else self.schedule_total_steps
        return cosine_lr_factor(step, total, cfg.warmup_steps, cfg.min_lr_ratio)

    def info(self, message: str) -> None:
        if self.dist.is_main:
            self._log(message)

    def _autocast(self):
        if not self.amp_enabled:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)

    def _loss(self, correction: Correction, target: torch.Tensor):
        return composite_loss(
            correction.loss_prediction.float(), target.float(), weights=self.config.loss_weights,
            residual_flow_lowres=correction.residual_flow_lowres,
            final_grid=correction.warp.final_grid if self.spec.jacobian_term else None,
            residual_terms=self.spec.residual_terms, jacobian_term=self.spec.jacobian_term)

    def _probe_batch(self) -> dict:
        """The first ``debug_probe_max_samples`` validation samples, fixed for the whole run."""
        if self._probe is None:
            inputs, targets, ids = [], [], []
            need = self.config.debug_probe_max_samples
            for batch in self.val_loader:
                inputs.append(batch["input_image"])
                targets.append(batch["target_image"])
                ids.extend(list(batch.get("image_id", [])))
                if sum(x.shape[0] for x in inputs) >= need:
                    break
            if not inputs:
                raise ValueError("the validation loader is empty; the probe needs at least one sample")
            self._probe = {
                "input_image": torch.cat(inputs)[:need].to(self.device),
                "target_image": torch.cat(targets)[:need].to(self.device),
                "image_id": ids[:need],
            }
        return self._probe

    def _checkpoint_payload(self) -> dict:
        payload = {
            "model": self.core.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "epoch_complete": self._epoch_complete,          # trained, validated and saved
            "steps_done_in_epoch": self._steps_done_in_epoch,
            "global_step": self.global_step,
            "schedule_total_steps": self.schedule_total_steps,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "stage": self.config.stage,
            "config": to_dict(self.config),
            "rng": torch.get_rng_state(),
            "inactivity_monitor": ({"consecutive": self._monitor.consecutive, "fired": self._monitor.fired}
                                   if self._monitor is not None else None),
        }
        model_config = getattr(self.core, "config", None)
        if model_config is not None and hasattr(model_config, "__dataclass_fields__"):
            payload["model_config"] = to_dict(model_config)
        return payload

    def save(self, name: str) -> Path | None:
        if not self.dist.is_main:
            return None
        return ckpt.save_atomic(self._checkpoint_payload(), self.out_dir / name)

    # ------------------------------------------------------------------ checks before training
    @torch.no_grad()
    def init_check(self) -> dict:
        """Before any step: does the model predict the identity warp, with identity's proxy and loss?"""
        probe = self._probe_batch()
        was_training = self.core.training
        self.core.eval()
        try:
            image, target = probe["input_image"], probe["target_image"]
            correction = correct(self.core, image, self.spec.residual_active)
            identity = identity_prediction(image)
            model_loss, _ = self._loss(correction, target)
            identity_loss, _ = composite_loss(identity.float(), target.float(),
                                              weights=self.config.loss_weights, residual_flow_lowres=None,
                                              final_grid=None, residual_terms=False, jacobian_term=False)
            return {
                "init_pred_max_abs_diff": float((correction.prediction - identity).abs().max()),
                "init_proxy_total": proxy_score_batch(correction.prediction.float(), target.float())["total"],
                "identity_proxy_total": proxy_score_batch(identity.float(), target.float())["total"],
                "init_loss": float(model_loss),
                "identity_loss": float(identity_loss),
                "init_params_max_abs_dev": float((correction.params - correction.params.new_tensor(
                    [0, 0, 0, 0, 0, 0, 0, 1.0])).abs().max()),
            }
        finally:
            self.core.train(was_training)

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict:
        cfg = self.config
        record: dict = {"kind": "val_epoch", "epoch": self.epoch, "step": self.global_step}

        def loss_fn(pred, target, correction):
            total, _ = self._loss(correction, target)
            return {"val_loss": total}

        if getattr(self.model, "broadcast_buffers", False):
            broadcast_buffers(self.core, self.dist)  # evaluate the model rank 0 saves, as DDP's next forward would
        need_baselines = self._baselines is None
        # A finite last training loss does not make the updated weights usable (a huge step can
        # overflow the next forward): outputs are checked here so such a run stops with
        # NonFiniteLossError instead of a ValueError deep inside the proxy.
        used = ("params", "residual_flow_lowres") if self.spec.residual_active else ("params",)
        # The unwrapped model: evaluation under no_grad needs none of DDP's collectives.
        checked = _FiniteOutputs(self.core, used, self._fail_non_finite_outputs).train(self.model.training)
        scores = score_subset(checked, self.val_loader, residual_active=self.spec.residual_active,
                              device=self.device, ground_truth=self.ground_truth, loss_fn=loss_fn,
                              with_baselines=need_baselines,
                              constant_lens=cfg.debug_instrumentation and self.epoch == cfg.epochs - 1)
        if need_baselines:
            self._baselines = {f"identity_proxy_{k}": v for k, v in scores.identity.items()}
            if scores.ground_truth is not None:
                self._baselines.update({f"gt_proxy_{k}": v for k, v in scores.ground_truth.items()})
        record.update({f"val_proxy_{k}": v for k, v in scores.model.items()})
        # beats_constant_lens: the model's own mean lens on every image (last epoch only: it costs a
        # second pass), and (fixtures) per-parameter correlation of the predictions with ground truth
        record.update({f"constant_lens_proxy_{k}": v for k, v in (scores.constant_lens or {}).items()})
        record.update({f"pred_gt_corr_{k}": v for k, v in (scores.param_correlations or {}).items()})
        record.update(self._baselines)
        record["val_sample_count"] = scores.sample_count
        record["val_loss"] = scores.loss_sums["val_loss"] / max(1, scores.sample_count)
        if cfg.debug_instrumentation:
            record.update(self._probe_metrics())
        if self.dist.enabled:
            record.update(self._rank_checksums(record))
        return record

    def _rank_checksums(self, record: dict) -> dict:
        """Every rank's parameter (and probe prediction) checksum, gathered: ranks_in_sync judges them."""
        mine = (record.get("param_checksum") or self.parameter_checksum(), record.get("probe_pred_checksum"))
        gathered = gather_objects(mine, self.dist)
        out = {"rank_param_checksums": [g[0] for g in gathered]}
        if mine[1] is not None:
            out["rank_probe_checksums"] = [g[1] for g in gathered]
        return out

    def _probe_metrics(self) -> dict:
        probe = self._probe_batch()
        decimals = self.config.debug_checksum_decimals
        was_training = self.core.training
        self.core.eval()
        try:
            correction = correct(self.core, probe["input_image"], self.spec.residual_active)
            _, components = self._loss(correction, probe["target_image"])
        finally:
            self.core.train(was_training)
        proxy = proxy_score_batch(correction.prediction.float(), probe["target_image"].float())
        return {
            "probe_pred_checksum": tensor_checksum(correction.prediction, decimals),
            "probe_final_grid_checksum": tensor_checksum(correction.warp.final_grid.permute(0, 3, 1, 2), decimals),
            "probe_params_checksum": tensor_checksum(correction.params, decimals + 1),
            "probe_proxy_total_score": proxy["total"],
            "probe_pixel": float(components["pixel"]),
            "probe_ssim": float(components["ssim"]),
            "probe_edge": float(components["edge"]),
            "probe_sample_count": int(probe["input_image"].shape[0]),
            "param_checksum": self.parameter_checksum(),
        }

    def parameter_checksum(self) -> str:
        """Digest of every parameter and floating-point buffer (batch-norm statistics), rounded like
        the probe at two more decimals, to compare ranks and runs."""
        tensors = [t for t in self.core.state_dict().values() if t.is_floating_point()]
        flat = torch.cat([t.detach().reshape(-1).float().cpu() for t in tensors])
        return tensor_checksum(flat, self.config.debug_checksum_decimals + 2)

    # ------------------------------------------------------------------ the loop
    def fit(self, *, resume_from: str | Path | None = None, init_from: str | Path | None = None) -> TrainResult:
        cfg = self.config
        torch.manual_seed(cfg.seed + self.dist.rank)
        start_epoch = 0
        if init_from is not None:
            state = ckpt.load_checkpoint(init_from, self.device)
            ckpt.load_model_weights(self.core, state, init_from)
            self.info(f"initialized model weights from {init_from} (stage {state.get('stage')})")
        if resume_from is not None:
            start_epoch = self._resume(resume_from)
            self.metrics.continue_from(self.global_step)
        else:
            self.metrics.start_fresh()
        self.metrics.write({"kind": "run_start", "stage": cfg.stage, "residual_branch_active": self.spec.residual_active,
                            "residual_terms": self.spec.residual_terms, "jacobian_term": self.spec.jacobian_term,
                            "device": str(self.device), "world_size": self.dist.world_size,
                            "amp": self.amp_enabled, "resumed_from": str(resume_from) if resume_from else None,
                            "init_from": str(init_from) if init_from else None,
                            "start_epoch": start_epoch, "config": to_dict(cfg),
                            "trainable_params": {n: sum(p.numel() for p in ps if p.requires_grad)
                                                 for n, ps in self.groups.items()}})
        if resume_from is None:
            init = self.init_check()
            init.update({"kind": "init", "from_checkpoint": init_from is not None})
            self.metrics.write(init)
        self._tools = None  # the delta tracker must start from the weights loaded above
        perf = _PerfTotals(cfg.debug_perf_warmup_steps)
        interrupted = False
        with StopRequest(self.info, self.dist, self.device) as self._stop:
            try:
                for epoch in range(start_epoch, cfg.epochs):
                    self._run_epoch(epoch, perf)
                    self._stop.check()
            except KeyboardInterrupt:
                interrupted = True
                path = self.save("interrupted.pt")
                self.metrics.write({"kind": "interrupted", "epoch": self.epoch, "step": self.global_step})
                self.info(f"interrupted: state saved to {path}")
            finally:
                summary = perf.summary()
                self.metrics.write({"kind": "run_end", "epoch": self.epoch, "step": self.global_step,
                                    "best_val_proxy_total": self.best_score, "best_epoch": self.best_epoch,
                                    "interrupted": interrupted, **summary})
                self.metrics.close()
        return TrainResult(self.out_dir, self.out_dir / "metrics.jsonl", self.best_score, self.best_epoch,
                           self.epoch + (0 if interrupted else 1), self.global_step,
                           summary.get("samples_per_sec"), interrupted)

    def _run_epoch(self, epoch: int, perf: "_PerfTotals") -> None:
        """Train one epoch (from where an interrupted one stopped), validate, checkpoint, log."""
        cfg = self.config
        self.epoch = epoch
        self._epoch_complete = False
        self._train_epoch(perf)
        record = self.validate()
        score = record["val_proxy_total"]
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_epoch = score, epoch
        record.update({"best_val_proxy_total": self.best_score, "is_best": improved})
        self.metrics.write(record)
        if self.schedule_total_steps is None:
            self._learn_schedule_length(self._steps_done_in_epoch)
        self._epoch_complete, self._steps_done_in_epoch = True, 0
        self.save("last.pt")
        if improved:
            self.save("best.pt")
        self.info(f"epoch {epoch + 1}/{cfg.epochs}: val proxy {score:.5f} "
                  f"(identity {record.get('identity_proxy_total', float('nan')):.5f}) "
                  f"val loss {record['val_loss']:.5f}" + ("  [best]" if improved else ""))
        self.metrics.write({"kind": "epoch_end", "epoch": epoch, "step": self.global_step, **perf.summary()})

    def _learn_schedule_length(self, steps_in_first_epoch: int) -> None:
        """A loader without len(): size the cosine schedule from the first epoch and apply it now."""
        self.schedule_total_steps = steps_in_first_epoch * self.config.epochs
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base_lr * self._lr_factor(self.scheduler.last_epoch)
        self.info(f"the train loader has no len(): cosine schedule set to {self.schedule_total_steps} "
                  f"steps from the first epoch's {steps_in_first_epoch}")

    def _resume(self, path: str | Path) -> int:
        state = ckpt.load_checkpoint(path, self.device)
        ckpt.load_model_weights(self.core, state, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.global_step = int(state["global_step"])
        if state.get("schedule_total_steps") is not None:
            self.schedule_total_steps = int(state["schedule_total_steps"])
        self.best_score = float(state["best_score"])
        self.best_epoch = int(state.get("best_epoch", -1))
        torch.set_rng_state(state["rng"])
        monitor_state = state.get("inactivity_monitor")
        if self._monitor is not None and monitor_state is not None:
            self._monitor.consecutive = int(monitor_state["consecutive"])
            self._monitor.fired = int(monitor_state["fired"])
        self.epoch = int(state["epoch"])
        if not state.get("epoch_complete", True):  # interrupted.pt: finish that epoch from its next batch
            done = self._steps_done_in_epoch = int(state.get("steps_done_in_epoch", 0))
            self.info(f"resumed from {path} in epoch {self.epoch + 1} after {done} of its steps")
            return self.epoch
        self.info(f"resumed from {path} after epoch {self.epoch + 1}")
        return self.epoch + 1

    def _train_epoch(self, perf: "_PerfTotals") -> None:
        cfg = self.config
        self.model.train()
        _set_epoch(self.train_loader, self.epoch)
        timer = self._step_tools().timer
        progress = _progress(self.steps_per_epoch, f"epoch {self.epoch + 1}/{cfg.epochs}",
                             cfg.progress and self.dist.is_main)
        iterator = iter(self.train_loader)
        # > 0 only when resuming from interrupted.pt: skip the batches that run already trained on
        for _ in range(self._steps_done_in_epoch):
            next(iterator, None)
        if progress is not None and self._steps_done_in_epoch:
            progress.update(self._steps_done_in_epoch)
        while cfg.max_steps_per_epoch is None or self._steps_done_in_epoch < cfg.max_steps_per_epoch:
            timer.start()
            wall_start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                break
            record, wall_ms = self._step_on(batch, wall_start)
            self._steps_done_in_epoch += 1
            perf.add(record["batch_size_global"], wall_ms, timer.phases)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
            if self.global_step % cfg.log_interval == 0:
                self.info(self._log_line(record))
            self._stop.check(self._stop_any_rank)
        if progress is not None:
            progress.close()

    def train_step(self, batch: Mapping) -> dict:
        """One optimizer step on ``batch``, exactly as :meth:`fit` runs it, and its ``train_step`` record.

        ``batch`` holds ``input_image`` and ``target_image`` ``(B, 3, H, W)`` (on any device; they are
        copied to the trainer's). Advances ``global_step`` and the schedule; the record is also written
        to ``metrics.jsonl`` while a run is open. ``data_time_ms`` then covers only the copy.
        """
        self.model.train()
        self._step_tools().timer.start()
        record, _ = self._step_on(batch, time.perf_counter())
        return record

    def _step_tools(self) -> "_StepTools":
        """Timer and parameter-delta tracker, made once and kept for the run."""
        if self._tools is None:
            cfg = self.config
            instrument = cfg.debug_instrumentation
            self._tools = _StepTools(
                timer=StepTimer(self.device, enabled=cfg.debug_perf_enabled or instrument),
                tracker=ParamDeltaTracker(self.groups) if instrument else None)
        return self._tools

    def _step_on(self, batch: Mapping, wall_start: float) -> tuple[dict, float]:
        """Copy, step, perf fields, ``global_step`` and the metrics write; the timer is already started."""
        tools = self._step_tools()
        image = batch["input_image"].to(self.device, non_blocking=True, memory_format=self.memory_format)
        target = batch["target_image"].to(self.device, non_blocking=True, memory_format=self.memory_format)
        tools.timer.mark("data")
        record = self._train_step(image, target, tools.timer, tools.tracker, self._monitor)
        self.global_step += 1
        wall_ms = (time.perf_counter() - wall_start) * 1000.0
        if self.config.debug_perf_enabled:
            record.update(self._perf_fields(tools.timer.phases, wall_ms, image.shape[0]))
        self.metrics.write(record)
        return record, wall_ms

    def _train_step(self, image, target, timer: StepTimer, tracker, monitor) -> dict:
        cfg = self.config
        instrument = cfg.debug_instrumentation
        with self._autocast():
            correction = correct(self.model, image, self.spec.residual_active)
            total, components = self._loss(correction, target)
        timer.mark("forward")
        if not torch.isfinite(total):
            self._fail_non_finite("loss", float(total.detach()), components)
        if not total.requires_grad:
            raise ValueError(
                f"the {self.spec.name} loss does not depend on any trainable parameter (it has no grad_fn): "
                f"is the model's output detached, or are all its parameters frozen?")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        timer.mark("backward")
        tensors: dict[str, torch.Tensor] = {"loss": total.detach()}
        tensors.update(components)
        if self.dist.enabled:
            # One all-reduce: the global batch's mean loss and components, and whether any rank was
            # asked to stop (so every rank stops after the same step without a collective of its own).
            names = list(tensors) + [_STOP_KEY]
            local = [tensors[n].detach().float().reshape(()) for n in names[:-1]]
            local.append(torch.tensor(float(self._stop.requested_here), device=self.device))
            tensors = dict(zip(names, all_reduce_mean(torch.stack(local), self.dist).unbind()))
        if instrument:
            # Read after backward, i.e. after DDP's all-reduce: the same on every rank.
            for name, value in grad_norms(self.groups).items():
                tensors[f"grad_norm_{name}"] = value.detach().float()
            timer.mark("instrumentation")
        grad_total = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip_norm)
        if not torch.isfinite(grad_total):
            self._fail_non_finite("gradient norm", float(grad_total), components)
        tensors["grad_norm_total"] = grad_total.detach()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it next)
        self.optimizer.step()
        self.scheduler.step()
        timer.mark("optim_step")
        if instrument:
            for name, value in tracker.measure().items():
                tensors[f"param_delta_{name}"] = value
            with torch.no_grad():
                warp = correction.warp
                fused = warp.final_grid is not warp.param_grid  # fuse_grid returns the parametric grid alone
                tensors.update(grid_statistics(warp.param_grid.detach().float(),
                                               warp.final_grid.detach().float() if fused else None))
                tensors["params_at_bound_frac"] = params_at_bound_fraction(correction.params.detach().float(),
                                                                           self.param_bounds)
                if correction.residual_flow_lowres is not None:
                    tensors["residual_flow_abs_mean_px"] = correction.residual_flow_lowres.detach().abs().mean()
        names = list(tensors)
        values = torch.stack([tensors[n].detach().to(self.device, torch.float64).reshape(())
                              for n in names]).cpu().tolist()
        # "step" counts optimizer steps including this one, like val_epoch / epoch_end records and
        # MetricsWriter.continue_from(global_step) expect.
        record = {"kind": "train_step", "epoch": self.epoch, "step": self.global_step + 1,
                  "lr": lr, "batch_size": int(image.shape[0]),
                  "batch_size_global": int(image.shape[0]) * self.dist.world_size,
                  "residual_branch_active": self.spec.residual_active}
        record.update(zip(names, values))
        if _STOP_KEY in record:
            self._stop_any_rank = record.pop(_STOP_KEY) > 0
        record["grad_clipped"] = bool(record["grad_norm_total"] > cfg.grad_clip_norm)
        if instrument:
            self._residual_flags(record, monitor)
            timer.mark("instrumentation")
        return record

    def _residual_flags(self, record: dict, monitor: ResidualInactivityMonitor | None) -> None:
        """Zero-gradient / zero-delta flags and the inactivity warning, aware of the stage."""
        if not self.spec.residual_active:
            # The stage switches the branch off: report it as off, not as a failure.
            record["residual_head_grad_is_zero"] = None
            record["residual_head_param_delta_is_zero"] = None
            return
        record["residual_head_grad_is_zero"] = record["grad_norm_residual_head"] == 0.0
        record["residual_head_param_delta_is_zero"] = record["param_delta_residual_head"] == 0.0
        if monitor is not None and monitor.update(record["residual_contrib_px_mean"]):
            message = (f"residual branch inactive: contribution below "
                       f"{monitor.threshold_px} px for {monitor.patience} consecutive steps "
                       f"(warning #{monitor.fired})")
            self.metrics.write({"kind": "warning", "name": "residual_inactive", "epoch": self.epoch,
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
            "samples_per_sec": batch * self.dist.world_size / (wall_ms / 1000.0),
        }
        fields["unaccounted_ms"] = wall_ms - sum(phases.values())
        fields.update(cuda_memory_mb(self.device))
        return fields

    def _fail_non_finite(self, what: str, value: float, components: dict, step: int | None = None) -> None:
        step = self.global_step + 1 if step is None else step
        finite = {k: float(v) for k, v in components.items()}
        bad = sorted(k for k, v in finite.items() if not math.isfinite(v))
        detail = f"; non-finite components: {bad or 'none'}" if components else ""
        message = (f"non-finite {what} ({value}) at epoch {self.epoch + 1}, step {step}{detail}. "
                   f"Lower the learning rate (lr={self.config.lr}) or check the inputs.")
        self.metrics.write({"kind": "error", "name": "non_finite", "epoch": self.epoch,
                            "step": step, "message": message, **finite})
        raise NonFiniteLossError(message)

    def _fail_non_finite_outputs(self, names: list[str]) -> None:
        self._fail_non_finite(f"model outputs in validation after the update: {', '.join(names)}",
                              math.nan, {}, step=self.global_step)

    def _log_line(self, r: dict) -> str:
        parts = [f"epoch {self.epoch + 1} step {self.global_step}", f"loss {r['loss']:.5f}", f"lr {r['lr']:.2e}"]
        if "grad_norm_backbone" in r:
            parts.append("grad " + " ".join(f"{g[:2]}={r[f'grad_norm_{g}']:.3g}" for g in GROUP_NAMES))
            parts.append(f"residual {r['residual_contrib_px_mean']:.3f}px")
        if "samples_per_sec" in r:
            parts.append(f"{r['samples_per_sec']:.1f} samples/s (data {r['data_time_ms']:.1f} ms)")
        return " | ".join(parts)


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


@dataclass
class _StepTools:
    timer: StepTimer
    tracker: ParamDeltaTracker | None


class _PerfTotals:
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


def _progress(total: int | None, desc: str, enabled: bool):
    """A progress bar on an interactive terminal; none in logs and CI (the log lines suffice there)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
