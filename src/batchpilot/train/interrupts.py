"""Ctrl-C during a run of the :class:`~batchpilot.train.loop.Trainer` (the phases: see its module docstring).

:class:`TrainerInterrupts` is a mixin of the Trainer: SIGINT held back while a step is applied or the last
checkpoint written, and the snapshot and roll-back of a step interrupted before its optimizer step.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import torch

from batchpilot.train.trainer_state import _noise_state


class TrainerInterrupts:
    """Interrupt handling of the Trainer (a mixin: it uses the Trainer's ``_phase``, ``_sigint_held``,
    ``batching`` and ``noise``)."""

    @contextlib.contextmanager
    def _hold_sigint(self):
        """While the run lasts, SIGINT raises ``KeyboardInterrupt`` as usual, except while a step is applied
        or the last checkpoint written: then it is held back until that is done. Only installed in the
        main thread, over Python's default handler (a handler of the caller's own is left alone)."""
        self._sigint_held = False
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield
            return

        def on_sigint(signum, frame):
            if self._phase in ("apply", "saving"):
                self._sigint_held = True
                return
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _snapshot(self, model, optimizer, sampler) -> dict:
        """What a step changes before its optimizer step (the roll-back of an interrupted step)."""
        return {
            "sampler": sampler.state_dict(), "rng_cpu": torch.get_rng_state(),
            "lr": [group["lr"] for group in optimizer.param_groups],
            "buffers": [b.detach().clone() for b in model.buffers()],
            "batching": self.batching.state_dict() if self.batching is not None else None,
            "noise": _noise_state(self.noise),
        }

    def _rollback(self, snap: dict, model, optimizer, sampler) -> None:
        """Undo a step interrupted before its optimizer step: the state is that of the last completed step."""
        sampler.load_state_dict(snap["sampler"])
        torch.set_rng_state(snap["rng_cpu"])
        for group, lr in zip(optimizer.param_groups, snap["lr"]):
            group["lr"] = lr
        with torch.no_grad():
            for buf, saved in zip(model.buffers(), snap["buffers"]):
                buf.copy_(saved)
        if self.batching is not None:
            self.batching.load_state_dict(snap["batching"])
        if snap["noise"] is not None:
            self.noise.load_state_dict(snap["noise"])
        optimizer.zero_grad(set_to_none=True)
