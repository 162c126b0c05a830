"""The routed experts of a decode step in three kernels, without permuting tokens.

Shape legend: T tokens (a decode batch: at most a few dozen), K experts per token, E routed experts,
H hidden, I expert intermediate, S expert splits of the down projection.

    x [T, H], topk_idx [T, K], topk_weight [T, K]
      -> _moe_gate_up_kernel   act[e, t] = silu(x_t W_gate[e]^T) * (x_t W_up[e]^T)     [E, T, I]
      -> _moe_down_kernel      part[s, t] = sum over e of split s routed by t:
                                            topk_weight[t, e] * act[e, t] W_down[e]^T   [S, T, H] float32
      -> part.sum(0)           out [T, H]

At decode an expert has a row or two, and coscale.kernels.moe's general path spends most of its kernels
moving those rows: a sort, counts, a prefix sum, a gather, a scatter back, SwiGLU on its own, and gate
and up as two GEMMs; about ten launches of a few microseconds per MoE layer around the GEMMs that stream
the weights (BENCHMARKS.md, run 27's decode profile). Here every token of a block of BLOCK_T is a row of
every expert's tile: a program for expert e reads the block's picks, returns at once when no token of the
block picked e (so an untouched expert's weights are never read), and otherwise multiplies all BLOCK_T
rows, masking the ones that did not pick e. tl.dot's tiles have 16 rows at least, so at T <= 16 this is
the work the grouped GEMM's 16-row decode tiles do anyway; at larger T it multiplies rows that are
thrown away, and past MOE_DECODE_MAX_TOKENS "auto" takes `rows="picks"` (below), up to
MOE_DECODE_PICKS_MAX_TOKENS; beyond it the general path runs.

The down projection is split over S groups of EXPERTS_PER_SPLIT experts, each program adding its experts'
weighted outputs in expert order into its own float32 partial: no atomics, so the sum is the same run to
run, and enough programs to stream the weights (H / BLOCK_N alone would be 32 programs at V2-Lite).
The caller sums the partials (`moe_decode` returns the sum; under torch.compile Inductor fuses it with
the shared experts' add that follows).

`rows="picks"` multiplies only each expert's own picks, for batches where every token as a row would be
wasteful (tens to hundreds of tokens): `_moe_plan_kernel` lists each expert's picks (flat indices t*K + k,
in order; one program per expert, a prefix sum over the picks, no sort), then the gate/up and down kernels
gather those rows (BLOCK_T at a time, the token's x row by t = j // K) and write one output row per pick,
y [T*K, H]; the weighted sum over each token's K rows is PyTorch's (deterministic, as the general path's
combine). Three kernels and a fused sum against the general path's dozen: 1.19-1.23x it at 64-128
tokens on an H200 at V2-Lite's shape, 1.04-1.05x at V3's (`moe_decode_rows` says which layout a batch takes).

Rounding follows the general path: gate and up are rounded to the activation dtype before SwiGLU, and
each expert's output before it is weighted, so the two differ only in the order of float32 sums.

Inference only (no backward). `moe_decode_torch` is the reference, with the same roundings; the tests also
hold both to coscale.model.moe.experts_forward_loop in float64.
"""

from __future__ import annotations

import torch

from coscale.errors import CoscaleError
from coscale.kernels.autotune import power_of_two_bucket, triton_autotune
from coscale.kernels.backend import check_backend, interpreting, select_backend
from coscale.kernels.library import operator

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

__all__ = ["MOE_DECODE_MAX_TOKENS", "MOE_DECODE_PICKS_MAX_TOKENS", "default_experts_per_split", "moe_decode",
           "moe_decode_rows", "moe_decode_picks_torch", "moe_decode_torch"]

# Which row layout a batch of T tokens takes (measured on an H200, BENCHMARKS.md runs 28-29): "tokens" up to
# MOE_DECODE_MAX_TOKENS (V2-Lite's experts 1.41x the general path at 1 token, 1.10x at 32; V3's 1.31x and
# 1.03x), "picks" above it up to MOE_DECODE_PICKS_MAX_TOKENS (V2-Lite's 1.23x at 64, 1.19x at 128, where
# "tokens" falls to 0.60x: every token a row of every expert; V3's 1.05x at 64 and 1.04x at 128, run 30,
# where "tokens" is 0.97x and 0.55x), the general path beyond (not measured).
MOE_DECODE_MAX_TOKENS = 32
MOE_DECODE_PICKS_MAX_TOKENS = 128
# Experts one program of the down projection walks ("tokens" rows): 4 up to SMALL_BATCH_SPLIT_TOKENS tokens, 8
# beyond. Measured on V2-Lite's experts (an H100, BENCHMARKS.md run 48, graph-timed): at 1 token 45.6 us with 4 a
# split against 48.4 with 8 (47.0 with 1, 46.9 with 2), at 4 tokens 130.4 against 134.4, at 16 tokens 313.2 against
# 300.7: more, shorter programs spread a batch's few picked experts over more SMs until the partial sums' traffic
# (one float32 [T, H] a split) outweighs it.
EXPERTS_PER_SPLIT = 8
SMALL_BATCH_EXPERTS_PER_SPLIT = 4
SMALL_BATCH_SPLIT_TOKENS = 4


def default_experts_per_split(tokens: int) -> int:
    """The down projection's experts a program for a batch of ``tokens`` ("tokens" rows; measured above)."""
    return SMALL_BATCH_EXPERTS_PER_SPLIT if tokens <= SMALL_BATCH_SPLIT_TOKENS else EXPERTS_PER_SPLIT


def moe_decode_rows(tokens: int) -> str | None:
    """The row layout of these kernels for a batch of `tokens` ("tokens", "picks"), or None where the
    general path is faster or not measured (more than MOE_DECODE_PICKS_MAX_TOKENS)."""
    if 0 < tokens <= MOE_DECODE_MAX_TOKENS:
        return "tokens"
    return "picks" if MOE_DECODE_MAX_TOKENS < tokens <= MOE_DECODE_PICKS_MAX_TOKENS else None


if triton is not None:
    # BLOCK_N, BLOCK_K, stages, warps: narrow N tiles and deep K steps put enough programs and bytes in
    # flight to stream the weights, as the grouped GEMM's decode tiles do.
    _SHAPES = ((64, 128, 4, 4), (32, 256, 4, 4), (64, 256, 3, 4), (128, 128, 4, 4), (32, 128, 5, 4))
    _CONFIGS = (
        [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_stages=s, num_warps=w) for n, k, s, w in _SHAPES],
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4),
    )

    @triton.jit
    def _picks_of_expert(idx_ptr, g_ptr, T, e, t0, K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_T: tl.constexpr):
        """(weight [BLOCK_T] float32, picked [BLOCK_T] bool): each token's routing weight for expert e
        (0 where it did not pick e) and whether it picked e, for tokens t0 .. t0 + BLOCK_T."""
        toks = t0 + tl.arange(0, BLOCK_T)
        ks = tl.arange(0, K_POW2)
        ok = (toks[:, None] < T) & (ks[None, :] < K)
        where = toks[:, None].to(tl.int64) * K + ks[None, :]
        hit = tl.load(idx_ptr + where, mask=ok, other=-1) == e
        weight = tl.sum(tl.where(hit, tl.load(g_ptr + where, mask=ok, other=0.0), 0.0), axis=1)
        return weight, tl.sum(hit.to(tl.int32), axis=1) > 0

    @triton.jit
    def _gate_up_swiglu(x_ptrs, row_ok, wg_ptr, wu_ptr, w_off, col_ok, H, act_ptr, BLOCK_T: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
        """silu(x W_gate^T) * (x W_up^T) of BLOCK_T rows (x_ptrs [BLOCK_T, BLOCK_K] at k = 0) and BLOCK_N
        columns (w_off [BLOCK_K, BLOCK_N]), float32, gate and up rounded to act's dtype first."""
        ks = tl.arange(0, BLOCK_K)
        acc_g = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k_ok = (k0 + ks) < H
            xt = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_ok = k_ok[:, None] & col_ok[None, :]
            wg = tl.load(wg_ptr + w_off + k0, mask=w_ok, other=0.0)
            wu = tl.load(wu_ptr + w_off + k0, mask=w_ok, other=0.0)
            if DOT_FP32:  # Triton's interpreter multiplies 16-bit floats' raw bits in tl.dot
                xt, wg, wu = xt.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
            acc_g += tl.dot(xt, wg)
            acc_u += tl.dot(xt, wu)
        dtype = act_ptr.dtype.element_ty
        gate = acc_g.to(dtype).to(tl.float32)  # rounded as the general path's GEMM outputs are
        up = acc_u.to(dtype).to(tl.float32)
        return gate * tl.sigmoid(gate) * up

    @triton.jit
    def _rows_times_weight(a_ptrs, row_ok, w_ptrs, col_ok, I, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
        """[BLOCK_T, BLOCK_N] float32: rows a (a_ptrs at k = 0; rows not row_ok read as zeros) times a
        weight tile (w_ptrs [BLOCK_K, BLOCK_N] at k = 0) over I."""
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            k_ok = (k0 + ks) < I
            at = tl.load(a_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs + k0, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_FP32:
                at, wt = at.to(tl.float32), wt.to(tl.float32)
            acc += tl.dot(at, wt)
        return acc

    @triton_autotune(*_CONFIGS, key=["H", "I", "T_BUCKET"], rep_ms=20)
    @triton.jit
    def _moe_gate_up_kernel(
        x_ptr, idx_ptr, g_ptr, wg_ptr, wu_ptr, act_ptr, T, H, I, T_BUCKET,
        stride_x, stride_we, stride_wi,
        K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_T: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_n, e, pid_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        t0 = pid_t * BLOCK_T
        _, picked = _picks_of_expert(idx_ptr, g_ptr, T, e, t0, K, K_POW2, BLOCK_T)
        if tl.sum(picked.to(tl.int32), axis=0) == 0:
            return  # no token of this block picked e: its weights are not read
        rows = t0 + tl.arange(0, BLOCK_T)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok, col_ok = rows < T, cols < I
        x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :]
        w_off = e.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wi + ks[:, None]  # [BLOCK_K, BLOCK_N]
        act = _gate_up_swiglu(x_ptrs, row_ok, wg_ptr, wu_ptr, w_off, col_ok, H, act_ptr, BLOCK_T, BLOCK_N, BLOCK_K,
                              DOT_FP32)
        out = act_ptr + (e.to(tl.int64) * T + rows[:, None]) * I + cols[None, :]
        tl.store(out, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton_autotune(*_CONFIGS, key=["H", "I", "T_BUCKET"], rep_ms=20)
    @triton.jit
    def _moe_down_kernel(
        act_ptr, idx_ptr, g_ptr, wd_ptr, part_ptr, T, H, I, E, T_BUCKET,
        stride_we, stride_wh,
        K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_T: tl.constexpr, DOT_FP32: tl.constexpr,
        EXPERTS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_n, split, pid_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        t0 = pid_t * BLOCK_T
        rows = t0 + tl.arange(0, BLOCK_T)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok, col_ok = rows < T, cols < H
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for i in range(EXPERTS):
            e = split * EXPERTS + i  # in expert order: the same sum every run
            weight, picked = _picks_of_expert(idx_ptr, g_ptr, T, e, t0, K, K_POW2, BLOCK_T)
            if (e < E) & (tl.sum(picked.to(tl.int32), axis=0) > 0):
                a_ptrs = act_ptr + (e.to(tl.int64) * T + rows[:, None]) * I + ks[None, :]
                w_ptrs = wd_ptr + e.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wh + ks[:, None]
                # rows that did not pick e read as zeros: their act was never written
                acc_e = _rows_times_weight(a_ptrs, picked, w_ptrs, col_ok, I, BLOCK_T, BLOCK_N, BLOCK_K, DOT_FP32)
                y = acc_e.to(act_ptr.dtype.element_ty).to(tl.float32)
                acc += y * weight[:, None]
        out = part_ptr + (split.to(tl.int64) * T + rows[:, None]) * H + cols[None, :]
        tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])


    # The pick-rows kernels (`moe_decode_picks`): BLOCK_T rows of one expert's picks a tile.
    _PICK_SHAPES = ((16, 64, 128, 4, 4), (16, 32, 256, 4, 4), (32, 64, 128, 4, 4), (32, 128, 128, 4, 4),
                    (16, 128, 128, 4, 4))
    _PICK_CONFIGS = (
        [triton.Config({"BLOCK_T": t, "BLOCK_N": n, "BLOCK_K": k}, num_stages=s, num_warps=w)
         for t, n, k, s, w in _PICK_SHAPES],
        triton.Config({"BLOCK_T": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4),
    )

    @triton.jit
    def _moe_plan_kernel(idx_ptr, rows_ptr, counts_ptr, TK, CAP, CHUNK: tl.constexpr):
        """Expert e's picks: the flat indices j = t * K + k with topk_idx[t, k] == e, in order, into
        rows[e, :count], and count into counts[e] (grid (E,))."""
        e = tl.program_id(0)
        count = tl.sum(tl.zeros([CHUNK], dtype=tl.int32), axis=0)
        for c in range(0, TK, CHUNK):
            j = c + tl.arange(0, CHUNK)
            hit = (tl.load(idx_ptr + j, mask=j < TK, other=-1) == e).to(tl.int32)
            slot = count + tl.cumsum(hit, axis=0) - 1
            tl.store(rows_ptr + e.to(tl.int64) * CAP + slot, j, mask=hit > 0)
            count += tl.sum(hit, axis=0)
        tl.store(counts_ptr + e, count)

    @triton.jit
    def _picks_block(rows_ptr, counts_ptr, e, r0, CAP, BLOCK_T: tl.constexpr):
        """(j [BLOCK_T] int64, ok [BLOCK_T]): the flat pick indices r0 .. r0 + BLOCK_T of expert e."""
        slots = r0 + tl.arange(0, BLOCK_T)
        ok = slots < tl.load(counts_ptr + e)
        j = tl.load(rows_ptr + e.to(tl.int64) * CAP + slots, mask=ok, other=0)
        return j.to(tl.int64), ok

    @triton_autotune(*_PICK_CONFIGS, key=["H", "I", "T_BUCKET"], rep_ms=20)
    @triton.jit
    def _moe_gate_up_picks_kernel(
        x_ptr, rows_ptr, counts_ptr, wg_ptr, wu_ptr, act_ptr, H, I, CAP, T_BUCKET,
        stride_x, stride_we, stride_wi,
        K: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """act[j] = SwiGLU of x[j // K] through expert e, for each pick j of e (act [T*K, I])."""
        pid_n, e = tl.program_id(0), tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        col_ok = cols < I
        w_off = e.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wi + ks[:, None]
        count = tl.load(counts_ptr + e)
        # a grid-stride loop over the row blocks: an expert with more picks than the grid's blocks cover
        # (a token listing it twice) still has every pick computed
        for r0 in range(tl.program_id(2) * BLOCK_T, count, tl.num_programs(2) * BLOCK_T):
            j, ok = _picks_block(rows_ptr, counts_ptr, e, r0, CAP, BLOCK_T)
            x_ptrs = x_ptr + (j // K)[:, None] * stride_x + ks[None, :]
            act = _gate_up_swiglu(x_ptrs, ok, wg_ptr, wu_ptr, w_off, col_ok, H, act_ptr, BLOCK_T, BLOCK_N,
                                  BLOCK_K, DOT_FP32)
            tl.store(act_ptr + j[:, None] * I + cols[None, :], act.to(act_ptr.dtype.element_ty),
                     mask=ok[:, None] & col_ok[None, :])

    @triton_autotune(*_PICK_CONFIGS, key=["H", "I", "T_BUCKET"], rep_ms=20)
    @triton.jit
    def _moe_down_picks_kernel(
        act_ptr, rows_ptr, counts_ptr, wd_ptr, y_ptr, H, I, CAP, T_BUCKET,
        stride_we, stride_wh,
        DOT_FP32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """y[j] = act[j] W_down[e]^T for each pick j of expert e (y [T*K, H], in act's dtype)."""
        pid_n, e = tl.program_id(0), tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        col_ok = cols < H
        w_ptrs = wd_ptr + e.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wh + ks[:, None]
        count = tl.load(counts_ptr + e)
        for r0 in range(tl.program_id(2) * BLOCK_T, count, tl.num_programs(2) * BLOCK_T):
            j, ok = _picks_block(rows_ptr, counts_ptr, e, r0, CAP, BLOCK_T)
            a_ptrs = act_ptr + j[:, None] * I + ks[None, :]
            y = _rows_times_weight(a_ptrs, ok, w_ptrs, col_ok, I, BLOCK_T, BLOCK_N, BLOCK_K, DOT_FP32)
            tl.store(y_ptr + j[:, None] * H + cols[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=ok[:, None] & col_ok[None, :])


def _block_t(T: int) -> int:
    return max(16, min(64, triton.next_power_of_2(T)))  # tl.dot's smallest M; 64 bounds the registers


def moe_decode_triton(x, topk_idx, topk_weight, w_gate, w_up, w_down,
                      experts_per_split: int = EXPERTS_PER_SPLIT) -> torch.Tensor:
    """The partial sums [S, T, H] float32, S = ceil(E / experts_per_split) (module docstring)."""
    T, H = x.shape
    E, I, _ = w_gate.shape
    K = topk_idx.shape[1]
    splits = triton.cdiv(E, experts_per_split)
    part = torch.empty(splits, T, H, dtype=torch.float32, device=x.device)
    if T == 0:
        return part
    act = torch.empty(E, T, I, dtype=x.dtype, device=x.device)
    block_t = _block_t(T)
    t_blocks, t_bucket = triton.cdiv(T, block_t), power_of_two_bucket(T)
    common = dict(K=K, K_POW2=triton.next_power_of_2(K), BLOCK_T=block_t, DOT_FP32=interpreting())
    _moe_gate_up_kernel[lambda meta: (triton.cdiv(I, meta["BLOCK_N"]), E, t_blocks)](
        x, topk_idx, topk_weight, w_gate, w_up, act, T, H, I, t_bucket,
        x.stride(0), w_gate.stride(0), w_gate.stride(1), **common,
    )
    _moe_down_kernel[lambda meta: (triton.cdiv(H, meta["BLOCK_N"]), splits, t_blocks)](
        act, topk_idx, topk_weight, w_down, part, T, H, I, E, t_bucket,
        w_down.stride(0), w_down.stride(1), EXPERTS=experts_per_split, **common,
    )
    return part


PICK_ROW_BLOCKS = 4  # row blocks a (column tile, expert) gets in the grid; more picks loop inside


def moe_decode_picks_triton(x, topk_idx, w_gate, w_up, w_down) -> torch.Tensor:
    """y [T*K, H] in x's dtype: row t*K + k is expert topk_idx[t, k]'s output for token t (unweighted)."""
    T, H = x.shape
    E, I, _ = w_gate.shape
    TK = topk_idx.numel()
    # zeros: a pick no expert lists (an id outside [0, E)) then adds nothing, as in the "tokens" kernels,
    # instead of uninitialised memory
    y = torch.zeros(TK, H, dtype=x.dtype, device=x.device)
    if TK == 0:
        return y
    act = torch.empty(TK, I, dtype=x.dtype, device=x.device)
    rows = torch.empty(E, TK, dtype=torch.int32, device=x.device)
    counts = torch.empty(E, dtype=torch.int32, device=x.device)
    _moe_plan_kernel[(E,)](topk_idx, rows, counts, TK, TK, CHUNK=min(1024, triton.next_power_of_2(TK)))
    t_bucket = power_of_two_bucket(T)
    blocks = min(PICK_ROW_BLOCKS, triton.cdiv(T, 16))
    _moe_gate_up_picks_kernel[lambda meta: (triton.cdiv(I, meta["BLOCK_N"]), E, blocks)](
        x, rows, counts, w_gate, w_up, act, H, I, TK, t_bucket, x.stride(0), w_gate.stride(0), w_gate.stride(1),
        K=topk_idx.shape[1], DOT_FP32=interpreting(),
    )
    _moe_down_picks_kernel[lambda meta: (triton.cdiv(H, meta["BLOCK_N"]), E, blocks)](
        act, rows, counts, w_down, y, H, I, TK, t_bucket, w_down.stride(0), w_down.stride(1),
        DOT_FP32=interpreting(),
    )
    return y


def _expert_rows_torch(h: torch.Tensor, e: int, w_gate, w_up, w_down, dtype) -> torch.Tensor:
    """Expert e's output for rows h (float32), in `dtype`, rounded where the kernels round: gate and up,
    SwiGLU, the output."""
    gate = (h @ w_gate[e].float().t()).to(dtype).float()
    up = (h @ w_up[e].float().t()).to(dtype).float()
    act = (gate * torch.sigmoid(gate) * up).to(dtype).float()
    return (act @ w_down[e].float().t()).to(dtype)


def moe_decode_picks_torch(x, topk_idx, w_gate, w_up, w_down) -> torch.Tensor:
    """The reference of `moe_decode_picks_triton`, rounded where the kernels round."""
    flat = topk_idx.flatten()
    y = torch.zeros(flat.numel(), x.shape[1], dtype=x.dtype, device=x.device)
    for e in flat.unique().tolist():
        j = (flat == e).nonzero(as_tuple=True)[0]
        y[j] = _expert_rows_torch(x[j // topk_idx.shape[1]].float(), e, w_gate, w_up, w_down, x.dtype)
    return y


def _fake_picks(x, topk_idx, w_gate, w_up, w_down, backend):
    return x.new_empty(topk_idx.numel(), x.shape[1])


@operator("moe_decode_picks", opaque=True, fake=_fake_picks)
def moe_decode_picks_op(x: torch.Tensor, topk_idx: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                        w_down: torch.Tensor, backend: str) -> torch.Tensor:
    """y [T*K, H]: each pick's expert output, unweighted (an opaque operator: autotuned kernels)."""
    if select_backend(backend, x, op="moe_decode") == "triton":
        return moe_decode_picks_triton(x, topk_idx, w_gate, w_up, w_down)
    return moe_decode_picks_torch(x, topk_idx, w_gate, w_up, w_down)


def _fake(x, topk_idx, topk_weight, w_gate, w_up, w_down, backend, experts_per_split):
    return x.new_empty(-(-w_gate.shape[0] // experts_per_split), x.shape[0], x.shape[1], dtype=torch.float32)


def moe_decode_torch(x, topk_idx, topk_weight, w_gate, w_up, w_down) -> torch.Tensor:
    """The reference: [T, H] float32, rounded where the kernels round (module docstring)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in topk_idx.unique().tolist():
        token, slot = (topk_idx == e).nonzero(as_tuple=True)
        y = _expert_rows_torch(x[token].float(), e, w_gate, w_up, w_down, x.dtype).float()
        out.index_add_(0, token, y * topk_weight[token, slot].float().unsqueeze(-1))
    return out


@operator("moe_decode", opaque=True, fake=_fake)
def moe_decode_op(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w_gate: torch.Tensor,
                  w_up: torch.Tensor, w_down: torch.Tensor, backend: str, experts_per_split: int) -> torch.Tensor:
    """Partial sums [S, T, H] float32 of the routed experts' output, S = ceil(E / experts_per_split) (an opaque
    operator: autotuned kernels; the CPU reference gives one partial and zeros)."""
    if select_backend(backend, x, op="moe_decode") == "triton":
        return moe_decode_triton(x, topk_idx, topk_weight, w_gate, w_up, w_down, experts_per_split)
    out = moe_decode_torch(x, topk_idx, topk_weight, w_gate, w_up, w_down)
    return torch.cat([out.unsqueeze(0), out.new_zeros(-(-w_gate.shape[0] // experts_per_split) - 1, *out.shape)])


ROWS = ("tokens", "picks")


def moe_decode(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w_gate: torch.Tensor,
               w_up: torch.Tensor, w_down: torch.Tensor, *, backend: str = "auto",
               rows: str = "tokens", experts_per_split: int | None = None) -> torch.Tensor:
    """sum_k topk_weight[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = topk_idx[t, k], as
    coscale.kernels.moe.grouped_experts_forward computes it, for the few tokens of a decode step.

    x [T, H] bfloat16 or float16; topk_idx [T, K] int64; topk_weight [T, K] float32; w_gate, w_up
    [E, I, H] and w_down [E, H, I] in x's dtype. Returns [T, H] in x's dtype; not differentiable.
    `backend`: "auto" (the kernels on CUDA, the reference elsewhere), "triton" (CPU tensors under
    TRITON_INTERPRET=1) or "torch" (`moe_decode_torch`). `rows`: "tokens" (every token of the batch a row of
    every picked expert's tile) or "picks" (only each expert's own picks, gathered: module docstring);
    `moe_decode_rows(T)` is the faster of the two. `experts_per_split` ("tokens" only): the experts one
    program of the down projection walks (fewer: more programs, more float32 partials to sum; default
    `default_experts_per_split(T)`). Expert ids must lie in [0, E), as the router gives them.
    """
    if rows not in ROWS:
        raise CoscaleError(f"moe_decode: rows must be one of {ROWS}, got {rows!r}")
    if experts_per_split is None:
        experts_per_split = default_experts_per_split(x.shape[0])
    if not isinstance(experts_per_split, int) or isinstance(experts_per_split, bool) or experts_per_split < 1:
        raise CoscaleError(f"moe_decode: experts_per_split must be a positive int, got {experts_per_split!r}")
    if x.dim() != 2 or w_gate.dim() != 3 or w_gate.shape != w_up.shape or w_gate.shape[2] != x.shape[1]:
        raise CoscaleError(f"moe_decode needs x [T, H] and w_gate, w_up [E, I, H], got {tuple(x.shape)}, "
                           f"{tuple(w_gate.shape)} and {tuple(w_up.shape)}")
    E, I, H = w_gate.shape
    if tuple(w_down.shape) != (E, H, I):
        raise CoscaleError(f"moe_decode: w_down must be [{E}, {H}, {I}], got {tuple(w_down.shape)}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0] or topk_weight.shape != topk_idx.shape:
        raise CoscaleError(f"moe_decode: topk_idx and topk_weight must be [{x.shape[0]}, K], got "
                           f"{tuple(topk_idx.shape)} and {tuple(topk_weight.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16) or any(w.dtype != x.dtype for w in (w_gate, w_up, w_down)):
        raise CoscaleError(f"moe_decode takes bfloat16 or float16 x and weights of its dtype, got {x.dtype}, "
                           f"{w_gate.dtype}, {w_up.dtype}, {w_down.dtype}")
    check_backend(backend, x, op="moe_decode")
    # The kernels read gate and up with one set of strides and every weight row-contiguous. Copying the
    # weights here would copy every expert on every decode step (7.5 GB a layer at V3's size): refuse.
    if w_gate.stride() != w_up.stride() or any(w.stride(-1) != 1 for w in (w_gate, w_up, w_down)):
        raise CoscaleError(f"moe_decode needs row-contiguous weights, w_gate and w_up with the same strides; got "
                           f"strides {w_gate.stride()}, {w_up.stride()}, {w_down.stride()} (make them contiguous "
                           "once, not per call)")
    if rows == "picks":
        y = moe_decode_picks_op(x.contiguous(), topk_idx.contiguous(), w_gate, w_up, w_down, backend)
        # each token's K rows weighted and summed, the same way every run (Inductor fuses it with what follows)
        weighted = y.view(*topk_idx.shape, x.shape[1]).float() * topk_weight.float().unsqueeze(-1)
        return weighted.sum(1).to(x.dtype)
    part = moe_decode_op(x.contiguous(), topk_idx.contiguous(), topk_weight.float().contiguous(),
                         w_gate, w_up, w_down, backend, experts_per_split)
    return part.sum(0).to(x.dtype)
