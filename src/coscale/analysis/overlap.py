"""Micro-batch overlap of computation and communication (DeepSeek's two-batch overlap), as a schedule.

A forward pass is a list of layers; a layer is the same list of stages for every micro-batch; a stage
is some computation followed, optionally, by one collective (dispatch after attention, combine after the
experts). Two resources run side by side: the GPU's compute stream, which takes the micro-batches' stages
in turn (stage 1 of micro-batch 0, stage 1 of micro-batch 1, stage 2 of micro-batch 0, ...), and the
network, which carries one collective at a time in the order they are issued. A stage starts when the
compute stream is free and its micro-batch's previous stage has finished, and, if it ``waits`` (the
default), when the micro-batch's last collective has arrived. The shared expert, which needs no
dispatched token, is a stage that does not wait.

This is how the profile's schedule works: while micro-batch 0 is dispatched, micro-batch 1 computes its
attention, and so on. The layer time that results is not ``max(compute, communication)``: when one
micro-batch's collective is longer than the other's computation, the compute stream waits, and the
schedule shows the bubble. With one micro-batch nothing overlaps and the times add.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coscale.analysis.costs import OpTime


@dataclass(frozen=True)
class Stage:
    compute: tuple[OpTime, ...]
    collective: OpTime | None = None  # issued when the computation ends
    waits: bool = True  # wait for the micro-batch's last collective before starting

    @property
    def compute_s(self) -> float:
        return sum(op.seconds for op in self.compute)


@dataclass
class Schedule:
    total_s: float = 0.0
    compute_busy_s: float = 0.0
    network_busy_s: float = 0.0
    busy_by_bound: dict[str, float] = field(default_factory=dict)  # seconds per limiting resource
    busy_by_op: dict[str, float] = field(default_factory=dict)  # seconds per op name (all micro-batches)

    @property
    def compute_idle_s(self) -> float:
        """Time the compute stream waits for communication (bubbles and unhidden transfers)."""
        return self.total_s - self.compute_busy_s


def run(layers: list[tuple[Stage, ...]], micro_batches: int) -> Schedule:
    """Simulate the forward pass; ``layers`` holds one tuple of stages per layer (one micro-batch's)."""
    sched = Schedule()
    computed = [0.0] * micro_batches  # when each micro-batch's last computation ended
    arrived = [0.0] * micro_batches  # when each micro-batch's last collective ended
    compute_free = network_free = 0.0
    for stages in layers:
        for stage in stages:
            for mb in range(micro_batches):
                begin = max(compute_free, computed[mb], arrived[mb] if stage.waits else 0.0)
                compute_free = computed[mb] = begin + stage.compute_s
                sched.compute_busy_s += stage.compute_s
                for op in stage.compute:
                    _account(sched, op)
                if stage.collective is not None:
                    begin = max(network_free, computed[mb], arrived[mb])
                    network_free = arrived[mb] = begin + stage.collective.seconds
                    sched.network_busy_s += stage.collective.seconds
                    _account(sched, stage.collective)
    sched.total_s = max(computed + arrived + [compute_free, network_free])
    return sched


def _account(sched: Schedule, op: OpTime) -> None:
    sched.busy_by_bound[op.bound] = sched.busy_by_bound.get(op.bound, 0.0) + op.seconds
    sched.busy_by_op[op.name] = sched.busy_by_op.get(op.name, 0.0) + op.seconds
