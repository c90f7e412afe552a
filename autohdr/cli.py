"""Command line: ``autohdr debug MODE``, ``autohdr judge RUN_DIR``, ``autohdr train --stage S``.

Exit codes: 0 when every applicable signal is good, 1 when a bad signal fires (or the run could
not finish), 2 on a usage or input error or when the run cannot use its folder or disk (the run
folder is in use or holds a finished run, a checkpoint cannot be written: no space left on
device...; one line on stderr, no traceback), 130 on Ctrl-C (``debug``, and ``judge`` of a run
that was interrupted: its verdicts judge the steps it ran, headed ``INTERRUPTED``).
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from autohdr.runs.presets import MODES
from autohdr.training.distributed import launched_by_torchrun

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
    parser.add_argument("--group-regex", default=None, metavar="REGEX",
                        help="photoshoot of a pair id, as the named group 'group' of REGEX: pairs of one "
                             "photoshoot stay on one side of the train/val split (default: $AUTOHDR_GROUP_REGEX, "
                             "else the preset's data.group_regex, '^(?P<group>.+)_g\\d+$'); 'none': split by pair")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    parser.add_argument("--no-fail-fast", action="store_true",
                        help="train on after a structural fault (init not identity, optimizer coverage, a bad "
                             "batch, ...) instead of stopping at the step that decides it")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autohdr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    debug = sub.add_parser("debug", help="run a debug mode and judge every signal")
    debug.add_argument("mode", help=f"one of {', '.join(MODES)}, or a preset .toml file")
    _common(debug)
    judge = sub.add_parser("judge", help="judge a finished run's metrics.jsonl again and rewrite its report.html")
    judge.add_argument("run_dir", type=Path)
    judge.add_argument("--mode", default=None, help="preset whose [judge] thresholds to use "
                                                     "(default: the one in the run's report.json)")
    judge.add_argument("--json", action="store_true", help="print {all_good, verdicts} as JSON")
    train = sub.add_parser("train", help="train one stage on a real dataset")
    train.add_argument("--stage", required=True,
                       choices=["stage1_param_only", "stage2_hybrid", "stage3_finetune"])
    train.add_argument("--config", default="train", help="preset name or .toml (default: train)")
    train.add_argument("--resume", type=Path, default=None, help="continue from this last.pt")
    _common(train)
    return parser


def _print_report(report: dict, summary: bool = True) -> None:
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
    if summary:
        _print_summary(report)


def _print_summary(report: dict) -> None:
    from autohdr.diagnosis.verdicts import Verdict, status_line
    verdicts = [Verdict(**v) for v in report["verdicts"]]
    run_dir = Path(report["out_dir"])
    page = run_dir / "report.html"
    interrupted = (report.get("interrupted_at") or True) if report.get("interrupted") else None
    headline = status_line(verdicts, interrupted) if interrupted or report["all_good"] else "BAD SIGNALS"
    print("\n" + _summary_line(headline, page if page.is_file() else run_dir / "report.json"))


def _summary_line(headline: str, report_file: Path) -> str:
    """The last line of ``debug`` and ``judge``: ``ALL GOOD``, ``BAD SIGNALS`` or ``INTERRUPTED ...``
    (:func:`~autohdr.diagnosis.verdicts.status_line`) and where the report is."""
    return f"{headline} -- report: {report_file}"


def _run(args, mode: str, overrides: list[str], resume=None) -> int:
    from autohdr.runs.debug import run_debug_mode
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    from autohdr.diagnosis.instrumentation import parse_group_spec
    groups = parse_group_spec(args.groups) if args.groups is not None else None
    if args.group_regex is not None:
        from autohdr.data.pairs import compile_group_regex
        compile_group_regex(args.group_regex, "--group-regex")
        overrides = [*overrides, f"data.group_regex={args.group_regex}"]
    printed: list[bool] = []
    report = run_debug_mode(mode, data_root=args.data_root, out_dir=args.out, device=args.device, seed=args.seed,
                            overrides=overrides, epochs=args.epochs, model_factory=args.model_factory, groups=groups,
                            init_from=args.init_from, resume_from=resume, plots=not args.no_plots,
                            fail_fast=not args.no_fail_fast, on_verdict=lambda r: (_print_report(r, summary=False),
                                                                                  printed.append(True)))
    if not report:  # a non-zero rank under torchrun
        return EXIT_OK
    # the verdicts were printed as soon as judged (before the figures): only the summary line is left
    _print_summary(report) if printed else _print_report(report)
    if report.get("interrupted"):
        return EXIT_INTERRUPTED
    return EXIT_OK if report["all_good"] else EXIT_BAD_SIGNAL


def _read_stored_report(path: Path, strict: bool) -> dict:
    """The run's ``report.json`` ({} when absent); unreadable: a ``ValueError`` if ``strict``, else {}."""
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        if strict:
            raise ValueError(f"{path} is not valid JSON ({exc})") from None
        return {}
    if not isinstance(report, dict):
        if strict:
            raise ValueError(f"{path} must hold a JSON object, got {type(report).__name__}")
        return {}
    return report


def _judge(args) -> int:
    from autohdr.training.config import from_mapping, to_dict
    from autohdr.runs.presets import load_preset
    from autohdr.diagnosis.report_html import write_report_html
    from autohdr.diagnosis.verdicts import (JudgeConfig, all_good, format_table, interruption, judge, overall_status,
                                            status_line)
    from autohdr.diagnosis.causes import diagnose, format_diagnoses
    from autohdr.diagnosis.metrics_log import read_metrics
    cfg = JudgeConfig()
    report_path = args.run_dir / "report.json"
    mode = args.mode
    stored = _read_stored_report(report_path, strict=mode is None)
    if mode is None:
        config = stored.get("config")
        cfg_dict = config.get("judge") if isinstance(config, dict) else None
        if cfg_dict:
            if not isinstance(cfg_dict, dict):
                raise ValueError(f"{report_path}: config.judge must be a table of thresholds, got {cfg_dict!r}")
            cfg = from_mapping(JudgeConfig, cfg_dict, where=f"{report_path} config.judge")
    else:
        cfg = load_preset(mode).judge
    history = read_metrics(args.run_dir)
    if mode is None and not (isinstance(stored.get("config"), dict) and stored["config"].get("judge")):
        # a run of the user's own loop (attach / hooks): judged as what its run_start says it is
        from autohdr.diagnosis.run_intent import judge_config_for
        cfg = judge_config_for(history, cfg)
    verdicts = judge(history, cfg)
    good = all_good(verdicts)
    stopped = interruption(history)  # an interrupted run is judged on what it ran, and says so
    diagnoses = diagnose(verdicts, history, reference_lr=_reference_lr(args.run_dir, args.mode, history))
    # report.html shows these verdicts, with the thresholds that gave them; report.json stays as the run wrote it.
    config = stored.get("config") if isinstance(stored.get("config"), dict) else {}
    page = {"out_dir": str(args.run_dir), **stored, "verdicts": [v.to_dict() for v in verdicts], "all_good": good,
            "diagnoses": [d.to_dict() for d in diagnoses], "config": {**config, "judge": to_dict(cfg)},
            "interrupted": stopped is not None, "interrupted_at": stopped,
            "status": overall_status(verdicts, stopped)}
    try:
        report_file = write_report_html(args.run_dir, page)
    except OSError as exc:  # a read-only run folder: the verdicts still count
        report_file = report_path
        print(f"autohdr: note: report.html not rewritten ({_one_line(exc)})", file=sys.stderr)
    if args.json:
        print(json.dumps({"all_good": good, "status": overall_status(verdicts, stopped), "interrupted_at": stopped,
                          "verdicts": [v.to_dict() for v in verdicts]}, indent=2, default=str))
    else:
        print(format_table(verdicts))
        causes = format_diagnoses(diagnoses)
        if causes:
            print("\n" + causes)
        print("\n" + _summary_line(status_line(verdicts, stopped), report_file))
    if stopped is not None:  # like the run itself: an interrupted run never passes
        return EXIT_INTERRUPTED
    return EXIT_OK if good else EXIT_BAD_SIGNAL


def _reference_lr(run_dir: Path, mode: str | None, history) -> float | None:
    """The learning rate of the run's preset (``--mode``, else the mode in its report.json), if known."""
    from autohdr.runs.debug import preset_reference_lr
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


def _notices_on_stderr(previous):
    """A ``warnings.showwarning`` that reports a recovered problem (a torn metrics line) or a data
    notice (fewer pairs than asked, targets without an input) as one ``autohdr: notice: ...`` line
    and leaves every other warning to ``previous``."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        from autohdr.diagnosis.metrics_log import IncompleteLastLineWarning
        from autohdr.data.pairs import DataNotice
        if issubclass(category, (IncompleteLastLineWarning, DataNotice)):
            print(f"autohdr: notice: {message}", file=sys.stderr, flush=True)
        else:
            previous(message, category, filename, lineno, file, line)
    return show


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _notices_on_stderr(warnings.showwarning)
        warnings.filterwarnings("always", message=".*incomplete last line")  # every time, in-process too
        from autohdr.data.pairs import DataNotice
        warnings.filterwarnings("always", category=DataNotice)
        return _main(argv)


def _main(argv: list[str] | None) -> int:
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


def entry() -> None:
    """The ``autohdr`` command: run :func:`main` and exit with its code.

    The command leaves with ``os._exit`` once its work is done, skipping interpreter finalization:
    tearing down torch, ``torch._dynamo`` (which the optimizer imports) and matplotlib module by module
    costs about 0.9 s of CPU after the last line is printed, a tenth of a probe. Every file a run writes
    is closed by then (checkpoints, metrics, report, figures); ``atexit`` handlers (a user module's
    included) run first, then logging and stdout / stderr are flushed, so skipping it loses nothing. A process with children still running (a DataLoader's workers) exits
    normally, so they are shut down as usual. Under torchrun it also keeps gloo's worker threads from
    aborting teardown after a good run ("terminate called without an active exception", exit -6),
    which torchrun reports as a failed job.
    """
    code = main()
    if launched_by_torchrun() or not _children_running():
        if not launched_by_torchrun():
            atexit._run_exitfuncs()  # the user's own exit handlers (a --model-factory module's) still run
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _children_running() -> bool:
    """Whether a child process this one started (multiprocessing) is still running."""
    import multiprocessing
    return bool(multiprocessing.active_children())


if __name__ == "__main__":
    entry()
