"""x W^T for the few rows of a decode step, by a Triton GEMM that streams W.

Shape legend: M rows (the decode batch), K input features, N output features.

At decode a linear layer is a matrix-vector product: its time is the time to read W. cuBLAS picks
small tiles for it and, at DeepSeek-V2-Lite's attention and shared-expert shapes (8-12 MB weights, 16
rows), reached about half of the H200's copy bandwidth in the decode step's profile (BENCHMARKS.md,
run 25: 133 such GEMMs, 6 us each). coscale's grouped GEMM already has tiles for this regime (16 rows,
narrow N, deep K; 94-96% of copy bandwidth on the experts, run 25), so a dense layer runs it as one
expert (`coscale.kernels.grouped_gemm.triton_dense_mm`, autotuned per shape).

`decode_linear` takes that kernel on CUDA for BF16/FP16 operands with at most DECODE_LINEAR_MAX_ROWS rows
(backend "auto"), and F.linear otherwise; "triton" forces the kernel (CPU tensors under
TRITON_INTERPRET=1), "torch" forces F.linear. Inference only: it has no backward, so with gradients
the caller keeps F.linear (coscale.infer.layers.DecodeLinear does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from coscale.errors import CoscaleError
from coscale.kernels.backend import check_backend, select_backend
from coscale.kernels.grouped_gemm import triton_dense_mm
from coscale.kernels.library import operator

__all__ = ["DECODE_LINEAR_MAX_ROWS", "decode_linear"]

DECODE_LINEAR_MAX_ROWS = 32  # the grouped kernel's decode tiles serve up to 32 rows (its autotune pruning)


def _fake(x, weight, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


@operator("decode_linear", opaque=True, fake=_fake)
def decode_linear_op(x: torch.Tensor, weight: torch.Tensor, backend: str) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T -> [M, N] (an opaque operator: autotuned kernels)."""
    def preferred():
        small = x.shape[0] <= DECODE_LINEAR_MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16)
        return None if small else "torch"

    if select_backend(backend, x, preferred=preferred, op="decode_linear") == "triton":
        return triton_dense_mm(x.contiguous(), weight)
    return F.linear(x, weight)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  backend: str = "auto") -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias) -> [..., N] in x's dtype; not differentiable."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise CoscaleError(f"decode_linear needs x [..., K] and weight [N, K], got {tuple(x.shape)} and "
                           f"{tuple(weight.shape)}")
    if x.dtype != weight.dtype:
        raise CoscaleError(f"decode_linear operands must share a dtype, got {x.dtype} and {weight.dtype}")
    check_backend(backend, x, op="decode_linear")
    y = decode_linear_op(x.reshape(-1, x.shape[-1]), weight, backend)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])
