"""Fine-grained FP8 (E4M3) quantization: 1x128 activation tiles, 128x128 weight blocks.

Shape legend: M rows (tokens), K columns (the contraction dimension of the GEMM that consumes the
tensor), Mp / Kp = M / K rounded up to a multiple of 128 (zero padding).

Recipe (DeepSeek-V3 report section 3.3; the published ``act_quant``/``weight_quant`` kernels):
  amax  = max |x| over the tile, clamped below at ``AMAX_FLOOR``
  scale = amax / 448            (448 = torch.finfo(float8_e4m3fn).max)
  scale = 2 ** ceil(log2 scale) when ``round_scale`` (UE8M0, a power of two; computed on the bits)
  y     = saturate(x / scale)   cast to float8_e4m3fn (round to nearest even)
``scale`` is the *dequantization multiplier*: x ~= y * scale.

Layouts (FP8 tensors row-major and contiguous; 1x128 scale tensors stored *outer-dim-major*, i.e.
column-major: element (r, j) at r + j * rows. That is the layout cuBLAS' block-scaled GEMM reads
(torch._scaled_mm), so no copy is needed before the GEMM; 128x128 scales are row-major):
- ``act_quant_1x128(x [M, K])`` -> y [M, Kp] e4m3, scale [M, Kp/128] fp32: one scale per row and per
  128 consecutive columns. Columns K..Kp-1 are zeros (a zero column adds nothing to a dot product).
- ``act_quant_128x1(x [M, K])`` -> yt [K, Mp] e4m3, scale_t [K, Mp/128] fp32: the *transpose* of x,
  quantized in 1x128 tiles along M (tokens). This is the layout the weight gradient dW = dY^T X needs,
  where the tokens are the contraction dimension. Token columns M..Mp-1 are zeros.
- ``act_quant_1x128_dual(x)`` -> both of the above (two launches of the Triton kernel with tiles
  shaped for each layout; see ``COLS_BLOCK_K`` for why not one).
- ``weight_quant_128x128(w [N, K])`` -> y [Np, Kp] e4m3, scale [Np/128, Kp/128] fp32, one scale per
  128x128 block; padding rows/columns are zeros. ``weight_quant_128x128_dual(w)`` also returns W^T's FP8
  bytes [Kp, Np] and scales (the same numbers, transposed; a byte transpose of W's FP8 copy), for the
  dgrad GEMM.

Special values: a tile containing NaN gets amax = NaN, so scale = NaN and every element of the tile
quantizes to NaN. A tile containing +-inf gets scale = inf; the inf element becomes inf/inf = NaN and the
finite ones 0, and dequantization (0 * inf) makes the whole tile NaN. Either way non-finite inputs stay
non-finite through any GEMM that consumes the tile; they never turn into finite numbers.

AMAX_FLOOR = 1e-12 (DeepGEMM's helpers use 1e-4). A floor is needed so an all-zero tile gets a finite,
non-zero scale and exact zeros; we keep it tiny because gradient tiles routinely have amax far below
1e-4 and a 1e-4 floor would push them into E4M3's subnormals (or to zero). For amax >= 1e-4 both
choices give identical bits. 1e-12 / 448 is a normal FP32 number, so x / scale stays exact in range.

Backends: "torch" (the references ``*_ref``, the specification), "triton" (the kernel in
``coscale.kernels._quant_triton``; on CPU it runs under TRITON_INTERPRET=1) and "auto" (triton for CUDA
tensors when Triton imports, else torch), as coscale.kernels.backend.select_backend decides for every
kernel. That module is imported on the first launch, so importing this
one never needs Triton and the interpreter setting is read when the kernel is first launched.

Interpreter note: Triton's CPU interpreter mis-rounds FP32 -> E4M3 casts (lost exponent carry, ties away
from zero). When interpreting, the kernels first round onto the E4M3 grid in FP32 with the magic-number
trick r = (y + c) - c, c = 1.5 * 2^(E + 20) (E = the unbiased exponent of y, at least -6 = E4M3's
smallest normal exponent), so the cast that follows is exact. On a GPU the plain cast (round to nearest
even, saturating) is used.
"""

from __future__ import annotations

import torch

from coscale.errors import CoscaleError
from coscale.kernels.backend import interpreting, select_backend, triton_available

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
BLOCK = 128
AMAX_FLOOR = 1e-12

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


def _ceil_to(n: int, multiple: int = BLOCK) -> int:
    return -(-n // multiple) * multiple


# ----------------------------------------------------------------------------------------------------
# PyTorch references
# ----------------------------------------------------------------------------------------------------


def round_scale_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """2 ** ceil(log2(scale)) for positive FP32 scales, exactly (on the bits); NaN/inf unchanged."""
    bits = scale.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    rounded = (exponent << 23).view(torch.float32)
    return torch.where(torch.isfinite(scale), rounded, scale)


def _scale_from_amax(amax: torch.Tensor, round_scale: bool) -> torch.Tensor:
    amax = torch.where(amax < AMAX_FLOOR, torch.full_like(amax, AMAX_FLOOR), amax)  # keeps NaN
    # Divide by a tensor, not by the Python number: on CUDA, `tensor / python_scalar` is computed as
    # tensor * fl(1 / 448) (ATen's div_true_kernel_cuda reciprocal shortcut), which differs from the
    # IEEE quotient in about half of the tiles and then flips near-tie FP8 roundings (the ~0.5%
    # "mismatches" of bench_quant on the H100). A tensor divisor gives the IEEE quotient on every
    # device, the same as the CPU and as the kernels' tl.math.div_rn.
    scale = amax / torch.full_like(amax, FP8_MAX)
    return round_scale_ue8m0(scale) if round_scale else scale


def _to_fp8(y: torch.Tensor) -> torch.Tensor:
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # clamp propagates NaN; saturates +-inf inputs


def _check_2d(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise CoscaleError(f"{name} must be 2-D [rows, cols], got shape {tuple(x.shape)}")
    if not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise CoscaleError(f"{name} must be fp32/bf16/fp16, got {x.dtype}")


def act_quant_1x128_ref(x: torch.Tensor, round_scale: bool = False):
    """x [M, K] -> (y [M, Kp] e4m3, scale [M, Kp/128] fp32), one scale per 1x128 tile along K."""
    _check_2d(x, "x")
    m, k = x.shape
    kp = _ceil_to(k)
    xf = torch.nn.functional.pad(x.float(), (0, kp - k)).view(m, kp // BLOCK, BLOCK)
    scale = _scale_from_amax(xf.abs().amax(dim=-1), round_scale)  # [M, Kp/128]
    y = _to_fp8(xf / scale.unsqueeze(-1)).view(m, kp)
    return y, outer_major(scale)


def act_quant_128x1_ref(x: torch.Tensor, round_scale: bool = False):
    """x [M, K] -> (yt [K, Mp] e4m3, scale_t [K, Mp/128]): x^T quantized in 1x128 tiles along M."""
    _check_2d(x, "x")
    return act_quant_1x128_ref(x.t(), round_scale)


def weight_quant_128x128_ref(w: torch.Tensor, round_scale: bool = False):
    """w [N, K] -> (y [Np, Kp] e4m3, scale [Np/128, Kp/128] fp32), one scale per 128x128 block."""
    _check_2d(w, "w")
    n, k = w.shape
    np_, kp = _ceil_to(n), _ceil_to(k)
    wf = torch.nn.functional.pad(w.float(), (0, kp - k, 0, np_ - n))
    blocks = wf.view(np_ // BLOCK, BLOCK, kp // BLOCK, BLOCK)
    scale = _scale_from_amax(blocks.abs().amax(dim=(1, 3)), round_scale)  # [Np/128, Kp/128]
    y = _to_fp8(blocks / scale[:, None, :, None]).view(np_, kp)
    return y, scale


def dequant_1x128(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of the 1x128 layout: y [R, C] e4m3, scale [R, C/128] -> fp32 [R, C]."""
    r, c = y.shape
    return (y.float().view(r, c // BLOCK, BLOCK) * scale.float().unsqueeze(-1)).view(r, c)


def dequant_128x128(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of the 128x128 layout: y [R, C] e4m3, scale [R/128, C/128] -> fp32 [R, C]."""
    r, c = y.shape
    blocks = y.float().view(r // BLOCK, BLOCK, c // BLOCK, BLOCK) * scale.float()[:, None, :, None]
    return blocks.view(r, c)


# ----------------------------------------------------------------------------------------------------
# Triton kernel launch (the kernel is imported lazily; see the module docstring)
# ----------------------------------------------------------------------------------------------------


def _quant_kernel():
    """The Triton kernel (coscale.kernels._quant_triton), imported, and so JIT-decorated, on first use."""
    from coscale.kernels._quant_triton import quant_kernel

    return quant_kernel


def _outer_major_empty(rows: int, cols: int, device) -> torch.Tensor:
    """An fp32 [rows, cols] tensor stored column-major (the scale layout cuBLAS wants for 1x128)."""
    return torch.empty(cols, rows, dtype=torch.float32, device=device).t()


def outer_major(scale: torch.Tensor) -> torch.Tensor:
    """The same values stored outer-dim-major (column-major); free if already so."""
    return scale.t().contiguous().t()


# Launch shapes (one program per tile; measured on the H100 with benchmarks/bench_quant.py).
# Rows (1x128 along K): [32 x 128] tiles, 4 warps, 56 registers (83-89% of copy bandwidth at K >= 7168).
# Transposed (1x128 along M): [128 x COLS_BLOCK_K] tiles. A program must hold 128 tokens, and a
# [128 x 128] tile needed 127-254 registers per thread (one or two programs per SM, 23-37% of copy
# bandwidth: too little memory parallelism), so the transposed layout is written by its own launch with
# narrow tiles, also when both layouts are wanted (x is then read twice, the second time mostly from L2).
# 128x128 weight blocks: whole tiles, WEIGHT_WARPS warps.
COLS_BLOCK_K = 32
COLS_WARPS = 4
WEIGHT_WARPS = 16  # 72% of copy bandwidth at 7168 x 18432 on the H100 (8 warps: 64%)
# W^T (weight_quant_128x128_dual): W's FP8 bytes transposed by transpose_fp8 ([128 x 64] byte tiles).
# A one-pass W/W^T kernel was slower (38% of copy bandwidth) and, for float32 weights, wrong on the H100
# (triton 3.6), which made FP8 training's gradients non-finite (tools/debug_fp8_nan.py).
TRANSPOSE_TILE = (128, 64)


def _launch(x3, y3, s3, yt3, st3, m, k, y_rows, yt_rows, rows, cols, whole, round_scale, block_m, block_k, warps):
    """Launch the kernel on batched 3-D views ([B, rows, cols]; a 2-D call passes B = 1). The grid's
    second axis covers max(K, yt_rows) columns in steps of block_k."""
    kernel = _quant_kernel()
    grid = (_ceil_to(m, block_m) // block_m, -(-max(k, yt_rows) // block_k), x3.shape[0])
    kernel[grid](
        x3, y3, s3, yt3, st3, m, k, y_rows, yt_rows,
        x3.stride(0), x3.stride(1), x3.stride(2),
        y3.stride(0), y3.stride(1), s3.stride(0), s3.stride(1), s3.stride(2),
        yt3.stride(0), yt3.stride(1), st3.stride(0), st3.stride(1), st3.stride(2),
        AMAX_FLOOR, FP8_MAX, BLOCK_M=block_m, BLOCK_K=block_k, ROWS=rows, COLS=cols,
        WHOLE_TILE=whole, ROUND_SCALE=round_scale, GRID_ROUND=interpreting(), num_warps=warps,
    )  # fmt: skip


def _act_quant_triton(
    x: torch.Tensor, rows: bool, cols: bool, round_scale: bool, pad_t: bool = False, one_pass: bool = False
):
    m, k = x.shape
    mp, kp = _ceil_to(m), _ceil_to(k)
    dev = x.device
    kt = kp if pad_t else k
    y = torch.empty(m if rows else 0, kp, dtype=FP8_DTYPE, device=dev)
    s = _outer_major_empty(m if rows else 0, kp // BLOCK, dev)
    yt = torch.empty(kt if cols else 0, mp, dtype=FP8_DTYPE, device=dev)
    st = _outer_major_empty(kt if cols else 0, mp // BLOCK, dev)
    if m > 0 and k > 0:
        x3, y3, s3, yt3, st3 = (t.unsqueeze(0) for t in (x, y, s, yt, st))
        if one_pass and rows and cols:
            _launch(x3, y3, s3, yt3, st3, m, k, m, kt, True, True, False, round_scale, BLOCK, BLOCK, 8)
            return y, s, yt, st
        if rows:
            _launch(x3, y3, s3, y3, s3, m, k, m, 0, True, False, False, round_scale, 32, BLOCK, 4)
        if cols:
            _launch(x3, yt3, st3, yt3, st3, m, k, 0, kt, False, True, False, round_scale, BLOCK, COLS_BLOCK_K,
                    COLS_WARPS)  # fmt: skip
    return y, s, yt, st


def _pad_cols_to_block(x: torch.Tensor) -> torch.Tensor:
    k = x.shape[1]
    return x if k % BLOCK == 0 else torch.nn.functional.pad(x, (0, _ceil_to(k) - k))


def act_quant_1x128(x: torch.Tensor, round_scale: bool = False, backend: str = "auto"):
    """x [M, K] -> (y [M, Kp] e4m3, scale [M, Kp/128] fp32); see the module docstring."""
    _check_2d(x, "x")
    if select_backend(backend, x, op="act_quant_1x128") == "torch":
        return act_quant_1x128_ref(x, round_scale)
    y, s, _, _ = _act_quant_triton(x, True, False, round_scale)
    return y, s


def act_quant_128x1(x: torch.Tensor, round_scale: bool = False, backend: str = "auto", *, pad_t: bool = False):
    """x [M, K] -> (yt [K, Mp] e4m3, scale_t [K, Mp/128] fp32): x^T in 1x128 tiles along M.

    ``pad_t=True``: yt [Kp, Mp] and scale_t [Kp, Mp/128], the rows K..Kp-1 zeros (what a GEMM that
    needs 128-multiple row counts, e.g. cuBLAS for the weight gradient, wants)."""
    _check_2d(x, "x")
    if select_backend(backend, x, op="act_quant_128x1") == "torch":
        return act_quant_128x1_ref(_pad_cols_to_block(x) if pad_t else x, round_scale)
    _, _, yt, st = _act_quant_triton(x, False, True, round_scale, pad_t)
    return yt, st


def act_quant_1x128_dual(
    x: torch.Tensor, round_scale: bool = False, backend: str = "auto", *, pad_t: bool = False, one_pass: bool = False
):
    """Both layouts: (y [M, Kp], scale [M, Kp/128], yt [K, Mp], scale_t [K, Mp/128]).

    ``pad_t=True`` pads the transposed layout's rows to Kp (zeros), as in ``act_quant_128x1``.
    Default: two launches with tiles shaped for each layout. ``one_pass=True``: one fused launch that
    reads x once ([128 x 128] tiles, both amaxes from the same registers); identical bytes, but on the
    H100 it ran at 24% of copy bandwidth against 48% for two launches (see ``COLS_BLOCK_K``)."""
    _check_2d(x, "x")
    if select_backend(backend, x, op="act_quant_1x128_dual") == "torch":
        xt_src = _pad_cols_to_block(x) if pad_t else x
        return (*act_quant_1x128_ref(x, round_scale), *act_quant_128x1_ref(xt_src, round_scale))
    return _act_quant_triton(x, True, True, round_scale, pad_t, one_pass)


def weight_quant_128x128(w: torch.Tensor, round_scale: bool = False, backend: str = "auto"):
    """w [N, K] -> (y [Np, Kp] e4m3, scale [Np/128, Kp/128] fp32), one scale per 128x128 block."""
    _check_2d(w, "w")
    if select_backend(backend, w, op="weight_quant_128x128") == "torch":
        return weight_quant_128x128_ref(w, round_scale)
    n, k = w.shape
    np_, kp = _ceil_to(n), _ceil_to(k)
    y = torch.empty(np_, kp, dtype=FP8_DTYPE, device=w.device)
    s = torch.empty(np_ // BLOCK, kp // BLOCK, dtype=torch.float32, device=w.device)
    if y.numel():
        y3, s3 = y.unsqueeze(0), s.unsqueeze(0)
        _launch(w.unsqueeze(0), y3, s3, y3, s3, n, k, np_, 0, True, False, True, round_scale, BLOCK, BLOCK,
                WEIGHT_WARPS)  # fmt: skip
    return y, s


def _weight_dual_shapes(w: torch.Tensor):
    *lead, n, k = w.shape
    np_, kp = _ceil_to(n), _ceil_to(k)
    return (
        (*lead, np_, kp),
        (*lead, np_ // BLOCK, kp // BLOCK),
        (*lead, kp, np_),
        (*lead, kp // BLOCK, np_ // BLOCK),
    )


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
    from coscale.kernels._quant_triton import transpose_bytes_kernel

    x3, o3 = (t if t.dim() == 3 else t.unsqueeze(0) for t in (y.view(torch.uint8), out.view(torch.uint8)))
    r, c = x3.shape[-2:]
    br, bc = TRANSPOSE_TILE
    grid = (-(-r // br), -(-c // bc), x3.shape[0])
    transpose_bytes_kernel[grid](
        x3, o3, r, c, x3.stride(0), x3.stride(1), o3.stride(0), o3.stride(1), BLOCK_R=br, BLOCK_C=bc, num_warps=4
    )
    return out


def weight_quant_128x128_dual(w: torch.Tensor, round_scale: bool = False, backend: str = "auto", out=None):
    """W and W^T: w [N, K] or [E, N, K] -> (y [.., Np, Kp], s [.., Np/128, Kp/128],
    yt [.., Kp, Np], st [.., Kp/128, Np/128]).

    A 128x128 block of W^T is a block of W transposed, with the same scale, so yt holds W's FP8 bytes
    transposed (transpose_fp8, one 1-byte pass) and st = s^T: the dgrad GEMM dX = dY W gets its
    K-major operand. ``out``: four tensors (any strides
    with contiguous last dimension, e.g. slices of a concatenated [w_gate; w_up] buffer) to write into.
    """
    if w.dim() not in (2, 3):
        raise CoscaleError(f"w must be [N, K] or [E, N, K], got shape {tuple(w.shape)}")
    if not w.is_floating_point() or w.dtype == FP8_DTYPE:
        raise CoscaleError(f"w must be fp32/bf16/fp16, got {w.dtype}")
    shapes = _weight_dual_shapes(w)
    if out is None:
        dtypes = (FP8_DTYPE, torch.float32, FP8_DTYPE, torch.float32)
        out = tuple(torch.empty(sh, dtype=dt, device=w.device) for sh, dt in zip(shapes, dtypes))
    transpose = out[2] is not None  # out = (y, s, None, None): W only, into the given views
    given = [t for t in out if t is not None]
    if [tuple(t.shape) for t in given] != [shapes[i] for i, t in enumerate(out) if t is not None] or any(
        t.stride(-1) != 1 for t in (out[0], out[2]) if t is not None
    ):
        raise CoscaleError(f"out must have shapes {shapes} (FP8 tensors with contiguous rows)")
    y, s, yt, st = out
    batched = w.dim() == 3
    if select_backend(backend, w, op="weight_quant_128x128_dual") == "torch":
        w3 = w if batched else w.unsqueeze(0)
        for e in range(w3.shape[0]):
            ry, rs = weight_quant_128x128_ref(w3[e], round_scale)
            (y[e] if batched else y).copy_(ry)
            (s[e] if batched else s).copy_(rs)
            if transpose:
                (yt[e] if batched else yt).copy_(ry.t())
                (st[e] if batched else st).copy_(rs.t())
        return y, s, yt, st
    if y.numel():
        views = [t if batched else t.unsqueeze(0) for t in (w, y, s, y, s)]
        n, k = w.shape[-2:]
        _launch(*views, n, k, shapes[0][-2], 0, True, False, True, round_scale, BLOCK, BLOCK, WEIGHT_WARPS)
        if transpose:  # W^T's 128x128 blocks are W's blocks transposed: same bytes, same scales
            transpose_fp8(y, out=yt, backend=backend)
            st.copy_(s.transpose(-2, -1))
    return y, s, yt, st
