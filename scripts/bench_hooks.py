#!/usr/bin/env python
"""What the instrumentation costs, as a fraction of a training step: each observer and each hook point.

    .venv/bin/python scripts/bench_hooks.py                      # stage2, 128x128 batch 8 and 64x64 batch 4
    .venv/bin/python scripts/bench_hooks.py --sizes 128x8 --rounds 30 --threads 2
    .venv/bin/python scripts/bench_hooks.py --device cuda        # CUDA: each timed part is synchronized

Two loops, both a stage-2 step of autohdr's model (the stage2_probe preset's model; forward, warp,
composite loss, backward, clipping, AdamW) on fixture pairs:

* **hooks**: the loop calls the 8-call API (:class:`~autohdr.diagnosis.hooks.Instrumentation`).
  Variants: no hooks at all ("off"), every observer ("all"), and every observer but one, for each
  per-step observer. Every variant has its own model and optimizer; their steps are interleaved
  round by round, so machine load drifts onto all of them alike.
* **attach**: the same step written without any autohdr call, observed by :func:`autohdr.attach`
  through torch's hook points; "off" vs "attach".

Beside the step medians, the script times the observers' own per-step hooks and attach's hook
callbacks *inside* the instrumented steps (``perf_counter`` around each call; on CUDA synchronized
before and after, which attributes device time to the part but adds syncs of its own): those
in-step figures are the steadier measure on a loaded machine, where the difference of two step
medians is often smaller than their noise. Medians over ``--rounds`` after ``--warmup`` rounds;
wall time (and process CPU time for the step). Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

#: per-step observer hooks, timed in the instrumented steps
OBSERVER_HOOKS = ("on_train_batch_start", "on_after_backward", "step_tensors", "step_fields")
#: attach's hook callbacks, each a torch hook point
ATTACH_POINTS = {"_before_forward": "model forward pre-hook", "_after_forward": "model forward hook",
                 "_on_loss": "loss module forward hook", "_on_grad": "post-accumulate-grad hooks (all params)",
                 "_before_step": "optimizer step pre-hook", "_after_step": "optimizer step post-hook (the record)"}


def parse_size(text: str) -> tuple[int, int]:
    side, _, batch = text.partition("x")
    return int(side), int(batch)


def fixture_batch(side: int, batch: int) -> dict:
    from autohdr.data import PairDataset, make_loader, scan_pairs
    from autohdr.data.settings import default_fixture_root
    rows = scan_pairs(default_fixture_root()).iloc[:batch]
    return next(iter(make_loader(PairDataset(rows, resize_hw=(side, side)), batch_size=batch, shuffle=False)))


class Timings:
    """Seconds per call of named parts, gathered per step (several calls in a step add up)."""

    def __init__(self, sync: bool) -> None:
        self.sync = sync
        self.active = True  # off while another loop steps (a wrapped module function is shared)
        self.current: dict[str, float] = collections.defaultdict(float)
        self.current_cpu: dict[str, float] = collections.defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.steps_cpu: list[dict[str, float]] = []

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            if self.sync:
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.sync:
                    torch.cuda.synchronize()
                self.current[name] += time.perf_counter() - start
                self.current_cpu[name] += time.process_time() - start_cpu
        return timed

    def end_step(self) -> None:
        self.steps.append(dict(self.current))
        self.steps_cpu.append(dict(self.current_cpu))
        self.current.clear()
        self.current_cpu.clear()

    def medians_ms(self, last: int) -> dict[str, tuple[float, float]]:
        """``{part: (wall ms, CPU ms)}``, medians over the ``last`` steps."""
        recent, recent_cpu = self.steps[-last:], self.steps_cpu[-last:]
        names = sorted({n for s in recent for n in s})
        return {n: (1e3 * statistics.median(s.get(n, 0.0) for s in recent),
                    1e3 * statistics.median(s.get(n, 0.0) for s in recent_cpu)) for n in names}


class HooksLoop:
    """One model + optimizer (+ Instrumentation unless ``variant == "off"``) stepping on one batch."""

    def __init__(self, variant: str, batch: dict, device: torch.device, out_dir: Path, timings: Timings) -> None:
        from autohdr.diagnosis.hooks import Instrumentation, InstrumentationConfig, default_loss_fn
        from autohdr.lens.model import LensCorrectionModel
        from autohdr.lens.stages import stage_spec
        torch.manual_seed(0)
        self.model = LensCorrectionModel().to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        self.loss_fn = default_loss_fn(stage_spec("stage2_hybrid"))
        self.image, self.target = batch["input_image"].to(device), batch["target_image"].to(device)
        self.ids = list(batch["image_id"])
        self.device, self.variant, self.hooks = device, variant, None
        if variant != "off":
            hooks = Instrumentation(self.model, self.optimizer, out_dir, stage="stage2_hybrid", loss_fn=self.loss_fn,
                                    config=InstrumentationConfig(), log=lambda message: None)
            hooks.on_train_start([{"input_image": self.image, "target_image": self.target, "image_id": self.ids}])
            hooks.on_train_epoch_start(0)
            without = variant.removeprefix("without_") if variant.startswith("without_") else None
            for hook, observers in hooks._at.items():
                hooks._at[hook] = [o for o in observers if o.name != without]
            if variant == "all":
                for observer in hooks.observers.values():
                    for hook in OBSERVER_HOOKS:
                        if hook in type(observer).__dict__:
                            setattr(observer, hook, timings.wrap(f"{observer.name}", getattr(observer, hook)))
                import autohdr.diagnosis.hooks as hooks_module
                hooks_module.read_once = timings.wrap("(the one host read)", hooks_module.read_once)
                hooks.metrics.write = timings.wrap("(writing the record)", hooks.metrics.write)
            self.hooks = hooks

    def step(self) -> None:
        from autohdr.lens.evaluation import correct
        hooks = self.hooks
        if hooks is not None:
            hooks.on_train_batch_start({"input_image": self.image, "target_image": self.target, "image_id": self.ids})
        correction = correct(self.model, self.image, True)
        loss, parts = self.loss_fn(correction, self.target)
        if hooks is not None:
            hooks.on_after_forward()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if hooks is not None:
            hooks.on_after_backward()
        total = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.optimizer.step()
        if hooks is not None:
            hooks.on_train_batch_end(loss, correction, components=parts, grad_norm_total=total, clip_norm=5.0)
        if self.device.type == "cuda":
            torch.cuda.synchronize()


class AttachLoop:
    """The same step with no autohdr call in it; ``variant == "attach"`` observes it with autohdr.attach."""

    def __init__(self, variant: str, batch: dict, device: torch.device, out_dir: Path, timings: Timings) -> None:
        import autohdr
        from autohdr.diagnosis.hooks import default_loss_fn
        from autohdr.lens.model import LensCorrectionModel
        from autohdr.lens.stages import stage_spec
        torch.manual_seed(0)
        self.model = LensCorrectionModel().to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        self.image, self.target = batch["input_image"].to(device), batch["target_image"].to(device)
        self.device = device
        loss_fn = default_loss_fn(stage_spec("stage2_hybrid"))
        self.loss = autohdr.watch_loss(lambda outputs, image, target: loss_fn(_correction(outputs, image), target))
        self.attachment = None
        if variant == "attach":
            self.attachment = autohdr.attach(self.model, self.optimizer, out_dir, stage="stage2_hybrid",
                                             val_loader=[{"input_image": self.image, "target_image": self.target}],
                                             loss=self.loss, val_every=10 ** 9, log=lambda message: None)

    def step(self) -> None:
        outputs = self.model(self.image)
        loss, _ = self.loss(outputs, self.image, self.target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _correction(outputs: dict, image: torch.Tensor):
    """The loop's own warp of the model's outputs (what ``correct`` does, written out as a user would)."""
    from autohdr.lens.evaluation import Correction
    from autohdr.lens.geometry import apply_correction
    flow = outputs.get("residual_flow_lowres")
    return Correction(outputs["params"], flow, apply_correction(image, outputs["params"], flow), image)


def run_interleaved(loops: dict[str, object], rounds: int, warmup: int,
                    timings: dict[str, Timings]) -> dict[str, tuple[float, float]]:
    """Median (wall ms, CPU ms) per step of each loop, their steps interleaved round by round."""
    wall: dict[str, list[float]] = {name: [] for name in loops}
    cpu: dict[str, list[float]] = {name: [] for name in loops}
    for index in range(warmup + rounds):
        for name, loop in loops.items():
            for owner, timing in timings.items():
                timing.active = owner == name
            start, start_cpu = time.perf_counter(), time.process_time()
            loop.step()
            if index >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
            if name in timings:
                timings[name].end_step()
    return {name: (1e3 * statistics.median(wall[name]), 1e3 * statistics.median(cpu[name])) for name in loops}


def print_parts(where: str, what: str, parts: dict[str, tuple[float, float]], step: tuple[float, float]) -> None:
    """A table of the timed parts: median wall and CPU ms per step, and their share of the step's medians."""
    wall, cpu = step
    print(f"\nInside {where} (median {wall:.2f} ms wall, {cpu:.2f} ms CPU): median per step")
    print(f"\n| {what} | wall ms | share of the step (wall) | CPU ms | share of the step (CPU) |")
    print("| --- | --- | --- | --- | --- |")
    for name, (ms, cpu_ms) in sorted(parts.items(), key=lambda item: -item[1][1]):
        print(f"| {name} | {ms:.3f} | {100 * ms / wall:.2f} % | {cpu_ms:.3f} | {100 * cpu_ms / cpu:.2f} % |")
    total, total_cpu = sum(p[0] for p in parts.values()), sum(p[1] for p in parts.values())
    print(f"| **all** | {total:.3f} | {100 * total / wall:.2f} % | {total_cpu:.3f} | {100 * total_cpu / cpu:.2f} % |")


def bench_size(side: int, batch: int, args: argparse.Namespace, device: torch.device) -> None:
    from autohdr.diagnosis.hooks import FIELD_ORDER, TENSOR_ORDER
    from autohdr.attachment import Attachment
    data = fixture_batch(side, batch)
    sync = device.type == "cuda"
    tmp = Path(tempfile.mkdtemp(prefix="bench_hooks_"))
    print(f"\n## stage2_hybrid, {side}x{side}, batch {batch}, {device}, {torch.get_num_threads()} thread(s)\n")

    # ---- the 8-call API, with and without each observer
    per_step = [n for n in dict.fromkeys(TENSOR_ORDER + FIELD_ORDER) if n != "loss"]  # the loss is the step's own
    variants = ["off", "all"] + [f"without_{n}" for n in per_step]
    timing = Timings(sync)
    loops = {v: HooksLoop(v, data, device, tmp / v, timing) for v in variants}
    medians = run_interleaved(loops, args.rounds, args.warmup, {"all": timing})
    off, on = medians["off"][0], medians["all"][0]
    print("| hooks loop | median ms / step (wall) | CPU ms | vs off |")
    print("| --- | --- | --- | --- |")
    for name, (wall_ms, cpu_ms) in medians.items():
        print(f"| {name} | {wall_ms:.2f} | {cpu_ms:.2f} | {100 * (wall_ms / off - 1):+.1f} % |")
    print_parts("the instrumented step", "part", timing.medians_ms(args.rounds), medians["all"])
    record = loops["all"].hooks.perf.summary()
    if "instrumentation_overhead_frac" in record:
        frac = 100 * record["instrumentation_overhead_frac"]
        print(f"\nThe hooks' own instrumentation_overhead_frac (run_end, wall time): {frac:.2f} %")

    # ---- attach's hook points
    attach_timing = Timings(sync)
    originals = {name: getattr(Attachment, name) for name in ATTACH_POINTS}
    for name in ATTACH_POINTS:
        setattr(Attachment, name, attach_timing.wrap(ATTACH_POINTS[name], originals[name]))
    try:
        loops = {v: AttachLoop(v, data, device, tmp / f"attach-{v}", attach_timing) for v in ("off", "attach")}
        medians = run_interleaved(loops, args.rounds, args.warmup, {"attach": attach_timing})
    finally:
        for name, fn in originals.items():
            setattr(Attachment, name, fn)
    off, on = medians["off"][0], medians["attach"][0]
    print("\n| attach loop | median ms / step (wall) | CPU ms | vs off |")
    print("| --- | --- | --- | --- |")
    for name, (wall_ms, cpu_ms) in medians.items():
        print(f"| {name} | {wall_ms:.2f} | {cpu_ms:.2f} | {100 * (wall_ms / off - 1):+.1f} % |")
    print_parts("the attached step", "hook point", attach_timing.medians_ms(args.rounds), medians["attach"])
    loops["attach"].attachment.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=["128x8", "64x4"], help="SIDExBATCH (default 128x8 64x4)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# bench_hooks: torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.1f} at start, "
          f"{args.rounds} rounds after {args.warmup}")
    for size in args.sizes:
        bench_size(*parse_size(size), args, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
