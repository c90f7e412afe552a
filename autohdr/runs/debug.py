"""The runbook's debug modes as one call: data, model, training, verdicts, report.

``run_debug_mode("stage2_probe")`` trains on the embedded fixture data (or ``data_root``), judges
every signal from the run's own ``metrics.jsonl`` and writes, under ``out_dir``:
``report.json``, ``report.html`` (the same report as one self-contained page with the figures),
``metrics.jsonl``, ``curves.png``, ``triplets.png``, the split CSVs and the checkpoints. Custom
``model`` / loaders plug into the same path, which is how the diagnostic suite injects faults.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler

from autohdr import data as data_mod
from autohdr.training.config import stage_spec, to_dict
from autohdr.training.distributed import SINGLE, DistContext, barrier, init_distributed, shutdown
from autohdr.training import run_folder
from autohdr.diagnosis.metrics_log import read_metrics
from autohdr.lens.model import LensCorrectionModel, ModelConfig
from autohdr.runs.presets import DataPreset, DebugPreset, load_preset, override_preset
from autohdr.data.settings import DataSettings, default_fixture_root, ensure_kmp_duplicate_lib_ok
from autohdr.data.dataset import DecodedImages
from autohdr.data.split_files import check_replaceable, write_owned_files
from autohdr.training.trainer import NonFiniteLossError, Trainer
from autohdr.diagnosis.verdicts import SIGNALS, Verdict, all_good, interruption, judge, numeric_history
from autohdr.diagnosis.causes import diagnose

#: Environment variables that override a preset's ``[data]`` table, and the field each sets.
ENV_TO_DATA_FIELD = {
    "AUTOHDR_BATCH_SIZE": "batch_size",
    "AUTOHDR_NUM_WORKERS": "num_workers",
    "AUTOHDR_RESIZE_HW": "resize_hw",
    "AUTOHDR_MAX_PAIRS": "num_pairs",
    "AUTOHDR_VAL_FRAC": "val_frac",
    "AUTOHDR_SPLIT_SEED": "split_seed",
    "AUTOHDR_GROUP_REGEX": "group_regex",
}
#: The split CSVs a run writes into ``AUTOHDR_SPLIT_DIR`` (default: the run folder).
SPLIT_FILES: tuple[str, str] = ("train_split.csv", "val_split.csv")
#: Memory for decoded training and validation images of a debug run (64 pairs at 192 px take 57 MB):
#: a subset trained for 120 epochs is decoded once instead of every epoch. Past it, images are decoded
#: on each use as before.
DECODED_IMAGES_MAX_BYTES = 1 << 30


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is a usage error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for but CUDA is not available here")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return torch.device(device)


def load_model_factory(spec: str) -> Callable[[], nn.Module]:
    """Resolve ``MODULE:FUNCTION`` to a callable returning an ``nn.Module``."""
    if ":" not in spec:
        raise ValueError(f"--model-factory must look like MODULE:FUNCTION, got {spec!r}")
    module_name, func_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model-factory: cannot import module {module_name!r} ({exc})") from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ValueError(f"--model-factory: {module_name!r} has no callable {func_name!r}")
    return factory


def build_model(factory_spec: str | None, config: ModelConfig) -> nn.Module:
    """``LensCorrectionModel(config)``, or the user's factory; its failures become a ``ValueError``."""
    if not factory_spec:
        return LensCorrectionModel(config)
    factory = load_model_factory(factory_spec)
    try:
        model = factory()
    except Exception as exc:
        raise ValueError(f"--model-factory {factory_spec} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model-factory {factory_spec} returned {type(model).__name__}, "
                         f"expected a torch.nn.Module")
    return model


def data_preset_from_env(preset: DataPreset, environ=os.environ) -> DataPreset:
    """Apply the ``AUTOHDR_*`` variables that are set to a preset's ``[data]`` table.

    They win over the preset file; ``--set data.*`` wins over them (see :func:`run_debug_mode`).
    ``AUTOHDR_MAX_PAIRS`` caps ``num_pairs``. ``AUTOHDR_RESIZE_HW=none`` (full size) is refused:
    a batch needs one image size.
    """
    settings = DataSettings.from_env(environ)
    changes = {}
    for var, name in ENV_TO_DATA_FIELD.items():
        if not environ.get(var, "").strip():
            continue
        if name == "num_pairs":
            changes[name] = min(preset.num_pairs, settings.max_pairs)
        elif name == "resize_hw":
            if settings.resize_hw is None:
                raise ValueError(f"{var}=none (full-size images) is not supported by the debug modes: a batch "
                                 f"needs one image size; give 'H,W', e.g. '256,256'")
            changes[name] = tuple(settings.resize_hw)
        else:
            changes[name] = getattr(settings, name)
    return dataclasses.replace(preset, **changes) if changes else preset


def resolve_preset(mode: str, overrides: list[str] | dict[str, Any] | None = None,
                   environ=os.environ) -> DebugPreset:
    """The configuration a run uses. Precedence: the preset file < ``AUTOHDR_*`` < ``overrides`` (``--set``)."""
    base = load_preset(mode)
    return override_preset(dataclasses.replace(base, data=data_preset_from_env(base.data, environ)), overrides)


def select_rows(data_root: Path, preset: DataPreset) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The train and validation rows of a debug run (identical when ``preset.overfit``)."""
    train_rows, val_rows, _ = select_rows_counted(data_root, preset)
    return train_rows, val_rows


def select_rows_counted(data_root: Path, preset: DataPreset) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """:func:`select_rows` and the pairs it really used: ``{"asked", "found", "used", "train", "val",
    "note"}`` (``note``: one line when fewer pairs were found than ``data.num_pairs`` asks, else ``None``)."""
    rows = data_mod.scan_pairs(data_root)
    found = len(rows)
    if preset.shuffle_pairs:
        rows = rows.sample(frac=1.0, random_state=preset.split_seed).reset_index(drop=True)
    rows = rows.iloc[: preset.num_pairs].reset_index(drop=True)
    data_mod.validate_pairs(rows)
    if preset.overfit:
        train_rows, val_rows = rows, rows.copy()
    else:
        train_rows, val_rows = data_mod.train_val_split(rows, preset.val_frac, preset.split_seed, preset.group_regex)
    counts = {"asked": int(preset.num_pairs), "found": found, "used": len(rows), "train": len(train_rows),
              "val": len(val_rows), "overfit": bool(preset.overfit),
              "note": data_mod.fewer_pairs_notice(preset.num_pairs, found, len(rows), data_root)}
    return train_rows, val_rows, counts


def build_loaders(train_rows: pd.DataFrame, val_rows: pd.DataFrame, preset: DataPreset, seed: int,
                  dist_ctx: DistContext = SINGLE) -> tuple[DataLoader, DataLoader]:
    """Train loader (seeded per-epoch shuffle, sharded across ranks) and a fixed-order val loader."""
    # a debug subset is decoded once and kept (the overfit modes' train and val sets share it)
    decoded = DecodedImages(DECODED_IMAGES_MAX_BYTES)
    train_set = data_mod.PairDataset(train_rows, resize_hw=tuple(preset.resize_hw), hflip=preset.hflip, seed=seed,
                                     decoded=decoded)
    val_set = data_mod.PairDataset(val_rows, resize_hw=tuple(preset.resize_hw), hflip=False, seed=seed,
                                   decoded=decoded)
    sampler = DistributedSampler(train_set, num_replicas=dist_ctx.world_size, rank=dist_ctx.rank,
                                 shuffle=True, seed=seed, drop_last=dist_ctx.enabled)
    # Workers are not persistent when flips are on: the dataset's per-epoch flip seed (set_epoch)
    # reaches worker processes only when they are started anew each epoch.
    common = {"num_workers": preset.num_workers,
              "persistent_workers": preset.num_workers > 0 and not preset.hflip}
    train_loader = DataLoader(train_set, batch_size=preset.batch_size, sampler=sampler, **common)
    val_loader = DataLoader(val_set, batch_size=preset.batch_size, shuffle=False, **common)
    return train_loader, val_loader


def load_ground_truth(data_root: Path) -> dict[str, torch.Tensor] | None:
    """``ground_truth.csv`` beside or inside the data root, as ``image_id -> (8,)`` parameters."""
    for candidate in (data_root / "ground_truth.csv", data_root.parent / "ground_truth.csv"):
        if candidate.is_file():
            frame = pd.read_csv(candidate)
            cols = ["k1", "k2", "k3", "p1", "p2", "dcx", "dcy", "s"]
            missing = [c for c in ["image_id", *cols] if c not in frame.columns]
            if missing:
                raise ValueError(f"{candidate} is missing columns {missing}")
            return {str(r.image_id): torch.tensor([getattr(r, c) for c in cols], dtype=torch.float32)
                    for r in frame.itertuples()}
    return None


def preset_reference_lr(mode: str | Path | None, stage: str | None = None) -> float | None:
    """The peak optimizer learning rate ``mode``'s preset file sets (before ``--set``), at ``stage``'s
    lr_scale; ``None`` when ``mode`` is not a preset (the reference for "absurdly small")."""
    try:
        train = load_preset(mode).train if mode else None
        scale = stage_spec(stage).lr_scale if stage else train.spec.lr_scale if train else 1.0
    except ValueError:
        return None
    return train.lr * scale if train else None


#: Signals decided by the first steps, and where each is decided (fail fast: judged there, a BAD one
#: stops the run). ``init``: the init check before any step; ``step``: after step 1..3 (a group
#: signal needs the third: with zero-initialized heads the backbone's first gradient is exactly 0,
#: so one zero step in three is healthy); ``validation``: after the first validation (the only
#: records holding the repeated probe and the ground-truth baseline).
EARLY_SIGNALS: dict[tuple[str, int], tuple[str, ...]] = {
    ("init", 0): ("init_is_identity",),
    ("step", 1): ("batches_in_range",),
    ("step", 2): ("batches_in_range", "optimizer_covers_params"),
    ("step", 3): ("batches_in_range", "optimizer_covers_params", "param_head_learning", "backbone_learning",
                  "residual_head_learning", "groups_move_with_gradients"),
    ("validation", 0): ("eval_deterministic", "pairs_match_ground_truth"),
}


#: Signals that read a group's gradients and updates. A run whose first steps throw the parameters to
#: their bounds (or blow the loss up) passes no gradient through its saturated heads: that is the
#: divergence seen from the groups, not a frozen group, so fail fast leaves these to the end of the run.
GROUP_EARLY_SIGNALS: tuple[str, ...] = ("param_head_learning", "backbone_learning", "residual_head_learning",
                                        "groups_move_with_gradients")
#: Evidence of a run diverging in its first steps: the predicted parameters at their bounds on at
#: least this fraction (the ``lr_saturates_head`` cause's threshold) after a first step below it ...
DIVERGING_AT_BOUND_FRAC = 0.5
#: ... or the training loss this many times its first step's (healthy runs fall from step 1; an
#: ``lr=1e6`` run multiplies it by 6 in one step).
DIVERGING_LOSS_RATIO = 3.0


def diverging_evidence(history: pd.DataFrame) -> str | None:
    """One line naming how the run's first steps diverge (``None`` when they do not): the parameters
    thrown to their bounds after step 1, or the loss multiplied since step 1."""
    if "kind" not in history:
        return None
    steps = history[history["kind"] == "train_step"]
    if "step" in steps:
        steps = steps.sort_values("step")
    if len(steps) < 2:
        return None
    first, later = steps.iloc[0], steps.iloc[1:]
    step_of = (lambda i: int(later["step"].loc[i])) if "step" in later else (lambda i: None)
    if "params_at_bound_frac" in steps:
        at_bound = pd.to_numeric(steps["params_at_bound_frac"], errors="coerce")
        start, rest = at_bound.iloc[0], at_bound.iloc[1:]
        reached = rest[rest >= DIVERGING_AT_BOUND_FRAC]
        if pd.notna(start) and start < DIVERGING_AT_BOUND_FRAC and len(reached):
            return (f"{float(reached.iloc[0]):.0%} of the predicted parameters at their bounds by step "
                    f"{step_of(reached.index[0])} ({float(start):.0%} at step {int(first.get('step', 1))})")
    if "loss" in steps:
        loss = pd.to_numeric(steps["loss"], errors="coerce")
        start, rest = loss.iloc[0], loss.iloc[1:]
        jumped = rest[rest > DIVERGING_LOSS_RATIO * start] if pd.notna(start) and start > 0 else rest.iloc[0:0]
        if len(jumped):
            return (f"the loss rose from {float(start):.4g} at step 1 to {float(jumped.iloc[0]):.4g} by step "
                    f"{step_of(jumped.index[0])}")
    return None


class StructuralFaultError(RuntimeError):
    """A signal decided by the first steps is BAD: the run stops there (``--no-fail-fast`` trains on)."""

    def __init__(self, verdicts: list[Verdict], point: str, step: int) -> None:
        self.verdicts, self.point, self.step = verdicts, point, step
        where = "at the init check" if point == "init" else (
            f"after step {step}" if point == "step" else f"at the first validation (step {step})")
        super().__init__(f"stopped early {where}: " + "; ".join(f"{v.signal}: {v.detail}" for v in verdicts)
                         + " (structural fault; pass --no-fail-fast to train on)")


class FailFast:
    """``Trainer.early_check``: judges :data:`EARLY_SIGNALS` on the records written so far.

    The history is the run's own ``metrics.jsonl`` as it stands (every record is flushed when
    written), plus the optimizer coverage so far as a provisional ``run_end`` for
    ``optimizer_covers_params``; the verdict functions are the ones the final judgement uses.
    """

    def __init__(self, out_dir: Path, judge_config, trainer_ref: Callable[[], Any]) -> None:
        self.out_dir, self.judge_config, self._trainer = out_dir, judge_config, trainer_ref
        self._validated = False
        self.checked: list[dict[str, Any]] = []  # each check: point, step, seconds it took
        self.deferred: list[dict[str, Any]] = []  # checks whose group signals a diverging run left to the end

    def __call__(self, point: str, step: int) -> None:
        if point == "validation":
            if self._validated:
                return
            self._validated = True
            key = ("validation", 0)
        else:
            key = (point, step)
        names = [n for n in EARLY_SIGNALS.get(key, ()) if n in SIGNALS]
        if not names:
            return
        started = time.perf_counter()
        history = read_metrics(self.out_dir)
        if any(n in GROUP_EARLY_SIGNALS for n in names):
            evidence = diverging_evidence(numeric_history(history))
            if evidence is not None:
                # Saturated heads pass no gradient: the group signals would blame a frozen group for what
                # is a too-high learning rate. Train on: a blow-up stops the run at its first non-finite
                # step (named diverged, lr too high); a run that stays finite is judged at its end.
                names = [n for n in names if n not in GROUP_EARLY_SIGNALS]
                self.deferred.append({"point": point, "step": step, "signals": list(GROUP_EARLY_SIGNALS),
                                      "evidence": evidence})
                self._info(f"fail fast: the run is diverging ({evidence}): too high a learning rate, not a "
                           f"frozen group; the group signals are judged at the end of the run")
        coverage = self._trainer().optimizer_coverage() if "optimizer_covers_params" in names else None
        if coverage is not None:
            history = pd.concat([history, pd.DataFrame([{"kind": "run_end", "optimizer_coverage": coverage}])],
                                ignore_index=True)
        bad = [v for v in map(functools.partial(self._verdict, numeric_history(history)), names) if v.ok is False]
        self.checked.append({"point": point, "step": step, "seconds": time.perf_counter() - started})
        if bad:
            raise StructuralFaultError(bad, point, step)

    def _info(self, message: str) -> None:
        trainer = self._trainer()
        if trainer is not None and hasattr(trainer, "info"):
            trainer.info(message)

    def _verdict(self, history: pd.DataFrame, name: str) -> Verdict:
        """The signal's own verdict function (as :func:`judge` calls it); a failure is not a BAD."""
        try:
            with np.errstate(all="ignore"):
                return SIGNALS[name](history, self.judge_config)
        except Exception as exc:  # noqa: BLE001 -- an undecidable signal must not stop a healthy run
            return Verdict(name, None, f"not judged early: {type(exc).__name__}: {exc}")


def default_out_dir(mode: str) -> Path:
    return Path("runs") / f"{Path(mode).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_debug_mode(
    mode: str,
    *,
    model: nn.Module | None = None,
    train_loader: Iterable[Mapping] | None = None,
    val_loader: Iterable[Mapping] | None = None,
    data_root: str | Path | None = None,
    out_dir: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    overrides: list[str] | dict[str, Any] | None = None,
    epochs: int | None = None,
    model_factory: str | None = None,
    init_from: str | Path | None = None,
    resume_from: str | Path | None = None,
    plots: bool = True,
    log: Callable[[str], None] | None = None,
    groups: Mapping[str, Any] | None = None,
    on_verdict: Callable[[dict[str, Any]], None] | None = None,
    fail_fast: bool = True,
) -> dict[str, Any]:
    """Run one debug mode end to end and return its report (also written to ``report.json``).

    ``mode`` is ``overfit_stage1``, ``stage2_probe``, ``stage3_probe`` or a preset ``.toml`` path.
    Passing ``model`` or loaders replaces the built-in ones (loaders yield dicts with
    ``input_image`` / ``target_image`` ``(B, 3, H, W)``). ``groups`` names the parameter groups
    (``{"backbone": "net.encoder", ...}``, see :func:`~autohdr.diagnosis.instrumentation.parameter_groups`).
    ``on_verdict(report)`` is called as soon as the verdicts are judged and ``report.json`` is
    written, before the figures and ``report.html`` (the command line prints the verdict table
    there). ``ValueError`` means bad usage or input.

    ``fail_fast`` (the default; single process only): the signals of :data:`EARLY_SIGNALS` are
    judged where they are decided, and a BAD one stops the run at once (``report["error"]`` says
    where and why, ``report["stopped_early"]`` has the point, the step and the seconds since the
    start); the final judgement then covers what ran.

    The seconds each part took are written to ``timings.json`` last (``started_unix``, ``parts_s``:
    ``setup``, ``init_check``, ``training``, ``validation``, ``checkpoints``, ``fail_fast`` (its
    checks), ``judging``,
    ``report_json``, ``plots``, ``report_html``) and returned under ``report["timings"]``
    (``scripts/bench_verdict.py`` reads them).
    """
    ensure_kmp_duplicate_lib_ok()
    started = time.perf_counter()
    started_unix = time.time()
    parts: dict[str, float] = {}
    clock = [started]

    def lap(part: str) -> None:
        now = time.perf_counter()
        parts[part] = parts.get(part, 0.0) + now - clock[0]
        clock[0] = now
    extra = dict(overrides) if isinstance(overrides, dict) else list(overrides or [])
    preset = resolve_preset(mode, extra)
    train_cfg = dataclasses.replace(preset.train, seed=seed, **({"epochs": epochs} if epochs is not None else {}))
    data_preset = preset.data
    torch_device = resolve_device(device)
    dist_ctx = init_distributed(torch_device)
    folder_lock = None
    try:
        if dist_ctx.enabled and torch_device.type == "cuda":
            torch_device = torch.device("cuda", dist_ctx.local_rank)
        out = Path(out_dir) if out_dir else default_out_dir(mode)

        root = Path(data_root) if data_root else Path(os.environ.get("AUTOHDR_DATA_ROOT") or default_fixture_root())
        ground_truth = None
        pair_counts: dict[str, Any] | None = None  # the pairs the run really used (its own data only)
        uses_data_root = train_loader is None or val_loader is None
        if uses_data_root:
            split_dir = Path(os.environ.get("AUTOHDR_SPLIT_DIR") or out)
            data_mod.ensure_outside_data_root(out, root, "--out")
            data_mod.ensure_outside_data_root(split_dir, root, "AUTOHDR_SPLIT_DIR")
            # Refused on every rank, before any work, when a split there was not written by autohdr.
            check_replaceable(split_dir, SPLIT_FILES)
            train_rows, val_rows, pair_counts = select_rows_counted(root, data_preset)
            if pair_counts["note"] and dist_ctx.is_main:
                warnings.warn(pair_counts["note"], data_mod.DataNotice, stacklevel=2)
        # One run per folder (README "Run folders"): taken once the inputs are known to be good,
        # before anything is written to the folder; released on every way out below.
        folder_lock = run_folder.claim_on_main(out, resume=resume_from is not None, dist_ctx=dist_ctx, log=log)
        if uses_data_root:
            if dist_ctx.is_main:
                write_owned_files(split_dir, dict(zip(SPLIT_FILES, map(data_mod.split_csv_text,
                                                                        (train_rows, val_rows)))))
            built_train, built_val = build_loaders(train_rows, val_rows, data_preset, seed, dist_ctx)
            train_loader = built_train if train_loader is None else train_loader
            val_loader = built_val if val_loader is None else val_loader
        if root.is_dir():
            # Ground truth is matched by image_id, so it also serves loaders the caller built from this root.
            ground_truth = load_ground_truth(root)

        torch.manual_seed(seed)  # before the model is built: its initial weights depend on the seed
        if model is None:
            model = build_model(model_factory, preset.model)
        model = model.to(torch_device)
        if dist_ctx.enabled:
            # torch 2.13 deprecates the broadcast_buffers argument but keeps it as the only way to keep
            # buffers rank-local; pass it only to switch the default broadcast off.
            buffer_kwargs = {} if train_cfg.ddp_broadcast_buffers else {"broadcast_buffers": False}
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[dist_ctx.local_rank] if torch_device.type == "cuda" else None,
                # stage 1 leaves the residual head out of the loss: DDP must not wait for its gradients
                find_unused_parameters=not train_cfg.spec.residual_active, **buffer_kwargs)

        early = FailFast(out, preset.judge, lambda: trainer) if fail_fast and not dist_ctx.enabled else None
        trainer = Trainer(model, train_cfg, train_loader, val_loader, out_dir=out, device=torch_device,
                          ground_truth=ground_truth, dist_ctx=dist_ctx, log=log, groups=groups, early_check=early)
        trainer.hooks.run_info = {"mode": preset.mode, "judge_config": to_dict(preset.judge),
                                  "intent": "overfit" if preset.judge.require_beats_constant_lens else "probe"}
        error, stopped_early = None, None
        lap("setup")
        try:
            result = trainer.fit(init_from=init_from, resume_from=resume_from)
            interrupted = result.interrupted
        except NonFiniteLossError as exc:
            error, interrupted = str(exc), False
        except StructuralFaultError as exc:
            error, interrupted = str(exc), False
            stopped_early = {"point": exc.point, "step": exc.step, "signals": [v.signal for v in exc.verdicts],
                             "after_s": time.perf_counter() - started}
        lap("fit")
        fit_parts = {k: v for k, v in trainer.timings.items() if k != "fit"}
        if early is not None:  # the checks run inside training steps and validations: counted apart
            fit_parts["fail_fast"] = sum(check["seconds"] for check in early.checked)
        parts.update(fit_parts, training=max(0.0, parts.pop("fit") - sum(fit_parts.values())))
        report: dict[str, Any] = {}
        if dist_ctx.is_main:
            history = read_metrics(out)
            verdicts = judge(history, preset.judge)
            diagnoses = diagnose(verdicts, history, reference_lr=preset_reference_lr(mode, train_cfg.stage))
            lap("judging")
            report = {
                "mode": preset.mode,
                "runbook_name": preset.runbook_name,
                "stage": train_cfg.stage,
                "all_good": all_good(verdicts) and error is None and not interrupted,
                "error": error,
                "stopped_early": stopped_early,
                "interrupted": interrupted,
                # the headline: INTERRUPTED (judged on what it ran, see interrupted_at), ALL GOOD or BAD SIGNALS
                "status": "INTERRUPTED" if interrupted else "ALL GOOD" if all_good(verdicts) and error is None
                else "BAD SIGNALS",
                "interrupted_at": interruption(history) if interrupted else None,
                "verdicts": [v.to_dict() for v in verdicts],
                "diagnoses": [d.to_dict() for d in diagnoses],
                "figures": _figures(history, time.perf_counter() - started),
                "out_dir": str(out),
                "data_root": str(root) if uses_data_root else None,
                "pairs": pair_counts,
                "device": str(torch_device),
                "world_size": dist_ctx.world_size,
                "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                # what the run really used (amp and channels_last are CUDA only), beside the configured values
                "applied": {"amp": trainer.amp_enabled, "channels_last": trainer.memory_format is torch.channels_last,
                            "device": str(trainer.device)},
                "config": {"data": to_dict(data_preset), "train": to_dict(train_cfg), "model": to_dict(preset.model),
                               "judge": to_dict(preset.judge)},
            }
            (out / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
            lap("report_json")
            if on_verdict is not None:
                on_verdict(report)
                lap("on_verdict")
            if plots:
                from autohdr.diagnosis.plots import plot_curves, plot_triplets, run_title
                plot_curves(history, out / "curves.png", title=run_title(report))
                plot_triplets(trainer.core, trainer.probe_batch(), out / "triplets.png",
                              residual_active=train_cfg.spec.residual_active)
                lap("plots")
            from autohdr.diagnosis.report_html import write_report_html
            write_report_html(out, report)  # after the figures: it inlines them
            lap("report_html")
            # run_s ends at the last lap, so the parts add up to it exactly
            timings = {"started_unix": started_unix, "run_s": clock[0] - started, "parts_s": parts}
            (out / "timings.json").write_text(json.dumps(timings, indent=2), encoding="utf-8")
            report = {**report, "timings": timings}
        barrier(dist_ctx)  # every rank leaves together, after rank 0 has written the report
        return report
    finally:
        if folder_lock is not None:
            folder_lock.release()
        # Leave the process group cleanly: a gloo group left to interpreter exit can abort a rank
        # ("terminate called without an active exception") after a good run.
        shutdown(dist_ctx)


def _figures(history: pd.DataFrame, wall_time_s: float) -> dict[str, Any]:
    """Headline numbers of a run for the report."""
    figures: dict[str, Any] = {"wall_time_s": wall_time_s}
    end = history[history["kind"] == "run_end"]
    if not end.empty:
        row = end.iloc[-1].dropna()
        for key in ("samples_per_sec", "step_time_ms_mean", "instrumentation_overhead_frac", "steps",
                    "best_val_proxy_total"):
            if key in row:
                value = row[key].item() if hasattr(row[key], "item") else row[key]
                figures[key] = value if not isinstance(value, float) or math.isfinite(value) else None
    val = history[history["kind"] == "val_epoch"]
    if not val.empty:
        last = val.iloc[-1]
        for key in ("val_proxy_total", "identity_proxy_total", "gt_proxy_total", "constant_lens_proxy_total"):
            if key in last and pd.notna(last[key]):
                figures[f"final_{key}"] = float(last[key])
        for key in (k for k in last.index if k.startswith("pred_gt_corr_")):  # fixtures: predictions vs truth
            figures["param_corr_" + key[len("pred_gt_corr_"):]] = float(last[key]) if pd.notna(last[key]) else None
    return figures
