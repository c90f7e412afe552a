"""A hold-out of realistic training bugs, written before the detectors that should catch them.

Each :class:`HoldoutFault` breaks one thing -- a model, a loader, the loop, or a config -- through the
public API only (``run_debug_mode`` with a model / loader / overrides, or a hand-written loop with the
hooks), and says which signals it expects to go BAD and which cause(s) should be named. The faults
span data, augmentation, model, loss, optimizer, schedule, evaluation and resume. They were written
without looking at which signals exist, from the question "what would a user get wrong?", so the
hold-out measures how well the diagnosis generalizes, not how well it fits its own fault suite.

``run_holdout(fault, out_dir)`` trains the fault at the smallest size that shows it (8 pairs, 64 px,
batch 4, a few epochs) and returns a :class:`HoldoutResult`: ``caught`` (any signal BAD, or the run
stopped with an error) and ``right_cause`` (one of the expected cause ids among the diagnoses).
:data:`HEALTHY_CONTROLS` are the same runners with nothing broken: they must stay all good.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn as nn

from autohdr.diagnosis.causes import diagnose
from autohdr.runs.debug import (
    build_loaders, load_ground_truth, preset_reference_lr, resolve_preset, run_debug_mode, select_rows,
)
from autohdr.diagnosis.hooks import Instrumentation, InstrumentationConfig, NonFiniteLossError, default_loss_fn
from autohdr.diagnosis.metrics_log import read_metrics
from autohdr.diagnosis.verdicts import Verdict, judge
from autohdr.data.settings import default_fixture_root
from autohdr.lens.evaluation import Correction, correct
from autohdr.lens.losses import LossWeights
from autohdr.lens.model import LensCorrectionModel
from autohdr.training.config import to_dict

#: The smallest size that still trains: 8 pairs at 64 px in batches of 4 (2 steps an epoch), at the lr
#: the hold-out was measured with (3e-3: the overfit preset's lr until it moved to 6e-3 for its 480-step
#: run; at 8-12 steps 6e-3 overshoots, so the healthy controls no longer beat their own mean lens).
SMALL: dict[str, Any] = {"data.num_pairs": 8, "data.resize_hw": [64, 64], "data.batch_size": 4,
                         "train.validate_every": 1, "train.lr": 3e-3}


# ------------------------------------------------------------------------------------------ models

class BatchNormFrozenStats(LensCorrectionModel):
    """Model: a BatchNorm on the input whose running statistics never update (momentum 0): training
    normalizes by each batch's statistics, eval by the initial mean 0 / variance 1."""

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.backbone = _Prefixed(nn.BatchNorm2d(3, momentum=0.0), self.backbone)


class _Prefixed(nn.Module):
    def __init__(self, first: nn.Module, rest: nn.Module) -> None:
        super().__init__()
        self.first, self.rest = first, rest

    def forward(self, image: torch.Tensor):
        return self.rest(self.first(image))


class ResidualFlipsAtEval(LensCorrectionModel):
    """Model: the residual flow is negated in eval mode (a sign convention applied at inference only):
    the same magnitude, the opposite direction."""

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(image)
        if self.training:
            return out
        return {**out, "residual_flow_lowres": -out["residual_flow_lowres"]}


class SlowEmaAtEval(LensCorrectionModel):
    """Evaluation: eval mode answers with an EMA of the weights whose decay (0.999) is far too slow
    for the run: it moves a little every step (checksums change) but stays near the initial weights."""

    decay = 0.999

    def __init__(self, config=None) -> None:
        super().__init__(config)
        object.__setattr__(self, "_ema", copy.deepcopy(self).eval())

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.training:
            with torch.no_grad():
                for mine, avg in zip(self.parameters(), self._ema.parameters()):
                    avg.mul_(self.decay).add_(mine.detach(), alpha=1 - self.decay)
            return super().forward(image)
        with torch.no_grad():
            return LensCorrectionModel.forward(self._ema, image)


# ------------------------------------------------------------------------------------------ loaders

class _Wrapped:
    """A loader wrapper that keeps ``len``, ``dataset`` and ``sampler``."""

    def __init__(self, loader: Iterable[Mapping]) -> None:
        self.loader = loader
        self.dataset = getattr(loader, "dataset", None)
        self.sampler = getattr(loader, "sampler", None)
        self.passes = 0

    def __len__(self) -> int:
        return len(self.loader)


class RandomFlipValidation(_Wrapped):
    """Augmentation: random horizontal flips (input and target together) left on in the validation
    loader: each validation pass scores different images."""

    def __iter__(self) -> Iterator[Mapping]:
        generator = torch.Generator().manual_seed(1000 + self.passes)
        self.passes += 1
        for batch in self.loader:
            flip = torch.rand(batch["input_image"].shape[0], generator=generator) < 0.5
            out = dict(batch)
            for key in ("input_image", "target_image"):
                image = batch[key].clone()
                image[flip] = image[flip].flip(-1)
                out[key] = image
            yield out


class ShiftTrainInputs(_Wrapped):
    """Augmentation: a random translation (up to 6 px) of the training *input* only, not its target:
    a geometric augmentation applied to one side of the pair."""

    def __iter__(self) -> Iterator[Mapping]:
        generator = torch.Generator().manual_seed(2000 + self.passes)
        self.passes += 1
        for batch in self.loader:
            dy, dx = (int(v) for v in torch.randint(-6, 7, (2,), generator=generator))
            yield {**batch, "input_image": torch.roll(batch["input_image"], shifts=(dy, dx), dims=(-2, -1))}


class ShuffledTrainTargets(_Wrapped):
    """Data: within each training batch the targets are rolled by one sample (an index off by one
    when the pairs were collated); validation pairs are right."""

    def __iter__(self) -> Iterator[Mapping]:
        for batch in self.loader:
            yield {**batch, "target_image": torch.roll(batch["target_image"], shifts=1, dims=0)}


class ImageNetNormalized(_Wrapped):
    """Data: inputs normalized with ImageNet mean / std (as for a pretrained backbone), targets not."""

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def __iter__(self) -> Iterator[Mapping]:
        for batch in self.loader:
            yield {**batch, "input_image": (batch["input_image"] - self.mean) / self.std}


# ------------------------------------------------------------------------------------------ a user's loop

@dataclass(frozen=True)
class LoopFault:
    """What a hand-written loop gets wrong (all off: a correct loop).

    ``group_lr``: group name -> lr multiplier of that param group; ``loss_scale``: ``"sum"`` sums the
    loss over pixels instead of averaging; ``norm_before_backward``: the logged total norm is taken
    before backward (of the previous step's cleared gradients); ``clear_before_step``: the gradients
    are cleared between backward and the optimizer step; ``no_zero_grad``: they are never cleared;
    ``schedule``: ``"one_epoch_floor0"`` a cosine sized to one epoch with a floor of 0;
    ``reload_init_at_epoch``: from that epoch on, a "resume" loads the initial weights (the wrong
    checkpoint) at the start of every epoch.
    """

    group_lr: tuple[tuple[str, float], ...] = ()
    adam_eps: float = 1e-8
    weight_decay: float | None = None
    lr_factor: float = 1.0
    loss_scale: str = "mean"
    loss_weights: LossWeights | None = None
    norm_before_backward: bool = False
    clear_before_step: bool = False
    no_zero_grad: bool = False
    schedule: str = "none"
    reload_init_at_epoch: int | None = None


def _hand_loop(out_dir: Path, mode: str, fault: LoopFault, *, overrides: dict, epochs: int, seed: int = 0) -> dict:
    """Train with a plain loop and the hooks; returns ``{"verdicts", "diagnoses", "error"}``."""
    preset = resolve_preset(mode, overrides)
    cfg, spec = preset.train, preset.train.spec
    root = default_fixture_root()
    train_rows, val_rows = select_rows(root, preset.data)
    train_loader, val_loader = build_loaders(train_rows, val_rows, preset.data, seed)
    torch.manual_seed(seed)
    model = LensCorrectionModel(preset.model)
    base_lr = cfg.lr * spec.lr_scale * fault.lr_factor
    multipliers = dict(fault.group_lr)
    groups = []
    for name in ("backbone", "param_head", "residual_head"):
        params = [p for p in getattr(model, name).parameters() if p.requires_grad]
        if name == "residual_head" and not spec.residual_active:
            continue
        groups.append({"params": params, "lr": base_lr * multipliers.get(name, 1.0), "name": name})
    optimizer = torch.optim.AdamW(groups, lr=base_lr, eps=fault.adam_eps,
                                  weight_decay=cfg.weight_decay if fault.weight_decay is None else fault.weight_decay)
    steps_per_epoch = len(train_loader)
    scheduler = None
    if fault.schedule == "one_epoch_floor0":
        total = steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 0.5 * (1 + math.cos(math.pi * min(step, total) / total))))
    weights = fault.loss_weights or cfg.loss_weights
    loss_fn = default_loss_fn(spec, weights)
    pixels = preset.data.resize_hw[0] * preset.data.resize_hw[1]

    def train_loss(correction: Correction, target: torch.Tensor):
        total, parts = loss_fn(correction, target)
        return (total * pixels, parts) if fault.loss_scale == "sum" else (total, parts)

    initial = copy.deepcopy(model.state_dict())
    hooks = Instrumentation(model, optimizer, out_dir, stage=cfg.stage, loss_fn=loss_fn,
                            ground_truth=load_ground_truth(root),
                            config=InstrumentationConfig.from_train_config(cfg), log=lambda message: None)
    # what the run is, so it can be judged again from its folder as it was judged here
    hooks.run_info = {"mode": preset.mode, "judge_config": to_dict(preset.judge)}
    params = [p for g in groups for p in g["params"]]
    error = None
    try:
        hooks.on_train_start(val_loader)
        for epoch in range(epochs):
            if fault.reload_init_at_epoch is not None and epoch >= fault.reload_init_at_epoch:
                model.load_state_dict(initial)  # "resume" from the wrong checkpoint
            hooks.on_train_epoch_start(epoch)
            model.train()
            for batch in train_loader:
                hooks.on_train_batch_start(batch)
                stale_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in params if p.grad is not None]) if fault.norm_before_backward else None
                correction = correct(model, batch["input_image"], spec.residual_active)
                loss, parts = train_loss(correction, batch["target_image"])
                if not fault.no_zero_grad:
                    optimizer.zero_grad()
                loss.backward()
                hooks.on_after_backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
                if fault.norm_before_backward:
                    grad_norm = stale_norm if stale_norm is not None else torch.zeros(())
                if fault.clear_before_step:
                    optimizer.zero_grad()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                hooks.on_train_batch_end(loss, correction, components=parts, grad_norm_total=grad_norm,
                                         clip_norm=cfg.grad_clip_norm)
            hooks.on_validation(val_loader, final=epoch == epochs - 1)
            hooks.on_train_epoch_end()
    except NonFiniteLossError as exc:
        error = str(exc)
    finally:
        hooks.on_train_end()
    history = read_metrics(out_dir)
    verdicts = judge(history, preset.judge)
    diagnoses = diagnose(verdicts, history, reference_lr=preset_reference_lr(mode, cfg.stage))
    return {"verdicts": [v.to_dict() for v in verdicts], "diagnoses": [d.to_dict() for d in diagnoses],
            "error": error}


def _debug(out_dir: Path, mode: str, *, overrides: dict, epochs: int, model: Callable[[], nn.Module] | None = None,
           train_wrapper: Callable | None = None, val_wrapper: Callable | None = None, seed: int = 0) -> dict:
    """``run_debug_mode`` with a fault model and/or loader wrappers (the fixtures, 'SMALL' size)."""
    preset = resolve_preset(mode, overrides)
    train_loader = val_loader = None
    if train_wrapper or val_wrapper:
        train_rows, val_rows = select_rows(default_fixture_root(), preset.data)
        train_loader, val_loader = build_loaders(train_rows, val_rows, preset.data, seed)
        train_loader = train_wrapper(train_loader) if train_wrapper else train_loader
        val_loader = val_wrapper(val_loader) if val_wrapper else val_loader
    torch.manual_seed(seed)
    report = run_debug_mode(mode, model=model() if model else None, train_loader=train_loader,
                            val_loader=val_loader, out_dir=out_dir, device="cpu", seed=seed, overrides=overrides,
                            epochs=epochs, plots=False, log=lambda message: None)
    return {"verdicts": report["verdicts"], "diagnoses": report["diagnoses"], "error": report["error"]}


# ------------------------------------------------------------------------------------------ the hold-out

@dataclass(frozen=True)
class HoldoutFault:
    """One bug: how to run it, and what a good diagnosis says about it.

    ``expected_signals``: signals that should go BAD (at least one must, for ``caught``);
    ``expected_causes``: cause ids, any of which counts as the right cause.
    """

    name: str
    family: str
    description: str
    run: Callable[[Path], dict]
    expected_signals: tuple[str, ...]
    expected_causes: tuple[str, ...]


@dataclass
class HoldoutResult:
    fault: str
    caught: bool
    right_cause: bool
    bad_signals: list[str]
    cause_ids: list[str]
    error: str | None
    detail: dict = field(default_factory=dict)


def _loop(mode: str = "overfit_stage1", epochs: int = 4, overrides: dict | None = None, **fault: Any):
    return lambda out: _hand_loop(out, mode, LoopFault(**fault), overrides={**SMALL, **(overrides or {})},
                                  epochs=epochs)


def _dbg(mode: str = "overfit_stage1", epochs: int = 4, overrides: dict | None = None, **kwargs: Any):
    return lambda out: _debug(out, mode, overrides={**SMALL, **(overrides or {})}, epochs=epochs, **kwargs)


HOLDOUT: tuple[HoldoutFault, ...] = (
    HoldoutFault("backbone_group_lr_zero", "optimizer",
                 "the backbone's param group has lr 0 (a per-group lr table with a typo)",
                 _loop(group_lr=(("backbone", 0.0),)),
                 ("groups_move_with_gradients", "backbone_learning"), ("group_lr_zero",)),
    HoldoutFault("param_head_group_lr_zero", "optimizer",
                 "the parameter head's param group has lr 0: the backbone moves, the head never does",
                 _loop(group_lr=(("param_head", 0.0),)),
                 ("groups_move_with_gradients", "param_head_learning", "loss_decreases"), ("group_lr_zero",)),
    HoldoutFault("grads_cleared_before_step", "loop",
                 "optimizer.zero_grad() between backward and step: gradients are logged, no update happens",
                 _loop(clear_before_step=True),
                 ("groups_move_with_gradients", "loss_decreases"), ("update_skipped",)),
    HoldoutFault("norm_before_backward", "loop",
                 "the logged total gradient norm is computed before backward (of cleared gradients: 0)",
                 _loop(norm_before_backward=True),
                 ("logged_quantities_agree",), ("metric_wiring",)),
    HoldoutFault("loss_summed_not_averaged", "loss",
                 "the training loss is summed over pixels instead of averaged (x H*W)",
                 _loop(loss_scale="sum"),
                 ("clipping_sane", "logged_quantities_agree", "train_val_agree"), ("loss_summed",)),
    HoldoutFault("regularizer_weights_x1000", "config",
                 "stage 2 flow regularizer weights 1000x the preset's: the residual is pinned to zero",
                 _dbg("stage2_probe", overrides={"train.loss_weights.flow_tv": 50.0,
                                                 "train.loss_weights.flow_mag": 10.0,
                                                 "train.loss_weights.flow_curv": 50.0}),
                 ("residual_contributes", "residual_not_inactive"), ("loss_weights_off_preset",)),
    HoldoutFault("adam_eps_one", "optimizer",
                 "Adam's eps set to 1.0 (meant 1e-8): steps shrink to ~lr * grad, the model barely moves",
                 _loop(epochs=12, adam_eps=1.0),
                 ("loss_decreases", "scores_move"), ("optimizer_hparams",)),
    HoldoutFault("weight_decay_huge", "optimizer",
                 "AdamW weight_decay 50 (meant 5e-5): every step pulls the weights to zero",
                 _loop(epochs=12, weight_decay=50.0),
                 ("loss_decreases",), ("optimizer_hparams",)),
    HoldoutFault("lr_saturates_tanh_head", "config",
                 "lr 30x the preset's: the bounded parameters reach their bounds within the first steps",
                 _dbg(overrides={"train.lr": 0.09, "train.warmup_steps": 0}),
                 ("param_head_not_saturated",), ("lr_saturates_head",)),
    HoldoutFault("clip_below_median_norm", "config",
                 "grad_clip_norm 0.02, far below the typical gradient norm: every step is clipped",
                 _dbg(overrides={"train.grad_clip_norm": 0.02}),
                 ("clipping_sane",), ("clip_too_tight",)),
    HoldoutFault("schedule_one_epoch_floor0", "schedule",
                 "a cosine schedule sized to one epoch with a floor of 0: lr 0 after the first epoch",
                 _loop(epochs=6, schedule="one_epoch_floor0"),
                 ("lr_not_mostly_zero",), ("lr_schedule_zero",)),
    HoldoutFault("val_random_flips", "evaluation",
                 "random flips left on in the validation loader: each epoch scores different images",
                 _dbg(val_wrapper=RandomFlipValidation),
                 ("val_batches_repeat",), ("val_random",)),
    HoldoutFault("slow_ema_at_eval", "evaluation",
                 "eval mode answers with an EMA of decay 0.999: validation scores weights near the initial ones",
                 _dbg(model=SlowEmaAtEval),
                 ("train_val_agree",), ("eval_differs_from_train", "eval_stale")),
    HoldoutFault("batchnorm_frozen_stats", "model",
                 "a BatchNorm whose running statistics never update: eval normalizes differently from training",
                 _dbg(model=BatchNormFrozenStats),
                 ("train_val_agree",), ("eval_differs_from_train",)),
    HoldoutFault("residual_flips_at_eval", "model",
                 "the residual flow is negated in eval mode: the same magnitude, the other direction",
                 _dbg("stage2_probe", model=ResidualFlipsAtEval),
                 ("eval_flow_matches_train",), ("eval_residual_off", "eval_differs_from_train")),
    HoldoutFault("train_inputs_shifted", "augmentation",
                 "a random translation of the training inputs only (not the targets)",
                 _dbg(train_wrapper=ShiftTrainInputs),
                 ("train_val_agree",), ("train_augmentation_mismatch", "eval_differs_from_train")),
    HoldoutFault("train_targets_off_by_one", "data",
                 "training targets rolled by one sample within each batch (validation pairs right)",
                 _dbg(epochs=12, train_wrapper=ShuffledTrainTargets),
                 ("train_val_agree", "params_track_ground_truth"), ("train_pairs_mismatched",)),
    HoldoutFault("imagenet_normalized_inputs", "data",
                 "training inputs normalized with ImageNet mean/std (the val transform was not), targets in [0, 1]",
                 _dbg(train_wrapper=ImageNetNormalized),
                 ("batches_in_range",), ("data_out_of_range",)),
    HoldoutFault("resume_loads_initial_weights", "resume",
                 "each epoch from the 2nd 'resumes' from the initial weights (the wrong checkpoint file)",
                 _loop(reload_init_at_epoch=1),
                 ("loss_decreases", "logged_quantities_agree"), ("resume_wrong_weights",)),
    HoldoutFault("gradients_never_cleared", "loop",
                 "optimizer.zero_grad() forgotten: gradients accumulate over the whole run",
                 _loop(epochs=5, no_zero_grad=True),
                 ("clipping_sane", "grad_norm_steady"), ("grad_accumulates",)),
)

#: The same runners, nothing broken: every signal GOOD or n/a.
HEALTHY_CONTROLS: tuple[tuple[str, Callable[[Path], dict]], ...] = (
    ("hand_loop", _loop()),
    ("hand_loop_6_epochs", _loop(epochs=6)),
    ("debug_overfit", _dbg()),
    ("debug_stage2", _dbg("stage2_probe")),
)


def run_holdout(fault: HoldoutFault, out_dir: Path) -> HoldoutResult:
    """Train ``fault`` into ``out_dir`` and score the diagnosis against its expectations."""
    out = fault.run(out_dir)
    verdicts = [Verdict(**v) for v in out["verdicts"]]
    bad = [v.signal for v in verdicts if v.ok is False]
    causes = [d["cause_id"] for d in out["diagnoses"]]
    return HoldoutResult(fault.name, bool(bad) or out["error"] is not None,
                         any(c in fault.expected_causes for c in causes), bad, causes, out["error"],
                         {"diagnoses": out["diagnoses"],
                          "bad_details": {v.signal: v.detail for v in verdicts if v.ok is False}})


def bad_of(out: dict) -> list[str]:
    """The BAD signals of a runner's output."""
    return [v["signal"] for v in out["verdicts"] if v["ok"] is False]


__all__ = ["HOLDOUT", "HEALTHY_CONTROLS", "HoldoutFault", "HoldoutResult", "LoopFault", "run_holdout", "bad_of",
           "SMALL", "dataclasses"]
