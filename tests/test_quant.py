"""Quantization: PyTorch references vs the published semantics, Triton kernels (interpreted) vs references."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton.jit'd kernels

import numpy as np
import pytest
import torch

from coscale.errors import CoscaleError
from coscale.kernels import quant as q

FP8 = q.FP8_DTYPE
# the tests marked so run the kernels on CPU tensors: Triton's interpreter only (under TRITON_INTERPRET=0
# on a GPU machine they skip; the tests marked needs_kernels run there on the GPU)
needs_triton = pytest.mark.skipif(
    not (q.triton_available() and q.interpreting()), reason="needs triton's interpreter (TRITON_INTERPRET=1)"
)
needs_kernels = pytest.mark.skipif(
    not (q.triton_available() and (q.interpreting() or torch.cuda.is_available())),
    reason="needs triton (the interpreter on CPU, or a GPU)",
)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def published_act_quant(x: torch.Tensor):
    """DeepSeek-V3's act_quant written out literally: s = amax / 448, y = x / s (K % 128 == 0)."""
    m, k = x.shape
    tiles = x.float().view(m, k // 128, 128)
    amax = tiles.abs().amax(-1, keepdim=True)
    s = amax / 448.0
    return (tiles / s).to(FP8).view(m, k), s.squeeze(-1)


def published_weight_quant(w: torch.Tensor):
    n, k = w.shape
    blocks = w.float().view(n // 128, 128, k // 128, 128)
    s = blocks.abs().amax(dim=(1, 3), keepdim=True) / 448.0
    return (blocks / s).to(FP8).view(n, k), s.view(n // 128, k // 128)


def test_reference_matches_published_semantics_bitwise():
    torch.manual_seed(0)
    x = torch.randn(256, 512) * torch.logspace(-3, 3, 512)
    y, s = q.act_quant_1x128_ref(x)
    y_pub, s_pub = published_act_quant(x)
    assert torch.equal(bits(y), bits(y_pub)) and torch.equal(s, s_pub)
    w = torch.randn(256, 384) * 0.02
    yw, sw = q.weight_quant_128x128_ref(w)
    yw_pub, sw_pub = published_weight_quant(w)
    assert torch.equal(bits(yw), bits(yw_pub)) and torch.equal(sw, sw_pub)


def test_reference_layouts_and_padding():
    x = torch.randn(300, 200)
    y, s = q.act_quant_1x128_ref(x)
    assert y.shape == (300, 256) and s.shape == (300, 2) and s.stride() == (1, 300)  # outer-dim-major
    assert torch.equal(bits(y[:, 200:]), torch.zeros(300, 56, dtype=torch.uint8))
    yt, st = q.act_quant_128x1_ref(x)
    assert yt.shape == (200, 384) and st.shape == (200, 3)
    assert torch.equal(bits(yt), bits(q.act_quant_1x128_ref(x.t().contiguous())[0]))
    w, sw = q.weight_quant_128x128_ref(x)
    assert w.shape == (384, 256) and sw.shape == (3, 2)


def test_roundtrip_error_within_half_ulp():
    torch.manual_seed(1)
    x = torch.randn(128, 1024) * 3
    y, s = q.act_quant_1x128_ref(x)
    deq = q.dequant_1x128(y, s)
    # RNE to 3 mantissa bits: |error| <= 2^-4 |x| for normal values, plus a subnormal floor
    bound = 2.0**-4 * x.abs() + s.repeat_interleave(128, 1) * 2.0**-10
    assert bool(((deq - x).abs() <= bound).all())


def test_round_scale_ue8m0_is_power_of_two_and_not_smaller():
    s = torch.tensor([1.0, 0.75, 1e-9, 3.0e30, 2.0**-20, float("inf"), float("nan")])
    r = q.round_scale_ue8m0(s)
    finite = torch.isfinite(s)
    mant, _ = torch.frexp(r[finite])
    assert torch.all(mant == 0.5) and torch.all(r[finite] >= s[finite]) and torch.all(r[finite] < 2 * s[finite])
    assert torch.isinf(r[5]) and torch.isnan(r[6])
    x = torch.randn(64, 256)
    y, scale = q.act_quant_1x128_ref(x, round_scale=True)
    assert torch.all(torch.frexp(scale)[0] == 0.5)
    assert q.dequant_1x128(y, scale).sub(x).abs().max() < 0.1 * x.abs().max()


def test_zeros_saturation_and_mixed_tiles():
    x = torch.zeros(128, 384)
    x[:, 128:256] = torch.randn(128, 128) * 1e4  # a zero tile next to large tiles
    x[:, 256:] = torch.randn(128, 128) * 1e-9
    y, s = q.act_quant_1x128_ref(x)
    deq = q.dequant_1x128(y, s)
    assert torch.equal(deq[:, :128], torch.zeros(128, 128))  # zeros stay exact zeros
    assert torch.all(torch.isfinite(s)) and torch.all(s > 0)
    assert y.float().abs().max() == 448.0  # the amax element maps onto the top of the range
    rel = (deq[:, 256:] - x[:, 256:]).norm() / x[:, 256:].norm()
    assert rel < 0.05  # tiny tiles keep their relative precision (tiny amax floor)


def test_nan_and_inf_never_become_finite():
    x = torch.randn(128, 256)
    x[3, 5] = float("nan")
    x[7, 130] = float("inf")
    y, s = q.act_quant_1x128_ref(x)
    deq = q.dequant_1x128(y, s)
    assert torch.isnan(s[3, 0]) and torch.isinf(s[7, 1])
    assert torch.all(~torch.isfinite(deq[3, :128])) and torch.all(~torch.isfinite(deq[7, 128:]))
    assert torch.all(torch.isfinite(deq[3, 128:]))  # other tiles unaffected
    w, ws = q.weight_quant_128x128_ref(x)
    assert torch.isnan(ws[0, 0]) and torch.all(~torch.isfinite(q.dequant_128x128(w, ws)[:128, :128]))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(CoscaleError, match="2-D"):
        q.act_quant_1x128(torch.randn(2, 3, 128))
    with pytest.raises(CoscaleError, match="backend"):
        q.act_quant_1x128(torch.randn(2, 128), backend="cuda")


# ---------------------------------------------------------------- Triton kernels (interpreted on CPU)

SHAPES = [(128, 128), (256, 384), (300, 200), (64, 1000)]


def _assert_same_fp8(got, ref, got_scale=None, ref_scale=None, rows_1x128=True):
    """Bit-exact where the reference is not NaN; NaN positions must dequantize non-finite."""
    not_nan = ~torch.isnan(ref.float())
    assert torch.equal(bits(got)[not_nan], bits(ref)[not_nan])
    if got_scale is not None:
        assert torch.equal(got_scale, ref_scale) or torch.allclose(got_scale, ref_scale, equal_nan=True, rtol=0)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("round_scale", [False, True])
def test_triton_dual_matches_reference_bitwise(shape, dtype, round_scale):
    torch.manual_seed(hash((shape, round_scale)) % 1000)
    x = (torch.randn(shape) * torch.logspace(-4, 4, shape[1])).to(dtype)
    y, s, yt, st = q.act_quant_1x128_dual(x, round_scale, backend="triton")
    ry, rs, ryt, rst = q.act_quant_1x128_dual(x, round_scale, backend="torch")
    assert y.shape == ry.shape and yt.shape == ryt.shape and s.shape == rs.shape
    _assert_same_fp8(y, ry, s, rs)
    _assert_same_fp8(yt, ryt, st, rst)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_triton_single_layouts_and_weight_quant(shape):
    torch.manual_seed(3)
    x = torch.randn(shape) * 0.05
    y, s = q.act_quant_1x128(x, backend="triton")
    _assert_same_fp8(y, q.act_quant_1x128_ref(x)[0], s, q.act_quant_1x128_ref(x)[1])
    yt, st = q.act_quant_128x1(x, backend="triton")
    _assert_same_fp8(yt, q.act_quant_128x1_ref(x)[0], st, q.act_quant_128x1_ref(x)[1])
    w, sw = q.weight_quant_128x128(x, backend="triton")
    rw, rsw = q.weight_quant_128x128_ref(x)
    _assert_same_fp8(w, rw, sw, rsw)


@needs_triton
def test_triton_transposed_input_strides():
    x = torch.randn(256, 384).t()  # non-contiguous [384, 256]
    y, s = q.act_quant_1x128(x, backend="triton")
    _assert_same_fp8(y, q.act_quant_1x128_ref(x)[0], s, q.act_quant_1x128_ref(x)[1])


@needs_triton
def test_triton_special_values():
    x = torch.randn(256, 256)
    x[:, :128] = 0.0
    x[130, 140] = float("nan")
    x[5, 200] = float("-inf")
    x[10, 150] = 1e6
    y, s, yt, st = q.act_quant_1x128_dual(x, backend="triton")
    ry, rs, ryt, rst = q.act_quant_1x128_dual(x, backend="torch")
    _assert_same_fp8(y, ry, s, rs)
    _assert_same_fp8(yt, ryt, st, rst)
    deq = q.dequant_1x128(y, s)
    assert torch.equal(deq[:, :128], torch.zeros(256, 128))
    assert torch.all(~torch.isfinite(deq[130, 128:])) and torch.all(~torch.isfinite(deq[5, 128:]))
    deqt = q.dequant_1x128(yt, st)
    assert torch.all(~torch.isfinite(deqt[140, 128:])) and torch.all(~torch.isfinite(deqt[200, :128]))
    assert torch.isfinite(deq[10, 128:]).all() and deq[10, 150] == 1e6
    w, sw = q.weight_quant_128x128(x, backend="triton")
    assert torch.isnan(sw[1, 1]) and torch.isinf(sw[0, 1]) and sw[0, 0] == q.AMAX_FLOOR / q.FP8_MAX


@needs_triton
def test_interpreter_grid_rounding_covers_every_e4m3_value():
    # every e4m3 code's value, midpoints between neighbours (ties) and just-beside values
    codes = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = torch.sort(codes[torch.isfinite(codes)].unique()).values
    mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([grid, mids, mids * (1 + 2**-20), mids * (1 - 2**-20)])
    vals = torch.cat([vals, -vals])
    vals = torch.cat([vals, torch.zeros(-vals.numel() % 127)]).view(-1, 127)
    x = torch.cat([torch.full((vals.shape[0], 1), 448.0), vals], 1).t().contiguous()  # [128, cols]
    # every column holds 448 once, so every 128x1 tile (one column of x) has scale exactly 1
    yt, st = q.act_quant_128x1(x, backend="triton")
    ryt, rst = q.act_quant_128x1_ref(x)
    assert torch.all(rst == 1.0)
    _assert_same_fp8(yt, ryt, st, rst)


def test_reference_scale_is_the_ieee_quotient():
    # the scale must be fl(amax / 448) on every device (a reciprocal multiply, what CUDA does for
    # `tensor / python_number`, differs in about half of the tiles); float64 division rounded to fp32
    # is the correctly rounded fp32 quotient
    torch.manual_seed(5)
    x = (torch.randn(512, 1024) * torch.logspace(-3, 2, 1024)).to(torch.bfloat16)
    _, s = q.act_quant_1x128_ref(x)
    amax = x.float().view(512, 8, 128).abs().amax(-1)
    assert torch.equal(s, (amax.double() / 448.0).float())
    recip = amax * torch.tensor(1 / 448.0)
    assert not torch.equal(s, recip)  # the check can tell the two apart


@needs_triton
@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (3, 128, 256)])
def test_triton_weight_dual_matches_reference(shape):
    torch.manual_seed(7)
    w = torch.randn(shape) * 0.02
    w[..., 0, 5] = 3.0
    y, s, yt, st = q.weight_quant_128x128_dual(w, backend="triton")
    ry, rs, ryt, rst = q.weight_quant_128x128_dual(w, backend="torch")
    for got, ref in ((y, ry), (yt, ryt)):
        assert got.shape == ref.shape
        _assert_same_fp8(got, ref)
    assert torch.equal(s, rs) and torch.equal(st, rst)
    w2 = w if w.dim() == 2 else w[1]
    y2, s2 = q.weight_quant_128x128_ref(w2)
    yy, ss, yyt, sst = (t if w.dim() == 2 else t[1] for t in (ry, rs, ryt, rst))
    assert torch.equal(bits(yy), bits(y2)) and torch.equal(ss, s2)
    assert torch.equal(bits(yyt), bits(y2.t().contiguous())) and torch.equal(sst, s2.t())


@needs_kernels
@pytest.mark.parametrize("shapes", [[(256, 384)], [(200, 130)], [(3, 128, 256)], [(3, 130, 200), (3, 70, 200)],
                                    [(136, 256), (0, 256)]], ids=["2d", "ragged", "batch", "stacked", "empty-part"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_pair_in_one_pass_writes_what_two_passes_write(monkeypatch, shapes, dtype):
    """WEIGHT_PAIR_ONE_PASS (W^T's bytes from the quantizing programs) against the two-pass path and the
    reference: stacked weights (each with its own columns of W^T), ragged edges, a batch of experts, and an
    empty part."""
    from coscale.kernels import quant_ops as qo

    g = torch.Generator().manual_seed(len(shapes) + shapes[0][-1])
    ws = [(torch.randn(sh, generator=g) * torch.logspace(-3, 2, sh[-1])).to(dtype).to(KERNEL_DEVICE) for sh in shapes]
    if ws[0].numel():
        ws[0][..., 0, 5] = float("inf")  # a block whose scale is inf: its signed zeros and NaN
        ws[0][..., 1, 6] = -1.0
    ref = qo._weight_quant_torch(ws, False, True)
    for one_pass in (True, False):
        monkeypatch.setattr(qo, "WEIGHT_PAIR_ONE_PASS", one_pass)
        got = qo._weight_quant_triton(ws, False, True)
        for a, b in zip(got, ref):
            assert a.shape == b.shape
            if a.dtype == FP8:
                _assert_same_fp8(a, b)
            else:
                assert torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(bits(got[2]), bits(got[0]).transpose(-2, -1))  # NaN bytes included


@needs_triton
def test_triton_weight_dual_into_stacked_buffers():
    torch.manual_seed(8)
    wg, wu = torch.randn(2, 128, 256), torch.randn(2, 128, 256)
    buf = torch.empty(2, 256, 256, dtype=FP8), torch.empty(2, 2, 2), torch.empty(2, 256, 256, dtype=FP8)
    sbt = torch.empty(2, 2, 2)
    for i, w in enumerate((wg, wu)):
        rows, blk = slice(128 * i, 128 * (i + 1)), slice(i, i + 1)
        out = (buf[0][:, rows], buf[1][:, blk], buf[2][:, :, rows], sbt[:, :, blk])
        q.weight_quant_128x128_dual(w, backend="triton", out=out)
    ref = torch.cat([wg, wu], 1)
    ry, rs, ryt, rst = q.weight_quant_128x128_dual(ref, backend="torch")
    _assert_same_fp8(buf[0], ry)
    _assert_same_fp8(buf[2], ryt)
    assert torch.equal(buf[1], rs) and torch.equal(sbt, rst)


@needs_triton
@pytest.mark.parametrize("shape", [(300, 200), (128, 256)])
def test_triton_padded_transposed_layout(shape):
    x = torch.randn(shape)
    y, s, yt, st = q.act_quant_1x128_dual(x, backend="triton", pad_t=True)
    ry, rs, ryt, rst = q.act_quant_1x128_dual(x, backend="torch", pad_t=True)
    kp = -(-shape[1] // 128) * 128
    assert yt.shape == ryt.shape == (kp, -(-shape[0] // 128) * 128) and st.shape == rst.shape
    _assert_same_fp8(y, ry, s, rs)
    _assert_same_fp8(yt, ryt, st, rst)
    assert torch.equal(bits(yt[shape[1] :]), torch.zeros_like(bits(yt[shape[1] :])))
    yt1, st1 = q.act_quant_128x1(x, backend="triton", pad_t=True)
    assert torch.equal(bits(yt1), bits(yt)) and torch.equal(st1, st)


@needs_triton
@pytest.mark.parametrize("shape", [(128, 64), (200, 130), (3, 70, 300), (1, 1)])
def test_transpose_fp8_is_an_exact_byte_transpose(shape):
    torch.manual_seed(5)
    y = torch.randint(0, 256, shape, dtype=torch.uint8).view(FP8)
    got = q.transpose_fp8(y, backend="triton")
    assert got.shape == (*shape[:-2], shape[-1], shape[-2]) and got.is_contiguous()
    assert torch.equal(bits(got), bits(y).transpose(-2, -1))
    # into a strided view (a column block of a wider buffer), leaving the rest untouched
    wide = torch.zeros(*shape[:-2], shape[-1], shape[-2] + 128, dtype=torch.uint8).view(FP8)
    q.transpose_fp8(y, out=wide[..., 64 : 64 + shape[-2]], backend="triton")
    assert torch.equal(bits(wide[..., 64 : 64 + shape[-2]]), bits(y).transpose(-2, -1))
    assert int(bits(wide[..., :64]).sum()) == 0 and int(bits(wide[..., 64 + shape[-2] :]).sum()) == 0


def test_transpose_fp8_rejects_bad_inputs():
    with pytest.raises(CoscaleError, match="1-byte"):
        q.transpose_fp8(torch.zeros(4, 4))
    with pytest.raises(CoscaleError, match="out must be"):
        q.transpose_fp8(torch.zeros(4, 8, dtype=FP8), out=torch.zeros(4, 8, dtype=FP8))


@needs_triton
@pytest.mark.parametrize("pad_t", [False, True])
def test_dual_one_pass_and_two_launches_write_the_same_bytes(pad_t):
    torch.manual_seed(8)
    x = (torch.randn(200, 300) * torch.logspace(-3, 2, 300)).to(torch.bfloat16)
    two = q.act_quant_1x128_dual(x, backend="triton", pad_t=pad_t)
    one = q.act_quant_1x128_dual(x, backend="triton", pad_t=pad_t, one_pass=True)
    ref = q.act_quant_1x128_dual(x, backend="torch", pad_t=pad_t)
    for a, b, r in zip(two, one, ref):
        if a.dtype == FP8:
            assert torch.equal(bits(a), bits(b)) and torch.equal(bits(a), bits(r))
        else:
            assert torch.equal(a, b) and torch.equal(a, r)


# ---------------------------------------------------------------- every autotuning candidate, same bits


def _hard_input(m, k, dtype, seed):
    """Values over 8 decades, signed zeros, a zero tile, NaN and -inf, and quotients on E4M3 ties."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-4, 4, k)
    x[:, :7] = -0.0
    if k > 256:
        x[: min(m, 128), 128:256] = 0.0
    x[m // 2, k // 3] = float("nan")
    x[m // 3, k - 1] = float("-inf")
    # the last rows: tiles of amax 448 c (c in [1, 2), one per row, so s = c is no power of two) holding
    # c times midpoints between E4M3 values, rounded to fp32: x / s lies within an ulp or two of a tie,
    # where a quotient one ulp off rounds to the other E4M3 neighbour
    codes = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = torch.sort(codes[torch.isfinite(codes) & (codes >= 0)].unique()).values
    mids = (grid[1:] + grid[:-1]) / 2
    ties = torch.cat([mids, -mids])
    rows = min(m, 64)
    c = 1 + torch.rand(rows, 1, generator=gen)
    for t0 in range(0, k, 128):
        w = min(128, k - t0)
        pick = ties[torch.randint(0, ties.numel(), (rows, w), generator=gen)]
        pick[:, 0] = 448.0
        x[m - rows :, t0 : t0 + w] = pick * c
    return x.to(dtype)


# the device of the kernels: the interpreter's CPU, or the GPU under TRITON_INTERPRET=0
KERNEL_DEVICE = "cpu" if q.interpreting() or not torch.cuda.is_available() else "cuda"


def _config(cfg):
    c, w = cfg
    return {**c, "num_warps": w}


def _check_act_family(family, x, round_scale):
    """every candidate of one activation kernel family, launched directly, against act_quant_reference."""
    from coscale.kernels import quant_ops as qo

    m, k = x.shape
    ry, rs, ryt, rst = qo.act_quant_reference(x, round_scale, True, True, True)
    rows, cols = family in ("rows", "producer_rows", "dual"), family in ("cols", "producer_cols", "dual")
    configs = {"rows": qo.ROWS_CONFIGS, "cols": qo.COLS_CONFIGS, "producer_rows": qo.PRODUCER_ROWS_CONFIGS,
               "producer_cols": qo.PRODUCER_COLS_CONFIGS, "dual": qo.DUAL_CONFIGS}[family]
    for cfg in configs:
        outs = qo.quant_outputs(m, k, x.device, rows, cols, True)
        if family == "rows":
            qo.launch_rows(x, outs[0], outs[1], round_scale, config=_config(cfg))
        elif family == "cols":
            qo.launch_cols(x, outs[2], outs[3], round_scale, config=_config(cfg))
        else:  # the producer kernels with the identity producer
            qo.launch_producer(family.removeprefix("producer_"), outs, x, round_scale, m=m, k=k, config=_config(cfg))
        if rows:
            _assert_same_fp8(outs[0], ry, outs[1], rs)
        if cols:
            _assert_same_fp8(outs[2], ryt, outs[3], rst)


def _check_weight_family(x):
    """every weight_kernel candidate (with and without W^T's bytes) and every transpose candidate."""
    from coscale.kernels import quant_ops as qo

    rw, rsw = q.weight_quant_128x128_ref(x)
    y8 = None
    for cfg in qo.WEIGHT_CONFIGS:
        for with_wt in (False, True):  # W^T's bytes from the same program (WT) or not written
            y, s, yt, st = qo._weight_outputs([x], True)
            yt.view(torch.uint8).fill_(0x7F)  # NaN bytes: any byte the kernel does not write shows
            qo.launch_weight(x, y, s, st, False, config=_config(cfg), yt=yt if with_wt else None)
            _assert_same_fp8(y, rw, s, rsw)
            assert torch.equal(st, s.t()) or torch.allclose(st, s.t(), equal_nan=True, rtol=0)
            if with_wt:
                assert torch.equal(bits(yt), bits(y).t())
        y8 = y
    for cfg in qo.TRANSPOSE_CONFIGS:
        out = torch.empty(y8.shape[1], y8.shape[0], dtype=FP8, device=x.device)
        qo.transpose_bytes(y8, out, config=_config(cfg), words=False)
        assert torch.equal(bits(out), bits(y8).t())
    for cfg in qo.TRANSPOSE_WORDS_CONFIGS:  # (y8's rows and columns are padded to multiples of 128)
        out = torch.zeros(y8.shape[1], y8.shape[0], dtype=FP8, device=x.device)
        qo.transpose_bytes(y8, out, config=_config(cfg), words=True)
        assert torch.equal(bits(out), bits(y8).t())


# one test a kernel family: the interpreter takes up to about 20 s a family (both rounding modes) on two busy
# cores, so the whole sweep of a shape (65-98 s) would break the minute a test may take
@needs_kernels
@pytest.mark.parametrize("family", ["rows", "cols", "producer_rows", "producer_cols", "dual", "weight"])
@pytest.mark.parametrize("shape", [(300, 200), (64, 1000), (130, 384)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_candidate_configuration_writes_the_reference_bits(family, shape, dtype):
    # autotuning must not change results: each GPU candidate, launched directly (the interpreter ignores
    # num_warps, but the tile shapes and masks are the ones the GPU runs), against the reference
    x = _hard_input(*shape, dtype, seed=shape[0]).to(KERNEL_DEVICE)
    if family == "weight":
        _check_weight_family(x)
        return
    for round_scale in (False, True):
        _check_act_family(family, x, round_scale)


@needs_kernels
@pytest.mark.parametrize("shape", [(3, 256, 384), (4, 8), (132, 260), (130, 384), (256, 130)])
def test_transpose_through_words_and_its_fallback(shape):
    """transpose_bytes through 32-bit words: a batch, tiles past the edges, and sizes that are not multiples
    of 4 (then the byte kernel): every byte in place."""
    from coscale.kernels import quant_ops as qo

    g = torch.Generator().manual_seed(sum(shape))
    y = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).to(KERNEL_DEVICE)
    for words in (True, False):
        out = torch.zeros(*shape[:-2], shape[-1], shape[-2], dtype=torch.uint8, device=y.device)
        qo.transpose_bytes(y, out, words=words)
        assert torch.equal(out, y.transpose(-1, -2))


@needs_kernels
def test_signed_zeros_and_ties_are_exact():
    x = _hard_input(256, 384, torch.float32, seed=11).to(KERNEL_DEVICE)
    y, s, yt, st = q.act_quant_1x128_dual(x, backend="triton")
    ry, rs, ryt, rst = q.act_quant_1x128_dual(x, backend="torch")
    assert int((bits(ry[:, :7]) == 0x80).sum()) > 0  # the reference keeps -0 (so the check can fail)
    _assert_same_fp8(y, ry, s, rs)
    _assert_same_fp8(yt, ryt, st, rst)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's own FMA and cast: needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernels_bit_exact_on_large_random_inputs(dtype):
    # millions of quotients, ties included: the reciprocal-and-FMA division must give the IEEE quotient's
    # E4M3 rounding every time (a one-ulp error shows up as a handful of flipped bytes here)
    x = _hard_input(4096, 3000, dtype, seed=12).cuda()
    for round_scale in (False, True):
        got = q.act_quant_1x128_dual(x, round_scale, backend="triton", pad_t=True)
        one = q.act_quant_1x128_dual(x, round_scale, backend="triton", pad_t=True, one_pass=True)
        ref = q.act_quant_1x128_dual(x, round_scale, backend="torch", pad_t=True)
        for g, o, r in zip(got, one, ref):
            if g.dtype == FP8:
                _assert_same_fp8(g, r)
                _assert_same_fp8(o, r)
            else:
                assert torch.allclose(g, r, rtol=0, atol=0, equal_nan=True)
                assert torch.allclose(o, r, rtol=0, atol=0, equal_nan=True)
        wy, ws, wyt, wst = q.weight_quant_128x128_dual(x, round_scale, backend="triton")
        ry, rs, ryt, rst = q.weight_quant_128x128_dual(x, round_scale, backend="torch")
        _assert_same_fp8(wy, ry, ws, rs)
        _assert_same_fp8(wyt, ryt, wst, rst)


@needs_kernels
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("source,inter", [(1, 200), (2, 200), (2, 384)])
def test_every_swiglu_producer_configuration_writes_the_same_bytes(source, inter, weighted):
    # SwiGLU (1) and its backward (2) under every rows configuration (block shapes) write what the first
    # one writes (the interpreter's, checked against the reference elsewhere); ragged columns, and for the
    # backward a gate width of three 128-column tiles (quant_ops.SWIGLU_BACKWARD_PAIRED: dg and du from one program).
    # Weighted: each row times its router weight (coscale.kernels.fp8_moe); the paired backward also writes the
    # weight's gradient a gate tile at a time (TILE_DOT), from programs of 1-8 tiles
    from coscale.kernels import quant_ops as qo

    gen = torch.Generator().manual_seed(source)
    m = 45
    gate_up = (torch.randn(m, 2 * inter, generator=gen) * 2).to(torch.bfloat16).to(KERNEL_DEVICE)
    da = torch.randn(m, inter, generator=gen).to(torch.bfloat16).to(KERNEL_DEVICE) if source == 2 else None
    w = torch.rand(m, generator=gen).to(KERNEL_DEVICE) if weighted else None
    tile_dots = weighted and source == 2 and inter % 128 == 0
    k = inter if source == 1 else 2 * inter
    results = []
    for cfg in qo.PRODUCER_ROWS_CONFIGS:
        outs = qo.quant_outputs(m, k, gate_up.device, True, False, True)
        dots = torch.full((m, inter // 128), float("nan"), device=KERNEL_DEVICE) if tile_dots else None
        qo.launch_producer("rows", outs, gate_up, False, m=m, k=k, source=source, b=da, w=w, up_offset=inter,
                           tile_dot_out=dots, config=_config(cfg))
        results.append((outs[0].view(torch.uint8).cpu(), outs[1].cpu(), None if dots is None else dots.cpu()))
    assert (results[0][0] != 0).any()
    for got in results[1:]:
        assert torch.equal(got[0], results[0][0]) and torch.equal(got[1], results[0][1])
    if tile_dots:  # every part written (no NaN left), and the same sums whatever the program's shape
        from coscale.kernels.fused_quant import swiglu_dots

        parts = [r[2] for r in results]
        assert not torch.isnan(parts[0]).any()
        for got in parts[1:]:
            torch.testing.assert_close(got, parts[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(parts[0].sum(1), swiglu_dots(gate_up.cpu(), da.cpu(), "triton"), rtol=1e-5,
                                   atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("with_dot", [False, True])
def test_every_gather_producer_configuration_writes_the_same_bytes(with_dot):
    # the permutation's gather (SOURCE 3: rows x[row_pair // K], weighted, padding rows -1) under every
    # every block shape writes what the first configuration writes, and with a dot product (the combine's
    # backward, always whole rows) the same sums
    from coscale.kernels import quant_ops as qo

    gen = torch.Generator().manual_seed(5)
    tokens, k, hidden = 37, 3, 640
    x = (torch.randn(tokens, hidden, generator=gen) * 3).to(torch.bfloat16).to(KERNEL_DEVICE)
    pairs = torch.randperm(tokens * k, generator=gen)
    row_pair = torch.cat([pairs, torch.full((9,), -1)]).to(torch.int32).to(KERNEL_DEVICE)  # 9 padding rows
    w = torch.rand(tokens * k, generator=gen).to(KERNEL_DEVICE)
    m = row_pair.shape[0]
    dot = torch.randn(m, hidden, generator=gen).to(torch.bfloat16).to(KERNEL_DEVICE) if with_dot else None
    results = []
    for cfg in qo.PRODUCER_ROWS_CONFIGS:
        outs = qo.quant_outputs(m, hidden, x.device, True, False, True)
        dot_out = torch.zeros(tokens * k, device=x.device) if with_dot else None
        qo.launch_producer("rows", outs, x, False, m=m, k=hidden, source=3, idx=row_pair, w=w, topk=k,
                           dot=dot, dot_out=dot_out, config=_config(cfg))
        results.append((outs[0].view(torch.uint8).cpu(), outs[1].cpu(), None if dot_out is None else dot_out.cpu()))
    first = results[0]
    assert (first[0] != 0).any() and (first[0][-9:] == 0).all()  # real rows quantized, padding rows zero
    for got in results[1:]:
        assert torch.equal(got[0], first[0]) and torch.equal(got[1], first[1])
        if with_dot:
            assert torch.equal(got[2], first[2]) and first[2].abs().sum() > 0


def _fma32(a, b, c):
    """float32 fma(a, b, c) = RN32(a * b + c) emulated exactly in float64 (numpy arrays of float32): a * b
    is exact in float64 (48 bits), TwoSum gives p + c = hi + lo exactly, and where hi sits on a float32
    rounding midpoint, lo decides the direction (no double rounding)."""
    a, b, c = (np.asarray(t, dtype=np.float64) for t in (a, b, c))
    p = a * b
    hi = p + c
    bv = hi - p
    lo = (p - (hi - bv)) + (c - bv)
    r = hi.astype(np.float32)
    # hi on a midpoint between two float32 neighbours: round toward lo's side
    down = np.nextafter(r, np.float32(-np.inf)).astype(np.float64)
    up = np.nextafter(r, np.float32(np.inf)).astype(np.float64)
    rf = r.astype(np.float64)
    mid_low, mid_high = (rf + down) / 2, (rf + up) / 2
    fix_down = (hi == mid_low) & (lo < 0)
    fix_up = (hi == mid_high) & (lo > 0)
    r = np.where(fix_down, down.astype(np.float32), r)
    return np.where(fix_up, up.astype(np.float32), r)


def test_the_gpu_division_sequence_rounds_like_ieee_division():
    """_quantize_tile's GPU arithmetic (r = RN(1/s), q0 = RN(x r), nrem = fma(q0, s, -x),
    y = fma(nrem, -r, q0)) emulated exactly, against IEEE float32 division x / s: random quotients over
    E4M3's range and quotients next to ties of the float32 grid, scales as the quantizer makes them."""
    rng = np.random.default_rng(7)
    n = 200_000
    amax = np.exp(rng.uniform(-30, 30, n)).astype(np.float32)
    s = (amax / np.float32(448.0)).astype(np.float32)
    x = (rng.uniform(-1, 1, n) * amax).astype(np.float32)
    # near-ties: x = s * (q + half ulp of q), nudged by an ulp either way
    q = rng.uniform(-448, 448, n).astype(np.float32)
    half = (np.spacing(np.abs(q)) / 2).astype(np.float64)
    tie = (s.astype(np.float64) * (q.astype(np.float64) + half)).astype(np.float32)
    x_ties = np.concatenate([tie, np.nextafter(tie, np.float32(np.inf)), np.nextafter(tie, np.float32(-np.inf))])
    xs, ss = np.concatenate([x, x_ties]), np.concatenate([s, s, s, s])
    with np.errstate(all="ignore"):
        r = (np.float32(1.0) / ss).astype(np.float32)
        q0 = (xs * r).astype(np.float32)
        nrem = _fma32(q0, ss, -xs)
        y = _fma32(nrem, -r, q0)
        expected = (xs / ss).astype(np.float32)
    ok = np.abs(expected) >= 2.0**-100  # below, E4M3 rounds to 0 either way (_quantize_tile's docstring)
    assert np.array_equal(y[ok], expected[ok])


@pytest.mark.parametrize("fp8_max", [448.0, 57344.0])  # E4M3's and E5M2's largest values
def test_the_gpu_scale_division_is_ieee_for_every_amax(fp8_max):
    """_scale_from_bits's GPU arithmetic for s = amax / fp8_max (q0 = RN(amax R), R = RN(1 / fp8_max), then
    s = fma(fma(q0, -fp8_max, amax), R, q0)) emulated exactly, against IEEE float32 division for every float32
    mantissa in the binade of 1, of the amax floor (1e-12) and of the largest floats. Between them the
    arithmetic scales by powers of two exactly (no subnormal and no overflow on the way), so this covers every
    amax the kernels see."""
    d = np.float32(fp8_max)
    inv = (np.float32(1.0) / d).astype(np.float32)
    mantissas = np.arange(2**23, dtype=np.int64)
    for exponent in (0, -40, 127):
        amax = (mantissas | (127 + exponent) << 23).astype(np.int32).view(np.float32)
        q0 = (amax.astype(np.float64) * np.float64(inv)).astype(np.float32)
        s = _fma32(_fma32(q0, np.full_like(q0, -d), amax), np.full_like(q0, inv), q0)
        expected = (amax.astype(np.float64) / np.float64(d)).astype(np.float32)
        assert np.array_equal(s, expected), exponent


@needs_kernels
@pytest.mark.parametrize("source,inter,weighted", [(1, 200, False), (2, 200, False), (2, 256, False), (3, 200, True),
                                                   (1, 200, True), (2, 200, True), (2, 256, True)])
def test_every_dual_producer_configuration_writes_what_two_launches_write(source, inter, weighted):
    # both layouts from one launch (dual_quant_kernel, PACK4 candidates included) for SwiGLU (1), its
    # backward (2) and the permutation's gather (3): the bytes and scales of the rows launch and the
    # transposed launch, ragged rows and columns. The backward at a gate width of two 128-column tiles: the two
    # launches are then paired (quant_ops.SWIGLU_BACKWARD_PAIRED), the dual launch is not. Weighted: the router
    # weight of each pair (3) or row (1, 2: applied to a before the down projection, coscale.kernels.fp8_moe)
    from coscale.kernels import quant_ops as qo

    gen = torch.Generator().manual_seed(10 + source)
    m, hidden, topk = 150, 320, 2
    gate_up = (torch.randn(m, 2 * inter, generator=gen) * 2).to(torch.bfloat16).to(KERNEL_DEVICE)
    da = torch.randn(m, inter, generator=gen).to(torch.bfloat16).to(KERNEL_DEVICE)
    x = (torch.randn(m // topk, hidden, generator=gen) * 3).to(torch.bfloat16).to(KERNEL_DEVICE)
    row_pair = torch.cat([torch.randperm(m - 6, generator=gen), torch.full((6,), -1)]).to(torch.int32)
    w = torch.rand(m, generator=gen).to(KERNEL_DEVICE)
    if source == 3:
        src, k, extra = x, hidden, dict(idx=row_pair.to(KERNEL_DEVICE), w=w, topk=topk)
    else:
        src, k, extra = gate_up, inter if source == 1 else 2 * inter, dict(b=da, up_offset=inter,
                                                                           w=w if weighted else None)
    ref = qo.quant_outputs(m, k, src.device, True, True, True)
    qo.launch_producer("rows", ref, src, False, m=m, k=k, source=source, **extra)
    qo.launch_producer("cols", ref, src, False, m=m, k=k, source=source, **extra)
    assert (bits(ref[0]) != 0).any() and (bits(ref[2]) != 0).any()
    for cfg in qo.DUAL_CONFIGS:
        outs = qo.quant_outputs(m, k, src.device, True, True, True)
        qo.launch_producer("dual", outs, src, False, m=m, k=k, source=source, config=_config(cfg), **extra)
        _assert_same_fp8(outs[0], ref[0], outs[1], ref[1])
        _assert_same_fp8(outs[2], ref[2], outs[3], ref[3])
    for cfg in qo.PRODUCER_COLS_CONFIGS:  # the transposed launch's own candidates (PACK4: four rows a word)
        outs = qo.quant_outputs(m, k, src.device, False, True, True)
        qo.launch_producer("cols", outs, src, False, m=m, k=k, source=source, config=_config(cfg), **extra)
        _assert_same_fp8(outs[2], ref[2], outs[3], ref[3])
