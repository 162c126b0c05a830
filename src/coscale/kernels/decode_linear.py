"""x W^T for the few rows of a decode step, by a Triton GEMM that streams W.

Shape legend: M rows (the decode batch), K input features, N output features.

At decode a linear layer is a matrix-vector product: its time is the time to read W plus fixed costs.
coscale's grouped GEMM has tiles for this regime (16 rows, narrow N, deep K; 94-96% of the H200's copy
bandwidth on V2-Lite's experts, BENCHMARKS.md run 25), so a dense layer can run it as one expert
(`coscale.kernels.grouped_gemm.triton_dense_mm`, autotuned per shape). Measured at 16 rows on the H200
against cuBLAS, replayed from CUDA graphs (run 27, benchmarks/bench_decode_linear.py): 0.82-0.83x on
V2-Lite's attention and shared-expert weights (2-12 MB, where cuBLAS takes 5-6 us), 0.40-0.55x on V3's
7168-wide ones with narrow outputs (q_a, kv_a, shared gate/up), 0.48x on V2-Lite's 10944-deep dense down
projection, 0.94x at 45-75 MB, and faster only on the largest: 1.07x on V2-Lite's output head (420 MB,
100% of copy against 94%) and 1.12x on V3's o_proj (235 MB, 97% against 87%).

So `decode_linear`'s backend "auto" takes the kernel on CUDA only where it paid: BF16/FP16 operands, at
most DECODE_LINEAR_MAX_ROWS rows and at least DECODE_LINEAR_MIN_WEIGHT_BYTES of weight; F.linear
otherwise. "triton" forces the kernel (CPU tensors under TRITON_INTERPRET=1), "torch" forces F.linear.
Inference only: it has no backward, so with gradients the caller keeps F.linear
(coscale.infer.layers.DecodeLinear does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from coscale.errors import CoscaleError
from coscale.kernels.backend import check_backend, select_backend
from coscale.kernels.grouped_gemm import triton_dense_mm
from coscale.kernels.library import operator

__all__ = ["DECODE_LINEAR_MAX_ROWS", "DECODE_LINEAR_MIN_WEIGHT_BYTES", "decode_linear", "decode_linear_pays",
           "streams_weight"]

DECODE_LINEAR_MAX_ROWS = 32  # the grouped kernel's decode tiles serve up to 32 rows (its autotune pruning)
DECODE_LINEAR_MIN_WEIGHT_BYTES = 128 << 20  # measured faster than cuBLAS from 235 MB, slower up to 75 MB


def streams_weight(weight: torch.Tensor) -> bool:
    """Whether the weight is large enough for the kernel to beat cuBLAS (DECODE_LINEAR_MIN_WEIGHT_BYTES)."""
    return weight.numel() * weight.element_size() >= DECODE_LINEAR_MIN_WEIGHT_BYTES


def decode_linear_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether backend "auto" takes the Triton kernel for these CUDA operands (module docstring)."""
    return (x.shape[0] <= DECODE_LINEAR_MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16)
            and streams_weight(weight))


def _fake(x, weight, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


@operator("decode_linear", opaque=True, fake=_fake)
def decode_linear_op(x: torch.Tensor, weight: torch.Tensor, backend: str) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T -> [M, N] (an opaque operator: autotuned kernels)."""
    def preferred():
        return None if decode_linear_pays(x, weight) else "torch"

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
    if backend == "torch" or (backend == "auto" and not (x.is_cuda and streams_weight(weight))):
        # F.linear itself, not the operator around it: a compiled step keeps its cuBLAS call as it was
        return F.linear(x, weight, bias)
    y = decode_linear_op(x.reshape(-1, x.shape[-1]), weight, backend)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])
