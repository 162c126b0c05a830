"""Moving rows along a planned route: scatter (source -> destinations) and gather (back, summed).

Shape legend: N rows at the route's source (tokens, or (token, expert) pairs), H values per row,
R rows at the route's destination.

- **scatter** runs a :class:`~coscale.parallel.routes.Route` forwards: the codec encodes the rows once
  at the source; every stage selects encoded rows and exchanges them; the destination decodes. [N, H] ->
  [R, H].
- **gather** runs it backwards and sums, in float32, the rows that were copies of one row: [R, H] ->
  [N, H]. A forwarding rank of the two-hop route sums its node's rows before they cross the inter-node
  network again, so the return trip also crosses it once per node. Rows are re-encoded per exchange.

Each is an autograd pair: the backward of a scatter is a gather of the gradients (with the backward
codec) and the backward of a gather is a scatter. Quantisation is straight-through.

Each transfer comes in two halves so that two micro-batches can overlap (coscale.parallel.overlap):
``*_start`` runs the route up to its last exchange and issues that ``all_to_all_single`` asynchronously
(a gather: its first exchange, the last of the scatter it undoes); ``*_wait`` waits for it and runs the
rest. The halves are two autograd nodes joined by an empty "anchor" tensor, so the backward pass splits
the same way: the wait node's backward issues the reverse exchange, the start node's backward waits
for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from coscale.parallel.codec import Codec, select_rows
from coscale.parallel.routes import Route, Stage, all_to_all_rows, wait_for


def _send(rows: torch.Tensor, stage: Stage, timeout_s: float, async_op: bool = False):
    """A stage's exchange in the scatter direction."""
    return all_to_all_rows(rows, stage.send_splits, stage.recv_splits, stage.group, stage.ranks, timeout_s,
                           async_op)


def _send_back(rows: torch.Tensor, stage: Stage, timeout_s: float, async_op: bool = False):
    """A stage's exchange in the gather direction: every rank returns what it received."""
    return all_to_all_rows(rows, stage.recv_splits, stage.send_splits, stage.group, stage.ranks, timeout_s,
                           async_op)


def _undo_select(rows: torch.Tensor, route: Route, i: int) -> torch.Tensor:
    """The reverse of stage i's row selection: rows selected twice are summed."""
    out = rows.new_zeros((route.n_before(i),) + tuple(rows.shape[1:]))
    return out.index_add_(0, route.stages[i].index, rows)


# ---- the two halves of each direction ----------------------------------------------------------------


@dataclass(eq=False)
class Pending:
    """One transfer in flight, shared by its start and wait halves (forward and backward)."""

    route: Route
    hidden: int
    dtype: torch.dtype  # of the transfer's output
    codec: Codec  # the forward transfer's wire format
    grad_codec: Codec  # the backward transfer's wire format
    timeout_s: float
    issue: Callable  # this direction's first half: (x, p, codec) -> (buffer, work)
    finish: Callable  # its second half: (buffer, work, p, codec, dtype) -> rows
    issue_grad: Callable  # the opposite direction, for the gradients
    finish_grad: Callable
    buffer: Any = None
    work: Any = None
    grad_buffer: Any = None
    grad_work: Any = None


def _issue_scatter(x: torch.Tensor, p: Pending, codec: Codec) -> tuple[torch.Tensor, Any]:
    """Encode, run every stage before the last exchange, select its rows and issue it."""
    stages = p.route.stages
    if hasattr(codec, "encode_rows") and stages:
        rows = codec.encode_rows(x, stages[0].index)  # select + encode in one pass
    else:
        rows = codec.encode(x)
    last = p.route.last_exchange
    for i, stage in enumerate(stages):
        if i > 0 or not hasattr(codec, "encode_rows"):
            rows = select_rows(rows, stage.index)
        if i == last:
            return _send(rows, stage, p.timeout_s, async_op=True)
        if stage.exchanges:
            rows, _ = _send(rows, stage, p.timeout_s)
    return rows, None  # no stage exchanges: every (local) stage has run


def _finish_scatter(buffer: torch.Tensor, work: Any, p: Pending, codec: Codec, dtype: torch.dtype
                    ) -> torch.Tensor:
    """Wait for the last exchange, run the local stages after it and decode."""
    wait_for(work, p.timeout_s)
    rows = buffer
    last = p.route.last_exchange
    if last >= 0:
        for stage in p.route.stages[last + 1:]:
            rows = select_rows(rows, stage.index)
    return codec.decode(rows, p.hidden, dtype)


def _issue_gather(y: torch.Tensor, p: Pending, codec: Codec) -> tuple[torch.Tensor, Any]:
    """Undo the local stages after the last exchange (in float32), encode and issue its reverse."""
    rows = y.float()
    last = p.route.last_exchange
    for i in range(len(p.route.stages) - 1, last, -1):
        rows = _undo_select(rows, p.route, i)
    rows = codec.encode(rows)
    if last < 0:
        return rows, None
    return _send_back(rows, p.route.stages[last], p.timeout_s, async_op=True)


def _finish_gather(buffer: torch.Tensor, work: Any, p: Pending, codec: Codec, dtype: torch.dtype
                   ) -> torch.Tensor:
    """Wait, then run the earlier stages backwards, summing copies in float32 -> [N, H] in ``dtype``."""
    wait_for(work, p.timeout_s)
    last = p.route.last_exchange
    first = p.route.stages[0] if p.route.stages else None
    if last == 0 and first.copies is not None and hasattr(codec, "decode_sum"):
        # decode and sum every source row's copies in one pass (stage 0 is the only one left)
        return codec.decode_sum(buffer, first.copies, p.hidden, torch.float32).to(dtype)
    rows = codec.decode(buffer, p.hidden, torch.float32)
    for i in range(last, -1, -1):
        stage = p.route.stages[i]
        if stage.exchanges and i != last:
            encoded, _ = _send_back(codec.encode(rows), stage, p.timeout_s)
            rows = codec.decode(encoded, p.hidden, torch.float32)
        rows = _undo_select(rows, p.route, i)
    return rows.to(dtype)


# ---- autograd: the start and wait nodes --------------------------------------------------------------


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: Pending) -> torch.Tensor:
        ctx.p, ctx.dtype = p, x.dtype
        p.buffer, p.work = p.issue(x.detach(), p, p.codec)
        return x.new_empty(0)  # an anchor that orders wait after start in both passes

    @staticmethod
    def backward(ctx, _anchor_grad: torch.Tensor):
        p = ctx.p
        grad = p.finish_grad(p.grad_buffer, p.grad_work, p, p.grad_codec, ctx.dtype)
        p.grad_buffer = p.grad_work = None
        return grad, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor: torch.Tensor, p: Pending) -> torch.Tensor:
        ctx.p, ctx.anchor_dtype = p, anchor.dtype
        out = p.finish(p.buffer, p.work, p, p.codec, p.dtype)
        p.buffer = p.work = None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p = ctx.p
        p.grad_buffer, p.grad_work = p.issue_grad(grad.contiguous(), p, p.grad_codec)
        return grad.new_zeros(0, dtype=ctx.anchor_dtype), None


def _start(x: torch.Tensor, p: Pending) -> tuple[torch.Tensor, Pending]:
    return _Start.apply(x.reshape(x.shape[0], p.hidden), p), p


def _hidden(x: torch.Tensor) -> int:
    return x.shape[1] if x.dim() > 1 else 1


# ---- the public transfers ------------------------------------------------------------------------------


def scatter_start(x: torch.Tensor, route: Route, codec: Codec, grad_codec: Codec, out_dtype: torch.dtype,
                  timeout_s: float) -> tuple[torch.Tensor, Pending]:
    """Issue the scatter of x [N, H] (or [N]) along ``route``; returns (anchor, pending) for scatter_wait."""
    p = Pending(route, _hidden(x), out_dtype, codec, grad_codec, timeout_s,
                _issue_scatter, _finish_scatter, _issue_gather, _finish_gather)
    return _start(x, p)


def scatter_wait(anchor: torch.Tensor, pending: Pending) -> torch.Tensor:
    """The scattered rows [R, H] in the dtype given to scatter_start."""
    return _Wait.apply(anchor, pending)


def gather_start(y: torch.Tensor, route: Route, codec: Codec, grad_codec: Codec, out_dtype: torch.dtype,
                 timeout_s: float) -> tuple[torch.Tensor, Pending]:
    """Issue the gather of y [R, H] back along ``route``; returns (anchor, pending) for gather_wait."""
    p = Pending(route, _hidden(y), out_dtype, codec, grad_codec, timeout_s,
                _issue_gather, _finish_gather, _issue_scatter, _finish_scatter)
    return _start(y, p)


def gather_wait(anchor: torch.Tensor, pending: Pending) -> torch.Tensor:
    """The gathered rows [N, H], copies of one source row summed in float32, in the given dtype."""
    return _Wait.apply(anchor, pending)


def scatter(x: torch.Tensor, route: Route, codec: Codec, grad_codec: Codec, out_dtype: torch.dtype,
            timeout_s: float) -> torch.Tensor:
    """scatter_start + scatter_wait."""
    return scatter_wait(*scatter_start(x, route, codec, grad_codec, out_dtype, timeout_s))


def gather(y: torch.Tensor, route: Route, codec: Codec, grad_codec: Codec, out_dtype: torch.dtype,
           timeout_s: float) -> torch.Tensor:
    """gather_start + gather_wait."""
    return gather_wait(*gather_start(y, route, codec, grad_codec, out_dtype, timeout_s))
