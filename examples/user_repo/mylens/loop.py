"""The user's own training loop: plain PyTorch, with autohdr's instrumentation attached.

``train(run_dir, settings)`` is the ``train`` entry of ``[tool.autohdr]``: autohdr's pytest plugin
calls it once per mode and session, then judges ``run_dir/metrics.jsonl``. ``settings`` is an
:class:`autohdr.testing.RunSettings` (the mode's preset after overrides, the split CSVs, the model
factory, the seed and the device).
"""

from __future__ import annotations

from pathlib import Path

import torch

from autohdr.diagnosis.hooks import Instrumentation, default_loss_fn
from autohdr.lens.evaluation import correct

LR_FACTOR = 1.0  # the planted lr-0 bug sets this to 0.0


def train(run_dir: Path, settings) -> None:
    cfg = settings.preset.train
    model = settings.build_model().to(settings.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.peak_lr * LR_FACTOR)
    loss_fn = default_loss_fn(cfg.spec, cfg.loss_weights)
    train_loader, val_loader = settings.loaders()
    hooks = Instrumentation(model, optimizer, run_dir, stage=settings.stage, groups=settings.groups,
                            loss_fn=loss_fn, config=settings.instrumentation, log=lambda message: None)
    hooks.on_train_start(val_loader)
    for epoch in range(cfg.epochs):
        hooks.on_train_epoch_start(epoch)
        model.train()
        for batch in train_loader:
            hooks.on_train_batch_start(batch)
            correction = correct(model, batch["input_image"], settings.residual_active)
            loss, parts = loss_fn(correction, batch["target_image"])
            optimizer.zero_grad()
            loss.backward()
            hooks.on_after_backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
            optimizer.step()
            hooks.on_train_batch_end(loss, correction, components=parts, grad_norm_total=grad_norm,
                                     clip_norm=cfg.grad_clip_norm)
        hooks.on_validation(val_loader, final=epoch == cfg.epochs - 1)
        hooks.on_train_epoch_end()
    hooks.on_train_end()
