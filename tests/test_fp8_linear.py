"""FP8Linear and convert_to_fp8: gradients against an FP32/FP64 nn.Linear, state_dict unchanged."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from torch import nn

from coscale.fp8 import FP8Linear, convert_to_fp8, fp8_linear, is_skipped
from coscale.kernels import quant as q

BOUND = 0.07  # see tests/test_fp8_gemm.py for the derivation


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def run_both(fp8: FP8Linear, x: torch.Tensor, seed: int = 0):
    ref = nn.Linear(fp8.in_features, fp8.out_features, bias=fp8.bias is not None).double()
    ref.load_state_dict({k: v.double() for k, v in fp8.state_dict().items()})
    x8 = x.clone().requires_grad_()
    x64 = x.double().requires_grad_()
    y8, y64 = fp8(x8), ref(x64)
    dy = torch.randn(y64.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y8.backward(dy.to(y8.dtype))
    y64.backward(dy)
    return (y8, x8.grad, fp8.weight.grad, fp8.bias), (y64, x64.grad, ref.weight.grad, ref.bias)


@pytest.mark.parametrize(
    "in_f,out_f,lead", [(256, 128, (2, 64)), (300, 200, (150,)), (7 * 64, 576 // 2, (3, 100)), (128, 384, (512,))]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_forward_backward(in_f, out_f, lead, dtype):
    torch.manual_seed(0)
    layer = FP8Linear(in_f, out_f, bias=True)  # FP32 master weights
    x = torch.randn(*lead, in_f).to(dtype)
    (y8, dx8, dw8, b8), (y64, dx64, dw64, b64) = run_both(layer, x)
    assert y8.dtype == dtype and dx8.dtype == dtype and dw8.dtype == torch.float32
    assert y8.shape == y64.shape and dx8.shape == x.shape and dw8.shape == layer.weight.shape
    for name, got, ref in [("y", y8, y64), ("dx", dx8, dx64), ("dw", dw8, dw64)]:
        err = rel(got, ref)
        assert err < BOUND + (0.01 if dtype == torch.bfloat16 else 0), (name, err)
    assert rel(b8.grad, b64.grad) < (1e-6 if dtype == torch.float32 else 1e-2)  # bias stays high precision


def test_bias_grad_exact_and_no_grad_path():
    layer = FP8Linear(128, 128)
    x = torch.randn(4, 128)
    dy = torch.randn(4, 128)
    layer(x).backward(dy)
    assert torch.allclose(layer.bias.grad, dy.sum(0), atol=1e-5)
    with torch.no_grad():
        assert layer(x).shape == (4, 128)
    frozen = FP8Linear(128, 256, bias=False)
    frozen.weight.requires_grad_(False)
    xr = torch.randn(8, 128, requires_grad=True)
    frozen(xr).sum().backward()
    assert xr.grad is not None and frozen.weight.grad is None


def test_bf16_master_weights_get_bf16_grads():
    layer = FP8Linear(256, 128, bias=False, dtype=torch.bfloat16)
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    layer(x).float().sum().backward()
    assert layer.weight.grad.dtype == torch.bfloat16


def test_nan_in_input_propagates():
    layer = FP8Linear(256, 128)
    x = torch.randn(4, 256)
    x[1, 7] = float("nan")
    y = layer(x)
    assert torch.all(torch.isnan(y[1])) and torch.all(torch.isfinite(y[[0, 2, 3]]))


@pytest.mark.skipif(not (q.triton_available() and q.interpreting()), reason="needs the Triton interpreter")
def test_triton_backend_matches_torch_backend():
    torch.manual_seed(1)
    x = torch.randn(256, 256)
    outs = []
    for backend in ("torch", "triton"):
        layer = FP8Linear(256, 128, backend=backend)
        layer.load_state_dict(FP8Linear(256, 128).state_dict() if not outs else outs[0][0])
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(torch.ones_like(y))
        outs.append((layer.state_dict(), y, xi.grad, layer.weight.grad))
    for a, b in zip(outs[0][1:], outs[1][1:]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_convert_to_fp8_keeps_state_dict_and_skips_head_embedding_router():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(64, 8, bias=False)  # a router named like DeepSeek's mlp.gate
            self.gate_proj = nn.Linear(64, 128, bias=False)
            self.down_proj = nn.Linear(128, 64, bias=False)
            self.experts = nn.Module()
            self.experts.precision = "bf16"

    model = nn.Module()
    model.embed_tokens = nn.Embedding(100, 64)
    model.mlp = Block()
    model.lm_head = nn.Linear(64, 100, bias=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight_obj = model.mlp.gate_proj.weight
    convert_to_fp8(model)
    assert isinstance(model.mlp.gate_proj, FP8Linear) and isinstance(model.mlp.down_proj, FP8Linear)
    assert type(model.mlp.gate) is nn.Linear and type(model.lm_head) is nn.Linear
    assert model.mlp.experts.precision == "fp8"
    assert model.mlp.gate_proj.weight is weight_obj  # the same Parameter: optimizer state survives
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert is_skipped("model.layers.3.mlp.gate") and not is_skipped("model.layers.3.mlp.gate_proj")


def test_convert_sequential_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128))
    keys = list(model.state_dict())
    convert_to_fp8(model)
    assert list(model.state_dict()) == keys
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.randn(256, 128)
    target = torch.tanh(x)
    losses = []
    for _ in range(30):
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_functional_form():
    w = torch.randn(128, 256, requires_grad=True)
    y = fp8_linear(torch.randn(3, 256), w)
    assert y.shape == (3, 128)


def test_auto_policy_converts_only_the_layers_large_enough_for_fp8():
    from coscale.fp8 import AUTO, describe_fp8_layers
    from coscale.model.moe import GroupedExperts

    with torch.device("meta"):  # V3-wide shapes without the memory
        model = nn.Module()
        model.o_proj = nn.Linear(16384, 7168, bias=False)  # K, N >= 4096: FP8
        model.q_a_proj = nn.Linear(7168, 1536, bias=False)  # N = 1536: BF16
        model.q_b_proj = nn.Linear(1536, 24576, bias=False)  # K = 1536: BF16
        model.lm_head = nn.Linear(7168, 129280, bias=False)  # skipped by name whatever its size
        model.experts = GroupedExperts(4, 7168, 2048)  # V3's expert shape: FP8
        model.small_experts = GroupedExperts(4, 1024, 256)  # the small preset's: BF16
    convert_to_fp8(model, policy="auto")
    assert isinstance(model.o_proj, FP8Linear)
    assert type(model.q_a_proj) is nn.Linear and type(model.q_b_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    assert model.experts.precision == "fp8" and model.small_experts.precision == "bf16"
    line = describe_fp8_layers(model, AUTO)
    assert "1 of 3 linear layers (o_proj 16384->7168)" in line and "routed experts of 1 of 2 MoE layers" in line
    assert "q_a_proj 7168->1536, q_b_proj 1536->24576" in line and "routed experts 1024/256" in line
    assert "in and out features >= 4096" in line
    assert AUTO.linear(4096, 4096) and not AUTO.linear(4095, 1 << 20) and AUTO.experts(4096, 1024)


def test_all_policy_converts_everything_and_bad_policies_are_refused():
    from coscale.errors import CoscaleError

    model = nn.Sequential(nn.Linear(16, 16))
    convert_to_fp8(model, policy="all")
    assert isinstance(model[0], FP8Linear)
    with pytest.raises(CoscaleError, match="policy must be one of auto, all"):
        convert_to_fp8(nn.Sequential(nn.Linear(4, 4)), policy="some")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_under_autocast_the_layer_computes_in_the_autocast_dtype_as_nn_linear_does(x_dtype):
    """An FP32 input (a model's residual stream) is cast to the autocast dtype before the FP8 kernels, as
    nn.Linear casts its input: the output is BF16 (no FP32 output to convert after the GEMM) and the input's
    gradient comes back in the input's dtype, equal to what the layer gives a BF16 input."""
    torch.manual_seed(0)
    layer = FP8Linear(256, 128, bias=False, backend="torch")
    x = torch.randn(4, 256, dtype=x_dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == x_dtype and layer.weight.grad.dtype == torch.float32
    xb = x.detach().bfloat16().requires_grad_()
    yb = layer(xb)  # no autocast: a BF16 input computes in BF16 anyway
    torch.testing.assert_close(y, yb)
    yb.float().square().sum().backward()
    torch.testing.assert_close(x.grad.float(), xb.grad.float())
    y32 = layer(x.detach())  # no autocast, FP32 input: FP32 out
    assert y32.dtype == (torch.float32 if x_dtype == torch.float32 else torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available() or q.interpreting(), reason="needs a CUDA GPU")
def test_gpu_transposed_quantization_on_a_side_stream_changes_no_bit(monkeypatch):
    """X^T and dY^T quantized on a side stream (OVERLAP_TRANSPOSED_QUANT) give the output and every gradient
    bit for bit as on one stream, eagerly and replayed from a CUDA graph (the fork and join captured)."""
    from coscale.fp8 import linear as fl

    torch.manual_seed(13)
    layer = FP8Linear(1024, 768, bias=True, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(640, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(640, 768, device="cuda", dtype=torch.bfloat16)

    def step():
        layer.zero_grad(set_to_none=False)
        x.grad = None
        out = layer(x)
        out.backward(dy)
        return out.detach().clone(), x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()

    monkeypatch.setattr(fl, "OVERLAP_TRANSPOSED_QUANT", False)
    want = step()
    monkeypatch.setattr(fl, "OVERLAP_TRANSPOSED_QUANT", True)
    for got, ref in zip(step(), want):
        assert torch.equal(got, ref)
    layer.weight.grad = torch.zeros_like(layer.weight)
    layer.bias.grad = torch.zeros_like(layer.bias)
    x.grad = torch.zeros_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch's graph docs ask
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer.weight.grad.zero_()
        layer.bias.grad.zero_()
        x.grad.zero_()
        out = layer(x)
        out.backward(dy)
    graph.replay()
    torch.cuda.synchronize()
    for got, ref in zip((out, x.grad, layer.weight.grad, layer.bias.grad), want):
        assert torch.equal(got, ref)


def test_fp8_linear_gives_the_same_bits_under_autocast():
    """Autocast is off inside FP8LinearFunction (coscale.kernels.backend.autocast_off): under BF16 autocast,
    backward included, a BF16 input gives the bits it gives without autocast (the PyTorch reference's float32
    products would otherwise run in BF16)."""
    torch.manual_seed(3)
    layer = FP8Linear.from_linear(nn.Linear(256, 128, bias=True))
    x = torch.randn(8, 256, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(8, 128, dtype=torch.bfloat16)
    plain = layer(x)
    plain_grads = torch.autograd.grad(plain, (x, layer.weight, layer.bias), grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = layer(x)
        under_grads = torch.autograd.grad(under, (x, layer.weight, layer.bias), grad)
    assert under.dtype == plain.dtype and torch.equal(under, plain)
    for a, b in zip(plain_grads, under_grads):
        assert a.dtype == b.dtype and torch.equal(a, b)
