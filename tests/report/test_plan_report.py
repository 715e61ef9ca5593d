"""The plan report: markers, the two "largest" limits, efficiency above 1, world sizes, the goodput band, provenance."""

from __future__ import annotations

import copy
import re

import pytest

from batchpilot import __version__
from batchpilot.report.command import set_command
from batchpilot.report.plan_report import (
    efficiency_note, goodput_band, goodput_figure, largest_alternative, plan_sections, write_plan_report,
)


def _scatter_layers(fig):
    """(label, zorder, offsets) of every scatter in the figure's axes."""
    import matplotlib.collections as mc

    ax = fig.axes[0]
    return [(c.get_label(), c.get_zorder(), c.get_offsets().tolist()) for c in ax.collections
            if isinstance(c, mc.PathCollection)]


def test_chosen_star_is_drawn_above_the_base_marker_when_they_coincide(plan_dict):
    import matplotlib.pyplot as plt

    d = copy.deepcopy(plan_dict)
    d["alternatives"]["base_batch"] = dict(d["alternatives"].get("base_batch") or d["candidates"][0],
                                           global_batch=d["global_batch"], goodput=d["goodput"])
    layers = _scatter_layers(fig := goodput_figure(d))
    plt.close(fig)
    chosen = next(z for label, z, _ in layers if label.startswith("chosen"))
    base = next((label, z) for label, z, _ in layers if label.startswith("base batch"))
    assert chosen > base[1] and "(= chosen)" in base[0]
    assert max(z for _, z, _ in layers) == chosen  # nothing drawn over the star


def test_largest_that_fits_names_the_limit_that_binds(plan_dict):
    a, kind, label = largest_alternative(plan_dict)  # 4000 samples, a CPU's memory: the dataset binds
    assert kind == "dataset" and "dataset cap" in label and str(plan_dict["max_micro_batch"]) in label
    d = copy.deepcopy(plan_dict)
    d["max_micro_batch"] = a["micro_batch_per_rank"]
    assert largest_alternative(d)[1] == "memory" and "fits in memory" in largest_alternative(d)[2]
    html = "".join(p for s in plan_sections(plan_dict) for p in s.paragraphs)
    assert "Memory is not what limits the batch here" in html
    rows = {r[0]: r[1] for r in plan_sections(plan_dict)[0].table[1:]}
    assert rows["largest micro-batch that fits in memory"] == plan_dict["max_micro_batch"]
    assert rows["largest batch the training set allows (no accumulation)"] == a["global_batch"]


def test_efficiency_above_one_is_explained(plan_dict):
    note = efficiency_note(plan_dict)
    assert "above 1 for batches below" in note and "sample-efficient" in note
    goodput = next(s for s in plan_sections(plan_dict) if s.title == "Goodput and the alternatives")
    assert note in goodput.paragraphs


def test_world_size_section_only_with_worlds_data(plan_dict):
    sections = {s.title: s for s in plan_sections(plan_dict)}
    world = sections["World size"]
    assert [r[0].split()[0] for r in world.table[1:]] == ["1", "2", "4", "8"]
    assert any("★" in r[0] for r in world.table[1:]) and len(world.figures) == 1
    assert any("all-reduce" in p for p in world.paragraphs)
    d = copy.deepcopy(plan_dict)
    d["worlds"] = {}
    assert "World size" not in {s.title for s in plan_sections(d)}


@pytest.mark.parametrize("shape", ["pairs", "candidates", "list", "dict", "absent"])
def test_goodput_band_is_drawn_when_present_in_any_shape(plan_dict, shape):
    import matplotlib.pyplot as plt

    d = copy.deepcopy(plan_dict)
    bs = [c["global_batch"] for c in d["candidates"]]
    lo = [0.8 * c["goodput"] for c in d["candidates"]]
    hi = [1.2 * c["goodput"] for c in d["candidates"]]
    for c in d["candidates"]:
        c.pop("goodput_band", None)
    d.pop("goodput_band", None)
    if shape == "pairs":  # as batchpilot plan writes it: [low, high] per candidate and for the chosen one
        for c, low, high in zip(d["candidates"], lo, hi):
            c["goodput_band"] = [low, high]
        d["goodput_band"] = [0.9 * d["goodput"], 1.1 * d["goodput"]]
    elif shape == "candidates":
        for c, low, high in zip(d["candidates"], lo, hi):
            c["goodput_low"], c["goodput_high"] = low, high
    elif shape == "list":
        d["goodput_band"] = [{"global_batch": b, "low": low, "high": high} for b, low, high in zip(bs, lo, hi)]
    elif shape == "dict":
        d["goodput_band"] = {"global_batch": bs, "low": lo, "high": hi}
    band = goodput_band(d)
    fig = goodput_figure(d)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    plt.close(fig)
    if shape == "absent":
        assert band is None and "goodput uncertainty band" not in labels
    else:
        assert band == (sorted(bs), [x for _, x in sorted(zip(bs, lo))], [x for _, x in sorted(zip(bs, hi))])
        assert "goodput uncertainty band" in labels
    assert any(label.startswith("chosen's goodput band") for label in labels) == (shape == "pairs")


def test_page_names_version_command_and_date(plan_dict, tmp_path):
    set_command(["plan", "--workload", "mnist1d-mlp", "--out", "runs/p"])
    try:
        html = write_plan_report(plan_dict, tmp_path / "report.html").read_text()
    finally:
        set_command(None)
    assert f"batchpilot {__version__}" in html
    assert "batchpilot plan --workload mnist1d-mlp --out runs/p" in html
    assert re.search(r"generated \d{4}-\d\d-\d\d \d\d:\d\d UTC", html)
    assert len(re.findall(r"src='data:image/png;base64,", html)) == 5  # M(B), throughput, noise, goodput, worlds


def test_memory_curve_reaches_every_traced_point(plan_dict):
    import matplotlib.pyplot as plt

    from batchpilot.report.plan_report import memory_figure

    d = copy.deepcopy(plan_dict)
    d["micro_batch_per_rank"] = 8  # a small choice must not cut the curve short of the largest traced batch
    fig = memory_figure(d)
    reach = max(max(line.get_xdata()) for line in fig.axes[0].get_lines() if line.get_label() == "fitted M(B)")
    assert reach >= max(int(b) for b in d["memory"]["peak_bytes_at"])
    plt.close(fig)
