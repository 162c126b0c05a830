"""The Triton kernel of coscale.kernels.quant (recipe, layouts and special values: its docstring).

A module of its own, imported on the first launch: ``triton.jit`` decides between the compiler and the
CPU interpreter when it decorates, and the interpreter looks up the helpers a kernel calls among the
module's globals (not in a closure), so helpers and kernel are defined here at module level.

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


@triton.jit
def quant_kernel(
    x_ptr, y_ptr, s_ptr, yt_ptr, st_ptr,
    M, K, Y_ROWS, YT_ROWS,
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
    # WHOLE_TILE: one scale per 128x128 block -> y [Np, Kp], s [Np/128, Kp/128] (W^T's bytes come from
    #   transpose_bytes_kernel below).
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
