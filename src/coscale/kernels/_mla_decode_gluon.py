"""MLA decode over an FP8 paged latent cache as a warp-specialized Gluon kernel for Hopper (sm_90).

The same operation, cache format and outputs as ``mla_decode_split_kernel`` (coscale.kernels._mla_decode_triton)
with an FP8 cache: one program per (head group, context split, sequence) writes its split's partial output and
log-sum-exp, which the Triton combine kernel merges. What differs is the schedule, FlashMLA's for its FP8 cache:

- a loader partition (one warp) copies each 64-key tile by TMA: the e4m3 latent in two halves of [32, 4, 128]
  into a ring of ``LAT_STAGES`` half-tile buffers, the BF16 RoPE key [64, 64] and the scales [64, 4] into a
  ring of ``BUFS``;
- a converter partition (one warpgroup) casts the latent to fp16 (exact for e4m3; the scales stay out of the
  tile), four values a 32-bit word, into one of ``BUFS`` swizzled fp16 tiles, so the math runs on one tile while
  the next is converted;
- the math partition (one warpgroup) puts the keys on wgmma's M: scores^T [64, M] = K Q^T per 128-column scale
  tile (the fp16 tile as A from shared memory, the query as B) plus the RoPE key's, the online softmax down the
  columns, and O^T [512, M] += K^T P'^T per scale tile (the same fp16 tile, transposed, as A). So the tile is
  converted once and read from shared memory by both products, with no register transpose and no per-warp
  copy of the query.

Why (sm_90 compiles of the Triton kernel, BENCHMARKS.md, twenty-fourth session): with 16 heads on M = 16
(mma.sync) every warp repeats the softmax bookkeeping and holds the whole query, and the loop takes 154 warp
instructions a key against the 47 an SM can spend at 85% of copy bandwidth (41.7M keys a second an SM at
656 bytes a key) once conversion is added; on the H200 it stayed at 30-35% of copy.

Arithmetic: value = q8 * scale[g] for scale tile g. Each tile's scores are (q_g f) . q8_g (fp16 products,
FP32 accumulation), times scale[g] / f in FP32, plus q_pe . k_pe; P'_g = P * scale[g] / smax (smax: the largest
scale so far, so P'_g <= 1 in fp16) feeds tile g's accumulator, which holds value / smax and is rescaled with
the softmax's maximum when smax grows. Keys past the split's end (a partial last tile: TMA reads whole blocks)
are zeroed in the converter and given scale 0 and score -inf, so what the cache holds there (NaN included)
never reaches a product.

Gluon has no interpreter: the kernel runs on sm_90 only. On the CPU, tests compile it for sm_90 (Triton's
wheel carries ptxas) and check its machine code; on a Hopper GPU tests/test_mla_decode_gluon.py holds it to
the reference within FP8's bound. ``gluon_decode_available()`` says whether this Triton has what it needs.
"""

from __future__ import annotations

import functools

import torch

from coscale.kernels import _mla_decode_gluon_common as common
from coscale.kernels._gluon_hopper import builds, hopper_api
from coscale.kernels._mla_decode_gluon_common import BLOCK_N, MAX_ROWS, NT, TILE, supports

__all__ = ["BLOCK_N", "MAX_ROWS", "compile_for_sm90", "gluon_decode_available", "launch_mla_decode_fp8_gluon",
           "supports"]

# Shared memory (227 KB an SM): BUFS fp16 tiles of 64 KB (the math on one while the next is converted) with their
# RoPE keys and scales (9 KB), LAT_STAGES e4m3 half tiles of 16 KB, the query (18 KB) and P (8 KB): 220 KB
BUFS = 2
LAT_STAGES = 3
ROW_CHUNK = 16  # rows the converter casts at a time (16 values a thread: no spills at 128 registers)


@functools.cache
def gluon_decode_available() -> bool:
    """Whether the installed Triton has Gluon's Hopper API (warp_specialize, warpgroup_mma, TMA)."""
    return builds(_build)


@functools.cache
def _build():
    api = hopper_api()
    gluon, gl, mbarrier, tma_load = api.gluon, api.gl, api.mbarrier, api.tma_load
    fence_async_shared, thread_barrier = api.fence_async_shared, api.thread_barrier
    warpgroup_mma, warpgroup_mma_wait = api.warpgroup_mma, api.warpgroup_mma_wait
    h = common.helpers()
    _as_words, _split_range, _query, _query_rows = h.as_words, h.split_range, h.query, h.query_rows
    _tile_scales, _softmax_step, _softmax_end = h.tile_scales, h.softmax_step, h.softmax_end

    @gluon.jit
    def _loader(lat_desc, rope_desc, sc_desc, lat_bufs, rope_bufs, sc_bufs, lat_ready, lat_empty, rs_ready, rs_empty,
                table_ptr, seq_len, stride_table, num_splits, BLOCK_N: gl.constexpr, PAGE: gl.constexpr,
                LAT_STAGES: gl.constexpr, BUFS: gl.constexpr):  # fmt: skip
        # Per 64-key tile: its latent in two halves (32 keys) into the converter's ring of LAT_STAGES half-tile
        # buffers, then its RoPE key and scales into the math's ring of BUFS. A fresh barrier counts as having
        # completed the phase before 0, so the first pass of each ring waits for nothing.
        split, b = gl.program_id(1), gl.program_id(2)
        lo, hi, tiles = _split_range(seq_len, split, num_splits, BLOCK_N)
        table_row = table_ptr + b * stride_table
        half: gl.constexpr = BLOCK_N // 2
        rs_bytes: gl.constexpr = rope_desc.block_type.nbytes + sc_desc.block_type.nbytes
        for i in range(tiles):
            start = lo + i * BLOCK_N
            row = gl.load(table_row + start // PAGE) * PAGE + start % PAGE
            for h in gl.static_range(2):
                j = 2 * i + h
                s = j % LAT_STAGES
                mbarrier.wait(lat_empty.index(s), ((j // LAT_STAGES) & 1) ^ 1)
                mbarrier.expect(lat_ready.index(s), lat_desc.block_type.nbytes)
                tma_load(lat_desc, [row + h * half, 0, 0], lat_ready.index(s), lat_bufs.index(s))
            r = i % BUFS
            mbarrier.wait(rs_empty.index(r), ((i // BUFS) & 1) ^ 1)
            mbarrier.expect(rs_ready.index(r), rs_bytes)
            tma_load(rope_desc, [row, 0], rs_ready.index(r), rope_bufs.index(r))
            tma_load(sc_desc, [row, 0], rs_ready.index(r), sc_bufs.index(r))

    @gluon.jit
    def _e4m3_words_to_f16_pairs(w):
        # a word of four e4m3 values -> two words of two fp16 each (bytes 0-1, then 2-3): one cvt.rn.f16x2.e4m3x2
        # a pair, the word split into halves by a mov (free in SASS). Handled as words: Triton's own cast, or an
        # asm on bytes, unpacks the loaded vector into bytes and packs them again (a PRMT and a SEL a value in
        # sm_90 compiles, twice the casts' own count)
        return gl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
            "=r,=r,r", [w], dtype=(gl.int32, gl.int32), is_pure=True, pack=1)

    @gluon.jit
    def _converter(lat_bufs, conv, lat_ready, lat_empty, conv_ready, conv_empty, seq_len, num_splits,
                   BLOCK_N: gl.constexpr, NT: gl.constexpr, TILE: gl.constexpr, LAT_STAGES: gl.constexpr,
                   BUFS: gl.constexpr, ROW_CHUNK: gl.constexpr):  # fmt: skip
        # A warp per row at a time, as 32-bit words: 32 lanes x 4 words = the row's 512 e4m3 values. The
        # stage and the fp16 tile are read and written as words through views of the same bytes (the 128-byte
        # swizzle moves 16-byte pieces, whatever the element type). Tile i goes to fp16 buffer i % BUFS, so the
        # math runs on one while the next is converted.
        word_layout: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 4, 8], [4, 1, 1], [2, 1, 0])
        key_layout: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, word_layout))
        flat_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
        words_in: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=3)
        words_out: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
        half: gl.constexpr = BLOCK_N // 2
        split = gl.program_id(1)
        lo, hi, tiles = _split_range(seq_len, split, num_splits, BLOCK_N)
        for i in range(tiles):
            cb = i % BUFS
            mbarrier.wait(conv_empty.index(cb), ((i // BUFS) & 1) ^ 1)
            out = _as_words(conv.index(cb), [BLOCK_N, NT * TILE // 2], words_out)
            start = lo + i * BLOCK_N
            partial = start + BLOCK_N > hi
            for h in gl.static_range(2):
                j = 2 * i + h
                s = j % LAT_STAGES
                mbarrier.wait(lat_ready.index(s), (j // LAT_STAGES) & 1)
                stage = _as_words(lat_bufs.index(s), [half, NT, TILE // 4], words_in)
                for r0 in gl.static_range(0, half, ROW_CHUNK):
                    w = stage.slice(r0, ROW_CHUNK).load(word_layout)
                    if partial:  # keys past the split's end: zero, whatever the cache holds there (0 x NaN is NaN)
                        keys = start + h * half + r0 + gl.arange(0, ROW_CHUNK, layout=key_layout)
                        w = gl.where((keys < hi)[:, None, None], w, 0)
                    lo16, hi16 = _e4m3_words_to_f16_pairs(w)
                    pairs = gl.reshape(gl.join(lo16, hi16), [ROW_CHUNK, NT * TILE // 2])
                    out.slice(h * half + r0, ROW_CHUNK).store(gl.convert_layout(pairs, flat_layout,
                                                                               assert_trivial=True))
                thread_barrier()  # every converter warp has read this half's stage
                mbarrier.arrive(lat_empty.index(s))
            fence_async_shared()  # the fp16 tile, written through the generic proxy, is read by wgmma
            thread_barrier()  # every converter warp has written its rows
            mbarrier.arrive(conv_ready.index(cb))

    @gluon.jit
    def _opaque_zero(i):
        # 0, from an asm statement the compiler may not fold or move out of the loop
        return gl.inline_asm_elementwise("mov.u32 $0, 0;", "=r,r", [i], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _math(rope_bufs, sc_bufs, conv, q_smem, qpe_smem, p_smem, rs_ready, rs_empty, conv_ready, conv_empty,
              q_ptr, qpe_ptr, seq_len, out_ptr, lse_ptr,
              stride_qb, stride_qs, stride_qh, stride_pb, stride_ps, stride_ph,
              stride_ob, stride_os, stride_oh, stride_osplit, stride_lb, stride_ls, stride_lh,
              H, num_splits, sm_scale_log2,
              C: gl.constexpr, DR: gl.constexpr, S_Q: gl.constexpr, HEADS_TILE: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, TILE: gl.constexpr, BUFS: gl.constexpr):  # fmt: skip
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        key_layout: gl.constexpr = gl.SliceLayout(1, mma)  # along the keys (and the latent's columns)
        row_layout: gl.constexpr = gl.SliceLayout(0, mma)  # along the query rows
        group, split, b = gl.program_id(0), gl.program_id(1), gl.program_id(2)
        lo, hi, tiles = _split_range(seq_len, split, num_splits, BLOCK_N)

        # the query rows, scaled by a power of two into fp16's range (_mla_decode_gluon_common.query)
        q, f, q_pe = _query(q_ptr, qpe_ptr, group, b, stride_qb, stride_qs, stride_qh, stride_pb, stride_ps, stride_ph,
                            H, C, DR, S_Q, HEADS_TILE, BLOCK_M)
        q_smem.index(0).store(q)
        qpe_smem.store(q_pe)
        fence_async_shared()
        thread_barrier()
        inv_f = gl.convert_layout(1.0 / f, row_layout)  # exact: f is a power of two
        token, head, row_ok, last_key = _query_rows(group, seq_len, H, S_Q, HEADS_TILE, BLOCK_M, row_layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_layout)
        l_acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
        smax = 1.1754943508222875e-38  # the smallest normal: never 0 / 0
        zero_s = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
        acc0 = gl.zeros([TILE, BLOCK_M], gl.float32, layout=mma)  # O^T, one accumulator per scale tile
        acc1 = gl.zeros_like(acc0)
        acc2 = gl.zeros_like(acc0)
        acc3 = gl.zeros_like(acc0)
        for i in range(tiles):
            s = i % BUFS
            mbarrier.wait(conv_ready.index(s), (i // BUFS) & 1)
            mbarrier.wait(rs_ready.index(s), (i // BUFS) & 1)  # the RoPE key and the scales
            tile = conv.index(s)
            # The query through an index the compiler cannot prove constant: with fixed addresses LLVM hoists the
            # products' 64-bit operand descriptors out of the loop (with the fp16 tile's too, 136 registers held
            # through it: the math warps spilled); recomputed, each is a uniform add.
            qs = q_smem.index(_opaque_zero(i))
            # scores^T per scale tile g: (q8 of tile g) (q_g f)^T; the tile's scale multiplies them below
            s0 = warpgroup_mma(tile.slice(0, TILE, dim=1), qs.slice(0, TILE, dim=1).permute((1, 0)), zero_s,
                               use_acc=False, is_async=True)
            s1 = warpgroup_mma(tile.slice(TILE, TILE, dim=1), qs.slice(TILE, TILE, dim=1).permute((1, 0)), zero_s,
                               use_acc=False, is_async=True)
            s2 = warpgroup_mma(tile.slice(2 * TILE, TILE, dim=1), qs.slice(2 * TILE, TILE, dim=1).permute((1, 0)),
                               zero_s, use_acc=False, is_async=True)
            s3 = warpgroup_mma(tile.slice(3 * TILE, TILE, dim=1), qs.slice(3 * TILE, TILE, dim=1).permute((1, 0)),
                               zero_s, use_acc=False, is_async=True)
            s_pe = warpgroup_mma(rope_bufs.index(s), qpe_smem.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            pos, key_ok, sc0, sc1, sc2, sc3, tile_smax = _tile_scales(sc_bufs.index(s), lo + i * BLOCK_N, hi, BLOCK_N,
                                                                      key_layout)
            s0, s1, s2, s3, s_pe = warpgroup_mma_wait(num_outstanding=0, deps=(s0, s1, s2, s3, s_pe))
            thread_barrier()  # every warp has read the stage's scales and its products are done
            mbarrier.arrive(rs_empty.index(s))

            visible = key_ok[:, None] & (pos[:, None] <= last_key[None, :])
            p, m_i, l_acc, smax, rescale = _softmax_step(s0, s1, s2, s3, s_pe, sc0, sc1, sc2, sc3, visible, inv_f,
                                                         sm_scale_log2, m_i, l_acc, smax, tile_smax)
            acc0 = acc0 * rescale[None, :]
            acc1 = acc1 * rescale[None, :]
            acc2 = acc2 * rescale[None, :]
            acc3 = acc3 * rescale[None, :]
            p_smem.index(0).store((p * sc0[:, None]).to(gl.float16))
            p_smem.index(1).store((p * sc1[:, None]).to(gl.float16))
            p_smem.index(2).store((p * sc2[:, None]).to(gl.float16))
            p_smem.index(3).store((p * sc3[:, None]).to(gl.float16))
            fence_async_shared()
            thread_barrier()
            acc0 = warpgroup_mma(tile.slice(0, TILE, dim=1).permute((1, 0)), p_smem.index(0), acc0, is_async=True)
            acc1 = warpgroup_mma(tile.slice(TILE, TILE, dim=1).permute((1, 0)), p_smem.index(1), acc1, is_async=True)
            acc2 = warpgroup_mma(tile.slice(2 * TILE, TILE, dim=1).permute((1, 0)), p_smem.index(2), acc2,
                                 is_async=True)
            acc3 = warpgroup_mma(tile.slice(3 * TILE, TILE, dim=1).permute((1, 0)), p_smem.index(3), acc3,
                                 is_async=True)
            acc0, acc1, acc2, acc3 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1, acc2, acc3))
            mbarrier.arrive(conv_empty.index(s))

        l_safe, lse = _softmax_end(l_acc, m_i)
        # A split past the end of a short sequence stores only its lse (-inf), as the Triton kernel's
        keep = (row_ok & ((hi > lo) | (num_splits == 1)))[None, :]
        cols_o = gl.arange(0, TILE, layout=key_layout)[:, None]
        o_rows = (out_ptr + b * stride_ob + token * stride_os + head * stride_oh + split * stride_osplit)[None, :]
        norm = (smax / l_safe)[None, :]
        gl.store(o_rows + cols_o, (acc0 * norm).to(out_ptr.dtype.element_ty), mask=keep)
        gl.store(o_rows + TILE + cols_o, (acc1 * norm).to(out_ptr.dtype.element_ty), mask=keep)
        gl.store(o_rows + 2 * TILE + cols_o, (acc2 * norm).to(out_ptr.dtype.element_ty), mask=keep)
        gl.store(o_rows + 3 * TILE + cols_o, (acc3 * norm).to(out_ptr.dtype.element_ty), mask=keep)
        gl.store(lse_ptr + b * stride_lb + token * stride_ls + head * stride_lh + split, lse, mask=row_ok)

    @gluon.jit
    def mla_decode_fp8_gluon_kernel(
        lat_desc, rope_desc, sc_desc, q_ptr, qpe_ptr, table_ptr, seq_lens_ptr, out_ptr, lse_ptr,
        stride_qb, stride_qs, stride_qh, stride_pb, stride_ps, stride_ph, stride_table,
        stride_ob, stride_os, stride_oh, stride_osplit, stride_lb, stride_ls, stride_lh,
        H, num_splits, sm_scale_log2,
        C: gl.constexpr, DR: gl.constexpr, S_Q: gl.constexpr, HEADS_TILE: gl.constexpr, BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr, NT: gl.constexpr, TILE: gl.constexpr, PAGE: gl.constexpr, LAT_STAGES: gl.constexpr,
        BUFS: gl.constexpr, ROW_CHUNK: gl.constexpr, CONVERTER_REGS: gl.constexpr,
    ):  # fmt: skip
        lat_bufs = gl.allocate_shared_memory(lat_desc.dtype, [LAT_STAGES] + lat_desc.block_type.shape,
                                             lat_desc.layout)
        rope_bufs = gl.allocate_shared_memory(rope_desc.dtype, [BUFS] + rope_desc.block_type.shape, rope_desc.layout)
        sc_bufs = gl.allocate_shared_memory(sc_desc.dtype, [BUFS] + sc_desc.block_type.shape, sc_desc.layout)
        conv = gl.allocate_shared_memory(gl.float16, [BUFS, BLOCK_N, C],
                                         gl.NVMMASharedLayout.get_default_for([BLOCK_N, C], gl.float16))
        q_smem = gl.allocate_shared_memory(gl.float16, [1, BLOCK_M, C],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_M, C], gl.float16))
        qpe_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, DR],
                                             gl.NVMMASharedLayout.get_default_for([BLOCK_M, DR], gl.bfloat16))
        p_smem = gl.allocate_shared_memory(gl.float16, [NT, BLOCK_N, BLOCK_M],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], gl.float16))
        lat_ready = gl.allocate_shared_memory(gl.int64, [LAT_STAGES, 1], mbarrier.MBarrierLayout())
        lat_empty = gl.allocate_shared_memory(gl.int64, [LAT_STAGES, 1], mbarrier.MBarrierLayout())
        rs_ready = gl.allocate_shared_memory(gl.int64, [BUFS, 1], mbarrier.MBarrierLayout())
        rs_empty = gl.allocate_shared_memory(gl.int64, [BUFS, 1], mbarrier.MBarrierLayout())
        conv_ready = gl.allocate_shared_memory(gl.int64, [BUFS, 1], mbarrier.MBarrierLayout())
        conv_empty = gl.allocate_shared_memory(gl.int64, [BUFS, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(LAT_STAGES):
            mbarrier.init(lat_ready.index(i), count=1)
            mbarrier.init(lat_empty.index(i), count=1)
        for i in gl.static_range(BUFS):
            mbarrier.init(rs_ready.index(i), count=1)
            mbarrier.init(rs_empty.index(i), count=1)
            mbarrier.init(conv_ready.index(i), count=1)
            mbarrier.init(conv_empty.index(i), count=1)
        # The sequence's length is read once here for all three partitions: were each to read it, a length written
        # meanwhile (by another stream) could give them different tile counts and leave one waiting forever
        seq_len = gl.load(seq_lens_ptr + gl.program_id(2))
        gl.warp_specialize([
            (_math, (rope_bufs, sc_bufs, conv, q_smem, qpe_smem, p_smem, rs_ready, rs_empty, conv_ready, conv_empty,
                     q_ptr, qpe_ptr, seq_len, out_ptr, lse_ptr,
                     stride_qb, stride_qs, stride_qh, stride_pb, stride_ps, stride_ph,
                     stride_ob, stride_os, stride_oh, stride_osplit, stride_lb, stride_ls, stride_lh,
                     H, num_splits, sm_scale_log2, C, DR, S_Q, HEADS_TILE, BLOCK_M, BLOCK_N, TILE, BUFS)),
            (_loader, (lat_desc, rope_desc, sc_desc, lat_bufs, rope_bufs, sc_bufs, lat_ready, lat_empty, rs_ready,
                       rs_empty, table_ptr, seq_len, stride_table, num_splits, BLOCK_N, PAGE, LAT_STAGES,
                       BUFS)),
            (_converter, (lat_bufs, conv, lat_ready, lat_empty, conv_ready, conv_empty, seq_len, num_splits,
                          BLOCK_N, NT, TILE, LAT_STAGES, BUFS, ROW_CHUNK)),
        ], [1, 4], [24, CONVERTER_REGS])

    return mla_decode_fp8_gluon_kernel


def _descriptors(latent: torch.Tensor, rope: torch.Tensor, scale: torch.Tensor):
    """TMA descriptors of one layer's cache: the latent as [NB*BS, 4, 128] e4m3 (rows of 128 bytes: TMA's box
    is at most 256 a dimension), the RoPE key as [NB*BS, 64] bf16, the scales as [NB*BS, 4] float32; a 64-key
    box each."""
    rows = latent.shape[0] * latent.shape[1]
    return (common.tma_descriptor(latent.view(rows, NT, TILE), [BLOCK_N // 2, NT, TILE]),
            common.tma_descriptor(rope.view(rows, rope.shape[-1]), [BLOCK_N, rope.shape[-1]]),
            common.tma_descriptor(scale.view(rows, NT), [BLOCK_N, NT]))


def _constexprs(s_q: int, heads_tile: int, rows: int, page: int, lat_stages: int = LAT_STAGES) -> dict:
    return dict(C=NT * TILE, DR=64, S_Q=s_q, HEADS_TILE=heads_tile, BLOCK_M=rows, BLOCK_N=BLOCK_N, NT=NT, TILE=TILE,
                PAGE=page, LAT_STAGES=lat_stages, BUFS=BUFS, ROW_CHUNK=ROW_CHUNK, CONVERTER_REGS=128)


def launch_mla_decode_fp8_gluon(q_lat, q_pe, latent, rope, scale, block_table, seq_lens, o, o_lse, *,
                                heads_tile: int, rows: int, num_splits: int, sm_scale_log2: float,
                                lat_stages: int = LAT_STAGES):  # fmt: skip
    """The split kernel's launch (mla_decode's contract: o [B, S, H, splits, c], o_lse [B, S, H, splits]) on
    this kernel; the caller checked ``supports``. Contiguous cache tensors (TMA reads them as rows)."""
    common.launch(_build(), _descriptors(latent, rope, scale),
                  _constexprs(q_lat.shape[1], heads_tile, rows, latent.shape[1], lat_stages), q_lat, q_pe, block_table,
                  seq_lens, o, o_lse, num_splits, sm_scale_log2, heads_tile)


def compile_for_sm90(rows: int = 16, s_q: int = 1, page: int = 64, lat_stages: int = LAT_STAGES,
                     out_dtype=torch.float32):
    """The kernel compiled for an H100/H200 without a GPU (_mla_decode_gluon_common.compile_for_sm90)."""
    return common.compile_for_sm90(_build(), _descriptors,
                                   _constexprs(s_q, max(1, rows // s_q), rows, page, lat_stages), page, out_dtype)
