"""Likely causes: the BAD verdicts of a run grouped under the setting or data problem that explains them.

``diagnose(verdicts, history)`` is a pure function of the verdicts and the metric history (the
same DataFrame the verdicts were judged from). Each rule below looks for one cause, from the most
fundamental (the data) to the most specific (the residual hurts), and claims the BAD signals it
explains; a signal is explained by at most one cause, the first that claims it. BAD signals no rule
explains are listed last under the cause id ``unexplained`` (their own verdict details say what
was seen), so every BAD signal appears in exactly one :class:`Diagnosis`.

Rules match signals by name, so a signal that a run does not have (an older run, another
branch's signal set) simply never triggers its rule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import pandas as pd

from autohdr.diagnosis.verdicts import Verdict

#: Headings of the team runbook (local_training_debug_runbook.md) that a diagnosis can point to.
RUNBOOK_SECTIONS = ("Preconditions", "Debug Modes", "New Diagnostics", "Good vs Bad Signals", "Helper Scripts")

#: A peak learning rate at or below this fraction of the reference (the preset's) is absurdly small.
TINY_LR_FRACTION = 1e-3
#: Without a reference learning rate, a peak at or below this is absurdly small.
TINY_LR_ABSOLUTE = 1e-7
#: A clip norm below this fraction of the median gradient norm clips nearly every step by itself.
CLIP_TIGHT_FRACTION = 0.1
#: A group whose gradient is zero on more than this fraction of steps is frozen or detached.
ZERO_GRAD_FRAC = 0.5

GROUP_SIGNALS = {"param_head_learning": "param_head", "residual_head_learning": "residual_head",
                 "backbone_learning": "backbone"}
RESIDUAL_KNOCK_ON = ("residual_contributes", "residual_not_inactive", "residual_helps")
BASELINE_SIGNALS = ("beats_identity", "beats_constant_lens")


@dataclass(frozen=True)
class Diagnosis:
    """One likely cause and the BAD signals it explains.

    ``cause_id`` names the rule (``lr_zero``, ``data_nonfinite``, ...; ``unexplained`` for the
    rest), ``cause`` is one line naming the setting or data problem with its value, ``look_at``
    the metric or column that shows it and ``runbook`` the runbook section that applies.
    """

    cause_id: str
    cause: str
    signals: tuple[str, ...]
    look_at: str
    runbook: str

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["signals"] = list(self.signals)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Diagnosis":
        """The inverse of :meth:`to_dict` (a ``report.json`` entry)."""
        return cls(**{**data, "signals": tuple(data["signals"])})


@dataclass(frozen=True)
class RunFacts:
    """What the rules read besides the BAD verdicts."""

    history: pd.DataFrame
    good: frozenset[str]            # signals judged GOOD (a GOOD verdict can be a fact, e.g. clean inputs)
    reference_lr: float | None      # the preset's learning rate, if known


Rule = Callable[[dict[str, Verdict], RunFacts], "list[Diagnosis]"]


# ---------------------------------------------------------------------------- facts from the history

def _rows(history: pd.DataFrame, kind: str) -> pd.DataFrame:
    if "kind" not in history.columns:
        return history.iloc[0:0]
    return history[history["kind"] == kind]


def _numbers(frame: pd.DataFrame, name: str) -> pd.Series:
    if name not in frame.columns:
        return pd.Series(dtype=float)
    return pd.to_numeric(frame[name], errors="coerce").dropna()


def _config(history: pd.DataFrame) -> dict[str, Any]:
    """The ``run_start`` record's training config (empty when the loop did not record one)."""
    start = _rows(history, "run_start")
    if start.empty or "config" not in start.columns:
        return {}
    config = start.iloc[-1]["config"]
    return config if isinstance(config, dict) else {}


def _stage_residual_active(history: pd.DataFrame) -> bool | None:
    start = _rows(history, "run_start")
    if start.empty or "residual_branch_active" not in start.columns:
        return None
    value = start.iloc[-1]["residual_branch_active"]
    return bool(value) if pd.notna(value) else None


def _empty_group(history: pd.DataFrame, group: str) -> bool:
    start = _rows(history, "run_start")
    if start.empty or "parameter_groups" not in start.columns:
        return False
    summary = start.iloc[-1]["parameter_groups"]
    return isinstance(summary, dict) and group in summary and not summary[group].get("values", 0)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _pct(value: Any) -> str:
    """``value`` (a fraction) as a percentage; ``?`` when it is not a number."""
    return f"{value:.0%}" if isinstance(value, (int, float)) and math.isfinite(value) else "?"


# ---------------------------------------------------------------------------- verdict helpers

def _grad_zero(verdict: Verdict | None) -> float | None:
    """``grad_zero_frac`` of a group-learning verdict, if it recorded one."""
    if verdict is None:
        return None
    value = verdict.evidence.get("grad_zero_frac")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _gets_no_gradient(verdict: Verdict | None) -> bool:
    frac = _grad_zero(verdict)
    return frac is not None and frac > ZERO_GRAD_FRAC


def _first(evidence: dict[str, Any], *keys: str) -> Any:
    """The first present value among ``keys`` (the first item of a list)."""
    for key in keys:
        value = evidence.get(key)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            return value
    return None


def _diagnosis(cause_id: str, cause: str, bad: dict[str, Verdict], claims: Iterable[str], look_at: str,
               runbook: str) -> list[Diagnosis]:
    """A one-item list when any of ``claims`` is still-unexplained BAD, else ``[]``."""
    wanted = set(claims)
    signals = tuple(name for name in bad if name in wanted)
    return [Diagnosis(cause_id, cause, signals, look_at, runbook)] if signals else []


# ---------------------------------------------------------------------------- rules, most fundamental first

def _data_out_of_range(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """Input batches with non-finite values or outside [0, 1] (signal ``batches_in_range``).

    The step and value come from the ``batch_nonfinite`` / ``batch_min`` / ``batch_max`` fields of
    any record (a run stopped by a NaN writes them on its ``error`` record), the sample id from the
    verdict's evidence (``sample_id`` or ``sample_ids``).
    """
    verdict = bad.get("batches_in_range")
    if verdict is None:
        return []
    history = run.history
    step = _numbers(history, "step").reindex(history.index)
    bad_sample = verdict.evidence.get("first_bad_sample")
    sample = (bad_sample.get("image_id") or f"#{bad_sample.get('index')}") if isinstance(bad_sample, dict) else None
    where = f", sample {sample}" if sample is not None else ""
    claims = ("batches_in_range", "finite", "clipping_sane", "loss_decreases", "param_head_not_saturated",
              "train_val_agree", "logged_quantities_agree", *BASELINE_SIGNALS)
    runbook = "Preconditions: the dataset and the inputs it yields"
    nonfinite = _numbers(history, "batch_nonfinite")
    nonfinite = nonfinite[nonfinite > 0]
    if len(nonfinite) or _first(verdict.evidence, "nonfinite_step") is not None:
        first = _first(verdict.evidence, "nonfinite_step")
        if first is None and step.loc[nonfinite.index].notna().any():
            first = step.loc[nonfinite.index].min()
        at = f" at step {int(first)}" if first is not None else ""
        return _diagnosis("data_nonfinite", f"a NaN (non-finite value) in the input batch{at}{where}: fix that sample "
                          "or its decoding, not the learning rate", bad, claims,
                          "batch_nonfinite per train_step (and the batches_in_range detail)", runbook)
    low, high = _numbers(history, "batch_min"), _numbers(history, "batch_max")
    if len(low) and len(high):
        outside = step.loc[low[low < 0].index.union(high[high > 1].index)].dropna()
        first = f", first at step {int(outside.min())}" if len(outside) else ""
        scale = " (images in 0-255? divide by 255)" if high.max() > 1.5 else ""
        cause = f"input batches outside [0, 1]: min {_fmt(low.min())}, max {_fmt(high.max())}{first}{where}{scale}"
    else:
        cause = f"input batches outside [0, 1] or non-finite: {verdict.detail}"
    return _diagnosis("data_out_of_range", cause, bad, claims, "batch_min / batch_max per train_step", runbook)


def _pairs_mismatched(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """Inputs and targets mispaired or swapped (signal ``pairs_match_ground_truth``)."""
    verdict = bad.get("pairs_match_ground_truth")
    if verdict is None:
        return []
    return _diagnosis("pairs_mismatched", f"inputs and targets are mispaired or swapped: the ground-truth warp does "
                      f"not beat identity on its own pairs ({verdict.detail})", bad,
                      ("pairs_match_ground_truth", *BASELINE_SIGNALS, "loss_decreases", "scores_move", "residual_helps",
                       "param_head_not_saturated"),
                      "val_epoch gt_proxy_total vs identity_proxy_total; the pair list (train_split.csv)",
                      "Debug Modes: overfit stage 1 must beat identity on the same subset")


def _batch_repeats(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """The same batch every step (signal ``batches_vary``)."""
    verdict = bad.get("batches_vary")
    if verdict is None:
        return []
    return _diagnosis("batch_repeats", f"the same training batch repeats every step: the loader or sampler yields "
                      f"one batch ({verdict.detail})", bad, ("batches_vary", *BASELINE_SIGNALS),
                      "the batches_vary evidence (sample ids per step)", "Debug Modes: overfit stage 1")


def _learning_rate_zero(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """A learning rate of 0, or absurdly small: nothing can move."""
    step_lr = _numbers(_rows(run.history, "train_step"), "lr")
    groups_lr = _rows(run.history, "train_step").get("lr_groups")
    if groups_lr is not None:  # the highest rate of any param group: one group at 0 is _group_lr_zero's
        peaks = groups_lr.dropna().map(lambda v: max((float(x) for x in v), default=math.nan)
                                       if isinstance(v, list) else math.nan).dropna()
        if len(peaks):
            step_lr = peaks
    config_lr = _config(run.history).get("lr")
    reference_lr = run.reference_lr
    peak = float(step_lr.max()) if len(step_lr) else (float(config_lr) if config_lr is not None else None)
    if peak is None:
        return []
    setting = f"train.lr={config_lr!r}" if config_lr is not None else f"the optimizer's lr peaked at {peak:g}"
    claims = ["scores_move", "probe_checksums_change", "loss_decreases", *BASELINE_SIGNALS,
              "groups_move_with_gradients", "lr_not_mostly_zero", "params_track_ground_truth"]
    if peak <= 0:
        if config_lr is None:
            setting = "the optimizer's lr was 0 on every step"
        elif float(config_lr) > 0:
            setting += ", but the optimizer's lr was 0 on every step: check the schedule"
        cause_id, cause = "lr_zero", f"the learning rate is 0 ({setting})"
    else:
        # parameters move, but by less than the probe checksum's rounding: not a stale evaluation
        claims.append("probe_tracks_updates")
        floor = TINY_LR_FRACTION * reference_lr if reference_lr else TINY_LR_ABSOLUTE
        if peak > floor:
            return []
        versus = f"the preset's is {reference_lr:g}" if reference_lr else f"at or below {TINY_LR_ABSOLUTE:g}"
        cause_id, cause = "lr_tiny", f"the learning rate is absurdly small ({setting}, peak {peak:g}; {versus})"
    residual_can_learn = not _gets_no_gradient(bad.get("residual_head_learning"))
    claims += [name for name in GROUP_SIGNALS if name in bad and not _gets_no_gradient(bad[name])]
    # Heads whose last layer starts at zero pass no gradient to the backbone until they move: with
    # nothing moving, a backbone without gradient is a consequence, not a second fault.
    claims += ["backbone_learning"]
    if residual_can_learn:
        claims += RESIDUAL_KNOCK_ON
    return _diagnosis(cause_id, cause, bad, claims, "train_step lr (and run_start config.lr)",
                      "Good vs Bad Signals: proxy and probe scores must move across epochs")


def _diverged(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """Non-finite loss or gradients although the inputs are clean (``batches_in_range`` GOOD)."""
    if "finite" not in bad or "batches_in_range" not in run.good:
        return []
    lr = _config(run.history).get("lr")
    setting = f"train.lr={lr!r}" if lr is not None else "the learning rate"
    claims: tuple[str, ...] = ("finite", "clipping_sane")
    errors = _rows(run.history, "error")
    if "name" in errors.columns and (errors["name"] == "non_finite").any():
        # The run stopped at the blow-up: what the steps before it show (parameters thrown to their
        # bounds, saturated heads passing no gradient, no time to learn) follows from it.
        claims += ("param_head_not_saturated", *GROUP_SIGNALS, *RESIDUAL_KNOCK_ON, "eval_residual_matches_train",
                   *(("groups_move_with_gradients",) if "groups_move_with_gradients" in bad
                     and not bad["groups_move_with_gradients"].evidence.get("still_groups") else ()),
                   "loss_decreases", "scores_move", "probe_checksums_change", *BASELINE_SIGNALS)
    return _diagnosis("diverged", f"training diverged on clean inputs: {setting} too high, or a loss term that "
                      "divides by or takes the log of 0", bad, claims,
                      "train_step loss and grad_norm_total before the first non-finite step",
                      "Good vs Bad Signals")


def _clip_too_tight(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """Clipping on most steps because the clip norm sits far below the typical gradient norm."""
    clip = _config(run.history).get("grad_clip_norm")
    if clip is None and len(_numbers(_rows(run.history, "train_step"), "clip_norm")):
        clip = float(_numbers(_rows(run.history, "train_step"), "clip_norm").median())  # a loop without a config
    norms = _numbers(_rows(run.history, "train_step"), "grad_norm_total")
    if "clipping_sane" not in bad or clip is None or not len(norms):
        return []
    typical = float(norms.median())
    if not float(clip) < CLIP_TIGHT_FRACTION * typical:
        return []
    return _diagnosis("clip_too_tight", f"train.grad_clip_norm={clip!r} is far below the typical gradient norm "
                      f"(median {_fmt(typical)}): nearly every step is clipped", bad, ("clipping_sane",),
                      "train_step grad_norm_total and grad_clipped", "Good vs Bad Signals")


def _optimizer_mismatch(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """Parameters that get gradients but are not optimized, or the reverse (``optimizer_covers_params``)."""
    verdict = bad.get("optimizer_covers_params")
    if verdict is None:
        return []
    stuck = [name for name in GROUP_SIGNALS if name in bad and not _gets_no_gradient(bad[name])]
    claims = ["optimizer_covers_params", *stuck]
    if "residual_head_learning" in stuck:
        claims += RESIDUAL_KNOCK_ON
    return _diagnosis("optimizer_mismatch", f"parameters outside the optimizer: {verdict.detail}", bad, claims,
                      "param_delta_<group> (zero while grad_norm_<group> is not) and the parameter names above",
                      "New Diagnostics: parameter deltas")


def _frozen_group(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """A group that gets no gradient on most steps, or has no parameters at all."""
    out: list[Diagnosis] = []
    taken: set[str] = set()
    for signal, group in GROUP_SIGNALS.items():
        verdict = bad.get(signal)
        knock_on: tuple[str, ...] = ()
        if group == "residual_head":
            knock_on = RESIDUAL_KNOCK_ON
        elif group == "param_head" and _stage_residual_active(run.history) is False:
            # stage 1: the parameter head is the only path to the loss
            knock_on = ("loss_decreases", *BASELINE_SIGNALS, "scores_move", "probe_checksums_change",
                        "backbone_learning")
        if verdict is not None and _gets_no_gradient(verdict):
            cause = (f"the {group} gets no gradient on {_grad_zero(verdict):.0%} of steps: frozen (requires_grad "
                     "False / not in the optimizer) or detached (.detach(), torch.no_grad() or x 0 between it and "
                     "the loss)")
            claims = (signal, *knock_on)
            moves = bad.get("groups_move_with_gradients")
            if moves is not None and group in moves.evidence.get("ghost_groups", []) \
                    and not moves.evidence.get("still_groups"):
                # groups without gradient that move (the frozen one, and in stage 1 the backbone behind it):
                # the optimizer's weight decay on weights no gradient reaches
                claims = (*claims, "groups_move_with_gradients")
            coverage = bad.get("optimizer_covers_params")
            if coverage is not None and not coverage.evidence.get("grad_not_optimized"):
                # its optimized parameters never get a gradient: the same fault seen from the optimizer
                claims = (*claims, "optimizer_covers_params")
        elif group == "residual_head" and _empty_group(run.history, group) and "residual_contributes" in bad:
            cause = ("the residual head has no trainable parameters (parameter group residual_head is empty): a "
                     "parameter-free module, or its modules are not named (--groups residual_head=MODULE.PATH)")
            claims = knock_on
        else:
            continue
        remaining = {k: v for k, v in bad.items() if k not in taken}
        found = _diagnosis(f"frozen_{group}", cause, remaining, claims, f"grad_norm_{group} and param_delta_{group}",
                           "New Diagnostics: gradient norms and parameter deltas per group")
        for item in found:
            taken.update(item.signals)
        out += found
    return out


def _eval_differs(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """Evaluation is not the trained model: random, residual switched off, or a stale copy."""
    out: list[Diagnosis] = []
    remaining = dict(bad)
    checks = [
        ("probe_tracks_updates", "eval_stale",
         "evaluation looks at a stale model: the probe did not change while the parameters moved (a cached copy, "
         "an EMA or a reloaded checkpoint is evaluated instead of the trained weights)",
         ("probe_tracks_updates", "probe_checksums_change", "scores_move", "eval_residual_matches_train",
          "residual_helps", *BASELINE_SIGNALS),
         "probe_pred_checksum per val_epoch vs param_delta_* between them",
         "Good vs Bad Signals: probe checksums unchanged while parameter deltas are non-zero"),
        ("eval_deterministic", "eval_random",
         "evaluation is random: dropout or another random op stays active at eval (the same probe gave different "
         "outputs twice; is model.eval() reaching every module?)", ("eval_deterministic", "ranks_in_sync"),
         "the eval_deterministic evidence (probe evaluated twice)", "New Diagnostics: validation probe"),
        ("eval_flow_matches_train", "eval_residual_off",
         "the residual differs between training and evaluation (its flow points elsewhere in eval mode)",
         ("eval_flow_matches_train", "eval_residual_matches_train", "residual_helps", *BASELINE_SIGNALS),
         "probe_flow_cosine_train_eval and the probe flow checksums per val_epoch",
         "Debug Modes: stage 2 residual probe"),
        ("eval_residual_matches_train", "eval_residual_off",
         "the residual differs between training and evaluation (on in training, off or rescaled at eval)",
         ("eval_residual_matches_train", "residual_helps", *BASELINE_SIGNALS),
         "residual_contrib_px_mean in train_step vs the eval residual evidence",
         "Debug Modes: stage 2 residual probe"),
    ]
    for trigger, cause_id, cause, claims, look_at, runbook in checks:
        verdict = remaining.get(trigger)
        if verdict is None:
            continue
        found = _diagnosis(cause_id, f"{cause}: {verdict.detail}", remaining, claims, look_at, runbook)
        for item in found:
            for name in item.signals:
                remaining.pop(name, None)
        out += found
    return out


def _residual_hurts(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """The residual makes the result worse than the same model with the residual zeroed (``residual_helps``)."""
    verdict = bad.get("residual_helps")
    if verdict is None:
        return []
    return _diagnosis("residual_hurts", f"the residual branch makes the result worse: {verdict.detail}", bad,
                      ("residual_helps", *BASELINE_SIGNALS), "residual_contrib_px_* and the residual_helps evidence",
                      "Debug Modes: stage 2 residual probe")


# ---------------------------------------------------------------------------- rules on recorded settings and figures

#: What each rule reads from the history: ``kind.field`` (``run_start.config.*`` for config keys).
#: tests/test_causes.py checks that a real run writes every one of them.
RULE_READS: dict[str, tuple[str, ...]] = {}


def reads(*keys: str):
    """Declare the ``kind.field`` evidence keys a rule reads (see :data:`RULE_READS`)."""
    def mark(rule):
        RULE_READS[rule.__name__] = keys
        return rule
    return mark


#: A first training loss this many times identity's loss at init: summed, not averaged.
LOSS_SUMMED_FACTOR = 50.0
#: A loss weight this many times the preset's (or 1 / this) is off the preset by orders of magnitude.
LOSS_WEIGHT_FACTOR = 10.0
#: Adam's eps at or above this swamps sqrt(v) for typical gradients (default 1e-8).
ADAM_EPS_MAX = 1e-4
#: Decoupled weight decay at or above this pulls the weights to 0 faster than any gradient moves them.
WEIGHT_DECAY_MAX = 1.0
#: Parameters at their bounds on at least this share of a step, within the first STEPS_EARLY_FRAC of the run.
SATURATED_FRAC = 0.5
STEPS_EARLY_FRAC = 0.25
SATURATED_EARLY_STEPS = 10

NOT_LEARNING = ("loss_decreases", "scores_move", "probe_checksums_change", *BASELINE_SIGNALS,
                "params_track_ground_truth", "backbone_learning")


def _start(history: pd.DataFrame, name: str) -> Any:
    start = _rows(history, "run_start")
    if start.empty or name not in start.columns:
        return None
    return start.iloc[-1][name]


def _first_loss_factor(history: pd.DataFrame) -> float | None:
    init = _rows(history, "init")
    loss = _numbers(_rows(history, "train_step"), "loss")
    if init.empty or not len(loss):
        return None
    reference = pd.to_numeric(pd.Series([init.iloc[-1].get("identity_loss")]), errors="coerce").iloc[0]
    if not (pd.notna(reference) and reference > 0):
        return None
    return float(loss.iloc[0]) / float(reference)


@reads("init.identity_loss", "train_step.loss")
def _loss_summed(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """The first training loss is orders of magnitude above identity's loss at init (measured with
    the hooks' loss function): a loss summed over pixels or samples instead of averaged."""
    factor = _first_loss_factor(run.history)
    if factor is None or factor < LOSS_SUMMED_FACTOR:
        return []
    return _diagnosis("loss_summed", f"the training loss starts at {factor:.0f}x identity's loss at init: it is summed "
                      "over pixels or samples instead of averaged (use .mean(), or divide by the count)", bad,
                      ("logged_quantities_agree", "train_val_agree", "clipping_sane", "finite", "param_head_not_saturated",
                       *NOT_LEARNING), "train_step loss (first step) vs init identity_loss",
                      "Good vs Bad Signals")


def _optimizer_groups(history: pd.DataFrame) -> list[dict[str, Any]]:
    groups = _start(history, "optimizer_groups")
    return [g for g in groups if isinstance(g, dict)] if isinstance(groups, list) else []


def _zero_lr_groups(history: pd.DataFrame) -> list[tuple[int, dict[str, Any]]]:
    """Optimizer param groups whose lr is 0 on most steps (``lr_groups``; else the lr at run_start)
    while another group's is not."""
    groups = _optimizer_groups(history)
    if len(groups) < 1:
        return []
    steps = _rows(history, "train_step")
    per_step = steps["lr_groups"].dropna() if "lr_groups" in steps.columns else pd.Series(dtype=object)
    per_step = per_step[per_step.map(lambda v: isinstance(v, list) and len(v) == len(groups))]
    out = []
    for index, group in enumerate(groups):
        if len(per_step):
            zero = float(per_step.map(lambda v: float(v[index]) <= 0).mean()) > 0.5
        else:
            zero = float(group.get("lr", 1.0)) <= 0
        if zero:
            out.append((index, group))
    return out if len(out) < len(groups) else []


@reads("run_start.optimizer_groups", "train_step.lr_groups")
def _group_lr_zero(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """One optimizer param group at lr 0 (or negligible next to the others', signal
    ``group_lr_not_negligible``) while the others learn: its parameters get gradients and (barely) move."""
    zero = _zero_lr_groups(run.history)
    named = sorted({name for _, group in zero for name in group.get("groups", [])})
    verdict = bad.get("group_lr_not_negligible")
    negligible = verdict.evidence.get("negligible_groups", []) if verdict is not None else []
    groups = _optimizer_groups(run.history)
    for item in negligible:
        index = item.get("index")
        if isinstance(index, int) and index < len(groups):
            named = sorted({*named, *groups[index].get("groups", [])})
    if not zero and not negligible:
        return _group_still_in_optimizer(bad, run)
    claims = ["groups_move_with_gradients", "group_lr_not_negligible",
              *[s for s, g in GROUP_SIGNALS.items() if g in named]]
    if "param_head" in named:
        claims += [*NOT_LEARNING, "probe_tracks_updates", *RESIDUAL_KNOCK_ON]
    if "residual_head" in named:
        claims += [*RESIDUAL_KNOCK_ON, "eval_residual_matches_train", "eval_flow_matches_train"]
    if "backbone" in named:
        claims += ["backbone_learning"]
    if negligible:
        parts = []
        for item in negligible:
            index = item.get("index")
            configured = groups[index].get("lr") if isinstance(index, int) and index < len(groups) else None
            at_start = f"configured lr {configured:g}, " if isinstance(configured, float) else ""
            try:
                parts.append(f"{item['name']} ({at_start}lr {item['lr_first']:g} at step 1, at most "
                             f"{item['lr_max']:.3g}: {item['ratio_median']:.2g}x the other groups' median lr, up to "
                             f"{item['others_median_max']:.3g})")
            except (KeyError, TypeError, ValueError):
                parts.append(str(item.get("name", f"param group {index}")))
        which = "; ".join(parts)
        exact = any(g.get("lr") == 0.0 for i, g in zero) or any(
            isinstance(it.get("index"), int) and it["index"] < len(groups) and groups[it["index"]].get("lr") == 0.0
            for it in negligible)
        cause_id = "group_lr_zero" if exact or zero else "group_lr_negligible"
        others = negligible[0].get("others_median_first")
        example = f"e.g. the others' {others:g}, or its intended share of it" if isinstance(others, float) else \
            "the others' or its intended share"
        cause = (f"{which}: its learning rate is negligible next to the others' (only the schedule's floor moves "
                 f"it); set that group's lr in the param-group table ({example})")
    else:
        which = ", ".join(f"param group {i} ({'/'.join(g.get('groups', [])) or 'unnamed'})" for i, g in zero)
        cause_id, cause = "group_lr_zero", (f"{which} has lr 0 while the others learn: its parameters get gradients "
                                            "but never move; give it a learning rate (the others' or its intended "
                                            "share)")
    return _diagnosis(cause_id, cause, bad, claims, "run_start optimizer_groups and train_step lr_groups",
                      "New Diagnostics: parameter deltas")


def _group_still_in_optimizer(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """Without per-group settings: some groups get gradients and never move while others do, and the
    optimizer covers every parameter (``optimizer_covers_params`` GOOD): their param group's lr is 0."""
    verdict = bad.get("groups_move_with_gradients")
    if verdict is None or "optimizer_covers_params" not in run.good:
        return []
    still = sorted(verdict.evidence.get("still_groups", []))
    with_grad = {g for g, v in verdict.evidence.items() if isinstance(v, dict) and v.get("steps_with_grad")}
    if not still or set(still) == with_grad:
        return []  # every group still: update_skipped's
    frac = ", ".join(f"{g} on {_pct(verdict.evidence.get(g, {}).get('still_with_grad_frac'))} of its steps"
                     for g in still)
    claims = ["groups_move_with_gradients", *[s for s, g in GROUP_SIGNALS.items() if g in still]]
    return _diagnosis("group_lr_zero", f"{', '.join(still)} get(s) gradients but do(es) not move ({frac}) while the "
                      "other groups move, and every parameter is in the optimizer: that param group's lr is 0 (a "
                      "per-group lr table), or its update is masked; give it a learning rate", bad, claims,
                      "grad_norm_<group> vs param_delta_<group> per train_step", "New Diagnostics: parameter deltas")


@reads("train_step.lr", "train_step.lr_groups")
def _lr_schedule_zero(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """The lr is (near) 0 on most steps although its peak is not: the schedule ends before the run."""
    verdict = bad.get("lr_not_mostly_zero")
    if verdict is None or not float(verdict.evidence.get("peak_lr") or 0) > 0:
        return []
    first = verdict.evidence.get("first_zero_step")
    return _diagnosis("lr_schedule_zero", f"the learning rate is (near) 0 on {verdict.evidence['zero_lr_frac']:.0%} of "
                      f"steps from step {first} (peak {verdict.evidence['peak_lr']:g}): the schedule is sized shorter "
                      "than the run or decays to 0; size it to epochs x steps per epoch with a floor (~0.1 x peak)",
                      bad, ("lr_not_mostly_zero", "groups_move_with_gradients", "probe_tracks_updates", *NOT_LEARNING,
                            *RESIDUAL_KNOCK_ON, *GROUP_SIGNALS),
                      "train_step lr / lr_groups", "Good vs Bad Signals: proxy and probe scores must move")


@reads("train_step.grad_norm_*", "train_step.param_delta_*", "train_step.lr")
def _update_skipped(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """Every group with a gradient stays still at a non-zero lr: the update never happens."""
    verdict = bad.get("groups_move_with_gradients")
    if verdict is None:
        return []
    still = set(verdict.evidence.get("still_groups", []))
    with_grad = {g for g, v in verdict.evidence.items() if isinstance(v, dict) and v.get("steps_with_grad")}
    lr = _numbers(_rows(run.history, "train_step"), "lr")
    if not still or still != with_grad or (len(lr) and not float(lr.max()) > 0):
        return []
    return _diagnosis("update_skipped", f"every group gets gradients but none moves ({', '.join(sorted(still))}): the "
                      "gradients are cleared (zero_grad) or replaced between backward and optimizer.step(), step() "
                      "is not called, or the optimizer holds other tensors than the model's", bad,
                      ("groups_move_with_gradients", "probe_tracks_updates", *NOT_LEARNING, *GROUP_SIGNALS,
                       *RESIDUAL_KNOCK_ON), "grad_norm_<group> vs param_delta_<group> per train_step",
                      "New Diagnostics: gradient norms and parameter deltas per group")


@reads("run_start.optimizer_groups")
def _optimizer_hparams(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """An optimizer hyperparameter far from any working value (Adam's eps, weight decay)."""
    off = []
    for index, group in enumerate(_optimizer_groups(run.history)):
        eps, decay = group.get("eps"), group.get("weight_decay")
        if isinstance(eps, float) and eps >= ADAM_EPS_MAX:
            off.append(f"eps={eps:g} in param group {index} (Adam's default 1e-8; steps shrink to ~lr x grad / eps)")
        if isinstance(decay, float) and decay >= WEIGHT_DECAY_MAX:
            off.append(f"weight_decay={decay:g} in param group {index} (AdamW's typical 1e-4 to 0.1; the weights are "
                       "pulled to 0 every step)")
    if not off:
        return []
    return _diagnosis("optimizer_hparams", "optimizer hyperparameter(s) far off: " + "; ".join(sorted(set(off))), bad,
                      ("groups_move_with_gradients", "train_val_agree", *NOT_LEARNING, *RESIDUAL_KNOCK_ON),
                      "run_start optimizer_groups", "Good vs Bad Signals")


@reads("run_start.config.loss_weights")
def _loss_weights_off(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """A loss weight orders of magnitude from the preset's (the defaults of LossWeights)."""
    from autohdr.lens.losses import LossWeights
    weights = _config(run.history).get("loss_weights")
    if not isinstance(weights, dict):
        return []
    reference = asdict(LossWeights())
    off = []
    for name, value in weights.items():
        base = reference.get(name)
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if base and value > 0 and not 1 / LOSS_WEIGHT_FACTOR < value / base < LOSS_WEIGHT_FACTOR:
            off.append(f"train.loss_weights.{name}={value:g} ({value / base:.3g}x the preset's {base:g})")
    if not off:
        return []
    return _diagnosis("loss_weights_off_preset", "loss weight(s) far from the preset's: " + "; ".join(off) + "; bring "
                      "them back within 10x of the preset's", bad,
                      ("clipping_sane", "param_head_not_saturated", "eval_residual_matches_train", "train_val_agree",
                       "loss_not_regularizer_bound", *RESIDUAL_KNOCK_ON, *NOT_LEARNING, "residual_head_learning"),
                      "run_start config.loss_weights and the loss components per train_step", "Good vs Bad Signals")


@reads("train_step.loss", "train_step.loss_parts")
def _regularizers_swamp_loss(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """The regularizer parts take most of the loss (``loss_not_regularizer_bound``): their weights are
    far too large for this loss (a config recorded with loss weights is ``_loss_weights_off``'s)."""
    verdict = bad.get("loss_not_regularizer_bound")
    if verdict is None:
        return []
    ev = verdict.evidence
    parts = ", ".join(ev.get("regularizer_parts") or ["the regularizer parts"])
    share = f"{_pct(ev.get('regularizer_share_median'))} of the total loss (median; {_pct(ev.get('regularizer_share_first'))}" \
            f" at step 1; healthy runs below 1 %, allowed {_pct(ev.get('allowed_share'))})"
    return _diagnosis("regularizer_weights_too_large",
                      f"the regularizer weights are far too large: {parts} make up {share}; the data term no longer "
                      "drives training and the residual is pinned: lower those weights (to about 1/100-1/1000 of "
                      "the data term's)", bad,
                      ("loss_not_regularizer_bound", "clipping_sane", "param_head_not_saturated", "train_val_agree",
                       "eval_residual_matches_train", "residual_head_learning", *RESIDUAL_KNOCK_ON, *NOT_LEARNING),
                      "the loss parts per train_step (loss_parts) vs loss", "Good vs Bad Signals")


@reads("loop_validation.loop_val_train_mode_forwards")
def _loop_validation_train_mode(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """The loop's own validation ran the model in train mode (``loop_validation_in_eval_mode``)."""
    verdict = bad.get("loop_validation_in_eval_mode")
    if verdict is None:
        return []
    ev = verdict.evidence
    return _diagnosis("loop_validation_train_mode",
                      f"the loop's validation ran {ev.get('train_mode_forwards')} of {ev.get('forwards')} forwards in "
                      f"train mode ({ev.get('validations_in_train_mode')} of {ev.get('validations')} validations): call "
                      "model.eval() before validating and model.train() after (dropout and batch-norm statistics "
                      "otherwise act as in training)", bad,
                      ("loop_validation_in_eval_mode", "eval_deterministic", "train_val_agree"),
                      "loop_validation records (loop_val_train_mode_forwards)", "New Diagnostics: validation probe")


@reads("train_step.weights_jump_before_epoch", "train_step.param_delta_*")
def _resume_wrong_weights(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """The weights changed between epochs with no optimizer step (``weights_continue_across_epochs``)."""
    verdict = bad.get("weights_continue_across_epochs")
    if verdict is None:
        return []
    ev = verdict.evidence
    typical, jump = ev.get("typical_step_change"), ev.get("largest_jump")
    sized = isinstance(jump, (int, float)) and isinstance(typical, (int, float)) and math.isfinite(typical) and typical > 0
    times = f", {jump / typical:.3g}x a typical step's change" if sized else ""
    by = f"changed by {jump:.4g}{times}" if isinstance(jump, (int, float)) else "changed"
    return _diagnosis("resume_wrong_weights",
                      f"the weights an epoch starts from are not those the previous epoch ended with ({by}, at the "
                      f"start of epoch(s) {ev.get('jumped_epochs', '?')}): a "
                      "resume or reload between epochs loads the wrong checkpoint (e.g. the initial weights) or an "
                      "averaged copy is swapped in and left; load the last epoch's checkpoint (last.pt), model and "
                      "optimizer state", bad,
                      ("weights_continue_across_epochs", "logged_quantities_agree", "train_val_agree",
                       "probe_tracks_updates", *NOT_LEARNING, *RESIDUAL_KNOCK_ON),
                      "train_step weights_jump_before_epoch at each epoch's first step", "Helper Scripts: resume")


@reads("train_step.params_at_bound_frac", "train_step.lr")
def _lr_saturates_head(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """The bounded parameters reach their bounds within the first quarter of the run: steps too
    large for the bounded (tanh) head."""
    if "param_head_not_saturated" not in bad:
        return []
    steps = _rows(run.history, "train_step")
    at_bound = _numbers(steps, "params_at_bound_frac")
    if not len(at_bound):
        return []
    reached = at_bound[at_bound >= SATURATED_FRAC]
    early = max(SATURATED_EARLY_STEPS, int(len(at_bound) * STEPS_EARLY_FRAC))
    position = list(at_bound.index).index(reached.index[0]) if len(reached) else None
    if position is None or position >= early or float(at_bound.iloc[0]) >= SATURATED_FRAC:
        return []  # saturated from the first step: an offset of the head, not the size of the steps
    lr = _numbers(steps, "lr")
    peak = float(lr.max()) if len(lr) else None
    versus = (f", {peak / run.reference_lr:.3g}x the preset's {run.reference_lr:g}" if peak and run.reference_lr else "")
    setting = f"lr {peak:g}{versus}" if peak else "the learning rate"
    return _diagnosis("lr_saturates_head", f"the predicted parameters reach their bounds by step {position + 1} of "
                      f"{len(at_bound)} ({setting}): the steps are too large for the bounded (tanh) head; lower the "
                      "learning rate about 10x", bad,
                      ("param_head_not_saturated", "clipping_sane", "train_val_agree", *NOT_LEARNING),
                      "train_step params_at_bound_frac and lr", "Good vs Bad Signals")


@reads("train_step.data_time_ms", "train_step.batch_time_ms")
def _data_bound(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """Data loading takes most of each step (``not_data_bound``): the loader is the bottleneck."""
    verdict = bad.get("not_data_bound")
    if verdict is None:
        return []
    ev = verdict.evidence
    data, step = ev.get("data_time_ms_median"), ev.get("batch_time_ms_median")
    timing = (f" ({data:.3g} of {step:.3g} ms per step)" if isinstance(data, float) and isinstance(step, float) else "")
    return _diagnosis("loader_bound", f"the data loader is the bottleneck: it takes {_pct(ev.get('data_time_frac_median'))}"
                      f" of each step{timing}: more DataLoader workers, persistent_workers / pin_memory, decode "
                      "smaller images or cache the decoded pairs", bad, ("not_data_bound",),
                      "train_step data_time_ms vs batch_time_ms", "Preconditions: the data pipeline")


@reads("init.init_pred_max_abs_diff", "init.init_params_max_abs_dev")
def _init_not_identity(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """The untrained model is not the identity warp (``init_is_identity``): its parameter head's
    initial output, or the warp of identity parameters."""
    verdict = bad.get("init_is_identity")
    if verdict is None:
        return []
    ev = verdict.evidence
    params = ev.get("init_params_max_abs_dev")
    tol = ev.get("float32_tolerance")
    if isinstance(params, float) and params > 1e-6:
        cause = (f"the parameter head does not start at the identity lens: its initial predictions are up to "
                 f"{params:.3g} off [0, 0, 0, 0, 0, 0, 0, 1]: zero-initialize its last layer (and set the scale's "
                 "bias so it starts at 1)")
    else:
        diff = ev.get("init_pred_max_abs_diff")
        size = f" by {diff:.3g}" if isinstance(diff, float) else ""
        limit = f" (float32 tolerance {tol:.2g})" if isinstance(tol, float) else ""
        cause = (f"the untrained model's prediction differs from the identity warp's{size}{limit} although the lens "
                 "parameters start at identity: the warp adds something at init (a residual flow that is not zero, "
                 "another grid convention such as align_corners, a resize of the input)")
    return _diagnosis("init_not_identity", cause, bad, ("init_is_identity",), "the init record (init_*)",
                      "New Diagnostics: identity at init")


@reads("train_step.params_at_bound_frac")
def _saturated_from_start(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """The bounded parameters sit at their bounds from the first step (not reached by large steps,
    ``_lr_saturates_head``'s): the head's initial output or the bounds themselves."""
    if "param_head_not_saturated" not in bad:
        return []
    at_bound = _numbers(_rows(run.history, "train_step"), "params_at_bound_frac")
    if not len(at_bound) or float(at_bound.iloc[0]) < SATURATED_FRAC:
        return []
    return _diagnosis("head_saturated_at_init", f"the predicted parameters sit at their bounds from step 1 "
                      f"({_pct(float(at_bound.iloc[0]))} at step 1, median {_pct(float(at_bound.median()))}): the "
                      "head's initial output (a bias or gain pushing its tanh to the ends) or bounds that exclude "
                      "the identity lens; check param_bounds and the head's init", bad,
                      ("param_head_not_saturated", "param_head_learning"), "train_step params_at_bound_frac",
                      "Good vs Bad Signals")


#: With ground truth, a k1 correlation at or below this says the predictions do not follow the images
#: (healthy overfit runs +0.57 to +0.76 from 8 steps on, see params_track_ground_truth).
IGNORES_INPUT_MAX_CORR = 0.2


def _ignores_input(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """The model beats identity but not its own mean lens, and (with ground truth) its k1 does not
    follow the images: it learned one lens for every image (``beats_constant_lens``)."""
    verdict = bad.get("beats_constant_lens")
    if verdict is None or "beats_identity" in bad:
        return []
    ev = verdict.evidence
    k1, delta, margin = ev.get("param_corr_k1"), ev.get("delta"), ev.get("margin")
    if isinstance(k1, (int, float)) and math.isfinite(k1) and k1 <= IGNORES_INPUT_MAX_CORR:
        follows = f", and its k1 correlates only {k1:+.2f} with the ground truth (healthy >= +0.57)"
    elif k1 is None and delta == 0.0:
        follows = " exactly (the same prediction for every image: no correlation with anything)"
    else:
        return []  # no ground truth to tell, or the predictions do follow the images: not this cause
    versus = (f" (model - its mean lens {delta:+.4f}, needs +{margin:g})"
              if isinstance(delta, float) and isinstance(margin, float) else "")
    return _diagnosis("ignores_input", f"the model predicts about one lens for every image: it beats identity but "
                      f"not its own mean lens{versus}{follows}: the parameter head does not see per-image features "
                      "(features averaged "
                      "over the batch, constant or detached features, a frozen backbone)", bad,
                      ("beats_constant_lens", "params_track_ground_truth"),
                      "val_epoch constant_lens_proxy_total vs val_proxy_total; pred_gt_corr_k1",
                      "Debug Modes: overfit stage 1 must beat its own mean lens")


def _ranks_unsynced(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """Ranks hold different parameters (``ranks_in_sync``)."""
    verdict = bad.get("ranks_in_sync")
    if verdict is None:
        return []
    first = (verdict.evidence.get("diverged") or [{}])[0]
    where = f" from epoch {first.get('epoch')} ({first.get('field')})" if first else ""
    return _diagnosis("ranks_unsynced", f"the ranks train different models{where}: per-rank state is not "
                      "synchronized (batch-norm buffers with broadcast_buffers=False, a parameter updated outside "
                      "DDP, a rank-dependent seed inside the model)", bad, ("ranks_in_sync", "eval_deterministic"),
                      "val_epoch rank_param_checksums / rank_probe_checksums", "Helper Scripts: distributed runs")


@reads("train_step.residual_to_param_disp_ratio_mean", "train_step.residual_contrib_px_mean")
def _residual_wrong_units(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """The residual moves but is a negligible fraction of the parametric displacement."""
    verdict = bad.get("residual_contributes")
    if verdict is None:
        return []
    ev = verdict.evidence
    ratio, floor = ev.get("late_ratio_to_param"), ev.get("min_ratio")
    moving = ev.get("late_median_px")
    if not (isinstance(ratio, float) and isinstance(floor, float) and ratio < floor and ratio > 0):
        return []
    px = f"{moving:.3g} px, " if isinstance(moving, float) else ""
    return _diagnosis("residual_wrong_units", f"the residual moves but only by {px}{ratio:.2%} of the parametric "
                      f"displacement (floor {floor:.1%}): its flow is in the wrong units (normalized coordinates "
                      "where pixels of the low-resolution grid are expected) or scaled down", bad,
                      ("residual_contributes", "residual_not_inactive", "residual_helps"),
                      "train_step residual_to_param_disp_ratio_mean", "Debug Modes: stage 2 residual probe")


@reads("val_epoch.val_batch_fingerprint")
def _val_random(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """Validation scores different data each epoch (``val_batches_repeat``)."""
    verdict = bad.get("val_batches_repeat")
    if verdict is None:
        return []
    return _diagnosis("val_random", f"validation is not the same each epoch: {verdict.detail}; switch augmentation and "
                      "shuffling off in the validation loader", bad,
                      ("val_batches_repeat", "scores_move", "train_val_agree", "params_track_ground_truth",
                       *BASELINE_SIGNALS), "val_epoch val_batch_fingerprint", "New Diagnostics: validation probe")


@reads("val_epoch.val_loss", "val_epoch.train_epoch_loss_mean", "val_epoch.pred_gt_corr_k1")
def _train_val_disagree(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """Training and validation see the same samples and disagree (``train_val_agree``): validation
    worse -> the eval path is another model; training worse -> training's inputs or targets are
    changed, mispaired when the predictions also anti-correlate with the ground truth."""
    verdict = bad.get("train_val_agree")
    if verdict is None:
        return []
    ratio = float(verdict.evidence.get("ratio", 1.0))
    claims = ("train_val_agree", "params_track_ground_truth", "probe_tracks_updates", "scores_move", "loss_decreases",
              *BASELINE_SIGNALS)
    look = "val_epoch val_loss vs train_epoch_loss_mean (the same samples)"
    if ratio > 1:
        return _diagnosis("eval_differs_from_train", f"evaluation runs a different model than training: {verdict.detail}"
                          " (an EMA or cached copy, normalization statistics, an eval-only branch)", bad, claims, look,
                          "Good vs Bad Signals")
    wrong_lens = bad.get("params_track_ground_truth")
    if wrong_lens is not None:
        return _diagnosis("train_pairs_mismatched", f"training targets do not belong to their inputs: {verdict.detail}"
                          f", and {wrong_lens.detail} (validation pairs are right)", bad, claims, look,
                          "Preconditions: the dataset and the inputs it yields")
    return _diagnosis("train_augmentation_mismatch", f"training inputs and targets are transformed differently from "
                      f"validation's: {verdict.detail} (a geometric augmentation on one side of the pair, or a "
                      "normalization only in training)", bad, claims, look, "Preconditions: the dataset")


@reads("val_epoch.pred_gt_corr_k1", "val_epoch.pred_gt_corr_s")
def _wrong_lens(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """Predictions anti-correlated with ground truth while nothing else explains it."""
    verdict = bad.get("params_track_ground_truth")
    if verdict is None:
        return []
    return _diagnosis("wrong_lens", f"the model learns another lens than the data's: {verdict.detail} (a sign or axis "
                      "convention of the loss or the targets)", bad, ("params_track_ground_truth", *BASELINE_SIGNALS),
                      "val_epoch pred_gt_corr_*", "Debug Modes: overfit stage 1")


@reads("train_step.grad_norm_total", "train_step.grad_norm_*", "init.identity_loss")
def _metric_wiring(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """Logged figures contradict each other (``logged_quantities_agree``) and no setting explains it."""
    verdict = bad.get("logged_quantities_agree")
    if verdict is None:
        return []
    return _diagnosis("metric_wiring", f"the loop logs figures that are not this step's: {verdict.detail}; pass the "
                      "norm clip_grad_norm_ returns after backward, and the loss that was backpropagated", bad,
                      ("logged_quantities_agree",), "train_step grad_norm_total vs grad_norm_<group>; loss vs init",
                      "New Diagnostics: gradient norms")


for _rule, _keys in {"_data_out_of_range": ("train_step.batch_nonfinite", "train_step.batch_min", "train_step.batch_max",
                                             "train_step.batch_bad_sample"),
                     "_learning_rate_zero": ("train_step.lr", "run_start.config.lr"),
                     "_clip_too_tight": ("run_start.config.grad_clip_norm", "train_step.grad_norm_total"),
                     "_frozen_group": ("train_step.grad_norm_*",),
                     "_eval_differs": ("val_epoch.probe_pred_checksum", "val_epoch.probe_flow_cosine_train_eval")}.items():
    RULE_READS.setdefault(_rule, _keys)

RULES: tuple[Rule, ...] = (_data_out_of_range, _pairs_mismatched, _batch_repeats, _loss_summed, _learning_rate_zero,
                           _lr_schedule_zero, _group_lr_zero, _update_skipped, _optimizer_hparams, _loss_weights_off,
                           _regularizers_swamp_loss, _loop_validation_train_mode, _resume_wrong_weights, _diverged,
                           _lr_saturates_head, _clip_too_tight, _frozen_group, _optimizer_mismatch,
                           _val_random, _eval_differs, _train_val_disagree, _residual_hurts, _ignores_input,
                           _wrong_lens, _metric_wiring, _data_bound, _init_not_identity, _saturated_from_start,
                           _ranks_unsynced, _residual_wrong_units)


def diagnose(verdicts: list[Verdict], history: pd.DataFrame, *, reference_lr: float | None = None) -> list[Diagnosis]:
    """The likely causes of a run's BAD verdicts, most fundamental first.

    ``history`` is the metric history the verdicts came from (``read_metrics``); ``reference_lr``
    is the learning rate the mode's preset uses (a peak at or below ``TINY_LR_FRACTION`` of it is
    absurdly small; without it, ``TINY_LR_ABSOLUTE``). Each BAD signal appears in exactly one
    diagnosis; those no rule explains come last under ``unexplained``.
    """
    bad = {v.signal: v for v in verdicts if v.ok is False}
    good = frozenset(v.signal for v in verdicts if v.ok is True)
    run = RunFacts(history, good, reference_lr)
    out: list[Diagnosis] = []
    for rule in RULES:
        if not bad:
            break
        for item in rule(bad, run):
            out.append(item)
            for name in item.signals:
                bad.pop(name, None)
    if bad:
        out.append(Diagnosis("unexplained", "no common cause found: each signal's own detail says what it saw",
                             tuple(bad), "the verdict details above", "Good vs Bad Signals"))
    return out


def format_diagnoses(diagnoses: list[Diagnosis]) -> str:
    """The "likely cause" section printed after the verdict table ("" when nothing is BAD)."""
    if not diagnoses:
        return ""
    lines = ["likely cause" + ("s" if len(diagnoses) > 1 else "")]
    for item in diagnoses:
        lines.append(f"- {item.cause}")
        lines.append(f"  explains: {', '.join(item.signals)}")
        lines.append(f"  look at: {item.look_at}; runbook: {item.runbook}")
    return "\n".join(lines)
