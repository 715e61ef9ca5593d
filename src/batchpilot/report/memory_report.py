"""The memory report (``batchpilot memory --out DIR`` writes ``memory.html``): M(B), its breakdown, the what-ifs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from batchpilot.memory import DeviceSpec, MemoryCurve, format_bytes
from batchpilot.report.html import Section, write_html

PHASE_WORDS = {"forward": "in the forward pass", "backward": "during the backward pass",
               "optimizer": "in the optimizer step"}


def _phase_words(phase: str) -> str:
    step, _, part = phase.partition(".")
    where = PHASE_WORDS.get(part, f"in {part or phase}")
    return f"{where} of the {'first' if step == 'step1' else 'second' if step == 'step2' else step} traced step"


def grads_note(curve: MemoryCurve) -> str | None:
    """Why the breakdown's gradients are 0 or smaller than the parameters at the peak, or ``None``.

    The breakdown is a snapshot at the peak moment, not a sum of the step's maxima: gradients are set to
    ``None`` after each step (as the trainer does) and each is created when backward reaches its layer.
    """
    grads = curve.breakdown.get("grads")
    params = curve.breakdown.get("params")
    if grads is None or params is None:
        return None
    largest = max(curve.peak_bytes_at) if curve.peak_bytes_at else None
    phase = curve.peak_phase_at.get(largest, "") if largest is not None else ""
    when = f" The peak falls {_phase_words(phase)} ({phase})." if phase else ""
    if grads == 0:
        return ("grads 0 B: this is a snapshot of what is live at the peak moment, and no gradient exists then: "
                "the previous step's gradients were freed by zero_grad(set_to_none=True) and this step's are only "
                f"allocated during backward.{when} Gradients still cost up to the parameters' size later in the step; "
                "that moment's total is lower than this peak.")
    if grads < 0.5 * params:
        return (f"grads {format_bytes(grads)} (less than the parameters' {format_bytes(params)}): at the peak moment only "
                f"the gradients of the layers that backward has reached so far are allocated.{when}")
    return None


def memory_sections(workload_name: str, curve: MemoryCurve, device: DeviceSpec, scenarios: Sequence,
                    extra: Sequence[tuple[str, MemoryCurve]] = ()) -> list[Section]:
    """The report's sections."""
    from batchpilot.memory.plot import memory_figure

    title = f"{workload_name}: M(B) on {device.name}"
    traced = sorted(curve.peak_bytes_at)
    m = curve.max_micro_batch(device.usable_bytes)
    curve_par = [f"M(B) = {format_bytes(curve.fixed_bytes)} + {format_bytes(curve.per_sample_bytes)} × B for large B "
                 f"({curve.method}; worst fit residual {curve.residual_frac:.2%}); between traced batches it is "
                 f"interpolated. Traced: " + ", ".join(f"B={b}: {format_bytes(curve.peak_bytes_at[b])}" for b in traced) + ".",
                 device.describe()]
    if traced and m > max(traced):
        curve_par.append(f"The largest micro-batch, {m}, is extrapolated from the largest traced batch ({max(traced)}) "
                         f"with {format_bytes(curve.per_sample_bytes)} per sample (dashed, shaded); "
                         "batchpilot memory --probe confirms it on a real GPU.")
    elif m:
        curve_par.append(f"The largest micro-batch is {m}.")
    rows = [["category", "bytes", "share"]]
    total = sum(curve.breakdown.values()) or 1
    rows += [[k, format_bytes(v), f"{v / total:.1%}"] for k, v in curve.breakdown.items()]
    largest = max(traced) if traced else None
    phase = curve.peak_phase_at.get(largest, "") if largest is not None else ""
    breakdown_par = [f"What is live at the peak moment of the step at B={largest}" + (f" ({phase})" if phase else "")
                     + ": a snapshot, so each category shows its size at that moment, not its own maximum."]
    note = grads_note(curve)
    what = [["setting", "bytes/sample", "peak at B", "largest micro-batch", "note"]]
    what += [[s.name, format_bytes(s.per_sample_bytes), f"{format_bytes(s.peak_bytes)} (B={s.at_batch})",
              s.max_micro_batch, s.note] for s in scenarios]
    sections = [
        Section("Memory curve", curve_par, figures=[memory_figure(curve, device, title, extra)]),
        Section("Breakdown at the peak of the largest traced batch", breakdown_par + ([note] if note else []), table=rows),
    ]
    if scenarios:
        sections.append(Section("What would change it", table=what))
    return sections


def write_memory_report(path: str | Path, workload_name: str, curve: MemoryCurve, device: DeviceSpec,
                        scenarios: Sequence = (), extra: Sequence[tuple[str, MemoryCurve]] = ()) -> Path:
    """Write ``memory.html``."""
    return write_html(path, f"batchpilot memory: {workload_name}",
                      memory_sections(workload_name, curve, device, scenarios, extra),
                      subtitle=f"device {device.name}")
