"""The user's own tests, using autohdr's fixtures beside the generated signal tests."""

import pytest
import torch

from mylens.model import build


def test_model_starts_at_the_identity_warp():
    params = build()(torch.rand(2, 3, 64, 64))["params"]
    torch.testing.assert_close(params, torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1.0]] * 2))


@pytest.mark.stage2_probe
def test_residual_moves_more_than_a_hundredth_of_a_pixel(autohdr_run):
    run = autohdr_run("stage2_probe")  # the same run the signal tests judge: trained once
    steps = run.history[run.history["kind"] == "train_step"]
    assert steps["residual_contrib_px_mean"].iloc[-1] > 0.01


def test_overfit_split_is_train_equals_val(autohdr_overfit_split):
    split = autohdr_overfit_split(4)
    assert split.train_csv.read_text() == split.val_csv.read_text()
    assert len(split.rows) == 4
