"""LogFMT's "fast" rounding (coscale.kernels.logfmt): one float32 logarithm and one multiply-add an element, no
exactness machinery, no float64. Its contract: the tile numbers lie within ``fast_tile_tolerance`` of the
reference's, and every code is the nearest code, on the grid of the stored numbers, of some x' with |log2 x' -
log2 |x|| <= ``fast_position_error``; so codes differ from "nearest" only next to a rounding threshold, and the
decoded value keeps the nearest bound up to that perturbation. Interpreter on CPU; the same checks on a GPU
(lg2.approx) where one exists."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math

import numpy as np
import pytest
import torch

from coscale.kernels import logfmt as lf
from coscale.parallel.codec import LogFMTCodec
from test_logfmt import _tile_view, on_kernel_device
from test_logfmt_exact import KERNEL_DEVICE, _adversarial, _hard_rows, needs_triton

if lf.triton_available():  # (else the tests that use it skip)
    import triton
    import triton.language as tl

    from coscale.kernels import _logfmt_triton as _lk

    @triton.jit
    def _row_line_probe(m_ptr, s_ptr, out_ptr, N_BITS: tl.constexpr):
        i = tl.arange(0, 8)
        m, s = tl.load(m_ptr + i), tl.load(s_ptr + i)
        _a, _b, _t0, easy = _lk._row_line(m, s, i < 0, N_BITS)
        tl.store(out_ptr + i, easy.to(tl.int32))

FP32_SLACK = 2e-6  # decoding through fp32


def test_the_contract_check_finds_a_code_one_step_off_a_wrong_sign_and_a_wrong_tile_number():
    x = torch.randn(3, 200) * 5
    x[2, 130] = math.nan
    codes, tmin, tstep = lf.logfmt_encode_ref(x, 8)
    assert lf.check_fast_codes(x, codes, tmin, tstep, 8) == 0
    far = ((x[0, :128].double().abs().log() - tmin[0, 0].double()) / tstep[0, 0].double()).frac()
    j = int((torch.minimum(far, 1 - far) + 1.0 * (x[0, :128] == 0)).argmin())  # on a grid point: mid-threshold
    for change in ("up", "sign", "nan tile", "step", "min"):
        c, mn, st = codes.clone(), tmin.clone(), tstep.clone()
        if change == "up":
            c[0, j] = min(int(c[0, j] & 127) + 1, 127) | (int(c[0, j]) & 128)
            if c[0, j] == codes[0, j]:
                c[0, j] -= 2
        elif change == "sign":
            c[1, 5] ^= 128
        elif change == "nan tile":
            c[2, 140] = 1
        elif change == "step":  # the grid's top moves by 126 x 2^-12 of a step: far beyond the tolerance
            st[1, 1] = st[1, 1] * (1 + 2.0**-12)
        else:
            mn[0, 1] = mn[0, 1] + 2.0**-12 * mn[0, 1].abs()
        with pytest.raises(lf.CoscaleError):
            lf.check_fast_codes(x, c, mn, st, 8)
    # within the tolerance, a tile number off by an ulp keeps the contract (the codes stay nearest on its grid)
    st = tstep.clone()
    st[1, 1] = torch.nextafter(st[1, 1], torch.tensor(1.0))
    lf.check_fast_codes(x, codes, tmin, st, 8)


@needs_triton
@pytest.mark.parametrize("n_bits", [3, 8, 10, 16])
@pytest.mark.parametrize("cols", [128, 200])
def test_fast_codes_on_hard_inputs_are_nearest_codes_of_a_nearby_x(n_bits, cols):
    x = torch.cat([_hard_rows(cols, n_bits), -_hard_rows(cols, n_bits + 1)])
    x[3, :3] = 1e-30  # the clamp cuts a row whose other elements are normal
    for block_rows in (None, 4, 16):
        got = lf.logfmt_encode(x.to(KERNEL_DEVICE), n_bits, "fast", backend="triton", block_rows=block_rows)
        lf.check_fast_codes(x, *(t.cpu() for t in got), n_bits)


@needs_triton
@pytest.mark.parametrize("n_bits", [8, 10])
def test_every_encode_configuration_keeps_the_fast_contract(n_bits):
    """Every GPU tile shape, on adversarial tiles (elements on and one ulp around every threshold) and hard
    rows; the codec rows hold the same codes (packed and int16 layouts, gathered rows)."""
    adv = torch.from_numpy(np.roll(_adversarial(24, n_bits, 3 + n_bits), 100, axis=1))
    x = torch.cat([_hard_rows(128, n_bits), adv, -adv.flip(0)])
    src = torch.tensor([3, -1, 7, 7, 0, 23, 12, -1, 5, 1, 2, 40])
    for rows, _warps, chunk, regather in lf.ENCODE_CONFIGS:
        shape = dict(block_rows=rows, chunk_cols=chunk, regather=regather)
        codes, tmin, tstep = (t.cpu() for t in lf.logfmt_encode(x.to(KERNEL_DEVICE), n_bits, "fast",
                                                                backend="triton", **shape))
        lf.check_fast_codes(x, codes, tmin, tstep, n_bits)
        for packed in (True, False):
            got = lf.logfmt_encode_to_rows(x.to(KERNEL_DEVICE), src.to(KERNEL_DEVICE), 1, n_bits, "fast",
                                           packed=packed, backend="triton", **shape).cpu()
            keep = src.clamp(min=0)
            expected = lf.to_rows_ref(codes[keep], tmin[keep], tstep[keep], n_bits, packed)
            expected[src < 0] = lf.to_rows_ref(*lf.logfmt_encode_ref(torch.zeros(1, 128), n_bits), n_bits, packed)
            assert torch.equal(got, expected), shape


@needs_triton
@pytest.mark.parametrize("n_bits", [8, 10])
@pytest.mark.parametrize("heavy", [False, True])
def test_fast_rounding_keeps_the_nearest_error_bound_and_rarely_differs(n_bits, heavy):
    g = torch.Generator().manual_seed(n_bits + heavy)
    x = torch.randn(64, 7168 // 8, generator=g)
    if heavy:  # Student-t with 2 degrees of freedom (chi-squared(2) / 2 is exponential(1)); seeded
        x = x / torch.sqrt(torch.empty(x.shape).exponential_(generator=g))
        # and elements the range clamp (2^-32 of the tile's max) cuts: half a binade and three binades below it
        top = x[::8, :128].abs().amax(1)
        x[::8, 5], x[::8, 70] = top * 2.0**-32.5, -top * 2.0**-35
    x = (x * torch.logspace(-3, 3, 64).unsqueeze(1)).to(torch.bfloat16)
    codes, tmin, tstep = (t.cpu() for t in lf.logfmt_encode(x.to(KERNEL_DEVICE), n_bits, "fast", backend="triton"))
    differ = lf.check_fast_codes(x, codes, tmin, tstep, n_bits)
    assert differ <= 1e-3 * x.numel()  # only next to a threshold
    y = lf.logfmt_decode_ref(codes, tmin, tstep, n_bits, dtype=torch.float64)
    xd = x.double()
    delta = lf.fast_position_error(xd.abs().clamp_min(1e-300).log2(), _tile_view(tmin, x.shape[1]),
                                   _tile_view(tstep, x.shape[1]))
    grow = torch.exp2(delta)
    bound = lf.nearest_error_bound(_tile_view(tstep, x.shape[1])) * grow + (grow - 1)
    # the bound holds from the tile's minimum up; below it (rows the range clamp cuts: heavy tails at 10 bits)
    # an element decodes to 0 or to the minimum, with its sign
    low = torch.exp(_tile_view(tmin, x.shape[1]).double())
    inside = xd.abs() >= low * (1 - FP32_SLACK)
    assert ((y - xd).abs() <= bound * xd.abs() * (1 + FP32_SLACK))[inside].all()
    cut = y[~inside]
    assert ((cut == 0) | ((cut.abs() - low[~inside]).abs() <= FP32_SLACK * low[~inside])).all()
    assert (cut * xd[~inside] >= 0).all()


@needs_triton
def test_fast_codec_round_trip_and_bad_rounding():
    x = torch.randn(40, 300) * 3
    codec = LogFMTCodec(8, "fast")  # on CPU tensors the codec runs the reference (nearest codes)
    step = lf.logfmt_encode_ref(x, 8)[2]
    kernel_rows = lf.logfmt_encode_to_rows(x.to(KERNEL_DEVICE), None, 1, 8, "fast", backend="triton").cpu()
    for rows in (codec.encode(x), kernel_rows):
        y = codec.decode(rows, 300, torch.float32)
        bound = lf.nearest_error_bound(_tile_view(step, 300)) * 1.001 + FP32_SLACK
        assert ((y - x).abs() <= bound * x.abs()).all()
    assert "fast" in repr(codec)
    with pytest.raises(Exception, match="rounding"):
        lf.logfmt_encode(x, 8, "fastest")
    # the reference backend has no "fast" codes of its own: it gives the nearest ones
    assert torch.equal(lf.logfmt_encode(x, 8, "fast", backend="torch")[0], lf.logfmt_encode_ref(x, 8)[0])


def _mirror(x, m32, s32, scaled, n_bits, lg_err, fused):
    """The kernel's "fast" arithmetic in numpy, one tile row each (float32 rounding where the kernel rounds;
    ``lg_err`` added to the exact log2 before its float32 rounding, as a worst-case lg2.approx would). Returns
    (magnitude codes, the computed v, the exact v in float64)."""
    q = 2 ** (n_bits - 1) - 1
    inv_ln2 = 1 / math.log(2)
    f = np.float32
    s = np.where(s32 > 0, s32, 1.0).astype(np.float32)
    inv_step = np.float64(1.0) / (s.astype(np.float64) * inv_ln2)  # exact 1/S, for v_exact
    mid = np.log((1 + np.exp(s.astype(np.float64))) / 2) * inv_ln2
    origin = m32.astype(np.float64) * inv_ln2 + mid + np.where(scaled, 24.0, 0.0)
    # the kernel's float32 line (_row_line): every operation rounded to float32
    a32 = f(f(0.6931471805599453) / s)  # correctly rounded, as div_rn
    y = f(0.5) * s
    y2 = f(y * y)
    mid32 = f(f(y + f(y2 * f(f(0.5) - f(y2 * f(f(1 / 12) - f(y2 * f(1 / 45))))))) * f(1.4426950408889634))
    if n_bits < 8:
        mid32 = f(np.log2(f(f(1.0 + f(np.exp(s))) * f(0.5))))
    lmin32 = f(f(m32.astype(np.float32) * f(1.4426950408889634)) + np.where(scaled, f(24.0), f(0.0)))
    a = a32[:, None]
    b = f(f(1.5) - f(f(lmin32 + mid32) * a32))[:, None]
    t0 = f(f(1.5) - f(f(f(1.0) + mid32) * a32))[:, None]
    ax = np.abs(x).astype(np.float64) * np.where(scaled, 2.0**24, 1.0)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        exact = np.log2(ax)
        lg = np.float32(exact + lg_err)
        if fused:  # the exact product of two float32 is a float64; one rounding of the sum (to within 2^-29)
            v = np.float32(lg.astype(np.float64) * a + b)
        else:
            v = np.float32(np.float32(lg * a) + b)
        v_exact = (exact - origin[:, None]) * inv_step[:, None] + 1.5
    mag = np.rint(np.clip(v, 1.0, q)).astype(np.int64)  # ties to even, as adding 1.5 * 2^23 rounds
    return np.where(v < t0, 0, mag), v.astype(np.float64), v_exact  # zeros too: log2 0 = -inf


@pytest.mark.parametrize("n_bits", [8, 10, 16])
def test_the_bound_covers_the_gpus_fused_arithmetic_and_the_interpreters_unfused_one(n_bits):
    """Tiles with elements on and one ulp around every threshold, half of them rows scaled by 2^24 (a subnormal
    beside a maximum of 2^20-2^40: moderate |x| then take the log of |x| 2^24, the case a first bound missed),
    lg2's error beyond its rounding at 0 and +-FAST_LOG2_BOUND, the multiply-add fused (GPU) or not (interpreter): the
    position error stays within ``fast_position_error`` (and reaches a tenth of it: the bound is not vacuous), and
    every mirrored code keeps the contract."""
    g = np.random.default_rng(n_bits)
    q = 2 ** (n_bits - 1) - 1
    rows = []
    for r in range(60):
        scaled = r % 2 == 0
        hi = g.uniform(20, 40) if scaled else g.uniform(-60, 60)
        lo = hi - (33 if scaled else g.choice([g.uniform(0.01, 2), g.uniform(2, 31)]))
        m = math.log(2.0**lo) if not scaled else math.log(2.0**hi * 2.0**-32)
        s = (hi * math.log(2) - m) / (q - 1)
        k = g.integers(0, q - 1, 40).astype(np.float64)
        thr = ((np.exp(m + s * k) + np.exp(m + s * (k + 1))) / 2).astype(np.float32)
        near = np.concatenate([thr, np.nextafter(thr, np.float32(0)), np.nextafter(thr, np.float32(np.inf))])
        row = np.concatenate([[np.float32(2.0**hi), np.float32(1.7e-40 if scaled else 2.0**lo)], near])[:128]
        row = np.pad(row, (0, 128 - row.size)) * np.where(g.random(128) < 0.5, -1, 1)
        rows.append(row.astype(np.float32))
    x = torch.from_numpy(np.stack(rows))
    _, m32, s32 = lf.logfmt_encode_ref(x, n_bits)
    xn, m_np, s_np = x.numpy(), m32[:, 0].numpy(), s32[:, 0].numpy()
    amin = np.where(xn != 0, np.abs(xn), np.inf).min(1)
    scaled_rows = (amin < 2.0**-126) & (np.abs(xn).max(1) < 2.0**100)  # the kernel's rows scaled by 2^24
    assert scaled_rows.sum() == 30
    ax = x.double().abs()
    m, s = m32.double().expand(-1, 128), s32.double().expand(-1, 128)
    nearest = lf.grid_magnitude_ref(ax, m, s, n_bits)
    log2_ax = torch.where(ax > 0, ax, torch.ones_like(ax)).log2()
    delta = lf.fast_position_error(log2_ax, m, s)
    below = torch.minimum(lf.grid_magnitude_ref(ax * torch.exp2(-delta), m, s, n_bits), nearest)
    above = torch.maximum(lf.grid_magnitude_ref(ax * torch.exp2(delta), m, s, n_bits), nearest)
    live = (ax > 0) & (torch.from_numpy(xn).abs() >= torch.exp(m) * 0.5)  # above the 0 / 1 threshold
    ratio = 0.0
    for fused in (True, False):
        for err in (-lf.FAST_LOG2_BOUND, 0.0, lf.FAST_LOG2_BOUND):
            mag, v, v_exact = _mirror(xn, m_np, s_np, scaled_rows, n_bits, err, fused)
            with np.errstate(invalid="ignore"):  # zeros: -inf - -inf
                position_error = torch.from_numpy(np.abs(v - v_exact)) * s / math.log(2)  # log2 units
            r = (position_error / delta)[live]
            assert r.max() <= 1, (fused, err, r.max())
            ratio = max(ratio, r.max().item())
            mag = torch.from_numpy(mag)
            assert not ((mag < below) | (mag > above)).any(), (fused, err)
    print(f"largest position error / bound: {ratio:.3f}")
    assert ratio > 0.1


@needs_triton
def test_fast_rounding_really_runs_and_keeps_the_contract_on_a_scaled_row():
    """A nearly constant tile (3 (1 + k 2^-23)): its float32 position is off by many steps, so fast codes differ
    from nearest (they would not if the kernel ignored FAST), within the contract; and the row a first bound
    missed (a subnormal beside 5.5e9: scaled by 2^24, moderate elements)."""
    x = torch.zeros(3, 128)
    x[0] = 3.0 * (1 + torch.arange(128) % 3 * 2.0**-23)
    x[1, :4] = torch.tensor([5.519547e9, 1.7254e-40, 1.3101512, -1.3101512])
    x[2] = torch.randn(128)
    for n_bits in (8, 16):
        got = lf.logfmt_encode(x.to(KERNEL_DEVICE), n_bits, "fast", backend="triton")
        assert lf.check_fast_codes(x, *got, n_bits) > 0
        ref = lf.logfmt_encode_ref(x, n_bits)[0]
        assert not torch.equal(got[0][0].cpu(), ref[0])


@needs_triton
@pytest.mark.parametrize("n_bits", [3, 8, 10, 16])
def test_fast_zeros_and_one_magnitude_tiles_take_code_0_and_1(n_bits):
    """Zeros take code 0 with no test of their own (their log2, -inf, lies under the 0 / 1 threshold): beside
    the smallest normal (2^-126), beside 2^-99 and 2^-101, in tiles
    of one magnitude (step 0: every non-zero code 1), subnormal ones included, and in all-zero and NaN tiles."""
    x = torch.zeros(8, 128)
    x[0, ::2] = 2.0**-126
    x[1, ::3] = 2.0**-99
    x[1, 1] = 2.0**-90
    x[2, ::3] = 2.0**-101
    x[2, 1] = 2.0**-92
    x[3, ::2] = -5.0  # one magnitude, with zeros
    x[4, 1::2] = 1e-40  # one subnormal magnitude
    x[5, 7] = 3.0e38  # one huge magnitude
    x[6, 3], x[6, 4] = math.nan, 1.0
    got = [t.cpu() for t in lf.logfmt_encode(x.to(KERNEL_DEVICE), n_bits, "fast", backend="triton")]
    lf.check_fast_codes(x, *got, n_bits)
    assert torch.equal(got[0], lf.logfmt_encode_ref(x, n_bits)[0])  # none lies near a threshold
    assert (got[0][x == 0] == 0).all() and (got[0][3:6][x[3:6] != 0] & ((1 << (n_bits - 1)) - 1) == 1).all()
    for packed in (True, False):  # the wire rows, gathered (8 bits: bytes whose bits above the code are dropped)
        src = torch.tensor([5, 0, -1, 3, 3, 7])
        rows = on_kernel_device(lf.logfmt_encode_to_rows, x, src, 1, n_bits, "fast", packed=packed, backend="triton")
        expected = lf.to_rows_ref(got[0][src.clamp(min=0)], got[1][src.clamp(min=0)], got[2][src.clamp(min=0)],
                                  n_bits, packed)
        expected[2] = lf.to_rows_ref(*lf.logfmt_encode_ref(torch.zeros(1, 128), n_bits), n_bits, packed)[0]
        assert torch.equal(rows, expected)


@needs_triton
@pytest.mark.parametrize("n_bits", [3, 8, 10])
def test_fast_tile_numbers_at_the_ends_of_float32_lie_within_the_tolerance(n_bits):
    """The tile numbers' logs (exponent + the mantissa's log, subnormals scaled by 2^24) where their errors are
    largest: a subnormal maximum, the smallest subnormal, the largest float, the range clamp binding at both ends of
    the exponent range (|m| near 103 and 88), and one random log-uniform magnitude a row over the whole range."""
    g = torch.Generator().manual_seed(7)
    x = torch.zeros(12, 128)
    x[0, :3] = torch.tensor([3.0e-39, 1.4e-45, 2.0e-40])  # subnormal max and min
    x[1, :2] = torch.tensor([3.4e38, 1.0e30])  # the largest finite magnitude
    x[2, :2] = torch.tensor([3.4e38, 1.0e-30])  # clamp at the top (min |x| raised to max 2^-32)
    x[3, :2] = torch.tensor([1.0e-30, 1.4e-45])  # clamp near the bottom
    x[4, :2] = torch.tensor([1.1754944e-38, 1.1754942e-38])  # the normal / subnormal boundary
    x[5:] = torch.exp2(torch.rand(7, 128, generator=g) * 250 - 148) * torch.randn(7, 128, generator=g).sign()
    got = [t.cpu() for t in lf.logfmt_encode(x.to(KERNEL_DEVICE), n_bits, "fast", backend="triton")]
    lf.check_fast_codes(x, *got, n_bits)
    _, ref_min, ref_step = lf.logfmt_encode_ref(x, n_bits)
    ref_min = ref_min.double()
    bottom_tol, _ = lf.fast_tile_tolerance(ref_min, ref_step, n_bits)
    assert ((got[1].double() - ref_min).abs() <= bottom_tol).all()
    assert ref_min[:5, 0].abs().max() > 80  # the rows reach the ends of the range


@needs_triton
@pytest.mark.parametrize("n_bits", [3, 8, 10, 16])
def test_fast_programs_of_easy_rows_give_zeros_code_0_and_signs_only_on_non_zero_codes(n_bits):
    """Programs whose every row is easy take the EASY form (no lower clamp, no 0 / 1 threshold, no scale): there a
    zero's position (-inf) alone makes its code 0, and the sign is added only where the code is not 0. Zeros and
    negative zeros among Gaussian rows over 40 decades, an all-zero row, and one-magnitude rows (step 0) with
    zeros of both signs; each block of 4 rows alone and all together, codes and the wire rows."""
    g = torch.Generator().manual_seed(n_bits)
    x = torch.randn(8, 256, generator=g) * torch.logspace(-20, 20, 8).unsqueeze(1)
    x[:, ::5] = 0.0
    x[:, 1::7] = -0.0
    x[2] = 0.0
    x[5] = torch.where(torch.arange(256) % 3 == 0, -0.0, -7.5)
    x[6, 128:] = torch.where(torch.arange(128) % 2 == 0, 0.0, 2.0**-100)
    ref = lf.logfmt_encode_ref(x, n_bits)[0]
    for block_rows in (4, 8):
        got = [t.cpu() for t in lf.logfmt_encode(x.to(KERNEL_DEVICE), n_bits, "fast", backend="triton",
                                                 block_rows=block_rows)]
        lf.check_fast_codes(x, *got, n_bits)
        assert (got[0][x == 0] == 0).all()  # -0.0 too: no sign on code 0
        assert torch.equal(got[0][5], ref[5]) and torch.equal(got[0][6, 128:], ref[6, 128:])  # step 0: exact
        rows = on_kernel_device(lf.logfmt_encode_to_rows, x, None, 1, n_bits, "fast", packed=True, backend="triton",
                                block_rows=block_rows)
        assert torch.equal(rows, lf.to_rows_ref(*got, n_bits, True))


@needs_triton
@pytest.mark.parametrize("n_bits", [3, 8, 10])
def test_fast_rows_that_need_the_general_form_keep_the_contract_alone_in_their_program(n_bits):
    """A row alone decides its program's form: nearly constant rows (steps from 2^-23 to 2^-8 relative, whose
    smallest element's position lies below 1/2 unless clamped), a row the range clamp cuts, a row with a subnormal
    (scaled), a NaN row and a wide 3-bit row. Were one taken for easy, its codes would break the contract (an
    element below the grid's bottom, a cut element, a subnormal's log -inf)."""
    g = torch.Generator().manual_seed(n_bits)
    rows = [3.0 * (1 + torch.arange(128) % 5 * 2.0**-k) for k in (23, 20, 16, 12, 8)]
    cut, sub, nan = torch.randn(3, 128, generator=g)
    cut[:4] = torch.tensor([1e-12, -1e-13, 0.0, 5e-11])
    sub[7] = 1e-40
    nan[9] = math.nan
    wide = torch.exp2(torch.linspace(-31, 0, 128)) * torch.randn(128, generator=g).sign()
    for row in rows + [cut, sub, nan, wide]:
        x = row.unsqueeze(0)
        for block_rows in (4, None):
            got = lf.logfmt_encode(x.to(KERNEL_DEVICE), n_bits, "fast", backend="triton", block_rows=block_rows)
            lf.check_fast_codes(x, *(t.cpu() for t in got), n_bits)


@needs_triton
def test_a_row_is_easy_only_where_its_smallest_element_lies_well_above_the_0_1_threshold():
    """_row_line's easy flag against its bound, computed here in float64: v(min) = 1.5 - C/S on the stored grid,
    less (1.1e-5 + 2^-23 (9 |M| + (3 (Q - 1) + 5) S + 200)) / S, must be >= 0.6; a step-0 row is easy. Steps from
    Gaussian tiles' down to nearly constant ones, at |M| from 0 to 100, 8 and 3 bits."""
    for n_bits in (8, 3):
        q = 2 ** (n_bits - 1) - 1
        m = torch.tensor([0.0, -40.0, 60.0, -69.0, 5.0, 0.0, -3.0, 1.0])
        wide = [3.0, 7.6] if n_bits == 3 else [0.1, 0.3]
        s = torch.tensor([0.045, 0.045, 2e-4, 3e-5, 1e-6, 0.0, *wide])
        out = torch.zeros(8, dtype=torch.int32)
        m_d, s_d, out_d = (t.to(KERNEL_DEVICE) for t in (m, s, out))
        _row_line_probe[(1,)](m_d, s_d, out_d, N_BITS=n_bits)
        big_m, big_s = m.double() / math.log(2), s.double() / math.log(2)
        mid = torch.log2((1 + torch.exp(s.double())) / 2)
        err = 1.1e-5 + 2.0**-23 * (9 * big_m.abs() + (3 * (q - 1) + 5) * big_s + 200)
        want = (s == 0) | (0.9 - (mid + err) / big_s.clamp_min(1e-30) >= 0)
        assert torch.equal(out_d.cpu().bool(), want), (n_bits, out_d.cpu(), want)
        assert want.any() and not want.all()
