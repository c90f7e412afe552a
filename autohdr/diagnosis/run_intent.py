"""What a run is, recorded in its ``run_start``, and the judge settings that follow from it.

A run written by autohdr's debug modes has a ``report.json`` holding its mode and judge config. A
run written by a loop of the user's own (``autohdr.attach`` or the hooks) has only
``metrics.jsonl``: its ``run_start`` records ``intent`` (``overfit``: train == val, the model must
learn each image's lens; ``probe``: a short check of the branches; ``training``: a real run) and,
when given, ``judge_config``. ``autohdr judge`` uses them, so an overfit-only check is never judged
on a probe or a training run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd

from autohdr.diagnosis.verdicts import OVERFIT_MIN_EPOCHS, JudgeConfig

INTENTS: tuple[str, ...] = ("overfit", "probe", "training")

#: files whose presence means a folder already holds a run
RUN_FILES: tuple[str, ...] = ("metrics.jsonl", "report.json")


class ExistingRunError(FileExistsError):
    """A new run was pointed at a folder that already holds one (its log would be lost)."""


def refuse_existing_run(folder: str | Path) -> None:
    """Raise :class:`ExistingRunError` when ``folder`` already holds a run's files.

    The message is the one ``autohdr debug`` gives for ``--out``, in the API's terms.
    """
    folder = Path(folder)
    present = [name for name in RUN_FILES if (folder / name).exists()]
    if present:
        raise ExistingRunError(
            f"run folder {folder} already holds a run ({', '.join(present)}): a folder holds one run, so give a "
            f"new run folder, or continue that run with resume_step=N (the step its checkpoint was saved at)")


def check_intent(intent: str) -> str:
    if intent not in INTENTS:
        raise ValueError(f"intent must be one of {', '.join(INTENTS)}; got {intent!r}")
    return intent


def recorded_run_info(history: pd.DataFrame) -> dict[str, Any]:
    """``intent`` and ``judge_config`` of the run's last ``run_start`` (empty when not recorded)."""
    if "kind" not in history.columns:
        return {}
    start = history[history["kind"] == "run_start"]
    if start.empty:
        return {}
    row = start.iloc[-1]
    info: dict[str, Any] = {}
    intent = row.get("intent")
    if isinstance(intent, str):
        info["intent"] = intent
    judge_config = row.get("judge_config")
    if isinstance(judge_config, dict):
        info["judge_config"] = judge_config
    return info


def judge_config_for(history: pd.DataFrame, base: JudgeConfig | None = None) -> JudgeConfig:
    """The judge config a run recorded (thresholds it names, ``base`` for the rest), with the
    overfit-only checks required only when its intent is ``overfit``."""
    cfg = base or JudgeConfig()
    info = recorded_run_info(history)
    known = {f.name for f in dataclasses.fields(JudgeConfig)}
    recorded = {k: v for k, v in info.get("judge_config", {}).items() if k in known}
    if recorded:
        cfg = dataclasses.replace(cfg, **recorded)
    intent = info.get("intent")
    if intent is not None and "require_beats_constant_lens" not in recorded:
        cfg = dataclasses.replace(cfg, require_beats_constant_lens=intent == "overfit")
    if intent == "overfit" and "overfit_min_epochs" not in recorded:
        cfg = dataclasses.replace(cfg, overfit_min_epochs=OVERFIT_MIN_EPOCHS)
    return cfg
