"""LogFMT's "fast" rounding (coscale.kernels.logfmt): one float32 logarithm and one multiply-add an element, no
exactness machinery. Its contract: the tile numbers are the reference's bit for bit, and every code is the
nearest code (on that grid) of some x' with |log2 x' - log2 |x|| <= ``fast_position_error``; so codes differ
from "nearest" only next to a rounding threshold, and the decoded value keeps the nearest bound up to that
perturbation. Interpreter on CPU; the same checks on a GPU (lg2.approx) where one exists."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math

import numpy as np
import pytest
import torch

from coscale.kernels import logfmt as lf
from coscale.parallel.codec import LogFMTCodec
from test_logfmt_exact import _adversarial, _hard_rows

needs_triton = pytest.mark.skipif(
    not (lf.triton_available() and (lf.interpreting() or torch.cuda.is_available())),
    reason="needs triton (interpreter on CPU)",
)
KERNEL_DEVICE = "cpu" if lf.interpreting() or not torch.cuda.is_available() else "cuda"
FP32_SLACK = 2e-6  # decoding through fp32


def _per_element(t, cols):
    return t.repeat_interleave(lf.TILE, dim=1)[:, :cols]


def assert_fast_contract(x, codes, tile_min, tile_step, n_bits):
    """The contract of the module docstring (lf.check_fast_codes raises where it is broken)."""
    return lf.check_fast_codes(x, codes, tile_min, tile_step, n_bits)


def test_the_contract_check_finds_a_code_one_step_off_a_wrong_sign_and_a_wrong_tile_number():
    x = torch.randn(3, 200) * 5
    x[2, 130] = math.nan
    codes, tmin, tstep = lf.logfmt_encode_ref(x, 8)
    assert lf.check_fast_codes(x, codes, tmin, tstep, 8) == 0
    far = ((x[0, :128].double().abs().log() - tmin[0, 0].double()) / tstep[0, 0].double()).frac()
    j = int((torch.minimum(far, 1 - far) + 1.0 * (x[0, :128] == 0)).argmin())  # on a grid point: mid-threshold
    for change in ("up", "sign", "nan tile", "step"):
        c, mn, st = codes.clone(), tmin.clone(), tstep.clone()
        if change == "up":
            c[0, j] = min(int(c[0, j] & 127) + 1, 127) | (int(c[0, j]) & 128)
            if c[0, j] == codes[0, j]:
                c[0, j] -= 2
        elif change == "sign":
            c[1, 5] ^= 128
        elif change == "nan tile":
            c[2, 140] = 1
        else:
            st[1, 1] = torch.nextafter(st[1, 1], torch.tensor(1.0))
        with pytest.raises(lf.CoscaleError):
            lf.check_fast_codes(x, c, mn, st, 8)


@needs_triton
@pytest.mark.parametrize("n_bits", [3, 8, 10, 16])
@pytest.mark.parametrize("cols", [128, 200])
def test_fast_codes_on_hard_inputs_are_nearest_codes_of_a_nearby_x(n_bits, cols):
    x = torch.cat([_hard_rows(cols, n_bits), -_hard_rows(cols, n_bits + 1)])
    x[3, :3] = 1e-30  # the clamp cuts a row whose other elements are normal
    for block_rows in (None, 4, 16):
        got = lf.logfmt_encode(x.to(KERNEL_DEVICE), n_bits, "fast", backend="triton", block_rows=block_rows)
        assert_fast_contract(x, *(t.cpu() for t in got), n_bits)


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
        assert_fast_contract(x, codes, tmin, tstep, n_bits)
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
    if heavy:  # Student-t with 2 degrees of freedom
        x = x / torch.sqrt(torch.distributions.Chi2(2.0).sample(x.shape) / 2)
    x = (x * torch.logspace(-3, 3, 64).unsqueeze(1)).to(torch.bfloat16)
    codes, tmin, tstep = (t.cpu() for t in lf.logfmt_encode(x.to(KERNEL_DEVICE), n_bits, "fast", backend="triton"))
    differ = assert_fast_contract(x, codes, tmin, tstep, n_bits)
    assert differ <= 1e-3 * x.numel()  # only next to a threshold
    y = lf.logfmt_decode_ref(codes, tmin, tstep, n_bits, dtype=torch.float64)
    xd = x.double()
    delta = lf.fast_position_error(xd.abs().clamp_min(1e-300).log2(), _per_element(tmin, x.shape[1]),
                                   _per_element(tstep, x.shape[1]))
    grow = torch.exp2(delta)
    bound = lf.nearest_error_bound(_per_element(tstep, x.shape[1])) * grow + (grow - 1)
    assert ((y - xd).abs() <= bound * xd.abs() * (1 + FP32_SLACK)).all()


@needs_triton
def test_fast_codec_round_trip_and_bad_rounding():
    x = torch.randn(40, 300) * 3
    codec = LogFMTCodec(8, "fast")
    rows = codec.encode(x)
    y = codec.decode(rows, 300, torch.float32)
    step = lf.logfmt_encode_ref(x, 8)[2]
    assert ((y - x).abs() <= (lf.nearest_error_bound(_per_element(step, 300)) * 1.001 + FP32_SLACK) * x.abs()).all()
    assert "fast" in repr(codec)
    with pytest.raises(Exception, match="rounding"):
        lf.logfmt_encode(x, 8, "fastest")
    # the reference backend has no "fast" codes of its own: it gives the nearest ones
    assert torch.equal(lf.logfmt_encode(x, 8, "fast", backend="torch")[0], lf.logfmt_encode_ref(x, 8)[0])


def test_fast_position_error_by_hand():
    """LOG2_BOUND + 2^-23 (2 |L| + |M| + 3 S + 24), M and S in log2 units; NaN tile numbers count as 0."""
    got = lf.fast_position_error(torch.tensor([-3.0]), torch.tensor([2 * math.log(2)]), torch.tensor([math.log(2)]))
    assert got.item() == pytest.approx(lf.LOG2_BOUND + 2.0**-23 * (6 + 2 + 3 + 24), rel=1e-12)
    assert lf.fast_position_error(torch.tensor([0.0]), torch.tensor([math.nan]), torch.tensor([math.nan])).item() \
        == pytest.approx(lf.LOG2_BOUND + 24 * 2.0**-23)
