"""decode_linear (the grouped GEMM's decode tiles on one dense weight) and the engine's switch to it."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch
from torch import nn
from torch.library import opcheck

from coscale.config import get_preset
from coscale.errors import CoscaleError
from coscale.infer.engine import EngineConfig
from coscale.infer.layers import DecodeLinear, use_decode_kernels
from coscale.kernels.backend import interpreting, triton_available
from coscale.kernels.decode_linear import decode_linear
from coscale.model import DeepseekForCausalLM
from coscale.model.moe import Gate

TRITON = triton_available() and interpreting()
BACKENDS = ["torch", "triton"] if TRITON else ["torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,K,N", [(1, 64, 48), (16, 200, 300), (37, 128, 64), (3, 1000, 17)])
def test_matches_a_float64_product(backend, M, K, N):
    gen = torch.Generator().manual_seed(M * K + N)
    x, w = torch.randn(M, K, generator=gen), torch.randn(N, K, generator=gen)
    y = decode_linear(x, w, backend=backend)
    ref = (x.double() @ w.double().t())
    # float32 products summed over K in float32: error ~ eps * sqrt(K) * |x||w| per element
    bound = 4 * torch.finfo(torch.float32).eps * K**0.5 * (x.abs().double() @ w.abs().double().t())
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert ((y.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dimensions_bias_zeros_and_no_rows(backend):
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 3, 64, generator=gen), torch.randn(40, 64, generator=gen), torch.randn(40, generator=gen)
    torch.testing.assert_close(decode_linear(x, w, b, backend=backend), nn.functional.linear(x, w, b),
                               rtol=1e-5, atol=1e-4)
    assert decode_linear(torch.zeros(5, 64), w, backend=backend).eq(0).all()
    assert decode_linear(torch.zeros(0, 64), w, backend=backend).shape == (0, 40)
    x[0, 1, 7] = float("nan")
    y = decode_linear(x, w, backend=backend)
    assert y[0, 1].isnan().all() and not y[1].isnan().any()


def test_bad_operands_are_refused():
    with pytest.raises(CoscaleError, match=r"x \[..., K\] and weight \[N, K\]"):
        decode_linear(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(CoscaleError, match="share a dtype"):
        decode_linear(torch.randn(2, 8), torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(CoscaleError, match="backend must be one of"):
        decode_linear(torch.randn(2, 8), torch.randn(4, 8), backend="cublas")


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_linear_opcheck(backend):
    result = opcheck(torch.ops.coscale.decode_linear, (torch.randn(5, 64), torch.randn(24, 64), backend),
                     test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    assert set(result.values()) == {"SUCCESS"}, result


def test_use_decode_kernels_switches_linears_and_routers_in_place():
    model = DeepseekForCausalLM(get_preset("tiny"))
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    weights = [m.weight for m in linears]
    assert use_decode_kernels(model, "torch") == len(linears) > 0
    assert all(type(m) is DecodeLinear and m.backend == "torch" for m in linears)
    assert [m.weight for m in linears] == weights  # same modules, same parameters
    assert all(g.backend == "torch" for g in model.modules() if isinstance(g, Gate))
    assert use_decode_kernels(model, "auto") == len(linears)
    assert all(m.backend == "auto" for m in linears) and all(
        g.backend == "auto" for g in model.modules() if isinstance(g, Gate))
    with pytest.raises(ValueError, match="decode kernels must be one of"):
        use_decode_kernels(model, "cublas")
    with pytest.raises(CoscaleError, match="decode_kernels must be one of"):
        EngineConfig(decode_kernels="cublas").validate()


@pytest.mark.skipif(not TRITON, reason="needs triton's interpreter")
def test_a_decode_linear_is_nn_linear_with_gradients_and_the_kernel_without(monkeypatch):
    import coscale.infer.layers as layers

    layer = nn.Linear(64, 32)
    x = torch.randn(4, 64, requires_grad=True)
    ref = layer(x)
    ref.sum().backward()
    grads = x.grad.clone(), layer.weight.grad.clone()
    x.grad = None
    layer.weight.grad = None
    layer.__class__ = DecodeLinear
    layer.backend = "triton"
    calls = []
    monkeypatch.setattr(layers, "decode_linear", lambda *a, **k: calls.append(k) or decode_linear(*a, **k))
    y = layer(x)  # with gradients: nn.Linear's path, differentiable
    y.sum().backward()
    torch.testing.assert_close((x.grad, layer.weight.grad), grads)
    assert not calls
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert calls == [{"backend": "triton"}]


def test_auto_takes_the_kernel_only_where_it_measured_faster():
    from coscale.kernels.decode_linear import decode_linear_pays
    from coscale.kernels.router import fused_router_pays

    def rows(m, dtype=torch.bfloat16):
        return torch.empty(m, 2048, dtype=dtype, device="meta")

    def weight(n, k=2048):
        return torch.empty(n, k, dtype=torch.bfloat16, device="meta")

    assert decode_linear_pays(rows(16), weight(102400))  # V2-Lite's head, 420 MB: 1.07x cuBLAS
    assert not decode_linear_pays(rows(16), weight(3072))  # q_proj, 12.6 MB: 0.82x
    assert not decode_linear_pays(rows(64), weight(102400))  # past the decode tiles' rows
    assert not decode_linear_pays(rows(16, torch.float32), weight(102400))
    assert fused_router_pays(16, 64, 2048)  # V2-Lite's router: 1.37x the compiled reference
    assert not fused_router_pays(16, 256, 7168)  # V3's: 0.92x
    assert not fused_router_pays(4096, 64, 2048)  # prefill
