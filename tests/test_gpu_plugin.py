"""tests.plugins.gpu: a ``gpu`` test is skipped with the reason without CUDA, and runs with it.

Each check runs a small throw-away project in-process with ``pytester`` and patches
``torch.cuda.is_available``, so the outcome does not depend on the machine running the suite.
The throw-away ``gpu`` test asserts that CUDA is available: if the plugin let it run on a
machine without CUDA it would fail, and if the plugin skipped it on a CUDA machine the
``passed`` count would be short.
"""

from __future__ import annotations

import pytest
import torch

from tests.plugins.gpu import NO_CUDA_REASON

pytest_plugins = ["pytester"]

SAMPLE_TESTS = """
import pytest
import torch


@pytest.mark.gpu
def test_needs_cuda():
    assert torch.cuda.is_available()


def test_runs_anywhere():
    assert 1 + 1 == 2
"""

#: the plugin, loaded by name; --strict-markers as in this project's own configuration
PLUGIN_ARGS = ("-p", "tests.plugins.gpu", "--strict-markers", "-rs")


@pytest.fixture
def sample_project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_sample=SAMPLE_TESTS)
    return pytester


def patch_cuda(monkeypatch: pytest.MonkeyPatch, available: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)


class TestWithoutCuda:
    def test_gpu_test_is_skipped_with_reason_and_others_run(self, sample_project, monkeypatch):
        patch_cuda(monkeypatch, False)
        result = sample_project.runpytest(*PLUGIN_ARGS)
        result.assert_outcomes(passed=1, skipped=1)
        result.stdout.fnmatch_lines([f"SKIPPED [[]1[]] test_sample.py:*: {NO_CUDA_REASON}"])
        assert result.ret == pytest.ExitCode.OK

    def test_selecting_only_gpu_tests_skips_them_and_exits_zero(self, sample_project, monkeypatch):
        patch_cuda(monkeypatch, False)
        result = sample_project.runpytest(*PLUGIN_ARGS, "-m", "gpu")
        result.assert_outcomes(skipped=1, deselected=1)
        result.stdout.fnmatch_lines([f"*{NO_CUDA_REASON}*"])
        assert result.ret == pytest.ExitCode.OK

    def test_without_the_plugin_the_gpu_test_would_fail(self, sample_project, monkeypatch):
        # The control: the same project, plugin not loaded (marker registered by hand).
        patch_cuda(monkeypatch, False)
        sample_project.makeini("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
        result = sample_project.runpytest("--strict-markers")
        result.assert_outcomes(passed=1, failed=1)


class TestWithCuda:
    def test_gpu_test_runs(self, sample_project, monkeypatch):
        patch_cuda(monkeypatch, True)
        result = sample_project.runpytest(*PLUGIN_ARGS)
        result.assert_outcomes(passed=2)
        result.stdout.no_fnmatch_line(f"*{NO_CUDA_REASON}*")


class TestMarkerRegistration:
    def test_plugin_registers_the_marker_once(self, sample_project):
        result = sample_project.runpytest("-p", "tests.plugins.gpu", "--markers")
        assert sum(line.startswith("@pytest.mark.gpu:") for line in result.outlines) == 1

    def test_an_ini_registration_is_not_duplicated(self, sample_project):
        sample_project.makeini("[pytest]\nmarkers =\n    gpu: needs CUDA (from the ini)\n")
        result = sample_project.runpytest("-p", "tests.plugins.gpu", "--markers")
        gpu_lines = [line for line in result.outlines if line.startswith("@pytest.mark.gpu:")]
        assert gpu_lines == ["@pytest.mark.gpu: needs CUDA (from the ini)"]
