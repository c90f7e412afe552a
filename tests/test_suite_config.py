"""This repository's own pytest configuration (conftest.py): what it changes in pytest, checked here."""

from __future__ import annotations

import sys

import conftest


def _rewritten(module_name: str) -> bool:
    return type(getattr(sys.modules[module_name], "__loader__", None)).__name__ == "AssertionRewritingHook"


def test_third_party_plugin_modules_are_left_as_written_and_the_tests_are_rewritten():
    import hypothesis.core  # noqa: F401  (imported by the suite's property tests at collection anyway)

    assert "hypothesis" in conftest.THIRD_PARTY_LEFT_AS_WRITTEN
    assert not _rewritten("hypothesis.core") and not _rewritten("hypothesis.strategies")
    assert _rewritten(__name__)  # this module keeps pytest's assertion messages


def test_assertion_messages_of_the_tests_still_show_the_values():
    values = {"loss": 0.25}
    try:
        assert values["loss"] == 0.5
    except AssertionError as error:
        assert "0.25" in str(error)  # pytest's rewriting explains the comparison
    else:
        raise AssertionError("the failing assert did not raise")
