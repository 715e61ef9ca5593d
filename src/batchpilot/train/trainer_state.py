"""What a :class:`~batchpilot.train.loop.Trainer` saves in its checkpoint and restores from it.

:class:`TrainerState` is a mixin of the Trainer: the state of a run (model, optimizer, scheduler, EMA,
sampler, RNG streams, counters, the batch driver, the noise monitor and a pending record) gathered into
a checkpoint dict (:mod:`batchpilot.train.checkpoint` writes and reads the file), and loaded back with a
one-line :class:`~batchpilot.errors.BatchpilotError` for anything that does not fit the run. On resume,
``metrics.jsonl`` is cut back to the checkpoint's step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from batchpilot.errors import BatchpilotError
from batchpilot.files import atomic_write_text
from batchpilot.train.checkpoint import save_checkpoint


@dataclass
class _Counters:
    step: int = 0
    samples: int = 0
    train_wall_s: float = 0.0
    initial_loss: float = float("nan")
    last_loss: float = float("nan")
    steps_to_target: int | None = None
    samples_to_target: int | None = None
    time_to_target_s: float | None = None


class TrainerState:
    """Checkpoint state of the Trainer (a mixin: it uses the Trainer's ``config``, ``workload``, ``out_dir``,
    ``dist``, ``fsdp``, ``is_main``, ``batching``, ``noise``, ``_counters`` and ``_pending``)."""

    def _state(self, model, optimizer, scheduler, ema, sampler) -> dict:
        c = self._counters
        if self.fsdp:  # a collective: the full state gathered onto rank 0's CPU
            from batchpilot.train.fsdp import full_state

            model_state, optim_state = full_state(model, optimizer)
        else:
            model_state, optim_state = model.state_dict(), optimizer.state_dict()
        return {
            "config": self.config.to_dict(),
            "workload": self.workload.name,
            "model": model_state,
            "optimizer": optim_state,
            "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "sampler": sampler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "counters": {k: getattr(c, k) for k in c.__dataclass_fields__},
            "batching": self.batching.state_dict() if self.batching is not None else None,
            "noise": _noise_state(self.noise),
            "pending_record": dict(self._pending) if self._pending is not None else None,
            **({"rng_cpu_ranks": self.dist.gather(torch.get_rng_state())} if self.dist is not None else {}),
        }

    def _save(self, ckpt: Path, *objects) -> None:
        state = self._state(*objects)  # every rank: the RNG states are gathered
        if self.is_main:
            save_checkpoint(ckpt, state)

    def _restore(self, state: dict, ckpt: Path, model, optimizer, scheduler, ema, sampler) -> None:
        """Load a checkpoint (checked by :func:`load_checkpoint`); anything that does not fit this run is a
        one-line :class:`BatchpilotError`."""
        where = f"checkpoint {str(ckpt)!r}"
        if not isinstance(state["config"], dict) or not isinstance(state["counters"], dict):
            raise BatchpilotError(f"{where} is not a batchpilot checkpoint (config and counters must be dicts)")
        saved = {k: v for k, v in state["config"].items() if k not in ("steps", "epochs", "checkpoint_every", "eval_every")}
        current = {k: v for k, v in self.config.to_dict().items() if k in saved}
        if saved != current or state["workload"] != self.workload.name:
            diff = sorted(k for k in saved if saved[k] != current.get(k))
            raise BatchpilotError(f"checkpoint in {self.out_dir} was made with a different run (differs in: {', '.join(diff) or 'workload'})")
        if self.fsdp:
            self._restore_fsdp(state, where, model, optimizer)
        else:
            load_weights(model, state["model"], where)
        try:
            if not self.fsdp:
                optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if ema is not None and state.get("ema") is not None:
                load_weights(ema, state["ema"], f"{where} (EMA)")
            sampler.load_state_dict(state["sampler"])
            torch.set_rng_state(state["rng_cpu"])
            ranks = state.get("rng_cpu_ranks")
            if self.dist is not None and ranks is not None and len(ranks) == self.dist.world_size:
                torch.set_rng_state(ranks[self.dist.rank])
            self._counters = _Counters(**state["counters"])
            if self.batching is not None:
                self.batching.load_state_dict(state["batching"])
            if state.get("noise") is not None and hasattr(self.noise, "load_state_dict"):
                self.noise.load_state_dict(state["noise"])
            pending = state.get("pending_record")
            if pending is not None and not (isinstance(pending, dict) and pending.get("step") == self._counters.step):
                raise ValueError(f"its pending record is not that of step {self._counters.step}")
            self._pending = dict(pending) if pending is not None else None
        except BatchpilotError:
            raise
        except Exception as exc:  # a hand-edited or foreign checkpoint: wrong types, keys, sizes
            raise BatchpilotError(f"{where} does not fit this run ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:200]}); move it away to start fresh") from None

    def _restore_fsdp(self, state: dict, where: str, model, optimizer) -> None:
        """The full model and optimizer state of an FSDP checkpoint into this rank's shards."""
        from batchpilot.train.fsdp import load_full_state

        weights = state["model"]
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise BatchpilotError(f"{where}: no model state_dict (expected tensors by parameter name)")
        try:
            load_full_state(model, optimizer, weights, state["optimizer"])
        except Exception as exc:  # other keys or shapes: a checkpoint of another model
            raise BatchpilotError(f"{where} does not fit this FSDP run ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:200]}); move it away to start fresh") from None

    def _truncate_metrics(self, step: int) -> None:
        """Keep the records of steps 1..``step`` (a record cut off by a crash, or of a later step, goes)."""
        path = self.out_dir / "metrics.jsonl"  # type: ignore[operator]
        if not path.exists():
            return
        kept = [ln for ln in path.read_text(errors="replace").splitlines() if _record_step(ln) is not None
                and _record_step(ln) <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def _noise_state(noise) -> dict | None:
    """A noise monitor's state for a checkpoint or a roll-back; ``None`` for a monitor that has no
    ``state_dict`` (it then starts afresh on resume)."""
    state_dict = getattr(noise, "state_dict", None)
    return state_dict() if callable(state_dict) else None


def load_weights(model: nn.Module, state: object, what: str) -> None:
    """``model.load_state_dict(state)``, with a one-line :class:`BatchpilotError` naming ``what`` when the
    weights are of another model (missing or unexpected keys, other shapes)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BatchpilotError(f"{what}: no model state_dict (expected tensors by parameter name)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {list(state[k].shape)} in the file, {list(own[k].shape)} in the model"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            problems.append(f"{len(items)} {label} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")
    if problems:
        raise BatchpilotError(f"{what}: the weights are of another model than this {type(model).__name__} "
                              f"({'; '.join(problems)})")
    try:
        model.load_state_dict(state)
    except Exception as exc:  # dtype casts that fail and the like
        raise BatchpilotError(f"{what}: cannot be loaded into the model ({' '.join(str(exc).split())[:200]})") from None


def _record_step(line: str) -> int | None:
    """The step of a metrics.jsonl line, or ``None`` for a blank, cut-off or foreign line."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None
