"""grouped_experts_forward (permute -> grouped SwiGLU -> combine) against the per-expert loop."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch

from coscale.errors import CoscaleError
from coscale.kernels.moe import grouped_experts_forward
from coscale.model.moe import GroupedExperts, experts_forward_loop

try:
    import triton  # noqa: F401

    BACKENDS = ["reference", "torch", "triton"]
except ImportError:  # pragma: no cover
    BACKENDS = ["reference", "torch"]


def _routing(kind, T, K, E, gen):
    if kind == "random":
        return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    if kind == "edge":  # expert 0: no token, expert 1: one token, expert 2: every token
        idx = torch.stack([torch.randperm(E - 3, generator=gen)[: K - 1] + 3 for _ in range(T)])
        idx = torch.cat([torch.full((T, 1), 2), idx], dim=1)
        idx[T // 3, 1] = 1
        return idx
    if kind == "skewed":  # Zipf-like load: a few experts take most pairs, several take none
        probs = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.5
        return torch.stack([torch.multinomial(probs, K, generator=gen) for _ in range(T)])
    raise ValueError(kind)


def _problem(kind, T, K, E, H, I, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype).requires_grad_()
    idx = _routing(kind, T, K, E, gen)
    w = torch.rand(T, K, generator=gen).requires_grad_()
    w_gate = (torch.randn(E, I, H, generator=gen) / H**0.5).to(dtype).requires_grad_()
    w_up = (torch.randn(E, I, H, generator=gen) / H**0.5).to(dtype).requires_grad_()
    w_down = (torch.randn(E, H, I, generator=gen) / I**0.5).to(dtype).requires_grad_()
    grad_out = torch.randn(T, H, generator=gen).to(dtype)
    return x, idx, w, w_gate, w_up, w_down, grad_out


def _grads(out, x, w, w_gate, w_up, w_down, grad_out):
    return torch.autograd.grad(out, (x, w, w_gate, w_up, w_down), grad_out)


CASES = [("random", 23, 3, 8, 32, 16), ("edge", 18, 3, 7, 48, 24), ("skewed", 40, 4, 12, 32, 32)]
NAMES = ["x", "topk_weight", "w_gate", "w_up", "w_down"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,T,K,E,H,I", CASES)
def test_forward_and_gradients_equal_loop(backend, kind, T, K, E, H, I):
    x, idx, w, wg, wu, wd, grad_out = _problem(kind, T, K, E, H, I, seed=T + E)
    ref = experts_forward_loop(x, idx, w, wg, wu, wd)
    out = grouped_experts_forward(x, idx, w, wg, wu, wd, backend=backend)
    assert out.dtype == x.dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    got = _grads(out, x, w, wg, wu, wd, grad_out)
    want = _grads(ref, x, w, wg, wu, wd, grad_out)
    for name, g, r in zip(NAMES, got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")
    if kind == "edge":  # expert 0 received no token: its weights get exactly zero gradient
        for g in got[2:]:
            assert torch.equal(g[0], torch.zeros_like(g[0]))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_bf16_close_to_loop(backend):
    x, idx, w, wg, wu, wd, grad_out = _problem("skewed", 32, 4, 8, 64, 32, seed=3, dtype=torch.bfloat16)
    ref = experts_forward_loop(x, idx, w, wg, wu, wd)
    out = grouped_experts_forward(x, idx, w, wg, wu, wd, backend=backend)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for name, g, r in zip(NAMES, _grads(out, x, w, wg, wu, wd, grad_out), _grads(ref, x, w, wg, wu, wd, grad_out)):
        err = (g.float() - r.float()).norm() / r.float().norm().clamp_min(1e-12)
        assert err < 2e-2, f"grad {name}: relative error {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_runs_are_bitwise_equal(backend):
    x, idx, w, wg, wu, wd, grad_out = _problem("skewed", 30, 4, 8, 32, 16, seed=5)
    runs = []
    for _ in range(2):
        out = grouped_experts_forward(x, idx, w, wg, wu, wd, backend=backend, deterministic=True)
        runs.append((out, *_grads(out, x, w, wg, wu, wd, grad_out)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_model_module_grouped_equals_loop():
    torch.manual_seed(0)
    experts = GroupedExperts(6, 32, 16)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(10, 32)
    idx = torch.stack([torch.randperm(6)[:2] for _ in range(10)])
    w = torch.rand(10, 2)
    experts.impl = "loop"
    ref = experts(x, idx, w)
    experts.impl = "grouped"
    torch.testing.assert_close(experts(x, idx, w), ref, rtol=1e-4, atol=1e-5)


def test_mixed_dtype_weights_follow_x():
    x, idx, w, wg, wu, wd, _ = _problem("random", 8, 2, 4, 16, 16, seed=1)
    out = grouped_experts_forward(x.bfloat16(), idx, w, wg, wu, wd, backend="reference")
    assert out.dtype == torch.bfloat16


def test_contract_errors():
    x, idx, w, wg, wu, wd, _ = _problem("random", 4, 2, 4, 16, 8, seed=0)
    with pytest.raises(CoscaleError, match="precision"):
        grouped_experts_forward(x, idx, w, wg, wu, wd, precision="fp16")
    with pytest.raises(CoscaleError, match="w_down"):
        grouped_experts_forward(x, idx, w, wg, wu, wd.transpose(1, 2))
    with pytest.raises(CoscaleError, match="topk_weight"):
        grouped_experts_forward(x, idx, w[:, :1], wg, wu, wd)


def test_empty_batch():
    x, idx, w, wg, wu, wd, _ = _problem("random", 4, 2, 4, 16, 8, seed=0)
    out = grouped_experts_forward(x[:0], idx[:0], w[:0], wg, wu, wd)
    assert out.shape == (0, 16)


def test_fp8_close_to_loop():
    """FP8 1x128/128x128: normalized difference against the FP32 loop, as for DeepGEMM's tests."""
    x, idx, w, wg, wu, wd, grad_out = _problem("edge", 16, 3, 5, 256, 128, seed=7)
    ref = experts_forward_loop(x, idx, w, wg, wu, wd)
    xb = x.detach().bfloat16().requires_grad_()
    ws = [t.detach().bfloat16().requires_grad_() for t in (wg, wu, wd)]
    out = grouped_experts_forward(xb, idx, w, *ws, precision="fp8")
    assert out.dtype == torch.bfloat16

    def diff(p, q):
        p, q = p.detach().double().flatten(), q.detach().double().flatten()
        return float(1 - 2 * (p @ q) / (p @ p + q @ q).clamp_min(1e-30))

    # three chained FP8 GEMMs (each ~1e-3 on its own, DeepGEMM's bound) plus BF16 storage
    assert diff(out, ref) < 5e-3
    got = torch.autograd.grad(out, (xb, w, *ws), grad_out.bfloat16())
    want = _grads(ref, x, w, wg, wu, wd, grad_out)
    for name, g, r in zip(NAMES, got, want):
        assert diff(g, r) < 1e-2, f"grad {name}: {diff(g, r):.3g}"
