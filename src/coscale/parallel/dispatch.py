"""Token dispatch and combine for expert parallelism: plan a route, scatter the tokens, gather them back.

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

Three layers: coscale.parallel.routes plans where rows go (the flat route, or the two-hop route of
node-limited routing); coscale.parallel.transfer moves rows along a route (scatter, and gather back
with copies of one row summed); this module joins them. Dispatch is a scatter of the tokens, combine a
gather of the weighted expert outputs; the backward of each is the other.

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

from coscale.errors import ConfigError
from coscale.parallel.codec import Codec, get_codec
from coscale.parallel.routes import Route, Traffic, plan_routes, route_traffic, topology
from coscale.parallel.transfer import Pending, gather_start, gather_wait, scatter, scatter_start, scatter_wait


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


def _check_routing(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ConfigError(f"dispatch expects x of shape [T, H], got {tuple(x.shape)}")
    if topk_idx.shape != topk_weight.shape or topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ConfigError(
            f"topk_idx {tuple(topk_idx.shape)} and topk_weight {tuple(topk_weight.shape)} must both be "
            f"[T, K] with T = {x.shape[0]}"
        )


def dispatch_plan(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, ep: Any,
                  n_experts: int, codec: str | Codec | None = "bf16",
                  combine_codec: str | Codec | None = "bf16", two_hop: bool = False,
                  counter: Traffic | None = None) -> DispatchMeta:
    """Exchange split sizes, plan the routes and move the gate weights; no token moves yet."""
    topo = topology(ep)
    _check_routing(x, topk_idx, topk_weight)
    codec, combine_codec = get_codec(codec), get_codec(combine_codec)
    plan = plan_routes(topk_idx, n_experts, topo, two_hop)
    fp32 = get_codec("fp32")
    weights = scatter(topk_weight.float().reshape(-1, 1), plan.pair_route, fp32, fp32, torch.float32,
                      topo.timeout_s).reshape(-1)
    me = topo.ranks[topo.rank]
    traffic = route_traffic(plan.token_route, topo, me, codec.bytes_per_row(x.shape[1]))
    if counter is not None:
        counter.add(traffic)
    return DispatchMeta(plan.token_route, x.shape[0], x.shape[1], x.dtype, plan.local_expert,
                        plan.tokens_per_expert, weights, codec, combine_codec, topo.timeout_s, traffic)


def dispatch_start(x: torch.Tensor, meta: DispatchMeta) -> tuple[torch.Tensor, Pending]:
    """Issue the token exchange of a planned dispatch (asynchronous); finish with dispatch_wait."""
    return scatter_start(x, meta.token_route, meta.dispatch_codec, meta.combine_codec, x.dtype, meta.timeout_s)


def dispatch_wait(anchor: torch.Tensor, pending: Pending) -> torch.Tensor:
    return scatter_wait(anchor, pending)


def dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, ep: Any,
             n_experts: int, codec: str | Codec | None = "bf16", combine_codec: str | Codec | None = "bf16",
             two_hop: bool = False, counter: Traffic | None = None) -> tuple[torch.Tensor, DispatchMeta]:
    """Send each token to the ranks owning its experts. Returns (recv [R, H] sorted by local expert, meta).

    ``ep``: a ParallelContext, a process group, or None for a single process (the reference path).
    """
    meta = dispatch_plan(x, topk_idx, topk_weight, ep, n_experts, codec, combine_codec, two_hop, counter)
    return dispatch_wait(*dispatch_start(x, meta)), meta


def combine_start(y: torch.Tensor, meta: DispatchMeta) -> tuple[torch.Tensor, Pending]:
    weighted = y.float() * meta.weights.unsqueeze(1)
    return gather_start(weighted, meta.token_route, meta.combine_codec, meta.combine_codec, meta.out_dtype,
                        meta.timeout_s)


def combine_wait(anchor: torch.Tensor, pending: Pending) -> torch.Tensor:
    return gather_wait(anchor, pending)


def combine(y: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
    """Weight expert outputs y [R, H] by their gates, send them home and sum per token -> [T, H]."""
    anchor, pending = combine_start(y, meta)
    return combine_wait(anchor, pending)
