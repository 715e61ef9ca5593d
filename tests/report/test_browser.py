"""Each report kind (plan, sweep, memory) rendered by headless Chromium: every figure decodes to real content.

Three checks per page:

- in the browser: every ``<img>`` has loaded and decoded (``naturalWidth > 0``), drawn into a canvas it is
  not blank (non-white and coloured pixels, many colours), and the page is no wider than the window (wide
  tables scroll inside their container);
- the screenshot Chromium takes is not one uniform colour;
- every embedded PNG decodes in Python too and is not one colour.

Skips when no Chromium binary is found (``.ci/run`` installs Debian's ``chromium-headless-shell``;
set ``BATCHPILOT_CHROMIUM`` to use another binary).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

BINARIES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _chromium() -> str | None:
    explicit = os.environ.get("BATCHPILOT_CHROMIUM")
    if explicit:
        return shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
    return next((p for p in map(shutil.which, BINARIES) if p), None)


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary found (looked for " + ", ".join(BINARIES) + " and $BATCHPILOT_CHROMIUM); "
                             "install Debian's chromium-headless-shell (.ci/run tries to) to run the browser checks")

WIDTH = 1100
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio", "--no-first-run",
         "--disable-dev-shm-usage", f"--window-size={WIDTH},1000"]

PROBE = """<pre id='bp-probe'></pre><script>
window.addEventListener('load', () => {
  const out = {images: [], scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth};
  for (const img of document.images) {
    const r = {alt: img.alt, complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,
               shown: img.getBoundingClientRect().width};
    try {
      const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
      const g = c.getContext('2d'); g.drawImage(img, 0, 0);
      const d = g.getImageData(0, 0, c.width, c.height).data;
      let nonWhite = 0, coloured = 0; const colours = new Set();
      for (let i = 0; i < d.length; i += 4) {
        const hi = Math.max(d[i], d[i+1], d[i+2]), lo = Math.min(d[i], d[i+1], d[i+2]);
        if (lo < 245) nonWhite++;
        if (hi - lo > 60) coloured++;
        if (colours.size < 2000) colours.add((d[i] << 16) | (d[i+1] << 8) | d[i+2]);
      }
      const n = d.length / 4;
      r.nonWhite = nonWhite / n; r.coloured = coloured / n; r.colours = colours.size;
    } catch (e) { r.error = String(e); }
    out.images.push(r);
  }
  document.getElementById('bp-probe').textContent = JSON.stringify(out);
});
</script>"""


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(tmp)}  # Chromium writes its profile under HOME
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'profile'}", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def browser_probe(page: Path, tmp: Path) -> dict:
    """Load a copy of ``page`` with the probe script in Chromium and return what the script measured."""
    probe = tmp / (page.stem + ".probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = _run(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], tmp)
    found = re.search(r"<pre id=\"bp-probe\">(.*?)</pre>", done.stdout, re.S)
    assert found and found.group(1), f"Chromium did not run the probe (rc {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def screenshot(page: Path, tmp: Path, height: int) -> np.ndarray:
    """A PNG of the page's first ``height`` pixels, as an array."""
    import matplotlib.image as mpimg

    out = tmp / (page.stem + ".png")
    done = _run([f"--window-size={WIDTH},{height}", f"--screenshot={out}", page.as_uri()], tmp)
    assert out.is_file(), f"no screenshot (rc {done.returncode}): {done.stderr[-2000:]}"
    return mpimg.imread(out)


def embedded_pngs(page: Path) -> list[np.ndarray]:
    import matplotlib.image as mpimg

    blobs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page.read_text(encoding="utf-8"))
    return [mpimg.imread(io.BytesIO(base64.b64decode(b)), format="png") for b in blobs]


def check_page(page: Path, tmp: Path, figures: int) -> None:
    pngs = embedded_pngs(page)
    assert len(pngs) == figures
    for i, img in enumerate(pngs):
        rgb = img[..., :3].reshape(-1, 3)
        assert img.shape[0] > 100 and img.shape[1] > 100, f"figure {i} is {img.shape}"
        assert rgb.std(axis=0).max() > 0.05, f"figure {i} is (nearly) one colour"
    seen = browser_probe(page, tmp)
    assert len(seen["images"]) == figures
    for img in seen["images"]:
        assert "error" not in img, img
        assert img["complete"] and img["w"] > 100 and img["h"] > 100 and img["shown"] > 100, img
        assert img["nonWhite"] > 0.03 and img["coloured"] > 0.002 and img["colours"] > 50, img
    assert seen["scrollWidth"] <= seen["innerWidth"], f"the page is wider than the window: {seen}"
    shot = screenshot(page, tmp, 3000)
    assert shot[..., :3].reshape(-1, 3).std(axis=0).max() > 0.05, "the screenshot is one uniform colour"


def test_plan_report_in_chromium(plan_dict, tmp_path):
    from batchpilot.report.plan_report import write_plan_report

    page = write_plan_report(plan_dict, tmp_path / "plan.html")
    check_page(page, tmp_path, figures=5)  # M(B), throughput + MFU, noise, goodput, world sizes


def test_sweep_reports_in_chromium(tmp_path):
    from batchpilot.report.sweep_report import write_sweep_report
    from batchpilot.sweep.analysis import analyze
    from report_fakes import reached_trials, unreached_trials

    ts = reached_trials()
    page = write_sweep_report(tmp_path / "sweep.html", analyze(ts, plan={"global_batch": 128}), ts, workload="w")
    check_page(page, tmp_path, figures=4)  # steps, examples, final metric, sharpness
    ts = unreached_trials()
    page = write_sweep_report(tmp_path / "sweep-none.html", analyze(ts, plan={"global_batch": 64}), ts, workload="w")
    check_page(page, tmp_path, figures=2)  # no steps/examples plots without a target hit


def test_memory_report_in_chromium(tmp_path):
    from batchpilot.memory import resolve_device
    from batchpilot.report.memory_report import write_memory_report
    from report_fakes import memory_curve

    page = write_memory_report(tmp_path / "memory.html", "fake", memory_curve(), resolve_device("RTX 4090"))
    check_page(page, tmp_path, figures=1)


def test_the_checks_catch_a_blank_figure_and_a_page_wider_than_the_window(tmp_path):
    import matplotlib.pyplot as plt

    from batchpilot.report.html import Section, render_html

    blank = tmp_path / "blank.html"  # a figure with nothing drawn: all white
    blank.write_text(render_html("blank", [Section("empty", figures=[plt.figure(figsize=(4, 3))])], command="x"),
                     encoding="utf-8")
    with pytest.raises(AssertionError, match="one colour"):
        check_page(blank, tmp_path, figures=1)
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [1, 4, 9], color="tab:blue")
    wide = tmp_path / "wide.html"  # a real figure, then a table outside any scrolling container
    wide.write_text(render_html("wide", [Section("t", figures=[fig])], command="x").replace(
        "</body>", "<table><tr>" + "<td>wide-cell-content</td>" * 80 + "</tr></table></body>"), encoding="utf-8")
    with pytest.raises(AssertionError, match="wider than the window"):
        check_page(wide, tmp_path, figures=1)
