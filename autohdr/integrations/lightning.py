"""``AutohdrCallback``: the runbook's instrumentation on a PyTorch Lightning ``Trainer``.

Needs the ``lightning`` extra (``pip install 'autohdr[lightning]'``: ``pytorch-lightning`` 2.6). The
callback feeds the same public :class:`~autohdr.diagnosis.hooks.Instrumentation` hooks autohdr's own
Trainer and a hand-written loop call, so ``metrics.jsonl`` and ``autohdr judge RUN`` are the same::

    from autohdr.integrations.lightning import AutohdrCallback
    trainer = pl.Trainer(callbacks=[AutohdrCallback("runs/mine", val_loader=val_loader, intent="probe")],
                         gradient_clip_val=5.0, ...)
    # in the LightningModule's training_step (correction = autohdr.lens.evaluation.correct(...)):
    return {"loss": loss, "correction": correction, "parts": parts}

Where each figure is taken, on Lightning's hooks (automatic optimization)::

    on_fit_start               the run folder is refused if it holds a run; the hooks are built
    on_train_start             run_start (intent, clip, every param group) + identity-at-init on the probe
    on_train_epoch_start       the epoch (trainer.current_epoch)
    on_train_batch_start       the batch is on the device: data time ends; value range, fingerprint
    on_before_optimizer_step   group gradient norms and the total, before Lightning clips
    on_train_batch_end         after the step: deltas, geometry, the lr every group stepped with
    on_train_epoch_end         autohdr's validation on ``val_loader`` (the last one final), epoch_end
    on_train_end / on_exception  run_end; the file is closed
    state_dict / load_state_dict   the hooks' counters ride in Lightning's checkpoints (resume)

Lightning runs the optimizer with a closure (forward and backward happen inside
``optimizer.step``), so torch's optimizer step hooks cannot see the gradients; its own
``on_before_optimizer_step`` can, after any GradScaler unscaling and before clipping.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn as nn

try:
    import pytorch_lightning as pl
except ImportError as error:  # raised as ModuleNotFoundError so pytest.importorskip skips on it
    raise ModuleNotFoundError(
        f"autohdr.integrations.lightning needs pytorch-lightning 2.6: pip install 'autohdr[lightning]' ({error})",
        name="pytorch_lightning") from error

from autohdr.attachment import split_loss
from autohdr.diagnosis.hooks import Instrumentation, InstrumentationConfig, LossFn
from autohdr.diagnosis.instrumentation import GROUP_NAMES, GroupMembers
from autohdr.diagnosis.run_intent import check_intent, refuse_existing_run
from autohdr.lens.evaluation import Correction

__all__ = ["AutohdrCallback"]


class AutohdrCallback(pl.Callback):
    """Write the runbook's ``metrics.jsonl`` for a Lightning run; ``autohdr judge RUN_DIR`` judges it.

    The LightningModule's ``training_step`` returns ``{"loss": loss, "correction": correction,
    "parts": parts}``: ``correction`` is the step's :class:`~autohdr.lens.evaluation.Correction`
    (``correct(model, image, residual_active)``; without it the step's geometry figures are missing)
    and ``parts`` the loss components as 0-d tensors (other 0-d tensors beside ``loss`` count too).
    A plain loss tensor is accepted and records the loss alone.

    Args:
        run_dir: the run folder (``metrics.jsonl``); one that already holds a run is refused
            (:class:`~autohdr.diagnosis.run_intent.ExistingRunError`) unless Lightning resumes this
            callback's state from a checkpoint (``trainer.fit(..., ckpt_path=...)``).
        val_loader: batches with ``input_image`` / ``target_image`` ``(B, 3, H, W)`` (and
            ``image_id``): the probe, the init check and autohdr's validation at the end of every
            ``every_n_epochs``-th epoch and of the last. Without it those signals are ``n/a``.
        stage: ``stage1_param_only``, ``stage2_hybrid`` or ``stage3_finetune`` (is the residual on).
        intent: ``overfit`` (train == val), ``probe`` or ``training``: what ``autohdr judge`` expects.
        model: the attribute path of the LightningModule holding the lens model (``"model"`` for
            ``self.model``); default the one child module with ``backbone`` / ``param_head`` /
            ``residual_head`` submodules or a ``parameter_groups()`` method, else the LightningModule.
            It maps ``(B, 3, H, W)`` to ``{"params": (B, 8), "residual_flow_lowres": (B, 2, h, w)}``.
        groups: backbone / param_head / residual_head module prefixes of that model (``--groups``).
        loss_fn: ``(correction, target) -> (total, parts)`` for the init check and ``val_loss``
            (default autohdr's composite loss for ``stage``).
        judge_config: :class:`~autohdr.diagnosis.verdicts.JudgeConfig` fields (a dataclass or a
            mapping) recorded in ``run_start`` for ``autohdr judge``.
        every_n_epochs: autohdr's validation every N epochs (the last epoch is always validated).
        config, ground_truth, param_bounds, log: as :class:`~autohdr.diagnosis.hooks.Instrumentation`.
    """

    def __init__(self, run_dir: str | Path, *, val_loader: Iterable[Mapping] | None = None,
                 stage: str = "stage2_hybrid", intent: str = "training", model: str | None = None,
                 groups: Mapping[str, GroupMembers] | None = None, loss_fn: LossFn | None = None,
                 judge_config: Any = None, every_n_epochs: int = 1, config: InstrumentationConfig | None = None,
                 ground_truth: Mapping[str, torch.Tensor] | None = None, param_bounds: Any = None,
                 log: Callable[[str], None] | None = None) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive number of epochs; got {every_n_epochs!r}")
        self.run_dir = Path(run_dir)
        self.val_loader = val_loader
        self.intent = check_intent(intent)
        self.every_n_epochs = every_n_epochs
        self.judge_config = (dataclasses.asdict(judge_config) if dataclasses.is_dataclass(judge_config)
                             else dict(judge_config) if judge_config is not None else None)
        self._model_path = model
        self._hooks_args = {"stage": stage, "groups": groups, "loss_fn": loss_fn, "config": config,
                            "ground_truth": ground_truth, "param_bounds": param_bounds, "log": log}
        self.hooks: Instrumentation | None = None
        self._resumed: dict[str, Any] | None = None  # the hooks' state from a Lightning checkpoint
        self._step_open = False      # a batch started a step and its optimizer step is not recorded yet
        self._stepped = False        # on_before_optimizer_step ran in this batch
        self._step_lrs: list[Any] = []
        self._grad_total: torch.Tensor | None = None
        self._steps_since_validation = 0
        self._final_validated = False
        self.closed = False

    # ------------------------------------------------------------------ run
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            raise ValueError(f"AutohdrCallback records one process (world_size 1); this Trainer has "
                             f"world_size {trainer.world_size}: run the check on one device")
        if not pl_module.automatic_optimization or len(trainer.optimizers) != 1:
            raise ValueError("AutohdrCallback needs Lightning's automatic optimization with one optimizer (any "
                             f"number of param groups); got automatic_optimization={pl_module.automatic_optimization}, "
                             f"{len(trainer.optimizers)} optimizers")
        if self._resumed is None:
            refuse_existing_run(self.run_dir)  # before the sanity check and the data loaders
        self.hooks = Instrumentation(lens_model(pl_module, self._model_path), trainer.optimizers[0], self.run_dir,
                                     device=pl_module.device, **self._hooks_args)
        if self._resumed is not None:
            self.hooks.load_state_dict(self._resumed)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        info: dict[str, Any] = {"intent": self.intent, "integration": "lightning", "lightning": {
            "version": pl.__version__,
            "gradient_clip_val": _number(trainer.gradient_clip_val),
            "gradient_clip_algorithm": _clip_algorithm(trainer),
            "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
            "precision": str(trainer.precision), "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps}}
        if self.judge_config is not None:
            info["judge_config"] = self.judge_config
        resume_step = int(self._resumed["global_step"]) if self._resumed is not None else None
        self._hooks.on_train_start(self.val_loader, resume_step=resume_step, info=info)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run that stopped mid-epoch where only Lightning knew it would (``max_time``, a
        callback's ``should_stop`` during the epoch) still gets its final validation."""
        if self.val_loader is not None and not self._final_validated and self._steps_since_validation:
            self._validate(final=True)
            self._hooks.on_train_epoch_end()
        self._close(interrupted=False)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close(interrupted=isinstance(exception, KeyboardInterrupt))

    # ------------------------------------------------------------------ epochs
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hooks.on_train_epoch_start(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning's own validation of this epoch has run by now; ModelCheckpoint (sorted last)
        # saves after this, so a checkpoint holds this epoch's best score.
        final = _last_epoch(trainer)
        if self.val_loader is not None and (final or (trainer.current_epoch + 1) % self.every_n_epochs == 0):
            self._validate(final=final)
        self._hooks.on_train_epoch_end()

    def _validate(self, *, final: bool) -> None:
        self._hooks.on_validation(self.val_loader, final=final)
        self._steps_since_validation = 0
        self._final_validated = final

    # ------------------------------------------------------------------ steps
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._step_open or batch_idx % trainer.accumulate_grad_batches == 0:  # a step's first micro-batch
            self._hooks.on_train_batch_start(_as_pairs(batch))
            self._step_open = True
        self._stepped = False

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._hooks.on_after_backward()
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # the norm Lightning's clip_grad_norm_ computes next (the same function, the same tensors)
        self._grad_total = torch.nn.utils.get_total_norm(grads, 2.0) if grads else None
        self._step_lrs = [group["lr"] for group in optimizer.param_groups]
        self._stepped = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._stepped:  # an accumulating micro-batch, or training_step returned None: no step
            return
        self._stepped = self._step_open = False
        loss, correction, parts = step_outputs(outputs)
        if loss is None:
            raise RuntimeError("AutohdrCallback: training_step must return the loss, or "
                               "{'loss': loss, 'correction': correction, 'parts': parts}")
        if trainer.accumulate_grad_batches > 1:
            loss = loss * trainer.accumulate_grad_batches  # Lightning divides the returned loss by it
        self._stop_if_not_finite(loss, parts)
        optimizer = trainer.optimizers[0]
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        clip = _number(trainer.gradient_clip_val)
        by_norm = clip is not None and clip > 0 and _clip_algorithm(trainer) == "norm"
        with stepped_lrs(optimizer, self._step_lrs):
            self._hooks.on_train_batch_end(
                loss, correction, components=parts, batch_size=_batch_size(batch, correction),
                grad_norm_total=self._grad_total, clip_norm=clip if by_norm else None,
                # the gradients the optimizer stepped with (clipped; zeroed only in the next closure):
                # clipping by value, or by the module's own configure_gradient_clipping, is observed
                grad_norm_at_step=torch.nn.utils.get_total_norm(grads, 2.0) if grads else None)
        self._steps_since_validation += 1

    def _stop_if_not_finite(self, loss: torch.Tensor, parts: Mapping[str, torch.Tensor]) -> None:
        """A non-finite loss or gradient norm stops the run as autohdr's Trainer does: an ``error``
        record naming it (and the bad sample, while the hooks still hold the batch), then
        :class:`~autohdr.diagnosis.hooks.NonFiniteLossError`. One host read for both figures."""
        figures = [loss.detach().float().reshape(())]
        if self._grad_total is not None:
            figures.append(self._grad_total.detach().float().reshape(()))
        if bool(torch.isfinite(torch.stack(figures)).all()):
            return
        value = float(figures[0])
        if math.isfinite(value):
            self._hooks.fail_non_finite("gradient norm", float(figures[1]), parts)
        self._hooks.fail_non_finite("loss", value, parts)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a Lightning checkpoint holds for a resumed run to continue ``metrics.jsonl``."""
        state = self.hooks.state_dict() if self.hooks is not None else self._resumed
        return {"hooks": state} if state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed = dict(state_dict["hooks"]) if state_dict.get("hooks") else None

    # ------------------------------------------------------------------ helpers
    @property
    def _hooks(self) -> Instrumentation:
        if self.hooks is None:
            raise RuntimeError("AutohdrCallback observes Trainer.fit only (its hooks are built at on_fit_start)")
        return self.hooks

    def _close(self, *, interrupted: bool) -> None:
        if self.hooks is not None and not self.closed:
            self.closed = True
            self.hooks.on_train_end(interrupted=interrupted)


def lens_model(pl_module: nn.Module, path: str | None = None) -> nn.Module:
    """The lens model inside ``pl_module``: the module at attribute ``path`` (``"model"``,
    ``"net.lens"``), else the one child that names autohdr's groups, else ``pl_module`` itself."""
    if path is not None:
        found: Any = pl_module
        for part in path.split("."):
            if not hasattr(found, part):
                raise AttributeError(f"AutohdrCallback(model={path!r}): {type(found).__name__} has no attribute "
                                     f"{part!r}; its child modules: {', '.join(n for n, _ in pl_module.named_children())}")
            found = getattr(found, part)
        if not isinstance(found, nn.Module):
            raise TypeError(f"AutohdrCallback(model={path!r}) is a {type(found).__name__}, not an nn.Module")
        return found
    if _names_groups(pl_module):
        return pl_module
    children = [module for _, module in pl_module.named_children() if _names_groups(module)]
    return children[0] if len(children) == 1 else pl_module


def _names_groups(module: nn.Module) -> bool:
    return callable(getattr(module, "parameter_groups", None)) or any(
        name in GROUP_NAMES for name, _ in module.named_children())


def step_outputs(outputs: Any) -> tuple[torch.Tensor | None, Correction | None, dict[str, torch.Tensor]]:
    """``(loss, correction, parts)`` of what ``training_step`` returned (as Lightning passes it on)."""
    if isinstance(outputs, Mapping):
        loss, parts = split_loss({k: v for k, v in outputs.items() if k not in ("correction", "parts")})
        extra = outputs.get("parts")
        if isinstance(extra, Mapping):
            parts.update(split_loss({"loss": loss, **extra})[1])
        correction = outputs.get("correction")
        return loss, correction if isinstance(correction, Correction) else None, parts
    loss, parts = split_loss(outputs)
    return loss, None, parts


@contextmanager
def stepped_lrs(optimizer: torch.optim.Optimizer, lrs: list[Any]) -> Iterator[None]:
    """Each param group's lr as the optimizer step used it, while the step is recorded.

    Lightning steps an ``interval="step"`` scheduler before ``on_train_batch_end``, so the live lr
    is already the next step's; the groups are given back their live lr on exit."""
    groups = optimizer.param_groups
    live = [group["lr"] for group in groups]
    try:
        if len(lrs) == len(groups):
            for group, lr in zip(groups, lrs):
                group["lr"] = lr
        yield
    finally:
        for group, lr in zip(groups, live):
            group["lr"] = lr


def _last_epoch(trainer: pl.Trainer) -> bool:
    """Does the fit end after this epoch, as far as the Trainer's limits tell?"""
    if trainer.should_stop:
        return True
    if trainer.max_epochs is not None and trainer.max_epochs >= 0 and trainer.current_epoch + 1 >= trainer.max_epochs:
        return True
    return trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps


def _clip_algorithm(trainer: pl.Trainer) -> str:
    """``"norm"`` (Lightning's default) or ``"value"``."""
    algorithm = trainer.gradient_clip_algorithm
    return str(getattr(algorithm, "value", algorithm) or "norm")


def _as_pairs(batch: Any) -> Mapping | None:
    """The batch as the hooks read it: a mapping as is, an ``(input, target, ...)`` sequence by position."""
    if isinstance(batch, Mapping):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and all(isinstance(x, torch.Tensor) for x in batch[:2]):
        return {"input_image": batch[0], "target_image": batch[1]}
    return None


def _batch_size(batch: Any, correction: Correction | None) -> int | None:
    pairs = _as_pairs(batch)
    image = pairs.get("input_image") if pairs is not None else None
    if isinstance(image, torch.Tensor):
        return int(image.shape[0])
    return None if correction is None else int(correction.params.shape[0])


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
