"""MLA decode attention over the paged latent cache (absorbed form), FlashMLA-style, in Triton.

Shape legend: B sequences, S query tokens per sequence (1, or 1 + MTP drafts), H heads, c kv_lora_rank
(512), dr qk_rope_head_dim (64), NB cache blocks, BS tokens per block, nt = ceil(c / 128).

With W_UK absorbed into the query and W_UV into the output (coscale.model.mla), decoding is multi-query
attention of H heads over one shared key/value per token: the key is [c_kv ; k_pe] (c + dr wide) and
the value is c_kv itself. For sequence b, query token t sits at position seq_lens[b] - S + t and sees
the keys at positions <= its own (causal among the S tokens: MTP verification).

    o_lat[b, t, h] = sum_j softmax_j(scale * (q_lat[b,t,h] . c_kv[j] + q_pe[b,t,h] . k_pe[j])) c_kv[j]
    lse[b, t, h]   = log sum_j exp(scale * (...))                               (natural log)

Cache layout (LatentCacheLayer, one layer): latent [NB, BS, c], rope [NB, BS, dr], and for the FP8 format
scale [NB, BS, nt] float32 with latent in float8_e4m3fn: value = latent * scale[tile], tile = col // 128
("FP8 with scale", FlashMLA's 656-byte token at c = 512). block_table [B, W] int32 maps a sequence's
block i (positions i*BS ..) to its cache block; seq_lens [B] int32 counts its keys.

The kernel (two launches, flash-decoding):
1. grid (head groups, splits, B). All S x H query rows of a sequence go into the M dimension of one tile
   (up to 64 rows; DeepSeek-V3's 128 heads take two tiles), so each latent block is read from memory
   once for all heads, as in FlashMLA; the context is cut into `num_splits` contiguous ranges so that
   small batches and long contexts still fill every SM. Each program walks its range BLOCK_N tokens at
   a time through the block table (the next tile's block ids loaded one iteration ahead), computes
   [M, BLOCK_N] scores with tl.dots (latent, rope; each latent tile loaded once for both products), runs
   the online softmax in base 2 and accumulates P @ latent into FP32 accumulators. FP8 tiles are cast
   to fp16 for bf16 queries in tiles of up to 32 rows (exact for e4m3; the query rows scaled by a power
   of two into fp16's range), else to the query's dtype, and each 128-column tile's per-token scale is
   folded into its scores and into P, one accumulator per tile. The configuration (BLOCK_N,
   orientation: heads or keys on the MMA's M, warps, stages) is autotuned per shape; the kernels and
   their design notes are in coscale.kernels._mla_decode_triton.
2. Combine (only when num_splits > 1): per (b, t, h), the partial outputs are merged with weights
   exp(lse_i - lse_max) (the log-sum-exp combine of flash-decoding).
The split count is fixed per launch from the batch size and the longest context (not from the lengths
on the device), so a captured CUDA graph stays valid while the lengths change; each sequence divides
its own blocks among the splits.

Under TRITON_INTERPRET=1 bf16 tl.dot is wrong (docs: shared triton-cpu notes), so the dots upcast to
FP32 when interpreting. `mla_decode_ref` is the plain-PyTorch reference (FP32 or FP64).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch

from coscale.errors import CoscaleError
from coscale.kernels.backend import interpreting, select_backend
from coscale.kernels.library import operator

FP8_TILE = 128
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
MAX_ROWS_PER_TILE = 64  # S x heads rows in one tile: an [M, 512] FP32 accumulator is 128 KB of registers
MAX_SPLITS = 64
# The combine reads every split's slice of a row's columns in one [splits, BLOCK_C] load: at most this many
# FP32 values a program (64 splits: 128 columns, so a 512-column row takes four programs).
COMBINE_ELEMENTS = 8192
# A program's fixed cost (its first loads' latency, the query, the partial output) in keys of work: each
# wave past the first added 7-15 us at batch 64 x 32K on the H200 (run 30: 2 to 16 splits), 200-400 keys
# at a 132nd of copy bandwidth.
PROGRAM_COST_KEYS = 256
# The fewest keys a context split takes (default_num_splits). At batch 1 it is what caps the splits: V2-Lite's
# decode at 544-576 keys took 3 splits of about 190 keys at 256, 11 us a layer for 0.6 MB; at 64, 11 splits, and
# the split and combine kernels 8.2 us a layer instead of 12.4 (run 47's profile of the decode step, 27 layers:
# 163 + 58 us a step against 297 + 39). bench_decode.py --min-split-keys N sets it for a run.
MIN_TOKENS_PER_SPLIT = 64
MAX_FP8_CHUNKS = 4  # the kernel keeps one accumulator per 128-column scale tile: c <= 512 (DeepSeek's)
# An FP8 tile is read in fp16 for tiles of up to 32 query rows: on the H200 (run 22) that was 1.10-1.17x the
# bf16 read at 16 heads, and 0.88x at 128 heads (64-row tiles), where the bf16 read stays.
FP16_READ_MAX_ROWS = 32
# The fp16 read with the cast before the shared-memory round trip (the kernel's EARLY_CVT: no byte-wise
# transposed loads in sm_90 compiles; the cast is the same instruction) from this batch size on. On the
# H200 (run 25, 16 heads) it was 1.04 / 1.34 / 1.40 / 1.31x the plain fp16 read at batch x context 64 x 4K /
# 64 x 32K / 128 x 4K / 128 x 32K, level at 1 x 32K and 0.43x at 1 x 4K (the cast in registers takes the
# latent loads out of the asynchronous copy pipeline, which a short loop per program does not amortise).
FP8_CONVERT_EARLY_MIN_BATCH = 32
# The FP8 tile read whole (the kernel's WHOLE; mla_decode's fp8_whole_tile): each key's per-128-column scales,
# relative to the largest seen so far, multiply the fp16 latent itself, so that one product of each kind and
# one accumulator span all columns, as with a BF16 cache, instead of one per scale tile. In sm_90 compiles
# (triton 3.6, 16 heads, 64-key tiles, 8 warps) its loop has 3 dots, 2 shared-memory stores and 9 loads and
# 3 reductions against 9, 8, 30 and 6 per scale tile, and the kernel 22 barriers against 55 (a BF16 cache: 12).
# Its fp16 rounding of value x scale / smax moves a score by at most 2^-10 of sum |q k| (the tests' bound).
# On the H200 (run 32, 16 heads, graph-timed) it was 1.16-1.19x the per-tile read at batch 64-128 x 4K-32K
# (26-28% -> 30-33% of copy) and 1.12-1.14x at batch 1, with the same error against the reference.
FP8_WHOLE_TILE = True
# Splits for an FP8 cache read whole as if two programs ran on each SM at once (default_num_splits). On the
# H200 (run 32, 16 heads) 4 / 4 / 2 / 2 splits at batch x context 64 x 4K / 64 x 32K / 128 x 4K / 128 x 32K
# took 130.0 / 952.5 / 248.2 / 1,894.1 us against 137.6 / 1,001.0 / 257.4 / 1,981.2 at one program an SM's
# 2 / 2 / 1 / 1 (1.04-1.06x; the autotuner then picked 32-key tiles and 4 warps, two programs an SM). Not for
# 128 heads (64-row tiles, read in bf16, 8 warps): there 2 splits measured 0.99x the 1 of one program an SM.
FP8_PROGRAMS_PER_SM = 2
# An FP8 cache through the warp-specialized Gluon kernel (coscale.kernels._mla_decode_gluon: a TMA loader, a
# converter warpgroup and a wgmma warpgroup with the keys on M) on sm_90, where it takes the case (DeepSeek's
# 512 + 64 widths, pages of whole 64-key tiles, 16 query rows a program, bf16 queries). Measured on the H200 (run
# 47, 16 heads, graph-timed): 55-61% of copy bandwidth at batch 64-128 with 4K-32K contexts against the Triton
# kernel's 33-35% (1.68-1.73x), 1.6-1.8x at batch 1; within FP8's bound of the float64 reference on the GPU
# (tests/test_mla_decode_gluon.py). mla_decode(fp8_gluon=False) keeps the Triton kernel.
FP8_GLUON = True
# Which Gluon kernel: "registers" (coscale.kernels._mla_decode_gluon_regs: both MMA warpgroups cast the e4m3 tile
# into wgmma's register operand, about half the shared-memory traffic) or "converter" (coscale.kernels.
# _mla_decode_gluon: a converter warpgroup writes each tile to shared memory in fp16 for both products). Run 48 (an
# H100; no H200 was lent): "registers" 1.01-1.08x "converter" at batch 64-128 with 4K-32K contexts (942 against
# 1,021 us at 128 x 32K: 2.93 TB/s, about the H100's copy bandwidth, where "converter" takes the H200's time), 1.13x
# at 1 x 32K, 0.82x at 1 x 4K (13.2 against 10.8 us); both pass the GPU tests. The H200 will tell which stays.
FP8_GLUON_DESIGN = "registers"
GLUON_DESIGNS = ("converter", "registers")


def _gluon_kernels(design: str | None = None):
    """The module of the Gluon FP8 kernel of ``design`` (default FP8_GLUON_DESIGN)."""
    design = FP8_GLUON_DESIGN if design is None else design
    if design not in GLUON_DESIGNS:
        raise CoscaleError(f"mla_decode: FP8_GLUON_DESIGN must be one of {GLUON_DESIGNS}, got {design!r}")
    if design == "registers":
        from coscale.kernels import _mla_decode_gluon_regs as kernels
    else:
        from coscale.kernels import _mla_decode_gluon as kernels
    return kernels


@dataclass
class LatentCacheLayer:
    """One layer of the paged cache (see the module docstring for the layout)."""

    latent: torch.Tensor  # [NB, BS, c] model dtype, or float8_e4m3fn
    rope: torch.Tensor  # [NB, BS, dr]
    scale: torch.Tensor | None = None  # [NB, BS, nt] float32 for the FP8 format

    @property
    def block_size(self) -> int:
        return self.latent.shape[1]


# ---------------------------------------------------------------------------------------------------
# The FP8 cache format and the cache's read/write (plain PyTorch: writes are small, reads are the kernel's)
# ---------------------------------------------------------------------------------------------------


def quantize_latent_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, c] -> (e4m3 [N, c], scale [N, nt] float32), one scale per 1x128 tile (amax / 448).
    An all-zero tile gets scale 1; non-finite values are clamped to the format's range."""
    N, c = x.shape
    nt = math.ceil(c / FP8_TILE)
    padded = torch.nn.functional.pad(x.float(), (0, nt * FP8_TILE - c)).view(N, nt, FP8_TILE)
    amax = padded.abs().amax(dim=-1).nan_to_num(nan=FP8_MAX, posinf=FP8_MAX)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (padded / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).view(N, -1)[:, :c]
    return q.to(torch.float8_e4m3fn), scale


def dequantize_latent_fp8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of quantize_latent_fp8: q [..., c] e4m3, scale [..., nt] -> [..., c] in dtype."""
    c = q.shape[-1]
    expanded = scale.float().repeat_interleave(FP8_TILE, dim=-1)[..., :c]
    return (q.float() * expanded).to(dtype)


def write_latent(layer: LatentCacheLayer, slots: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
    """Store c_kv [N, c] and k_pe [N, dr] at slots [N] (int64 block * BS + row), quantizing for FP8."""
    latent = layer.latent.view(-1, layer.latent.shape[-1])
    if layer.scale is None:
        latent[slots] = c_kv.to(latent.dtype)
    else:
        q, scale = quantize_latent_fp8(c_kv)
        latent[slots] = q
        layer.scale.view(-1, layer.scale.shape[-1])[slots] = scale
    layer.rope.view(-1, layer.rope.shape[-1])[slots] = k_pe.to(layer.rope.dtype)


def gather_latent(layer: LatentCacheLayer, slots: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """c_kv [T, c] and k_pe [T, dr] at slots [T], dequantized to dtype."""
    latent = layer.latent.view(-1, layer.latent.shape[-1])[slots]
    rope = layer.rope.view(-1, layer.rope.shape[-1])[slots].to(dtype)
    if layer.scale is None:
        return latent.to(dtype), rope
    return dequantize_latent_fp8(latent, layer.scale.view(-1, layer.scale.shape[-1])[slots], dtype), rope


def sequence_slots(block_table_row: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Slots of positions [0, length) of a sequence whose block table row is block_table_row."""
    pos = torch.arange(length, device=block_table_row.device)
    return block_table_row.long()[pos // block_size] * block_size + pos % block_size


# ---------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------


def mla_decode_ref(q_lat, q_pe, cache: LatentCacheLayer, block_table, seq_lens, softmax_scale: float):
    """Plain-PyTorch MLA decode (module docstring): o_lat [B, S, H, c] in q_lat's dtype, lse [B, S, H]
    float32. Computes in float64 for float64 queries, else float32."""
    B, S, H, c = q_lat.shape
    acc = torch.float64 if q_lat.dtype == torch.float64 else torch.float32
    out = torch.empty(B, S, H, c, dtype=acc, device=q_lat.device)
    lse = torch.empty(B, S, H, dtype=acc, device=q_lat.device)
    for b in range(B):
        T = int(seq_lens[b])
        c_kv, k_pe = gather_latent(cache, sequence_slots(block_table[b], T, cache.block_size), acc)
        scores = torch.einsum("shc,tc->sht", q_lat[b].to(acc), c_kv)
        scores = (scores + torch.einsum("shr,tr->sht", q_pe[b].to(acc), k_pe)) * softmax_scale
        q_pos = torch.arange(T - S, T, device=q_lat.device)
        future = torch.arange(T, device=q_lat.device)[None, :] > q_pos[:, None]  # (S, T)
        scores = scores.masked_fill(future[:, None, :], float("-inf"))
        lse[b] = torch.logsumexp(scores, dim=-1)
        out[b] = torch.einsum("sht,tc->shc", torch.exp(scores - lse[b][..., None]), c_kv)
    return out.to(q_lat.dtype), lse.float()


# ---------------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------------


@functools.cache
def _build_kernels(interpret: bool):
    """The split and combine kernels (imported on first use; ``interpret`` keys the cache, as
    triton.jit picks the interpreter when the module is imported)."""
    from coscale.kernels._mla_decode_triton import mla_decode_combine_kernel, mla_decode_split_kernel

    return mla_decode_split_kernel, mla_decode_combine_kernel


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def heads_per_tile(num_heads: int, s_q: int, max_rows: int = MAX_ROWS_PER_TILE) -> int:
    """Heads sharing one tile: all of them when S x H fits in max_rows (DeepSeek-V2-Lite's 16 heads,
    MTP included), else as many as fit (DeepSeek-V3's 128 heads: two tiles of 64)."""
    return max(1, min(num_heads, max_rows // s_q))


def default_num_splits(batch: int, head_groups: int, max_seq_len: int, device: torch.device,
                       min_tokens_per_split: int | None = None, sms: int | None = None,
                       programs_per_sm: int = 1) -> int:
    """Context splits per sequence: the count whose programs finish soonest when each SM runs
    ``programs_per_sm`` at a time: the least ``waves x (keys per split + PROGRAM_COST_KEYS)`` (waves =
    ceil(programs / (SMs x programs_per_sm))), the fewest splits among equals, each split at least
    `min_tokens_per_split` keys (default MIN_TOKENS_PER_SPLIT).

    Why waves: the largest tiles hold one program per SM (64 keys x 576 x 2 bytes x 3 stages of shared
    memory), and a last wave that fills a few SMs costs as much as a full one. On the H200 (run 30,
    batch 64 x 32K, 132 SMs) 2, 4 and 6 splits (one, two and three full waves) took 603-617 us and 5 splits
    (320 programs: three waves, the last of 56 programs) 714 us; the earlier rule, about two programs per
    SM, picked the 5. ``sms``: the SM count (default: the device's; 8 on a CPU).

    An FP8 cache read whole (``programs_per_sm`` FP8_PROGRAMS_PER_SM in mla_decode): its loop converts each
    tile in registers between two shared-memory trips, and two programs of 32-key tiles fit an SM, so one program's
    conversion runs while the other's loads are in flight."""
    if sms is None:
        sms = _num_sms(device.index or 0) if device.type == "cuda" else 8
    programs = max(1, batch * head_groups)
    min_tokens_per_split = min_tokens_per_split or MIN_TOKENS_PER_SPLIT
    longest = max(1, min(MAX_SPLITS, -(-max_seq_len // min_tokens_per_split)))
    slots = sms * max(1, programs_per_sm)

    def finish(splits: int) -> tuple[int, int]:
        waves = -(-programs * splits // slots)
        return waves * (-(-max_seq_len // splits) + PROGRAM_COST_KEYS), splits

    return min(range(1, longest + 1), key=finish)


def _check(q_lat, q_pe, cache: LatentCacheLayer, block_table, seq_lens):
    if q_lat.dim() != 4 or q_pe.dim() != 4 or q_pe.shape[:3] != q_lat.shape[:3]:
        raise CoscaleError(f"q_lat must be [B, S, H, c] and q_pe [B, S, H, dr]; got {tuple(q_lat.shape)}, "
                           f"{tuple(q_pe.shape)}")
    c, dr = cache.latent.shape[-1], cache.rope.shape[-1]
    if q_lat.shape[-1] != c or q_pe.shape[-1] != dr:
        raise CoscaleError(f"queries (c={q_lat.shape[-1]}, dr={q_pe.shape[-1]}) do not match the cache "
                           f"(c={c}, dr={dr})")
    if block_table.dim() != 2 or block_table.shape[0] != q_lat.shape[0] or seq_lens.shape != (q_lat.shape[0],):
        raise CoscaleError(f"block_table must be [B, W] and seq_lens [B] for B={q_lat.shape[0]}")
    if (cache.scale is None) != (cache.latent.dtype != torch.float8_e4m3fn):
        raise CoscaleError("an FP8 latent cache needs its scales (and only an FP8 one has them)")


CONFIG_KEYS = ("BLOCK_N", "SWAP", "num_warps", "num_stages")


def _checked_config(cfg: dict) -> dict:
    if not set(CONFIG_KEYS) <= set(cfg) <= set(CONFIG_KEYS) | {"LAZY"}:
        raise CoscaleError(f"kernel_config needs the keys {CONFIG_KEYS} (and may have LAZY); got {sorted(cfg)}")
    n = cfg["BLOCK_N"]
    if n < 16 or n & (n - 1) or cfg["SWAP"] not in (0, 1) or cfg.get("LAZY", 0) not in (0, 1):
        raise CoscaleError(f"kernel_config: BLOCK_N must be a power of two >= 16, SWAP and LAZY 0 or 1; got {cfg}")
    return {"LAZY": 0, **cfg}


def tuned_config() -> dict | None:
    """The split kernel's configuration of its last autotuned launch (None before one): for benchmarks."""
    cfg = getattr(_build_kernels(interpreting())[0], "best_config", None)
    if cfg is None:
        return None
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def mla_decode(q_lat, q_pe, cache: LatentCacheLayer, block_table, seq_lens, softmax_scale: float, *,
               max_seq_len: int | None = None, num_splits: int | None = None, heads_tile: int | None = None,
               kernel_config: dict | None = None, fp8_in_fp16: bool = True, fp8_convert_early: bool | None = None,
               fp8_whole_tile: bool | None = None, fp8_gluon: bool | None = None, backend: str = "auto"):
    """MLA decode over the paged latent cache (module docstring). q_lat [B, S, H, c], q_pe [B, S, H, dr]
    (bf16 on a GPU; the kernel's dots run in q_lat's dtype), block_table [B, W] int32, seq_lens [B]
    int32 (each >= S). Returns (o_lat [B, S, H, c] in q_lat's dtype, lse [B, S, H] float32).

    max_seq_len: a bound on seq_lens (host int; default: the block table's width x BS) that sizes the
    context split; num_splits / heads_tile override the heuristics (benchmarks); kernel_config fixes the
    split kernel's configuration instead of autotuning it (keys BLOCK_N, SWAP, num_warps, num_stages; see
    CONFIG_KEYS; optionally LAZY=1, lazy rescaling, not among the autotuned candidates: it paid little on
    the H200), for tests and benchmarks. fp8_in_fp16=False reads an FP8 cache through bf16 as the
    kernel did before (for benchmarks that compare the two); fp8_convert_early casts the fp16-read tile before its
    shared-memory round trip (default: from batch FP8_CONVERT_EARLY_MIN_BATCH on); fp8_whole_tile reads an
    FP8 tile whole, its scales folded into the latent (default FP8_WHOLE_TILE; for latent widths 128, 256 and
    512, with the latent read in fp16 (or fp32), without LAZY); fp8_gluon runs an FP8 cache through the Gluon
    kernel (default FP8_GLUON; on sm_90 where ``_mla_decode_gluon.supports`` the case, else an error when asked
    for)."""
    _check(q_lat, q_pe, cache, block_table, seq_lens)
    if select_backend(backend, q_lat, op="mla_decode") == "torch":
        return mla_decode_ref(q_lat, q_pe, cache, block_table, seq_lens, softmax_scale)
    B, S, H, c = q_lat.shape
    if cache.scale is not None and c > MAX_FP8_CHUNKS * FP8_TILE:
        raise CoscaleError(f"the Triton MLA decode kernel reads FP8 latents of at most "
                           f"{MAX_FP8_CHUNKS * FP8_TILE} columns (got {c}); use backend='torch'")
    dr, page = q_pe.shape[-1], cache.block_size
    q_lat, q_pe = q_lat.contiguous(), q_pe.contiguous()
    tile = heads_tile or heads_per_tile(H, S)
    groups = -(-H // tile)
    fp8 = cache.scale is not None
    dot_fp32 = interpreting() or q_lat.dtype == torch.float32
    rows = max(16, _next_pow2(S * tile))
    lat_fp16 = fp8 and fp8_in_fp16 and q_lat.dtype != torch.float32 and rows <= FP16_READ_MAX_ROWS
    early = lat_fp16 and not dot_fp32 and (
        B >= FP8_CONVERT_EARLY_MIN_BATCH if fp8_convert_early is None else fp8_convert_early)
    block_c = max(16, _next_pow2(c))
    # (the whole-tile read needs the fp16 latent, or fp32: a bf16 one would round value x scale to 8 bits)
    whole = (fp8 and (FP8_WHOLE_TILE if fp8_whole_tile is None else fp8_whole_tile) and c in (128, 256, 512)
             and (lat_fp16 or dot_fp32) and not (kernel_config or {}).get("LAZY"))
    chunk = min(FP8_TILE, block_c) if fp8 and not whole else block_c
    gluon = _use_gluon(fp8_gluon, cache, q_lat, q_pe, block_table, rows, kernel_config, dot_fp32)
    bound = max_seq_len if max_seq_len is not None else block_table.shape[1] * page
    splits = num_splits or default_num_splits(B, groups, bound, q_lat.device,
                                              programs_per_sm=FP8_PROGRAMS_PER_SM if whole and not gluon else 1)
    out = torch.empty_like(q_lat)
    lse = torch.empty(B, S, H, dtype=torch.float32, device=q_lat.device)
    if out.numel() == 0:
        return out, lse
    part = torch.empty(B, S, H, splits, c, dtype=torch.float32, device=q_lat.device) if splits > 1 else None
    part_lse = torch.empty(B, S, H, splits, dtype=torch.float32, device=q_lat.device) if splits > 1 else None
    split_kernel, combine_kernel = _build_kernels(interpreting())
    o = part if splits > 1 else out.unsqueeze(3)  # [B, S, H, splits, c]
    o_lse = part_lse if splits > 1 else lse.unsqueeze(3)
    assert o_lse.stride(3) == 1, "the split kernel stores the log-sum-exp of split j at offset j"
    scale_log2 = softmax_scale * math.log2(math.e)
    if gluon:
        gluon = _launch_gluon(fp8_gluon, q_lat, q_pe, cache, block_table, seq_lens, o, o_lse, heads_tile=tile,
                              rows=rows, num_splits=splits, sm_scale_log2=scale_log2)
    if not gluon:
        scale = cache.scale if fp8 else cache.rope  # any tensor: never read without FP8
        args = (
            q_lat, q_pe, cache.latent, cache.rope, scale, block_table, seq_lens, o, o_lse,
            q_lat.stride(0), q_lat.stride(1), q_lat.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
            cache.latent.stride(0), cache.latent.stride(1), cache.rope.stride(0), cache.rope.stride(1),
            scale.stride(0), scale.stride(1), block_table.stride(0),
            o.stride(0), o.stride(1), o.stride(2), o.stride(3), o_lse.stride(0), o_lse.stride(1), o_lse.stride(2),
            H, splits, _next_pow2(B), scale_log2,
        )  # fmt: skip
        consts = dict(
            C=c, DR=dr, S_Q=S, HEADS_TILE=tile, BLOCK_M=rows, CHUNK=chunk,
            NUM_CHUNKS=math.ceil(c / chunk), BLOCK_R=max(16, _next_pow2(dr)), PAGE=page, FP8=fp8,
            LAT_FP16=lat_fp16, EARLY_CVT=early, WHOLE=whole, NT=c // FP8_TILE if whole else 1,
            DOT_FP32=dot_fp32,
            PRECISION="ieee" if dot_fp32 else "tf32",
        )  # fmt: skip
        if kernel_config is None:
            split_kernel[(groups, splits, B)](*args, **consts)
        else:  # a fixed configuration (tests, benchmarks): the autotuner's kernel without the tuning
            split_kernel.fn[(groups, splits, B)](*args, **consts, **_checked_config(kernel_config))
    if splits > 1:
        combine_cols = max(16, min(_next_pow2(c), COMBINE_ELEMENTS // max(2, _next_pow2(splits))))
        combine_kernel[(S * H, B, -(-c // combine_cols))](
            part, part_lse, out, lse, H,
            part.stride(0), part.stride(1), part.stride(2), part.stride(3),
            part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
            C=c, BLOCK_C=combine_cols, NUM_SPLITS=splits, SPLITS_P2=max(2, _next_pow2(splits)),
        )  # fmt: skip
    return out, lse


def _launch_gluon(fp8_gluon: bool | None, q_lat, q_pe, cache: LatentCacheLayer, block_table, seq_lens, o, o_lse,
                  **launch) -> bool:
    """Launch the Gluon kernel; False where it fails to compile and was not asked for explicitly (Gluon is Triton's
    experimental API, and a Triton other than the ones it was built on may reject it): a warning, FP8_GLUON off,
    and the caller runs the Triton kernel."""
    global FP8_GLUON
    try:
        _gluon_kernels().launch_mla_decode_fp8_gluon(q_lat, q_pe, cache.latent, cache.rope, cache.scale, block_table,
                                                     seq_lens, o, o_lse, **launch)
        return True
    except Exception as exc:  # noqa: BLE001  (a compiler error of any kind: the Triton kernel takes over)
        if fp8_gluon:
            raise
        FP8_GLUON = False
        warnings.warn(f"mla_decode: the Gluon FP8 kernel failed ({type(exc).__name__}: {exc}); the Triton kernel "
                      "runs from now on (mla_decode.FP8_GLUON = False)", RuntimeWarning, stacklevel=3)
        return False


def _use_gluon(fp8_gluon: bool | None, cache: LatentCacheLayer, q_lat, q_pe, block_table, rows: int, kernel_config,
               dot_fp32: bool) -> bool:
    """Whether this call runs the Gluon FP8 kernel: when asked for (or by default, FP8_GLUON) and it takes the case;
    asked for explicitly where it cannot run, a clear error."""
    wanted = FP8_GLUON if fp8_gluon is None else fp8_gluon
    if not wanted or cache.scale is None:
        return False
    on_sm90 = (not dot_fp32 and q_lat.device.type == "cuda"
               and torch.cuda.get_device_capability(q_lat.device) == (9, 0))
    why = gluon_refusal(cache, q_lat.dtype, rows, kernel_config, on_sm90, q_pe.dtype, block_table.dtype)
    if why is None:
        return True
    if fp8_gluon:
        raise CoscaleError(f"fp8_gluon: the Gluon MLA decode kernel cannot run this call: {why}")
    return False


def gluon_refusal(cache: LatentCacheLayer, q_dtype: torch.dtype, rows: int, kernel_config, on_sm90: bool,
                  q_pe_dtype: torch.dtype = torch.bfloat16, table_dtype: torch.dtype = torch.int32) -> str | None:
    """Why the Gluon FP8 kernel cannot run a call on this cache (None: it can). ``on_sm90``: an sm_90 GPU holds the
    tensors and the kernels are compiled, not interpreted. The kernel's TMA descriptors and products are built for
    bf16 queries and RoPE keys, float32 scales and an int32 block table: any other dtype keeps the Triton kernel
    (a cache in the model's fp16, say) rather than failing to compile."""
    gk = _gluon_kernels()
    c, dr, page = cache.latent.shape[-1], cache.rope.shape[-1], cache.block_size
    if cache.scale is None:
        return "it reads an FP8 cache"
    if not on_sm90:
        return "it runs on an sm_90 GPU (Hopper) with bf16 queries, not under the interpreter"
    if kernel_config is not None:
        return "kernel_config fixes the Triton kernel's configuration"
    if not gk.supports(c, dr, page, rows, True, q_dtype):
        return (f"it takes c = 512, dr = 64, pages of a multiple of {gk.BLOCK_N} keys and at most {gk.MAX_ROWS} "
                f"query rows (got c = {c}, dr = {dr}, page = {page}, {rows} rows, {q_dtype} queries)")
    dtypes = (q_pe_dtype, cache.rope.dtype, cache.scale.dtype, table_dtype)
    if dtypes != (torch.bfloat16, torch.bfloat16, torch.float32, torch.int32):
        return (f"it takes a bf16 q_pe and RoPE cache, float32 scales and an int32 block table (got "
                f"{', '.join(str(d).removeprefix('torch.') for d in dtypes)})")
    if not all(t.is_contiguous() for t in (cache.latent, cache.rope, cache.scale)):
        return "it reads contiguous cache tensors"
    if not gk.gluon_decode_available():
        return "this Triton has no Gluon Hopper API"
    return None


def _fake_mla_decode(q_lat, q_pe, latent, rope, scale, block_table, seq_lens, softmax_scale, max_seq_len, backend):
    B, S, H, c = q_lat.shape
    return q_lat.new_empty(B, S, H, c), q_lat.new_empty(B, S, H, dtype=torch.float32)


@operator("mla_decode", opaque=True, fake=_fake_mla_decode)
def mla_decode_op(
    q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor, scale: torch.Tensor | None,
    block_table: torch.Tensor, seq_lens: torch.Tensor, softmax_scale: float, max_seq_len: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`mla_decode` as the opaque operator ``coscale::mla_decode`` (cache layer unpacked): the launcher
    sizes its context split and autotunes on the host, so torch.compile calls it as it is, and the
    compiled decode step stays one graph (a graph break per layer would recompile per layer)."""
    return mla_decode(q_lat, q_pe, LatentCacheLayer(latent, rope, scale), block_table, seq_lens, softmax_scale,
                      max_seq_len=max_seq_len, backend=backend)


def paged_mla_decode(q_lat, q_pe, cache: LatentCacheLayer, block_table, seq_lens, softmax_scale: float,
                     max_seq_len: int, backend: str = "auto"):
    """What the model's decode calls: :func:`mla_decode` through its operator (o_lat, lse)."""
    return mla_decode_op(q_lat, q_pe, cache.latent, cache.rope, cache.scale, block_table, seq_lens,
                         float(softmax_scale), int(max_seq_len), backend)


def calibration_case(batch: int, queries: int, heads: int, context: int, latent: int, rope: int,
                     device, block_size: int = 64):
    """The call ``coscale calibrate --attention triton`` times: this kernel over a BF16 paged cache of
    ``batch`` sequences of ``context`` tokens, each sequence's blocks contiguous (the calibrate backend
    contract: build the inputs, return the call)."""
    blocks = -(-context // block_size)
    dtype = torch.bfloat16
    cache = LatentCacheLayer(torch.randn(batch * blocks, block_size, latent, device=device, dtype=dtype),
                             torch.randn(batch * blocks, block_size, rope, device=device, dtype=dtype))
    table = torch.arange(batch * blocks, device=device, dtype=torch.int32).view(batch, blocks)
    lens = torch.full((batch,), context, device=device, dtype=torch.int32)
    q_lat = torch.randn(batch, queries, heads, latent, device=device, dtype=dtype)
    q_pe = torch.randn(batch, queries, heads, rope, device=device, dtype=dtype)
    scale = (latent + rope) ** -0.5
    return lambda: mla_decode(q_lat, q_pe, cache, table, lens, scale, max_seq_len=context)
