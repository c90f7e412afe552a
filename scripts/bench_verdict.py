#!/usr/bin/env python
"""Time to a verdict: the whole ``autohdr debug MODE`` command, its parts, and the bare training it judges.

Per mode, ``--runs`` times each (medians reported):

* **whole**: ``python -m autohdr debug MODE --device cpu --out TMP`` as a fresh process, wall time
  from spawn to exit. Its parts come from the run's ``timings.json``: ``imports`` (spawn until
  ``run_debug_mode`` starts: interpreter, torch, autohdr), ``setup`` (preset, data scan, loaders,
  model, optimizer: AdamW's first use imports ``torch._dynamo``), ``init_check``, ``training``,
  ``validation``, ``checkpoints``, ``fail_fast`` (its early checks), ``judging``, ``report_json``, ``on_verdict`` (the table printed),
  ``plots``, ``report_html``, and ``exit`` (the rest: interpreter shutdown);
* **bare**: a fresh process (this script with ``--bare``) that imports torch and autohdr's model,
  geometry and losses, builds the model and AdamW exactly as the trainer does and takes the same
  number of steps on batches of the same shape (random values: no data loading, so the ratio is
  conservative);
* **ratio** = whole / bare.

``--faults`` instead times each structural fault of :data:`STRUCTURAL_FAULTS` (tests/faults.py's
broken models and loaders at the mode's preset size, fail fast on, figures and report.html written as
the command writes them) as a fresh process: **to_bad_s**, spawn until the verdict table is printed
(the BAD verdict; ``to_bad_cpu_s``: the CPU seconds the process had used by then, for a loaded machine), and
**whole_s**, spawn to exit; with where the run stopped and the signals it named.

    .venv/bin/python scripts/bench_verdict.py                                  # stage2_probe, 3 runs
    .venv/bin/python scripts/bench_verdict.py --faults --runs 3                # time to BAD, every structural fault
    .venv/bin/python scripts/bench_verdict.py --modes stage2_probe overfit_stage1 --runs 3 --json out.json
    .venv/bin/python scripts/bench_verdict.py --set data.num_pairs=8 --epochs 1 --runs 1   # a quick look

Wall times on a shared machine are noisy: run it on an idle one, and compare medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The parts of the whole command, in the order they happen (``timings.json`` keys, plus imports/exit).
PARTS: tuple[str, ...] = ("imports", "setup", "init_check", "training", "validation", "checkpoints", "fail_fast",
                          "judging",
                          "report_json", "on_verdict", "plots", "report_html", "exit")


#: Structural faults (``tests/faults.py``): name -> (mode, broken model class, broken loader wrapper).
#: One per kind of structural fault fail fast decides in the first steps.
STRUCTURAL_FAULTS: dict[str, tuple[str, str | None, str | None]] = {
    "init-not-identity": ("overfit_stage1", "StuckNonIdentity", None),
    "param-head-random-init": ("overfit_stage1", "RandomlyInitializedParamHead", None),
    "parameter-created-after-optimizer": ("overfit_stage1", "LateParameter", None),
    "optimized-parameter-unused": ("overfit_stage1", "UnusedParameters", None),
    "backbone-detached": ("overfit_stage1", "DetachedFeatures", None),
    "residual-detached": ("stage2_probe", "DetachedResidual", None),
    "residual-requires-grad-off": ("stage2_probe", "FrozenResidualHead", None),
    "batch-0-255": ("overfit_stage1", None, "Scaled255"),
    "batch-nan": ("overfit_stage1", None, "NaNInOneBatch"),
    "pairs-swapped": ("overfit_stage1", None, "SwappedPairs"),
    "dropout-at-eval": ("stage2_probe", "DropoutAtEval", None),
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def whole_command(mode: str, overrides: list[str], epochs: int | None) -> dict:
    """One ``autohdr debug`` as a fresh process: ``{"whole_s", "exit_code", "parts_s"}``."""
    with tempfile.TemporaryDirectory(prefix="bench-verdict-") as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "autohdr", "debug", mode, "--device", "cpu", "--out", str(out)]
        command += [arg for item in overrides for arg in ("--set", item)]
        command += ["--epochs", str(epochs)] if epochs is not None else []
        spawned_unix, spawned = time.time(), time.perf_counter()
        done = subprocess.run(command, cwd=tmp, env=_env(), capture_output=True, text=True)
        whole = time.perf_counter() - spawned
        if done.returncode not in (0, 1):  # 1: a BAD signal, still a verdict
            raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        timings = json.loads((out / "timings.json").read_text(encoding="utf-8"))
    parts = {"imports": max(0.0, timings["started_unix"] - spawned_unix), **timings["parts_s"]}
    parts["exit"] = max(0.0, whole - parts["imports"] - timings["run_s"])
    return {"whole_s": whole, "exit_code": done.returncode, "parts_s": parts}


def bare_training(mode: str, overrides: list[str], epochs: int | None) -> dict:
    """The bare training as a fresh process: ``{"whole_s", "steps", "steps_s"}``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--bare", "--modes", mode]
    command += [arg for item in overrides for arg in ("--set", item)]
    command += ["--epochs", str(epochs)] if epochs is not None else []
    spawned = time.perf_counter()
    done = subprocess.run(command, env=_env(), capture_output=True, text=True)
    whole = time.perf_counter() - spawned
    if done.returncode != 0:
        raise RuntimeError(f"bare training exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"whole_s": whole, **result}


def _run_bare(mode: str, overrides: list[str], epochs: int | None) -> dict:
    """Inside the ``--bare`` process: the trainer's model, optimizer and loss, the same steps, nothing else."""
    import torch
    import torch.nn.functional as F

    from autohdr.runs.presets import load_preset, override_preset
    from autohdr.lens.geometry import ALIGN_CORNERS, apply_correction
    from autohdr.lens.losses import composite_loss
    from autohdr.lens.model import LensCorrectionModel

    preset = override_preset(load_preset(mode), overrides)
    train, data = preset.train, preset.data
    spec = train.spec
    epochs = epochs or train.epochs
    steps_per_epoch = -(-data.num_pairs // data.batch_size)
    if train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, train.max_steps_per_epoch)
    steps = steps_per_epoch * epochs
    torch.manual_seed(0)
    model = LensCorrectionModel(preset.model)
    trainable = [p for name, p in model.named_parameters()
                 if p.requires_grad and (spec.residual_active or not name.startswith("residual_head."))]
    optimizer = torch.optim.AdamW(trainable, lr=train.lr * spec.lr_scale, weight_decay=train.weight_decay)
    weights = train.loss_weights
    height, width = data.resize_hw
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(steps):
        image = torch.rand(data.batch_size, 3, height, width, generator=generator)
        target = torch.rand(data.batch_size, 3, height, width, generator=generator)
        outputs = model(image)
        flow = outputs.get("residual_flow_lowres") if spec.residual_active else None
        warp = apply_correction(image, outputs["params"], flow)
        prediction = F.grid_sample(image, warp.final_grid, mode="bilinear", padding_mode="border",
                                   align_corners=ALIGN_CORNERS)
        total, _ = composite_loss(prediction, target, weights=weights, residual_flow_lowres=flow,
                                  final_grid=warp.final_grid if spec.jacobian_term else None,
                                  residual_terms=spec.residual_terms, jacobian_term=spec.jacobian_term)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, train.grad_clip_norm)
        optimizer.step()
    return {"steps": steps, "steps_s": time.perf_counter() - started}


def fault_command(name: str) -> dict:
    """One structural fault's debug run as a fresh process: ``{"to_bad_s", "whole_s", "exit_code",
    "stopped_early", "error"}`` (``to_bad_s``: spawn until the verdict table was printed)."""
    with tempfile.TemporaryDirectory(prefix="bench-fault-") as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, str(Path(__file__).resolve()), "--fault-run", name, "--out", str(out)]
        spawned_unix, spawned = time.time(), time.perf_counter()
        done = subprocess.run(command, cwd=tmp, env=_env(), capture_output=True, text=True)
        whole = time.perf_counter() - spawned
        if done.returncode != 1:  # a structural fault is a BAD verdict: exit 1
            raise RuntimeError(f"fault {name} exited {done.returncode}: {(done.stdout + done.stderr).strip()[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"name": name, "to_bad_s": result["verdict_unix"] - spawned_unix, "whole_s": whole,
            "to_bad_cpu_s": result["verdict_cpu_s"], "exit_code": done.returncode,
            "stopped_early": result["stopped_early"], "bad": result["bad"]}


def _run_fault(name: str, out: Path) -> int:
    """Inside the ``--fault-run`` process: the fault's run as ``autohdr debug`` runs it; prints the verdict
    table (stderr) when judged, then one JSON line (stdout); exits like the command (os._exit, code 1)."""
    verdict_unix: list[float] = []
    verdict_cpu: list[float] = []  # CPU seconds of this process (its start and imports included)
    from autohdr import cli
    from autohdr.data.settings import default_fixture_root
    from autohdr.runs.debug import build_loaders, resolve_preset, run_debug_mode, select_rows
    from tests import faults

    mode, model_name, loader_name = STRUCTURAL_FAULTS[name]
    model = getattr(faults, model_name)() if model_name else None
    train_loader = val_loader = None
    if loader_name:
        data = resolve_preset(mode).data
        train_rows, val_rows = select_rows(default_fixture_root(), data)
        train_loader, val_loader = build_loaders(train_rows, val_rows, data, 0)
        wrapper = getattr(faults, loader_name)
        train_loader = wrapper(train_loader)
        val_loader = wrapper(val_loader) if wrapper.applies_to_val else val_loader

    def on_verdict(report: dict) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            cli._print_report(report, summary=False)
        verdict_unix.append(time.time())
        verdict_cpu.append(time.process_time())

    report = run_debug_mode(mode, model=model, train_loader=train_loader, val_loader=val_loader, out_dir=out,
                            device="cpu", on_verdict=on_verdict, log=lambda message: print(message, file=sys.stderr))
    print(json.dumps({"verdict_unix": verdict_unix[0], "verdict_cpu_s": verdict_cpu[0],
                      "stopped_early": report.get("stopped_early"),
                      "bad": [v["signal"] for v in report["verdicts"] if v["ok"] is False]}), flush=True)
    sys.stderr.flush()
    os._exit(cli.EXIT_OK if report["all_good"] else cli.EXIT_BAD_SIGNAL)


def summarize_faults(runs: list[dict]) -> list[dict]:
    """Per fault, medians of ``to_bad_s`` and ``whole_s`` over its runs, where it stopped, what it named."""
    by_name: dict[str, list[dict]] = {}
    for run in runs:
        by_name.setdefault(run["name"], []).append(run)
    return [{"fault": name, "mode": STRUCTURAL_FAULTS[name][0], "runs": len(items),
             "to_bad_s": statistics.median(r["to_bad_s"] for r in items),
             "whole_s": statistics.median(r["whole_s"] for r in items),
             "to_bad_cpu_s": statistics.median(r.get("to_bad_cpu_s", float("nan")) for r in items),
             "stopped_early": items[0]["stopped_early"], "bad": items[0]["bad"]} for name, items in by_name.items()]


def format_fault(summary: dict) -> str:
    stopped = summary["stopped_early"]
    where = (f"stopped at {stopped['point']} (step {stopped['step']}) on {', '.join(stopped['signals'])}"
             if stopped else "not stopped early: " + ", ".join(summary["bad"]))
    return (f"{summary['fault']} ({summary['mode']}): BAD after {summary['to_bad_s']:.2f} s "
            f"({summary['to_bad_cpu_s']:.2f} s CPU), exit after {summary['whole_s']:.2f} s "
            f"(median of {summary['runs']}); {where}")


def summarize(mode: str, wholes: list[dict], bares: list[dict]) -> dict:
    """Medians over the runs of one mode: whole, each part, bare, and whole / bare."""
    whole = statistics.median(w["whole_s"] for w in wholes)
    bare = statistics.median(b["whole_s"] for b in bares)
    parts = {part: statistics.median(w["parts_s"].get(part, 0.0) for w in wholes) for part in PARTS}
    return {"mode": mode, "runs": len(wholes), "whole_s": whole, "parts_s": parts, "bare_s": bare,
            "bare_steps": bares[0]["steps"], "bare_steps_s": statistics.median(b["steps_s"] for b in bares),
            "ratio_whole_to_bare": whole / bare if bare > 0 else None,
            "exit_codes": sorted({w["exit_code"] for w in wholes})}


def format_summary(summary: dict) -> str:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in summary["parts_s"].items() if v >= 0.005)
    return (f"{summary['mode']}: whole {summary['whole_s']:.2f} s (median of {summary['runs']}), bare training "
            f"{summary['bare_s']:.2f} s ({summary['bare_steps']} steps in {summary['bare_steps_s']:.2f} s), "
            f"ratio {summary['ratio_whole_to_bare']:.2f}x\n  parts (s): {parts}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["stage2_probe"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the summaries here")
    parser.add_argument("--faults", nargs="*", default=None, metavar="FAULT",
                        help=f"time to a BAD verdict of these structural faults (none named: all of "
                             f"{', '.join(STRUCTURAL_FAULTS)}) instead of the modes")
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fault-run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    if args.bare:
        print(json.dumps(_run_bare(args.modes[0], args.overrides, args.epochs)))
        return 0
    if args.fault_run:
        return _run_fault(args.fault_run, args.out)
    if args.faults is not None:
        names = args.faults or list(STRUCTURAL_FAULTS)
        unknown = [n for n in names if n not in STRUCTURAL_FAULTS]
        if unknown:
            parser.error(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(STRUCTURAL_FAULTS)}")
        runs = [fault_command(name) for _ in range(args.runs) for name in names]  # interleaved
        fault_summaries = summarize_faults(runs)
        for summary in fault_summaries:
            print(format_fault(summary), flush=True)
        if args.json:
            args.json.write_text(json.dumps(fault_summaries, indent=2), encoding="utf-8")
        return 0
    summaries = []
    for mode in args.modes:
        wholes, bares = [], []
        for _ in range(args.runs):  # interleaved, so a load change hits both sides alike
            wholes.append(whole_command(mode, args.overrides, args.epochs))
            bares.append(bare_training(mode, args.overrides, args.epochs))
        summaries.append(summarize(mode, wholes, bares))
        print(format_summary(summaries[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
