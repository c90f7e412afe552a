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
    .venv/bin/python scripts/healthy_sweep.py RESULTS --dataset photos  # a second dataset, see below
    .venv/bin/python scripts/healthy_sweep.py RESULTS --short-runs     # 1, 2, 4 steps (--medium-runs: 8-48)

``--dataset photos`` trains on pairs generated at run time (into a temporary folder) from photographs
the fixtures do not use (matplotlib's bundled sample images), with scripts/make_fixture_dataset.py's
own pair generator, stored at a non-square size (PHOTO_STORED_HW) and trained at non-square sizes
(PHOTO_VARIATIONS). The lens model works in normalized coordinates, so resizing a pair (input and
target alike) to another aspect ratio keeps its ground truth exact.

Runs go to temporary folders that are removed afterwards; the data root is only read.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autohdr.runs.debug import run_debug_mode  # noqa: E402
from autohdr.runs.presets import MODES, load_preset  # noqa: E402

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


#: The photo dataset's variations: non-square training sizes (H and W divisible by 16); a key of
#: ``None`` with a dict value sets several keys.
PHOTO_VARIATIONS: tuple[tuple[str, str | None, object], ...] = (
    ("photos 96x144", "data.resize_hw", [96, 144]),
    ("photos 128x96", "data.resize_hw", [128, 96]),
    ("photos 112x160 batch 4", None, {"data.resize_hw": [112, 160], "data.batch_size": 4}),
)
#: Runs of 1, 2 and 4 training steps (one epoch at 64 px, batch 4; 8 / 8 / 16 pairs), on either
#: dataset (``--short-runs``): every signal must say n/a below its minimum evidence, never BAD.
SHORT_RUNS: tuple[tuple[str, str | None, object], ...] = (
    ("1 step", None, {"data.num_pairs": 8, "data.resize_hw": [64, 64], "data.batch_size": 4, "train.epochs": 1,
                      "train.max_steps_per_epoch": 1}),
    ("2 steps", None, {"data.num_pairs": 8, "data.resize_hw": [64, 64], "data.batch_size": 4, "train.epochs": 1}),
    ("4 steps", None, {"data.num_pairs": 16, "data.resize_hw": [64, 64], "data.batch_size": 4, "train.epochs": 1}),
)
#: Runs of 8 to 48 steps (16 pairs, batch 4: 4 steps an epoch; ``--medium-runs``): between the short runs and
#: the presets, where the overfit signals and loss_decreases reach their minimum evidence (12 and 3 epochs).
MEDIUM_RUNS: tuple[tuple[str, str | None, object], ...] = tuple(
    (f"{epochs} epochs of 4 steps", None, {"data.num_pairs": 16, "data.batch_size": 4, "train.epochs": epochs})
    for epochs in (2, 3, 4, 6, 8, 12))
#: Where each run's metrics.jsonl is kept (``--keep DIR``), so ``--rejudge`` judges the runs again
#: with the signals as they are now (set by :func:`main`).
KEEP_DIR: Path | None = None

#: Matplotlib's bundled photographs (none of them in the fixtures): name -> sample-data file.
PHOTO_SOURCES = {"grace_hopper": "grace_hopper.jpg", "present_pack": "Minduka_Present_Blue_Pack.png"}
PHOTO_PAIRS, PHOTO_SIZE, PHOTO_STORED_HW = 32, 192, (160, 240)


def _matplotlib_photo(file_name: str):
    def load():
        import numpy as np
        from matplotlib import cbook
        from PIL import Image
        with Image.open(cbook.get_sample_data(file_name, asfileobj=False)) as image:
            return np.asarray(image.convert("RGB"))
    return load


def make_photo_dataset(folder: Path, seed: int = 0, pairs: int = PHOTO_PAIRS) -> Path:
    """Generate ``pairs`` pairs from :data:`PHOTO_SOURCES` into ``folder`` with
    make_fixture_dataset's generator (square, then each image resized to PHOTO_STORED_HW); returns the
    data root (``folder/pairs``; ground truth in ``folder/ground_truth.csv``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import make_fixture_dataset as mfd
    from PIL import Image
    saved_sources, saved_cache = dict(mfd.SOURCES), dict(mfd._SOURCE_CACHE)
    mfd.SOURCES.clear()
    mfd.SOURCES.update({name: (_matplotlib_photo(file), 1) for name, file in PHOTO_SOURCES.items()})
    mfd._SOURCE_CACHE.clear()
    try:
        mfd.generate(folder, seed=seed, pairs=pairs, size=PHOTO_SIZE, check=0, log=lambda message: None)
    finally:
        mfd.SOURCES.clear()
        mfd.SOURCES.update(saved_sources)
        mfd._SOURCE_CACHE.clear()
        mfd._SOURCE_CACHE.update(saved_cache)
    height, width = PHOTO_STORED_HW
    for path in sorted((folder / "pairs").glob("*.jpg")):
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((width, height), Image.BILINEAR)
        resized.save(path, quality=mfd.JPEG_QUALITY)
    return folder / "pairs"


def _key(mode: str, label: str, seed: int, dataset: str = "fixtures") -> str:
    return f"{mode}|{label}|{seed}" + ("" if dataset == "fixtures" else f"|{dataset}")


def run_one(mode: str, label: str, key: str | None, value: object, seed: int, data_root: str | None) -> dict:
    """One healthy run of ``mode`` with one override (``key=None`` with a dict: those overrides);
    its verdicts as ``{signal: [ok, detail]}``."""
    preset = load_preset(mode)
    if key is None:
        overrides = dict(value) if isinstance(value, dict) else {}
    else:
        overrides = {key: value(preset) if callable(value) else value}
    out = Path(tempfile.mkdtemp(prefix="autohdr-sweep-"))
    started = time.perf_counter()
    kept = None
    try:
        report = run_debug_mode(mode, out_dir=out / "run", device="cpu", seed=seed, overrides=overrides,
                                data_root=data_root, plots=False, log=lambda message: None)
        if KEEP_DIR is not None:
            KEEP_DIR.mkdir(parents=True, exist_ok=True)
            kept = KEEP_DIR / (re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{mode}-{label}-s{seed}-{data_root or 'fixtures'}")[-120:]
                               + ".jsonl")
            shutil.copyfile(out / "run" / "metrics.jsonl", kept)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    loss = next((v for v in report["verdicts"] if v["signal"] == "loss_decreases"), {})
    return {"mode": mode, "variation": label, "seed": seed, "overrides": overrides,
            "wall_s": round(time.perf_counter() - started, 1), "all_good": report["all_good"],
            "error": report["error"], "loss_relative_drop": loss.get("evidence", {}).get("relative_drop"),
            "verdicts": {v["signal"]: [v["ok"], v["detail"]] for v in report["verdicts"]},
            "metrics_file": str(kept) if kept else None}


def rejudge(record: dict) -> dict:
    """``record`` with its verdicts judged again from its kept metrics.jsonl by the signals as they
    are now (the run's recorded judge config); a record without a kept file is returned unchanged."""
    path = record.get("metrics_file")
    if not path or not Path(path).is_file():
        return record
    from autohdr.diagnosis.metrics_log import read_metrics
    from autohdr.diagnosis.run_intent import judge_config_for
    from autohdr.diagnosis.verdicts import all_good, judge
    history = read_metrics(path)
    verdicts = judge(history, judge_config_for(history))
    return {**record, "all_good": all_good(verdicts), "rejudged": True,
            "verdicts": {v.signal: [v.ok, v.detail] for v in verdicts}}


def _group(record: dict) -> str:
    """A summary row's name: the mode, with the dataset when it is not the fixtures."""
    dataset = record.get("dataset", "fixtures")
    return record["mode"] if dataset == "fixtures" else f"{record['mode']} [{dataset}]"


def summarize(records: list[dict]) -> str:
    """Per mode: runs, runs with any BAD signal, BAD count per signal (with the variations), and
    the smallest loss drop ``loss_decreases`` saw."""
    lines = []
    for mode in sorted({_group(r) for r in records}):
        mine = [r for r in records if _group(r) == mode]
        bad = Counter()
        where: dict[str, list[str]] = {}
        for r in mine:
            for signal, (ok, _) in r["verdicts"].items():
                if ok is False:
                    bad[signal] += 1
                    where.setdefault(signal, []).append(f"{r['variation']} s{r['seed']}")
        drops = [r["loss_relative_drop"] for r in mine if r["loss_relative_drop"] is not None]
        lines.append(f"{mode}: {len(mine)} healthy runs, {sum(not r['all_good'] for r in mine)} with a BAD signal"
                     + (f"; smallest loss drop {min(drops):.2%}" if drops else ""))
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
    parser.add_argument("--dataset", choices=("fixtures", "photos"), default="fixtures",
                        help="photos: pairs generated now from matplotlib's photographs, non-square sizes")
    parser.add_argument("--variations", nargs="+", default=None, help="only these variation labels")
    parser.add_argument("--short-runs", action="store_true", help="runs of 1, 2 and 4 steps (SHORT_RUNS) instead "
                                                                  "of the dataset's variations")
    parser.add_argument("--medium-runs", action="store_true", help="runs of 8-48 steps (MEDIUM_RUNS) instead of "
                                                                   "the dataset's variations")
    parser.add_argument("--keep", type=Path, default=None, help="keep each run's metrics.jsonl in this folder")
    parser.add_argument("--rejudge", action="store_true", help="judge the kept runs again with the current signals "
                                                               "(with --summary: nothing is run)")
    args = parser.parse_args(argv)
    global KEEP_DIR
    KEEP_DIR = args.keep
    records = [json.loads(line) for line in args.results.read_text().splitlines()] if args.results.is_file() else []
    if not args.summary:
        done = {_key(r["mode"], r["variation"], r["seed"], r.get("dataset", "fixtures")) for r in records}
        variations = PHOTO_VARIATIONS if args.dataset == "photos" else VARIATIONS
        if args.short_runs:
            variations = SHORT_RUNS
        if args.medium_runs:
            variations = MEDIUM_RUNS
        if args.variations:
            variations = tuple(v for v in variations if v[0] in args.variations)
        todo = [(m, v, s) for m in args.modes for v in variations for s in args.seeds
                if _key(m, v[0], s, args.dataset) not in done]
        data_root, photo_dir = args.data_root, None
        if args.dataset == "photos" and todo:
            photo_dir = Path(tempfile.mkdtemp(prefix="autohdr-photos-"))
            data_root = str(make_photo_dataset(photo_dir))
        try:
            _run_all(todo, data_root, args, records)
        finally:
            if photo_dir is not None:
                shutil.rmtree(photo_dir, ignore_errors=True)
    if args.rejudge:
        records = [rejudge(r) for r in records]
    print(summarize(records) if records else "no runs recorded")
    return 0


def _run_all(todo: list, data_root: str | None, args: argparse.Namespace, records: list[dict]) -> None:
    """Run ``todo`` (mode, variation, seed) in order, appending each record to the results file."""
    for index, (mode, (label, key, value), seed) in enumerate(todo, 1):
        record = run_one(mode, label, key, value, seed, data_root)
        record["dataset"] = args.dataset
        with args.results.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        records.append(record)
        bad = [s for s, (ok, _) in record["verdicts"].items() if ok is False]
        print(f"[{index}/{len(todo)}] {mode} {label} seed {seed}: {record['wall_s']} s, "
              f"{'ALL GOOD' if record['all_good'] else 'BAD ' + ', '.join(bad)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
