"""The report in a real browser: headless Chromium (Debian's `chromium`, installed by scripts/ensure_chromium.sh,
which `make test` runs) renders it offline; every section and image must be there, every image must decode, the
tables must sort, and the page must log no error. A screenshot at laptop size is saved under the test's tmp_path.

Without Chromium these tests fail (they do not skip) unless SAELAB_SKIP_BROWSER=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from saelab.report import SECTION_IDS, build_report

EVAL_SAMPLES = 10_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WINDOW = (1366, 900)  # a common laptop screen

# Injected first into <head> of a copy of the report: records any script error or failed resource, then on load
# whether every image decoded and what clicking the F1 header of the leaderboard does to the row order.
PROBE = """<script>
window.addEventListener('error', function (e) {
  var what = e.message || ('failed to load ' + (e.target && e.target.tagName));
  document.documentElement.setAttribute('data-probe-error', String(what));
}, true);
window.addEventListener('load', function () {
  var root = document.documentElement, imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } }
  root.setAttribute('data-probe-images', ok + '/' + imgs.length);
  root.setAttribute('data-probe-width', String(document.documentElement.scrollWidth));
  var t = document.getElementById('leaderboard-table');
  if (t) {
    var heads = t.tHead.rows[0].cells, idx = -1;
    for (var j = 0; j < heads.length; j++) { if (heads[j].textContent === 'F1') { idx = j; } }
    function column() {
      var v = [];
      for (var r = 0; r < t.tBodies[0].rows.length; r++) { v.push(t.tBodies[0].rows[r].cells[idx].getAttribute('data-v')); }
      return JSON.stringify(v);
    }
    heads[idx].click();
    root.setAttribute('data-probe-asc', column());
    heads[idx].click();
    root.setAttribute('data-probe-desc', column());
  }
  root.setAttribute('data-probe-done', '1');
});
</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("SAELAB_SKIP_BROWSER") == "1":
        pytest.skip("SAELAB_SKIP_BROWSER=1: browser tests skipped")
    pytest.fail(
        "headless Chromium is not installed: run scripts/ensure_chromium.sh (make test does), or set "
        "SAELAB_SKIP_BROWSER=1 to skip the browser tests"
    )


def browse(html: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--enable-logging=stderr",
        "--v=0",
        f"--user-data-dir={tmp_path / 'chromium'}",
        "--virtual-time-budget=10000",
        *extra,
        html.resolve().as_uri(),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def console_errors(stderr: str) -> list[str]:
    """Chromium logs page console messages as ':CONSOLE(line)] "text"'; any of them here is a page error."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def render(report: Path, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """(DOM after load, the probe's attributes) for `report` rendered offline in headless Chromium."""
    probed = tmp_path / f"probed-{report.name}"
    text = report.read_text()
    probed.write_text(text.replace("<head>", "<head>" + PROBE, 1))
    proc = browse(probed, tmp_path, "--dump-dom", f"--window-size={WINDOW[0]},{WINDOW[1]}")
    dom = proc.stdout
    assert console_errors(proc.stderr) == [], console_errors(proc.stderr)
    root = re.search(r"<html[^>]*>", dom).group(0)
    attrs = dict(re.findall(r'data-probe-([a-z]+)="([^"]*)"', root))
    assert attrs.get("done") == "1", f"the page's load handlers did not finish: {root}"
    assert "error" not in attrs, f"the page raised an error: {attrs['error']}"
    return dom, attrs


def screenshot(report: Path, tmp_path: Path) -> Path:
    shot = tmp_path / f"{report.stem}.png"
    proc = browse(
        report, tmp_path, f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars"
    )
    assert console_errors(proc.stderr) == []
    data = shot.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == WINDOW
    return shot


def test_full_report_renders_in_chromium(report_run_dir, tmp_path):
    report = tmp_path / "report.html"
    result = build_report(report_run_dir, report, eval_samples=EVAL_SAMPLES)
    dom, probe = render(report, tmp_path)
    for sid in SECTION_IDS:
        assert re.search(rf'<section id="{sid}">', dom), f"section {sid} not in the rendered page"
    assert probe["images"] == f"{result.images}/{result.images}" and result.images == 7
    assert dom.count("<img ") == result.images
    # fits a laptop screen: the page itself never scrolls sideways (wide tables scroll inside their box)
    assert int(probe["width"]) <= WINDOW[0]
    # the sortable leaderboard: ascending, then descending, numerically, published rows among saelab's
    asc, desc = json.loads(html_unescape(probe["asc"])), json.loads(html_unescape(probe["desc"]))
    values = [float(v) for v in asc]
    assert values == sorted(values) and len(values) == 6 + 10
    assert [float(v) for v in desc] == sorted(values, reverse=True)
    shot = screenshot(report, tmp_path)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


def test_partial_and_no_ground_truth_reports_render(report_run_dir, tmp_path):
    record = json.loads((report_run_dir / "run.json").read_text())
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "run.json").write_text(
        json.dumps({k: v for k, v in record.items() if k not in ("results", "history")} | {"status": "running"})
    )
    report = tmp_path / "partial.html"
    result = build_report(killed, report, eval_samples=EVAL_SAMPLES)
    assert result.images == 0 and result.partial
    dom, probe = render(report, tmp_path)
    assert 'id="partial"' in dom and probe["images"] == "0/0"
    for sid in SECTION_IDS:  # every section is still there, saying why it is empty
        assert re.search(rf'<section id="{sid}"( class="omitted")?>', dom)
    screenshot(report, tmp_path)


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)
