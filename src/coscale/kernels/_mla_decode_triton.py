"""The Triton kernels of MLA decode (algorithm, layouts and launcher: coscale.kernels.mla_decode).

A module of its own, imported on the first launch: ``triton.jit`` decides between the compiler and the
CPU interpreter when it decorates, and the interpreter looks up the helpers a kernel calls among the
module's globals (not in a closure), so helpers and kernels are defined here at module level.

What the split kernel's shape is for (sm_90 compiles with Triton's own ptxas, no GPU needed:
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` gives the TTGIR, shared memory and,
through ``ptxas -v``, registers and spills):

- Pipelining. Triton's pipeliner gives each load (num_stages - 1) / (1 + indirection levels) stages of
  latency, and a load whose address comes from a load in the same iteration (the block table) is one
  level deeper. The first version loaded the block ids and the latent tile in the same iteration, so at
  every num_stages it tried (2-4) the latent was single-buffered and each program waited for its tile
  before every product. The block ids of the next tile are now carried one iteration ahead, and the
  latent is double-buffered from num_stages 3 (2 with SWAP, whose wgmma reads shared memory).
- Orientation. tl.dot with M = 16 (16 heads) runs on mma.sync (MMAv2), the query as the A operand held
  in every warp's registers (about 144 registers a thread for 512 + 64 columns). SWAP=1 puts the keys on
  M (scores^T = K Q^T, O^T += K^T P^T): at BLOCK_N = 64 both products compile to wgmma with the query and
  the latent read from shared memory.
- FP8. e4m3 values are exact in fp16 (and bf16), so the cache tile is only cast; the per-token,
  per-128-column scale multiplies the tile's scores and, for P @ V, P itself (one accumulator per
  128-column tile). The first version multiplied every element in FP32 through a 3-D reshape. The
  second cast to bf16, which sm_90 has no single instruction for: e4m3 -> f16x2 -> f32 -> bf16x2 took
  F2FP, F2F and PRMT instructions that outnumbered everything else in the loop (sm_90 compile, 16 heads),
  and the kernel ran at 17-23% of copy bandwidth against 45-95% for a BF16 cache (run 6). With bf16
  queries the latent is now read in fp16 (LAT_FP16: one cvt.rn.f16x2.e4m3x2 per two values), the
  query rows scaled into fp16's range by a power of two and P times the scales kept <= 1 (see the
  kernel). The RoPE part stays in the query's dtype (a dot of its own). On the H200 (run 22) that was
  only 1.10-1.17x faster with 16 heads (16-22% of copy bandwidth) and 0.88x with 128 (64-row tiles, which
  keep the bf16 read): the conversion is not what holds the FP8 path back. EARLY_CVT (below, _load_k):
  1.3-1.4x more at batch 64-128 and 32K (24-29% of copy, run 25), slower at batch 1. Loading each tile's
  e4m3 latent and scales into registers a tile ahead by hand (runs 30-31: the pipeliner does stage them, through
  shared memory) was 0.74-0.79x this path on the H200 and miscompiled with SWAP=1; it is gone. WHOLE (below
  in the loop; mla_decode.FP8_WHOLE_TILE) reads the tile as a BF16 cache is read, its scales folded into the
  fp16 latent: a third of the dots and a quarter of the shared-memory traffic; 1.16-1.19x at batch 64-128 on
  the H200 (30-33% of copy, run 32), the default. Still open.
- Lazy rescaling (LAZY=1 candidates, FlashAttention-4's idea): rescaling the [M, 512] FP32 accumulators
  by alpha every tile costs about as many instructions as the tile's MMAs (16 heads: 64 FMULs a thread
  against 68 HMMAs a warp per 32-key tile, sm_90 compile). With LAZY the running maximum is left stale
  until some row's grows by more than 2^8 (or, FP8, a key scale outgrows its tile's smax by 64x); P is then
  <= 2^8 (times the scale ratio <= 2^14, inside fp16's range), and l and lse use the same stale maximum, so
  the result is the same. One branch per tile on a tile-wide maximum; the pipelined loads are unchanged
  in sm_90 compiles. Not among the autotuner's candidates: on the H200 (run 25) it was 1.02-1.04x with an
  FP8 cache, 0.97-1.12x with BF16 and 0.66-0.89x with 128 heads (a kernel_config with LAZY=1 runs it;
  bench_mla_decode.py --lazy times it beside the autotuned configuration).
- Candidates: (64, SWAP=0, 4 warps) spills and is left out; 64-row tiles (128 heads) keep the 8-warp
  candidates (_prune); a candidate over the shared-memory limit fails to compile and the autotuner
  skips it.
"""

import triton
import triton.language as tl

from coscale.kernels.autotune import triton_autotune


def _configs():
    """(the GPU's configurations, the interpreter's one) for coscale.kernels.autotune.triton_autotune.

    SWAP=0 puts the query rows (heads) on the MMA's M dimension; SWAP=1 puts the keys there (S^T = K Q^T,
    O^T += K^T P^T), which lets Hopper's wgmma (M a multiple of 64) run both products with 16 heads.
    Stages: the latent tile is double-buffered from num_stages 3 (SWAP=0) or 2 (SWAP=1, whose wgmma
    consumes from shared memory), checked on sm_90 compiles: 64 keys x (512 + 64) x 2 bytes is 72 KB
    a buffer, so the largest tiles get the fewest stages."""
    gpu = [triton.Config({"BLOCK_N": n, "SWAP": sw, "LAZY": lazy}, num_warps=w, num_stages=st)
           for n, sw, w, st, lazy in [(32, 0, 4, 3, 0), (32, 0, 4, 4, 0), (16, 0, 4, 5, 0), (64, 0, 8, 3, 0),
                                      (32, 0, 8, 4, 0), (64, 1, 4, 2, 0), (64, 1, 8, 2, 0), (32, 1, 4, 3, 0),
                                      (32, 1, 8, 4, 0)]]  # LAZY=1: a kernel_config only (run 25)
    return gpu, triton.Config({"BLOCK_N": 16, "SWAP": 0, "LAZY": 0}, num_warps=4, num_stages=1)


def _prune(configs, named_args, **kwargs):
    """Drop the candidates that cannot fit one tile of BLOCK_M rows: an [M, 512] FP32 accumulator over
    4 warps is 256 registers a thread at 64 rows (it spills), so 64-row tiles take 8 warps."""
    rows = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 16))
    kept = [c for c in configs if rows < 64 or c.num_warps >= 8]
    return kept or configs



@triton.jit
def _qk(q, k, SWAP: tl.constexpr, PRECISION: tl.constexpr):
    """Scores of rows q [M, D] against keys k [N, D]: [M, N], or [N, M] when SWAP."""
    if SWAP:
        return tl.dot(k, tl.trans(q), input_precision=PRECISION)
    else:
        return tl.dot(q, tl.trans(k), input_precision=PRECISION)

@triton.jit
def _pv(p, v, SWAP: tl.constexpr, PRECISION: tl.constexpr):
    """p [M, N] @ v [N, D] -> [M, D]; with SWAP p is [N, M] and the result [D, M]."""
    if SWAP:
        return tl.dot(tl.trans(v), p, input_precision=PRECISION)
    else:
        return tl.dot(p, v, input_precision=PRECISION)

@triton.jit
def _per_key(x, SWAP: tl.constexpr):
    """A [N] vector over keys, broadcast against scores ([M, N], or [N, M] when SWAP)."""
    if SWAP:
        return x[:, None]
    else:
        return x[None, :]

@triton.jit
def _per_row(x, SWAP: tl.constexpr):
    """A [M] vector over query rows, broadcast against scores or accumulators."""
    if SWAP:
        return x[None, :]
    else:
        return x[:, None]

@triton.jit
def _load_q(q_rows, row_ok, col0, C: tl.constexpr, CHUNK: tl.constexpr, dot_dtype: tl.constexpr):
    offs = col0 + tl.arange(0, CHUNK)
    q = tl.load(q_rows[:, None] + offs[None, :], mask=row_ok[:, None] & (offs[None, :] < C), other=0.0)
    return q.to(dot_dtype)

@triton.jit
def _pow2_row_scale(amax):
    """2^(14 - floor(log2 amax)) per row (1 for a zero row), a power of two that brings the row's largest
    value into [2^14, 2^15): the row then converts to fp16 without overflow and without losing a bit
    that bf16 held (fp16's 11 significant bits hold bf16's 8 wherever the value is >= 2^-10 of the
    largest). Built from the exponent bits, so it is exact; clamped to fp32's normal range."""
    e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    biased = tl.minimum(tl.maximum(127 + 14 - e, 1), 254)
    f = (biased << 23).to(tl.float32, bitcast=True)
    return tl.where(amax > 0, f, 1.0)

@triton.jit
def _load_raw(lat_rows, key_ok, col0, C: tl.constexpr, CHUNK: tl.constexpr):
    """One CHUNK-column slice of a latent tile as stored (e4m3 for an FP8 cache)."""
    offs = col0 + tl.arange(0, CHUNK)
    return tl.load(lat_rows[:, None] + offs[None, :], mask=key_ok[:, None] & (offs[None, :] < C), other=0.0,
                   eviction_policy="evict_first")

@triton.jit
def _cvt(k, dot_dtype: tl.constexpr, EARLY_CVT: tl.constexpr):
    # FP8 e4m3 values are exact in fp16 and bf16: the cast is the whole dequantization, the scale is folded
    # into the products (scores and P), so no element is multiplied here.
    if EARLY_CVT:
        # The same instruction Triton's own e4m3 -> fp16 cast lowers to (identical PTX for a plain load and
        # store), as an inline asm that Triton may not move: its optimizer otherwise moves the cast past
        # the shared-memory load, so that P @ V reads its operand transposed from 8-bit shared memory one
        # byte per instruction (128 LDS.U8 a tile in sm_90 compiles, where a BF16 cache takes 16
        # ldmatrix.trans). Converted first, the fp16 tile goes through shared memory like a BF16 one.
        # Four values an instance: the word of four e4m3 bytes as loaded, split into its halves by a mov (free
        # in SASS). Two values an instance ("h" inputs) made Triton pack every pair of bytes with PRMTs first:
        # 128 a thread per 64-key tile, the loop's most common instruction (sm_90 compile, 8 warps).
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
            "=r,=r,r", [k.to(tl.uint8, bitcast=True)], dtype=tl.float16, is_pure=False, pack=4)
    return k.to(dot_dtype)

@triton.jit
def _load_k(lat_rows, key_ok, col0, C: tl.constexpr, CHUNK: tl.constexpr, dot_dtype: tl.constexpr,
            EARLY_CVT: tl.constexpr):
    return _cvt(_load_raw(lat_rows, key_ok, col0, C, CHUNK), dot_dtype, EARLY_CVT)

@triton.jit
def _fp8_slice(lat_rows, s_rows, key_ok, t: tl.constexpr, C: tl.constexpr, CHUNK: tl.constexpr,
               dot_dtype: tl.constexpr, EARLY_CVT: tl.constexpr):
    """Scale tile t of this key tile: its latent slice cast for the dots and its per-key scales."""
    return (_load_k(lat_rows, key_ok, t * CHUNK, C, CHUNK, dot_dtype, EARLY_CVT),
            tl.load(s_rows + t, mask=key_ok, other=0.0))

@triton.jit
def _tile_ids(table_row, start, hi, offs_n, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The cache block ids of the key tile at ``start``: one when a tile never straddles a page, else one a key."""
    if PAGE % BLOCK_N == 0:
        return tl.load(table_row + start // PAGE, mask=start < hi, other=0)
    else:
        return tl.load(table_row + (start + offs_n) // PAGE, mask=start + offs_n < hi, other=0)

@triton.jit
def _tile_rows(base, ids, start, offs_n, stride_blk, stride_tok, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row pointers of the key tile at ``start`` in a paged cache tensor, from its block ids (_tile_ids)."""
    if PAGE % BLOCK_N == 0:
        return base + ids.to(tl.int64) * stride_blk + (start % PAGE + offs_n) * stride_tok
    else:
        return base + ids.to(tl.int64) * stride_blk + ((start + offs_n) % PAGE) * stride_tok

@triton.jit
def _rescale_fp8(acc, smax, tile_max, alpha, SWAP: tl.constexpr):
    """One 128-column tile's accumulator (value / smax) rescaled to the new softmax maximum (alpha) and the
    largest key scale seen so far. Returns (acc, smax)."""
    new = tl.maximum(smax, tile_max)
    return acc * _per_row(alpha * (smax / new), SWAP), new

@triton.jit
def _store_chunk(o_rows, acc, l_safe, keep, col0, C: tl.constexpr, CHUNK: tl.constexpr, SWAP: tl.constexpr):
    if SWAP:
        acc = tl.trans(acc)
    out = acc / l_safe[:, None]
    offs = col0 + tl.arange(0, CHUNK)
    tl.store(o_rows[:, None] + offs[None, :], out.to(o_rows.dtype.element_ty),
             mask=keep[:, None] & (offs[None, :] < C))

@triton_autotune(*_configs(), key=["C", "DR", "S_Q", "HEADS_TILE", "num_splits", "batch_bucket", "FP8",
                                   "LAT_FP16", "EARLY_CVT", "WHOLE", "PAGE"],
                 prune_configs_by={"early_config_prune": _prune},
                 rep_ms=10, graph_timing=True)  # a new key while serving stalls one step: keep its tuning short
# graph_timing: at batch 1 and at short contexts the kernel takes less time (5-15 us) than a launch from
# Python, which do_bench timed instead, so every candidate measured alike (run 30).
@triton.jit(do_not_specialize=["num_splits", "batch_bucket"])
def mla_decode_split_kernel(
    q_ptr, qpe_ptr, latent_ptr, rope_ptr, scale_ptr, table_ptr, seq_lens_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qs, stride_qh, stride_pb, stride_ps, stride_ph,
    stride_lblk, stride_ltok, stride_rblk, stride_rtok, stride_sblk, stride_stok, stride_table,
    stride_ob, stride_os, stride_oh, stride_osplit, stride_lb, stride_ls, stride_lh,
    H, num_splits, batch_bucket, sm_scale_log2,
    C: tl.constexpr, DR: tl.constexpr, S_Q: tl.constexpr, HEADS_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, BLOCK_R: tl.constexpr,
    PAGE: tl.constexpr, FP8: tl.constexpr, LAT_FP16: tl.constexpr, EARLY_CVT: tl.constexpr,
    WHOLE: tl.constexpr, NT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr,
    LAZY: tl.constexpr, LAZY_LOG2: tl.constexpr = 8.0, SCALE_SLACK: tl.constexpr = 64.0,
):  # fmt: skip
    tl.static_assert(not (WHOLE and LAZY), "the whole-tile FP8 read folds the scales with the current maximum")
    group, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    rows = tl.arange(0, BLOCK_M)
    token = rows // HEADS_TILE
    head = group * HEADS_TILE + rows % HEADS_TILE
    row_ok = (token < S_Q) & (head < H)
    last_key = seq_len - S_Q + token  # causal among the S_Q query tokens
    dot_dtype = tl.float32 if DOT_FP32 else q_ptr.dtype.element_ty
    # LAT_FP16 (an FP8 cache read by bf16 queries): the latent is read in fp16. e4m3 converts to fp16
    # exactly in one instruction per two values (cvt.rn.f16x2.e4m3x2), while to bf16 it takes a detour
    # through fp16 and fp32 (F2F/F2FP/PRMT: the most common instructions of the loop in sm_90 compiles).
    # The query rows are scaled by a power of two into fp16's range (_pow2_row_scale, undone on the
    # scores), and P times the keys' scales is kept <= 1 by dividing by the largest scale seen so far
    # (smax, one per 128-column tile, folded into the accumulators' rescaling like the softmax's
    # running maximum), so neither overflows fp16 nor sinks below its normal range unless it is
    # < 2^-14 of the row's largest, where bf16's rounding is larger than what fp16 loses.
    lat_dtype = tl.float16 if LAT_FP16 else dot_dtype
    q_rows = q_ptr + b * stride_qb + token * stride_qs + head * stride_qh
    qpe = _load_q(qpe_ptr + b * stride_pb + token * stride_ps + head * stride_ph, row_ok, 0, DR,
                  BLOCK_R, dot_dtype)
    # The latent's columns in NUM_CHUNKS chunks (one for a BF16 cache; one per 128-column scale tile for
    # FP8, at most four): each chunk has its own accumulator so that its scale can be folded into P.
    q0 = _load_q(q_rows, row_ok, 0, C, CHUNK, tl.float32)
    amax = tl.max(tl.abs(q0), axis=1)
    if SWAP:
        acc0 = tl.zeros((CHUNK, BLOCK_M), tl.float32)
    else:
        acc0 = tl.zeros((BLOCK_M, CHUNK), tl.float32)
    smax0 = tl.full((), 1.1754943508222875e-38, tl.float32)  # the smallest normal: never 0 / 0
    if NUM_CHUNKS > 1:
        q1 = _load_q(q_rows, row_ok, CHUNK, C, CHUNK, tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(q1), axis=1))
        acc1 = tl.zeros_like(acc0)
        smax1 = smax0
    if NUM_CHUNKS > 2:
        q2 = _load_q(q_rows, row_ok, 2 * CHUNK, C, CHUNK, tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(q2), axis=1))
        acc2 = tl.zeros_like(acc0)
        smax2 = smax0
    if NUM_CHUNKS > 3:
        q3 = _load_q(q_rows, row_ok, 3 * CHUNK, C, CHUNK, tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(q3), axis=1))
        acc3 = tl.zeros_like(acc0)
        smax3 = smax0
    if LAT_FP16:
        f = _pow2_row_scale(amax)
    else:
        f = tl.full((BLOCK_M,), 1.0, tl.float32)
    inv_f = 1.0 / f  # exact: f is a power of two
    q0 = (q0 * f[:, None]).to(lat_dtype)
    if NUM_CHUNKS > 1:
        q1 = (q1 * f[:, None]).to(lat_dtype)
    if NUM_CHUNKS > 2:
        q2 = (q2 * f[:, None]).to(lat_dtype)
    if NUM_CHUNKS > 3:
        q3 = (q3 * f[:, None]).to(lat_dtype)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    table_row = table_ptr + b * stride_table
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    # The block ids of the next tile are loaded one iteration ahead (carried through the loop): a
    # tile address that depends on a load in the same iteration makes Triton's pipeliner spend one
    # of num_stages on that load, which left the latent single-buffered (sm_90 compiles of the
    # first version: loads and dots serialised in every program).
    nxt = _tile_ids(table_row, lo, hi, offs_n, PAGE, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        key_ok = pos < hi
        block = nxt
        nxt = _tile_ids(table_row, start + BLOCK_N, hi, offs_n, PAGE, BLOCK_N)
        lat_rows = _tile_rows(latent_ptr, block, start, offs_n, stride_lblk, stride_ltok, PAGE, BLOCK_N)
        rope_rows = _tile_rows(rope_ptr, block, start, offs_n, stride_rblk, stride_rtok, PAGE, BLOCK_N)
        s_rows = _tile_rows(scale_ptr, block, start, offs_n, stride_sblk, stride_stok, PAGE, BLOCK_N)
        kr = tl.load(rope_rows[:, None] + offs_r[None, :], mask=key_ok[:, None] & (offs_r[None, :] < DR),
                     other=0.0, eviction_policy="evict_first").to(dot_dtype)
        s = _qk(qpe, kr, SWAP, PRECISION)
        # The latent tile is loaded once and feeds both products (scores and P @ V).
        if FP8 and WHOLE:
            # The whole tile at once (fp8_whole_tile): each 128-column scale tile's scale relative to
            # the largest seen so far, folded into the latent itself (one fp16 multiply per value), so
            # that both products and the accumulator span all C columns as with a BF16 cache. score =
            # (q f) . (q8 scale / smax) x smax / f.
            sc_all = tl.load(s_rows[:, None] + tl.arange(0, NT)[None, :], mask=key_ok[:, None], other=0.0)  # [N, NT]
            t0 = tl.max(sc_all)  # (over both axes)
            smax_next = tl.maximum(smax0, t0)
            k0 = _load_k(lat_rows, key_ok, 0, C, CHUNK, lat_dtype, EARLY_CVT)
            rel = (sc_all * (1.0 / smax_next)).to(lat_dtype)
            k0 = tl.reshape(tl.reshape(k0, (BLOCK_N, NT, CHUNK // NT)) * rel[:, :, None], (BLOCK_N, CHUNK))
            s += _qk(q0, k0, SWAP, PRECISION) * _per_row(inv_f * smax_next, SWAP)
        elif FP8:  # score = sum over tiles t of scale[t] * (q_t . q8_t), q_t scaled by f
            k0, sc0 = _fp8_slice(lat_rows, s_rows, key_ok, 0, C, CHUNK, lat_dtype, EARLY_CVT)
            s_lat = _qk(q0, k0, SWAP, PRECISION) * _per_key(sc0, SWAP)
            if NUM_CHUNKS > 1:
                k1, sc1 = _fp8_slice(lat_rows, s_rows, key_ok, 1, C, CHUNK, lat_dtype, EARLY_CVT)
                s_lat += _qk(q1, k1, SWAP, PRECISION) * _per_key(sc1, SWAP)
            if NUM_CHUNKS > 2:
                k2, sc2 = _fp8_slice(lat_rows, s_rows, key_ok, 2, C, CHUNK, lat_dtype, EARLY_CVT)
                s_lat += _qk(q2, k2, SWAP, PRECISION) * _per_key(sc2, SWAP)
            if NUM_CHUNKS > 3:
                k3, sc3 = _fp8_slice(lat_rows, s_rows, key_ok, 3, C, CHUNK, lat_dtype, EARLY_CVT)
                s_lat += _qk(q3, k3, SWAP, PRECISION) * _per_key(sc3, SWAP)
            s += s_lat * _per_row(inv_f, SWAP)
        else:
            k0 = _load_k(lat_rows, key_ok, 0, C, CHUNK, lat_dtype, EARLY_CVT)
            s += _qk(q0, k0, SWAP, PRECISION)

        if SWAP:
            visible = key_ok[:, None] & (pos[:, None] <= last_key[None, :])
            s = tl.where(visible, s * sm_scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
        else:
            visible = key_ok[None, :] & (pos[None, :] <= last_key[:, None])
            s = tl.where(visible, s * sm_scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rescale the accumulators to the new maxima: every tile, or with LAZY only when some row's
        # running maximum grew by more than 2^LAZY_LOG2 or (FP8) a key scale outgrew its tile's smax by
        # more than SCALE_SLACK. P is taken against the maximum kept, so it is <= 2^LAZY_LOG2 and P times
        # scale / smax <= 2^14, inside fp16's range; l and lse use the same maximum.
        if FP8 and not WHOLE:
            t0 = tl.max(sc0, axis=0)
            if NUM_CHUNKS > 1:
                t1 = tl.max(sc1, axis=0)
            if NUM_CHUNKS > 2:
                t2 = tl.max(sc2, axis=0)
            if NUM_CHUNKS > 3:
                t3 = tl.max(sc3, axis=0)
        need = True
        if LAZY:
            need = tl.max(tl.where(m_new > m_i, m_new - m_i, 0.0), axis=0) > LAZY_LOG2
            if FP8:
                need = need | (t0 > smax0 * SCALE_SLACK)
                if NUM_CHUNKS > 1:
                    need = need | (t1 > smax1 * SCALE_SLACK)
                if NUM_CHUNKS > 2:
                    need = need | (t2 > smax2 * SCALE_SLACK)
                if NUM_CHUNKS > 3:
                    need = need | (t3 > smax3 * SCALE_SLACK)
        if need:
            alpha = tl.exp2(m_i - tl.where(m_new == float("-inf"), 0.0, m_new))  # a row with no visible key yet
            l_i = l_i * alpha
            m_i = m_new
            if FP8:
                acc0, smax0 = _rescale_fp8(acc0, smax0, t0, alpha, SWAP)
                if NUM_CHUNKS > 1:
                    acc1, smax1 = _rescale_fp8(acc1, smax1, t1, alpha, SWAP)
                if NUM_CHUNKS > 2:
                    acc2, smax2 = _rescale_fp8(acc2, smax2, t2, alpha, SWAP)
                if NUM_CHUNKS > 3:
                    acc3, smax3 = _rescale_fp8(acc3, smax3, t3, alpha, SWAP)
            else:
                acc0 = acc0 * _per_row(alpha, SWAP)
        p = tl.exp2(s - _per_row(tl.where(m_i == float("-inf"), 0.0, m_i), SWAP))
        l_i = l_i + tl.sum(p, axis=0 if SWAP else 1)
        # value = scale[t] * q8 over tile t: scale / smax goes into P (one product per tile)
        if FP8 and WHOLE:  # the latent already holds scale / smax
            acc0 += _pv(p.to(lat_dtype), k0, SWAP, PRECISION)
        elif FP8:
            acc0 += _pv((p * _per_key(sc0 / smax0, SWAP)).to(lat_dtype), k0, SWAP, PRECISION)
            if NUM_CHUNKS > 1:
                acc1 += _pv((p * _per_key(sc1 / smax1, SWAP)).to(lat_dtype), k1, SWAP, PRECISION)
            if NUM_CHUNKS > 2:
                acc2 += _pv((p * _per_key(sc2 / smax2, SWAP)).to(lat_dtype), k2, SWAP, PRECISION)
            if NUM_CHUNKS > 3:
                acc3 += _pv((p * _per_key(sc3 / smax3, SWAP)).to(lat_dtype), k3, SWAP, PRECISION)
        else:
            acc0 += _pv(p.to(dot_dtype), k0, SWAP, PRECISION)

    has_keys = l_i > 0
    l_safe = tl.where(has_keys, l_i, 1.0)
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_rows = out_ptr + b * stride_ob + token * stride_os + head * stride_oh + split * stride_osplit
    # A split past the end of a short sequence stores only its lse (-inf): the combine skips it, so
    # graphs sized for long contexts do not pay for empty partial outputs.
    # (lo < hi) broadcast as a tensor first: a scalar comparison combined with a bool tensor makes an
    # int32 mask in triton 3.9's interpreter, which its stores refuse
    keep = row_ok & ((tl.zeros_like(row_ok.to(tl.int32)) + hi) > lo)
    if num_splits == 1:
        keep = row_ok
    if FP8:  # the accumulators hold value / smax
        acc0 = acc0 * smax0
        if NUM_CHUNKS > 1:
            acc1 = acc1 * smax1
        if NUM_CHUNKS > 2:
            acc2 = acc2 * smax2
        if NUM_CHUNKS > 3:
            acc3 = acc3 * smax3
    _store_chunk(o_rows, acc0, l_safe, keep, 0, C, CHUNK, SWAP)
    if NUM_CHUNKS > 1:
        _store_chunk(o_rows, acc1, l_safe, keep, CHUNK, C, CHUNK, SWAP)
    if NUM_CHUNKS > 2:
        _store_chunk(o_rows, acc2, l_safe, keep, 2 * CHUNK, C, CHUNK, SWAP)
    if NUM_CHUNKS > 3:
        _store_chunk(o_rows, acc3, l_safe, keep, 3 * CHUNK, C, CHUNK, SWAP)
    tl.store(lse_ptr + b * stride_lb + token * stride_ls + head * stride_lh + split, lse, mask=row_ok)

@triton.jit
def mla_decode_combine_kernel(
    part_ptr, part_lse_ptr, out_ptr, lse_ptr, H,
    stride_pb, stride_ps, stride_ph, stride_psplit, stride_lb, stride_ls, stride_lh,
    stride_ob, stride_os, stride_oh, stride_fb, stride_fs, stride_fh,
    C: tl.constexpr, BLOCK_C: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
):  # fmt: skip
    # One program = one (query token, head) row of one sequence, BLOCK_C of its columns (program_id(2)).
    # Every split's slice is read by one masked [SPLITS_P2, BLOCK_C] load, all in flight at once: a loop
    # over the splits issued one dependent load after another (64 splits at one request over 32K keys).
    # Splits without keys (lse -inf, weight 0) are masked out of the load: their partial outputs were
    # never written and may hold anything, NaN included, which 0 x NaN would carry into the sum.
    b, row, cb = tl.program_id(1), tl.program_id(0), tl.program_id(2)
    t, h = row // H, row % H
    offs_s = tl.arange(0, SPLITS_P2)
    lse = tl.load(part_lse_ptr + b * stride_lb + t * stride_ls + h * stride_lh + offs_s,
                  mask=offs_s < NUM_SPLITS, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    weights = tl.exp(lse - lse_max)
    total = tl.sum(weights, axis=0)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    base = part_ptr + b * stride_pb + t * stride_ps + h * stride_ph
    live = (offs_s < NUM_SPLITS) & (weights > 0)
    parts = tl.load(base + offs_s[:, None] * stride_psplit + offs_c[None, :],
                    mask=live[:, None] & (offs_c < C)[None, :], other=0.0)
    acc = tl.sum(tl.where(live[:, None], weights[:, None] * parts, 0.0), axis=0)
    tl.store(out_ptr + b * stride_ob + t * stride_os + h * stride_oh + offs_c,
             (acc / total).to(out_ptr.dtype.element_ty), mask=offs_c < C)
    if cb == 0:
        tl.store(lse_ptr + b * stride_fb + t * stride_fs + h * stride_fh, lse_max + tl.log(total))
