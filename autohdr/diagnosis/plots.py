"""PNG figures of a run: the key curves and a few input / prediction / target triplets."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from autohdr.lens.evaluation import correct  # noqa: E402


def plot_curves(history: pd.DataFrame, path: str | Path) -> Path:
    """Training loss, validation proxy vs identity, gradient norms and residual contribution."""
    steps = history[history["kind"] == "train_step"]
    val = history[history["kind"] == "val_epoch"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    if "loss" in steps:
        ax.plot(steps["step"], steps["loss"], lw=1)
    ax.set(title="training loss", xlabel="step")
    ax = axes[0, 1]
    if "val_proxy_total" in val:
        ax.plot(val["epoch"] + 1, val["val_proxy_total"], "o-", label="model")
    if "identity_proxy_total" in val:
        ax.plot(val["epoch"] + 1, val["identity_proxy_total"], "--", label="identity")
    if "gt_proxy_total" in val and val["gt_proxy_total"].notna().any():
        ax.plot(val["epoch"] + 1, val["gt_proxy_total"], ":", label="ground-truth warp")
    ax.set(title="validation proxy total", xlabel="epoch")
    ax.legend(loc="best", fontsize=8)
    ax = axes[1, 0]
    for group in ("backbone", "param_head", "residual_head"):
        col = f"grad_norm_{group}"
        if col in steps:
            ax.semilogy(steps["step"], steps[col].clip(lower=1e-12), lw=1, label=group)
    ax.set(title="gradient norm before clipping", xlabel="step")
    ax.legend(loc="best", fontsize=8)
    ax = axes[1, 1]
    for col in ("param_grid_disp_px_mean", "residual_contrib_px_mean"):
        if col in steps:
            ax.plot(steps["step"], steps[col], lw=1, label=col)
    ax.set(title="displacement (px)", xlabel="step")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


@torch.no_grad()
def plot_triplets(trainer, path: str | Path, count: int = 3) -> Path:
    """Input, prediction and target of the first ``count`` probe samples with the final model."""
    probe = trainer._probe_batch()
    model = trainer.model
    was_training = model.training
    model.eval()
    try:
        image = probe["input_image"][:count]
        pred = correct(model, image, trainer.spec.residual_active).prediction
    finally:
        model.train(was_training)
    target = probe["target_image"][:count]
    rows = image.shape[0]
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
    for i in range(rows):
        for j, (title, tensor) in enumerate((("input", image), ("prediction", pred), ("target", target))):
            axes[i, j].imshow(tensor[i].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
            axes[i, j].set_title(f"{title} {probe['image_id'][i] if probe['image_id'] else ''}", fontsize=9)
            axes[i, j].axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
