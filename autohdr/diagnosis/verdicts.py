"""Verdicts: the runbook's good and bad signals judged from a run's metric history.

Each signal is a pure function ``(history, JudgeConfig) -> Verdict`` of the records in
``metrics.jsonl`` (a DataFrame with a ``kind`` column), so a finished run can be judged again
(``autohdr judge RUN_DIR``) and every signal can be tested on hand-made histories.

``Verdict.ok`` is ``True`` (good), ``False`` (bad) or ``None`` (does not apply, e.g. residual
signals in stage 1, or the data to judge is missing).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from autohdr.diagnosis.metrics_log import LEGACY_NON_FINITE, read_metrics, restore_non_finite


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
    group_zero_grad_max_frac: float = 0.5   # a group with zero gradient on more steps than this is not learning
    residual_min_ratio: float = 0.003       # residual / parametric displacement floor (late median): healthy
                                            # probes 1.05-1.15 %, a residual x 0.01 0.08 % (border-padded loss)
    # val proxy may drop by at most this when the residual is switched on. Healthy 16-step probes measured
    # -0.0030 to +0.0012 (44 runs: fixtures and photos, seeds 0-2; the photos' lenses have no residual
    # part to learn, so their residual is noise); the harmful-residual fault -0.149: 0.01 sits 3x beyond
    # the worst healthy run and 15x inside the fault (0.002 made a healthy photo probe BAD at -0.0030)
    residual_hurts_max: float = 0.01
    eval_repeat_atol: float = 1e-5          # the same probe evaluated twice may differ by at most this
    eval_residual_max_factor: float = 10.0  # eval vs training residual contribution: within this factor
    batch_repeat_max_frac: float = 0.5      # steps whose batch equals the previous step's batch
    init_ulps: float = 4.0                  # init prediction and loss may differ from identity's by this many
                                            # float32 steps of the grid (see float32_warp_tolerance)
    init_proxy_atol: float = 1e-3           # init proxy total may differ from identity's by this much
    baseline_min_steps: int = 8             # beating identity / the constant lens / the residual-zeroed model
                                            # needs this many steps: healthy 1-4-step overfit runs lose to
                                            # identity (-31 % of the gap at 4), 8 steps beat both
    # An overfit needs passes over its subset, not steps: below this many training epochs beats_identity,
    # beats_constant_lens and params_track_ground_truth say n/a where they are required. Healthy overfit runs
    # (seeds 0-2) lose to identity up to 4 epochs (16 pairs: -0.029; 32 pairs at 2: -0.05), to their own mean
    # lens up to 8 (8 pairs: +0.006 < 0.01) and have k1 uncorrelated up to 10 (16 pairs); at 12 epochs every
    # one passes all three. 0 (the default for hand-made histories): no guard; the overfit preset and an
    # attached run of overfit intent use OVERFIT_MIN_EPOCHS.
    overfit_min_epochs: int = 0
    timing_min_steps: int = 8               # data-time medians over fewer steps are mostly warm-up
    clipping_min_steps: int = 8             # a clipped share over fewer steps is one or two steps: healthy runs
                                            # clip up to 28 % of steps (stage 3 on photos, 16-32 steps), most at the
                                            # first step at peak lr after warm-up; a healthy 4-step run clipped 2 of 4
    group_min_steps: int = 2                # zero-initialized heads pass no gradient back (and the residual
                                            # contributes exactly 0) on step 1 of a healthy run
    group_move_min_steps: int = 4           # a group "moving without gradient" needs this many steps to judge
    norm_agree_rtol: float = 0.01           # grad_norm_total may fall below a group's norm by this fraction
    loss_init_max_factor: float = 10.0      # first training loss vs identity's loss at init: within this factor
    train_val_min_ratio: float = 0.75       # val / training loss on the same samples (healthy 0.91-0.98)
    train_val_max_ratio: float = 1.3
    train_val_min_validations: int = 3      # the first epochs change the model too fast to compare
    gt_corr_floor: float = 0.0              # k1 / s prediction-truth correlation floor (healthy >= +0.47)
    gt_corr_min_steps: int = 8              # fewer steps: the correlation is noise
    eval_flow_min_cosine: float = 0.5       # train vs eval residual flow cosine (healthy 1.0)
    lr_zero_rel: float = 1e-3               # lr at or below this fraction of the peak counts as zero
    lr_zero_max_frac: float = 0.25          # share of steps allowed at (near) zero lr
    group_lr_min_ratio: float = 0.01        # a param group's lr / the median of the other groups' lrs below this
                                            # counts as negligible (healthy per-head lrs differ by up to 3x)
    group_lr_low_max_frac: float = 0.5      # share of steps a group's lr may be negligible
    regularizer_max_share: float = 0.05     # median share of the total loss the regularizer parts may take
                                            # (healthy medians 0.03-0.46 %; weights x1000 19 % and 55 %)
    weights_jump_max: float = 0.0           # change of the weights between epochs (no step): healthy exactly 0


#: Start of the detail of a signal that raised on its history (judged ``n/a``, see :func:`judge`).
NOT_JUDGED_ERROR = "not judged: this history breaks the signal"


#: While :func:`judge` runs: (the history it judges, kind -> that history's rows of the kind). Every
#: signal selects its rows by kind, 51 times per judgement; selecting each kind once made a whole
#: judgement ~40 % cheaper. Keyed by the frame's identity, so a frame a signal derives is never served
#: another frame's rows; the signals only read the rows they are given.
_ROWS_OF_JUDGED: contextvars.ContextVar[tuple[pd.DataFrame, dict[str, pd.DataFrame]] | None] = \
    contextvars.ContextVar("autohdr_rows_of_judged", default=None)


@contextlib.contextmanager
def _rows_selected_once(history: pd.DataFrame):
    token = _ROWS_OF_JUDGED.set((history, {}))
    try:
        yield
    finally:
        _ROWS_OF_JUDGED.reset(token)


def _rows(history: pd.DataFrame, kind: str) -> pd.DataFrame:
    if "kind" not in history.columns:
        return history.iloc[0:0]
    judged = _ROWS_OF_JUDGED.get()
    if judged is None or judged[0] is not history:
        return history[history["kind"] == kind]
    by_kind = judged[1]
    if kind not in by_kind:
        by_kind[kind] = history[history["kind"] == kind]
    return by_kind[kind]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_series(values: pd.Series) -> pd.Series:
    """``values`` as floats when it is a column of numbers (some of them written as the strings
    ``"nan"`` / ``"inf"`` / ``"-inf"`` by an older autohdr, or as other junk text); a column of
    text (checksums, names), flags or tables is returned unchanged.

    Central coercion for every signal: a diverged run's non-finite values and a hand-made history's
    ``None`` reach the signals as float nan / inf, never as strings.
    """
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return values
    # One pass over the Python values, stopping at the first that is neither missing, a number nor
    # text (a dict, a list, a flag): the same decision as mapping the whole column three times
    # (dropna, restore_non_finite, a type test), at a 20th of the cost on a run's 33 object columns.
    has_number = False
    for value in values.tolist():
        if isinstance(value, str):
            value = LEGACY_NON_FINITE.get(value, value)
            if isinstance(value, str):
                continue  # text is allowed beside numbers (it becomes NaN)
        elif _is_missing(value):
            continue
        if not _is_number(value):
            return values
        has_number = True
    if not has_number:
        return values
    return pd.to_numeric(values.map(restore_non_finite), errors="coerce").astype(float)


def _is_missing(value: Any) -> bool:
    """What ``Series.dropna`` drops: ``None``, NaN, ``pd.NA``, ``NaT`` (never a container)."""
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def numeric_history(history: pd.DataFrame) -> pd.DataFrame:
    """``history`` with every column of numbers coerced by :func:`numeric_series` (see there)."""
    changed = {}
    for name, dtype in history.dtypes.items():  # the dtypes at once: most columns are numbers already
        if not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)):
            column = history[name]
            coerced = numeric_series(column)
            if coerced is not column:
                changed[name] = coerced
    if not changed:
        return history
    out = history.copy()
    for name, column in changed.items():
        out[name] = column
    return out


def _column(frame: pd.DataFrame, name: str) -> pd.Series | None:
    """The present values of ``frame[name]`` (numbers coerced, see :func:`numeric_series`), ``None``
    when there are none."""
    if name not in frame.columns:
        return None
    values = numeric_series(frame[name]).dropna()
    return values if len(values) else None


def _stage_info(history: pd.DataFrame) -> dict[str, Any]:
    start = _rows(history, "run_start")
    if start.empty:
        return {"stage": None, "residual_active": None, "world_size": 1}
    row = start.iloc[-1]
    return {"stage": row.get("stage"), "residual_active": _flag(row.get("residual_branch_active")),
            "world_size": _as_int(row.get("world_size"), 1) or 1}


def _residual_off(history: pd.DataFrame, signal: str) -> Verdict | None:
    info = _stage_info(history)
    if info["residual_active"] is False:
        return Verdict(signal, None, f"residual branch is off in {info['stage']}: not judged")
    if model_has_no_residual(history):
        return Verdict(signal, None, "the model returns no residual flow ('residual_flow_lowres'): residual "
                                     "signals not judged")
    return None


def model_has_no_residual(history: pd.DataFrame) -> bool:
    """True when the residual was measured on training steps (``residual_contrib_px_mean``) but the
    model never returned a flow to measure (no ``residual_flow_abs_mean_px`` on any step): a custom
    model with only ``params``. A residual head without parameters still returns a flow: judged."""
    steps = _rows(history, "train_step")
    if _column(steps, "residual_contrib_px_mean") is None:
        return False
    return _column(steps, "residual_flow_abs_mean_px") is None


def _missing_group(history: pd.DataFrame, group: str, signal: str) -> Verdict | None:
    """``n/a`` naming what to pass when the run recorded no parameters in ``group``."""
    start = _rows(history, "run_start")
    if start.empty or "parameter_groups" not in start.columns:
        return None
    summary = start.iloc[-1]["parameter_groups"]
    if (not isinstance(summary, dict) or group not in summary or summary[group].get("values", 0) > 0
            or summary[group].get("measured", False)):
        return None
    return Verdict(signal, None, f"no parameters in group {group!r}: not judged; name its modules with "
                                 f"--groups {group}=MODULE.PATH or a parameter_groups() method on the model")


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _as_int(value: Any, default: Any) -> Any:
    """``value`` as an int; ``default`` when it is missing, non-finite or not a number."""
    number = _as_float(value)
    return int(number) if math.isfinite(number) else default


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
    """Good (stages 2 and 3): the residual's contribution in pixels is non-zero and at least
    ``residual_min_ratio`` of the parametric displacement (late medians): a residual in the wrong
    units moves, but by a negligible fraction of the warp."""
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
    ratio = _column(steps, "residual_to_param_disp_ratio_mean")
    if ratio is not None:
        late_ratio = float(ratio.iloc[len(ratio) // 2:].median())
        evidence.update({"late_ratio_to_param": late_ratio, "min_ratio": cfg.residual_min_ratio})
        if late_ratio < cfg.residual_min_ratio:
            return Verdict("residual_contributes", False,
                           f"residual contributes {late.median():.3g} px, only {late_ratio:.1%} of the parametric "
                           f"displacement (floor {cfg.residual_min_ratio:.1%}): wrong units or scale?", evidence)
    return Verdict("residual_contributes", True, f"residual contributes {late.median():.4f} px (median, 2nd half)",
                   evidence)


def residual_head_learning(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Good (stages 2 and 3): residual head gradient norm and parameter delta are non-zero."""
    off = _residual_off(history, "residual_head_learning") or _missing_group(history, "residual_head",
                                                                             "residual_head_learning")
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
    if zero_grad > cfg.group_zero_grad_max_frac or zero_delta > cfg.group_zero_grad_max_frac:
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
                "sample_count": _as_int(last.get("val_sample_count"), 0)}
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
                       "no constant-lens score recorded (it is scored at the last validation epoch with "
                       "instrumentation on; a hand-written loop passes on_validation(..., final=True))")
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

#: float32 machine epsilon (2**-23): the spacing of float32 numbers in [1, 2), twice that in [0.5, 1).
FLOAT32_EPS = 2.0 ** -23


def float32_warp_tolerance(height: int, width: int, ulps: float) -> float:
    """Largest change of a ``(B, 3, height, width)`` prediction in ``[0, 1]`` that ``ulps`` float32
    steps of its warp's normalized grid coordinates can cause: ``ulps * FLOAT32_EPS * ((height - 1)
    + (width - 1)) / 2``.

    Derivation (the unit, ``ulps = 1``):

    * The grid is normalized with ``align_corners=True``: ``x`` in ``[-1, 1]`` samples pixel
      ``u = (x + 1) (width - 1) / 2``, so ``du = dx (width - 1) / 2`` (and ``(height - 1) / 2`` for ``y``).
    * Near the identity ``|x| <= 1``, where float32 numbers are at most ``FLOAT32_EPS`` apart: one
      float32 step of a coordinate moves its sample by at most ``FLOAT32_EPS (width - 1) / 2`` pixels.
    * Bilinear sampling of values in ``[0, 1]`` changes by at most 1 per pixel of movement along
      each axis (two neighbours differ by at most 1); the two axes add.

    How many units make "identity to float32 precision" (``JudgeConfig.init_ulps``, default 4): a
    parameter one float32 step from its identity value (a head that sets its bias with ``atanh``
    gets the scale ``1 - 2**-24``, the float32 just below 1) moves the grid by one step, 1 unit.
    The sampler then computes ``u`` in float32, where numbers up to ``width - 1`` are up to
    ``FLOAT32_EPS (width - 1)`` apart, so each of the two predictions compared (the model's and the
    identity's) is rounded by up to 1 more unit: at most 3 units in all (measured: at most 2.06 on a
    one-pixel checkerboard, the steepest image, at 32 to 768 pixels; 0.8 to 1.5 on photographs).
    The fourth unit covers the handful of float32 operations of the lens formula. A genuinely
    non-identity warp moves samples by a visible fraction of a pixel: hundreds of units.
    """
    return ulps * FLOAT32_EPS * ((height - 1) + (width - 1)) / 2


def init_is_identity(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Good: before any step the model's prediction, loss and proxy equal the identity warp's.

    "Equal" means to float32 precision, not bit for bit: the prediction and the loss may differ by
    :func:`float32_warp_tolerance` of the probe's size with ``cfg.init_ulps`` steps. The loss is a
    mean over pixels of terms that change about as much as the prediction does or less (measured:
    a one-step warp moves it by 2-4 % of its prediction change), so the same bound serves; a loss
    off by more, with the prediction within it, sees something the prediction does not. The proxy
    is thresholded (Canny hysteresis, hard-fail limits), so float-level changes of the prediction
    can flip single edge pixels and move it by ~1e-4 (measured 4e-5 to 7e-5 for a one-step warp at
    64 to 768 pixels); it may differ by ``cfg.init_proxy_atol`` (1e-3, half the default
    ``beats_identity_margin``: a difference no verdict acts on).
    """
    init = _rows(history, "init")
    if init.empty:
        return Verdict("init_is_identity", None, "no init check recorded (resumed run)")
    row = init.iloc[-1]
    if _flag(row.get("from_checkpoint")):
        return Verdict("init_is_identity", None, "model initialized from a checkpoint: not expected to be identity")
    height, width = _as_float(row.get("init_image_height")), _as_float(row.get("init_image_width"))
    if not (math.isfinite(height) and math.isfinite(width)):
        return Verdict("init_is_identity", None,
                       "the init record has no image size (written by an older autohdr): train again to judge it")
    evidence = {k: float(row[k]) for k in ("init_pred_max_abs_diff", "init_proxy_total", "identity_proxy_total",
                                           "init_loss", "identity_loss")}
    if "init_params_max_abs_dev" in row and pd.notna(row["init_params_max_abs_dev"]):
        evidence["init_params_max_abs_dev"] = float(row["init_params_max_abs_dev"])
    tol = float32_warp_tolerance(int(height), int(width), cfg.init_ulps)
    evidence.update({"image_hw": [int(height), int(width)], "float32_tolerance": tol,
                     "proxy_tolerance": cfg.init_proxy_atol})
    checks = {"prediction": (evidence["init_pred_max_abs_diff"], tol),
              "loss": (abs(evidence["init_loss"] - evidence["identity_loss"]), tol),
              "proxy": (abs(evidence["init_proxy_total"] - evidence["identity_proxy_total"]), cfg.init_proxy_atol)}
    off = [f"{k} differs by {v:.2e} (> {limit:.1e})" for k, (v, limit) in checks.items() if not v <= limit]
    if off:
        params = evidence.get("init_params_max_abs_dev")
        hint = f"; parameters off identity by up to {params:.2e}" if params is not None else ""
        return Verdict("init_is_identity", False,
                       "untrained model is not the identity warp: " + "; ".join(off) + hint, evidence)
    return Verdict("init_is_identity", True,
                   f"prediction, loss and proxy equal the identity warp's at init (to float32 precision: "
                   f"prediction off by {evidence['init_pred_max_abs_diff']:.1e} <= {tol:.1e})", evidence)


def loss_windows(steps: pd.DataFrame) -> dict[str, Any] | None:
    """The first and last windows of the training loss that :func:`loss_decreases` compares.

    With at least two complete epochs (as many steps as the longest epoch), the windows are the
    first and the last complete epoch: without augmentation both see exactly the same samples, so
    the batch-to-batch spread of the loss cancels and a model that does not learn shows a drop of
    exactly 0 (a handful of steps of batch 4 otherwise differs by +-10 % from sampling alone).
    Without epochs (a loop that records none), the first and last ``max(3, n // 5)`` steps, from
    6 steps on. ``None`` when neither applies.

    ``steps`` are ``train_step`` records (``loss``, optionally ``epoch``). Returns ``first`` and
    ``last`` (window means), ``relative_drop`` (``(first - last) / |first|``), ``basis``
    (``"epochs"`` or ``"steps"``) and ``window`` (the epochs compared, or the steps per window).
    """
    if "loss" not in steps.columns:
        return None
    frame = pd.DataFrame({"loss": pd.to_numeric(steps["loss"], errors="coerce"),
                          "epoch": pd.to_numeric(steps["epoch"], errors="coerce") if "epoch" in steps.columns
                          else math.nan}).dropna(subset=["loss"])
    complete = _complete_epochs(frame["epoch"])
    if len(complete) >= 2:
        first_e, last_e = complete[0], complete[-1]
        first = float(frame.loc[frame["epoch"] == first_e, "loss"].mean())
        last = float(frame.loc[frame["epoch"] == last_e, "loss"].mean())
        basis, window = "epochs", [int(first_e), int(last_e)]
    elif len(frame) >= 6:
        window = max(3, len(frame) // 5)
        first, last = float(frame["loss"].iloc[:window].mean()), float(frame["loss"].iloc[-window:].mean())
        basis = "steps"
    else:
        return None
    drop = (first - last) / abs(first) if first else 0.0
    return {"first": first, "last": last, "relative_drop": drop, "basis": basis, "window": window,
            "complete_epochs": len(complete)}


def _complete_epochs(epochs: pd.Series) -> list[float]:
    """The finite epoch ids that hold as many steps as the longest epoch (``epochs``: one id per step)."""
    finite = epochs[np.isfinite(epochs)]
    sizes = finite.value_counts()
    return sorted(sizes[sizes == sizes.max()].index) if len(sizes) else []


#: Complete epochs loss_decreases compares over at least (measured: see the verdict).
LOSS_MIN_EPOCHS = 3


def loss_decreases(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Good: the training loss goes down between the first and the last complete epoch
    (:func:`loss_windows`; without epochs, the first and last 20 % of the steps).

    From scratch it must fall by ``loss_min_relative_drop`` (per mode, measured on healthy runs);
    a run started from a trained checkpoint (``--init-from``) has less left to gain and must only
    not rise.
    """
    windows = loss_windows(_rows(history, "train_step"))
    if windows is None:
        return Verdict("loss_decreases", None, "needs >= 6 training steps or 2 complete epochs")
    complete = windows["complete_epochs"]
    if windows["basis"] == "epochs" and complete < LOSS_MIN_EPOCHS:
        # two epochs of a few steps: the first is mostly warm-up, the second the first at peak lr (a healthy
        # 16-pair overfit run, 2 x 4 steps, seed 1: the loss rose); from 3 epochs every healthy run fell
        return Verdict("loss_decreases", None, f"needs >= {LOSS_MIN_EPOCHS} complete epochs to mean anything, got "
                                               f"{complete}", {"min_epochs": LOSS_MIN_EPOCHS, "epochs": complete})
    first, last, drop = windows["first"], windows["last"], windows["relative_drop"]
    init = _column(_rows(history, "init"), "from_checkpoint")
    from_checkpoint = init is not None and bool(init.astype(bool).any())
    required = 0.0 if from_checkpoint else cfg.loss_min_relative_drop
    evidence = {"first_window_mean": first, "last_window_mean": last, "relative_drop": drop,
                "basis": windows["basis"], "window": windows["window"], "required_drop": required,
                "from_checkpoint": from_checkpoint}
    where = (f"epoch {windows['window'][0] + 1} -> {windows['window'][1] + 1} mean" if windows["basis"] == "epochs"
             else f"first -> last {windows['window']} steps")
    change = f"rose by {-drop:.1%}" if drop < 0 else f"fell {'only ' if drop < required else ''}{drop:.1%}"
    if not drop >= required:
        need = "must not rise from a checkpoint" if from_checkpoint else f"needs {required * 100:g}%"
        return Verdict("loss_decreases", False, f"training loss {change} ({where} {first:.5f} -> {last:.5f}; {need})",
                       evidence)
    return Verdict("loss_decreases", True, f"training loss {change} ({where} {first:.5f} -> {last:.5f})", evidence)


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
    missing = _missing_group(history, "param_head", "param_head_learning")
    if missing:
        return missing
    steps = _rows(history, "train_step")
    grads = _column(steps, "grad_norm_param_head")
    if grads is None:
        return Verdict("param_head_learning", None, "no gradient norms recorded (instrumentation off)")
    zero = float((grads == 0).mean())
    evidence = {"grad_zero_frac": zero, "grad_norm_median": float(grads.median())}
    if zero > cfg.group_zero_grad_max_frac:
        return Verdict("param_head_learning", False,
                       f"parameter head gradient is zero on {zero:.0%} of steps: is it detached from the warp?", evidence)
    return Verdict("param_head_learning", True, "parameter head gets gradients", evidence)


def backbone_learning(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Good: the backbone gets a gradient on most steps (a head fed detached features starves it)."""
    missing = _missing_group(history, "backbone", "backbone_learning")
    if missing:
        return missing
    grads = _column(_rows(history, "train_step"), "grad_norm_backbone")
    if grads is None:
        return Verdict("backbone_learning", None, "no gradient norms recorded (instrumentation off)")
    zero = float((grads == 0).mean())
    evidence = {"grad_zero_frac": zero, "grad_norm_median": float(grads.median()),
                "allowed_zero_frac": cfg.group_zero_grad_max_frac}
    if zero > cfg.group_zero_grad_max_frac:
        return Verdict("backbone_learning", False,
                       f"backbone gradient is zero on {zero:.0%} of steps: are the heads fed detached "
                       f"features, or is the backbone frozen?", evidence)
    return Verdict("backbone_learning", True, f"backbone gets gradients ({1 - zero:.0%} of steps)", evidence)


def optimizer_covers_params(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad: parameters with gradients that the optimizer does not update, or optimized parameters
    that never got a gradient (``run_end.optimizer_coverage``)."""
    end = _rows(history, "run_end")
    coverage = end.iloc[-1].get("optimizer_coverage") if not end.empty and "optimizer_coverage" in end else None
    if not isinstance(coverage, dict):
        return Verdict("optimizer_covers_params", None, "no optimizer coverage recorded (instrumentation off, "
                                                        "or the hooks were given no optimizer)")
    outside, idle = coverage.get("grad_not_optimized", []), coverage.get("optimized_never_grad", [])
    evidence = dict(coverage)
    problems = []
    if outside:
        problems.append(f"{len(outside)} parameter(s) get gradients but are not in the optimizer "
                        f"(created after it?): {_names(outside)}")
    if idle:
        problems.append(f"{len(idle)} optimized parameter(s) never got a gradient: {_names(idle)}")
    if problems:
        return Verdict("optimizer_covers_params", False, "; ".join(problems), evidence)
    return Verdict("optimizer_covers_params", True,
                   f"the optimizer updates exactly the {coverage.get('optimized_tensors')} tensors that get gradients",
                   evidence)


def _names(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def eval_deterministic(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad: the same probe evaluated twice gives different predictions (dropout or noise at eval)."""
    diffs = _column(_rows(history, "val_epoch"), "probe_repeat_max_abs_diff")
    if diffs is None:
        return Verdict("eval_deterministic", None, "no repeated probe recorded (instrumentation off)")
    worst = float(diffs.max())
    evidence = {"probe_repeat_max_abs_diff": worst, "allowed": cfg.eval_repeat_atol}
    if not worst <= cfg.eval_repeat_atol:
        return Verdict("eval_deterministic", False,
                       f"the same probe evaluated twice differs by {worst:.3g}: is dropout or noise active in "
                       f"eval mode?", evidence)
    return Verdict("eval_deterministic", True, f"the probe repeats to {worst:.1e}", evidence)


def eval_residual_matches_train(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad (stages 2/3): the residual's contribution at evaluation is not of the order seen in training
    (a residual branch on in training but off at eval, or the reverse)."""
    off = _residual_off(history, "eval_residual_matches_train")
    if off:
        return off
    val = _rows(history, "val_epoch")
    steps = _rows(history, "train_step")
    at_eval = _column(val, "probe_residual_contrib_px_mean")
    in_train = _column(steps, "residual_contrib_px_mean")
    if at_eval is None or in_train is None:
        return Verdict("eval_residual_matches_train", None, "no residual metrics recorded (instrumentation off)")
    last_epoch = steps[steps["epoch"] == steps["epoch"].max()]["residual_contrib_px_mean"].dropna()
    train_px = float(last_epoch.median()) if len(last_epoch) else float(in_train.iloc[-1])
    eval_px = float(at_eval.iloc[-1])
    evidence = {"train_residual_px": train_px, "eval_residual_px": eval_px, "max_factor": cfg.eval_residual_max_factor}
    if max(train_px, eval_px) <= cfg.residual_min_px:
        return Verdict("eval_residual_matches_train", None,
                       "the residual is below its floor in training and at eval: nothing to compare", evidence)
    factor = max(train_px, eval_px) / max(min(train_px, eval_px), 1e-12)
    evidence["factor"] = factor
    if factor > cfg.eval_residual_max_factor:
        return Verdict("eval_residual_matches_train", False,
                       f"residual contributes {train_px:.3g} px in training but {eval_px:.3g} px at evaluation: "
                       f"is the residual branch switched differently in eval mode?", evidence)
    return Verdict("eval_residual_matches_train", True,
                   f"residual {eval_px:.3g} px at eval vs {train_px:.3g} px in training", evidence)


def residual_helps(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad (stages 2/3): the validation score with the residual is worse than the same model's with
    the residual zeroed (the parametric warp alone)."""
    off = _residual_off(history, "residual_helps")
    if off:
        return off
    val = _rows(history, "val_epoch")
    without = _column(val, "val_proxy_no_residual_total")
    if without is None:
        return Verdict("residual_helps", None, "no residual-zeroed validation recorded (instrumentation off)")
    last = val.iloc[-1]
    with_residual, alone = float(last["val_proxy_total"]), float(last["val_proxy_no_residual_total"])
    gain = with_residual - alone
    evidence = {"val_proxy_total": with_residual, "val_proxy_no_residual_total": alone, "gain": gain,
                "allowed_loss": cfg.residual_hurts_max}
    if gain < -cfg.residual_hurts_max:
        return Verdict("residual_helps", False,
                       f"the residual makes the score worse: {with_residual:.4f} with it vs {alone:.4f} with it "
                       f"zeroed ({gain:+.4f})", evidence)
    return Verdict("residual_helps", True, f"with the residual {with_residual:.4f} vs {alone:.4f} without "
                                           f"({gain:+.4f})", evidence)


def batches_in_range(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad: a training batch holds values outside [0, 1] or non-finite values (named by step and sample)."""
    steps = history[history["kind"].isin(["train_step", "error"])] if "kind" in history else history.iloc[0:0]
    low, high = _column(steps, "batch_min"), _column(steps, "batch_max")
    if low is None or high is None:
        return Verdict("batches_in_range", None, "no batch ranges recorded (instrumentation off)")
    steps = steps[steps["batch_min"].notna()]
    nonfinite = steps["batch_nonfinite"].fillna(0) if "batch_nonfinite" in steps else pd.Series(0, index=steps.index)
    tol = 1e-3
    bad = steps[(steps["batch_min"] < -tol) | (steps["batch_max"] > 1 + tol) | (nonfinite > 0)]
    evidence = {"batch_min": float(low.min()), "batch_max": float(high.max()),
                "nonfinite_values": float(nonfinite.sum()), "bad_steps": int(len(bad))}
    if bad.empty:
        return Verdict("batches_in_range", True, f"every batch in [{low.min():.3g}, {high.max():.3g}]", evidence)
    first = bad.iloc[0]
    sample = first.get("batch_bad_sample") if "batch_bad_sample" in bad else None
    where = f"step {_as_int(first.get('step'), '?')}"
    if isinstance(sample, dict):
        where += f", sample {sample.get('image_id') or '#' + str(sample.get('index'))}"
        evidence["first_bad_sample"] = sample
    if float(nonfinite.loc[first.name]) > 0:
        what = f"{_as_int(nonfinite.loc[first.name], 'some')} non-finite value(s)"
    else:
        what = f"values in [{first['batch_min']:.4g}, {first['batch_max']:.4g}], expected [0, 1]"
    return Verdict("batches_in_range", False, f"{len(bad)} training batch(es) out of range; first at {where}: {what}",
                   evidence)


def batches_vary(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad: the loader repeats the same batch (same samples in the same order) step after step."""
    prints = _column(_rows(history, "train_step"), "batch_fingerprint")
    if prints is None or len(prints) < 3:
        return Verdict("batches_vary", None, "needs >= 3 fingerprinted training batches (instrumentation off?)")
    repeats = float((prints.iloc[1:].to_numpy() == prints.iloc[:-1].to_numpy()).mean())
    evidence = {"repeat_frac": repeats, "distinct_batches": int(prints.nunique()), "steps": int(len(prints)),
                "allowed_repeat_frac": cfg.batch_repeat_max_frac}
    if repeats > cfg.batch_repeat_max_frac:
        return Verdict("batches_vary", False, f"the same batch as the step before on {repeats:.0%} of steps "
                                              f"({prints.nunique()} distinct in {len(prints)}): is the loader "
                                              f"returning one cached batch?", evidence)
    return Verdict("batches_vary", True, f"{prints.nunique()} distinct batches in {len(prints)} steps", evidence)


def pairs_match_ground_truth(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad (with ground truth): the recorded ground-truth warp does not beat identity on its own pairs,
    so inputs and targets are mispaired, swapped, or the ground truth belongs to other images."""
    val = _rows(history, "val_epoch")
    gt, ident = _column(val, "gt_proxy_total"), _column(val, "identity_proxy_total")
    if gt is None or ident is None:
        return Verdict("pairs_match_ground_truth", None, "no ground truth for these pairs: not judged")
    margin = float(gt.iloc[-1]) - float(ident.iloc[-1])
    evidence = {"gt_proxy_total": float(gt.iloc[-1]), "identity_proxy_total": float(ident.iloc[-1]), "margin": margin}
    if margin <= 0:
        return Verdict("pairs_match_ground_truth", False,
                       f"the ground-truth warp scores {gt.iloc[-1]:.4f}, below identity's {ident.iloc[-1]:.4f}, on its "
                       f"own pairs: are inputs and targets mispaired or swapped?", evidence)
    return Verdict("pairs_match_ground_truth", True, f"ground truth beats identity by {margin:.4f}", evidence)


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


# ---------------------------------------------------------------------------- invariants any healthy run keeps

def _lr_per_step(steps: pd.DataFrame) -> pd.Series | None:
    """The highest learning rate of any param group at each step (``lr_groups``; else ``lr``)."""
    if "lr_groups" in steps.columns:
        values = steps["lr_groups"].map(lambda v: max((_as_float(x) for x in v), default=math.nan)
                                        if isinstance(v, (list, tuple)) else _as_float(v))
        values = values.dropna()
        if len(values):
            return values.astype(float)
    return _column(steps, "lr")


def groups_move_with_gradients(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad: a group that gets a gradient does not move (a param group at lr 0, gradients cleared
    between backward and step), or a group moves that never had a gradient (something other than
    the optimizer writes its weights).

    Per group with both ``grad_norm_<group>`` and ``param_delta_<group>``: the share of steps with a
    non-zero gradient and a zero update, and the share of steps with an update while the group never
    had a gradient so far (Adam's momentum keeps moving a group whose gradient stops, so steps after
    its first gradient do not count). Healthy runs: 0 % of both at 1 to 352 steps (weight decay alone
    moves a group without gradient on the very first step, hence ``group_move_min_steps``).
    """
    steps = _rows(history, "train_step")
    groups = sorted(c[len("grad_norm_"):] for c in steps.columns
                    if c.startswith("grad_norm_") and c != "grad_norm_total" and f"param_delta_{c[len('grad_norm_'):]}"
                    in steps.columns)
    if not groups:
        return Verdict("groups_move_with_gradients", None, "no gradient norms and parameter deltas per group recorded")
    evidence: dict[str, Any] = {"allowed_frac": cfg.group_zero_grad_max_frac}
    still, ghost = [], []
    for group in groups:
        pair = pd.DataFrame({"grad": numeric_series(steps[f"grad_norm_{group}"]),
                             "delta": numeric_series(steps[f"param_delta_{group}"])}).dropna()
        if pair.empty:
            continue
        with_grad = pair["grad"] > 0
        frac_still = float((with_grad & (pair["delta"] == 0)).sum() / max(1, with_grad.sum())) if with_grad.any() else 0.0
        never_yet = ~with_grad.cummax()
        frac_ghost = float((never_yet & (pair["delta"] > 0)).mean())
        evidence[group] = {"steps_with_grad": int(with_grad.sum()), "still_with_grad_frac": frac_still,
                           "moved_without_grad_frac": frac_ghost}
        if with_grad.sum() and frac_still > cfg.group_zero_grad_max_frac:
            still.append(group)
        if len(pair) >= cfg.group_move_min_steps and frac_ghost > cfg.group_zero_grad_max_frac:
            ghost.append(group)
    evidence["still_groups"], evidence["ghost_groups"] = still, ghost
    problems = [f"{g} gets a gradient but does not move on {evidence[g]['still_with_grad_frac']:.0%} of those steps"
                for g in still]
    problems += [f"{g} moves without ever getting a gradient on {evidence[g]['moved_without_grad_frac']:.0%} of steps"
                 for g in ghost]
    if problems:
        return Verdict("groups_move_with_gradients", False, "; ".join(problems), evidence)
    return Verdict("groups_move_with_gradients", True, f"every group with a gradient moves ({', '.join(groups)})",
                   evidence)


def logged_quantities_agree(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad: logged figures contradict each other.

    * ``grad_norm_total`` is at least the groups' combined norm ``sqrt(sum grad_norm_<group>^2)`` (the
      groups are disjoint parts of the total) on every step: healthy runs equal it to float
      rounding (tolerance ``norm_agree_rtol``, 1 %).
    * The first reported training loss is of the order of the loss the hooks' own loss function
      gives the identity warp at init (``init.identity_loss``): healthy 0.90x on the fixtures
      (different samples, so not equal); allowed within ``loss_init_max_factor`` (10x) either way.
    * The probe changes between two validations only if some parameter moved between them.
    """
    steps = _rows(history, "train_step")
    evidence: dict[str, Any] = {}
    problems = []
    total = _column(steps, "grad_norm_total")
    group_cols = [c for c in steps.columns if c.startswith("grad_norm_") and c != "grad_norm_total"]
    if total is not None and group_cols:
        groups = steps.loc[total.index, group_cols].apply(numeric_series).fillna(0.0)
        combined = groups.pow(2).sum(axis=1).pow(0.5)  # the groups are disjoint parts of the total
        short = total < combined * (1 - cfg.norm_agree_rtol) - 1e-8
        evidence.update({"total_below_groups_steps": int(short.sum()), "steps_compared": int(len(total))})
        if short.any():
            first = short.idxmax()
            problems.append(f"grad_norm_total {total[first]:.4g} is below the groups' combined norm "
                            f"{combined[first]:.4g} on {int(short.sum())} of {len(total)} steps (a total norm taken "
                            "before backward, or over other tensors)")
    init = _rows(history, "init")
    loss = _column(steps, "loss")
    if not init.empty and loss is not None and not _flag(init.iloc[-1].get("from_checkpoint")):
        reference = _as_float(init.iloc[-1].get("identity_loss"))
        if math.isfinite(reference) and reference > 0 and math.isfinite(float(loss.iloc[0])):
            factor = float(loss.iloc[0]) / reference
            evidence.update({"first_loss": float(loss.iloc[0]), "init_identity_loss": reference,
                             "first_loss_factor": factor, "allowed_factor": cfg.loss_init_max_factor})
            if not 1 / cfg.loss_init_max_factor <= factor <= cfg.loss_init_max_factor:
                problems.append(f"the first reported loss {loss.iloc[0]:.4g} is {factor:.3g}x the loss the hooks' "
                                f"loss function gives identity at init ({reference:.4g})")
    val = _rows(history, "val_epoch")
    delta_cols = [c for c in steps.columns if c.startswith("param_delta_")]
    if _column(val, "probe_pred_checksum") is not None and len(val) >= 2 and delta_cols:
        moved = steps[delta_cols].apply(numeric_series).fillna(0).sum(axis=1)
        val = val.sort_values("step")
        ghost = []
        for (_, prev), (_, cur) in zip(val.iloc[:-1].iterrows(), val.iloc[1:].iterrows()):
            between = moved[(steps["step"] > prev["step"]) & (steps["step"] <= cur["step"])]
            if len(between) and between.sum() == 0 and prev["probe_pred_checksum"] != cur["probe_pred_checksum"]:
                ghost.append(_as_int(cur.get("epoch"), None))
        evidence["probe_changed_without_update_epochs"] = ghost
        if ghost:
            problems.append(f"the probe changed at epochs {ghost} although no parameter moved before them")
    if not evidence:
        return Verdict("logged_quantities_agree", None, "nothing to cross-check (no gradient norms, init or probe)")
    if problems:
        return Verdict("logged_quantities_agree", False, "; ".join(problems), evidence)
    return Verdict("logged_quantities_agree", True, "gradient norms, losses and probe changes agree", evidence)


def train_val_agree(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad (train == val): the validation loss of the same samples is far from the last epoch's
    training loss: an evaluation path that differs from training (normalization statistics, weights
    that are not the trained ones) or training inputs transformed differently from validation's.

    Judged at the last validation when its samples are exactly the training epoch's
    (``val_ids_match_train``), from ``train_val_min_validations`` validations on (the model changes
    fast in the first epochs). Ratio ``val_loss / train_epoch_loss_mean``, healthy at the last
    validation 0.91-0.98 (fixtures, 8 pairs, 4 epochs) and 0.64-1.16 in the first epochs; allowed
    [``train_val_min_ratio`` 0.75, ``train_val_max_ratio`` 1.3].
    """
    val = _rows(history, "val_epoch")
    if _column(val, "train_epoch_loss_mean") is None or "val_ids_match_train" not in val.columns:
        return Verdict("train_val_agree", None, "no per-epoch training loss beside validation recorded")
    last = val.dropna(subset=["train_epoch_loss_mean"]).iloc[-1]
    if not _flag(last.get("val_ids_match_train")):
        return Verdict("train_val_agree", None, "validation samples are not the training epoch's: nothing to compare")
    if len(val) < cfg.train_val_min_validations:
        return Verdict("train_val_agree", None, f"needs >= {cfg.train_val_min_validations} validations, got {len(val)}")
    val_loss, train_loss = _as_float(last.get("val_loss")), _as_float(last.get("train_epoch_loss_mean"))
    ratio = val_loss / train_loss if train_loss > 0 else math.nan
    evidence = {"val_loss": val_loss, "train_epoch_loss_mean": train_loss, "ratio": ratio,
                "allowed": [cfg.train_val_min_ratio, cfg.train_val_max_ratio], "epoch": _as_int(last.get("epoch"), None)}
    if not math.isfinite(ratio):
        return Verdict("train_val_agree", None, "losses not finite: see finite", evidence)
    if not cfg.train_val_min_ratio <= ratio <= cfg.train_val_max_ratio:
        side = ("validation scores the same samples worse than training: is eval a different model (weights, "
                "normalization statistics)?" if ratio > 1 else
                "training loses more on the same samples than validation: are training inputs or targets "
                "changed (augmentation on one side, mispaired, a loss scaled differently)?")
        return Verdict("train_val_agree", False, f"val loss {val_loss:.4g} vs training loss {train_loss:.4g} on the "
                                                 f"same samples ({ratio:.2f}x): {side}", evidence)
    return Verdict("train_val_agree", True, f"val loss {val_loss:.4g} vs training loss {train_loss:.4g} on the same "
                                            f"samples ({ratio:.2f}x)", evidence)


def params_track_ground_truth(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad (with ground truth, in modes that must learn each image's lens): the predicted k1 or s
    does not correlate positively with the truth at the last validation (``pred_gt_corr_*``).

    Healthy: k1 +0.57 to +0.76, s +0.47 to +0.55 (fixtures; 8 steps to the full overfit run); a loss
    that learns the wrong lens -0.50. Floor ``gt_corr_floor`` (0: a model that learned anything about
    the lens correlates positively). Below ``gt_corr_min_steps`` training steps the correlation is
    noise (healthy -0.09 after 2 steps): n/a.
    """
    val = _rows(history, "val_epoch")
    present = [p for p in ("k1", "s") if _column(val, f"pred_gt_corr_{p}") is not None]
    if not present:
        return Verdict("params_track_ground_truth", None, "no ground truth for these pairs: not judged")
    steps = len(_rows(history, "train_step"))
    last = val.dropna(subset=[f"pred_gt_corr_{present[0]}"]).iloc[-1]
    evidence: dict[str, Any] = {f"corr_{p}": _as_float(last.get(f"pred_gt_corr_{p}")) for p in present}
    evidence.update({"floor": cfg.gt_corr_floor, "steps": steps})
    if not cfg.require_beats_constant_lens:
        return Verdict("params_track_ground_truth", None, "this mode is not expected to learn each image's lens yet "
                                                          f"({_corr_text(evidence, present)})", evidence)
    if steps < cfg.gt_corr_min_steps:
        return Verdict("params_track_ground_truth", None, f"needs >= {cfg.gt_corr_min_steps} training steps, got "
                                                          f"{steps} ({_corr_text(evidence, present)})", evidence)
    low = [p for p in present if not evidence[f"corr_{p}"] > cfg.gt_corr_floor]
    if low:
        return Verdict("params_track_ground_truth", False,
                       f"predictions do not follow the ground truth: {_corr_text(evidence, present)} (floor "
                       f"{cfg.gt_corr_floor:+.2f}): the model learns the wrong lens", evidence)
    return Verdict("params_track_ground_truth", True, _corr_text(evidence, present), evidence)


def _corr_text(evidence: dict[str, Any], present: list[str]) -> str:
    return ", ".join(f"{p} correlates {evidence[f'corr_{p}']:+.2f} with ground truth" for p in present)


def eval_flow_matches_train(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad (stages 2/3): the probe's residual flow in eval mode points elsewhere than in train mode
    (``probe_flow_cosine_train_eval``; a magnitude check misses a flipped sign). Healthy: cosine 1.0
    exactly (no dropout / batch norm in the residual path); floor ``eval_flow_min_cosine`` 0.5."""
    off = _residual_off(history, "eval_flow_matches_train")
    if off:
        return off
    cosine = _column(_rows(history, "val_epoch"), "probe_flow_cosine_train_eval")
    if cosine is None:
        return Verdict("eval_flow_matches_train", None, "no train-vs-eval flow recorded (instrumentation off, or the "
                                                        "residual is exactly zero)")
    worst = float(cosine.min())
    evidence = {"cosine_min": worst, "cosine_last": float(cosine.iloc[-1]), "floor": cfg.eval_flow_min_cosine}
    if worst < cfg.eval_flow_min_cosine:
        return Verdict("eval_flow_matches_train", False,
                       f"the probe's residual flow in eval mode has cosine {worst:+.2f} with train mode's: the "
                       "residual is switched or transformed differently at evaluation", evidence)
    return Verdict("eval_flow_matches_train", True, f"train vs eval residual flow cosine >= {worst:+.3f}", evidence)


def val_batches_repeat(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad: the first validation batch differs between validations (``val_batch_fingerprint``,
    ids and pixels): random augmentation or shuffling in the validation loader, so scores of
    different epochs are not comparable. Healthy: one fingerprint for the whole run."""
    prints = _column(_rows(history, "val_epoch"), "val_batch_fingerprint")
    if prints is None or len(prints) < 2:
        return Verdict("val_batches_repeat", None, "needs fingerprints of >= 2 validations")
    distinct = int(prints.nunique())
    evidence = {"validations": int(len(prints)), "distinct_fingerprints": distinct}
    if distinct > 1:
        return Verdict("val_batches_repeat", False,
                       f"the first validation batch differs between validations ({distinct} versions in "
                       f"{len(prints)}): is augmentation or shuffling on in the validation loader?", evidence)
    return Verdict("val_batches_repeat", True, f"the same validation batch in all {len(prints)} validations", evidence)


def lr_not_mostly_zero(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad: the learning rate is (near) 0 on more than ``lr_zero_max_frac`` of the steps (a schedule
    sized shorter than the run with a floor of 0, or an lr of 0). "Near": at most
    ``lr_zero_rel`` (1e-3) of the run's peak. Healthy: 0 % (the cosine floor is 10 % of the peak and
    warm-up starts at 1/warmup_steps of it)."""
    lr = _lr_per_step(_rows(history, "train_step"))
    if lr is None:
        return Verdict("lr_not_mostly_zero", None, "no learning rate recorded")
    peak = float(lr.max())
    near = lr <= cfg.lr_zero_rel * peak if peak > 0 else lr <= 0
    frac = float(near.mean())
    evidence = {"zero_lr_frac": frac, "peak_lr": peak, "steps": int(len(lr)), "allowed_frac": cfg.lr_zero_max_frac,
                "first_zero_step": _as_int(_rows(history, "train_step").loc[near[near].index, "step"].min(), None)
                if near.any() else None}
    if frac > cfg.lr_zero_max_frac:
        return Verdict("lr_not_mostly_zero", False, f"the learning rate is (near) 0 on {frac:.0%} of {len(lr)} steps "
                                                    f"(peak {peak:g})", evidence)
    return Verdict("lr_not_mostly_zero", True, f"lr (near) 0 on {frac:.0%} of steps (peak {peak:g})", evidence)


def _group_names(history: pd.DataFrame, count: int) -> list[str]:
    """A name per optimizer param group: its named groups (run_start ``optimizer_groups``), else its index."""
    start = _rows(history, "run_start")
    groups = start.iloc[-1].get("optimizer_groups") if not start.empty and "optimizer_groups" in start else None
    names = []
    for index in range(count):
        item = groups[index] if isinstance(groups, list) and index < len(groups) else None
        named = "/".join(item.get("groups", [])) if isinstance(item, dict) else ""
        names.append(f"param group {index} ({named})" if named else f"param group {index}")
    return names


def group_lr_not_negligible(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad: one optimizer param group's learning rate is negligible next to the others' on most steps
    (``lr_groups``): a group left at lr 0 in a per-group table, which a schedule with an absolute floor
    (``eta_min``) turns into a tiny non-zero lr, so the group still moves a little.

    Per step, each group's lr over the median of the other groups' lrs; negligible below
    ``group_lr_min_ratio`` (1/100) on more than ``group_lr_low_max_frac`` (half) of the steps.
    Healthy: per-head lrs differ by up to 3x (ratio >= 0.33; the competition loop's 1e-3 backbone
    vs 3e-3 heads), so the margin is 33x, and a deliberate 10-100x discount (a pretrained backbone)
    passes. A schedule scales every group alike (warm-up, cosine): the ratios stay. n/a with one
    param group, or when the other groups are at 0 too (``lr_not_mostly_zero`` judges that).
    """
    steps = _rows(history, "train_step")
    if "lr_groups" not in steps.columns:
        return Verdict("group_lr_not_negligible", None, "no per-group learning rates recorded")
    rows = [[_as_float(x) for x in v] for v in steps["lr_groups"] if isinstance(v, (list, tuple)) and len(v) >= 2]
    widths = {len(r) for r in rows}
    if not rows or len(widths) != 1:
        return Verdict("group_lr_not_negligible", None, "one param group (or groups changing): nothing to compare")
    table = np.asarray(rows, dtype=float)
    names = _group_names(history, table.shape[1])
    evidence: dict[str, Any] = {"min_ratio": cfg.group_lr_min_ratio, "allowed_frac": cfg.group_lr_low_max_frac,
                                "steps": int(len(table)), "groups": {}}
    low = []
    for index in range(table.shape[1]):
        others = np.median(np.delete(table, index, axis=1), axis=1)
        judged = others > 0
        if not judged.any():
            continue
        ratio = table[judged, index] / others[judged]
        frac = float((ratio < cfg.group_lr_min_ratio).mean())
        item = {"index": index, "name": names[index], "lr_first": float(table[0, index]),
                "lr_max": float(table[:, index].max()), "others_median_first": float(others[0]),
                "others_median_max": float(others.max()), "ratio_median": float(np.median(ratio)),
                "negligible_frac": frac}
        evidence["groups"][names[index]] = item
        if frac > cfg.group_lr_low_max_frac:
            low.append(item)
    evidence["negligible_groups"] = low
    if low:
        text = "; ".join(f"{g['name']} lr {g['lr_first']:g} at step 1 and at most {g['lr_max']:.3g}, below "
                         f"{cfg.group_lr_min_ratio:g}x the other groups' median (up to {g['others_median_max']:.3g}) "
                         f"on {g['negligible_frac']:.0%} of steps" for g in low)
        return Verdict("group_lr_not_negligible", False, text, evidence)
    worst = min((g["ratio_median"] for g in evidence["groups"].values()), default=math.nan)
    return Verdict("group_lr_not_negligible", True, f"every param group's lr within {1 / worst:.3g}x of the others'"
                   if worst > 0 else "param group lrs comparable", evidence)


#: Loss parts whose name says they are a regularizer of the flow or the warp (not a data term).
REGULARIZER_WORDS = ("flow", "smooth", "tv", "curv", "jacobian", "fold", "reg", "penalty", "mag")


def is_regularizer_part(name: str) -> bool:
    """True for a loss part named like a regularizer (``flow_tv``, ``flow_smooth``, ``jacobian``, ...)."""
    words = name.lower().replace("-", "_").split("_")
    return any(w.startswith(r) for w in words for r in REGULARIZER_WORDS)


def regularizer_share(steps: pd.DataFrame) -> tuple[pd.Series, list[str]] | None:
    """Per training step, the share of the total loss taken by its regularizer parts, and their names.

    The parts are the step's ``loss_parts`` (else every field ``X`` recorded beside ``X_weighted``,
    autohdr's own loss). With weighted parts (``<part>_weighted``) the share is their sum over the
    loss; with raw parts only (a loop's own loss) it is what the loss holds beyond its data parts,
    ``(loss - sum of the data parts) / loss``, exact when the data terms have weight 1. ``None``
    when no regularizer part (or no data part to subtract) is recorded.
    """
    if "loss" not in steps.columns:
        return None
    parts: list[str] = []
    if "loss_parts" in steps.columns:
        listed = steps["loss_parts"].dropna()
        listed = listed[listed.map(lambda v: isinstance(v, (list, tuple)))]
        if len(listed):
            parts = [str(p) for p in listed.iloc[-1]]
    if not parts:
        parts = [c for c in steps.columns if f"{c}_weighted" in steps.columns]
    parts = [p for p in parts if p in steps.columns and not p.endswith("_weighted")]
    regs = [p for p in parts if is_regularizer_part(p)]
    data = [p for p in parts if p not in regs]
    if not regs:
        return None
    loss = numeric_series(steps["loss"]).astype(float)
    if all(f"{p}_weighted" in steps.columns for p in regs):
        reg = sum(numeric_series(steps[f"{p}_weighted"]).astype(float).fillna(0.0) for p in regs)
    elif data:
        reg = loss - sum(numeric_series(steps[p]).astype(float).fillna(0.0) for p in data)
    else:
        return None
    share = (reg / loss.where(loss > 0)).clip(lower=0.0, upper=1.0).dropna()
    return (share, regs) if len(share) else None


def loss_not_regularizer_bound(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad: the regularizer parts of the loss (flow smoothness / magnitude / curvature, the fold
    penalty) take more than ``regularizer_max_share`` of the total loss (median over the steps): their
    weights are far too large, the data term no longer drives training and the residual is pinned.

    Healthy medians (measured, see docs/invariants-and-causes.md): autohdr's stage 2/3 probes 0.03-0.12 %
    (fixtures and photos), the competition loop 0.46 % (per-step max 0.81 %); regularizer weights x1000:
    autohdr's stage 2 19 %, the competition loop 55 %. Allowed 5 %: 10x above the healthy medians, 4x
    below the smaller fault.
    n/a when the loss records no regularizer part (stage 1, a loss without parts).
    """
    found = regularizer_share(_rows(history, "train_step"))
    if found is None:
        return Verdict("loss_not_regularizer_bound", None, "no regularizer parts of the loss recorded")
    share, regs = found
    median = float(share.median())
    evidence = {"regularizer_share_median": median, "regularizer_share_first": float(share.iloc[0]),
                "regularizer_share_max": float(share.max()), "regularizer_parts": regs,
                "allowed_share": cfg.regularizer_max_share, "steps": int(len(share))}
    if median > cfg.regularizer_max_share:
        return Verdict("loss_not_regularizer_bound", False,
                       f"the regularizers ({', '.join(regs)}) are {median:.0%} of the total loss (median over "
                       f"{len(share)} steps, {share.iloc[0]:.0%} at step 1; allowed {cfg.regularizer_max_share:.0%}): "
                       "their weights swamp the data term", evidence)
    return Verdict("loss_not_regularizer_bound", True, f"the regularizers are {median:.2%} of the loss (median)",
                   evidence)


def loop_validation_in_eval_mode(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad: the loop's own validation (forwards with gradients off, seen by ``autohdr.attach``:
    ``loop_validation`` records) ran the model in train mode: ``model.eval()`` missing, so dropout
    and batch-norm statistics behave as in training. Healthy: 0 train-mode forwards. n/a when the
    loop has no validation of its own (or was not attached)."""
    records = _rows(history, "loop_validation")
    forwards = _column(records, "loop_val_forwards")
    if forwards is None:
        return Verdict("loop_validation_in_eval_mode", None, "the loop has no validation of its own (not attached)")
    forwards = forwards.where(np.isfinite(forwards))  # a count that is not finite says nothing
    train_mode = numeric_series(records["loop_val_train_mode_forwards"]) \
        if "loop_val_train_mode_forwards" in records else pd.Series(0.0, index=records.index)
    train_mode = train_mode.where(np.isfinite(train_mode)).fillna(0)
    bad = records[train_mode > 0]
    evidence = {"validations": int(len(records)), "forwards": int(forwards.sum()),
                "train_mode_forwards": int(train_mode.sum()), "validations_in_train_mode": int(len(bad)),
                "first_step": _as_int(bad.iloc[0].get("step"), None) if len(bad) else None}
    if len(bad):
        return Verdict("loop_validation_in_eval_mode", False,
                       f"the loop's validation ran {evidence['train_mode_forwards']} of {evidence['forwards']} forwards "
                       f"in train mode ({len(bad)} of {len(records)} validations, first after step "
                       f"{evidence['first_step']})", evidence)
    return Verdict("loop_validation_in_eval_mode", True, f"the loop's {len(records)} validations ran in eval mode",
                   evidence)


def weights_continue_across_epochs(history: pd.DataFrame, cfg: JudgeConfig) -> Verdict:
    """Bad: the weights at an epoch's first step are not those the previous epoch ended with
    (``weights_jump_before_epoch``: the norm of their change with no optimizer step between): a
    "resume" that loads the wrong checkpoint (e.g. the initial weights), an averaged copy swapped in
    and left. Healthy: exactly 0 (nothing touches the weights between epochs; a resumed run starts
    its measurement afresh). n/a with one epoch or no measurement."""
    steps = _rows(history, "train_step")
    jumps = _column(steps, "weights_jump_before_epoch")
    if jumps is None:
        return Verdict("weights_continue_across_epochs", None, "needs >= 2 epochs with parameter measurements")
    moved = jumps[jumps > cfg.weights_jump_max]
    deltas = [c for c in steps.columns if c.startswith("param_delta_")]
    step_norm = steps[deltas].apply(numeric_series).fillna(0.0).pow(2).sum(axis=1).pow(0.5) if deltas else None
    # None (not NaN) when no step moved the weights: evidence is compared and written as JSON
    typical = float(step_norm[step_norm > 0].median()) if step_norm is not None and (step_norm > 0).any() else None
    epochs = [_as_int(steps.loc[i, "epoch"], None) for i in moved.index]
    evidence = {"epoch_starts_compared": int(len(jumps)), "jumped_epochs": epochs,
                "largest_jump": float(jumps.max()), "typical_step_change": typical}
    if len(moved):
        times = f" ({float(moved.max()) / typical:.3g}x a typical step's change)" if typical else ""
        return Verdict("weights_continue_across_epochs", False,
                       f"the weights changed by {float(moved.max()):.4g}{times} between epochs with no optimizer step, "
                       f"at the start of epoch(s) {epochs}: something between epochs loads or edits them", evidence)
    return Verdict("weights_continue_across_epochs", True,
                   f"each of {len(jumps)} epochs starts from the weights the previous one ended with", evidence)


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
    "backbone_learning": backbone_learning,
    "optimizer_covers_params": optimizer_covers_params,
    "eval_deterministic": eval_deterministic,
    "eval_residual_matches_train": eval_residual_matches_train,
    "residual_helps": residual_helps,
    "batches_in_range": batches_in_range,
    "batches_vary": batches_vary,
    "pairs_match_ground_truth": pairs_match_ground_truth,
    "groups_move_with_gradients": groups_move_with_gradients,
    "logged_quantities_agree": logged_quantities_agree,
    "train_val_agree": train_val_agree,
    "params_track_ground_truth": params_track_ground_truth,
    "eval_flow_matches_train": eval_flow_matches_train,
    "val_batches_repeat": val_batches_repeat,
    "lr_not_mostly_zero": lr_not_mostly_zero,
    "group_lr_not_negligible": group_lr_not_negligible,
    "loss_not_regularizer_bound": loss_not_regularizer_bound,
    "loop_validation_in_eval_mode": loop_validation_in_eval_mode,
    "weights_continue_across_epochs": weights_continue_across_epochs,
}


def judge(history: pd.DataFrame | str, cfg: JudgeConfig | None = None) -> list[Verdict]:
    """Every signal's verdict for a run (a DataFrame, a ``metrics.jsonl`` path or a run folder)."""
    if not isinstance(history, pd.DataFrame):
        history = read_metrics(history)
    history = numeric_history(history)
    cfg = cfg or JudgeConfig()
    # inf - inf and the like in a diverged run's figures: no RuntimeWarning
    with np.errstate(all="ignore"), _rows_selected_once(history):
        return [_judge_one(name, fn, history, cfg) for name, fn in SIGNALS.items()]


#: Signals that mean nothing below a number of training steps: signal -> the JudgeConfig field with
#: that number. Below it the signal is ``n/a`` naming the number (see JudgeConfig for the measurements).
MIN_STEPS: dict[str, str] = {
    "beats_identity": "baseline_min_steps", "beats_constant_lens": "baseline_min_steps",
    "residual_helps": "baseline_min_steps", "not_data_bound": "timing_min_steps",
    "clipping_sane": "clipping_min_steps",
    "backbone_learning": "group_min_steps", "param_head_learning": "group_min_steps",
    "residual_head_learning": "group_min_steps", "residual_contributes": "group_min_steps",
    "eval_residual_matches_train": "group_min_steps", "residual_not_inactive": "group_min_steps",
}


#: The overfit signals: signal -> the JudgeConfig flag that requires it. Where required, below
#: ``overfit_min_epochs`` training epochs (passes over the subset) they are ``n/a`` naming the number.
MIN_EPOCHS: dict[str, str] = {"beats_identity": "require_beats_identity",
                              "beats_constant_lens": "require_beats_constant_lens",
                              "params_track_ground_truth": "require_beats_constant_lens"}
#: What the overfit preset and an attached run of overfit intent use (see JudgeConfig.overfit_min_epochs).
OVERFIT_MIN_EPOCHS = 12


def _epochs_trained(history: pd.DataFrame) -> int | None:
    """How many epochs the training steps span (distinct ``epoch`` values); ``None`` when not recorded."""
    steps = _rows(history, "train_step")
    epochs = _column(steps, "epoch")
    return None if epochs is None else int(epochs.nunique())


def _judge_one(name: str, fn: Callable[[pd.DataFrame, JudgeConfig], Verdict], history: pd.DataFrame,
               cfg: JudgeConfig) -> Verdict:
    """``fn(history, cfg)``; a signal that fails on a history it was not written for (text where numbers
    belong, a record cut short) says so as ``n/a`` instead of stopping the whole judgement."""
    needed = getattr(cfg, MIN_STEPS.get(name, ""), 0) or 0
    if needed:
        have = len(_rows(history, "train_step"))
        if have < needed:
            return Verdict(name, None, f"needs >= {needed} training steps to mean anything, got {have}",
                           {"min_steps": needed, "steps": have})
    if name in MIN_EPOCHS and cfg.overfit_min_epochs and getattr(cfg, MIN_EPOCHS[name]):
        epochs = _epochs_trained(history)
        if epochs is not None and epochs < cfg.overfit_min_epochs:
            return Verdict(name, None, f"needs >= {cfg.overfit_min_epochs} epochs over the subset to mean anything "
                                       f"(an overfit learns per pass), got {epochs}",
                           {"min_epochs": cfg.overfit_min_epochs, "epochs": epochs})
    try:
        return fn(history, cfg)
    except Exception as exc:  # noqa: BLE001 -- one odd history must not hide every other verdict
        return Verdict(name, None, f"{NOT_JUDGED_ERROR}: {type(exc).__name__}: {exc}")


def all_good(verdicts: list[Verdict]) -> bool:
    """True when no applicable signal is bad."""
    return not any(v.ok is False for v in verdicts)


def interruption(history: pd.DataFrame) -> dict[str, int] | None:
    """Where a run was stopped by Ctrl-C / SIGTERM (its ``interrupted`` record): ``{"epoch": E, "step": N}``
    with the epoch counted from 1 and ``N`` the last step it finished; ``None`` for a run that was not."""
    stops = _rows(history, "interrupted")
    if stops.empty:
        return None
    row = stops.iloc[-1]
    return {"epoch": _as_int(row.get("epoch"), 0) + 1, "step": _as_int(row.get("step"), 0)}


def overall_status(verdicts: list[Verdict], interrupted: Any = None) -> str:
    """The run's headline: ``INTERRUPTED`` when it was stopped before its end (``interrupted``: truthy,
    e.g. :func:`interruption`'s result; its verdicts judge what it ran), else ``ALL GOOD`` or ``BAD SIGNALS``."""
    if interrupted:
        return "INTERRUPTED"
    return "ALL GOOD" if all_good(verdicts) else "BAD SIGNALS"


def status_line(verdicts: list[Verdict], interrupted: Any = None) -> str:
    """:func:`overall_status` with what it rests on: for an interrupted run, where it stopped (a
    :func:`interruption` dict, or ``True`` when unknown) and how many signals its steps turned BAD."""
    status = overall_status(verdicts, interrupted)
    if status != "INTERRUPTED":
        return status
    where = (f" in epoch {interrupted['epoch']} after step {interrupted['step']}"
             if isinstance(interrupted, dict) else "")
    bad = [v.signal for v in verdicts if v.ok is False]
    judged = f"BAD in what it ran: {', '.join(bad)}" if bad else "no BAD signal in what it ran"
    return f"INTERRUPTED{where}: judged on the steps it ran, {judged}"


def format_table(verdicts: list[Verdict]) -> str:
    """A fixed-width verdict table for the terminal."""
    mark = {True: "GOOD", False: "BAD", None: "n/a"}
    width = max(len(v.signal) for v in verdicts)
    lines = [f"{'signal'.ljust(width)}  verdict  detail", f"{'-' * width}  -------  ------"]
    lines += [f"{v.signal.ljust(width)}  {mark[v.ok]:<7}  {v.detail}" for v in verdicts]
    return "\n".join(lines)
