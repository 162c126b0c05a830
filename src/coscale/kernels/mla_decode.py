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
   a time through the block table, computes [M, BLOCK_N] scores with two tl.dots (latent, rope), runs
   the online softmax in base 2 and accumulates P @ latent into an [M, c] FP32 accumulator. FP8 tiles
   are dequantized in registers (fp8 -> fp32 * scale -> bf16) before the dots.
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
from dataclasses import dataclass

import torch

from coscale.errors import CoscaleError
from coscale.kernels.autotune import triton_autotune
from coscale.kernels.backend import interpreting, select_backend

FP8_TILE = 128
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
MAX_ROWS_PER_TILE = 64  # S x heads rows in one tile: an [M, 512] FP32 accumulator is 128 KB of registers
MAX_SPLITS = 64


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


def _configs(triton):
    """(the GPU's configurations, the interpreter's one) for coscale.kernels.autotune.triton_autotune:
    key blocks of 16-64 tokens, 2-4 pipeline stages (the loads are what the kernel waits for)."""
    gpu = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
           for n, w, s in [(64, 4, 2), (64, 8, 2), (32, 4, 3), (32, 4, 4), (32, 8, 3), (16, 4, 4), (64, 4, 3)]]
    return gpu, triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)


@functools.cache
def _build_kernels(interpret: bool):
    import triton
    import triton.language as tl

    @triton_autotune(*_configs(triton), key=["C", "DR", "S_Q", "HEADS_TILE", "NUM_SPLITS", "FP8", "PAGE"])
    @triton.jit
    def mla_decode_split_kernel(
        q_ptr, qpe_ptr, latent_ptr, rope_ptr, scale_ptr, table_ptr, seq_lens_ptr, out_ptr, lse_ptr,
        stride_qb, stride_qs, stride_qh, stride_pb, stride_ps, stride_ph,
        stride_lblk, stride_ltok, stride_rblk, stride_rtok, stride_sblk, stride_stok, stride_table,
        stride_ob, stride_os, stride_oh, stride_osplit, stride_lb, stride_ls, stride_lh,
        H, sm_scale_log2,
        C: tl.constexpr, DR: tl.constexpr, S_Q: tl.constexpr, HEADS_TILE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, NUM_SPLITS: tl.constexpr,
        PAGE: tl.constexpr, FP8: tl.constexpr, TILE: tl.constexpr, NUM_TILES: tl.constexpr, DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        group, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + b)
        per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), NUM_SPLITS) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, seq_len)

        rows = tl.arange(0, BLOCK_M)
        token = rows // HEADS_TILE
        head = group * HEADS_TILE + rows % HEADS_TILE
        row_ok = (token < S_Q) & (head < H)
        last_key = seq_len - S_Q + token  # causal among the S_Q query tokens
        offs_c = tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, BLOCK_R)
        q = tl.load(q_ptr + b * stride_qb + token[:, None] * stride_qs + head[:, None] * stride_qh + offs_c[None, :],
                    mask=row_ok[:, None] & (offs_c[None, :] < C), other=0.0)
        qpe = tl.load(qpe_ptr + b * stride_pb + token[:, None] * stride_ps + head[:, None] * stride_ph
                      + offs_r[None, :], mask=row_ok[:, None] & (offs_r[None, :] < DR), other=0.0)
        dot_dtype = tl.float32 if DOT_FP32 else q.dtype
        q = q.to(dot_dtype)
        qpe = qpe.to(dot_dtype)

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
        table_row = table_ptr + b * stride_table
        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            key_ok = pos < hi
            block = tl.load(table_row + pos // PAGE, mask=key_ok, other=0).to(tl.int64)
            in_block = pos % PAGE
            lat_rows = latent_ptr + block * stride_lblk + in_block * stride_ltok
            k = tl.load(lat_rows[:, None] + offs_c[None, :], mask=key_ok[:, None] & (offs_c[None, :] < C),
                        other=0.0, eviction_policy="evict_first")
            if FP8:  # one scale per TILE columns: load [BLOCK_N, NT] scales, broadcast over each tile
                offs_t = tl.arange(0, BLOCK_C // TILE)
                s_rows = scale_ptr + block * stride_sblk + in_block * stride_stok
                k_scale = tl.load(s_rows[:, None] + offs_t[None, :],
                                  mask=key_ok[:, None] & (offs_t[None, :] < NUM_TILES), other=0.0)
                k = tl.reshape(k.to(tl.float32), (BLOCK_N, BLOCK_C // TILE, TILE)) * k_scale[:, :, None]
                k = tl.reshape(k, (BLOCK_N, BLOCK_C)).to(dot_dtype)
            else:
                k = k.to(dot_dtype)
            kr = tl.load(rope_ptr + block[:, None] * stride_rblk + in_block[:, None] * stride_rtok + offs_r[None, :],
                         mask=key_ok[:, None] & (offs_r[None, :] < DR), other=0.0,
                         eviction_policy="evict_first").to(dot_dtype)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            s += tl.dot(qpe, tl.trans(kr), input_precision=PRECISION)
            visible = key_ok[None, :] & (pos[None, :] <= last_key[:, None])
            s = tl.where(visible, s * sm_scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), k, input_precision=PRECISION)
            m_i = m_new

        has_keys = l_i > 0
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        o_ptrs = (out_ptr + b * stride_ob + token[:, None] * stride_os + head[:, None] * stride_oh
                  + split * stride_osplit + offs_c[None, :])
        # A split past the end of a short sequence stores only its lse (-inf): the combine skips it, so
        # graphs sized for long contexts do not pay for empty partial outputs.
        if NUM_SPLITS == 1:
            keep = row_ok
        else:
            keep = row_ok & (lo + tl.zeros([BLOCK_M], tl.int32) < hi)
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=keep[:, None] & (offs_c[None, :] < C))
        tl.store(lse_ptr + b * stride_lb + token * stride_ls + head * stride_lh + split, lse, mask=row_ok)

    @triton.jit
    def mla_decode_combine_kernel(
        part_ptr, part_lse_ptr, out_ptr, lse_ptr, H,
        stride_pb, stride_ps, stride_ph, stride_psplit, stride_lb, stride_ls, stride_lh,
        stride_ob, stride_os, stride_oh, stride_fb, stride_fs, stride_fh,
        C: tl.constexpr, BLOCK_C: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
    ):  # fmt: skip
        b, row = tl.program_id(1), tl.program_id(0)
        t, h = row // H, row % H
        offs_s = tl.arange(0, SPLITS_P2)
        lse = tl.load(part_lse_ptr + b * stride_lb + t * stride_ls + h * stride_lh + offs_s,
                      mask=offs_s < NUM_SPLITS, other=float("-inf"))
        lse_max = tl.max(lse, axis=0)
        weights = tl.exp(lse - lse_max)
        total = tl.sum(weights, axis=0)
        offs_c = tl.arange(0, BLOCK_C)
        acc = tl.zeros((BLOCK_C,), tl.float32)
        base = part_ptr + b * stride_pb + t * stride_ps + h * stride_ph + offs_c
        for i in range(NUM_SPLITS):
            w = tl.sum(tl.where(offs_s == i, weights, 0.0), axis=0)
            if w > 0:  # skip splits without keys (their partial output is never read)
                acc += w * tl.load(base + i * stride_psplit, mask=offs_c < C, other=0.0)
        tl.store(out_ptr + b * stride_ob + t * stride_os + h * stride_oh + offs_c,
                 (acc / total).to(out_ptr.dtype.element_ty), mask=offs_c < C)
        tl.store(lse_ptr + b * stride_fb + t * stride_fs + h * stride_fh, lse_max + tl.log(total))

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
                       min_tokens_per_split: int = 256) -> int:
    """Context splits per sequence: enough programs for about two per SM, each with at least
    `min_tokens_per_split` keys (fewer splits spend less on the combine's partial outputs)."""
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 8
    wanted = -(-2 * sms // max(1, batch * head_groups))
    longest = max(1, -(-max_seq_len // min_tokens_per_split))
    return max(1, min(wanted, longest, MAX_SPLITS))


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


def mla_decode(q_lat, q_pe, cache: LatentCacheLayer, block_table, seq_lens, softmax_scale: float, *,
               max_seq_len: int | None = None, num_splits: int | None = None, heads_tile: int | None = None,
               backend: str = "auto"):
    """MLA decode over the paged latent cache (module docstring). q_lat [B, S, H, c], q_pe [B, S, H, dr]
    (bf16 on a GPU; the kernel's dots run in q_lat's dtype), block_table [B, W] int32, seq_lens [B]
    int32 (each >= S). Returns (o_lat [B, S, H, c] in q_lat's dtype, lse [B, S, H] float32).

    max_seq_len: a bound on seq_lens (host int; default: the block table's width x BS) that sizes the
    context split; num_splits / heads_tile override the heuristics (benchmarks)."""
    _check(q_lat, q_pe, cache, block_table, seq_lens)
    if select_backend(backend, q_lat, op="mla_decode") == "torch":
        return mla_decode_ref(q_lat, q_pe, cache, block_table, seq_lens, softmax_scale)
    B, S, H, c = q_lat.shape
    dr, page = q_pe.shape[-1], cache.block_size
    q_lat, q_pe = q_lat.contiguous(), q_pe.contiguous()
    tile = heads_tile or heads_per_tile(H, S)
    groups = -(-H // tile)
    bound = max_seq_len if max_seq_len is not None else block_table.shape[1] * page
    splits = num_splits or default_num_splits(B, groups, bound, q_lat.device)
    out = torch.empty_like(q_lat)
    lse = torch.empty(B, S, H, dtype=torch.float32, device=q_lat.device)
    if out.numel() == 0:
        return out, lse
    part = torch.empty(B, S, H, splits, c, dtype=torch.float32, device=q_lat.device) if splits > 1 else None
    part_lse = torch.empty(B, S, H, splits, dtype=torch.float32, device=q_lat.device) if splits > 1 else None
    split_kernel, combine_kernel = _build_kernels(interpreting())
    fp8 = cache.scale is not None
    scale = cache.scale if fp8 else cache.rope  # any tensor: never read without FP8
    o = part if splits > 1 else out.unsqueeze(3)  # [B, S, H, splits, c]
    o_lse = part_lse if splits > 1 else lse.unsqueeze(3)
    dot_fp32 = interpreting() or q_lat.dtype == torch.float32
    split_kernel[(groups, splits, B)](
        q_lat, q_pe, cache.latent, cache.rope, scale, block_table, seq_lens, o, o_lse,
        q_lat.stride(0), q_lat.stride(1), q_lat.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        cache.latent.stride(0), cache.latent.stride(1), cache.rope.stride(0), cache.rope.stride(1),
        scale.stride(0), scale.stride(1), block_table.stride(0),
        o.stride(0), o.stride(1), o.stride(2), o.stride(3), o_lse.stride(0), o_lse.stride(1), o_lse.stride(2),
        H, softmax_scale * math.log2(math.e),
        C=c, DR=dr, S_Q=S, HEADS_TILE=tile, BLOCK_M=max(16, _next_pow2(S * tile)), BLOCK_C=max(16, _next_pow2(c)),
        BLOCK_R=max(16, _next_pow2(dr)), NUM_SPLITS=splits, PAGE=page, FP8=fp8,
        TILE=min(FP8_TILE, max(16, _next_pow2(c))), NUM_TILES=math.ceil(c / FP8_TILE),
        DOT_FP32=dot_fp32, PRECISION="ieee" if dot_fp32 else "tf32",
    )  # fmt: skip
    if splits > 1:
        combine_kernel[(S * H, B)](
            part, part_lse, out, lse, H,
            part.stride(0), part.stride(1), part.stride(2), part.stride(3),
            part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
            C=c, BLOCK_C=max(16, _next_pow2(c)), NUM_SPLITS=splits, SPLITS_P2=max(2, _next_pow2(splits)),
        )  # fmt: skip
    return out, lse
