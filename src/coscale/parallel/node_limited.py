"""Node-limited routing, the gate side of the two-hop dispatch (the paper section 4.3).

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
its node's weighted expert outputs, so the return trip also crosses InfiniBand once per node. The
route itself is planned by coscale.parallel.routes.plan_two_hop (``dispatch(..., two_hop=True)``); this
module holds the gate's rule and the byte counts.

Inter-node payload bytes sent by a rank on node n (B bytes per row, e.g. H + 4*H/128 for FP8):
    flat    = B * sum_t #{k : node(topk_idx[t, k]) != n}          (one copy per expert)
    two-hop = B * sum_t #{nodes(t) \\ {n}}   <=  B * T * M          (one copy per node)

Shape legend: T tokens, E experts, K experts per token, P EP ranks = N nodes x G ranks per node,
E_l = E / P experts per rank.
"""

from __future__ import annotations

import torch

from coscale.errors import ConfigError
from coscale.kernels.router import group_limited_topk

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
