"""Node-limited routing and the two-hop dispatch (the paper section 4.3).

DeepSeek-V3 places its 256 routed experts in 8 groups of 32, one group per node, and lets each token
reach at most M = 4 groups. A token bound for several GPUs of one node then crosses InfiniBand once, to
the GPU of that node with the sender's local index, which forwards it over NVLink:

    node 0 (sender)                 node 1                             node 2
    g0 g1 [g2] g3  --IB copy 1-->   g0 g1 [g2] g3   --IB copy 2-->     g0 g1 [g2] g3
                                        |  \\ NVLink fan-out               \\  NVLink
                                        v   v                              v
                                   expert on g0, expert on g3         expert on g1

Stage 1 (``cross_node_group``: the EP ranks with local index l, one per node) carries one copy per
(token, destination node); stage 2 (``intra_node_group``) carries one row per (token, expert) pair from
the forwarding GPU to the expert's GPU. Combine runs the same route backwards: each forwarding GPU sums
its node's weighted expert outputs, so the return trip also crosses InfiniBand once per node.

Inter-node payload bytes sent by a rank on node n (B bytes per row, e.g. H + 4*H/128 for FP8):
    flat    = B * sum_t #{k : node(topk_idx[t, k]) != n}          (one copy per expert)
    two-hop = B * sum_t #{nodes(t) \\ {n}}   <=  B * T * M          (one copy per node)

Shape legend: T tokens, E experts, K experts per token, P EP ranks = N nodes x G ranks per node,
E_l = E / P experts per rank.
"""

from __future__ import annotations

import torch

from coscale.errors import ConfigError
from coscale.model.moe import group_limited_topk
from coscale.parallel.dispatch import (
    Route,
    Stage,
    Topology,
    _local_ids,
    _Plan,
    _sort_stage,
    exchange_counts,
    exchange_rows,
    group_ranks,
)

# ---- the gate side: at most M nodes per token -------------------------------------------------------


def node_limited_topk(scores: torch.Tensor, top_k: int, n_nodes: int, max_nodes: int,
                      bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts restricted to the ``max_nodes`` best nodes of each token.

    scores [T, E] (after sigmoid/softmax); experts are grouped by node (E / n_nodes consecutive experts
    each). Nodes are ranked by the sum of their two best (bias-corrected) scores, DeepSeek-V3's rule;
    the experts are chosen with the bias, weighted without it. Returns (topk_idx [T, K] int64,
    topk_scores [T, K]) with the unnormalised scores.
    """
    t, e = scores.shape
    if e % n_nodes:
        raise ConfigError(f"{e} experts cannot be grouped evenly onto {n_nodes} nodes")
    if not 1 <= max_nodes <= n_nodes:
        raise ConfigError(f"max_nodes must be in [1, {n_nodes}], got {max_nodes}")
    per_node = e // n_nodes
    if top_k > per_node * max_nodes:
        raise ConfigError(f"top_k {top_k} exceeds the {per_node * max_nodes} experts of {max_nodes} nodes")
    choice = scores if bias is None else scores + bias
    idx = group_limited_topk(choice, top_k, n_nodes, max_nodes, rank_by="top2_sum")  # the gate's own rule
    return idx, scores.gather(1, idx)


def nodes_per_token(topk_idx: torch.Tensor, experts_per_node: int) -> torch.Tensor:
    """Distinct nodes each token reaches: [T] int64."""
    nodes = torch.div(topk_idx, experts_per_node, rounding_mode="floor")
    srt = nodes.sort(dim=1).values
    return 1 + (srt[:, 1:] != srt[:, :-1]).sum(1)


def check_gate_is_node_limited(n_experts: int, n_group: int, topk_group: int, n_nodes: int) -> int:
    """The model gate's group limit as a node limit; returns M (the most nodes a token can reach).

    Groups must not straddle nodes (n_group a multiple of n_nodes); then each token reaches at most
    min(topk_group, n_nodes) nodes. Raises ConfigError otherwise.
    """
    if n_group % n_nodes or n_experts % n_group:
        raise ConfigError(
            f"{n_group} expert groups cannot be laid out on {n_nodes} nodes without straddling one; "
            "set n_group to a multiple of the nodes of the EP group"
        )
    return min(topk_group, n_nodes)


# ---- analytic byte counts ---------------------------------------------------------------------------


def analytic_inter_node_bytes(topk_idx: torch.Tensor, source_node: int, experts_per_node: int,
                              bytes_per_row: int) -> dict[str, int]:
    """Inter-node payload bytes one rank sends in a dispatch: flat (a copy per expert) and two-hop."""
    nodes = torch.div(topk_idx, experts_per_node, rounding_mode="floor")
    flat = int((nodes != source_node).sum())
    srt = nodes.sort(dim=1).values
    first = torch.ones_like(srt, dtype=torch.bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    two_hop = int((first & (srt != source_node)).sum())
    return {"flat": flat * bytes_per_row, "two_hop": two_hop * bytes_per_row}


# ---- the two-hop route ------------------------------------------------------------------------------


def plan_two_hop(topk_idx: torch.Tensor, n_experts: int, topo: Topology) -> _Plan:
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
    ids = _local_ids(recv_counts)
    sort = _sort_stage(ids)
    token_route = Route(t, (tok1, Stage(copy_idx[order2], send2, recv2, topo.intra_node_group, intra), sort))
    pair_route = Route(t * k, (pair1, Stage(order2, send2, recv2, topo.intra_node_group, intra), sort))
    return _Plan(token_route, pair_route, ids[sort.index], torch.bincount(ids, minlength=e_local))
