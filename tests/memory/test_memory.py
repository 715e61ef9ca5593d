"""Memory tracing, the M(B) fit, devices and sizes (CPU only, small)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from batchpilot.errors import BatchpilotError
from batchpilot.memory import MemoryCurve, memory_curve, parse_bytes, resolve_device
from batchpilot.memory.measure import measure_step
from batchpilot.memory.trace import mem_tracker_available, trace_step
from batchpilot.workloads import Workload, get_workload

pytestmark = pytest.mark.skipif(not mem_tracker_available(), reason="needs torch MemTracker (torch >= 2.5)")


@pytest.fixture(scope="module")
def cnn():
    return get_workload("mnist1d-cnn", num_train=200, num_val=50)


@pytest.fixture(scope="module")
def mlp():
    return get_workload("mnist1d-mlp", num_train=200, num_val=50)


def _param_bytes(workload):
    m = workload.make_model()
    return sum(p.numel() * p.element_size() for p in m.parameters()), len(list(m.parameters()))


@pytest.mark.parametrize("name,batch", [("mnist1d-cnn", 48), ("mnist1d-mlp", 200)])
def test_trace_matches_real_cpu_allocations(name, batch):
    w = get_workload(name, num_train=200, num_val=50)
    traced = trace_step(w, batch).peak_bytes
    real = measure_step(w, batch).peak_bytes
    assert abs(traced - real) / real < 0.03, (traced, real)


def test_default_curve_extrapolates_to_large_batches(mlp):
    """The MLP's peak moves within the step as B grows (convex M(B)); the ladder runs until the slope settles."""
    c = memory_curve(mlp)
    assert min(c.peak_bytes_at) == 1 and max(c.peak_bytes_at) >= 128
    for b in (8, 2048):
        real = measure_step(mlp, b).peak_bytes
        assert abs(c.peak_bytes(b) - real) / real < 0.03, (b, c.peak_bytes(b), real)


def test_trace_allocates_nothing_even_for_a_huge_batch(mlp):
    t = trace_step(mlp, 50_000_000)  # ~200 GB of activations if it were real
    assert t.peak_bytes > 100 * 2**30
    assert t.peak_phase.startswith("step2")


def test_adam_state_is_two_values_per_parameter(cnn):
    """Seed correction 1: AdamW keeps m and v (2x the parameter count = 8 B/param in fp32), plus a step scalar."""
    params, n_tensors = _param_bytes(cnn)
    t = trace_step(cnn, 16)
    opt = t.phase_end_breakdown["step2.optimizer"]["optimizer_state"]
    assert opt == 2 * params + 4 * n_tensors


def test_sgd_momentum_state_is_one_value_per_parameter(mlp):
    params, _ = _param_bytes(mlp)
    t = trace_step(mlp, 16)
    assert t.phase_end_breakdown["step2.optimizer"]["optimizer_state"] == params


def test_gradient_memory_does_not_grow_with_batch(cnn):
    """Seed correction 2: gradients equal parameter memory at every batch size."""
    params, _ = _param_bytes(cnn)
    grads = [trace_step(cnn, b).phase_end_breakdown["step2.backward"]["grads"] for b in (8, 256)]
    assert grads == [params, params]


def test_curve_fit_and_max_batch_are_consistent(cnn):
    c = memory_curve(cnn, batch_sizes=[16, 32, 64])
    assert c.method == "fake-tensor mem_tracker"
    assert c.residual_frac < 0.01
    assert c.per_sample_bytes > 0
    for b, peak in c.peak_bytes_at.items():
        assert abs(c.peak_bytes(b) - peak) / peak < 0.01
    budget = 50 * 2**20
    m = c.max_micro_batch(budget)
    assert c.peak_bytes(m) <= budget < c.peak_bytes(m + 1)
    assert c.max_micro_batch(c.peak_bytes(1) - 1) == 0
    with pytest.raises(BatchpilotError, match=r"below the batch-1 peak.*\d+ B"):
        c.check_budget(1000)


def test_options_change_memory_in_the_expected_direction(cnn):
    w = get_workload("charlm")
    assert trace_step(w, 32, checkpointing=True).peak_bytes < 0.8 * trace_step(w, 32).peak_bytes
    base = trace_step(cnn, 64)
    bf16 = trace_step(cnn, 64, dtype="bfloat16")
    assert bf16.breakdown["params"] * 2 == base.breakdown["params"]
    assert bf16.peak_bytes < 0.7 * base.peak_bytes


class _Attn(nn.Module):
    """Single attention layer with dropout (on CPU that forces SDPA's O(s^2) math path)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, 2)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(b, s, d).mean(1))


def _attn_workload(seq=256):
    x = torch.randn(16, seq, 32)
    y = torch.randint(0, 2, (16,))
    return Workload(name="attn", make_model=_Attn, train_data=TensorDataset(x, y), val_data=TensorDataset(x, y),
                    loss_sum=lambda o, t: F.cross_entropy(o, t, reduction="sum"),
                    make_optimizer=lambda p, lr: torch.optim.AdamW(p, lr=lr), base_batch=4, base_lr=1e-3, seq_len=seq)


def test_cuda_target_does_not_charge_the_math_attention_path():
    w = _attn_workload(256)
    b, heads, s = 4, 4, 256
    cpu = trace_step(w, b, target="cpu").peak_bytes
    cuda = trace_step(w, b, target="cuda").peak_bytes
    scores = b * heads * s * s * 4
    assert cpu - cuda > scores  # the CPU math path keeps s x s probabilities (and dropout masks)
    assert cuda < 2 * scores


def test_trace_leaves_rng_untouched(cnn):
    state = torch.get_rng_state()
    memory_curve(cnn, batch_sizes=[8, 16])
    assert torch.equal(state, torch.get_rng_state())


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x)
        keep = h[:, 0] > 0
        return h[keep.nonzero().squeeze(1)].sum(0, keepdim=True).expand(x.shape[0], 3) + h * 0


def test_untraceable_model_falls_back_to_real_measurement():
    x = torch.randn(32, 8)
    y = torch.randint(0, 3, (32,))
    w = Workload(name="dd", make_model=_DataDependent, train_data=TensorDataset(x, y), val_data=TensorDataset(x, y),
                 loss_sum=lambda o, t: F.cross_entropy(o, t, reduction="sum"),
                 make_optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr), base_batch=8, base_lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = memory_curve(w)
    assert c.method.startswith("fallback: real measurement")
    assert sorted(c.peak_bytes_at) == [1, 2, 4]
    assert any("fake-tensor trace failed" in str(m.message) for m in caught)
    assert c.peak_bytes(1) > 0


def test_seq_len_rebuilds_sequence_workloads_and_rejects_others(cnn):
    w = get_workload("charlm")
    short = memory_curve(w, batch_sizes=[8], seq_len=32)
    assert short.seq_len == 32
    with pytest.raises(BatchpilotError, match="not a sequence model"):
        memory_curve(cnn, seq_len=64)


def test_bad_options():
    w = get_workload("mnist1d-mlp", num_train=200, num_val=50)
    with pytest.raises(BatchpilotError, match="dtype"):
        memory_curve(w, dtype="float8")
    with pytest.raises(BatchpilotError, match="batch sizes"):
        memory_curve(w, batch_sizes=[0, 4])


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("16GB") == 16 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5 GiB") == int(1.5 * 2**30)
    assert parse_bytes(1000) == 1000
    for bad in ("", "GiB", "-1GiB", "12 parsecs", "0"):
        with pytest.raises(BatchpilotError):
            parse_bytes(bad)


def test_devices():
    h100 = resolve_device("H100")
    assert h100.kind == "cuda" and h100.memory_bytes == 81559 * 2**20
    assert 0.8 * h100.memory_bytes < h100.usable_bytes < 0.9 * h100.memory_bytes
    assert resolve_device("rtx 4090").name == "RTX 4090"
    assert resolve_device("a100-40gb").name == "A100-40GB"
    custom = resolve_device(memory="24GiB")
    assert custom.kind == "cuda" and custom.memory_bytes == 24 * 2**30 and custom.usable_bytes < custom.memory_bytes
    assert resolve_device("H100", "40GiB").memory_bytes == 40 * 2**30
    cpu = resolve_device()
    assert cpu.kind == "cpu" and 0 < cpu.usable_bytes < cpu.memory_bytes
    with pytest.raises(BatchpilotError, match="known: .*H100.*RTX 4090"):
        resolve_device("H9000")
    if not torch.cuda.is_available():
        with pytest.raises(BatchpilotError, match="no CUDA device"):
            resolve_device("cuda")


def test_memory_curve_validation():
    with pytest.raises(BatchpilotError):
        MemoryCurve(fixed_bytes=math.nan, per_sample_bytes=1.0, peak_bytes_at={}, breakdown={}, method="x",
                    residual_frac=0.0)
