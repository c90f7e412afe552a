"""The run report: ``report.html`` (pure renderer, writer, ``autohdr judge``), ``curves.png``,
``triplets.png``, no warnings for non-Latin names, and the page in a real headless Chromium.

Everything reads the session-shared debug runs (tests/plugins/debug_runs.py); the figures of the
browser test are drawn from a shared run's history and checkpoint, and the one new training run
(the non-Latin data root) is 4 pairs at 64x64 for 2 steps.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from autohdr.cli import EXIT_BAD_SIGNAL, EXIT_OK, main
from autohdr.data.dataset import PairDataset
from autohdr.data.pairs import read_split_csv
from autohdr.runs.compare import model_from_checkpoint
from autohdr.runs.debug import run_debug_mode
from autohdr.diagnosis.plots import (ZERO_STRIP_LABELS, curves_figure, plot_curves, plot_triplets, run_title,
                                     safe_text, triplets_figure)
from autohdr.diagnosis.report_html import FIGURES, render_report_html, write_report_html
from autohdr.diagnosis.verdicts import SIGNALS
from autohdr.lens.evaluation import correct, identity_prediction
from autohdr.lens.proxy import proxy_score
from autohdr.training.checkpoint import load_checkpoint
from tests.helpers_data import copy_pairs
from tests.test_diagnostics import FAULTS, HEALTHY

HEALTHY_STAGE2 = next(spec for spec in HEALTHY if spec.name == "healthy-stage2-128px")
LR_ZERO = next(f.spec for f in FAULTS if f.spec.name == "fault-lr-zero")
RESIDUAL_X0 = next(f.spec for f in FAULTS if f.spec.name == "fault-residual-times-zero")
#: Green of the ALL GOOD banner (report_html's CSS #2e7d32).
BANNER_GREEN = (0x2E, 0x7D, 0x32)


# ------------------------------------------------------------------------------------ helpers

class _Page(HTMLParser):
    """The parts of a report page the tests look at: verdict rows, images, external references."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, str] = {}           # signal -> class of its row
        self.images: list[str] = []               # src of every <img>
        self.external: list[str] = []             # any src/href that is not a data: URI or in-page anchor
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-signal" in attrs:
            self.rows[attrs["data-signal"]] = attrs.get("class", "")
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            value = attrs.get(key)
            if value and not value.startswith(("data:", "#")):
                self.external.append(value)

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def _report(**changes) -> dict:
    """A report shaped like report.json: one verdict per signal, the first two bad."""
    verdicts = [{"signal": s, "ok": i >= 2 if i != 5 else None, "detail": f"detail of {s}", "evidence": {"x": i}}
                for i, s in enumerate(SIGNALS)]
    report = {"mode": "stage2_probe", "runbook_name": "local_debug_stage2_probe", "stage": "stage2_hybrid",
              "all_good": False, "error": None, "interrupted": False, "verdicts": verdicts,
              "figures": {"final_val_proxy_total": 0.61, "final_identity_proxy_total": 0.54, "steps": 16},
              "out_dir": "/runs/r", "data_root": "/data/pairs", "device": "cpu", "world_size": 1,
              "created": "2026-01-01 10:00:00 +0000",
              "config": {"train": {"seed": 3, "lr": 0.003}, "judge": {"beats_identity_margin": 0.002}}}
    report.update(changes)
    return report


def _row(page: str, signal: str) -> str:
    """The HTML of one verdict row."""
    return re.search(rf'<tr class="[a-z]+" id="signal-{signal}".*?</tr>', page, re.S).group(0)


def _png(color=(10, 20, 30)) -> bytes:
    import io
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _probe(run_dir: Path, resize_hw, count: int) -> dict:
    """The run's probe: the first ``count`` validation samples, as the trainer takes them."""
    dataset = PairDataset(read_split_csv(run_dir / "val_split.csv"), resize_hw=tuple(resize_hw), hflip=False, seed=0)
    items = [dataset[i] for i in range(count)]
    return {"input_image": torch.stack([x["input_image"] for x in items]),
            "target_image": torch.stack([x["target_image"] for x in items]),
            "image_id": [x["image_id"] for x in items]}


# ------------------------------------------------------------------------------------ report.html (pure)

class TestRenderReportHtml:
    def test_every_signal_has_a_row_coloured_by_its_verdict(self):
        report = _report()
        rows = parse(render_report_html(report)).rows
        assert list(rows) == list(SIGNALS)
        expected = {v["signal"]: {True: "good", False: "bad", None: "na"}[v["ok"]] for v in report["verdicts"]}
        assert rows == expected

    def test_banner_names_the_bad_signals(self):
        page = render_report_html(_report())
        bad = list(SIGNALS)[:2]
        assert f'class="banner bad" id="overall">BAD SIGNALS: {", ".join(bad)}<' in page
        good = render_report_html(_report(all_good=True, verdicts=[{"signal": "finite", "ok": True, "detail": ""}]))
        assert 'class="banner good" id="overall">ALL GOOD<' in good

    def test_user_strings_are_escaped(self):
        evil = '<script>alert("x")</script>&\'"'
        report = _report(data_root=f"/data/{evil}", out_dir=evil, mode=evil,
                         verdicts=[{"signal": "finite", "ok": False, "detail": evil, "evidence": {"id": evil}}],
                         config={"data": {evil: evil}})
        page = render_report_html(report)
        assert "<script" not in page and "alert(\"x\")" not in page
        assert page.count("&lt;script&gt;") >= 5
        assert parse(page).scripts == 0

    def test_self_contained_images_inline_and_intact(self):
        images = {"curves.png": _png((1, 2, 3)), "triplets.png": _png((4, 5, 6))}
        page = parse(render_report_html(_report(), images))
        assert page.external == []
        assert len(page.images) == 2
        decoded = [base64.b64decode(src.split(",", 1)[1]) for src in page.images]
        assert all(src.startswith("data:image/png;base64,") for src in page.images)
        assert decoded == [images[name] for name, _ in FIGURES]

    def test_no_figures_says_so(self):
        page = render_report_html(_report(), {})
        assert parse(page).images == [] and "No figures in this run folder" in page

    def test_likely_cause_column_and_section_only_when_given(self):
        plain = render_report_html(_report())
        assert "likely cause" not in plain.lower() and 'id="diagnoses"' not in plain
        diagnoses = [{"cause": "learning rate is 0", "signals": ["scores_move", "loss_decreases"],
                      "look_at": "curves.png: learning rate panel"}]
        page = render_report_html(_report(diagnoses=diagnoses))
        assert "<th>likely cause</th>" in page and 'id="diagnoses"' in page
        assert "look at: curves.png: learning rate panel" in page
        row = _row(page, "scores_move")
        assert "learning rate is 0" in row
        other = _row(page, "finite")
        assert "learning rate is 0" not in other

    def test_a_verdicts_own_cause_is_shown(self):
        report = _report()
        report["verdicts"][0]["likely_cause"] = "evaluation reads a cached model"
        page = render_report_html(report)
        row = _row(page, "scores_move")
        assert "evaluation reads a cached model" in row and 'id="diagnoses"' not in page

    def test_headline_figures_config_and_run_failure(self):
        page = render_report_html(_report(error="non-finite loss at step 3 (lr=1e6)", interrupted=True))
        assert "+0.0700" in page and "model − identity" in page       # 0.61 - 0.54
        assert 'id="config"' in page and "beats_identity_margin" in page
        assert "Run failed: non-finite loss at step 3 (lr=1e6)" in page and "interrupted" in page
        assert "seed: <strong>3</strong>" in page


class TestWriteReportHtml:
    def test_inlines_the_figures_present(self, tmp_path):
        (tmp_path / "curves.png").write_bytes(_png())
        path = write_report_html(tmp_path, _report())
        page = parse(path.read_text(encoding="utf-8"))
        assert path == tmp_path / "report.html" and len(page.images) == 1
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left

    def test_every_shared_run_has_a_report_html(self, debug_run):
        run = debug_run(HEALTHY_STAGE2)
        page = (run.out_dir / "report.html").read_text(encoding="utf-8")
        assert list(parse(page).rows) == [v["signal"] for v in run.report["verdicts"]]


# ------------------------------------------------------------------------------------ autohdr judge

class TestJudgeRewritesThePage:
    def _copy(self, run, tmp_path: Path) -> Path:
        for name in ("metrics.jsonl", "report.json"):
            shutil.copy2(run.out_dir / name, tmp_path / name)
        (tmp_path / "report.html").write_text("stale page", encoding="utf-8")
        return tmp_path

    def _judge(self, *argv) -> tuple[int, str]:
        import contextlib
        import io
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main([str(a) for a in argv])
        return code, out.getvalue()

    def test_page_shows_the_judged_verdicts(self, debug_run, tmp_path):
        run_dir = self._copy(debug_run(LR_ZERO), tmp_path)
        code, out = self._judge("judge", run_dir, "--json")
        printed = json.loads(out)
        assert code == EXIT_BAD_SIGNAL and printed["all_good"] is False
        page = (run_dir / "report.html").read_text(encoding="utf-8")
        rows = parse(page).rows
        assert rows == {v["signal"]: {True: "good", False: "bad", None: "na"}[v["ok"]] for v in printed["verdicts"]}
        assert "BAD SIGNALS" in page

    def test_mode_thresholds_reach_the_page(self, debug_run, tmp_path):
        """lr 0 in overfit_stage1: beats_identity is bad; judged with stage2_probe's thresholds it is n/a."""
        run_dir = self._copy(debug_run(LR_ZERO), tmp_path)
        code, out = self._judge("judge", run_dir, "--mode", "stage2_probe")
        assert out.strip().splitlines()[-1] == f"BAD SIGNALS -- report: {run_dir / 'report.html'}"
        page = (run_dir / "report.html").read_text(encoding="utf-8")
        assert parse(page).rows["beats_identity"] == "na"
        assert json.loads((run_dir / "report.json").read_text())["verdicts"] == debug_run(LR_ZERO).report["verdicts"]

    def test_healthy_run_prints_all_good(self, debug_run, tmp_path):
        run_dir = self._copy(debug_run(HEALTHY_STAGE2), tmp_path)
        code, out = self._judge("judge", run_dir)
        assert code == EXIT_OK
        assert out.strip().splitlines()[-1] == f"ALL GOOD -- report: {run_dir / 'report.html'}"


# ------------------------------------------------------------------------------------ curves.png

def _strip(fig, prefix: str):
    return next(ax for ax in fig.axes if ax.get_label() == ZERO_STRIP_LABELS[prefix])


def _main_axis_of(fig, strip):
    return next(ax for ax in fig.axes if strip in ax.get_shared_x_axes().get_siblings(ax) and ax is not strip)


def _zero_steps_drawn(fig, prefix: str) -> dict[str, list[float]]:
    """Steps marked on the zero strip, per group (the strip's lines follow the main axis' group order)."""
    strip = _strip(fig, prefix)
    main_axis = _main_axis_of(fig, strip)
    labels = [line.get_label().split(" (")[0] for line in main_axis.get_lines()
              if not line.get_label().startswith(("total", "clip norm", "_"))]
    return {group: [float(x) for x in line.get_xdata()] for group, line in zip(labels, strip.get_lines())}


@pytest.fixture(scope="module")
def curves(debug_run):
    """``spec.name -> (figure, train_step rows)`` of the three looks, each figure drawn once."""
    drawn = {}

    def get(spec):
        if spec.name not in drawn:
            run = debug_run(spec)
            drawn[spec.name] = (curves_figure(run.history), run.history.query("kind == 'train_step'"))
        return drawn[spec.name]

    yield get
    for fig, _ in drawn.values():
        plt.close(fig)


class TestCurves:
    @pytest.mark.parametrize("spec", [HEALTHY_STAGE2, LR_ZERO, RESIDUAL_X0], ids=lambda s: s.name)
    @pytest.mark.parametrize("prefix", ["grad_norm", "param_delta"])
    def test_exact_zeros_are_marked_on_the_zero_strip(self, curves, spec, prefix):
        fig, steps = curves(spec)
        drawn = _zero_steps_drawn(fig, prefix)
        strip = _strip(fig, prefix)
        main_axis = _main_axis_of(fig, strip)
        assert [t.get_text() for t in strip.get_yticklabels()] == ["0"]
        assert set(drawn) == {c[len(prefix) + 1:] for c in steps.columns if c.startswith(prefix + "_")
                              and c != f"{prefix}_total" and steps[c].notna().any()}
        for group, marked in drawn.items():
            values = steps[f"{prefix}_{group}"]
            assert marked == [float(s) for s in steps.loc[values == 0, "step"]], group
            line = next(li for li in main_axis.get_lines() if li.get_label().split(" (")[0] == group)
            plotted = np.asarray(line.get_ydata(), dtype=float)
            assert not (plotted[np.isfinite(plotted)] <= 0).any(), f"{group}: a zero drawn on the log axis"

    def test_the_three_looks_differ_where_they_should(self, curves):
        """Healthy: one zero (backbone, step 1). lr 0: every update is zero. Residual x 0: its gradient is."""
        (healthy, _), (lr0, lr0_steps), (residual, residual_steps) = map(curves, (HEALTHY_STAGE2, LR_ZERO, RESIDUAL_X0))
        assert _zero_steps_drawn(healthy, "grad_norm")["backbone"] == [1.0]
        assert all(v == [] for v in _zero_steps_drawn(healthy, "param_delta").values())
        assert all(len(v) == len(lr0_steps) for v in _zero_steps_drawn(lr0, "param_delta").values())
        assert len(_zero_steps_drawn(residual, "grad_norm")["residual_head"]) == len(residual_steps)
        texts = {name: [t.get_text() for ax in fig.axes for t in ax.texts]
                 for name, fig in (("healthy", healthy), ("lr0", lr0))}
        assert "learning rate is exactly 0 on every step" in texts["lr0"]
        assert "learning rate is exactly 0 on every step" not in texts["healthy"]

    def test_panels_title_and_clip_norm_line(self, debug_run):
        run = debug_run(HEALTHY_STAGE2)
        fig = curves_figure(run.history, run_title(run.report))
        try:
            titles = " | ".join(ax.get_title() for ax in fig.axes)
            for needle in ("loss = sum of weighted terms", "raw loss terms", "validation proxy total",
                           "gradient norm per group", "parameter change", "learning rate", "displacement"):
                assert needle in titles, needle
            title = fig._suptitle.get_text()
            assert all(part in title for part in ("stage2_probe", "seed 0", "data ", run.report["created"]))
            grad_axis = _main_axis_of(fig, _strip(fig, "grad_norm"))
            clip = run.report["config"]["train"]["grad_clip_norm"]
            clip_lines = [li for li in grad_axis.get_lines() if li.get_label() == f"clip norm {clip:g}"]
            assert len(clip_lines) == 1 and list(clip_lines[0].get_ydata()) == [clip, clip]
            proxy_axis = next(ax for ax in fig.axes if ax.get_title().startswith("validation proxy total"))
            baselines = {li.get_label(): li.get_ydata()[0] for li in proxy_axis.get_lines()}
            val = run.history.query("kind == 'val_epoch'").iloc[-1]
            assert baselines["identity"] == val["identity_proxy_total"]
            assert baselines["ground-truth warp"] == val["gt_proxy_total"]
        finally:
            plt.close(fig)


# ------------------------------------------------------------------------------------ triplets.png

def test_triplets_show_each_samples_proxy_for_model_and_identity(debug_run):
    run = debug_run(HEALTHY_STAGE2)
    model = model_from_checkpoint(load_checkpoint(run.out_dir / "last.pt"))
    probe = _probe(run.out_dir, run.report["config"]["data"]["resize_hw"], 2)
    fig = triplets_figure(model, probe, residual_active=True, count=2)
    try:
        axes = np.array(fig.axes).reshape(2, 5)
        with torch.no_grad():
            pred = correct(model.eval(), probe["input_image"], True).prediction
            identity = identity_prediction(probe["input_image"])
        for i in range(2):
            target = probe["target_image"][i]
            model_total = proxy_score(pred[i].clamp(0, 1), target)["total"]
            identity_total = proxy_score(identity[i].clamp(0, 1), target)["total"]
            titles = [ax.get_title() for ax in axes[i]]
            assert titles[0] == f"input {probe['image_id'][i]}\nidentity proxy {identity_total:.3f}"
            assert titles[1].startswith(f"prediction\nmodel proxy {model_total:.3f} ")
            assert titles[3].startswith("|prediction − target|") and titles[4].startswith("|input − target|")
            error = axes[i][3].get_images()[0].get_array()
            np.testing.assert_allclose(error, (pred[i] - target).abs().mean(0).numpy(), atol=1e-6)
            assert axes[i][3].get_images()[0].get_clim() == axes[i][4].get_images()[0].get_clim()
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------ no warnings

class TestNonLatinNames:
    CJK = "数据"

    def test_safe_text(self):
        assert safe_text("данные/p000") == "данные/p000"          # DejaVu Sans has Cyrillic
        assert safe_text(f"{self.CJK}/p000") == "??/p000"
        assert safe_text("cost $5") == r"cost \$5"

    def test_matplotlib_would_warn_without_it(self, tmp_path):
        """The check below can fail: the raw name makes matplotlib warn."""
        fig = plt.figure()
        fig.suptitle(self.CJK)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fig.savefig(tmp_path / "raw.png")
        plt.close(fig)
        assert any("missing" in str(w.message) for w in caught), [str(w.message) for w in caught]

    def test_run_on_a_non_latin_data_root_emits_no_warning(self, fixture_root, tmp_path):
        root = tmp_path / f"данные_{self.CJK}"
        copy_pairs(fixture_root, tmp_path / "src", 4)
        root.mkdir()
        for path in sorted((tmp_path / "src").iterdir()):
            path.rename(root / f"{self.CJK}_{path.name}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = run_debug_mode("overfit_stage1", data_root=root, out_dir=tmp_path / "run", device="cpu",
                                    epochs=1, log=lambda message: None,
                                    overrides={"data.num_pairs": 4, "data.batch_size": 2, "data.resize_hw": [64, 64],
                                               "train.debug_probe_max_samples": 2})
        assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
        for name in ("curves.png", "triplets.png", "report.html"):
            assert (tmp_path / "run" / name).stat().st_size > 0, name
        page = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
        assert str(root) in page and report["data_root"] == str(root)


# ------------------------------------------------------------------------------------ headless Chromium

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--enable-logging=stderr", "--v=0")
#: Chromium's log line for a page console message (errors, CSP violations, failed loads).
CONSOLE_LINE = re.compile(r":CONSOLE[:(]")


def _chromium() -> str:
    """The Chromium executable, or skip with the reason it cannot be installed here."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    marker = Path(sys.prefix) / ".chromium-unavailable"
    if marker.is_file():
        pytest.skip(f"chromium is not installed: {marker.read_text().strip()} ({marker})")
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and this user is not root, so it cannot be apt-get installed")
    if shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and there is no apt-get to install it with")
    pytest.fail("chromium is missing but installable here: run scripts/bootstrap.sh (it apt-get installs it)")


def _browse(page: Path, tmp_path: Path, *extra: str) -> tuple[str, list[str]]:
    """Load ``page`` in headless Chromium: (stdout, console lines from its log)."""
    command = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *extra,
               page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if CONSOLE_LINE.search(line)]


@pytest.fixture(scope="module")
def full_report(debug_run, tmp_path_factory) -> Path:
    """The healthy stage-2 run's report.html with both figures (shared runs are trained without plots)."""
    run = debug_run(HEALTHY_STAGE2)
    folder = tmp_path_factory.mktemp("full-report")
    shutil.copy2(run.out_dir / "report.json", folder / "report.json")
    plot_curves(run.history, folder / "curves.png", title=run_title(run.report))
    model = model_from_checkpoint(load_checkpoint(run.out_dir / "last.pt"))
    probe = _probe(run.out_dir, run.report["config"]["data"]["resize_hw"], 3)
    plot_triplets(model, probe, folder / "triplets.png", residual_active=True)
    return write_report_html(folder, run.report)


class TestInChromium:
    def test_page_loads_without_console_errors_and_shows_every_signal(self, full_report, debug_run, tmp_path):
        dom, console = _browse(full_report, tmp_path, "--dump-dom")
        assert console == []
        page = parse(dom)
        assert list(page.rows) == [v["signal"] for v in debug_run(HEALTHY_STAGE2).report["verdicts"]] == list(SIGNALS)
        assert len(page.images) == 2 and page.external == []

    def test_screenshot_shows_the_rendered_page(self, full_report, tmp_path):
        shot = tmp_path / "page.png"
        _, console = _browse(full_report, tmp_path, "--window-size=1400,2400", f"--screenshot={shot}")
        assert console == []
        pixels = np.asarray(Image.open(shot).convert("RGB"))
        assert pixels.shape[:2] == (2400, 1400)
        banner = (pixels == BANNER_GREEN).all(axis=-1).sum()
        assert banner > 1000, "the ALL GOOD banner was not rendered"

    def test_console_errors_are_caught(self, tmp_path):
        """The check above can fail: a page that reaches for the network logs a console error."""
        page = tmp_path / "bad.html"
        html = render_report_html(_report())
        page.write_text(html.replace("</body>", '<img src="http://example.invalid/x.png"></body>'), encoding="utf-8")
        _, console = _browse(page, tmp_path, "--dump-dom")
        assert console and "example.invalid" in console[0]
