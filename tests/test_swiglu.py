"""Fused SwiGLU forward and backward against PyTorch autograd."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch
import torch.nn.functional as F

from coscale.kernels.swiglu import swiglu, swiglu_pair

try:
    import triton  # noqa: F401

    BACKENDS = ["torch", "triton"]
except ImportError:  # pragma: no cover
    BACKENDS = ["torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,I", [(1, 1), (7, 33), (64, 256), (3, 1500)])
def test_pair_matches_autograd(backend, M, I):
    gen = torch.Generator().manual_seed(M * I)
    g = (torch.randn(M, I, generator=gen) * 3).requires_grad_()
    u = torch.randn(M, I, generator=gen, requires_grad=True)
    a = swiglu_pair(g, u, backend=backend)
    ref = F.silu(g) * u
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)
    da = torch.randn(M, I, generator=gen)
    grads = torch.autograd.grad(a, (g, u), da)
    grads_ref = torch.autograd.grad(ref, (g, u), da)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_concatenated_buffer(backend):
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(9, 2 * 48, generator=gen, requires_grad=True)
    a = swiglu(gate_up, backend=backend)
    ref = F.silu(gate_up[:, :48]) * gate_up[:, 48:]
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)
    da = torch.randn(9, 48, generator=gen)
    (grad,) = torch.autograd.grad(a, gate_up, da)
    (grad_ref,) = torch.autograd.grad(ref, gate_up, da)
    assert grad.shape == (9, 96)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_halves_of_one_buffer(backend):
    """Gate and up as column halves of one [M, 2I] buffer (row stride 2I), no copies needed."""
    gen = torch.Generator().manual_seed(1)
    buf = torch.randn(6, 64, generator=gen)
    a = swiglu_pair(buf[:, :32], buf[:, 32:], backend=backend)
    torch.testing.assert_close(a, F.silu(buf[:, :32]) * buf[:, 32:], rtol=1e-5, atol=1e-6)


def test_bf16_storage_float32_math():
    gen = torch.Generator().manual_seed(2)
    g, u = torch.randn(2, 2, 300, generator=gen).bfloat16()
    a = swiglu_pair(g, u, backend="torch")
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), F.silu(g.float()) * u.float(), rtol=1e-2, atol=1e-2)
