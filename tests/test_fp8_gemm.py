"""Block-scaled FP8 GEMM: every direction against a float64 reference of the unquantized inputs.

Error bound: E4M3 keeps 3 mantissa bits, so round-to-nearest leaves a relative error of at most 2^-4
per element, about 2^-4/sqrt(3) = 0.036 RMS for values spread over a binade. A product of two
independently rounded operands carries about sqrt(2) * 0.036 = 0.051 (less in practice: the largest
element of each tile is exact and values near the top of a binade round more finely). Summing many
such products of random-sign data keeps the relative *norm* error at the same level, so we require
< 0.07, and show the same check rejects an error 2x larger (bf16 GEMMs sit near 0.003).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from coscale.errors import CoscaleError
from coscale.kernels import quant as q
from coscale.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref

BOUND = 0.07
needs_triton = pytest.mark.skipif(
    not (q.triton_available() and (q.interpreting() or torch.cuda.is_available())), reason="needs triton"
)


def rel(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def directions(m, n, k, dtype, seed=0):
    """The three GEMMs of a linear layer, quantized as in the recipe, with float64 references."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    dy = (torch.randn(m, n, generator=g) * 1e-3).to(dtype)
    xq, xs, xt, xts = q.act_quant_1x128_dual(x, backend="torch")
    wq, ws = q.weight_quant_128x128(w, backend="torch")
    dyq, dys, dyt, dyts = q.act_quant_1x128_dual(dy, backend="torch")
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    return {
        "forward": ((xq, xs, wq, ws), x64 @ w64.t(), (m, n)),
        "dgrad": ((dyq, dys, wq.t().contiguous(), ws.t()), dy64 @ w64, (m, k)),
        "wgrad": ((dyt, dyts, xt, xts), dy64.t() @ x64, (n, k)),
    }


SHAPES = [(128, 128, 128), (256, 384, 512), (300, 200, 260), (512, 128, 896), (256, 576, 256)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction", ["forward", "dgrad", "wgrad"])
def test_torch_backend_error_bound(shape, dtype, direction):
    operands, ref, (r, c) = directions(*shape, dtype)[direction]
    out = fp8_gemm(*operands, out_dtype=torch.float32, backend="torch")[:r, :c]
    err = rel(out, ref)
    assert err < BOUND, err
    assert err > 0.005  # far above bf16's error: the check can tell FP8 from an exact path


def test_bound_can_fail():
    operands, ref, (r, c) = directions(256, 256, 256, torch.float32)["forward"]
    a, sa, b, sb = operands
    wrong = fp8_gemm(a, sa * 1.15, b, sb, torch.float32, backend="torch")  # a 15% scale bug
    assert rel(wrong, ref) > BOUND


@needs_triton
@pytest.mark.parametrize("shape", [(256, 256, 256), (200, 384, 128)])
@pytest.mark.parametrize("direction", ["forward", "dgrad", "wgrad"])
def test_triton_matches_torch_backend(shape, direction):
    operands, ref, (r, c) = directions(*shape, torch.float32, seed=1)[direction]
    out = fp8_gemm(*operands, out_dtype=torch.float32, backend="triton")
    oracle = fp8_gemm_ref(*operands, out_dtype=torch.float32)
    # same products, FP32 sums in a different order
    assert torch.allclose(out, oracle, rtol=1e-4, atol=1e-4 * float(oracle.abs().max()))
    assert rel(out[:r, :c], ref) < BOUND


@needs_triton
def test_triton_bf16_output_and_128x128_a_scales():
    g = torch.Generator().manual_seed(2)
    a, sa = q.weight_quant_128x128(torch.randn(256, 256, generator=g), backend="torch")
    b, sb = q.weight_quant_128x128(torch.randn(128, 256, generator=g), backend="torch")
    out = fp8_gemm(a, sa, b, sb, torch.bfloat16, backend="triton")
    oracle = fp8_gemm_ref(a, sa, b, sb, torch.float32)
    assert out.dtype == torch.bfloat16 and rel(out, oracle.double()) < 1e-2


def test_special_values_propagate():
    x = torch.randn(256, 256)
    x[0, 0] = float("nan")
    x[130, 129] = float("inf")
    w = torch.randn(128, 256)
    xq, xs = q.act_quant_1x128(x, backend="torch")
    wq, ws = q.weight_quant_128x128(w, backend="torch")
    out = fp8_gemm(xq, xs, wq, ws, torch.float32, backend="torch")
    assert torch.all(~torch.isfinite(out[0])) and torch.all(~torch.isfinite(out[130]))
    assert torch.all(torch.isfinite(out[1:130])) and torch.all(torch.isfinite(out[131:]))
    zq, zs = q.act_quant_1x128(torch.zeros(128, 256), backend="torch")
    assert torch.equal(fp8_gemm(zq, zs, wq, ws, torch.float32, backend="torch"), torch.zeros(128, 128))


@needs_triton
def test_triton_special_values_propagate():
    x = torch.randn(128, 256)
    x[5, 3] = float("nan")
    x[70, 200] = float("-inf")
    xq, xs = q.act_quant_1x128(x, backend="triton")
    wq, ws = q.weight_quant_128x128(torch.randn(128, 256), backend="triton")
    out = fp8_gemm(xq, xs, wq, ws, torch.float32, backend="triton")
    assert torch.all(~torch.isfinite(out[5])) and torch.all(~torch.isfinite(out[70]))
    assert int(torch.isfinite(out).all(1).sum()) == 126


def test_contract_errors():
    a = torch.zeros(128, 200).to(q.FP8_DTYPE)
    with pytest.raises(CoscaleError, match="multiple of 128"):
        fp8_gemm(a, torch.ones(128, 2), a, torch.ones(1, 2))
    a = torch.zeros(128, 256).to(q.FP8_DTYPE)
    with pytest.raises(CoscaleError, match="a_scale"):
        fp8_gemm(a, torch.ones(128, 3), a, torch.ones(1, 2))
    with pytest.raises(CoscaleError, match="float8"):
        fp8_gemm(a.float(), torch.ones(128, 2), a, torch.ones(1, 2))


def test_cublas_rejects_shapes_it_would_get_wrong():
    from coscale.kernels.fp8_gemm import cublas_shape_problem

    # kv_a_proj dgrad: contraction N = 576 padded to 640, K/128 = 5 (H100: relative error 50)
    assert "512" in cublas_shape_problem(8192, 7168, 640, 1, 128)
    assert cublas_shape_problem(8192, 7168, 7168, 1, 128) is None
    assert cublas_shape_problem(576, 7168, 640, 1, 1) is None  # 1x128 by 1x128: no K/128 rule
    assert cublas_shape_problem(130, 128, 512, 1, 1) is not None  # outer-dim-major stride 130
    a = torch.zeros(128, 640).to(q.FP8_DTYPE)
    b = torch.zeros(256, 640).to(q.FP8_DTYPE)
    with pytest.raises(CoscaleError, match="K/128"):
        fp8_gemm(a, torch.ones(128, 5), b, torch.ones(2, 5), backend="cublas")
