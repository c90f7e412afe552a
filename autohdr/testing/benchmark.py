"""The user's model's training step on CUDA, for ``pytest -m gpu --benchmark-only``.

One step = forward (``correct``), autohdr's stage loss, backward, gradient clipping and an AdamW step,
on one batch of the data root at the first configured mode's size and batch size, under bf16 autocast,
synchronized at the end (so the figure is the step, not its launch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from autohdr.testing.config import PluginConfig
from autohdr.testing.runs import checked_factory


@dataclass
class GpuTrainStep:
    """A callable train step; returns the step's loss as a float (one host read)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Any
    batch: dict[str, torch.Tensor]
    residual_active: bool
    clip_norm: float
    device: torch.device
    mode: str
    losses: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        from autohdr.lens.evaluation import correct

        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            correction = correct(self.model, self.batch["input_image"], self.residual_active)
            loss, _ = self.loss_fn(correction, self.batch["target_image"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.optimizer.step()
        torch.cuda.synchronize(self.device)
        value = float(loss)
        self.losses.append(value)
        return value

    def weights_checksum(self) -> float:
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.model.parameters()))

    def figures(self) -> dict[str, Any]:
        images = self.batch["input_image"]
        mib = 1024.0 ** 2
        return {"mode": self.mode, "batch_size": int(images.shape[0]), "height": int(images.shape[2]),
                "width": int(images.shape[3]), "amp_dtype": "bfloat16", "gpu_name": torch.cuda.get_device_name(self.device),
                "cuda_max_memory_allocated_mb": torch.cuda.max_memory_allocated(self.device) / mib}


def gpu_train_step(config: PluginConfig, data_root: Path) -> GpuTrainStep:
    from autohdr.runs.debug import build_loaders, resolve_preset, select_rows
    from autohdr.diagnosis.hooks import default_loss_fn

    mode = config.modes[0]
    preset = resolve_preset(mode, config.mode_overrides(mode))
    device = torch.device(config.device if config.device.startswith("cuda") else "cuda")
    train_rows, val_rows = select_rows(data_root, preset.data)
    train_loader, _ = build_loaders(train_rows, val_rows, preset.data, config.seed)
    batch = {k: v.to(device) for k, v in next(iter(train_loader)).items() if isinstance(v, torch.Tensor)}
    torch.manual_seed(config.seed)
    model = checked_factory(config)().to(device).train()
    spec = preset.train.spec
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset.train.lr * spec.lr_scale)
    torch.cuda.reset_peak_memory_stats(device)
    return GpuTrainStep(model, optimizer, default_loss_fn(spec, preset.train.loss_weights), batch,
                        spec.residual_active, preset.train.grad_clip_norm, device, mode)


def check_step(step: GpuTrainStep, loss: float, weights_before: float) -> None:
    """The benchmarked steps trained: finite losses and weights that moved."""
    assert step.losses and all(math.isfinite(v) for v in step.losses), f"non-finite loss in {step.losses}"
    assert math.isfinite(loss)
    assert step.weights_checksum() != weights_before, "the optimizer steps left every weight unchanged"
