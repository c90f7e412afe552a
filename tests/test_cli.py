"""The ``autohdr`` command line: exit codes, one-line errors, the run folder and ``autohdr judge``.

Exit codes (autohdr/cli.py): 0 every applicable signal good, 1 a bad signal fired, 2 usage or input
error (one ``autohdr: error: ...`` line on stderr, no traceback), 130 interrupted.

Runs are tiny (4 pairs, batch 2, 4 epochs = 8 steps; measured all good). Each shared run trains
once per session, whatever ``-n`` is: pytest-xdist workers take a file lock and the later ones
read the stored result. Most calls go through ``autohdr.cli.main`` in-process; one full run goes
through ``python -m autohdr`` and the installed ``autohdr`` console script is exercised where it
exists. Torch gets this worker's share of the cores (oversubscribed OpenMP threads on 2 cores make
a run many times slower).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from autohdr.training.checkpoint import load_checkpoint
from autohdr.cli import EXIT_BAD_SIGNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, main
from autohdr.training.config import to_dict
from autohdr.diagnosis.verdicts import SIGNALS
from tests.cli_factories import SMALL_CONFIG, small_model
from tests.helpers_data import REPO_ROOT, copy_pairs, write_pair
from tests.plugins.data_fixtures import hash_tree
from tests.plugins.debug_runs import once_per_session

#: 4 pairs in batches of 2 for 4 epochs: 8 optimizer steps, enough for every overfit signal.
# 8 steps on 4 pairs: a smoke run of the CLI, not an overfit, so learning each image's lens
# (beats_constant_lens) is reported, not judged. At 128x128: batches of 2 at the preset's 96x96 have
# gradients above the clip norm on about half the steps, which clipping_sane rightly calls out.
QUICK = ["--device", "cpu", "--epochs", "4", "--set", "data.num_pairs=4", "--set", "data.batch_size=2",
         "--set", "data.resize_hw=128x128", "--set", "judge.require_beats_constant_lens=false"]
RUN_FILES = ("metrics.jsonl", "report.json", "report.html", "curves.png", "triplets.png", "best.pt", "last.pt",
             "train_split.csv", "val_split.csv")
REPORT_KEYS = {"mode", "stage", "verdicts", "figures", "all_good"}
CONSOLE_SCRIPT = Path(sys.executable).parent / "autohdr"


@dataclass(frozen=True)
class CliResult:
    """Exit code and captured output of one ``autohdr`` call."""

    code: int
    stdout: str
    stderr: str

    @property
    def error_line(self) -> str:
        """The single stderr line of a usage error (fails the test when there is not exactly one)."""
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in self.stderr, self.stderr
        assert lines[0].startswith("autohdr: error: "), lines[0]
        return lines[0]


def run_cli(*argv) -> CliResult:
    """``autohdr.cli.main(argv)`` in-process, with stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return CliResult(code, out.getvalue(), err.getvalue())


def _cores_per_worker() -> int:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return max(1, (os.cpu_count() or 1) // workers)


def run_process(*command, cwd: Path = REPO_ROOT) -> CliResult:
    env = {**os.environ, "OMP_NUM_THREADS": str(_cores_per_worker())}
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    return CliResult(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module", autouse=True)
def _worker_share_of_cores():
    before = torch.get_num_threads()
    torch.set_num_threads(_cores_per_worker())
    yield
    torch.set_num_threads(before)


def _once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], dict]) -> dict:
    """``make(folder)`` once per session across xdist workers; its JSON-able result is stored in ``folder``."""
    return once_per_session(tmp_path_factory, "cli-runs", name, make)[0]


def read_report(out_dir: Path) -> dict:
    return json.loads((out_dir / "report.json").read_text(encoding="utf-8"))


def verdict_triples(verdicts: list[dict]) -> list[tuple]:
    return [(v["signal"], v["ok"], v["detail"]) for v in verdicts]


@dataclass(frozen=True)
class DebugCall:
    """A finished ``autohdr debug`` call: its result, run folder, and the data root's hash before and after."""

    result: CliResult
    out_dir: Path
    data_hash_before: str
    data_hash_after: str

    @property
    def report(self) -> dict:
        return read_report(self.out_dir)


@pytest.fixture(scope="module")
def data_copy(fixture_root, tmp_path_factory) -> Path:
    """The first 4 fixture pairs copied to a folder shared by the workers (no ground_truth.csv beside them)."""
    def make(folder: Path) -> dict:
        return {"root": str(copy_pairs(fixture_root, folder / "pairs", 4))}
    return Path(_once(tmp_path_factory, "data-copy", make)["root"])


def _debug_call(tmp_path_factory, name: str, data_root: Path, *extra) -> DebugCall:
    def make(folder: Path) -> dict:
        before = hash_tree(data_root)
        result = run_cli("debug", "overfit_stage1", "--data-root", data_root, "--out", folder / "run", *QUICK,
                         "--no-plots", *extra)
        return {"result": dataclasses.asdict(result), "out_dir": str(folder / "run"),
                "data_hash_before": before, "data_hash_after": hash_tree(data_root)}
    stored = _once(tmp_path_factory, name, make)
    return DebugCall(CliResult(**stored["result"]), Path(stored["out_dir"]), stored["data_hash_before"],
                     stored["data_hash_after"])


@pytest.fixture(scope="module")
def healthy_run(data_copy, tmp_path_factory) -> DebugCall:
    return _debug_call(tmp_path_factory, "healthy", data_copy)


@pytest.fixture(scope="module")
def frozen_run(data_copy, tmp_path_factory) -> DebugCall:
    """Learning rate 0: the weights never move, so scores and probe checksums stay frozen (measured)."""
    # the whole run (fail fast would stop it at step 3: backbone without gradient, groups that do not move)
    return _debug_call(tmp_path_factory, "frozen-lr0", data_copy, "--set", "train.lr=0", "--no-fail-fast")


@pytest.fixture(scope="module")
def process_run(tmp_path_factory) -> tuple[CliResult, Path]:
    """``python -m autohdr debug`` with plots, on the default (embedded fixture) data."""
    def make(folder: Path) -> dict:
        result = run_process(sys.executable, "-m", "autohdr", "debug", "overfit_stage1", "--out", folder / "run", *QUICK)
        return {"result": dataclasses.asdict(result), "out_dir": str(folder / "run")}
    stored = _once(tmp_path_factory, "python-m-autohdr", make)
    return CliResult(**stored["result"]), Path(stored["out_dir"])


# ------------------------------------------------------------------------------ exit codes of debug

class TestDebugExitCodes:
    def test_healthy_run_exits_0(self, healthy_run):
        assert healthy_run.result.code == EXIT_OK, healthy_run.result.stdout
        assert healthy_run.report["all_good"] is True
        assert "ALL GOOD" in healthy_run.result.stdout

    def test_bad_signal_exits_1(self, frozen_run):
        assert frozen_run.result.code == EXIT_BAD_SIGNAL, frozen_run.result.stdout
        report = frozen_run.report
        assert report["all_good"] is False
        bad = {v["signal"] for v in report["verdicts"] if v["ok"] is False}
        assert {"scores_move", "probe_checksums_change"} <= bad, bad
        assert "BAD SIGNALS" in frozen_run.result.stdout
        assert "likely cause\n- the learning rate is 0 (train.lr=0.0)" in frozen_run.result.stdout

    def test_python_m_autohdr(self, process_run):
        result, out_dir = process_run
        assert "Traceback" not in result.stderr
        assert result.code == (EXIT_OK if read_report(out_dir)["all_good"] else EXIT_BAD_SIGNAL)
        assert result.code == EXIT_OK, result.stdout

    def test_interrupt_exits_130(self, data_copy, tmp_path):
        result = run_cli("debug", "overfit_stage1", "--data-root", data_copy, "--out", tmp_path / "run", *QUICK,
                         "--no-plots", "--model-factory", "tests.cli_factories:interrupting_model")
        assert result.code == EXIT_INTERRUPTED
        assert read_report(tmp_path / "run")["interrupted"] is True
        assert (tmp_path / "run" / "interrupted.pt").is_file()

    def test_model_factory(self, data_copy, tmp_path):
        result = run_cli("debug", "overfit_stage1", "--data-root", data_copy, "--out", tmp_path / "run", *QUICK,
                         "--no-plots", "--model-factory", "tests.cli_factories:small_model")
        report = read_report(tmp_path / "run")
        assert result.code == (EXIT_OK if report["all_good"] else EXIT_BAD_SIGNAL), result.stderr
        checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
        assert checkpoint["model_config"] == to_dict(SMALL_CONFIG)
        expected = {name: tuple(t.shape) for name, t in small_model().state_dict().items()}
        assert {name: tuple(t.shape) for name, t in checkpoint["model"].items()} == expected


# ------------------------------------------------------------------------------ the run folder

class TestRunFolder:
    def test_report_keys(self, healthy_run):
        report = healthy_run.report
        assert REPORT_KEYS <= set(report), set(report)
        assert (report["mode"], report["stage"]) == ("overfit_stage1", "stage1_param_only")
        assert [v["signal"] for v in report["verdicts"]] == list(SIGNALS)
        assert report["all_good"] == all(v["ok"] is not False for v in report["verdicts"])

    def test_out_dir_contents(self, process_run):
        _, out_dir = process_run
        missing = [name for name in RUN_FILES if not (out_dir / name).is_file() or (out_dir / name).stat().st_size == 0]
        assert not missing, sorted(p.name for p in out_dir.iterdir())
        for figure in ("curves.png", "triplets.png"):
            assert (out_dir / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
        for checkpoint in ("best.pt", "last.pt"):
            assert load_checkpoint(out_dir / checkpoint)["stage"] == "stage1_param_only"

    def test_no_plots_skips_the_figures(self, healthy_run):
        present = {p.name for p in healthy_run.out_dir.iterdir()}
        assert set(RUN_FILES) - {"curves.png", "triplets.png"} <= present, present
        assert not present & {"curves.png", "triplets.png"}, present

    @pytest.mark.parametrize("run", ["healthy_run", "frozen_run"])
    def test_data_root_is_unchanged(self, request, data_copy, run):
        call: DebugCall = request.getfixturevalue(run)
        assert Path(call.report["data_root"]) == data_copy
        assert call.data_hash_after == call.data_hash_before


# ------------------------------------------------------------------------------ judge

class TestJudge:
    @pytest.mark.parametrize("run", ["healthy_run", "frozen_run"])
    def test_json_verdicts_equal_the_report(self, request, run):
        call: DebugCall = request.getfixturevalue(run)
        result = run_cli("judge", call.out_dir, "--json")
        printed = json.loads(result.stdout)
        assert verdict_triples(printed["verdicts"]) == verdict_triples(call.report["verdicts"])
        assert printed["all_good"] is call.report["all_good"]
        assert result.code == (EXIT_OK if call.report["all_good"] else EXIT_BAD_SIGNAL)

    @pytest.mark.parametrize(("run", "line"), [("healthy_run", "ALL GOOD"), ("frozen_run", "BAD SIGNALS")])
    def test_table_ends_with_the_summary_line(self, request, run, line):
        call: DebugCall = request.getfixturevalue(run)
        result = run_cli("judge", call.out_dir)
        assert result.stdout.strip().splitlines()[-1] == f"{line} -- report: {call.out_dir / 'report.html'}"
        assert (call.out_dir / "report.html").is_file()

    def test_table_lists_every_verdict(self, frozen_run):
        result = run_cli("judge", frozen_run.out_dir)
        mark = {True: "GOOD", False: "BAD", None: "n/a"}
        lines = result.stdout.strip().splitlines()[2:2 + len(frozen_run.report["verdicts"])]  # then: likely causes
        assert [(line.split()[0], line.split()[1]) for line in lines] == [
            (v["signal"], mark[v["ok"]]) for v in frozen_run.report["verdicts"]]
        assert "\nlikely cause\n- the learning rate is 0 (train.lr=0.0)" in result.stdout

    def test_mode_selects_the_thresholds(self, frozen_run):
        """stage2_probe reports beats_identity without judging it (the overfit preset requires it, from 12
        epochs: this short run's stored verdict names that minimum); every other verdict is unchanged."""
        result = run_cli("judge", frozen_run.out_dir, "--mode", "stage2_probe", "--json")
        judged = {v["signal"]: v for v in json.loads(result.stdout)["verdicts"]}
        stored = {v["signal"]: v for v in frozen_run.report["verdicts"]}
        assert stored["beats_identity"]["ok"] is None and stored["beats_identity"]["evidence"]["min_epochs"] == 12
        assert judged["beats_identity"]["ok"] is None and "min_epochs" not in judged["beats_identity"]["evidence"]
        assert judged["beats_identity"]["detail"].startswith("not required"), judged["beats_identity"]["detail"]
        assert {k: v["ok"] for k, v in judged.items() if k != "beats_identity"} == {
            k: v["ok"] for k, v in stored.items() if k != "beats_identity"}

    def test_console_script_judge(self, process_run):
        if not CONSOLE_SCRIPT.is_file():
            pytest.skip(f"no console script at {CONSOLE_SCRIPT} (package not installed in this environment)")
        _, out_dir = process_run
        result = run_process(CONSOLE_SCRIPT, "judge", out_dir, "--json")
        assert "Traceback" not in result.stderr
        assert verdict_triples(json.loads(result.stdout)["verdicts"]) == verdict_triples(read_report(out_dir)["verdicts"])
        assert result.code == (EXIT_OK if read_report(out_dir)["all_good"] else EXIT_BAD_SIGNAL)

    def test_folder_without_metrics(self, tmp_path):
        result = run_cli("judge", tmp_path)
        assert result.code == EXIT_USAGE
        assert str(tmp_path / "metrics.jsonl") in result.error_line

    def test_missing_folder(self, tmp_path):
        result = run_cli("judge", tmp_path / "absent")
        assert result.code == EXIT_USAGE
        assert "no metrics file" in result.error_line and str(tmp_path / "absent") in result.error_line

    def test_report_with_unknown_thresholds(self, healthy_run, tmp_path):
        (tmp_path / "metrics.jsonl").write_bytes((healthy_run.out_dir / "metrics.jsonl").read_bytes())
        (tmp_path / "report.json").write_text(json.dumps({"config": {"judge": {"no_such_threshold": 1}}}))
        result = run_cli("judge", tmp_path)
        assert result.code == EXIT_USAGE
        assert "unknown key 'no_such_threshold'" in result.error_line

    def test_report_with_wrongly_typed_threshold(self, healthy_run, tmp_path):
        (tmp_path / "metrics.jsonl").write_bytes((healthy_run.out_dir / "metrics.jsonl").read_bytes())
        (tmp_path / "report.json").write_text(json.dumps({"config": {"judge": {"beats_identity_margin": "abc"}}}))
        result = run_cli("judge", tmp_path)
        assert result.code == EXIT_USAGE
        assert "beats_identity_margin" in result.error_line and "expected float" in result.error_line

    def test_metrics_with_a_line_that_is_not_json(self, healthy_run, tmp_path):
        lines = (healthy_run.out_dir / "metrics.jsonl").read_text().splitlines()
        (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
        result = run_cli("judge", tmp_path)
        assert result.code == EXIT_USAGE
        assert f"{tmp_path / 'metrics.jsonl'}:4" in result.error_line and "not JSON" in result.error_line

    def test_metrics_of_something_else(self, tmp_path):
        (tmp_path / "metrics.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
        result = run_cli("judge", tmp_path)
        assert result.code == EXIT_USAGE
        assert "no autohdr records" in result.error_line and str(tmp_path / "metrics.jsonl") in result.error_line


# ------------------------------------------------------------------------------ usage and input errors

@pytest.fixture(scope="module")
def error_roots(tmp_path_factory, fixture_root) -> dict[str, Path]:
    """Data roots that must be refused: missing, empty, and one with a pair of mismatched sizes."""
    base = tmp_path_factory.mktemp("cli_error_roots")
    (base / "empty").mkdir()
    mismatched = copy_pairs(fixture_root, base / "mismatched", 1)
    write_pair(mismatched, "p900", size=(32, 48), target_size=(40, 48))
    (base / "a_file").write_text("not a folder")
    return {"missing": base / "missing", "empty": base / "empty", "mismatched": mismatched,
            "file": base / "a_file"}


USAGE_ERRORS = [
    # (id, argv after "debug overfit_stage1 --out OUT --data-root DATA", fragments of the error line)
    ("unknown-set-key", ["--set", "train.no_such_key=1"], ["unknown config key 'train.no_such_key'"]),
    ("bad-set-value", ["--set", "train.epochs=many"], ["train.epochs", "expected int", "'many'"]),
    ("set-without-equals", ["--set", "train.lr"], ["'train.lr'", "key=value"]),
    ("set-out-of-range", ["--set", "data.num_pairs=0"], ["num_pairs", ">= 1"]),
    ("bad-device", ["--device", "tpu"], ["auto, cpu or cuda", "'tpu'"]),
    ("factory-without-colon", ["--model-factory", "small_model"], ["MODULE:FUNCTION", "'small_model'"]),
    ("factory-module-missing", ["--model-factory", "no_such_module:f"], ["cannot import module 'no_such_module'"]),
    ("factory-function-missing", ["--model-factory", "tests.cli_factories:no_such_factory"],
     ["'tests.cli_factories'", "no callable 'no_such_factory'"]),
    ("factory-raises", ["--model-factory", "tests.cli_factories:raises"],
     ["tests.cli_factories:raises", "RuntimeError", "factory exploded"]),
    ("set-none-for-a-number", ["--set", "train.lr=none"], ["train.lr", "expected float", "None"]),
    ("set-text-for-an-optional-int", ["--set", "max_steps_per_epoch=abc"],
     ["train.max_steps_per_epoch", "expected int | None", "'abc'"]),
    ("set-none-for-a-resolution", ["--set", "data.resize_hw=none"], ["data.resize_hw", "expected tuple[int, int]"]),
    ("set-value-for-a-table", ["--set", "judge=3"], ["judge", "expected a table", "'3'"]),
    ("set-top-level-key", ["--set", "mode=other"], ["unknown config key 'train.mode'"]),
    ("zero-epochs", ["--epochs", "0"], ["--epochs", ">= 1", "0"]),
    ("non-integer-epochs", ["--epochs", "two"], ["--epochs", "'two'"]),
    ("missing-init-from", ["--init-from", "absent.pt"], ["absent.pt", "does not exist"]),
]


@pytest.mark.parametrize(("extra", "fragments"), [pytest.param(a, f, id=i) for i, a, f in USAGE_ERRORS])
def test_usage_error(data_copy, tmp_path, extra, fragments):
    extra = [str(tmp_path / e) if e == "absent.pt" else e for e in extra]
    result = run_cli("debug", "overfit_stage1", "--out", tmp_path / "run", "--data-root", data_copy, *QUICK,
                     "--no-plots", *extra)
    assert result.code == EXIT_USAGE, (result.stdout, result.stderr)
    for fragment in fragments:
        assert fragment in result.error_line, result.error_line


@pytest.mark.parametrize(("root", "fragments"), [
    ("missing", ["does not exist"]),
    ("empty", ["no pairs found"]),
    ("file", ["is not a folder"]),
    ("mismatched", ["p900_original.jpg", "sizes differ"]),
])
def test_bad_data_root(error_roots, tmp_path, root, fragments):
    result = run_cli("debug", "overfit_stage1", "--data-root", error_roots[root], "--out", tmp_path / "run", *QUICK)
    assert result.code == EXIT_USAGE
    assert str(error_roots[root]) in result.error_line
    for fragment in fragments:
        assert fragment in result.error_line, result.error_line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("argv", "fragments"), [
    (["debug", "no_such_mode"], ["unknown debug mode 'no_such_mode'", "overfit_stage1"]),
    (["debug"], ["required", "mode"]),
    ([], ["required", "command"]),
    (["train", "--stage", "stage9"], ["--stage", "'stage9'"]),
    (["debug", "overfit_stage1", "--no-such-flag"], ["unrecognized arguments", "--no-such-flag"]),
    (["judge", "some_dir", "--mode", "no_such_mode"], ["unknown debug mode 'no_such_mode'"]),
], ids=["unknown-mode", "no-mode", "no-command", "bad-stage", "unknown-flag", "judge-unknown-mode"])
def test_command_line_error(tmp_path, argv, fragments):
    result = run_cli(*argv, *(["--out", tmp_path / "run"] if argv[:1] == ["debug"] and len(argv) > 1 else []))
    assert result.code == EXIT_USAGE
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in result.error_line, result.error_line


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here, so --device cuda is valid")
def test_cuda_without_cuda(data_copy, tmp_path):
    result = run_cli("debug", "overfit_stage1", "--data-root", data_copy, "--out", tmp_path / "run", *QUICK,
                     "--device", "cuda")
    assert result.code == EXIT_USAGE
    assert "--device cuda" in result.error_line and "CUDA is not available" in result.error_line


def test_out_is_an_existing_file(data_copy, tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    result = run_cli("debug", "overfit_stage1", "--data-root", data_copy, "--out", tmp_path / "taken", *QUICK)
    assert result.code == EXIT_USAGE
    assert str(tmp_path / "taken") in result.error_line


def test_console_script_usage_error(tmp_path):
    if not CONSOLE_SCRIPT.is_file():
        pytest.skip(f"no console script at {CONSOLE_SCRIPT} (package not installed in this environment)")
    result = run_process(CONSOLE_SCRIPT, "debug", "no_such_mode", "--out", tmp_path / "run")
    assert result.code == EXIT_USAGE
    assert "unknown debug mode 'no_such_mode'" in result.error_line


# ------------------------------------------------------------------------------ misuse caught before training

def test_factory_returning_a_non_module(data_copy, tmp_path):
    result = run_cli("debug", "overfit_stage1", "--data-root", data_copy, "--out", tmp_path / "run", *QUICK,
                     "--model-factory", "tests.cli_factories:not_a_model")
    assert result.code == EXIT_USAGE
    assert "tests.cli_factories:not_a_model" in result.error_line


def test_out_inside_the_data_root_is_refused(fixture_root, tmp_path):
    root = copy_pairs(fixture_root, tmp_path / "data", 4)
    before = hash_tree(root)
    result = run_cli("debug", "overfit_stage1", "--data-root", root, "--out", root / "run", *QUICK, "--no-plots")
    assert hash_tree(root) == before
    assert result.code == EXIT_USAGE
    assert "--out" in result.error_line and "inside the data root" in result.error_line


def test_split_dir_inside_the_data_root_is_refused(fixture_root, tmp_path, monkeypatch):
    root = copy_pairs(fixture_root, tmp_path / "data", 4)
    before = hash_tree(root)
    monkeypatch.setenv("AUTOHDR_SPLIT_DIR", str(root / "splits"))
    result = run_cli("debug", "overfit_stage1", "--data-root", root, "--out", tmp_path / "run", *QUICK, "--no-plots")
    assert hash_tree(root) == before
    assert result.code == EXIT_USAGE
    assert "AUTOHDR_SPLIT_DIR" in result.error_line and "inside the data root" in result.error_line


def test_the_command_runs_the_users_exit_handlers_before_it_leaves(tmp_path):
    """``entry`` skips interpreter teardown with ``os._exit``, but a user module's ``atexit`` handlers
    (a --model-factory module that flushes its own log) still run; without the call they would not."""
    import subprocess
    import sys
    flag = tmp_path / "handler-ran"
    (tmp_path / "usermod.py").write_text(
        f"import atexit\natexit.register(lambda: open({str(flag)!r}, 'w').write('ran'))\n")
    code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import usermod; from autohdr.cli import entry; "
            f"sys.argv = ['autohdr', 'judge', {str(tmp_path / 'no-such-run')!r}]; entry()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert flag.read_text() == "ran"
