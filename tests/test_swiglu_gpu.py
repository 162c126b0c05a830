"""SwiGLU's fast sigmoid on a GPU (coscale.kernels.swiglu.FAST_SIGMOID: inline PTX, which the interpreter cannot
run): the same bits as tl.sigmoid's kernels wherever the docstring says, the float64 formulas within float32
rounding, special values kept. Skipped on CPU."""

import pytest
import torch

from coscale.kernels import swiglu as sw
from coscale.kernels.backend import interpreting

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or interpreting(),
                               reason="the fast sigmoid is PTX: needs a GPU with TRITON_INTERPRET=0")
FLUSH = -87.3  # below, 1 + e^-g > 2^126 and the flushed reciprocal gives sigmoid 0 (the module docstring)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    g = torch.cat([torch.linspace(-100, 100, 400_001), torch.randn(100_000, generator=gen) * 4,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 88.0, 89.0, -87.0, -88.0, 1e30, -1e30])])
    g = torch.cat([g, torch.zeros(-g.numel() % 500)])  # whole rows of 500
    u = torch.randn(g.numel(), generator=gen)
    return g.reshape(-1, 500).cuda(), u.reshape(-1, 500).cuda()


def _both(fn, monkeypatch):
    monkeypatch.setattr(sw, "FAST_SIGMOID", True)
    fast = fn()
    monkeypatch.setattr(sw, "FAST_SIGMOID", False)
    return fast, fn()


@needs_gpu
def test_fast_sigmoid_has_tl_sigmoids_bits_above_the_flush(monkeypatch):
    g, u = _inputs()
    da = torch.randn_like(g)
    fast, plain = _both(lambda: sw.swiglu_forward_triton(g, u), monkeypatch)
    fast_b, plain_b = _both(lambda: sw.swiglu_backward_triton(g, u, da), monkeypatch)
    above = g >= FLUSH
    assert torch.equal(fast[above], plain[above])
    assert torch.equal(fast_b[:, :g.shape[1]][above], plain_b[:, :g.shape[1]][above])
    assert torch.equal(fast_b[:, g.shape[1]:][above], plain_b[:, g.shape[1]:][above])
    below = ~above  # where they may differ: values below 1e-35 either way
    for t in (fast, plain, fast_b[:, :g.shape[1]], plain_b[:, :g.shape[1]]):
        assert float(t[below].abs().max()) < 1e-35


@needs_gpu
def test_fast_sigmoid_swiglu_matches_float64(monkeypatch):
    # |g| <= 30: e^-g's float32 argument g log2 e is rounded to 2^-24 of itself, so sigmoid's relative error
    # grows with |g| (about 2e-6 at 30, tl.sigmoid alike); values O(1), so rtol and atol 1e-5
    monkeypatch.setattr(sw, "FAST_SIGMOID", True)
    g, u = _inputs()
    g = g.clamp(-30, 30)
    da = torch.randn_like(g)
    g64, u64, da64 = g.double(), u.double(), da.double()
    s = torch.sigmoid(g64)
    want = g64 * s * u64
    want_b = torch.cat([da64 * u64 * s * (1 + g64 * (1 - s)), da64 * g64 * s], dim=1)
    torch.testing.assert_close(sw.swiglu_forward_triton(g, u).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sw.swiglu_backward_triton(g, u, da).double(), want_b, rtol=1e-5, atol=1e-5)


@needs_gpu
def test_fast_sigmoid_special_values(monkeypatch):
    monkeypatch.setattr(sw, "FAST_SIGMOID", True)
    g = torch.tensor([[float("inf"), float("-inf"), float("nan"), 0.0]], device="cuda")
    u = torch.ones_like(g)
    a = sw.swiglu_forward_triton(g, u)
    want = torch.nn.functional.silu(g.cpu().double()).float()  # inf, nan (-inf * 0), nan, 0
    assert torch.equal(a.cpu().isnan(), want.isnan())
    assert torch.equal(a.cpu()[~want.isnan()], want[~want.isnan()])
