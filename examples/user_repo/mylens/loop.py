"""The user's own training loop: plain PyTorch, with autohdr attached (the 3 lines marked ``# autohdr``).

``train(run_dir, settings)`` is the ``train`` entry of ``[tool.autohdr]``: autohdr's pytest plugin
calls it once per mode and session, then judges ``run_dir/metrics.jsonl``. ``settings`` is an
:class:`autohdr.testing.RunSettings` (the mode's preset after overrides, the split CSVs and autohdr's
loaders for them, the model factory, the seed and the device); the loop takes its sizes from it and
is otherwise its own: its loss, its schedule, its clipping, its validation in eval mode.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import autohdr                                                                    # autohdr
from autohdr.lens.geometry import apply_correction

LR_FACTOR = 1.0  # the planted lr-0 bug sets this to 0.0


class WarpL1(nn.Module):
    """L1 between the target and the border-padded warp of the input, plus small flow penalties."""

    def __init__(self, flow_weight: float = 1e-3, smooth_weight: float = 1e-3) -> None:
        super().__init__()
        self.flow_weight, self.smooth_weight = flow_weight, smooth_weight

    def forward(self, outputs: dict, image: torch.Tensor, target: torch.Tensor) -> dict:
        flow = outputs.get("residual_flow_lowres")
        grid = apply_correction(image, outputs["params"], flow).final_grid
        photo = (F.grid_sample(image, grid, padding_mode="border", align_corners=False) - target).abs().mean()
        if flow is None:
            magnitude = smoothness = photo.new_zeros(())
        else:
            magnitude = flow.abs().mean()
            smoothness = (flow[..., 1:] - flow[..., :-1]).abs().mean() + (flow[..., 1:, :] - flow[..., :-1, :]).abs().mean()
        total = photo + self.flow_weight * magnitude + self.smooth_weight * smoothness
        return {"loss": total, "photo": photo, "flow_magnitude": magnitude, "flow_smoothness": smoothness}


def learning_rate(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then a cosine down to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn: nn.Module, device: torch.device) -> float:
    model.eval()
    errors = []
    for batch in loader:
        image, target = batch["input_image"].to(device), batch["target_image"].to(device)
        errors.append(float(loss_fn(model(image), image, target)["photo"]))
    model.train()
    return sum(errors) / len(errors)


def train(run_dir: Path, settings) -> None:
    cfg = settings.preset.train
    device = settings.device
    model = settings.build_model().to(device)
    # stage 1 trains the lens parameters alone: the refine head stays out of the optimizer and the loss
    trained = [p for name, p in model.named_parameters() if settings.residual_active or not name.startswith("refine.")]
    optimizer = torch.optim.AdamW(trained, lr=settings.peak_lr, weight_decay=cfg.weight_decay)
    loss_fn = WarpL1()
    train_loader, val_loader = settings.loaders()
    total_steps = cfg.epochs * len(train_loader)
    run = autohdr.attach(model, optimizer, run_dir, val_loader=val_loader, loss=loss_fn, **settings.attach_options)  # autohdr
    step = 0
    model.train()
    for epoch in range(cfg.epochs):
        for batch in train_loader:
            image, target = batch["input_image"].to(device), batch["target_image"].to(device)
            for group in optimizer.param_groups:
                group["lr"] = LR_FACTOR * learning_rate(step, total_steps, settings.peak_lr, cfg.warmup_steps)
            outputs = model(image)
            if not settings.residual_active:
                outputs = {"params": outputs["params"]}
            loss = loss_fn(outputs, image, target)["loss"]
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
            optimizer.step()
            step += 1
        if (epoch + 1) % cfg.validation_interval == 0:  # the preset's: every epoch, every 8 in the overfit mode
            evaluate(model, val_loader, loss_fn, device)
    run.close()                                                                   # autohdr
