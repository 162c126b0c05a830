"""Two micro-batches: one's all-to-all in flight while the other computes (the paper section 4.2).

DeepSeek-V3 splits a batch in two and interleaves them so that the dispatch and combine of one
micro-batch run while the other one computes, in training and in decoding. Here the schedule is built
from the asynchronous halves of dispatch and combine (``*_start`` issues ``all_to_all_single`` with
``async_op=True``; ``*_wait`` waits for it). With NCCL the collective runs on NCCL's own stream and
``wait`` only makes the compute stream wait for it; with gloo it runs on gloo's worker thread. No extra
streams are needed.

Forward schedule for micro-batches a and b (time flows down; | = in flight)::

    dispatch_plan(a); dispatch_plan(b)     split sizes and gate weights (small, synchronous)
    dispatch_start(a)
    dispatch_start(b)                      | a's tokens
    side(a); wait(a); experts(a)           | b's tokens
    combine_start(a)
    side(b); wait(b); experts(b)           | a's results
    combine_start(b)
    wait(combine a); wait(combine b)       | b's results

``side`` is work that needs no communication (e.g. the shared experts) and runs while the micro-batch's
own tokens travel. Both micro-batches are planned before any token moves, so no synchronous exchange
queues behind a payload. Within one expert layer the first dispatch and the last combine have nothing
to hide behind except ``side``; with n micro-batches about (n-1)/n of the payload traffic can hide.

The backward pass overlaps the same way on its own: the start/wait autograd nodes issue the reverse
all-to-all in the wait node's backward and wait for it in the start node's backward, and autograd runs
the interleaved graph in reverse order.

All ranks must split into the same number of micro-batches (collectives are matched by order).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from coscale.parallel.dispatch import combine_start, combine_wait, dispatch_plan, dispatch_start, dispatch_wait


def overlapped_experts_forward(experts, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                               micro_batches: int = 2,
                               side: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``experts`` (an ExpertParallelExperts) applied to x [T, H] in ``micro_batches`` interleaved chunks.

    Returns [T, H] (plus ``side(x_chunk)`` per chunk when given); equals ``experts(x, ...)``.
    """
    xs = torch.tensor_split(x, micro_batches)
    idx = torch.tensor_split(topk_idx, micro_batches)
    weights = torch.tensor_split(topk_weight, micro_batches)
    kw = dict(ep=experts.topology, n_experts=experts.n_experts, codec=experts.dispatch_codec,
              combine_codec=experts.combine_codec, two_hop=experts.two_hop, counter=experts.traffic)
    metas = [dispatch_plan(xs[i], idx[i], weights[i], **kw) for i in range(micro_batches)]
    in_flight = [dispatch_start(xs[i], metas[i]) for i in range(min(2, micro_batches))]
    combines, sides = [], []
    for i in range(micro_batches):
        side_out = side(xs[i]) if side is not None else None
        recv = dispatch_wait(*in_flight[i])
        y = experts.compute(recv, metas[i].tokens_per_expert)
        combines.append(combine_start(y, metas[i]))
        if i + 2 < micro_batches:
            in_flight.append(dispatch_start(xs[i + 2], metas[i + 2]))
        sides.append(side_out)
    results = []
    for (anchor, pending), side_out in zip(combines, sides):
        out = combine_wait(anchor, pending)
        results.append(out if side_out is None else out + side_out)
    return torch.cat(results)
