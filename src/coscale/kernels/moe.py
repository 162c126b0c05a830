"""Routed experts as a handful of large kernels: permute -> grouped SwiGLU -> unpermute/combine.

Shape legend: T tokens, K experts per token, E routed experts, H hidden, I expert intermediate,
M_pad permuted rows (T*K plus per-expert padding to `align`).

    x [T, H], topk_idx [T, K]
      -> permute_tokens            x_perm [M_pad, H]     rows grouped by expert, groups padded
      -> grouped_mm(x_perm, w_gate) g [M_pad, I]   and   grouped_mm(x_perm, w_up) u [M_pad, I]
      -> swiglu_pair(g, u)          a [M_pad, I]          fused silu(g) * u
      -> grouped_mm(a, w_down)      y [M_pad, H]
      -> unpermute_combine          out [T, H]            sum_k topk_weight[t, k] * y[row(t, k)]

Gate and up run as two grouped GEMMs against the model's own w_gate and w_up rather than one
against [w_gate; w_up]: concatenating the weights would copy every expert weight on every call (for
DeepSeek-V3, 7.5 G parameters per layer), more memory traffic than the GEMMs save.

align = 16 rows for BF16 (torch._grouped_mm keeps each group's start 16-byte aligned) and 128 for
FP8 (the 1x128 activation / 128x128 weight block scales must not straddle experts). Padded rows are
zeros, never combined, and receive zero gradients.

Determinism: the Triton data-movement kernels are gathers with a fixed summation order, and the
grouped GEMMs do not split the reduction, so the GPU path gives bitwise identical results run to
run. `deterministic=True` additionally makes the PyTorch reference combine gather in k order
instead of scatter-adding.

The reference is coscale.model.moe.experts_forward_loop (one expert at a time); tests hold this
module to it in forward and backward. At inference, for decode batches of a few tokens,
coscale.model.moe.GroupedExperts takes coscale.kernels.moe_decode instead (no permutation).
"""

from __future__ import annotations

import torch

from coscale.errors import CoscaleError
from coscale.kernels.fp8_grouped_linear import fp8_grouped_gate_up, fp8_grouped_linear
from coscale.kernels.fp8_moe import fp8_routed_experts
from coscale.kernels.fp8_weight_cache import FP8WeightCache
from coscale.kernels.grouped_gemm import grouped_mm
from coscale.kernels.permute import build_permute_info, permute_tokens, row_weights, unpermute_combine
from coscale.kernels.swiglu import swiglu, swiglu_pair

PRECISIONS = ("bf16", "fp8")
ALIGN = {"bf16": 16, "fp8": 128}
# backend -> (data movement backend, grouped GEMM backend, SwiGLU backend)
BACKENDS = {
    "auto": ("auto", "auto", "auto"),
    "triton": ("triton", "triton", "triton"),
    "torch": ("torch", "torch", "torch"),
    "reference": ("torch", "loop", "torch"),
}


def _check_inputs(x, topk_idx, topk_weight, w_gate, w_up, w_down, precision, backend, fp8_weight_cache):
    if fp8_weight_cache is not None and fp8_weight_cache is not False and not isinstance(
        fp8_weight_cache, FP8WeightCache
    ):
        raise CoscaleError(
            f"fp8_weight_cache must be None or the FP8WeightCache of the module that owns the weights, got "
            f"{fp8_weight_cache!r} (GroupedExperts.fp8_weight_cache = True makes one)"
        )
    if precision not in PRECISIONS:
        raise CoscaleError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend not in BACKENDS:
        raise CoscaleError(
            f"grouped_experts_forward: backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}"
        )
    if x.dim() != 2:
        raise CoscaleError(f"x must be [T, H], got {tuple(x.shape)}")
    T, H = x.shape
    if w_gate.dim() != 3 or w_gate.shape[2] != H or w_up.shape != w_gate.shape:
        raise CoscaleError(
            f"w_gate and w_up must be [E, I, {H}], got {tuple(w_gate.shape)} and {tuple(w_up.shape)}"
        )
    E, I, _ = w_gate.shape
    if tuple(w_down.shape) != (E, H, I):
        raise CoscaleError(f"w_down must be [{E}, {H}, {I}], got {tuple(w_down.shape)}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != T or topk_weight.shape != topk_idx.shape:
        raise CoscaleError(
            f"topk_idx and topk_weight must both be [{T}, K], got {tuple(topk_idx.shape)} and "
            f"{tuple(topk_weight.shape)}"
        )


def grouped_experts_forward(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    precision: str = "bf16",
    deterministic: bool = False,
    backend: str = "auto",
    fp8_weight_cache: FP8WeightCache | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """sum_k topk_weight[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_idx[t, k].

    x [T, H]; topk_idx [T, K] int64; topk_weight [T, K] float32; w_gate, w_up [E, I, H];
    w_down [E, H, I]. Returns [T, H] in x's dtype, differentiable w.r.t. x, topk_weight and the
    weights. `backend`: "auto" (Triton + torch._grouped_mm on CUDA, PyTorch reference on CPU),
    "triton", "torch", or "reference" (per-expert matmul loop). `fp8_weight_cache`: the FP8WeightCache
    of the module that owns the weights (precision="fp8"), which keeps their FP8 copies until its owner
    invalidates it (coscale.kernels.fp8_weight_cache); None (or False) quantizes them in every call.
    ``fused`` (FP8 only): the whole routed computation as one autograd node with every quantization
    fused into its producer (coscale.kernels.fp8_moe); False composes the separate FP8 operations below
    (the same bits on the same backend).
    """
    _check_inputs(x, topk_idx, topk_weight, w_gate, w_up, w_down, precision, backend, fp8_weight_cache)
    weight_cache = fp8_weight_cache if isinstance(fp8_weight_cache, FP8WeightCache) else None
    data_backend, gemm_backend, swiglu_backend = BACKENDS[backend]
    if x.shape[0] == 0:
        return x * 0
    E = w_gate.shape[0]
    if precision == "bf16":  # FP8 quantizes the master weights directly (no cast pass)
        w_gate, w_up, w_down = (w if w.dtype == x.dtype else w.to(x.dtype) for w in (w_gate, w_up, w_down))
    fp8_backend = "auto" if gemm_backend == "loop" else gemm_backend
    if precision == "fp8" and fused:  # one autograd node, every quantization fused into its producer
        info = build_permute_info(topk_idx, E, ALIGN["fp8"])
        return fp8_routed_experts(
            x, topk_weight, info, w_gate, w_up, w_down, backend=fp8_backend, deterministic=deterministic,
            weight_cache=weight_cache,
        )
    x_perm, info = permute_tokens(
        x, topk_idx, E, ALIGN[precision], backend=data_backend, deterministic=deterministic
    )
    offs = info.group_end_offsets
    if precision == "fp8":
        # Segments are 128-aligned by the permutation (ALIGN["fp8"]): no re-padding, no host sync.
        # x_perm is quantized once for gate and up; [w_gate; w_up] are quantized into one stacked FP8
        # buffer (and its transpose, for dgrad), so gate+up is one grouped GEMM.
        gate_up = fp8_grouped_gate_up(
            x_perm, w_gate, w_up, offs, backend=fp8_backend, weight_cache=weight_cache
        )  # [M_pad, 2I]
        a = swiglu(gate_up, backend=swiglu_backend)  # [M_pad, I]
        # the router weight before the down projection, as the fused path applies it (coscale.kernels.fp8_moe)
        a = (a.float() * row_weights(topk_weight, info.row_pair)[:, None]).to(a.dtype)
        y = fp8_grouped_linear(a, w_down, offs, backend=fp8_backend, aligned=True, weight_cache=weight_cache)
        combine_weight = torch.ones_like(topk_weight, dtype=torch.float32)
    else:

        def linear(inp, w, offsets):
            return grouped_mm(inp, w, offsets, backend=gemm_backend)

        g = linear(x_perm, w_gate, offs)  # [M_pad, I]
        u = linear(x_perm, w_up, offs)  # [M_pad, I]
        a = swiglu_pair(g, u, backend=swiglu_backend)  # [M_pad, I]
        y = linear(a, w_down, offs)  # [M_pad, H]
        combine_weight = topk_weight.float()
    out = unpermute_combine(y, info, combine_weight, backend=data_backend, deterministic=deterministic)
    return out.to(x.dtype)
