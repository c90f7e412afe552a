#!/usr/bin/env python
"""Share of BAD signals explained by a named cause, over the fault runs the test suite makes.

Sources (``--sources``, default all):

* ``synthetic``: tests/test_verdicts.py's hand-made fault histories (``EXPECTED_BAD``), every stage;
  they record no settings (no config, no optimizer groups) unless the fault adds them.
* ``attach``: the competition-shaped loop's faults (tests/test_attach.py ``LOOP_FAULTS``).
* ``holdout``: the hold-out (tests/holdout_faults.py ``HOLDOUT``).
* ``diagnostics``: tests/test_diagnostics.py's fault runs (``FAULTS``), trained as the shared run
  fixtures train them (tests/plugins/debug_runs.py).

For every fault: its BAD signals, how many a named cause explains (any cause but ``unexplained``),
the causes and the signals left unexplained; then the totals per source and overall. Each run's
result is cached as JSON in ``--cache DIR`` (a second call trains only what is missing; debug runs
keep their folder, and ``--rejudge`` judges those again with the signals and rules as they are now).

    .venv/bin/python scripts/cause_coverage.py --cache /tmp/coverage [--sources synthetic attach]
    .venv/bin/python scripts/cause_coverage.py --cache /tmp/coverage --rejudge   # nothing trained anew
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SOURCES = ("synthetic", "attach", "holdout", "diagnostics")


@dataclass(frozen=True)
class Coverage:
    """One fault run: its BAD signals and the causes named for them."""

    source: str
    fault: str
    bad: tuple[str, ...]
    explained: tuple[str, ...]
    causes: tuple[str, ...]

    @property
    def unexplained(self) -> tuple[str, ...]:
        return tuple(s for s in self.bad if s not in self.explained)


def coverage_of(source: str, fault: str, verdicts: list[dict], diagnoses: list[dict]) -> Coverage:
    """``verdicts`` / ``diagnoses`` as report.json holds them (``to_dict``)."""
    bad = tuple(v["signal"] for v in verdicts if v["ok"] is False)
    named = [d for d in diagnoses if d["cause_id"] != "unexplained"]
    explained = tuple(s for d in named for s in d["signals"] if s in bad)
    return Coverage(source, fault, bad, explained, tuple(d["cause_id"] for d in named))


# ---------------------------------------------------------------------------------------- sources

def _synthetic() -> list[tuple[str, dict]]:
    from autohdr.diagnosis.causes import diagnose
    from autohdr.diagnosis.verdicts import judge
    from tests import test_verdicts as tv
    out = []
    for fault, per_stage in tv.EXPECTED_BAD.items():
        for stage in tv.STAGES:
            if not per_stage[stage]:
                continue  # nothing to explain in this stage (the branch is off)
            hist = tv.history(stage, fault)
            verdicts = judge(hist)
            out.append((f"{fault.__name__}[{stage}]", {"verdicts": [v.to_dict() for v in verdicts],
                                                        "diagnoses": [d.to_dict() for d in diagnose(verdicts, hist)]}))
    return out


def _judged_folder(run_dir: Path) -> dict:
    """Verdicts and diagnoses of a run folder, judged now (its recorded judge config and mode)."""
    from autohdr.diagnosis.causes import diagnose
    from autohdr.diagnosis.metrics_log import read_metrics
    from autohdr.diagnosis.run_intent import judge_config_for
    from autohdr.diagnosis.verdicts import judge
    from autohdr.runs.debug import preset_reference_lr
    history = read_metrics(run_dir)
    verdicts = judge(history, judge_config_for(history))
    start = history[history["kind"] == "run_start"].iloc[-1]
    mode = start.get("mode")
    reference = preset_reference_lr(mode, start.get("stage")) if isinstance(mode, str) else None
    return {"verdicts": [v.to_dict() for v in verdicts],
            "diagnoses": [d.to_dict() for d in diagnose(verdicts, history, reference_lr=reference)]}


def _attach(cache: Path, names: list[str] | None, train: bool = True) -> list[tuple[str, dict]]:
    import dataclasses
    from autohdr.data.settings import default_fixture_root
    from autohdr.runs.debug import build_loaders, select_rows
    from autohdr.runs.presets import load_preset
    from tests.competition_loop import run_competition_loop
    from tests.test_attach import LOOP_FAULTS
    data = dataclasses.replace(load_preset("stage2_probe").data, num_pairs=8, resize_hw=(64, 64), batch_size=4)
    loaders = build_loaders(*select_rows(default_fixture_root(), data), data, 0)
    out = []
    for name, (faults, *_rest) in LOOP_FAULTS.items():
        if names and name not in names:
            continue
        folder = cache / "attach" / name
        metrics = folder / "metrics.jsonl"
        if not (metrics.is_file() and '"kind": "run_end"' in metrics.read_text()):  # absent, or cut short
            if not train:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            run_competition_loop(folder, *loaders, epochs=2, faults=faults)
        out.append((name, _judged_folder(folder)))
    return out


def _holdout(cache: Path, names: list[str] | None, rejudge: bool, train: bool = True) -> list[tuple[str, dict]]:
    from tests.holdout_faults import HOLDOUT
    out = []
    for fault in HOLDOUT:
        if names and fault.name not in names:
            continue
        stored = cache / "holdout" / f"{fault.name}.json"
        folder = cache / "holdout" / fault.name
        if not stored.is_file():
            if not train:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            result = fault.run(folder)
            stored.parent.mkdir(parents=True, exist_ok=True)
            stored.write_text(json.dumps({"verdicts": result["verdicts"], "diagnoses": result["diagnoses"]}))
        # judged again from the folder (each run records its mode and judge config), so the figures
        # are the rules' as they are now
        out.append((fault.name, _judged_folder(folder) if rejudge else json.loads(stored.read_text())))
    return out


def _diagnostics(cache: Path, names: list[str] | None, rejudge: bool, train: bool = True) -> list[tuple[str, dict]]:
    from tests.plugins.debug_runs import _train
    from tests.test_diagnostics import FAULTS
    out = []
    for fault in FAULTS:
        spec = fault.spec
        if names and spec.name not in names:
            continue
        folder = cache / "diagnostics" / spec.name
        stored = folder / "report.json"
        if not stored.is_file():
            if not train:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            _train(spec, folder)
        report = _judged_folder(folder) if rejudge else json.loads(stored.read_text())
        out.append((spec.name, report))
    return out


# ---------------------------------------------------------------------------------------- table

def table(rows: list[Coverage]) -> str:
    lines = []
    for source in SOURCES:
        mine = [r for r in rows if r.source == source]
        if not mine:
            continue
        for r in mine:
            left = f"; unexplained {', '.join(r.unexplained)}" if r.unexplained else ""
            lines.append(f"{source} {r.fault}: BAD {len(r.bad)}, explained {len(r.explained)} "
                         f"({', '.join(r.causes) or 'no cause'}){left}")
        lines.append(_total(source, mine))
    lines.append(_total("all", rows))
    return "\n".join(lines)


def _total(label: str, rows: list[Coverage]) -> str:
    bad = sum(len(r.bad) for r in rows)
    explained = sum(len(r.explained) for r in rows)
    share = f"{explained / bad:.0%}" if bad else "n/a"
    return f"== {label}: {len(rows)} faults, {bad} BAD signals, {explained} explained by a named cause ({share})"


def collect(sources: list[str], cache: Path, names: list[str] | None = None, rejudge: bool = False,
            train: bool = True) -> list[Coverage]:
    """Every fault run of ``sources`` (trained into ``cache`` unless there; ``train=False``: only those
    already there) as :class:`Coverage` rows."""
    rows: list[Coverage] = []
    for source in sources:
        if source == "synthetic":
            found = _synthetic()
        elif source == "attach":
            found = _attach(cache, names, train)
        elif source == "holdout":
            found = _holdout(cache, names, rejudge, train)
        else:
            found = _diagnostics(cache, names, rejudge, train)
        rows += [coverage_of(source, name, r["verdicts"], r["diagnoses"]) for name, r in found]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    parser.add_argument("--cache", type=Path, required=True, help="folder for the runs and their results")
    parser.add_argument("--faults", nargs="+", default=None, help="only these fault names")
    parser.add_argument("--rejudge", action="store_true", help="judge the kept hold-out and debug-run folders again "
                                                               "with the current signals and rules")
    parser.add_argument("--no-train", action="store_true", help="only the runs already in the cache")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON lines here")
    args = parser.parse_args(argv)
    rows = collect(args.sources, args.cache, args.faults, args.rejudge, train=not args.no_train)
    if args.json:
        args.json.write_text("".join(json.dumps({**r.__dict__, "unexplained": r.unexplained}) + "\n" for r in rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
