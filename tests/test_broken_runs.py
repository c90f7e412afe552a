"""Broken runs: a diverged or cut-short run is judged like any other, never a traceback.

* ``metrics.jsonl`` holds numbers as JSON numbers (non-finite ones as ``NaN`` / ``Infinity``),
  never as strings, and :func:`read_metrics` gives them back as floats, also from files an older
  autohdr wrote with ``"nan"`` strings;
* every signal takes non-finite and missing values in any numeric field (hand-made histories);
* a run diverged on purpose (a NaN loss at step 1, at the last step, a learning rate of 1e6) ends,
  through ``autohdr debug`` and ``autohdr judge`` alike, with the verdict table, the ``diverged``
  cause and exit 1.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autohdr import cli
from autohdr.diagnosis.causes import diagnose
from autohdr.runs.debug import run_debug_mode
from autohdr.diagnosis.metrics_log import MetricsWriter, read_metrics
from autohdr.diagnosis.verdicts import NOT_JUDGED_ERROR, SIGNALS, format_table, judge, numeric_history
from autohdr.lens.model import LensCorrectionModel
from tests.cli_factories import SMALL_CONFIG
from tests.test_verdicts import healthy_records

#: The smallest run that shows a divergence: 4 pairs, batch 2, 64x64, 2 epochs = 4 steps.
TINY = {"data.num_pairs": 4, "data.batch_size": 2, "data.resize_hw": [64, 64],
        "judge.require_beats_constant_lens": False}
TINY_CLI = ["--device", "cpu", "--no-plots", "--model-factory", "tests.cli_factories:small_model",
            "--set", "data.num_pairs=4", "--set", "data.batch_size=2", "--set", "data.resize_hw=64x64",
            "--set", "judge.require_beats_constant_lens=false", "--epochs", "2"]


# ---------------------------------------------------------------------------- metrics.jsonl

class TestNonFiniteMetrics:
    def write(self, path: Path, records: list[dict]) -> Path:
        writer = MetricsWriter(path / "metrics.jsonl")
        writer.start_fresh()
        for record in records:
            writer.write(record)
        writer.close()
        return path / "metrics.jsonl"

    def test_non_finite_values_are_json_tokens_and_read_back_as_floats(self, tmp_path):
        path = self.write(tmp_path, [{"kind": "train_step", "step": 1, "loss": math.nan, "lr": math.inf,
                                      "best": -math.inf, "nested": {"lr": math.inf, "ok": 0.5}, "missing": None,
                                      "batch_fingerprint": "0123456789012345", "probe": "12e45"}])
        text = path.read_text(encoding="utf-8")
        assert '"nan"' not in text and '"inf"' not in text and '"-inf"' not in text
        assert '"loss": NaN' in text and '"lr": Infinity' in text and '"best": -Infinity' in text
        row = read_metrics(tmp_path).iloc[0]
        assert math.isnan(row["loss"]) and row["lr"] == math.inf and row["best"] == -math.inf
        assert row["nested"] == {"lr": math.inf, "ok": 0.5}
        assert row["batch_fingerprint"] == "0123456789012345" and row["probe"] == "12e45"  # checksums stay text
        frame = pd.read_json(path, lines=True, dtype=False, precise_float=True)  # the README's pandas reading
        assert math.isnan(frame["loss"].iloc[0]) and frame["lr"].iloc[0] == math.inf

    def test_scalars_from_numpy_and_torch_are_written_as_numbers(self, tmp_path):
        import numpy as np
        path = self.write(tmp_path, [{"kind": "train_step", "a": np.float32(0.5), "b": torch.tensor(2.0),
                                      "c": np.int64(3)}])
        record = json.loads(path.read_text(encoding="utf-8"))
        assert record == {"kind": "train_step", "a": 0.5, "b": 2.0, "c": 3}

    def test_a_file_with_strings_from_an_older_autohdr_reads_as_floats(self, tmp_path):
        (tmp_path / "metrics.jsonl").write_text(
            '{"kind": "run_start", "config": {"lr": "inf"}}\n'
            '{"kind": "train_step", "step": 1, "lr": "inf", "param_delta_residual_head": "nan", "best": "-inf", '
            '"message": "nan loss", "batch_fingerprint": "00000000000000aa"}\n', encoding="utf-8")
        frame = read_metrics(tmp_path)
        step = frame.iloc[1]
        assert step["lr"] == math.inf and math.isnan(step["param_delta_residual_head"]) and step["best"] == -math.inf
        assert frame.iloc[0]["config"] == {"lr": math.inf}
        assert step["message"] == "nan loss" and step["batch_fingerprint"] == "00000000000000aa"

    def test_strings_break_a_median_and_read_metrics_restores_them(self, tmp_path):
        """The bug itself: the strings an older writer produced break a median; read back, they are floats."""
        frame = pd.DataFrame.from_records([{"x": "nan"}, {"x": 0.5}, {"x": "inf"}])
        with pytest.raises(TypeError):
            frame["x"].median()
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"kind": "k", **r}) + "\n" for r in
                                                        frame.to_dict("records")), encoding="utf-8")
        assert read_metrics(tmp_path)["x"].median() == math.inf


# ---------------------------------------------------------------------------- every signal, odd values

ODD_VALUES = [math.nan, math.inf, -math.inf, None, "nan", "inf"]


def _numeric_fields(records: list[dict]) -> list[str]:
    return sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


def _broken(base: list[dict], name: str, where: str, value) -> pd.DataFrame:
    """``base`` with field ``name`` set to ``value`` on every record holding it (or the last one), as
    the signals see it: numbers coerced (:func:`numeric_history`, as ``judge`` does first and
    ``read_metrics`` does for ``"nan"`` strings)."""
    records = copy.deepcopy(base)
    holders = [r for r in records if name in r]
    for record in holders if where == "every record" else holders[-1:]:
        record[name] = value
    return numeric_history(pd.DataFrame.from_records(records))


def _seen_as(base: list[dict], name: str, where: str, value) -> tuple:
    """What the signals can tell of field ``name`` once set to ``value`` (see :func:`_broken`): its
    dtype and values after coercion (NaN compares equal here), built from that column alone."""
    column = [{name: r[name]} if name in r else {} for r in base]
    holders = [i for i, r in enumerate(base) if name in r]
    for i in holders if where == "every record" else holders[-1:]:
        column[i] = {name: value}
    seen = numeric_history(pd.DataFrame.from_records(column))[name]
    return str(seen.dtype), tuple(map(repr, seen))


@pytest.mark.parametrize("value", ODD_VALUES, ids=repr)
def test_every_signal_takes_a_non_finite_or_missing_value_in_any_field(value):
    """Each numeric field of a healthy stage-2 history, on every record or only the last one, set to
    ``value``: every signal still returns a verdict (no exception, no "breaks the signal" n/a), and the
    table and the causes are written. A case the signals see exactly as an earlier value's (``None``
    in a column of floats is NaN; ``"inf"`` is read back as inf) is that case, judged under that value."""
    base = healthy_records("stage2_hybrid")
    earlier = ODD_VALUES[:ODD_VALUES.index(value)] if value in ODD_VALUES else []
    broken, judged = [], 0
    for name in _numeric_fields(base):
        for where in ("every record", "the last record"):
            mine = _seen_as(base, name, where, value)
            if any(_seen_as(base, name, where, other) == mine for other in earlier):
                continue
            judged += 1
            history = _broken(base, name, where, value)
            verdicts = judge(history)
            assert [v.signal for v in verdicts] == list(SIGNALS)
            format_table(verdicts)
            diagnose(verdicts, history)
            broken += [f"{name} on {where}: {v.signal}: {v.detail}" for v in verdicts
                       if v.detail.startswith(NOT_JUDGED_ERROR)]
    assert not broken, "\n".join(broken)
    assert judged or earlier, "nothing judged"


def test_odd_values_the_signals_cannot_tell_apart_are_judged_once():
    """What the dedup above relies on: ``None`` and the strings ``"nan"`` / ``"inf"`` reach the
    signals as NaN / inf, and the one-column view is the whole history's column."""
    base = healthy_records("stage2_hybrid")
    for name in ("loss", "grad_norm_total"):
        for where in ("every record", "the last record"):
            seen = {repr(v): _seen_as(base, name, where, v) for v in ODD_VALUES}
            assert seen["None"] == seen["'nan'"] == seen["nan"] != seen["inf"] == seen["'inf'"] != seen["-inf"]
            for value in ODD_VALUES:
                whole = _broken(base, name, where, value)[name]
                assert (str(whole.dtype), tuple(map(repr, whole))) == seen[repr(value)]


def test_a_signal_that_breaks_on_text_where_numbers_belong_says_so_and_the_rest_are_judged():
    """The last guard: a column of text where numbers belong (no reader writes that) makes the signals
    that read it ``n/a`` naming the error; every other signal keeps its verdict."""
    records = healthy_records("stage2_hybrid")
    for record in records:
        if "val_proxy_total" in record:
            record["val_proxy_total"] = "high"
    verdicts = {v.signal: v for v in judge(pd.DataFrame.from_records(records))}
    assert verdicts["beats_identity"].ok is None and verdicts["beats_identity"].detail.startswith(NOT_JUDGED_ERROR)
    assert verdicts["finite"].ok is True and verdicts["loss_decreases"].ok is True


def test_a_diverged_history_with_nan_strings_is_judged_diverged():
    """The reported crash (``"nan"`` strings in param_delta_residual_head, ``"inf"`` lr), judged again."""
    records = healthy_records("stage2_hybrid", epochs=1, steps_per_epoch=3)
    records = [r for r in records if r["kind"] not in ("val_epoch", "run_end")]
    for record in records:
        if record["kind"] == "train_step":
            record.update(lr="inf", param_delta_residual_head="nan", param_delta_param_head="nan")
    records.append({"kind": "error", "name": "non_finite", "step": 4, "epoch": 0, "batch_min": 0.0,
                    "batch_max": 1.0, "batch_nonfinite": 0.0, "message": "non-finite loss (nan) at step 4"})
    history = pd.DataFrame.from_records(records)
    verdicts = judge(history)
    by_name = {v.signal: v for v in verdicts}
    assert by_name["finite"].ok is False and by_name["batches_in_range"].ok is True
    assert "diverged" in [d.cause_id for d in diagnose(verdicts, history)]


# ---------------------------------------------------------------------------- real runs diverged on purpose

class NaNAtTrainingStep(LensCorrectionModel):
    """The small model of the CLI tests, whose training step number ``step`` returns NaN parameters
    (a loss term dividing by 0, as a model): the loss of that step is NaN. Forwards without gradients
    (the instrumentation's own checks) are not steps."""

    def __init__(self, step: int) -> None:
        super().__init__(SMALL_CONFIG)
        self.step, self.calls = step, 0

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = super().forward(image)
        if self.training and torch.is_grad_enabled():  # a training step (checks run without grad)
            self.calls += 1
            if self.calls == self.step:
                return {**out, "params": out["params"] * float("nan")}
        return out


def nan_at_step_1() -> LensCorrectionModel:
    """``--model-factory`` of a model whose very first training step gives a NaN loss."""
    return NaNAtTrainingStep(1)


def _judge_cli(run_dir: Path, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["judge", str(run_dir)])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_diverged_output(code: int, out: str, err: str) -> None:
    assert code == cli.EXIT_BAD_SIGNAL, (out, err)
    assert "Traceback" not in out + err
    assert "signal" in out and "verdict" in out  # the table's header
    assert "finite " in out and "training diverged on clean inputs" in out
    assert "BAD SIGNALS" in out.splitlines()[-1]


@pytest.mark.parametrize("nan_step", [1, 4], ids=["nan-at-step-1", "nan-at-the-last-step"])
def test_a_run_that_diverges_is_judged_by_debug_and_by_judge(nan_step, tmp_path, capsys):
    out_dir = tmp_path / "run"
    report = run_debug_mode("stage2_probe", model=NaNAtTrainingStep(nan_step), out_dir=out_dir, device="cpu",
                            overrides=TINY, epochs=2, plots=False)
    assert report["error"] and f"step {nan_step}" in report["error"]
    assert not report["all_good"]
    assert "diverged" in [d["cause_id"] for d in report["diagnoses"]]
    assert {v["signal"]: v["ok"] for v in report["verdicts"]}["finite"] is False
    text = (out_dir / "metrics.jsonl").read_text(encoding="utf-8")
    assert '"nan"' not in text and '"inf"' not in text and "NaN" in text
    steps = read_metrics(out_dir)
    assert (steps["kind"] == "train_step").sum() == nan_step - 1
    _assert_diverged_output(*_judge_cli(out_dir, capsys))


def test_autohdr_debug_with_a_nan_loss_at_step_1_prints_the_table_and_exits_1(tmp_path, capsys):
    args = ["debug", "stage2_probe", "--out", str(tmp_path / "run"), *TINY_CLI]
    args[args.index("tests.cli_factories:small_model")] = "tests.test_broken_runs:nan_at_step_1"
    code = cli.main(args)
    out, err = capsys.readouterr()
    _assert_diverged_output(code, out, err)
    assert "RUN FAILED: non-finite loss" in out


def test_autohdr_debug_with_a_huge_learning_rate_diverges_and_exits_1(tmp_path, capsys):
    # fail fast on (the default): its step-3 check sees the parameters thrown to their bounds and leaves
    # the heads' zero gradients to the end instead of calling them frozen; the run diverges at step 4
    code = cli.main(["debug", "stage2_probe", "--out", str(tmp_path / "run"), *TINY_CLI, "--set", "train.lr=1e6"])
    out, err = capsys.readouterr()
    assert "fail fast: the run is diverging" in out + err and "stopped early" not in out
    _assert_diverged_output(code, out, err)
    assert "train.lr=1000000.0 too high" in out
    assert "gets no gradient" not in out and "no common cause" not in out  # the blow-up explains every BAD
    _assert_diverged_output(*_judge_cli(tmp_path / "run", capsys))


def test_fail_fast_tells_a_diverging_run_from_a_frozen_group():
    """Parameters thrown to their bounds after step 1, or a loss multiplied since step 1, is a run
    diverging; parameters at their bounds from step 1 (an offset head) or a falling loss is not."""
    from autohdr.runs.debug import diverging_evidence

    def steps(at_bound, loss):
        return pd.DataFrame([{"kind": "run_start"}] + [
            {"kind": "train_step", "step": i + 1, "params_at_bound_frac": b, "loss": l}
            for i, (b, l) in enumerate(zip(at_bound, loss))])

    assert "at their bounds by step 2" in diverging_evidence(steps([0.0, 1.0, 1.0], [0.48, 0.45, 0.44]))
    assert "loss rose from 0.48 at step 1 to 3.1 by step 2" in diverging_evidence(steps([0.0, 0.0, 0.1],
                                                                                        [0.48, 3.1, 2.5]))
    assert diverging_evidence(steps([1.0, 1.0, 1.0], [0.48, 0.47, 0.46])) is None  # saturated from the start
    assert diverging_evidence(steps([0.0, 0.0, 0.0], [0.48, 0.47, 0.46])) is None  # healthy
    assert diverging_evidence(steps([0.0], [0.48])) is None                          # one step decides nothing


def test_what_a_diverged_run_shows_before_it_stopped_is_explained_by_the_divergence():
    """A run stopped by a NaN: its heads pinned at their bounds pass no gradient, which is the blow-up
    seen from the groups, not a frozen head. The same BAD signals without the stop are a frozen head."""
    from tests.test_causes import bad, good
    verdicts = [good("batches_in_range"), bad("finite"), bad("param_head_not_saturated"),
                bad("backbone_learning", grad_zero_frac=1.0),
                bad("param_head_learning", grad_zero_frac=0.67)]
    steps = [{"kind": "train_step", "step": s, "lr": 1e6, "grad_norm_total": 1.0} for s in (1, 2, 3)]
    stopped = pd.DataFrame.from_records([{"kind": "run_start", "config": {"lr": 1e6}}, *steps,
                                         {"kind": "error", "name": "non_finite", "step": 4, "message": "nan"}])
    (item,) = diagnose(verdicts, stopped)
    assert item.cause_id == "diverged"
    assert set(item.signals) == {"finite", "param_head_not_saturated", "backbone_learning", "param_head_learning"}
    finished = stopped[stopped["kind"] != "error"]
    causes = [d.cause_id for d in diagnose(verdicts, finished)]
    assert causes[0] == "diverged" and "frozen_param_head" in causes


# ---------------------------------------------------------------------------- interrupted runs

class InterruptAtTrainingStep(LensCorrectionModel):
    """The small model whose training forward number ``step`` raises ``KeyboardInterrupt`` (Ctrl-C there)."""

    def __init__(self, step: int) -> None:
        super().__init__(SMALL_CONFIG)
        self.step, self.calls = step, 0

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.training and torch.is_grad_enabled():  # a training step (checks run without grad)
            self.calls += 1
            if self.calls == self.step:
                raise KeyboardInterrupt
        return super().forward(image)


def interrupt_at_step_5() -> LensCorrectionModel:
    """``--model-factory``: Ctrl-C in the 5th training step (4 steps done, in the second epoch)."""
    return InterruptAtTrainingStep(5)


INTERRUPT_CLI = ["--device", "cpu", "--no-plots", "--model-factory", "tests.test_broken_runs:interrupt_at_step_5",
                 "--set", "data.num_pairs=8", "--set", "data.batch_size=2", "--set", "data.resize_hw=64x64",
                 "--epochs", "3"]


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """``autohdr debug stage2_probe`` interrupted after 4 steps: (exit code, stdout, run folder)."""
    import contextlib
    import io
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["debug", "stage2_probe", "--out", str(run_dir), *INTERRUPT_CLI])
    return code, out.getvalue(), run_dir


class TestInterruptedRun:
    def test_debug_says_interrupted_where_and_exits_130(self, interrupted_run):
        code, out, run_dir = interrupted_run
        assert code == cli.EXIT_INTERRUPTED
        last = out.strip().splitlines()[-1]
        assert last.startswith("INTERRUPTED in epoch 2 after step 4: judged on the steps it ran")
        assert "BAD SIGNALS" not in out and "signal" in out and "verdict" in out  # the table is there

    def test_report_json_and_html_say_interrupted(self, interrupted_run):
        _, _, run_dir = interrupted_run
        report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
        assert report["status"] == "INTERRUPTED" and report["interrupted"] is True
        assert report["interrupted_at"] == {"epoch": 2, "step": 4}
        page = (run_dir / "report.html").read_text(encoding="utf-8")
        assert '<div class="banner interrupted" id="overall">INTERRUPTED in epoch 2 after step 4' in page
        assert "<title>stage2_probe: INTERRUPTED</title>" in page and "BAD SIGNALS" not in page

    def test_judge_of_the_interrupted_run_says_so_and_exits_130(self, interrupted_run, capsys):
        _, _, run_dir = interrupted_run
        code, out, err = _judge_cli(run_dir, capsys)
        assert code == cli.EXIT_INTERRUPTED, (out, err)
        assert out.strip().splitlines()[-1].startswith("INTERRUPTED in epoch 2 after step 4")
        page = (run_dir / "report.html").read_text(encoding="utf-8")
        assert 'class="banner interrupted"' in page
        capsys.readouterr()
        assert cli.main(["judge", str(run_dir), "--json"]) == cli.EXIT_INTERRUPTED
        printed = json.loads(capsys.readouterr().out)
        assert printed["status"] == "INTERRUPTED" and printed["interrupted_at"] == {"epoch": 2, "step": 4}

    def test_a_run_that_finished_is_not_headed_interrupted(self, tmp_path, capsys):
        """Green side: the same tiny run, not interrupted, ends with ALL GOOD or BAD SIGNALS, never INTERRUPTED."""
        args = ["debug", "stage2_probe", "--out", str(tmp_path / "run"), *INTERRUPT_CLI]
        args[args.index("tests.test_broken_runs:interrupt_at_step_5")] = "tests.cli_factories:small_model"
        args[args.index("3")] = "1"
        code = cli.main(args)
        out = capsys.readouterr().out
        assert code in (cli.EXIT_OK, cli.EXIT_BAD_SIGNAL)
        assert "INTERRUPTED" not in out
        report = json.loads((tmp_path / "run" / "report.json").read_text(encoding="utf-8"))
        assert report["status"] in ("ALL GOOD", "BAD SIGNALS") and report["interrupted_at"] is None


def test_the_headline_of_an_interrupted_run_names_its_bad_signals():
    from autohdr.diagnosis.verdicts import Verdict, overall_status, status_line
    verdicts = [Verdict("finite", True, ""), Verdict("loss_decreases", False, "rose")]
    assert overall_status(verdicts) == "BAD SIGNALS" and overall_status(verdicts[:1]) == "ALL GOOD"
    assert overall_status(verdicts, {"epoch": 1, "step": 3}) == "INTERRUPTED"
    assert status_line(verdicts, {"epoch": 1, "step": 3}) == (
        "INTERRUPTED in epoch 1 after step 3: judged on the steps it ran, BAD in what it ran: loss_decreases")
    assert status_line(verdicts[:1], True) == "INTERRUPTED: judged on the steps it ran, no BAD signal in what it ran"


def _numeric_series_by_definition(values: pd.Series) -> pd.Series:
    """numeric_series as first written (three whole-column maps): the reference its one-pass form must equal."""
    from autohdr.diagnosis.metrics_log import restore_non_finite
    from autohdr.diagnosis.verdicts import _is_number
    if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return values
    present = values.dropna().map(restore_non_finite)
    numbers = present.map(_is_number)
    if not numbers.any() or not (numbers | present.map(lambda v: isinstance(v, str))).all():
        return values
    return pd.to_numeric(values.map(restore_non_finite), errors="coerce").astype(float)


_COLUMN_VALUES = [1, 2.5, 0, math.nan, math.inf, -math.inf, None, "nan", "inf", "-inf", "abc", "", True, False,
                  {"a": 1}, [1.0, "nan"], (1, 2), pd.NA, pd.NaT, torch.tensor(1.0).item()]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_COLUMN_VALUES), min_size=1, max_size=6))
def test_numeric_series_decides_as_its_definition(values):
    from autohdr.diagnosis.verdicts import numeric_series
    column = pd.Series(values, dtype=object)
    ours, reference = numeric_series(column), _numeric_series_by_definition(column)
    assert (ours is column) == (reference is column)
    pd.testing.assert_series_equal(ours, reference)
