"""The README's examples are files the gate runs.

* ``examples/attach_your_loop.py``: the README's "Attach to your loop" snippet is exactly the
  example's lines marked ``# autohdr``; the example runs as the README says and its run, judged as
  ``autohdr judge`` judges it, has no BAD signal.
* ``examples/user_repo/pyproject.toml``: the README's ``[tool.autohdr]`` block is exactly its table.
* every ``docs/...`` link of the README names a page that exists.
"""

from __future__ import annotations

import re
import runpy
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from autohdr.diagnosis.metrics_log import read_metrics
from autohdr.diagnosis.run_intent import judge_config_for
from autohdr.diagnosis.verdicts import judge

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLE = ROOT / "examples" / "attach_your_loop.py"
USER_REPO = ROOT / "examples" / "user_repo"
MARK = "# autohdr"


def readme_block(heading: str, language: str) -> str:
    """The first fenced ``language`` block under the README's ``## heading``."""
    text = README.read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match, f"no ```{language} block under '## {heading}' in README.md"
    return match.group(1)


def marked_lines(source: str) -> list[str]:
    """The lines ending in ``# autohdr``, without the mark, dedented one by one."""
    return [line.rstrip()[:-len(MARK)].strip() for line in source.splitlines() if line.rstrip().endswith(MARK)]


def test_the_readme_shows_exactly_the_examples_autohdr_lines():
    lines = marked_lines(EXAMPLE.read_text(encoding="utf-8"))
    assert len(lines) == 3
    assert [line.strip() for line in readme_block("Attach to your loop", "python").splitlines()] == lines


def test_the_marked_lines_are_found_and_a_changed_one_is_not():
    source = "import autohdr  # autohdr\nx = 1\n    run.close()    # autohdr\n"
    assert marked_lines(source) == ["import autohdr", "run.close()"]
    assert marked_lines(source.replace("run.close()", "run.close(interrupted=True)")) != ["import autohdr", "run.close()"]


def test_the_readme_block_is_the_user_repos_table():
    block = readme_block("In your repository", "toml")
    pyproject = (USER_REPO / "pyproject.toml").read_text(encoding="utf-8")
    start = pyproject.index("[tool.autohdr]\n")
    assert pyproject[start:].strip() == block.strip()  # the table ends the file: nothing after it
    assert tomllib.loads(block)["tool"]["autohdr"] == tomllib.loads(pyproject)["tool"]["autohdr"]


def test_every_docs_link_of_the_readme_exists():
    links = re.findall(r"\]\((docs/[^)#]+)", README.read_text(encoding="utf-8"))
    assert links
    assert [link for link in links if not (ROOT / link).is_file()] == []


@pytest.fixture(scope="module")
def attached_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python examples/attach_your_loop.py --out DIR``, run in this process (no second torch import)."""
    out = tmp_path_factory.mktemp("example") / "attached"
    argv = sys.argv
    sys.argv = [str(EXAMPLE), "--out", str(out)]
    try:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    finally:
        sys.argv = argv
    return out


def test_the_attached_example_runs_and_has_no_bad_signal(attached_run):
    history = read_metrics(attached_run)
    verdicts = {v.signal: v for v in judge(history, judge_config_for(history))}  # as `autohdr judge` does
    assert {s: v.detail for s, v in verdicts.items() if v.ok is False} == {}
    assert len(history[history["kind"] == "train_step"]) == 8  # 8 pairs, batch 4, 4 epochs
    for signal in ("init_is_identity", "loss_decreases", "residual_head_learning", "residual_contributes",
                   "scores_move", "optimizer_covers_params"):
        assert verdicts[signal].ok is True, (signal, verdicts[signal].detail)


def test_the_example_refuses_a_folder_that_holds_a_run(attached_run):
    before = (attached_run / "metrics.jsonl").read_bytes()
    argv = sys.argv
    sys.argv = [str(EXAMPLE), "--out", str(attached_run)]
    try:
        with pytest.raises(FileExistsError, match="already holds a run"):
            runpy.run_path(str(EXAMPLE), run_name="__main__")
    finally:
        sys.argv = argv
    assert (attached_run / "metrics.jsonl").read_bytes() == before


def test_the_readme_keeps_its_two_commands():
    text = README.read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    main_job = "    scripts/bootstrap.sh && .venv/bin/autohdr debug overfit_stage1\n"
    test_command = "    scripts/bootstrap.sh && .venv/bin/python -m pytest -n auto\n"
    assert main_job in text and test_command in text
    assert textwrap.dedent(test_command) in ci  # .ci/run runs the README's test command
