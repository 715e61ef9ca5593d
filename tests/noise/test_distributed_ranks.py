"""Library pieces across 2 gloo ranks (one torchrun launch): the noise scale from ranks, and SyncBatchNorm.

* The noise scale from ranks (DDP communication hook) equals, step by step, the micro-batch estimator
  of one process whose micro-batches are the ranks' shards (float64), also under accumulation.
* A plain user loop (each rank averages its own loss, ``normalization="mean"``) gets the estimate that
  rank 0 computes by hand from the two half-batch gradients and the full one.
* SyncBatchNorm at 2 ranks trains exactly like BatchNorm in one process at the same batch; plain BN
  under DDP does not.
"""

import json
import textwrap

import pytest
import torch

from batchpilot import get_workload
from batchpilot.noise.microbatch import GradientNoiseScale
from batchpilot.train import TrainConfig, Trainer
from ddp_launch import torchrun

WORKER = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from batchpilot import get_workload
    from batchpilot.workloads.data import fetch
    from batchpilot.noise.microbatch import GradientNoiseScale, two_batch_estimates
    from batchpilot.noise.ranks import RankNoiseScale
    from batchpilot.train import TrainConfig, Trainer
    from batchpilot.train.distributed import init_distributed, shard_batch

    env = init_distributed("cpu")
    rank, out = env.rank, {}
    w = get_workload("mnist1d-mlp", num_train=600, num_val=100)

    # 1. the trainer's noise from ranks, with and without accumulation (9 full batches of 64)
    for micro in (32, 16):
        noise = GradientNoiseScale()
        Trainer(w, TrainConfig(global_batch=64, micro_batch_per_rank=micro, world_size=2, steps=9, seed=1,
                               dtype="float64"), noise=noise).run()
        out[f"trainer_{micro}"] = noise.history

    # 2. a plain DDP loop, each rank averaging its own loss; rank 0 recomputes the estimate by hand
    torch.manual_seed(0)
    model = w.make_model().double()
    ref = w.make_model().double()
    ref.load_state_dict(model.state_dict())
    ddp = DistributedDataParallel(model)
    ranks = RankNoiseScale(ddp, normalization="mean")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    hand = []
    for step in range(3):
        idx = torch.randperm(600, generator=g)[:48]
        x, y = fetch(w.train_data, shard_batch(idx, rank, 2))
        ranks.begin_step(len(y))
        (w.loss_sum(ddp(x.double()), y) / len(y)).backward()
        ranks.end_step()
        if rank == 0:
            with torch.no_grad():
                for p, q in zip(ref.parameters(), model.parameters()):
                    p.copy_(q)  # the reference sits at the DDP weights of this step
            norms = []
            for part in (idx[:24], idx[24:], idx):
                ref.zero_grad()
                xp, yp = fetch(w.train_data, part)
                (w.loss_sum(ref(xp.double()), yp) / len(yp)).backward()
                norms.append(sum(float(p.grad.square().sum()) for p in ref.parameters()))
            hand.append(two_batch_estimates(norms[:2], norms[2], 24, 48))
        opt.step(); opt.zero_grad()
    out["loop"], out["hand"] = ranks.history, hand

    # 3. SyncBatchNorm (and plain BN) under DDP, no accumulation, batch 32 = 16 per rank
    wb = get_workload("digits-cnn-bn")
    for sync in (True, False):
        t = Trainer(wb, TrainConfig(global_batch=32, world_size=2, steps=6, seed=0, dtype="float64",
                                    sync_batchnorm=sync))
        t.run()
        if rank == 0:
            torch.save(t.model.state_dict(), sys.argv[2] + ("_sync" if sync else "_plain"))
    if rank == 0:
        json.dump(out, open(sys.argv[1], "w"))
    dist.destroy_process_group()
''')


@pytest.fixture(scope="module")
def ranks_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranks")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    proc = torchrun([str(script), str(tmp / "out.json"), str(tmp / "bn")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text()), tmp


@pytest.mark.parametrize("micro", [32, 16])
def test_noise_from_ranks_equals_the_micro_batch_estimator(ranks_run, micro):
    out, _ = ranks_run
    w = get_workload("mnist1d-mlp", num_train=600, num_val=100)
    ref = GradientNoiseScale()  # one process; its micro-batches of 32 are the ranks' shards
    Trainer(w, TrainConfig(global_batch=64, micro_batch_per_rank=32, steps=9, seed=1, dtype="float64"),
            noise=ref).run()
    ref.end_step()
    got = out[f"trainer_{micro}"]
    assert len(got) == len(ref.history) == 9
    for (g1, s1), (g2, s2) in zip(got, ref.history):
        assert g1 == pytest.approx(g2, rel=1e-9, abs=1e-12) and s1 == pytest.approx(s2, rel=1e-9)
    assert len({round(s, 6) for _, s in got}) > 1  # per-step estimates, not one number repeated


def test_plain_ddp_loop_gets_the_hand_computed_estimate(ranks_run):
    out, _ = ranks_run
    assert len(out["loop"]) == len(out["hand"]) == 3
    for (g1, s1), (g2, s2) in zip(out["loop"], out["hand"]):
        assert g1 == pytest.approx(g2, rel=1e-9) and s1 == pytest.approx(s2, rel=1e-9)


def test_sync_batchnorm_at_two_ranks_equals_batchnorm_in_one_process(ranks_run):
    _, tmp = ranks_run
    single = Trainer(get_workload("digits-cnn-bn"), TrainConfig(global_batch=32, steps=6, seed=0, dtype="float64"))
    single.run()
    ref = single.model.state_dict()
    sync = torch.load(str(tmp / "bn_sync"), weights_only=True)
    plain = torch.load(str(tmp / "bn_plain"), weights_only=True)
    diff = lambda s: max(float((s[k].double() - ref[k].double()).abs().max()) for k in ref)  # noqa: E731
    assert diff(sync) < 1e-10  # weights and running statistics
    assert diff(plain) > 1e-6  # per-rank statistics of 16 samples are another training run
