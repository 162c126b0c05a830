"""Grouped block-scaled FP8 GEMMs for the routed experts: the operations and their references.

Shape legend: M routed token rows sorted by expert, E experts, K input features, N output features,
``group_end_offsets`` [E] int32: rows [off[e-1], off[e]) belong to expert e (off[-1] = 0). Rows at or
after off[E-1] belong to no expert and produce zeros.

- ``fp8_grouped_mm(a [M, K] e4m3, a_scale [M, K/128], b [E, N, K] e4m3, b_scale [E, N/128, K/128],
  group_end_offsets) -> [M, N]``: row i uses expert e(i)'s weights (forward and dgrad).
  Contract: every segment boundary is a multiple of 128, so a 128-row tile never straddles two
  experts. The caller pads segments (``fp8_grouped_linear`` does it for you).
- ``fp8_grouped_wgrad(dyt [N, Mp], dyt_scale [N, Mp/128], xt [K, Mp], xt_scale [K, Mp/128],
  group_end_offsets) -> [E, N, K] fp32``: dW_e = dY_e^T X_e, both operands quantized in 1x128 tiles
  along the tokens (the transposed layout of kernels.quant.act_quant_128x1); the tokens of one expert
  are the contraction dimension, looped over from off[e-1] to off[e] in steps of 128 (a "K-grouped" GEMM).
- ``quantize_expert_weights(w [E, N, K])`` -> the 128x128-block FP8 weights these GEMMs take.

The autograd wrappers (``fp8_grouped_linear``, ``fp8_grouped_gate_up``) are in
coscale.kernels.fp8_grouped_linear; the Triton kernels, their launchers and tile configurations in
coscale.kernels.fp8_grouped_kernels. The grouped GEMM finds each row tile's expert in a tile -> expert
map built on the device once per call (``expert_tile_map``), never by scanning E ends. The ``*_ref``
functions (per-expert loops over coscale.kernels.fp8_gemm.fp8_gemm_ref, dequantized FP32) are the
specification and CPU fallback. No host synchronisation on the Triton path (the references read the
offsets back to loop over experts).
"""

from __future__ import annotations

import torch

from coscale.errors import CoscaleError
from coscale.kernels.autotune import power_of_two_bucket
from coscale.kernels.backend import check_backend, select_backend
from coscale.kernels.fp8_gemm import fp8_gemm_ref
from coscale.kernels.fp8_grouped_kernels import (
    MM_PICKER,
    WGRAD_PICKER,
    launch_grouped_mm,
    launch_grouped_wgrad,
    segment_of_each_block,
)
from coscale.kernels.fp8_recipe import BLOCK, FP8_DTYPE
from coscale.kernels.library import operator
from coscale.kernels.quant import weight_quant_128x128

__all__ = [
    "fp8_grouped_mm",
    "fp8_grouped_mm_op",
    "fp8_grouped_wgrad_op",
    "fp8_grouped_mm_ref",
    "fp8_grouped_wgrad",
    "fp8_grouped_wgrad_ref",
    "expert_tile_map",
    "quantize_expert_weights",
    "check_offsets",
]


def _starts_ends(group_end_offsets: torch.Tensor):
    ends = [int(v) for v in group_end_offsets.tolist()]
    return [0, *ends[:-1]], ends


def check_offsets(group_end_offsets: torch.Tensor, experts: int) -> None:
    """group_end_offsets must be a 1-D int32/int64 tensor with one end offset per expert."""
    if group_end_offsets.dim() != 1 or group_end_offsets.numel() != experts:
        raise CoscaleError(
            f"group_end_offsets must have shape [{experts}] (one end offset per expert), "
            f"got {tuple(group_end_offsets.shape)}"
        )
    if group_end_offsets.dtype not in (torch.int32, torch.int64):
        raise CoscaleError(f"group_end_offsets must be int32 or int64, got {group_end_offsets.dtype}")


# ----------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------


def fp8_grouped_mm_ref(a, a_scale, b, b_scale, group_end_offsets, out_dtype=torch.bfloat16):
    """Per-expert loop of the dequantized FP32 GEMM; rows after the last offset are zeros."""
    check_offsets(group_end_offsets, b.shape[0])
    out = torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    for e, (start, end) in enumerate(zip(*_starts_ends(group_end_offsets))):
        if end > start:
            out[start:end] = fp8_gemm_ref(a[start:end], a_scale[start:end], b[e], b_scale[e], out_dtype)
    return out


def fp8_grouped_wgrad_ref(dyt, dyt_scale, xt, xt_scale, group_end_offsets):
    """dW_e = dY_e^T X_e from the transposed (token-contiguous) layouts, dequantized FP32."""
    experts = group_end_offsets.numel()
    out = torch.zeros(experts, dyt.shape[0], xt.shape[0], dtype=torch.float32, device=dyt.device)
    for e, (start, end) in enumerate(zip(*_starts_ends(group_end_offsets))):
        if end > start:
            if start % BLOCK or end % BLOCK:
                raise CoscaleError(f"expert {e}'s segment [{start}, {end}) is not 128-aligned")
            tiles = slice(start // BLOCK, end // BLOCK)
            out[e] = fp8_gemm_ref(
                dyt[:, start:end], dyt_scale[:, tiles], xt[:, start:end], xt_scale[:, tiles], torch.float32
            )
    return out


# ----------------------------------------------------------------------------------------------------
# Operations
# ----------------------------------------------------------------------------------------------------


def _check_grouped(a, a_scale, b, b_scale):
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise CoscaleError(f"grouped FP8 GEMM operands must be float8_e4m3fn, got {a.dtype}, {b.dtype}")
    if a.dim() != 2 or b.dim() != 3 or a.shape[1] != b.shape[2]:
        raise CoscaleError(f"expected a [M, K] and b [E, N, K]; got {tuple(a.shape)}, {tuple(b.shape)}")
    m, k = a.shape
    e, n, _ = b.shape
    if k % BLOCK or n % BLOCK:
        raise CoscaleError(f"grouped FP8 GEMM needs N and K to be multiples of {BLOCK}; got N={n}, K={k}")
    if tuple(a_scale.shape) != (m, k // BLOCK):
        raise CoscaleError(f"a_scale must be [{m}, {k // BLOCK}] (1x128), got {tuple(a_scale.shape)}")
    if tuple(b_scale.shape) != (e, n // BLOCK, k // BLOCK):
        raise CoscaleError(
            f"b_scale must be [{e}, {n // BLOCK}, {k // BLOCK}] (128x128), got {tuple(b_scale.shape)}"
        )


def expert_tile_map(group_end_offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """[ceil(rows/128)] int32: the expert owning each 128-row tile (E for tiles after the last segment).

    Two small device ops (arange + searchsorted), no host sync; computed once per layer call and
    shared by every grouped GEMM of that call (the forward/dgrad kernel looks a row tile's expert up in
    O(1); the weight-gradient kernel a 128-token chunk's, and where the expert's last chunk is)."""
    return segment_of_each_block(group_end_offsets, rows)


def _fake_grouped_mm(a, a_scale, b, b_scale, group_end_offsets, tile_expert, out_dtype, backend):
    return a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype)


@operator("fp8_grouped_mm", opaque=True, fake=_fake_grouped_mm)
def fp8_grouped_mm_op(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, group_end_offsets: torch.Tensor,
    tile_expert: torch.Tensor, out_dtype: torch.dtype, backend: str,
) -> torch.Tensor:  # fmt: skip
    """``fp8_grouped_mm`` as an opaque operator: its launcher builds TMA descriptors from data_ptr(),
    checks the output's 16-byte alignment for the TMA store and times configurations on first use."""
    if select_backend(backend, a, op="fp8_grouped_mm") == "torch":
        return fp8_grouped_mm_ref(a, a_scale, b, b_scale, group_end_offsets, out_dtype)
    m, k = a.shape
    e, n, _ = b.shape
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if c.numel() == 0 or k == 0:  # nothing to compute, or an empty sum
        return c.zero_()
    if b.stride(2) != 1:
        raise CoscaleError("fp8_grouped_mm needs b's last (K) dimension contiguous")

    def launch(cfg):
        return launch_grouped_mm(a, a_scale, b, b_scale, tile_expert, c, cfg)

    return launch(MM_PICKER.config((power_of_two_bucket(m), n, k, e, out_dtype), launch))


def fp8_grouped_mm(
    a, a_scale, b, b_scale, group_end_offsets, out_dtype=torch.bfloat16, backend: str = "auto", *, tile_expert=None
) -> torch.Tensor:
    """[M, N]: rows of expert e times b[e]^T, block-scaled FP8 with FP32 accumulation (see module doc).

    ``b`` [E, N, K] with K contiguous; it is read as [E*N, K] (a free view of the buffers
    quantize_expert_weights and the autograd wrappers write; another layout, or an operand a tensor
    descriptor cannot read, is copied in every call).
    ``tile_expert``: expert_tile_map(group_end_offsets, M) if the caller already has it."""
    _check_grouped(a, a_scale, b, b_scale)
    check_offsets(group_end_offsets, b.shape[0])
    check_backend(backend, a, op="fp8_grouped_mm")
    if tile_expert is None:
        tile_expert = expert_tile_map(group_end_offsets.to(a.device), a.shape[0])
    return fp8_grouped_mm_op(a, a_scale, b, b_scale, group_end_offsets, tile_expert, out_dtype, backend)


def _fake_wgrad(dyt, dyt_scale, xt, xt_scale, group_end_offsets, chunk_expert, out_dtype, backend):
    return dyt.new_empty(group_end_offsets.shape[0], dyt.shape[0], xt.shape[0], dtype=out_dtype)


@operator("fp8_grouped_wgrad", opaque=True, fake=_fake_wgrad)
def fp8_grouped_wgrad_op(
    dyt: torch.Tensor, dyt_scale: torch.Tensor, xt: torch.Tensor, xt_scale: torch.Tensor,
    group_end_offsets: torch.Tensor, chunk_expert: torch.Tensor | None, out_dtype: torch.dtype, backend: str,
) -> torch.Tensor:  # fmt: skip
    """``fp8_grouped_wgrad`` as an opaque operator (TMA descriptors, timed configurations)."""
    n, mp = dyt.shape
    k = xt.shape[0]
    experts = group_end_offsets.numel()
    if select_backend(backend, dyt, op="fp8_grouped_wgrad") == "torch":
        return fp8_grouped_wgrad_ref(dyt, dyt_scale, xt, xt_scale, group_end_offsets).to(out_dtype)
    out = torch.empty(experts, n, k, dtype=out_dtype, device=dyt.device)
    if out.numel() == 0 or mp == 0:  # no tokens: every expert's gradient is zero
        return out.zero_()
    offsets = group_end_offsets.to(device=dyt.device, dtype=torch.int32)
    chunks = segment_of_each_block(offsets, mp) if chunk_expert is None else chunk_expert

    def launch(cfg):
        return launch_grouped_wgrad(dyt, dyt_scale, xt, xt_scale, offsets, out, cfg, chunks)

    return launch(WGRAD_PICKER.config((power_of_two_bucket(mp), n, k, experts, out_dtype), launch))


def fp8_grouped_wgrad(
    dyt, dyt_scale, xt, xt_scale, group_end_offsets, backend: str = "auto", *, out_dtype=torch.float32,
    chunk_expert=None,
):  # fmt: skip
    """[E, N, K]: dW_e = dY_e^T X_e from token-contiguous 1x128 layouts (see module doc); accumulated
    in FP32 and written in ``out_dtype`` (FP32 by default; the autograd wrappers ask for w's dtype).
    ``chunk_expert``: expert_tile_map(group_end_offsets, Mp) if the caller already has it."""
    mp = dyt.shape[1]
    if xt.shape[1] != mp or mp % BLOCK:
        raise CoscaleError(f"dyt [N, Mp] and xt [K, Mp] need one Mp, a multiple of 128: {dyt.shape}, {xt.shape}")
    check_backend(backend, dyt, op="fp8_grouped_wgrad")
    chunks = -(-max(mp, 1) // BLOCK)  # as expert_tile_map counts them
    if chunk_expert is not None and tuple(chunk_expert.shape) != (chunks,):
        raise CoscaleError(f"chunk_expert must be [{chunks}] (one expert per 128 tokens), "
                           f"got {tuple(chunk_expert.shape)}")
    return fp8_grouped_wgrad_op(dyt, dyt_scale, xt, xt_scale, group_end_offsets, chunk_expert, out_dtype, backend)


def quantize_expert_weights(w: torch.Tensor, backend: str = "auto"):
    """w [E, N, K] (N, K multiples of 128) -> (wq [E, N, K] e4m3, scale [E, N/128, K/128])."""
    e, n, k = w.shape
    wq, ws = weight_quant_128x128(w.reshape(e * n, k), backend=backend)
    return wq.view(e, n, k), ws.view(e, n // BLOCK, k // BLOCK)
