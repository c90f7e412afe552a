"""The fixed probe and the init check: the same few validation samples, evaluated every validation.

The probe is the first ``max_samples`` validation samples, fixed for the whole run. Writes the
``init`` record before the first step (``init_pred_max_abs_diff``, ``init_params_max_abs_dev``,
``init_proxy_total`` vs ``identity_proxy_total``, ``init_loss`` vs ``identity_loss``: does the
untrained model predict the identity warp?) and, in each ``val_epoch``, ``probe_pred_checksum``,
``probe_final_grid_checksum``, ``probe_params_checksum``, ``probe_proxy_total_score``,
``probe_pixel`` / ``probe_ssim`` / ``probe_edge``, ``probe_repeat_max_abs_diff`` (evaluated twice),
``probe_residual_contrib_px_mean``, ``probe_param_grid_disp_px_mean``, ``probe_sample_count``,
``param_checksum`` and, with a residual, ``probe_flow_cosine_train_eval`` and both flow checksums
(train mode vs eval mode). State: none (the probe is taken again from the validation data).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn as nn

from autohdr.data.dataset import check_batch_range
from autohdr.diagnosis.checksum import tensor_checksum
from autohdr.diagnosis.observers.base import LossFn, Observer, default_loss_fn
from autohdr.diagnosis.observers.geometry import geometry_figures
from autohdr.diagnosis.observers.rank_sync import parameter_checksum
from autohdr.lens.evaluation import Correction, correct
from autohdr.lens.geometry import WarpResult, apply_correction, identity_params
from autohdr.lens.proxy import proxy_score_batch
from autohdr.lens.stages import StageSpec

IDENTITY_PARAMS: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)


class eval_mode:
    """``with eval_mode(model):`` evaluates in eval mode and restores the previous mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self.was_training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


def _identity_params(image: torch.Tensor) -> torch.Tensor:
    return identity_params(image.shape[0], device=image.device, dtype=image.dtype)


def _identity_warp(image: torch.Tensor) -> WarpResult:
    """The identity warp of ``image`` ``(B, 3, H, W)``, through the same code path as every prediction."""
    return apply_correction(image, _identity_params(image), None)


class ProbeObserver(Observer):
    """The fixed probe, the init check and the probe's figures at each validation."""

    name = "probe"

    def __init__(self, model: nn.Module, spec: StageSpec, device: torch.device, *, loss_fn: LossFn,
                 max_samples: int, checksum_decimals: int, param_bounds) -> None:
        self.model, self.spec, self.device = model, spec, device
        self.loss_fn = loss_fn
        self.max_samples = max_samples
        self.decimals = checksum_decimals
        self.param_bounds = param_bounds
        self.batch: dict | None = None

    def probe_batch(self, val_batches: Iterable[Mapping] | None = None) -> dict:
        """The first ``max_samples`` validation samples, fixed at the first call."""
        if self.batch is None:
            if val_batches is None:
                raise ValueError("the probe needs validation batches: call on_train_start(val_loader) first")
            inputs, targets, ids = [], [], []
            need = self.max_samples
            for index, batch in enumerate(val_batches):
                check_batch_range(batch, f"validation batch {index} (the probe)")  # not "pred" in the proxy
                inputs.append(batch["input_image"])
                targets.append(batch["target_image"])
                ids.extend(list(batch.get("image_id", [])))
                if sum(x.shape[0] for x in inputs) >= need:
                    break
            if not inputs:
                raise ValueError("the validation loader is empty; the probe needs at least one sample")
            self.batch = {"input_image": torch.cat(inputs)[:need].to(self.device),
                          "target_image": torch.cat(targets)[:need].to(self.device), "image_id": ids[:need]}
        return self.batch

    @torch.no_grad()
    def init_check(self) -> dict:
        """Before any step: does the model predict the identity warp, with identity's proxy and loss?"""
        probe = self.probe_batch()
        with eval_mode(self.model):
            image, target = probe["input_image"], probe["target_image"]
            correction = correct(self.model, image, self.spec.residual_active)
            identity_warp = _identity_warp(image)
            identity = identity_warp.prediction
            model_loss, _ = self.loss_fn(correction, target)
            # The same loss on the identity warp, given the outputs the model gives: a model that
            # passes a (zero) flow is compared with identity passing a zero flow of the same shape, so
            # a regularizer with a floor at zero flow (sqrt(x^2 + eps)) counts the same on both sides.
            flow = correction.residual_flow_lowres
            identity_flow = torch.zeros_like(flow) if flow is not None else None
            identity_loss, _ = self.loss_fn(Correction(_identity_params(image), identity_flow, identity_warp, image),
                                            target)
            return {
                "init_image_height": int(image.shape[-2]), "init_image_width": int(image.shape[-1]),
                "init_pred_max_abs_diff": float((correction.prediction - identity).abs().max()),
                "init_proxy_total": proxy_score_batch(correction.prediction.float(), target.float())["total"],
                "identity_proxy_total": proxy_score_batch(identity.float(), target.float(), memo=True)["total"],
                "init_loss": float(model_loss),
                "identity_loss": float(identity_loss),
                "init_params_max_abs_dev": float((correction.params - correction.params.new_tensor(
                    IDENTITY_PARAMS)).abs().max()),
            }

    def metrics(self) -> dict:
        """The probe's ``val_epoch`` figures for the model as it is now."""
        probe = self.probe_batch()
        decimals = self.decimals
        with eval_mode(self.model):
            correction = correct(self.model, probe["input_image"], self.spec.residual_active)
            again = correct(self.model, probe["input_image"], self.spec.residual_active)  # same input, same weights
            _, components = default_loss_fn(self.spec)(correction, probe["target_image"])
            geometry = geometry_figures(correction, self.param_bounds)
        flow_modes = self._flow_train_vs_eval(probe["input_image"], correction) if self.spec.residual_active else {}
        proxy = proxy_score_batch(correction.prediction.float(), probe["target_image"].float())
        return {
            "probe_repeat_max_abs_diff": float((again.prediction - correction.prediction).abs().max()),
            "probe_residual_contrib_px_mean": float(geometry["residual_contrib_px_mean"]),
            "probe_param_grid_disp_px_mean": float(geometry["param_grid_disp_px_mean"]),
            "probe_pred_checksum": tensor_checksum(correction.prediction, decimals),
            "probe_final_grid_checksum": tensor_checksum(correction.warp.final_grid.permute(0, 3, 1, 2), decimals),
            "probe_params_checksum": tensor_checksum(correction.params, decimals + 1),
            "probe_proxy_total_score": proxy["total"],
            "probe_pixel": float(components["pixel"]),
            "probe_ssim": float(components["ssim"]),
            "probe_edge": float(components["edge"]),
            "probe_sample_count": int(probe["input_image"].shape[0]),
            "param_checksum": parameter_checksum(self.model, decimals + 2),
            **flow_modes,
        }

    def _flow_train_vs_eval(self, image: torch.Tensor, at_eval: Correction) -> dict:
        """The probe's residual flow in train mode vs eval mode, by value: their cosine and both
        checksums. Buffers (batch-norm statistics) and the random state are restored afterwards,
        so the train-mode pass leaves the run exactly as it was."""
        if at_eval.residual_flow_lowres is None:
            return {}
        model = self.model
        buffers = [b.detach().clone() for b in model.buffers()]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            was_training = model.training
            model.train()
            try:
                in_train = correct(model, image, True).residual_flow_lowres
            finally:
                model.train(was_training)
                for saved, buffer in zip(buffers, model.buffers()):
                    buffer.copy_(saved)
        if in_train is None:
            return {}
        a, b = in_train.detach().float().reshape(-1), at_eval.residual_flow_lowres.detach().float().reshape(-1)
        norms = float(a.norm() * b.norm())
        return {"probe_flow_cosine_train_eval": float(a @ b) / norms if norms > 0 else None,
                "probe_flow_checksum_train": tensor_checksum(in_train, self.decimals),
                "probe_flow_checksum_eval": tensor_checksum(at_eval.residual_flow_lowres, self.decimals)}
