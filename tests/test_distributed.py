"""Two CPU ranks under torchrun (gloo): the diagnostics stay true across ranks.

* A healthy two-rank run gives the same verdicts as the one-rank run with the same global batch
  (2 ranks x 4 = 1 rank x 8), and in fact the same validation scores: DistributedSampler hands the
  two ranks the two halves of the single-rank batch and DDP averages their gradients.
* ``ranks_in_sync`` is green there and red on a deliberately unsynchronized run: batch-norm
  statistics kept per rank (``ddp_broadcast_buffers=false``), so the ranks' models drift apart;
  the same batch-norm model with DDP's default buffer broadcast stays green.
* Only rank 0 writes: one metrics file, one report, and checkpoints that load in one process.

The runs train 16 pairs at 64 px (``SMALL``), not the preset's 32 at 128 px (half the CPU). The size
proves as much: each rank's batch-norm running statistics come from its own shard from the first step
on, so an unsynchronized run's checksums differ at every validation at any size; the healthy comparison
is with the one-rank run of the same configuration (``ONE_RANK``). 4 epochs of 2 steps keep the 8
steps that ``not_data_bound``, ``clipping_sane`` and ``residual_helps`` need to be judged.

At this size starting the launcher and two ranks that import torch and autohdr costs about as much
as a run, so the three stage2_probe runs (:data:`PROBES`) share one launch: :mod:`tests.ddp_jobs` runs
them one after the other in the same two rank processes, each in a process group and process state of
its own, with its own exit code and output (measured: 16-19 s of CPU for the one launch, 31-34 s for
three). Two launches stay real ``-m autohdr`` ones, to prove the entry point under torchrun: the
SIGTERM test here and ``test_reliability``'s refused folder; one more test runs ``tests.ddp_jobs``'
rank side alone in one process (no launcher) to check that a job that raises is reported as such.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autohdr.training.checkpoint import load_checkpoint
from autohdr.lens.model import LensCorrectionModel
from autohdr.diagnosis.metrics_log import read_metrics
from tests import ddp_jobs
from tests.plugins.debug_runs import RunSpec, once_per_session

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
#: The torchrun runs' size: 16 pairs at 64 px, 2 steps of a global batch of 8 per epoch.
SMALL_DATA: tuple[tuple[str, object], ...] = (("data.resize_hw", [64, 64]), ("data.num_pairs", 16))
SMALL = tuple(arg for key, value in SMALL_DATA for arg in ("--set", f"{key}={json.dumps(value)}"))
#: The healthy two-rank run's one-rank counterpart: the same data, one batch of 8 instead of two of 4.
ONE_RANK = RunSpec("healthy-stage2-64px-16pairs", "stage2_probe", overrides=SMALL_DATA)


def torchrun_env() -> dict[str, str]:
    """The environment of a torchrun launch from the tests: this checkout's autohdr, one thread per rank."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def debug_argv(out_dir: Path, *args: str) -> list[str]:
    """``autohdr debug ARGS`` on CPU, without figures, into ``out_dir``."""
    return ["debug", *args, "--device", "cpu", "--no-plots", "--out", str(out_dir)]


def run_torchrun(out_dir: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N -m autohdr debug ...`` on CPU, one thread per rank."""
    command = [*ddp_jobs.torchrun_command(nproc), "-m", "autohdr", *debug_argv(out_dir, *args)]
    return subprocess.run(command, cwd=REPO, env=torchrun_env(), capture_output=True, text=True, timeout=300)


def _report(result: subprocess.CompletedProcess, out_dir: Path) -> dict:
    report_path = out_dir / "report.json"
    assert report_path.is_file(), f"no report (exit {result.returncode}):\n{result.stderr[-3000:]}"
    return json.loads(report_path.read_text())


#: The two-rank stage2_probe runs the module judges, run one after the other in one launch (in this order).
PROBES: dict[str, tuple[str, ...]] = {
    "ddp-healthy": ("stage2_probe", *SMALL, "--set", "data.batch_size=4"),
    "ddp-unsynced": ("stage2_probe", *SMALL, "--set", "data.batch_size=4", "--set", "train.validate_every=2",
                     "--model-factory", "tests.faults:BatchNormParamHead",
                     "--set", "train.ddp_broadcast_buffers=false"),
    # the same batch-norm model with DDP's default buffer broadcast: the healthy counterpart
    "ddp-bn-synced": ("stage2_probe", *SMALL, "--set", "data.batch_size=4", "--set", "train.validate_every=2",
                      "--model-factory", "tests.faults:BatchNormParamHead"),
}


def _probe(tmp_path_factory, name: str):
    """One of the :data:`PROBES`: (result, report, folder). The first fixture to ask, in whichever xdist
    worker, runs all of them in one torchrun launch (:func:`tests.ddp_jobs.launch`); the rest read its results."""
    def make(folder: Path) -> dict:
        jobs = {job: debug_argv(folder / job / "run", *args) for job, args in PROBES.items()}
        return ddp_jobs.launch(folder, jobs, env=torchrun_env(), cwd=REPO)
    stored, folder = once_per_session(tmp_path_factory, "torchrun-runs", "ddp-stage2-probes", make)
    result = subprocess.CompletedProcess(**stored[name])
    return result, _report(result, folder / name / "run"), folder / name / "run"


@pytest.fixture(scope="module")
def two_rank_healthy(tmp_path_factory):
    return _probe(tmp_path_factory, "ddp-healthy")


@pytest.fixture(scope="module")
def two_rank_unsynced(tmp_path_factory):
    return _probe(tmp_path_factory, "ddp-unsynced")


@pytest.fixture(scope="module")
def two_rank_batchnorm_synced(tmp_path_factory):
    """The same batch-norm model with DDP's default buffer broadcast: the healthy counterpart."""
    return _probe(tmp_path_factory, "ddp-bn-synced")


def _oks(report: dict) -> dict[str, bool | None]:
    return {v["signal"]: v["ok"] for v in report["verdicts"]}


def test_two_ranks_healthy_exit_zero_and_in_sync(two_rank_healthy):
    result, report, _ = two_rank_healthy
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["world_size"] == 2 and report["all_good"]
    sync = next(v for v in report["verdicts"] if v["signal"] == "ranks_in_sync")
    assert sync["ok"] is True, sync["detail"]


def test_two_ranks_give_the_one_rank_verdicts(two_rank_healthy, debug_run):
    _, two, _ = two_rank_healthy
    one = debug_run(ONE_RANK).report
    # ranks_in_sync: n/a in one process, judged with two; train_val_agree: each rank trains on its
    # shard of the pairs while validating all of them, so train != val per rank and it says n/a
    expected = {**_oks(one), "ranks_in_sync": True, "train_val_agree": None}
    assert _oks(two) == expected


def test_two_ranks_track_the_one_rank_run(two_rank_healthy, debug_run):
    _, _, out = two_rank_healthy
    one = debug_run(ONE_RANK).history.query("kind == 'val_epoch'")["val_proxy_total"].to_numpy()
    two = read_metrics(out).query("kind == 'val_epoch'")["val_proxy_total"].to_numpy()
    # same global batches and averaged gradients: equal up to float summation order
    assert two.shape == one.shape
    assert abs(two - one).max() < 5e-3, (one, two)


def test_metrics_are_global_and_written_once(two_rank_healthy):
    _, _, out = two_rank_healthy
    history = read_metrics(out)
    assert (history["kind"] == "run_start").sum() == 1  # rank 1 wrote nothing
    start = history.query("kind == 'run_start'").iloc[0]
    assert start["world_size"] == 2
    val = history.query("kind == 'val_epoch'")
    assert val["rank_param_checksums"].map(len).eq(2).all()
    assert val["rank_probe_checksums"].map(len).eq(2).all()
    steps = history.query("kind == 'train_step'")
    assert (steps["batch_size_global"] == 8).all()


def test_checkpoint_loads_in_one_process(two_rank_healthy):
    _, _, out = two_rank_healthy
    state = load_checkpoint(out / "last.pt")
    model = LensCorrectionModel()
    model.load_state_dict(state["model"])  # no "module." prefixes from the DDP wrapper
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(1, 3, 64, 64))["params"]).all()


def test_unsynchronized_ranks_are_detected(two_rank_unsynced):
    result, report, _ = two_rank_unsynced
    verdicts = {v["signal"]: v for v in report["verdicts"]}
    assert verdicts["ranks_in_sync"]["ok"] is False, verdicts["ranks_in_sync"]["detail"]
    assert result.returncode == 1
    # no false alarm on the signals the fault does not touch
    for signal in ("finite", "residual_head_learning", "not_data_bound"):
        assert verdicts[signal]["ok"] is True, (signal, verdicts[signal]["detail"])


def test_batch_norm_with_broadcast_buffers_stays_in_sync(two_rank_batchnorm_synced):
    """The detector blames the unsynchronized statistics, not batch norm itself."""
    result, report, _ = two_rank_batchnorm_synced
    sync = next(v for v in report["verdicts"] if v["signal"] == "ranks_in_sync")
    assert sync["ok"] is True, sync["detail"]
    assert result.returncode == 0, result.stderr[-3000:]


def test_one_launch_reports_each_job_and_runs_on_after_one_that_raises(tmp_path):
    """tests.ddp_jobs' rank side, one rank without the launcher: a job that raises gives exit code 1 and
    its traceback, and the next job still runs, with its own output."""
    with socket.socket() as probe:  # a free port for the one-rank store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    jobs = ddp_jobs.write_jobs(tmp_path, {"raises": ["debug", None], "help": ["debug", "--help"]})
    env = {**torchrun_env(), "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    done = subprocess.run([sys.executable, "-m", "tests.ddp_jobs", str(jobs)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    raised, helped = (ddp_jobs.job_result(tmp_path, name, [], 1, done) for name in ("raises", "help"))
    assert raised["returncode"] == 1 and "Traceback" in raised["stderr"] and "TypeError" in raised["stderr"], raised
    assert helped["returncode"] == 0 and "usage: autohdr debug" in helped["stdout"], helped
    assert "Traceback" not in helped["stderr"] and "usage:" not in raised["stdout"]


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Rank 1 alone gets SIGTERM: the request travels with the step's all-reduce, so both ranks stop
    after step 3 and rank 0 saves interrupted.pt; a rank stopping alone would leave the other hanging
    in its next collective until the timeout."""
    # 64 px for less compute per step; the preset's 32 pairs keep step 3 inside the first epoch
    result = run_torchrun(tmp_path, "stage2_probe", "--set", "data.resize_hw=[64,64]", "--set", "data.batch_size=4",
                          "--model-factory", "tests.cli_factories:sigterm_on_rank_one")
    report = _report(result, tmp_path)
    assert report["interrupted"] is True and result.returncode != 0
    state = load_checkpoint(tmp_path / "interrupted.pt")
    assert state["global_step"] == 3 and state["epoch_complete"] is False
    history = read_metrics(tmp_path)
    assert history.query("kind == 'train_step'")["step"].tolist() == [1, 2, 3]
    assert history["kind"].tolist()[-2:] == ["interrupted", "run_end"]
