"""Quantization fused into its producer (coscale.kernels.fused_quant): the same bytes as the producer's
stored output quantized by coscale.kernels.quant, on each backend; the kernels' producers agree with
the PyTorch references; special values stay non-finite."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module decorates its kernels

import pytest
import torch

from coscale.errors import CoscaleError
from coscale.kernels import quant as q
from coscale.kernels.fused_quant import (
    gather_quant_op,
    gather_quantized_rows,
    swiglu_backward_quant_op,
    swiglu_quant_op,
)
from coscale.kernels.permute import build_permute_info, rows_from_tokens
from coscale.kernels.swiglu import swiglu_backward_op, swiglu_op

# the kernels run on CPU tensors: Triton's interpreter only (they skip under TRITON_INTERPRET=0; on a GPU
# benchmarks/bench_quant.py checks the fused kernels against the unfused pipeline bit for bit)
needs_triton = pytest.mark.skipif(
    not (q.triton_available() and q.interpreting()), reason="needs triton's interpreter (TRITON_INTERPRET=1)"
)
FP8 = q.FP8_DTYPE


def bits(t):
    return t.view(torch.uint8)


def assert_same(got, want):
    """Four quantization outputs (FP8 bytes and scales, both layouts) equal bit for bit."""
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.stride() == w.stride()
        if g.dtype == FP8:
            assert torch.equal(bits(g), bits(w))
        else:
            assert torch.equal(g, w)


LAYOUTS = [(True, True, False), (True, True, True), (True, False, False), (False, True, False)]  # rows, cols, 1 pass


def _gate_up(m, i, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, 2 * i, generator=gen) * torch.logspace(-2, 1, 2 * i)).to(dtype)


@needs_triton
@pytest.mark.parametrize("m,i", [(200, 150), (128, 256), (7, 33)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,cols,one_pass", LAYOUTS)
def test_swiglu_quant_equals_quantized_swiglu(m, i, dtype, rows, cols, one_pass):
    gate_up = _gate_up(m, i, dtype, m + i)
    for backend in ("triton", "torch"):
        a = swiglu_op(gate_up, backend)
        want = q.act_quant_1x128_dual(a, backend=backend, pad_t=True)
        got = swiglu_quant_op(gate_up, rows, cols, True, one_pass, False, backend)
        assert_same([t for t, keep in zip(got, (rows, rows, cols, cols)) if keep],
                    [t for t, keep in zip(want, (rows, rows, cols, cols)) if keep])
    # the kernel's producer is SwiGLU: its dequantized output matches the float64 formula
    y, s, _, _ = swiglu_quant_op(gate_up, True, False, False, False, False, "triton")
    g, u = gate_up[:, :i].double(), gate_up[:, i:].double()
    ref = torch.nn.functional.silu(g) * u
    deq = q.dequant_1x128(y, s)[:, :i].double()
    assert float((deq - ref).norm() / ref.norm()) < 0.04


@needs_triton
@pytest.mark.parametrize("m,i", [(200, 150), (128, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,cols,one_pass", LAYOUTS)
def test_swiglu_backward_quant_equals_quantized_gradient(m, i, dtype, rows, cols, one_pass):
    gate_up = _gate_up(m, i, dtype, 3)
    da = torch.randn(m, i, generator=torch.Generator().manual_seed(4)).to(dtype)
    keep = (rows, rows, cols, cols)
    for backend in ("triton", "torch"):
        grad = swiglu_backward_op(gate_up[:, :i], gate_up[:, i:], da, backend)
        want = q.act_quant_1x128_dual(grad, backend=backend, pad_t=False)
        got = swiglu_backward_quant_op(gate_up, da, rows, cols, False, one_pass, False, backend)
        assert_same([t for t, k in zip(got, keep) if k], [t for t, k in zip(want, keep) if k])


def _row_weights(m, seed):
    """Router weights of m rows, with the edge cases: zeros (padding rows), tiny, large and exactly 1."""
    w = torch.rand(m, generator=torch.Generator().manual_seed(seed))
    w[:4] = torch.tensor([0.0, 1e-30, 1.0, 300.0])
    return w


def _weighted(t, w):
    """t times each row's weight, rounded to t's dtype (the unfused composition, PyTorch's rounding)."""
    return (t.float() * w[:, None]).to(t.dtype)


@needs_triton
@pytest.mark.parametrize("m,i", [(200, 150), (130, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,cols,one_pass", LAYOUTS)
def test_weighted_swiglu_quant_equals_quantized_weighted_swiglu(m, i, dtype, rows, cols, one_pass):
    """The router weight applied to a before the down projection (coscale.kernels.fp8_moe): the bytes of a * w
    rounded to the activation dtype, then quantized, on either backend (the interpreter's bfloat16 cast
    truncates: the kernel rounds the product to nearest even itself, as the GPU does)."""
    gate_up = _gate_up(m, i, dtype, m + i)
    w = _row_weights(m, 1)
    keep = (rows, rows, cols, cols)
    for backend in ("torch", "triton"):
        want = q.act_quant_1x128_dual(_weighted(swiglu_op(gate_up, backend), w), backend=backend, pad_t=True)
        got = swiglu_quant_op(gate_up, rows, cols, True, one_pass, False, backend, w)
        assert_same([t for t, k in zip(got, keep) if k], [t for t, k in zip(want, keep) if k])
    if rows:  # the kernel's rows: the zero-weight row quantizes to zeros, the others are a * w within FP8's error
        y, s = got[:2]
        deq = q.dequant_1x128(y, s)[:, :i].double()
        assert int(deq[0].count_nonzero()) == 0
        ref = (torch.nn.functional.silu(gate_up[:, :i].double()) * gate_up[:, i:].double()) * w.double()[:, None]
        assert float((deq - ref).norm() / ref.norm()) < 0.04


@needs_triton
@pytest.mark.parametrize("m,i", [(200, 150), (130, 128), (64, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,cols,one_pass", LAYOUTS)
def test_weighted_swiglu_backward_quant_and_router_weight_dots(m, i, dtype, rows, cols, one_pass):
    """SwiGLU's backward for a weighted a: the bytes of quantizing SwiGLU's backward of w * da (rounded to the
    activation dtype), and the router weight's gradient <da, a> a row, computed in the paired kernel (gate width a
    multiple of 128, a gate tile's part at a time) or by PyTorch (150): float32 sums of the same terms."""
    gate_up = _gate_up(m, i, dtype, 3)
    da = torch.randn(m, i, generator=torch.Generator().manual_seed(4)).to(dtype)
    w = _row_weights(m, 2)
    keep = (rows, rows, cols, cols)
    for backend in ("triton", "torch"):
        grad = swiglu_backward_op(gate_up[:, :i], gate_up[:, i:], _weighted(da, w), backend)
        want = q.act_quant_1x128_dual(grad, backend=backend, pad_t=False)
        got = swiglu_backward_quant_op(gate_up, da, rows, cols, False, one_pass, False, backend, w, True)
        assert_same([t for t, k in zip(got, keep) if k], [t for t, k in zip(want, keep) if k])
        terms = da.double() * swiglu_op(gate_up, backend).double()  # a as SwiGLU on this backend rounds it
        dots = got[4]
        assert dots.shape == (m,) and dots.dtype == torch.float32
        # float32 tree and pairwise sums of at most I terms: within 2^-17 of the sum of their magnitudes
        assert ((dots.double() - terms.sum(1)).abs() <= 2.0**-17 * terms.abs().sum(1)).all()
    no_dots = swiglu_backward_quant_op(gate_up, da, rows, cols, False, one_pass, False, "triton", w)
    assert no_dots[4].numel() == 0


@needs_triton
def test_router_weight_dots_keep_a_non_finite_row_to_itself():
    """A NaN in one row's gradient makes that row's dot NaN (and its tiles non-finite); the other rows' dots and
    gradients are untouched; dots without any gradient layout asked for still come out."""
    m, i = 128, 256
    gate_up = _gate_up(m, i, torch.float32, 5)
    da = torch.randn(m, i, generator=torch.Generator().manual_seed(6))
    da[7, 130] = float("nan")
    w = _row_weights(m, 3)
    y, s, _, _, dots = swiglu_backward_quant_op(gate_up, da, True, False, False, False, False, "triton", w, True)
    assert torch.isnan(dots[7]) and torch.isfinite(dots[torch.arange(m) != 7]).all()
    assert torch.isfinite(q.dequant_1x128(y, s)[8]).all()
    only = swiglu_backward_quant_op(gate_up, da, False, False, False, False, False, "triton", w, True)
    assert only[0].numel() == 0
    torch.testing.assert_close(only[4], dots, rtol=0, atol=0, equal_nan=True)


@needs_triton
@pytest.mark.parametrize("producer,i", [("swiglu", 576), ("swiglu_backward", 576), ("swiglu_backward", 640),
                                        ("gather", 576)])
def test_either_launch_order_writes_every_tile(producer, i, monkeypatch):
    """quant_ops.PRODUCER_ROW_ORDER only reorders the programs: both orders write the same bytes, on grids of
    several row and column blocks (300 rows: three 128-row tiles, many BLOCK_M row blocks; SwiGLU's 576 or 1,152
    columns: 5 or 9 tiles of 128, more than one rows program takes). SwiGLU's backward at 640 gate columns
    takes the paired programs (quant_ops.SWIGLU_BACKWARD_PAIRED: five gate tiles, each writing a dg and a du
    tile)."""
    from coscale.kernels import quant_ops

    m = 300
    gate_up = _gate_up(m, i, torch.bfloat16, 5)
    da = torch.randn(m, i, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    info, weight = _routing(60, 5, 6, 7)
    x = torch.randn(60, 640, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    run = {
        "swiglu": lambda: swiglu_quant_op(gate_up, True, True, True, False, False, "triton"),
        "swiglu_backward": lambda: swiglu_backward_quant_op(gate_up, da, True, True, False, False, False, "triton"),
        "gather": lambda: gather_quant_op(x, info.row_pair, 5, weight, None, True, True, False, False, False,
                                          "triton")[:4],
    }[producer]
    outs = []
    for row_order in (True, False):
        monkeypatch.setattr(quant_ops, "PRODUCER_ROW_ORDER", row_order)
        outs.append(run())
    assert_same(outs[0], outs[1])
    want = {
        "swiglu": lambda: q.act_quant_1x128_dual(swiglu_op(gate_up, "triton"), backend="triton", pad_t=True),
        "swiglu_backward": lambda: q.act_quant_1x128_dual(
            swiglu_backward_op(gate_up[:, :i], gate_up[:, i:], da, "triton"), backend="triton", pad_t=False),
        "gather": lambda: q.act_quant_1x128_dual(rows_from_tokens(x, info, weight=weight, backend="triton")[0],
                                                 backend="triton", pad_t=False),
    }[producer]()
    assert_same(outs[0], want)  # and they are the unfused pipeline's bytes on the same backend


def _routing(t, k, e, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    return build_permute_info(idx, e, align=128), torch.rand(t, k, generator=gen)


@needs_triton
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("rows,cols,one_pass", LAYOUTS)
def test_gather_quant_equals_quantized_permutation(weighted, rows, cols, one_pass):
    t, k, h = 37, 3, 200
    info, topk_weight = _routing(t, k, 4, 5)
    src = (torch.randn(t, h) * 4).to(torch.bfloat16)
    weight = topk_weight if weighted else None
    keep = (rows, rows, cols, cols)
    for backend in ("triton", "torch"):
        permuted, _ = rows_from_tokens(src, info, weight=weight, backend=backend)
        want = q.act_quant_1x128_dual(permuted, backend=backend, pad_t=True)
        got = gather_quant_op(src, info.row_pair, k, weight, None, rows, cols, True, one_pass, False, backend)
        assert_same([x for x, c in zip(got[:4], keep) if c], [x for x, c in zip(want, keep) if c])
        assert got[4].numel() == 0


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tokens_quantized_once_give_every_copy_its_bytes(dtype):
    """gather_quantized_rows (each token quantized once, its FP8 row copied to its top-k places) writes the bytes
    gather_quant_op's rows launch writes: padding rows, a ragged width (200: one 72-column tile), a NaN token, an
    infinite one, a zero one and one at float32's extremes."""
    t, k, h = 37, 3, 200
    info, _ = _routing(t, k, 4, 9)
    src = (torch.randn(t, h, generator=torch.Generator().manual_seed(10)) * 4).to(dtype)
    src[2, 7] = float("nan")
    src[5, 150] = float("inf")
    src[8] = 0.0
    src[11, :3] = torch.tensor([3e38, -1e-38, 1e-30]).to(dtype)
    assert bool((info.row_pair < 0).any())  # the permutation has padding rows
    for backend in ("triton", "torch"):
        want_y, want_s = gather_quant_op(src, info.row_pair, k, None, None, True, False, False, False, False,
                                         backend)[:2]
        y, s = gather_quantized_rows(src, info.row_pair, k, False, backend)
        assert y.shape == want_y.shape and s.shape == want_s.shape and s.stride() == want_s.stride()
        assert torch.equal(bits(y), bits(want_y))
        assert torch.equal(s.view(torch.int32), want_s.view(torch.int32))  # bit for bit, NaN scales included


@needs_triton
def test_gather_quant_computes_the_router_weight_gradient():
    t, k, h = 29, 2, 300
    info, topk_weight = _routing(t, k, 3, 6)
    grad_out = torch.randn(t, h)
    y_perm = torch.randn(info.num_rows, h)
    _, want = rows_from_tokens(grad_out, info, weight=topk_weight, y=y_perm, backend="torch")
    for backend in ("triton", "torch"):
        got = gather_quant_op(grad_out, info.row_pair, k, topk_weight, y_perm, True, True, False, False, False,
                              backend)[4]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)  # float32 sums in another order
    with pytest.raises(CoscaleError, match="rows=True"):
        gather_quant_op(grad_out, info.row_pair, k, topk_weight, y_perm, False, True, False, False, False, "torch")


@needs_triton
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_producer_value_makes_its_tiles_non_finite(value):
    gate_up = _gate_up(128, 128, torch.float32, 7)
    gate_up[3, 5] = value  # a gate value: a[3, 5] is non-finite (silu(inf) * u = +-inf, or NaN)
    y, s, yt, st = swiglu_quant_op(gate_up, True, True, False, True, False, "triton")
    row_tile = q.dequant_1x128(y, s)[3, :128]
    col_tile = q.dequant_1x128(yt, st)[5, :128]
    assert not torch.isfinite(row_tile).any() and not torch.isfinite(col_tile).any()
    assert torch.isfinite(q.dequant_1x128(y, s)[4]).all()  # other rows untouched


def test_fused_operators_check_their_inputs():
    with pytest.raises(CoscaleError, match="one per row"):
        swiglu_quant_op(torch.randn(4, 8), True, True, False, False, False, "torch", torch.ones(4, 1))
    with pytest.raises(CoscaleError, match="one per row"):
        swiglu_backward_quant_op(torch.randn(4, 8), torch.randn(4, 4), True, True, False, False, False, "torch",
                                 torch.ones(3))
    with pytest.raises(CoscaleError, match=r"\[M, 2I\]"):
        swiglu_quant_op(torch.randn(4, 7), True, True, False, False, False, "torch")
    with pytest.raises(CoscaleError, match="da must be"):
        swiglu_backward_quant_op(torch.randn(4, 8), torch.randn(4, 3), True, True, False, False, False, "torch")
