"""Route planning for expert parallelism: where each row goes, decided before any token moves.

Shape legend: T tokens on this rank, K experts per token, E routed experts in all, P ranks of the EP
group (N nodes x G ranks per node for the two-hop route), E_l = E / P experts per rank.

A transfer is a :class:`Route`: a list of :class:`Stage` s, each "select rows of the previous stage's
rows, then ``all_to_all_single`` inside a group" (a stage without a group only permutes). Planning
exchanges the split sizes (small, synchronous) and returns a :class:`RoutePlan`: one route for the
tokens and one for per-(token, expert) data such as gate weights, plus the local expert of each row
this rank receives. Moving rows along a route is coscale.parallel.transfer's job.

- The flat route (:func:`plan_flat`): one exchange over the EP group carrying one row per
  (token, expert) pair, then a local sort by expert.
- The two-hop route of node-limited routing (:func:`plan_two_hop`, the paper section 4.3; the gate side
  is coscale.parallel.node_limited): stage 1 over ``cross_node_group`` (the EP ranks with local index l,
  one per node) carries one copy per (token, destination node); stage 2 over ``intra_node_group``
  carries one row per (token, expert) pair from the forwarding GPU to the expert's GPU.

:class:`Traffic` counts the bytes a route sends by where they go (the same rank, NVLink, InfiniBand).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from coscale.errors import ConfigError
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


# ---- the one collective: all_to_all_single of rows ---------------------------------------------------


def all_to_all_rows(x: torch.Tensor, send_splits: tuple[int, ...], recv_splits: tuple[int, ...], group: Any,
                    ranks: tuple[int, ...], timeout_s: float, async_op: bool = False) -> tuple[torch.Tensor, Any]:
    """``all_to_all_single`` of rows; returns (output, work or None). A group of one rank keeps x, unless
    ``COSCALE_EP_LOOPBACK=1`` and torch.distributed is up: then even one rank exchanges with itself through
    the backend (how tools/ep_one_gpu.py runs NCCL's all-to-all, streams and overlap on one GPU)."""
    if len(ranks) == 1 and not (dist.is_initialized() and os.environ.get("COSCALE_EP_LOOPBACK") == "1"):
        return x, None
    out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
    work = guarded(
        "all_to_all_single",
        lambda: dist.all_to_all_single(out, x.contiguous(), list(recv_splits), list(send_splits),
                                       group=group, async_op=async_op),
        timeout_s,
    )
    return out, work


def wait_for(work: Any, timeout_s: float) -> None:
    """Wait for an asynchronous all_to_all_rows (``work`` None: it was synchronous or local)."""
    if work is not None:
        guarded("all_to_all_single (wait)", work.wait, timeout_s)


def exchange_counts(counts: torch.Tensor, group: Any, ranks: tuple, timeout_s: float) -> torch.Tensor:
    """counts [n_ranks, C] int64 (row i goes to group rank i) -> [n_ranks, C] received (row i from i)."""
    ones = (1,) * len(ranks)
    out, _ = all_to_all_rows(counts.contiguous(), ones, ones, group, ranks, timeout_s)
    return out


# ---- routes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """Select ``index`` rows of the previous stage's rows, then exchange them inside ``group``."""

    index: torch.Tensor  # [N_send] int64
    send_splits: tuple[int, ...] = ()
    recv_splits: tuple[int, ...] = ()
    group: Any = None
    ranks: tuple[int, ...] = ()  # global ranks of the group; () = no exchange (a local permutation)
    copies: torch.Tensor | None = None  # [n_before, K]: where each earlier row's K copies went, when
    #   every earlier row was selected exactly K times (lets a gather decode and sum them in one pass)

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

    @property
    def last_exchange(self) -> int:
        """Index of the last exchanging stage (the asynchronous one); -1 when no stage exchanges."""
        return max((i for i, s in enumerate(self.stages) if s.exchanges), default=-1)


def exchange_rows(x: torch.Tensor, stage: Stage, timeout_s: float) -> torch.Tensor:
    """A stage's exchange of plain (non-differentiable) rows, e.g. expert ids while planning."""
    rows = x.index_select(0, stage.index)
    if not stage.exchanges:
        return rows
    out, _ = all_to_all_rows(rows, stage.send_splits, stage.recv_splits, stage.group, stage.ranks, timeout_s)
    return out


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


# ---- planning a dispatch -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutePlan:
    """The routes of one dispatch and what the receiving rank learns about its rows."""

    token_route: Route  # from the T token rows to the R received rows
    pair_route: Route  # from the T*K (token, expert) pairs to the same R rows (gate weights travel on it)
    local_expert: torch.Tensor  # [R] int64, sorted: the local expert of each received row
    tokens_per_expert: torch.Tensor  # [E_l] int64


def plan_routes(topk_idx: torch.Tensor, n_experts: int, topo: Topology, two_hop: bool = False) -> RoutePlan:
    """The flat or the two-hop plan for routing ``topk_idx`` [T, K] over ``topo``."""
    if n_experts % topo.size:
        raise ConfigError(
            f"expert-parallel size {topo.size} does not divide the {n_experts} routed experts; "
            "choose an EP size that divides n_routed_experts"
        )
    return plan_two_hop(topk_idx, n_experts, topo) if two_hop else plan_flat(topk_idx, n_experts, topo)


def _local_ids(recv_counts: torch.Tensor) -> torch.Tensor:
    """recv_counts [n_src, E_l] -> the local expert id of each received row (source-major order)."""
    n_src, e_local = recv_counts.shape
    ids = torch.arange(e_local, device=recv_counts.device).repeat(n_src)
    return torch.repeat_interleave(ids, recv_counts.reshape(-1))


def _sorted_plan(token_stages: tuple[Stage, ...], pair_stages: tuple[Stage, ...], t: int, k: int,
                 recv_counts: torch.Tensor) -> RoutePlan:
    """Both routes end with one local sort of the received rows by local expert."""
    ids = _local_ids(recv_counts)
    sort = Stage(torch.argsort(ids, stable=True))
    return RoutePlan(Route(t, token_stages + (sort,)), Route(t * k, pair_stages + (sort,)), ids[sort.index],
                     torch.bincount(ids, minlength=recv_counts.shape[1]))


def plan_flat(topk_idx: torch.Tensor, n_experts: int, topo: Topology) -> RoutePlan:
    """One exchange over the EP group: one row per (token, expert) pair, ordered by expert."""
    t, k = topk_idx.shape
    e_local = n_experts // topo.size
    expert = topk_idx.reshape(-1)
    order = torch.argsort(expert, stable=True)
    per_expert = torch.bincount(expert, minlength=n_experts).reshape(topo.size, e_local)
    recv_counts = exchange_counts(per_expert, topo.group, topo.ranks, topo.timeout_s)
    send = tuple(per_expert.sum(1).tolist())
    recv = tuple(recv_counts.sum(1).tolist())
    copies = torch.empty_like(order)
    copies[order] = torch.arange(order.numel(), device=order.device)  # pair t*k + j went to row copies[..]
    return _sorted_plan((Stage(order // k, send, recv, topo.group, topo.ranks, copies.view(t, k)),),
                        (Stage(order, send, recv, topo.group, topo.ranks),), t, k, recv_counts)


def plan_two_hop(topk_idx: torch.Tensor, n_experts: int, topo: Topology) -> RoutePlan:
    """Routes for tokens (one copy per node, then per pair) and for per-pair data (weights)."""
    if topo.cross_node_group is None and topo.size > 1:
        raise ConfigError("the two-hop route needs a ParallelContext (intra- and cross-node groups)")
    t, k = topk_idx.shape
    g = topo.ranks_per_node
    n_nodes = topo.size // g
    e_local = n_experts // topo.size
    per_node = e_local * g
    cross = group_ranks(topo.cross_node_group) if topo.size > 1 else (topo.ranks[0],)
    intra = group_ranks(topo.intra_node_group) if topo.size > 1 else (topo.ranks[0],)
    if len(cross) != n_nodes or len(intra) != g:
        raise ConfigError(f"EP sub-groups ({len(cross)} nodes x {len(intra)} ranks) do not match the "
                          f"node map ({n_nodes} x {g})")

    # Stage 1: copies (node, token) sorted by node, and pairs sorted by (node, token, expert).
    expert = topk_idx.reshape(-1)
    token = torch.arange(t, device=expert.device).repeat_interleave(k)
    node = torch.div(expert, per_node, rounding_mode="floor")
    key = node * t + token
    order = torch.argsort(key * n_experts + expert)
    copies, copy_of_pair = torch.unique(key, return_inverse=True)  # sorted keys
    copy_node = torch.div(copies, t, rounding_mode="floor")
    copy_send = torch.bincount(copy_node, minlength=n_nodes)
    pair_send = torch.bincount(node, minlength=n_nodes)
    counts = exchange_counts(torch.stack([copy_send, pair_send], 1), topo.cross_node_group, cross,
                             topo.timeout_s)
    copy_recv, pair_recv = counts[:, 0], counts[:, 1]
    copy_start = torch.cumsum(copy_send, 0) - copy_send
    # Each pair says which copy (relative to its destination node's block) it belongs to.
    rel_copy = copy_of_pair - copy_start[node]
    tok1 = Stage(copies % t, tuple(copy_send.tolist()), tuple(copy_recv.tolist()),
                 topo.cross_node_group, cross)
    pair1 = Stage(order, tuple(pair_send.tolist()), tuple(pair_recv.tolist()), topo.cross_node_group, cross)
    info = exchange_rows(torch.stack([rel_copy, expert], 1), pair1, topo.timeout_s)
    # Stage 2 at the forwarding rank: fan each received pair out to its expert's rank of this node.
    recv_copy_start = torch.cumsum(copy_recv, 0) - copy_recv
    src_block = torch.repeat_interleave(torch.arange(n_nodes, device=expert.device), pair_recv)
    copy_idx = info[:, 0] + recv_copy_start[src_block]
    node_expert = info[:, 1] % per_node  # expert index inside this node
    order2 = torch.argsort(node_expert, stable=True)
    per_expert = torch.bincount(node_expert, minlength=per_node).reshape(g, e_local)
    recv_counts = exchange_counts(per_expert, topo.intra_node_group, intra, topo.timeout_s)
    send2 = tuple(per_expert.sum(1).tolist())
    recv2 = tuple(recv_counts.sum(1).tolist())
    return _sorted_plan((tok1, Stage(copy_idx[order2], send2, recv2, topo.intra_node_group, intra)),
                        (pair1, Stage(order2, send2, recv2, topo.intra_node_group, intra)), t, k, recv_counts)
