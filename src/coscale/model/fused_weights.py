"""One GEMM for two projections of the same input, at inference: their weights as views of one tensor.

At decode a small GEMM costs a fixed few microseconds whatever its size (cuBLAS about 5 us at 16 rows on the
H200, BENCHMARKS.md run 27), so two projections of the same x cost twice that. `concatenate_weights` stacks
the weights of such nn.Linear layers into one [sum of out_features, in_features] tensor and points each
layer's weight at its rows of it: the layers keep their parameters (same names, same values, no second
copy), and the owner multiplies x by the stacked tensor once and splits the result. MLA's q (or q_a) and
kv_a projections and SwiGLU's gate and up projections use it (coscale.infer.layers.use_decode_kernels).
"""

from __future__ import annotations

import torch
from torch import nn


def concatenate_weights(*layers: nn.Module) -> torch.Tensor | None:
    """The stacked weight of `layers` (bias-free nn.Linear of one dtype and device, the same in_features),
    their weights re-pointed at its rows; None, and nothing changed, where they do not qualify (an FP8
    layer, a bias). Call it again after replacing a layer's weight: the stacked tensor is not tracked."""
    if not all(isinstance(m, nn.Linear) for m in layers):
        return None
    weights = [m.weight for m in layers]
    if any(m.bias is not None for m in layers) or len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1:
        return None
    stacked = torch.cat([w.detach() for w in weights])
    start = 0
    for m, w in zip(layers, weights):
        m.weight = nn.Parameter(stacked[start:start + w.shape[0]], requires_grad=w.requires_grad)
        start += w.shape[0]
    return stacked
