"""autohdr's pytest plugin (``autohdr.testing``) in a user's repository, red and green.

Each check builds a small user repository with ``pytester``: the model and loop of
``examples/user_repo`` (``mylens``: its own CNN, module names autohdr does not guess, its own
training loop with its own schedule), a ``[tool.autohdr]`` table and a dataset of synthetic photos
with known lens distortions made at test time. Healthy, every signal test passes (or is ``n/a``);
with a detached residual or a learning rate of 0 the matching signal tests fail, naming the cause;
without the table the plugin adds nothing. Runs are tiny (16 pairs at 64x64 or 96x96, 8 steps).
"""

from __future__ import annotations

import shutil
import textwrap
from xml.etree import ElementTree
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autohdr.runs.presets import MODES
from autohdr.diagnosis.verdicts import SIGNALS
from autohdr.testing import config as plugin_config
from autohdr.testing.plugin import ACTIVE_PLUGIN_NAME, CONFIG_KEY
from autohdr.testing.signal_tests import NO_CUDA_REASON

pytest_plugins = ["pytester"]

# An in-process pytester run inside pytest-xdist's worker gw0 inherits that worker's environment, and
# pytest-benchmark's session there warns (only on gw0) that xdist disables benchmarks: a warning about
# the run inside the test, not about this suite, which appeared or not with the scheduling.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Benchmarks are automatically disabled because xdist plugin is active")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "user_repo"
GROUPS = '{ backbone = "features", param_head = "lens", residual_head = "refine" }'
#: Tiny runs: 16 pairs, batch 8, the preset's 4 epochs (8 steps); the user's loop at 64x64, autohdr's
#: Trainer at 96x96 (at 64x64 its 8 steps leave this model's residual slightly hurting: residual_helps BAD).
TINY = '{{ "data.num_pairs" = 16, "data.resize_hw" = [{size}, {size}] }}'
#: Signals unrelated to a detached residual or a zero learning rate: they must stay green. (Not
#: clipping_sane: it needs >= 8 steps, and fail fast stops these runs before that, so it is n/a.)
UNRELATED = ("finite", "batches_in_range", "init_is_identity", "param_head_not_saturated")


# ----------------------------------------------------------------------------- the user's dataset

def _photo(rng: np.random.Generator, size: int) -> np.ndarray:
    """A ``(size, size, 3)`` float image in [0, 1]: a gradient with straight bars and boxes (lines a lens bends)."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    image = np.stack([0.3 + 0.4 * xx, 0.3 + 0.4 * yy, 0.5 - 0.2 * xx * yy], -1)
    for _ in range(6):
        centre, half_width = rng.uniform(0.05, 0.95), rng.uniform(0.01, 0.03)
        image[np.abs((xx if rng.random() < 0.5 else yy) - centre) < half_width] = rng.uniform(0, 1, 3)
    for _ in range(3):
        (x0, y0), side = rng.uniform(0.1, 0.7, 2), rng.uniform(0.1, 0.25)
        image[(xx > x0) & (xx < x0 + side) & (yy > y0) & (yy < y0 + side)] = rng.uniform(0, 1, 3)
    return np.clip(image, 0, 1)


def make_pairs(folder: Path, count: int, size: int = 128, seed: int = 0) -> Path:
    """``shot<i>_original.jpg`` (distorted by a random barrel lens) and ``shot<i>_generated.jpg`` (clean)."""
    from autohdr.lens.geometry import invert_brown_conrady_grid, warp

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        clean = torch.from_numpy(_photo(rng, size)).permute(2, 0, 1)[None]
        params = torch.tensor([[rng.uniform(0.1, 0.3), rng.uniform(-0.03, 0.05), 0, 0, 0, 0, 0,
                                rng.uniform(0.97, 1.03)]], dtype=torch.float64)
        distorted = warp(clean, invert_brown_conrady_grid(params, size, size))
        for tag, image in (("original", distorted), ("generated", clean)):
            pixels = (image[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"shot{index:03d}_{tag}.jpg", quality=92)
    return folder


@pytest.fixture(scope="module")
def user_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("user-data") / "pairs", 16, size=96)


# ----------------------------------------------------------------------------- the user's repository

def user_repo(pytester: pytest.Pytester, data_root: Path | None, *, table: str | None = None,
              model_factory: str = "mylens.model:build", train: str | None = "mylens.loop:train",
              modes: tuple[str, ...] = ("stage2_probe",), own_tests: bool = False) -> pytest.Pytester:
    """``mylens`` (model and loop) plus a pyproject with ``table`` (default: a tiny ``[tool.autohdr]``)."""
    shutil.copytree(EXAMPLE / "mylens", pytester.path / "mylens")
    if own_tests:
        shutil.copytree(EXAMPLE / "tests", pytester.path / "tests")
    if table is None:
        tiny = TINY.format(size=64 if train else 96)
        lines = [f'model_factory = "{model_factory}"', f"modes = {list(modes)!r}".replace("'", '"'),
                 f'groups = {GROUPS}', 'device = "cpu"', f"overrides = {{ all = {tiny} }}"]
        if data_root is not None:
            lines.append(f'data_root = "{data_root.as_posix()}"')
        if train:
            lines.append(f'train = "{train}"')
        table = "[tool.autohdr]\n" + "\n".join(lines)
    pytester.makepyprojecttoml(textwrap.dedent("""
        [tool.pytest.ini_options]
        addopts = "--strict-markers -ra -p no:cacheprovider"
        pythonpath = ["."]
    """) + "\n" + table)
    return pytester


def plant_zero_lr(pytester: pytest.Pytester) -> None:
    """The loop bug: every step's learning rate is multiplied by 0."""
    loop = pytester.path / "mylens" / "loop.py"
    loop.write_text(loop.read_text().replace("LR_FACTOR = 1.0", "LR_FACTOR = 0.0"))


@pytest.fixture(scope="module", autouse=True)
def modules_kept_across_inline_runs() -> None:
    """Imported here, before any in-process run: pytester unloads the modules a run imports when it
    ends, and torch refuses to register the lazily imported ``torch._dynamo`` (pulled in by the first
    optimizer) a second time. Imported once here they stay loaded, so in-process runs can train; the
    hypothesis plugin's end-of-session import and autohdr's run modules are kept for the same reason
    (each in-process run re-imported and re-compiled them: ~0.7 s CPU per run)."""
    import torch._dynamo  # noqa: F401
    import hypothesis.internal.observability  # noqa: F401
    import autohdr.runs.debug  # noqa: F401
    import autohdr.training.trainer  # noqa: F401
    import autohdr.attachment  # noqa: F401


def run_signals(pytester: pytest.Pytester, *args: str, subprocess: bool = False) -> "SignalResults":
    """``pytest ARGS`` in this process (no second torch import: ~3 s CPU less per run), or in a
    subprocess with ``subprocess``. The base temp is put under the repository, where a subprocess run
    puts it, so the shared run's files are found in the same place either way."""
    report = pytester.path / "junit.xml"
    if subprocess:
        result = pytester.runpytest_subprocess(f"--junitxml={report}", *args)
    else:
        with pytest.MonkeyPatch.context() as env:
            for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"):  # the inner run is not a worker
                env.delenv(name, raising=False)
            result = pytester.runpytest(f"--junitxml={report}", f"--basetemp={pytester.path / 'basetemp'}", *args)
    return SignalResults(result, ElementTree.parse(report))


class SignalResults:
    """The generated tests' outcomes (``passed`` / ``failed`` / ``skipped``) and messages, by signal."""

    def __init__(self, result: pytest.RunResult, junit: ElementTree.ElementTree) -> None:
        self.result = result
        self.outcome: dict[str, str] = {}
        self.message: dict[str, str] = {}
        for case in junit.iter("testcase"):
            name = case.get("name", "")
            prefix = "test_signal[stage2_probe-"
            if not name.startswith(prefix):
                continue
            signal = name[len(prefix):-1]
            child = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
            self.outcome[signal] = "passed" if child is None else {"failure": "failed"}.get(child.tag, child.tag)
            self.message[signal] = "" if child is None else f"{child.get('message', '')}\n{child.text or ''}"

    def failed(self) -> list[str]:
        return [s for s, outcome in self.outcome.items() if outcome == "failed"]


# ----------------------------------------------------------------------------- not configured: nothing

class TestUnconfigured:
    def test_loaded_but_inactive_in_autohdrs_own_suite(self, pytestconfig):
        assert pytestconfig.pluginmanager.get_plugin("autohdr") is not None  # the pytest11 entry point
        assert pytestconfig.pluginmanager.get_plugin(ACTIVE_PLUGIN_NAME) is None
        assert CONFIG_KEY not in pytestconfig.stash

    def test_a_repository_without_the_table_gets_nothing(self, pytester):
        user_repo(pytester, None, table="[tool.other]\nkey = 1")
        pytester.makepyfile(test_own="def test_one():\n    assert True\n")
        with_plugin = pytester.runpytest("--co", "-q")
        without = pytester.runpytest("--co", "-q", "-p", "no:autohdr")
        assert with_plugin.ret == without.ret == pytest.ExitCode.OK
        assert with_plugin.outlines[:-1] == without.outlines[:-1] == ["test_own.py::test_one", ""]
        fixtures = pytester.runpytest("--fixtures").stdout.str()
        assert "autohdr_run" not in fixtures and "autohdr_overfit_split" not in fixtures
        assert "stage2_probe" not in pytester.runpytest("--markers").stdout.str()

    def test_its_markers_stay_unknown_under_strict_markers(self, pytester):
        user_repo(pytester, None, table="")
        pytester.makepyfile(test_own="import pytest\n\n@pytest.mark.stage2_probe\ndef test_one():\n    pass\n")
        result = pytester.runpytest_subprocess()  # in-process, pytest's mark registry keeps this suite's markers
        assert result.ret == pytest.ExitCode.INTERRUPTED  # collection error: not a registered marker
        result.stdout.fnmatch_lines(["*'stage2_probe' not found in `markers` configuration option*"])


# ----------------------------------------------------------------------------- configuration

class TestConfiguration:
    def test_modes_match_the_presets(self):
        assert plugin_config.MODES == MODES

    def test_one_test_per_signal_per_mode_with_its_marker(self, pytester, user_data):
        user_repo(pytester, user_data, modes=MODES)
        result = pytester.runpytest("--co", "-q")
        expected = [f"autohdr::test_signal[{m}-{s}]" for m in MODES for s in SIGNALS] + ["autohdr::test_gpu_throughput"]
        assert result.outlines[:len(expected)] == expected
        for mode in MODES:
            selected = pytester.runpytest("--co", "-q", "-m", mode)
            assert selected.outlines[:len(SIGNALS)] == [f"autohdr::test_signal[{mode}-{s}]" for s in SIGNALS]
            selected.stdout.fnmatch_lines([f"{len(SIGNALS)}/{len(expected)} tests collected*"])

    def test_command_line_options_win_over_the_table(self, pytester, user_data):
        user_repo(pytester, user_data, modes=("stage2_probe",))
        result = pytester.runpytest("--co", "-q", "--autohdr-modes", "stage3_probe,overfit_stage1")
        ids = [line for line in result.outlines if line.startswith("autohdr::test_signal")]
        assert {i.split("[")[1].split("-")[0] for i in ids} == {"stage3_probe", "overfit_stage1"}

    @pytest.mark.parametrize("line, fragment", [
        ('model_factroy = "mylens.model:build"', "unknown key 'model_factroy'"),
        ('model_factory = "mylens.model.build"', "model_factory must look like 'MODULE:FUNCTION'"),
        ('model_factory = "m:f"\nmodes = ["stage9_probe"]', "modes: unknown mode 'stage9_probe'"),
        ('model_factory = "m:f"\ndata_root = "no/such/folder"', "data_root * is not a folder"),
        ('model_factory = "m:f"\ngroups = { head = "lens" }', "groups.head: unknown group"),
        ('model_factory = "m:f"\noverrides = { stage2_probe = { "train.lrr" = 1 } }',
         "overrides for stage2_probe: unknown config key 'train.lrr'"),
        ('model_factory = "m:f"\noverrides = { stage2_probe = { "train.epochs" = "many" } }', "train.epochs"),
        ('modes = ["stage2_probe"]', "model_factory is required"),
        ('model_factory = "mylens.nomodel:build"', "model_factory: cannot import module 'mylens.nomodel' from *"),
        ('model_factory = "mylens.model:build"\ntrain = "mylens.loop:fit"', "train: module 'mylens.loop' has no callable 'fit'"),
    ])
    def test_bad_config_is_refused_naming_the_key(self, pytester, line, fragment):
        user_repo(pytester, None, table="[tool.autohdr]\n" + line)
        result = pytester.runpytest("--co")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([f"ERROR: autohdr: *pyproject.toml*[[]tool.autohdr[]]*{fragment}*"])

    @pytest.mark.parametrize("option, fragment", [
        (("--autohdr-set", "train.epochs"), "--autohdr-set 'train.epochs' must look like KEY=VALUE"),
        (("--autohdr-device", "gpu"), "--autohdr-device must be 'auto', 'cpu' or 'cuda*, got 'gpu'"),
    ])
    def test_bad_option_is_refused_naming_it(self, pytester, user_data, option, fragment):
        user_repo(pytester, user_data)
        result = pytester.runpytest("--co", *option)
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines([f"*{fragment}*"])

    def test_overrides_of_all_modes_and_of_one(self, tmp_path):
        config = plugin_config.from_table(
            {"model_factory": "m:f", "overrides": {"all": {"data": {"num_pairs": 8}, "train.epochs": 2},
                                                    "stage3_probe": {"train.epochs": 3}}},
            source="t", base_dir=tmp_path)
        assert config.mode_overrides("stage2_probe") == {"data.num_pairs": 8, "train.epochs": 2}
        assert config.mode_overrides("stage3_probe") == {"data.num_pairs": 8, "train.epochs": 3}
        changed = plugin_config.with_options(config, {"set": ["train.lr=0.01", "train.epochs=5"]}, cwd=tmp_path)
        assert changed.mode_overrides("stage2_probe")["train.lr"] == "0.01"
        assert changed.mode_overrides("stage3_probe")["train.epochs"] == "5"  # the command line wins over the table
        assert changed.describe("stage3_probe") != config.describe("stage3_probe")  # so the run is another one

    def test_fixtures_and_overfit_split_from_the_users_data(self, pytester, user_data):
        user_repo(pytester, user_data)
        pytester.makepyfile(test_own=f"""
            from pathlib import Path

            def test_split(autohdr_overfit_split, autohdr_data_root, autohdr_fixture_root):
                split = autohdr_overfit_split(3)
                assert split.train_csv.read_bytes() == split.val_csv.read_bytes()
                assert list(split.rows.image_id) == ["shot000", "shot001", "shot002"]
                assert autohdr_data_root == Path({str(user_data)!r})
                assert (autohdr_fixture_root / "p000_original.jpg").is_file()
        """)
        pytester.runpytest("test_own.py").assert_outcomes(passed=1)  # a path argument: no signal tests, no run
        assert not (pytester.path.parent / "basetemp" / "autohdr-runs").exists()

    def test_signal_tests_come_with_the_whole_repository_only(self, pytester, user_data):
        user_repo(pytester, user_data)
        pytester.makepyfile(test_own="def test_one():\n    pass\n")
        whole = len(SIGNALS) + 2  # the signals, the GPU benchmark and test_one
        for args, count in (((), whole), ((".",), whole), ((str(pytester.path),), whole), (("test_own.py",), 1)):
            pytester.runpytest("--co", *args).stdout.fnmatch_lines([f"*= {count} test* collected in *"])

    def test_gpu_benchmark_skips_with_the_reason_without_cuda(self, pytester, user_data, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"):  # the inner run is not a worker
            monkeypatch.delenv(name, raising=False)
        user_repo(pytester, user_data)
        result = pytester.runpytest("-m", "gpu", "--benchmark-only", "-p", "no:xdist")
        result.assert_outcomes(skipped=1, deselected=len(SIGNALS))
        result.stdout.fnmatch_lines([f"SKIPPED*{NO_CUDA_REASON}*"])


# ----------------------------------------------------------------------------- runs: green and red

@pytest.mark.stage2_probe
class TestSignalsOfTheUsersPipeline:
    def test_healthy_model_on_autohdrs_trainer_all_green_with_the_users_own_tests(self, pytester, user_data):
        user_repo(pytester, user_data, train=None, own_tests=True)
        run = run_signals(pytester)
        assert set(run.outcome) == set(SIGNALS)
        assert run.failed() == []
        assert run.outcome["residual_contributes"] == run.outcome["residual_head_learning"] == "passed"
        assert all(run.message[s].startswith("n/a: stage2_probe ") for s, o in run.outcome.items() if o == "skipped")
        # the user's own tests (autohdr_run on the same shared run, autohdr_overfit_split) pass too
        outcomes = run.result.parseoutcomes()
        assert outcomes.get("failed", 0) == 0 and outcomes.get("errors", 0) == 0, run.result.stdout.str()
        assert len(list(pytester.path.rglob("autohdr-runs/stage2_probe-*.done.json"))) == 1  # trained once for all

    def test_healthy_loop_under_xdist_trains_once_all_green(self, pytester, user_data):
        user_repo(pytester, user_data, train="counting_loop:train")
        calls = pytester.path / "train_calls.txt"
        pytester.makepyfile(counting_loop=f"""
            from mylens.loop import train as users_train

            def train(run_dir, settings):
                with open({str(calls)!r}, "a") as log:
                    log.write(str(run_dir) + "\\n")
                users_train(run_dir, settings)
        """)
        run = run_signals(pytester, "-n", "2", "-m", "stage2_probe", subprocess=True)  # xdist workers are processes anyway
        assert set(run.outcome) == set(SIGNALS)
        assert run.failed() == [], run.result.stdout.str()
        assert len(calls.read_text().splitlines()) == 1  # one run, shared by both workers

    def test_detached_residual_fails_its_signals_naming_the_cause(self, pytester, user_data):
        user_repo(pytester, user_data, model_factory="mylens.model:build_detached", train=None)
        run = run_signals(pytester, "-m", "stage2_probe")
        assert run.outcome["residual_head_learning"] == run.outcome["residual_contributes"] == "failed"
        message = run.message["residual_head_learning"]
        assert "stage2_probe: residual_head_learning is BAD:" in message
        assert "likely cause (frozen_residual_head): the residual_head gets no gradient" in message
        assert {s: run.outcome[s] for s in UNRELATED} == dict.fromkeys(UNRELATED, "passed")
        for signal in run.failed():  # one cause explains them all
            assert "frozen_residual_head" in run.message[signal], (signal, run.message[signal])
        # autohdr's Trainer stops at the first step of a structural fault: what it did not judge says so
        assert "the run stopped early:" in run.message["loss_decreases"]

    def test_zero_learning_rate_in_the_loop_fails_its_signals_naming_the_cause(self, pytester, user_data):
        user_repo(pytester, user_data)
        plant_zero_lr(pytester)
        run = run_signals(pytester, "-m", "stage2_probe")
        for signal in ("scores_move", "probe_checksums_change", "loss_decreases"):
            assert run.outcome[signal] == "failed", signal
            assert "likely cause (lr_zero): the learning rate is 0" in run.message[signal]
        assert {s: run.outcome[s] for s in UNRELATED} == dict.fromkeys(UNRELATED, "passed")
