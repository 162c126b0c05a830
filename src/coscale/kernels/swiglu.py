"""Fused SwiGLU: a = silu(g) * u, and its backward, in one pass over memory each.

Shape legend: M rows, I intermediate features.

Unfused PyTorch reads g for silu, writes silu(g), reads it back with u for the product (and the
backward keeps silu(g) alive and makes several elementwise passes). The fused kernels read g and u
once and write a once; the backward reads g, u, da once and writes dg, du once, recomputing
sigmoid(g) instead of storing it:

    s = sigmoid(g);  a = g * s * u
    dg = da * u * s * (1 + g * (1 - s));   du = da * g * s

Math is float32 in registers whatever the storage dtype. Gate and up may be two tensors or the two
halves of one [M, 2I] buffer (`swiglu(gate_up)`, what a grouped GEMM against [w_gate; w_up] gives);
the kernels take a row stride for each operand so both layouts run without copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from coscale.errors import CoscaleError
from coscale.kernels.backend import select_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(
        g_ptr, u_ptr, a_ptr, I, stride_g, stride_u, stride_a, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        a = g * tl.sigmoid(g) * u
        tl.store(a_ptr + row * stride_a + cols, a.to(a_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(
        g_ptr, u_ptr, da_ptr, dg_ptr, du_ptr, I,
        stride_g, stride_u, stride_da, stride_dg, stride_du, BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        da = tl.load(da_ptr + row * stride_da + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dg = da * u * s * (1.0 + g * (1.0 - s))
        du = da * g * s
        tl.store(dg_ptr + row * stride_dg + cols, dg.to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + row * stride_du + cols, du.to(du_ptr.dtype.element_ty), mask=mask)


def _block(I: int) -> int:
    return min(1024, triton.next_power_of_2(max(I, 16)))


def _check_rows(*tensors):
    for t in tensors:
        if t.dim() != 2 or t.stride(1) != 1:
            raise CoscaleError(f"SwiGLU operands must be 2D with contiguous rows, got strides {t.stride()}")


def swiglu_forward_triton(g, u):
    _check_rows(g, u)
    M, I = g.shape
    a = torch.empty(M, I, dtype=g.dtype, device=g.device)
    if M and I:
        block = _block(I)
        _swiglu_fwd_kernel[(M, triton.cdiv(I, block))](
            g, u, a, I, g.stride(0), u.stride(0), a.stride(0), BLOCK=block
        )
    return a


def swiglu_backward_triton(g, u, da):
    """Returns (dg, du) as the two halves of one [M, 2I] buffer."""
    da = da.contiguous()
    _check_rows(g, u, da)
    M, I = g.shape
    grad = torch.empty(M, 2 * I, dtype=g.dtype, device=g.device)
    dg, du = grad[:, :I], grad[:, I:]
    if M and I:
        block = _block(I)
        _swiglu_bwd_kernel[(M, triton.cdiv(I, block))](
            g, u, da, dg, du, I, g.stride(0), u.stride(0), da.stride(0), dg.stride(0), du.stride(0),
            BLOCK=block,
        )
    return dg, du


def swiglu_forward_torch(g, u):
    return (F.silu(g.float()) * u.float()).to(g.dtype)


def swiglu_backward_torch(g, u, da):
    g32, u32, da32 = g.float(), u.float(), da.float()
    s = torch.sigmoid(g32)
    dg = da32 * u32 * s * (1.0 + g32 * (1.0 - s))
    du = da32 * g32 * s
    return dg.to(g.dtype), du.to(u.dtype)


def _forward(g, u, backend):
    if select_backend(backend, g, op="swiglu") == "triton":
        return swiglu_forward_triton(g, u)
    return swiglu_forward_torch(g, u)


def _backward(g, u, da, backend):
    if select_backend(backend, g, op="swiglu") == "triton":
        return swiglu_backward_triton(g, u, da)
    return swiglu_backward_torch(g, u, da)


class _SwiGLUPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u, backend):
        ctx.backend = backend
        ctx.save_for_backward(g, u)
        return _forward(g, u, backend)

    @staticmethod
    def backward(ctx, da):
        g, u = ctx.saved_tensors
        dg, du = _backward(g, u, da, ctx.backend)
        return dg, du, None


class _SwiGLUConcat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, backend):
        ctx.backend = backend
        ctx.save_for_backward(gate_up)
        I = gate_up.shape[1] // 2
        return _forward(gate_up[:, :I], gate_up[:, I:], backend)

    @staticmethod
    def backward(ctx, da):
        (gate_up,) = ctx.saved_tensors
        I = gate_up.shape[1] // 2
        dg, du = _backward(gate_up[:, :I], gate_up[:, I:], da, ctx.backend)
        if dg.data_ptr() + I * dg.element_size() == du.data_ptr() and dg.stride() == du.stride():
            return dg.as_strided((dg.shape[0], 2 * I), dg.stride()), None  # halves of one buffer
        return torch.cat([dg, du], dim=1), None


def swiglu(gate_up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """gate_up [M, 2I] (gate first, then up) -> silu(gate) * up [M, I]; differentiable."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise CoscaleError(f"swiglu needs [M, 2I], got {tuple(gate_up.shape)}")
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    return _SwiGLUConcat.apply(gate_up, backend)


def swiglu_pair(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up for two [M, I] tensors; differentiable in both."""
    if gate.shape != up.shape or gate.dim() != 2:
        raise CoscaleError(f"swiglu_pair needs two [M, I] tensors, got {tuple(gate.shape)}, {tuple(up.shape)}")
    if gate.stride(1) != 1:
        gate = gate.contiguous()
    if up.stride(1) != 1:
        up = up.contiguous()
    return _SwiGLUPair.apply(gate, up, backend)
