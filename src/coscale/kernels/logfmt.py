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
  "fast":       nearest as float32 computes it, with no exactness machinery and no float64: one log2 (the GPU's
                lg2.approx) and one multiply-add an element. Its code is the nearest code of some x' with
                |log2 x' - log2|x|| <= ``fast_position_error`` (2^-23 (2.1 |log2 x| + (4 |tile_min| + 5
                tile_step) / ln 2 + 150) plus lg2's error, FAST_LOG2_BOUND: about 3e-5), so it differs from
                "nearest" only where |x| lies that close to a threshold (1e-5 of Gaussian elements with numpy's
                log2 in the interpreter; a nearly constant tile may differ throughout, within 3e-5 of x) and its
                error is the nearest bound widened by that perturbation (``check_fast_codes`` checks the
                contract). Its tile numbers are float32 ones, within ``fast_tile_tolerance`` of the reference's
                (about 2^-22 relative), and the codes are nearest on the grid they give, which is the decoder's.
                Made for the wire, where the perturbation is far below the format's step; "nearest" stays the
                default.
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
references ``logfmt_encode_ref`` / ``logfmt_decode_ref`` (float64 math, the specification; "fast" rounding
there gives the nearest codes, which keep its contract), "triton" =
the kernels below (CPU tensors under TRITON_INTERPRET=1), "auto" = triton for CUDA tensors when Triton
imports, else torch.

The encode kernel (coscale.kernels._logfmt_triton) works in float32 per element; float64 only per tile
row (the tile numbers, bit-identical to the reference's, and a few constants). Exactness argument for
"nearest": the reference's code is the exact real-number rounding of |x| to the nearest grid magnitude
(its float64 comparison can differ only within ~1e-15 relative of a threshold). The kernel computes the
position t = (log2|x| - M - C) / S on the code grid (thresholds at the integers 0..Q-2 and at t0 for the
0 / 1 threshold |x| = exp(m)/2; M, S, C in log2 units) from the exact exponent of |x| and a float32
log2(mantissa) (the GPU's lg2.approx.f32: error <= LOG2_BOUND = 1.8e-7; 1.776e-7 measured on the H200 over
every mantissa, ``fast_log2_max_error``, against the PTX ISA's 2^-22.6), split so that the large terms are
exact float32 integers and
products; floor(t) is exact and |t_computed - t| <= 3.1e-7 / S + 5e-7 (derived in _grid_position; a
numpy mirror checks it: tests/test_logfmt_exact.py). An element within the band DELTA / S + 2^-20
(DELTA = 4e-7) of a threshold marks its row, and that row is recomputed with the reference's own float64
formulas (log, floor, the two exps and the linear comparison) before anything is stored: codes equal the
reference bit for bit by construction, whatever the input. Rows where the bound does not apply go there
whole: 1 / S >= 2^16 (nearly constant tiles), a band >= 1/4, or a subnormal |x| with max |x| >= 2^100
(other rows holding subnormals are scaled by 2^24 first, exactly). The band is narrow: on Gaussian tiles
0.2 % of the rows are redone for LogFMT-8, 0.6 % for LogFMT-10 (test_ambiguous_rows_are_rare). Tests:
tests/test_logfmt.py, tests/test_logfmt_fused.py (elements straddling every threshold, and the fallback
alone with the band widened to everything), tests/test_logfmt_exact.py (the bound, hard inputs).
Per-row float64 work runs on few threads a row: either the kernel regathers its row numbers one or two
rows per warp lane, through memory, or (32-column steps) the reductions' layout already holds a row on two
threads (with 16 threads repeating each row, the first kernel spent most of its time there, 16% of copy
bandwidth on the H200). lg2.approx is used only on a GPU whose approximation ``use_fast_log2`` has checked
within LOG2_BOUND (once per device). Tile shapes (rows per program, columns per step, warps, regather) are
autotuned per (H, row bucket, format); ``block_rows`` / ``chunk_cols`` / ``regather`` fix them for tests.

Stochastic rounding draws Philox numbers (``tl.rand(seed, row * Hp + col)``, offsets wrap past 2^31
elements) and is checked statistically; the reference uses a torch.Generator. The decode kernel computes
in fp32, exp(m + s (q - 1)) as 2^(m log2 e + s log2 e (q - 1)) with both products carrying their rounding
error (ex2.approx: one instruction; rows below 2^-60 raised by 2^64 and scaled back, so nothing flushes to
zero), and differs from the float64 reference by ~1e-6 relative. On a GPU, LogFMT-8 codes (a byte each) give
their magnitude and sign through PTX byte permutes (``_byte_fields``: three instructions a code where Triton's
own extraction took five), and a plain decode writes the decoded value without a sum from zero.

Fused forms (one pass over memory each; references = the unfused references composed):
``logfmt_encode_rows`` / ``logfmt_encode_to_rows`` gather rows x[row_src // K] (the MoE permutation, or
the dispatch's row selection) and encode them, the latter straight into wire rows (packed codes, then
tile_min and tile_step: coscale.parallel.codec.LogFMTCodec's layout); ``logfmt_decode_sum`` /
``logfmt_decode_rows`` decode and sum each token's K rows, optionally weighted (the combine).
"""

from __future__ import annotations

import functools
import math

import torch

from coscale.errors import CoscaleError
from coscale.kernels.autotune import autotuned, config_text, launch_config
from coscale.kernels.autotune import power_of_two_bucket as _pow2
from coscale.kernels.backend import interpreting, select_backend, triton_available  # noqa: F401

TILE = 128
RANGE_CLAMP = 2.0**-32  # min |x| >= max |x| * 2^-32, i.e. lmin >= lmax - log(2^32)
ROUNDINGS = ("nearest", "stochastic", "fast")

__all__ = [
    "TILE",
    "code_dtype",
    "logfmt_encode",
    "logfmt_encode_rows",
    "logfmt_encode_to_rows",
    "logfmt_decode",
    "logfmt_decode_sum",
    "logfmt_decode_rows",
    "code_packing",
    "code_planes",
    "fast_log2_max_error",
    "use_fast_log2",
    "LOG2_BOUND",
    "row_bytes",
    "logfmt_encode_ref",
    "logfmt_decode_ref",
    "nearest_error_bound",
    "FAST_LOG2_BOUND",
    "fast_position_error",
    "fast_tile_tolerance",
    "check_fast_codes",
    "grid_magnitude_ref",
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
        raise CoscaleError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


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


def grid_magnitude_ref(ax: torch.Tensor, m: torch.Tensor, s: torch.Tensor, n_bits: int,
                       u: torch.Tensor | None = None) -> torch.Tensor:
    """The magnitude code (int64, 0..Q) of float64 magnitudes ``ax`` on the grid of tile numbers m, s (float64,
    broadcast against ax): nearest in the linear domain, or with ``u`` (uniform [0, 1) draws) stochastic."""
    q_max = 2 ** (n_bits - 1) - 1
    log_ax = torch.where(ax > 0, ax, torch.ones_like(ax)).log()
    k = torch.floor((log_ax - m) / torch.where(s > 0, s, torch.ones_like(s))).clamp(-1, q_max - 2)
    lower = torch.where(k < 0, torch.zeros_like(ax), torch.exp(m + s * k))  # a (0 below exp(m))
    upper = torch.exp(m + s * (k + 1))  # b
    if u is None:
        up = 2 * ax >= lower + upper
    else:
        up = u * (upper - lower) < ax - lower  # probability (|x| - a) / (b - a)
    mag = (k + 1).long() + up.long()
    mag = torch.where(s > 0, mag, torch.ones_like(mag))  # one distinct magnitude: q = 1
    return torch.where(ax == 0, torch.zeros_like(mag), mag)


def fast_position_error(log2_ax: torch.Tensor, tile_min: torch.Tensor, tile_step: torch.Tensor) -> torch.Tensor:
    """The "fast" rounding's bound (log2 units, float64, broadcast): its code is the nearest code, on the grid of the
    tile numbers it stores (``tile_min``, ``tile_step``), of some x' with |log2 x' - log2|x|| <= this.

    The kernel (``_fast_code``) takes lg = log2 of L' = |x| (or |x| 2^24 in a row scaled for its subnormals,
    whose origin is then M' = M + 24; M = tile_min / ln 2, S = tile_step / ln 2, C <= S / 2 + S^2 the midpoint
    offset) and computes v = fl(lg A + B), as one fused multiply-add on the GPU and as a rounded product and a
    rounded sum in the interpreter, with the row's constants in float32 (``_row_line``): A = fl(ln 2 / s) (one
    correctly rounded division of float32 ln 2: within 1.05 u of 1/S), M' = fl(fl(m log2 e) + 24) (2.5 u (|M| + 24)),
    C to 3 u, B = fl(1.5 - fl(fl(M' + C) A)). Errors of v, times S (log2 units), u = 2^-24: lg's (lg2.approx:
    FAST_LOG2_BOUND beyond the rounding of its result, checked on each GPU over every normal float32 by
    ``use_fast_log2``; plus that rounding, |L'| u), A's (1.05 |L'| u), the product's when not fused (|L'| u), B's
    (2.05 (|M'| + C) + 2.5 (|M| + 24) + 3 C + (|M'| + C) + (|M'| + 2 S), in u) and the sum's (S |v| u <= (|L'| +
    |M'| + 2.5 S) u): with |L'| <= |L| + 24, |M'| <= |M| + 24 and C <= S, within 4.05 |L| + 7.6 |M| + 9 S + 280
    u; T0's (the 0 / 1 threshold) is smaller. So FAST_LOG2_BOUND (1 + 2^-20) + 2^-23 (2.1 |L| + 4 |M| + 5 S + 150):
    about 3e-5 near |x| = 1 with |M| = 20."""
    inv_ln2 = 1 / math.log(2)
    big_m = torch.nan_to_num(tile_min.double()).abs() * inv_ln2
    big_s = torch.nan_to_num(tile_step.double()).abs() * inv_ln2
    return FAST_LOG2_BOUND * (1 + 2.0**-20) + 2.0**-23 * (2.1 * log2_ax.double().abs() + 4 * big_m + 5 * big_s + 150)


def fast_tile_tolerance(tile_min: torch.Tensor, tile_step: torch.Tensor, n_bits: int):
    """How far (natural-log units, float64) the "fast" tile numbers may lie from the reference's (``tile_min``,
    ``tile_step``): (for the grid's bottom m, for its top m + (Q - 1) s). The kernel's float32 numbers
    (``_row_stats_fast``), u = 2^-24: lmax and lmin (log2 units) as E + log2(mant) (E exact, a subnormal's from its
    bits times 2^24 less 24; the mantissa's log within lam = 1.8e-7; the sum rounded: lam + u |l|); where the range
    clamp binds, lmin = lmax + log2 2^-32 (lmax's error, lam for the clamp's log, u |lmin| for the sum; |lmax| <=
    |lmin| + 32); m = fl(lmin fl(ln 2)) (0.55 u |m|), s = fl(fl(lmax - lmin) fl(ln 2 / (Q - 1))) (3.5 u). So the
    bottom lies within ln 2 (2 lam + 32 u) + 3.1 u |m| (1.6e-6 + 3.1 u |m|) of the reference's (which rounds once,
    0.5 u |m|), the top (lmin's error cancels there) within ln 2 (lam + u |lmax|) + u (2 |m| + 5 |top - m|). Taken
    as 2^-22 (|m| + 10) = 4 u |m| + 2.4e-6 and 2^-21 (|m| + |top| + 10)."""
    q = 2 ** (n_bits - 1) - 1
    m = torch.nan_to_num(tile_min.double()).abs()
    top = torch.nan_to_num(tile_min.double() + (q - 1) * tile_step.double()).abs()
    return 2.0**-22 * (m + 10), 2.0**-21 * (m + top + 10)


def check_fast_codes(x: torch.Tensor, codes: torch.Tensor, tile_min: torch.Tensor, tile_step: torch.Tensor,
                     n_bits: int) -> int:
    """Checks "fast" codes of x against their contract, element by element in float64: the tile numbers lie within
    ``fast_tile_tolerance`` of the reference's (NaN where its are: a NaN / inf tile), and each code is the nearest
    code, on the grid of the stored tile numbers (the decoder's), of some x' with |log2 x' - log2|x|| <=
    ``fast_position_error`` (its magnitude between the nearest codes of |x| 2^-delta and |x| 2^delta), with x's sign
    on non-zero magnitudes and 0 throughout a NaN / inf tile. Raises CoscaleError naming the first violations;
    returns how many codes differ from the reference's "nearest" codes (those next to a rounding threshold)."""
    x, codes, tile_min, tile_step = (t.cpu() for t in (x, codes, tile_min, tile_step))
    ref_codes, ref_min, ref_step = logfmt_encode_ref(x, n_bits)
    q = 2 ** (n_bits - 1) - 1
    bottom_tol, top_tol = fast_tile_tolerance(ref_min, ref_step, n_bits)
    got_top = tile_min.double() + (q - 1) * tile_step.double()
    ref_top = ref_min.double() + (q - 1) * ref_step.double()
    for name, got, ref, tol in (("tile_min", tile_min.double(), ref_min.double(), bottom_tol),
                                ("the grid's top (tile_min + (Q - 1) tile_step)", got_top, ref_top, top_tol)):
        nan = ref.isnan()
        if not torch.equal(got.isnan(), nan) or ((got - ref).abs() > tol)[~nan].any():
            raise CoscaleError(f"fast codes: {name} lies farther from the reference's than fast_tile_tolerance")
    if (tile_step[~ref_step.isnan()] < 0).any():
        raise CoscaleError("fast codes: a negative tile_step")
    cols = x.shape[1]
    m, s = (t.double().repeat_interleave(TILE, dim=1)[:, :cols] for t in (tile_min, tile_step))
    finite = torch.isfinite(m)
    m0, s0 = torch.nan_to_num(m), torch.nan_to_num(s)
    ax = x.double().abs()
    delta = fast_position_error(torch.where(ax > 0, ax, torch.ones_like(ax)).log2(), m, s)
    nearest = grid_magnitude_ref(ax, m0, s0, n_bits)
    below = torch.minimum(grid_magnitude_ref(ax * torch.exp2(-delta), m0, s0, n_bits), nearest)
    above = torch.maximum(grid_magnitude_ref(ax * torch.exp2(delta), m0, s0, n_bits), nearest)
    c = codes.to(torch.int64) & ((1 << n_bits) - 1)
    mag, sign = c & (2 ** (n_bits - 1) - 1), c >> (n_bits - 1)
    wrong = (finite & ((mag < below) | (mag > above))) | (~finite & (c != 0)) | (sign.bool() != ((x < 0) & (mag > 0)))
    if wrong.any():
        at = wrong.nonzero()[:3].tolist()
        raise CoscaleError(f"fast codes break their contract at {int(wrong.sum())} elements, e.g. [row, col] {at}: "
                           f"x {[x[r, k].item() for r, k in at]}, codes {[c[r, k].item() for r, k in at]}, "
                           f"nearest {[ref_codes[r, k].item() for r, k in at]}")
    return int((c != (ref_codes.to(torch.int64) & ((1 << n_bits) - 1))).sum())


def logfmt_encode_ref(x: torch.Tensor, n_bits: int = 8, rounding: str = "nearest",
                      generator: torch.Generator | None = None):
    """x [N, H] -> (codes [N, H] code_dtype(n_bits), tile_min [N, T] fp32, tile_step [N, T] fp32). "fast" rounding
    has no reference of its own: its reference is "nearest" (the kernel's codes are those of an x within
    ``fast_position_error`` of x)."""
    _check_x(x, n_bits, rounding)
    n, h = x.shape
    tiles = math.ceil(h / TILE)
    xf = torch.nn.functional.pad(x.double(), (0, tiles * TILE - h)).view(n, tiles, TILE)
    ax = xf.abs()
    bad = ~torch.isfinite(xf).all(-1)  # [N, T]
    ax = torch.where(bad.unsqueeze(-1), torch.zeros_like(ax), ax)
    tile_min, tile_step = _tile_stats(ax, bad, n_bits)
    m = torch.nan_to_num(tile_min.double()).unsqueeze(-1)  # the grid is the stored fp32 numbers
    s = torch.nan_to_num(tile_step.double()).unsqueeze(-1)
    u = None if rounding != "stochastic" else \
        torch.rand(ax.shape, generator=generator, dtype=torch.float64, device=ax.device)
    mag = grid_magnitude_ref(ax, m, s, n_bits, u)
    mag = torch.where(bad.unsqueeze(-1), torch.zeros_like(mag), mag)
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
# Rows of bytes (the wire layout of coscale.parallel.codec.LogFMTCodec) and the fused references
# ----------------------------------------------------------------------------------------------------


def code_packing(n_bits: int, packed: bool = True) -> tuple[int, int]:
    """(codes per group, bytes per group) of a packed row: g = 8 / gcd(n, 8) codes in g*n/8 little-endian
    bytes (n = 8: 1 in 1; n = 4: 2 in 1), or (1, 2) (int16 codes) unpacked or when g*n > 56 bits. For
    8 < n < 16 with a group (n = 10, 12, 14) the row holds planes (``code_planes``)."""
    _check_bits(n_bits)
    group = 8 // math.gcd(n_bits, 8)
    return (group, group * n_bits // 8) if packed and group * n_bits <= 56 else (1, 2)


def code_planes(n_bits: int, packed: bool = True) -> bool:
    """Whether a row holds its codes in two planes: the low bytes of all H codes, then their n - 8 high bits
    bit-packed as n - 8-bit codes are (code_packing(n - 8)). For the packed 10-, 12- and 14-bit rows: the
    kernels store and load the low plane as plain bytes, and only n - 8 bits a code through the slow
    byte-by-byte packing (LogFMT-10's 4-codes-in-5-bytes rows took 1.17 ms for 32,768 x 7,168 on the H200)."""
    return 8 < n_bits < 16 and code_packing(n_bits, packed) != (1, 2)


def row_bytes(hidden: int, n_bits: int, packed: bool = True) -> tuple[int, int]:
    """(code bytes, total bytes) of one row: the packed codes, then tile_min[T] and tile_step[T] fp32."""
    if code_planes(n_bits, packed):
        group, group_bytes = _groups(n_bits - 8)
        code_bytes = hidden + math.ceil(hidden / group) * group_bytes
    else:
        group, group_bytes = code_packing(n_bits, packed)
        code_bytes = math.ceil(hidden / group) * group_bytes
    return code_bytes, code_bytes + 8 * math.ceil(hidden / TILE)


def _groups(bits: int) -> tuple[int, int]:
    """(values per group, bytes per group) of ``bits``-bit values bit-packed: 8 / gcd(bits, 8) in a whole
    number of bytes."""
    group = 8 // math.gcd(bits, 8)
    return group, group * bits // 8


def _pack_groups_ref(c: torch.Tensor, bits: int, group: int, group_bytes: int) -> torch.Tensor:
    """values [N, H] (int64, < 2^bits) -> bytes [N, ceil(H / group) * group_bytes], little-endian groups."""
    n, h = c.shape
    c = torch.nn.functional.pad(c, (0, -h % group)).view(n, math.ceil(h / group), group)
    word = (c << (bits * torch.arange(group, device=c.device))).sum(-1, keepdim=True)
    shifts = 8 * torch.arange(group_bytes, device=c.device)
    return ((word >> shifts) & 0xFF).to(torch.uint8).reshape(n, math.ceil(h / group) * group_bytes)


def _unpack_groups_ref(raw: torch.Tensor, hidden: int, bits: int, group: int, group_bytes: int) -> torch.Tensor:
    """The inverse of _pack_groups_ref: values [N, hidden] int32."""
    n = raw.shape[0]
    b = raw.to(torch.int64).reshape(n, raw.shape[1] // group_bytes, group_bytes)
    word = (b << (8 * torch.arange(group_bytes, device=b.device))).sum(-1, keepdim=True)
    c = (word >> (bits * torch.arange(group, device=b.device))) & ((1 << bits) - 1)
    return c.reshape(n, c.shape[1] * group)[:, :hidden].to(torch.int32)


def pack_codes_ref(codes: torch.Tensor, n_bits: int, packed: bool = True) -> torch.Tensor:
    """codes [N, H] -> their row bytes [N, code bytes] (see code_packing, code_planes)."""
    c = codes.to(torch.int64) & ((1 << n_bits) - 1)
    if code_planes(n_bits, packed):
        high = _pack_groups_ref(c >> 8, n_bits - 8, *_groups(n_bits - 8))
        return torch.cat([(c & 0xFF).to(torch.uint8), high], dim=1)
    return _pack_groups_ref(c, n_bits, *code_packing(n_bits, packed))


def unpack_codes_ref(raw: torch.Tensor, hidden: int, n_bits: int, packed: bool = True) -> torch.Tensor:
    """The inverse of pack_codes_ref: [N, code bytes] -> codes [N, hidden] code_dtype(n_bits)."""
    if code_planes(n_bits, packed):
        high = _unpack_groups_ref(raw[:, hidden:], hidden, n_bits - 8, *_groups(n_bits - 8))
        return (raw[:, :hidden].to(torch.int32) | (high << 8)).to(code_dtype(n_bits))
    return _unpack_groups_ref(raw, hidden, n_bits, *code_packing(n_bits, packed)).to(code_dtype(n_bits))


def to_rows_ref(codes, tile_min, tile_step, n_bits: int, packed: bool = True) -> torch.Tensor:
    """(codes, tile_min, tile_step) -> rows [N, row bytes] uint8."""
    n = codes.shape[0]
    stats = torch.cat([tile_min, tile_step], dim=1).contiguous().view(torch.uint8).reshape(n, 8 * tile_min.shape[1])
    return torch.cat([pack_codes_ref(codes, n_bits, packed), stats], dim=1)


def from_rows_ref(rows: torch.Tensor, hidden: int, n_bits: int, packed: bool = True):
    """rows [N, row bytes] uint8 -> (codes [N, hidden], tile_min [N, T], tile_step [N, T])."""
    n, tiles = rows.shape[0], math.ceil(hidden / TILE)
    code_bytes, total = row_bytes(hidden, n_bits, packed)
    if rows.dim() != 2 or rows.shape[1] != total or rows.dtype != torch.uint8:
        raise CoscaleError(f"LogFMT rows must be [N, {total}] uint8 for hidden {hidden}, got "
                           f"{rows.dtype} {tuple(rows.shape)}")
    stats = rows[:, code_bytes:].contiguous().view(torch.float32).reshape(n, 2 * tiles)
    return unpack_codes_ref(rows[:, :code_bytes], hidden, n_bits, packed), stats[:, :tiles], stats[:, tiles:]


def _gather_ref(x: torch.Tensor, row_src: torch.Tensor | None, topk: int) -> torch.Tensor:
    """Rows x[row_src // topk], zeros where row_src < 0 (coscale.kernels.permute's gather semantics)."""
    if row_src is None:
        return x
    from coscale.kernels.permute import gather_rows_ref

    return gather_rows_ref(x, row_src, topk)[0]


def _sum_ref(y: torch.Tensor, pair_row: torch.Tensor | None, weight: torch.Tensor | None, dtype):
    """sum_k weight[t, k] * y[pair_row[t, k]] in float32 (the permutation's combine), or y."""
    if pair_row is None:
        return y.to(dtype)
    from coscale.kernels.permute import sum_rows_ref

    return sum_rows_ref(y.float(), pair_row, None, weight, torch.float32).to(dtype)


# ----------------------------------------------------------------------------------------------------
# Kernel launchers (coscale.kernels._logfmt_triton)
# ----------------------------------------------------------------------------------------------------

DELTA = 4e-7  # log2 units: the band is DELTA / S + 2^-20 in t units (the bound: 3.1e-7 / S + 5e-7)

# The GPU candidates of the two kernels' tile shapes, (BLOCK_R rows of one 128-column tile, num_warps
# [, CHUNK_C columns per step of the encoder's element phase]); Triton's autotuner times them on the
# first call per key and keeps the fastest. The first is the interpreter's (and block_rows=None's shape
# before tuning). Every candidate writes the same bits: the codes do not depend on the shape (stochastic
# draws use offsets row * Hp + col). Encoder: BLOCK_R >= 16 x warps puts a row on at most two threads for
# its float64 work; CHUNK_C columns a step bound the registers (32 columns unrolled took all 255 a thread
# allows on sm_90; as a loop 16 take 72-80, 32 take 122-158). The encoder waits on its loads (ncu on the
# H200, run 34: 0.4-0.5 instructions issued a cycle per scheduler, L1TEX waits the largest stall, 31% of
# its sectors excess): with 32 columns a step a row's codes leave in whole 32-byte sectors (16 columns wrote
# half sectors), and 32 rows on 2 warps keep more programs an SM; the dispatch's LogFMT-10 encode went from
# 0.121 to 0.089 ms. REGATHER (the fourth field): the row numbers pass through memory to one row per thread
# for the float64 phase (the kernel says why); without it a program neither waits at a barrier nor for the
# round trip through L2 (ncu, run 35: 25-37% occupancy, so each program's waits show). With CHUNK_C = 128
# the tile stays in registers between the phases (x is read once). Run 35: the dispatch's encodes and
# LogFMT-8 encode alone picked REGATHER=False (encode alone 1.19x, the dispatch's encodes 1.12-1.19x with
# the first phase on bf16 pairs). The last two (for every rounding; added for "fast" rounding, whose element phase
# is light beside its row phase, then about 126 float64 instructions a row in sm_90 SASS, without REGATHER repeated
# by every thread that holds part of the row; its row phase is float32 since, none left): one row a thread. The
# one-warp shape of 4 rows (last): "fast" rounding's test of whether every row of a program is easy (_fast_code's
# EASY form) is then a reduction within the warp, no shared memory or barrier (8-bit sm_90: 343 instructions a
# thread on the easy path against 4 warps' 367; run 54's H100 picked it for LogFMT-10 at 8192 rows and more). Few
# candidates: each is a compilation per variant.
ENCODE_CONFIGS = ((64, 4, 16, True), (8, 4, 128, True), (32, 2, 16, True), (16, 1, 16, True), (32, 2, 32, True),
                  (64, 4, 32, True), (32, 2, 32, False), (64, 4, 32, False), (8, 4, 128, False), (16, 4, 128, False),
                  (128, 4, 16, True), (128, 4, 32, True), (4, 1, 128, False))
DECODE_CONFIGS = ((8, 4), (32, 8), (16, 4), (64, 8), (32, 4))  # more rows a program: fewer, longer programs


@functools.cache
def tuned_kernels(interpret: bool) -> dict:
    """{"encode", "decode"}: the kernels under autotuners keyed by the shape (H, a power-of-two bucket of
    the rows) and the constexprs that change the work (``interpret`` keys the cache: triton.jit picks the
    interpreter when coscale.kernels._logfmt_triton is imported)."""
    from coscale.kernels import _logfmt_triton as k

    def candidates(shapes):
        return [({"BLOCK_R": r}, w) for r, w in shapes]

    encode = [({"BLOCK_R": r, "CHUNK_C": c, "REGATHER": g}, w) for r, w, c, g in ENCODE_CONFIGS]
    common = ["H", "M_BUCKET", "N_BITS", "PACKED", "GATHER"]
    return {"encode": autotuned(k.encode_kernel, encode, common + ["STOCHASTIC", "FAST"]),
            "decode": autotuned(k.decode_sum_kernel, candidates(DECODE_CONFIGS), common + ["TOPK", "HAS_WEIGHT"])}


def picked_configs() -> dict:
    """{"encode", "decode"}: the tile shape each autotuner used last, as "BLOCK_R=r wN" ("" before any)."""
    return {kind: config_text(kernel) for kind, kernel in tuned_kernels(interpreting()).items()}


def _launch(kind: str, block_rows: int | None, chunk_cols: int | None = None, regather: bool = True):
    """(kernel, launch kwargs): the autotuner, or with ``block_rows`` that shape with 4 warps (tests;
    the encoder walks its tile in ``chunk_cols``-column chunks, default the whole tile, its row numbers
    regathered one row a thread or not)."""
    config = None if block_rows is None else {"BLOCK_R": block_rows, "num_warps": 4}
    if config is not None and kind == "encode":
        config["CHUNK_C"] = chunk_cols or TILE
        config["REGATHER"] = regather
    return launch_config(tuned_kernels(interpreting())[kind], config)


def _check_index(idx: torch.Tensor | None, name: str) -> None:
    if idx is not None and (idx.dtype not in (torch.int32, torch.int64) or idx.is_floating_point()):
        raise CoscaleError(f"{name} must be an integer tensor, got {idx.dtype}")


def _encode_triton(x, row_src, topk, n_bits, rounding, seed, rows_out, packed, block_rows, chunk_cols=None,
                   regather=True):
    if x.stride(-1) != 1:
        x = x.contiguous()
    h = x.shape[1]
    n = x.shape[0] if row_src is None else row_src.shape[0]
    tiles = math.ceil(h / TILE)
    dev = x.device
    planes = rows_out and code_planes(n_bits, packed)
    group, group_bytes = _groups(n_bits - 8) if planes else code_packing(n_bits, packed)  # the high plane's
    code_bytes, total = row_bytes(h, n_bits, packed)
    if rows_out:
        payload = torch.empty(n, total, dtype=torch.uint8, device=dev)
        codes = tile_min = tile_step = payload
    else:
        codes = torch.empty(n, h, dtype=code_dtype(n_bits), device=dev)
        tile_min = torch.empty(n, tiles, dtype=torch.float32, device=dev)
        tile_step = torch.empty(n, tiles, dtype=torch.float32, device=dev)
        payload = codes
    # bf16 rows whose values pair into aligned int32 words: the first phase reads words (_pair_bits)
    pairs = x.dtype == torch.bfloat16 and h % 2 == 0 and x.stride(0) % 2 == 0 and x.data_ptr() % 4 == 0
    if n and h:
        idx = row_src.contiguous() if row_src is not None else x
        kernel, cfg = _launch("encode", block_rows, chunk_cols, regather)
        kernel[lambda meta: (triton_cdiv(n, meta["BLOCK_R"]), tiles)](
            x, idx, codes, tile_min, tile_step, payload, n, h, tiles, _pow2(n), x.stride(0), codes.stride(0),
            payload.stride(0), code_bytes, seed or 0, RANGE_CLAMP, math.log2(RANGE_CLAMP), DELTA,
            N_BITS=n_bits, STOCHASTIC=rounding == "stochastic", FAST=rounding == "fast", GATHER=row_src is not None,
            TOPK=topk,
            PACKED=rows_out, PLANES=planes, GROUP=group, GBYTES=group_bytes, GB_P2=_pow2(group_bytes), TILE_C=TILE,
            FAST_LOG2=use_fast_log2(x.device, rounding == "fast"), PAIRS=pairs,
            PAIR_ASM=pairs and not interpreting(), **cfg,
        )  # fmt: skip
    return payload if rows_out else (codes, tile_min, tile_step)


def _decode_triton(src, hidden, pair_row, weight, n_bits, dtype, packed, rows_in, block_rows):
    codes, tile_min, tile_step = src
    tiles = math.ceil(hidden / TILE)
    n_out, topk = (codes.shape[0], 1) if pair_row is None else tuple(pair_row.shape)
    planes = rows_in and code_planes(n_bits, packed)
    group, group_bytes = _groups(n_bits - 8) if planes else code_packing(n_bits, packed)  # the high plane's
    code_bytes, _ = row_bytes(hidden, n_bits, packed)
    codes = codes.contiguous()
    if not rows_in:
        tile_min, tile_step = tile_min.float().contiguous(), tile_step.float().contiguous()
    out = torch.empty(n_out, hidden, dtype=dtype, device=codes.device)
    # LogFMT-8 codes one a byte (uint8 codes, or rows of one-byte codes): their fields by PTX (GPU only)
    byte_asm = n_bits == 8 and not interpreting() and ((group, group_bytes) == (1, 1) if rows_in
                                                      else codes.dtype == torch.uint8)
    if n_out and hidden:
        pr = pair_row.contiguous() if pair_row is not None else codes
        w = weight.reshape(-1).float().contiguous() if weight is not None else out
        kernel, cfg = _launch("decode", block_rows)
        kernel[lambda meta: (triton_cdiv(n_out, meta["BLOCK_R"]), tiles)](
            codes, tile_min, tile_step, codes, pr, w, out, n_out, hidden, tiles, _pow2(n_out), codes.stride(0),
            codes.stride(0), code_bytes, out.stride(0),
            N_BITS=n_bits, PACKED=rows_in, PLANES=planes, GROUP=group, GBYTES=group_bytes, GB_P2=_pow2(group_bytes),
            TOPK=topk, GATHER=pair_row is not None, HAS_WEIGHT=weight is not None, TILE_C=TILE,
            BYTE_ASM=byte_asm, **cfg,
        )  # fmt: skip
    return out


# |lg2.approx(mant) - log2(mant)| the band assumes: the PTX ISA states 2^-22.6 = 1.57e-7, the H200 measured
# 1.776e-7 at worst over every mantissa of the range (BENCHMARKS.md); with 1.8e-7 the position error is
# <= 3.1e-7 / S + 5e-7, inside the band DELTA / S + 2^-20.
LOG2_BOUND = 1.8e-7


# "fast" rounding's allowance for lg2.approx of whole |x|, beyond the rounding of its result (fast_position_error):
# the H200's is 3.8e-6 at worst (run 40: about 2^-25 |log2 x|, |log2 x| <= 127); each GPU is checked over every
# normal float32 before fast rounding takes it.
FAST_LOG2_BOUND = 1e-5


def fast_log2_max_error(device="cuda", fast: bool = False) -> float:
    """The largest |lg2.approx.f32(m) - log2(m)| over every float32 m in [sqrt(1/2), sqrt(2)) on this GPU (the
    encoder's fast path is exact only if it is <= LOG2_BOUND), or with ``fast`` the largest error beyond the
    rounding of the result (|log2 v| 2^-24) over every normal float32 v ("fast" rounding, which takes the log of
    whole |x|, keeps its contract if it is <= FAST_LOG2_BOUND). tests/test_logfmt_exact.py checks both,
    benchmarks/bench_logfmt.py prints them."""
    if interpreting() or not torch.cuda.is_available():
        raise CoscaleError("fast_log2_max_error needs a CUDA GPU (lg2.approx is a GPU instruction)")
    from coscale.kernels import _logfmt_triton as k

    block = 1024
    count = (254 << 23) if fast else (1 << 23)  # every normal float32, or one binade of mantissas
    out = torch.empty(count // block, dtype=torch.float64, device=device)
    k.log2_check_kernel[(out.numel(),)](out, 0x00800000 if fast else 0x3F3504F4, BLOCK=block, ROUNDING=fast)
    return float(out.max())


_FAST_LOG2_OK: dict[tuple[int, bool], bool] = {}  # per (CUDA device index, fast): lg2.approx within its bound


def use_fast_log2(device: torch.device, fast: bool = False) -> bool:
    """Whether the encoder may take lg2.approx on ``device``: once per GPU, on the first eager call,
    ``fast_log2_max_error`` checks it against LOG2_BOUND (a GPU whose approximation were coarser would
    make the fast path's exactness argument void; it then gets the accurate log2, slower, exact codes), or for
    ``fast`` ("fast" rounding: whole |x|) over every normal float32 against FAST_LOG2_BOUND.
    While a CUDA graph is captured or torch.compile traces, before any check, the accurate log2 too."""
    if interpreting() or device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if (index, fast) not in _FAST_LOG2_OK:
        from coscale.kernels.autotune import _cannot_time

        if _cannot_time():
            return False
        err = fast_log2_max_error(torch.device("cuda", index), fast)
        _FAST_LOG2_OK[index, fast] = err <= (FAST_LOG2_BOUND if fast else LOG2_BOUND)
    return _FAST_LOG2_OK[index, fast]


def _seed(rounding: str, seed: int | None) -> int | None:
    if rounding == "stochastic" and seed is None:
        return int(torch.randint(0, 2**31 - 1, (1,)).item())
    return seed


def _encode_backend(backend: str, x: torch.Tensor) -> str:
    """"torch" or "triton" for an encode of x. The kernel reads x as float32 (its tile numbers come from the
    float32 values), so float64 x, whose tile numbers the reference takes from the float64 values, goes to the
    reference under "auto" and is refused under "triton"."""
    if x.dtype == torch.float64:
        if backend == "triton":
            raise CoscaleError("the Triton LogFMT encoder takes fp32/bf16/fp16 x (it computes in float32); "
                               "float64 x runs on backend='torch' (or 'auto'), or convert it first")
        return "torch"
    return select_backend(backend, x, op="logfmt_encode")


def _encode_ref(x, row_src, topk, n_bits, rounding, seed):
    gen = torch.Generator(device=x.device).manual_seed(seed) if seed is not None else None
    return logfmt_encode_ref(_gather_ref(x, row_src, topk), n_bits, rounding, gen)


def logfmt_encode(x: torch.Tensor, n_bits: int = 8, rounding: str = "nearest", seed: int | None = None,
                  backend: str = "auto", block_rows: int | None = None, *, chunk_cols: int | None = None,
                  regather: bool = True):
    """x [N, H] -> (codes [N, H] code_dtype(n_bits), tile_min [N, T] fp32, tile_step [N, T] fp32).
    ``block_rows`` / ``chunk_cols`` / ``regather`` fix the kernel's tile shape (rows per program, columns per
    step of its element phase, the row numbers' layout: coscale.kernels._logfmt_triton.encode_kernel)
    instead of autotuning it: tests.

    ``seed`` (stochastic rounding): the Philox seed of the kernel, or the seed of the reference's
    torch.Generator; None draws one from torch's default generator (reproducible under manual_seed).
    """
    return logfmt_encode_rows(x, None, 1, n_bits, rounding, seed, backend, block_rows, chunk_cols=chunk_cols,
                              regather=regather)


def logfmt_encode_rows(x: torch.Tensor, row_src: torch.Tensor | None, topk: int = 1, n_bits: int = 8,
                       rounding: str = "nearest", seed: int | None = None, backend: str = "auto",
                       block_rows: int | None = None, *, chunk_cols: int | None = None, regather: bool = True):
    """The rows x[row_src[r] // topk] (zeros where row_src[r] < 0; x itself for row_src None) encoded in one
    pass: the MoE permutation (row_src = PermuteInfo.row_pair, topk = K) fused with the encoder."""
    _check_x(x, n_bits, rounding)
    _check_index(row_src, "row_src")
    seed = _seed(rounding, seed)
    if _encode_backend(backend, x) == "torch":
        return _encode_ref(x, row_src, topk, n_bits, rounding, seed)
    return _encode_triton(x, row_src, topk, n_bits, rounding, seed, False, True, block_rows, chunk_cols, regather)


def logfmt_encode_to_rows(x: torch.Tensor, row_src: torch.Tensor | None = None, topk: int = 1, n_bits: int = 8,
                          rounding: str = "nearest", seed: int | None = None, packed: bool = True,
                          backend: str = "auto", block_rows: int | None = None, *,
                          chunk_cols: int | None = None, regather: bool = True) -> torch.Tensor:
    """As logfmt_encode_rows, written as rows of bytes [N, row_bytes(H)[1]] (codes packed, then tile_min
    and tile_step): the dispatch's row selection, encoding and packing in one pass."""
    _check_x(x, n_bits, rounding)
    _check_index(row_src, "row_src")
    seed = _seed(rounding, seed)
    if _encode_backend(backend, x) == "torch":
        return to_rows_ref(*_encode_ref(x, row_src, topk, n_bits, rounding, seed), n_bits, packed)
    return _encode_triton(x, row_src, topk, n_bits, rounding, seed, True, packed, block_rows, chunk_cols, regather)


def logfmt_decode(codes: torch.Tensor, tile_min: torch.Tensor, tile_step: torch.Tensor, n_bits: int = 8,
                  dtype: torch.dtype = torch.float32, backend: str = "auto",
                  block_rows: int | None = None) -> torch.Tensor:
    """(codes [N, H], tile_min [N, T], tile_step [N, T]) -> x [N, H] in dtype."""
    return logfmt_decode_sum(codes, tile_min, tile_step, None, None, n_bits, dtype, backend, block_rows)


def _check_pairs(pair_row, weight, n_rows):
    _check_index(pair_row, "pair_row")
    if pair_row is None:
        return
    if pair_row.dim() != 2:
        raise CoscaleError(f"pair_row must be [T, K], got shape {tuple(pair_row.shape)}")
    if weight is not None and tuple(weight.shape) != tuple(pair_row.shape):
        raise CoscaleError(f"weight must have pair_row's shape {tuple(pair_row.shape)}, got {tuple(weight.shape)}")


def logfmt_decode_sum(codes, tile_min, tile_step, pair_row: torch.Tensor | None = None,
                      weight: torch.Tensor | None = None, n_bits: int = 8, dtype: torch.dtype = torch.float32,
                      backend: str = "auto", block_rows: int | None = None) -> torch.Tensor:
    """out[t] = sum_k weight[t, k] * decode(row pair_row[t, k]) [T, H] in one pass (float32 sums in k
    order): the combine fused with the decoder. pair_row None: plain decoding."""
    _check_codes(codes, tile_min, tile_step, n_bits)
    _check_pairs(pair_row, weight, codes.shape[0])
    if select_backend(backend, codes, op="logfmt_decode") == "torch":
        return _sum_ref(logfmt_decode_ref(codes, tile_min, tile_step, n_bits), pair_row, weight, dtype)
    return _decode_triton((codes, tile_min, tile_step), codes.shape[1], pair_row, weight, n_bits, dtype, True,
                          False, block_rows)


def logfmt_decode_rows(rows: torch.Tensor, hidden: int, pair_row: torch.Tensor | None = None,
                       weight: torch.Tensor | None = None, n_bits: int = 8, dtype: torch.dtype = torch.float32,
                       packed: bool = True, backend: str = "auto", block_rows: int | None = None) -> torch.Tensor:
    """logfmt_decode_sum of rows of bytes (logfmt_encode_to_rows' layout), unpacked in the same pass."""
    _check_bits(n_bits)
    _check_pairs(pair_row, weight, rows.shape[0])
    if select_backend(backend, rows, op="logfmt_decode") == "torch":
        y = logfmt_decode_ref(*from_rows_ref(rows, hidden, n_bits, packed), n_bits)
        return _sum_ref(y, pair_row, weight, dtype)
    total = row_bytes(hidden, n_bits, packed)[1]
    if rows.dim() != 2 or rows.shape[1] != total or rows.dtype != torch.uint8:
        raise CoscaleError(f"LogFMT rows must be [N, {total}] uint8 for hidden {hidden}, got "
                           f"{rows.dtype} {tuple(rows.shape)}")
    rows = rows.contiguous()
    return _decode_triton((rows, rows, rows), hidden, pair_row, weight, n_bits, dtype, packed, True, block_rows)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
