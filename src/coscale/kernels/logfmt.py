"""LogFMT-nBit: a logarithmic wire format for activations (the paper section 3.2, arXiv 2505.09343).

Shape legend: N rows (tokens), H columns (hidden), T = ceil(H / 128) tiles per row, Hp = 128 * T.

Format. Per row and per 1x128 tile (the last tile of a ragged row is zero-padded inside; padding never
changes a tile's statistics because zeros are left out of them):
  lmax = log(max |x|), lmin = log(min |x| over the non-zero x), natural logs;
  the range is clamped to 2^32 (an E5-like dynamic range): lmin >= lmax - log(2^32), applied exactly as
  min|x| := max(min|x|, max|x| * 2^-32) before the log;
  tile_min = fp32(lmin), tile_step = fp32((lmax - lmin) / (2^(n-1) - 2))   (both computed in float64);
  a code is n bits: bit n-1 the sign, bits 0..n-2 the magnitude code q, Q = 2^(n-1) - 1;
  decode(q) = 0 for q = 0, else exp(tile_min + tile_step * (q - 1)); the value is -decode(q) when the
  sign bit is set. q = 1 is exp(tile_min) (the smallest non-zero magnitude), q = Q is ~max |x|.
The representable magnitudes are g_k = exp(m + s*k), k = 0..Q-1 (m, s the *stored* fp32 numbers read as
float64), so the decoder never needs anything but the two fp32 numbers of the tile: 8 bytes per 128
elements. Codes are stored as uint8 for n <= 8 and int16 (the n-bit pattern, & (2^n - 1) to read) for
8 < n <= 16; ``code_dtype(n)``. Zero is the all-zero code (the sign bit is never set on q = 0).

Rounding happens in the linear domain, not the log domain. With a = g_k <= |x| < b = g_{k+1} (a = 0
below g_0 = exp(m)):
  "nearest":    q is b's code when 2|x| >= a + b (ties up), else a's. Error <= (b - a) / 2.
  "stochastic": b with probability (|x| - a) / (b - a), else a: E[decode] = x (unbiased). Error < b - a.
Rounding the log to the nearest grid point would be biased (it rounds to the geometric mean; the
linear midpoint (a + b) / 2 lies above it) and its error would not average out in sums.
Error bounds (used by the tests): with s = tile_step and |x| >= exp(m), b - a = a (e^s - 1) <= |x| (e^s - 1):
  nearest    |decode - x| <= (e^s - 1) / 2 * |x|      (n = 8, s ~ 0.045 on Gaussian tiles: 2.3 %)
  stochastic |decode - x| <  (e^s - 1) * |x|
and below exp(m) (only elements under max|x| * 2^-32, i.e. those the clamp cuts) |decode - x| <= exp(m)/2
(nearest) or < exp(m) (stochastic): they become 0 or exp(m). Decoding in fp32 adds ~1e-6 relative.

Special tiles:
  - all zeros: codes 0, tile_min = tile_step = 0; decodes to exact zeros.
  - one distinct non-zero magnitude (max == min, step 0): no division by zero; every non-zero element
    gets q = 1 and decodes to exp(tile_min) = |x| up to the fp32 rounding of the log.
  - any NaN or +-inf in a tile: codes 0 and tile_min = tile_step = NaN; decode returns NaN for *every*
    element of that tile (zeros included). Infinities are not kept; a non-finite tile never decodes
    to finite numbers.

Backends (chosen by coscale.kernels.backend.select_backend, as for every kernel): "torch" = the
references ``logfmt_encode_ref`` / ``logfmt_decode_ref`` (float64 math, the specification), "triton" =
the kernels below (CPU tensors under TRITON_INTERPRET=1), "auto" = triton for CUDA tensors when Triton
imports, else torch.

The encode kernel does its logs in float64 (the tile statistics and one log per element): the per-tile
numbers are then the reference's bits and a code differs from the reference only when |x| sits within
~1e-16 relative of a rounding threshold, so "nearest" codes are bitwise equal to the reference in
practice (tested). It uses the equivalent log-domain threshold: 2|x| >= g_k + g_{k+1} iff
log|x| >= m + s*k + c with c = log((1 + e^s) / 2), so q = floor((log|x| - m - c) / s) + 2 clamped to
[1, Q], and q = 0 when 2|x| < exp(m). The cost of float64 log on the GPU is what benchmarks/bench_logfmt.py
measures (the paper found LogFMT 50-100 % slower than FP8 casting for the same reason: log/exp
throughput). Stochastic rounding in the kernel draws Philox numbers (``tl.rand(seed, row * Hp + col)``,
offsets wrap past 2^31 elements) and is checked statistically; the reference uses a torch.Generator.
The decode kernel computes in fp32 (tl.exp) and differs from the float64 reference by ~1e-6 relative.
"""

from __future__ import annotations

import functools
import math

import torch

from coscale.errors import CoscaleError
from coscale.kernels.backend import interpreting, select_backend, triton_available

TILE = 128
RANGE_CLAMP = 2.0**-32  # min |x| >= max |x| * 2^-32, i.e. lmin >= lmax - log(2^32)
ROUNDINGS = ("nearest", "stochastic")

__all__ = [
    "TILE",
    "code_dtype",
    "logfmt_encode",
    "logfmt_decode",
    "logfmt_encode_ref",
    "logfmt_decode_ref",
    "nearest_error_bound",
    "triton_available",
]


def code_dtype(n_bits: int) -> torch.dtype:
    """uint8 for n <= 8, int16 (the n-bit pattern) for 8 < n <= 16."""
    _check_bits(n_bits)
    return torch.uint8 if n_bits <= 8 else torch.int16


def nearest_error_bound(tile_step: torch.Tensor) -> torch.Tensor:
    """(e^s - 1) / 2 per tile: |decode - x| <= this * |x| for nearest rounding (|x| >= exp(tile_min))."""
    return torch.expm1(tile_step.double()) / 2


def _check_bits(n_bits: int) -> None:
    if not isinstance(n_bits, int) or not 3 <= n_bits <= 16:
        raise CoscaleError(f"n_bits must be an integer in 3..16, got {n_bits!r}")


def _check_x(x: torch.Tensor, n_bits: int, rounding: str) -> None:
    _check_bits(n_bits)
    if x.dim() != 2:
        raise CoscaleError(f"x must be 2-D [rows, cols], got shape {tuple(x.shape)}")
    if not x.is_floating_point() or x.element_size() < 2:
        raise CoscaleError(f"x must be fp64/fp32/bf16/fp16, got {x.dtype}")
    if rounding not in ROUNDINGS:
        raise CoscaleError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")


def _check_codes(codes: torch.Tensor, tile_min: torch.Tensor, tile_step: torch.Tensor, n_bits: int) -> None:
    _check_bits(n_bits)
    if codes.dim() != 2 or codes.dtype not in (torch.uint8, torch.int16, torch.int32):
        raise CoscaleError(f"codes must be 2-D uint8/int16, got {codes.dtype} {tuple(codes.shape)}")
    tiles = math.ceil(codes.shape[1] / TILE)
    for name, t in (("tile_min", tile_min), ("tile_step", tile_step)):
        if tuple(t.shape) != (codes.shape[0], tiles):
            raise CoscaleError(f"{name} must have shape {(codes.shape[0], tiles)}, got {tuple(t.shape)}")


# ----------------------------------------------------------------------------------------------------
# PyTorch references (float64)
# ----------------------------------------------------------------------------------------------------


def _tile_stats(ax: torch.Tensor, bad: torch.Tensor, n_bits: int):
    """ax [N, T, 128] float64 magnitudes -> (tile_min, tile_step) fp32 [N, T] (see the module docstring)."""
    levels = 2 ** (n_bits - 1) - 2  # Q - 1 steps between the smallest and the largest magnitude
    amax = ax.amax(-1)
    amin = torch.where(ax > 0, ax, torch.full_like(ax, math.inf)).amin(-1)
    live = (amax > 0) & ~bad
    amax = torch.where(live, amax, torch.ones_like(amax))
    amin = torch.maximum(torch.where(live, amin, torch.ones_like(amin)), amax * RANGE_CLAMP)
    lmax, lmin = amax.log(), amin.log()
    tile_min = torch.where(live, lmin, torch.zeros_like(lmin)).float()
    tile_step = torch.where(live, (lmax - lmin) / levels, torch.zeros_like(lmin)).float()
    nan = torch.full_like(tile_min, math.nan)
    return torch.where(bad, nan, tile_min), torch.where(bad, nan, tile_step)


def logfmt_encode_ref(x: torch.Tensor, n_bits: int = 8, rounding: str = "nearest",
                      generator: torch.Generator | None = None):
    """x [N, H] -> (codes [N, H] code_dtype(n_bits), tile_min [N, T] fp32, tile_step [N, T] fp32)."""
    _check_x(x, n_bits, rounding)
    n, h = x.shape
    tiles = math.ceil(h / TILE)
    q_max = 2 ** (n_bits - 1) - 1
    xf = torch.nn.functional.pad(x.double(), (0, tiles * TILE - h)).view(n, tiles, TILE)
    ax = xf.abs()
    bad = ~torch.isfinite(xf).all(-1)  # [N, T]
    ax = torch.where(bad.unsqueeze(-1), torch.zeros_like(ax), ax)
    tile_min, tile_step = _tile_stats(ax, bad, n_bits)
    m = torch.nan_to_num(tile_min.double()).unsqueeze(-1)  # the grid is the stored fp32 numbers
    s = torch.nan_to_num(tile_step.double()).unsqueeze(-1)
    log_ax = torch.where(ax > 0, ax, torch.ones_like(ax)).log()
    k = torch.floor((log_ax - m) / torch.where(s > 0, s, torch.ones_like(s))).clamp(-1, q_max - 2)
    lower = torch.where(k < 0, torch.zeros_like(ax), torch.exp(m + s * k))  # a (0 below exp(m))
    upper = torch.exp(m + s * (k + 1))  # b
    if rounding == "nearest":
        up = 2 * ax >= lower + upper
    else:
        u = torch.rand(ax.shape, generator=generator, dtype=torch.float64, device=ax.device)
        up = u * (upper - lower) < ax - lower  # probability (|x| - a) / (b - a)
    mag = (k + 1).long() + up.long()
    mag = torch.where(s > 0, mag, torch.ones_like(mag))  # one distinct magnitude: q = 1
    mag = torch.where((ax == 0) | bad.unsqueeze(-1), torch.zeros_like(mag), mag)
    sign = ((xf < 0) & (mag > 0)).long() << (n_bits - 1)
    codes = (mag | sign).view(n, tiles * TILE)[:, :h].to(torch.int32).to(code_dtype(n_bits))
    return codes.contiguous(), tile_min.contiguous(), tile_step.contiguous()


def logfmt_decode_ref(codes: torch.Tensor, tile_min: torch.Tensor, tile_step: torch.Tensor, n_bits: int = 8,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes [N, H], tile_min [N, T], tile_step [N, T]) -> x [N, H] in dtype (float64 math)."""
    _check_codes(codes, tile_min, tile_step, n_bits)
    n, h = codes.shape
    tiles = tile_min.shape[1]
    c = codes.to(torch.int64) & ((1 << n_bits) - 1)
    c = torch.nn.functional.pad(c, (0, tiles * TILE - h)).view(n, tiles, TILE)
    mag, negative = c & (2 ** (n_bits - 1) - 1), (c >> (n_bits - 1)) & 1
    m, s = tile_min.double().unsqueeze(-1), tile_step.double().unsqueeze(-1)
    val = torch.where(mag > 0, torch.exp(m + s * (mag - 1)), torch.zeros_like(m))
    val = torch.where(negative > 0, -val, val)
    val = torch.where(torch.isnan(m), torch.full_like(val, math.nan), val)
    return val.view(n, tiles * TILE)[:, :h].to(dtype)


# ----------------------------------------------------------------------------------------------------
# Triton kernels (built lazily, as in coscale.kernels.quant)
# ----------------------------------------------------------------------------------------------------


@functools.cache
def _build_kernels(interpret: bool):
    """JIT-decorate the two kernels (cached per interpreter mode; see coscale.kernels.quant).

    Constants that meet float64 tensors are exact in fp32 (2^-32, 0.5, 1, 2): Triton types Python float
    literals as fp32, so a constant like log(2) would lose its low bits before promotion.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def encode_kernel(
        x_ptr, codes_ptr, min_ptr, step_ptr, N, H, T, stride_xn, stride_cn, seed, range_clamp,
        N_BITS: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK_R: tl.constexpr, TILE_C: tl.constexpr,
    ):  # fmt: skip
        # One program = BLOCK_R rows x one 128-column tile; each row of the block is its own LogFMT tile.
        Q: tl.constexpr = (1 << (N_BITS - 1)) - 1
        pid_r = tl.program_id(0)
        pid_t = tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_t * TILE_C + tl.arange(0, TILE_C)
        in_r = rows < N
        mask = in_r[:, None] & (cols < H)[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xn + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)  # exact for bf16/fp16/fp32 inputs
        ax = tl.abs(x)
        bad = tl.max(((x != x) | (ax == float("inf"))).to(tl.int32), 1) > 0  # [BLOCK_R]
        ax = tl.where(bad[:, None], 0.0, ax)
        amax = tl.max(ax, 1)
        amin = tl.min(tl.where(ax > 0, ax, float("inf")), 1)
        live = (amax > 0) & (bad == 0)
        amax64 = tl.where(live, amax, 1.0).to(tl.float64)
        amin64 = tl.maximum(tl.where(live, amin, 1.0).to(tl.float64), amax64 * range_clamp)
        lmax = tl.log(amax64)
        lmin = tl.log(amin64)
        m32 = tl.where(live, lmin.to(tl.float32), 0.0)
        s32 = tl.where(live, ((lmax - lmin) / (Q - 1)).to(tl.float32), 0.0)
        tile_ptr = rows.to(tl.int64) * T + pid_t
        tl.store(min_ptr + tile_ptr, tl.where(bad, float("nan"), m32), mask=in_r)
        tl.store(step_ptr + tile_ptr, tl.where(bad, float("nan"), s32), mask=in_r)
        m = m32.to(tl.float64)[:, None]  # the grid is the stored fp32 numbers
        s = s32.to(tl.float64)[:, None]
        s_safe = tl.where(s > 0, s, 1.0)
        log_ax = tl.log(tl.where(ax > 0, ax, 1.0).to(tl.float64))
        if STOCHASTIC:
            k = tl.floor((log_ax - m) / s_safe)
            k = tl.minimum(tl.maximum(k, -1.0), Q - 2.0)
            lower = tl.where(k < 0, 0.0, tl.exp((m + s * k).to(tl.float32)))
            upper = tl.exp((m + s * (k + 1.0)).to(tl.float32))
            u = tl.rand(seed, rows[:, None] * (T * TILE_C) + cols[None, :])
            up = u * (upper - lower) < ax - lower
            mag = k.to(tl.int32) + 1 + up.to(tl.int32)
        else:
            c = tl.log((1.0 + tl.exp(s)) * 0.5)  # log of the linear midpoint's offset, in steps of s
            t = (log_ax - m - c) / s_safe
            t = tl.minimum(tl.maximum(t, -2.0), Q * 1.0)
            mag = tl.floor(t).to(tl.int32) + 2
            mag = tl.minimum(tl.maximum(mag, 1), Q)
            mag = tl.where(2.0 * ax.to(tl.float64) < tl.exp(m), 0, mag)  # below exp(m): 0 or q = 1
        mag = tl.where(s > 0, mag, 1)
        mag = tl.where((ax == 0) | bad[:, None], 0, mag)
        code = tl.where((x < 0) & (mag > 0), mag + (1 << (N_BITS - 1)), mag)
        c_ptrs = codes_ptr + rows[:, None].to(tl.int64) * stride_cn + cols[None, :]
        tl.store(c_ptrs, code.to(codes_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def decode_kernel(
        codes_ptr, min_ptr, step_ptr, out_ptr, N, H, T, stride_cn, stride_on,
        N_BITS: tl.constexpr, BLOCK_R: tl.constexpr, TILE_C: tl.constexpr,
    ):  # fmt: skip
        Q: tl.constexpr = (1 << (N_BITS - 1)) - 1
        pid_r = tl.program_id(0)
        pid_t = tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_t * TILE_C + tl.arange(0, TILE_C)
        in_r = rows < N
        mask = in_r[:, None] & (cols < H)[None, :]
        c_ptrs = codes_ptr + rows[:, None].to(tl.int64) * stride_cn + cols[None, :]
        code = tl.load(c_ptrs, mask=mask, other=0).to(tl.int32) & ((1 << N_BITS) - 1)
        mag = code & Q
        negative = (code >> (N_BITS - 1)) & 1
        tile_ptr = rows.to(tl.int64) * T + pid_t
        m = tl.load(min_ptr + tile_ptr, mask=in_r, other=0.0)
        s = tl.load(step_ptr + tile_ptr, mask=in_r, other=0.0)
        val = tl.exp(m[:, None] + s[:, None] * (mag - 1).to(tl.float32))
        val = tl.where(mag == 0, 0.0, val)
        val = tl.where(negative != 0, -val, val)
        val = tl.where((m != m)[:, None], float("nan"), val)
        o_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_on + cols[None, :]
        tl.store(o_ptrs, val.to(out_ptr.dtype.element_ty), mask=mask)

    return encode_kernel, decode_kernel


def logfmt_encode(x: torch.Tensor, n_bits: int = 8, rounding: str = "nearest", seed: int | None = None,
                  backend: str = "auto", block_rows: int = 8):
    """x [N, H] -> (codes [N, H] code_dtype(n_bits), tile_min [N, T] fp32, tile_step [N, T] fp32).

    ``seed`` (stochastic rounding): the Philox seed of the kernel, or the seed of the reference's
    torch.Generator; None draws one from torch's default generator (reproducible under manual_seed).
    """
    _check_x(x, n_bits, rounding)
    if rounding == "stochastic" and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    if select_backend(backend, x, op="logfmt_encode") == "torch":
        gen = None
        if seed is not None:
            gen = torch.Generator(device=x.device).manual_seed(seed)
        return logfmt_encode_ref(x, n_bits, rounding, gen)
    if x.stride(-1) != 1:
        x = x.contiguous()
    n, h = x.shape
    tiles = math.ceil(h / TILE)
    codes = torch.empty(n, h, dtype=code_dtype(n_bits), device=x.device)
    tile_min = torch.empty(n, tiles, dtype=torch.float32, device=x.device)
    tile_step = torch.empty(n, tiles, dtype=torch.float32, device=x.device)
    if n and h:
        encode_kernel, _ = _build_kernels(interpreting())
        grid = (triton_cdiv(n, block_rows), tiles)
        encode_kernel[grid](
            x, codes, tile_min, tile_step, n, h, tiles, x.stride(0), codes.stride(0), seed or 0, RANGE_CLAMP,
            N_BITS=n_bits, STOCHASTIC=rounding == "stochastic", BLOCK_R=block_rows, TILE_C=TILE, num_warps=4,
        )  # fmt: skip
    return codes, tile_min, tile_step


def logfmt_decode(codes: torch.Tensor, tile_min: torch.Tensor, tile_step: torch.Tensor, n_bits: int = 8,
                  dtype: torch.dtype = torch.float32, backend: str = "auto", block_rows: int = 8) -> torch.Tensor:
    """(codes [N, H], tile_min [N, T], tile_step [N, T]) -> x [N, H] in dtype."""
    _check_codes(codes, tile_min, tile_step, n_bits)
    if select_backend(backend, codes, op="logfmt_decode") == "torch":
        return logfmt_decode_ref(codes, tile_min, tile_step, n_bits, dtype)
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    tile_min, tile_step = tile_min.float().contiguous(), tile_step.float().contiguous()
    n, h = codes.shape
    out = torch.empty(n, h, dtype=dtype, device=codes.device)
    if n and h:
        _, decode_kernel = _build_kernels(interpreting())
        grid = (triton_cdiv(n, block_rows), tile_min.shape[1])
        decode_kernel[grid](
            codes, tile_min, tile_step, out, n, h, tile_min.shape[1], codes.stride(0), out.stride(0),
            N_BITS=n_bits, BLOCK_R=block_rows, TILE_C=TILE, num_warps=4,
        )  # fmt: skip
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
