"""Reading a step's metrics from the device a step late, so that the host never waits for the step it
has just launched.

:meth:`StepReadout.push` stacks a step's 0-d device tensors into one vector and starts its copy to
the host (pinned memory, ``non_blocking``, a CUDA event marking its completion; on the CPU the vector
is already there). :meth:`StepReadout.ready` returns the records of steps at least ``lag`` steps old:
by the time step ``s + lag`` has been queued, step ``s`` has usually finished, so waiting for its
event costs nothing while the device stays busy. :meth:`StepReadout.drain` returns every pending
record; the trainer drains before an evaluation and before a checkpoint, so a checkpoint is never
written before the losses of the steps it covers have been read and checked.

:func:`check_finite` is where a diverged run stops: the first NaN or infinite loss raises
:class:`TrainingDiverged` (every rank reads the same world-mean values, so every rank stops).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from coscale.errors import CoscaleError
from coscale.train.memory import peak_memory
from coscale.train.step import metrics_record


class TrainingDiverged(CoscaleError, RuntimeError):
    """The training loss became NaN or infinite (the run stops; earlier checkpoints are intact)."""


@dataclass
class _InFlight:
    step: int
    names: tuple[str, ...]
    values: torch.Tensor  # float64 on the host, or being copied there
    copied: Any  # torch.cuda.Event recorded after the copy, or None on the CPU
    host: dict[str, Any] = field(default_factory=dict)  # values the host knows (peak memory, lr, seconds)


class StepReadout:
    """Step metrics on their way from the device to the log (see the module docstring)."""

    def __init__(self, lag: int = 1) -> None:
        self.lag = lag
        self._pending: deque[_InFlight] = deque()

    def push(self, step: int, metrics: dict[str, torch.Tensor]) -> None:
        """Start reading a launched step's metrics; its record also gets the process's peak memory so far,
        read now (allocator counters on CUDA, which count the step's tensors once it is queued)."""
        vector = torch.stack([t.detach().to(torch.float64) for t in metrics.values()])
        memory = peak_memory(vector.device)
        copied = None
        if vector.is_cuda:
            host = torch.empty(vector.shape, dtype=vector.dtype, pin_memory=True)
            host.copy_(vector, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            vector = host
        self._pending.append(_InFlight(step, tuple(metrics), vector, copied, memory))

    def note(self, step: int, **values: Any) -> None:
        """Host-side values of a pushed step (its learning rate, its seconds), merged into its record."""
        for entry in self._pending:
            if entry.step == step:
                entry.host.update(values)

    def ready(self) -> list[dict[str, Any]]:
        """Records of the steps pushed at least ``lag`` pushes ago."""
        return [self._read(self._pending.popleft()) for _ in range(len(self._pending) - self.lag)]

    def drain(self) -> list[dict[str, Any]]:
        """Records of every pushed step."""
        return [self._read(self._pending.popleft()) for _ in range(len(self._pending))]

    @staticmethod
    def _read(entry: _InFlight) -> dict[str, Any]:
        if entry.copied is not None:
            entry.copied.synchronize()
        return {"type": "train", "step": entry.step, **metrics_record(dict(zip(entry.names, entry.values.tolist()))),
                **entry.host}


def check_finite(record: dict[str, Any], last_checkpoint: str | None) -> None:
    """Stop at the first NaN/inf main or total loss."""
    for name, label in (("loss", "training loss"), ("total_loss", "total loss (main + MTP + balance)")):
        value = record.get(name)
        if value is None or not math.isfinite(value):
            where = f"; the last checkpoint is {last_checkpoint}" if last_checkpoint else ""
            raise TrainingDiverged(
                f"the {label} is {'nan' if value is None else value} at step {record['step']}; stopping (lower "
                f"--lr, raise --warmup-steps or --grad-clip, or check the data){where}"
            )
