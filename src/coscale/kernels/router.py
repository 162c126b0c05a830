"""The MoE router at inference in two small kernels: gate logits, scores, the group limit, top-k, weights.

Shape legend: T tokens, H hidden, E routed experts, K experts per token, G expert groups, S splits of H.

The math (DeepSeek-V3 report section 2.1.2; coscale.model.moe.Gate is its module):
    logits = x W^T  in float32                 x [T, H], W [E, H] (the gate's centroids)
    s      = sigmoid(logits)  or  softmax(logits) over E
    choice = s + b                              b: the aux-loss-free bias, used to select only
    group limit: keep the `topk_group` best of G equal groups, ranked by the sum of each group's two best
             choice scores ("top2_sum", V3) or its best one ("max", V2)
    idx    = top-K of choice among the kept groups, in descending order
    g      = s[idx], divided by its sum over the K picks when normalising, times the routing scale.

`route_torch` states it in PyTorch (the reference, and what Gate runs while training). At decode
that reference is about ten kernels per MoE layer (two casts, an FP32 GEMM, softmax or sigmoid, two top-k
kernels, a gather, the normalisation) for a few hundred kilobytes of weights, each a few microseconds of
launch-bound time (BENCHMARKS.md, run 25's decode profile). The Triton path is two kernels:

- `_route_logits_kernel`: grid (T/BLOCK_T, S); each program multiplies BLOCK_T tokens by one 1/S slice of
  W's columns and writes its partial logits [S, T, E] in float32. Splitting H spreads the weight read
  over S programs (one program reading all of V3's 3.7 MB of gate weights would take longer than the
  GEMM it replaces).
- `_route_select_kernel`: grid (T/BLOCK_T,); sums the S partials in a fixed order (so the result is the
  same run to run), then scores, group limit, top-K and weights in registers.

Products are exact and sums float32: x and W of one 16-bit dtype go to the tensor cores as they are (a
product of two bf16 or fp16 numbers is exact in their float32 accumulator), any other pair is multiplied
in float32 ("ieee", no TF32); the result differs from the
reference only by the order and rounding of the float32 sums (the tensor cores' accumulation is not
IEEE round-to-nearest), so a pick can differ only where two experts' choice scores are within rounding
of each other. NaN scores are picked first, as torch.topk does, so a NaN
reaches the output instead of being routed around. Ties (an all-zero padding row) pick the lowest
index; torch.topk leaves their order unspecified.
"""

from __future__ import annotations

import torch

from coscale.errors import CoscaleError
from coscale.kernels.backend import check_backend, interpreting
from coscale.kernels.library import launcher, operator, runs_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

__all__ = ["fused_router_pays", "gate_scores", "gate_weights", "group_limited_topk", "route", "route_torch"]

# Where "auto" takes the fused kernels (fused_router_pays). Above ROUTE_FUSED_MAX_TOKENS the reference's one
# FP32 GEMM reads the gate weights once, where the fused kernels read them once per BLOCK_T tokens, so
# prefill keeps the reference. Measured on the H200, replayed from a CUDA graph (BENCHMARKS.md, run 28):
# DeepSeek-V2-Lite's router (64 x 2048 weights) 6.1 us against 23.2 us for the compiled reference at 16
# tokens (3.80x; 16.9 us in run 27 with float32 products); V3's (256 x 7168) 45.2 against 45.2 us at one
# token (run 27: 0.92x at 16; its select kernel reads 28 partial sums), so above ROUTE_FUSED_MAX_WEIGHTS
# the reference runs.
ROUTE_FUSED_MAX_TOKENS = 1024
ROUTE_FUSED_MAX_WEIGHTS = 1 << 20  # experts x hidden
BLOCK_T = 16  # tl.dot's smallest M
COLUMNS_PER_PROGRAM = 256  # of H, per logits program: V2-Lite (H 2048) gets S = 8, V3 (H 7168) S = 28


def fused_router_pays(tokens: int, experts: int, hidden: int) -> bool:
    """Whether backend "auto" runs the fused kernels on CUDA for this router and batch (measured above)."""
    return tokens <= ROUTE_FUSED_MAX_TOKENS and experts * hidden <= ROUTE_FUSED_MAX_WEIGHTS


def group_limited_topk(choice: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                       rank_by: str = "top2_sum") -> torch.Tensor:
    """Top-k of choice [T, E] among the `topk_group` best of `n_group` equal groups of experts.

    Groups are ranked by the sum of their two best scores (DeepSeek-V3, "top2_sum") or by their best
    score (DeepSeek-V2, "max"). With groups placed one per node this is node-limited routing: each token
    reaches at most `topk_group` nodes. Returns int64 indices [T, top_k].
    """
    if n_group > 1:
        T = choice.shape[0]
        grouped = choice.view(T, n_group, -1)
        if rank_by == "top2_sum":
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(topk_group, dim=-1).indices  # (T, topk_group)
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
    return choice.topk(top_k, dim=-1).indices


def gate_weights(scores: torch.Tensor, topk_idx: torch.Tensor, normalize: bool, scale: float | None) -> torch.Tensor:
    """g [T, K] = scores at the picks, over their sum when `normalize`, times `scale` unless None."""
    weights = scores.gather(1, topk_idx)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if scale is not None:
        weights = weights * scale
    return weights


def gate_scores(x: torch.Tensor, weight: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """Affinity scores s [T, E] = sigmoid or softmax of x W^T, in float32 (float64 for float64 inputs)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    logits = torch.nn.functional.linear(x.to(dtype), weight.to(dtype))
    return logits.sigmoid() if sigmoid else logits.softmax(dim=-1)


def route_torch(x, weight, bias, top_k, n_group, topk_group, top2, sigmoid, normalize, scale):
    """The reference: (idx [T, K] int64, g [T, K], scores [T, E]), float32 (float64 for float64 inputs);
    differentiable in x and weight through g and the scores. `scale` None: none."""
    scores = gate_scores(x, weight, sigmoid)
    choice = scores.detach() if bias is None else scores.detach() + bias.to(scores.dtype)
    idx = group_limited_topk(choice, top_k, n_group, topk_group, "top2_sum" if top2 else "max")
    return idx, gate_weights(scores, idx, normalize, scale), scores


if triton is not None:

    @triton.jit
    def _route_logits_kernel(
        x_ptr, w_ptr, out_part_ptr, T, H, stride_x, stride_w, cols_per_split,
        E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        pid_t, split = tl.program_id(0), tl.program_id(1)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        lanes = tl.arange(0, E_POW2)
        row_ok, lane_ok = rows < T, lanes < E
        acc = tl.zeros([BLOCK_T, E_POW2], dtype=tl.float32)
        start = split * cols_per_split
        for h0 in range(start, start + cols_per_split, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :],
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + lanes[None, :].to(tl.int64) * stride_w + cols[:, None],
                         mask=lane_ok[None, :] & col_ok[:, None], other=0.0)
            if DOT_FP32:
                acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
            else:  # two 16-bit operands of one dtype: the tensor cores' products are exact, sums float32
                acc += tl.dot(xt, wt)
        out = out_part_ptr + (split * T + rows[:, None]).to(tl.int64) * E_POW2 + lanes[None, :]
        tl.store(out, acc, mask=row_ok[:, None])

    @triton.jit
    def _route_select_kernel(
        part_ptr, bias_ptr, out_idx_ptr, out_g_ptr, T, scale,
        S: tl.constexpr, E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_T: tl.constexpr,
        HAS_BIAS: tl.constexpr, SIGMOID: tl.constexpr, N_GROUP: tl.constexpr, G_POW2: tl.constexpr,
        TOPK_GROUP: tl.constexpr, TOP2: tl.constexpr, K: tl.constexpr, K_POW2: tl.constexpr,
        NORMALIZE: tl.constexpr, SCALE: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        lanes = tl.arange(0, E_POW2)
        row_ok, lane_ok = rows < T, lanes < E
        logits = tl.zeros([BLOCK_T, E_POW2], dtype=tl.float32)
        for s in tl.static_range(S):  # a fixed order: the same sums every run
            logits += tl.load(part_ptr + (s * T + rows[:, None]).to(tl.int64) * E_POW2 + lanes[None, :],
                              mask=row_ok[:, None], other=0.0)
        if SIGMOID:
            scores = tl.sigmoid(logits)
        else:
            shifted = tl.where(lane_ok[None, :], logits, float("-inf"))
            p = tl.exp(shifted - tl.max(shifted, axis=1)[:, None])
            scores = p / tl.sum(p, axis=1)[:, None]
        choice = scores
        if HAS_BIAS:
            choice = choice + tl.load(bias_ptr + lanes, mask=lane_ok, other=0.0)[None, :]
        choice = tl.where(choice != choice, float("inf"), choice)  # NaN first, as torch.topk
        choice = tl.where(lane_ok[None, :], choice, float("-inf"))
        if N_GROUP > 1:
            GROUP: tl.constexpr = E // N_GROUP
            group_of = lanes // GROUP
            glanes = tl.arange(0, G_POW2)
            group_score = tl.full([BLOCK_T, G_POW2], float("-inf"), dtype=tl.float32)
            for g in tl.static_range(N_GROUP):
                v = tl.where((group_of == g)[None, :], choice, float("-inf"))
                best = tl.max(v, axis=1)
                if TOP2 and GROUP > 1:
                    first = tl.argmax(v, axis=1)
                    best += tl.max(tl.where(lanes[None, :] == first[:, None], float("-inf"), v), axis=1)
                group_score = tl.where(glanes[None, :] == g, best[:, None], group_score)
            kept = tl.zeros([BLOCK_T, G_POW2], dtype=tl.int32)
            for _ in tl.static_range(TOPK_GROUP):
                pick = tl.argmax(group_score, axis=1)
                hit = glanes[None, :] == pick[:, None]
                kept = tl.where(hit, 1, kept)
                group_score = tl.where(hit, float("-inf"), group_score)
            keep_lane = tl.zeros([BLOCK_T, E_POW2], dtype=tl.int32)
            for g in tl.static_range(N_GROUP):
                kept_g = tl.sum(tl.where(glanes[None, :] == g, kept, 0), axis=1)
                keep_lane = tl.where((group_of == g)[None, :] & (kept_g[:, None] > 0), 1, keep_lane)
            choice = tl.where(keep_lane > 0, choice, float("-inf"))
        klanes = tl.arange(0, K_POW2)
        idx = tl.zeros([BLOCK_T, K_POW2], dtype=tl.int32)
        weight = tl.zeros([BLOCK_T, K_POW2], dtype=tl.float32)
        for k in tl.static_range(K):
            pick = tl.argmax(choice, axis=1)
            hit = lanes[None, :] == pick[:, None]
            picked = tl.sum(tl.where(hit, scores, 0.0), axis=1)
            idx = tl.where(klanes[None, :] == k, pick[:, None], idx)
            weight = tl.where(klanes[None, :] == k, picked[:, None], weight)
            choice = tl.where(hit, float("-inf"), choice)
        if NORMALIZE:
            weight = weight / (tl.sum(weight, axis=1)[:, None] + 1e-20)
        if SCALE:
            weight = weight * scale
        out = rows[:, None].to(tl.int64) * K + klanes[None, :]
        ok = row_ok[:, None] & (klanes[None, :] < K)
        tl.store(out_idx_ptr + out, idx.to(tl.int64), mask=ok)
        tl.store(out_g_ptr + out, weight, mask=ok)


def route_triton(x, weight, bias, top_k, n_group, topk_group, top2, sigmoid, normalize, scale,
                 columns: int = COLUMNS_PER_PROGRAM):
    """`columns`: of H per logits program, at least 16 (benchmarks/bench_router.py compares a few)."""
    if columns < 16:
        raise CoscaleError(f"route: columns per logits program must be at least 16 (tl.dot's K), got {columns}")
    T, H = x.shape
    E = weight.shape[0]
    e_pow2 = triton.next_power_of_2(E)
    dot_fp32 = interpreting() or x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float16)
    # the [BLOCK_H, E] weight tile: 8K float32 or 16K 16-bit elements at most
    block_h = min(triton.next_power_of_2(columns), max(16, (8192 if dot_fp32 else 16384) // e_pow2))
    cols = triton.cdiv(min(columns, H), block_h) * block_h
    splits = triton.cdiv(H, cols)
    idx = torch.empty(T, top_k, dtype=torch.int64, device=x.device)
    g = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    if T == 0:
        return idx, g
    partial = torch.empty(splits, T, e_pow2, dtype=torch.float32, device=x.device)
    launcher(_route_logits_kernel)[(triton.cdiv(T, BLOCK_T), splits)](
        x, weight, partial, T, H, x.stride(0), weight.stride(0), cols,
        E=E, E_POW2=e_pow2, BLOCK_T=BLOCK_T, BLOCK_H=block_h, DOT_FP32=dot_fp32,
    )
    launcher(_route_select_kernel)[(triton.cdiv(T, BLOCK_T),)](
        partial, bias if bias is not None else partial, idx, g,  # partial: an unread stand-in
        T, 1.0 if scale is None else scale,
        S=splits, E=E, E_POW2=e_pow2, BLOCK_T=BLOCK_T, HAS_BIAS=bias is not None, SIGMOID=sigmoid,
        N_GROUP=n_group, G_POW2=triton.next_power_of_2(n_group), TOPK_GROUP=topk_group, TOP2=top2,
        K=top_k, K_POW2=triton.next_power_of_2(top_k), NORMALIZE=normalize, SCALE=scale is not None,
        num_warps=4,
    )
    return idx, g


@operator("route")
def route_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int,
             topk_group: int, top2: bool, sigmoid: bool, normalize: bool, scale: float, apply_scale: bool,
             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx [T, K] int64, g [T, K] float32) of the router (module docstring)."""
    args = (top_k, n_group, topk_group, top2, sigmoid, normalize, scale if apply_scale else None)
    if runs_triton(backend, x, "route"):
        return route_triton(x, weight, bias, *args)
    idx, g, _ = route_torch(x, weight, bias, *args)
    return idx, g


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, top_k: int, n_group: int = 1,
          topk_group: int = 1, rank_by: str = "top2_sum", scoring: str = "sigmoid", normalize: bool = False,
          scale: float | None = None, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The router's picks and weights without its scores: (idx [T, K] int64, g [T, K] float32).

    x [T, H] (any float dtype; computed in float32), weight [E, H], bias [E] float32 or None. Not
    differentiable: this is the inference path (Gate keeps the reference while training).
    """
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise CoscaleError(f"route needs x [T, H] and weight [E, H], got {tuple(x.shape)} and {tuple(weight.shape)}")
    E = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (E,):
        raise CoscaleError(f"route: bias must be [{E}], got {tuple(bias.shape)}")
    if n_group < 1 or E % n_group or not 1 <= topk_group <= n_group:
        raise CoscaleError(f"route: {E} experts cannot form {n_group} groups with {topk_group} kept")
    if not 1 <= top_k <= E // n_group * topk_group:
        raise CoscaleError(f"route: top_k {top_k} must be 1..{E // n_group * topk_group} (experts in kept groups)")
    if rank_by not in ("top2_sum", "max") or scoring not in ("sigmoid", "softmax"):
        raise CoscaleError(f"route: rank_by must be 'top2_sum' or 'max' and scoring 'sigmoid' or 'softmax', "
                           f"got {rank_by!r} and {scoring!r}")
    check_backend(backend, x, op="route")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    return route_op(x, weight, None if bias is None else bias.float(), top_k, n_group, topk_group,
                    rank_by == "top2_sum", scoring == "sigmoid", normalize, 1.0 if scale is None else float(scale),
                    scale is not None, backend)
