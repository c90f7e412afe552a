"""The diagnosis observers: the records they write are the records written before the split.

``tests/data/golden_metrics.json`` holds every record (minus clock fields) of the golden runs
(``tests/golden_runs.py``) as the code before the observers split wrote them
(``scripts/make_golden_metrics.py``); each run here must write exactly those, key by key and in order.
"""

from __future__ import annotations

import json

import pytest

from tests import golden_runs


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(golden_runs.FIXTURE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", list(golden_runs.RUNS))
def test_records_are_the_golden_records(golden, tmp_path, name):
    expected = golden["runs"][name]
    actual = golden_runs.run(name, tmp_path / name)
    assert golden_runs.structure(actual) == golden_runs.structure(expected), \
        "\n".join(golden_runs.differences(expected, actual, values=False))
    here = golden_runs.environment()
    if here != golden["environment"]:
        pytest.skip(f"structure matches; values not compared: the fixture was made with {golden['environment']}, "
                    f"this is {here} (floats are bit-exact only on the same software and CPU kind)")
    problems = golden_runs.differences(expected, actual)
    assert not problems, "\n".join(problems[:40])
