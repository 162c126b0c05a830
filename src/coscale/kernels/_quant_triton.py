"""The Triton quantization kernels (recipe, layouts and special values: coscale.kernels.fp8_recipe;
launchers and operators: coscale.kernels.quant_ops and coscale.kernels.fused_quant).

A module of its own, imported on the first launch: ``triton.jit`` decides between the compiler and the
CPU interpreter when it decorates, and the interpreter looks up the helpers a kernel calls among the
module's globals (not in a closure), so helpers and kernel are defined here at module level.

``M_BUCKET`` (a power-of-two bucket of the row count, unused by the code) is an autotuning key: the
launchers tune each kernel's tile shape once per bucket, not once per row count.

Division: the reference's IEEE quotients, never Triton's plain fp32 ``/`` (the approximate
``div.full.f32``, not bit-exact): ``tl.math.div_rn`` (present in triton 3.0 through 3.9 and in the
interpreter) once per tile for the scale and its reciprocal, and per element the reciprocal with one
FMA correction (``_quantize_tile``), which gives the same bits.
"""

import triton
import triton.language as tl

from coscale.kernels.backend import interpreting
from coscale.kernels.swiglu import swiglu_grads, swiglu_value  # SwiGLU's own formulas: the producers write its bytes

# Triton's interpreter casts float32 to bfloat16 by truncation (the GPU rounds to nearest even): where a kernel
# rounds a product that the reference computes with PyTorch (the router weight times a or da), it rounds in
# integers first when interpreted, so that the CPU tests hold the GPU's bytes. Fixed when the module is imported,
# as triton.jit fixes interpreter or compiler then.
INTERPRETED = tl.constexpr(interpreting())


@triton.jit
def _abs_bits(x):
    """|x| (fp32) as int32 bits: ordered as |x| for finite and infinite values, NaN above +inf, so an
    integer max over them is the amax with NaN kept (tl.max on floats drops NaN)."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _scale_from_bits(amax_bits, amax_floor, fp8_max, ROUND_SCALE: tl.constexpr, GRID_ROUND: tl.constexpr):
    """The dequantization scale of each tile from the max of ``_abs_bits`` over it (the reference's
    ``_scale_from_amax``: NaN amax gives a NaN scale).
    amax / fp8_max as RN(amax / fp8_max) in three instructions on the GPU: q0 = RN(amax R) with R = RN(1 / fp8_max),
    then one FMA correction (Markstein), where tl.math.div_rn takes about ten and a branch (sm_90: 15% of a
    producer's transposed launch, which divides once a column). For E4M3's 448 and E5M2's 57344 (the same
    mantissa) this is the IEEE quotient for every float32 amax from the floor to the largest, checked over every
    mantissa (tests/test_quant.py); inf is kept apart (its correction would be inf - inf). The interpreter's
    FMA rounds twice, so it divides."""
    amax = amax_bits.to(tl.float32, bitcast=True)
    amax = tl.where(amax < amax_floor, amax_floor, amax)  # NaN < floor is false: NaN kept
    if GRID_ROUND:
        s = tl.math.div_rn(amax, fp8_max)
    else:
        inv = tl.math.div_rn(1.0, fp8_max)  # a scalar: once a program
        q0 = amax * inv
        s = tl.fma(tl.fma(q0, -fp8_max, amax), inv, q0)
        s = tl.where(amax == float("inf"), amax, s)
    if ROUND_SCALE:  # UE8M0: 2^ceil(log2 s) on the bits, finite scales only
        bits = s.to(tl.int32, bitcast=True)
        expo = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        s = tl.where(s - s == 0, (expo << 23).to(tl.float32, bitcast=True), s)
    return s


@triton.jit
def _divisor(s):
    """(r, d) per tile for ``_quantize_tile``: r = RN(1 / s) (0 for s = inf) and the divisor d of the
    residual (s, or 0 where s = inf, so that x * 0 + residual stays x / inf = +-0 and inf / inf NaN)."""
    r = tl.math.div_rn(tl.zeros_like(s) + 1.0, s)
    d = tl.where(s == float("inf"), 0.0, s)
    return r, d


@triton.jit
def _quantize_tile(x, r, d, fp8_max, GRID_ROUND: tl.constexpr):
    """RN(x / s) from the tile's (r, d) = ``_divisor(s)``, ready for the E4M3 cast (the caller broadcasts
    r and d to x's shape): q0 = RN(x r), the residual fma(q0, d, -x) and one correction
    fma(residual, -r, q0), the reciprocal-based division of Markstein. With r the correctly rounded
    reciprocal, q0 is within about 1.5 ulp of x / s; the residual is then not always exact (about 2% of
    adversarial pairs), so the textbook proof does not cover every case, but the corrected quotient
    equals RN(x / s): checked by tests/test_quant.py's exact emulation of the two FMAs against IEEE
    division (random and near-tie pairs) and on the GPU bit for bit against the reference
    (benchmarks/bench_quant.py, the GPU tests). Quotients so small that the theorem's no-underflow condition fails
    (|x / s| < 2^-100) are 0 in E4M3 either way, and the residual is formed as q0 s - x so that -0
    stays -0. |x / s| <= 448 (1 + 2^-23) since |x| <= amax, so no saturation is needed: on the GPU the
    cast (cvt.rn.satfinite) rounds to 448.
    Interpreter (GRID_ROUND): its FMA rounds twice, so the two steps are computed in float64 (the
    residual exactly), then rounded onto the E4M3 grid as in ``_quantize``."""
    q0 = x * r
    if GRID_ROUND:
        q64 = q0.to(tl.float64)
        nrem = (q64 * d.to(tl.float64) - x.to(tl.float64)).to(tl.float32)
        y = (q64 - nrem.to(tl.float64) * r.to(tl.float64)).to(tl.float32)
        y = tl.where(y > fp8_max, fp8_max, y)  # (never taken; the interpreter's cast does not saturate)
        y = tl.where(y < -fp8_max, -fp8_max, y)
        expo = (y.to(tl.int32, bitcast=True) >> 23) & 0xFF
        expo = tl.where(expo < 121, 121, expo)
        magic = (((expo + 20) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
        rr = (y + magic) - magic
        y = tl.where(rr == 0, y * 0.0, rr)
    else:
        nrem = tl.fma(q0, d, -x)
        # r * -1, not -r: Triton's unary minus is 0 - r, which is +0 for r = +0 (a tile holding an
        # infinity, s = inf), and then a negative x gave +0 where x / inf is -0 (found on the H200, run 31;
        # the interpreter's float64 path above never took this line)
        y = tl.fma(nrem, r * -1.0, q0)
    return y


# ----------------------------------------------------------------------------------------------------
# Standalone quantization (coscale.kernels.quant_ops): any strides along rows and columns
# ----------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["M_BUCKET"])
def rows_kernel(
    x_ptr, y_ptr, s_ptr, M, K, NT, M_BUCKET, stride_xm, stride_xk, stride_ym, stride_sm, stride_sk,
    amax_floor, fp8_max,
    BLOCK_M: tl.constexpr, TILES: tl.constexpr, ROUND_SCALE: tl.constexpr, GRID_ROUND: tl.constexpr,
):  # fmt: skip
    # 1x128 tiles along K: y [M, NT*128] e4m3, s [M, NT]. One program = BLOCK_M rows x TILES tiles,
    # loaded as one [BLOCK_M, TILES, 128] block (16-byte loads along K, every load issued before any
    # reduction), one amax per (row, tile).
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tiles = tl.program_id(1) * TILES + tl.arange(0, TILES)
    offs_k = tiles[None, :, None] * 128 + tl.arange(0, 128)[None, None, :]  # [1, TILES, 128]
    rows = offs_m[:, None, None].to(tl.int64)
    in_m = offs_m < M
    x = tl.load(x_ptr + rows * stride_xm + offs_k * stride_xk, mask=in_m[:, None, None] & (offs_k < K),
                other=0.0).to(tl.float32)  # fmt: skip
    _rows_tiles_out(x, offs_m, in_m, tiles, tiles < NT, y_ptr, s_ptr, stride_ym, stride_sm, stride_sk, amax_floor,
                    fp8_max, ROUND_SCALE, GRID_ROUND)  # fmt: skip


@triton.jit
def _cols_quarter(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk, j):
    """Tokens 4i + j (i < 32) of a 128-token tile, columns offs_k: [32, BLOCK_K] in fp32."""
    rows = offs_m * 4 + j
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    return tl.load(x_ptrs, mask=(rows < M)[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _byte(y, fp8_dtype: tl.constexpr, shift: tl.constexpr):
    """The E4M3 bits of y, as an int32 shifted left by ``shift``."""
    return y.to(fp8_dtype).to(tl.uint8, bitcast=True).to(tl.int32) << shift


@triton.jit
def _pack4(y0, y1, y2, y3, f8: tl.constexpr, GRID_ROUND: tl.constexpr):
    """The E4M3 bytes of four same-shaped fp32 tiles (already rounded: _quantize_tile) packed into int32
    words, y0's byte lowest (the byte order of four consecutive bytes in memory)."""
    if GRID_ROUND:  # the interpreter (it runs no PTX): the E4M3 casts' bits, shifted into place
        return _byte(y0, f8, 0) | _byte(y1, f8, 8) | _byte(y2, f8, 16) | _byte(y3, f8, 24)
    # The cast Triton's E4M3 conversion lowers to (cvt.rn.satfinite, two values an instruction), written
    # straight into the word: Triton's own byte extraction and shifts from the packed pairs (F2FP + PRMT)
    # wrote wrong bytes on the H200 at 32 x 1, 64 x 2 and 128 x 4 warps (cols_kernel, run 31).
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; "
        "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; mov.b32 $0, {lo, hi}; }",
        "=r,f,f,f,f", [y0, y1, y2, y3], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _rows_tiles_out(v, offs_m, in_m, tiles, in_t, y_ptr, s_ptr, stride_ym, stride_sm, stride_sk, amax_floor, fp8_max,
                    ROUND_SCALE: tl.constexpr, GRID_ROUND: tl.constexpr):  # fmt: skip
    """v [BLOCK_M, TILES, 128] (rows offs_m, 1x128 column tiles ``tiles``) quantized into y and its scales into s,
    where in_m (rows) and in_t (tiles) hold."""
    s = _scale_from_bits(tl.max(_abs_bits(v), 2), amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)  # [BLOCK_M, TILES]
    r, d = _divisor(s)
    y = _quantize_tile(v, r[:, :, None], d[:, :, None], fp8_max, GRID_ROUND)
    offs_k = tiles[None, :, None] * 128 + tl.arange(0, 128)[None, None, :]
    tl.store(y_ptr + offs_m[:, None, None].to(tl.int64) * stride_ym + offs_k, y.to(y_ptr.dtype.element_ty),
             mask=in_m[:, None, None] & in_t[None, :, None])  # fmt: skip
    tl.store(s_ptr + offs_m[:, None].to(tl.int64) * stride_sm + tiles[None, :] * stride_sk, s,
             mask=in_m[:, None] & in_t[None, :])  # fmt: skip


@triton.jit
def _cols_words_out(v0, v1, v2, v3, offs_w, offs_k, ok, pid_m, yt_ptr, st_ptr, stride_ytk, stride_stk, stride_stm,
                    amax_floor, fp8_max, ROUND_SCALE: tl.constexpr, GRID_ROUND: tl.constexpr):  # fmt: skip
    """A 128-row tile as quarters v_j [32, BLOCK_K] (v_j holds rows 4i + j, columns offs_k) in the transposed
    layout: one scale a column, the FP8 bytes of rows 4i..4i+3 packed into word i of yt row offs_k (PACK4),
    stored where ok."""
    amax = tl.max(tl.maximum(tl.maximum(_abs_bits(v0), _abs_bits(v1)), tl.maximum(_abs_bits(v2), _abs_bits(v3))),
                  0)  # one reduction over the tile's rows, not four
    st = _scale_from_bits(amax, amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)  # [BLOCK_K]
    r, d = _divisor(st)
    r, d = r[None, :], d[None, :]
    words = _pack4(_quantize_tile(v0, r, d, fp8_max, GRID_ROUND), _quantize_tile(v1, r, d, fp8_max, GRID_ROUND),
                   _quantize_tile(v2, r, d, fp8_max, GRID_ROUND), _quantize_tile(v3, r, d, fp8_max, GRID_ROUND),
                   yt_ptr.dtype.element_ty, GRID_ROUND)  # fmt: skip
    yt_words = yt_ptr.to(tl.pointer_type(tl.int32), bitcast=True)  # rows of Mp bytes, Mp % 128 == 0
    tl.store(yt_words + offs_k[:, None].to(tl.int64) * (stride_ytk // 4) + offs_w[None, :], tl.trans(words),
             mask=ok[:, None])  # fmt: skip
    tl.store(st_ptr + offs_k.to(tl.int64) * stride_stk + pid_m * stride_stm, st, mask=ok)


@triton.jit
def _cols_bytes_out(v, offs_m, offs_k, ok, pid_m, yt_ptr, st_ptr, stride_ytk, stride_stk, stride_stm, amax_floor,
                    fp8_max, ROUND_SCALE: tl.constexpr, GRID_ROUND: tl.constexpr):  # fmt: skip
    """A [128, BLOCK_K] tile (rows offs_m, columns offs_k) in the transposed layout, byte by byte: one scale a
    column, the FP8 tile transposed into yt rows offs_k, stored where ok."""
    st = _scale_from_bits(tl.max(_abs_bits(v), 0), amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)  # [BLOCK_K]
    r, d = _divisor(st)
    yt8 = tl.trans(_quantize_tile(v, r[None, :], d[None, :], fp8_max, GRID_ROUND).to(yt_ptr.dtype.element_ty))
    tl.store(yt_ptr + offs_k[:, None].to(tl.int64) * stride_ytk + offs_m[None, :], yt8, mask=ok[:, None])
    tl.store(st_ptr + offs_k.to(tl.int64) * stride_stk + pid_m * stride_stm, st, mask=ok)


@triton.jit(do_not_specialize=["M_BUCKET"])
def cols_kernel(
    x_ptr, yt_ptr, st_ptr, M, K, YT_ROWS, M_BUCKET, stride_xm, stride_xk, stride_ytk, stride_stk, stride_stm,
    amax_floor, fp8_max,
    BLOCK_K: tl.constexpr, GROUPS: tl.constexpr, ROUND_SCALE: tl.constexpr, GRID_ROUND: tl.constexpr,
    PACK4: tl.constexpr,
):  # fmt: skip
    # x^T in 1x128 tiles along M: yt [YT_ROWS, Mp] e4m3, st [YT_ROWS, Mp/128] (rows K..YT_ROWS-1 zeros).
    # One program = GROUPS tiles of [128 tokens x BLOCK_K columns] one after another, each loaded along K;
    # the FP8 tile is transposed in registers so that yt is stored along the tokens, 128 bytes per row.
    # The loop lets Triton's pipeliner load the next tile while this one is reduced and transposed.
    # PACK4: the transpose moves 32-bit words instead of bytes. Transposing the FP8 tile took one
    # byte-wide shared-memory store or load per element (STS.U8 / LDS.U8 in sm_90 compiles), and at
    # about 22 instructions an element the kernel was issue-bound (63% of copy bandwidth on the H200;
    # with PACK4, 71% at 4 warps a tile and 82% at one warp, 32 columns: run 31).
    # With PACK4 the tile is loaded as four [32, BLOCK_K] quarters, quarter j holding tokens 4i + j, so
    # that one thread holds tokens 4i..4i+3 of a column at the same register position; their four E4M3
    # bytes are packed into one int32 (token 4i in the low byte: yt's byte order), and the [32, BLOCK_K]
    # words are transposed and stored as whole words.
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_rows = offs_k < YT_ROWS
    for g in tl.range(GROUPS, num_stages=3):
        pid_m = tl.program_id(0) * GROUPS + g
        live = (tl.zeros([BLOCK_K], tl.int32) + pid_m * 128) < M  # the last program's tiles may lie past the end
        if PACK4:
            offs_w = pid_m * 32 + tl.arange(0, 32)  # word i of the tile: tokens 4i..4i+3
            x0 = _cols_quarter(x_ptr, offs_w, offs_k, M, K, stride_xm, stride_xk, 0)
            x1 = _cols_quarter(x_ptr, offs_w, offs_k, M, K, stride_xm, stride_xk, 1)
            x2 = _cols_quarter(x_ptr, offs_w, offs_k, M, K, stride_xm, stride_xk, 2)
            x3 = _cols_quarter(x_ptr, offs_w, offs_k, M, K, stride_xm, stride_xk, 3)
            _cols_words_out(x0, x1, x2, x3, offs_w, offs_k, in_rows & live, pid_m, yt_ptr, st_ptr, stride_ytk,
                            stride_stk, stride_stm, amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)  # fmt: skip
        else:
            offs_m = pid_m * 128 + tl.arange(0, 128)
            x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
            x = tl.load(x_ptrs, mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
            _cols_bytes_out(x, offs_m, offs_k, in_rows & live, pid_m, yt_ptr, st_ptr, stride_ytk, stride_stk,
                            stride_stm, amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)  # fmt: skip


@triton.jit
def _store_rows(y_rows, rows, y, f8: tl.constexpr, stride_ym, Y_ROWS, in_k):
    """y (rounded fp32, [R, 128]) cast to E4M3 into rows ``rows`` of y_rows (a [1, 128] block of pointers)."""
    tl.store(y_rows + rows[:, None].to(tl.int64) * stride_ym, y.to(f8), mask=(rows < Y_ROWS)[:, None] & in_k[None, :])


@triton.jit(do_not_specialize=["M_BUCKET"])
def weight_kernel(
    x_ptr, y_ptr, s_ptr, st_ptr, yt_ptr, M, K, Y_ROWS, M_BUCKET,
    stride_xb, stride_xm, stride_xk, stride_yb, stride_ym, stride_sb, stride_sm, stride_sk,
    stride_stb, stride_stk, stride_stm, stride_ytb, stride_ytk, amax_floor, fp8_max,
    GROUPS: tl.constexpr, TRANSPOSED_SCALES: tl.constexpr, WT: tl.constexpr, ROUND_SCALE: tl.constexpr,
    GRID_ROUND: tl.constexpr,
):  # fmt: skip
    # One scale per 128x128 block: y [Np, Kp] (rows < Y_ROWS), s [Np/128, Kp/128] and, with
    # TRANSPOSED_SCALES, W^T's scales st [Kp/128, Np/128] (the same numbers). One program = GROUPS blocks
    # along K, one after another (the loop lets Triton's pipeliner load the next block during this one's
    # reduction); batch index program_id(2).
    # WT: W^T's bytes too, yt [Kp, Np] (a block of W^T is W's block transposed, with the same scale), from
    # the same registers: the block is loaded as four [32, 128] quarters, quarter j holding rows 4i + j, so
    # that one thread holds rows 4i..4i+3 of a column; their four E4M3 bytes make one word of yt's row
    # (cols_kernel's PACK4), and the [32, 128] words are transposed and stored whole. W is read once; the
    # separate byte transpose (transpose_bytes_kernel) read and wrote the FP8 bytes again.
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(2).to(tl.int64)
    for g in tl.range(GROUPS, num_stages=3):
        pid_k = tl.program_id(1) * GROUPS + g
        live = pid_k * 128 < K  # the last program's blocks may lie past the end
        offs_k = pid_k * 128 + tl.arange(0, 128)
        in_k = offs_k < tl.cdiv(K, 128) * 128
        if WT:
            offs_w = pid_m * 32 + tl.arange(0, 32)  # word i of a yt row: rows 4i..4i+3 of the block
            x0 = _cols_quarter(x_ptr + pid_b * stride_xb, offs_w, offs_k, M, K, stride_xm, stride_xk, 0)
            x1 = _cols_quarter(x_ptr + pid_b * stride_xb, offs_w, offs_k, M, K, stride_xm, stride_xk, 1)
            x2 = _cols_quarter(x_ptr + pid_b * stride_xb, offs_w, offs_k, M, K, stride_xm, stride_xk, 2)
            x3 = _cols_quarter(x_ptr + pid_b * stride_xb, offs_w, offs_k, M, K, stride_xm, stride_xk, 3)
            amax = tl.maximum(tl.maximum(_abs_bits(x0), _abs_bits(x1)), tl.maximum(_abs_bits(x2), _abs_bits(x3)))
            s = _scale_from_bits(tl.max(tl.max(amax, 1), 0), amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)  # a scalar
            r, d = _divisor(s)
            y0 = _quantize_tile(x0, r, d, fp8_max, GRID_ROUND)
            y1 = _quantize_tile(x1, r, d, fp8_max, GRID_ROUND)
            y2 = _quantize_tile(x2, r, d, fp8_max, GRID_ROUND)
            y3 = _quantize_tile(x3, r, d, fp8_max, GRID_ROUND)
            f8: tl.constexpr = y_ptr.dtype.element_ty
            # W's rows: quarter j holds rows 4i + j (the casts along K: two values an instruction)
            y_rows = y_ptr + pid_b * stride_yb + offs_k[None, :]
            _store_rows(y_rows, offs_w * 4 + 0, y0, f8, stride_ym, Y_ROWS, in_k)
            _store_rows(y_rows, offs_w * 4 + 1, y1, f8, stride_ym, Y_ROWS, in_k)
            _store_rows(y_rows, offs_w * 4 + 2, y2, f8, stride_ym, Y_ROWS, in_k)
            _store_rows(y_rows, offs_w * 4 + 3, y3, f8, stride_ym, Y_ROWS, in_k)
            words = _pack4(y0, y1, y2, y3, f8, GRID_ROUND)  # [32, 128]: the same casts, packed down the rows
            yt_words = yt_ptr.to(tl.pointer_type(tl.int32), bitcast=True)  # rows of Np bytes, Np % 128 == 0
            yt_ptrs = (yt_words + pid_b * (stride_ytb // 4) + offs_k[:, None].to(tl.int64) * (stride_ytk // 4)
                       + offs_w[None, :])
            tl.store(yt_ptrs, tl.trans(words), mask=in_k[:, None])
        else:
            offs_m = pid_m * 128 + tl.arange(0, 128)
            x_ptrs = (x_ptr + pid_b * stride_xb + offs_m[:, None].to(tl.int64) * stride_xm
                      + offs_k[None, :] * stride_xk)
            x = tl.load(x_ptrs, mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
            s = _scale_from_bits(tl.max(tl.max(_abs_bits(x), 1), 0), amax_floor, fp8_max, ROUND_SCALE,
                                 GRID_ROUND)  # a scalar
            r, d = _divisor(s)
            y8 = _quantize_tile(x, r, d, fp8_max, GRID_ROUND).to(y_ptr.dtype.element_ty)
            y_ptrs = y_ptr + pid_b * stride_yb + offs_m[:, None].to(tl.int64) * stride_ym + offs_k[None, :]
            tl.store(y_ptrs, y8, mask=(offs_m < Y_ROWS)[:, None] & in_k[None, :])
        tl.store(s_ptr + pid_b * stride_sb + pid_m * stride_sm + pid_k * stride_sk, s, mask=live)
        if TRANSPOSED_SCALES:
            tl.store(st_ptr + pid_b * stride_stb + pid_k * stride_stk + pid_m * stride_stm, s, mask=live)


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


@triton.jit
def _prmt_bytes(w0, w1, w2, w3, SELECT: tl.constexpr):
    """PTX prmt: (byte m of w0, of w1) and (of w2, of w3) into halves, then joined; SELECT picks byte m of a
    and of b (m | (4 + m) << 4: selector nibble k names byte k of the result among {b, a})."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t0, t1; prmt.b32 t0, $1, $2, " + SELECT + "; prmt.b32 t1, $3, $4, " + SELECT
        + "; prmt.b32 $0, t0, t1, 0x5410; }", "=r,r,r,r,r", [w0, w1, w2, w3], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _bytes_m(w0, w1, w2, w3, m: tl.constexpr, ASM: tl.constexpr):
    """One word of byte m of each of w0..w3 (w0's in the low byte): a column of a 4 x 4 byte block."""
    if ASM:  # three byte permutes an output word
        if m == 0:
            return _prmt_bytes(w0, w1, w2, w3, "0x40")
        elif m == 1:
            return _prmt_bytes(w0, w1, w2, w3, "0x51")
        elif m == 2:
            return _prmt_bytes(w0, w1, w2, w3, "0x62")
        else:
            return _prmt_bytes(w0, w1, w2, w3, "0x73")
    return (((w0 >> (8 * m)) & 0xFF) | (((w1 >> (8 * m)) & 0xFF) << 8) | (((w2 >> (8 * m)) & 0xFF) << 16)
            | ((w3 >> (8 * m)) << 24))


@triton.jit
def transpose_words_kernel(
    x_ptr, y_ptr, R, C, stride_xb, stride_xr, stride_yb, stride_yc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    # transpose_bytes_kernel's y[b, c, r] = x[b, r, c] through 32-bit words (R and C multiples of 4, strides in
    # words): four rows' words (rows 4i..4i+3, columns 4k..4k+3 each) make four output words (rows 4k+m of
    # y, its word i: byte m of each), then the [BLOCK_R/4, BLOCK_C/4] word tiles are transposed. The byte
    # kernel moved single bytes through shared memory (the bf16 weight pair at 72-74% of copy, run 31).
    pid_b = tl.program_id(2).to(tl.int64)
    offs_i = tl.program_id(0) * (BLOCK_R // 4) + tl.arange(0, BLOCK_R // 4)
    offs_k = tl.program_id(1) * (BLOCK_C // 4) + tl.arange(0, BLOCK_C // 4)
    mask = (offs_i < R // 4)[:, None] & (offs_k < C // 4)[None, :]
    xw = x_ptr + pid_b * stride_xb + offs_k[None, :]
    rows = 4 * offs_i[:, None].to(tl.int64)
    w0 = tl.load(xw + rows * stride_xr, mask=mask)
    w1 = tl.load(xw + (rows + 1) * stride_xr, mask=mask)
    w2 = tl.load(xw + (rows + 2) * stride_xr, mask=mask)
    w3 = tl.load(xw + (rows + 3) * stride_xr, mask=mask)
    yw = y_ptr + pid_b * stride_yb + offs_i[None, :]
    cols = 4 * offs_k[:, None].to(tl.int64)
    for m in tl.static_range(4):
        tl.store(yw + (cols + m) * stride_yc, tl.trans(_bytes_m(w0, w1, w2, w3, m, ASM)), mask=tl.trans(mask))


# ----------------------------------------------------------------------------------------------------
# Quantization fused into the kernel that produces its input (coscale.kernels.fused_quant)
# ----------------------------------------------------------------------------------------------------
# SOURCE says how the [rows x cols] tile of the matrix to quantize is produced, in FP32 and rounded to
# the dtype the unfused producer would have stored (so the FP8 bytes equal those of quantizing that
# stored tensor):
#   0  x [M, K] itself
#   1  SwiGLU: a[:, j] = silu(g) * u with g = x[:, j], u = x[:, up_offset + j]   (x = [gate | up]); with
#      HAS_WEIGHT each row r times w[r] (a rounded to x's dtype first, the product again: the router weight
#      applied before the down projection, coscale.kernels.fp8_moe)
#   2  SwiGLU backward: columns j < up_offset are dg, j >= up_offset du (of column j - up_offset), from
#      x = [gate | up] and da = b [M, up_offset]; with HAS_WEIGHT the gradient of row r is w[r] * da (rounded to
#      x's dtype, as autograd's product would store it) and TILE_DOT (rows launches, PAIRED) also writes the
#      router weight's gradient in parts: dot_out[r, t] = sum over gate tile t of da * a (a as SOURCE 1 makes
#      it, unweighted). PAIRED (up_offset a multiple of 128, so that no 1x128 tile
#      holds both): a program takes gate columns j only and writes dg at j and du at up_offset + j from the
#      same loads and sigmoid. Unpaired, every element loaded g, u and da and computed both gradients for the
#      one it kept, and the kernels were bound by instructions (sm_90 compiles: 43 an element for the rows
#      layout, 54 for the transposed one; ncu, run 37: SM throughput 72-83%, DRAM 48-57%).
#   3  gather: row r is x[row_pair[r] // TOPK] (zeros where row_pair[r] < 0), times w[row_pair[r]] when
#      HAS_WEIGHT (rounded to x's dtype, as the permutation kernels store it)
# (w is indexed by row for SOURCE 1 and 2, by pair for SOURCE 3.)


@triton.jit
def _row_block_and_column_block(SOURCE: tl.constexpr, ROW_ORDER: tl.constexpr):
    """(row block, column block) of this program in a producer launch over a (row blocks, column blocks) grid.
    The GPU starts programs in the order of program_id(0) first. A gathered source keeps that order, column
    block by column block: one column slice of the token rows (1 MB at DeepSeek-V3's 8,192 x 7,168) stays in
    L2 while every permuted copy of each token (top-k of them) reads it. With ROW_ORDER the others take the
    same programs row block by row block: SwiGLU's backward reads gate, up and da for the dg tile of column j
    and again for the du tile of column j + I, and in column order those two programs started a whole column
    of row blocks apart, so the second read came from DRAM (ncu, run 36: L2 hit 18%; row order, run 37: 45%;
    its two launches at DeepSeek-V3's experts 0.99 -> 0.85 ms, SwiGLU's 0.41 -> 0.38)."""
    if SOURCE == 3 or not ROW_ORDER:
        pid_m = tl.program_id(0)
        pid_c = tl.program_id(1)
    else:
        order = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        pid_m = order // tl.num_programs(1)
        pid_c = order % tl.num_programs(1)
    return pid_m, pid_c


@triton.jit
def _times_rounded(x, w, dtype: tl.constexpr):
    """x * w (float32) rounded to ``dtype`` to nearest even, as float32 (see INTERPRETED)."""
    p = x * w
    if INTERPRETED and dtype == tl.bfloat16:  # infinities keep their bits, a carry past the top gives inf; a NaN
        b = p.to(tl.int32, bitcast=True)  # with low payload bits could carry into inf or wrap: NaN stays as is
        p = tl.where(p != p, p, ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True))
    return p.to(dtype).to(tl.float32)


@triton.jit
def _row_weight(w_ptr, rows, M):
    """w[rows] (SOURCE 1 and 2's per-row router weights), shaped like rows; 0 past the last row."""
    return tl.load(w_ptr + rows, mask=rows < M, other=0.0)


@triton.jit
def _swiglu_inputs(x_ptr, b_ptr, w_ptr, rows, cols, M, I, stride_x, stride_b, HAS_WEIGHT: tl.constexpr):
    """(g, u, da as stored, the gradient reaching a) in float32 at gate columns ``cols`` (< I) of rows ``rows``
    (broadcastable): x holds [gate | up] (up at column I), b the gradient da [M, I]; with HAS_WEIGHT the gradient
    reaching a is w[row] * da rounded to x's dtype (a was weighted in the forward: SOURCE 1)."""
    mask = (rows < M) & (cols < I)
    r64 = rows.to(tl.int64)
    g = tl.load(x_ptr + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + r64 * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    da = tl.load(b_ptr + r64 * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        return g, u, da, _times_rounded(da, _row_weight(w_ptr, rows, M), x_ptr.dtype.element_ty)
    return g, u, da, da


@triton.jit
def _swiglu_grads(x_ptr, b_ptr, w_ptr, rows, cols, M, I, stride_x, stride_b, HAS_WEIGHT: tl.constexpr,
                  FAST_SIGMOID: tl.constexpr):  # fmt: skip
    """(dg, du) of SwiGLU's backward at gate columns ``cols`` (< I) of rows ``rows`` (broadcastable), each rounded
    to x's dtype as kernels.swiglu's backward kernel stores it (its formulas: swiglu_grads); the inputs as
    _swiglu_inputs reads them."""
    g, u, _, da = _swiglu_inputs(x_ptr, b_ptr, w_ptr, rows, cols, M, I, stride_x, stride_b, HAS_WEIGHT)
    dg, du = swiglu_grads(g, u, da, FAST_SIGMOID)
    return dg.to(x_ptr.dtype.element_ty).to(tl.float32), du.to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _swiglu_grads_dot(x_ptr, b_ptr, w_ptr, rows, cols, M, I, stride_x, stride_b, HAS_WEIGHT: tl.constexpr,
                      FAST_SIGMOID: tl.constexpr):  # fmt: skip
    """_swiglu_grads and, elementwise, da * a (a = silu(g) * u rounded to x's dtype, as SOURCE 1 makes it before
    weighting): the terms of the router weight's gradient <da, a>."""
    g, u, da_raw, da = _swiglu_inputs(x_ptr, b_ptr, w_ptr, rows, cols, M, I, stride_x, stride_b, HAS_WEIGHT)
    dg, du = swiglu_grads(g, u, da, FAST_SIGMOID)
    a = swiglu_value(g, u, FAST_SIGMOID).to(x_ptr.dtype.element_ty).to(tl.float32)
    return dg.to(x_ptr.dtype.element_ty).to(tl.float32), du.to(x_ptr.dtype.element_ty).to(tl.float32), da_raw * a


@triton.jit
def _produce(
    x_ptr, b_ptr, idx_ptr, w_ptr, rows, cols, M, K, stride_x, stride_b, up_offset,
    SOURCE: tl.constexpr, TOPK: tl.constexpr, HAS_WEIGHT: tl.constexpr, FAST_SIGMOID: tl.constexpr,
):  # fmt: skip
    """(the block in FP32, the unweighted source values): see the SOURCE table above. ``rows`` and
    ``cols`` are the block's row and column indices, broadcastable against each other ([R, 1] and
    [1, C] for a 2-D block, [R, 1, 1] and [1, T, 128] for tiles): the block is their broadcast shape."""
    in_m = rows < M
    mask = in_m & (cols < K)
    r64 = rows.to(tl.int64)
    if SOURCE == 0:
        v = tl.load(x_ptr + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        raw = v
    elif SOURCE == 1:
        g = tl.load(x_ptr + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + r64 * stride_x + up_offset + cols, mask=mask, other=0.0).to(tl.float32)
        v = swiglu_value(g, u, FAST_SIGMOID).to(x_ptr.dtype.element_ty).to(tl.float32)  # as kernels.swiglu stores a
        if HAS_WEIGHT:  # as a * w would be stored
            v = _times_rounded(v, _row_weight(w_ptr, rows, M), x_ptr.dtype.element_ty)
        raw = v
    elif SOURCE == 2:
        is_up = cols >= up_offset
        dg, du = _swiglu_grads(x_ptr, b_ptr, w_ptr, rows, tl.where(is_up, cols - up_offset, cols), M, up_offset,
                               stride_x, stride_b, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
        v = tl.where(is_up, du, dg)
        raw = v
    else:
        src_rows, valid, safe, w = _gather_rows(idx_ptr, w_ptr, rows, M, stride_x, TOPK, HAS_WEIGHT)
        v, raw = _gather_values(x_ptr, src_rows, valid, w, cols, K, HAS_WEIGHT)
    return v, raw


@triton.jit
def _produce_quarters(x_ptr, b_ptr, idx_ptr, w_ptr, offs_w, offs_k, M, K, stride_x, stride_b, up_offset,
                      SOURCE: tl.constexpr, TOPK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                      FAST_SIGMOID: tl.constexpr):  # fmt: skip
    """A 128-row tile as PACK4's four quarters [32, C]: quarter j holds rows 4i + j (i = offs_w), columns offs_k."""
    rows = offs_w * 4
    v0, _ = _produce(x_ptr, b_ptr, idx_ptr, w_ptr, rows[:, None], offs_k[None, :], M, K, stride_x, stride_b, up_offset,
                     SOURCE, TOPK, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
    v1, _ = _produce(x_ptr, b_ptr, idx_ptr, w_ptr, (rows + 1)[:, None], offs_k[None, :], M, K, stride_x, stride_b,
                     up_offset, SOURCE, TOPK, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
    v2, _ = _produce(x_ptr, b_ptr, idx_ptr, w_ptr, (rows + 2)[:, None], offs_k[None, :], M, K, stride_x, stride_b,
                     up_offset, SOURCE, TOPK, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
    v3, _ = _produce(x_ptr, b_ptr, idx_ptr, w_ptr, (rows + 3)[:, None], offs_k[None, :], M, K, stride_x, stride_b,
                     up_offset, SOURCE, TOPK, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
    return v0, v1, v2, v3


@triton.jit
def _gather_rows(idx_ptr, w_ptr, rows, M, stride_x, TOPK: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """SOURCE 3's rows ``rows``: (the offsets of their token rows in x, whether a row is a real pair (not padding),
    its pair index (0 on padding), its router weight (1 without HAS_WEIGHT, unused)), each shaped like rows.
    Offsets, not pointers: Inductor's analysis of which arguments a kernel writes follows an address through a
    helper's call to the pointers the helper took (tests/test_custom_ops.py)."""
    pair = tl.load(idx_ptr + rows, mask=rows < M, other=-1)
    valid = pair >= 0
    safe = tl.where(valid, pair, 0)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + safe, mask=valid, other=0.0)
    else:
        w = tl.where(valid, 1.0, 1.0)
    return (safe // TOPK).to(tl.int64) * stride_x, valid, safe, w


@triton.jit
def _gather_values(x_ptr, src_rows, valid, w, cols, K, HAS_WEIGHT: tl.constexpr):
    """(the gathered block in FP32, weighted and rounded to x's dtype as kernels.permute stores it; unweighted)."""
    raw = tl.load(x_ptr + src_rows + cols, mask=valid & (cols < K), other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        return (raw * w).to(x_ptr.dtype.element_ty).to(tl.float32), raw
    return raw, raw


@triton.jit(do_not_specialize=["M_BUCKET"])
def rows_quant_kernel(
    x_ptr, b_ptr, idx_ptr, w_ptr, dot_ptr, dot_out_ptr, y_ptr, s_ptr,
    M, K, KP, M_BUCKET, stride_x, stride_b, up_offset, stride_dot, stride_ym, stride_sm, stride_sk,
    amax_floor, fp8_max,
    SOURCE: tl.constexpr, TOPK: tl.constexpr, HAS_WEIGHT: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, TILES: tl.constexpr, ROUND_SCALE: tl.constexpr, GRID_ROUND: tl.constexpr,
    ROW_ORDER: tl.constexpr = True, PAIRED: tl.constexpr = False, FAST_SIGMOID: tl.constexpr = False,
    TILE_DOT: tl.constexpr = False,
):  # fmt: skip
    # One program = BLOCK_M rows x TILES 128-wide column tiles (which: _row_block_and_column_block): y [M, KP]
    # e4m3 and s [M, KP/128] (1x128 tiles along the columns), the block produced and quantized whole,
    # [BLOCK_M, TILES, 128], as rows_kernel does (all loads issued before any reduction: a bandwidth-bound
    # pass needs them in flight; walking the tiles one by one reached 28-32% of copy bandwidth on the
    # H200). DOT (the combine's backward): also dot_out[row_pair[r]] = <dot[r], unweighted source row>,
    # summed over the whole row, so one program walks all KP columns tile by tile (the launcher gives one
    # group).
    pid_m, pid_t = _row_block_and_column_block(SOURCE, ROW_ORDER)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < M
    if DOT:  # the combine's backward (a gather): the rows' pairs, token rows and weights read once, not a tile
        src_rows, valid, _, w = _gather_rows(idx_ptr, w_ptr, offs_m, M, stride_x, TOPK, HAS_WEIGHT)
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, KP, 128):
            offs_k = k0 + tl.arange(0, 128)
            v, raw = _gather_values(x_ptr, src_rows[:, None], valid[:, None], w[:, None], offs_k[None, :], K,
                                    HAS_WEIGHT)  # fmt: skip
            s = _scale_from_bits(tl.max(_abs_bits(v), 1), amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)
            r, d = _divisor(s)
            y = _quantize_tile(v, r[:, None], d[:, None], fp8_max, GRID_ROUND)
            y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_k[None, :]
            tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=in_m[:, None])
            tl.store(s_ptr + offs_m.to(tl.int64) * stride_sm + (k0 // 128) * stride_sk, s, mask=in_m)
            d_mask = in_m[:, None] & (offs_k < K)[None, :]
            d = tl.load(dot_ptr + offs_m[:, None].to(tl.int64) * stride_dot + offs_k[None, :], mask=d_mask,
                        other=0.0)  # fmt: skip
            acc += tl.sum(d.to(tl.float32) * raw, 1)
        # the pairs loaded again here, not taken from _gather_rows: Inductor's analysis follows a store's address
        # through a helper's call to every pointer the helper took, and would take idx and w for written
        pair = tl.load(idx_ptr + offs_m, mask=in_m, other=-1)
        tl.store(dot_out_ptr + tl.where(pair >= 0, pair, 0), acc, mask=pair >= 0)
    elif PAIRED:  # SwiGLU's backward: the gate tiles ``tiles`` give dg there and du up_offset columns on
        tiles = pid_t * TILES + tl.arange(0, TILES)
        offs_k = tiles[None, :, None] * 128 + tl.arange(0, 128)[None, None, :]  # [1, TILES, 128]
        in_t = tiles < up_offset // 128
        if TILE_DOT:  # the router weight's gradient, a part a gate tile: dot_out [M, up_offset / 128]
            dg, du, prod = _swiglu_grads_dot(x_ptr, b_ptr, w_ptr, offs_m[:, None, None], offs_k, M, up_offset,
                                             stride_x, stride_b, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
            tl.store(dot_out_ptr + offs_m[:, None].to(tl.int64) * stride_dot + tiles[None, :], tl.sum(prod, 2),
                     mask=in_m[:, None] & in_t[None, :])  # fmt: skip
        else:
            dg, du = _swiglu_grads(x_ptr, b_ptr, w_ptr, offs_m[:, None, None], offs_k, M, up_offset, stride_x,
                                   stride_b, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
        _rows_tiles_out(dg, offs_m, in_m, tiles, in_t, y_ptr, s_ptr, stride_ym, stride_sm, stride_sk, amax_floor,
                        fp8_max, ROUND_SCALE, GRID_ROUND)  # fmt: skip
        _rows_tiles_out(du, offs_m, in_m, tiles + up_offset // 128, in_t, y_ptr, s_ptr, stride_ym, stride_sm,
                        stride_sk, amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)  # fmt: skip
    else:
        tiles = pid_t * TILES + tl.arange(0, TILES)
        offs_k = tiles[None, :, None] * 128 + tl.arange(0, 128)[None, None, :]  # [1, TILES, 128]
        v, raw = _produce(x_ptr, b_ptr, idx_ptr, w_ptr, offs_m[:, None, None], offs_k, M, K, stride_x, stride_b,
                          up_offset, SOURCE, TOPK, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
        _rows_tiles_out(v, offs_m, in_m, tiles, tiles < KP // 128, y_ptr, s_ptr, stride_ym, stride_sm, stride_sk,
                        amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)  # fmt: skip


@triton.jit(do_not_specialize=["M_BUCKET"])
def cols_quant_kernel(
    x_ptr, b_ptr, idx_ptr, w_ptr, yt_ptr, st_ptr,
    M, K, YT_ROWS, M_BUCKET, stride_x, stride_b, up_offset, stride_ytk, stride_stk, stride_stm,
    amax_floor, fp8_max,
    SOURCE: tl.constexpr, TOPK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUPS: tl.constexpr, ROUND_SCALE: tl.constexpr, GRID_ROUND: tl.constexpr,
    PACK4: tl.constexpr = False, ROW_ORDER: tl.constexpr = True, PAIRED: tl.constexpr = False,
    FAST_SIGMOID: tl.constexpr = False,
):  # fmt: skip
    # One program = GROUPS tiles of [128 rows x BLOCK_K columns], one after another (pipelined, as
    # cols_kernel): the transpose in 1x128 tiles along the rows, yt [YT_ROWS, Mp] e4m3 and st
    # [YT_ROWS, Mp/128] (rows K..YT_ROWS-1 zeros), stored contiguous along the rows through a transposed
    # FP8 tile. PACK4 (yt's rows a multiple of 4 bytes long): the tile produced as four [32, BLOCK_K]
    # quarters, quarter j holding rows 4i + j, their bytes packed four rows a word and the words transposed,
    # as cols_kernel's PACK4. Without it the byte transpose took a shared-memory store and load per element:
    # in the FP8 experts on the H200 (ncu, run 36) the launches with a gathered source ran at 19-24% of DRAM
    # bandwidth with the load/store pipe 74-75% busy.
    # PAIRED (SwiGLU's backward): the columns offs_k are gate columns; dg goes to yt rows offs_k and du to rows
    # up_offset + offs_k, from the same loads and sigmoid.
    pid_mg, pid_k = _row_block_and_column_block(SOURCE, ROW_ORDER)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if PAIRED:
        in_rows = offs_k < up_offset
    else:
        in_rows = offs_k < YT_ROWS
    for g in tl.range(GROUPS, num_stages=3):
        pid_m = pid_mg * GROUPS + g
        live = (tl.zeros([BLOCK_K], tl.int32) + pid_m * 128) < M  # the last program's tiles may lie past the end
        ok = in_rows & live
        if PACK4:
            offs_w = pid_m * 32 + tl.arange(0, 32)  # word i of the tile: rows 4i..4i+3
            if PAIRED:
                g0, u0 = _swiglu_grads(x_ptr, b_ptr, w_ptr, (offs_w * 4)[:, None], offs_k[None, :], M, up_offset,
                                       stride_x, stride_b, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
                g1, u1 = _swiglu_grads(x_ptr, b_ptr, w_ptr, (offs_w * 4 + 1)[:, None], offs_k[None, :], M, up_offset,
                                       stride_x, stride_b, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
                g2, u2 = _swiglu_grads(x_ptr, b_ptr, w_ptr, (offs_w * 4 + 2)[:, None], offs_k[None, :], M, up_offset,
                                       stride_x, stride_b, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
                g3, u3 = _swiglu_grads(x_ptr, b_ptr, w_ptr, (offs_w * 4 + 3)[:, None], offs_k[None, :], M, up_offset,
                                       stride_x, stride_b, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
                _cols_words_out(g0, g1, g2, g3, offs_w, offs_k, ok, pid_m, yt_ptr, st_ptr, stride_ytk, stride_stk,
                                stride_stm, amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)  # fmt: skip
                _cols_words_out(u0, u1, u2, u3, offs_w, offs_k + up_offset, ok, pid_m, yt_ptr, st_ptr, stride_ytk,
                                stride_stk, stride_stm, amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)  # fmt: skip
            else:
                v0, v1, v2, v3 = _produce_quarters(x_ptr, b_ptr, idx_ptr, w_ptr, offs_w, offs_k, M, K, stride_x,
                                                   stride_b, up_offset, SOURCE, TOPK, HAS_WEIGHT,
                                                   FAST_SIGMOID)  # fmt: skip
                _cols_words_out(v0, v1, v2, v3, offs_w, offs_k, ok, pid_m, yt_ptr, st_ptr, stride_ytk, stride_stk,
                                stride_stm, amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)  # fmt: skip
        else:
            offs_m = pid_m * 128 + tl.arange(0, 128)
            if PAIRED:
                dg, du = _swiglu_grads(x_ptr, b_ptr, w_ptr, offs_m[:, None], offs_k[None, :], M, up_offset,
                                       stride_x, stride_b, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
                _cols_bytes_out(dg, offs_m, offs_k, ok, pid_m, yt_ptr, st_ptr, stride_ytk, stride_stk, stride_stm,
                                amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)  # fmt: skip
                _cols_bytes_out(du, offs_m, offs_k + up_offset, ok, pid_m, yt_ptr, st_ptr, stride_ytk, stride_stk,
                                stride_stm, amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)  # fmt: skip
            else:
                v, _ = _produce(x_ptr, b_ptr, idx_ptr, w_ptr, offs_m[:, None], offs_k[None, :], M, K, stride_x,
                                stride_b, up_offset, SOURCE, TOPK, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
                _cols_bytes_out(v, offs_m, offs_k, ok, pid_m, yt_ptr, st_ptr, stride_ytk, stride_stk, stride_stm,
                                amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)  # fmt: skip


@triton.jit
def _dual_rows(v, bits, rows, offs_k, k0, M, y_ptr, s_ptr, stride_ym, stride_sm, stride_sk, amax_floor, fp8_max,
               ROUND_SCALE: tl.constexpr, GRID_ROUND: tl.constexpr):  # fmt: skip
    """Rows ``rows`` of a dual block, v [R, 128] (its |x| bits ``bits``): their 1x128 tiles into y and s."""
    s = _scale_from_bits(tl.max(bits, 1), amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)
    r, d = _divisor(s)
    y = _quantize_tile(v, r[:, None], d[:, None], fp8_max, GRID_ROUND)
    in_m = rows < M
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + offs_k[None, :], y.to(y_ptr.dtype.element_ty),
             mask=in_m[:, None])
    tl.store(s_ptr + rows.to(tl.int64) * stride_sm + (k0 // 128) * stride_sk, s, mask=in_m)


@triton.jit
def _dual_rows_chunked(row_bits, rows, k0, x_ptr, b_ptr, idx_ptr, w_ptr, M, K, stride_x, stride_b, up_offset, y_ptr,
                       s_ptr, stride_ym, stride_sm, stride_sk, amax_floor, fp8_max, SOURCE: tl.constexpr,
                       TOPK: tl.constexpr, HAS_WEIGHT: tl.constexpr, CHUNK: tl.constexpr, ROUND_SCALE: tl.constexpr,
                       GRID_ROUND: tl.constexpr, FAST_SIGMOID: tl.constexpr):  # fmt: skip
    """Rows ``rows`` of a dual block whose |x| bit maxima are ``row_bits``: their 1x128 tiles into y and s,
    the block's rows produced again CHUNK columns at a time."""
    s = _scale_from_bits(row_bits, amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)
    r, d = _divisor(s)
    in_m = rows < M
    tl.store(s_ptr + rows.to(tl.int64) * stride_sm + (k0 // 128) * stride_sk, s, mask=in_m)
    for c in range(0, 128, CHUNK):
        offs_k = k0 + c + tl.arange(0, CHUNK)
        v, _ = _produce(x_ptr, b_ptr, idx_ptr, w_ptr, rows[:, None], offs_k[None, :], M, K, stride_x, stride_b,
                        up_offset, SOURCE, TOPK, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
        y = _quantize_tile(v, r[:, None], d[:, None], fp8_max, GRID_ROUND)
        tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + offs_k[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=in_m[:, None])  # fmt: skip


@triton.jit(do_not_specialize=["M_BUCKET"])
def dual_quant_kernel(
    x_ptr, b_ptr, idx_ptr, w_ptr, y_ptr, s_ptr, yt_ptr, st_ptr,
    M, K, YT_ROWS, M_BUCKET, stride_x, stride_b, up_offset, stride_ym, stride_sm, stride_sk,
    stride_ytk, stride_stk, stride_stm, amax_floor, fp8_max,
    SOURCE: tl.constexpr, TOPK: tl.constexpr, HAS_WEIGHT: tl.constexpr, CHUNK: tl.constexpr,
    PACK4: tl.constexpr, ROUND_SCALE: tl.constexpr, GRID_ROUND: tl.constexpr, FAST_SIGMOID: tl.constexpr = False,
):  # fmt: skip
    # Both layouts from one launch: x read once, y and yt written. One program = a [128 x 128] block.
    # PACK4 (CHUNK 128): the block produced as four [32, 128] quarters, quarter j holding rows 4i + j, so
    # that yt's words of four rows' bytes are packed in registers and stored whole after a word transpose
    # (cols_kernel's PACK4, weight_kernel's WT); y's rows are stored from the quarters. Without it the FP8
    # block is transposed byte by byte (one shared-memory instruction an element: 32-33% of copy bandwidth on
    # the H200, run 31, against 56% for the two-launch path).
    # CHUNK == 128: the block is held whole (with 8-16 warps, 32-64 values per thread), its row and
    # column amaxes reduced from the same registers. CHUNK < 128: the block is walked in [128 x CHUNK]
    # column chunks: each chunk's column amaxes are complete (all 128 rows), so its transposed tiles
    # are quantized and stored at once while the row amaxes accumulate; a second walk over the same
    # chunks (from the cache: this program just read them) quantizes the rows.
    pid_m = tl.program_id(0)
    k0 = tl.program_id(1) * 128
    offs_m = pid_m * 128 + tl.arange(0, 128)
    in_m = offs_m < M
    s_ptrs = s_ptr + offs_m.to(tl.int64) * stride_sm + (k0 // 128) * stride_sk
    if PACK4 and CHUNK < 128:
        # PACK4 in [128 x CHUNK] column chunks, each as four [32, CHUNK] quarters (rows 4i + j): a chunk's column
        # amaxes are complete, so its yt words are packed and stored at once while the quarters' row amaxes
        # accumulate; a second walk (from the cache: this program just read the chunks) quantizes the rows.
        # A thread holds 128 * CHUNK / threads values, not the whole block's (255 registers a thread at CHUNK
        # 128, one or two programs an SM).
        offs_w = pid_m * 32 + tl.arange(0, 32)
        rb0 = tl.zeros([32], dtype=tl.int32)
        rb1 = tl.zeros([32], dtype=tl.int32)
        rb2 = tl.zeros([32], dtype=tl.int32)
        rb3 = tl.zeros([32], dtype=tl.int32)
        yt_words = yt_ptr.to(tl.pointer_type(tl.int32), bitcast=True)  # rows of Mp bytes, Mp % 128 == 0
        for c in range(0, 128, CHUNK):  # a loop, not unrolled: the registers of one chunk
            offs_k = k0 + c + tl.arange(0, CHUNK)
            v0, v1, v2, v3 = _produce_quarters(x_ptr, b_ptr, idx_ptr, w_ptr, offs_w, offs_k, M, K, stride_x,
                                               stride_b, up_offset, SOURCE, TOPK, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
            b0, b1, b2, b3 = _abs_bits(v0), _abs_bits(v1), _abs_bits(v2), _abs_bits(v3)
            rb0 = tl.maximum(rb0, tl.max(b0, 1))  # integers: NaN's bits are the largest
            rb1 = tl.maximum(rb1, tl.max(b1, 1))
            rb2 = tl.maximum(rb2, tl.max(b2, 1))
            rb3 = tl.maximum(rb3, tl.max(b3, 1))
            st = _scale_from_bits(tl.max(tl.maximum(tl.maximum(b0, b1), tl.maximum(b2, b3)), 0), amax_floor,
                                  fp8_max, ROUND_SCALE, GRID_ROUND)  # fmt: skip
            rt, dt = _divisor(st)
            rt, dt = rt[None, :], dt[None, :]
            words = _pack4(_quantize_tile(v0, rt, dt, fp8_max, GRID_ROUND),
                           _quantize_tile(v1, rt, dt, fp8_max, GRID_ROUND),
                           _quantize_tile(v2, rt, dt, fp8_max, GRID_ROUND),
                           _quantize_tile(v3, rt, dt, fp8_max, GRID_ROUND), yt_ptr.dtype.element_ty,
                           GRID_ROUND)  # fmt: skip
            in_rows = offs_k < YT_ROWS
            tl.store(yt_words + offs_k[:, None].to(tl.int64) * (stride_ytk // 4) + offs_w[None, :],
                     tl.trans(words), mask=in_rows[:, None])  # fmt: skip
            tl.store(st_ptr + offs_k.to(tl.int64) * stride_stk + pid_m * stride_stm, st, mask=in_rows)
        for j in tl.static_range(4):  # unrolled: j and the quarter's row maxima are known at compile time
            if j == 0:
                rb = rb0
            elif j == 1:
                rb = rb1
            elif j == 2:
                rb = rb2
            else:
                rb = rb3
            _dual_rows_chunked(rb, offs_w * 4 + j, k0, x_ptr, b_ptr, idx_ptr, w_ptr, M, K, stride_x, stride_b,
                               up_offset, y_ptr, s_ptr, stride_ym, stride_sm, stride_sk, amax_floor, fp8_max, SOURCE,
                               TOPK, HAS_WEIGHT, CHUNK, ROUND_SCALE, GRID_ROUND, FAST_SIGMOID)  # fmt: skip
    elif PACK4:
        offs_k = k0 + tl.arange(0, 128)
        offs_w = pid_m * 32 + tl.arange(0, 32)  # word i of a yt row: rows 4i..4i+3 of the block
        v0, v1, v2, v3 = _produce_quarters(x_ptr, b_ptr, idx_ptr, w_ptr, offs_w, offs_k, M, K, stride_x,
                                           stride_b, up_offset, SOURCE, TOPK, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
        b0, b1, b2, b3 = _abs_bits(v0), _abs_bits(v1), _abs_bits(v2), _abs_bits(v3)
        st = _scale_from_bits(tl.max(tl.maximum(tl.maximum(b0, b1), tl.maximum(b2, b3)), 0), amax_floor, fp8_max,
                              ROUND_SCALE, GRID_ROUND)  # [128]: one reduction over the block's rows, not four
        rt, dt = _divisor(st)
        rt, dt = rt[None, :], dt[None, :]
        words = _pack4(_quantize_tile(v0, rt, dt, fp8_max, GRID_ROUND), _quantize_tile(v1, rt, dt, fp8_max, GRID_ROUND),
                       _quantize_tile(v2, rt, dt, fp8_max, GRID_ROUND), _quantize_tile(v3, rt, dt, fp8_max, GRID_ROUND),
                       yt_ptr.dtype.element_ty, GRID_ROUND)  # fmt: skip
        in_rows = offs_k < YT_ROWS
        yt_words = yt_ptr.to(tl.pointer_type(tl.int32), bitcast=True)  # rows of Mp bytes, Mp % 128 == 0
        tl.store(yt_words + offs_k[:, None].to(tl.int64) * (stride_ytk // 4) + offs_w[None, :], tl.trans(words),
                 mask=in_rows[:, None])
        tl.store(st_ptr + offs_k.to(tl.int64) * stride_stk + pid_m * stride_stm, st, mask=in_rows)
        _dual_rows(v0, b0, offs_w * 4 + 0, offs_k, k0, M, y_ptr, s_ptr, stride_ym, stride_sm, stride_sk, amax_floor,
                   fp8_max, ROUND_SCALE, GRID_ROUND)  # fmt: skip
        _dual_rows(v1, b1, offs_w * 4 + 1, offs_k, k0, M, y_ptr, s_ptr, stride_ym, stride_sm, stride_sk, amax_floor,
                   fp8_max, ROUND_SCALE, GRID_ROUND)  # fmt: skip
        _dual_rows(v2, b2, offs_w * 4 + 2, offs_k, k0, M, y_ptr, s_ptr, stride_ym, stride_sm, stride_sk, amax_floor,
                   fp8_max, ROUND_SCALE, GRID_ROUND)  # fmt: skip
        _dual_rows(v3, b3, offs_w * 4 + 3, offs_k, k0, M, y_ptr, s_ptr, stride_ym, stride_sm, stride_sk, amax_floor,
                   fp8_max, ROUND_SCALE, GRID_ROUND)  # fmt: skip
    elif CHUNK == 128:
        offs_k = k0 + tl.arange(0, 128)
        v, raw = _produce(x_ptr, b_ptr, idx_ptr, w_ptr, offs_m[:, None], offs_k[None, :], M, K, stride_x,
                          stride_b, up_offset, SOURCE, TOPK, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
        bits = _abs_bits(v)
        st = _scale_from_bits(tl.max(bits, 0), amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)
        s = _scale_from_bits(tl.max(bits, 1), amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)
        rt, dt = _divisor(st)
        yt8 = tl.trans(_quantize_tile(v, rt[None, :], dt[None, :], fp8_max, GRID_ROUND).to(yt_ptr.dtype.element_ty))
        in_rows = offs_k < YT_ROWS
        tl.store(yt_ptr + offs_k[:, None].to(tl.int64) * stride_ytk + offs_m[None, :], yt8, mask=in_rows[:, None])
        tl.store(st_ptr + offs_k.to(tl.int64) * stride_stk + pid_m * stride_stm, st, mask=in_rows)
        r, d = _divisor(s)
        y = _quantize_tile(v, r[:, None], d[:, None], fp8_max, GRID_ROUND)
        tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_k[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=in_m[:, None])  # fmt: skip
        tl.store(s_ptrs, s, mask=in_m)
    else:
        row_bits = tl.zeros([128], dtype=tl.int32)
        for c in tl.static_range(0, 128, CHUNK):
            offs_k = k0 + c + tl.arange(0, CHUNK)
            v, raw = _produce(x_ptr, b_ptr, idx_ptr, w_ptr, offs_m[:, None], offs_k[None, :], M, K, stride_x,
                              stride_b, up_offset, SOURCE, TOPK, HAS_WEIGHT, FAST_SIGMOID)  # fmt: skip
            bits = _abs_bits(v)
            st = _scale_from_bits(tl.max(bits, 0), amax_floor, fp8_max, ROUND_SCALE, GRID_ROUND)
            rt, dt = _divisor(st)
            yt = _quantize_tile(v, rt[None, :], dt[None, :], fp8_max, GRID_ROUND)
            yt8 = tl.trans(yt.to(yt_ptr.dtype.element_ty))
            in_rows = offs_k < YT_ROWS
            tl.store(yt_ptr + offs_k[:, None].to(tl.int64) * stride_ytk + offs_m[None, :], yt8,
                     mask=in_rows[:, None])  # fmt: skip
            tl.store(st_ptr + offs_k.to(tl.int64) * stride_stk + pid_m * stride_stm, st, mask=in_rows)
            row_bits = tl.maximum(row_bits, tl.max(bits, 1))  # integers: NaN's bits are the largest
        _dual_rows_chunked(row_bits, offs_m, k0, x_ptr, b_ptr, idx_ptr, w_ptr, M, K, stride_x, stride_b, up_offset,
                           y_ptr, s_ptr, stride_ym, stride_sm, stride_sk, amax_floor, fp8_max, SOURCE, TOPK,
                           HAS_WEIGHT, CHUNK, ROUND_SCALE, GRID_ROUND, FAST_SIGMOID)  # fmt: skip
