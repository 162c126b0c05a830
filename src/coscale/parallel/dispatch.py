"""Token dispatch and combine for expert parallelism, on ``all_to_all_single``.

Shape legend (the paper's letters where it has them):
  T tokens on this rank, H hidden, K experts per token, E routed experts in all, P ranks of the EP group,
  E_l = E / P experts per rank, R rows received by this rank (one per (token, local expert) pair).

Contract (the single-process MoE layer is the specification)::

    recv, meta = dispatch(x_TH, topk_idx_TK, topk_weight_TK, ep, n_experts)   # recv [R, H]
    y = local_experts(recv, meta.local_expert)                                # [R, H], rows grouped
    out_TH = combine(y, meta)                                                 #   by local expert
    # out_TH == experts_forward_loop(x, topk_idx, topk_weight, w_gate, w_up, w_down)

``recv`` holds one row per (token, expert) pair routed to this rank, sorted by local expert
(``meta.tokens_per_expert`` rows each), the layout a grouped GEMM wants. ``combine`` multiplies each row
by its gate weight (the weights travel with the dispatch, float32), sends the rows back and sums them
per token, in float32, returning x's dtype.

A transfer is a :class:`Route`: a list of stages, each "select rows, then all_to_all_single inside a
group" (a stage without a group only permutes). The flat route has one exchange over the EP group; the
two-hop route of node-limited routing (coscale.parallel.node_limited) has an inter-node exchange
carrying one copy per (token, destination node), then an intra-node exchange that fans copies out to
the experts. Dispatch runs a route forwards; combine runs it backwards, summing the rows that were
copies of one row, so a forwarding rank also sums the partial results of its node before they cross
the inter-node network again. The backward of dispatch is that combine and vice versa.

Wire formats: the dispatch codec (``"fp8"`` 1x128 e4m3 + scales, ``"bf16"``, ``"fp32"`` or any
:class:`~coscale.parallel.codec.Codec`) encodes rows once at the source; selection and forwarding move
the encoded bytes. Combine and both backward transfers use the combine codec (``"bf16"`` by default).
Quantisation is straight-through for gradients.

Asynchrony: :func:`dispatch_plan` exchanges split sizes and gate weights (small, synchronous);
:func:`dispatch_start` / :func:`dispatch_wait` and :func:`combine_start` / :func:`combine_wait` split one
transfer into "issue the all-to-all" and "wait for it", in the forward
and the backward pass alike, so two micro-batches can overlap (coscale.parallel.overlap). On a
multi-stage route the last exchange of a dispatch (the first of a combine) is the asynchronous one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from coscale.errors import ConfigError
from coscale.parallel.codec import Codec, get_codec
from coscale.parallel.groups import DEFAULT_TIMEOUT_S, ParallelContext, guarded

# ---- where the ranks are ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    """The EP group of this rank and, for the two-hop route, its two sub-groups and the node map."""

    group: Any  # None: a single process without torch.distributed
    ranks: tuple[int, ...]  # global ranks of the EP group, in group-rank order
    rank: int  # this rank's index in the EP group
    node_of_rank: tuple[int, ...] | None = None  # global rank -> node; None: one node
    intra_node_group: Any = None
    cross_node_group: Any = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def size(self) -> int:
        return len(self.ranks)

    def node(self, global_rank: int) -> int:
        return 0 if self.node_of_rank is None else self.node_of_rank[global_rank]

    @property
    def ranks_per_node(self) -> int:
        nodes = {self.node(r) for r in self.ranks}
        return self.size // len(nodes)


def group_ranks(group: Any) -> tuple[int, ...]:
    if group is None and not dist.is_initialized():
        return (0,)
    return tuple(dist.get_process_group_ranks(group or dist.group.WORLD))


def topology(ep: ParallelContext | Topology | Any) -> Topology:
    """A Topology from a ParallelContext, a process group, or None (single process)."""
    if isinstance(ep, Topology):
        return ep
    if isinstance(ep, ParallelContext):
        return Topology(
            ep.ep_group, group_ranks(ep.ep_group), ep.ep_rank, ep.node_of_rank,
            ep.intra_node_group, ep.cross_node_group, ep.timeout_s,
        )
    ranks = group_ranks(ep)
    me = dist.get_rank() if dist.is_initialized() else 0
    return Topology(ep, ranks, ranks.index(me))


# ---- routes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """Select ``index`` rows of the previous stage's rows, then exchange them inside ``group``."""

    index: torch.Tensor  # [N_send] int64
    send_splits: tuple[int, ...] = ()
    recv_splits: tuple[int, ...] = ()
    group: Any = None
    ranks: tuple[int, ...] = ()  # global ranks of the group; () = no exchange (a local permutation)

    @property
    def exchanges(self) -> bool:
        return bool(self.ranks)

    @property
    def n_out(self) -> int:
        return sum(self.recv_splits) if self.exchanges else self.index.numel()


@dataclass(frozen=True)
class Route:
    n_in: int
    stages: tuple[Stage, ...]

    def n_before(self, i: int) -> int:
        return self.n_in if i == 0 else self.stages[i - 1].n_out

    @property
    def n_out(self) -> int:
        return self.stages[-1].n_out


@dataclass
class Traffic:
    """Bytes a rank sends, by where they go: itself, its node (NVLink), other nodes (InfiniBand)."""

    local_bytes: int = 0
    intra_node_bytes: int = 0
    inter_node_bytes: int = 0
    messages: int = 0

    def add(self, other: Traffic) -> None:
        self.local_bytes += other.local_bytes
        self.intra_node_bytes += other.intra_node_bytes
        self.inter_node_bytes += other.inter_node_bytes
        self.messages += other.messages


def route_traffic(route: Route, topo: Topology, me: int, bytes_per_row: int) -> Traffic:
    """Bytes this rank (global rank ``me``) sends along ``route`` with rows of ``bytes_per_row``."""
    t = Traffic()
    for stage in route.stages:
        for dest, rows in zip(stage.ranks, stage.send_splits):
            n = rows * bytes_per_row
            if dest == me:
                t.local_bytes += n
            elif topo.node(dest) == topo.node(me):
                t.intra_node_bytes += n
            else:
                t.inter_node_bytes += n
            t.messages += int(rows > 0 and dest != me)
    return t


# ---- all-to-all primitives ---------------------------------------------------------------------------


def _exchange(x: torch.Tensor, send: tuple[int, ...], recv: tuple[int, ...], group: Any, ranks: tuple,
              timeout_s: float, async_op: bool = False) -> tuple[torch.Tensor, Any]:
    """all_to_all_single of rows; returns (output, work or None)."""
    if len(ranks) == 1:
        return x, None
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    work = guarded(
        "all_to_all_single",
        lambda: dist.all_to_all_single(out, x.contiguous(), list(recv), list(send), group=group,
                                       async_op=async_op),
        timeout_s,
    )
    return out, work


def _wait(work: Any, timeout_s: float) -> None:
    if work is not None:
        guarded("all_to_all_single (wait)", work.wait, timeout_s)


def exchange_counts(counts: torch.Tensor, group: Any, ranks: tuple, timeout_s: float) -> torch.Tensor:
    """counts [n_ranks, C] int64 (row i goes to group rank i) -> [n_ranks, C] received (row i from i)."""
    ones = (1,) * len(ranks)
    out, _ = _exchange(counts.contiguous(), ones, ones, group, ranks, timeout_s)
    return out


def exchange_rows(x: torch.Tensor, stage: Stage, timeout_s: float) -> torch.Tensor:
    """A stage's forward exchange of plain (non-differentiable) rows, e.g. expert ids."""
    rows = x.index_select(0, stage.index)
    if not stage.exchanges:
        return rows
    out, _ = _exchange(rows, stage.send_splits, stage.recv_splits, stage.group, stage.ranks, timeout_s)
    return out


def _last_exchange_index(route: Route) -> int:
    """Index of the route's last exchanging stage; -1 when no stage exchanges."""
    return max((i for i, s in enumerate(route.stages) if s.exchanges), default=-1)


def _scatter_head(payload: torch.Tensor, route: Route, timeout_s: float) -> torch.Tensor:
    """Run all stages but the last exchange; return the rows the last exchange sends."""
    rows = payload
    last = _last_exchange_index(route)
    for i, stage in enumerate(route.stages):
        rows = rows.index_select(0, stage.index)
        if i == last:
            return rows
        if stage.exchanges:
            rows, _ = _exchange(rows, stage.send_splits, stage.recv_splits, stage.group, stage.ranks,
                                timeout_s)
    return rows


def _scatter_tail(rows: torch.Tensor, route: Route) -> torch.Tensor:
    """Local stages after the last exchange."""
    last = _last_exchange_index(route)
    if last < 0:  # _scatter_head already ran every (local) stage
        return rows
    for stage in route.stages[last + 1:]:
        rows = rows.index_select(0, stage.index)
    return rows


def _gather_head(rows: torch.Tensor, route: Route) -> torch.Tensor:
    """Undo the local stages after the last exchange (their indices are permutations)."""
    last = _last_exchange_index(route)
    for i in range(len(route.stages) - 1, last, -1):
        stage = route.stages[i]
        out = rows.new_zeros((route.n_before(i),) + tuple(rows.shape[1:]))
        rows = out.index_add_(0, stage.index, rows)
    return rows


def _gather_tail(payload: torch.Tensor, route: Route, codec: Codec, hidden: int, timeout_s: float
                 ) -> torch.Tensor:
    """Rows received by the reverse of the last exchange -> summed rows at the route's source (fp32)."""
    last = _last_exchange_index(route)
    rows = codec.decode(payload, hidden, torch.float32)
    for i in range(last, -1, -1):
        stage = route.stages[i]
        if stage.exchanges and i != last:
            enc, _ = _exchange(codec.encode(rows), stage.recv_splits, stage.send_splits, stage.group,
                               stage.ranks, timeout_s)
            rows = codec.decode(enc, hidden, torch.float32)
        out = rows.new_zeros((route.n_before(i), hidden))
        rows = out.index_add_(0, stage.index, rows)
    return rows


# ---- autograd: one transfer split into start / wait --------------------------------------------------


@dataclass(eq=False)
class _Pending:
    """Shared between the start and wait halves of one transfer (both directions of autograd)."""

    route: Route
    forward_codec: Codec
    backward_codec: Codec
    hidden: int
    dtype: torch.dtype
    timeout_s: float
    buffer: Any = None
    work: Any = None
    grad_buffer: Any = None
    grad_work: Any = None


def _issue_last_exchange(rows: torch.Tensor, p: _Pending, reverse: bool) -> tuple[torch.Tensor, Any]:
    """Start the route's last exchange asynchronously (``reverse``: the combine direction)."""
    last = _last_exchange_index(p.route)
    if last < 0:
        return rows, None
    stage = p.route.stages[last]
    send, recv = (stage.recv_splits, stage.send_splits) if reverse else (stage.send_splits, stage.recv_splits)
    return _exchange(rows, send, recv, stage.group, stage.ranks, p.timeout_s, async_op=True)


def _issue_scatter(x: torch.Tensor, p: _Pending, codec: Codec) -> tuple[torch.Tensor, Any]:
    return _issue_last_exchange(_scatter_head(codec.encode(x), p.route, p.timeout_s), p, reverse=False)


def _finish_scatter(buffer: torch.Tensor, work: Any, p: _Pending, codec: Codec, dtype) -> torch.Tensor:
    _wait(work, p.timeout_s)
    return codec.decode(_scatter_tail(buffer, p.route), p.hidden, dtype)


def _issue_gather(y: torch.Tensor, p: _Pending, codec: Codec) -> tuple[torch.Tensor, Any]:
    return _issue_last_exchange(codec.encode(_gather_head(y.float(), p.route)), p, reverse=True)


def _finish_gather(buffer: torch.Tensor, work: Any, p: _Pending, codec: Codec, dtype) -> torch.Tensor:
    _wait(work, p.timeout_s)
    return _gather_tail(buffer, p.route, codec, p.hidden, p.timeout_s).to(dtype)


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: _Pending, scatter: bool) -> torch.Tensor:
        ctx.p, ctx.scatter, ctx.dtype = p, scatter, x.dtype
        issue = _issue_scatter if scatter else _issue_gather
        p.buffer, p.work = issue(x.detach(), p, p.forward_codec)
        return x.new_empty(0)  # an anchor that orders wait after start in both passes

    @staticmethod
    def backward(ctx, _anchor_grad: torch.Tensor):
        p = ctx.p
        finish = _finish_gather if ctx.scatter else _finish_scatter
        grad = finish(p.grad_buffer, p.grad_work, p, p.backward_codec, ctx.dtype)
        p.grad_buffer = p.grad_work = None
        return grad, None, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor: torch.Tensor, p: _Pending, scatter: bool) -> torch.Tensor:
        ctx.p, ctx.scatter, ctx.anchor_dtype = p, scatter, anchor.dtype
        finish = _finish_scatter if scatter else _finish_gather
        out = finish(p.buffer, p.work, p, p.forward_codec, p.dtype)
        p.buffer = p.work = None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p = ctx.p
        issue = _issue_gather if ctx.scatter else _issue_scatter
        p.grad_buffer, p.grad_work = issue(grad.contiguous(), p, p.backward_codec)
        return grad.new_zeros(0, dtype=ctx.anchor_dtype), None, None


def transfer_start(x: torch.Tensor, route: Route, scatter: bool, forward_codec: Codec,
                   backward_codec: Codec, out_dtype: torch.dtype, timeout_s: float
                   ) -> tuple[torch.Tensor, _Pending]:
    """Issue a route transfer (scatter: dispatch direction; else combine direction)."""
    hidden = x.shape[1] if x.dim() > 1 else 1
    p = _Pending(route, forward_codec, backward_codec, hidden, out_dtype, timeout_s)
    return _Start.apply(x.reshape(x.shape[0], hidden), p, scatter), p


def transfer_wait(anchor: torch.Tensor, p: _Pending, scatter: bool) -> torch.Tensor:
    return _Wait.apply(anchor, p, scatter)


# ---- dispatch / combine --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DispatchMeta:
    """What combine needs to undo a dispatch."""

    token_route: Route
    n_tokens: int
    hidden: int
    out_dtype: torch.dtype
    local_expert: torch.Tensor  # [R] int64, sorted
    tokens_per_expert: torch.Tensor  # [E_l] int64
    weights: torch.Tensor  # [R] float32 gate weight of each received row (autograd-connected)
    dispatch_codec: Codec
    combine_codec: Codec
    timeout_s: float
    traffic: Traffic = field(default_factory=Traffic)  # payload bytes this rank sent in the dispatch


@dataclass(frozen=True)
class _Plan:
    token_route: Route
    pair_route: Route
    local_expert: torch.Tensor
    tokens_per_expert: torch.Tensor


def _check_routing(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, n_experts: int,
                   topo: Topology) -> None:
    if x.dim() != 2:
        raise ConfigError(f"dispatch expects x of shape [T, H], got {tuple(x.shape)}")
    if topk_idx.shape != topk_weight.shape or topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ConfigError(
            f"topk_idx {tuple(topk_idx.shape)} and topk_weight {tuple(topk_weight.shape)} must both be "
            f"[T, K] with T = {x.shape[0]}"
        )
    if n_experts % topo.size:
        raise ConfigError(
            f"expert-parallel size {topo.size} does not divide the {n_experts} routed experts; "
            "choose an EP size that divides n_routed_experts"
        )


def _local_ids(recv_counts: torch.Tensor) -> torch.Tensor:
    """recv_counts [n_src, E_l] -> the local expert id of each received row (source-major order)."""
    n_src, e_local = recv_counts.shape
    ids = torch.arange(e_local, device=recv_counts.device).repeat(n_src)
    return torch.repeat_interleave(ids, recv_counts.reshape(-1))


def _sort_stage(local_ids: torch.Tensor) -> Stage:
    return Stage(torch.argsort(local_ids, stable=True))


def plan_flat(topk_idx: torch.Tensor, n_experts: int, topo: Topology) -> _Plan:
    """One exchange over the EP group: one row per (token, expert) pair, ordered by expert."""
    k = topk_idx.shape[1]
    e_local = n_experts // topo.size
    expert = topk_idx.reshape(-1)
    order = torch.argsort(expert, stable=True)
    per_expert = torch.bincount(expert, minlength=n_experts).reshape(topo.size, e_local)
    recv_counts = exchange_counts(per_expert, topo.group, topo.ranks, topo.timeout_s)
    send = tuple(per_expert.sum(1).tolist())
    recv = tuple(recv_counts.sum(1).tolist())
    ids = _local_ids(recv_counts)
    sort = _sort_stage(ids)
    token_route = Route(topk_idx.shape[0], (
        Stage(order // k, send, recv, topo.group, topo.ranks), sort))
    pair_route = Route(expert.numel(), (Stage(order, send, recv, topo.group, topo.ranks), sort))
    return _Plan(token_route, pair_route, ids[sort.index],
                 torch.bincount(ids, minlength=e_local))


def dispatch_plan(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, ep: Any,
                  n_experts: int, codec: str | Codec | None = "bf16",
                  combine_codec: str | Codec | None = "bf16", two_hop: bool = False,
                  counter: Traffic | None = None) -> DispatchMeta:
    """Exchange split sizes, plan the routes and move the gate weights; no token moves yet."""
    topo = topology(ep)
    _check_routing(x, topk_idx, topk_weight, n_experts, topo)
    codec, combine_codec = get_codec(codec), get_codec(combine_codec)
    if two_hop:
        from coscale.parallel.node_limited import plan_two_hop

        plan = plan_two_hop(topk_idx, n_experts, topo)
    else:
        plan = plan_flat(topk_idx, n_experts, topo)
    fp32 = get_codec("fp32")
    w_anchor, w_pending = transfer_start(topk_weight.float().reshape(-1, 1), plan.pair_route, True,
                                         fp32, fp32, torch.float32, topo.timeout_s)
    weights = transfer_wait(w_anchor, w_pending, True).reshape(-1)
    me = topo.ranks[topo.rank]
    traffic = route_traffic(plan.token_route, topo, me, codec.bytes_per_row(x.shape[1]))
    if counter is not None:
        counter.add(traffic)
    return DispatchMeta(plan.token_route, x.shape[0], x.shape[1], x.dtype, plan.local_expert,
                        plan.tokens_per_expert, weights, codec, combine_codec, topo.timeout_s, traffic)


def dispatch_start(x: torch.Tensor, meta: DispatchMeta) -> tuple[torch.Tensor, _Pending]:
    """Issue the token exchange of a planned dispatch (asynchronous); finish with dispatch_wait."""
    return transfer_start(x, meta.token_route, True, meta.dispatch_codec, meta.combine_codec, x.dtype,
                          meta.timeout_s)


def dispatch_wait(anchor: torch.Tensor, pending: _Pending) -> torch.Tensor:
    return transfer_wait(anchor, pending, True)


def dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, ep: Any,
             n_experts: int, codec: str | Codec | None = "bf16", combine_codec: str | Codec | None = "bf16",
             two_hop: bool = False, counter: Traffic | None = None) -> tuple[torch.Tensor, DispatchMeta]:
    """Send each token to the ranks owning its experts. Returns (recv [R, H] sorted by local expert, meta).

    ``ep``: a ParallelContext, a process group, or None for a single process (the reference path).
    """
    meta = dispatch_plan(x, topk_idx, topk_weight, ep, n_experts, codec, combine_codec, two_hop, counter)
    return dispatch_wait(*dispatch_start(x, meta)), meta


def combine_start(y: torch.Tensor, meta: DispatchMeta) -> tuple[torch.Tensor, _Pending]:
    weighted = y.float() * meta.weights.unsqueeze(1)
    return transfer_start(weighted, meta.token_route, False, meta.combine_codec, meta.combine_codec,
                          meta.out_dtype, meta.timeout_s)


def combine_wait(anchor: torch.Tensor, pending: _Pending) -> torch.Tensor:
    return transfer_wait(anchor, pending, False)


def combine(y: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
    """Weight expert outputs y [R, H] by their gates, send them home and sum per token -> [T, H]."""
    anchor, pending = combine_start(y, meta)
    return combine_wait(anchor, pending)
