"""LogFMT-nBit (coscale.kernels.logfmt): the float64 reference's semantics, the Triton kernels (interpreted
on CPU) against it, accuracy against E4M3 at 8 bits, and the LogFMTCodec through dispatch/combine."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton.jit'd kernels

import math

import pytest
import torch

from coscale.errors import ConfigError, CoscaleError
from coscale.kernels import logfmt as lf
from coscale.parallel import Codec, combine, dispatch, get_codec
from coscale.parallel.codec import LogFMTCodec

# where the kernels of the Triton tests run: the interpreter on CPU, or a GPU when TRITON_INTERPRET=0
# (lg2.approx and the GPU's own code paths)
KERNEL_DEVICE = "cpu" if lf.interpreting() or not torch.cuda.is_available() else "cuda"


def on_kernel_device(fn, *args, **kwargs):
    """fn on KERNEL_DEVICE copies of its tensor arguments; its tensor results back on the CPU."""
    out = fn(*(a.to(KERNEL_DEVICE) if isinstance(a, torch.Tensor) else a for a in args), **kwargs)
    return tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu()


def with_backend(fn, backend, *args, **kwargs):
    """fn(*args, backend=backend): the Triton backend on KERNEL_DEVICE (results back on the CPU), torch's here."""
    if backend == "triton":
        return on_kernel_device(fn, *args, backend=backend, **kwargs)
    return fn(*args, backend=backend, **kwargs)


needs_triton = pytest.mark.skipif(
    not (lf.triton_available() and (lf.interpreting() or torch.cuda.is_available())),
    reason="needs triton (interpreter on CPU)",
)
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]
FP32_SLACK = 2e-6  # decoding through fp32 (stored tile_min/step, fp32 output, the kernel's fp32 exp)


def _data(rows, cols, seed=0, heavy=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    if heavy:  # Student-t with 2 degrees of freedom: infinite variance, a few huge outliers per tile
        # (chi-squared(2) / 2 is exponential(1): drawn from the seeded generator, so the data never depend on
        # what ran before)
        x = x / torch.sqrt(torch.empty(rows, cols).exponential_(generator=g))
    return x * torch.logspace(-4, 4, rows).unsqueeze(1)


def _tile_view(t, cols):
    """[N, T] per-tile numbers -> [N, H] per element."""
    return t.repeat_interleave(lf.TILE, dim=1)[:, :cols]


def _magnitude(codes, n_bits):
    return (codes.to(torch.int64) & ((1 << n_bits) - 1)) & (2 ** (n_bits - 1) - 1)


# ---- the format ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_bits", [3, 8, 10, 16])
def test_representable_values_keep_their_codes(n_bits):
    q = 2 ** (n_bits - 1) - 1
    g = torch.Generator().manual_seed(n_bits)
    mags = torch.randint(0, q + 1, (6, 256), generator=g)
    mags[:, ::128] = 1  # every tile holds the smallest and the largest magnitude, so it keeps its grid
    mags[:, 1::128] = q
    signs = torch.randint(0, 2, mags.shape, generator=g) * (mags > 0)
    codes = (mags | (signs << (n_bits - 1))).to(torch.int32).to(lf.code_dtype(n_bits))
    tile_min = torch.tensor([0.0, -3.0, 2.5, -40.0, 10.0, -0.5]).repeat(2, 1).t().contiguous()
    tile_step = torch.full((6, 2), 12.0 / (q - 1))
    x = lf.logfmt_decode_ref(codes, tile_min, tile_step, n_bits)
    assert torch.equal(x == 0, mags == 0) and torch.equal(x < 0, signs > 0)
    again, m2, s2 = lf.logfmt_encode_ref(x, n_bits)
    assert torch.equal(again, codes)  # a representable value encodes to its own code
    torch.testing.assert_close(m2, tile_min, rtol=0, atol=1e-5)
    torch.testing.assert_close(lf.logfmt_decode_ref(again, m2, s2, n_bits), x, rtol=FP32_SLACK * 10, atol=0)


@pytest.mark.parametrize("n_bits", [3, 8, 10, 16])
@pytest.mark.parametrize("heavy", [False, True])
def test_nearest_error_bound(n_bits, heavy):
    """|decode - x| <= (e^s - 1)/2 |x| above exp(tile_min): with a = g_k <= |x| < b = a e^s the nearest of a, b
    is at most (b - a)/2 = a (e^s - 1)/2 <= |x| (e^s - 1)/2 away. Below exp(tile_min): at most exp(tile_min)/2."""
    x = _data(16, 300, seed=n_bits, heavy=heavy)
    codes, tile_min, tile_step = lf.logfmt_encode_ref(x, n_bits)
    y = lf.logfmt_decode_ref(codes, tile_min, tile_step, n_bits)
    err, ax = (y.double() - x.double()).abs(), x.double().abs()
    bound = _tile_view(lf.nearest_error_bound(tile_step), 300)
    smallest = _tile_view(tile_min.double().exp(), 300)
    above = ax >= smallest * (1 - 1e-6)
    assert (err <= (bound + FP32_SLACK) * ax)[above].all()
    assert (err <= smallest * (0.5 + FP32_SLACK))[~above].all()
    if n_bits == 8 and not heavy:  # one Gaussian tile of 128 spans ~e^5.7: s ~ 0.045, bound ~ 2.3 % (median)
        assert 0.01 < bound.median() < 0.04


@pytest.mark.parametrize("n_bits", [8, 10])
def test_stochastic_rounding_is_unbiased(n_bits):
    """The mean of many draws is x within a few standard errors (each draw picks a or b)."""
    draws = 4000
    row = _data(1, 128, seed=3)[0] * 1e3
    x = row.repeat(draws, 1)  # every row the same tile, every row its own random numbers
    codes, tile_min, tile_step = lf.logfmt_encode_ref(x, n_bits, "stochastic", torch.Generator().manual_seed(0))
    y = lf.logfmt_decode_ref(codes, tile_min, tile_step, n_bits, torch.float64)
    nearest = lf.logfmt_decode_ref(*lf.logfmt_encode_ref(row[None], n_bits), n_bits, torch.float64)[0]
    stderr = y.std(0) / math.sqrt(draws)
    bias = (y.mean(0) - row.double()).abs()
    assert (bias <= 5 * stderr + 1e-6 * row.double().abs()).all()
    assert (y.std(0) > 0).float().mean() > 0.9  # it does randomize
    # Nearest rounding is not unbiased: its deterministic error is far above the stochastic mean's.
    assert (nearest - row.double()).abs().sum() > 10 * bias.sum()
    bound = lf.nearest_error_bound(tile_step[0]).item() * 2
    assert ((y - row.double()).abs() <= (bound + FP32_SLACK) * row.double().abs()).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zeros_signs_single_magnitude_and_empty_tiles(backend):
    x = torch.randn(4, 384)
    x[0, :128] = 0  # all-zero tile
    x[1, :128] = 0.37  # one distinct magnitude: step 0, no division by zero
    x[1, ::3] = -0.37
    x[2, 5:50] = 0  # zeros inside a normal tile
    x[3, 130] = -0.0
    for rounding in ("nearest", "stochastic"):
        codes, tile_min, tile_step = with_backend(lf.logfmt_encode, backend, x, 8, rounding, seed=1)
        y = with_backend(lf.logfmt_decode, backend, codes, tile_min, tile_step, 8)
        assert torch.equal(codes[x == 0], torch.zeros_like(codes[x == 0]))  # zero is the all-zero code
        assert torch.equal(y[x == 0], torch.zeros_like(y[x == 0]))
        assert torch.equal(torch.sign(y), torch.sign(x))
        assert tile_min[0, 0] == 0 and tile_step[0, 0] == 0 and tile_step[1, 0] == 0
        assert torch.equal(_magnitude(codes[1, :128], 8), torch.ones(128, dtype=torch.int64))
        torch.testing.assert_close(y[1, :128], x[1, :128], rtol=FP32_SLACK, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_dynamic_range_clamp(backend, rounding):
    """The range is clamped to 2^32: elements below max * 2^-32 become 0 or the smallest magnitude."""
    x = torch.randn(2, 256).abs() + 0.5
    x[:, 0] = 1.0e3
    tiny = torch.tensor([1e-9, 2.0e-7, 1.5e-7, 1e-20, 3e-45])  # max * 2^-32 = 2.33e-7
    x[:, 10:15] = tiny
    codes, tile_min, tile_step = with_backend(lf.logfmt_encode, backend, x, 8, rounding, seed=2)
    clamped = math.log(1e3 / 2**32)
    torch.testing.assert_close(tile_min[:, 0].double(), torch.tensor([clamped] * 2, dtype=torch.float64))
    y = with_backend(lf.logfmt_decode, backend, codes, tile_min, tile_step, 8)
    smallest = torch.exp(tile_min[0, 0].double()).float()
    # the decoder's float32 exponential is within a few 1e-6 of the reference's (logfmt's module doc)
    near_smallest = torch.isclose(y[:, 10:15], smallest.expand(2, 5), rtol=FP32_SLACK, atol=0)
    assert ((y[:, 10:15] == 0) | near_smallest).all()
    if rounding == "nearest":
        expected = torch.where(2 * tiny >= smallest, smallest, torch.zeros_like(tiny))
        torch.testing.assert_close(y[:, 10:15], expected.expand(2, 5), rtol=FP32_SLACK, atol=0)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_tile_decodes_to_nan(backend, bad):
    x = torch.randn(3, 300)
    x[1, 140] = bad
    x[1, 141] = 0.0
    codes, tile_min, tile_step = with_backend(lf.logfmt_encode, backend, x, 10)
    y = with_backend(lf.logfmt_decode, backend, codes, tile_min, tile_step, 10)
    assert torch.isnan(tile_min[1, 1]) and torch.isnan(tile_step[1, 1])
    assert torch.isnan(y[1, 128:256]).all()  # the whole tile, its zero included: never silently finite
    keep = torch.ones_like(y, dtype=torch.bool)
    keep[1, 128:256] = False
    assert torch.isfinite(y[keep]).all()


def test_bad_arguments_are_clear_errors():
    with pytest.raises(CoscaleError, match="n_bits"):
        lf.logfmt_encode_ref(torch.randn(2, 128), 2)
    with pytest.raises(CoscaleError, match="rounding"):
        lf.logfmt_encode_ref(torch.randn(2, 128), 8, "up")
    with pytest.raises(CoscaleError, match="2-D"):
        lf.logfmt_encode_ref(torch.randn(128), 8)
    with pytest.raises(CoscaleError, match="tile_min"):
        lf.logfmt_decode_ref(torch.zeros(2, 130, dtype=torch.uint8), torch.zeros(2, 1), torch.zeros(2, 2))
    assert lf.code_dtype(8) == torch.uint8 and lf.code_dtype(10) == torch.int16


# ---- Triton against the reference --------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("n_bits", [3, 8, 10, 16])
@pytest.mark.parametrize("shape", [(9, 256), (13, 200), (3, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_nearest_equals_reference(n_bits, shape, dtype):
    x = _data(*shape, seed=n_bits, heavy=n_bits == 10).to(dtype)
    x[0, : min(shape[1], 128)] = 0
    if shape[0] > 2:
        x[1, :2] = 1e-30
    ref = lf.logfmt_encode_ref(x, n_bits)
    got = on_kernel_device(lf.logfmt_encode, x, n_bits, backend="triton", block_rows=4)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and g.shape == r.shape
        assert torch.equal(g, r)  # codes, tile_min and tile_step bit for bit
    y_ref = lf.logfmt_decode_ref(*ref, n_bits, dtype=torch.float32)
    y = on_kernel_device(lf.logfmt_decode, *ref, n_bits, dtype=torch.float32, backend="triton", block_rows=4)
    torch.testing.assert_close(y, y_ref, rtol=FP32_SLACK, atol=0)
    y16 = on_kernel_device(lf.logfmt_decode, *ref, n_bits, dtype=torch.bfloat16, backend="triton")
    torch.testing.assert_close(y16.float(), y_ref, rtol=1e-2, atol=0)


@needs_triton
@pytest.mark.parametrize("n_bits", [8, 10])
def test_triton_stochastic_is_unbiased_and_brackets_x(n_bits):
    draws = 1000
    row = _data(1, 200, seed=5)[0]
    x = row.repeat(draws, 1)
    codes, tile_min, tile_step = on_kernel_device(lf.logfmt_encode, x, n_bits, "stochastic", seed=123, backend="triton")
    ref_codes, ref_min, ref_step = lf.logfmt_encode_ref(x, n_bits)
    assert torch.equal(tile_min, ref_min) and torch.equal(tile_step, ref_step)
    # each draw is one of the two magnitudes bracketing |x|: within one code of the nearest one
    assert (_magnitude(codes, n_bits) - _magnitude(ref_codes, n_bits)).abs().max() <= 1
    y = on_kernel_device(lf.logfmt_decode, codes, tile_min, tile_step, n_bits, backend="triton").double()
    stderr = y.std(0) / math.sqrt(draws)
    assert ((y.mean(0) - row.double()).abs() <= 5 * stderr + 1e-6 * row.double().abs()).all()
    again = on_kernel_device(lf.logfmt_encode, x[:4], n_bits, "stochastic", seed=123, backend="triton")[0]
    assert torch.equal(again, codes[:4])  # the seed makes it reproducible


# ---- accuracy against E4M3 at 8 bits ------------------------------------------------------------------


def _e4m3_roundtrip(x):
    from coscale.kernels.quant import act_quant_1x128_ref, dequant_1x128

    y, scale = act_quant_1x128_ref(x)
    return dequant_1x128(y, scale)[:, : x.shape[1]]


def accuracy(x, y):
    """(normalized L2 error, mean relative error over non-zero x)."""
    x, y = x.double(), y.double()
    nz = x != 0
    return ((y - x).norm() / x.norm()).item(), ((y - x).abs()[nz] / x.abs()[nz]).mean().item()


@pytest.mark.parametrize("heavy", [False, True])
def test_logfmt8_beats_e4m3(heavy):
    """The paper: LogFMT-8 trains better than E4M3 at the same bits. Per-element errors are smaller too."""
    x = _data(64, 7168 // 4, seed=11, heavy=heavy)
    log8 = lf.logfmt_decode_ref(*lf.logfmt_encode_ref(x, 8), 8)
    fp8 = _e4m3_roundtrip(x)
    (l2_log, rel_log), (l2_fp8, rel_fp8) = accuracy(x, log8), accuracy(x, fp8)
    print(f"heavy={heavy}: LogFMT-8 L2 {l2_log:.4f} rel {rel_log:.4f} | E4M3 L2 {l2_fp8:.4f} rel {rel_fp8:.4f}")
    assert l2_log < l2_fp8 and rel_log < rel_fp8


# ---- the codec -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_bits", [8, 10, 9])
@pytest.mark.parametrize("hidden", [256, 200, 7168])
def test_logfmt_codec_roundtrip(n_bits, hidden):
    codec = LogFMTCodec(n_bits)
    assert isinstance(codec, Codec) and get_codec(codec) is codec
    x = _data(9, hidden, seed=hidden)
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.shape == (9, codec.bytes_per_row(hidden))
    y = codec.decode(payload, hidden, torch.float32)
    assert torch.equal(y, lf.logfmt_decode_ref(*lf.logfmt_encode_ref(x, n_bits), n_bits))
    sel = torch.tensor([3, 3, 0, 8])
    assert torch.equal(codec.encode(x[sel]), payload[sel])  # rows are independent
    assert torch.equal(codec.decode(codec.encode(torch.zeros(3, hidden)), hidden, torch.float32),
                       torch.zeros(3, hidden))
    assert codec.encode(torch.zeros(0, hidden)).shape == (0, codec.bytes_per_row(hidden))


def test_logfmt_codec_bytes_per_row():
    tiles = 7168 // 128
    assert LogFMTCodec(8).bytes_per_row(7168) == 7168 + 8 * tiles  # 7,616
    assert LogFMTCodec(10).bytes_per_row(7168) == 7168 + 7168 // 4 + 8 * tiles  # 9,408: low bytes, 2-bit highs
    assert LogFMTCodec(10, packed=False).bytes_per_row(7168) == 2 * 7168 + 8 * tiles
    assert LogFMTCodec(9).bytes_per_row(200) == 2 * 200 + 8 * 2  # 9 bits: int16 storage
    assert LogFMTCodec(10).bytes_per_row(7) == 7 + 2 + 8  # 7 low bytes, 7 high 2-bit parts in 2 bytes, one tile
    with pytest.raises(ConfigError, match="n_bits"):
        LogFMTCodec(17)
    with pytest.raises(ConfigError, match="rounding"):
        LogFMTCodec(8, rounding="down")
    with pytest.raises(ConfigError, match="logfmt8_fast"):
        get_codec("logfmt9_fast")


@pytest.mark.parametrize("names", [("logfmt8", "logfmt10"), ("logfmt8_fast", "logfmt10_fast")])
def test_dispatch_combine_through_logfmt_codecs(names):
    """ep=None: LogFMT-8 dispatch and LogFMT-10 combine (by name; "fast" rounding too). recv are the LogFMT-8
    round trips of x's rows (bit for bit), and the combined output is x * sum(weights) within the two codecs'
    error bounds (fast: widened by its ~1e-6 log2 perturbation, inside the 1e-3 slack)."""
    t, h, e, k = 11, 200, 6, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, h, generator=g)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g) + 0.1
    log8, log10 = get_codec(names[0]), get_codec(names[1])
    assert (log8.name, log10.name) == names and log8.rounding == ("fast" if "fast" in names[0] else "nearest")
    recv, meta = dispatch(x, idx, w, None, e, codec=log8, combine_codec=log10)
    x8 = log8.decode(log8.encode(x), h, torch.float32)
    recv_ref, _ = dispatch(x8, idx, w, None, e, codec="fp32", combine_codec="fp32")
    assert torch.equal(recv, recv_ref) and not torch.equal(recv, dispatch(x, idx, w, None, e, codec="fp32")[0])
    out = combine(recv, meta)  # identity experts
    d8 = lf.nearest_error_bound(lf.logfmt_encode_ref(x, 8)[2]).max().item()
    d10 = lf.nearest_error_bound(lf.logfmt_encode_ref(x8, 10)[2]).max().item() * (1 + 1e-3)
    total = w.sum(1, keepdim=True)
    err = (out.double() - x.double() * total).abs()
    assert (err <= ((1 + d8) * (1 + d10) - 1 + 1e-5) * total * x.abs()).all()
    assert err.max() > 0


@pytest.mark.skipif(lf.interpreting() or not torch.cuda.is_available(), reason="ex2.approx.ftz runs on a CUDA GPU")
@pytest.mark.parametrize("n_bits", [8, 10])
def test_gpu_decode_keeps_tiny_and_subnormal_values(n_bits):
    """On the GPU the decoder's exponential flushes results below 2^-126 to zero; tiles whose values lie
    there (down to float32's subnormals) are computed 2^64 higher and scaled back, so they decode as the
    reference does, to the float32 bound: the exponent m log2 e + s log2 e (q - 1), of size up to
    |m log2 e| + 32, rounds twice (2^-23 of it, relative, times ln 2 < 1) and ex2.approx adds 2^-22; a
    subnormal result one more absolute step."""
    gen = torch.Generator().manual_seed(21)
    scales = torch.tensor([1.0, 1e-20, 1e-36, 1e-39, 1e-42, 1e30])[:, None]
    x = torch.randn(6, 256, generator=gen) * scales
    codes, tile_min, tile_step = lf.logfmt_encode(x, n_bits, backend="torch")
    want = lf.logfmt_decode_ref(codes, tile_min, tile_step, n_bits).double()
    got = lf.logfmt_decode(codes.cuda(), tile_min.cuda(), tile_step.cuda(), n_bits, backend="triton").cpu().double()
    assert ((got == 0) == (want == 0)).all()
    exponent = tile_min.double().abs() / math.log(2) + 32  # per tile, [rows, tiles]
    rtol = (exponent * 2.0**-23 + 2.0**-22).repeat_interleave(128, 1)[:, : x.shape[1]]
    assert ((got - want).abs() <= rtol * want.abs() + 2.0**-149).all()


def test_float64_input_encodes_by_the_reference_or_is_refused_by_the_kernel():
    """The kernel reads x as float32; float64 x whose values float32 cannot hold (1e-50, 1e300) takes the
    reference's tile numbers under "auto", and backend="triton" refuses it in one line."""
    x = torch.randn(2, 128, dtype=torch.float64)
    x[0, 3], x[1, 3] = 1e-50, 1e300
    got = lf.logfmt_encode(x, 8)
    for g, r in zip(got, lf.logfmt_encode_ref(x, 8)):
        assert torch.equal(g, r)
    with pytest.raises(CoscaleError, match="float64"):
        lf.logfmt_encode(x, 8, backend="triton")
    with pytest.raises(CoscaleError, match="float64"):
        lf.logfmt_encode_to_rows(x, None, 1, 8, backend="triton")
