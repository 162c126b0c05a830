"""Host <-> device copies that never make the host wait for the GPU, and the engine's step timer.

A CPU -> CUDA copy from ordinary (pageable) memory without non_blocking synchronizes the stream, so
`torch.tensor(values, device="cuda")` or indexing a CUDA tensor with a Python list makes the host wait
for every kernel queued before it. The serving step avoids both: host values go through page-locked
(pinned) memory with non_blocking=True, whose buffers PyTorch's caching host allocator reuses only
once the copies that read them have run; results come back the same way into pinned memory, with a
CUDA event that says when they have landed (`HostCopy`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `values` (a list, or a CPU tensor) on `device`, copied without a host sync."""
    t = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class HostCopy:
    """Device tensors copied to the host in the background: `wait()` returns them once they landed."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.event = None
        if tensors and tensors[0].is_cuda:
            self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(self.host, tensors):
                h.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = list(tensors)

    def wait(self) -> list[torch.Tensor]:
        if self.event is not None:
            self.event.synchronize()
        return self.host


class StepTimer:
    """Host seconds per phase of the engine's steps (off unless enabled: benchmarks turn it on), and on
    CUDA a pair of events around each step's GPU work (launched .. results copied) and after its forward."""

    def __init__(self):
        self.reset(enabled=False)

    def reset(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.host: dict[str, float] = defaultdict(float)
        self.gpu: list[tuple] = []  # (start, after forward, end) CUDA events per step

    @contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.host[name] += time.perf_counter() - t0

    def event(self, device: torch.device):
        """A recorded CUDA event when timing a CUDA engine, else None."""
        if not self.enabled or device.type != "cuda":
            return None
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def gpu_ms(self) -> dict[str, float] | None:
        """Mean GPU milliseconds per step: the step's work and its forward alone (synchronizes)."""
        events = [e for e in self.gpu if None not in e]
        if not events:
            return None
        events[-1][2].synchronize()
        n = len(events)
        return dict(step=sum(a.elapsed_time(c) for a, _, c in events) / n,
                    forward=sum(a.elapsed_time(b) for a, b, _ in events) / n)
