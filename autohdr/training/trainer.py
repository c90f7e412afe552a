"""The training loop; the runbook's instrumentation is attached as hooks (:mod:`autohdr.diagnosis.hooks`).

``Trainer(model, config, train_loader, val_loader, out_dir=...)`` trains any ``nn.Module`` whose
forward returns ``params`` (and optionally ``residual_flow_lowres``) on any iterables of batch
dicts (``input_image``, ``target_image`` ``(B, 3, H, W)``, optionally ``image_id``).

One step, and where each figure is taken::

    data -> on_train_batch_start -> forward (warp + loss) -> on_after_forward -> finite check
         -> backward -> [DDP: one all-reduce] -> on_after_backward (grad norms, before clipping)
         -> clip -> optimizer + scheduler -> on_train_batch_end (deltas, geometry, one host read)

Every step and every validation epoch goes to ``metrics.jsonl`` (see :mod:`autohdr.diagnosis.metrics_log`).
Only rank 0 writes files under torchrun.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from autohdr.diagnosis.hooks import Instrumentation, InstrumentationConfig, NonFiniteLossError, default_loss_fn
from autohdr.diagnosis.instrumentation import GROUP_NAMES, GroupMembers, parameter_groups, unwrap_model
from autohdr.diagnosis.observers.optimizer import optimizer_groups
from autohdr.lens.evaluation import correct
from autohdr.training.config import TrainConfig, to_dict
from autohdr.training.distributed import SINGLE, DistContext, all_reduce_mean, broadcast_buffers
from autohdr.training import checkpoint as ckpt
from autohdr.training.interrupts import StopRequest

__all__ = ["NonFiniteLossError", "Trainer", "TrainResult", "cosine_lr_factor", "EARLY_CHECK_STEPS"]

#: Steps after which ``Trainer.early_check`` is called (structural faults show in the first steps).
EARLY_CHECK_STEPS = 3


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
    """Stateful trainer: the model, the optimizer, the schedule, the checkpoints and the loop.

    Every measurement goes through :class:`~autohdr.diagnosis.hooks.Instrumentation` (``self.hooks``),
    the same hooks a hand-written loop calls; the trainer only decides when.
    """

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
        groups: Mapping[str, GroupMembers] | None = None,
        early_check: Callable[[str, int], None] | None = None,
    ) -> None:
        self.config = config
        #: ``early_check(point, step)`` at the points where structural signals are decided: ``"init"``
        #: (after the init check), ``"step"`` (after each of the first EARLY_CHECK_STEPS steps) and
        #: ``"validation"`` (after each validation). It may raise to stop the run (fail fast); the
        #: run still ends with its ``run_end`` record.
        self.early_check = early_check
        self.spec = config.spec
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.out_dir = Path(out_dir)
        self.dist = dist_ctx
        self.core = unwrap_model(model)
        groups_of = parameter_groups(self.core, groups)
        self.trainable = [p for name, ps in groups_of.items() for p in ps
                          if p.requires_grad and (self.spec.residual_active or name != "residual_head")]
        if not self.trainable:
            raise ValueError("the model has no trainable parameters for stage " + config.stage)
        # The optimizer and its schedule are built on first use (see ``optimizer``): torch imports
        # torch._dynamo on an optimizer's first add_param_group (~0.8 s here), and a fresh run's init
        # check does not need them, so an init fault stops the run before that cost.
        self._optimizer: torch.optim.Optimizer | None = None
        self._scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self._announced_groups: list[dict[str, Any]] | None = None  # run_start's, written before the optimizer
        self._loss_fn = default_loss_fn(self.spec, config.loss_weights)
        self.hooks = Instrumentation(self.model, None, self.out_dir, stage=config.stage, groups=groups,
                                     config=InstrumentationConfig.from_train_config(config), loss_fn=self._loss_fn,
                                     ground_truth=ground_truth, device=self.device, dist=dist_ctx, log=log,
                                     non_finite_hint=f"Lower the learning rate (lr={config.lr}) or check the inputs")
        self.groups = self.hooks.groups
        self.steps_per_epoch = _steps_per_epoch(train_loader, config.max_steps_per_epoch)
        # A loader without len() (and no max_steps_per_epoch): the schedule's length is learnt from
        # the first epoch, which runs at the peak rate after warm-up.
        self.schedule_total_steps: int | None = (self.steps_per_epoch * config.epochs
                                                 if self.steps_per_epoch is not None else None)
        self.amp_enabled = config.amp and self.device.type == "cuda"
        # torch 2.13's CPU backward of a strided 1x1 conv on channels_last tensors crashes: CUDA only.
        self.memory_format = (torch.channels_last if config.channels_last and self.device.type == "cuda"
                              else torch.preserve_format)
        if self.memory_format is torch.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._stop = StopRequest(self.info, self.dist, self.device)  # installed by fit() only
        self._stop_any_rank: bool | None = None  # under DDP: the last step's all-reduced stop request
        # Where an interrupted epoch stands (saved in checkpoints): interrupted.pt resumes there.
        self._steps_done_in_epoch = 0
        self._epoch_complete = True
        #: Seconds spent per part of :meth:`fit` (``init_check``, ``validation``, ``checkpoints``; the
        #: rest of ``fit`` is ``training``): what ``scripts/bench_verdict.py`` reports.
        self.timings: dict[str, float] = {"init_check": 0.0, "validation": 0.0, "checkpoints": 0.0, "fit": 0.0}

    # ------------------------------------------------------------------ the optimizer, built on first use
    def _adamw_hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.config.lr * self.spec.lr_scale, "weight_decay": self.config.weight_decay}

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """AdamW over ``self.trainable`` (one param group), built on first use with its LambdaLR schedule."""
        if self._optimizer is None:
            optimizer = torch.optim.AdamW(self.trainable, **self._adamw_hyperparameters())
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)  # sets step 0's rate
            built = optimizer_groups(optimizer, self.hooks.groups)
            if self._announced_groups is not None and built != self._announced_groups:
                raise RuntimeError(f"the optimizer's groups {built} differ from those run_start recorded "
                                   f"{self._announced_groups} (planned_optimizer_groups is out of date)")
            self._optimizer, self._scheduler = optimizer, scheduler
            self.hooks.set_optimizer(optimizer)
        return self._optimizer

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        """The cosine schedule (warm-up, then down to ``min_lr_ratio``) of :attr:`optimizer`."""
        self.optimizer  # noqa: B018  (builds both)
        assert self._scheduler is not None
        return self._scheduler

    def planned_optimizer_groups(self) -> list[dict[str, Any]]:
        """``run_start.optimizer_groups`` of the optimizer :attr:`optimizer` will build, without building it.

        AdamW's defaults (``betas``, ``eps``) come from its signature and ``lr`` is step 0's rate
        (the schedule's warm-up factor applied, as LambdaLR sets it); ``optimizer`` checks on first
        use that the groups it built read the same.
        """
        defaults = {name: param.default for name, param in inspect.signature(torch.optim.AdamW).parameters.items()
                    if param.default is not inspect.Parameter.empty}
        hyperparameters = self._adamw_hyperparameters()
        hyperparameters["lr"] *= self._lr_factor(0)
        group = {**defaults, **hyperparameters, "params": self.trainable}
        return optimizer_groups(SimpleNamespace(param_groups=[group]), self.hooks.groups)

    @contextmanager
    def _timed(self, part: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[part] += time.perf_counter() - started

    # ------------------------------------------------------------------ state kept by the hooks
    @property
    def global_step(self) -> int:
        return self.hooks.global_step

    @property
    def epoch(self) -> int:
        return self.hooks.epoch

    @property
    def best_score(self) -> float:
        return self.hooks.best_score

    @property
    def best_epoch(self) -> int:
        return self.hooks.best_epoch

    @property
    def metrics(self):
        return self.hooks.metrics

    @property
    def param_bounds(self):
        """The 8 ``(lo, hi)`` bounds ``params_at_bound_frac`` is judged against."""
        return self.hooks.param_bounds

    # ------------------------------------------------------------------ helpers
    def _lr_factor(self, step: int) -> float:
        """LambdaLR multiplier of optimizer step ``step`` (0-based)."""
        cfg = self.config
        # Length unknown until the first epoch ends: an endless schedule (warm-up, then the peak).
        total = math.inf if self.schedule_total_steps is None else self.schedule_total_steps
        return cosine_lr_factor(step, total, cfg.warmup_steps, cfg.min_lr_ratio)

    def info(self, message: str) -> None:
        self.hooks.info(message)

    def _autocast(self):
        if not self.amp_enabled:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)

    def probe_batch(self) -> dict:
        """The fixed probe: the first ``debug_probe_max_samples`` validation samples."""
        return self.hooks.probe_batch(self.val_loader)

    _probe_batch = probe_batch

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
            # the hooks' counters and every observer's state (the best score, the inactivity count, the
            # epoch in hand's training losses and ids...): a resume mid-epoch continues them exactly
            "instrumentation": self.hooks.state_dict(),
        }
        model_config = getattr(self.core, "config", None)
        if model_config is not None and hasattr(model_config, "__dataclass_fields__"):
            payload["model_config"] = to_dict(model_config)
        return payload

    def save(self, name: str) -> Path | None:
        if not self.dist.is_main:
            return None
        with self._timed("checkpoints"):
            return ckpt.save_atomic(self._checkpoint_payload(), self.out_dir / name)

    # ------------------------------------------------------------------ evaluation
    def init_check(self) -> dict:
        """Before any step: does the model predict the identity warp, with identity's proxy and loss?"""
        self.probe_batch()
        return self.hooks.init_check()

    def validate(self) -> dict:
        """The ``val_epoch`` figures of the model as it is now (not written, best not tracked)."""
        self._sync_buffers()
        return self.hooks.evaluate(self.val_loader)

    def _sync_buffers(self) -> None:
        if getattr(self.model, "broadcast_buffers", False):
            broadcast_buffers(self.core, self.dist)  # evaluate the model rank 0 saves, as DDP's next forward would

    def optimizer_coverage(self) -> dict | None:
        """The optimizer coverage so far (``run_end.optimizer_coverage`` as it would read now)."""
        return self.hooks.optimizer_coverage()

    def parameter_checksum(self) -> str:
        """Digest of every parameter and floating-point buffer (see ``Instrumentation.parameter_checksum``)."""
        return self.hooks.parameter_checksum()

    # ------------------------------------------------------------------ the loop
    def fit(self, *, resume_from: str | Path | None = None, init_from: str | Path | None = None) -> TrainResult:
        with self._timed("fit"):
            return self._fit(resume_from=resume_from, init_from=init_from)

    def _fit(self, *, resume_from: str | Path | None, init_from: str | Path | None) -> TrainResult:
        cfg = self.config
        torch.manual_seed(cfg.seed + self.dist.rank)
        start_epoch = 0
        if init_from is not None:
            state = ckpt.load_checkpoint(init_from, self.device)
            ckpt.load_model_weights(self.core, state, init_from)
            self.info(f"initialized model weights from {init_from} (stage {state.get('stage')})")
        if resume_from is not None:
            start_epoch = self._resume(resume_from)
        info: dict[str, Any] = {"amp": self.amp_enabled, "resumed_from": str(resume_from) if resume_from else None,
                                "init_from": str(init_from) if init_from else None,
                                "start_epoch": start_epoch, "config": to_dict(cfg)}
        if self._optimizer is None:  # a fresh run: the optimizer is built after the init check
            info["optimizer_groups"] = self._announced_groups = self.planned_optimizer_groups()
        with self._timed("init_check"):
            self.hooks.on_train_start(self.val_loader,
                                      resume_step=self.global_step if resume_from is not None else None, info=info)
        interrupted = False
        with StopRequest(self.info, self.dist, self.device) as self._stop:
            try:
                # inside the try: a run stopped at the init check also ends with run_end, its file closed
                if self.early_check is not None and resume_from is None:
                    self.early_check("init", self.global_step)
                self.optimizer  # noqa: B018  (built now: after the init check, before the first step)
                for epoch in range(start_epoch, cfg.epochs):
                    self._run_epoch(epoch)
                    self._stop.check()
            except KeyboardInterrupt:
                interrupted = True
                path = self.save("interrupted.pt")
                self.hooks.write({"kind": "interrupted", "epoch": self.epoch, "step": self.global_step})
                self.info(f"interrupted: state saved to {path}")
            finally:
                summary = self.hooks.on_train_end(interrupted=interrupted)
        return TrainResult(self.out_dir, self.out_dir / "metrics.jsonl", self.best_score, self.best_epoch,
                           self.epoch + (0 if interrupted else 1), self.global_step,
                           summary.get("samples_per_sec"), interrupted)

    def _run_epoch(self, epoch: int) -> None:
        """Train one epoch (from where an interrupted one stopped), validate, checkpoint, log."""
        self._epoch_complete = False
        self.hooks.on_train_epoch_start(epoch)
        self._train_epoch()
        final = epoch == self.config.epochs - 1
        record = None
        if final or (epoch + 1) % self.config.validation_interval == 0:
            with self._timed("validation"):
                self._sync_buffers()
                record = self.hooks.on_validation(self.val_loader, final=final)
            if self.early_check is not None:
                self.early_check("validation", self.global_step)
        if self.schedule_total_steps is None:
            self._learn_schedule_length(self._steps_done_in_epoch)
        self._epoch_complete, self._steps_done_in_epoch = True, 0
        if record is None:
            self.info(f"epoch {epoch + 1}/{self.config.epochs}: trained (validation every "
                      f"{self.config.validation_interval} epochs)")
        else:
            # last.pt with each validation and after the last epoch (a save every epoch was 8 % of the overfit
            # preset's 0.2 s epochs); a run stopped between validations saves interrupted.pt where it stops
            self.save("last.pt")
            if record["is_best"]:
                self.save("best.pt")
            self.info(f"epoch {epoch + 1}/{self.config.epochs}: val proxy {record['val_proxy_total']:.5f} "
                      f"(identity {record.get('identity_proxy_total', float('nan')):.5f}) "
                      f"val loss {record['val_loss']:.5f}" + ("  [best]" if record["is_best"] else ""))
        self.hooks.on_train_epoch_end()

    def _learn_schedule_length(self, steps_in_first_epoch: int) -> None:
        """A loader without len(): size the cosine schedule from the first epoch and apply it now."""
        self.schedule_total_steps = steps_in_first_epoch * self.config.epochs
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base_lr * self._lr_factor(self.scheduler.last_epoch)
        self.info(f"the train loader has no len(): cosine schedule set to {self.schedule_total_steps} "
                  f"steps from the first epoch's {steps_in_first_epoch}")

    def _resume(self, path: str | Path) -> int:
        state = ckpt.load_checkpoint(path, self.device)
        trained = int(state["epoch"]) + (1 if state.get("epoch_complete", True) else 0)
        if self.config.epochs < trained:
            raise ValueError(f"epochs={self.config.epochs} is fewer than the {trained} epoch(s) {path} has already "
                             f"trained: resume with more epochs, or start from its weights with --init-from")
        ckpt.load_model_weights(self.core, state, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("schedule_total_steps") is not None:
            saved = state.get("config")
            self._resume_schedule(int(state["schedule_total_steps"]),
                                  saved.get("epochs") if isinstance(saved, dict) else None, path)
        torch.set_rng_state(state["rng"])
        # a checkpoint of an earlier release has no "instrumentation": its top level is the flat state
        self.hooks.load_state_dict(state.get("instrumentation", state))
        if not state.get("epoch_complete", True):  # interrupted.pt: finish that epoch from its next batch
            done = self._steps_done_in_epoch = int(state.get("steps_done_in_epoch", 0))
            self.info(f"resumed from {path} in epoch {self.epoch + 1} after {done} of its steps")
            return self.epoch
        self.info(f"resumed from {path} after epoch {self.epoch + 1}")
        return self.epoch + 1

    def _resume_schedule(self, saved_total: int, saved_epochs: int | None, path: str | Path) -> None:
        """Keep the checkpoint's cosine length, or recompute it when this run plans another one
        (``epochs`` changed, or the steps per epoch did) and say so: from the resumed step on, the
        learning rate is the one a run planned this long from the start would use."""
        planned = self.schedule_total_steps
        if planned is None and saved_epochs and saved_epochs != self.config.epochs:
            planned = saved_total // saved_epochs * self.config.epochs  # a loader without len(): scale per epoch
        if planned is None or planned == saved_total:
            self.schedule_total_steps = saved_total
            return
        self.schedule_total_steps = planned
        step = self.scheduler.last_epoch
        before = self.optimizer.param_groups[0]["lr"]
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base_lr * self._lr_factor(step)
        self.info(f"resume: {path} was planned for {saved_epochs} epochs ({saved_total} steps), this run for "
                  f"{self.config.epochs} ({planned} steps): cosine schedule recomputed, the learning rate continues at "
                  f"step {step} of it ({before:.3g} -> {self.optimizer.param_groups[0]['lr']:.3g})")

    def _train_epoch(self) -> None:
        cfg = self.config
        self.model.train()
        _set_epoch(self.train_loader, self.epoch)
        progress = _progress(self.steps_per_epoch, f"epoch {self.epoch + 1}/{cfg.epochs}",
                             cfg.progress and self.dist.is_main)
        iterator = iter(self.train_loader)
        # > 0 only when resuming from interrupted.pt: skip the batches that run already trained on
        for _ in range(self._steps_done_in_epoch):
            next(iterator, None)
        if progress is not None and self._steps_done_in_epoch:
            progress.update(self._steps_done_in_epoch)
        while cfg.max_steps_per_epoch is None or self._steps_done_in_epoch < cfg.max_steps_per_epoch:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            record = self._step_on(batch)
            self._steps_done_in_epoch += 1
            if self.early_check is not None and self.global_step <= EARLY_CHECK_STEPS:
                self.early_check("step", self.global_step)
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
        self.hooks.on_train_epoch_start(self.epoch)
        return self._step_on(batch)

    def _step_on(self, batch: Mapping) -> dict:
        """One step: copy, forward, backward, clip, optimizer, schedule, with the hooks in between."""
        cfg, hooks = self.config, self.hooks
        image = batch["input_image"].to(self.device, non_blocking=True, memory_format=self.memory_format)
        target = batch["target_image"].to(self.device, non_blocking=True, memory_format=self.memory_format)
        hooks.on_train_batch_start({"input_image": image, "target_image": target,
                                    "image_id": batch.get("image_id", [])})
        with self._autocast():
            correction = correct(self.model, image, self.spec.residual_active)
            total, components = self._loss_fn(correction, target)
        hooks.on_after_forward()
        if not torch.isfinite(total):
            hooks.fail_non_finite("loss", float(total.detach()), components)
        if not total.requires_grad:
            raise ValueError(
                f"the {self.spec.name} loss does not depend on any trainable parameter (it has no grad_fn): "
                f"is the model's output detached, or are all its parameters frozen?")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.dist.enabled:
            total, components = self._all_reduce(total.detach(), components)
        hooks.on_after_backward()
        grad_total = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip_norm)
        if not torch.isfinite(grad_total):
            hooks.fail_non_finite("gradient norm", float(grad_total), components)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it next)
        self.optimizer.step()
        self.scheduler.step()
        return hooks.on_train_batch_end(total, correction, components=components, batch_size=int(image.shape[0]),
                                        lr=lr, grad_norm_total=grad_total, clip_norm=cfg.grad_clip_norm)

    def _all_reduce(self, total: torch.Tensor, components: dict) -> tuple[torch.Tensor, dict]:
        """One all-reduce: the global batch's mean loss and components, and whether any rank was asked
        to stop (so every rank stops after the same step without a collective of its own)."""
        names = list(components)
        local = [total.float().reshape(())] + [components[n].detach().float().reshape(()) for n in names]
        local.append(torch.tensor(float(self._stop.requested_here), device=self.device))
        reduced = all_reduce_mean(torch.stack(local), self.dist)
        self._stop_any_rank = bool(reduced[-1] > 0)
        return reduced[0], dict(zip(names, reduced[1:-1].unbind()))

    def _log_line(self, r: dict) -> str:
        parts = [f"epoch {self.epoch + 1} step {self.global_step}", f"loss {r['loss']:.5f}", f"lr {r['lr']:.2e}"]
        norms = [f"{g[:2]}={r[f'grad_norm_{g}']:.3g}" for g in GROUP_NAMES if f"grad_norm_{g}" in r]
        if norms:
            parts.append("grad " + " ".join(norms))
        if "residual_contrib_px_mean" in r:
            parts.append(f"residual {r['residual_contrib_px_mean']:.3f}px")
        if "samples_per_sec" in r:
            parts.append(f"{r['samples_per_sec']:.1f} samples/s (data {r['data_time_ms']:.1f} ms)")
        return " | ".join(parts)


def _progress(total: int | None, desc: str, enabled: bool):
    """A progress bar on an interactive terminal; none in logs and CI (the log lines suffice there)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
