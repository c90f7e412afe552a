"""PNG figures of a run: the key curves (``curves.png``) and per-sample triplets (``triplets.png``).

``plot_curves(history, path, title=...)`` draws everything from the run's metric history (the
records of ``metrics.jsonl``): loss and its weighted terms, raw loss terms, validation proxy
against the identity and ground-truth baselines, proxy sub-scores, learning rate, gradient norm
and parameter change per parameter group, and displacement in pixels. A value that is exactly 0
(a gradient or an update that never happened) is drawn as a marker on a strip labelled ``0``
under its log axis, never as a tiny number.

``plot_triplets(model, probe, path, residual_active=...)`` shows, per probe sample, input /
prediction / target and the two error images ``|prediction − target|`` and ``|input − target|``
on one colour scale, with the sample's proxy score for the model and for the identity warp.

Every text drawn passes through :func:`safe_text`: characters the figure font lacks (e.g. CJK in
a file name) become ``?`` instead of a "Glyph missing" warning, and ``$`` cannot start math mode.
"""

from __future__ import annotations

import datetime as _dt
import functools
from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.ft2font import FT2Font  # noqa: E402

from autohdr.lens.evaluation import correct, identity_prediction  # noqa: E402
from autohdr.lens.proxy import proxy_score  # noqa: E402

#: Proxy sub-scores shown as bars (``val_proxy_<name>``, ``identity_proxy_<name>``, ``gt_proxy_<name>``).
PROXY_PARTS = ("total", "edge", "line", "grad", "ssim", "mae")
#: Axes labels of the zero strips, so tests and readers can find them.
ZERO_STRIP_LABELS = {"grad_norm": "zeros: gradient norm", "param_delta": "zeros: parameter change"}
_DISPLACEMENT = (("param_grid_disp_px_mean", "parametric grid"), ("residual_contrib_px_mean", "residual contribution"),
                 ("final_grid_disp_px_mean", "final grid"))
_BASELINES = (("identity_proxy_total", "identity", "tab:orange", "--"),
              ("gt_proxy_total", "ground-truth warp", "tab:green", ":"))


# ----------------------------------------------------------------------------- text

@functools.lru_cache(maxsize=None)
def _font_codepoints() -> frozenset[int]:
    """Code points of the font matplotlib draws text with (DejaVu Sans unless configured otherwise)."""
    path = font_manager.findfont(font_manager.FontProperties(), fallback_to_default=True)
    return frozenset(FT2Font(path).get_charmap())


def safe_text(text: Any) -> str:
    """``text`` with every character the figure font cannot draw replaced by ``?`` and ``$`` escaped.

    Keeps Latin, Greek and Cyrillic (DejaVu Sans has them); CJK and other scripts the font lacks
    become ``?`` so matplotlib never warns "Glyph ... missing".
    """
    codepoints = _font_codepoints()
    out = []
    for char in str(text):
        if char == "\n":
            out.append(char)
        elif char == "$":
            out.append(r"\$")
        elif ord(char) in codepoints and char.isprintable():
            out.append(char)
        else:
            out.append("?")
    return "".join(out)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def run_title(report: Mapping[str, Any]) -> str:
    """``mode · seed S · data ROOT · DATE`` from a run's report (as written to ``report.json``)."""
    train = (report.get("config") or {}).get("train") or {}
    parts = [str(report.get("mode") or "run")]
    if report.get("stage"):
        parts[0] += f" ({report['stage']})"
    if "seed" in train:
        parts.append(f"seed {train['seed']}")
    root = report.get("data_root")
    parts.append(f"data {_shorten(str(root), 60)}" if root else "data: custom loaders")
    created = report.get("created") or _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    parts.append(str(created).replace("T", " "))
    return " · ".join(parts)


# ----------------------------------------------------------------------------- history access

def _rows(history: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The records of ``kind``, always with a ``step`` column (a run stopped at its init check by
    fail fast has no step yet: its panels then say there is no data)."""
    rows = history[history["kind"] == kind] if "kind" in history.columns else history.iloc[0:0]
    return rows if "step" in rows.columns else rows.assign(step=pd.Series(dtype=float))


def _numeric(frame: pd.DataFrame, column: str) -> pd.Series | None:
    """The column as floats (``None`` when absent or never recorded)."""
    if column not in frame.columns:
        return None
    values = pd.to_numeric(frame[column], errors="coerce")
    return values if values.notna().any() else None


def _run_config(history: pd.DataFrame) -> dict[str, Any]:
    start = _rows(history, "run_start")
    if start.empty or "config" not in start.columns:
        return {}
    config = start.iloc[-1]["config"]
    return config if isinstance(config, dict) else {}


def _groups(steps: pd.DataFrame, prefix: str) -> list[str]:
    """Parameter groups with a ``<prefix>_<group>`` column, in column order (``total`` excluded)."""
    return [c[len(prefix) + 1:] for c in steps.columns
            if c.startswith(prefix + "_") and c != f"{prefix}_total" and _numeric(steps, c) is not None]


def _loss_terms(steps: pd.DataFrame) -> list[str]:
    """Loss terms that have both a raw ``<term>`` and a ``<term>_weighted`` column."""
    return [c[: -len("_weighted")] for c in steps.columns
            if c.endswith("_weighted") and c[: -len("_weighted")] in steps.columns]


# ----------------------------------------------------------------------------- panels

def _legend(ax, **kwargs) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, [safe_text(label) for label in labels], loc="best", fontsize=7, **kwargs)


def _no_data(ax, message: str, y: float = 0.5) -> None:
    ax.text(0.5, y, safe_text(message), ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4")


def _panel_loss(ax, steps: pd.DataFrame, val: pd.DataFrame) -> None:
    """Training loss as the stack of its weighted terms, the total on top, validation loss as points."""
    terms = [t for t in _loss_terms(steps)
             if _numeric(steps, f"{t}_weighted") is not None and _numeric(steps, f"{t}_weighted").abs().max() > 0]
    loss = _numeric(steps, "loss")
    if loss is None:
        _no_data(ax, "no training loss recorded")
    else:
        x = steps["step"].to_numpy()
        if terms:
            layers = [_numeric(steps, f"{t}_weighted").fillna(0).to_numpy() for t in terms]
            ax.stackplot(x, *layers, labels=[f"{t} (weighted)" for t in terms], alpha=0.55,
                         colors=plt.get_cmap("tab20").colors[: len(terms)])
        ax.plot(x, loss.to_numpy(), color="black", lw=1.5, label="loss (total)")
    val_loss = _numeric(val, "val_loss")
    if val_loss is not None:
        ax.plot(val["step"], val_loss, "D", color="tab:red", ms=5, label="validation loss")
    top = max((float(v.max()) for v in (loss, val_loss) if v is not None), default=1.0)
    ax.set(title="loss = sum of weighted terms", xlabel="step", ylim=(0, top * 1.6 if top > 0 else 1.0))
    _legend(ax, ncol=3)


def _panel_raw_terms(ax, steps: pd.DataFrame) -> None:
    """Each raw (unweighted) loss term on a log axis; terms that are always 0 are named in the legend."""
    drawn, always_zero = 0, []
    for i, term in enumerate(_loss_terms(steps)):
        values = _numeric(steps, term)
        if values is None:
            continue
        positive = values.where(values > 0)
        if positive.notna().any():
            ax.plot(steps["step"], positive, lw=1, color=plt.get_cmap("tab20").colors[i % 20], label=term)
            drawn += 1
        elif (values == 0).all():
            always_zero.append(term)
    if drawn:
        ax.set_yscale("log")
    else:
        _no_data(ax, "no raw loss terms recorded")
    if always_zero:
        ax.plot([], [], " ", label="always 0: " + ", ".join(always_zero))
    ax.set(title="raw loss terms (unweighted)", xlabel="step")
    _legend(ax, ncol=2)


def _panel_proxy(ax, val: pd.DataFrame) -> None:
    """Validation proxy of the model per epoch, with the identity and ground-truth warps as lines."""
    model = _numeric(val, "val_proxy_total")
    if model is None:
        _no_data(ax, "no validation epochs recorded")
        ax.set(title="validation proxy total")
        return
    ax.plot(val["step"], model, "o-", color="tab:blue", label="model")
    for column, label, color, style in _BASELINES:
        values = _numeric(val, column)
        if values is not None:
            ax.axhline(float(values.dropna().iloc[-1]), color=color, ls=style, lw=1.5, label=label)
    for step, epoch, value in zip(val["step"], val["epoch"], model):
        if pd.notna(value):
            ax.annotate(f"ep {int(epoch) + 1}", (step, value), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=6, color="tab:blue")
    title = "validation proxy total"
    identity = _numeric(val, "identity_proxy_total")
    if identity is not None and pd.notna(model.iloc[-1]) and pd.notna(identity.iloc[-1]):
        title += f" (last: model − identity = {model.iloc[-1] - identity.iloc[-1]:+.4f})"
    ax.set(title=title, xlabel="step (end of epoch)")
    _legend(ax)


def _panel_proxy_parts(ax, val: pd.DataFrame) -> None:
    """Proxy sub-scores of the last validation epoch: model, identity and ground-truth warp side by side."""
    if val.empty:
        _no_data(ax, "no validation epochs recorded")
        ax.set(title="proxy sub-scores (last epoch)")
        return
    last = val.iloc[-1]
    series = [("val_proxy", "model", "tab:blue"), ("identity_proxy", "identity", "tab:orange"),
              ("gt_proxy", "ground-truth warp", "tab:green")]
    series = [s for s in series if pd.notna(last.get(f"{s[0]}_total"))]
    x = np.arange(len(PROXY_PARTS))
    width = 0.8 / max(len(series), 1)
    for i, (prefix, label, color) in enumerate(series):
        heights = [float(last.get(f"{prefix}_{part}", np.nan)) for part in PROXY_PARTS]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, color=color, label=label)
    ax.set_xticks(x, PROXY_PARTS)
    ax.set(title=f"proxy sub-scores, epoch {int(last['epoch']) + 1}", ylim=(0, 1.05))
    _legend(ax, ncol=3)


def _panel_lr(ax, steps: pd.DataFrame) -> None:
    lr = _numeric(steps, "lr")
    if lr is None:
        _no_data(ax, "no learning rate recorded")
    else:
        ax.plot(steps["step"], lr, color="tab:purple", lw=1.5)
        if (lr.fillna(0) == 0).all():
            _no_data(ax, "learning rate is exactly 0 on every step", y=0.75)
            ax.texts[-1].set_color("tab:red")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set(title="learning rate", xlabel="step")


def _panel_log_with_zeros(fig, cell, steps: pd.DataFrame, prefix: str, title: str, colors: dict[str, Any],
                          clip_norm: float | None = None) -> None:
    """Per-group values on a log axis; exact zeros as markers on a strip labelled ``0`` beneath it."""
    grid = cell.subgridspec(2, 1, height_ratios=[5, 1], hspace=0.05)
    ax = fig.add_subplot(grid[0])
    strip = fig.add_subplot(grid[1], sharex=ax)
    strip.set_label(ZERO_STRIP_LABELS[prefix])
    groups = _groups(steps, prefix)
    x = steps["step"]
    positive_any = False
    for row, group in enumerate(groups):
        values = _numeric(steps, f"{prefix}_{group}")
        zero = values == 0
        recorded = int(values.notna().sum())
        label = group if not zero.any() else f"{group} (0 on {int(zero.sum())}/{recorded} steps)"
        positive = values.where(values > 0)
        if positive.notna().any():
            positive_any = True
            ax.plot(x, positive, lw=1, marker=".", ms=3, color=colors[group], label=label)
        else:
            ax.plot([], [], color=colors[group], label=label)
        strip.plot(x[zero], np.full(int(zero.sum()), row), "|", ms=12, mew=2.5, color=colors[group], ls="")
    total = _numeric(steps, f"{prefix}_total")
    if total is not None and (total > 0).any():
        ax.plot(x, total.where(total > 0), color="black", lw=0.8, ls="--", label="total")
        positive_any = True
    if clip_norm:
        ax.axhline(clip_norm, color="tab:red", ls="-.", lw=1.2, label=f"clip norm {clip_norm:g}")
        positive_any = True
    if positive_any:
        ax.set_yscale("log")
    elif groups:
        _no_data(ax, "exactly 0 on every step for every group")
        ax.texts[-1].set_color("tab:red")
    else:
        _no_data(ax, f"no {prefix}_* columns recorded")
    ax.set_title(safe_text(title))
    ax.tick_params(labelbottom=False)
    _legend(ax)
    count = max(len(groups), 1)
    strip.set_ylim(-0.8, count - 0.2)
    strip.set_yticks([(count - 1) / 2], ["0"])
    strip.tick_params(axis="y", length=0)
    strip.set_xlabel("step")
    for side in ("top", "right"):
        strip.spines[side].set_visible(False)


def _panel_displacement(ax, steps: pd.DataFrame, history: pd.DataFrame, config: Mapping[str, Any]) -> None:
    drawn = False
    for (column, label), color in zip(_DISPLACEMENT, ("tab:blue", "tab:orange", "black")):
        values = _numeric(steps, column)
        if values is None:
            continue
        if (values.fillna(0) == 0).all():
            label += " (always 0)"
        ax.plot(steps["step"], values, lw=1.5 if column.startswith("residual") else 1, color=color, label=label,
                ls="--" if column.startswith("final") else "-")
        drawn = True
    threshold = config.get("debug_residual_inactive_threshold_px")
    if drawn and threshold and _numeric(steps, "residual_contrib_px_mean") is not None:
        ax.axhline(float(threshold), color="tab:red", ls=":", lw=1, label=f"residual inactive below {threshold:g} px")
    warnings = _rows(history, "warning")
    if "name" in warnings.columns and "step" in warnings.columns:
        inactive = warnings[warnings["name"] == "residual_inactive"]
        for i, step in enumerate(pd.to_numeric(inactive["step"], errors="coerce").dropna()):
            ax.axvline(step, color="tab:red", lw=0.8, alpha=0.6, label="inactivity warning" if i == 0 else None)
    if not drawn:
        _no_data(ax, "no displacement recorded (instrumentation off)")
    ax.set(title="mean displacement (px)", xlabel="step")
    _legend(ax)


def curves_figure(history: pd.DataFrame, title: str | None = None) -> plt.Figure:
    """The figure of :func:`plot_curves` (caller closes it)."""
    steps = _rows(history, "train_step").sort_values("step")
    val = _rows(history, "val_epoch").sort_values("step")
    config = _run_config(history)
    groups = list(dict.fromkeys(_groups(steps, "grad_norm") + _groups(steps, "param_delta")))
    palette = plt.get_cmap("tab10").colors
    colors = {group: palette[i % 10] for i, group in enumerate(groups)}
    fig = plt.figure(figsize=(14, 17))
    outer = fig.add_gridspec(4, 2, hspace=0.42, wspace=0.18, left=0.06, right=0.98, top=0.94, bottom=0.04)
    _panel_loss(fig.add_subplot(outer[0, 0]), steps, val)
    _panel_raw_terms(fig.add_subplot(outer[0, 1]), steps)
    _panel_proxy(fig.add_subplot(outer[1, 0]), val)
    _panel_proxy_parts(fig.add_subplot(outer[1, 1]), val)
    clip = config.get("grad_clip_norm")
    _panel_log_with_zeros(fig, outer[2, 0], steps, "grad_norm", "gradient norm per group (before clipping)", colors,
                          clip_norm=float(clip) if clip else None)
    _panel_log_with_zeros(fig, outer[2, 1], steps, "param_delta", "parameter change per step, per group", colors)
    _panel_lr(fig.add_subplot(outer[3, 0]), steps)
    _panel_displacement(fig.add_subplot(outer[3, 1]), steps, history, config)
    if title:
        fig.suptitle(safe_text(title), fontsize=12)
    return fig


def plot_curves(history: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """Write ``curves.png`` from a run's metric history (see the module docstring for the panels)."""
    fig = curves_figure(history, title)
    path = Path(path)
    try:
        fig.savefig(path, dpi=72)
    finally:
        plt.close(fig)
    return path


# ----------------------------------------------------------------------------- triplets

def _image(tensor: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` in [0, 1] -> ``(H, W, 3)`` numpy for ``imshow``."""
    return tensor.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def triplets_figure(model: torch.nn.Module, probe: Mapping[str, Any], *, residual_active: bool,
                    count: int = 3) -> plt.Figure:
    """The figure of :func:`plot_triplets` (caller closes it)."""
    image = probe["input_image"][:count]
    target = probe["target_image"][:count].to(image)
    ids = list(probe.get("image_id") or [])[:count]
    was_training = model.training
    model.eval()
    try:
        pred = correct(model, image, residual_active).prediction.float()
    finally:
        model.train(was_training)
    identity = identity_prediction(image).float()
    rows = image.shape[0]
    fig, axes = plt.subplots(rows, 5, figsize=(14, 3.4 * rows + 0.4), squeeze=False)
    for i in range(rows):
        truth = target[i].float().clamp(0, 1).cpu()
        model_score = proxy_score(pred[i].clamp(0, 1).cpu(), truth)
        identity_score = proxy_score(identity[i].clamp(0, 1).cpu(), truth)
        err_pred = (pred[i] - target[i]).abs().mean(0).cpu().numpy()
        err_input = (image[i].float() - target[i]).abs().mean(0).cpu().numpy()
        vmax = float(max(np.percentile(err_pred, 99.5), np.percentile(err_input, 99.5), 1e-6))
        delta = model_score["total"] - identity_score["total"]
        name = _shorten(str(ids[i]), 28) if i < len(ids) else f"sample {i}"
        fail = " (hard fail)"
        panels = [
            (_image(image[i]), f"input {name}\nidentity proxy {identity_score['total']:.3f}"
                               f"{fail if identity_score['hard_fail'] else ''}", None),
            (_image(pred[i]), f"prediction\nmodel proxy {model_score['total']:.3f} ({delta:+.3f})"
                              f"{fail if model_score['hard_fail'] else ''}",
             "tab:green" if delta > 0 else "tab:red"),
            (_image(target[i]), "target", None),
            (err_pred, f"|prediction − target|\nmean {err_pred.mean():.4f}", None),
            (err_input, f"|input − target|\nmean {err_input.mean():.4f}", None),
        ]
        for j, (data, title, color) in enumerate(panels):
            ax = axes[i, j]
            if data.ndim == 2:
                ax.imshow(data, cmap="magma", vmin=0.0, vmax=vmax)
            else:
                ax.imshow(data)
            ax.set_title(safe_text(title), fontsize=9, color=color or "black")
            ax.axis("off")
    fig.suptitle(safe_text("probe samples, final model: error images of a row share one colour scale "
                           "(brighter = further from the target)"), fontsize=10)
    # The layout tight_layout finds for these panels (0.15 in margins, 0.55 in above the top row for the
    # suptitle and a two-line title), set directly: tight_layout draws the whole figure once more to
    # measure it, a third of this figure's cost.
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.15 / width, right=1 - 0.15 / width, bottom=0.15 / height, top=0.97 - 0.55 / height,
                        wspace=0.057, hspace=0.0)
    return fig


def plot_triplets(model: torch.nn.Module, probe: Mapping[str, Any], path: str | Path, *, residual_active: bool,
                  count: int = 3) -> Path:
    """Write ``triplets.png``: per probe sample, input, prediction, target, ``|prediction − target|``
    and ``|input − target|``.

    ``probe`` holds ``input_image`` / ``target_image`` ``(B, 3, H, W)`` in [0, 1] and optionally
    ``image_id`` (B strings); the first ``count`` samples are drawn with ``model`` in eval mode
    (restored afterwards). Titles carry each sample's proxy total for the model and for the
    identity warp (the difference in green when the model helps, red when it does not); the two
    error images of a row share one colour scale.
    """
    fig = triplets_figure(model, probe, residual_active=residual_active, count=count)
    path = Path(path)
    try:
        fig.savefig(path, dpi=72)
    finally:
        plt.close(fig)
    return path
