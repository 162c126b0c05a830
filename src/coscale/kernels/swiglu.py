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

On a GPU (FAST_SIGMOID) sigmoid(g) is rcp.approx.ftz(1 + ex2.approx.ftz(-g log2 e)): four instructions
where tl.sigmoid's exp and division take twelve (sm_90 SASS: the subnormal range checks and rescalings
of ex2.approx.f32 and div.full.f32). The two agree bit for bit except for g < -87.3, where 1 + e^-g
exceeds 2^126 and the flushed reciprocal gives sigmoid 0 instead of a value below 2^-126 (and silu 0
instead of about g 2^-127: far below any 1x128 tile's FP8 resolution, and below PyTorch's float32
results there by less than 1e-36). The FP8 producers of coscale.kernels.fused_quant use the same
`sigmoid` so that they keep writing the bytes of these kernels' outputs quantized. The interpreter
has no PTX: it takes tl.sigmoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from coscale.errors import CoscaleError
from coscale.kernels.backend import check_backend
from coscale.kernels.library import launcher, operator, runs_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

# The fast sigmoid on GPUs (the module docstring); False: tl.sigmoid everywhere (the interpreter's always).
FAST_SIGMOID = True


def fast_sigmoid() -> bool:
    """Whether this process's SwiGLU kernels (and the FP8 producers fused with them) take the fast sigmoid."""
    from coscale.kernels.backend import interpreting

    return FAST_SIGMOID and not interpreting()


if triton is not None:

    @triton.jit
    def sigmoid(x, FAST: tl.constexpr):
        """1 / (1 + e^-x) in float32: with FAST, rcp.approx.ftz(1 + ex2.approx.ftz(x * -log2 e)) (the module
        docstring says where it differs from tl.sigmoid); else tl.sigmoid."""
        if FAST:
            e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * -1.4426950408889634],
                                          dtype=tl.float32, is_pure=True, pack=1)
            return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [e + 1.0], dtype=tl.float32,
                                             is_pure=True, pack=1)
        return tl.sigmoid(x)

    @triton.jit
    def swiglu_value(g, u, FAST: tl.constexpr):
        """a = silu(g) * u in float32 (the forward kernel's and the FP8 producers' formula, in one place)."""
        return g * sigmoid(g, FAST) * u

    @triton.jit
    def swiglu_grads(g, u, da, FAST: tl.constexpr):
        """(dg, du) in float32 for the gradient da of a = silu(g) * u (the backward kernel's and the FP8
        producers' formulas, in one place, so that both round alike)."""
        s = sigmoid(g, FAST)
        return da * u * s * (1.0 + g * (1.0 - s)), da * g * s

    @triton.jit
    def _swiglu_fwd_kernel(
        g_ptr, u_ptr, a_ptr, I, stride_g, stride_u, stride_a, BLOCK: tl.constexpr, FAST: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        a = swiglu_value(g, u, FAST)
        tl.store(a_ptr + row * stride_a + cols, a.to(a_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(
        g_ptr, u_ptr, da_ptr, grad_ptr, I,
        stride_g, stride_u, stride_da, stride_grad, BLOCK: tl.constexpr, FAST: tl.constexpr,
    ):
        """grad [M, 2I] = [dg | du] (one output tensor: no views of it reach the kernel)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        da = tl.load(da_ptr + row * stride_da + cols, mask=mask, other=0.0).to(tl.float32)
        dg, du = swiglu_grads(g, u, da, FAST)
        tl.store(grad_ptr + row * stride_grad + cols, dg.to(grad_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_ptr + row * stride_grad + I + cols, du.to(grad_ptr.dtype.element_ty), mask=mask)


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
        launcher(_swiglu_fwd_kernel)[(M, triton.cdiv(I, block))](
            g, u, a, I, g.stride(0), u.stride(0), a.stride(0), BLOCK=block, FAST=fast_sigmoid()
        )
    return a


def swiglu_backward_triton(g, u, da):
    """Returns [dg | du] as one [M, 2I] buffer."""
    da = da.contiguous()
    _check_rows(g, u, da)
    M, I = g.shape
    grad = torch.empty(M, 2 * I, dtype=g.dtype, device=g.device)
    if M and I:
        block = _block(I)
        launcher(_swiglu_bwd_kernel)[(M, triton.cdiv(I, block))](
            g, u, da, grad, I, g.stride(0), u.stride(0), da.stride(0), grad.stride(0), BLOCK=block,
            FAST=fast_sigmoid(),
        )
    return grad


def swiglu_forward_torch(g, u):
    return (F.silu(g.float()) * u.float()).to(g.dtype)


def swiglu_backward_torch(g, u, da):
    g32, u32, da32 = g.float(), u.float(), da.float()
    s = torch.sigmoid(g32)
    dg = da32 * u32 * s * (1.0 + g32 * (1.0 - s))
    du = da32 * g32 * s
    return torch.cat([dg.to(g.dtype), du.to(u.dtype)], dim=1)


@operator("swiglu_backward")
def swiglu_backward_op(g: torch.Tensor, u: torch.Tensor, da: torch.Tensor, backend: str) -> torch.Tensor:
    """[dg | du] [M, 2I] of a = silu(g) * u for the gradient da [M, I] (float32 math)."""
    if runs_triton(backend, g, "swiglu"):
        return swiglu_backward_triton(g, u, da)
    return swiglu_backward_torch(g, u, da)


@operator("swiglu")
def swiglu_op(gate_up: torch.Tensor, backend: str) -> torch.Tensor:
    """gate_up [M, 2I] (gate first, then up) -> silu(gate) * up [M, I]."""
    I = gate_up.shape[1] // 2
    g, u = gate_up[:, :I], gate_up[:, I:]
    if runs_triton(backend, gate_up, "swiglu"):
        return swiglu_forward_triton(g, u)
    return swiglu_forward_torch(g, u)


@operator("swiglu_pair")
def swiglu_pair_op(g: torch.Tensor, u: torch.Tensor, backend: str) -> torch.Tensor:
    """silu(g) * u for two [M, I] tensors."""
    if runs_triton(backend, g, "swiglu"):
        return swiglu_forward_triton(g, u)
    return swiglu_forward_torch(g, u)


def _setup(ctx, inputs, output):
    *tensors, backend = inputs
    ctx.save_for_backward(*tensors)
    ctx.backend = backend


def _swiglu_backward(ctx, da):
    (gate_up,) = ctx.saved_tensors
    I = gate_up.shape[1] // 2
    return swiglu_backward_op(gate_up[:, :I], gate_up[:, I:], da, ctx.backend), None


def _swiglu_pair_backward(ctx, da):
    g, u = ctx.saved_tensors
    grad = swiglu_backward_op(g, u, da, ctx.backend)  # [dg | du]: two views of one buffer
    return grad[:, : g.shape[1]], grad[:, g.shape[1] :], None


swiglu_op.register_autograd(_swiglu_backward, setup_context=_setup)
swiglu_pair_op.register_autograd(_swiglu_pair_backward, setup_context=_setup)


def swiglu(gate_up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """gate_up [M, 2I] (gate first, then up) -> silu(gate) * up [M, I]; differentiable."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise CoscaleError(f"swiglu needs [M, 2I], got {tuple(gate_up.shape)}")
    check_backend(backend, gate_up, op="swiglu")
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    return swiglu_op(gate_up, backend)


def swiglu_pair(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up for two [M, I] tensors; differentiable in both."""
    if gate.shape != up.shape or gate.dim() != 2:
        raise CoscaleError(f"swiglu_pair needs two [M, I] tensors, got {tuple(gate.shape)}, {tuple(up.shape)}")
    check_backend(backend, gate, op="swiglu")
    if gate.stride(1) != 1:
        gate = gate.contiguous()
    if up.stride(1) != 1:
        up = up.contiguous()
    return swiglu_pair_op(gate, up, backend)
