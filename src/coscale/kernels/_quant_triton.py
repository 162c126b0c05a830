"""The Triton quantization kernels (recipe, layouts and special values: coscale.kernels.fp8_recipe;
launchers and operators: coscale.kernels.quant_ops and coscale.kernels.fused_quant).

A module of its own, imported on the first launch: ``triton.jit`` decides between the compiler and the
CPU interpreter when it decorates, and the interpreter looks up the helpers a kernel calls among the
module's globals (not in a closure), so helpers and kernel are defined here at module level.

``M_BUCKET`` (a power-of-two bucket of the row count, unused by the code) is an autotuning key: the
launchers tune each kernel's tile shape once per bucket, not once per row count.

Division: ``tl.math.div_rn`` (IEEE round-to-nearest; present in triton 3.0 through 3.9 and in the
interpreter) everywhere the reference divides. Triton compiles a plain fp32 ``/`` to the approximate
``div.full.f32``, which would not be bit-exact.
"""

import triton
import triton.language as tl


@triton.jit
def _tile_scale(amax, has_nan, amax_floor, fp8_max, ROUND_SCALE: tl.constexpr):
    """The dequantization scale of each tile from its amax, as the reference's ``_scale_from_amax``.

    tl.max may drop NaN, so the caller detects NaN (``has_nan``) and the scale is made NaN here."""
    amax = tl.where(has_nan, float("nan"), amax)
    amax = tl.where(amax < amax_floor, amax_floor, amax)  # NaN < floor is false: NaN kept
    s = tl.math.div_rn(amax, fp8_max)
    if ROUND_SCALE:  # UE8M0: 2^ceil(log2 s) on the bits, finite scales only
        bits = s.to(tl.int32, bitcast=True)
        expo = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        s = tl.where(s - s == 0, (expo << 23).to(tl.float32, bitcast=True), s)
    return s


@triton.jit
def _quantize(x, s, fp8_max, GRID_ROUND: tl.constexpr):
    """x / s saturated to +-fp8_max, ready for the E4M3 cast (the caller broadcasts s to x's shape)."""
    y = tl.math.div_rn(x, s)
    y = tl.where(y > fp8_max, fp8_max, y)  # saturate; tl.minimum could turn NaN into 448
    y = tl.where(y < -fp8_max, -fp8_max, y)
    if GRID_ROUND:  # interpreter only: round onto the E4M3 grid so its cast is exact
        expo = (y.to(tl.int32, bitcast=True) >> 23) & 0xFF
        expo = tl.where(expo < 121, 121, expo)
        magic = (((expo + 20) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
        r = (y + magic) - magic
        y = tl.where(r == 0, y * 0.0, r)  # keep the sign of values rounding to zero
    return y


@triton.jit(do_not_specialize=["M_BUCKET"])
def quant_kernel(
    x_ptr, y_ptr, s_ptr, yt_ptr, st_ptr,
    M, K, Y_ROWS, YT_ROWS, M_BUCKET,
    stride_xb, stride_xm, stride_xk,
    stride_yb, stride_ym, stride_sb, stride_sm, stride_sk,
    stride_ytb, stride_ytk, stride_stb, stride_stk, stride_stm,
    amax_floor, fp8_max,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
    WHOLE_TILE: tl.constexpr, ROUND_SCALE: tl.constexpr, GRID_ROUND: tl.constexpr,
):  # fmt: skip
    # One program = one [BLOCK_M, BLOCK_K] tile of x (batch index program_id(2)), loaded once with
    # coalesced loads (K contiguous), every output computed from the same registers:
    # ROWS and not WHOLE_TILE: 1x128 tiles along K -> y [M, Kp] (rows < Y_ROWS), s [M, Kp/128].
    # COLS and not WHOLE_TILE: x^T in 1x128 tiles along M (needs BLOCK_M == 128) -> yt [YT_ROWS, Mp],
    #   st [YT_ROWS, Mp/128]; the FP8 tile is transposed in registers (tl.trans) so the store is
    #   contiguous along the tokens.
    # WHOLE_TILE: one scale per 128x128 block -> y [Np, Kp], s [Np/128, Kp/128], and with COLS also the
    #   transposed scales st [Kp/128, Np/128] (W^T's bytes come from transpose_bytes_kernel below).
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    in_m = offs_m < M
    in_k = offs_k < K
    x_ptrs = x_ptr + pid_b * stride_xb + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    x = tl.load(x_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0).to(tl.float32)  # exact
    x_nan = (x != x).to(tl.int32)
    if WHOLE_TILE:
        # amax of the block (tl.max may drop NaN, so NaN is detected explicitly)
        amax = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.max(tl.max(tl.abs(x), 1), 0)
        has_nan = (tl.zeros([BLOCK_M], dtype=tl.int32) + tl.max(tl.max(x_nan, 1), 0)) > 0
        s = _tile_scale(amax, has_nan, amax_floor, fp8_max, ROUND_SCALE)
        y8 = _quantize(x, s[:, None], fp8_max, GRID_ROUND).to(y_ptr.dtype.element_ty)
        y_ptrs = y_ptr + pid_b * stride_yb + offs_m[:, None].to(tl.int64) * stride_ym + offs_k[None, :]
        tl.store(y_ptrs, y8, mask=(offs_m < Y_ROWS)[:, None])
        s_one = tl.max(s, 0)  # all entries equal (NaN included), so any reduction returns it
        tl.store(s_ptr + pid_b * stride_sb + pid_m * stride_sm + pid_k * stride_sk, s_one)
        if COLS:  # W^T's scales (W^T's bytes come from transpose_bytes_kernel): the same number, transposed
            tl.store(st_ptr + pid_b * stride_stb + pid_k * stride_stk + pid_m * stride_stm, s_one)
    else:
        if ROWS:
            amax = tl.max(tl.abs(x), 1)
            s = _tile_scale(amax, tl.max(x_nan, 1) > 0, amax_floor, fp8_max, ROUND_SCALE)
            y = _quantize(x, s[:, None], fp8_max, GRID_ROUND)
            y_ptrs = y_ptr + pid_b * stride_yb + offs_m[:, None].to(tl.int64) * stride_ym + offs_k[None, :]
            tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(offs_m < Y_ROWS)[:, None])
            s_ptrs = s_ptr + pid_b * stride_sb + offs_m.to(tl.int64) * stride_sm + pid_k * stride_sk
            tl.store(s_ptrs, s, mask=in_m)
        if COLS:
            amax_t = tl.max(tl.abs(x), 0)
            st = _tile_scale(amax_t, tl.max(x_nan, 0) > 0, amax_floor, fp8_max, ROUND_SCALE)
            yt = _quantize(x, st[None, :], fp8_max, GRID_ROUND)
            # cast first, then transpose the 1-byte tile (16 KB through shared memory, not 64 KB)
            yt8 = tl.trans(yt.to(yt_ptr.dtype.element_ty))  # [BLOCK_K, BLOCK_M]
            yt_ptrs = yt_ptr + pid_b * stride_ytb + offs_k[:, None].to(tl.int64) * stride_ytk + offs_m[None, :]
            tl.store(yt_ptrs, yt8, mask=(offs_k < YT_ROWS)[:, None])
            st_ptrs = st_ptr + pid_b * stride_stb + offs_k.to(tl.int64) * stride_stk + pid_m * stride_stm
            tl.store(st_ptrs, st, mask=offs_k < YT_ROWS)


@triton.jit
def transpose_bytes_kernel(
    x_ptr, y_ptr, R, C, stride_xb, stride_xr, stride_yb, stride_yc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # y[b, c, r] = x[b, r, c] for 1-byte elements (FP8 bits moved as uint8: exact). One program per
    # [BLOCK_R, BLOCK_C] tile, loaded along C and stored along R.
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    x = tl.load(x_ptr + pid_b * stride_xb + offs_r[:, None].to(tl.int64) * stride_xr + offs_c[None, :], mask=mask)
    y_ptrs = y_ptr + pid_b * stride_yb + offs_c[:, None].to(tl.int64) * stride_yc + offs_r[None, :]
    tl.store(y_ptrs, tl.trans(x), mask=tl.trans(mask))


# ----------------------------------------------------------------------------------------------------
# Quantization fused into the kernel that produces its input (coscale.kernels.fused_quant)
# ----------------------------------------------------------------------------------------------------
# SOURCE says how the [rows x cols] tile of the matrix to quantize is produced, in FP32 and rounded to
# the dtype the unfused producer would have stored (so the FP8 bytes equal those of quantizing that
# stored tensor):
#   0  x [M, K] itself
#   1  SwiGLU: a[:, j] = silu(g) * u with g = x[:, j], u = x[:, up_offset + j]   (x = [gate | up])
#   2  SwiGLU backward: columns j < up_offset are dg, j >= up_offset du (of column j - up_offset), from
#      x = [gate | up] and da = b [M, up_offset]
#   3  gather: row r is x[row_pair[r] // TOPK] (zeros where row_pair[r] < 0), times w[row_pair[r]] when
#      HAS_WEIGHT (rounded to x's dtype, as the permutation kernels store it)


@triton.jit
def _produce(
    x_ptr, b_ptr, idx_ptr, w_ptr, offs_m, offs_k, M, K, stride_x, stride_b, up_offset,
    SOURCE: tl.constexpr, TOPK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
):  # fmt: skip
    """(the tile in FP32, the unweighted source values): see the SOURCE table above."""
    in_m = offs_m < M
    mask = in_m[:, None] & (offs_k < K)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    if SOURCE == 0:
        v = tl.load(x_ptr + rows * stride_x + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        raw = v
    elif SOURCE == 1:
        g = tl.load(x_ptr + rows * stride_x + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + rows * stride_x + up_offset + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        v = (g * tl.sigmoid(g) * u).to(x_ptr.dtype.element_ty).to(tl.float32)  # as kernels.swiglu stores a
        raw = v
    elif SOURCE == 2:
        is_up = offs_k >= up_offset
        j = tl.where(is_up, offs_k - up_offset, offs_k)[None, :]
        g = tl.load(x_ptr + rows * stride_x + j, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + rows * stride_x + up_offset + j, mask=mask, other=0.0).to(tl.float32)
        da = tl.load(b_ptr + rows * stride_b + j, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dg = da * u * s * (1.0 + g * (1.0 - s))  # the formulas of kernels.swiglu's backward kernel
        du = da * g * s
        v = tl.where(is_up[None, :], du, dg).to(x_ptr.dtype.element_ty).to(tl.float32)
        raw = v
    else:
        pair = tl.load(idx_ptr + offs_m, mask=in_m, other=-1)
        valid = pair >= 0
        safe = tl.where(valid, pair, 0)
        token = (safe // TOPK).to(tl.int64)
        vals = tl.load(x_ptr + token[:, None] * stride_x + offs_k[None, :], mask=mask & valid[:, None], other=0.0)
        raw = vals.to(tl.float32)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + safe, mask=valid, other=0.0)
            v = (raw * w[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)  # as kernels.permute stores it
        else:
            v = raw
    return v, raw


@triton.jit(do_not_specialize=["M_BUCKET"])
def rows_quant_kernel(
    x_ptr, b_ptr, idx_ptr, w_ptr, dot_ptr, dot_out_ptr, y_ptr, s_ptr,
    M, K, KP, M_BUCKET, stride_x, stride_b, up_offset, stride_dot, stride_ym, stride_sm, stride_sk,
    amax_floor, fp8_max,
    SOURCE: tl.constexpr, TOPK: tl.constexpr, HAS_WEIGHT: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, ROUND_SCALE: tl.constexpr, GRID_ROUND: tl.constexpr,
):  # fmt: skip
    # One program = BLOCK_M rows, walking all KP columns in 128-wide tiles: y [M, KP] e4m3 and
    # s [M, KP/128] (1x128 tiles along the columns). DOT (the combine's backward): also
    # dot_out[row_pair[r]] = <dot[r], unweighted source row>, summed over the whole row in this program.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < M
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, KP, 128):
        offs_k = k0 + tl.arange(0, 128)
        v, raw = _produce(x_ptr, b_ptr, idx_ptr, w_ptr, offs_m, offs_k, M, K, stride_x, stride_b, up_offset,
                          SOURCE, TOPK, HAS_WEIGHT)  # fmt: skip
        has_nan = tl.max((v != v).to(tl.int32), 1) > 0
        s = _tile_scale(tl.max(tl.abs(v), 1), has_nan, amax_floor, fp8_max, ROUND_SCALE)
        y = _quantize(v, s[:, None], fp8_max, GRID_ROUND)
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_k[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=in_m[:, None])
        tl.store(s_ptr + offs_m.to(tl.int64) * stride_sm + (k0 // 128) * stride_sk, s, mask=in_m)
        if DOT:
            d_mask = in_m[:, None] & (offs_k < K)[None, :]
            d = tl.load(dot_ptr + offs_m[:, None].to(tl.int64) * stride_dot + offs_k[None, :], mask=d_mask, other=0.0)
            acc += tl.sum(d.to(tl.float32) * raw, 1)
    if DOT:
        pair = tl.load(idx_ptr + offs_m, mask=in_m, other=-1)
        tl.store(dot_out_ptr + tl.where(pair >= 0, pair, 0), acc, mask=pair >= 0)


@triton.jit(do_not_specialize=["M_BUCKET"])
def cols_quant_kernel(
    x_ptr, b_ptr, idx_ptr, w_ptr, yt_ptr, st_ptr,
    M, K, YT_ROWS, M_BUCKET, stride_x, stride_b, up_offset, stride_ytk, stride_stk, stride_stm,
    amax_floor, fp8_max,
    SOURCE: tl.constexpr, TOPK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_K: tl.constexpr, ROUND_SCALE: tl.constexpr, GRID_ROUND: tl.constexpr,
):  # fmt: skip
    # One program = a [128 rows x BLOCK_K columns] tile: the transpose in 1x128 tiles along the rows,
    # yt [YT_ROWS, Mp] e4m3 and st [YT_ROWS, Mp/128] (rows K..YT_ROWS-1 zeros), stored contiguous along
    # the rows through a transposed FP8 tile (as quant_kernel's COLS branch).
    pid_m = tl.program_id(0)
    offs_m = pid_m * 128 + tl.arange(0, 128)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    v, raw = _produce(x_ptr, b_ptr, idx_ptr, w_ptr, offs_m, offs_k, M, K, stride_x, stride_b, up_offset,
                      SOURCE, TOPK, HAS_WEIGHT)  # fmt: skip
    has_nan = tl.max((v != v).to(tl.int32), 0) > 0
    st = _tile_scale(tl.max(tl.abs(v), 0), has_nan, amax_floor, fp8_max, ROUND_SCALE)
    yt8 = tl.trans(_quantize(v, st[None, :], fp8_max, GRID_ROUND).to(yt_ptr.dtype.element_ty))
    in_rows = offs_k < YT_ROWS
    tl.store(yt_ptr + offs_k[:, None].to(tl.int64) * stride_ytk + offs_m[None, :], yt8, mask=in_rows[:, None])
    tl.store(st_ptr + offs_k.to(tl.int64) * stride_stk + pid_m * stride_stm, st, mask=in_rows)


@triton.jit(do_not_specialize=["M_BUCKET"])
def dual_quant_kernel(
    x_ptr, b_ptr, idx_ptr, w_ptr, y_ptr, s_ptr, yt_ptr, st_ptr,
    M, K, YT_ROWS, M_BUCKET, stride_x, stride_b, up_offset, stride_ym, stride_sm, stride_sk,
    stride_ytk, stride_stk, stride_stm, amax_floor, fp8_max,
    SOURCE: tl.constexpr, TOPK: tl.constexpr, HAS_WEIGHT: tl.constexpr, CHUNK: tl.constexpr,
    ROUND_SCALE: tl.constexpr, GRID_ROUND: tl.constexpr,
):  # fmt: skip
    # Both layouts from one launch. One program = a [128 x 128] block walked in [128 x CHUNK] column
    # chunks: each chunk's column amaxes are complete (all 128 rows), so its transposed tiles are
    # quantized and stored at once while the row amaxes accumulate; a second walk over the same
    # chunks (from the cache: this program just read them) quantizes the rows. A chunk, not the whole
    # block, lives in registers: a [128 x 128] FP32 tile needed 127-254 registers per thread on sm_90.
    pid_m = tl.program_id(0)
    k0 = tl.program_id(1) * 128
    offs_m = pid_m * 128 + tl.arange(0, 128)
    row_amax = tl.zeros([128], dtype=tl.float32)
    row_nan = tl.zeros([128], dtype=tl.int32)
    for c in tl.static_range(0, 128, CHUNK):
        offs_k = k0 + c + tl.arange(0, CHUNK)
        v, raw = _produce(x_ptr, b_ptr, idx_ptr, w_ptr, offs_m, offs_k, M, K, stride_x, stride_b, up_offset,
                          SOURCE, TOPK, HAS_WEIGHT)  # fmt: skip
        nan = (v != v).to(tl.int32)
        absv = tl.abs(v)
        st = _tile_scale(tl.max(absv, 0), tl.max(nan, 0) > 0, amax_floor, fp8_max, ROUND_SCALE)
        yt8 = tl.trans(_quantize(v, st[None, :], fp8_max, GRID_ROUND).to(yt_ptr.dtype.element_ty))
        in_rows = offs_k < YT_ROWS
        tl.store(yt_ptr + offs_k[:, None].to(tl.int64) * stride_ytk + offs_m[None, :], yt8, mask=in_rows[:, None])
        tl.store(st_ptr + offs_k.to(tl.int64) * stride_stk + pid_m * stride_stm, st, mask=in_rows)
        row_amax = tl.maximum(row_amax, tl.max(absv, 1))  # NaN is tracked by row_nan
        row_nan = tl.maximum(row_nan, tl.max(nan, 1))
    s = _tile_scale(row_amax, row_nan > 0, amax_floor, fp8_max, ROUND_SCALE)
    in_m = offs_m < M
    tl.store(s_ptr + offs_m.to(tl.int64) * stride_sm + (k0 // 128) * stride_sk, s, mask=in_m)
    for c in tl.static_range(0, 128, CHUNK):
        offs_k = k0 + c + tl.arange(0, CHUNK)
        v, raw = _produce(x_ptr, b_ptr, idx_ptr, w_ptr, offs_m, offs_k, M, K, stride_x, stride_b, up_offset,
                          SOURCE, TOPK, HAS_WEIGHT)  # fmt: skip
        y = _quantize(v, s[:, None], fp8_max, GRID_ROUND)
        y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_k[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=in_m[:, None])
