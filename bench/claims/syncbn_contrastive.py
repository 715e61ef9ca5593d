"""Claim (seed 000, "Assembling the Lineup"): in contrastive learning (SimCLR) over several devices, per-device
BatchNorm gives each device's features "a unique, device-specific 'accent'"; the model "can learn to 'cheat' by
listening for this accent", and synchronized BatchNorm plugs the leak.

A tiny SimCLR over 2 gloo ranks on CPU: MNIST-1D signals, two random views each (circular shift of up to ±4,
amplitude ×0.8–1.2, Gaussian noise 0.15), an MLP encoder 40→128→128 with a norm and ReLU after each linear
layer, a linear projection to 64, NT-Xent at temperature 0.2. Each rank embeds its own ``--per-rank`` images
(both views in one forward, as SimCLR code does), the embeddings are all-gathered (with their gradients), and
every anchor is scored against the other 2·per-rank·2 − 1 views of the global batch: its positive is always on
its own rank, half of its negatives on the other rank. Gradients are averaged over the ranks. Arms:
``bn`` (per-rank BatchNorm, the leaky setting) and ``sync`` (``batchpilot.train.sync_bn.CpuSyncBatchNorm``).

Printed after ``--steps`` steps (seeds 0 and 1), on 1,024 held-out training images embedded the way training
embeds them:
* the contrastive accuracy (positive ranked first) in train mode, and with every rank normalising by the
  statistics of *both* ranks' batches (the accent removed; for SyncBatchNorm that changes nothing): a model
  that reads the accent loses accuracy there;
* where the hardest negative sits: the share on the anchor's own rank ((2n−2)/(4n−2) for n images per rank
  if the rank does not matter: 48% at 16, 43% at 4);
* the representation's quality: a linear probe (logistic regression on the 128-d eval-mode features of the
  4,000 training images, scored on the 1,000 validation images).

    python bench/claims/syncbn_contrastive.py      # about 1-2 minutes of CPU
"""

from __future__ import annotations

import argparse
import warnings
import os
import statistics
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from batchpilot import get_workload
from batchpilot.train.sync_bn import CpuSyncBatchNorm

WORLD, TEMP = 2, 0.2
warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed.nn.functional's deprecation (every rank)


class Encoder(nn.Module):
    def __init__(self, sync: bool) -> None:
        super().__init__()
        norm = CpuSyncBatchNorm if sync else nn.BatchNorm1d
        self.body = nn.Sequential(nn.Linear(40, 128), norm(128), nn.ReLU(), nn.Linear(128, 128), norm(128), nn.ReLU())
        self.head = nn.Linear(128, 64)

    def forward(self, x):
        return self.head(self.body(x))


def views(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    shift = torch.randint(-4, 5, (len(x),), generator=g)
    out = torch.stack([torch.roll(row, int(s)) for row, s in zip(x, shift)])
    out = out * (0.8 + 0.4 * torch.rand(len(x), 1, generator=g))
    return out + 0.15 * torch.randn(out.shape, generator=g)


def global_embed(model, x1, x2):
    """Local views → all ranks' normalised embeddings, ordered [rank0 view1, rank0 view2, rank1 view1, ...]."""
    from torch.distributed.nn.functional import all_gather

    z = F.normalize(model(torch.cat([x1, x2])), dim=1)
    return torch.cat(all_gather(z))


def nt_xent_parts(z: torch.Tensor, n: int):
    """Logits, positive index and rank of every view for the gathered embeddings (``n`` images per rank)."""
    sim = z @ z.T / TEMP
    sim.fill_diagonal_(float("-inf"))
    idx = torch.arange(len(z))
    rank, within = idx // (2 * n), idx % (2 * n)
    pos = rank * 2 * n + (within + n) % (2 * n)
    return sim, pos, rank


def worker(rank: int, args, init: str, results) -> None:
    try:
        _worker(rank, args, init, results)
    except Exception:
        import traceback

        print(f"rank {rank}:\n{traceback.format_exc()}", flush=True)
        raise


def _worker(rank: int, args, init: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    w = get_workload("mnist1d-mlp")
    x_all, _ = w.train_data.tensors
    held = x_all[-1024:]
    train_x = x_all[:-1024]
    n = args.per_rank
    for arm in ("bn", "sync"):
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = Encoder(arm == "sync")
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
            g = torch.Generator().manual_seed(1000 * seed + rank)
            order = torch.Generator().manual_seed(seed)
            for step in range(args.steps):
                pick = torch.randperm(len(train_x), generator=order)[:WORLD * n]  # the same on both ranks
                xb = train_x[pick[rank * n:(rank + 1) * n]]
                z = global_embed(model, views(xb, g), views(xb, g))
                sim, pos, owner = nt_xent_parts(z, n)
                mine = owner == rank
                loss = F.cross_entropy(sim[mine], pos[mine])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for p in model.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= WORLD
                opt.step()
            acc, acc_pooled, same = evaluate(model, held, n, rank, seed)
            probe = linear_probe(model, w) if rank == 0 else 0.0
            if rank == 0:
                results.append((arm, seed, float(loss.detach()), acc, acc_pooled, same, probe))
    dist.destroy_process_group()


@torch.no_grad()
def evaluate(model, held, n, rank, seed):
    """Train-mode contrastive accuracy on held-out images, with own and with pooled (both ranks') statistics."""
    model.train()
    g = torch.Generator().manual_seed(99 + seed)
    accs, pooled, same = [], [], []
    for start in range(0, len(held), WORLD * n):
        chunk = held[start:start + WORLD * n]
        v1, v2 = views(chunk, g), views(chunk, g)  # the same views on both ranks (same generator)
        mine = slice(rank * n, (rank + 1) * n)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        z = global_embed(model, v1[mine], v2[mine])
        sim, pos, owner = nt_xent_parts(z, n)
        accs.append(float((sim.argmax(1) == pos).float().mean()))
        hard = sim.clone()
        hard[torch.arange(len(z)), pos] = float("-inf")
        same.append(float((owner[hard.argmax(1)] == owner).float().mean()))
        # pooled statistics: normalise this rank's views with both ranks' batch statistics (no accent left)
        zs = pooled_embed(model, torch.cat([v1[mine], v2[mine]]), torch.cat([v1, v2]))
        from torch.distributed.nn.functional import all_gather

        sim2, _, _ = nt_xent_parts(torch.cat(all_gather(zs)), n)
        pooled.append(float((sim2.argmax(1) == pos).float().mean()))
        model.load_state_dict(state)  # train-mode forwards moved the running statistics
    return statistics.mean(accs), statistics.mean(pooled), statistics.mean(same)


def pooled_embed(model, x, stats_from):
    """Embed ``x`` with every BatchNorm normalising by the batch statistics of ``stats_from`` (no all-reduce)."""
    h, h_ref = x, stats_from
    for layer in model.body:
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            mean, var = h_ref.mean(0), h_ref.var(0, unbiased=False)
            norm = lambda t: (t - mean) / torch.sqrt(var + layer.eps) * layer.weight + layer.bias
            h, h_ref = norm(h), norm(h_ref)
        else:
            h, h_ref = layer(h), layer(h_ref)
    return F.normalize(model.head(h), dim=1)


@torch.no_grad()
def linear_probe(model, w) -> float:
    from sklearn.linear_model import LogisticRegression

    model.eval()
    (xt, yt), (xv, yv) = w.train_data.tensors, w.val_data.tensors
    clf = LogisticRegression(max_iter=2000).fit(model.body(xt).numpy(), yt.numpy())
    score = float(clf.score(model.body(xv).numpy(), yv.numpy()))
    model.train()
    return score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--per-rank", type=int, default=16, help="images per rank per step (2 views each)")
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "rendezvous")
        results = mp.Manager().list()
        mp.spawn(worker, args=(args, init, results), nprocs=WORLD, join=True)
    print(f"tiny SimCLR on MNIST-1D over {WORLD} gloo ranks, {args.per_rank} images per rank, {args.steps} steps")
    print("| BatchNorm | seed | final loss | contrastive acc, own stats | with pooled stats "
          "| hardest negative on own rank | linear probe (val acc) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for arm, seed, loss, acc, pooled, same, probe in sorted(results):
        name = "per-rank" if arm == "bn" else "synchronized"
        print(f"| {name} | {seed} | {loss:.3f} | {acc:.3f} | {pooled:.3f} | {same:.0%} | {probe:.3f} |")
    n = args.per_rank
    print(f"(a rank-blind model puts the hardest negative on the anchor's own rank for {(2 * n - 2) / (4 * n - 2):.0%} "
          f"of anchors: {2 * n - 2} of its {4 * n - 2} negatives are there)")


if __name__ == "__main__":
    main()
