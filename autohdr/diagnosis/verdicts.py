"""Verdicts: the runbook's good and bad signals judged from a run's metric history.

Each signal is a pure function ``(history, JudgeConfig) -> Verdict`` of the records in
``metrics.jsonl`` (a DataFrame with a ``kind`` column), so a finished run can be judged again
(``autohdr judge RUN_DIR``) and every signal can be tested on hand-made histories.

``Verdict.ok`` is ``True`` (good), ``False`` (bad) or ``None`` (does not apply, e.g. residual
signals in stage 1, or the data to judge is missing).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import pandas as pd

from autohdr.diagnosis.metrics_log import read_metrics


@dataclass(frozen=True)
class Verdict:
    signal: str
    ok: bool | None
    detail: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class JudgeConfig:
    """Thresholds of the signals (stored in each mode's preset under ``[judge]``)."""

    beats_identity_margin: float = 0.002    # model proxy total must exceed identity's by this much
    require_beats_identity: bool = True     # False: report beats_identity without judging it
    beats_constant_lens_margin: float = 0.01  # model proxy total must exceed its own mean lens's by this much
    require_beats_constant_lens: bool = True  # False: report beats_constant_lens without judging it
    residual_min_px: float = 1e-3           # residual contribution above this counts as non-zero
    inactive_max_warnings: int = 1          # more inactivity warnings than this is "repeated"
    data_bound_max_frac: float = 0.5        # median data time / step time above this is data-bound
    min_samples_per_sec: float = 0.0        # and throughput below this (0: the fraction alone decides)
    loss_min_relative_drop: float = 0.05    # last-window mean loss must be this much below the first
    clipping_max_frac: float = 0.5          # fraction of clipped steps allowed
    saturation_max_frac: float = 0.5        # median fraction of parameters at their bounds allowed
    init_atol: float = 1e-5                 # tolerance of the identity-at-init comparison


def _rows(history: pd.DataFrame, kind: str) -> pd.DataFrame:
    if "kind" not in history.columns:
        return history.iloc[0:0]
    return history[history["kind"] == kind]


def _column(frame: pd.DataFrame, name: str) -> pd.Series | None:
    if name not in frame.columns:
        return None
    values = frame[name].dropna()
    return values if len(values) else None


def _stage_info(history: pd.DataFrame) -> dict[str, Any]:
    start = _rows(history, "run_start")
    if start.empty:
        return {"stage": None, "residual_active": None, "world_size": 1}
    row = start.iloc[-1]
    return {"stage": row.get("stage"), "residual_active": _flag(row.get("residual_branch_active")),
            "world_size": int(row.get("world_size", 1) or 1)}


def _residual_off(history: pd.DataFrame, signal: str) -> Verdict | None:
    info = _stage_info(history)
    if info["residual_active"] is False:
        return Verdict(signal, None, f"residual branch is off in {info['stage']}: not judged")
    return None


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _flag(value: Any) -> bool:
    """A boolean field of a record; missing values (NaN/None from other record kinds) are False."""
    return bool(pd.notna(value) and value)


# ---------------------------------------------------------------------------- runbook signals

def scores_move(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Good: validation proxy and probe scores change across epochs at full precision."""
    val = _rows(history, "val_epoch")
    if len(val) < 2:
        return Verdict("scores_move", None, f"needs >= 2 validation epochs, got {len(val)}")
    evidence = {}
    frozen = []
    for name in ("val_proxy_total", "probe_proxy_total_score", "probe_pixel"):
        values = _column(val, name)
        if values is None:
            continue
        distinct = int(values.nunique())
        evidence[f"{name}_distinct"] = distinct
        evidence[f"{name}_range"] = float(values.max() - values.min())
        if distinct < 2:
            frozen.append(name)
    if not evidence:
        return Verdict("scores_move", None, "no validation scores recorded")
    if frozen:
        return Verdict("scores_move", False, f"unchanged across {len(val)} epochs: {', '.join(frozen)}", evidence)
    return Verdict("scores_move", True, f"scores change across {len(val)} epochs", evidence)


def probe_checksums_change(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Good: the probe's prediction checksum changes across epochs."""
    val = _rows(history, "val_epoch")
    sums = _column(val, "probe_pred_checksum")
    if sums is None or len(sums) < 2:
        return Verdict("probe_checksums_change", None, "needs probe checksums from >= 2 epochs (instrumentation on)")
    evidence = {name: int(val[name].nunique()) for name in
                ("probe_pred_checksum", "probe_final_grid_checksum", "probe_params_checksum") if name in val}
    if evidence["probe_pred_checksum"] < 2:
        return Verdict("probe_checksums_change", False,
                       f"probe prediction checksum identical in all {len(sums)} epochs", evidence)
    return Verdict("probe_checksums_change", True,
                   f"{evidence['probe_pred_checksum']} distinct prediction checksums in {len(sums)} epochs", evidence)


def probe_tracks_updates(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad: probe checksums unchanged between epochs while the parameters did move.

    A step counts as moving the model when a parameter changed *and* a gradient was non-zero:
    weight decay alone also moves the weights of a model whose outputs ignore them (a stuck model,
    judged by ``loss_decreases`` and ``param_head_learning``), which is not a stale evaluation.
    """
    val = _rows(history, "val_epoch")
    steps = _rows(history, "train_step")
    if _column(val, "probe_pred_checksum") is None or len(val) < 2:
        return Verdict("probe_tracks_updates", None, "needs probe checksums from >= 2 epochs")
    delta_cols = [c for c in steps.columns if c.startswith("param_delta_")]
    if not delta_cols:
        return Verdict("probe_tracks_updates", None, "no parameter deltas recorded")
    moved = steps[delta_cols].fillna(0).sum(axis=1)
    grad_cols = [c for c in steps.columns if c.startswith("grad_norm_") and c != "grad_norm_total"]
    if grad_cols:
        moved = moved.where(steps[grad_cols].fillna(0).sum(axis=1) > 0, 0.0)
    stale = []
    val = val.sort_values("step")
    for (_, prev), (_, cur) in zip(val.iloc[:-1].iterrows(), val.iloc[1:].iterrows()):
        between = moved[(steps["step"] > prev["step"]) & (steps["step"] <= cur["step"])]
        if between.sum() > 0 and prev["probe_pred_checksum"] == cur["probe_pred_checksum"]:
            stale.append(int(cur["epoch"]))
    evidence = {"stale_epochs": stale, "epochs_compared": len(val) - 1}
    if stale:
        return Verdict("probe_tracks_updates", False,
                       f"probe unchanged while parameters moved, at epochs {stale}: evaluation looks at a stale model",
                       evidence)
    return Verdict("probe_tracks_updates", True, "probe changes whenever the parameters move", evidence)


def residual_contributes(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Good (stages 2 and 3): residual contribution in pixels is non-zero."""
    off = _residual_off(history, "residual_contributes")
    if off:
        return off
    steps = _rows(history, "train_step")
    contrib = _column(steps, "residual_contrib_px_mean")
    if contrib is None:
        return Verdict("residual_contributes", None, "no residual metrics recorded (instrumentation off)")
    late = contrib.iloc[len(contrib) // 2:]
    evidence = {"residual_contrib_px_mean_max": float(contrib.max()), "late_median_px": float(late.median()),
                "threshold_px": cfg.residual_min_px}
    flow = _column(steps, "residual_flow_abs_mean_px")
    if flow is not None:
        evidence["residual_flow_abs_mean_px_max"] = float(flow.max())
    if late.median() <= cfg.residual_min_px:
        return Verdict("residual_contributes", False,
                       f"residual contribution stays at {late.median():.2e} px (<= {cfg.residual_min_px} px)", evidence)
    return Verdict("residual_contributes", True, f"residual contributes {late.median():.4f} px (median, 2nd half)",
                   evidence)


def residual_head_learning(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Good (stages 2 and 3): residual head gradient norm and parameter delta are non-zero."""
    off = _residual_off(history, "residual_head_learning")
    if off:
        return off
    steps = _rows(history, "train_step")
    grads = _column(steps, "grad_norm_residual_head")
    deltas = _column(steps, "param_delta_residual_head")
    if grads is None or deltas is None:
        return Verdict("residual_head_learning", None, "no residual head gradients recorded (instrumentation off)")
    zero_grad = float((grads == 0).mean())
    zero_delta = float((deltas == 0).mean())
    evidence = {"grad_zero_frac": zero_grad, "delta_zero_frac": zero_delta,
                "grad_norm_median": float(grads.median()), "param_delta_median": float(deltas.median())}
    if zero_grad > 0.5 or zero_delta > 0.5:
        return Verdict("residual_head_learning", False,
                       f"residual head gradient zero on {zero_grad:.0%} and update zero on {zero_delta:.0%} of steps",
                       evidence)
    return Verdict("residual_head_learning", True, "residual head gets gradients and moves", evidence)


def residual_not_inactive(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad: repeated residual-inactivity warnings."""
    off = _residual_off(history, "residual_not_inactive")
    if off:
        return off
    if _column(_rows(history, "train_step"), "residual_contrib_px_mean") is None:
        return Verdict("residual_not_inactive", None, "no residual metrics recorded (instrumentation off)")
    warnings = _rows(history, "warning")
    count = int((warnings["name"] == "residual_inactive").sum()) if "name" in warnings else 0
    evidence = {"inactivity_warnings": count, "allowed": cfg.inactive_max_warnings}
    if count > cfg.inactive_max_warnings:
        return Verdict("residual_not_inactive", False, f"{count} residual inactivity warnings", evidence)
    return Verdict("residual_not_inactive", True, f"{count} inactivity warnings", evidence)


def beats_identity(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Good: the trained model beats the identity warp on exactly the same subset."""
    val = _rows(history, "val_epoch")
    if _column(val, "identity_proxy_total") is None or _column(val, "val_proxy_total") is None:
        return Verdict("beats_identity", None, "no validation epoch with an identity baseline")
    last = val.dropna(subset=["identity_proxy_total", "val_proxy_total"]).iloc[-1]
    model, identity = float(last["val_proxy_total"]), float(last["identity_proxy_total"])
    evidence = {"model_proxy_total": model, "identity_proxy_total": identity,
                "delta": model - identity, "margin": cfg.beats_identity_margin,
                "sample_count": int(last["val_sample_count"]) if pd.notna(last.get("val_sample_count")) else 0}
    gt = _as_float(last.get("gt_proxy_total"))
    if math.isfinite(gt) and gt != identity:
        evidence["gt_proxy_total"] = gt
        evidence["gap_closed_frac"] = (model - identity) / (gt - identity)
    gap = f", {evidence['gap_closed_frac']:.0%} of the gap to ground truth closed" if "gap_closed_frac" in evidence else ""
    good = model - identity > cfg.beats_identity_margin
    if not cfg.require_beats_identity:
        return Verdict("beats_identity", None, f"not required in this mode (model - identity = {model - identity:+.4f}{gap})",
                       evidence)
    if not good:
        return Verdict("beats_identity", False,
                       f"identity wins or ties: model {model:.4f} vs identity {identity:.4f} "
                       f"(needs +{cfg.beats_identity_margin}){gap}", evidence)
    return Verdict("beats_identity", True, f"model {model:.4f} vs identity {identity:.4f}{gap}", evidence)


def beats_constant_lens(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Good: the model beats its own mean lens applied to every image, on the same subset.

    A model that ignores its input predicts one lens for all images. It can beat identity (one good
    lens for the whole data set beats no correction) but never the mean of its own predictions,
    which is such a lens. No ground truth is needed; where the trainer had some, the per-parameter
    correlations of the predictions with it (``pred_gt_corr_*``) are added to the evidence.
    """
    val = _rows(history, "val_epoch")
    if _column(val, "constant_lens_proxy_total") is None or _column(val, "val_proxy_total") is None:
        return Verdict("beats_constant_lens", None,
                       "no constant-lens score recorded (it is scored at the last validation epoch when "
                       "debug_instrumentation is on)")
    last = val.dropna(subset=["constant_lens_proxy_total", "val_proxy_total"]).iloc[-1]
    model, constant = float(last["val_proxy_total"]), float(last["constant_lens_proxy_total"])
    evidence: dict[str, Any] = {"model_proxy_total": model, "constant_lens_proxy_total": constant,
                                "delta": model - constant, "margin": cfg.beats_constant_lens_margin}
    identity = _as_float(last.get("identity_proxy_total"))
    if math.isfinite(identity):
        evidence["identity_proxy_total"] = identity
    for column in sorted(c for c in val.columns if c.startswith("pred_gt_corr_")):
        value = _as_float(last.get(column))
        evidence["param_corr_" + column[len("pred_gt_corr_"):]] = value if math.isfinite(value) else None
    k1 = evidence.get("param_corr_k1")
    corr = f"; k1 correlates {k1:+.2f} with ground truth" if k1 is not None else ""
    summary = f"model {model:.4f} vs its own mean lens on every image {constant:.4f} ({model - constant:+.4f}){corr}"
    if not cfg.require_beats_constant_lens:
        return Verdict("beats_constant_lens", None, f"not required in this mode ({summary})", evidence)
    if not model - constant > cfg.beats_constant_lens_margin:
        return Verdict("beats_constant_lens", False,
                       f"{summary}, needs +{cfg.beats_constant_lens_margin}: the model predicts one lens for all "
                       "images instead of each image's (does the parameter head see the image?)", evidence)
    return Verdict("beats_constant_lens", True, summary, evidence)


def not_data_bound(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad: data time dominates the step and throughput is low."""
    steps = _rows(history, "train_step")
    data = _column(steps, "data_time_ms")
    batch = _column(steps, "batch_time_ms")
    if data is None or batch is None:
        return Verdict("not_data_bound", None, "no timings recorded (debug_perf_enabled off)")
    frac = float((steps["data_time_ms"] / steps["batch_time_ms"]).median())
    end = _rows(history, "run_end")
    rate = _as_float(end.iloc[-1].get("samples_per_sec")) if not end.empty else math.nan
    if not math.isfinite(rate):
        per_step = _column(steps, "samples_per_sec")
        rate = float(per_step.median()) if per_step is not None else math.nan
    evidence = {"data_time_frac_median": frac, "samples_per_sec": rate,
                "data_time_ms_median": float(data.median()), "batch_time_ms_median": float(batch.median())}
    low_throughput = cfg.min_samples_per_sec <= 0 or rate < cfg.min_samples_per_sec
    if frac > cfg.data_bound_max_frac and low_throughput:
        return Verdict("not_data_bound", False,
                       f"data loading takes {frac:.0%} of each step ({rate:.1f} samples/s): the loader starves "
                       "the model (more workers, smaller decode, cache)", evidence)
    return Verdict("not_data_bound", True, f"data loading is {frac:.0%} of a step, {rate:.1f} samples/s", evidence)


# ---------------------------------------------------------------------------- beyond the runbook

def init_is_identity(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Good: before any step the model's prediction, proxy and loss equal the identity warp's."""
    init = _rows(history, "init")
    if init.empty:
        return Verdict("init_is_identity", None, "no init check recorded (resumed run)")
    row = init.iloc[-1]
    if _flag(row.get("from_checkpoint")):
        return Verdict("init_is_identity", None, "model initialized from a checkpoint: not expected to be identity")
    evidence = {k: float(row[k]) for k in ("init_pred_max_abs_diff", "init_proxy_total", "identity_proxy_total",
                                           "init_loss", "identity_loss")}
    diffs = {"prediction": evidence["init_pred_max_abs_diff"],
             "proxy": abs(evidence["init_proxy_total"] - evidence["identity_proxy_total"]),
             "loss": abs(evidence["init_loss"] - evidence["identity_loss"])}
    off = [f"{k} differs by {v:.2e}" for k, v in diffs.items() if not v <= cfg.init_atol]
    if off:
        return Verdict("init_is_identity", False, "untrained model is not the identity warp: " + "; ".join(off), evidence)
    return Verdict("init_is_identity", True, "prediction, proxy and loss equal the identity warp's at init", evidence)


def loss_decreases(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Good: the training loss goes down (mean of the last 20% of steps vs the first 20%).

    From scratch it must fall by ``loss_min_relative_drop``; a run started from a trained
    checkpoint (``--init-from``) has less left to gain and must only not rise.
    """
    loss = _column(_rows(history, "train_step"), "loss")
    if loss is not None:
        loss = pd.to_numeric(loss, errors="coerce").dropna()
    if loss is None or len(loss) < 6:
        return Verdict("loss_decreases", None, "needs >= 6 training steps")
    window = max(3, len(loss) // 5)
    first, last = float(loss.iloc[:window].mean()), float(loss.iloc[-window:].mean())
    drop = (first - last) / abs(first) if first else 0.0
    init = _column(_rows(history, "init"), "from_checkpoint")
    from_checkpoint = init is not None and bool(init.astype(bool).any())
    required = 0.0 if from_checkpoint else cfg.loss_min_relative_drop
    evidence = {"first_window_mean": first, "last_window_mean": last, "relative_drop": drop, "window": window,
                "required_drop": required, "from_checkpoint": from_checkpoint}
    if not drop >= required:
        need = "must not rise from a checkpoint" if from_checkpoint else f"needs {required:.0%}"
        return Verdict("loss_decreases", False,
                       f"training loss fell only {drop:.1%} ({first:.5f} -> {last:.5f}; {need})", evidence)
    return Verdict("loss_decreases", True, f"training loss fell {drop:.1%} ({first:.5f} -> {last:.5f})", evidence)


def finite(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Good: no non-finite loss or gradient norm anywhere in the run."""
    errors = _rows(history, "error")
    if "name" in errors and (errors["name"] == "non_finite").any():
        message = str(errors[errors["name"] == "non_finite"].iloc[0]["message"])
        return Verdict("finite", False, message, {"errors": int(len(errors))})
    steps = _rows(history, "train_step")
    if steps.empty:
        return Verdict("finite", None, "no training steps recorded")
    bad = []
    for name in ("loss", "grad_norm_total"):
        if name in steps:
            values = pd.to_numeric(steps[name], errors="coerce")
            if not values.map(math.isfinite).all():
                bad.append(name)
    if bad:
        return Verdict("finite", False, f"non-finite values in {bad}", {"columns": bad})
    return Verdict("finite", True, f"all {len(steps)} steps finite", {"steps": int(len(steps))})


def clipping_sane(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Good: gradients are clipped on fewer than ``clipping_max_frac`` of the steps."""
    clipped = _column(_rows(history, "train_step"), "grad_clipped")
    if clipped is None:
        return Verdict("clipping_sane", None, "no clipping record")
    frac = float(clipped.astype(bool).mean())
    evidence = {"clipped_frac": frac, "allowed": cfg.clipping_max_frac}
    if frac >= cfg.clipping_max_frac:
        return Verdict("clipping_sane", False,
                       f"gradients clipped on {frac:.0%} of steps: clip norm too tight or learning rate too high", evidence)
    return Verdict("clipping_sane", True, f"gradients clipped on {frac:.0%} of steps", evidence)


def param_head_not_saturated(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Good: the bounded parameters do not sit at their bounds for most of the batch."""
    at_bound = _column(_rows(history, "train_step"), "params_at_bound_frac")
    if at_bound is None:
        return Verdict("param_head_not_saturated", None, "no saturation record (instrumentation off)")
    late = at_bound.iloc[len(at_bound) // 2:]
    frac = float(late.median())
    evidence = {"params_at_bound_frac_median": frac, "allowed": cfg.saturation_max_frac}
    if frac >= cfg.saturation_max_frac:
        return Verdict("param_head_not_saturated", False, f"{frac:.0%} of predicted parameters sit at their bounds",
                       evidence)
    return Verdict("param_head_not_saturated", True, f"{frac:.0%} of parameters at their bounds", evidence)


def param_head_learning(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Good: the parameter head gets a gradient and moves (a detached head gets none)."""
    steps = _rows(history, "train_step")
    grads = _column(steps, "grad_norm_param_head")
    if grads is None:
        return Verdict("param_head_learning", None, "no gradient norms recorded (instrumentation off)")
    zero = float((grads == 0).mean())
    evidence = {"grad_zero_frac": zero, "grad_norm_median": float(grads.median())}
    if zero > 0.5:
        return Verdict("param_head_learning", False,
                       f"parameter head gradient is zero on {zero:.0%} of steps: is it detached from the warp?", evidence)
    return Verdict("param_head_learning", True, "parameter head gets gradients", evidence)


def ranks_in_sync(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad: parameter or probe checksums differ across ranks (ranks diverged)."""
    val = _rows(history, "val_epoch")
    column = _column(val, "rank_param_checksums")
    if column is None:
        return Verdict("ranks_in_sync", None, "single process: nothing to compare")
    diverged = []
    for _, row in val.iterrows():
        for name in ("rank_param_checksums", "rank_probe_checksums"):
            values = row.get(name)
            if isinstance(values, list) and len(set(values)) > 1:
                diverged.append({"epoch": int(row["epoch"]), "field": name, "values": values})
    evidence = {"epochs": int(len(val)), "diverged": diverged[:4]}
    if diverged:
        first = diverged[0]
        return Verdict("ranks_in_sync", False,
                       f"ranks diverged at epoch {first['epoch']} ({first['field']} differ across ranks)", evidence)
    return Verdict("ranks_in_sync", True, f"parameter and probe checksums agree across ranks in {len(val)} epochs",
                   evidence)


SIGNALS: dict[str, Callable[[pd.DataFrame, JudgeConfig], Verdict]] = {
    "scores_move": scores_move,
    "probe_checksums_change": probe_checksums_change,
    "probe_tracks_updates": probe_tracks_updates,
    "residual_contributes": residual_contributes,
    "residual_head_learning": residual_head_learning,
    "residual_not_inactive": residual_not_inactive,
    "beats_identity": beats_identity,
    "beats_constant_lens": beats_constant_lens,
    "not_data_bound": not_data_bound,
    "init_is_identity": init_is_identity,
    "loss_decreases": loss_decreases,
    "finite": finite,
    "clipping_sane": clipping_sane,
    "param_head_not_saturated": param_head_not_saturated,
    "param_head_learning": param_head_learning,
    "ranks_in_sync": ranks_in_sync,
}


def judge(history: pd.DataFrame | str, cfg: JudgeConfig | None = None) -> list[Verdict]:
    """Every signal's verdict for a run (a DataFrame, a ``metrics.jsonl`` path or a run folder)."""
    if not isinstance(history, pd.DataFrame):
        history = read_metrics(history)
    cfg = cfg or JudgeConfig()
    return [fn(history, cfg) for fn in SIGNALS.values()]


def all_good(verdicts: list[Verdict]) -> bool:
    """True when no applicable signal is bad."""
    return not any(v.ok is False for v in verdicts)


def format_table(verdicts: list[Verdict]) -> str:
    """A fixed-width verdict table for the terminal."""
    mark = {True: "GOOD", False: "BAD", None: "n/a"}
    width = max(len(v.signal) for v in verdicts)
    lines = [f"{'signal'.ljust(width)}  verdict  detail", f"{'-' * width}  -------  ------"]
    lines += [f"{v.signal.ljust(width)}  {mark[v.ok]:<7}  {v.detail}" for v in verdicts]
    return "\n".join(lines)
