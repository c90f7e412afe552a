"""The tests autohdr's pytest plugin adds to a configured repository (not collected by path).

* ``test_signal[MODE-SIGNAL]``: one per configured mode and signal of
  :data:`autohdr.diagnosis.verdicts.SIGNALS`, marked with the mode (and ``autohdr``). It passes when the
  signal is GOOD on the mode's shared run, fails with the verdict's detail and the likely cause when it
  is BAD, and is skipped (``n/a: ...``) when the signal does not apply to that run.
* ``test_gpu_throughput``: the user's model's training step on CUDA (pytest-benchmark; marked
  ``gpu`` and ``autohdr`` at collection: a mark at import would trip ``--strict-markers`` in a session
  that never registered them), skipped with the reason without CUDA; ``test_gpu_throughput_needs_pytest_benchmark``
  stands in for it (skipping with that reason) where pytest-benchmark is not installed.
"""

from __future__ import annotations

import pytest

from autohdr.diagnosis.verdicts import SIGNALS
from autohdr.testing.runs import JudgedRun

NO_CUDA_REASON = "needs CUDA: torch.cuda.is_available() is False on this machine"
NO_BENCHMARK_REASON = "needs pytest-benchmark (pip install 'autohdr[test]')"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "autohdr_signal" not in metafunc.fixturenames:
        return
    from autohdr.testing.plugin import CONFIG_KEY

    modes = metafunc.config.stash[CONFIG_KEY].modes
    metafunc.parametrize(("autohdr_mode", "autohdr_signal"), [
        pytest.param(mode, signal, id=f"{mode}-{signal}", marks=(getattr(pytest.mark, mode), pytest.mark.autohdr))
        for mode in modes for signal in SIGNALS])


def failure_message(run: JudgedRun, signal: str) -> str:
    """What a BAD signal's test prints: the verdict, its likely cause and where to look."""
    verdict = run.verdict(signal)
    lines = [f"{run.mode}: {signal} is BAD: {verdict.detail}"]
    cause = run.cause_of(signal)
    if cause is not None:
        lines.append(f"likely cause ({cause.cause_id}): {cause.cause}")
        lines.append(f"  look at: {cause.look_at}; runbook: {cause.runbook}")
        others = [s for s in cause.signals if s != signal]
        if others:
            lines.append(f"  the same cause explains: {', '.join(others)}")
    lines.append(f"run folder: {run.out_dir} (autohdr judge {run.out_dir})")
    return "\n".join(lines)


def test_signal(autohdr_run, autohdr_mode: str, autohdr_signal: str) -> None:
    run = autohdr_run(autohdr_mode)
    verdict = run.verdict(autohdr_signal)
    error = run.report.get("error")
    if run.report.get("interrupted"):
        pytest.fail(f"the {autohdr_mode} run was interrupted before it finished: run folder {run.out_dir}", pytrace=False)
    if verdict.ok is None:
        stopped = f" (the run stopped early: {error})" if error else ""
        pytest.skip(f"n/a: {autohdr_mode} {autohdr_signal}: {verdict.detail}{stopped}")
    if verdict.ok is False:
        pytest.fail(failure_message(run, autohdr_signal), pytrace=False)
    if error and not any(v.ok is False for v in run.verdicts):  # a crash no signal explains: nothing is proven
        pytest.fail(f"the {autohdr_mode} run stopped: {error} (run folder {run.out_dir})", pytrace=False)


def test_gpu_throughput(benchmark, autohdr_config, autohdr_data_root, tmp_path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA_REASON)
    from autohdr.testing.benchmark import check_step, gpu_train_step

    step = gpu_train_step(autohdr_config, autohdr_data_root)
    before = step.weights_checksum()
    losses = benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)
    check_step(step, losses, before)
    benchmark.extra_info.update(step.figures())


def test_gpu_throughput_needs_pytest_benchmark() -> None:
    pytest.skip(NO_BENCHMARK_REASON)
