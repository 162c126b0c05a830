"""Time of one kernel on one GPU from its work (FLOPs, bytes) and the achieved rates of a GPU.

Every function returns an :class:`OpTime` that names the resource limiting it. The models, with the
rates of :class:`coscale.hardware.Efficiency` (their sources are in ``coscale/hardware.py``):

- GEMM ``(M x K) @ (K x N)``, ``groups`` weight matrices (grouped GEMM, batched heads):
  ``max(2MNK / plateau x (1 + K0 / K), GEMM floor + max(bytes - floor bytes, 0) / gemm_memory_tbps)``.
  ``gemm_floor_us`` is the time of the GEMM ``coscale calibrate`` times for it (16 rows by a 2048 x 576
  BF16 weight: ``GEMM_FLOOR_BYTES``); a GEMM that moves more pays the extra bytes at the streaming rate on
  top (a latency-bandwidth line through the calibration point), which is what decode's GEMMs do in a
  step: cuBLAS's 2-15 MB projections take 3.4-8.4 us (BENCHMARKS.md run 29's profile), the routed experts
  39 us for 104 MB and 219 us for 900 MB, where a floor alone (``max(floor, bytes / rate)``) put them at
  5.1 us and 26 / 221 us. The plateau is the
  large-M rate of the kernel family (dense/contiguous grouped, masked grouped, BF16, weight gradient);
  ``K0`` is the per-output-tile prologue and epilogue cost in elements of K, so short-K GEMMs fall below
  the plateau as DeepGEMM's K=512 rows do. Bytes: weights (1 byte FP8, 2 BF16), the activation read,
  the BF16 output written. Against DeepGEMM's 18 published dense shapes this lands within 10% for the
  shapes that dominate DeepSeek-V3 and up to +70% for N=2112 (whose few output tiles leave SMs idle).
- Attention, absorbed-MLA decode (FlashMLA's form): ``2 x queries x heads x (qk + v) x context`` FLOPs
  against the KV-cache bytes, whichever takes longer, and never less than the kernel's fixed cost
  (``attention_decode_floor_us``: the split kernel and the combine of the splits, which at one request
  take 12 us on the H200 where the bytes take 0.4; at 128 requests the bytes dominate and the two overlap,
  so the floor is a floor, not a term added to the bytes as the GEMMs' is); causal prefill:
  ``heads x (qk + v) x L^2`` FLOPs per sequence (half of the full square, 2 FLOPs per multiply-add),
  backward 2.5 x the forward FLOPs.
- Elementwise kernels (norms, RoPE, quantization, SwiGLU, permutations): bytes read + written at the
  achieved copy bandwidth, never below the kernel floor.
- All-to-all: bytes over the NICs and over NVLink, each at its achieved rate, the slower of the two plus
  a fixed collective latency.

Routing statistics for node-limited routing (the paper's section 4.3) are here too:
:func:`expected_domains_hit` counts the nodes (or GPUs) a token's experts land on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from coscale.errors import ConfigError
from coscale.hardware import Efficiency

DTYPE_BYTES = {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4}
# The bytes of the GEMM whose time is gemm_floor_us (coscale.calibrate: 16 rows by a 2048 x 576 BF16
# weight, BF16 in and out)
GEMM_FLOOR_BYTES = 2 * (2048 * 576 + 16 * 2048 + 16 * 576)


@dataclass(frozen=True)
class OpTime:
    name: str
    seconds: float
    bound: str  # "compute", "memory", "launch", "scale-out", "scale-up" or "latency"
    flops: float = 0.0
    bytes: float = 0.0

    def scaled(self, factor: float) -> OpTime:
        return OpTime(self.name, self.seconds * factor, self.bound, self.flops * factor, self.bytes * factor)


def _bound(name: str, candidates: dict[str, float], flops: float, nbytes: float) -> OpTime:
    bound = max(candidates, key=candidates.get)
    return OpTime(name, candidates[bound], bound, flops, nbytes)


def gemm(eff: Efficiency, name: str, m: float, n: int, k: int, *, groups: int = 1, dtype: str = "fp8",
         kind: str = "dense") -> OpTime:
    """``m`` rows (tokens, all groups together) times ``groups`` weight matrices of ``k x n``.

    ``kind``: ``"dense"``, ``"grouped"`` (contiguous layout: prefill, training), ``"masked"`` (decode
    grouped layout) or ``"wgrad"`` (grouped weight gradient).
    """
    if m <= 0:
        return OpTime(name, 0.0, "compute")
    plateau = {"dense": eff.gemm_fp8_tflops, "grouped": eff.gemm_grouped_fp8_tflops,
               "masked": eff.gemm_masked_fp8_tflops, "wgrad": eff.gemm_wgrad_fp8_tflops}[kind]
    if dtype != "fp8":
        plateau = eff.gemm_bf16_tflops if kind != "wgrad" else eff.gemm_wgrad_fp8_tflops / 2
    element = DTYPE_BYTES[dtype]
    flops = 2.0 * m * n * k
    nbytes = groups * n * k * element + m * k * element + m * n * 2
    rate = plateau * 1e12 * eff.sustained_clock_ratio  # benchmarked plateau at the sustained clock
    streaming = eff.gemm_memory_tbps if dtype == "fp8" else eff.gemm_bf16_memory_tbps
    compute = flops / rate * (1 + eff.gemm_k_overhead / k)
    floor, extra = eff.gemm_floor_us * 1e-6, max(nbytes - GEMM_FLOOR_BYTES, 0.0) / (streaming * 1e12)
    if compute >= floor + extra:
        return OpTime(name, compute, "compute", flops, nbytes)
    # on the line: "memory" once the extra bytes take longer than the fixed cost, "launch" before
    return OpTime(name, floor + extra, "memory" if extra >= floor else "launch", flops, nbytes)


def attention_decode(eff: Efficiency, name: str, requests: float, queries: float, heads: float, context: int,
                     qk_dim: int, v_dim: int, cache_bytes_per_token: float) -> OpTime:
    """Decode attention of ``requests`` sequences, ``queries`` new tokens each (1 + MTP drafts), over
    ``context`` cached tokens of ``cache_bytes_per_token`` bytes (this layer)."""
    flops = 2.0 * requests * queries * heads * (qk_dim + v_dim) * context
    nbytes = requests * context * cache_bytes_per_token
    return _bound(name, {"compute": flops / (eff.attention_decode_tflops * 1e12 * eff.sustained_clock_ratio),
                         "memory": nbytes / (eff.attention_decode_tbps * 1e12),
                         "launch": eff.attention_decode_floor_us * 1e-6}, flops, nbytes)


def causal_attention_flops(sequences: float, seq_len: int, heads: float, qk_dim: int, v_dim: int) -> float:
    """Forward FLOPs of causal attention: each query sees seq_len / 2 keys on average."""
    return sequences * heads * (qk_dim + v_dim) * seq_len * seq_len


def attention_prefill(eff: Efficiency, name: str, sequences: float, seq_len: int, heads: float, qk_dim: int,
                      v_dim: int, backward: bool = False) -> OpTime:
    flops = causal_attention_flops(sequences, seq_len, heads, qk_dim, v_dim)
    rate = eff.attention_prefill_tflops
    if backward:  # dQ, dK, dV and the recomputed scores: 2.5 x the forward products
        flops, rate = 2.5 * flops, eff.attention_backward_tflops
    seconds = max(flops / (rate * 1e12 * eff.sustained_clock_ratio), eff.kernel_floor_us * 1e-6)
    return OpTime(name, seconds, "compute", flops, 0.0)


def unmodelled_kernels(eff: Efficiency, kernels_per_step: int | None, modelled: float) -> OpTime | None:
    """The kernels of a measured stack's step beyond the ``modelled`` ops (norms, casts, RoPE, routing,
    bookkeeping that the ops fold into a few), each waiting for the last: ``small_kernel_us`` apiece.
    ``kernels_per_step`` comes from a profile of the stack's step; None (not counted) or a count at or
    below the modelled ops: nothing."""
    if kernels_per_step is None:
        return None
    if isinstance(kernels_per_step, bool) or not isinstance(kernels_per_step, int) or kernels_per_step < 1:
        raise ConfigError(f"kernels per step must be a positive integer, got {kernels_per_step!r}")
    if kernels_per_step <= modelled:
        return None
    return OpTime("other kernels", (kernels_per_step - modelled) * eff.small_kernel_us * 1e-6, "launch")


def elementwise(eff: Efficiency, name: str, nbytes: float) -> OpTime:
    """A memory-bound kernel moving ``nbytes`` (reads + writes)."""
    return _bound(name, {"memory": nbytes / (eff.memory_tbps * 1e12), "launch": eff.kernel_floor_us * 1e-6},
                  0.0, nbytes)


def all_to_all(eff: Efficiency, name: str, scale_out_bytes: float, scale_up_bytes: float,
               low_latency: bool = False) -> OpTime:
    """One dispatch or combine: bytes this GPU sends over its NICs and over NVLink (forwarding)."""
    out_rate = eff.a2a_low_latency_gbps if low_latency else eff.a2a_scale_out_gbps
    times = {"scale-out": scale_out_bytes / (out_rate * 1e9),
             "scale-up": scale_up_bytes / (eff.a2a_scale_up_gbps * 1e9)}
    bound = max(times, key=times.get)
    latency = eff.collective_latency_us * 1e-6
    if latency > times[bound]:
        bound = "latency"
    return OpTime(name, max(times.values()) + latency, bound, 0.0, scale_out_bytes + scale_up_bytes)


def _miss(experts: float, picked: float, held: float) -> float:
    """P(none of ``picked`` experts drawn without replacement from ``experts`` is among ``held``)."""
    p = 1.0
    for i in range(int(picked)):
        p *= max(experts - held - i, 0.0) / (experts - i)
    return p


def expected_domains_hit(experts: int, experts_per_token: int, domains: int, groups: int = 1,
                         groups_per_token: int = 1) -> float:
    """Expected number of domains (nodes or GPUs) that hold at least one of a token's routed experts.

    Experts are spread evenly over ``domains`` and over ``groups``; a token picks ``groups_per_token``
    groups, then ``experts_per_token`` experts among the picked groups' experts, uniformly (balanced
    routing, as DeepSeek's profile simulates). Domains hold whole groups (domains <= groups) or slices of
    one group (domains > groups); if neither divides the other, routing is treated as ungrouped.
    """
    if domains < 1 or experts < 1 or experts_per_token < 1:
        raise ConfigError("domains, experts and experts per token must be positive")
    per_domain = experts / domains
    if groups <= 1 or groups_per_token >= groups or (groups % domains and domains % groups):
        return domains * (1 - _miss(experts, experts_per_token, per_domain))
    per_group = experts / groups
    eligible = groups_per_token * per_group
    if domains > groups:  # a domain is a slice of one group, eligible when its group is picked
        p_group = groups_per_token / groups
        miss = (1 - p_group) + p_group * _miss(eligible, experts_per_token, per_domain)
        return domains * (1 - miss)
    held_groups = groups // domains  # whole groups per domain; j of them picked (hypergeometric)
    total = math.comb(groups, groups_per_token)
    miss = sum(math.comb(held_groups, j) * math.comb(groups - held_groups, groups_per_token - j) / total
               * _miss(eligible, experts_per_token, j * per_group)
               for j in range(0, min(held_groups, groups_per_token) + 1))
    return domains * (1 - miss)
