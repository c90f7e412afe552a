#!/usr/bin/env python
"""Count false alarms: run healthy debug modes over seeds and the usual user variations, judge
every signal, and tabulate which ones went BAD.

Each variation changes one setting of the mode's preset (batch 4 and 16, resolution 96 and 192,
learning rate x0.3 and x3, 16 and 64 pairs), each at every seed, beside the preset itself. Every
run is appended to RESULTS as one JSON line (its settings, every verdict, the loss drop that
``loss_decreases`` measured), and runs already there are skipped, so the sweep can be stopped and
started again. A healthy model should leave every signal GOOD or n/a in every run.

    .venv/bin/python scripts/healthy_sweep.py RESULTS [--modes stage2_probe stage3_probe] [--seeds 0 1 2]
    .venv/bin/python scripts/healthy_sweep.py RESULTS --summary      # the table only

Runs go to temporary folders that are removed afterwards; the data root is only read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autohdr.diagnosis.debug import run_debug_mode  # noqa: E402
from autohdr.diagnosis.presets import MODES, load_preset  # noqa: E402

#: One setting changed from the preset at a time: (label, override key, value or function of the preset).
VARIATIONS: tuple[tuple[str, str | None, object], ...] = (
    ("preset", None, None),
    ("batch 4", "data.batch_size", 4),
    ("batch 16", "data.batch_size", 16),
    ("96 px", "data.resize_hw", [96, 96]),
    ("192 px", "data.resize_hw", [192, 192]),
    ("lr x0.3", "train.lr", lambda preset: preset.train.lr * 0.3),
    ("lr x3", "train.lr", lambda preset: preset.train.lr * 3.0),
    ("16 pairs", "data.num_pairs", 16),
    ("64 pairs", "data.num_pairs", 64),
)


def _key(mode: str, label: str, seed: int) -> str:
    return f"{mode}|{label}|{seed}"


def run_one(mode: str, label: str, key: str | None, value: object, seed: int, data_root: str | None) -> dict:
    """One healthy run of ``mode`` with one override; its verdicts as ``{signal: [ok, detail]}``."""
    preset = load_preset(mode)
    overrides = {} if key is None else {key: value(preset) if callable(value) else value}
    out = Path(tempfile.mkdtemp(prefix="autohdr-sweep-"))
    started = time.perf_counter()
    try:
        report = run_debug_mode(mode, out_dir=out / "run", device="cpu", seed=seed, overrides=overrides,
                                data_root=data_root, plots=False, log=lambda message: None)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    loss = next((v for v in report["verdicts"] if v["signal"] == "loss_decreases"), {})
    return {"mode": mode, "variation": label, "seed": seed, "overrides": overrides,
            "wall_s": round(time.perf_counter() - started, 1), "all_good": report["all_good"],
            "error": report["error"], "loss_relative_drop": loss.get("evidence", {}).get("relative_drop"),
            "verdicts": {v["signal"]: [v["ok"], v["detail"]] for v in report["verdicts"]}}


def summarize(records: list[dict]) -> str:
    """Per mode: runs, runs with any BAD signal, BAD count per signal (with the variations), and
    the smallest loss drop ``loss_decreases`` saw."""
    lines = []
    for mode in sorted({r["mode"] for r in records}):
        mine = [r for r in records if r["mode"] == mode]
        bad = Counter()
        where: dict[str, list[str]] = {}
        for r in mine:
            for signal, (ok, _) in r["verdicts"].items():
                if ok is False:
                    bad[signal] += 1
                    where.setdefault(signal, []).append(f"{r['variation']} s{r['seed']}")
        drops = [r["loss_relative_drop"] for r in mine if r["loss_relative_drop"] is not None]
        lines.append(f"{mode}: {len(mine)} healthy runs, {sum(not r['all_good'] for r in mine)} with a BAD signal; "
                     f"smallest loss drop {min(drops):.2%}" if drops else f"{mode}: {len(mine)} runs")
        for signal, count in bad.most_common():
            lines.append(f"  {signal}: BAD in {count} ({', '.join(where[signal])})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="JSON-lines file to append to (created if missing)")
    parser.add_argument("--modes", nargs="+", default=["stage2_probe", "stage3_probe", "overfit_stage1"],
                        choices=sorted(MODES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-root", default=None, help="default: the embedded fixtures")
    parser.add_argument("--summary", action="store_true", help="print the table of RESULTS and stop")
    args = parser.parse_args(argv)
    records = [json.loads(line) for line in args.results.read_text().splitlines()] if args.results.is_file() else []
    if not args.summary:
        done = {_key(r["mode"], r["variation"], r["seed"]) for r in records}
        todo = [(m, v, s) for m in args.modes for v in VARIATIONS for s in args.seeds
                if _key(m, v[0], s) not in done]
        for index, (mode, (label, key, value), seed) in enumerate(todo, 1):
            record = run_one(mode, label, key, value, seed, args.data_root)
            with args.results.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            records.append(record)
            bad = [s for s, (ok, _) in record["verdicts"].items() if ok is False]
            print(f"[{index}/{len(todo)}] {mode} {label} seed {seed}: {record['wall_s']} s, "
                  f"{'ALL GOOD' if record['all_good'] else 'BAD ' + ', '.join(bad)}", flush=True)
    print(summarize(records) if records else "no runs recorded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
