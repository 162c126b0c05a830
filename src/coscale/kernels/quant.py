"""Fine-grained FP8 (E4M3) quantization: 1x128 activation tiles, 128x128 weight blocks.

The recipe, the layouts, the special values and the PyTorch references (the specification) are in
coscale.kernels.fp8_recipe (re-exported here); the operators and Triton launchers in
coscale.kernels.quant_ops; quantization fused into the kernel that produces its input (SwiGLU, its
backward, the MoE permutation) in coscale.kernels.fused_quant. The functions here check their
arguments and call the operators:

- ``act_quant_1x128(x [M, K])`` -> y [M, Kp] e4m3, scale [M, Kp/128] fp32 (outer-dim-major).
- ``act_quant_128x1(x [M, K])`` -> yt [K, Mp], scale_t [K, Mp/128]: x^T in 1x128 tiles along M, the
  layout of the weight gradient's operands.
- ``act_quant_1x128_dual(x)`` -> both (two launches, or one with ``one_pass=True``).
- ``weight_quant_128x128(w [N, K])`` -> y [Np, Kp], scale [Np/128, Kp/128];
  ``weight_quant_128x128_dual(w)`` also W^T's FP8 bytes [Kp, Np] and scales (W's blocks transposed).

Backends: "torch" (the references), "triton" (the kernels; on CPU under TRITON_INTERPRET=1) and
"auto" (triton for CUDA tensors when Triton imports, else torch), as
coscale.kernels.backend.select_backend decides for every kernel. Importing this module never needs
Triton; the kernels are compiled on first launch.
"""

from __future__ import annotations

import torch

from coscale.errors import CoscaleError
from coscale.kernels.backend import check_backend, interpreting, select_backend, triton_available
from coscale.kernels.fp8_recipe import (
    AMAX_FLOOR,
    BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    act_quant_1x128_ref,
    act_quant_128x1_ref,
    ceil_to,
    check_2d,
    dequant_1x128,
    dequant_128x128,
    outer_major,
    round_scale_ue8m0,
    weight_quant_128x128_ref,
)
from coscale.kernels.quant_ops import act_quant_op, transpose_bytes, weight_quant_op

__all__ = [
    "transpose_fp8",
    "FP8_DTYPE",
    "FP8_MAX",
    "BLOCK",
    "AMAX_FLOOR",
    "act_quant_1x128",
    "act_quant_128x1",
    "act_quant_1x128_dual",
    "weight_quant_128x128",
    "weight_quant_128x128_dual",
    "act_quant_1x128_ref",
    "act_quant_128x1_ref",
    "weight_quant_128x128_ref",
    "dequant_1x128",
    "dequant_128x128",
    "round_scale_ue8m0",
    "outer_major",
    "triton_available",
    "interpreting",
]


def act_quant_1x128(x: torch.Tensor, round_scale: bool = False, backend: str = "auto"):
    """x [M, K] -> (y [M, Kp] e4m3, scale [M, Kp/128] fp32); see the module docstring."""
    check_2d(x, "x")
    check_backend(backend, x, op="act_quant_1x128")
    y, s, _, _ = act_quant_op(x, round_scale, True, False, False, False, backend)
    return y, s


def act_quant_128x1(x: torch.Tensor, round_scale: bool = False, backend: str = "auto", *, pad_t: bool = False):
    """x [M, K] -> (yt [K, Mp] e4m3, scale_t [K, Mp/128] fp32): x^T in 1x128 tiles along M.

    ``pad_t=True``: yt [Kp, Mp] and scale_t [Kp, Mp/128], the rows K..Kp-1 zeros (what a GEMM that
    needs 128-multiple row counts, e.g. cuBLAS for the weight gradient, wants)."""
    check_2d(x, "x")
    check_backend(backend, x, op="act_quant_128x1")
    _, _, yt, st = act_quant_op(x, round_scale, False, True, pad_t, False, backend)
    return yt, st


def act_quant_1x128_dual(
    x: torch.Tensor, round_scale: bool = False, backend: str = "auto", *, pad_t: bool = False, one_pass: bool = False
):
    """Both layouts: (y [M, Kp], scale [M, Kp/128], yt [K, Mp], scale_t [K, Mp/128]).

    ``pad_t=True`` pads the transposed layout's rows to Kp (zeros), as in ``act_quant_128x1``.
    Default: two launches with tiles shaped for each layout. ``one_pass=True``: one launch that walks
    [128 x 128] blocks in column chunks (coscale.kernels._quant_triton.dual_quant_kernel); identical
    bytes; benchmarks/bench_quant.py times both."""
    check_2d(x, "x")
    check_backend(backend, x, op="act_quant_1x128_dual")
    return act_quant_op(x, round_scale, True, True, pad_t, one_pass, backend)


def weight_quant_128x128(w: torch.Tensor, round_scale: bool = False, backend: str = "auto"):
    """w [N, K] -> (y [Np, Kp] e4m3, scale [Np/128, Kp/128] fp32), one scale per 128x128 block."""
    check_2d(w, "w")
    check_backend(backend, w, op="weight_quant_128x128")
    y, s, _, _ = weight_quant_op([w], round_scale, False, backend)
    return y, s


def transpose_fp8(y: torch.Tensor, out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """y [.., R, C] (1-byte elements, e.g. FP8) -> its transpose [.., C, R] with contiguous rows, exact.

    ``backend`` as for the quantization kernels: the Triton kernel for CUDA tensors under "auto" (PyTorch's
    strided copy moves one byte per thread without tiling), ``copy_`` of the transposed view under
    "torch" or on CPU. ``out``: any [.., C, R] view with contiguous rows."""
    if y.element_size() != 1 or y.dim() not in (2, 3):
        raise CoscaleError(
            f"transpose_fp8 takes a 2-D or 3-D tensor of 1-byte elements, got {y.dtype} {tuple(y.shape)}"
        )
    shape = (*y.shape[:-2], y.shape[-1], y.shape[-2])
    if out is None:
        out = torch.empty(shape, dtype=y.dtype, device=y.device)
    if tuple(out.shape) != shape or out.dtype != y.dtype or (out.numel() and out.stride(-1) != 1):
        raise CoscaleError(f"out must be a {shape} {y.dtype} tensor with contiguous rows")
    if out.numel() == 0:
        return out
    if select_backend(backend, y, op="transpose_fp8") == "torch" or y.stride(-1) != 1:
        return out.view(torch.uint8).copy_(y.view(torch.uint8).transpose(-2, -1)).view(y.dtype)
    return transpose_bytes(y, out)


def _weight_dual_shapes(w: torch.Tensor):
    *lead, n, k = w.shape
    np_, kp = ceil_to(n), ceil_to(k)
    return (
        (*lead, np_, kp),
        (*lead, np_ // BLOCK, kp // BLOCK),
        (*lead, kp, np_),
        (*lead, kp // BLOCK, np_ // BLOCK),
    )


def weight_quant_128x128_dual(w: torch.Tensor, round_scale: bool = False, backend: str = "auto", out=None):
    """W and W^T: w [N, K] or [E, N, K] -> (y [.., Np, Kp], s [.., Np/128, Kp/128],
    yt [.., Kp, Np], st [.., Kp/128, Np/128]).

    A 128x128 block of W^T is a block of W transposed, with the same scale, so yt holds W's FP8 bytes
    transposed (one 1-byte pass) and st = s^T. ``out``: four tensors (any strides with contiguous last
    dimension, e.g. slices of a concatenated [w_gate; w_up] buffer) to copy the results into; ``(y, s,
    None, None)`` copies W only. Stacking several weights in one buffer without a copy:
    ``coscale.kernels.quant_ops.weight_quant_op([w_0, w_1, ...], ...)``.
    """
    if w.dim() not in (2, 3):
        raise CoscaleError(f"w must be [N, K] or [E, N, K], got shape {tuple(w.shape)}")
    if not w.is_floating_point() or w.dtype == FP8_DTYPE:
        raise CoscaleError(f"w must be fp32/bf16/fp16, got {w.dtype}")
    check_backend(backend, w, op="weight_quant_128x128_dual")
    shapes = _weight_dual_shapes(w)
    if out is not None:
        given = [t for t in out if t is not None]
        if [tuple(t.shape) for t in given] != [shapes[i] for i, t in enumerate(out) if t is not None] or any(
            t.stride(-1) != 1 for t in (out[0], out[2]) if t is not None
        ):
            raise CoscaleError(f"out must have shapes {shapes} (FP8 tensors with contiguous rows)")
    transpose = out is None or out[2] is not None
    result = weight_quant_op([w], round_scale, transpose, backend)
    if out is None:
        return result
    for dst, src in zip(out, result):
        if dst is not None:
            dst.copy_(src)
    return tuple(out)
