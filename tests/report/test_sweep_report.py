"""The sweep report: no empty plots without a target hit, the ratio against timing noise, legends and ticks."""

from __future__ import annotations

from batchpilot.report.sweep_report import _steps_figure, build_sections, timing_noise, write_sweep_report
from batchpilot.sweep.analysis import analyze
from report_fakes import reached_trials, trial, unreached_trials


def test_nothing_reached_says_so_instead_of_empty_plots(tmp_path):
    ts = unreached_trials()
    a = analyze(ts, plan={"global_batch": 64})
    sections = {s.title: s for s in build_sections(a, ts)}
    for title in ("Steps to target", "Examples to target"):
        assert not sections[title].figures and "no batch reached the target" in sections[title].paragraphs[0]
    summary = " ".join(sections["Summary"].paragraphs)
    assert "No batch reached the target" in summary and "batch None" not in summary
    html = write_sweep_report(tmp_path / "r.html", a, ts, workload="w").read_text()
    assert "batch None" not in html and "Log-log" not in html and "log-log" not in html
    assert html.count("<img") == 2  # final metric and sharpness still have data


def test_ratio_of_the_same_batch_is_called_timing_noise():
    ts = reached_trials()  # the plan's trial runs batch 128, also the grid's fastest
    a = analyze(ts, plan={"global_batch": 128})
    assert a.plan.best_batch == 128 and a.plan.time_ratio != 1
    line = " ".join(build_sections(a, ts)[0].paragraphs)
    assert "time_to_target(plan)/best" in line
    assert "best fixed batch itself" in line and "within the timing noise" in line
    assert "micro-batch 64 × 2 accumulation" in line


def test_ratio_of_another_batch_within_noise_and_beyond():
    grid = [trial(b, s, time_s=t, median_s=m) for b, s, t, m in
            ((32, 400, 4.0, 3.9), (64, 220, 2.0, 1.8), (128, 150, 1.6, 1.5))]
    close = grid + [trial(64, 160, tag="plan", time_s=1.7, median_s=1.6)]
    a = analyze(close, plan={"global_batch": 64})
    noise = timing_noise(a, close)
    assert abs(noise - (1.7 / 1.6 - 1 + 1.6 / 1.5 - 1)) < 1e-9
    assert "within the timing noise" in " ".join(build_sections(a, close)[0].paragraphs)
    far = grid + [trial(64, 400, tag="plan", time_s=4.0, median_s=4.0)]
    a = analyze(far, plan={"global_batch": 64})
    text = " ".join(build_sections(a, far)[0].paragraphs)
    assert "within the timing noise" not in text and "Timing noise of these runs" in text
    assert "The grid also ran batch 64: 2.00 s" in text


def test_b_crit_has_a_legend_entry_and_batch_ticks_are_plain():
    import matplotlib.pyplot as plt

    ts = reached_trials()
    a = analyze(ts, plan={"global_batch": 128})
    fig = _steps_figure(a)
    fig.canvas.draw()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(label.startswith("B_crit = ") for label in labels)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
    assert ticks == ["16", "32", "64", "128", "256", "512"]
    assert not any(t.get_text() for t in fig.axes[0].get_xticklabels(minor=True))
    plt.close(fig)


def test_wide_tables_sit_in_a_scrolling_container(tmp_path):
    ts = reached_trials()
    html = write_sweep_report(tmp_path / "r.html", analyze(ts), ts, workload="w").read_text()
    assert html.count("<div class='table-wrap'><table>") == html.count("<table>")
    assert ".table-wrap{max-width:100%;overflow-x:auto}" in html
