"""Serving versions of two layers, swapped into a plain model (torchtitan-style conversion):

- ServingExperts replaces coscale.model.moe.GroupedExperts. It shares the model's expert weights and
  computes the same sum_k w_k FFN_k(x), but its token permutation needs no host synchronisation: the
  rows are laid out in a buffer of a fixed worst-case size (T*K plus per-expert padding) and the grouped
  GEMMs are told where each expert's rows end by a device tensor. That is what lets a decode step be
  captured in a CUDA graph (the training path reads the exact row count back to the host). With FP8
  expert weights (an FP8 checkpoint) it runs the grouped block-scaled FP8 GEMM on the checkpoint's
  own FP8 bytes and scales, through coscale.kernels.permute (one host sync: no CUDA graphs then).
- FP8InferenceLinear replaces nn.Linear for a weight stored in FP8 with 128x128 block scales (DeepSeek-V3's
  checkpoint format): activations are quantized in 1x128 tiles and the GEMM is the training recipe's
  block-scaled FP8 GEMM (coscale.kernels.fp8_gemm) on the checkpoint's FP8 weight, never dequantized
  to BF16. The MLA absorbed path, which needs W_UK and W_UV as matrices, gets a dequantized copy of
  kv_b_proj's weight once (`dequantized_weight`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coscale.kernels.fp8_gemm import fp8_gemm
from coscale.kernels.grouped_gemm import grouped_mm
from coscale.kernels.quant import act_quant_1x128
from coscale.model.moe import GroupedExperts, experts_forward_loop

FP8 = torch.float8_e4m3fn
BLOCK = 128
BF16_ALIGN = 16  # rows per expert segment for torch._grouped_mm (kernels.moe.ALIGN["bf16"])


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


class ServingExperts(nn.Module):
    """The routed experts of one MoE layer for serving (module docstring). Either `from_experts` (BF16,
    sharing the model's Parameters) or FP8 buffers w_gate / w_up / w_down [E, N, K] with *_scale_inv
    [E, N/128, K/128] filled by coscale.infer.fp8."""

    def __init__(self, n_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.n_experts, self.hidden, self.intermediate = n_experts, hidden, intermediate
        self.fp8 = False

    @classmethod
    def from_experts(cls, experts: GroupedExperts) -> ServingExperts:
        module = cls(experts.n_experts, experts.hidden, experts.intermediate)
        module.w_gate, module.w_up, module.w_down = experts.w_gate, experts.w_up, experts.w_down
        return module

    @classmethod
    def fp8_empty(cls, n_experts: int, hidden: int, intermediate: int, device) -> ServingExperts:
        module = cls(n_experts, hidden, intermediate)
        module.fp8 = True
        for name, (n, k) in (("w_gate", (intermediate, hidden)), ("w_up", (intermediate, hidden)),
                             ("w_down", (hidden, intermediate))):
            module.register_buffer(name, torch.zeros(n_experts, n, k, dtype=FP8, device=device))
            module.register_buffer(name + "_scale_inv", torch.ones(n_experts, n // BLOCK, k // BLOCK, device=device))
        return module

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            return self._forward_fp8(x, topk_idx, topk_weight)
        if not x.is_cuda:
            return experts_forward_loop(x, topk_idx, topk_weight, self.w_gate, self.w_up, self.w_down)
        return self._forward_static(x, topk_idx, topk_weight, backend="auto")

    def _forward_static(self, x, topk_idx, topk_weight, backend: str):
        """The permutation into a fixed-size buffer and three grouped GEMMs; no host sync on CUDA."""
        T, K = topk_idx.shape
        E, H = self.n_experts, x.shape[1]
        flat = topk_idx.reshape(-1)
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        padded = (counts + BF16_ALIGN - 1) // BF16_ALIGN * BF16_ALIGN
        ends = padded.cumsum(0)
        order = flat.argsort(stable=True)  # pairs grouped by expert, (token, k) order kept inside
        expert = flat[order]
        rank = torch.arange(T * K, device=x.device) - (counts.cumsum(0) - counts)[expert]
        rows = (ends - padded)[expert] + rank  # the buffer row of pair order[j]
        bound = _ceil(T * K + E * (BF16_ALIGN - 1), BF16_ALIGN)
        x_perm = x.new_zeros(bound, H)
        x_perm[rows] = x[order // K]
        offs = ends.to(torch.int32)
        w = [t if t.dtype == x.dtype else t.to(x.dtype) for t in (self.w_gate, self.w_up, self.w_down)]
        a = F.silu(grouped_mm(x_perm, w[0], offs, backend=backend)) * grouped_mm(x_perm, w[1], offs, backend=backend)
        y = grouped_mm(a, w[2], offs, backend=backend)  # [bound, H]; rows past ends[-1] unspecified, unread
        pair_row = torch.empty_like(rows)
        pair_row[order] = rows
        acc = torch.promote_types(x.dtype, torch.float32)  # never accumulate in half precision
        out = (y[pair_row].view(T, K, H).to(acc) * topk_weight[..., None].to(acc)).sum(dim=1)
        return out.to(x.dtype)

    def _forward_fp8(self, x, topk_idx, topk_weight):
        from coscale.kernels.fp8_grouped_gemm import fp8_grouped_mm
        from coscale.kernels.permute import permute_tokens, unpermute_combine

        x_perm, info = permute_tokens(x, topk_idx, self.n_experts, BLOCK)
        offs = info.group_end_offsets

        def linear(inp, name):
            q, s = act_quant_1x128(inp)
            return fp8_grouped_mm(q, s, getattr(self, name), getattr(self, name + "_scale_inv"), offs, x.dtype)

        a = F.silu(linear(x_perm, "w_gate")) * linear(x_perm, "w_up")
        y = linear(a, "w_down")
        return unpermute_combine(y, info, topk_weight.float()).to(x.dtype)


def prepare_for_serving(model: nn.Module) -> nn.Module:
    """Swap every GroupedExperts for a ServingExperts sharing its weights (in place; returns model)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, GroupedExperts):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, ServingExperts.from_experts(module))
    return model
