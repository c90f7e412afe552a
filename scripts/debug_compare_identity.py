"""Identity warp versus a checkpoint's model on exactly the same subset; prints a JSON summary.

    python scripts/debug_compare_identity.py --checkpoint RUN/best.pt --split-csv RUN/val_split.csv
        [--model-factory MODULE:FUNCTION] [--stage S] [--device auto|cpu|cuda[:N]] [--max-batches N]
        [--batch-size N] [--resize-hw H,W|none] [--json-out FILE]

stdout: ``{"stage", "sample_count", "identity", "model", "delta_model_minus_identity"}``, each score
dict with ``total, edge, line, grad, ssim, mae, hard_fail`` (``hard_fail``: fraction of samples).
``--stage`` defaults to the checkpoint's stage; ``--resize-hw`` and ``--batch-size`` to the run's
(``report.json`` beside the checkpoint), else 128,128 and 8. At the run's batch size the scores
equal the trainer's logged ``val_proxy_*`` exactly; another batch size can differ by ~1e-6 (CPU
kernels). A checkpoint of a custom model (trained with ``autohdr debug --model-factory``) needs
the same ``--model-factory``: the factory builds the model and the checkpoint's weights are
loaded into it (a mismatch names the first key). Progress goes to stderr. Exit codes: 0 done, 2
bad usage or input (one line on stderr). Nothing is written under the images' folders.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Iterator

try:
    import autohdr  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autohdr.data.settings import ensure_kmp_duplicate_lib_ok  # noqa: E402

EXIT_OK, EXIT_USAGE = 0, 2
PROG = "debug_compare_identity"


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one ``PROG: error: ...`` line and exit 2 (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def parse_resize_hw(text: str) -> tuple[int, int] | None:
    """``"H,W"`` (integers >= 16) or ``"none"`` (stored size); ``ValueError`` otherwise."""
    if text.strip().lower() == "none":
        return None
    try:
        height, width = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--resize-hw expects H,W (two integers) or none, got {text!r}") from None
    if min(height, width) < 16:
        raise ValueError(f"--resize-hw expects H and W >= 16, got {text!r}")
    return height, width


def _with_progress(batches: Iterable, total: int) -> Iterator:
    for index, batch in enumerate(batches, start=1):
        print(f"{PROG}: batch {index}/{total}", file=sys.stderr, flush=True)
        yield batch


def _refuse_inside(path: Path, folders: set[Path]) -> None:
    target = path.expanduser().resolve()
    for folder in folders:
        if target == folder or folder in target.parents:
            raise ValueError(f"--json-out {path} is inside the data folder {folder}: the dataset is "
                             "immutable, write the summary somewhere else")


def run(args: argparse.Namespace) -> dict:
    """The summary for parsed ``args``; ``ValueError`` / ``OSError`` name the bad input."""
    if args.max_batches is not None and args.max_batches < 1:
        raise ValueError(f"--max-batches expects an integer >= 1, got {args.max_batches}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size expects an integer >= 1, got {args.batch_size}")
    resize_hw = parse_resize_hw(args.resize_hw) if args.resize_hw is not None else None
    from autohdr.data import PairDataset, make_loader, read_split_csv  # no torch yet: input errors fail fast
    rows = read_split_csv(args.split_csv)
    if args.json_out is not None:
        _refuse_inside(args.json_out, {Path(p).resolve().parent for col in ("input_path", "target_path")
                                       for p in rows[col]})

    from autohdr.training.checkpoint import load_checkpoint
    from autohdr.runs.compare import (
        DEFAULT_BATCH_SIZE, DEFAULT_RESIZE_HW, checkpoint_stage, compare_identity, model_from_checkpoint,
        run_batch_size, run_resize_hw,
    )
    from autohdr.training.config import stage_spec
    from autohdr.runs.debug import resolve_device
    from autohdr.lens.model import LensCorrectionModel
    device = resolve_device(args.device)
    payload = load_checkpoint(args.checkpoint, map_location=device)
    stage = stage_spec(args.stage).name if args.stage else checkpoint_stage(payload)
    model = model_from_checkpoint(payload, device, model_factory=args.model_factory, source=args.checkpoint)
    if args.resize_hw is None:
        resize_hw = run_resize_hw(args.checkpoint) or DEFAULT_RESIZE_HW
    # LensCorrectionModel's size rule, checked up front; a custom model checks its own input
    factor = 2 ** len(model.config.widths) if isinstance(model, LensCorrectionModel) else 1
    if resize_hw is not None and (resize_hw[0] % factor or resize_hw[1] % factor):
        raise ValueError(f"--resize-hw expects H and W divisible by {factor} for this model, "
                         f"got {resize_hw[0]},{resize_hw[1]}")
    batch_size = args.batch_size or run_batch_size(args.checkpoint) or DEFAULT_BATCH_SIZE
    loader = make_loader(PairDataset(rows, resize_hw=resize_hw), batch_size=batch_size, shuffle=False)
    total = len(loader) if args.max_batches is None else min(len(loader), args.max_batches)
    summary = compare_identity(model, _with_progress(loader, total), residual_active=stage_spec(stage).residual_active,
                               device=device, max_batches=args.max_batches)
    return {"stage": stage, **summary}


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a trainer checkpoint (best.pt, last.pt)")
    parser.add_argument("--split-csv", type=Path, required=True, help="image_id,input_path,target_path CSV")
    parser.add_argument("--model-factory", default=None, metavar="MODULE:FUNCTION",
                        help="build the model with this callable (as autohdr debug --model-factory) and load the "
                             "checkpoint's weights into it; needed for checkpoints of custom models")
    parser.add_argument("--stage", default=None, help="stage to evaluate in (default: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    parser.add_argument("--max-batches", type=int, default=None, help="score only the first N batches")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size (default: the run's, from report.json beside the checkpoint, else 8)")
    parser.add_argument("--resize-hw", default=None, metavar="H,W",
                        help="resolution (default: the run's, from report.json beside the checkpoint, else 128,128)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the summary to this file")
    args = parser.parse_args(argv)
    ensure_kmp_duplicate_lib_ok()
    try:
        text = json.dumps(run(args), indent=2)
        if args.json_out is not None:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(text + "\n", encoding="utf-8")
    except (ValueError, OSError) as exc:  # DataError is a ValueError
        print(f"{PROG}: error: {' | '.join(str(exc).splitlines())}", file=sys.stderr)
        return EXIT_USAGE
    print(text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
