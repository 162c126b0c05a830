"""Deployment search: the largest decode batch that fits memory and a TPOT target, and the best EP / TP
layout for a number of GPUs (what NVIDIA's aiconfigurator does for a deployment).

Memory per GPU (``serving.memory_per_gpu``): weights plus the KV cache of the batch, within
``(1 - reserve) x HBM``; the reserve (10% by default) holds activations, communication buffers, CUDA
graphs and allocator fragmentation. TPOT grows with the batch (every kernel's work does), so the
largest batch meeting the target is found by bisection between 1 and the memory limit.

Layouts for ``gpus`` GPUs: ``gpus / ep`` independent copies of an ``ep``-GPU deployment, ``ep`` dividing
``gpus``, attention ``tp`` in {1, 2, 4, 8} dividing ``ep`` and the heads; each layout is ranked by output
tokens/s per GPU at its largest batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from coscale.analysis import serving
from coscale.analysis.models import Model, as_view
from coscale.analysis.serving import PhaseResult, ServingLayout
from coscale.errors import ConfigError
from coscale.hardware import HardwareSpec, load_hardware

TP_CHOICES = (1, 2, 4, 8)


@dataclass(frozen=True)
class SearchResult:
    layout: ServingLayout
    batch: int  # requests per attention group; 0 when nothing fits
    limited_by: str  # "memory", "TPOT target", "TPOT target: missed even at batch N" or "nothing fits"
    result: PhaseResult | None


def memory_batch_limit(model: Model, hardware: str | HardwareSpec, layout: ServingLayout, context: int,
                       mtp_drafts: int = 0, reserve: float = 0.1, weight_dtype: str = "fp8",
                       kv_dtype: str = "bf16") -> int:
    """The most requests whose KV cache fits beside the weights in ``(1 - reserve) x HBM``."""
    v, hw = as_view(model), load_hardware(hardware)
    if not 0 <= reserve < 1:
        raise ConfigError(f"memory reserve must be in [0, 1), got {reserve}")
    layout.check(v, hw)
    one = serving.memory_per_gpu(v, layout, 1, context + 1 + mtp_drafts, weight_dtype, kv_dtype, mtp_drafts)
    free = hw.hbm_bytes * (1 - reserve) - one["weights"]
    return max(int(free // one["kv_cache"]), 0)


def max_decode_batch(model: Model, hardware: str | HardwareSpec, layout: ServingLayout, context: int,
                     tpot_target_s: float | None = None, mtp_drafts: int = 0, mtp_acceptance: float = 0.0,
                     reserve: float = 0.1, weight_dtype: str = "fp8", kv_dtype: str = "bf16") -> SearchResult:
    """The largest batch (requests per attention group) that fits memory and meets ``tpot_target_s``."""
    _check_request(model, context, tpot_target_s, mtp_drafts, mtp_acceptance)
    limit = memory_batch_limit(model, hardware, layout, context, mtp_drafts, reserve, weight_dtype, kv_dtype)

    def run(batch: int) -> PhaseResult:
        return serving.decode(model, hardware, layout, batch=batch, context=context, mtp_drafts=mtp_drafts,
                              mtp_acceptance=mtp_acceptance, weight_dtype=weight_dtype, kv_dtype=kv_dtype)

    if limit < layout.micro_batches:
        return SearchResult(layout, 0, "nothing fits", None)
    best = run(limit)
    if tpot_target_s is None or best.latency_s <= tpot_target_s:
        return SearchResult(layout, limit, "memory", best)
    low, high = layout.micro_batches, limit  # TPOT(low) may already miss the target
    low_result = run(low)
    if low_result.latency_s > tpot_target_s:  # memory holds a batch: the target is what fails
        return SearchResult(layout, 0, f"TPOT target: missed even at batch {low}", None)
    while high - low > 1:
        mid = (low + high) // 2
        r = run(mid)
        if r.latency_s <= tpot_target_s:
            low, low_result = mid, r
        else:
            high = mid
    return SearchResult(layout, low, "TPOT target", low_result)


def _check_request(model: Model, context: int, tpot_target_s: float | None, mtp_drafts: int,
                   mtp_acceptance: float) -> None:
    """Checked before memory: a bad value must be an error, not 'nothing fits' (a negative context makes the
    KV cache negative, so the memory limit would answer first)."""
    if tpot_target_s is not None and not 0 < tpot_target_s < math.inf:
        raise ConfigError(f"TPOT target must be a positive finite number, got {tpot_target_s}")
    serving.check_requests(as_view(model), {"context": context}, mtp_drafts, mtp_acceptance)


def best_layouts(model: Model, hardware: str | HardwareSpec, gpus: int, context: int,
                 tpot_target_s: float | None = None, mtp_drafts: int = 0, mtp_acceptance: float = 0.0,
                 redundant_experts: int = 0, micro_batches: int = 2, reserve: float = 0.1) -> list[SearchResult]:
    """Every EP / TP layout of ``gpus`` GPUs with its largest batch, best tokens/s per GPU first."""
    v, hw = as_view(model), load_hardware(hardware)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"gpus must be a positive integer, got {gpus!r}")
    _check_request(v, context, tpot_target_s, mtp_drafts, mtp_acceptance)  # even if no layout qualifies
    results = []
    for ep in (d for d in range(1, gpus + 1) if gpus % d == 0):
        if v.is_moe and ep > v.n_routed_experts + redundant_experts or not v.is_moe and ep > 1:
            continue
        for tp in TP_CHOICES:
            if ep % tp or v.heads % tp or tp > hw.scale_up_domain:
                continue
            layout = ServingLayout(ep=ep, tp=tp, redundant_experts=redundant_experts if v.is_moe else 0,
                                   micro_batches=micro_batches)
            results.append(max_decode_batch(v, hw, layout, context, tpot_target_s, mtp_drafts, mtp_acceptance,
                                            reserve))
    return sorted(results, key=lambda r: -(r.result.tokens_per_s_per_gpu if r.result else 0.0))
