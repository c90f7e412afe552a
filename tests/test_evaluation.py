"""autohdr.lens.evaluation: the loss's border-sampled prediction, the constant lens and the
correlation of predictions with ground truth in ``score_subset``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from autohdr.lens.evaluation import correct, pearson_per_column, score_subset
from autohdr.lens.proxy import proxy_score_batch
from autohdr.lens.geometry import IDENTITY_PARAMS, PARAM_NAMES, apply_correction, brown_conrady_grid

CPU = torch.device("cpu")


def textured(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``(batch, 3, size, size)`` smooth random images with edges, in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, size // 4, size // 4, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")


class FixedParams(nn.Module):
    """Predicts ``params_of(image) (B, 8)``; no trainable state."""

    def __init__(self, params_of) -> None:
        super().__init__()
        self.params_of = params_of

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"params": self.params_of(image)}


def k1_from_brightness(image: torch.Tensor) -> torch.Tensor:
    """A lens whose k1 grows with the image's mean brightness (a model that sees its input)."""
    params = torch.tensor(IDENTITY_PARAMS).repeat(image.shape[0], 1)
    params[:, 0] = 0.4 * image.mean(dim=(1, 2, 3))
    return params


def batches(images: torch.Tensor, size: int = 4, ids: bool = True) -> list[dict]:
    out = []
    for start in range(0, len(images), size):
        chunk = images[start:start + size]
        batch = {"input_image": chunk, "target_image": chunk.flip(-1)}
        if ids:
            batch["image_id"] = [f"p{start + i:03d}" for i in range(len(chunk))]
        out.append(batch)
    return out


class TestLossPrediction:
    def test_equals_the_prediction_inside_the_frame_and_takes_the_border_outside(self):
        image = textured(2)
        params = torch.tensor(IDENTITY_PARAMS).repeat(2, 1)
        params[:, 0] = 0.3  # samples beyond the frame near the corners
        correction = correct(FixedParams(lambda x: params), image, residual_active=False)
        grid = brown_conrady_grid(params, 32, 32)
        inside = (grid.abs() <= 1).all(dim=-1).unsqueeze(1).expand_as(image)
        assert not inside.all() and inside.any()
        torch.testing.assert_close(correction.loss_prediction[inside], correction.prediction[inside])
        # more than one pixel outside (no bilinear weight on the frame left)
        far = (grid.abs() > 1 + 2 / 31).any(dim=-1).unsqueeze(1).expand_as(image)
        assert far.any()
        assert float(correction.prediction[far].abs().max()) == 0.0     # black for the proxy
        assert float(correction.loss_prediction[far].min()) > 0          # border pixels for the loss

    def test_the_loss_prediction_keeps_the_gradient_to_the_parameters(self):
        params = torch.tensor(IDENTITY_PARAMS).repeat(1, 1).requires_grad_(True)
        correction = correct(FixedParams(lambda x: params * 1.0), textured(1), residual_active=False)
        correction.loss_prediction.mean().backward()
        assert params.grad is not None and float(params.grad.abs().sum()) > 0


    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_a_non_finite_parameter_makes_the_loss_prediction_non_finite_and_backward_survives(self, bad):
        """grid_sample's border mode crashes in backward on NaN coordinates: a diverging model must
        get a non-finite loss (the trainer stops with a clear error), never a segfault."""
        params = torch.tensor(IDENTITY_PARAMS).repeat(2, 1)
        params[1, 0] = bad
        params.requires_grad_(True)
        correction = correct(FixedParams(lambda x: params * 1.0), textured(2), residual_active=False)
        assert torch.isnan(correction.loss_prediction).all()
        correction.loss_prediction.mean().backward()
        assert params.grad is not None


class TestPearson:
    def test_perfect_anti_and_undefined(self):
        truth = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 1.0], [3.0, 3.0, 2.0]])
        pred = torch.stack((2 * truth[:, 0] + 1, -truth[:, 1], torch.full((3,), 0.7)), dim=1)
        r = pearson_per_column(pred, truth)
        assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(-1.0)
        assert r[2] is None  # a constant prediction has no correlation

    def test_needs_two_samples_and_equal_shapes(self):
        assert pearson_per_column(torch.ones(1, 2), torch.ones(1, 2)) == [None, None]
        with pytest.raises(ValueError, match=r"\(N, K\) of the same shape"):
            pearson_per_column(torch.ones(3, 2), torch.ones(3, 8))


class TestConstantLens:
    def test_the_model_runs_once_per_batch(self):
        """The constant lens's pass only warps and scores: it does not run the model again."""
        calls = []

        def counted(image):
            calls.append(image.shape[0])
            return k1_from_brightness(image)

        scores = score_subset(FixedParams(counted), batches(textured(6)), residual_active=False, device=CPU,
                              constant_lens=True)
        assert calls == [4, 2] and scores.constant_lens is not None

    def test_a_model_with_one_lens_scores_exactly_its_constant_lens(self):
        one_lens = torch.tensor([0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
        model = FixedParams(lambda x: one_lens.repeat(x.shape[0], 1))
        scores = score_subset(model, batches(textured(6)), residual_active=False, device=CPU, constant_lens=True)
        assert scores.constant_lens == scores.model
        assert scores.constant_params == pytest.approx(tuple(one_lens.tolist()))

    def test_a_model_that_sees_its_input_differs_from_its_constant_lens(self):
        images = textured(6)
        scores = score_subset(FixedParams(k1_from_brightness), batches(images), residual_active=False,
                              device=CPU, constant_lens=True)
        assert scores.constant_params[0] == pytest.approx(float(k1_from_brightness(images)[:, 0].mean()))
        assert scores.constant_lens["total"] != scores.model["total"]
        # the constant lens is the mean lens applied to every image, nothing else
        mean = torch.tensor(scores.constant_params, dtype=torch.float32).repeat(6, 1)
        expected = proxy_score_batch(apply_correction(images, mean, None).prediction, images.flip(-1))
        assert scores.constant_lens == pytest.approx({k: expected[k] for k in scores.constant_lens}, rel=1e-12,
                                                     abs=1e-12)

    def test_off_by_default(self):
        scores = score_subset(FixedParams(k1_from_brightness), batches(textured(4)), residual_active=False,
                              device=CPU)
        assert scores.constant_lens is None and scores.constant_params is None


class TestCorrelationWithGroundTruth:
    def test_every_parameter_is_correlated_when_every_sample_has_ground_truth(self):
        images = textured(8)
        predicted = k1_from_brightness(images)
        truth = {f"p{i:03d}": predicted[i].clone() for i in range(8)}
        truth["p000"][7] = 1.05  # s: varies in the truth only at one sample, never in the predictions
        scores = score_subset(FixedParams(k1_from_brightness), batches(images), residual_active=False,
                              device=CPU, ground_truth=truth, with_baselines=False)
        corr = scores.param_correlations
        assert set(corr) == set(PARAM_NAMES)
        assert corr["k1"] == pytest.approx(1.0)
        assert corr["s"] is None and corr["k2"] is None  # the predictions do not vary there
        assert scores.ground_truth is None  # baselines off: the ground-truth warp is not scored

    @pytest.mark.parametrize("drop", ["one_id", "no_ids"])
    def test_no_correlation_without_complete_ground_truth(self, drop):
        images = textured(8)
        truth = {f"p{i:03d}": k1_from_brightness(images)[i] for i in range(8)}
        if drop == "one_id":
            del truth["p005"]
        scores = score_subset(FixedParams(k1_from_brightness), batches(images, ids=drop != "no_ids"),
                              residual_active=False, device=CPU, ground_truth=truth)
        assert scores.param_correlations is None and scores.ground_truth is None
        assert math.isfinite(scores.model["total"])
