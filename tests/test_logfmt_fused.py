"""LogFMT's float32 encoder at rounding thresholds (the float64 fallback), and the fused kernels: gather +
encode + pack into wire rows, unpack + decode + weighted sum, FP8 gather + quantize into wire rows. Each
against its PyTorch reference (the unfused references composed), under the Triton interpreter on CPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math

import pytest
import torch

from coscale.errors import CoscaleError
from coscale.kernels import logfmt as lf
from coscale.kernels.permute import build_permute_info, gather_rows_ref, sum_rows_ref

needs_triton = pytest.mark.skipif(
    not (lf.triton_available() and (lf.interpreting() or torch.cuda.is_available())),
    reason="needs triton (interpreter on CPU)",
)
# where the kernels of the decode tests run: the interpreter on CPU, or a GPU when TRITON_INTERPRET=0 (the
# GPU's ex2.approx and its own code paths, e.g. the LogFMT-8 byte fields in PTX)
KERNEL_DEVICE = "cpu" if lf.interpreting() or not torch.cuda.is_available() else "cuda"


def _threshold_rows(n_bits: int, rows: int = 4, seed: int = 0) -> torch.Tensor:
    """Rows whose elements sit on, and one fp32 ulp either side of, the rounding thresholds of their tile
    (the tile's grid is pinned by its max and min): every element is in the fast path's ambiguous band."""
    q = 2 ** (n_bits - 1) - 1
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(rows):
        amin, amax = 10.0 ** (-3 + r), 10.0 ** (-3 + r) * (50 + 200 * r)
        row = torch.empty(128)
        row[0], row[1] = amax, amin
        m = torch.tensor([math.log(amin)], dtype=torch.float64).float().double()
        s = ((math.log(amax) - math.log(amin)) / (q - 1))
        s = torch.tensor([s], dtype=torch.float64).float().double()
        k = torch.randint(0, q - 1, (42,), generator=g).double()
        mid = ((torch.exp(m + s * k) + torch.exp(m + s * (k + 1))) / 2).float()
        near = torch.stack([mid, torch.nextafter(mid, torch.tensor(0.0)), torch.nextafter(mid, torch.tensor(1e30))])
        row[2:128] = near.t().reshape(-1)
        row[2] = float(torch.exp(m) / 2)  # the 0 / 1 threshold
        signs = torch.where(torch.rand(128, generator=g) < 0.5, -1.0, 1.0)
        out.append(row * signs)
    return torch.stack(out)


@needs_triton
@pytest.mark.parametrize("n_bits", [8, 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threshold_elements_take_the_exact_path(n_bits, dtype):
    x = _threshold_rows(n_bits).to(dtype)
    x = torch.cat([x, torch.randn(3, 128).to(dtype)])  # rows without ambiguity in the same block
    ref = lf.logfmt_encode_ref(x, n_bits)
    got = lf.logfmt_encode(x, n_bits, backend="triton", block_rows=8)
    for g_, r in zip(got, ref):
        assert torch.equal(g_, r)
    if dtype == torch.float32:  # both sides of a threshold occur: the test is not vacuous
        mags = ref[0][:4].to(torch.int64) & (2 ** (n_bits - 1) - 1)
        trip = mags[:, 3:126].reshape(4, 41, 3)
        assert (trip.max(-1).values != trip.min(-1).values).any()


@needs_triton
@pytest.mark.parametrize("n_bits", [8, 10])
def test_float64_fallback_alone_equals_reference(n_bits, monkeypatch):
    """A band wider than any tile's step makes every element ambiguous: every row takes the fallback."""
    monkeypatch.setattr(lf, "DELTA", 64.0)
    x = torch.cat([_threshold_rows(n_bits, seed=1), torch.randn(5, 128) * 1e-3])
    x = torch.cat([x, torch.randn(9, 128)], dim=1)[:, :200]  # a ragged second tile
    x[1, 150:] = 0.25  # one distinct magnitude in that tile
    ref = lf.logfmt_encode_ref(x, n_bits)
    for g_, r in zip(lf.logfmt_encode(x, n_bits, backend="triton", block_rows=4), ref):
        assert torch.equal(g_, r)
    rows = lf.logfmt_encode_to_rows(x, torch.tensor([3, -1, 0, 8]), 1, n_bits, backend="triton")
    assert torch.equal(rows, lf.to_rows_ref(*lf.logfmt_encode_ref(x[[3, 3, 0, 8]] * torch.tensor(
        [[1.0], [0.0], [1.0], [1.0]]), n_bits), n_bits))


@needs_triton
@pytest.mark.parametrize("n_bits", [8, 10, 9])
@pytest.mark.parametrize("hidden", [256, 200])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_gather_encode_to_rows_equals_reference(n_bits, hidden, rounding):
    t, k, e = 13, 3, 5
    g = torch.Generator().manual_seed(hidden + n_bits)
    x = (torch.randn(t, hidden, generator=g) * torch.logspace(-3, 3, t).unsqueeze(1)).to(torch.bfloat16)
    x[2, :128] = 0
    x[4, 7] = float("nan")
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    info = build_permute_info(idx, e, align=4)  # padding rows (row_pair -1) included
    for packed in (True, False):
        got = lf.logfmt_encode_to_rows(x, info.row_pair, k, n_bits, rounding, seed=7, packed=packed,
                                       backend="triton", block_rows=4)
        assert got.shape == (info.num_rows, lf.row_bytes(hidden, n_bits, packed)[1])
        codes, tmin, tstep = lf.from_rows_ref(got, hidden, n_bits, packed)
        if rounding == "nearest":
            ref = lf.to_rows_ref(*lf.logfmt_encode_ref(gather_rows_ref(x, info.row_pair, k)[0], n_bits), n_bits,
                                 packed)
            assert torch.equal(got, ref)
        else:  # same draws as the unfused kernel on the gathered rows
            alone = lf.logfmt_encode(gather_rows_ref(x, info.row_pair, k)[0], n_bits, rounding, seed=7,
                                     backend="triton")
            assert torch.equal(codes, alone[0])
            torch.testing.assert_close(tmin, alone[1], equal_nan=True, rtol=0, atol=0)
        pad = info.row_pair < 0
        assert torch.equal(codes[pad], torch.zeros_like(codes[pad])) and (tmin[pad] == 0).all()
        separate = lf.logfmt_encode_rows(x, info.row_pair, k, n_bits, rounding, seed=7, backend="triton")
        assert torch.equal(separate[0], codes)
        torch.testing.assert_close(separate[1], tmin, equal_nan=True, rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("n_bits", [8, 10])
@pytest.mark.parametrize("hidden", [384, 130])
@pytest.mark.parametrize("weighted", [True, False])
def test_decode_sum_equals_decode_then_combine(n_bits, hidden, weighted):
    t, k, e = 11, 4, 6
    g = torch.Generator().manual_seed(n_bits * hidden)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    info = build_permute_info(idx, e, align=8)
    y = torch.randn(info.num_rows, hidden, generator=g) * 3
    y[info.pair_row[0, 1], 5] = float("inf")  # a non-finite tile: its token's sum is NaN there
    y[info.pair_row[1:3, 0], 20:40] = 0.0  # zero codes, among negative values
    w = torch.rand(t, k, generator=g) if weighted else None
    codes, tmin, tstep = lf.logfmt_encode_ref(y, n_bits)
    dec = lf.logfmt_decode_ref(codes, tmin, tstep, n_bits)
    expected = sum_rows_ref(dec, info.pair_row, info.row_pair, w, torch.float32)
    dev = KERNEL_DEVICE
    codes_d, tmin_d, tstep_d, pair = codes.to(dev), tmin.to(dev), tstep.to(dev), info.pair_row.to(dev)
    w_dev = None if w is None else w.to(dev)
    got = lf.logfmt_decode_sum(codes_d, tmin_d, tstep_d, pair, w_dev, n_bits, backend="triton", block_rows=4).cpu()
    # fp32 exp (on a GPU ex2.approx, 2^-22, and the exponent's rounding) and the summation order
    rtol = 2e-6 if dev == "cpu" else 5e-6
    atol = rtol * k * dec[torch.isfinite(dec)].abs().max().item()
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, equal_nan=True)
    assert torch.isnan(got[0, :128]).all() and torch.isfinite(got[1:]).all()
    rows = lf.to_rows_ref(codes, tmin, tstep, n_bits)
    from_rows = lf.logfmt_decode_rows(rows.to(dev), hidden, pair, w_dev, n_bits, torch.bfloat16, backend="triton")
    torch.testing.assert_close(from_rows.float().cpu(), expected, rtol=1e-2, atol=0, equal_nan=True)
    torch.testing.assert_close(lf.logfmt_decode_rows(rows, hidden, info.pair_row, w, n_bits, backend="torch"),
                               expected, rtol=0, atol=0, equal_nan=True)
    plain = lf.logfmt_decode_rows(rows.to(dev), hidden, n_bits=n_bits, backend="triton").cpu()
    torch.testing.assert_close(plain, dec, rtol=rtol, atol=0, equal_nan=True)
    # the plain decoder (no sum): the same values, and every zero code +0 (never -0)
    alone = lf.logfmt_decode(codes_d, tmin_d, tstep_d, n_bits, backend="triton").cpu()
    torch.testing.assert_close(alone, dec, rtol=rtol, atol=0, equal_nan=True)
    zeros = (codes & (2 ** (n_bits - 1) - 1)) == 0
    assert zeros.sum() >= 40 and (alone[zeros & ~torch.isnan(alone)].view(torch.int32) == 0).all()
    for wide in (torch.int16, torch.int32):  # the same codes in wider integers (accepted): the same values
        other = lf.logfmt_decode(codes_d.to(wide), tmin_d, tstep_d, n_bits, backend="triton")
        assert torch.equal(other.cpu().view(torch.int32), alone.view(torch.int32)), wide
    assert got.shape == (t, hidden)


def test_row_layout_errors_are_clear():
    with pytest.raises(CoscaleError, match="uint8"):
        lf.logfmt_decode_rows(torch.zeros(2, 10, dtype=torch.uint8), 128, n_bits=8, backend="torch")
    with pytest.raises(CoscaleError, match="pair_row"):
        lf.logfmt_decode_sum(*lf.logfmt_encode_ref(torch.randn(4, 128), 8), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(CoscaleError, match="integer"):
        lf.logfmt_encode_rows(torch.randn(4, 128), torch.zeros(3))
    assert lf.code_packing(10) == (4, 5) and lf.code_packing(9) == (1, 2) and lf.code_packing(8, False) == (1, 2)


@needs_triton
@pytest.mark.parametrize("hidden", [256, 384])
def test_fp8_gather_quant_rows_equals_codec_bytes(hidden):
    from coscale.kernels.fused_quant import gather_quant_rows
    from coscale.parallel.codec import FP8Codec

    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(9, hidden, generator=g).to(torch.bfloat16) * 5
    x[3, :128] = 0
    index = torch.tensor([4, 4, 0, 8, 2, 7, 1, 1, 3, 5, 6])
    ref = FP8Codec().encode(x).index_select(0, index)
    got = gather_quant_rows(x, index, backend="triton")
    assert torch.equal(got, gather_quant_rows(x, index, backend="torch"))
    assert torch.equal(got, ref)
    # the dispatch packs FP8 rows as ref does (the transfer's generic path: encode, then select)
    assert not hasattr(FP8Codec(), "encode_rows")
    with pytest.raises(CoscaleError, match="multiple of 128"):
        gather_quant_rows(x[:, :200], index)


@pytest.mark.parametrize("n_bits", [8, 10])
def test_codec_encode_rows_encodes_each_source_row_once_when_rows_repeat(n_bits, monkeypatch):
    """LogFMTCodec.encode_rows: fewer rows than the source has go through the one-pass gather encoder;
    as many or more (top-k copies) are encoded once per source row and their bytes selected. Both give
    encode(x).index_select(0, index), byte for byte."""
    from coscale.kernels import logfmt as lf
    from coscale.parallel.codec import LogFMTCodec

    g = torch.Generator().manual_seed(n_bits)
    x = torch.randn(6, 256, generator=g).to(torch.bfloat16) * 3
    codec = LogFMTCodec(n_bits)
    seen = []
    real = lf.logfmt_encode_to_rows

    def spy(x_, idx, *a, **k):
        seen.append(idx)
        return real(x_, idx, *a, **k)

    monkeypatch.setattr(lf, "logfmt_encode_to_rows", spy)
    for index in (torch.tensor([5, 1, 1]), torch.tensor([4, 4, 0, 5, 2, 1, 1, 3, 3, 0, 2, 5])):
        seen.clear()
        got = codec.encode_rows(x, index)
        assert torch.equal(got, real(x, None, 1, n_bits).index_select(0, index))
        gathered = len(index) < x.shape[0]
        assert (seen[0] is index) if gathered else (seen[0] is None)
