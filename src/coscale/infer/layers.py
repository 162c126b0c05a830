"""Layers the engine swaps into a model it serves.

- DecodeLinear (`use_decode_kernels`, every engine): nn.Linear whose no-gradient forward goes through
  coscale.kernels.decode_linear, which streams the largest weights (an output head, V3's o_proj) with a
  Triton GEMM at decode's few rows and leaves the rest to cuBLAS, where it measured faster; the routers
  take coscale.kernels.router's fused kernels where those pay.

And those that serve an FP8 checkpoint in FP8, swapped into a plain model by coscale.infer.loading:

- FP8InferenceLinear replaces nn.Linear for a weight stored in FP8 with 128x128 block scales (DeepSeek-V3's
  checkpoint format): activations are quantized in 1x128 tiles and the GEMM is the training recipe's
  block-scaled FP8 GEMM (coscale.kernels.fp8_gemm) on the checkpoint's FP8 weight, never dequantized
  to BF16. The MLA absorbed path, which needs W_UK and W_UV as matrices, gets a dequantized copy of
  kv_b_proj's weight once (`dequantized_weight`).
- FP8InferenceExperts replaces coscale.model.moe.GroupedExperts for FP8 routed experts: the stacked
  FP8 bytes and scales of every expert, run through the token permutation of coscale.kernels.permute
  (no host synchronisation, so a decode step stays capturable in a CUDA graph) and the grouped
  block-scaled FP8 GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coscale.kernels.decode_linear import decode_linear
from coscale.kernels.fp8_gemm import fp8_gemm
from coscale.kernels.fp8_grouped_gemm import fp8_grouped_mm
from coscale.kernels.permute import permute_tokens, unpermute_combine
from coscale.kernels.quant import act_quant_1x128
from coscale.model.mla import MLA
from coscale.model.moe import MLP, Gate, GroupedExperts

FP8 = torch.float8_e4m3fn
BLOCK = 128


DECODE_KERNELS = ("auto", "torch")


class DecodeLinear(nn.Linear):
    """nn.Linear with `backend` for its no-gradient forward (coscale.kernels.decode_linear: "auto" takes
    the Triton GEMM on CUDA where it pays, "torch" F.linear). With gradients it is nn.Linear."""

    backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "torch" or torch.is_grad_enabled() or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        return decode_linear(x, self.weight, self.bias, backend=self.backend)


def use_decode_kernels(model: nn.Module, backend: str = "auto") -> int:
    """Point `model`'s linear layers and routers at coscale's decode kernels ("auto", where they apply) or
    at PyTorch's ("torch"). Plain nn.Linear modules become DecodeLinear in place (same parameters, same
    module objects); Gate.backend is set on every router and GroupedExperts.decode_backend on every
    layer of routed experts (coscale.kernels.moe_decode); with "auto" each MLA multiplies x by its q and kv_a
    projections in one GEMM and each SwiGLU MLP by gate and up (coscale.model.fused_weights), which at a
    decode batch's few rows saves a GEMM's fixed cost each. Returns the number of linear layers switched."""
    if backend not in DECODE_KERNELS:
        raise ValueError(f"decode kernels must be one of {DECODE_KERNELS}, got {backend!r}")
    switched = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = DecodeLinear
        if isinstance(module, DecodeLinear):
            module.backend = backend
            switched += 1
        elif isinstance(module, Gate):
            module.backend = backend
        elif isinstance(module, GroupedExperts):
            module.decode_backend = backend
        elif isinstance(module, (MLA, MLP)):
            module.stack_weights(backend == "auto")
    return switched


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


def dequantize_blocks(w: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """W [..., N, K] FP8 with scale [..., ceil(N/128), ceil(K/128)] -> W * scale in dtype."""
    n, k = w.shape[-2:]
    s = scale.float().repeat_interleave(BLOCK, -2)[..., :n, :].repeat_interleave(BLOCK, -1)[..., :k]
    return (w.float() * s).to(dtype)


class FP8InferenceLinear(nn.Module):
    """y = x W^T (+ b) with W kept in FP8: weight [Np, Kp] float8_e4m3fn (zero-padded to multiples of
    128), weight_scale_inv [Np/128, Kp/128] float32 (one dequantization multiplier per 128x128 block)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        np_, kp = _ceil(out_features, BLOCK), _ceil(in_features, BLOCK)
        self.register_buffer("weight", torch.zeros(np_, kp, dtype=FP8, device=device))
        self.register_buffer("weight_scale_inv", torch.ones(np_ // BLOCK, kp // BLOCK, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.compute_dtype = dtype
        self._dequantized: torch.Tensor | None = None

    def load(self, w: torch.Tensor, scale_inv: torch.Tensor) -> None:
        """Fill from a checkpoint's FP8 weight [N, K] and its scale [ceil(N/128), ceil(K/128)]."""
        n, k = w.shape
        self.weight.zero_()
        self.weight[:n, :k] = w.to(self.weight.device)
        self.weight_scale_inv.copy_(scale_inv.float())
        self._dequantized = None

    @torch.compiler.disable  # FP8 kernels run as they are inside a compiled decode step (graph break)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = act_quant_1x128(x2)
        y = fp8_gemm(xq, xs, self.weight, self.weight_scale_inv, x.dtype)[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """[N, K] in the compute dtype, made once (for MLA's absorbed W_UK / W_UV)."""
        if self._dequantized is None:
            w = dequantize_blocks(self.weight, self.weight_scale_inv, self.compute_dtype)
            self._dequantized = w[: self.out_features, : self.in_features].contiguous()
        return self._dequantized


class FP8InferenceExperts(nn.Module):
    """The routed experts of one MoE layer in FP8: w_gate, w_up [E, I, H] and w_down [E, H, I]
    float8_e4m3fn with *_scale_inv [E, N/128, K/128] float32 (filled by coscale.infer.loading)."""

    def __init__(self, n_experts: int, hidden: int, intermediate: int, device=None):
        super().__init__()
        self.n_experts, self.hidden, self.intermediate = n_experts, hidden, intermediate
        for name, (n, k) in (("w_gate", (intermediate, hidden)), ("w_up", (intermediate, hidden)),
                             ("w_down", (hidden, intermediate))):
            self.register_buffer(name, torch.zeros(n_experts, n, k, dtype=FP8, device=device))
            self.register_buffer(name + "_scale_inv", torch.ones(n_experts, n // BLOCK, k // BLOCK, device=device))

    @torch.compiler.disable
    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        x_perm, info = permute_tokens(x, topk_idx, self.n_experts, BLOCK)  # segments 128-aligned
        offs = info.group_end_offsets

        def linear(inp, name):
            q, s = act_quant_1x128(inp)
            return fp8_grouped_mm(q, s, getattr(self, name), getattr(self, name + "_scale_inv"), offs, x.dtype)

        a = F.silu(linear(x_perm, "w_gate")) * linear(x_perm, "w_up")
        return unpermute_combine(linear(a, "w_down"), info, topk_weight.float()).to(x.dtype)
