"""``report.html``: a run's report as one self-contained page (inline CSS and PNGs, no scripts, no network).

``render_report_html(report, images)`` is a pure function of a report dict (as written to
``report.json``) and the PNG bytes of the run's figures; ``write_report_html(run_dir, report)``
reads ``curves.png`` / ``triplets.png`` from the run folder when they exist and writes the page
atomically. The page holds the overall verdict, the verdict table (coloured, with a "likely cause"
column when a verdict or the report's optional ``diagnoses`` list gives one), headline figures,
the figures and the resolved config. Every string from the report is HTML-escaped; a
Content-Security-Policy forbids any network access and any script.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

#: The figures of a run folder, in page order, with their captions.
FIGURES = (("curves.png", "Curves"), ("triplets.png", "Probe samples"))
#: Verdict keys that may carry a likely-cause text for that signal.
CAUSE_KEYS = ("likely_cause", "cause")
#: Headline figures (key in ``report["figures"]``, label), shown first and large.
HEADLINE = (("final_val_proxy_total", "val proxy (model)"), ("final_identity_proxy_total", "identity"),
            ("final_gt_proxy_total", "ground-truth warp"), ("steps", "steps"),
            ("samples_per_sec", "samples / s"), ("wall_time_s", "wall time (s)"))

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_STYLE = """
body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 1.5em auto; max-width: 1400px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
.banner { padding: 0.6em 1em; font-size: 1.4em; font-weight: bold; border-radius: 4px; color: #fff; }
.banner.good { background: #2e7d32; } .banner.bad { background: #c62828; }
.banner.interrupted { background: #e65100; }
.note { background: #fff3cd; border: 1px solid #e0c060; padding: 0.5em 1em; margin: 0.6em 0; }
.meta { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.verdict { font-weight: bold; text-align: center; white-space: nowrap; }
tr.good td.verdict { background: #c8e6c9; color: #1b5e20; }
tr.bad td.verdict { background: #ffcdd2; color: #b71c1c; }
tr.na td.verdict { background: #eeeeee; color: #616161; }
tr.bad td { background-color: #fff5f5; }
td.signal { font-family: "DejaVu Sans Mono", monospace; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; }
.card { border: 1px solid #ccc; border-radius: 4px; padding: 0.4em 0.9em; min-width: 8em; }
.card .value { font-size: 1.4em; font-weight: bold; } .card .label { color: #555; font-size: 0.85em; }
img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 0.5em; overflow-x: auto; margin: 0; font-size: 0.85em; }
details summary { cursor: pointer; color: #555; }
"""


def _e(value: Any) -> str:
    """HTML-escape any value's text (quotes too, so it is safe inside attributes)."""
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _verdict_class(ok: Any) -> tuple[str, str]:
    return {True: ("good", "GOOD"), False: ("bad", "BAD")}.get(ok, ("na", "n/a"))


def _diagnoses(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    items = report.get("diagnoses")
    return [d for d in items if isinstance(d, Mapping)] if isinstance(items, list) else []


def _causes_by_signal(report: Mapping[str, Any]) -> dict[str, list[str]]:
    """Likely-cause texts per signal: the verdict's own, then those of ``diagnoses`` naming it."""
    causes: dict[str, list[str]] = {}
    for verdict in report.get("verdicts") or []:
        for key in CAUSE_KEYS:
            if verdict.get(key):
                causes.setdefault(str(verdict.get("signal")), []).append(str(verdict[key]))
    for diagnosis in _diagnoses(report):
        for signal in diagnosis.get("signals") or []:
            if diagnosis.get("cause"):
                causes.setdefault(str(signal), []).append(str(diagnosis["cause"]))
    return causes


def _verdict_table(report: Mapping[str, Any]) -> str:
    verdicts = list(report.get("verdicts") or [])
    if not verdicts:
        return "<p>No verdicts.</p>"
    causes = _causes_by_signal(report)
    head = "<tr><th>signal</th><th>verdict</th><th>detail</th>"
    head += "<th>likely cause</th>" if causes else ""
    head += "<th>evidence</th></tr>"
    rows = []
    for verdict in verdicts:
        signal = str(verdict.get("signal", "?"))
        css, label = _verdict_class(verdict.get("ok"))
        cells = [f'<td class="signal">{_e(signal)}</td>', f'<td class="verdict">{label}</td>',
                 f"<td>{_e(verdict.get('detail', ''))}</td>"]
        if causes:
            cells.append("<td>" + "<br>".join(_e(c) for c in causes.get(signal, [])) + "</td>")
        evidence = verdict.get("evidence") or {}
        cells.append("<td>" + (f"<details><summary>{len(evidence)} values</summary><pre>"
                               f"{_e(json.dumps(evidence, indent=1, default=str, ensure_ascii=False))}</pre></details>"
                               if evidence else "") + "</td>")
        rows.append(f'<tr class="{css}" id="signal-{_e(signal)}" data-signal="{_e(signal)}">{"".join(cells)}</tr>')
    return f'<table class="verdicts">{head}{"".join(rows)}</table>'


def _diagnoses_section(report: Mapping[str, Any]) -> str:
    items = _diagnoses(report)
    if not items:
        return ""
    entries = []
    for item in items:
        signals = ", ".join(str(s) for s in item.get("signals") or [])
        parts = [f"<strong>{_e(item.get('cause', ''))}</strong>"]
        if signals:
            parts.append(f'<span class="meta">signals: {_e(signals)}</span>')
        if item.get("look_at"):
            parts.append(f"look at: {_e(item['look_at'])}")
        entries.append("<li>" + "<br>".join(parts) + "</li>")
    return f'<h2 id="diagnoses">Likely causes</h2><ul class="diagnoses">{"".join(entries)}</ul>'


def _figures_section(report: Mapping[str, Any]) -> str:
    figures = report.get("figures")
    if not isinstance(figures, Mapping) or not figures:
        return ""
    cards = []
    for key, label in HEADLINE:
        if figures.get(key) is not None:
            cards.append(f'<div class="card"><div class="value">{_e(_fmt(figures[key]))}</div>'
                         f'<div class="label">{_e(label)}</div></div>')
    model, identity = figures.get("final_val_proxy_total"), figures.get("final_identity_proxy_total")
    if isinstance(model, (int, float)) and isinstance(identity, (int, float)):
        cards.insert(1, f'<div class="card"><div class="value">{model - identity:+.4f}</div>'
                        f'<div class="label">model − identity</div></div>')
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_fmt(v))}</td></tr>" for k, v in figures.items())
    return (f'<h2 id="figures">Headline figures</h2><div class="cards">{"".join(cards)}</div>'
            f"<details><summary>all figures</summary><table>{rows}</table></details>")


def _images_section(images: Mapping[str, bytes]) -> str:
    parts = []
    for name, caption in FIGURES:
        data = images.get(name)
        if data:
            encoded = base64.b64encode(data).decode("ascii")
            parts.append(f'<h2 id="{_e(name)}">{_e(caption)} <span class="meta">({_e(name)})</span></h2>'
                         f'<img alt="{_e(name)}" src="data:image/png;base64,{encoded}">')
    if not parts:
        return '<h2 id="plots">Figures</h2><p class="meta">No figures in this run folder (run without --no-plots).</p>'
    return "".join(parts)


def _config_section(report: Mapping[str, Any]) -> str:
    config = report.get("config")
    if not isinstance(config, Mapping) or not config:
        return ""
    tables = []
    for section, values in config.items():
        if isinstance(values, Mapping):
            rows = "".join(f"<tr><td>{_e(k)}</td><td><code>{_e(json.dumps(v, default=str, ensure_ascii=False))}"
                           f"</code></td></tr>" for k, v in values.items())
            tables.append(f"<details open><summary>{_e(section)}</summary><table>{rows}</table></details>")
        else:
            tables.append(f"<p>{_e(section)}: <code>{_e(json.dumps(values, default=str))}</code></p>")
    return f'<h2 id="config">Resolved config</h2>{"".join(tables)}'


def _meta(report: Mapping[str, Any]) -> str:
    fields = (("mode", "mode"), ("runbook_name", "runbook name"), ("stage", "stage"), ("device", "device"),
              ("world_size", "ranks"), ("data_root", "data root"), ("out_dir", "run folder"), ("created", "created"))
    items = [f"{_e(label)}: <strong>{_e(report[key])}</strong>" for key, label in fields if report.get(key) is not None]
    seed = ((report.get("config") or {}).get("train") or {}).get("seed")
    if seed is not None:
        items.insert(3, f"seed: <strong>{_e(seed)}</strong>")
    pairs = report.get("pairs")
    if isinstance(pairs, Mapping) and pairs.get("used") is not None:
        split = ("train = val" if pairs.get("overfit") else f"{_e(pairs.get('train'))} train, {_e(pairs.get('val'))} val")
        items.append(f"pairs: <strong>{_e(pairs['used'])}</strong> used ({split}) of {_e(pairs.get('asked'))} asked, "
                     f"{_e(pairs.get('found'))} found")
    line = '<p class="meta">' + " · ".join(items) + "</p>"
    if isinstance(pairs, Mapping) and pairs.get("note"):
        line += f'<div class="note" id="pairs-note">{_e(pairs["note"])}</div>'
    return line


def render_report_html(report: Mapping[str, Any], images: Mapping[str, bytes] | None = None) -> str:
    """The page for ``report`` (a ``report.json`` dict) with ``images`` (file name -> PNG bytes) inlined."""
    images = images or {}
    good = bool(report.get("all_good"))
    verdicts = list(report.get("verdicts") or [])
    bad = [str(v.get("signal")) for v in verdicts if v.get("ok") is False]
    interrupted = bool(report.get("interrupted"))
    status = "INTERRUPTED" if interrupted else "ALL GOOD" if good else "BAD SIGNALS"
    title = f"{report.get('mode') or 'run'}: {status}"
    if interrupted:
        stopped = report.get("interrupted_at")
        where = (f" in epoch {stopped.get('epoch')} after step {stopped.get('step')}"
                 if isinstance(stopped, Mapping) else "")
        banner = (f"INTERRUPTED{where}: judged on the steps it ran, "
                  + (f"BAD in what it ran: {', '.join(bad)}" if bad else "no BAD signal in what it ran"))
    else:
        banner = "ALL GOOD" if good else "BAD SIGNALS" + (f": {', '.join(bad)}" if bad else "")
    css = "interrupted" if interrupted else "good" if good else "bad"
    notes = []
    if report.get("error"):
        notes.append(f"Run failed: {report['error']}")
    if interrupted:
        notes.append("The run was interrupted (Ctrl-C or SIGTERM) before its last epoch: the verdicts judge the "
                     "steps it ran (a signal that needs more says n/a); its state is in interrupted.pt.")
    body = [
        f"<h1>{_e(report.get('mode') or 'run')}"
        + (f" <span class=\"meta\">({_e(report['runbook_name'])})</span>" if report.get("runbook_name") else "")
        + "</h1>",
        _meta(report),
        f'<div class="banner {css}" id="overall">{_e(banner)}</div>',
        "".join(f'<div class="note">{_e(n)}</div>' for n in notes),
        '<h2 id="verdicts">Verdicts</h2>', _verdict_table(report),
        _diagnoses_section(report), _figures_section(report), _images_section(images), _config_section(report),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(part for part in body if part) + "\n</body></html>\n")


def read_figures(run_dir: str | Path, names: Iterable[str] | None = None) -> dict[str, bytes]:
    """The PNG bytes of the figures (default: :data:`FIGURES`) present in ``run_dir``."""
    run_dir = Path(run_dir)
    names = [name for name, _ in FIGURES] if names is None else list(names)
    return {name: (run_dir / name).read_bytes() for name in names if (run_dir / name).is_file()}


def write_report_html(run_dir: str | Path, report: Mapping[str, Any]) -> Path:
    """Write ``run_dir/report.html`` atomically (a temporary file renamed over the old page)."""
    run_dir = Path(run_dir)
    page = render_report_html(report, read_figures(run_dir))
    target = run_dir / "report.html"
    tmp = run_dir / f".report.html.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(page)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
