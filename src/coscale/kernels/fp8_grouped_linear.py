"""FP8 linear layers of the routed experts: the autograd wrappers over the grouped FP8 GEMMs.

Shape legend: M routed token rows sorted by expert, E experts, K input features, N output features,
``group_end_offsets`` [E] int32/int64: rows [off[e-1], off[e]) use expert e.

- ``fp8_grouped_linear(x [M, K], w [E, N, K], group_end_offsets) -> [M, N]``: forward, dgrad and wgrad
  all in FP8 (the recipe of coscale.fp8; master weights fp32 or bf16, weight gradient accumulated in
  FP32 and written in w's dtype). Segments that are not multiples of 128 are padded here with zero
  rows (one host sync to check and size the padded buffer; ``aligned=True``, what the MoE layer
  passes, skips both); N and K that are not multiples of 128 are zero-padded by the quantization
  kernels, which does not change any product.
- ``fp8_grouped_gate_up(x, w_gate, w_up, offsets) -> [M, 2I]``: gate and up sharing one quantization of
  x, one stacked FP8 weight buffer, one forward GEMM and one dgrad GEMM (contraction 2I).

The weights are quantized with quant_ops.weight_quant_op, which also writes W_e^T's FP8 bytes (a
1-byte transpose), so dgrad needs no transposing copy of a 16- or 32-bit tensor. ``weight_cache``: an
FP8WeightCache (coscale.kernels.fp8_weight_cache) owned by the module that holds the weights keeps
these FP8 copies between calls until its owner invalidates it. The GEMMs are
coscale.kernels.fp8_grouped_gemm's; on the aligned path nothing is read back to the host.
"""

from __future__ import annotations

import torch

from coscale.errors import CoscaleError
from coscale.kernels.backend import autocast_off
from coscale.kernels.fp8_grouped_gemm import check_offsets, expert_tile_map, fp8_grouped_mm, fp8_grouped_wgrad
from coscale.kernels.fp8_weight_cache import FP8WeightCache
from coscale.kernels.quant import BLOCK, act_quant_1x128, act_quant_1x128_dual
from coscale.kernels.quant_ops import weight_quant_op

__all__ = ["fp8_grouped_linear", "fp8_grouped_gate_up", "quantize_stacked_weights", "quantize_weights"]


def _ceil128(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def quantize_stacked_weights(ws, need_t: bool, backend: str = "auto"):
    """Quantize expert weights [E, N_i, K] (one or several, e.g. w_gate and w_up) into one stacked
    buffer [E, sum Np_i, Kp] (each part padded to 128 rows) and, when ``need_t``, its transpose
    [E, Kp, sum Np_i] (the stack's FP8 bytes transposed in one pass).
    Returns (wq, w_scale, wq_t, wt_scale); the last two are None without ``need_t``."""
    wq, sq, wt, st = weight_quant_op([w.detach() for w in ws], False, need_t, backend)
    return (wq, sq, wt, st) if need_t else (wq, sq, None, None)


def quantize_weights(ws, need_t: bool, backend: str, weight_cache: FP8WeightCache | None):
    """quantize_stacked_weights(ws, need_t, backend), or the copies ``weight_cache`` keeps of them. A 2-D
    weight [N, K] is one expert's ([1, N, K]; a dense layer through the grouped kernels); the cache keys on
    the weights as given."""
    stacked = tuple(w.unsqueeze(0) if w.dim() == 2 else w for w in ws)
    if weight_cache is None:
        return quantize_stacked_weights(stacked, need_t, backend)
    return weight_cache.get(ws, backend, need_t, lambda: quantize_stacked_weights(stacked, need_t, backend))


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------


class _FP8GroupedFunction(torch.autograd.Function):
    """out [M, sum Np_i] = x [M, K] @ [w_0; w_1; ...]_e^T for 128-aligned segments, all in FP8.

    Several weights (w_gate and w_up) share one quantization of x, one GEMM (their FP8 copies are
    stacked by the quantization pass itself, so the stacking costs nothing) and one dgrad GEMM
    dX = [dG | dU] [W_gate; W_up]. Full passes per direction:
      forward   x -> xq (+ xt when any weight needs a gradient), each weight -> wq (+ wq_t when x
                needs one), one grouped GEMM
      backward  dY -> dyq (+ dyt), one dgrad grouped GEMM against the saved wq_t (no transposing
                copy), one wgrad grouped GEMM per weight written in the weight's dtype
    No host synchronisation: the tile -> expert map comes from the caller.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, x, offsets, tile_expert, backend, weight_cache, *ws):
        need_dx = ctx.needs_input_grad[0]
        need_dw = any(ctx.needs_input_grad[5:])
        if need_dw:
            xq, xs, xt, xts = act_quant_1x128_dual(x, backend=backend)
        else:
            (xq, xs), xt, xts = act_quant_1x128(x, backend=backend), None, None
        wq, sq, wt, st = quantize_weights(ws, need_dx, backend, weight_cache)
        out = fp8_grouped_mm(xq, xs, wq, sq, offsets, x.dtype, backend, tile_expert=tile_expert)
        ctx.save_for_backward(xt, xts, wt, st, offsets, tile_expert)
        ctx.backend = backend
        ctx.x_shape = x.shape
        ctx.w_meta = [(w.shape[1], w.dtype) for w in ws]
        return out

    @staticmethod
    @autocast_off
    def backward(ctx, dy):
        xt, xts, wt, st, offsets, tile_expert = ctx.saved_tensors
        m, k = ctx.x_shape
        need_dx = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[5:]
        dy = dy.contiguous()
        if any(need_dw):
            dyq, dys, dyt, dyts = act_quant_1x128_dual(dy, backend=ctx.backend)
        else:
            dyq, dys = act_quant_1x128(dy, backend=ctx.backend)
        dx = None
        if need_dx:  # one GEMM over all stacked weights: contraction sum Np_i
            dx = fp8_grouped_mm(dyq, dys, wt, st, offsets, dy.dtype, ctx.backend, tile_expert=tile_expert)
            if dx.shape[1] != k:
                dx = dx[:, :k]
        dws = []
        row = 0
        for (n, w_dtype), need in zip(ctx.w_meta, need_dw):
            np_ = _ceil128(n)
            if need:  # rows of dY^T belonging to this weight (a view, no copy)
                dt = w_dtype if w_dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
                dw = fp8_grouped_wgrad(
                    dyt[row : row + n], dyts[row : row + n], xt[:k], xts[:k], offsets, ctx.backend, out_dtype=dt,
                    chunk_expert=tile_expert,
                )
                dws.append(dw.to(w_dtype))
            else:
                dws.append(None)
            row += np_
        return (dx, None, None, None, None, *dws)


def _check_linear_args(x, w, group_end_offsets):
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[2]:
        raise CoscaleError(f"expected x [M, K] and w [E, N, K]; got {tuple(x.shape)}, {tuple(w.shape)}")
    check_offsets(group_end_offsets, w.shape[0])


def _aligned_call(x, ws, offsets, backend, weight_cache=None):
    """x [M, K] with 128-aligned segments (no check, no host sync) -> [M, sum Np_i]."""
    offsets = offsets.to(device=x.device, dtype=torch.int32)
    tile_expert = expert_tile_map(offsets, x.shape[0])
    return _FP8GroupedFunction.apply(x, offsets, tile_expert, backend, weight_cache, *ws)


def fp8_grouped_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    group_end_offsets: torch.Tensor,
    backend: str = "auto",
    *,
    aligned: bool = False,
    weight_cache: FP8WeightCache | None = None,
) -> torch.Tensor:
    """y [M, N] = x_i @ w[e(i)]^T with forward, dgrad and wgrad in FP8 (see the module docstring).

    x [M, K] bf16/fp32 rows sorted by expert; w [E, N, K] master weights (fp32/bf16);
    group_end_offsets [E] int32/int64 (rows [off[e-1], off[e]) use expert e). Returns x's dtype.
    ``aligned=True`` promises that every segment end is a multiple of 128 (what permute_tokens gives
    with align=128): no check, no padding, no host sync. Otherwise one host sync checks the offsets
    and unaligned segments are padded with zero rows. ``weight_cache``: the FP8WeightCache of w's owner,
    which keeps w's FP8 copies (W, and W^T once a gradient of x was needed) until the owner
    invalidates it (coscale.kernels.fp8_weight_cache: the rule and the memory cost).
    """
    _check_linear_args(x, w, group_end_offsets)
    m = x.shape[0]
    n = w.shape[1]
    if aligned:
        out = _aligned_call(x, (w,), group_end_offsets, backend, weight_cache)
        return out[:, :n] if out.shape[1] != n else out
    offsets = group_end_offsets.to(device=x.device, dtype=torch.int64)
    starts = torch.cat([offsets.new_zeros(1), offsets[:-1]])
    counts = offsets - starts
    padded_counts = (counts + BLOCK - 1) // BLOCK * BLOCK
    padded_ends = torch.cumsum(padded_counts, 0)
    if offsets.numel():  # one host sync for all three numbers
        end, total, unaligned = torch.stack(
            [offsets[-1], padded_ends[-1], (counts != padded_counts).any().to(torch.int64)]
        ).tolist()
    else:
        end, total, unaligned = 0, 0, 0
    if not unaligned and end == m:
        out = _aligned_call(x, (w,), offsets, backend, weight_cache)
        return out[:, :n] if out.shape[1] != n else out
    # Pad each expert's segment to a multiple of 128 rows: scatter rows into a zeroed buffer.
    padded_starts = padded_ends - padded_counts
    rows = torch.arange(end, device=x.device)
    expert_of_row = torch.searchsorted(offsets, rows, right=True)
    dest = rows - starts[expert_of_row] + padded_starts[expert_of_row]
    x_buf = x.new_zeros(total, x.shape[1]).index_copy(0, dest, x[:end])
    out_buf = _aligned_call(x_buf, (w,), padded_ends, backend, weight_cache)
    out = out_buf.index_select(0, dest)[:, :n]
    if end < m:  # rows after the last expert belong to none: zeros
        out = torch.cat([out, out.new_zeros(m - end, n)])
    return out


def fp8_grouped_gate_up(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    group_end_offsets: torch.Tensor,
    backend: str = "auto",
    *,
    weight_cache: FP8WeightCache | None = None,
) -> torch.Tensor:
    """gate_up [M, 2I] = [x_i w_gate[e]^T | x_i w_up[e]^T], everything in FP8, for 128-aligned
    segments (the caller's contract, as permute_tokens gives with align=128; not checked, no host sync).

    x is quantized once for both (and its transposed layout once for both weight gradients); w_gate
    and w_up are quantized into one stacked [E, 2I, K] FP8 buffer and its transpose,
    so the forward is one grouped GEMM and the dgrad is one grouped GEMM with contraction 2I.
    Feed the result to kernels.swiglu.swiglu (gate first, then up). ``weight_cache``: as for
    fp8_grouped_linear (one entry for the stacked pair)."""
    _check_linear_args(x, w_gate, group_end_offsets)
    if w_up.shape != w_gate.shape:
        raise CoscaleError(f"w_gate and w_up must have one shape, got {tuple(w_gate.shape)}, {tuple(w_up.shape)}")
    i = w_gate.shape[1]
    ip = _ceil128(i)
    out = _aligned_call(x, (w_gate, w_up), group_end_offsets, backend, weight_cache)  # [M, 2 Ip]
    if ip != i:
        out = torch.cat([out[:, :i], out[:, ip : ip + i]], dim=1)
    return out
