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

Encode, nearest rounding, fast path in float32 (the exactness argument is in coscale.kernels.logfmt):
log2|x| = E + ln(mant) / ln 2 with E the exponent (exact, from the bits) and mant in [sqrt(1/2), sqrt(2));
ln(mant) = 2 atanh(f / (2 + f)), f = mant - 1, by its odd series to u^11 in float32 (|error| <= 7e-8 in
log2 units with correctly rounded division, measured over every fp32 mantissa; <= 1.3e-7 with the GPU's
2-ulp division). The position on the code grid, t = (log2|x| - floor(M) - frac(M) - C) / S (M, S, C the
tile's grid origin, step and midpoint offset in log2 units, float64 per tile), is formed in float64 from
the integer E - floor(M) and the float32 logarithm, so its only error is the logarithm's. Elements within
``DELTA`` (log2 units) of a rounding threshold are "ambiguous": their row is recomputed with the
reference's float64 formulas (float64 log and exp, the linear-domain comparison) and the fast path does
not store it. Every other element's code is the reference's: the reference decides exactly except within
~1e-15 relative of a threshold, and the fast path's position error is below DELTA.
"""

import triton
import triton.language as tl


@triton.jit
def _load_rows(x_ptr, idx_ptr, rows, cols, N, H, stride_x, GATHER: tl.constexpr, TOPK: tl.constexpr):
    """(x [R, C] float32, source row offsets [R] int64, row live [R]); zeros outside and on padding rows."""
    in_r = rows < N
    if GATHER:
        pair = tl.load(idx_ptr + rows, mask=in_r, other=-1)
        ok = in_r & (pair >= 0)
        src = tl.where(ok, pair // TOPK, 0).to(tl.int64)
    else:
        ok = in_r
        src = rows.to(tl.int64)
    mask = ok[:, None] & (cols < H)[None, :]
    x = tl.load(x_ptr + src[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return x, src, ok


@triton.jit
def _tile_stats(x, range_clamp, Q: tl.constexpr):
    """(|x| with non-finite tiles zeroed, bad [R], m32 [R], s32 [R]): the reference's _tile_stats in float64."""
    ax = tl.abs(x)
    bad = tl.max(((x != x) | (ax == float("inf"))).to(tl.int32), 1) > 0
    ax = tl.where(bad[:, None], 0.0, ax)
    amax = tl.max(ax, 1)
    amin = tl.min(tl.where(ax > 0, ax, float("inf")), 1)
    live = (amax > 0) & (bad == 0)
    amax64 = tl.where(live, amax, 1.0).to(tl.float64)
    amin64 = tl.maximum(tl.where(live, amin, 1.0).to(tl.float64), amax64 * range_clamp)
    lmax = tl.log(amax64)
    lmin = tl.log(amin64)
    m32 = tl.where(live, lmin.to(tl.float32), 0.0)
    s32 = tl.where(live, ((lmax - lmin) / (Q - 1)).to(tl.float32), 0.0)
    return ax, bad, m32, s32


@triton.jit
def _ln_mantissa(ax):
    """(E int32, ln(mant) float32) with |x| = 2^E * mant, mant in [sqrt(1/2), sqrt(2)); ax > 0 finite."""
    sub = ax < 1.1754943508222875e-38  # subnormal: scale by 2^24 (exact) first
    axn = tl.where(sub, ax * 16777216.0, ax)
    bits = axn.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 - tl.where(sub, 24, 0)
    mbits = (bits & 0x7FFFFF) | 0x3F800000
    big = mbits > 0x3FB504F3  # mant > sqrt(2): halve it
    mant = mbits.to(tl.float32, bitcast=True)
    mant = tl.where(big, mant * 0.5, mant)
    e = e + big.to(tl.int32)
    f = mant - 1.0  # exact (Sterbenz)
    u = f / (2.0 + f)
    u2 = u * u
    p = 0.6666666666666666 + u2 * (0.4 + u2 * (0.2857142857142857 + u2 * (0.2222222222222222
                                                                         + u2 * 0.18181818181818182)))
    return e, 2.0 * u + u * u2 * p


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
def _fast_mag(ax, m32, s32, delta, Q: tl.constexpr, STOCHASTIC: tl.constexpr, seed, rand_off):
    """(magnitude code [R, C] int32, ambiguous [R, C]): see the module docstring."""
    m = m32.to(tl.float64)
    s_safe = tl.where(s32 > 0, s32, 1.0).to(tl.float64)
    ln2 = tl.log(tl.zeros_like(m) + 2.0)  # float64 ln 2 (a Python literal would be an fp32 constant)
    big_m = m / ln2  # grid origin, step and midpoint offset in log2 units
    step = s_safe / ln2
    mid = tl.log((1.0 + tl.exp(s_safe)) * 0.5) / ln2
    m_int = tl.floor(big_m)
    origin = big_m - m_int
    inv_step = 1.0 / step
    e, ln = _ln_mantissa(tl.where(ax > 0, ax, 1.0))
    z = (e - m_int.to(tl.int32)[:, None]).to(tl.float64)
    pos = z + ln.to(tl.float64) * (1.0 / ln2)[:, None] - origin[:, None]  # log2|x| - M
    if STOCHASTIC:
        k = tl.floor(pos * inv_step[:, None])
        k = tl.minimum(tl.maximum(k, -1.0), Q - 2.0)
        mf = m[:, None]
        sf = s_safe[:, None]
        lower = tl.where(k < 0, 0.0, tl.exp((mf + sf * k).to(tl.float32)))
        upper = tl.exp((mf + sf * (k + 1.0)).to(tl.float32))
        u = tl.rand(seed, rand_off)
        up = u * (upper - lower) < ax - lower
        mag = k.to(tl.int32) + 1 + up.to(tl.int32)
        amb = mag < 0  # all false
    else:
        t = (pos - mid[:, None]) * inv_step[:, None]  # thresholds at the integers
        t0 = ((-1.0 - mid) * inv_step)[:, None]  # the 0 / 1 threshold: |x| = exp(m) / 2
        dt = (delta * inv_step)[:, None]
        tc = tl.minimum(tl.maximum(t, -1.5), Q + 0.5)  # past the clamps a half: never ambiguous
        fl = tl.floor(tc)
        fr = tc - fl
        amb = (fr < dt) | (fr > 1.0 - dt) | (tl.abs(t - t0) < dt)
        mag = tl.minimum(tl.maximum(fl.to(tl.int32) + 2, 1), Q)
        mag = tl.where(t < t0, 0, mag)
    return mag, amb


@triton.jit
def _finish_code(mag, x, ax, bad, s32, N_BITS: tl.constexpr):
    """Magnitude -> n-bit code: step-0 tiles take q = 1, zeros and non-finite tiles 0, then the sign."""
    mag = tl.where((s32 > 0)[:, None], mag, 1)
    mag = tl.where((ax == 0) | bad[:, None], 0, mag)
    return tl.where((x < 0) & (mag > 0), mag + (1 << (N_BITS - 1)), mag)


@triton.jit
def _store_codes(code, rows, tile, cols, mask, codes_ptr, stride_c, pay_ptr, stride_p, code_bytes,
                 N_BITS: tl.constexpr, PACKED: tl.constexpr, GROUP: tl.constexpr, GBYTES: tl.constexpr,
                 BLOCK_R: tl.constexpr, TILE_C: tl.constexpr):  # fmt: skip
    """Codes [R, C] to the codes array, or bit-packed (GROUP codes in GBYTES little-endian bytes) to rows."""
    if PACKED:
        NG: tl.constexpr = TILE_C // GROUP
        c3 = tl.reshape(code.to(tl.int64), (BLOCK_R, NG, GROUP))
        shifts = (N_BITS * tl.arange(0, GROUP)).to(tl.int64)
        word = tl.sum(c3 << shifts[None, None, :], 2)  # disjoint bits: the sum is an or
        b = tl.arange(0, 8)
        byte = (word[:, :, None] >> (8 * b).to(tl.int64)[None, None, :]) & 0xFF
        g = tl.arange(0, NG)
        off = tile * (NG * GBYTES) + g[None, :, None] * GBYTES + b[None, None, :]
        ok = tl.max(mask.to(tl.int32), 1) > 0
        m3 = ok[:, None, None] & (b < GBYTES)[None, None, :] & (off < code_bytes)
        ptr = pay_ptr + rows.to(tl.int64)[:, None, None] * stride_p + off
        tl.store(ptr, byte.to(tl.uint8), mask=m3)
    else:
        ptr = codes_ptr + rows.to(tl.int64)[:, None] * stride_c + cols[None, :]
        tl.store(ptr, code.to(codes_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_stats(m, s, rows, in_r, tile, T, min_ptr, step_ptr, pay_ptr, stride_p, code_bytes,
                 PACKED: tl.constexpr):  # fmt: skip
    if PACKED:  # fp32 little-endian bytes after the codes: tile_min[T] then tile_step[T]
        b = tl.arange(0, 4)
        base = pay_ptr + rows.to(tl.int64)[:, None] * stride_p + code_bytes + 4 * tile + b[None, :]
        mb = (m.to(tl.int32, bitcast=True)[:, None] >> (8 * b)[None, :]) & 0xFF
        sb = (s.to(tl.int32, bitcast=True)[:, None] >> (8 * b)[None, :]) & 0xFF
        tl.store(base, mb.to(tl.uint8), mask=in_r[:, None])
        tl.store(base + 4 * T, sb.to(tl.uint8), mask=in_r[:, None])
    else:
        ptr = rows.to(tl.int64) * T + tile
        tl.store(min_ptr + ptr, m, mask=in_r)
        tl.store(step_ptr + ptr, s, mask=in_r)


@triton.jit
def encode_kernel(
    x_ptr, idx_ptr, codes_ptr, min_ptr, step_ptr, pay_ptr, N, H, T, stride_x, stride_c, stride_p, code_bytes,
    seed, range_clamp, delta,
    N_BITS: tl.constexpr, STOCHASTIC: tl.constexpr, GATHER: tl.constexpr, TOPK: tl.constexpr,
    PACKED: tl.constexpr, GROUP: tl.constexpr, GBYTES: tl.constexpr, BLOCK_R: tl.constexpr,
    TILE_C: tl.constexpr,
):  # fmt: skip
    # One program = BLOCK_R output rows x one 128-column tile; each row of the block is its own LogFMT tile.
    Q: tl.constexpr = (1 << (N_BITS - 1)) - 1
    pid_r = tl.program_id(0)
    tile = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tile * TILE_C + tl.arange(0, TILE_C)
    in_r = rows < N
    x, src, ok = _load_rows(x_ptr, idx_ptr, rows, cols, N, H, stride_x, GATHER, TOPK)
    ax, bad, m32, s32 = _tile_stats(x, range_clamp, Q)
    _store_stats(tl.where(bad, float("nan"), m32), tl.where(bad, float("nan"), s32), rows, in_r, tile, T,
                 min_ptr, step_ptr, pay_ptr, stride_p, code_bytes, PACKED)  # fmt: skip
    rand_off = rows[:, None] * (T * TILE_C) + cols[None, :]
    mag, amb = _fast_mag(ax, m32, s32, delta, Q, STOCHASTIC, seed, rand_off)
    amb = amb & (ax > 0) & (s32 > 0)[:, None] & (bad == 0)[:, None]
    redo = tl.max(amb.to(tl.int32), 1)  # [R]: rows with an element near a threshold
    code = _finish_code(mag, x, ax, bad, s32, N_BITS)
    mask = (in_r & (redo == 0))[:, None] & (cols < H)[None, :]
    _store_codes(code, rows, tile, cols, mask, codes_ptr, stride_c, pay_ptr, stride_p, code_bytes,
                 N_BITS, PACKED, GROUP, GBYTES, BLOCK_R, TILE_C)  # fmt: skip
    if tl.max(redo, 0) > 0:  # rare: those rows again, in the reference's float64 formulas
        for r in range(BLOCK_R):
            pick = tl.arange(0, BLOCK_R) == r
            if tl.sum(tl.where(pick, redo, 0), 0) > 0:
                row = pid_r * BLOCK_R + r + tl.arange(0, 1)
                src_r = tl.sum(tl.where(pick, src, 0), 0) + tl.zeros([1], dtype=tl.int64)
                m_r = tl.sum(tl.where(pick, m32, 0.0), 0) + tl.zeros([1], dtype=tl.float32)
                s_r = tl.sum(tl.where(pick, s32, 0.0), 0) + tl.zeros([1], dtype=tl.float32)
                xr = tl.load(x_ptr + src_r[:, None] * stride_x + cols[None, :], mask=(cols < H)[None, :],
                             other=0.0).to(tl.float32)  # fmt: skip
                axr = tl.abs(xr)
                code_r = _finish_code(_exact_mag(axr, m_r, s_r, Q), xr, axr, m_r != m_r, s_r, N_BITS)
                _store_codes(code_r, row, tile, cols, (cols < H)[None, :], codes_ptr, stride_c, pay_ptr, stride_p,
                             code_bytes, N_BITS, PACKED, GROUP, GBYTES, 1, TILE_C)  # fmt: skip


@triton.jit
def _load_codes(rows, tile, cols, H, ok, codes_ptr, stride_c, pay_ptr, stride_p, code_bytes,
                N_BITS: tl.constexpr, PACKED: tl.constexpr, GROUP: tl.constexpr, GBYTES: tl.constexpr,
                BLOCK_R: tl.constexpr, TILE_C: tl.constexpr):  # fmt: skip
    """The n-bit codes [R, C] int32 of rows (int64 [R]) at this tile's columns; 0 where not ok."""
    if PACKED:
        NG: tl.constexpr = TILE_C // GROUP
        g = tl.arange(0, NG)
        b = tl.arange(0, 8)
        off = tile * (NG * GBYTES) + g[None, :, None] * GBYTES + b[None, None, :]
        m3 = ok[:, None, None] & (b < GBYTES)[None, None, :] & (off < code_bytes)
        byte = tl.load(pay_ptr + rows[:, None, None] * stride_p + off, mask=m3, other=0).to(tl.int64)
        word = tl.sum(byte << (8 * b).to(tl.int64)[None, None, :], 2)  # [R, NG]
        shifts = (N_BITS * tl.arange(0, GROUP)).to(tl.int64)
        c3 = (word[:, :, None] >> shifts[None, None, :]) & ((1 << N_BITS) - 1)
        code = tl.reshape(c3, (BLOCK_R, TILE_C)).to(tl.int32)
    else:
        mask = ok[:, None] & (cols < H)[None, :]
        code = tl.load(codes_ptr + rows[:, None] * stride_c + cols[None, :], mask=mask, other=0).to(tl.int32)
        code = code & ((1 << N_BITS) - 1)
    return code


@triton.jit
def _load_stats(rows, ok, tile, T, min_ptr, step_ptr, pay_ptr, stride_p, code_bytes, PACKED: tl.constexpr):
    if PACKED:
        b = tl.arange(0, 4)
        base = pay_ptr + rows[:, None] * stride_p + code_bytes + 4 * tile + b[None, :]
        mb = tl.load(base, mask=ok[:, None], other=0).to(tl.int32)
        sb = tl.load(base + 4 * T, mask=ok[:, None], other=0).to(tl.int32)
        m = tl.sum(mb << (8 * b)[None, :], 1).to(tl.float32, bitcast=True)
        s = tl.sum(sb << (8 * b)[None, :], 1).to(tl.float32, bitcast=True)
    else:
        m = tl.load(min_ptr + rows * T + tile, mask=ok, other=0.0)
        s = tl.load(step_ptr + rows * T + tile, mask=ok, other=0.0)
    return m, s


@triton.jit
def decode_sum_kernel(
    codes_ptr, min_ptr, step_ptr, pay_ptr, pair_row_ptr, w_ptr, out_ptr, N_OUT, H, T,
    stride_c, stride_p, code_bytes, stride_o,
    N_BITS: tl.constexpr, PACKED: tl.constexpr, GROUP: tl.constexpr, GBYTES: tl.constexpr,
    TOPK: tl.constexpr, GATHER: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr,
    TILE_C: tl.constexpr,
):  # fmt: skip
    # One program = BLOCK_R output rows x one tile: out[t] = sum_k w[t, k] * decode(row pair_row[t, k]),
    # in k order, float32 (GATHER False: TOPK = 1 and the row is t).
    Q: tl.constexpr = (1 << (N_BITS - 1)) - 1
    tile = tl.program_id(1)
    outs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tile * TILE_C + tl.arange(0, TILE_C)
    in_o = outs < N_OUT
    acc = tl.zeros([BLOCK_R, TILE_C], dtype=tl.float32)
    for k in range(TOPK):
        if GATHER:
            rows = tl.load(pair_row_ptr + outs.to(tl.int64) * TOPK + k, mask=in_o, other=0).to(tl.int64)
        else:
            rows = outs.to(tl.int64)
        code = _load_codes(rows, tile, cols, H, in_o, codes_ptr, stride_c, pay_ptr, stride_p, code_bytes,
                           N_BITS, PACKED, GROUP, GBYTES, BLOCK_R, TILE_C)  # fmt: skip
        m, s = _load_stats(rows, in_o, tile, T, min_ptr, step_ptr, pay_ptr, stride_p, code_bytes, PACKED)
        mag = code & Q
        val = tl.exp(m[:, None] + s[:, None] * (mag - 1).to(tl.float32))
        val = tl.where(mag == 0, 0.0, val)
        val = tl.where(((code >> (N_BITS - 1)) & 1) != 0, -val, val)
        val = tl.where((m != m)[:, None], float("nan"), val)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + outs.to(tl.int64) * TOPK + k, mask=in_o, other=0.0)
            val = val * w[:, None]
        acc += val
    o_ptrs = out_ptr + outs.to(tl.int64)[:, None] * stride_o + cols[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_o[:, None] & (cols < H)[None, :])
