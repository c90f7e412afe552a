"""autohdr.lens.model: construction, output contract, identity at init, bounded heads, gradients."""

import dataclasses

import pandas as pd
import pytest
import torch

from autohdr.data.settings import default_fixture_root
from autohdr.lens.geometry import PARAM_NAMES, apply_correction, identity_params
from autohdr.diagnosis.instrumentation import GROUP_NAMES, parameter_groups
from autohdr.lens.model import (DEFAULT_PARAM_BOUNDS, EqualizedLinear, LensCorrectionModel, ModelConfig, ParamHead,
                                bound_params)
from tests.tolerances import assert_close

SMALL = ModelConfig(widths=(8, 16, 16, 32), head_hidden=16, residual_hidden=8)


class TestConstruction:
    def test_builds_without_arguments(self):
        model = LensCorrectionModel()
        assert model.config == ModelConfig()
        assert {name for name, _ in model.named_children()} == set(GROUP_NAMES)

    def test_builds_from_config(self):
        model = LensCorrectionModel(SMALL)
        assert model.backbone.stages[-1][0].conv1.out_channels == 32

    def test_groups_cover_every_parameter_once(self):
        groups = parameter_groups(LensCorrectionModel(SMALL))
        assert set(groups) == set(GROUP_NAMES)
        assert all(groups[name] for name in GROUP_NAMES)

    @pytest.mark.parametrize("change,match", [
        ({"widths": (8, 12)}, "divisible by groups"),
        ({"residual_stride": 3}, "power of 2"),
        ({"param_bounds": DEFAULT_PARAM_BOUNDS[:7]}, "needs 8"),
        ({"param_bounds": DEFAULT_PARAM_BOUNDS[:7] + ((1.0, 1.2),)}, "identity value 1.0"),
        ({"residual_max_px": 0.0}, "positive"),
        ({"head_pool": 0}, "head_pool must be >= 1"),
    ])
    def test_bad_config_raises(self, change, match):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(ModelConfig(), **change)


class TestForward:
    def test_output_contract(self):
        model = LensCorrectionModel(SMALL)
        out = model(torch.rand(2, 3, 64, 96))
        assert out["params"].shape == (2, 8) and out["params_raw"].shape == (2, 8)
        assert out["residual_flow_lowres"].shape == (2, 2, 8, 12)
        assert out["params"].dtype == torch.float32

    def test_untrained_model_is_identity(self):
        model = LensCorrectionModel(SMALL).eval()
        image = torch.rand(2, 3, 64, 64)
        out = model(image)
        assert_close(out["params"], identity_params(2))
        assert float(out["residual_flow_lowres"].detach().abs().max()) == 0.0
        result = apply_correction(image, out["params"], out["residual_flow_lowres"])
        torch.testing.assert_close(result.prediction, image, atol=1e-5, rtol=0)

    @pytest.mark.parametrize("shape,match", [((3, 64, 64), r"\(B, 3, H, W\)"), ((1, 1, 64, 64), r"got \(1, 1, 64, 64\)"),
                                             ((1, 3, 60, 64), "divisible by 16")])
    def test_bad_input_raises(self, shape, match):
        with pytest.raises(ValueError, match=match):
            LensCorrectionModel(SMALL)(torch.rand(shape))


class TestBounds:
    def test_bounds_respected_for_extreme_raw(self):
        raw = torch.tensor([[100.0] * 8, [-100.0] * 8])
        params = bound_params(raw, DEFAULT_PARAM_BOUNDS)
        assert_close(params[0], torch.tensor([b[1] for b in DEFAULT_PARAM_BOUNDS]))
        assert_close(params[1], torch.tensor([b[0] for b in DEFAULT_PARAM_BOUNDS]))

    def test_zero_raw_is_identity(self):
        assert_close(bound_params(torch.zeros(3, 8), DEFAULT_PARAM_BOUNDS), identity_params(3))

    def test_residual_bounded(self):
        model = LensCorrectionModel(SMALL)
        torch.nn.init.normal_(model.residual_head.conv2.weight, std=100.0)
        flow = model(torch.rand(1, 3, 64, 64))["residual_flow_lowres"]
        assert float(flow.detach().abs().max()) <= SMALL.residual_max_px + 1e-6


class TestGradients:
    def test_gradients_reach_every_head_on_first_step(self):
        """Zero-initialized last layers still get a gradient: the residual head learns from step 1."""
        torch.manual_seed(0)
        model = LensCorrectionModel(SMALL)
        image, target = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
        out = model(image)
        pred = apply_correction(image, out["params"], out["residual_flow_lowres"]).prediction
        (pred - target).abs().mean().backward()
        assert float(model.param_head.fc2.weight.grad.norm()) > 0
        assert float(model.residual_head.conv2.weight.grad.norm()) > 0

    def test_residual_head_moves_after_two_steps(self):
        torch.manual_seed(0)
        model = LensCorrectionModel(SMALL)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        image, target = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
        before = [p.detach().clone() for p in model.residual_head.parameters()]
        for _ in range(2):
            out = model(image)
            pred = apply_correction(image, out["params"], out["residual_flow_lowres"]).prediction
            opt.zero_grad()
            (pred - target).abs().mean().backward()
            opt.step()
        upstream = model.residual_head.conv1.weight
        assert float(upstream.grad.norm()) > 0  # gradient reaches past the zero-initialized layer
        moved = sum(float((p.detach() - b).norm()) for p, b in zip(model.residual_head.parameters(), before))
        assert moved > 0


class TestParamHeadSeesWhere:
    """The head keeps a grid of cells: features in other places give another lens (a global average
    pool cannot tell them apart, which made every image get nearly the same lens)."""

    @staticmethod
    def head(pool: int) -> ParamHead:
        torch.manual_seed(0)
        head = ParamHead(16, 8, DEFAULT_PARAM_BOUNDS, pool)
        torch.nn.init.normal_(head.fc2.weight, std=0.5)  # a trained head (the zero init hides everything)
        return head

    def test_mirrored_features_give_another_lens(self):
        features = torch.rand(1, 16, 8, 8)
        mirrored = features.flip(-1)
        spatial = self.head(pool=4)
        with torch.no_grad():
            assert float((spatial(features)[0] - spatial(mirrored)[0]).abs().max()) > 1e-3
        global_average = self.head(pool=1)
        torch.testing.assert_close(global_average(features)[0], global_average(mirrored)[0])

    @pytest.mark.parametrize("hw", [(64, 64), (128, 96), (256, 256)])
    def test_any_input_size_gives_the_same_head(self, hw):
        model = LensCorrectionModel(SMALL)
        assert model(torch.rand(1, 3, *hw))["params"].shape == (1, 8)

    def test_no_coordinate_channels_by_default(self):
        assert LensCorrectionModel().backbone.stages[0][0].conv1.in_channels == 3


def test_default_bounds_hold_every_fixture_lens():
    """The model can represent each ground-truth lens of the fixtures inside its bounds (strictly,
    so tanh does not have to saturate)."""
    frame = pd.read_csv(default_fixture_root().parent / "ground_truth.csv")
    for name, (lo, hi) in zip(PARAM_NAMES, DEFAULT_PARAM_BOUNDS):
        assert lo < frame[name].min() and frame[name].max() < hi, name


class TestEqualizedLinear:
    def test_one_adam_step_moves_the_output_by_order_lr(self):
        """Adam moves every weight by ~lr: an nn.Linear with 4096 inputs moves its output by ~lr * 4096
        on one step, the equalized layer by ~lr * sqrt(4096)."""
        torch.manual_seed(0)
        x = torch.randn(4, 4096)
        moves = {}
        for name, layer in (("plain", torch.nn.Linear(4096, 1)), ("equalized", EqualizedLinear(4096, 1))):
            before = layer(x).detach()
            optimizer = torch.optim.Adam(layer.parameters(), lr=1e-3)
            layer(x).sum().backward()
            optimizer.step()
            moves[name] = float((layer(x).detach() - before).abs().mean())
        assert moves["plain"] > 1.0
        assert moves["equalized"] < 0.1

    def test_initial_weights_match_nn_linear_scale(self):
        torch.manual_seed(0)
        layer = EqualizedLinear(1024, 256)
        effective = layer.weight.detach() * layer.scale
        bound = 1024 ** -0.5
        assert float(effective.abs().max()) <= bound
        assert float(effective.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.05)  # U(-b, b)
