"""FP8 quantization fused into the kernel that produces its input: SwiGLU, SwiGLU's backward, the MoE
permutation and the combine's backward.

Each operator writes what quantizing the producer's output would write, without the producer's
output ever reaching memory in 16 bits: the 1x128 layout (``rows``) and/or the transposed 128x1
layout (``cols``, the weight gradient's operand, "produced where the gradient is produced"), with the
same bits as coscale.kernels.quant applied to the unfused producer's stored output on the same backend
(the kernels round each value to the producer's dtype before quantizing, as the producer stores it):

- ``swiglu_quant(gate_up [M, 2I], weight)``: a = silu(gate) * up, quantized (the down projection's input);
  with ``weight`` [M] each row times its router weight (applied before the down projection).
- ``swiglu_backward_quant(gate_up, da [M, I], weight, dot)``: [dg | du] [M, 2I], quantized (the gate/up
  projection's output gradient), for the gradient weight[r] * da of a (with ``weight``); with ``dot`` also
  <da[r], a[r]> per row (the router weight's gradient).
- ``gather_quant(src [T, H], row_pair [M], ...)``: the permuted rows src[row_pair // K] (zeros on
  padding rows), optionally scaled by the router weight of each pair, quantized; with ``dot`` also
  <dot[r], src[token(r)]> per pair (the router weight's gradient where a combine weights the experts' output;
  coscale.kernels.fp8_moe weights a before the down projection instead and gathers unweighted, without dots).

``gather_quantized_rows(src, row_pair, ...)`` writes the same 1x128 bytes as gather_quant_op's rows the other way
round: each token quantized once, then its FP8 row copied to its top-k places (fp8_moe.QUANTIZE_TOKENS_ONCE).

Kernels: coscale.kernels._quant_triton (``rows_quant_kernel``, ``cols_quant_kernel``,
``dual_quant_kernel`` with a SOURCE per producer), launched by coscale.kernels.quant_ops.launch_producer;
references: the unfused PyTorch producers followed by coscale.kernels.quant_ops.act_quant_reference.
All three are transparent operators (coscale.kernels.library).
"""

from __future__ import annotations

import torch

from coscale.errors import CoscaleError
from coscale.kernels import quant_ops
from coscale.kernels.fp8_recipe import FP8_DTYPE
from coscale.kernels.library import operator, runs_triton
from coscale.kernels.permute import gather_rows_ref
from coscale.kernels.quant_ops import act_quant_op, act_quant_reference, launch_producer, quant_outputs
from coscale.kernels.swiglu import swiglu_backward_torch, swiglu_forward_torch, swiglu_op

__all__ = [
    "gather_quant_op", "gather_quant_rows", "gather_quantized_rows", "swiglu_backward_quant_op", "swiglu_dots",
    "swiglu_quant_op",
]

SWIGLU, SWIGLU_BACKWARD, GATHER = 1, 2, 3  # the SOURCE codes of coscale.kernels._quant_triton


def _launch(outs, x, round_scale, rows, cols, one_pass, *, m, k, **producer):
    if m == 0 or k == 0:
        return
    if rows and cols and one_pass and "dot" not in producer:
        launch_producer("dual", outs, x, round_scale, m=m, k=k, **producer)
        return
    if rows:
        launch_producer("rows", outs, x, round_scale, m=m, k=k, **producer)
    if cols:
        producer.pop("dot", None)
        producer.pop("dot_out", None)
        launch_producer("cols", outs, x, round_scale, m=m, k=k, **producer)


def _halves(gate_up: torch.Tensor) -> int:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise CoscaleError(f"gate_up must be [M, 2I] with contiguous rows, got {tuple(gate_up.shape)}")
    return gate_up.shape[1] // 2


def _weighted(a: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """a [M, I] times each row's weight [M], rounded to a's dtype (as the kernels round it); a without weights."""
    return a if weight is None else (a.float() * weight.float()[:, None]).to(a.dtype)


def _check_row_weight(weight: torch.Tensor | None, m: int) -> None:
    if weight is not None and tuple(weight.shape) != (m,):
        raise CoscaleError(f"weight must be one per row, [{m}], got {tuple(weight.shape)}")


@operator("swiglu_quant")
def swiglu_quant_op(
    gate_up: torch.Tensor, rows: bool, cols: bool, pad_t: bool, one_pass: bool, round_scale: bool, backend: str,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """silu(gate) * up of gate_up [M, 2I] (gate first), times ``weight`` [M] per row where given (a rounded to
    gate_up's dtype, then the product), quantized: (y [M, Ip], s, yt [I or Ip, Mp], st) as
    coscale.kernels.quant_ops.act_quant_op lays them out."""
    i = _halves(gate_up)
    m = gate_up.shape[0]
    _check_row_weight(weight, m)
    if not runs_triton(backend, gate_up, "swiglu_quant"):
        a = _weighted(swiglu_forward_torch(gate_up[:, :i], gate_up[:, i:]), weight)
        return act_quant_reference(a, round_scale, rows, cols, pad_t)
    outs = quant_outputs(m, i, gate_up.device, rows, cols, pad_t)
    w = None if weight is None else weight.float().contiguous()
    _launch(outs, gate_up, round_scale, rows, cols, one_pass, m=m, k=i, source=SWIGLU, up_offset=i, w=w)
    return outs


def swiglu_dots(gate_up: torch.Tensor, da: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """<da[r], a[r]> [M] float32 with a = silu(gate) * up as SwiGLU on ``backend`` stores it (unweighted, as the
    forward makes it before the router weight): the router weight's gradient when it multiplies a. The
    reference of the dots swiglu_backward_quant_op computes in its kernel, and their path where it cannot."""
    return (da.float() * swiglu_op(gate_up, backend).float()).sum(1)


@operator("swiglu_backward_quant")
def swiglu_backward_quant_op(
    gate_up: torch.Tensor, da: torch.Tensor, rows: bool, cols: bool, pad_t: bool, one_pass: bool, round_scale: bool,
    backend: str, weight: torch.Tensor | None = None, dot: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """[dg | du] [M, 2I] of a = silu(gate) * up for the gradient da [M, I] of a (of weight[r] * a[r] with
    ``weight`` [M]: a's gradient is then weight[r] * da rounded to gate_up's dtype), quantized (as act_quant_op),
    and with ``dot`` the router weight's gradient <da[r], a[r]> [M] float32 ([0] without ``dot``)."""
    i = _halves(gate_up)
    m = gate_up.shape[0]
    if tuple(da.shape) != (m, i):
        raise CoscaleError(f"da must be [{m}, {i}], got {tuple(da.shape)}")
    _check_row_weight(weight, m)
    if not runs_triton(backend, gate_up, "swiglu_backward_quant"):
        da_a = da if weight is None else (da.float() * weight.float()[:, None]).to(gate_up.dtype)  # a's gradient
        grad = swiglu_backward_torch(gate_up[:, :i], gate_up[:, i:], da_a)
        dots = swiglu_dots(gate_up, da) if dot else gate_up.new_zeros(0, dtype=torch.float32)
        return (*act_quant_reference(grad, round_scale, rows, cols, pad_t), dots)
    outs = quant_outputs(m, 2 * i, gate_up.device, rows, cols, pad_t)
    da = da.contiguous()
    w = None if weight is None else weight.float().contiguous()
    # the dots from the rows launch of the paired kernel (a gate tile's part each); elsewhere from PyTorch
    in_kernel = dot and m > 0 and i > 0 and i % 128 == 0 and quant_ops.SWIGLU_BACKWARD_PAIRED
    # every (row, gate tile) part is written by one program
    tile_dots = torch.empty(m if in_kernel else 0, i // 128, dtype=torch.float32, device=gate_up.device)
    if in_kernel:
        launch_producer("rows", outs if rows else quant_outputs(m, 2 * i, gate_up.device, True, False, pad_t),
                        gate_up, round_scale, m=m, k=2 * i, source=SWIGLU_BACKWARD, b=da, up_offset=i, w=w,
                        tile_dot_out=tile_dots)  # fmt: skip
        _launch(outs, gate_up, round_scale, False, cols, one_pass, m=m, k=2 * i, source=SWIGLU_BACKWARD, b=da,
                up_offset=i, w=w)  # fmt: skip
        dots = tile_dots.sum(1)
    else:
        _launch(outs, gate_up, round_scale, rows, cols, one_pass, m=m, k=2 * i, source=SWIGLU_BACKWARD, b=da,
                up_offset=i, w=w)  # fmt: skip
        dots = swiglu_dots(gate_up, da, backend) if dot else gate_up.new_zeros(0, dtype=torch.float32)
    return (*outs, dots)


@operator("gather_quant")
def gather_quant_op(
    src: torch.Tensor, row_pair: torch.Tensor, topk: int, weight: torch.Tensor | None, dot: torch.Tensor | None,
    rows: bool, cols: bool, pad_t: bool, one_pass: bool, round_scale: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The permuted rows of src [T, H] (row r = weight[p] * src[p // topk] for p = row_pair[r], zeros
    where p < 0; unweighted without ``weight``) quantized as act_quant_op lays them out, and the
    per-pair dots <dot[r], src[p // topk]> [T*topk] float32 ([0] without ``dot``, which needs ``rows``)."""
    if dot is not None and not rows:
        raise CoscaleError("gather_quant computes the dots in its rows pass: pass rows=True with dot")
    if not runs_triton(backend, src, "gather_quant"):
        permuted, dots = gather_rows_ref(src, row_pair, topk, weight, dot)
        return (*act_quant_reference(permuted, round_scale, rows, cols, pad_t), dots)
    m, k = row_pair.shape[0], src.shape[1]
    outs = quant_outputs(m, k, src.device, rows, cols, pad_t)
    dot_out = torch.zeros(src.shape[0] * topk if dot is not None else 0, dtype=torch.float32, device=src.device)
    producer = dict(source=GATHER, idx=row_pair, topk=topk, w=None if weight is None else weight.reshape(-1).float())
    if dot is not None:
        producer |= dict(dot=dot.contiguous(), dot_out=dot_out)
    _launch(outs, src.contiguous(), round_scale, rows, cols, one_pass, m=m, k=k, **producer)
    return (*outs, dot_out)


def gather_quantized_rows(src: torch.Tensor, row_pair: torch.Tensor, topk: int, round_scale: bool = False,
                          backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The 1x128 layout of the permuted rows src[row_pair[r] // topk] (zeros where row_pair[r] < 0), the bytes
    ``gather_quant_op(src, row_pair, topk, None, None, rows=True, ...)`` writes: (y [M, Hp] e4m3, s [M, Hp/128]
    outer-major). Each token is quantized once and its FP8 row and scales copied to its top-k places (as the FP8
    dispatch sends a token's quantized row), instead of quantizing every copy: a copy's 1x128 tiles are its
    token's, so the bytes are the same. Padding rows copy the quantized zero row (codes 0, the floor's scale)."""
    tokens, h = src.shape
    yq, ys = act_quant_op(src, round_scale, True, False, False, False, backend)[:2]
    zq, zs = act_quant_op(src.new_zeros(1, h), round_scale, True, False, False, False, backend)[:2]
    source = torch.where(row_pair >= 0, torch.div(row_pair, topk, rounding_mode="floor"), tokens).long()
    # whole 32-bit words (Hp is a multiple of 128); the scales gathered along the rows of their outer-major storage.
    # The words are joined, not the e4m3 tensors: CPU autocast promotes torch.cat's inputs to their widest
    # dtype and has no rank for float8 ("Unexpected floating ScalarType"; CUDA autocast leaves cat alone).
    y = torch.cat([yq.view(torch.int32), zq.view(torch.int32)]).index_select(0, source).view(FP8_DTYPE)
    s = torch.cat([ys, zs]).t().index_select(1, source).t()
    return y, s


def gather_quant_rows(src: torch.Tensor, row_src: torch.Tensor, topk: int = 1, backend: str = "auto") -> torch.Tensor:
    """The rows src[row_src[r] // topk] (zeros where row_src[r] < 0) quantized 1x128 (e4m3) and written as
    rows of bytes [M, H + 4 * H/128]: H e4m3 codes, then the H/128 fp32 scales (little-endian), the wire
    layout of coscale.parallel.codec.FP8Codec. One pass: the gather kernel stores codes and scales
    straight into the rows (the dispatch's selection fused with its quantization). H must be a multiple
    of 128 (the scales then start 4-byte aligned)."""
    h = src.shape[1]
    if src.dim() != 2 or h % 128:
        raise CoscaleError(f"gather_quant_rows needs src [T, H] with H a multiple of 128, got {tuple(src.shape)}")
    m, tiles = row_src.shape[0], h // 128
    if not runs_triton(backend, src, "gather_quant"):
        y, s = act_quant_reference(gather_rows_ref(src, row_src, topk)[0], False, True, False, False)[:2]
        return torch.cat([y.view(torch.uint8), s.contiguous().view(torch.uint8).reshape(m, 4 * tiles)], dim=1)
    rows = torch.empty(m, h + 4 * tiles, dtype=torch.uint8, device=src.device)
    outs = (rows[:, :h].view(FP8_DTYPE), rows.view(torch.float32)[:, h // 4:], None, None)
    _launch(outs, src.contiguous(), False, True, False, False, m=m, k=h, source=GATHER, idx=row_src.contiguous(),
            topk=topk)
    return rows
