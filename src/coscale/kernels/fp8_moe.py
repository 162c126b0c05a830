"""The routed experts of one MoE layer in FP8 as one autograd node, every quantization fused into the
kernel that produces its input.

Shape legend: T tokens, K experts per token, E experts, H hidden, I expert intermediate (Hp, Ip rounded
up to 128), M permuted rows (the static worst case of coscale.kernels.permute, 128-aligned groups).

The router weight multiplies each row's SwiGLU output, before the down projection (w_r a_r W^T = w_r (a_r W^T)):
the combine is then a plain sum, and the router weight's gradient <d out[t], y_r> = <dA_r, a_r> comes out of
SwiGLU's backward, which reads dA_r and recomputes a_r anyway, instead of from the combine's backward reading the
experts' output y [M, H] (kept from the forward for it: 0.9 GB at DeepSeek-V3's layer with 8,192 tokens).

Forward (x [T, H] -> out [T, H]):
  1. gather_quant      x's rows in expert order, quantized as they are gathered: x_perm in 1x128 tiles
                       [M, Hp] (and its transpose in 128x1 tiles [H, Mp] for the weight gradients)
  2. weight_quant      [w_gate; w_up] into one stacked FP8 buffer (+ its transpose), w_down (+ its
                       transpose); or the module's FP8WeightCache
  3. fp8_grouped_mm    gate_up [M, 2Ip] = x_perm [w_gate; w_up]_e^T
  4. swiglu_quant      a_w = w_r * silu(gate) * up, quantized as computed ([M, Ip] and [Ip, Mp])
  5. fp8_grouped_mm    y [M, Hp] = a_w w_down_e^T
  6. sum_rows          out[t] = sum_k y[row(t, k)]
Backward (d out [T, H]):
  1. gather_quant      dY = d out[token], quantized ([M, Hp]: each token once, its FP8 row copied; [H, Mp] as
                       gathered)
  2. fp8_grouped_mm    dA [M, Ip] = dY w_down_e      (w_down^T's FP8 copy from the forward)
  3. fp8_grouped_wgrad dW_down = dY^T a_w
  4. swiglu_backward_quant  [dG | dU] for a's gradient w_r dA, quantized as computed ([M, 2Ip], [2Ip, Mp]); in
                       the same pass d w_r = <dA_r, a_r>
  5. fp8_grouped_mm    dX_perm [M, Hp] = [dG | dU] [w_gate; w_up]_e
  6. fp8_grouped_wgrad dW_gate, dW_up = [dG | dU]^T x_perm
  7. sum_rows          dx[t] = sum_k dX_perm[row(t, k)]
No 16-bit copy of x_perm, a, dY or [dG | dU] ever reaches memory: each is quantized by the kernel that
computes it (coscale.kernels.fused_quant). One expert that owns every row (fp8_swiglu_mlp: the shared experts)
can take the dense block-scaled GEMM (coscale.kernels.fp8_gemm, cuBLAS where it takes the shapes) on the same FP8
operands instead of the grouped kernels (DENSE_GEMMS_FOR_ONE_EXPERT). The unfused composition (permute_tokens,
fp8_grouped_gate_up, swiglu, fp8_grouped_linear, unpermute_combine) computes the same bits on the same
backend (tests/test_fp8_moe.py holds the two to each other). No host synchronisation.
"""

from __future__ import annotations

import torch

from coscale.errors import CoscaleError
from coscale.kernels import quant_ops
from coscale.kernels.backend import autocast_off
from coscale.kernels.fp8_gemm import fp8_gemm
from coscale.kernels.fp8_grouped_gemm import expert_tile_map, fp8_grouped_mm, fp8_grouped_wgrad
from coscale.kernels.fp8_grouped_linear import quantize_weights
from coscale.kernels.fp8_recipe import ceil_to
from coscale.kernels.fp8_weight_cache import FP8WeightCache
from coscale.kernels.fused_quant import (
    gather_quant_op,
    gather_quantized_rows,
    swiglu_backward_quant_op,
    swiglu_quant_op,
)
from coscale.kernels.permute import PermuteInfo, identity_permute_info, row_weights, sum_rows_op

__all__ = ["DENSE_GEMMS_FOR_ONE_EXPERT", "QUANTIZE_TOKENS_ONCE", "fp8_routed_experts", "fp8_swiglu_mlp"]

# The forward's 1x128 layout of the permuted x: each token quantized once and its FP8 row copied to its top-k
# places (fused_quant.gather_quantized_rows: a 1x128 tile of x per token instead of per copy, then a byte
# gather; the same bytes), or each copy quantized by the gather (gather_quant_op). On the H200 (V3's layer, 8192
# tokens, run 38, benchmarks/bench_moe.py, CUDA-graph replay) the first was faster in 4 of 5 runs, by 0.55-1.01 ms
# of about 31 (with either timed first), and slower in one (0.84 ms): on by default.
QUANTIZE_TOKENS_ONCE = True

# One expert that owns every row (fp8_swiglu_mlp's layout: the rows padded to a multiple of 128 with zeros): its
# six GEMMs are dense, and cuBLAS's block-scaled GEMM outran the grouped kernels at one expert of 8,192 rows on an H100
# (BENCHMARKS.md run 56B, TFLOP/s: forward 1,155 against 1,044 (TMA) / 983 (Gluon), dgrad 1,114 against 1,062 /
# 1,026, weight gradient 933 against 684 / 755). The operands are the same FP8 bytes; cuBLAS writes the weight
# gradient in BF16 (widened to an FP32 master's dtype), as FP8Linear's. In the MoE layer (V3's experts + the shared
# expert, 8,192 tokens, an H100, run 58A, benchmarks/bench_moe.py --variants grouped_fp8_shared_grouped
# grouped_fp8_shared_dense) the layer took 32.55 ms graph-replayed this way against 32.87 through the grouped kernels
# (eager 31.96 against 32.56): 1.01-1.02x, on. CPU-tested both ways (tests/test_fp8_moe.py).
DENSE_GEMMS_FOR_ONE_EXPERT = True


def _expert_mm(a, a_scale, w, w_scale, offsets, out_dtype, backend, tile_expert, dense):
    """a [M, K] times each row's expert's w [E, N, K]^T (fp8_grouped_mm); ``dense``: one expert owns every row."""
    if dense:
        return fp8_gemm(a, a_scale, w[0], w_scale[0], out_dtype, backend)
    return fp8_grouped_mm(a, a_scale, w, w_scale, offsets, out_dtype, backend, tile_expert=tile_expert)


def _expert_wgrad(dyt, dyt_scale, xt, xt_scale, offsets, backend, out_dtype, tile_expert, dense):
    """Each expert's dW [E, N, K] = dY^T X from the transposed layouts (fp8_grouped_wgrad); ``dense``: one expert
    owns every row (the padding columns of dyt and xt are zeros)."""
    if dense:
        return fp8_gemm(dyt, dyt_scale, xt, xt_scale, out_dtype, backend).unsqueeze(0)
    return fp8_grouped_wgrad(dyt, dyt_scale, xt, xt_scale, offsets, backend, out_dtype=out_dtype,
                             chunk_expert=tile_expert)


def _wgrad_dtype(w: torch.Tensor) -> torch.dtype:
    return w.dtype if w.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32


class _FP8RoutedExperts(torch.autograd.Function):
    """See the module docstring; inputs after ``ctx``: x, topk_weight (None: every row weighs 1), row_pair,
    pair_row, offsets, tile_expert, deterministic, backend, weight_cache, one_pass, dense, w_gate, w_up, w_down.
    ``dense``: one expert owns every row (fp8_swiglu_mlp's layout): its GEMMs take fp8_gemm
    (DENSE_GEMMS_FOR_ONE_EXPERT)."""

    @staticmethod
    @autocast_off
    def forward(ctx, x, topk_weight, row_pair, pair_row, offsets, tile_expert, deterministic, backend,
                weight_cache, one_pass, dense, w_gate, w_up, w_down):  # fmt: skip
        need_dx = ctx.needs_input_grad[0]
        need_dtw = ctx.needs_input_grad[1]
        need_dgu = ctx.needs_input_grad[11] or ctx.needs_input_grad[12]
        need_da = need_dx or need_dgu or need_dtw  # the gradient reaches a = silu(gate) * up
        h, i = x.shape[1], w_gate.shape[-2]  # [E, I, H], or [I, H] for one expert (fp8_swiglu_mlp)
        topk = pair_row.shape[1]
        if QUANTIZE_TOKENS_ONCE:
            xq, xs = gather_quantized_rows(x, row_pair, topk, False, backend)
            _, _, xt, xts, _ = gather_quant_op(x, row_pair, topk, None, None, False, need_dgu, False, False, False,
                                               backend)  # fmt: skip
        else:
            xq, xs, xt, xts, _ = gather_quant_op(x, row_pair, topk, None, None, True, need_dgu, False, one_pass,
                                                 False, backend)  # fmt: skip
        wgu, sgu, wgu_t, sgu_t = quantize_weights((w_gate, w_up), need_dx, backend, weight_cache)
        gate_up = _expert_mm(xq, xs, wgu, sgu, offsets, x.dtype, backend, tile_expert, dense)
        row_weight = None if topk_weight is None else row_weights(topk_weight, row_pair)
        aq, as_, at, ats = swiglu_quant_op(gate_up, True, ctx.needs_input_grad[13], False, one_pass, False, backend,
                                           row_weight)  # fmt: skip
        wd, sd, wd_t, sd_t = quantize_weights((w_down,), need_da, backend, weight_cache)
        y = _expert_mm(aq, as_, wd, sd, offsets, x.dtype, backend, tile_expert, dense)
        y = y[:, :h] if y.shape[1] != h else y
        out = sum_rows_op(y, pair_row, row_pair, None, x.dtype, deterministic, backend)
        ctx.save_for_backward(xt, xts, gate_up if need_da else None, at, ats, row_weight, wgu_t, sgu_t, wd_t, sd_t,
                              row_pair, pair_row, offsets, tile_expert)  # fmt: skip
        ctx.config = (deterministic, backend, one_pass, h, i, [_wgrad_dtype(w) for w in (w_gate, w_up, w_down)],
                      [w.shape for w in (w_gate, w_up, w_down)], dense)
        return out

    @staticmethod
    @autocast_off
    def backward(ctx, dout):
        (xt, xts, gate_up, at, ats, row_weight, wgu_t, sgu_t, wd_t, sd_t, row_pair, pair_row, offsets,
         tile_expert) = ctx.saved_tensors  # fmt: skip
        deterministic, backend, one_pass, h, i, w_dtypes, w_shapes, dense = ctx.config
        need_dx, need_dtw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_dgate, need_dup, need_ddown = ctx.needs_input_grad[11:]
        need_dgu = need_dgate or need_dup
        need_da = need_dx or need_dgu or need_dtw
        ip = ceil_to(i)
        dout = dout.contiguous()
        topk = pair_row.shape[1]
        # dY = d out[token] (unweighted: the router weight was applied to a): the 1x128 layout for dA, the
        # transposed one for dW_down, as the forward lays out x
        if QUANTIZE_TOKENS_ONCE and need_da:
            dyq, dys = gather_quantized_rows(dout, row_pair, topk, False, backend)
            _, _, dyt, dyts, _ = gather_quant_op(dout, row_pair, topk, None, None, False, need_ddown, False, False,
                                                 False, backend)  # fmt: skip
        else:
            dyq, dys, dyt, dyts, _ = gather_quant_op(dout, row_pair, topk, None, None, need_da, need_ddown, False,
                                                     one_pass, False, backend)  # fmt: skip
        dx = dtw = dw_gate = dw_up = dw_down = None
        if need_ddown:
            dw_down = _expert_wgrad(dyt, dyts, at, ats, offsets, backend, w_dtypes[2], tile_expert, dense)
            dw_down = dw_down[:, :, :i] if ip != i else dw_down
        if need_da:
            da = _expert_mm(dyq, dys, wd_t, sd_t, offsets, dout.dtype, backend, tile_expert, dense)
            dgq, dgs, dgt, dgts, dots = swiglu_backward_quant_op(gate_up, da, need_dx, need_dgu, False, one_pass,
                                                                 False, backend, row_weight, need_dtw)  # fmt: skip
            if need_dtw:  # each pair's row (pair_row holds no padding)
                dtw = dots[pair_row.reshape(-1)]
            if need_dgate:
                dw_gate = _expert_wgrad(dgt[:i], dgts[:i], xt, xts, offsets, backend, w_dtypes[0], tile_expert, dense)
            if need_dup:
                dw_up = _expert_wgrad(dgt[ip : ip + i], dgts[ip : ip + i], xt, xts, offsets, backend, w_dtypes[1],
                                      tile_expert, dense)  # fmt: skip
            if need_dx:
                dx_perm = _expert_mm(dgq, dgs, wgu_t, sgu_t, offsets, dout.dtype, backend, tile_expert, dense)
                dx_perm = dx_perm[:, :h] if dx_perm.shape[1] != h else dx_perm
                dx = sum_rows_op(dx_perm, pair_row, row_pair, None, dout.dtype, deterministic, backend)
        dtw = dtw.view(pair_row.shape) if need_dtw else None
        # [1, N, K] from the grouped weight gradient for a 2-D weight (a copy only when I % 128 != 0 cut dW_down)
        dw_gate, dw_up, dw_down = (None if g is None else g.reshape(shape)
                                   for g, shape in zip((dw_gate, dw_up, dw_down), w_shapes))
        return dx, dtw, None, None, None, None, None, None, None, None, None, dw_gate, dw_up, dw_down


def fp8_routed_experts(
    x: torch.Tensor,
    topk_weight: torch.Tensor,
    info: PermuteInfo,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    backend: str = "auto",
    deterministic: bool = False,
    weight_cache: FP8WeightCache | None = None,
    one_pass: bool | None = None,
) -> torch.Tensor:
    """sum_k topk_weight[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with every GEMM in FP8 (module
    docstring). x [T, H] bf16/fp32; topk_weight [T, K] float32; ``info`` from build_permute_info with
    align=128; w_gate, w_up [E, I, H], w_down [E, H, I] master weights ([I, H] and [H, I] for one expert).
    Returns [T, H] in x's dtype; differentiable in x, topk_weight and the weights. ``one_pass``: both
    layouts of each fused quantization from one launch (default ``coscale.kernels.quant_ops.DUAL_ONE_PASS``)."""
    return _apply(x, topk_weight, info, w_gate, w_up, w_down, backend, deterministic, weight_cache, one_pass, False)


def _apply(x, topk_weight, info, w_gate, w_up, w_down, backend, deterministic, weight_cache, one_pass, dense):
    """``topk_weight`` None: every row weighs 1 (nothing multiplies a)."""
    offsets = info.group_end_offsets.to(device=x.device, dtype=torch.int32)
    tile_expert = expert_tile_map(offsets, info.num_rows)
    return _FP8RoutedExperts.apply(
        x, None if topk_weight is None else topk_weight.float(), info.row_pair, info.pair_row, offsets, tile_expert,
        deterministic, backend, weight_cache, quant_ops.DUAL_ONE_PASS if one_pass is None else one_pass, dense,
        w_gate, w_up, w_down,
    )  # fmt: skip


def fp8_swiglu_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    backend: str = "auto",
    weight_cache: FP8WeightCache | None = None,
    one_pass: bool | None = None,
) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with every GEMM in FP8: a dense SwiGLU MLP (the shared experts) run as
    one routed expert that every token picks, unweighted, so that it gets the routed experts' kernels,
    each quantization fused into its producer (the module docstring), where three FP8Linears would
    quantize x, a and each gradient in passes of their own. The layout needs no routing
    (permute.identity_permute_info); its gather and sum are a copy of x's FP8 rows and of y's.

    x [T, H] bf16/fp32; w_gate, w_up [I, H], w_down [H, I] master weights (nn.Linear's layout). Returns
    [T, H] in x's dtype, differentiable in x and the weights; ``weight_cache`` keys on the weights as
    given (their FP8 copies kept as in fp8_routed_experts)."""
    if x.dim() != 2 or any(w.dim() != 2 for w in (w_gate, w_up, w_down)):
        raise CoscaleError(f"fp8_swiglu_mlp takes x [T, H] and 2-D weights; got x {tuple(x.shape)}, w_gate "
                           f"{tuple(w_gate.shape)}, w_up {tuple(w_up.shape)}, w_down {tuple(w_down.shape)}")
    i, h = w_gate.shape
    if x.shape[1] != h or w_up.shape != w_gate.shape or w_down.shape != (h, i):
        raise CoscaleError(f"fp8_swiglu_mlp: x [T, {x.shape[1]}] needs w_gate and w_up [I, {x.shape[1]}] and "
                           f"w_down [{x.shape[1]}, I]; got {tuple(w_gate.shape)}, {tuple(w_up.shape)}, "
                           f"{tuple(w_down.shape)}")
    if x.shape[0] == 0:
        return x * 0
    # the one group's rows only (a multiple of 128, which cuBLAS's block-scaled GEMM needs), not the worst case
    info = identity_permute_info(x.shape[0], x.device, align=128, tight=True)
    return _apply(x, None, info, w_gate, w_up, w_down, backend, True, weight_cache, one_pass,
                  DENSE_GEMMS_FOR_ONE_EXPERT)
