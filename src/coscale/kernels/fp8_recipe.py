"""DeepSeek-V3's fine-grained FP8 recipe: the constants and the PyTorch references (the specification).

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
- 1x128 (``act_quant_1x128_ref(x [M, K])``) -> y [M, Kp] e4m3, scale [M, Kp/128] fp32: one scale per
  row and per 128 consecutive columns. Columns K..Kp-1 are zeros (a zero column adds nothing to a dot
  product).
- 128x1 (``act_quant_128x1_ref(x [M, K])``) -> yt [K, Mp] e4m3, scale_t [K, Mp/128] fp32: the
  *transpose* of x, quantized in 1x128 tiles along M (tokens): the layout the weight gradient
  dW = dY^T X needs, where the tokens are the contraction dimension. Token columns M..Mp-1 are zeros.
- 128x128 (``weight_quant_128x128_ref(w [N, K])``) -> y [Np, Kp] e4m3, scale [Np/128, Kp/128] fp32, one
  scale per 128x128 block; padding rows/columns are zeros.

Special values: a tile containing NaN gets amax = NaN, so scale = NaN and every element of the tile
quantizes to NaN. A tile containing +-inf gets scale = inf; the inf element becomes inf/inf = NaN and the
finite ones 0, and dequantization (0 * inf) makes the whole tile NaN. Either way non-finite inputs stay
non-finite through any GEMM that consumes the tile; they never turn into finite numbers.

AMAX_FLOOR = 1e-12 (DeepGEMM's helpers use 1e-4). A floor is needed so an all-zero tile gets a finite,
non-zero scale and exact zeros; we keep it tiny because gradient tiles routinely have amax far below
1e-4 and a 1e-4 floor would push them into E4M3's subnormals (or to zero). For amax >= 1e-4 both
choices give identical bits. 1e-12 / 448 is a normal FP32 number, so x / scale stays exact in range.

The kernels (coscale.kernels.quant_ops, coscale.kernels.fused_quant) produce these bits exactly.
"""

from __future__ import annotations

import torch

from coscale.errors import CoscaleError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
BLOCK = 128
AMAX_FLOOR = 1e-12

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "BLOCK",
    "AMAX_FLOOR",
    "ceil_to",
    "check_2d",
    "act_quant_1x128_ref",
    "act_quant_128x1_ref",
    "weight_quant_128x128_ref",
    "dequant_1x128",
    "dequant_128x128",
    "round_scale_ue8m0",
    "outer_major",
    "outer_major_empty",
]


def ceil_to(n: int, multiple: int = BLOCK) -> int:
    """n rounded up to a multiple of ``multiple`` (128: the padded size Kp / Mp / Np)."""
    return -(-n // multiple) * multiple


def check_2d(x: torch.Tensor, name: str) -> None:
    """x must be a 2-D floating-point tensor that is not already FP8 (a CoscaleError otherwise)."""
    if x.dim() != 2:
        raise CoscaleError(f"{name} must be 2-D [rows, cols], got shape {tuple(x.shape)}")
    if not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise CoscaleError(f"{name} must be fp32/bf16/fp16, got {x.dtype}")


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


def act_quant_1x128_ref(x: torch.Tensor, round_scale: bool = False):
    """x [M, K] -> (y [M, Kp] e4m3, scale [M, Kp/128] fp32), one scale per 1x128 tile along K."""
    check_2d(x, "x")
    m, k = x.shape
    kp = ceil_to(k)
    xf = torch.nn.functional.pad(x.float(), (0, kp - k)).view(m, kp // BLOCK, BLOCK)
    scale = _scale_from_amax(xf.abs().amax(dim=-1), round_scale)  # [M, Kp/128]
    y = _to_fp8(xf / scale.unsqueeze(-1)).view(m, kp)
    return y, outer_major(scale)


def act_quant_128x1_ref(x: torch.Tensor, round_scale: bool = False):
    """x [M, K] -> (yt [K, Mp] e4m3, scale_t [K, Mp/128]): x^T quantized in 1x128 tiles along M."""
    check_2d(x, "x")
    return act_quant_1x128_ref(x.t(), round_scale)


def weight_quant_128x128_ref(w: torch.Tensor, round_scale: bool = False):
    """w [N, K] -> (y [Np, Kp] e4m3, scale [Np/128, Kp/128] fp32), one scale per 128x128 block."""
    check_2d(w, "w")
    n, k = w.shape
    np_, kp = ceil_to(n), ceil_to(k)
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


def outer_major_empty(rows: int, cols: int, device) -> torch.Tensor:
    """An fp32 [rows, cols] tensor stored column-major (the scale layout cuBLAS wants for 1x128). Not a
    view of a transposed tensor: a kernel writing it under torch.compile writes a tensor, not a view
    (functionalization would otherwise copy its base)."""
    return torch.empty_strided((rows, cols), (1, max(rows, 1)), dtype=torch.float32, device=device)


def outer_major(scale: torch.Tensor) -> torch.Tensor:
    """The same values stored outer-dim-major (column-major); free if already so."""
    return scale.t().contiguous().t()
