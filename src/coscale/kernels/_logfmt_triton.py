"""The Triton LogFMT kernels (format, references and the exactness argument: coscale.kernels.logfmt).

A module of its own, imported on the first launch, as coscale.kernels._quant_triton (the interpreter looks
the helpers up among the module's globals).

Two kernels, each with a gather in front or a sum behind:

- ``encode_kernel``: rows of x (or, with GATHER, rows x[idx[r] // TOPK], zeros where idx[r] < 0: the MoE
  permutation / the dispatch's row selection) -> codes + tile_min + tile_step, either as three arrays or
  (PACKED) straight into codec rows (coscale.parallel.codec.LogFMTCodec's byte layout).
- ``decode_sum_kernel``: out[t] = sum_k w[t, k] * decode(row pair_row[t, k]) in float32 (the combine);
  TOPK = 1 without weights and pair_row = arange is plain decoding. Rows come from the three arrays or
  (PACKED) from codec rows.

Encode, nearest rounding: a float32 fast path with a proven error bound, and a float64 redo of rare rows
(the exactness argument in brief; coscale.kernels.logfmt has it in full). Per row (float64, once per
tile row): the tile numbers m, s (the reference's formulas: its two logs), and in log2 units the grid
origin M = m / ln 2, the step S = s / ln 2 and the midpoint offset C = log2((1 + e^s) / 2) (a series in
s / 2 for n >= 8, where s <= 32 ln 2 / 126; the exact formula below). Per element (float32 only): the
position on the code grid t = (log2|x| - M - C) / S, whose integers are the rounding thresholds, as
  t = (z - c + L) / S,  z = E - floor(M) (E the exponent, exact small integer), c = frac(M) + C,
  L = log2(mant) with mant in [sqrt(1/2), sqrt(2)) (``_log2_mantissa``: on the GPU the hardware's
  lg2.approx.f32, |error| <= 1.8e-7: 1.776e-7 measured on the H200 for every fp32 mantissa of the range by
  ``log2_check_kernel``, above the PTX ISA's 2^-22.6; in the interpreter numpy's log2),
split so that the large parts are exact: z * hi(1/S) (hi: 1/S cut to 15 significant bits, |z| < 2^8) and
floor(c / S) are exact float32 integers or products, and only small terms (|.| <= 2 + 0.52 / S) round.
``_grid_position`` returns floor(t) exactly and frac(t) with |error| <= 3.1e-7 / S + 5e-7 (derivation in
``_grid_position``), below the band DELTA / S + BAND_ABS (DELTA = 4e-7, BAND_ABS = 2^-20). An element whose
t lies within the band of an integer (the thresholds 0..Q-2; near the others, a harmless extra redo), or of
t0 (the 0 / 1 threshold |x| = exp(m) / 2, below every element of a row the clamp does not cut), is
ambiguous: its row is recomputed with the reference's float64 formulas. Rows where the bound is not
usable go there whole: 1/S >= 2^16 (nearly constant tiles) or a subnormal |x| beside max |x| >= 2^100
(other rows with subnormals are scaled by 2^24 first, exactly, so that every exponent is in the bits).
Every other code is the reference's (the reference decides exactly except within ~1e-15 relative of a
threshold).

Encode, "fast" rounding (FAST): none of that, and no float64. Per row the tile numbers in float32 (``_row_stats_fast``:
two log2, each the exponent plus lg2.approx of the mantissa, within ``fast_tile_tolerance`` of the reference's) and the
line v = A log2|x| + B = t + 1.5 on the grid they give (``_row_line``, float32), per element one lg2.approx and one
multiply-add, clamped and rounded by adding 1.5 * 2^23 (``_fast_code``). A program whose rows are all "easy" (no NaN /
inf, no subnormal, the range clamp not binding, every non-zero |x| at v >= 0.6: the common case) takes a shorter
element phase (``_fast_code``'s EASY form: about 7 instructions an element against 11).
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _load_rows(x_ptr, idx_ptr, rows, cols, N, H, stride_x, GATHER: tl.constexpr, TOPK: tl.constexpr,
               DTYPE: tl.constexpr = tl.float32, HALVES: tl.constexpr = False):  # fmt: skip
    """(x [R, C] as DTYPE, source row offsets [R] int64, row live [R]); zeros outside and on padding rows.

    HALVES: cols is ``_tile_halves``' [1, 2, C/2] (a row as its two halves); the tile is loaded in that shape and
    reshaped to [R, C], the same values in the same order. Why: Triton lays a tile out by its memory accesses,
    each taking as many contiguous values a thread as fit 16 bytes. The unpacked 10-bit encoder reads bf16 and
    stores int16, 8 values a thread: as [R, 128] a thread holds 8 values of each of two rows (the row phase, about
    15 instructions an element at 16 a thread, done twice); as [R, 2, 64] the layout is threadsPerWarp [4, 1, 8]
    with 8 values of each half a thread, 16 of one row, and the int16 store, written in the same shape
    (``_encode_chunks``), leaves as two 16-byte stores a thread with no shared memory and no barrier. sm_90 SASS
    of the easy path to its first EXIT: 409 -> 369 instructions a thread at 16 rows x 4 warps, 410 -> 348 at 4
    rows x 1 warp, against the former dummy one-byte load an element that forced 16 values a thread but sent
    the store through shared memory."""
    in_r = rows < N
    if GATHER:
        pair = tl.load(idx_ptr + rows, mask=in_r, other=-1)
        ok = in_r & (pair >= 0)
        src = tl.where(ok, pair // TOPK, 0).to(tl.int64)
    else:
        ok = in_r
        src = rows.to(tl.int64)
    if HALVES:  # cols: _tile_halves' [1, 2, C/2]
        mask3 = ok[:, None, None] & (cols < H)
        x3 = tl.load(x_ptr + src[:, None, None] * stride_x + cols, mask=mask3, other=0).to(DTYPE)
        x = tl.reshape(x3, (rows.shape[0], cols.shape[1] * cols.shape[2]))
    else:
        mask = ok[:, None] & (cols < H)[None, :]
        x = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=mask, other=0).to(DTYPE)
    return x, src, ok


@triton.jit
def _tile_halves(c_start, C: tl.constexpr):
    """Columns c_start .. c_start + C - 1 as [1, 2, C/2]: a row's two halves (``_load_rows``' HALVES). Built from
    aranges, not by reshaping one: Triton's contiguity analysis does not follow a reshape, and the loads and
    stores it feeds would not be vectorised."""
    h = tl.arange(0, 2)[None, :, None] * (C // 2)
    return c_start + h + tl.arange(0, C // 2)[None, None, :]


@triton.jit
def _tile_bits(x):
    """(|x| bits int32 [R, C], their max [R], the min of the non-zero ones [R]): max and min on the bit
    patterns of |x| (the same order as the values); NaN and inf have the largest; 0x7F800000 for no
    non-zero element."""
    bits = tl.abs(x).to(tl.int32, bitcast=True)
    # the non-zero min as the unsigned min of bits - 1 (a zero wraps to the top): an add an element, not a
    # compare and a select
    low = tl.min((bits - 1).to(tl.uint32, bitcast=True), 1).to(tl.int32, bitcast=True) + 1
    return bits, tl.max(bits, 1), tl.where(low == 0, 0x7F800000, low)


@triton.jit
def _u16x2(a, b, IS_MAX: tl.constexpr, ASM: tl.constexpr):
    """Lane-wise unsigned max (IS_MAX) or min of two int32 tensors read as two 16-bit lanes: one PTX
    max/min.u16x2 (sm_90) with ASM, else the same in 32-bit integer operations (the interpreter)."""
    if ASM:
        op: tl.constexpr = "max.u16x2 $0, $1, $2;" if IS_MAX else "min.u16x2 $0, $1, $2;"
        return tl.inline_asm_elementwise(op, "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)
    else:
        ah, bh = (a >> 16) & 0xFFFF, (b >> 16) & 0xFFFF
        al, bl = a & 0xFFFF, b & 0xFFFF
        if IS_MAX:
            return (tl.maximum(ah, bh) << 16) | tl.maximum(al, bl)
        else:
            return (tl.minimum(ah, bh) << 16) | tl.minimum(al, bl)


@triton.jit
def _pair_bits(w, top2, low2, ASM: tl.constexpr):
    """Phase 1 on bf16 pairs: w int32 [R, C/2], each word two bf16 values (low lane the even column).
    Folds into top2 the lanes' |x| bits (bf16 & 0x7FFF: the order of the values; NaN and inf above all
    others) and into low2 their |x| bits - 1, mod 2^16 (0xFFFF for a zero: min skips zeros). The lane
    arithmetic stays in its lane: (w | 0x80008000) - 0x00010001 borrows from no lane (each is >= 0x8000).
    Two elements in about six integer instructions with ASM (sm_90 SASS; the float path took about six an
    element: bf16 -> float32, |.|, a compare and a select, max and min)."""
    top2 = _u16x2(top2, w & 0x7FFF7FFF, True, ASM)
    low2 = _u16x2(low2, ((w | -2147450880) - 0x00010001) ^ -2147450880, False, ASM)  # 0x80008000 as int32
    return top2, low2


@triton.jit
def _pair_stats(top2, low2):
    """(max, non-zero min) [R] of the lanes of _pair_bits' words as float32 |x| bits: bf16 bits << 16;
    0x7F800000 for no non-zero element (as _tile_bits)."""
    top = tl.maximum(tl.max((top2 >> 16) & 0xFFFF, 1), tl.max(top2 & 0xFFFF, 1))
    low = tl.minimum(tl.min((low2 >> 16) & 0xFFFF, 1), tl.min(low2 & 0xFFFF, 1))
    return top << 16, tl.where(low == 0xFFFF, 0x7F800000, (low + 1) << 16)


@triton.jit
def _row_stats(top, low, range_clamp, Q: tl.constexpr):
    """(bad, m32, s32, amin, amax [R]) from a tile row's |x| bit max and non-zero min: the reference's
    _tile_stats in float64."""
    bad = top >= 0x7F800000
    amax = top.to(tl.float32, bitcast=True)
    amin = low.to(tl.float32, bitcast=True)
    live = (top > 0) & (top < 0x7F800000)
    amax64 = tl.where(live, amax, 1.0).to(tl.float64)
    amin64 = tl.maximum(tl.where(live, amin, 1.0).to(tl.float64), amax64 * range_clamp)
    lmax = tl.log(amax64)
    lmin = tl.log(amin64)
    m32 = tl.where(live, lmin.to(tl.float32), 0.0)
    s32 = tl.where(live, ((lmax - lmin) / (Q - 1)).to(tl.float32), 0.0)
    return bad, m32, s32, amin, amax


@triton.jit
def _log2_any(bits, FAST_LOG2: tl.constexpr):
    """log2 of a positive finite float32 from its bits [R], as E + log2(mant) (``_log2_mantissa``; the sum rounded
    once), a subnormal scaled by 2^24 first (exact) and 24 taken from E."""
    tiny = bits < 0x00800000
    up = tl.where(tiny, bits, 0).to(tl.float32, bitcast=True) * 16777216.0  # (only subnormals: no overflow)
    scaled = tl.where(tiny, up.to(tl.int32, bitcast=True), bits)
    e, lg = _log2_mantissa(scaled, FAST_LOG2)
    return (e - tl.where(tiny, 24, 0)).to(tl.float32) + lg


@triton.jit
def _row_stats_fast(top, low, log2_clamp, Q: tl.constexpr, FAST_LOG2: tl.constexpr):
    """The "fast" rounding's (bad, m32, s32, amin, amax [R]) from a tile row's |x| bit max and non-zero min, in
    float32: lmax = log2 max|x|, lmin = log2 min|x|, the range clamp in log2 units (lmin >= lmax + log2_clamp, the
    host's log2 of the range clamp: -32), then m = lmin ln 2 and s = (lmax - lmin) ln 2 / (Q - 1). Each log2 is
    E + log2(mant) (``_log2_mantissa``: the exponent exact, the mantissa's log within 1.8e-7, one rounding of the
    sum; a subnormal scaled by 2^24 first and 24 taken from its exponent, exactly: ``_log2_any``): a few
    instructions where libdevice's log2f took about 25, repeated by every thread that holds part of the row. The
    numbers are within ``fast_tile_tolerance`` of the reference's float64 ones, and the codes are nearest on the
    grid they give (the decoder's). Also returns whether the range clamp binds (lmin raised)."""
    bad = top >= 0x7F800000
    amax = top.to(tl.float32, bitcast=True)
    amin = low.to(tl.float32, bitcast=True)
    live = (top > 0) & (top < 0x7F800000)
    lmax = _log2_any(tl.where(live, top, 0x3F800000), FAST_LOG2)
    lmin = _log2_any(tl.where(live, low, 0x3F800000), FAST_LOG2)
    floor = lmax + log2_clamp
    clamped = live & (floor > lmin)
    lmin = tl.maximum(lmin, floor)
    m32 = tl.where(live, lmin * 0.6931471805599453, 0.0)
    s32 = tl.where(live, (lmax - lmin) * (0.6931471805599453 / (Q - 1)), 0.0)
    return bad, m32, s32, amin, amax, clamped


@triton.jit
def _f64(like, bits):
    """The float64 with these bits, shaped like ``like`` (a float literal would be an fp32 constant)."""
    return (tl.zeros_like(like).to(tl.int64) + bits).to(tl.float64, bitcast=True)


@triton.jit
def _midpoint_log2(s, like, N_BITS: tl.constexpr):
    """C = log2((1 + e^s) / 2) in float64 [R] (s: the tile step, float64): where the linear midpoint of two
    neighbouring grid magnitudes lies above the lower one, in log2 units."""
    inv_ln2 = _f64(like, 0x3FF71547652B82FE)
    if N_BITS >= 8:  # s <= 32 ln 2 / 126 < 0.18: log((1 + e^s)/2) = y + log cosh y, y = s/2, by its series
        y = 0.5 * s  # to y^10 (the next term < 1e-15)
        y2 = y * y
        lc = y2 * (0.5 - y2 * (_f64(like, 0x3FB5555555555555) - y2 * (_f64(like, 0x3F96C16C16C16C17) - y2 * (
            _f64(like, 0x3F7BA1BA1BA1BA1C) - y2 * _f64(like, 0x3F61EA5D39BCDA62)))))  # 1/12 1/45 17/2520 31/14175
        return (y + lc) * inv_ln2
    else:  # s up to 11: the formula itself
        return tl.log((1.0 + tl.exp(s)) * 0.5) * inv_ln2


@triton.jit
def _row_line(m32, s32, scaled, N_BITS: tl.constexpr):
    """The "fast" encoder's row constants (float32 [R]), from the tile numbers the row stores, in float32: A = 1/S
    (one correctly rounded division), B = 1.5 - (M' + C) A (M' = m log2 e, + 24 where the row's |x| are scaled by
    2^24), so that A log2|x| + B = t + 1.5 (t the grid position, ``_row_grid``), and T0 = 1.5 - (1 + C) A (the 0 / 1
    threshold t0 + 1.5); C by its series in y = s/2 for n >= 8, else the formula. A tile with one distinct magnitude
    (step 0; and a NaN / inf or all-zero tile, whose m32 is 0) gets the line through it, A = 1, B = 1 - M': its
    elements v = 1 (to ~1e-5), a zero -inf, T0 = 1/2. The roundings are within ``fast_position_error``. Also
    returns whether the row is easy (below)."""
    one = s32 == 0
    s = tl.where(one, 1.0, s32)
    inv_step = tl.math.div_rn(0.6931471805599453, s)  # 1/S, S = s / ln 2
    if N_BITS >= 8:  # s < 0.18: log((1 + e^s)/2) = y + log cosh y, y = s/2; to y^8 (next term < 1e-9 y)
        y = 0.5 * s
        y2 = y * y
        mid = (y + y2 * (0.5 - y2 * (0.08333333333333333 - y2 * 0.022222222222222223))) * 1.4426950408889634
    else:  # s up to 11: the formula itself
        mid = tl.log2((1.0 + tl.exp(s)) * 0.5)
    lmin = m32 * 1.4426950408889634 + tl.where(scaled, 24.0, 0.0)
    a = tl.where(one, 1.0, inv_step)
    b = tl.where(one, 1.0 - lmin, 1.5 - (lmin + mid) * inv_step)
    t0 = tl.where(one, 0.5, 1.5 - (1.0 + mid) * inv_step)
    # Whether every non-zero |x| >= the row's minimum gets v >= 0.6 (so no lower clamp is needed: _fast_code's
    # EASY form): v(min) = 1.5 - C A on the stored grid, less A times (fast_position_error at |log2 x| <= |M| +
    # (Q - 1) S + 1, plus the stored tile_min's distance from log2 min, fast_tile_tolerance's 2^-22 (|M| + 14.5)):
    # <= 1.1e-5 + 2^-23 (9 |M| + 3 (Q - 1) S + 5 S + 200) in log2 units. A step-0 row has v = 1 +- 1e-5.
    big_s = s * 1.4426950408889634
    err = 1.1e-5 + 1.1920928955078125e-07 * (9.0 * tl.abs(lmin) + (3.0 * ((1 << (N_BITS - 1)) - 2) + 5.0) * big_s
                                              + 200.0)
    easy = one | (0.9 - (mid + err) * inv_step >= 0.0)
    return a, b, t0, easy


@triton.jit
def _row_grid(m32, s32, scaled, delta, N_BITS: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Per row, in float64 then rounded once: the constants of ``_grid_position`` and the band.

    In log2 units M = m / ln 2, S = s / ln 2, C = log2((1 + e^s) / 2) (0 for stochastic rounding: the
    grid itself), c = frac(M) + C. Returns float32 [R]: kz = 1.5 * 2^23 + floor(M) (z's offset; + 24 where
    the row's |x| were scaled by 2^24), hi and lo
    of 1/S (hi cut to 15 significant bits), 1/S, floor(c/S) and its fraction, floor(c/S) + floor(t0) and
    frac(t0) (t0 = -(1 + C)/S, the 0 / 1 threshold), the band, and whether the row skips the fast path."""
    inv_ln2 = _f64(m32, 0x3FF71547652B82FE)
    m = m32.to(tl.float64)
    s = tl.where(s32 > 0, s32, 1.0).to(tl.float64)
    big_m = m * inv_ln2
    m_int = tl.floor(big_m)
    inv_step = 1.0 / (s * inv_ln2)  # 1/S: the one float64 division
    if STOCHASTIC:
        mid = tl.zeros_like(m)
    else:
        mid = _midpoint_log2(s, m32, N_BITS)
    k = ((big_m - m_int) + mid) * inv_step
    k_int = tl.floor(k)
    hi = (inv_step.to(tl.int64, bitcast=True) & -(1 << 38)).to(tl.float64, bitcast=True)  # 15 bits
    t0 = -(1.0 + mid) * inv_step
    t0_int = tl.floor(t0)
    band = (delta * inv_step).to(tl.float32) + 9.5367431640625e-07  # + BAND_ABS = 2^-20
    kz = 12582912.0 + m_int + tl.where(scaled, 24.0, 0.0)
    return (kz.to(tl.float32), hi.to(tl.float32), (inv_step - hi).to(tl.float32), inv_step.to(tl.float32),
            k_int.to(tl.float32), (k - k_int).to(tl.float32), (k_int + t0_int).to(tl.float32),
            (t0 - t0_int).to(tl.float32), band, (inv_step >= 65536.0) | (band >= 0.25))


@triton.jit
def _log2_mantissa(bits, FAST_LOG2: tl.constexpr):
    """(E, log2(mant) float32) with |x| = 2^E * mant, mant in [sqrt(1/2), sqrt(2)): from the bits of a normal
    |x| (0 gives E = -127, mant = 1). E as an int32. FAST_LOG2 (the GPU): lg2.approx.f32, one MUFU
    instruction, |error| <= 1.8e-7 on this range (log2_check_kernel checks every mantissa: 1.776e-7 on the H200);
    the interpreter has no lg2.approx and takes tl.log2 (numpy's, within an ulp)."""
    e = (bits - 0x3F3504F4) >> 23  # the exponent of |x| / sqrt(1/2), rounded down
    mant = (bits - (e << 23)).to(tl.float32, bitcast=True)
    if FAST_LOG2:
        lg = libdevice.fast_log2f(mant)
    else:
        lg = tl.log2(mant)
    return e, lg


@triton.jit
def _grid_position(bits, kz, inv_hi, inv_lo, inv_S, k_int, k_frac, FAST_LOG2: tl.constexpr):
    """(floor(t) - k_off, frac(t), p_int, w) float32 [R, C], t = (log2|x| - M - C) / S = p_int - k_int + w
    (k_int = floor(c/S) + k_off: the caller's offset folded in, an integer); the row constants as [R, 1].

    With z = E - floor(M) (an integer, |z| < 2^8) and K = c/S = k_int + k_frac:
      t = z * inv_hi - k_int + (z * inv_lo - k_frac + log2(mant) / S).
    z * inv_hi is exact (8 + 15 bits), so is its split p_int + (p - p_int); with 1/S < 2^16 every
    integer here is below 2^24. Only w = (p - p_int) + inner rounds, |w| <= 2 + 0.52/S, then
    floor(w) and w - floor(w) are exact. Errors of t in t units, u = 2^-24: log2(mant) 1.8e-7/S, 1/S's
    rounding (|log2 mant| <= 1/2) 0.5u/S, inner's products and sums (0.52 + 0.52 + 0.04) u/S + 2u, w's
    rounding (2 + 0.52/S) u, the float64 constants ~1e-9: <= 2.75e-7/S + 3e-7. The 0 / 1 test adds
    w - frac(t0) (<= (3 + 0.52/S) u) and its sum (u): <= 3.1e-7/S + 5e-7 < the band."""
    e, lg = _log2_mantissa(bits, FAST_LOG2)
    z = (e + 0x4B400000).to(tl.float32, bitcast=True) - kz  # 1.5 * 2^23 + e, exactly
    p = z * inv_hi
    p_int = tl.floor(p)
    inner = lg * inv_S + (z * inv_lo - k_frac)
    w = (p - p_int) + inner
    w_int = tl.floor(w)
    return (p_int - k_int) + w_int, w - w_int, p_int, w


@triton.jit
def _exact_mag(ax, m32, s32, Q: tl.constexpr):
    """The reference's nearest magnitude code, in its float64 formulas (ax [R, C] float32, m32/s32 [R])."""
    m = m32.to(tl.float64)[:, None]
    s = s32.to(tl.float64)[:, None]
    s_safe = tl.where(s > 0, s, 1.0)
    ax64 = ax.to(tl.float64)
    log_ax = tl.log(tl.where(ax > 0, ax, 1.0).to(tl.float64))
    k = tl.floor((log_ax - m) / s_safe)
    k = tl.minimum(tl.maximum(k, -1.0), Q - 2.0)
    lower = tl.where(k < 0, 0.0, tl.exp(m + s * k))
    upper = tl.exp(m + s * (k + 1.0))
    up = 2.0 * ax64 >= lower + upper
    return k.to(tl.int32) + 1 + up.to(tl.int32)


@triton.jit
def _to_int(v):
    """A float32 integer in [-2^22, 2^22] to int32 without a conversion instruction (1.5 * 2^23 + v)."""
    return (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def _stochastic_mag(x, bits, m32, s32, kz, inv_hi, inv_lo, inv_S, k_int, k_frac, skip, Q: tl.constexpr,
                    FAST_LOG2: tl.constexpr, seed, rand_off):  # fmt: skip
    """Stochastic rounding's magnitude code [R, C] int32 from the row constants of ``_row_grid`` (the
    grid's as [R, 1], m32, s32 and skip as [R]): with
    fl = floor((log2|x| - M) / S), the bracket a = g_k <= |x| < b (the grid's k), b with probability
    (|x| - a) / (b - a). Rows with 1/S >= 2^16 (rare) take the grid index in float64."""
    fl, fr, p_int, w = _grid_position(bits, kz, inv_hi, inv_lo, inv_S, k_int, k_frac, FAST_LOG2)
    ax = tl.abs(x)
    if tl.max(skip.to(tl.int32), 0) > 0:
        s_safe = tl.where(s32 > 0, s32, 1.0).to(tl.float64)[:, None]
        log_ax = tl.log(tl.where(ax > 0, ax, 1.0).to(tl.float64))
        fl64 = tl.floor((log_ax - m32.to(tl.float64)[:, None]) / s_safe)
        fl = tl.where(skip[:, None], fl64.to(tl.float32), fl)
    k = tl.minimum(tl.maximum(fl, -1.0), Q - 2.0)
    mf = m32[:, None]
    sf = s32[:, None]
    lower = tl.where(k < 0, 0.0, tl.exp(mf + sf * k))
    upper = tl.exp(mf + sf * (k + 1.0))
    u = tl.rand(seed, rand_off)
    up = u * (upper - lower) < ax - lower
    return _to_int(k) + 1 + up.to(tl.int32)


@triton.jit
def _nearest_code(x, bits, kz, inv_hi, inv_lo, inv_S, k_int2b, k_frac, t0_int, t0_frac, band, half_band, mag_hi,
                  sign_mask, CLAMPED: tl.constexpr, N_BITS: tl.constexpr, FAST_LOG2: tl.constexpr):  # fmt: skip
    """(the n-bit code [R, C] int32, ambiguous [R, C]) by nearest rounding, from the row constants ([R, 1]).

    fl2 = floor(t) + 2 is the magnitude code before the clamp to [1, mag_hi] (mag_hi: Q, or 0 for a tile
    with a NaN or inf, whose codes are 0; a step-0 tile's constants make fl2 = 1). k_int2b = floor(c/S) - 2
    - 1.5 * 2^23 puts fl2 + 1.5 * 2^23 in float32 whose low bits are fl2 (as _to_int, one add fewer an
    element): exact while |fl2| <= 2^22, which holds for every element above t0 (fl2 <= Q + 4 + 0.52/S,
    1/S < 2^16); below t0 (only in clamped rows) the code is 0 whatever mag is. Ambiguous: t within the
    band of an integer. CLAMPED (some row of the program has elements the 2^32 range clamp cuts): also
    the 0 / 1 threshold t0, below which the code is 0; in other rows every non-zero |x| lies above it
    (t >= t(min |x|) = -C/S - O(1e-7 / S) > t0 + 1/S / 2)."""
    fl2b, fr, p_int, w = _grid_position(bits, kz, inv_hi, inv_lo, inv_S, k_int2b, k_frac, FAST_LOG2)
    amb = tl.abs(fr - 0.5) > half_band
    mag = tl.minimum(tl.maximum(fl2b.to(tl.int32, bitcast=True) - 0x4B400000, 1), mag_hi)
    if CLAMPED:
        d0 = (p_int - t0_int) + (w - t0_frac)  # t - t0
        amb = amb | (tl.abs(d0) < band)
        mag = tl.where(d0 < 0, 0, mag)
    sign = (x.to(tl.int32, bitcast=True) >> (32 - N_BITS)) & sign_mask  # the sign bit, in place
    if CLAMPED:
        code = tl.where((bits == 0) | (mag == 0), 0, mag | sign)
    else:  # mag >= 1 wherever sign_mask is set
        code = tl.where(bits == 0, 0, mag | sign)
    return code, amb


@triton.jit
def _fast_code(x, bits, a, b, t0, mag_hi, sign_mask, N_BITS: tl.constexpr, FAST_LOG2: tl.constexpr,
               EASY: tl.constexpr = False, PACKED: tl.constexpr = False):
    """The "fast" rounding's n-bit code [R, C] int32 (row constants of ``_row_line`` as [R, 1]; mag_hi Q, or 0 for
    a tile with a NaN or inf, as float32; bits: |x|'s, times 2^24 in scaled rows).

    v = A log2|x| + B = t + 1.5 in one fused multiply-add, log2|x| by lg2.approx of the whole |x| (one MUFU
    instruction: within FAST_LOG2_BOUND beyond the rounding of its result over every binade, checked on each GPU;
    3.8e-6 at worst on the H200, run 40), clamped to [1, mag_hi]; adding 1.5 * 2^23 rounds it to the nearest
    integer, floor(t) + 2, in the low bits (no conversion instruction). Nothing else: no exact position, no band,
    no redo. The code is the nearest one of an x' with |log2 x' - log2|x|| within the errors of the logarithm and
    the arithmetic (coscale.kernels.logfmt ``fast_position_error``). The lower clamp 1: every non-zero |x| of a
    row the range clamp does not cut is at least its minimum, which rounds to 1 or more (t may lie below -1
    there: exp(tile_min) is the fp32-rounded log's, up to 1e-7 above min |x|, many steps of a nearly constant
    tile). Below T0 (the 0 / 1 threshold, a binade under the row's minimum) the code is 0: elements the range
    clamp cuts, and zeros (log2 0 = -inf).

    EASY (every row of the program easy, ``_row_line``; the caller's per-program test): no lower clamp (every
    non-zero |x| has v >= 0.6, so rounds to 1 or more), no T0 (no row is cut by the range clamp), no scale (no
    subnormal): only the upper clamp and the rounding add, where a zero's v = -inf stays -inf (bits 0xFF800000: its
    low n bits 0, bit 31 set); the sign is added where bit 31 is clear, moved from x's bit 31 to bit n - 1 by a high
    multiply (sm_90: one LOP3 and one LEA.HI). 8-bit sm_90 SASS: 7 instructions an element (lg2, FFMA, FMNMX,
    FADD, LOP3, LEA.HI, and PRMT's share of the byte packing) against 11. PACKED: the n bits alone are kept (the
    bit-packed layouts need them; byte and int16 stores drop the rest themselves)."""
    Q: tl.constexpr = (1 << (N_BITS - 1)) - 1
    ax = bits.to(tl.float32, bitcast=True)
    if FAST_LOG2:
        lg = libdevice.fast_log2f(ax)  # lg2.approx: -inf at 0
    else:  # (numpy's log2 would warn at 0)
        lg = tl.where(bits == 0, float("-inf"), tl.log2(tl.where(bits == 0, 1.0, ax)))
    v = lg * a + b
    if EASY:  # every row of the program easy (_row_line): no lower clamp, no threshold; a zero's v stays -inf
        f = (tl.minimum(v, Q * 1.0) + 12582912.0).to(tl.int32, bitcast=True)  # a zero's: -inf, 0xFF800000
        # x's sign where the code is not 0 (f's bit 31 clear), moved to bit n - 1 and added: one LOP3, one LEA.HI
        g = (x.to(tl.int32, bitcast=True) & ~f & -2147483648).to(tl.uint32, bitcast=True)
        code = f + tl.umulhi(g, 1 << N_BITS).to(tl.int32, bitcast=True)
        if PACKED:  # (bit-packed codes need the n bits alone; the stores to bytes or int16 drop the others)
            code = code & ((1 << N_BITS) - 1)
        return code
    lo = tl.minimum(mag_hi, 1.0)  # 0 in a NaN / inf tile, whose codes are all 0
    mag = (tl.minimum(tl.maximum(v, lo), mag_hi) + 12582912.0).to(tl.int32, bitcast=True)
    if N_BITS != 8:  # 8 bits: the code leaves as a byte, which drops the bits above Q (0x4B4000..) by itself
        mag = mag & Q
    sign = (x.to(tl.int32, bitcast=True) >> (32 - N_BITS)) & sign_mask  # the sign bit, in place
    return tl.where(v < t0, 0, mag | sign)


@triton.jit
def _finish_code(mag, x, ax, bad, s32, N_BITS: tl.constexpr):
    """Magnitude -> n-bit code: step-0 tiles take q = 1, zeros and non-finite tiles 0, then the sign."""
    mag = tl.where((s32 > 0)[:, None], mag, 1)
    mag = tl.where((ax == 0) | bad[:, None], 0, mag)
    return tl.where((x < 0) & (mag > 0), mag + (1 << (N_BITS - 1)), mag)


@triton.jit
def _store_groups(code, rows, tile, c0, mask, pay_ptr, stride_p, limit, N_BITS: tl.constexpr, GROUP: tl.constexpr,
                  GBYTES: tl.constexpr, GB_P2: tl.constexpr, BLOCK_R: tl.constexpr, WIDTH: tl.constexpr,
                  TILE_C: tl.constexpr):  # fmt: skip
    """N_BITS-bit values [R, WIDTH] (columns c0.. of the tile) bit-packed to rows: GROUP values in GBYTES
    little-endian bytes (GB_P2 lanes: the next power of two), the region's first ``limit`` bytes; groups
    of up to 4 bytes in int32, wider ones in int64. c0 and WIDTH are multiples of GROUP."""
    NG: tl.constexpr = WIDTH // GROUP
    WORD: tl.constexpr = tl.int64 if GBYTES > 4 else tl.int32
    c3 = tl.reshape(code.to(WORD), (BLOCK_R, NG, GROUP))
    shifts = (N_BITS * tl.arange(0, GROUP)).to(WORD)
    word = tl.sum(c3 << shifts[None, None, :], 2)  # disjoint bits: the sum is an or
    b = tl.arange(0, GB_P2)
    byte = (word[:, :, None] >> (8 * b).to(WORD)[None, None, :]) & 0xFF
    g = tl.arange(0, NG)
    off = (tile * (TILE_C // GROUP) + c0 // GROUP + g[None, :, None]) * GBYTES + b[None, None, :]
    ok = tl.max(mask.to(tl.int32), 1) > 0
    m3 = ok[:, None, None] & (b < GBYTES)[None, None, :] & (off < limit)
    ptr = pay_ptr + rows.to(tl.int64)[:, None, None] * stride_p + off
    tl.store(ptr, byte.to(tl.uint8), mask=m3)


@triton.jit
def _store_codes(code, rows, tile, c0, cols, mask, codes_ptr, stride_c, pay_ptr, stride_p, code_bytes, H,
                 N_BITS: tl.constexpr, PACKED: tl.constexpr, PLANES: tl.constexpr, GROUP: tl.constexpr,
                 GBYTES: tl.constexpr, GB_P2: tl.constexpr, BLOCK_R: tl.constexpr, WIDTH: tl.constexpr,
                 TILE_C: tl.constexpr):  # fmt: skip
    """Codes [R, WIDTH] (columns c0.. of the tile) to the codes array, or to rows (the layouts of
    coscale.kernels.logfmt.code_packing): one code in one or two bytes; PLANES (8 < n < 16): the low bytes
    of all H codes, then their n - 8 high bits bit-packed (GROUP, GBYTES: the high plane's); otherwise
    bit-packed whole."""
    if PACKED and (PLANES or GROUP == 1):  # one byte (or two) per code: a plain row store
        base = pay_ptr + rows.to(tl.int64)[:, None] * stride_p
        off = tile * TILE_C + c0 + tl.arange(0, WIDTH)[None, :]
        if PLANES:
            tl.store(base + off, (code & 0xFF).to(tl.uint8), mask=mask)
            _store_groups(code >> 8, rows, tile, c0, mask, pay_ptr + H, stride_p, code_bytes - H, N_BITS - 8, GROUP,
                          GBYTES, GB_P2, BLOCK_R, WIDTH, TILE_C)  # fmt: skip
        elif GBYTES == 1:
            tl.store(base + off, code.to(tl.uint8), mask=mask)
        else:  # little-endian int16 (rows of even length, code_bytes even)
            tl.store(base.to(tl.pointer_type(tl.int16)) + off, code.to(tl.int16), mask=mask)
    elif PACKED:
        _store_groups(code, rows, tile, c0, mask, pay_ptr, stride_p, code_bytes, N_BITS, GROUP, GBYTES, GB_P2,
                      BLOCK_R, WIDTH, TILE_C)  # fmt: skip
    else:
        ptr = codes_ptr + rows.to(tl.int64)[:, None] * stride_c + cols[None, :]
        tl.store(ptr, code.to(codes_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_row_values(ptr, v, mask, ASM: tl.constexpr):
    """Store one float32 a row ([R] in the layout of a reduction over a [R, C] tile, so each value is held by
    the several threads that held its row). tl.store would first move the values into a layout with one
    thread a value, through shared memory with three barriers a program (sm_90 SASS); with ASM (the GPU)
    every thread holding a value stores it itself (st.global.b32: the same word from a few lanes of one warp,
    one transaction)."""
    if ASM:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $3, 0; @p st.global.b32 [$1], $2; }\n mov.u32 $0, 0;", "=r,l,r,r",
            [ptr.to(tl.int64), v.to(tl.int32, bitcast=True), mask.to(tl.int32)], dtype=tl.int32, is_pure=False,
            pack=1)  # fmt: skip
    else:
        tl.store(ptr, v, mask=mask)


@triton.jit
def _store_stats(m, s, rows, in_r, tile, T, min_ptr, step_ptr, pay_ptr, stride_p, code_bytes,
                 PACKED: tl.constexpr, ASM: tl.constexpr = False):  # fmt: skip
    if PACKED:  # fp32 little-endian bytes after the codes: tile_min[T] then tile_step[T]
        b = tl.arange(0, 4)
        base = pay_ptr + rows.to(tl.int64)[:, None] * stride_p + code_bytes + 4 * tile + b[None, :]
        mb = (m.to(tl.int32, bitcast=True)[:, None] >> (8 * b)[None, :]) & 0xFF
        sb = (s.to(tl.int32, bitcast=True)[:, None] >> (8 * b)[None, :]) & 0xFF
        tl.store(base, mb.to(tl.uint8), mask=in_r[:, None])
        tl.store(base + 4 * T, sb.to(tl.uint8), mask=in_r[:, None])
    else:
        ptr = rows.to(tl.int64) * T + tile
        _store_row_values(min_ptr + ptr, m, in_r, ASM)
        _store_row_values(step_ptr + ptr, s, in_r, ASM)


@triton.jit
def _encode_chunks(x_ptr, idx_ptr, codes_ptr, pay_ptr, N, H, T, stride_x, stride_c, stride_p, code_bytes, seed, rows,
                   tile, keep_c, any_scaled, scale_c, kz_c, hi_c, lo_c, inv_S_c, k_int_c, k_frac_c, t0_int_c, t0_frac_c,
                   band_c, half_c, mag_hi_c, sign_c, live_c, m32, s32, bad, skip,
                   N_BITS: tl.constexpr, STOCHASTIC: tl.constexpr, GATHER: tl.constexpr, TOPK: tl.constexpr,
                   PACKED: tl.constexpr, PLANES: tl.constexpr, GROUP: tl.constexpr, GBYTES: tl.constexpr,
                   GB_P2: tl.constexpr, BLOCK_R: tl.constexpr, TILE_C: tl.constexpr, CHUNK_C: tl.constexpr,
                   CLAMPED: tl.constexpr, FAST_LOG2: tl.constexpr, FAST: tl.constexpr, x_tile, src_tile,
                   EASY: tl.constexpr = False):  # fmt: skip
    """The encoder's element phase: the tile's codes, CHUNK_C columns at a time (x read again, from the
    cache; with one chunk, CHUNK_C = TILE_C, the tile the first phase loaded, x_tile and src_tile), stored
    for the rows of keep_c that hold no ambiguous element so far. Returns (rows with an ambiguous element
    [R] int32, the source row offsets [R]). Row constants as [R, 1] columns (nearest: k_int_c =
    floor(c/S) - 2; stochastic: floor(c/S), and t0_int_c.. live_c unused; FAST: ``_row_line``'s A, B and T0
    in inv_S_c, k_frac_c and t0_frac_c, mag_hi_c as float32, the others unused, no element ambiguous)."""
    Q: tl.constexpr = (1 << (N_BITS - 1)) - 1
    HALVES: tl.constexpr = N_BITS > 8 and not PACKED and CHUNK_C == TILE_C  # (encode_kernel's tile load)
    amb_rows = tl.zeros([BLOCK_R], dtype=tl.int32)
    src = rows.to(tl.int64)
    for c0 in range(0, TILE_C, CHUNK_C):
        cols = tile * TILE_C + c0 + tl.arange(0, CHUNK_C)
        if CHUNK_C == TILE_C:
            x, src = x_tile, src_tile
        else:
            x, src, ok = _load_rows(x_ptr, idx_ptr, rows, cols, N, H, stride_x, GATHER, TOPK)
        bits = tl.abs(x).to(tl.int32, bitcast=True)
        pbits = bits
        if not EASY:  # (EASY: no row of the program is scaled, a multiply an element less)
            if any_scaled:
                pbits = (tl.abs(x) * scale_c).to(tl.int32, bitcast=True)
        if STOCHASTIC:
            rand_off = rows[:, None] * (T * TILE_C) + cols[None, :]
            mag = _stochastic_mag(x, pbits, m32, s32, kz_c, hi_c, lo_c, inv_S_c, k_int_c, k_frac_c, skip, Q, FAST_LOG2,
                                  seed, rand_off)  # fmt: skip
            code = _finish_code(mag, x, tl.abs(x), bad, s32, N_BITS)
        elif FAST:
            code = _fast_code(x, pbits, inv_S_c, k_frac_c, t0_frac_c, mag_hi_c, sign_c, N_BITS, FAST_LOG2, EASY,
                              PACKED)  # fmt: skip
        else:
            code, amb = _nearest_code(x, pbits, kz_c, hi_c, lo_c, inv_S_c, k_int_c, k_frac_c, t0_int_c, t0_frac_c,
                                      band_c, half_c, mag_hi_c, sign_c, CLAMPED, N_BITS, FAST_LOG2)  # fmt: skip
            amb_rows = tl.maximum(amb_rows, tl.max((amb & (bits > 0)).to(tl.int32) * live_c, 1))
        if HALVES:  # int16 codes of the whole tile, in the halves it was loaded in (_load_rows)
            cols3 = _tile_halves(tile * TILE_C, TILE_C)
            mask3 = (keep_c & (amb_rows == 0)[:, None])[:, :, None] & (cols3 < H)
            code3 = tl.reshape(code, (BLOCK_R, 2, TILE_C // 2)).to(codes_ptr.dtype.element_ty)
            tl.store(codes_ptr + rows.to(tl.int64)[:, None, None] * stride_c + cols3, code3, mask=mask3)
        else:
            mask = keep_c & (amb_rows == 0)[:, None] & (cols < H)[None, :]
            _store_codes(code, rows, tile, c0, cols, mask, codes_ptr, stride_c, pay_ptr, stride_p, code_bytes, H,
                         N_BITS, PACKED, PLANES, GROUP, GBYTES, GB_P2, BLOCK_R, CHUNK_C, TILE_C)  # fmt: skip
    return amb_rows, src


@triton.jit(do_not_specialize=["M_BUCKET"])
def encode_kernel(
    x_ptr, idx_ptr, codes_ptr, min_ptr, step_ptr, pay_ptr, N, H, T, M_BUCKET, stride_x, stride_c, stride_p,
    code_bytes, seed, range_clamp, log2_clamp, delta,
    N_BITS: tl.constexpr, STOCHASTIC: tl.constexpr, GATHER: tl.constexpr, TOPK: tl.constexpr,
    PACKED: tl.constexpr, PLANES: tl.constexpr, GROUP: tl.constexpr, GBYTES: tl.constexpr, GB_P2: tl.constexpr,
    BLOCK_R: tl.constexpr, TILE_C: tl.constexpr, CHUNK_C: tl.constexpr, REGATHER: tl.constexpr,
    FAST_LOG2: tl.constexpr, PAIRS: tl.constexpr, PAIR_ASM: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    # One program = BLOCK_R output rows x one 128-column tile; each row of the block is its own LogFMT tile.
    # M_BUCKET (a power-of-two bucket of N, unused) is an autotuning key. Three phases:
    # 1. each row's |x| bit max and min, the tile walked in CHUNK_C-column chunks (PAIRS: x is bf16 with even
    #    H and row stride, read as int32 words of two values, max and min taken lane-wise: _pair_bits; with
    #    one chunk the tile is read as floats, since phase 3 needs them);
    # 2. per row, in float64: the tile numbers and the grid constants. With REGATHER a row's numbers are
    #    computed by one or two threads: the maxima and minima leave through this program's slots of the
    #    statistics and come back with a fresh row index, which Triton lays out one row per thread (two
    #    with BLOCK_R = 16 a warp). Left in the layout of the reductions, each row's float64 work is
    #    repeated by the threads that hold its columns: 16 with 16-column chunks, about 250 float64
    #    instructions per 8 elements, most of the kernel's time (1.05 ms for 32,768 x 7,168 on the H200,
    #    16% of copy bandwidth). Without (the autotuner decides): no barrier, no round trip through L2 (a
    #    program waits for both), and the row constants are already in the elements' layout; with 32 or
    #    more rows a program few threads share a row.
    # 3. the codes, chunk by chunk (x read again, from the cache; with one chunk the tile stays in
    #    registers from phase 1).
    # The chunk loops are loops, not unrolled: registers and compile time stay those of one chunk.
    Q: tl.constexpr = (1 << (N_BITS - 1)) - 1
    pid_r = tl.program_id(0)
    tile = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    in_r = rows < N
    if CHUNK_C == TILE_C:  # the whole tile at once, kept for phase 3
        if N_BITS > 8 and not PACKED:  # int16 codes: the tile in halves (_load_rows says why)
            x_tile, src_tile, _ = _load_rows(x_ptr, idx_ptr, rows, _tile_halves(tile * TILE_C, TILE_C), N, H,
                                             stride_x, GATHER, TOPK, tl.float32, True)  # fmt: skip
        else:
            cols = tile * TILE_C + tl.arange(0, TILE_C)
            x_tile, src_tile, _ = _load_rows(x_ptr, idx_ptr, rows, cols, N, H, stride_x, GATHER, TOPK)
        _, top, low = _tile_bits(x_tile)
    else:
        x_tile = tl.zeros([BLOCK_R, CHUNK_C], dtype=tl.float32)  # placeholders: _encode_chunks loads its chunks
        src_tile = rows.to(tl.int64)
        if PAIRS:
            x32_ptr = x_ptr.to(tl.pointer_type(tl.int32))
            top2 = tl.zeros([BLOCK_R, CHUNK_C // 2], dtype=tl.int32)
            low2 = tl.full([BLOCK_R, CHUNK_C // 2], -1, dtype=tl.int32)  # 0xFFFF in both lanes
            for c0 in range(0, TILE_C, CHUNK_C):
                words = (tile * TILE_C + c0) // 2 + tl.arange(0, CHUNK_C // 2)
                w, src, ok = _load_rows(x32_ptr, idx_ptr, rows, words, N, H // 2, stride_x // 2, GATHER, TOPK,
                                        tl.int32)  # fmt: skip
                top2, low2 = _pair_bits(w, top2, low2, PAIR_ASM)
            top, low = _pair_stats(top2, low2)
        else:
            top = tl.zeros([BLOCK_R], dtype=tl.int32)
            low = tl.full([BLOCK_R], 0x7F800000, dtype=tl.int32)
            for c0 in range(0, TILE_C, CHUNK_C):
                cols = tile * TILE_C + c0 + tl.arange(0, CHUNK_C)
                x, src, ok = _load_rows(x_ptr, idx_ptr, rows, cols, N, H, stride_x, GATHER, TOPK)
                bits, top_c, low_c = _tile_bits(x)
                top = tl.maximum(top, top_c)
                low = tl.minimum(low, low_c)

    if REGATHER:
        _store_stats(top.to(tl.float32, bitcast=True), low.to(tl.float32, bitcast=True), rows, in_r, tile, T,
                     min_ptr, step_ptr, pay_ptr, stride_p, code_bytes, PACKED)  # fmt: skip
        tl.debug_barrier()
        rows1 = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        in_r1 = rows1 < N
        top_f, low_f = _load_stats(rows1.to(tl.int64), in_r1, tile, T, min_ptr, step_ptr, pay_ptr, stride_p,
                                   code_bytes, PACKED, ".cg")  # fmt: skip
        top, low = top_f.to(tl.int32, bitcast=True), low_f.to(tl.int32, bitcast=True)
    else:
        rows1, in_r1 = rows, in_r
    if FAST:  # in float32 (the float64 logs, repeated by every thread that holds part of a row, were most of it)
        bad, m32, s32, amin, amax, clamped_fast = _row_stats_fast(top, low, log2_clamp, Q, FAST_LOG2)
    else:
        bad, m32, s32, amin, amax = _row_stats(top, low, range_clamp, Q)
    # (the PTX store where the numbers come from the row reductions; REGATHER's come one row a thread already)
    _store_stats(tl.where(bad, float("nan"), m32), tl.where(bad, float("nan"), s32), rows1, in_r1, tile, T,
                 min_ptr, step_ptr, pay_ptr, stride_p, code_bytes, PACKED, FAST_LOG2 and not REGATHER)  # fmt: skip
    # A subnormal |x| (rare) has no exponent in its bits: its row is scaled by 2^24 (exact) for the
    # position, unless that would overflow (max |x| >= 2^100; then they are far below the clamp).
    tiny = amin < 1.1754943508222875e-38
    scaled = tiny & (amax < 1.2676506002282294e30) & in_r1  # (rows past N: REGATHER reads their minima as 0)
    if FAST:  # "fast" rounding: the row's line (every other constant unused)
        inv_S, k_frac, t0_frac, easy = _row_line(m32, s32, scaled, N_BITS)
        kz, inv_hi, inv_lo, k_int, t0_int, band, skip = inv_S, inv_S, inv_S, inv_S, inv_S, inv_S, bad
    else:
        kz, inv_hi, inv_lo, inv_S, k_int, k_frac, t0_int, t0_frac, band, skip = _row_grid(
            m32, s32, scaled, delta, N_BITS, STOCHASTIC)
    live = ((s32 > 0) & (bad == 0)).to(tl.int32)  # rows a redo can change (others: q = 1, or 0 and NaN)
    if STOCHASTIC:  # no redo: the fast path handles every row (stochastic codes are not bit-exact)
        redo = tl.zeros([BLOCK_R], dtype=tl.int32)
        clamped = redo
    elif FAST:  # no redo either: the codes are those of a perturbed x (_fast_code), zeros and cut ones below T0
        redo = tl.zeros([BLOCK_R], dtype=tl.int32)
        clamped = redo
        half_band = band
        mag_hi = tl.where(bad, 0.0, Q)
        sign_mask = tl.where(bad, 0, 1 << (N_BITS - 1))
    else:  # rows where the bound does not hold; rows with an element near a threshold are added below
        redo = (skip | (tiny & ~scaled)).to(tl.int32)
        clamped = (amin.to(tl.float64) < amax.to(tl.float64) * range_clamp).to(tl.int32) * live
        # the step-0 tiles (and NaN / inf / zero tiles): constants that give fl2 = 1 and frac 1/2, and
        # no 0 / 1 threshold; mag_hi = 0 and no sign where the tile holds a NaN or inf
        one = live == 0
        inv_hi = tl.where(one, 0.0, inv_hi)
        inv_lo = tl.where(one, 0.0, inv_lo)
        inv_S = tl.where(one, 0.0, inv_S)
        k_int = tl.where(one, 1.0, k_int)  # k_int2 = k_int - 2 = -1
        k_frac = tl.where(one, -0.5, k_frac)
        t0_int = tl.where(one, -1048576.0, t0_int)
        t0_frac = tl.where(one, 0.0, t0_frac)
        half_band = 0.5 - band
        mag_hi = tl.where(bad, 0, Q)
        sign_mask = tl.where(bad, 0, 1 << (N_BITS - 1))
    any_clamped = tl.max(clamped, 0) > 0
    any_scaled = tl.max(scaled.to(tl.int32), 0) > 0
    # the row constants as [R, 1] columns of the element phase's layout, converted once
    kz_c, hi_c, lo_c, inv_S_c, k_frac_c = kz[:, None], inv_hi[:, None], inv_lo[:, None], inv_S[:, None], k_frac[:, None]
    scale_c = tl.where(scaled, 16777216.0, 1.0)[:, None]
    if STOCHASTIC:
        k_int_c = k_int[:, None]
    else:
        k_int2_c = (k_int - 12582914.0)[:, None]  # floor(c/S) - 2 - 1.5 * 2^23 (_nearest_code)
        t0_int_c, t0_frac_c, band_c, half_c = t0_int[:, None], t0_frac[:, None], band[:, None], half_band[:, None]
        mag_hi_c, sign_c, live_c = mag_hi[:, None], sign_mask[:, None], live[:, None]
    keep_c = (in_r1 & (redo * live == 0))[:, None]  # rows the fast path stores (unless found ambiguous)
    # The chunk loop is written out once per branch (not the branch once per chunk): the row constants are
    # then converted to the elements' layout once, not at every use (~100 shared-memory round trips).
    if FAST and tl.max((in_r1 & (bad | scaled | clamped_fast | ~easy)).to(tl.int32), 0) == 0:
        # every row easy (the common case): v's own rounding gives zeros code 0, no lower clamp, no scale
        amb_rows, src = _encode_chunks(
            x_ptr, idx_ptr, codes_ptr, pay_ptr, N, H, T, stride_x, stride_c, stride_p, code_bytes, seed, rows,
            tile, keep_c, False, scale_c, kz_c, hi_c, lo_c, inv_S_c, k_int2_c, k_frac_c, t0_int_c, t0_frac_c,
            band_c, half_c, mag_hi_c, sign_c, live_c, m32, s32, bad, skip, N_BITS, STOCHASTIC, GATHER, TOPK,
            PACKED, PLANES, GROUP, GBYTES, GB_P2, BLOCK_R, TILE_C, CHUNK_C, False, FAST_LOG2, FAST, x_tile,
            src_tile, True)  # fmt: skip
    elif FAST:  # some row is not: each element times its row's scale (1 or 2^24), the lower clamp and T0
        amb_rows, src = _encode_chunks(
            x_ptr, idx_ptr, codes_ptr, pay_ptr, N, H, T, stride_x, stride_c, stride_p, code_bytes, seed, rows,
            tile, keep_c, True, scale_c, kz_c, hi_c, lo_c, inv_S_c, k_int2_c, k_frac_c, t0_int_c, t0_frac_c,
            band_c, half_c, mag_hi_c, sign_c, live_c, m32, s32, bad, skip, N_BITS, STOCHASTIC, GATHER, TOPK,
            PACKED, PLANES, GROUP, GBYTES, GB_P2, BLOCK_R, TILE_C, CHUNK_C, False, FAST_LOG2, FAST, x_tile,
            src_tile)  # fmt: skip
    elif STOCHASTIC:
        amb_rows, src = _encode_chunks(
            x_ptr, idx_ptr, codes_ptr, pay_ptr, N, H, T, stride_x, stride_c, stride_p, code_bytes, seed, rows, tile,
            keep_c, any_scaled, scale_c, kz_c, hi_c, lo_c, inv_S_c, k_int_c, k_frac_c, k_frac_c, k_frac_c, k_frac_c,
            k_frac_c, k_frac_c, k_frac_c, k_frac_c, m32, s32, bad, skip, N_BITS, STOCHASTIC, GATHER, TOPK, PACKED,
            PLANES, GROUP, GBYTES, GB_P2, BLOCK_R, TILE_C, CHUNK_C, False, FAST_LOG2, False, x_tile,
            src_tile)  # fmt: skip
    elif any_clamped:
        amb_rows, src = _encode_chunks(
            x_ptr, idx_ptr, codes_ptr, pay_ptr, N, H, T, stride_x, stride_c, stride_p, code_bytes, seed, rows, tile,
            keep_c, any_scaled, scale_c, kz_c, hi_c, lo_c, inv_S_c, k_int2_c, k_frac_c, t0_int_c, t0_frac_c, band_c,
            half_c, mag_hi_c, sign_c, live_c, m32, s32, bad, skip, N_BITS, STOCHASTIC, GATHER, TOPK, PACKED,
            PLANES, GROUP, GBYTES, GB_P2, BLOCK_R, TILE_C, CHUNK_C, True, FAST_LOG2, False, x_tile,
            src_tile)  # fmt: skip
    else:
        amb_rows, src = _encode_chunks(
            x_ptr, idx_ptr, codes_ptr, pay_ptr, N, H, T, stride_x, stride_c, stride_p, code_bytes, seed, rows, tile,
            keep_c, any_scaled, scale_c, kz_c, hi_c, lo_c, inv_S_c, k_int2_c, k_frac_c, t0_int_c, t0_frac_c, band_c,
            half_c, mag_hi_c, sign_c, live_c, m32, s32, bad, skip, N_BITS, STOCHASTIC, GATHER, TOPK, PACKED,
            PLANES, GROUP, GBYTES, GB_P2, BLOCK_R, TILE_C, CHUNK_C, False, FAST_LOG2, False, x_tile,
            src_tile)  # fmt: skip
    if not (STOCHASTIC or FAST):  # the float64 redo of rows with an ambiguous element (nearest only)
        redo = tl.maximum(redo, amb_rows) * live * in_r1.to(tl.int32)
        if tl.max(redo, 0) > 0:  # rare: those rows again, whole, in the reference's float64 formulas
            tl.debug_barrier()  # after every fast store (a row found ambiguous late has earlier chunks stored)
            cols_t = tile * TILE_C + tl.arange(0, TILE_C)
            while tl.max(redo, 0) > 0:
                r = tl.argmax(redo, 0)
                pick = tl.arange(0, BLOCK_R) == r
                row = pid_r * BLOCK_R + r + tl.arange(0, 1)
                src_r = tl.sum(tl.where(pick, src, 0), 0) + tl.zeros([1], dtype=tl.int64)
                m_r = tl.sum(tl.where(pick, m32, 0.0), 0) + tl.zeros([1], dtype=tl.float32)
                s_r = tl.sum(tl.where(pick, s32, 0.0), 0) + tl.zeros([1], dtype=tl.float32)
                xr = tl.load(x_ptr + src_r[:, None] * stride_x + cols_t[None, :], mask=(cols_t < H)[None, :],
                             other=0.0).to(tl.float32)  # fmt: skip
                axr = tl.abs(xr)
                code_r = _finish_code(_exact_mag(axr, m_r, s_r, Q), xr, axr, m_r != m_r, s_r, N_BITS)
                _store_codes(code_r, row, tile, 0, cols_t, (cols_t < H)[None, :], codes_ptr, stride_c, pay_ptr,
                             stride_p, code_bytes, H, N_BITS, PACKED, PLANES, GROUP, GBYTES, GB_P2, 1, TILE_C,
                             TILE_C)  # fmt: skip
                redo = tl.where(pick, 0, redo)


@triton.jit
def _load_groups(rows, tile, ok, pay_ptr, stride_p, limit, N_BITS: tl.constexpr, GROUP: tl.constexpr,
                 GBYTES: tl.constexpr, GB_P2: tl.constexpr, BLOCK_R: tl.constexpr, TILE_C: tl.constexpr):  # fmt: skip
    """The inverse of ``_store_groups`` for a whole tile: N_BITS-bit values [R, TILE_C] int32."""
    NG: tl.constexpr = TILE_C // GROUP
    WORD: tl.constexpr = tl.int64 if GBYTES > 4 else tl.int32
    g = tl.arange(0, NG)
    b = tl.arange(0, GB_P2)
    off = tile * (NG * GBYTES) + g[None, :, None] * GBYTES + b[None, None, :]
    m3 = ok[:, None, None] & (b < GBYTES)[None, None, :] & (off < limit)
    byte = tl.load(pay_ptr + rows[:, None, None] * stride_p + off, mask=m3, other=0).to(WORD)
    if GBYTES == 1:
        word = tl.reshape(byte, (BLOCK_R, NG))
    else:
        word = tl.sum(byte << (8 * b).to(WORD)[None, None, :], 2)  # [R, NG]
    shifts = (N_BITS * tl.arange(0, GROUP)).to(WORD)
    c3 = (word[:, :, None] >> shifts[None, None, :]) & ((1 << N_BITS) - 1)
    return tl.reshape(c3, (BLOCK_R, TILE_C)).to(tl.int32)


@triton.jit
def _load_code_elems(rows, cols, H, ok, codes_ptr, stride_c, pay_ptr, stride_p, PACKED: tl.constexpr):
    """The stored element of each code [R, C], as stored (0 where not ok): a row byte (PACKED: one byte a code,
    or the low plane) or an element of the codes array."""
    mask = ok[:, None] & (cols < H)[None, :]
    if PACKED:  # one return: Triton checks the types of every return, constexpr branches included
        elems = tl.load(pay_ptr + rows[:, None] * stride_p + cols[None, :], mask=mask, other=0)
    else:
        elems = tl.load(codes_ptr + rows[:, None] * stride_c + cols[None, :], mask=mask, other=0)
    return elems


@triton.jit
def _load_codes(rows, tile, cols, H, ok, codes_ptr, stride_c, pay_ptr, stride_p, code_bytes,
                N_BITS: tl.constexpr, PACKED: tl.constexpr, PLANES: tl.constexpr, GROUP: tl.constexpr,
                GBYTES: tl.constexpr, GB_P2: tl.constexpr, BLOCK_R: tl.constexpr, TILE_C: tl.constexpr):  # fmt: skip
    """The n-bit codes [R, C] int32 of rows (int64 [R]) at this tile's columns; 0 where not ok (the layouts
    of ``_store_codes``)."""
    if PACKED and (PLANES or GROUP == 1):  # one byte (or two) per code: a plain row load
        if PLANES:
            code = _load_code_elems(rows, cols, H, ok, codes_ptr, stride_c, pay_ptr, stride_p, True).to(tl.int32)
            high = _load_groups(rows, tile, ok, pay_ptr + H, stride_p, code_bytes - H, N_BITS - 8, GROUP, GBYTES,
                                GB_P2, BLOCK_R, TILE_C)  # fmt: skip
            code = code | (high << 8)
        elif GBYTES == 1:
            code = _load_code_elems(rows, cols, H, ok, codes_ptr, stride_c, pay_ptr, stride_p, True).to(tl.int32)
        else:
            base = pay_ptr + rows[:, None] * stride_p
            mask = ok[:, None] & (cols < H)[None, :]
            code = tl.load(base.to(tl.pointer_type(tl.int16)) + cols[None, :], mask=mask, other=0).to(tl.int32)
        code = code & ((1 << N_BITS) - 1)
    elif PACKED:
        code = _load_groups(rows, tile, ok, pay_ptr, stride_p, code_bytes, N_BITS, GROUP, GBYTES, GB_P2, BLOCK_R,
                            TILE_C)  # fmt: skip
    else:
        code = _load_code_elems(rows, cols, H, ok, codes_ptr, stride_c, pay_ptr, stride_p, False).to(tl.int32)
        code = code & ((1 << N_BITS) - 1)
    return code


@triton.jit
def _load_stats(rows, ok, tile, T, min_ptr, step_ptr, pay_ptr, stride_p, code_bytes, PACKED: tl.constexpr,
                CACHE: tl.constexpr):  # fmt: skip
    """(tile_min, tile_step) [R] of rows at this tile. CACHE: the loads' cache modifier ("" or ".cg": from L2,
    for the encoder's read-back of values this program has just stored)."""
    if PACKED:
        b = tl.arange(0, 4)
        base = pay_ptr + rows[:, None] * stride_p + code_bytes + 4 * tile + b[None, :]
        mb = tl.load(base, mask=ok[:, None], other=0, cache_modifier=CACHE).to(tl.int32)
        sb = tl.load(base + 4 * T, mask=ok[:, None], other=0, cache_modifier=CACHE).to(tl.int32)
        m = tl.sum(mb << (8 * b)[None, :], 1).to(tl.float32, bitcast=True)
        s = tl.sum(sb << (8 * b)[None, :], 1).to(tl.float32, bitcast=True)
    else:
        m = tl.load(min_ptr + rows * T + tile, mask=ok, other=0.0, cache_modifier=CACHE)
        s = tl.load(step_ptr + rows * T + tile, mask=ok, other=0.0, cache_modifier=CACHE)
    return m, s


@triton.jit
def _byte_fields(code):
    """uint8 LogFMT-8 codes [R, C] -> (the float 2^23 + q, q = the magnitude code, the code's sign bit at bit 31
    and zeros elsewhere), two byte permutes and an and a code (GPU only): prmt puts the code's byte under the
    bytes of 0x4B000000 (2^23 as a float; 2^23 + q is exact), where Triton's own byte extraction and masks
    (on 16-bit pairs) took about five instructions a code. A prmt selector's nibble i names the source of
    the result's byte i: 0-3 the codes' word ($8: four codes, the first in the low byte), 4-7 the other
    operand; so 0x765k is code k under 0x4B0000, and 0xk444 code k in the top byte over zeros."""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 c, z; mov.b32 c, 0x4B000000; mov.b32 z, 0; "
        "prmt.b32 $0, $8, c, 0x7650; and.b32 $0, $0, 0x4B00007F; "
        "prmt.b32 $1, $8, c, 0x7651; and.b32 $1, $1, 0x4B00007F; "
        "prmt.b32 $2, $8, c, 0x7652; and.b32 $2, $2, 0x4B00007F; "
        "prmt.b32 $3, $8, c, 0x7653; and.b32 $3, $3, 0x4B00007F; "
        "prmt.b32 $4, $8, z, 0x0444; and.b32 $4, $4, 0x80000000; "
        "prmt.b32 $5, $8, z, 0x1444; and.b32 $5, $5, 0x80000000; "
        "prmt.b32 $6, $8, z, 0x2444; and.b32 $6, $6, 0x80000000; "
        "prmt.b32 $7, $8, z, 0x3444; and.b32 $7, $7, 0x80000000; }",
        "=r,=r,=r,=r,=r,=r,=r,=r,r", [code], dtype=(tl.float32, tl.int32), is_pure=True, pack=4)


@triton.jit
def _decode_term(rows, tile, cols, H, in_o, k, outs, codes_ptr, min_ptr, step_ptr, pay_ptr, w_ptr, stride_c, stride_p,
                 code_bytes, T, N_BITS: tl.constexpr, PACKED: tl.constexpr, PLANES: tl.constexpr,
                 GROUP: tl.constexpr, GBYTES: tl.constexpr, GB_P2: tl.constexpr, TOPK: tl.constexpr,
                 HAS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr, TILE_C: tl.constexpr,
                 BYTE_ASM: tl.constexpr):  # fmt: skip
    """w[t, k] * decode(rows) [R, C] float32 (rows int64 [R]; the weight only with HAS_WEIGHT)."""
    Q: tl.constexpr = (1 << (N_BITS - 1)) - 1
    LOG2E: tl.constexpr = 1.4426950216293335  # log2 e rounded to float32, and the rest
    LOG2E_LO: tl.constexpr = 1.92596298909109e-08
    m, s = _load_stats(rows, in_o, tile, T, min_ptr, step_ptr, pay_ptr, stride_p, code_bytes, PACKED, "")
    if BYTE_ASM:  # one code a byte, 8 bits (the plain codes array or rows of bytes): see _byte_fields
        raw = _load_code_elems(rows, cols, H, in_o, codes_ptr, stride_c, pay_ptr, stride_p, PACKED)
        big, sign = _byte_fields(raw.to(tl.uint8, bitcast=True))
        steps = big - 8388609.0  # (2^23 + q) - (2^23 + 1) = q - 1, exact
        zero = steps < 0.0  # q = 0
    else:
        code = _load_codes(rows, tile, cols, H, in_o, codes_ptr, stride_c, pay_ptr, stride_p, code_bytes,
                           N_BITS, PACKED, PLANES, GROUP, GBYTES, GB_P2, BLOCK_R, TILE_C)  # fmt: skip
        mag = code & Q
        steps = (mag | 0x4B000000).to(tl.float32, bitcast=True) - 8388609.0  # 2^23 + q - (2^23 + 1): no I2F
        zero = mag == 0
        sign = (code << (32 - N_BITS)) & -2147483648  # the code's top bit at the float's sign
    # exp(m + s (q - 1)) as 2^(m log2 e + s log2 e (q - 1)): the two products once per row, not a multiply
    # an element. tl.math.exp2 is ex2.approx.ftz (one instruction; results below 2^-126 would flush to
    # zero), so a row whose smallest value lies below 2^-60 is computed 2^64 higher and scaled back by
    # one exact (or, into the subnormals, correctly rounded) multiply; its largest value is at most 2^32
    # above its smallest (the encoder's clamp), so the raised one cannot overflow. Code 0 gives m - m:
    # +0, or NaN for a non-finite tile (m = NaN), whose other codes are NaN through the exponential: one
    # select an element for both. The sign bit is or-ed into the float's (-val, -0 included).
    # m log2 e and s log2 e carry their rounding errors (the product's, from an FMA, and log2 e's own) in
    # a second term, so the exponent is as exact as the natural-log form m + s (q - 1) was.
    m2 = m * LOG2E
    m2_lo = tl.fma(m, LOG2E, -m2) + m * LOG2E_LO
    s2 = s * LOG2E
    s2_lo = tl.fma(s, LOG2E, -s2) + s * LOG2E_LO
    tiny = m2 < -60.0
    hi = tl.where(tiny, m2 + 64.0, m2)[:, None] + s2[:, None] * steps  # m2 + 64: exact
    val = tl.math.exp2(hi + (m2_lo[:, None] + s2_lo[:, None] * steps))
    val = val * tl.where(tiny, 5.421010862427522e-20, 1.0)[:, None]  # 2^-64
    val = tl.where(zero, (m - m)[:, None], val)
    val = (val.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + outs.to(tl.int64) * TOPK + k, mask=in_o, other=0.0)
        val = val * w[:, None]
    return val


@triton.jit(do_not_specialize=["M_BUCKET"])
def decode_sum_kernel(
    codes_ptr, min_ptr, step_ptr, pay_ptr, pair_row_ptr, w_ptr, out_ptr, N_OUT, H, T, M_BUCKET,
    stride_c, stride_p, code_bytes, stride_o,
    N_BITS: tl.constexpr, PACKED: tl.constexpr, PLANES: tl.constexpr, GROUP: tl.constexpr, GBYTES: tl.constexpr,
    GB_P2: tl.constexpr, TOPK: tl.constexpr, GATHER: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr,
    TILE_C: tl.constexpr, BYTE_ASM: tl.constexpr,
):  # fmt: skip
    # One program = BLOCK_R output rows x one tile: out[t] = sum_k w[t, k] * decode(row pair_row[t, k]),
    # in k order, float32 (GATHER False: TOPK = 1 and the row is t). BYTE_ASM (GPU, LogFMT-8 codes a byte
    # each): the codes' fields by inline PTX (_byte_fields).
    tile = tl.program_id(1)
    outs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tile * TILE_C + tl.arange(0, TILE_C)
    in_o = outs < N_OUT
    if TOPK == 1 and not HAS_WEIGHT:  # the decoded row itself (a sum from +0 would cost an add an element)
        acc = _decode_term(outs.to(tl.int64), tile, cols, H, in_o, 0, outs, codes_ptr, min_ptr, step_ptr, pay_ptr,
                           w_ptr, stride_c, stride_p, code_bytes, T, N_BITS, PACKED, PLANES, GROUP, GBYTES, GB_P2,
                           TOPK, HAS_WEIGHT, BLOCK_R, TILE_C, BYTE_ASM)  # fmt: skip
    else:
        acc = tl.zeros([BLOCK_R, TILE_C], dtype=tl.float32)  # the reference's sum starts at +0
        for k in range(TOPK):
            if GATHER:
                rows = tl.load(pair_row_ptr + outs.to(tl.int64) * TOPK + k, mask=in_o, other=0).to(tl.int64)
            else:
                rows = outs.to(tl.int64)
            acc += _decode_term(rows, tile, cols, H, in_o, k, outs, codes_ptr, min_ptr, step_ptr, pay_ptr, w_ptr,
                                stride_c, stride_p, code_bytes, T, N_BITS, PACKED, PLANES, GROUP, GBYTES, GB_P2, TOPK,
                                HAS_WEIGHT, BLOCK_R, TILE_C, BYTE_ASM)  # fmt: skip
    o_ptrs = out_ptr + outs.to(tl.int64)[:, None] * stride_o + cols[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_o[:, None] & (cols < H)[None, :])


@triton.jit
def log2_check_kernel(out_ptr, first, BLOCK: tl.constexpr, ROUNDING: tl.constexpr):
    # The bound the encoder assumes for lg2.approx.f32, checked on the GPU it runs on: out[pid] = max
    # |lg2.approx(v) - log2(v)| (float64) over this program's share of consecutive float32 bit patterns from
    # ``first``: the mantissas [sqrt(1/2), sqrt(2)) (0x3F3504F4, the range _log2_mantissa feeds it), or with
    # ROUNDING every normal float32 (0x00800000 on), less the rounding of the result (|log2 v| 2^-24): "fast"
    # rounding feeds it whole |x| (its bound: coscale.kernels.logfmt.fast_position_error).
    bits = first + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = bits.to(tl.float32, bitcast=True)
    ref = tl.log2(v.to(tl.float64))
    err = tl.abs(libdevice.fast_log2f(v).to(tl.float64) - ref)
    if ROUNDING:
        err = err - tl.abs(ref) * 5.9604644775390625e-08
    tl.store(out_ptr + tl.program_id(0), tl.max(err, 0))
