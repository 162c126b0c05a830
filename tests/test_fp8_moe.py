"""The fused FP8 routed experts (coscale.kernels.fp8_moe): the same bits as the unfused composition of
FP8 operations on each backend, close to the high-precision loop, every gradient present or absent as
asked, and no host read on the kernel path."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module decorates its kernels

import pytest
import torch

from coscale.kernels import quant as q
from coscale.kernels.fp8_moe import fp8_routed_experts
from coscale.kernels.moe import grouped_experts_forward
from coscale.kernels.permute import build_permute_info
from coscale.model.moe import experts_forward_loop
from test_fp8_grouped_gemm import host_reads_in_coscale
from test_moe_kernels import _routing

BACKENDS = ["torch", "triton"] if q.triton_available() else ["torch"]
NAMES = ["x", "topk_weight", "w_gate", "w_up", "w_down"]


def _problem(kind, T, K, E, H, I, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype).requires_grad_()
    idx = _routing(kind, T, K, E, gen)
    w = torch.rand(T, K, generator=gen).requires_grad_()
    ws = [(torch.randn(E, I, H, generator=gen) / H**0.5).requires_grad_() for _ in range(2)]
    w_down = (torch.randn(E, H, I, generator=gen) / I**0.5).requires_grad_()  # FP32 master weights
    grad_out = torch.randn(T, H, generator=gen).to(dtype)
    return x, idx, w, *ws, w_down, grad_out


def _run(fused, backend, x, idx, w, wg, wu, wd, grad_out):
    out = grouped_experts_forward(x, idx, w, wg, wu, wd, precision="fp8", backend=backend, fused=fused)
    inputs = [t for t in (x, w, wg, wu, wd) if t.requires_grad]
    return out, torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,T,K,E,H,I,dtype", [("random", 40, 3, 3, 128, 128, torch.float32),
                                                  ("edge", 12, 2, 4, 200, 72, torch.bfloat16),
                                                  ("skewed", 30, 2, 4, 136, 256, torch.float32)])
def test_fused_equals_unfused_and_tracks_the_loop(backend, kind, T, K, E, H, I, dtype):
    x, idx, w, wg, wu, wd, grad_out = _problem(kind, T, K, E, H, I, T + E, dtype)
    out, grads = _run(True, backend, x, idx, w, wg, wu, wd, grad_out)
    ref_out, ref_grads = _run(False, backend, x, idx, w, wg, wu, wd, grad_out)
    assert out.dtype == dtype and torch.equal(out, ref_out)
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        if name == "topk_weight":  # float32 dot products summed in another order by the fused kernel
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(g, r), name
    # and FP8 is FP8: within its quantization error of the high-precision per-expert loop
    loop = experts_forward_loop(x.double(), idx, w.double(), wg.double(), wu.double(), wd.double())
    loop_grads = torch.autograd.grad(loop, (x, w, wg, wu, wd), grad_out.double())
    for name, got, want in zip(["out", *NAMES], (out, *grads), (loop, *loop_grads)):
        err = float((got.detach().double() - want.detach()).norm() / want.detach().norm())
        assert err < 0.12, (name, err)
    edge_empty = set(range(E)) - set(idx.flatten().tolist())
    for e in edge_empty:  # an expert without tokens gets exact zero gradients
        assert all(int(g[e].count_nonzero()) == 0 for g in grads[2:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [("x",), ("topk_weight",), ("w_gate", "w_up"), ("w_down",), ("x", "w_down")])
def test_only_the_gradients_asked_for(backend, frozen):
    x, idx, w, wg, wu, wd, grad_out = _problem("random", 24, 2, 3, 128, 128, 9, torch.float32)
    tensors = dict(zip(NAMES, (x, w, wg, wu, wd)))
    for name in frozen:
        tensors[name].requires_grad_(False)
    out, grads = _run(True, backend, x, idx, w, wg, wu, wd, grad_out)
    ref_out, ref_grads = _run(False, backend, x, idx, w, wg, wu, wd, grad_out)
    assert torch.equal(out, ref_out) and len(grads) == 5 - len(frozen)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_quantized_once_change_no_bit(backend, monkeypatch):
    """fp8_moe.QUANTIZE_TOKENS_ONCE (x quantized per token, its FP8 rows gathered) gives the layer's outputs and
    every gradient bit for bit (the permutation has padding rows: 128-row expert segments)."""
    from coscale.kernels import fp8_moe

    x, idx, w, wg, wu, wd, grad_out = _problem("edge", 12, 2, 4, 200, 72, 21, torch.bfloat16)
    runs = []
    for once in (False, True):
        monkeypatch.setattr(fp8_moe, "QUANTIZE_TOKENS_ONCE", once)
        runs.append(_run(True, backend, x, idx, w, wg, wu, wd, grad_out))
    (out, grads), (out_once, grads_once) = runs
    assert torch.equal(out, out_once)
    for name, g, r in zip(NAMES, grads, grads_once):
        assert torch.equal(g, r), name


@pytest.mark.skipif(not q.triton_available(), reason="needs triton")
@pytest.mark.parametrize("tokens_once", [False, True])
def test_the_fused_kernel_path_never_reads_the_device_back(tokens_once, monkeypatch):
    from coscale.kernels import fp8_moe

    monkeypatch.setattr(fp8_moe, "QUANTIZE_TOKENS_ONCE", tokens_once)
    x, idx, w, wg, wu, wd, grad_out = _problem("random", 24, 2, 3, 128, 128, 10, torch.float32)
    info = build_permute_info(idx, 3, align=128)  # (index building checks ids on the CPU: outside the spy)
    with host_reads_in_coscale() as seen:
        out = fp8_routed_experts(x, w, info, wg, wu, wd, backend="triton")
        out.backward(grad_out)
    assert seen == []
