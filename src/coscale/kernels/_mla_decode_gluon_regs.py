"""MLA decode over an FP8 paged latent cache in Gluon for Hopper (sm_90): the latent cast in the MMA warps' registers.

The same operation, cache format, outputs and arithmetic as coscale.kernels._mla_decode_gluon (whose docstring has
the scaling: fp16 products of the e4m3 codes and the power-of-two-scaled query, each 128-column scale tile's scores
times its scale in FP32, P' = P x scale / smax <= 1 in fp16 for the products with the values); what differs is
where the e4m3 latent becomes fp16.

That kernel's converter warpgroup writes each 64-key tile to shared memory in fp16 (64 KB) for both products to
read from there: per tile about 320 KB of shared-memory traffic (TMA 41, the converter 32 + 64, scores 90, P @ V
80) for 42 KB of HBM, 7.6 bytes a byte, against the 128 bytes a cycle an SM's shared memory moves; at 85% of the
H200's copy bandwidth an SM reads 13.8 bytes of HBM a cycle, so that design is bound near 60% by shared memory
alone (it measured 55-61%, run 47). FlashMLA's BF16 kernel moves about 3.9 bytes a byte.

Here nothing is written back: both MMA warpgroups read the e4m3 tile where TMA put it and cast it in registers into
wgmma's A operand (register A), so the tile costs TMA 41 KB, two reads of 32 KB, the query and P as B operands
(16 + 16 KB), the RoPE key's product (10 KB) and P's stores (8 KB): about 155 KB, 3.7 bytes a byte.

- loader (one warp): per 64-key tile, TMA copies of the e4m3 latent (four scale tiles [64, 128]), the BF16 RoPE key
  [64, 64] and the scales [64, 4] into a ring of ``STAGES`` stages (41 KB each); a stage is free when both
  warpgroups have read it.
- scores warpgroup (the default partition): scores^T [64 keys, M] = K Q^T per scale tile, the keys on wgmma's M
  with the tile's fp16 values in registers as A (a thread casts 32 contiguous bytes of each of its two keys' rows,
  the columns taken in an order that puts them where the A fragment wants them: the query, B, is stored with its
  columns in the same order, so the products are unchanged), plus the RoPE key's product from shared memory; the
  online softmax; P'_g [64 keys, M] for the four scale tiles and the rows' rescale factor into one of two P
  buffers.
- values warpgroup: O^T [512, M] += K^T P'^T per scale tile, K^T in registers as A: a thread reads one word (four
  columns) of each of its 16 keys, pairs neighbouring keys' bytes by a byte permute and casts the pairs (the
  fragment wants two keys a register); its columns are the output's rows, in an order undone at the store. It
  rescales its accumulators by the scores warpgroup's factor before each tile's products and writes the output.

Keys past the split's end (a partial last tile: TMA reads whole blocks) get score -inf and scale 0, and the values
warpgroup zeroes their codes (0 x NaN is NaN), so what the cache holds there never reaches a result.

Gluon has no interpreter: on the CPU the tests compile this kernel for sm_90 and check its machine code; on a Hopper
GPU tests/test_mla_decode_gluon.py holds it to the float64 reference.
"""

from __future__ import annotations

import functools

import torch

from coscale.kernels import _mla_decode_gluon_common as common
from coscale.kernels._gluon_hopper import builds, hopper_api
from coscale.kernels._mla_decode_gluon_common import BLOCK_N, MAX_ROWS, NT, TILE, supports

__all__ = ["BLOCK_N", "MAX_ROWS", "compile_for_sm90", "gluon_decode_available", "launch_mla_decode_fp8_gluon",
           "supports"]

# Shared memory: STAGES stages of 41 KB (latent 32, RoPE key 8, scales 1), the query (16 KB fp16 + 2 KB RoPE part),
# two P buffers (8 KB each) with the rows' factors: 198 KB at 4 stages, 157 KB at 3. Three stages: 1-3% faster than
# four at batch 64-128 on an H100 (run 49; the loader keeps three tiles in flight, the copy limit already reached)
STAGES = 3
P_BUFS = 2
VALUES_REGS = 232  # the values warpgroup: 64 accumulator registers, the four scale tiles' A operands (128) in flight


@functools.cache
def gluon_decode_available() -> bool:
    """Whether the installed Triton has Gluon's Hopper API (warp_specialize, warpgroup_mma, TMA)."""
    return builds(_build)


def query_column(k: torch.Tensor) -> torch.Tensor:
    """The latent column (within its 128-column scale tile) that the scores' A fragment holds at position k: a thread
    with lane l of its quad casts bytes 32 l .. 32 l + 31 of a key's tile row, word s (bytes 4 s .. 4 s + 3) of them
    going to the fragment's k-step s, bytes 0-1 to its columns 2 l, 2 l + 1 and bytes 2-3 to 2 l + 8, 2 l + 9. So
    position k = 16 s + 8 h + 2 l + e holds column 32 l + 4 s + 2 h + e (a permutation of 0..127). For tests."""
    s, h, lane, e = k // 16, (k // 8) % 2, (k // 2) % 4, k % 2
    return 32 * lane + 4 * s + 2 * h + e


def value_column(m: torch.Tensor) -> torch.Tensor:
    """The latent column (within its scale tile) that row m of the values' A fragment (and of the accumulator) holds:
    warp w, lane group r = l // 4 reads word 8 w + r (columns 4 (8 w + r) .. + 3), whose byte 2 beta + delta goes
    to row 64 beta + 16 w + 8 delta + r. For tests."""
    beta, w, delta, r = m // 64, (m // 16) % 4, (m // 8) % 2, m % 8
    return 32 * w + 4 * r + 2 * beta + delta


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
    def _loader(lat_desc, rope_desc, sc_desc, lat_bufs, rope_bufs, sc_bufs, ready, free, table_ptr, seq_len,
                stride_table, num_splits, BLOCK_N: gl.constexpr, NT: gl.constexpr, TILE: gl.constexpr,
                PAGE: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
        # A fresh barrier counts as having completed the phase before 0, so the first pass waits for nothing
        split, b = gl.program_id(1), gl.program_id(2)
        lo, hi, tiles = _split_range(seq_len, split, num_splits, BLOCK_N)
        table_row = table_ptr + b * stride_table
        nbytes: gl.constexpr = NT * lat_desc.block_type.nbytes + rope_desc.block_type.nbytes + sc_desc.block_type.nbytes
        for i in range(tiles):
            start = lo + i * BLOCK_N
            row = gl.load(table_row + start // PAGE) * PAGE + start % PAGE
            s = i % STAGES
            mbarrier.wait(free.index(s), ((i // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), nbytes)
            for g in gl.static_range(NT):
                tma_load(lat_desc, [row, g * TILE], ready.index(s), lat_bufs.index(NT * s + g))
            tma_load(rope_desc, [row, 0], ready.index(s), rope_bufs.index(s))
            tma_load(sc_desc, [row, 0], ready.index(s), sc_bufs.index(s))

    @gluon.jit
    def _f16x4(w):
        # a word of four e4m3 -> four fp16 (bytes 0..3): two cvt.rn.f16x2.e4m3x2 (exact)
        return gl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; .reg .b32 a, b; mov.b32 {lo, hi}, $4; cvt.rn.f16x2.e4m3x2 a, lo; "
            "cvt.rn.f16x2.e4m3x2 b, hi; mov.b32 {$0, $1}, a; mov.b32 {$2, $3}, b; }",
            "=h,=h,=h,=h,r", [w], dtype=(gl.float16, gl.float16, gl.float16, gl.float16), is_pure=True, pack=1)

    @gluon.jit
    def _f16_key_pairs(a, b):
        # words a (key k) and b (key k + 1) of four e4m3 columns each -> eight fp16: (column 0, key k), (column 0,
        # key k + 1), (column 1, k), ..., (column 3, k + 1): byte permutes pair the keys, then four casts
        return gl.inline_asm_elementwise(
            "{ .reg .b32 p, q, x, y, z, w; .reg .b16 p0, p1, q0, q1;"
            " prmt.b32 p, $8, $9, 0x5140; prmt.b32 q, $8, $9, 0x7362;"
            " mov.b32 {p0, p1}, p; mov.b32 {q0, q1}, q;"
            " cvt.rn.f16x2.e4m3x2 x, p0; cvt.rn.f16x2.e4m3x2 y, p1; cvt.rn.f16x2.e4m3x2 z, q0;"
            " cvt.rn.f16x2.e4m3x2 w, q1;"
            " mov.b32 {$0, $1}, x; mov.b32 {$2, $3}, y; mov.b32 {$4, $5}, z; mov.b32 {$6, $7}, w; }",
            "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [a, b], dtype=(gl.float16,) * 8, is_pure=True, pack=1)

    @gluon.jit
    def _scores_operand(words, a_layout: gl.constexpr):
        # words [64 keys, 32] (word c = columns 4c .. 4c + 3 of a scale tile, a thread holding 8 consecutive words
        # of two keys) -> the scores' A [64 keys, 128] fp16, column order of query_column
        h0, h1, h2, h3 = _f16x4(words)
        # join stacks along a new last dimension: [64, 32, b0, b1] for byte b = b0 + 2 b1 of word c
        v = gl.permute(gl.join(gl.join(h0, h1), gl.join(h2, h3)), (0, 1, 3, 2))  # column 4 c + 2 h + e: [.., h, e]
        v = gl.reshape(v, [64, 4, 8, 2, 2])  # column 32 l + 4 s + 2 h + e
        v = gl.permute(v, (0, 2, 3, 1, 4))  # -> position 16 s + 8 h + 2 l + e
        return gl.convert_layout(gl.reshape(v, [64, 128]), a_layout, assert_trivial=True)

    @gluon.jit
    def _values_operand(words, a_layout: gl.constexpr):
        # words [64 keys, 32] (a thread holding word 8 w + l // 4 of 16 keys, neighbours in pairs) -> the values'
        # A [128, 64 keys] fp16, K^T with its rows in value_column's order
        even, odd = gl.split(gl.permute(gl.reshape(words, [32, 2, 32]), (0, 2, 1)))  # keys 2i, 2i + 1
        c = _f16_key_pairs(even, odd)
        # join stacks along a new last dimension: [pair, word, e, b0, b1] (key 2 pair + e, column 4 word + b0 + 2 b1)
        v = gl.join(gl.join(gl.join(c[0], c[1]), gl.join(c[2], c[3])),
                    gl.join(gl.join(c[4], c[5]), gl.join(c[6], c[7])))
        v = gl.permute(v, (1, 4, 3, 0, 2))  # [word, b1, b0, pair, e]
        v = gl.reshape(v, [4, 8, 2, 2, 64])  # column 4 word + b = [w, r, beta, delta]; the keys
        v = gl.permute(v, (2, 0, 3, 1, 4))  # row 64 beta + 16 w + 8 delta + r
        return gl.convert_layout(gl.reshape(v, [128, 64]), a_layout, assert_trivial=True)

    @gluon.jit
    def _scores(lat_bufs, rope_bufs, sc_bufs, q_smem, qpe_smem, p_smem, fac_smem, fin_smem, ready, free, p_ready,
                p_free, fin_ready, q_ptr, qpe_ptr, seq_len, lse_ptr,
                stride_qb, stride_qs, stride_qh, stride_pb, stride_ps, stride_ph, stride_lb, stride_ls, stride_lh,
                H, num_splits, sm_scale_log2,
                C: gl.constexpr, DR: gl.constexpr, S_Q: gl.constexpr, HEADS_TILE: gl.constexpr,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, TILE: gl.constexpr, STAGES: gl.constexpr,
                P_BUFS: gl.constexpr):  # fmt: skip
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        key_layout: gl.constexpr = gl.SliceLayout(1, mma)  # along the keys
        row_layout: gl.constexpr = gl.SliceLayout(0, mma)  # along the query rows
        # a scale tile's words [64 keys, 32]: a thread holds its two A-fragment keys (16 w + l // 4, + 8) and words
        # 8 (l % 4) .. + 7 (two 16-byte loads a key; a quarter warp's eight reach eight 16-byte pieces of the swizzle)
        words_layout: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [0, 2], [0, 4], [8, 0]], lane_bases=[[0, 8], [0, 16], [1, 0], [2, 0], [4, 0]],
            warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[BLOCK_N, TILE // 4])
        words_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
        group, split, b = gl.program_id(0), gl.program_id(1), gl.program_id(2)
        lo, hi, tiles = _split_range(seq_len, split, num_splits, BLOCK_N)

        # The query rows, scaled by a power of two into fp16's range (_mla_decode_gluon_common.query), each scale
        # tile's columns reordered in registers to the A fragment's order: column 32 l + 4 s + 2 h + e of scale tile g
        # to position 16 s + 8 h + 2 l + e (query_column)
        q, f, q_pe = _query(q_ptr, qpe_ptr, group, b, stride_qb, stride_qs, stride_qh, stride_pb, stride_ps, stride_ph,
                            H, C, DR, S_Q, HEADS_TILE, BLOCK_M)
        q = gl.permute(gl.reshape(q, [BLOCK_M, 4, 4, 8, 2, 2]), (0, 1, 3, 4, 2, 5))
        q_smem.store(gl.reshape(q, [BLOCK_M, C]))
        qpe_smem.store(q_pe)
        fence_async_shared()
        thread_barrier()
        inv_f = gl.convert_layout(1.0 / f, row_layout)  # exact: f is a power of two
        token, head, row_ok, last_key = _query_rows(group, seq_len, H, S_Q, HEADS_TILE, BLOCK_M, row_layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_layout)
        l_acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
        smax = 1.1754943508222875e-38  # the smallest normal: never 0 / 0
        zero_s = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
        for i in range(tiles):
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            w0 = _as_words(lat_bufs.index(4 * s), [BLOCK_N, TILE // 4], words_smem).load(words_layout)
            w1 = _as_words(lat_bufs.index(4 * s + 1), [BLOCK_N, TILE // 4], words_smem).load(words_layout)
            w2 = _as_words(lat_bufs.index(4 * s + 2), [BLOCK_N, TILE // 4], words_smem).load(words_layout)
            w3 = _as_words(lat_bufs.index(4 * s + 3), [BLOCK_N, TILE // 4], words_smem).load(words_layout)
            s0 = warpgroup_mma(_scores_operand(w0, a_layout), q_smem.slice(0, TILE, dim=1).permute((1, 0)), zero_s,
                               use_acc=False, is_async=True)
            s1 = warpgroup_mma(_scores_operand(w1, a_layout), q_smem.slice(TILE, TILE, dim=1).permute((1, 0)),
                               zero_s, use_acc=False, is_async=True)
            s2 = warpgroup_mma(_scores_operand(w2, a_layout), q_smem.slice(2 * TILE, TILE, dim=1).permute((1, 0)),
                               zero_s, use_acc=False, is_async=True)
            s3 = warpgroup_mma(_scores_operand(w3, a_layout), q_smem.slice(3 * TILE, TILE, dim=1).permute((1, 0)),
                               zero_s, use_acc=False, is_async=True)
            s_pe = warpgroup_mma(rope_bufs.index(s), qpe_smem.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            pos, key_ok, sc0, sc1, sc2, sc3, tile_smax = _tile_scales(sc_bufs.index(s), lo + i * BLOCK_N, hi, BLOCK_N,
                                                                      key_layout)
            s0, s1, s2, s3, s_pe = warpgroup_mma_wait(num_outstanding=0, deps=(s0, s1, s2, s3, s_pe))
            thread_barrier()  # every warp has read the stage and its products are done
            mbarrier.arrive(free.index(s))  # (the values warpgroup arrives too)

            visible = key_ok[:, None] & (pos[:, None] <= last_key[None, :])
            p, m_i, l_acc, smax, rescale = _softmax_step(s0, s1, s2, s3, s_pe, sc0, sc1, sc2, sc3, visible, inv_f,
                                                         sm_scale_log2, m_i, l_acc, smax, tile_smax)
            pb = i % P_BUFS
            mbarrier.wait(p_free.index(pb), ((i // P_BUFS) & 1) ^ 1)
            p_smem.index(4 * pb).store((p * sc0[:, None]).to(gl.float16))
            p_smem.index(4 * pb + 1).store((p * sc1[:, None]).to(gl.float16))
            p_smem.index(4 * pb + 2).store((p * sc2[:, None]).to(gl.float16))
            p_smem.index(4 * pb + 3).store((p * sc3[:, None]).to(gl.float16))
            fac_smem.index(pb).store(rescale)
            fence_async_shared()  # P, written through the generic proxy, is read by wgmma
            thread_barrier()
            mbarrier.arrive(p_ready.index(pb))

        l_safe, lse = _softmax_end(l_acc, m_i)
        fin_smem.store(smax / l_safe)  # the output's normalisation, for the values warpgroup
        thread_barrier()
        mbarrier.arrive(fin_ready)
        gl.store(lse_ptr + b * stride_lb + token * stride_ls + head * stride_lh + split, lse, mask=row_ok)

    @gluon.jit
    def _values(lat_bufs, p_smem, fac_smem, fin_smem, ready, free, p_ready, p_free, fin_ready, seq_len, out_ptr,
                stride_ob, stride_os, stride_oh, stride_osplit, H, num_splits,
                S_Q: gl.constexpr, HEADS_TILE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                TILE: gl.constexpr, STAGES: gl.constexpr, P_BUFS: gl.constexpr):  # fmt: skip
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        col_layout: gl.constexpr = gl.SliceLayout(1, mma)  # along the accumulators' rows (the latent's columns)
        row_layout: gl.constexpr = gl.SliceLayout(0, mma)  # along the query rows
        # a scale tile's words [64 keys, 32]: a thread holds word 8 w + l // 4 for its 16 A-fragment keys {2 j, 2 j + 1,
        # 2 j + 8, 2 j + 9} + 16 s (j = l % 4). A warp's load reads four keys' 32 bytes: in tiles of one 128-byte row
        # a key (the latent copied by scale tile) the swizzle puts four keys two apart in four different 16-byte
        # pieces, so the 32 words fall in 32 banks
        words_layout: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[1, 0], [8, 0], [16, 0], [32, 0]], lane_bases=[[2, 0], [4, 0], [0, 1], [0, 2], [0, 4]],
            warp_bases=[[0, 8], [0, 16]], block_bases=[], shape=[BLOCK_N, TILE // 4])
        words_smem: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
        key_words: gl.constexpr = gl.SliceLayout(1, words_layout)
        group, split, b = gl.program_id(0), gl.program_id(1), gl.program_id(2)
        lo, hi, tiles = _split_range(seq_len, split, num_splits, BLOCK_N)
        acc0 = gl.zeros([TILE, BLOCK_M], gl.float32, layout=mma)  # O^T / smax, one accumulator per scale tile
        acc1 = gl.zeros_like(acc0)
        acc2 = gl.zeros_like(acc0)
        acc3 = gl.zeros_like(acc0)
        for i in range(tiles):
            s = i % STAGES
            pb = i % P_BUFS
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)  # (TMA's bytes seen through this warpgroup's own wait)
            w0 = _as_words(lat_bufs.index(4 * s), [BLOCK_N, TILE // 4], words_smem).load(words_layout)
            w1 = _as_words(lat_bufs.index(4 * s + 1), [BLOCK_N, TILE // 4], words_smem).load(words_layout)
            w2 = _as_words(lat_bufs.index(4 * s + 2), [BLOCK_N, TILE // 4], words_smem).load(words_layout)
            w3 = _as_words(lat_bufs.index(4 * s + 3), [BLOCK_N, TILE // 4], words_smem).load(words_layout)
            start = lo + i * BLOCK_N
            if start + BLOCK_N > hi:  # keys past the split's end: zero, whatever the cache holds there (0 x NaN)
                keep = (start + gl.arange(0, BLOCK_N, layout=key_words) < hi)[:, None]
                w0 = gl.where(keep, w0, 0)
                w1 = gl.where(keep, w1, 0)
                w2 = gl.where(keep, w2, 0)
                w3 = gl.where(keep, w3, 0)
            a0 = _values_operand(w0, a_layout)
            a1 = _values_operand(w1, a_layout)
            thread_barrier()  # every warp has read the stage
            mbarrier.arrive(free.index(s))
            mbarrier.wait(p_ready.index(pb), (i // P_BUFS) & 1)
            # the rows' rescale before any product is issued (an accumulator touched while another's product runs
            # makes ptxas wait for it)
            fac = fac_smem.index(pb).load(row_layout)[None, :]
            acc0 = acc0 * fac
            acc1 = acc1 * fac
            acc2 = acc2 * fac
            acc3 = acc3 * fac
            acc0 = warpgroup_mma(a0, p_smem.index(4 * pb), acc0, is_async=True)
            acc1 = warpgroup_mma(a1, p_smem.index(4 * pb + 1), acc1, is_async=True)
            a2 = _values_operand(w2, a_layout)
            a3 = _values_operand(w3, a_layout)
            acc2 = warpgroup_mma(a2, p_smem.index(4 * pb + 2), acc2, is_async=True)
            acc3 = warpgroup_mma(a3, p_smem.index(4 * pb + 3), acc3, is_async=True)
            acc0, acc1, acc2, acc3, a0, a1, a2, a3 = warpgroup_mma_wait(
                num_outstanding=0, deps=(acc0, acc1, acc2, acc3, a0, a1, a2, a3))  # (register A: live until done)
            thread_barrier()  # every warp's products have read P
            mbarrier.arrive(p_free.index(pb))

        mbarrier.wait(fin_ready, 0)
        norm = fin_smem.load(row_layout)[None, :]
        token, head, row_ok, _ = _query_rows(group, seq_len, H, S_Q, HEADS_TILE, BLOCK_M, row_layout)
        # A split past the end of a short sequence stores only its lse (-inf), as the Triton kernel's
        keep = (row_ok & ((hi > lo) | (num_splits == 1)))[None, :]
        m = gl.arange(0, TILE, layout=col_layout)
        cols_o = (32 * ((m // 16) % 4) + 4 * (m % 8) + 2 * (m // 64) + (m // 8) % 2)[:, None]  # value_column
        o_rows = (out_ptr + b * stride_ob + token * stride_os + head * stride_oh + split * stride_osplit)[None, :]
        gl.store(o_rows + cols_o, (acc0 * norm).to(out_ptr.dtype.element_ty), mask=keep)
        gl.store(o_rows + TILE + cols_o, (acc1 * norm).to(out_ptr.dtype.element_ty), mask=keep)
        gl.store(o_rows + 2 * TILE + cols_o, (acc2 * norm).to(out_ptr.dtype.element_ty), mask=keep)
        gl.store(o_rows + 3 * TILE + cols_o, (acc3 * norm).to(out_ptr.dtype.element_ty), mask=keep)

    @gluon.jit
    def mla_decode_fp8_gluon_regs_kernel(
        lat_desc, rope_desc, sc_desc, q_ptr, qpe_ptr, table_ptr, seq_lens_ptr, out_ptr, lse_ptr,
        stride_qb, stride_qs, stride_qh, stride_pb, stride_ps, stride_ph, stride_table,
        stride_ob, stride_os, stride_oh, stride_osplit, stride_lb, stride_ls, stride_lh,
        H, num_splits, sm_scale_log2,
        C: gl.constexpr, DR: gl.constexpr, S_Q: gl.constexpr, HEADS_TILE: gl.constexpr, BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr, NT: gl.constexpr, TILE: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr,
        P_BUFS: gl.constexpr, VALUES_REGS: gl.constexpr,
    ):  # fmt: skip
        lat_bufs = gl.allocate_shared_memory(lat_desc.dtype, [STAGES * NT] + lat_desc.block_type.shape,
                                             lat_desc.layout)  # a stage's four scale tiles
        rope_bufs = gl.allocate_shared_memory(rope_desc.dtype, [STAGES] + rope_desc.block_type.shape,
                                              rope_desc.layout)
        sc_bufs = gl.allocate_shared_memory(sc_desc.dtype, [STAGES] + sc_desc.block_type.shape, sc_desc.layout)
        q_smem = gl.allocate_shared_memory(gl.float16, [BLOCK_M, C],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_M, C], gl.float16))
        qpe_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_M, DR],
                                             gl.NVMMASharedLayout.get_default_for([BLOCK_M, DR], gl.bfloat16))
        p_smem = gl.allocate_shared_memory(gl.float16, [4 * P_BUFS, BLOCK_N, BLOCK_M],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], gl.float16))
        vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        fac_smem = gl.allocate_shared_memory(gl.float32, [P_BUFS, BLOCK_M], vec_layout)
        fin_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M], vec_layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        p_ready = gl.allocate_shared_memory(gl.int64, [P_BUFS, 1], mbarrier.MBarrierLayout())
        p_free = gl.allocate_shared_memory(gl.int64, [P_BUFS, 1], mbarrier.MBarrierLayout())
        fin_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(free.index(i), count=2)  # both warpgroups read a stage
        for i in gl.static_range(P_BUFS):
            mbarrier.init(p_ready.index(i), count=1)
            mbarrier.init(p_free.index(i), count=1)
        mbarrier.init(fin_ready, count=1)
        # The sequence's length is read once here for all three partitions: were each to read it, a length written
        # meanwhile (by another stream) could give them different tile counts and leave one waiting forever
        seq_len = gl.load(seq_lens_ptr + gl.program_id(2))
        gl.warp_specialize([
            (_scores, (lat_bufs, rope_bufs, sc_bufs, q_smem, qpe_smem, p_smem, fac_smem, fin_smem, ready, free,
                       p_ready, p_free, fin_ready, q_ptr, qpe_ptr, seq_len, lse_ptr,
                       stride_qb, stride_qs, stride_qh, stride_pb, stride_ps, stride_ph, stride_lb, stride_ls,
                       stride_lh, H, num_splits, sm_scale_log2, C, DR, S_Q, HEADS_TILE, BLOCK_M, BLOCK_N, TILE,
                       STAGES, P_BUFS)),
            (_values, (lat_bufs, p_smem, fac_smem, fin_smem, ready, free, p_ready, p_free, fin_ready, seq_len,
                       out_ptr, stride_ob, stride_os, stride_oh, stride_osplit, H, num_splits, S_Q, HEADS_TILE,
                       BLOCK_M, BLOCK_N, TILE, STAGES, P_BUFS)),
            (_loader, (lat_desc, rope_desc, sc_desc, lat_bufs, rope_bufs, sc_bufs, ready, free, table_ptr, seq_len,
                       stride_table, num_splits, BLOCK_N, NT, TILE, PAGE, STAGES)),
        ], [4, 1], [VALUES_REGS, 24])

    return mla_decode_fp8_gluon_regs_kernel


def _descriptors(latent: torch.Tensor, rope: torch.Tensor, scale: torch.Tensor):
    """TMA descriptors of one layer's cache: the latent as [NB*BS, 512] e4m3 in boxes of one scale tile [64, 128] (a
    key's row of a tile is one 128-byte line of the swizzle: the values warpgroup's loads are free of bank conflicts
    that way, where with a key's four tiles in a row four keys two apart share a 16-byte piece), the RoPE key as
    [NB*BS, 64] bf16, the scales as [NB*BS, 4] float32; 64 keys a box."""
    rows = latent.shape[0] * latent.shape[1]
    return (common.tma_descriptor(latent.view(rows, NT * TILE), [BLOCK_N, TILE]),
            common.tma_descriptor(rope.view(rows, rope.shape[-1]), [BLOCK_N, rope.shape[-1]]),
            common.tma_descriptor(scale.view(rows, NT), [BLOCK_N, NT]))


def _constexprs(s_q: int, heads_tile: int, rows: int, page: int, stages: int = STAGES) -> dict:
    return dict(C=NT * TILE, DR=64, S_Q=s_q, HEADS_TILE=heads_tile, BLOCK_M=rows, BLOCK_N=BLOCK_N, NT=NT, TILE=TILE,
                PAGE=page, STAGES=stages, P_BUFS=P_BUFS, VALUES_REGS=VALUES_REGS)


def launch_mla_decode_fp8_gluon(q_lat, q_pe, latent, rope, scale, block_table, seq_lens, o, o_lse, *,
                                heads_tile: int, rows: int, num_splits: int, sm_scale_log2: float,
                                stages: int | None = None):  # fmt: skip
    """The split kernel's launch (mla_decode's contract: o [B, S, H, splits, c], o_lse [B, S, H, splits]) on this
    kernel; the caller checked ``supports``. Contiguous cache tensors (TMA reads them as rows). ``stages``: the
    ring's depth (default STAGES, read at the call: 2 to 4 fit the shared memory)."""
    stages = STAGES if stages is None else stages
    if not 2 <= stages <= 4:
        raise ValueError(f"the register-operand MLA decode takes 2 to 4 stages, got {stages}")
    common.launch(_build(), _descriptors(latent, rope, scale),
                  _constexprs(q_lat.shape[1], heads_tile, rows, latent.shape[1], stages), q_lat, q_pe, block_table,
                  seq_lens, o, o_lse, num_splits, sm_scale_log2, heads_tile)


def compile_for_sm90(rows: int = 16, s_q: int = 1, page: int = 64, stages: int = STAGES, out_dtype=torch.float32):
    """The kernel compiled for an H100/H200 without a GPU (_mla_decode_gluon_common.compile_for_sm90)."""
    return common.compile_for_sm90(_build(), _descriptors, _constexprs(s_q, max(1, rows // s_q), rows, page, stages),
                                   page, out_dtype)
