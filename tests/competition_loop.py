"""A training loop written the way lens-correction competition code is written, not like autohdr's.

One ``Engine`` whose epoch loop calls a single fused :func:`train_step` (forward under bf16
autocast, loss, scaled backward, unscale, ``clip_grad_norm_``, ``scaler.step``); AdamW with one
param group per head; a per-batch cosine schedule with an absolute floor (``eta_min``); a loss of
its own (Charbonnier photometric term plus flow regularizers with a ``sqrt(x^2 + eps)`` floor); its
own ``validate()``. autohdr is attached with the lines marked ``# autohdr`` (3 of them) and nothing
else: no call between backward and step, no monkeypatching.

``LoopFaults`` breaks it the way such loops break: one group's lr at 0, the residual
regularizers' weights x1000, validation without ``model.eval()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import autohdr
from autohdr.lens.geometry import apply_correction
from autohdr.lens.model import LensCorrectionModel, ModelConfig


@dataclass(frozen=True)
class LoopFaults:
    """What to break: ``zero_lr_group`` names a head whose group gets lr 0; ``reg_scale`` multiplies
    the flow regularizers' weights; ``validate_in_train_mode`` drops ``model.eval()`` from validate()."""

    zero_lr_group: str | None = None
    reg_scale: float = 1.0
    validate_in_train_mode: bool = False


class CharbonnierWarpLoss(nn.Module):
    """The loop's own loss: Charbonnier photometric error of the border-sampled warp, plus flow
    smoothness and magnitude terms with a ``sqrt(x^2 + eps)`` floor (non-zero at zero flow).

    forward(outputs, image (B, 3, H, W), target (B, 3, H, W)) -> {"loss", "photo", "flow_smooth", "flow_mag"}
    """

    def __init__(self, smooth_weight: float = 0.02, mag_weight: float = 0.005, eps: float = 1e-6) -> None:
        super().__init__()
        self.smooth_weight, self.mag_weight, self.eps = smooth_weight, mag_weight, eps

    def forward(self, outputs: dict, image: torch.Tensor, target: torch.Tensor) -> dict:
        flow = outputs.get("residual_flow_lowres")
        grid = apply_correction(image.float(), outputs["params"].float(), None if flow is None else flow.float()).final_grid
        warped = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        photo = torch.sqrt((warped - target.float()) ** 2 + self.eps).mean()
        if flow is None:
            smooth = mag = photo.new_zeros(())
        else:
            flow = flow.float()
            dx, dy = flow[..., :, 1:] - flow[..., :, :-1], flow[..., 1:, :] - flow[..., :-1, :]
            smooth = torch.sqrt(dx ** 2 + self.eps).mean() + torch.sqrt(dy ** 2 + self.eps).mean()
            mag = torch.sqrt(flow ** 2 + self.eps).mean()
        total = photo + self.smooth_weight * smooth + self.mag_weight * mag
        return {"loss": total, "photo": photo, "flow_smooth": smooth, "flow_mag": mag}


def train_step(model: nn.Module, batch: dict, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, clip: float) -> float:
    """Forward, loss, backward, clip and step in one function, as competition code has it."""
    image, target = batch["input_image"], batch["target_image"]
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(image)
    losses = loss_fn(outputs, image, target)
    scaler.scale(losses["loss"]).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(optimizer)
    scaler.update()
    return float(losses["loss"].detach())


class Engine:
    """The loop: epochs of fused steps, a per-batch cosine schedule with a floor, its own validate()."""

    def __init__(self, train_loader, val_loader, *, epochs: int, base_lrs: dict[str, float], eta_min: float = 1e-6,
                 clip: float = 1.0, faults: LoopFaults = LoopFaults(), seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.train_loader, self.val_loader, self.epochs, self.clip = train_loader, val_loader, epochs, clip
        self.faults, self.eta_min = faults, eta_min
        self.model = LensCorrectionModel(ModelConfig(widths=(8, 16, 32, 32), groups=8, head_hidden=32,
                                                     residual_hidden=16))
        heads = {"backbone": self.model.backbone, "param_head": self.model.param_head,
                 "residual_head": self.model.residual_head}
        self.base_lrs = {name: (0.0 if name == faults.zero_lr_group else lr) for name, lr in base_lrs.items()}
        self.optimizer = torch.optim.AdamW([{"params": list(m.parameters()), "lr": self.base_lrs[name], "name": name}
                                            for name, m in heads.items()], weight_decay=1e-4)
        self.loss_fn = CharbonnierWarpLoss(smooth_weight=0.02 * faults.reg_scale, mag_weight=0.005 * faults.reg_scale)
        self.scaler = torch.amp.GradScaler("cpu")
        self.total_steps = epochs * len(train_loader)
        self.history: list[dict] = []

    def set_lr(self, step: int) -> None:
        factor = 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / max(1, self.total_steps)))
        for group in self.optimizer.param_groups:
            base = self.base_lrs[group["name"]]
            group["lr"] = self.eta_min + (base - self.eta_min) * factor

    @torch.no_grad()
    def validate(self) -> float:
        if not self.faults.validate_in_train_mode:
            self.model.eval()
        errors = []
        for batch in self.val_loader:
            outputs = self.model(batch["input_image"])
            errors.append(float(self.loss_fn(outputs, batch["input_image"], batch["target_image"])["photo"]))
        self.model.train()
        return sum(errors) / len(errors)

    def fit(self) -> list[dict]:
        step = 0
        self.model.train()
        for epoch in range(self.epochs):
            losses = []
            for batch in self.train_loader:
                self.set_lr(step)
                losses.append(train_step(self.model, batch, self.loss_fn, self.optimizer, self.scaler, self.clip))
                step += 1
            self.history.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), "val": self.validate()})
        return self.history


def run_competition_loop(run_dir: str | Path, train_loader, val_loader, *, epochs: int = 4,
                         faults: LoopFaults = LoopFaults(), seed: int = 0) -> list[dict]:
    """The loop as a user runs it, with autohdr attached (the three ``# autohdr`` lines)."""
    engine = Engine(train_loader, val_loader, epochs=epochs, faults=faults, seed=seed,
                    base_lrs={"backbone": 1e-3, "param_head": 3e-3, "residual_head": 3e-3})
    with autohdr.attach(engine.model, engine.optimizer, run_dir, stage="stage2_hybrid",  # autohdr
                        val_loader=val_loader, loss=engine.loss_fn, scaler=engine.scaler,  # autohdr
                        intent="probe"):                                                  # autohdr
        return engine.fit()
