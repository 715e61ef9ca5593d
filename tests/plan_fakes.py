"""Given measurements for planner tests: a throughput curve and a noise probe, no training."""

from batchpilot.plan.probe import NoisePoint, NoiseProbe
from batchpilot.throughput.measure import ThroughputCurve, ThroughputPoint


def fake_curve() -> ThroughputCurve:
    """step_s(B) = 2 ms + 20 us x B, measured at 8..128."""
    pts = []
    for b in (8, 16, 32, 64, 128):
        step = 0.002 + 2e-5 * b
        pts.append(ThroughputPoint(b, step, step - 0.0005, 0.0005, 0.1, 1e5 * b, b / step, 0.01))
    return ThroughputCurve(tuple(pts), 0.002, 2e-5, 900.0, 1e10, "test", "cpu", 1)


def fake_probe() -> NoiseProbe:
    """A short run at batch 32 whose noise scale rises from 70 to 110 samples."""
    pts = tuple(NoisePoint(20 * i, 640 * i, 60.0 + 10 * i, 40.0 + 10 * i, 90.0 + 10 * i, 0.1 * i) for i in range(1, 6))
    return NoiseProbe(points=pts, batch=32, micro_batch=16, units_per_sample=1.0, phases=((1600, 70.0), (3200, 100.0)),
                      b_noise_effective=82.0, b_noise_low=70.0, b_noise_high=95.0, b_noise_last=110.0,
                      steps_to_target=100, samples_to_target=3200, time_to_target_s=1.0, steps=100, wall_s=1.0,
                      status="target_reached")
