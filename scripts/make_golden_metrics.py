#!/usr/bin/env python
"""Write ``tests/data/golden_metrics.json``: the records of the golden runs (``tests/golden_runs.py``).

    .venv/bin/python scripts/make_golden_metrics.py            # all runs (about 30 s on one thread)
    .venv/bin/python scripts/make_golden_metrics.py --check    # compare with the fixture, write nothing
    .venv/bin/python scripts/make_golden_metrics.py --runs attach_competition   # that run only; the rest kept

The fixture pins what ``metrics.jsonl`` holds; ``tests/test_observers.py`` fails on any change to a
record. Regenerate it only for a change of the records that is meant (and say so in the commit),
never to make that test pass after a refactor. It was first generated on the code before the
observers split (the commit that adds this script), so that test proves the split changed nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import golden_runs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the fixture instead of writing it")
    parser.add_argument("--runs", nargs="*", default=list(golden_runs.RUNS), help="which runs (default: all)")
    args = parser.parse_args(argv)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            runs[name] = golden_runs.run(name, Path(tmp) / name)
            print(f"{name}: {len(runs[name])} records", file=sys.stderr)
    if args.check:
        stored = json.loads(golden_runs.FIXTURE.read_text(encoding="utf-8"))
        problems = [f"{name}: {d}" for name in runs
                    for d in golden_runs.differences(stored["runs"][name], runs[name])]
        print("\n".join(problems) or "same records", file=sys.stderr)
        return 1 if problems else 0
    # runs not asked for keep their stored records and environment; a bf16 run stores its own environment
    payload = (json.loads(golden_runs.FIXTURE.read_text(encoding="utf-8")) if golden_runs.FIXTURE.is_file()
               else {"environment": golden_runs.environment(), "runs": {}})
    if set(args.runs) >= set(golden_runs.RUNS) - golden_runs.BF16_RUNS:
        payload["environment"] = golden_runs.environment()
    payload["runs"] = {name: runs.get(name, payload["runs"].get(name)) for name in golden_runs.RUNS}
    payload["run_environments"] = {name: environment for name, environment in
                                   payload.get("run_environments", {}).items() if name not in runs}
    payload["run_environments"].update({name: golden_runs.environment(name) for name in runs
                                        if name in golden_runs.BF16_RUNS})
    golden_runs.FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    golden_runs.FIXTURE.write_text(json.dumps(payload, allow_nan=True, separators=(",", ":")) + "\n",
                                   encoding="utf-8")
    print(f"wrote {golden_runs.FIXTURE} ({golden_runs.FIXTURE.stat().st_size // 1024} KiB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
