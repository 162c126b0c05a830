"""LogFMT's float32 encoder: its error bound (a numpy mirror of the kernel's position arithmetic against
float64, on random and adversarial elements), the rate of rows it sends to the float64 redo, and the
kernel against the float64 reference bit for bit on hard inputs (interpreter on CPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math

import numpy as np
import pytest
import torch

from coscale.kernels import logfmt as lf
from test_logfmt import KERNEL_DEVICE, on_kernel_device

needs_triton = pytest.mark.skipif(
    not (lf.triton_available() and (lf.interpreting() or torch.cuda.is_available())),
    reason="needs triton (interpreter on CPU)",
)
F32, F64 = np.float32, np.float64


def _fma32(a, b, c):
    """A float32 fused multiply-add (the GPU contracts a * b + c): one rounding of the exact result."""
    return (a.astype(F64) * b.astype(F64) + c.astype(F64)).astype(F32)


def _nudge(v, ulps):
    for _ in range(abs(ulps)):
        v = np.nextafter(v, F32(math.copysign(np.inf, ulps)))
    return v


def row_grid(m32, s32, n_bits, delta=lf.DELTA, scaled=None):
    """The kernel's _row_grid in numpy (float64, each result rounded once to float32)."""
    inv_ln2 = 1 / math.log(2)  # the float64 nearest 1/ln 2 (0x3FF71547652B82FE)
    m = m32.astype(F64)
    s = np.where(s32 > 0, s32, F32(1)).astype(F64)
    big_m = m * inv_ln2
    m_int = np.floor(big_m)
    inv_step = 1.0 / (s * inv_ln2)
    if n_bits >= 8:
        y = 0.5 * s
        y2 = y * y
        lc = y2 * (0.5 - y2 * (1 / 12 - y2 * (1 / 45 - y2 * (17 / 2520 - y2 * (31 / 14175)))))
        mid = (y + lc) * inv_ln2
    else:
        mid = np.log((1.0 + np.exp(s)) * 0.5) * inv_ln2
    k = ((big_m - m_int) + mid) * inv_step
    k_int = np.floor(k)
    hi = (inv_step.view(np.int64) & -(1 << 38)).view(F64)
    t0 = -(1.0 + mid) * inv_step
    t0_int = np.floor(t0)
    band = (F64(F32(delta)) * inv_step).astype(F32) + F32(2.0**-20)
    kz = 12582912.0 + m_int + (24.0 * scaled if scaled is not None else 0.0)
    return dict(kz=kz.astype(F32), hi=hi.astype(F32), lo=(inv_step - hi).astype(F32),
                inv_S=inv_step.astype(F32), k_int=k_int.astype(F32), k_frac=(k - k_int).astype(F32),
                t0_int=(k_int + t0_int).astype(F32), t0_frac=(t0 - t0_int).astype(F32), band=band,
                skip=(inv_step >= 65536) | (band >= 0.25), mid_ln=mid / inv_ln2)


LG2_ERR = lf.LOG2_BOUND  # lg2.approx.f32 on [sqrt(1/2), sqrt(2)): the bound the GPU's check enforces


def grid_position(ax, g, lg_err=0.0, fused=False):
    """The kernel's _log2_mantissa + _grid_position in numpy float32, log2(mant) off by lg_err (the worst
    the GPU's lg2.approx may be): (floor t, frac t, t - t0) [R, C]."""
    bits = ax.astype(F32).view(np.int32)
    e = (bits - 0x3F3504F4) >> 23
    mant = (bits - (e << 23)).view(F32)
    lg = (np.log2(mant.astype(F64)) + lg_err).astype(F32)
    mul_add = _fma32 if fused else (lambda a, b, c: a * b + c)
    col = {k: v[:, None] for k, v in g.items()}
    z = (e + 0x4B400000).view(F32) - col["kz"]
    pr = z * col["hi"]
    p_int = np.floor(pr)
    inner = mul_add(lg, col["inv_S"], mul_add(z, col["lo"], -col["k_frac"]))
    w = (pr - p_int) + inner
    w_int = np.floor(w)
    return (p_int - col["k_int"]) + w_int, w - w_int, (p_int - col["t0_int"]) + (w - col["t0_frac"])


def true_position(ax, m32, s32):
    """t = (ln|x| - m - ln((1 + e^s)/2)) / s and t - t0 in float64 (t0: |x| = exp(m)/2)."""
    m, s = m32.astype(F64)[:, None], s32.astype(F64)[:, None]
    t = (np.log(ax.astype(F64)) - m - (np.log1p(np.exp(s)) - math.log(2))) / s
    return t, (np.log(ax.astype(F64)) - m + math.log(2)) / s


def _stats(x, n_bits):
    _, tmin, tstep = lf.logfmt_encode_ref(torch.from_numpy(x), n_bits)
    return tmin[:, 0].numpy(), tstep[:, 0].numpy()


def _adversarial(rows, n_bits, seed):
    """[rows, 128] float32 tiles: random spans, and elements on / one ulp around every kind of threshold
    and mantissa boundary (sqrt 2), far below the clamp, at the top."""
    g = np.random.default_rng(seed)
    q = 2 ** (n_bits - 1) - 1
    out = np.empty((rows, 128), dtype=F32)
    for r in range(rows):
        lo, span = g.uniform(-120, 100), g.choice([g.uniform(0.01, 1), g.uniform(1, 31.9), 31.9])
        amin, amax = F32(2.0**lo), F32(2.0 ** min(lo + span, 127))
        m = F64(F32(math.log(amin)))
        s = F64(F32((math.log(amax) - math.log(amin)) / (q - 1)))
        k = g.integers(0, q - 1, 30).astype(F64)
        thr = ((np.exp(m + s * k) + np.exp(m + s * (k + 1))) / 2).astype(F32)
        near = np.stack([thr, np.nextafter(thr, F32(0)), np.nextafter(thr, F32(np.inf))]).T.reshape(-1)
        mant = F32(1.4142135) * F32(2.0) ** g.integers(math.floor(lo), math.ceil(lo + span), 8)
        row = np.concatenate([[amax, amin, F32(np.exp(m) / 2)], near, mant,
                              np.exp(g.uniform(lo * math.log(2), (lo + span) * math.log(2), 128))])[:128]
        out[r] = np.clip(row, amin, amax).astype(F32)
        out[r, 2] = F32(np.exp(m) / 2)  # below the clamp: the 0 / 1 threshold itself
    return out


@pytest.mark.parametrize("n_bits", [3, 5, 8, 10, 16])
def test_float32_position_error_is_within_the_band(n_bits):
    """|t_kernel - t| and |(t - t0)_kernel - (t - t0)| <= band on every element of live rows the fast path
    keeps, with log2(mantissa) off by the bound of the GPU's lg2.approx either way, and with and without
    fused multiply-adds."""
    q = 2 ** (n_bits - 1) - 1
    g = np.random.default_rng(n_bits)
    gauss = (g.standard_normal((64, 128)) * np.exp(g.uniform(-60, 60, (64, 1)))).astype(F32)
    for x in (_adversarial(96, n_bits, n_bits), gauss):
        ax = np.abs(x)
        m32, s32 = _stats(x, n_bits)
        grid = row_grid(m32, s32, n_bits)
        t, d0 = true_position(ax, m32, s32)
        keep = ~grid["skip"][:, None] & (s32 > 0)[:, None] & (ax > 0)
        near = keep & (((t > -1) & (t < q)) | (np.abs(d0) < 2))  # the positions that decide codes
        assert near.mean() > 0.5
        for lg_err in (-LG2_ERR, 0.0, LG2_ERR):
            for fused in (False, True):
                fl, fr, d0_k = grid_position(ax, grid, lg_err, fused)
                band = grid["band"].astype(F64)[:, None]
                err = np.abs(fl.astype(F64) + fr - t)
                assert (err[near] <= band.repeat(128, 1)[near]).all(), err[near].max()
                close = near & (np.abs(d0) < 2)  # the 0 / 1 test: accurate near t0, its sign right elsewhere
                assert (np.abs(d0_k - d0)[close] <= band.repeat(128, 1)[close]).all()
                assert (np.sign(d0_k) == np.sign(d0))[keep & (np.abs(d0) >= band)].all()


def ambiguous_row_rate(n_bits, rows=4000, seed=0):
    """The fraction of Gaussian rows (one tile of 128) that the fast path sends to the float64 redo: an
    element within the band of an integer t (the kernel does not restrict it to the thresholds 0..Q-2;
    the clamp does not cut Gaussian tiles, so the 0 / 1 test does not run)."""
    x = np.random.default_rng(seed).standard_normal((rows, 128)).astype(F32)
    m32, s32 = _stats(x, n_bits)
    grid = row_grid(m32, s32, n_bits)
    fl, fr, d0 = grid_position(np.abs(x), grid)
    amb = np.abs(fr - F32(0.5)) > (F32(0.5) - grid["band"])[:, None]
    return float((amb.any(1) | grid["skip"]).mean())


def test_ambiguous_rows_are_rare():
    rates = {n: ambiguous_row_rate(n) for n in (8, 10)}
    print("rows redone in float64 (Gaussian tiles):", rates)
    assert rates[8] < 0.005 and rates[10] < 0.015


# ---- the kernel against the reference on hard inputs --------------------------------------------------


def _hard_rows(cols, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, cols, generator=g)
    x[0] *= torch.exp(torch.empty(cols).uniform_(-40, 40, generator=g))  # wide range: the clamp cuts
    x[1] = 3.0 * (1 + torch.randint(0, 3, (cols,), generator=g) * 2.0**-23)  # nearly constant: tiny step
    x[2] = -7.5  # one value: step 0
    x[3] = torch.randn(cols, generator=g) * 1e-39  # subnormals (and normals near the boundary)
    x[3, ::5] = 1e-45
    x[4] = 0.0
    x[5, 3] = math.nan
    x[6, 1] = -math.inf
    x[7] *= 1e30  # large, with a subnormal in the row: too wide to rescale, the redo takes it
    x[7, 2] = 1e-42
    x[8] = 2.0 ** torch.randint(-30, 30, (cols,), generator=g).float()  # powers of two: mantissa 1
    x[9, 1::2] = 0.0
    x[10] = torch.randn(cols, generator=g) * 1e-36  # the tile's min subnormal-adjacent
    x[11] = 3.4e38 * torch.rand(cols, generator=g)  # near the top of fp32
    return x


@needs_triton
@pytest.mark.parametrize("n_bits", [3, 8, 10, 16])
@pytest.mark.parametrize("cols", [128, 200])
def test_hard_inputs_equal_reference(n_bits, cols):
    x = _hard_rows(cols, n_bits)
    ref = lf.logfmt_encode_ref(x, n_bits)
    for block_rows in (None, 4, 16):
        got = on_kernel_device(lf.logfmt_encode, x, n_bits, backend="triton", block_rows=block_rows)
        for g_, r in zip(got, ref):
            assert torch.equal(g_.view(torch.int32) if g_.dtype == torch.float32 else g_,
                               r.view(torch.int32) if r.dtype == torch.float32 else r)
    for packed in (True, False):
        rows = on_kernel_device(lf.logfmt_encode_to_rows, x, None, 1, n_bits, packed=packed, backend="triton")
        assert torch.equal(rows, lf.to_rows_ref(*ref, n_bits, packed))
        dec = on_kernel_device(lf.logfmt_decode_rows, rows, cols, n_bits=n_bits, packed=packed, backend="triton",
                               block_rows=8)
        # fp32 exp of m + s * k up to |88|: ~|88| * 2^-24 relative
        torch.testing.assert_close(dec, lf.logfmt_decode_ref(*ref, n_bits), rtol=1e-5, atol=3e-45,
                                   equal_nan=True)  # and one subnormal ulp


@needs_triton
@pytest.mark.parametrize("n_bits", [8, 10])
@pytest.mark.parametrize("packed", [True, False])
def test_wide_random_and_gather_equal_reference(n_bits, packed):
    g = torch.Generator().manual_seed(n_bits)
    x = (torch.randn(24, 300, generator=g) * torch.exp(torch.empty(24, 300).uniform_(-30, 30, generator=g)))
    x = x.to(torch.bfloat16)
    x[5, 130:140] = float("nan")
    src = torch.tensor([3, -1, 7, 7, 0, 23, 12, -1, 5, 1, 2])
    got = on_kernel_device(lf.logfmt_encode_to_rows, x, src, 1, n_bits, packed=packed, backend="triton")
    gathered = lf._gather_ref(x, src, 1)
    assert torch.equal(got, lf.to_rows_ref(*lf.logfmt_encode_ref(gathered, n_bits), n_bits, packed))
    codes = on_kernel_device(lf.logfmt_encode_rows, x, src, 1, n_bits, backend="triton")[0]
    assert torch.equal(codes, lf.logfmt_encode_ref(gathered, n_bits)[0])


@needs_triton
def test_stochastic_on_nearly_constant_and_subnormal_tiles():
    """Stochastic rounding keeps each element between its two grid neighbours on tiles the nearest path
    redoes in float64 (tiny step, subnormals)."""
    x = _hard_rows(128, 1)[[1, 3, 7, 10]].repeat(50, 1)
    codes, tmin, tstep = on_kernel_device(lf.logfmt_encode, x, 8, "stochastic", seed=3, backend="triton")
    near = lf.logfmt_encode_ref(x, 8)[0]
    mag = lambda c: c.to(torch.int64) & 127  # noqa: E731
    assert (mag(codes) - mag(near)).abs().max() <= 1
    assert torch.equal(tmin, lf.logfmt_encode_ref(x, 8)[1])
    again = on_kernel_device(lf.logfmt_encode, x, 8, "stochastic", seed=3, backend="triton", block_rows=16)[0]
    assert torch.equal(again, on_kernel_device(lf.logfmt_encode, x, 8, "stochastic", seed=3, backend="triton",
                                               block_rows=4)[0])


def _assert_same_bits(got, ref, where):
    """Codes, tile_min and tile_step equal bit for bit (the float32 ones compared as their bits: NaN too)."""
    for g_, r in zip((t.cpu() for t in got), ref):
        assert torch.equal(g_.view(torch.int32) if g_.dtype == torch.float32 else g_,
                           r.view(torch.int32) if r.dtype == torch.float32 else r), where


@needs_triton
@pytest.mark.parametrize("n_bits", [8, 10])
def test_every_encode_configuration_equals_reference(n_bits):
    """Each GPU tile shape (rows per program, columns per step of the element phase, the row numbers
    regathered or not), on hard rows and on adversarial rows whose near-threshold elements sit in the
    tile's last columns: a row found ambiguous in a late chunk has its earlier chunks stored, then
    rewritten by the float64 redo."""
    adv = np.roll(_adversarial(40, n_bits, 7 + n_bits), 100, axis=1)  # thresholds in columns 100..127
    x = torch.cat([_hard_rows(128, n_bits), torch.from_numpy(adv)])
    x = torch.cat([x, -x.flip(0)]).repeat(2, 1)[:130]  # more rows than one 128-row program
    ref = lf.logfmt_encode_ref(x, n_bits)
    for rows, _warps, chunk, regather in lf.ENCODE_CONFIGS:
        shape = dict(block_rows=rows, chunk_cols=chunk, regather=regather)
        _assert_same_bits(lf.logfmt_encode(x.to(KERNEL_DEVICE), n_bits, backend="triton", **shape), ref, shape)
        packed = lf.logfmt_encode_to_rows(x.to(KERNEL_DEVICE), None, 1, n_bits, backend="triton", **shape).cpu()
        assert torch.equal(packed, lf.to_rows_ref(*ref, n_bits, True)), shape


@needs_triton
@pytest.mark.parametrize("n_bits", [8, 10])
def test_bf16_pairs_first_phase_equals_reference(n_bits):
    """bf16 rows are read as int32 words of two values in the first phase (max and min lane by lane):
    maxima and minima in even and odd columns, zeros of both signs, all-zero tiles, inf and NaN in either
    lane, a row with one non-zero value; rows at an odd offset or of odd width take the float path. Every
    tile shape. (Subnormal bf16 only on a GPU: the interpreter flushes them when it widens bf16.)"""
    g = torch.Generator().manual_seed(n_bits)
    cols = 260
    x = torch.randn(16, cols + 2, generator=g) * torch.exp(torch.empty(16, 1).uniform_(-20, 20, generator=g))
    x[0, :] = 0.0
    x[1, :] = -0.0
    x[2, 5] = 1e4  # max in an odd column
    x[3, 6] = -1e4  # max in an even column
    x[4, :] = 0.0
    x[4, 131] = 3.0  # one non-zero value in the second tile
    x[5, 7] = float("inf")
    x[6, 8] = float("nan")
    x[7, 1::2] = 0.0  # every odd lane zero
    x[8, 0::2] = -0.0
    if KERNEL_DEVICE == "cuda":
        x[9, 10] = 1e-39  # a subnormal bf16 as the row's minimum
    xb = x.to(torch.bfloat16)
    xd = xb.to(KERNEL_DEVICE)  # sliced on the device: .to() of a strided view would copy it contiguous
    for cut in (slice(0, cols), slice(1, cols + 1), slice(0, cols - 1)):  # aligned words; odd offset; odd width
        ref = lf.logfmt_encode_ref(xb[:, cut], n_bits)
        for rows, _warps, chunk, regather in lf.ENCODE_CONFIGS:
            shape = dict(block_rows=rows, chunk_cols=chunk, regather=regather, cut=cut)
            _assert_same_bits(lf.logfmt_encode(xd[:, cut], n_bits, backend="triton", block_rows=rows,
                                               chunk_cols=chunk, regather=regather), ref, shape)


@pytest.mark.skipif(lf.interpreting() or not torch.cuda.is_available(), reason="lg2.approx runs on a CUDA GPU")
def test_gpu_fast_log2_is_within_the_bound_the_band_assumes():
    err = lf.fast_log2_max_error()
    assert err <= lf.LOG2_BOUND, err
    assert lf.use_fast_log2(torch.device("cuda"))
    fast = lf.fast_log2_max_error(fast=True)  # "fast" rounding's: whole |x|, beyond the rounding of the result
    print(f"lg2.approx: {err:.4g} on [sqrt(1/2), sqrt(2)), {fast:.4g} beyond rounding on every normal float32")
    assert fast <= lf.FAST_LOG2_BOUND, fast
    assert lf.use_fast_log2(torch.device("cuda"), fast=True)


@needs_triton
@pytest.mark.parametrize("n_bits", [9, 10, 12, 14])
@pytest.mark.parametrize("cols", [128, 200])
def test_row_planes_round_trip(n_bits, cols):
    """Packed rows of 10, 12 and 14 bits hold the codes' low bytes, then their n - 8 high bits packed
    (9 bits: int16 codes): the kernels' rows equal the reference's and unpack to the same codes."""
    x = (torch.randn(6, cols, generator=torch.Generator().manual_seed(n_bits)) * 3).to(torch.bfloat16)
    ref = lf.logfmt_encode_ref(x, n_bits)
    rows = on_kernel_device(lf.logfmt_encode_to_rows, x, None, 1, n_bits, backend="triton", block_rows=8, chunk_cols=16)
    assert torch.equal(rows, lf.to_rows_ref(*ref, n_bits, True))
    assert lf.code_planes(n_bits) == (n_bits != 9)
    codes, tmin, tstep = lf.from_rows_ref(rows, cols, n_bits, True)
    assert torch.equal(codes, ref[0]) and torch.equal(tmin, ref[1]) and torch.equal(tstep, ref[2])
    dec = on_kernel_device(lf.logfmt_decode_rows, rows, cols, n_bits=n_bits, backend="triton", block_rows=8)
    torch.testing.assert_close(dec, lf.logfmt_decode_ref(*ref, n_bits), rtol=1e-5, atol=0)


def test_fast_log2_only_where_checked():
    """The interpreter and CPU tensors never take lg2.approx; a GPU takes it once its check has passed."""
    assert not lf.use_fast_log2(torch.device("cpu"))
    if torch.cuda.is_available() and not lf.interpreting():
        assert lf.use_fast_log2(torch.device("cuda")) == (lf.fast_log2_max_error() <= lf.LOG2_BOUND)


@needs_triton
def test_every_decode_configuration_equals_the_default():
    """Each GPU tile shape of the decoder (rows per program) decodes and sums the same values."""
    x = torch.randn(70, 300, generator=torch.Generator().manual_seed(3))
    rows = lf.logfmt_encode_to_rows(x, None, 1, 10, backend="torch")
    pair = torch.randint(0, 70, (45, 3), generator=torch.Generator().manual_seed(4))
    w = torch.rand(45, 3, generator=torch.Generator().manual_seed(5))
    want = lf.logfmt_decode_rows(rows, 300, pair, w, n_bits=10, backend="torch")
    for block_rows, _warps in lf.DECODE_CONFIGS:
        got = lf.logfmt_decode_rows(rows.to(KERNEL_DEVICE), 300, pair.to(KERNEL_DEVICE),
                                    w.to(KERNEL_DEVICE), n_bits=10, backend="triton", block_rows=block_rows).cpu()
        torch.testing.assert_close(got, want, rtol=2e-6 if KERNEL_DEVICE == "cpu" else 5e-6, atol=1e-6)
