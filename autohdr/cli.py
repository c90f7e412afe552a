"""Command line: ``autohdr debug MODE``, ``autohdr judge RUN_DIR``, ``autohdr train --stage S``.

Exit codes: 0 when every applicable signal is good, 1 when a bad signal fires (or the run could
not finish), 2 on a usage or input error (one line on stderr, no traceback), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from autohdr.diagnosis.presets import MODES

EXIT_OK, EXIT_BAD_SIGNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(ValueError):
    """A bad command line, reported as one ``autohdr: error: ...`` line and exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse without the usage block on errors: one line, and ``main`` returns 2 (no SystemExit)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", type=Path, default=None,
                        help="folder of <id>_original.jpg / <id>_generated.jpg pairs (default: "
                             "$AUTOHDR_DATA_ROOT, else the embedded fixture data)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<mode>-<time>)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epoch count")
    parser.add_argument("--model-factory", default=None, metavar="MODULE:FUNCTION",
                        help="build the model with this callable instead of LensCorrectionModel")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a preset key, e.g. --set train.lr=1e-3 --set data.num_pairs=48")
    parser.add_argument("--groups", default=None, metavar="GROUP=PREFIX,...",
                        help="name the model's parameter groups by module path, e.g. backbone=net.encoder,"
                             "param_head=net.head,residual_head=net.flow (several prefixes: a+b); default: "
                             "the model's parameter_groups(), else submodules named like the groups")
    parser.add_argument("--init-from", type=Path, default=None, help="start from this checkpoint's weights")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autohdr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    debug = sub.add_parser("debug", help="run a debug mode and judge every signal")
    debug.add_argument("mode", help=f"one of {', '.join(MODES)}, or a preset .toml file")
    _common(debug)
    judge = sub.add_parser("judge", help="judge a finished run's metrics.jsonl again")
    judge.add_argument("run_dir", type=Path)
    judge.add_argument("--mode", default=None, help="preset whose [judge] thresholds to use "
                                                     "(default: the one in the run's report.json)")
    judge.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    train = sub.add_parser("train", help="train one stage on a real dataset")
    train.add_argument("--stage", required=True,
                       choices=["stage1_param_only", "stage2_hybrid", "stage3_finetune"])
    train.add_argument("--config", default="train", help="preset name or .toml (default: train)")
    train.add_argument("--resume", type=Path, default=None, help="continue from this last.pt")
    _common(train)
    return parser


def _print_report(report: dict) -> None:
    from autohdr.diagnosis.verdicts import Verdict, format_table
    verdicts = [Verdict(**v) for v in report["verdicts"]]
    print(f"\n{report['mode']} ({report['runbook_name'] or report['stage']}) on {report['device']}")
    print(format_table(verdicts))
    if report.get("diagnoses"):
        from autohdr.diagnosis.causes import Diagnosis, format_diagnoses
        print("\n" + format_diagnoses([Diagnosis.from_dict(d) for d in report["diagnoses"]]))
    figures = report["figures"]
    print("\n" + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
    if report.get("error"):
        print(f"\nRUN FAILED: {report['error']}")
    print(f"\n{'ALL GOOD' if report['all_good'] else 'BAD SIGNALS'} -- report: {Path(report['out_dir']) / 'report.json'}")


def _run(args, mode: str, overrides: list[str], resume=None) -> int:
    from autohdr.diagnosis.debug import run_debug_mode
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    from autohdr.diagnosis.instrumentation import parse_group_spec
    groups = parse_group_spec(args.groups) if args.groups is not None else None
    report = run_debug_mode(mode, data_root=args.data_root, out_dir=args.out, device=args.device, seed=args.seed,
                            overrides=overrides, epochs=args.epochs, model_factory=args.model_factory, groups=groups,
                            init_from=args.init_from, resume_from=resume, plots=not args.no_plots)
    if not report:  # a non-zero rank under torchrun
        return EXIT_OK
    _print_report(report)
    if report.get("interrupted"):
        return EXIT_INTERRUPTED
    return EXIT_OK if report["all_good"] else EXIT_BAD_SIGNAL


def _judge(args) -> int:
    from autohdr.training.config import from_mapping
    from autohdr.diagnosis.presets import load_preset
    from autohdr.diagnosis.verdicts import JudgeConfig, all_good, format_table, judge
    from autohdr.diagnosis.causes import diagnose, format_diagnoses
    from autohdr.diagnosis.metrics_log import read_metrics
    cfg = JudgeConfig()
    report_path = args.run_dir / "report.json"
    mode = args.mode
    if mode is None and report_path.is_file():
        report = json.loads(report_path.read_text(encoding="utf-8"))
        stored = report.get("config") if isinstance(report, dict) else None
        cfg_dict = stored.get("judge") if isinstance(stored, dict) else None
        if cfg_dict:
            if not isinstance(cfg_dict, dict):
                raise ValueError(f"{report_path}: config.judge must be a table of thresholds, got {cfg_dict!r}")
            cfg = from_mapping(JudgeConfig, cfg_dict, where=f"{report_path} config.judge")
    elif mode is not None:
        cfg = load_preset(mode).judge
    history = read_metrics(args.run_dir)
    verdicts = judge(history, cfg)
    if args.json:
        print(json.dumps([v.to_dict() for v in verdicts], indent=2, default=str))
    else:
        print(format_table(verdicts))
        causes = format_diagnoses(diagnose(verdicts, history, reference_lr=_reference_lr(args.run_dir, args.mode,
                                                                                           history)))
        if causes:
            print("\n" + causes)
    return EXIT_OK if all_good(verdicts) else EXIT_BAD_SIGNAL


def _reference_lr(run_dir: Path, mode: str | None, history) -> float | None:
    """The learning rate of the run's preset (``--mode``, else the mode in its report.json), if known."""
    from autohdr.diagnosis.debug import preset_reference_lr
    if mode is None:
        try:
            mode = json.loads((run_dir / "report.json").read_text(encoding="utf-8")).get("mode")
        except (OSError, ValueError, AttributeError):
            return None
    start = history[history["kind"] == "run_start"] if "kind" in history else history.iloc[0:0]
    stage = start.iloc[-1]["stage"] if not start.empty and "stage" in start else None
    return preset_reference_lr(mode, stage if isinstance(stage, str) else None)


def _one_line(exc: BaseException) -> str:
    """An exception as one line: OS errors as ``reason: path``, multi-line messages joined by `` | ``."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    return " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "debug":
            return _run(args, args.mode, args.overrides)
        if args.command == "judge":
            return _judge(args)
        return _run(args, args.config, [f"train.stage={args.stage}", *args.overrides], resume=args.resume)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as exc:  # DataError and UsageError are ValueErrors
        print(f"autohdr: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
