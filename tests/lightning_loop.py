"""The Lightning user's code of tests/test_lightning.py: a LightningModule around autohdr's lens model
and the loop that trains it with ``AutohdrCallback``. Its own module so that pytorch_lightning (~2.6 s
to import) is imported when a Lightning test first runs, not by every pytest-xdist worker at collection."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch

from autohdr.data.settings import default_fixture_root
from autohdr.diagnosis.hooks import InstrumentationConfig, default_loss_fn
from autohdr.integrations.lightning import AutohdrCallback, lens_model, step_outputs  # noqa: F401 (the tests' use)
from autohdr.lens.evaluation import correct
from autohdr.lens.model import LensCorrectionModel
from autohdr.runs.debug import build_loaders, load_ground_truth, resolve_preset, select_rows

#: stage2_probe on 8 pairs at 64 px, batches of 4: 2 steps an epoch, 4 epochs (both loops alike)
TINY = {"data.num_pairs": 8, "data.resize_hw": [64, 64], "data.batch_size": 4}
HEADS = ("backbone", "param_head", "residual_head")


# ---------------------------------------------------------------------------- the user's code

class LitLens(pl.LightningModule):
    """A LightningModule around autohdr's lens model, as a user writes one: the hand loop's step
    (``correct``, the loss) in ``training_step``; Lightning does backward, clipping and the step.
    For autohdr, ``training_step`` returns the correction and the loss parts beside the loss
    (without autohdr it would ``return loss``).

    ``group_lrs``: one AdamW param group per head with these lrs (else one group); ``lr_lambda``:
    a per-step ``LambdaLR`` factor (``interval="step"``)."""

    def __init__(self, model, loss_fn, *, residual_active: bool, lr: float, weight_decay: float,
                 group_lrs: dict[str, float] | None = None, lr_lambda=None) -> None:
        super().__init__()
        self.model, self.loss_fn, self.residual_active = model, loss_fn, residual_active
        self.lr, self.weight_decay, self.group_lrs, self.lr_lambda = lr, weight_decay, group_lrs, lr_lambda

    def training_step(self, batch, batch_idx):
        correction = correct(self.model, batch["input_image"], self.residual_active)
        loss, parts = self.loss_fn(correction, batch["target_image"])
        return {"loss": loss, "correction": correction, "parts": parts}  # autohdr

    def configure_optimizers(self):
        if self.group_lrs is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
        else:
            params = [{"params": list(getattr(self.model, name).parameters()), "lr": self.group_lrs[name]}
                      for name in HEADS]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_lambda is None:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def train_with_lightning(run_dir: Path, *, model=None, seed: int = 0, overrides=None, epochs: int | None = None,
                         ckpt_path: Path | None = None, loader_fault=None, accumulate_grad_batches: int = 1,
                         **module_options):
    """``tests/hand_loop.py::train_by_hand`` with Lightning doing the loop: the same preset, data,
    seed, model, optimizer and clip. Returns the Trainer (its callback wrote ``run_dir``).

    The lines marked ``# autohdr`` are what a Lightning user adds; ``hand_like`` is what the
    hand loop gives its hooks (the preset's loss weights, judge thresholds and instrumentation
    settings, the ground truth), so that the two runs are configured alike."""
    from autohdr.integrations.lightning import AutohdrCallback  # noqa: F401, F811  # autohdr
    preset = resolve_preset("stage2_probe", {**TINY, **(overrides or {})})
    cfg, spec = preset.train, preset.train.spec
    train_rows, val_rows = select_rows(default_fixture_root(), preset.data)
    train_loader, val_loader = build_loaders(train_rows, val_rows, preset.data, seed)
    torch.manual_seed(seed)
    model = model if model is not None else LensCorrectionModel(preset.model)
    loss_fn = default_loss_fn(spec, cfg.loss_weights)
    module = LitLens(model, loss_fn, residual_active=spec.residual_active, lr=cfg.lr * spec.lr_scale,
                     weight_decay=cfg.weight_decay, **module_options)
    hand_like = {"stage": cfg.stage, "judge_config": preset.judge, "loss_fn": loss_fn,
                 "ground_truth": load_ground_truth(default_fixture_root()),
                 "config": InstrumentationConfig.from_train_config(cfg), "log": lambda message: None}
    trainer = pl.Trainer(
        callbacks=[AutohdrCallback(run_dir, val_loader=val_loader, intent="probe", **hand_like)],  # autohdr
        max_epochs=epochs or cfg.epochs, limit_train_batches=cfg.max_steps_per_epoch or 1.0,
        gradient_clip_val=cfg.grad_clip_norm, accumulate_grad_batches=accumulate_grad_batches,
        accelerator="cpu", devices=1, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=run_dir.parent)
    if loader_fault is not None:
        train_loader = loader_fault(train_loader)
    trainer.fit(module, train_dataloaders=train_loader, ckpt_path=ckpt_path)
    return trainer


class ManualOptimization(LitLens):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
