"""Run folders that cannot be corrupted, and a fault whose effect does not depend on machine speed.

* a full disk while a checkpoint is written: one line naming the checkpoint and "no space left on
  device", exit 2, the previous checkpoints intact, no temporary left;
* temporaries that a killed process left behind are removed at the next save (only those);
* one run per folder (``run.lock``): a second run is refused naming the holder's pid, a stale lock
  is taken over with a notice, a finished run's folder is not reused without ``--resume``;
* a torn last line of ``metrics.jsonl``: judged and resumed from the complete lines, with a notice
  naming ``file:line``; any other bad line stays an error;
* ``--resume`` with another ``--epochs``: the cosine schedule is recomputed and said; fewer epochs
  than already trained is refused;
* ids that differ only in letter case are refused; ``report.json`` records the applied settings;
* the data-bound fault holds batches back relative to the step's own compute (a fake clock shows
  its share of the step is the same at any speed).

CLI runs are tiny (4 pairs, batches of 2, 2 epochs = 4 steps) and the finished one is shared by
the tests that need a finished run folder (copied before a test changes it).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from autohdr.cli import EXIT_USAGE
from autohdr.data.pairs import DataError, scan_pairs
from autohdr.diagnosis.metrics_log import IncompleteLastLineWarning, MetricsWriter, read_metrics
from autohdr.training import checkpoint as ckpt
from autohdr.training import run_folder
from autohdr.training.trainer import Trainer
from tests import faults
from tests.helpers_data import copy_pairs, write_pair
from tests.helpers_trainer import config, fixture_batches, read_records, seeded, train
from tests.test_cli import CliResult, run_cli

#: 4 pairs in batches of 2 for 2 epochs: 4 optimizer steps
TINY = ["--device", "cpu", "--epochs", "2", "--set", "data.num_pairs=4", "--set", "data.batch_size=2", "--no-plots"]
STEPS_PER_EPOCH = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/plugins/threads.py


def train_cli(data_root: Path, out: Path, *extra) -> CliResult:
    """``autohdr train`` with the overfit preset on ``data_root`` (tiny), in-process."""
    return run_cli("train", "--stage", "stage1_param_only", "--config", "overfit_stage1", "--data-root", data_root,
                   "--out", out, *TINY, *extra)


@pytest.fixture(scope="module")
def pairs(fixture_root, tmp_path_factory) -> Path:
    return copy_pairs(fixture_root, tmp_path_factory.mktemp("reliability-data") / "pairs", 4)


@pytest.fixture(scope="module")
def finished_run(pairs, tmp_path_factory) -> tuple[CliResult, Path]:
    """A finished 2-epoch ``autohdr train`` run asked for amp and channels_last on a CPU (neither applies)."""
    out = tmp_path_factory.mktemp("reliability-finished") / "run"
    result = train_cli(pairs, out, "--set", "train.amp=true", "--set", "train.channels_last=true")
    assert result.code in (0, 1), result.stderr
    return result, out


def the_error_line(result: CliResult) -> str:
    """The one ``autohdr: error:`` line of a run that failed after training began (its progress
    lines come before it): last on stderr, and no traceback."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("autohdr: error: ")]
    assert errors == lines[-1:] and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def copy_run(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def live_child():
    """A live child process (it sleeps until the test ends)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield child
    child.kill()
    child.wait()


def write_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / run_folder.LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00"}))
    return path


# ------------------------------------------------------------------------------ disk full

class _FullDisk(io.RawIOBase):
    """A writable file that fails with ENOSPC once ``room`` bytes have been written, as a full disk does."""

    def __init__(self, handle, room: int) -> None:
        super().__init__()
        self.handle, self.room = handle, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()

    def fileno(self) -> int:
        return self.handle.fileno()


def fill_the_disk_after(monkeypatch, saves_that_fit: int, room: int = 100, on_save=None) -> None:
    """Every ``torch.save`` after the first ``saves_that_fit`` hits a full disk after ``room`` bytes
    (torch then raises its own RuntimeError with the ENOSPC OSError as its cause). ``on_save(f)``
    is called before each save."""
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if on_save is not None:
            on_save(f)
        if calls["n"] > saves_that_fit:
            return real_save(obj, _FullDisk(f, room), *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_keeps_the_previous_checkpoint_and_no_temporary(tmp_path, monkeypatch, where):
    path = ckpt.save_atomic({"model": {"w": torch.zeros(256)}, "epoch": 0}, tmp_path / "last.pt")
    if where == "write":
        fill_the_disk_after(monkeypatch, saves_that_fit=0)
    else:
        def no_space(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(ckpt.CheckpointWriteError) as caught:
        ckpt.save_atomic({"model": {"w": torch.ones(256)}, "epoch": 1}, path)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert "no space left on device" in str(caught.value).lower()
    monkeypatch.undo()
    previous = ckpt.load_checkpoint(path)
    assert previous["epoch"] == 0 and torch.equal(previous["model"]["w"], torch.zeros(256))
    assert temporaries(tmp_path) == []


def test_disk_full_during_a_run_exits_2_with_one_line(pairs, tmp_path, monkeypatch):
    """Epoch 1 saves last.pt and best.pt; epoch 2's last.pt meets a full disk."""
    out = tmp_path / "run"
    holders = []  # the lock while the run saves: held by this process
    fill_the_disk_after(monkeypatch, saves_that_fit=2,
                        on_save=lambda f: holders.append(json.loads((out / run_folder.LOCK_NAME).read_text())["pid"]))
    result = train_cli(pairs, out)
    monkeypatch.undo()
    assert holders == [os.getpid()] * 3
    assert result.code == EXIT_USAGE
    line = the_error_line(result)
    assert "no space left on device" in line.lower() and str(out / "last.pt") in line, line
    assert ckpt.load_checkpoint(out / "last.pt")["global_step"] == STEPS_PER_EPOCH  # epoch 1's, intact
    assert ckpt.load_checkpoint(out / "best.pt")["global_step"] == STEPS_PER_EPOCH
    assert temporaries(out) == [] and not (out / run_folder.LOCK_NAME).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the metrics file is whole, not torn
        history = read_metrics(out)
    assert history.query("kind == 'train_step'")["step"].tolist() == [1, 2, 3, 4]


# ------------------------------------------------------------------------------ orphaned temporaries

def test_orphaned_temporaries_are_removed_at_the_next_save_and_nothing_else(tmp_path, live_child):
    orphans = [f".last.pt.{dead_pid()}.abc_1234.autohdr.tmp",      # killed mid-save
               f".best.pt.{os.getpid()}.zzzzzzzz.autohdr.tmp",    # this process's, not in flight
               ".interrupted.pt.k3j_9x2a.tmp"]                    # the earlier naming (no pid)
    kept = [f".last.pt.{live_child.pid}.abcdefgh.autohdr.tmp",     # a save in flight in a live process
            "notes.tmp", ".last.pt.tmp", "last.pt.abcdefgh.tmp", ".model.bin.abcdefgh.tmp",
            "data.autohdr.tmp", "last.pt"]
    for name in orphans + kept:
        (tmp_path / name).write_bytes(b"x")
    assert sorted(p.name for p in ckpt.orphaned_temporaries(tmp_path)) == sorted(orphans)
    ckpt.save_atomic({"model": {}}, tmp_path / "best.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["best.pt"])


# ------------------------------------------------------------------------------ one run per folder

def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_pid(pairs, tmp_path):
    out = tmp_path / "run"
    with run_folder.acquire(out):  # this process is "the first run"
        result = train_cli(pairs, out)
        assert result.code == EXIT_USAGE
        assert f"in use by pid {os.getpid()}" in result.error_line, result.error_line
        assert sorted(p.name for p in out.iterdir()) == [run_folder.LOCK_NAME]  # nothing written
    assert not out.exists()  # the lock's folder, created by the lock and empty, is gone with it


def test_a_lock_of_a_live_process_is_not_taken_over(pairs, tmp_path, live_child):
    lock = write_lock(tmp_path / "run", live_child.pid)
    result = train_cli(pairs, tmp_path / "run")
    assert result.code == EXIT_USAGE and f"pid {live_child.pid}" in result.error_line
    assert json.loads(lock.read_text())["pid"] == live_child.pid


def test_a_stale_lock_is_taken_over_with_a_notice(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, pid)
    notices: list[str] = []
    with run_folder.claim(tmp_path, resume=False, log=notices.append) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert len(notices) == 1 and "stale lock" in notices[0] and f"pid {pid}" in notices[0]
    assert not (tmp_path / run_folder.LOCK_NAME).exists()


def test_a_lock_of_another_host_is_left_alone(tmp_path):
    write_lock(tmp_path, dead_pid(), host="some-other-host")
    with pytest.raises(run_folder.RunFolderError, match="some-other-host.*delete"):
        run_folder.acquire(tmp_path)
    assert (tmp_path / run_folder.LOCK_NAME).exists()


def test_the_lock_is_released_when_the_run_fails(pairs, tmp_path):
    result = train_cli(pairs, tmp_path / "run", "--model-factory", "tests.cli_factories:not_a_model")
    assert result.code == EXIT_USAGE
    assert not (tmp_path / "run" / run_folder.LOCK_NAME).exists()


def test_a_finished_run_folder_is_not_reused(pairs, finished_run):
    _, out = finished_run
    before = (out / "metrics.jsonl").read_bytes()
    result = train_cli(pairs, out)
    assert result.code == EXIT_USAGE
    line = result.error_line
    assert "already holds a run" in line and "new --out" in line and f"--resume {out / 'last.pt'}" in line, line
    assert (out / "metrics.jsonl").read_bytes() == before
    assert not (out / run_folder.LOCK_NAME).exists()


@pytest.mark.distributed
def test_under_torchrun_every_rank_refuses_a_finished_folder(finished_run, tmp_path):
    from tests.test_distributed import run_torchrun
    out = copy_run(finished_run[1], tmp_path / "run")
    result = run_torchrun(out, "overfit_stage1", "--epochs", "1")
    assert result.returncode != 0
    assert result.stderr.count("already holds a run") == 2, result.stderr[-3000:]  # one line per rank


# ------------------------------------------------------------------------------ resume

def test_resume_with_more_epochs_recomputes_the_schedule_and_says_so(pairs, finished_run, tmp_path):
    out = copy_run(finished_run[1], tmp_path / "run")
    result = train_cli(pairs, out, "--resume", out / "last.pt", "--epochs", "3")
    assert result.code in (0, 1), result.stderr
    notes = [line for line in result.stderr.splitlines() if "cosine schedule recomputed" in line]
    assert len(notes) == 1 and "planned for 2 epochs (4 steps)" in notes[0] and "for 3 (6 steps)" in notes[0], notes
    steps = read_metrics(out).query("kind == 'train_step'")
    assert steps["step"].tolist() == [1, 2, 3, 4, 5, 6]


def test_resumed_learning_rates_are_those_of_a_run_planned_that_long(tmp_path):
    """From the resumed step on, the rates equal an uninterrupted run's with the new epoch count."""
    cfg = config("stage1_param_only", epochs=2, warmup_steps=1)
    train(tmp_path / "short", cfg)
    longer = replace(cfg, epochs=4)
    full = train(tmp_path / "full", longer)
    messages: list[str] = []
    batches = fixture_batches()
    trainer = Trainer(seeded(seed=5), longer, batches, batches, out_dir=tmp_path / "short", device="cpu",
                      log=messages.append)
    trainer.fit(resume_from=tmp_path / "short" / "last.pt")
    assert sum("cosine schedule recomputed" in m for m in messages) == 1, messages
    rates = {r["step"]: r["lr"] for r in read_records(tmp_path / "short") if r["kind"] == "train_step"}
    expected = {r["step"]: r["lr"] for r in read_records(full.out_dir) if r["kind"] == "train_step"}
    resumed_from = 2 * len(batches)
    assert sorted(rates) == sorted(expected)
    assert {s: rates[s] for s in rates if s > resumed_from} == {s: expected[s] for s in expected if s > resumed_from}
    # before the resume the 2-epoch schedule was in force (it had decayed further by then)
    assert rates[resumed_from] < expected[resumed_from]


def test_resume_with_fewer_epochs_than_trained_is_refused(pairs, finished_run, tmp_path):
    out = copy_run(finished_run[1], tmp_path / "run")
    result = train_cli(pairs, out, "--resume", out / "last.pt", "--epochs", "1")
    assert result.code == EXIT_USAGE
    assert "epochs=1 is fewer than the 2 epoch(s)" in result.error_line and "--init-from" in result.error_line


# ------------------------------------------------------------------------------ torn metrics lines

def tear_last_line(path: Path) -> int:
    """Cut the file's last record in half (a crash mid-write); returns that line's number."""
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2], encoding="utf-8")
    return len(lines)


def test_read_metrics_leaves_out_a_torn_last_line_with_a_warning(finished_run, tmp_path):
    path = tmp_path / "metrics.jsonl"
    shutil.copy(finished_run[1] / "metrics.jsonl", path)
    whole = read_metrics(path)
    number = tear_last_line(path)
    with pytest.warns(IncompleteLastLineWarning, match=rf"{path}:{number}: incomplete last line"):
        torn = read_metrics(path)
    assert len(torn) == len(whole) - 1 and torn["kind"].tolist() == whole["kind"].tolist()[:-1]


@pytest.mark.parametrize("bad", ["middle", "last-with-newline"])
def test_any_other_bad_line_is_an_error_naming_file_and_line(finished_run, tmp_path, bad):
    path = tmp_path / "metrics.jsonl"
    lines = (finished_run[1] / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    if bad == "middle":
        lines[2] = lines[2][:10]
        number = 3
    else:
        lines[-1] = lines[-1][:10]
        number = len(lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=rf"{path}:{number}: not JSON"):
            read_metrics(path)


def test_a_complete_last_line_without_newline_is_kept(finished_run, tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text((finished_run[1] / "metrics.jsonl").read_text(encoding="utf-8").rstrip("\n"), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_metrics(path)["kind"].iloc[-1] == "run_end"


def test_judge_works_from_the_complete_lines_and_says_one_was_incomplete(finished_run, tmp_path):
    out = copy_run(finished_run[1], tmp_path / "run")
    number = tear_last_line(out / "metrics.jsonl")
    result = run_cli("judge", out, "--json")
    assert result.code in (0, 1) and len(json.loads(result.stdout)) > 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"autohdr: notice: {out / 'metrics.jsonl'}:{number}: incomplete last line"), lines


def test_resume_drops_a_torn_tail_and_continues_on_a_clean_line(pairs, finished_run, tmp_path):
    out = copy_run(finished_run[1], tmp_path / "run")
    number = tear_last_line(out / "metrics.jsonl")  # the run_end record, torn
    result = train_cli(pairs, out, "--resume", out / "last.pt", "--epochs", "3")
    assert result.code in (0, 1), result.stderr
    assert f"autohdr: notice: {out / 'metrics.jsonl'}:{number}: incomplete last line" in result.stderr
    text = (out / "metrics.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = read_metrics(out)
    assert history.query("kind == 'train_step'")["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert history["kind"].tolist().count("run_end") == 1 and history["kind"].iloc[-1] == "run_end"


def test_metrics_writer_continues_after_a_torn_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "run_start"}\n{"kind": "train_step", "step": 1}\n{"kind": "train_st', encoding="utf-8")
    writer = MetricsWriter(path)
    with pytest.warns(IncompleteLastLineWarning, match=rf"{path}:3"):
        writer.continue_from(1)
    writer.write({"kind": "train_step", "step": 2})
    writer.close()
    assert path.read_text(encoding="utf-8").splitlines() == [
        '{"kind": "run_start"}', '{"kind": "train_step", "step": 1}', '{"kind": "train_step", "step": 2}']
    assert temporaries(tmp_path) == []


# ------------------------------------------------------------------------------ data and report

def test_ids_differing_only_in_case_are_refused_naming_both(tmp_path):
    write_pair(tmp_path, "P005")
    write_pair(tmp_path, "p005", seed=3)
    write_pair(tmp_path, "p006", seed=5)
    with pytest.raises(DataError, match="differ only in letter case") as caught:
        scan_pairs(tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "P005_original.jpg") in message and str(tmp_path / "p005_original.jpg") in message
    assert "p006" not in message and "\n" not in message


def test_report_records_the_applied_settings_beside_the_configured(finished_run):
    report = json.loads((finished_run[1] / "report.json").read_text(encoding="utf-8"))
    assert report["config"]["train"]["amp"] is True and report["config"]["train"]["channels_last"] is True
    assert report["applied"] == {"amp": False, "channels_last": False, "device": "cpu"}  # CPU: neither applies
    run_start = read_metrics(finished_run[1]).query("kind == 'run_start'").iloc[0]
    assert bool(run_start["amp"]) is report["applied"]["amp"]


# ------------------------------------------------------------------------------ the data-bound fault

class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize("compute_s", [0.001, 0.05, 2.0], ids=["fast", "medium", "slow-loaded"])
def test_sleeping_loader_share_of_the_step_does_not_depend_on_speed(monkeypatch, compute_s):
    """The fault's data time is 3/4 of every measured step whether a step takes 1 ms or 2 s."""
    clock = _FakeClock()
    monkeypatch.setattr(faults, "time", clock)
    loader = faults.SleepingLoader(list(range(5)), factor=3.0)
    fractions = []
    for _epoch in range(2):
        iterator = iter(loader)
        while True:
            asked = clock.now
            if next(iterator, None) is None:
                break
            data = clock.now - asked
            clock.sleep(compute_s)  # the step's compute
            fractions.append(data / (clock.now - asked))
    assert fractions[0] == 0.0  # the first batch: nothing measured yet
    assert fractions[1:] == pytest.approx([0.75] * 9, rel=1e-9)
