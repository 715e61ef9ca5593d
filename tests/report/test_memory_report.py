"""The memory report and M(B) plot: traced points visible, extrapolation marked, breakdown explained."""

from __future__ import annotations

from batchpilot.memory import resolve_device
from batchpilot.memory.plot import memory_figure, save_memory_plot
from batchpilot.report.memory_report import grads_note, write_memory_report
from report_fakes import memory_curve


def test_plot_is_log_scaled_and_marks_the_extrapolation(tmp_path):
    import matplotlib.pyplot as plt

    curve, device = memory_curve(), resolve_device("RTX 4090")
    fig = memory_figure(curve, device, "t")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_xscale() == "log"
    low, high = ax.get_ylim()
    assert low < min(curve.peak_bytes_at.values()) and high > device.memory_bytes  # traced points and budget both in view
    labels = ax.get_legend_handles_labels()[1]
    assert "extrapolated past B=256 (largest traced)" in labels
    plt.close(fig)
    assert save_memory_plot(tmp_path / "m.png", curve, device, "t").stat().st_size > 10_000


def test_report_has_no_stray_heading_and_explains_grads(tmp_path):
    html = write_memory_report(tmp_path / "memory.html", "charlm", memory_curve(grads=0), resolve_device("RTX 4090")).read_text()
    assert "<p class='meta'>·" not in html and "<p class='meta'> ·" not in html
    assert "device RTX 4090 · generated" in html
    assert "grads 0 B" in html and "set_to_none=True" in html and "extrapolated from the largest traced batch" in html
    assert html.count("<img") == 1 and "What would change it" not in html  # no scenarios given: no empty table


def test_grads_note_for_partial_and_full_gradients():
    assert "only the gradients of the layers" in grads_note(memory_curve(grads=10 * 1024))
    assert grads_note(memory_curve(grads=443 * 1024)) is None
