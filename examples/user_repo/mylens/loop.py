"""The user's own training loop: plain PyTorch, with autohdr's instrumentation attached.

``train(run_dir, settings)`` is the ``train`` entry of ``[tool.autohdr]``: autohdr's pytest plugin
calls it once per mode and session, then judges ``run_dir/metrics.jsonl``. ``settings`` is an
:class:`autohdr.testing.RunSettings` (the mode's preset after overrides, the split CSVs, the model
factory, the seed and the device).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from autohdr.diagnosis.hooks import Instrumentation, default_loss_fn
from autohdr.lens.evaluation import correct

LR_FACTOR = 1.0  # the planted lr-0 bug sets this to 0.0


def learning_rate(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then a cosine down to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(run_dir: Path, settings) -> None:
    cfg = settings.preset.train
    model = settings.build_model().to(settings.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.peak_lr, weight_decay=cfg.weight_decay)
    loss_fn = default_loss_fn(cfg.spec, cfg.loss_weights)
    train_loader, val_loader = settings.loaders()
    hooks = Instrumentation(model, optimizer, run_dir, stage=settings.stage, groups=settings.groups,
                            loss_fn=loss_fn, config=settings.instrumentation, log=lambda message: None)
    total_steps = cfg.epochs * len(train_loader)
    step = 0
    hooks.on_train_start(val_loader)
    for epoch in range(cfg.epochs):
        hooks.on_train_epoch_start(epoch)
        model.train()
        for batch in train_loader:
            hooks.on_train_batch_start(batch)
            for group in optimizer.param_groups:
                group["lr"] = LR_FACTOR * learning_rate(step, total_steps, settings.peak_lr, cfg.warmup_steps)
            correction = correct(model, batch["input_image"], settings.residual_active)
            loss, parts = loss_fn(correction, batch["target_image"])
            optimizer.zero_grad()
            loss.backward()
            hooks.on_after_backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
            optimizer.step()
            hooks.on_train_batch_end(loss, correction, components=parts, grad_norm_total=grad_norm,
                                     clip_norm=cfg.grad_clip_norm)
            step += 1
        hooks.on_validation(val_loader, final=epoch == cfg.epochs - 1)
        hooks.on_train_epoch_end()
    hooks.on_train_end()
