"""The shared experts on a side stream at decode (coscale.kernels.side_stream): the operators against the shared
experts' own forward (CPU and CUDA), opcheck, which calls take the side stream, and on a GPU the MoE layer with the
side stream equal to it without, eager, replayed from a captured CUDA graph, and compiled then captured."""

import pytest
import torch
from torch.library import opcheck

from coscale.config import get_preset
from coscale.kernels import side_stream as ss
from coscale.model.moe import MoE, SharedExperts

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="streams and CUDA graphs need a GPU")


def _shared(hidden=64, intermediate=96, dtype=torch.float64, device="cpu", seed=0):
    torch.manual_seed(seed)
    shared = SharedExperts(hidden, intermediate).to(device=device, dtype=dtype)
    assert shared.stack_weights(True)
    return shared


@pytest.mark.parametrize("tokens", [1, 5, 32])
def test_side_swiglu_is_the_shared_experts_forward(tokens):
    shared = _shared()
    x = torch.randn(tokens, 64, dtype=torch.float64)
    with torch.no_grad():
        want = shared.gate_proj(x)
        want = shared.down_proj(torch.nn.functional.silu(want) * shared.up_proj(x))  # unstacked, float64
        got = ss.side_stream_swiglu(x, shared.stacked_weight, shared.down_proj.weight)
        y = torch.randn(tokens, 64, dtype=torch.float64)
        joined = ss.join_side_stream_add(y, got, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(joined, y + want, rtol=1e-12, atol=1e-12)


def test_side_stream_ops_pass_opcheck():
    shared = _shared(dtype=torch.float32)
    x, w_down = torch.randn(3, 64), shared.down_proj.weight.detach()
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    for op, args in ((torch.ops.coscale.side_stream_swiglu, (x, shared.stacked_weight, w_down)),
                     (torch.ops.coscale.join_side_stream_add, (torch.randn(3, 64), torch.randn(3, 64), x))):
        result = opcheck(op, args, test_utils=utils)
        assert set(result.values()) == {"SUCCESS"}, result


def _order_in_compiled_code(fn, *args) -> list[str]:
    """The operators fn's compiled code calls (coscale's opaque ones, matmuls, the router's kernels), in order,
    compiled afresh."""
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    with config.patch(force_disable_caches=True, **ss.compile_options()):  # the engine's options
        _, codes = run_and_get_code(torch.compile(fn), *args)
    calls = []
    for line in "\n".join(codes).splitlines():
        if line.strip().startswith("extern_kernels.mm("):
            calls.append("mm")
        elif "_route_" in line and ".run(" in line:  # the fused router's Triton kernels, launched by Inductor
            calls.append("route")
        elif (call := line.split("=", 1)[-1].strip()).startswith("torch.ops.coscale."):
            calls.append(call.removeprefix("torch.ops.coscale.").split(".")[0])
    return calls


def test_inductor_keeps_the_fork_first(monkeypatch):
    """Inductor's locality pass would move the fork next to the join, its only consumer (no overlap left); with
    the engine's options for the side stream (side_stream.compile_options) it stays where the model calls it."""
    monkeypatch.setattr(ss, "SHARED_STREAM_MAX_TOKENS", 32)
    shared = _shared(dtype=torch.float32)
    w_router, w_other = torch.randn(16, 64), torch.randn(64, 64)

    def layer(x):
        y_side = ss.side_stream_swiglu(x, shared.stacked_weight, shared.down_proj.weight.detach())
        weight, idx = torch.sigmoid(x @ w_router.t()).topk(2, dim=-1)
        y = torch.relu(x @ w_other.t()) * weight.sum(-1, keepdim=True) + idx.float().sum(-1, keepdim=True)
        return ss.join_side_stream_add(y, y_side, x)

    calls = _order_in_compiled_code(layer, torch.randn(4, 64))
    assert calls[0] == "side_stream_swiglu" and calls[-1] == "join_side_stream_add" and "mm" in calls, calls


def _moe(dtype, device, seed=0):
    cfg = get_preset("tiny")
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():  # (GroupedExperts leaves its weights to the model's initialisation)
        for p in moe.parameters():
            p.normal_(0.0, 0.05)
    moe = moe.to(device=device, dtype=dtype).eval()
    assert moe.shared_experts is not None, "the tiny preset has shared experts"
    moe.shared_experts.stack_weights(True)
    return moe, cfg


def test_the_compiled_moe_forks_before_its_router(monkeypatch):
    """The MoE layer compiled with the side stream forced on (CPU: the operators run in order, the compiled code's
    call order is what a GPU would launch): the fork comes before the router's and the experts' work, the join
    after it."""
    moe, cfg = _moe(torch.float32, "cpu")
    monkeypatch.setattr(MoE, "_shared_on_side_stream", lambda self, x: True)
    monkeypatch.setattr(ss, "SHARED_STREAM_MAX_TOKENS", 32)
    x = torch.randn(1, 3, cfg.hidden_size)
    with torch.no_grad():
        want = moe.gate(x.view(3, -1))
        want = moe.experts(x.view(3, -1), want[0], want[1]) + moe.shared_experts(x.view(3, -1))
        calls = _order_in_compiled_code(moe, x)
        torch.testing.assert_close(torch.compile(moe)(x).view(3, -1), want, rtol=1e-5, atol=1e-6)
    assert calls[0] == "side_stream_swiglu" and calls[-1] == "join_side_stream_add", calls
    assert len(calls) > 2, calls


def test_which_calls_take_the_side_stream(monkeypatch):
    moe, cfg = _moe(torch.float32, "cpu")
    x = torch.randn(4, cfg.hidden_size)
    monkeypatch.setattr(ss, "SHARED_STREAM_MAX_TOKENS", 16)
    with torch.no_grad():
        assert not moe._shared_on_side_stream(x), "CPU tensors run in order"
    if torch.cuda.is_available():
        moe_cuda, _ = _moe(torch.bfloat16, "cuda")
        xc = x.to("cuda", torch.bfloat16)
        with torch.no_grad():
            assert moe_cuda._shared_on_side_stream(xc)
            assert not moe_cuda._shared_on_side_stream(torch.randn(17, cfg.hidden_size, device="cuda",
                                                                    dtype=torch.bfloat16)), "above the limit"
            moe_cuda.shared_experts.stack_weights(False)
            assert not moe_cuda._shared_on_side_stream(xc), "gate and up not stacked"
        assert not moe_cuda._shared_on_side_stream(xc), "with gradients (training)"
        monkeypatch.setattr(ss, "SHARED_STREAM_MAX_TOKENS", 0)
        with torch.no_grad():
            moe_cuda.shared_experts.stack_weights(True)
            assert not moe_cuda._shared_on_side_stream(xc), "off"


@needs_gpu
def test_the_compiled_moe_on_a_gpu_forks_before_its_router(monkeypatch):
    """On the GPU the router is Triton kernels and the routed experts coscale's decode operator: the fork still
    comes first in the compiled layer (run 47, torch 2.11, without the engine's options: last but the join)."""
    moe, cfg = _moe(torch.bfloat16, "cuda")
    monkeypatch.setattr(ss, "SHARED_STREAM_MAX_TOKENS", 64)
    with torch.no_grad():
        calls = _order_in_compiled_code(moe, torch.randn(1, 4, cfg.hidden_size, device="cuda", dtype=torch.bfloat16))
    routed = [i for i, name in enumerate(calls) if name.startswith(("route", "moe_decode"))]
    assert routed and calls.index("side_stream_swiglu") < routed[0], calls


@needs_gpu
@pytest.mark.parametrize("tokens", [1, 8])
def test_moe_on_a_side_stream_equals_in_order(tokens, monkeypatch):
    """Eager: equal to the in-order layer bit for bit (the same kernels on either stream). Captured in a CUDA graph
    and replayed on new inputs, eager and compiled: equal bit for bit to the same forward run uncaptured (a missing
    wait would show as stale or partial values under replay; compiled code may round the router's or SwiGLU's
    fused arithmetic differently from eager, so it is compared with itself)."""
    moe, cfg = _moe(torch.bfloat16, "cuda")
    xs = [torch.randn(1, tokens, cfg.hidden_size, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    with torch.no_grad():
        monkeypatch.setattr(ss, "SHARED_STREAM_MAX_TOKENS", 0)
        want = [moe(x) for x in xs]
        monkeypatch.setattr(ss, "SHARED_STREAM_MAX_TOKENS", 64)
        assert moe._shared_on_side_stream(xs[0].view(tokens, -1))
        for x, w in zip(xs, want):
            assert torch.equal(moe(x), w)
        torch._dynamo.reset()
        for forward in (moe, torch.compile(moe, options=ss.compile_options())):
            static_x = xs[0].clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (compiles, autotunes) off the capture
                for _ in range(2):
                    forward(static_x)
            torch.cuda.current_stream().wait_stream(side)
            expected = [forward(x).clone() for x in xs]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = forward(static_x)
            for x, w in zip(xs[::-1], expected[::-1]):
                static_x.copy_(x)
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(static_y, w)
