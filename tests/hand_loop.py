"""A training loop written by hand, as a user with their own trainer would: no autohdr Trainer,
only the public hooks (:class:`autohdr.diagnosis.hooks.Instrumentation`), ``correct`` and the loss.

It reads the same preset as ``autohdr debug MODE`` (data, epochs, steps, lr, clip) so its verdicts
can be compared with the Trainer's on the same seed and data; it has no schedule and no
checkpoints, as many hand-written loops do not.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from autohdr.runs.debug import build_loaders, load_ground_truth, resolve_preset, select_rows
from autohdr.diagnosis.hooks import Instrumentation, InstrumentationConfig, default_loss_fn
from autohdr.diagnosis.verdicts import Verdict, judge
from autohdr.data.settings import default_fixture_root
from autohdr.lens.evaluation import correct
from autohdr.lens.model import LensCorrectionModel


def train_by_hand(out_dir: Path, mode: str = "stage2_probe", *, model: nn.Module | None = None, seed: int = 0,
                  overrides: dict | None = None, groups=None) -> list[Verdict]:
    """Train ``model`` (default: autohdr's, seeded like the debug modes) on ``mode``'s preset with a
    plain loop and the hooks; returns the verdicts of the run's ``metrics.jsonl``."""
    preset = resolve_preset(mode, overrides or {})
    cfg, spec = preset.train, preset.train.spec
    train_rows, val_rows = select_rows(default_fixture_root(), preset.data)
    train_loader, val_loader = build_loaders(train_rows, val_rows, preset.data, seed)
    torch.manual_seed(seed)
    model = model if model is not None else LensCorrectionModel(preset.model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr * spec.lr_scale, weight_decay=cfg.weight_decay)
    loss_fn = default_loss_fn(spec, cfg.loss_weights)

    # ---- the loop a user writes, with the hooks at their natural points
    hooks = Instrumentation(model, optimizer, out_dir, stage=cfg.stage, groups=groups, loss_fn=loss_fn,
                            ground_truth=load_ground_truth(default_fixture_root()),
                            config=InstrumentationConfig.from_train_config(cfg), log=lambda message: None)
    hooks.on_train_start(val_loader)
    for epoch in range(cfg.epochs):
        hooks.on_train_epoch_start(epoch)
        model.train()
        for step, batch in enumerate(train_loader):
            if cfg.max_steps_per_epoch is not None and step >= cfg.max_steps_per_epoch:
                break
            hooks.on_train_batch_start(batch)
            correction = correct(model, batch["input_image"], spec.residual_active)
            loss, parts = loss_fn(correction, batch["target_image"])
            optimizer.zero_grad()
            loss.backward()
            hooks.on_after_backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
            optimizer.step()
            hooks.on_train_batch_end(loss, correction, components=parts, grad_norm_total=grad_norm,
                                     clip_norm=cfg.grad_clip_norm)
        hooks.on_validation(val_loader, final=epoch == cfg.epochs - 1)
        hooks.on_train_epoch_end()
    hooks.on_train_end()
    return judge(out_dir, preset.judge)
