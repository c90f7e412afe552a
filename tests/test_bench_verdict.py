"""scripts/bench_verdict.py: the whole command's parts add up, the bare training takes the same steps.

No test asserts a time: only that the accounting is complete and consistent.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: A run of seconds: 4 pairs at 32x32, one epoch of 2 steps.
TINY = ["data.num_pairs=4", "data.batch_size=2", "data.resize_hw=[32,32]"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_verdict", REPO / "scripts" / "bench_verdict.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_verdict"] = module
    spec.loader.exec_module(module)
    return module


def _whole(whole_s: float, **parts: float) -> dict:
    return {"whole_s": whole_s, "exit_code": 0, "parts_s": parts}


def test_summary_takes_medians_and_the_ratio(bench):
    wholes = [_whole(6.0, training=2.0), _whole(9.0, training=3.0), _whole(3.0, training=1.0)]
    bares = [{"whole_s": 4.0, "steps": 16, "steps_s": 2.0}, {"whole_s": 2.0, "steps": 16, "steps_s": 1.0},
             {"whole_s": 3.0, "steps": 16, "steps_s": 1.5}]
    summary = bench.summarize("stage2_probe", wholes, bares)
    assert (summary["whole_s"], summary["bare_s"], summary["ratio_whole_to_bare"]) == (6.0, 3.0, 2.0)
    assert summary["parts_s"]["training"] == 2.0 and summary["parts_s"]["plots"] == 0.0
    assert list(summary["parts_s"]) == list(bench.PARTS)
    assert "ratio 2.00x" in bench.format_summary(summary)


def test_bad_runs_count_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--runs", "0"])
    assert "--runs must be >= 1" in capsys.readouterr().err


def test_whole_command_parts_add_up_and_the_bare_loop_takes_the_same_steps(bench):
    whole = bench.whole_command("stage2_probe", TINY, epochs=1)
    parts = whole["parts_s"]
    assert set(bench.PARTS) - {"on_verdict"} <= set(parts) <= set(bench.PARTS)
    assert all(value >= 0 for value in parts.values()), parts
    # every second of the command is in exactly one part (exit is the remainder)
    assert sum(parts.values()) == pytest.approx(whole["whole_s"], rel=1e-6)
    assert parts["training"] > 0 and parts["validation"] > 0 and parts["imports"] > 0
    bare = bench.bare_training("stage2_probe", TINY, epochs=1)
    assert bare["steps"] == 2 and bare["steps_s"] > 0 and bare["whole_s"] > bare["steps_s"]


def test_run_debug_mode_writes_its_timings_last(tmp_path):
    from autohdr.runs.debug import run_debug_mode

    report = run_debug_mode("stage2_probe", out_dir=tmp_path / "run", device="cpu", overrides=TINY, epochs=1,
                            plots=False, log=lambda message: None)
    stored = json.loads((tmp_path / "run" / "timings.json").read_text(encoding="utf-8"))
    assert stored == report["timings"]
    assert "timings" not in json.loads((tmp_path / "run" / "report.json").read_text(encoding="utf-8"))
    parts = stored["parts_s"]
    assert {"setup", "init_check", "training", "validation", "checkpoints", "judging", "report_json",
            "report_html"} <= set(parts) and "plots" not in parts
    assert sum(parts.values()) == pytest.approx(stored["run_s"], rel=1e-3, abs=1e-3)


def test_fault_summary_takes_medians_and_says_where_each_run_stopped(bench):
    stopped = {"point": "init", "step": 0, "signals": ["init_is_identity"]}
    runs = [{"name": "init-not-identity", "to_bad_s": t, "whole_s": t + 2.0, "to_bad_cpu_s": t / 2, "exit_code": 1,
             "stopped_early": stopped, "bad": ["init_is_identity"]} for t in (3.0, 1.0, 2.0)]
    (summary,) = bench.summarize_faults(runs)
    assert (summary["to_bad_s"], summary["whole_s"], summary["runs"], summary["mode"]) == (2.0, 4.0, 3, "overfit_stage1")
    assert summary["to_bad_cpu_s"] == 1.0
    assert bench.format_fault(summary) == ("init-not-identity (overfit_stage1): BAD after 2.00 s (1.00 s CPU), exit "
                                           "after 4.00 s (median of 3); stopped at init (step 0) on init_is_identity")


def test_every_benchmarked_fault_is_a_suite_fault(bench):
    from tests import faults
    for name, (mode, model, loader) in bench.STRUCTURAL_FAULTS.items():
        assert mode in ("overfit_stage1", "stage2_probe", "stage3_probe"), name
        assert (model is None) != (loader is None), name
        assert callable(getattr(faults, model or loader)), name


def test_unknown_fault_is_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--faults", "no-such-fault"])
    assert "unknown fault(s) no-such-fault" in capsys.readouterr().err
