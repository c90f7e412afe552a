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
    sample = _first(verdict.evidence, "sample_id", "sample_ids", "first_sample_id", "image_id", "image_ids")
    where = f", sample {sample}" if sample is not None else ""
    claims = ("batches_in_range", "finite", "clipping_sane", "loss_decreases", "param_head_not_saturated")
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
    config_lr = _config(run.history).get("lr")
    reference_lr = run.reference_lr
    peak = float(step_lr.max()) if len(step_lr) else (float(config_lr) if config_lr is not None else None)
    if peak is None:
        return []
    setting = f"train.lr={config_lr!r}" if config_lr is not None else f"the optimizer's lr peaked at {peak:g}"
    claims = ["scores_move", "probe_checksums_change", "loss_decreases", *BASELINE_SIGNALS]
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
                   "loss_decreases", "scores_move", "probe_checksums_change", *BASELINE_SIGNALS)
    return _diagnosis("diverged", f"training diverged on clean inputs: {setting} too high, or a loss term that "
                      "divides by or takes the log of 0", bad, claims,
                      "train_step loss and grad_norm_total before the first non-finite step",
                      "Good vs Bad Signals")


def _clip_too_tight(bad: dict[str, Verdict], run: RunFacts) -> list[Diagnosis]:
    """Clipping on most steps because the clip norm sits far below the typical gradient norm."""
    clip = _config(run.history).get("grad_clip_norm")
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


RULES: tuple[Rule, ...] = (_data_out_of_range, _pairs_mismatched, _batch_repeats, _learning_rate_zero, _diverged,
                           _clip_too_tight, _frozen_group, _optimizer_mismatch, _eval_differs, _residual_hurts)


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
