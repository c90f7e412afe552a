"""``autohdr.attach``: the runbook's instrumentation on an unmodified training loop.

The loop keeps its own shape (one fused ``train_step`` doing forward, loss, backward, clipping and
``optimizer.step()``; its own schedule, autocast, GradScaler and ``validate()``). attach watches it
through torch's own hook points and feeds the same :class:`~autohdr.diagnosis.hooks.Instrumentation`
the Trainer uses, so ``metrics.jsonl`` and ``autohdr judge`` are the same::

    run = autohdr.attach(model, optimizer, "runs/mine", stage="stage2_hybrid", val_loader=val_loader,
                         loss=loss_module)            # or loss_fn = autohdr.watch_loss(loss_fn)
    ...the loop, unchanged...
    run.close()                                       # or: with autohdr.attach(...): ...

Where each figure is taken::

    model forward pre-hook (grad on, train mode)   the batch: data time ends, value range, fingerprint
    model forward hook                             params and flow of the step (geometry figures)
    loss forward hook / watch_loss                 the total and its parts
    post-accumulate-grad hook, every parameter     squared gradient norm, before any clipping
    optimizer step pre-hook                        group norms; the norm the optimizer sees (clipped?)
    optimizer step post-hook                       parameter deltas, every group's lr: the step record
    model forward with grad off                    the loop's own validation (and its train/eval mode)

A training forward that no optimizer step follows (GradScaler skipped it, or gradient accumulation)
is counted, never recorded as a step. Validation (autohdr's proxy, baselines and probe on
``val_loader``) runs every ``val_every`` steps, else at the loop's own validation points, and once
more at :meth:`Attachment.close` (the final one, with the constant lens).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from autohdr.diagnosis.hooks import Instrumentation, InstrumentationConfig, LossFn
from autohdr.diagnosis.instrumentation import GroupMembers
from autohdr.diagnosis.run_intent import check_intent
from autohdr.lens.evaluation import Correction
from autohdr.lens.geometry import WarpResult, brown_conrady_grid, fuse_grid, warp


class LossWatch:
    """A loss function whose every call is seen by the attachments watching it.

    Returned by :func:`watch_loss`; calls ``fn`` unchanged and returns what it returns. The result
    may be a 0-d tensor, a ``(total, {name: 0-d tensor})`` tuple or a mapping with ``loss`` /
    ``total`` and the parts."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.listeners: list[Callable[[Any], None]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.fn(*args, **kwargs)
        if torch.is_grad_enabled():
            for listener in self.listeners:
                listener(result)
        return result


def watch_loss(fn: Callable[..., Any]) -> LossWatch:
    """Wrap a plain loss function so :func:`attach` sees the total and its parts (an ``nn.Module``
    loss needs no wrapping: pass it as ``attach(..., loss=module)``)."""
    return fn if isinstance(fn, LossWatch) else LossWatch(fn)


def split_loss(result: Any) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """``(total, parts)`` of a loss function's result (see :class:`LossWatch`); parts are 0-d tensors."""
    if isinstance(result, torch.Tensor):
        return result, {}
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], torch.Tensor):
        parts = result[1] if len(result) > 1 and isinstance(result[1], Mapping) else {}
        return result[0], _scalar_parts(parts)
    if isinstance(result, Mapping):
        total = result.get("loss", result.get("total"))
        parts = {k: v for k, v in result.items() if k not in ("loss", "total")}
        return (total if isinstance(total, torch.Tensor) else None), _scalar_parts(parts)
    return None, {}


def _scalar_parts(parts: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {str(k): v.detach().float().reshape(()) for k, v in parts.items()
            if isinstance(v, torch.Tensor) and v.numel() == 1}


class Attachment:
    """The hooks of one :func:`attach`; :meth:`close` writes ``run_end`` and removes them."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: str | Path, *,
                 stage: str, val_loader: Iterable[Mapping] | None, loss: nn.Module | LossWatch | None,
                 groups: Mapping[str, GroupMembers] | None, intent: str, val_every: int | None,
                 scaler: Any | None, loss_fn: LossFn | None, config: InstrumentationConfig | None,
                 ground_truth: Mapping[str, torch.Tensor] | None, judge_config: Mapping[str, Any] | None,
                 param_bounds: Any, log: Callable[[str], None] | None) -> None:
        if val_every is not None and val_every < 1:
            raise ValueError(f"val_every must be a positive number of steps or None; got {val_every!r}")
        if loss is not None and not isinstance(loss, (nn.Module, LossWatch)):
            raise TypeError("loss must be the loop's loss nn.Module, or its loss function wrapped with "
                            f"autohdr.watch_loss(fn) (and the loop calling the wrapper); got {type(loss).__name__}")
        self.hooks = Instrumentation(model, optimizer, run_dir, stage=stage, groups=groups, config=config,
                                     loss_fn=loss_fn, ground_truth=ground_truth, param_bounds=param_bounds, log=log)
        self.hooks.run_info = {"intent": check_intent(intent), "attached": True}
        if judge_config is not None:
            self.hooks.run_info["judge_config"] = dict(judge_config)
        self.model, self.optimizer, self.scaler = self.hooks.core, optimizer, scaler
        self.val_loader, self.val_every = val_loader, val_every
        self._handles: list[Any] = []
        self._internal = False            # True while autohdr itself runs the model (probe, validation)
        self._step_open = False           # a training forward was seen and its step not yet taken
        self._step_image: torch.Tensor | None = None
        self._step_outputs: Mapping[str, Any] | None = None
        self._loss: tuple[torch.Tensor | None, dict[str, torch.Tensor]] = (None, {})
        self._grad_sq: dict[int, torch.Tensor] = {}
        self._loop_val = {"forwards": 0, "train_mode_forwards": 0}
        self._steps_since_validation = 0
        self._pre_clip_total: torch.Tensor | None = None
        self._at_step: torch.Tensor | None = None
        self.skipped_steps = 0
        self.closed = False
        self._owner = {id(p): name for name, ps in self.hooks.measured_groups.items() for p in ps}
        self._register(loss)
        self._guarded(lambda: self.hooks.on_train_start(val_loader))
        self.hooks.on_train_epoch_start(0)

    # ------------------------------------------------------------------ registration
    def _register(self, loss: nn.Module | LossWatch | None) -> None:
        model = self.model
        self._handles.append(model.register_forward_pre_hook(self._before_forward))
        self._handles.append(model.register_forward_hook(self._after_forward))
        for param in model.parameters():
            if param.requires_grad:
                self._handles.append(param.register_post_accumulate_grad_hook(self._on_grad))
        self._handles.append(self.optimizer.register_step_pre_hook(self._before_step))
        self._handles.append(self.optimizer.register_step_post_hook(self._after_step))
        if isinstance(loss, nn.Module):
            self._handles.append(loss.register_forward_hook(lambda module, args, out: self._on_loss(out)))
        elif isinstance(loss, LossWatch):
            loss.listeners.append(self._on_loss)
            self._handles.append(_ListenerHandle(loss.listeners, self._on_loss))

    def _guarded(self, fn: Callable[[], Any]) -> Any:
        """Run autohdr's own model calls without the hooks taking them for the loop's."""
        self._internal = True
        try:
            return fn()
        finally:
            self._internal = False

    # ------------------------------------------------------------------ hook points
    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        if self._internal or not args or not isinstance(args[0], torch.Tensor):
            return
        if not (torch.is_grad_enabled() and module.training):
            self._loop_val["forwards"] += 1
            self._loop_val["train_mode_forwards"] += int(module.training)
            return
        if self._loop_val["forwards"]:
            self._end_of_loop_validation()
        if self._step_open:  # the previous training forward got no optimizer step (skipped or accumulated)
            self.skipped_steps += 1
        else:
            self.hooks.on_train_batch_start({"input_image": args[0]})
        self._step_open = True
        self._step_image = args[0]

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._internal and self._step_open and torch.is_grad_enabled() and module.training:
            self._step_outputs = output if isinstance(output, Mapping) else None

    def _on_loss(self, result: Any) -> None:
        if not self._internal and torch.is_grad_enabled():
            self._loss = split_loss(result)

    def _on_grad(self, param: torch.Tensor) -> None:
        if param.grad is not None and not self._internal:
            self._grad_sq[id(param)] = param.grad.detach().float().square().sum()

    def _scale(self) -> torch.Tensor | float:
        """The GradScaler's scale, without the host read ``get_scale()`` makes (a power of two: dividing
        by it as a tensor or as a float gives the same bits)."""
        if self.scaler is None or not self.scaler.is_enabled():
            return 1.0
        scale = getattr(self.scaler, "_scale", None)
        return scale if isinstance(scale, torch.Tensor) else float(self.scaler.get_scale())

    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if not self._step_open:
            return
        scale = self._scale()
        by_group: dict[str, list[torch.Tensor]] = {name: [] for name in self.hooks.measured_groups}
        for pid, value in self._grad_sq.items():
            name = self._owner.get(pid)
            if name is not None:
                by_group[name].append(value)
        norms = {name: (torch.stack(v).sum().sqrt() / scale if v else torch.zeros(()))
                 for name, v in by_group.items()}
        self.hooks.on_after_backward(norms)
        self._pre_clip_total = (torch.stack(list(self._grad_sq.values())).sum().sqrt() / scale
                                if self._grad_sq else None)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self._at_step = torch.nn.utils.get_total_norm(grads, 2.0) if grads else None

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if not self._step_open:
            return
        total, parts = self._loss
        if total is None:
            raise RuntimeError(
                "autohdr.attach saw an optimizer step but no loss: pass the loop's loss module as "
                "attach(..., loss=module), or wrap its loss function with loss_fn = autohdr.watch_loss(loss_fn)")
        correction = self._correction()
        self.hooks.on_train_batch_end(total, correction, components=parts,
                                      batch_size=int(self._step_image.shape[0]),
                                      grad_norm_total=self._pre_clip_total, grad_norm_at_step=self._at_step)
        self._step_open, self._step_outputs, self._loss, self._grad_sq = False, None, (None, {}), {}
        self._steps_since_validation += 1
        if self.val_every is not None and self.hooks.global_step % self.val_every == 0:
            self._validate(final=False)

    def _correction(self) -> Correction | None:
        outputs = self._step_outputs
        if not outputs or not isinstance(outputs.get("params"), torch.Tensor) or self._step_image is None:
            return None
        with torch.no_grad():
            image = self._step_image.detach().float()
            params = outputs["params"].detach().float()
            flow = outputs.get("residual_flow_lowres") if self.hooks.spec.residual_active else None
            flow = flow.detach().float() if isinstance(flow, torch.Tensor) else None
            # the grids only, as apply_correction builds them: nothing per step reads the warped image
            param_grid = brown_conrady_grid(params.to(image.dtype), image.shape[-2], image.shape[-1])
            return _GridsOnly(params, flow, WarpResult(None, param_grid, fuse_grid(param_grid, flow)), image)

    # ------------------------------------------------------------------ validation
    def _end_of_loop_validation(self) -> None:
        """The loop ran the model with gradients off since the last step: its own validation."""
        self._record_loop_validation()
        if self.val_every is None:
            self._validate(final=False)

    def _validate(self, *, final: bool) -> None:
        if self.val_loader is None or (self._steps_since_validation == 0 and not final):
            return
        self._guarded(lambda: self.hooks.on_validation(self.val_loader, final=final))
        self.hooks.on_train_epoch_end()
        self._steps_since_validation = 0
        self.hooks.on_train_epoch_start(self.hooks.epoch + 1)

    # ------------------------------------------------------------------ end
    def close(self, *, interrupted: bool = False) -> None:
        """Final validation (with the constant lens), ``run_end``, and every hook removed."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._loop_val["forwards"]:
                self._record_loop_validation()
            if self._steps_since_validation and self.val_loader is not None:
                self._guarded(lambda: self.hooks.on_validation(self.val_loader, final=True))
                self.hooks.on_train_epoch_end()
            self.hooks.on_train_end(interrupted=interrupted, skipped_steps=self.skipped_steps)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def _record_loop_validation(self) -> None:
        seen, self._loop_val = dict(self._loop_val), {"forwards": 0, "train_mode_forwards": 0}
        self.hooks.write({"kind": "loop_validation", "epoch": self.hooks.epoch, "step": self.hooks.global_step,
                          "loop_val_forwards": seen["forwards"],
                          "loop_val_train_mode_forwards": seen["train_mode_forwards"]})

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(interrupted=exc_type is KeyboardInterrupt)


class _GridsOnly(Correction):
    """A step's :class:`Correction` whose warped image is made only if something asks for it."""

    @cached_property
    def prediction(self) -> torch.Tensor:
        with torch.no_grad():
            return warp(self.image, self.warp.final_grid)


class _ListenerHandle:
    def __init__(self, listeners: list, listener: Callable) -> None:
        self.listeners, self.listener = listeners, listener

    def remove(self) -> None:
        if self.listener in self.listeners:
            self.listeners.remove(self.listener)


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, run_dir: str | Path, *,
           stage: str = "stage2_hybrid", val_loader: Iterable[Mapping] | None = None,
           loss: nn.Module | LossWatch | None = None, groups: Mapping[str, GroupMembers] | None = None,
           intent: str = "training", val_every: int | None = None, scaler: Any | None = None,
           loss_fn: LossFn | None = None, config: InstrumentationConfig | None = None,
           ground_truth: Mapping[str, torch.Tensor] | None = None, judge_config: Mapping[str, Any] | None = None,
           param_bounds: Any = None, log: Callable[[str], None] | None = None) -> Attachment:
    """Instrument an unmodified training loop; returns the :class:`Attachment` (close it at the end,
    or use it as a context manager).

    Args:
        model: maps ``(B, 3, H, W)`` images to ``{"params": (B, 8)}`` and optionally
            ``"residual_flow_lowres": (B, 2, h, w)`` (the ``--model-factory`` contract).
        optimizer: the loop's optimizer (any param groups; each group's lr is recorded).
        run_dir: the run folder; one that already holds a run is refused.
        stage: ``stage1_param_only``, ``stage2_hybrid`` or ``stage3_finetune`` (is the residual on).
        val_loader: batches with ``input_image`` / ``target_image`` (and ``image_id``): the probe,
            the init check and autohdr's validation. Without it those signals are ``n/a``.
        loss: the loop's loss ``nn.Module``, or its loss function wrapped by :func:`watch_loss`.
        groups: backbone / param_head / residual_head module prefixes (see ``--groups``).
        intent: ``overfit`` (train == val), ``probe`` or ``training``: what ``autohdr judge`` expects.
        val_every: validate every N optimizer steps; default at the loop's own validation points.
        scaler: the loop's ``GradScaler``, so gradient norms are read unscaled.
        loss_fn: ``(correction, target) -> (total, parts)`` for the init check and ``val_loss``
            (default autohdr's loss for ``stage``).
    """
    return Attachment(model, optimizer, run_dir, stage=stage, val_loader=val_loader, loss=loss, groups=groups,
                      intent=intent, val_every=val_every, scaler=scaler, loss_fn=loss_fn, config=config,
                      ground_truth=ground_truth, judge_config=judge_config, param_bounds=param_bounds, log=log)
