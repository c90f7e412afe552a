"""A plain PyTorch training loop with autohdr attached: the 3 lines marked ``# autohdr``.

Everything else is the kind of loop a user already has: a dataset class of its own, autohdr's lens
model, AdamW, a loss module of its own, clipping, and a ``validate()`` in eval mode after each epoch.
Attached, autohdr records the runbook's metrics into ``--out`` and ``autohdr judge OUT`` judges them::

    python examples/attach_your_loop.py --out runs/attached     # 8 fixture pairs, 64x64, 8 steps: seconds
    autohdr judge runs/attached                                  # the verdict table, ALL GOOD

``--data-root`` takes any folder of ``<id>_original.jpg`` (distorted) / ``<id>_generated.jpg``
(corrected) pairs; the default is the fixtures beside this repository.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import autohdr                                                                    # autohdr
from autohdr.lens.geometry import apply_correction
from autohdr.lens.model import LensCorrectionModel, ModelConfig

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "pairs"


class Pairs(torch.utils.data.Dataset):
    """The first ``count`` pairs of ``root``, resized to ``size`` x ``size``, as float images in [0, 1]."""

    def __init__(self, root: Path, count: int, size: int) -> None:
        self.inputs = sorted(Path(root).glob("*_original.jpg"))[:count]
        self.size = size

    def __len__(self) -> int:
        return len(self.inputs)

    def _load(self, path: Path) -> torch.Tensor:
        image = Image.open(path).convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)

    def __getitem__(self, index: int) -> dict:
        source = self.inputs[index]
        target = source.with_name(source.name.replace("_original", "_generated"))
        return {"input_image": self._load(source), "target_image": self._load(target), "image_id": source.stem}


class WarpLoss(nn.Module):
    """L1 between the target and the input warped by the model's lens and flow (border-padded),
    plus a small penalty on the flow's magnitude."""

    def __init__(self, flow_weight: float = 1e-3) -> None:
        super().__init__()
        self.flow_weight = flow_weight

    def forward(self, outputs: dict, image: torch.Tensor, target: torch.Tensor) -> dict:
        flow = outputs.get("residual_flow_lowres")
        grid = apply_correction(image, outputs["params"], flow).final_grid
        warped = F.grid_sample(image, grid, padding_mode="border", align_corners=False)
        photo = (warped - target).abs().mean()
        flow_mag = flow.abs().mean() if flow is not None else photo.new_zeros(())
        return {"loss": photo + self.flow_weight * flow_mag, "photo": photo, "flow_mag": flow_mag}


@torch.no_grad()
def validate(model: nn.Module, loader, loss_fn: nn.Module) -> float:
    model.eval()
    errors = [float(loss_fn(model(b["input_image"]), b["input_image"], b["target_image"])["photo"]) for b in loader]
    model.train()
    return sum(errors) / len(errors)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the run folder autohdr writes (must not hold a run)")
    parser.add_argument("--data-root", type=Path, default=FIXTURES)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    data = Pairs(args.data_root, args.pairs, args.size)
    train_loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    val_loader = torch.utils.data.DataLoader(data, batch_size=4)
    model = LensCorrectionModel(ModelConfig(widths=(8, 16, 32, 32), head_hidden=32, residual_hidden=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    loss_fn = WarpLoss()

    run = autohdr.attach(model, optimizer, args.out, stage="stage2_hybrid", val_loader=val_loader, loss=loss_fn)  # autohdr
    model.train()
    for epoch in range(args.epochs):
        for batch in train_loader:
            losses = loss_fn(model(batch["input_image"]), batch["input_image"], batch["target_image"])
            optimizer.zero_grad()
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
        print(f"epoch {epoch}: train loss {losses['loss'].item():.4f}, val L1 {validate(model, val_loader, loss_fn):.4f}")
    run.close()                                                                   # autohdr


if __name__ == "__main__":
    main()
