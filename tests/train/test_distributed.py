"""DDP building blocks that need no second process: sharding, env, launcher args, faults, scaling, SyncBN."""

import math

import pytest
import torch
from torch import nn

from batchpilot import BatchpilotError, get_workload
from batchpilot.noise.microbatch import two_batch_estimates
from batchpilot.noise.ranks import rank_estimates_inputs
from batchpilot.train import TrainConfig, Trainer
from batchpilot.train.distributed import (
    FAULT_ENV, backend_for, check_world_size, maybe_inject_fault, micro_batches, shard_batch, strip_launcher_args,
    torchrun_args, torchrun_env,
)
from batchpilot.train.sync_bn import CpuSyncBatchNorm, convert_sync_batchnorm


@pytest.mark.parametrize("n,world", [(64, 2), (24, 2), (25, 2), (7, 4), (3, 4), (600, 8)])
def test_shards_cover_every_index_once(n, world):
    idx = torch.randperm(1000)[:n]
    shards = [shard_batch(idx, r, world) for r in range(world)]
    assert torch.equal(torch.cat(shards), idx)  # contiguous pieces in rank order: exact epoch semantics
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n,world,micro", [(64, 2, 16), (24, 2, 16), (25, 2, 4), (3, 4, 2), (128, 4, 32)])
def test_every_rank_runs_the_same_number_of_micro_batches(n, world, micro):
    idx = torch.arange(n)
    per_rank = [micro_batches(shard_batch(idx, r, world), n, world, micro) for r in range(world)]
    counts = {len(m) for m in per_rank}
    assert len(counts) == 1  # DDP needs every rank in every synchronised backward
    assert all(len(p) <= micro for m in per_rank for p in m)
    assert torch.equal(torch.cat([p for m in per_rank for p in m]), idx)
    if n % (world * micro) == 0:
        assert counts == {n // (world * micro)} and all(len(p) == micro for m in per_rank for p in m)


def test_torchrun_env_parsing():
    env = torchrun_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "TORCHELASTIC_RESTART_COUNT": "3"})
    assert (env.rank, env.world_size, env.local_rank, env.restart_count, env.launched, env.is_main) == (1, 2, 1, 3, True, False)
    plain = torchrun_env({})
    assert (plain.rank, plain.world_size, plain.launched, plain.is_main) == (0, 1, False, True)
    with pytest.raises(BatchpilotError, match="inconsistent"):
        torchrun_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(BatchpilotError, match="WORLD_SIZE"):
        torchrun_env({"RANK": "0", "WORLD_SIZE": "two"})


def test_backend_choice():
    assert backend_for("cpu") == "gloo" and backend_for("cuda:0") == "nccl"


def test_world_size_above_one_without_torchrun_is_a_clear_error(mlp_workload):
    with pytest.raises(BatchpilotError, match="torchrun --nproc-per-node 2"):
        Trainer(mlp_workload, TrainConfig(global_batch=64, world_size=2, steps=1))
    assert check_world_size(1) is None


def test_config_checks_the_split_over_ranks():
    cfg = TrainConfig(global_batch=64, micro_batch_per_rank=16, world_size=2)
    assert cfg.accumulation_steps == 2 and cfg.micro_per_rank == 16
    with pytest.raises(BatchpilotError, match="does not divide over world size"):
        TrainConfig(global_batch=63, world_size=2)
    with pytest.raises(BatchpilotError, match="sync_batchnorm"):
        TrainConfig(global_batch=64, sync_batchnorm="yes")


def test_launcher_arguments_use_torchrun_and_drop_the_launch_flags():
    argv = ["train", "--nproc", "2", "--batch", "64", "--max-restarts=1", "--json"]
    inner = strip_launcher_args(argv)
    assert inner == ["train", "--batch", "64", "--json"]
    args = torchrun_args(2, inner, max_restarts=1)
    assert args[:8] == ["--standalone", "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "1", "-m"]
    assert args[8:] == ["batchpilot", *inner]
    from torch.distributed.run import parse_args

    parsed = parse_args(args)  # torchrun itself accepts them
    assert parsed.nproc_per_node == "2" and parsed.max_restarts == 1 and parsed.module and parsed.standalone
    with pytest.raises(BatchpilotError, match="--nproc"):
        torchrun_args(0, inner)


def test_fault_injection_only_on_the_named_rank_step_and_first_attempt(monkeypatch):
    killed = []
    monkeypatch.setattr("os.kill", lambda pid, sig: killed.append(sig))
    env = {FAULT_ENV: "1:7", "RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RESTART_COUNT": "0"}
    maybe_inject_fault(6, environ=env)
    maybe_inject_fault(7, environ={**env, "RANK": "0"})
    maybe_inject_fault(7, environ={**env, "TORCHELASTIC_RESTART_COUNT": "1"})
    assert killed == []
    maybe_inject_fault(7, environ=env)
    assert len(killed) == 1
    with pytest.raises(BatchpilotError, match="RANK:STEP"):
        maybe_inject_fault(1, environ={FAULT_ENV: "oops"})


def test_rank_norm_scaling_recovers_the_local_mean_gradients():
    # two ranks with 3 and 5 units; each rank's local mean gradient is known, and the trainer's scaling
    # (summed loss x world / global units) multiplies rank r's by world x b_r / B
    g0, g1 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([0.2, 0.3, -1.0], dtype=torch.float64)
    b, total, world = [3, 5], 8, 2
    local = [world * b[0] / total * g0, world * b[1] / total * g1]
    small, sizes, big = rank_estimates_inputs([float(x @ x) for x in local], b, "global")
    assert small == pytest.approx([float(g0 @ g0), float(g1 @ g1)], rel=1e-12) and sizes == b and big == total
    big_grad = sum(local) / world  # what DDP's average holds
    assert torch.allclose(big_grad, (3 * g0 + 5 * g1) / 8)
    g_sq, tr = two_batch_estimates(small, float(big_grad @ big_grad), sizes, big)
    assert math.isfinite(g_sq) and math.isfinite(tr)
    # "mean": each rank averaged its own loss; the mean of means has the variance of world²/Σ1/b units
    small_m, _, big_m = rank_estimates_inputs([float(g0 @ g0), float(g1 @ g1)], b, "mean")
    assert small_m == pytest.approx([float(g0 @ g0), float(g1 @ g1)]) and big_m == pytest.approx(4 / (1 / 3 + 1 / 5))
    # a rank without units is left out
    small_e, sizes_e, _ = rank_estimates_inputs([0.0, 1.0, 2.0], [0, 4, 4], "global")
    assert sizes_e == [4, 4] and len(small_e) == 2
    with pytest.raises(BatchpilotError, match="normalization"):
        rank_estimates_inputs([1.0], [1], "sum")


def test_cpu_sync_batchnorm_is_plain_batchnorm_on_one_process():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU()).double()
    ref = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU()).double()
    ref.load_state_dict(model.state_dict())
    convert_sync_batchnorm(model)
    assert isinstance(model[1], CpuSyncBatchNorm) and model[1].momentum == 0.3
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    assert torch.allclose(model(x), ref(x))
    for a, b_ in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.allclose(a.double(), b_.double())
    with pytest.raises(BatchpilotError, match="no BatchNorm"):
        convert_sync_batchnorm(nn.Linear(2, 2))


def test_sync_bn_flag_converts_the_trainers_model():
    w = get_workload("digits-cnn-bn")
    t = Trainer(w, TrainConfig(global_batch=32, steps=1, sync_batchnorm=True))
    t.run()
    assert sum(isinstance(m, CpuSyncBatchNorm) for m in t.model.modules()) == 2


def test_trainer_noise_without_two_batch_sizes_is_refused(mlp_workload):
    from batchpilot.noise.microbatch import GradientNoiseScale

    with pytest.raises(BatchpilotError, match="two batch sizes"):
        Trainer(mlp_workload, TrainConfig(global_batch=32, steps=1), noise=GradientNoiseScale())
    noise = GradientNoiseScale()
    Trainer(mlp_workload, TrainConfig(global_batch=32, micro_batch_per_rank=8, steps=3), noise=noise).run()
    assert noise.n_updates == 3


def test_non_final_micro_batches_run_inside_no_sync():
    import contextlib

    from batchpilot.train import accumulate_gradients

    class FakeDDP(nn.Linear):
        def __init__(self):
            super().__init__(3, 2)
            self.synced, self.inside = [], False

        @contextlib.contextmanager
        def no_sync(self):
            self.inside = True
            yield
            self.inside = False

        def forward(self, x):
            self.synced.append(not self.inside)
            return super().forward(x)

    model = FakeDDP()
    micro = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]
    loss_sum = lambda out, y: nn.functional.cross_entropy(out, y, reduction="sum")  # noqa: E731
    accumulate_gradients(model, micro, loss_sum, len, total_units=24, loss_scale=2.0)
    assert model.synced == [False, False, True]  # only the last backward all-reduces
