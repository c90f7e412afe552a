"""Identity warp versus a trained model on exactly the same samples (the runbook's overfit check).

:func:`compare_identity` scores both with :func:`autohdr.lens.evaluation.score_subset` (so the numbers
are those the trainer logs as ``val_proxy_*`` and ``identity_proxy_*``) and returns plain JSON-able
values. :func:`model_from_checkpoint` rebuilds a :class:`~autohdr.lens.model.LensCorrectionModel` from
the ``model_config`` a trainer checkpoint stores, or builds a custom model with a ``--model-factory``
and loads the checkpoint's weights into it. ``scripts/debug_compare_identity.py`` is the command
line around both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from autohdr.training.config import from_mapping, stage_spec
from autohdr.lens.evaluation import PROXY_KEYS, score_subset
from autohdr.lens.model import LensCorrectionModel, ModelConfig

#: Keys of the summary :func:`compare_identity` returns (the script adds ``stage`` in front).
SUMMARY_KEYS: tuple[str, ...] = ("sample_count", "identity", "model", "delta_model_minus_identity")
#: Resolution used when neither ``--resize-hw`` nor the run's ``report.json`` gives one (the presets').
DEFAULT_RESIZE_HW: tuple[int, int] = (128, 128)
#: Batch size used when neither ``--batch-size`` nor the run's ``report.json`` gives one.
DEFAULT_BATCH_SIZE: int = 8


def score_delta(model: Mapping[str, float], identity: Mapping[str, float]) -> dict[str, float]:
    """``model[k] - identity[k]`` for every proxy key (positive ``total``: the model wins)."""
    return {key: float(model[key]) - float(identity[key]) for key in PROXY_KEYS}


def compare_identity(
    model: nn.Module,
    batches: Iterable[Mapping],
    *,
    residual_active: bool,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Mean proxy scores of ``model`` and of the identity warp on the same samples.

    Args:
        model: returns ``params`` ``(B, 8)`` (and optionally ``residual_flow_lowres``).
        batches: dicts with ``input_image`` and ``target_image`` ``(B, 3, H, W)`` in ``[0, 1]``.
        residual_active: fuse the residual flow (stages 2 and 3), as in training.
        device: where the model and the batches run.
        max_batches: score only the first ``max_batches`` batches (``None``: all).

    Returns:
        ``sample_count`` (int) and ``identity``, ``model``, ``delta_model_minus_identity``: dicts
        with ``total, edge, line, grad, ssim, mae, hard_fail`` (``hard_fail`` is the fraction of
        hard-failed samples).

    Raises:
        ValueError: ``max_batches < 1``, or no sample was scored (empty ``batches``).
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    scores = score_subset(model, batches, residual_active=residual_active, device=torch.device(device),
                          max_batches=max_batches)
    return {
        "sample_count": scores.sample_count,
        "identity": dict(scores.identity),
        "model": dict(scores.model),
        "delta_model_minus_identity": score_delta(scores.model, scores.identity),
    }


def checkpoint_stage(payload: Mapping[str, Any]) -> str:
    """The training stage a checkpoint was saved in (``stage``, else ``config["stage"]``)."""
    stage = payload.get("stage") or (payload.get("config") or {}).get("stage")
    if not stage:
        raise ValueError("the checkpoint records no stage; pass --stage")
    return stage_spec(str(stage)).name


def state_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> tuple[str, int] | None:
    """The first entry where ``given`` (a checkpoint's state dict) does not fit ``expected`` (a model's).

    Returns:
        ``None`` when every key is in both with the same shape; else a description of the first
        mismatch (model keys in order first: missing or another shape, then keys only in
        ``given``) and the number of mismatched keys.
    """
    problems = []
    for key, value in expected.items():
        if key not in given:
            problems.append(f"{key!r} is missing from the checkpoint")
        elif tuple(getattr(given[key], "shape", ())) != tuple(value.shape):
            problems.append(f"{key!r} has shape {tuple(given[key].shape)} in the checkpoint, "
                            f"{tuple(value.shape)} in the model")
    problems += [f"{key!r} is in the checkpoint but not in the model" for key in given if key not in expected]
    return (problems[0], len(problems)) if problems else None


def _load_weights(model: nn.Module, payload: Mapping[str, Any], where: str, built_by: str) -> None:
    state = payload.get("model")
    if not isinstance(state, Mapping):
        raise ValueError(f"{where} holds no model state dict")
    mismatch = state_mismatch(model.state_dict(), state)
    if mismatch is not None:
        first, count = mismatch
        raise ValueError(f"{where}: its weights do not fit {built_by}: first mismatched key {first} "
                         f"({count} mismatched in all)")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # same keys and shapes, yet refused (e.g. a dtype that cannot be copied)
        first_line = str(exc).strip().splitlines()[0]
        raise ValueError(f"{where}: its weights do not fit {built_by}: {first_line}") from None


def model_from_checkpoint(payload: Mapping[str, Any], device: torch.device | str = "cpu", *,
                          model_factory: str | None = None, source: str | Path = "") -> nn.Module:
    """The model a trainer checkpoint holds, with its weights loaded, in eval mode on ``device``.

    Without ``model_factory`` it is a :class:`LensCorrectionModel` rebuilt from
    ``payload["model_config"]``. With ``model_factory`` (``MODULE:FUNCTION``, as ``autohdr debug
    --model-factory`` takes it) the factory builds the model, whatever its class and config, and
    the checkpoint's weights are loaded into it: the way to read checkpoints of custom models.

    Args:
        source: the checkpoint's path, named in errors.

    Raises:
        ValueError: no ``model_config``, or one that is not a :class:`ModelConfig` (a custom model:
            pass ``model_factory``); the factory fails; or the weights do not fit the model (the
            message names the checkpoint and the first mismatched key).
    """
    where = f"checkpoint {source}" if source else "the checkpoint"
    custom = "it holds a custom model? pass --model-factory MODULE:FUNCTION that builds it"
    if model_factory:
        from autohdr.runs.debug import build_model
        model = build_model(model_factory, ModelConfig())
        _load_weights(model, payload, where, f"the model of --model-factory {model_factory}")
        return model.to(device).eval()
    raw = payload.get("model_config")
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} has no model_config ({custom})")
    try:
        config = from_mapping(ModelConfig, dict(raw), where=f"{where} model_config")
    except ValueError as exc:
        raise ValueError(f"{exc} ({custom})") from None
    model = LensCorrectionModel(config)
    _load_weights(model, payload, where, "its model_config")
    return model.to(device).eval()


def _run_data_config(checkpoint_path: str | Path) -> Mapping[str, Any]:
    """The ``config.data`` table of the run a checkpoint belongs to (``report.json`` beside it), or ``{}``."""
    report = Path(checkpoint_path).parent / "report.json"
    try:
        data = json.loads(report.read_text(encoding="utf-8"))["config"]["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return data if isinstance(data, Mapping) else {}


def run_resize_hw(checkpoint_path: str | Path) -> tuple[int, int] | None:
    """The ``data.resize_hw`` of the run a checkpoint belongs to (``report.json`` beside it), if any."""
    try:
        height, width = (int(v) for v in _run_data_config(checkpoint_path)["resize_hw"])
    except (KeyError, ValueError, TypeError):
        return None
    return height, width


def run_batch_size(checkpoint_path: str | Path) -> int | None:
    """The ``data.batch_size`` the run validated with (``report.json`` beside the checkpoint), if any.

    Scoring at the run's batch size reproduces its logged ``val_proxy_*`` exactly: CPU convolution
    kernels block the batch differently per batch size, which moves predictions by ~1e-7, and the
    proxy's Canny edges turn such noise into score differences of ~1e-6.
    """
    try:
        value = int(_run_data_config(checkpoint_path)["batch_size"])
    except (KeyError, ValueError, TypeError):
        return None
    return value if value >= 1 else None
