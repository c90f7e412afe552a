"""``AutohdrCallback`` on a PyTorch Lightning Trainer: the hand loop's verdicts on the same seed and
data, faults stay red with a named cause (a NaN batch stops the run), a folder holding a run is
refused, a checkpoint resumes the metrics, gradient accumulation records one step per optimizer
step, the user adds 3 lines, and neither ``import autohdr`` nor ``autohdr.integrations`` imports
Lightning."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("pytorch_lightning") is None:
    pytest.skip("needs the lightning extra: pip install 'autohdr[lightning]'", allow_module_level=True)

from autohdr.cli import main as autohdr_main  # noqa: E402
from autohdr.data.settings import default_fixture_root  # noqa: E402
from autohdr.diagnosis.causes import diagnose  # noqa: E402
from autohdr.diagnosis.hooks import NonFiniteLossError, default_loss_fn  # noqa: E402
from autohdr.diagnosis.metrics_log import read_metrics  # noqa: E402
from autohdr.diagnosis.run_intent import ExistingRunError, judge_config_for  # noqa: E402
from autohdr.diagnosis.verdicts import judge  # noqa: E402
from autohdr.lens.evaluation import correct  # noqa: E402
from autohdr.lens.model import LensCorrectionModel  # noqa: E402
from autohdr.runs.debug import build_loaders, resolve_preset, select_rows  # noqa: E402
from tests import faults  # noqa: E402
from tests.hand_loop import train_by_hand  # noqa: E402

# Lightning 2.6's own pytree helper, under torch 2.13 (not autohdr's code)
pytestmark = [pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*is deprecated"),
              pytest.mark.usefixtures("one_torch_thread")]  # tests/plugins/threads.py


# ---------------------------------------------------------------------------- the user's code (tests/lightning_loop.py)

@pytest.fixture(scope="module")
def lit():
    """tests/lightning_loop.py (the user's LightningModule and loop), imported by the first test that
    runs here: collection does not pay pytorch_lightning's import."""
    from tests import lightning_loop
    return lightning_loop


def judged(run_dir: Path):
    """What ``autohdr judge RUN_DIR`` judges: the run's history, with the judge config it recorded."""
    history = read_metrics(run_dir)
    verdicts = judge(history, judge_config_for(history))
    return history, verdicts, diagnose(verdicts, history)


def oks(verdicts) -> dict[str, bool | None]:
    return {v.signal: v.ok for v in verdicts}


# ---------------------------------------------------------------------------- healthy: the hand loop's verdicts

@pytest.fixture(scope="module")
def runs(tmp_path_factory, lit):
    root = tmp_path_factory.mktemp("lightning")
    hand = train_by_hand(root / "hand", overrides=lit.TINY)
    lit.train_with_lightning(root / "lightning")
    return {"hand": hand, "hand_dir": root / "hand", "dir": root / "lightning"}


@pytest.mark.stage2_probe
def test_lightning_gets_the_hand_loops_verdicts(runs):
    _, verdicts, _ = judged(runs["dir"])
    assert oks(verdicts) == oks(runs["hand"])
    assert all(ok is not False for ok in oks(verdicts).values())


@pytest.mark.stage2_probe
def test_autohdr_judge_on_the_run_folder_gives_the_same_verdicts(runs, capsys):
    capsys.readouterr()
    code = autohdr_main(["judge", str(runs["dir"]), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["all_good"] is True
    assert {v["signal"]: v["ok"] for v in report["verdicts"]} == oks(runs["hand"])


def test_the_first_epoch_is_the_hand_loops_step_for_step(runs):
    """Same seed, data, model, optimizer and clip: epoch 0 matches the hand loop figure for figure.
    From epoch 1 on the batches differ, as Lightning's step order genuinely does: Lightning calls
    the sampler's ``set_epoch`` every epoch (so does autohdr's Trainer), the hand loop never does
    and replays epoch 0's order. The verdicts agree regardless (the tests above)."""
    steps = {name: read_metrics(path).query("kind == 'train_step'")
             for name, path in (("hand", runs["hand_dir"]), ("lightning", runs["dir"]))}
    first = {name: s[s["epoch"] == 0] for name, s in steps.items()}
    assert len(first["lightning"]) == len(first["hand"]) == 2 and len(steps["lightning"]) == len(steps["hand"]) == 8
    for column in ("loss", "grad_norm_total", "grad_norm_residual_head", "param_delta_residual_head",
                   "residual_contrib_px_mean", "batch_fingerprint"):
        assert first["lightning"][column].tolist() == first["hand"][column].tolist(), column
    later = steps["lightning"]["epoch"] > 0
    assert steps["lightning"]["batch_fingerprint"][later].tolist() != steps["hand"]["batch_fingerprint"][later].tolist()


def test_the_run_records_its_intent_lightnings_clip_and_every_groups_lr(runs):
    history = read_metrics(runs["dir"])
    start = history[history["kind"] == "run_start"].iloc[-1]
    assert start["intent"] == "probe" and start["integration"] == "lightning"
    assert start["lightning"]["gradient_clip_val"] == 5.0 and start["lightning"]["gradient_clip_algorithm"] == "norm"
    steps = history[history["kind"] == "train_step"]
    assert (steps["clip_norm"] == 5.0).all() and steps["lr_groups"].map(len).eq(1).all()
    # the optimizer stepped with the clipped gradients: at most the clip, never above it
    assert (steps["optimizer_grad_norm"] <= 5.0 * (1 + 1e-6)).all()
    assert (steps["grad_clipped"] == (steps["grad_norm_total"] > 5.0)).all()


# ---------------------------------------------------------------------------- faults stay red

@pytest.mark.stage2_probe
def test_a_detached_residual_stays_red_with_its_cause(tmp_path, lit):
    torch.manual_seed(0)
    model = faults.DetachedResidual(resolve_preset("stage2_probe", lit.TINY).model)
    lit.train_with_lightning(tmp_path / "run", model=model)
    _, verdicts, diagnoses = judged(tmp_path / "run")
    assert oks(verdicts)["residual_head_learning"] is False
    named = [d for d in diagnoses if "residual_head_learning" in d.signals]
    assert named and named[0].cause_id != "unexplained", named


@pytest.mark.stage2_probe
def test_a_param_group_at_lr_zero_stays_red_with_its_cause(tmp_path, lit):
    """The residual head's group at lr 0 (the others train), under a per-step schedule: Lightning
    steps such a schedule before ``on_train_batch_end``, and each step still records the lrs it used."""
    def halve_each_step(step):
        return 0.5 ** step

    trainer = lit.train_with_lightning(tmp_path / "run", group_lrs={"backbone": 3e-3, "param_head": 3e-3,
                                                                "residual_head": 0.0},
                                   lr_lambda=halve_each_step)
    history, verdicts, diagnoses = judged(tmp_path / "run")
    bad = {signal for signal, ok in oks(verdicts).items() if ok is False}
    assert "residual_head_learning" in bad
    assert any(d.cause_id == "group_lr_zero" for d in diagnoses), [(d.cause_id, d.signals) for d in diagnoses]
    lrs = history.query("kind == 'train_step'")["lr_groups"].tolist()
    assert lrs == [[3e-3 * 0.5 ** k, 3e-3 * 0.5 ** k, 0.0] for k in range(8)]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(3e-3 * 0.5 ** 8)  # given back


def test_a_nan_in_a_batch_stops_the_run_naming_the_sample(tmp_path, lit):
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* sample .* holds non-finite values"):
        lit.train_with_lightning(tmp_path / "run", loader_fault=faults.NaNInOneBatch)
    history, verdicts, diagnoses = judged(tmp_path / "run")
    assert history["kind"].tolist()[-2:] == ["error", "run_end"]  # the file is closed (on_exception)
    assert oks(verdicts)["finite"] is False
    assert any("finite" in d.signals and d.cause_id != "unexplained" for d in diagnoses), diagnoses


def test_gradient_accumulation_records_one_step_per_optimizer_step(tmp_path, lit):
    """Two micro-batches a step: one record each, holding the second micro-batch's loss as
    training_step returned it (Lightning's division by 2 undone)."""
    trainer = lit.train_with_lightning(tmp_path / "run", accumulate_grad_batches=2)
    steps = read_metrics(tmp_path / "run").query("kind == 'train_step'")
    assert trainer.global_step == 4 and steps["step"].tolist() == [1, 2, 3, 4]
    preset = resolve_preset("stage2_probe", lit.TINY)
    train_loader, _ = build_loaders(*select_rows(default_fixture_root(), preset.data), preset.data, 0)
    second = list(train_loader)[1]  # epoch 0's second micro-batch, seen with the initial weights
    torch.manual_seed(0)
    with torch.no_grad():
        correction = correct(LensCorrectionModel(preset.model), second["input_image"], True)
        expected, _ = default_loss_fn(preset.train.spec, preset.train.loss_weights)(correction, second["target_image"])
    assert steps["loss"].iloc[0] == pytest.approx(float(expected), rel=1e-6)


# ---------------------------------------------------------------------------- run folders and checkpoints

def test_a_folder_with_a_run_is_refused_and_left_as_it_was(runs, lit):
    before = (runs["dir"] / "metrics.jsonl").read_bytes()
    with pytest.raises(ExistingRunError, match="already holds a run"):
        lit.train_with_lightning(runs["dir"], epochs=1)
    assert (runs["dir"] / "metrics.jsonl").read_bytes() == before


def test_a_lightning_checkpoint_resumes_the_metrics(tmp_path, lit):
    """2 epochs, ``trainer.save_checkpoint``, then a new Trainer and callback resume to 3: the hooks'
    step count and best score ride in the checkpoint (the callback's ``state_dict``)."""
    run_dir = tmp_path / "run"
    first = lit.train_with_lightning(run_dir, epochs=2)
    first.save_checkpoint(tmp_path / "epoch2.ckpt")
    state = torch.load(tmp_path / "epoch2.ckpt", weights_only=False)["callbacks"]["AutohdrCallback"]
    assert state["hooks"]["global_step"] == 4
    lit.train_with_lightning(run_dir, epochs=3, ckpt_path=tmp_path / "epoch2.ckpt")
    history = read_metrics(run_dir)
    steps = history.query("kind == 'train_step'")
    assert steps["step"].tolist() == list(range(1, 7)) and steps["epoch"].tolist() == [0, 0, 1, 1, 2, 2]
    assert history.query("kind == 'val_epoch'")["epoch"].tolist() == [0, 1, 2]
    assert len(history.query("kind == 'run_start'")) == 2 and len(history.query("kind == 'run_end'")) == 1


def test_manual_optimization_is_refused_by_name(tmp_path, lit):
    model = LensCorrectionModel(resolve_preset("stage2_probe", lit.TINY).model)
    module = lit.ManualOptimization(model, None, residual_active=True, lr=1e-3, weight_decay=0.0)
    trainer = lit.pl.Trainer(callbacks=[lit.AutohdrCallback(tmp_path / "run")], accelerator="cpu", max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="automatic optimization with one optimizer"):
        trainer.fit(module, train_dataloaders=[{}])
    assert not (tmp_path / "run").exists()


class TestLensModel:
    """Which module of the LightningModule the hooks observe."""

    def test_the_child_that_names_the_groups(self, lit):
        module = lit.LitLens(LensCorrectionModel(), None, residual_active=True, lr=1e-3, weight_decay=0.0)
        assert lit.lens_model(module) is module.model
        assert lit.lens_model(module, "model.backbone") is module.model.backbone

    def test_a_wrong_path_names_the_children(self, lit):
        module = lit.LitLens(LensCorrectionModel(), None, residual_active=True, lr=1e-3, weight_decay=0.0)
        with pytest.raises(AttributeError, match=r"model='net'\): LitLens has no attribute 'net'; its child modules: model"):
            lit.lens_model(module, "net")


class TestStepOutputs:
    """What ``training_step`` returned, as the step record reads it."""

    def test_a_plain_loss(self, lit):
        loss = torch.tensor(0.5)
        assert lit.step_outputs(loss) == (loss, None, {})

    def test_parts_beside_the_loss_and_in_parts(self, lit):
        loss, correction, parts = lit.step_outputs({"loss": torch.tensor(0.5), "edge": torch.tensor(0.1),
                                                "parts": {"pixel": torch.tensor(0.2)}, "correction": "not one"})
        assert float(loss) == 0.5 and correction is None
        assert {name: round(float(v), 6) for name, v in parts.items()} == {"edge": 0.1, "pixel": 0.2}


# ---------------------------------------------------------------------------- what the user adds

def test_a_lightning_user_adds_three_lines(lit):
    """The import, ``callbacks=[AutohdrCallback(...)]`` in the Trainer and ``training_step``
    returning the correction and the loss parts beside the loss."""
    user_code = inspect.getsource(lit.LitLens) + inspect.getsource(lit.train_with_lightning)
    assert sum(line.rstrip().endswith("# autohdr") for line in user_code.splitlines()) == 3


# ---------------------------------------------------------------------------- the extra stays optional

def test_importing_autohdr_does_not_import_lightning():
    code = ("import sys, autohdr, autohdr.integrations\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pytorch_lightning', 'lightning', 'lightning_fabric', 'torchmetrics')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_without_lightning_the_import_names_the_extra(monkeypatch, lit):
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)  # what an install without the extra sees
    monkeypatch.delitem(sys.modules, "autohdr.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'autohdr\[lightning\]'"):
        importlib.import_module("autohdr.integrations.lightning")
