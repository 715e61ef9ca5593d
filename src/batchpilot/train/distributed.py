"""DDP with ``torchrun``: process-group setup, exact sharding of each global batch, collectives, faults.

batchpilot runs on the engine users already have: ``torch.distributed`` with
:class:`~torch.nn.parallel.DistributedDataParallel`, launched by ``torchrun`` (``torch.distributed.run``);
there is no launcher of its own (``batchpilot train --nproc N`` calls ``torch.distributed.run``).

**Exact batches.** Every rank runs the same resumable :class:`~batchpilot.workloads.data.EpochBatchSampler`
(same seed), so every rank knows the global batch; rank ``r`` keeps the ``r``-th of ``world``
contiguous, near-equal pieces (:func:`shard_batch`), which is a ``DistributedSampler`` with exact epoch
semantics: each sample is used once per epoch, ragged last batches included, nothing padded or
dropped. Each rank splits its piece into the *same number* of micro-batches (:func:`micro_batches`),
so the collectives line up; the non-final ones run inside ``no_sync``. The unit count of the whole
global batch is all-reduced before any backward, and each rank's summed loss is multiplied by
``world / units``: DDP's average over ranks is then exactly the gradient of the global-batch mean
loss, ragged shards and variable token counts included (seeds/README.md, error 4). Without
BatchNorm, ``world`` ranks give the update of one process at the same global batch, up to float
rounding (tested in float64).

**Faults.** Rank 0 alone writes checkpoints (atomically) and logs; every rank loads them. Under
``torchrun --max-restarts N`` a restarted attempt (``TORCHELASTIC_RESTART_COUNT > 0``) resumes from the
latest checkpoint. For tests, the environment variable ``BATCHPILOT_FAULT_KILL=RANK:STEP`` makes that
rank SIGKILL itself right after optimizer step ``STEP`` of the *first* attempt (:func:`maybe_inject_fault`).
"""

from __future__ import annotations

import math
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from batchpilot.errors import BatchpilotError

FAULT_ENV = "BATCHPILOT_FAULT_KILL"
"""``RANK:STEP``: that rank kills itself after step ``STEP`` of the first torchrun attempt (tests only)."""
DEFAULT_TIMEOUT_S = 300.0
"""Collective timeout: a lost peer fails the run instead of hanging it forever."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a ``torchrun`` launch (read from torchrun's environment variables).

    Attributes:
        rank: global rank (``RANK``).
        local_rank: rank on this node (``LOCAL_RANK``).
        world_size: number of ranks (``WORLD_SIZE``).
        restart_count: torchrun attempt number, 0 for the first (``TORCHELASTIC_RESTART_COUNT``).
        launched: whether torchrun (or another launcher setting ``RANK``/``WORLD_SIZE``) started us.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    restart_count: int = 0
    launched: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, logs and writes files."""
        return self.rank == 0


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise BatchpilotError(f"environment variable {name} must be an integer, got {value!r}") from None


def torchrun_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """This process's :class:`DistEnv` from torchrun's variables (a plain process gets rank 0 of 1)."""
    env = os.environ if environ is None else environ
    launched = "RANK" in env and "WORLD_SIZE" in env
    world = _env_int(env, "WORLD_SIZE", 1) if launched else 1
    rank = _env_int(env, "RANK", 0) if launched else 0
    if world < 1 or not 0 <= rank < world:
        raise BatchpilotError(f"torchrun environment is inconsistent: RANK={rank}, WORLD_SIZE={world}")
    return DistEnv(rank=rank, local_rank=_env_int(env, "LOCAL_RANK", 0) if launched else 0, world_size=world,
                   restart_count=_env_int(env, "TORCHELASTIC_RESTART_COUNT", 0), launched=launched)


def backend_for(device: str | torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise (CPU)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(device: str | torch.device = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join torchrun's process group (``env://``) when launched with more than one rank.

    Idempotent: an already initialised group is kept (its size must match ``WORLD_SIZE``). On one rank
    nothing is initialised. Returns the :class:`DistEnv`.
    """
    env = torchrun_env()
    if env.world_size == 1:
        return env
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size:
            raise BatchpilotError(f"a process group of {dist.get_world_size()} ranks exists, but WORLD_SIZE={env.world_size}")
        return env
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, store=_attempt_store(env, timeout), rank=env.rank,
                            world_size=env.world_size, timeout=timeout)
    return env


def _attempt_store(env: DistEnv, timeout: timedelta) -> dist.Store:
    """The ``env://`` store, under a prefix of its own for each torchrun attempt.

    torchrun's agent hosts one TCPStore for all attempts (``TORCHELASTIC_USE_AGENT_STORE``), and
    ``env://`` adds no per-attempt prefix; a restarted attempt then races the dead attempt's keys
    (gloo reads a dead peer's address: "connection refused", or waits forever).
    """
    addr, port = os.environ.get("MASTER_ADDR", "localhost"), _env_int(os.environ, "MASTER_PORT", 29500)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(addr, port, env.world_size, is_master=not agent_store and env.rank == 0, timeout=timeout,
                          multi_tenant=True)
    return dist.PrefixStore(f"batchpilot/attempt_{env.restart_count}", store)


def shutdown_distributed() -> None:
    """Leave the process group if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_batch(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s piece of a global batch: ``world_size`` contiguous, near-equal pieces.

    Pieces differ by at most one sample (ragged last batches of an epoch); with ``len < world_size``
    some ranks get none. Every index goes to exactly one rank.
    """
    if not 0 <= rank < world_size:
        raise BatchpilotError(f"rank {rank} is outside world size {world_size}")
    return torch.tensor_split(indices, world_size)[rank]


def micro_batches(local: torch.Tensor, global_len: int, world_size: int, micro_batch: int) -> list[torch.Tensor]:
    """Split a rank's piece into as many micro-batches as the *largest* piece needs.

    All ranks then run the same number of forward/backward passes (DDP needs every rank in every
    all-reduce); a full batch gives ``accumulation_steps`` micro-batches of ``micro_batch``. A piece
    smaller than the count gets some empty micro-batches (still run: zero loss, zero gradient).
    """
    if micro_batch < 1:
        raise BatchpilotError(f"micro-batch must be >= 1, got {micro_batch}")
    count = max(1, math.ceil(math.ceil(global_len / world_size) / micro_batch))
    return list(torch.tensor_split(local, count))


class DistContext:
    """The trainer's view of the process group: sharding, scalar all-reduces, the DDP wrapper.

    Args:
        env: this process's place (default: from torchrun's variables).
        group: the process group (default: the world).
    """

    def __init__(self, env: DistEnv | None = None, group: Any = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise BatchpilotError("DDP needs an initialised process group: launch with "
                                  "`torchrun --nproc-per-node N -m batchpilot train ...` or `batchpilot train --nproc N`")
        self.env = env or torchrun_env()
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        return shard_batch(indices, self.rank, self.world_size)

    def micro_batches(self, indices: torch.Tensor, micro_batch: int) -> list[torch.Tensor]:
        """This rank's micro-batches of a global batch (see :func:`micro_batches`)."""
        return micro_batches(self.shard(indices), len(indices), self.world_size, micro_batch)

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Sum ``values`` over ranks in float64 (one collective); every rank gets the same numbers."""
        t = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def check_same(self, value: int, what: str) -> None:
        """Fail on every rank if ``value`` differs between ranks (e.g. the resumed step)."""
        t = torch.tensor([value, -value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        if t[0].item() != -t[1].item():
            raise BatchpilotError(f"ranks disagree on {what}: from {-t[1].item():.0f} to {t[0].item():.0f}")

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model)`` on CPU (gloo) or the model's CUDA device."""
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, process_group=self.group)


def check_world_size(config_world_size: int) -> DistContext | None:
    """The :class:`DistContext` for a run of ``config_world_size`` ranks (``None`` for one process).

    Raises:
        BatchpilotError: more than one rank asked for without a matching process group, or a process
            group of several ranks running a one-rank config (every rank would train alone).
    """
    live = dist.is_available() and dist.is_initialized()
    live_world = dist.get_world_size() if live else 1
    if config_world_size == 1:
        if live_world > 1:
            raise BatchpilotError(f"launched with {live_world} ranks but the config has world size 1 "
                                  f"(set TrainConfig(world_size={live_world}))")
        return None
    if live_world != config_world_size:
        raise BatchpilotError(
            f"world size {config_world_size} needs {config_world_size} ranks launched by torchrun "
            f"(`torchrun --nproc-per-node {config_world_size} -m batchpilot train ...` or `batchpilot train "
            f"--nproc {config_world_size}`); {'found ' + str(live_world) if live else 'no process group is initialised'}")
    return DistContext()


def maybe_inject_fault(step: int, env: DistEnv | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Test hook: SIGKILL this rank after ``step`` if ``BATCHPILOT_FAULT_KILL=RANK:STEP`` names it.

    Acts only on torchrun's first attempt (``TORCHELASTIC_RESTART_COUNT`` 0), so the restarted run goes on.
    """
    spec = (os.environ if environ is None else environ).get(FAULT_ENV)
    if not spec:
        return
    env = env or torchrun_env(environ)
    try:
        rank_s, step_s = spec.split(":")
        rank, at = int(rank_s), int(step_s)
    except ValueError:
        raise BatchpilotError(f"{FAULT_ENV} must be RANK:STEP, got {spec!r}") from None
    if env.restart_count == 0 and env.rank == rank and step == at:
        print(f"batchpilot: fault injection: rank {rank} kills itself after step {step}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def torchrun_args(nproc: int, argv: Sequence[str], *, max_restarts: int = 0, module: str = "batchpilot") -> list[str]:
    """``torch.distributed.run`` arguments that run ``python -m module *argv`` on ``nproc`` local ranks."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise BatchpilotError(f"--nproc must be a positive integer, got {nproc!r}")
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise BatchpilotError(f"--max-restarts must be an integer >= 0, got {max_restarts!r}")
    return ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
            "-m", module, *argv]


def launch(nproc: int, argv: Sequence[str], *, max_restarts: int = 0) -> int:
    """Run ``batchpilot *argv`` on ``nproc`` ranks with torchrun (``torch.distributed.run``), in this process.

    Returns the exit code of the first failed rank, or 0.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(torchrun_args(nproc, argv, max_restarts=max_restarts))
    try:
        run(args)
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def strip_launcher_args(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` and ``--max-restarts N`` (the workers must not launch again)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--nproc", "--max-restarts"):
            skip = True
            continue
        if arg.startswith(("--nproc=", "--max-restarts=")):
            continue
        out.append(arg)
    return out
