"""Warp-specialized grouped FP8 GEMMs for Hopper written in Gluon (Triton's explicit-layout dialect).

The same operation and arithmetic as ``grouped_mm_tma_kernel`` (coscale.kernels.fp8_grouped_kernels):
C[rows of expert e] = (A * sA) @ (B[e] * sB[e])^T with 1x128 row scales sA, 128x128 weight block scales
sB, and promotion into an FP32 accumulator after every 128-deep product. What differs is the schedule,
the one DeepGEMM uses on Hopper, which Triton's automatic pipeliner cannot express:

- a loader partition (one warp, few registers) issues the TMA copies of A and B into a ring of
  ``STAGES`` shared-memory buffers and waits only for free buffers (``empty`` barriers);
- the math partition (one or two warpgroups) waits for full buffers (``ready`` barriers), issues each
  128-deep product asynchronously into one of two register accumulators, and promotes the *previous*
  product (acc += product * sA * sB) while the tensor cores run this one. Triton's ``tl.dot`` waits
  for each product before scaling it (``warp_group_dot_wait {pendings = 0}``), so its tensor cores
  idle during every promotion.

The weight-gradient kernel (dW_e = dY_e^T X_e over 128-token chunks) has the same structure, with two layouts
of work: a program per (expert, row tile) that keeps an expert's two A chunks in shared memory while it walks the
column tiles (experts of at most two chunks, as at V3's 256 tokens an expert), or (``A_RING``) A streamed
beside B and a program per output tile (long experts, and few of them: one expert is FP8Linear's weight
gradient). It is not yet faster than the Triton by-expert kernel and is not among the picker's candidates
(GLUON_WGRAD_CANDIDATES).

Gluon has no interpreter: these kernels run on sm_90 only. On the CPU, tests/test_fp8_grouped_gluon.py compiles
them for sm_90 and checks the machine code; on the GPU they are tested against the Triton kernels bit for bit
(the products and their promotion order are the same). The Triton kernels stay the CPU-tested path and the
fallback. ``gluon_available()`` says whether this Triton build has what the kernels need.
"""

from __future__ import annotations

import functools

import torch

from coscale.kernels._gluon_hopper import builds, hopper_api
from coscale.kernels.fp8_recipe import BLOCK

__all__ = [
    "GLUON_MM_CANDIDATES",
    "GLUON_WGRAD_CANDIDATES",
    "compile_for_sm90",
    "gluon_available",
    "launch_grouped_mm_gluon",
    "launch_grouped_wgrad_gluon",
]

# BLOCK_M rows (64: one math warpgroup, 128: two), BLOCK_N columns (a divisor of 128: one weight block
# a tile), STAGES shared-memory buffers of A and B, DEFER_MAX: the most K steps an iteration (the launcher
# takes the largest divisor of the K steps up to it); one program an SM (the math warps hold two products
# beside the accumulator). Run 38 (H200, V3's experts, results/tune_fp8_grouped_run38A_h200_2026-12-04.log):
# 128x128 with 8 steps an iteration led every forward/dgrad product (889-1,020 TFLOP/s against 768-882 for
# the TMA kernel's best configuration), 4 steps 792-968, 64x128 500-855, one step an iteration (no overlap)
# 735-845; in run 38B 5 stages ran at 817-954 and 16 steps an iteration at 709-887, against 878-992 for 4 stages.
GLUON_MM_CANDIDATES = (
    {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": 4, "num_warps": 8, "DEFER_MAX": 8},
    {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": 5, "num_warps": 8, "DEFER_MAX": 8},
)

# The weight gradient: BLOCK_M rows of dW (N) by BLOCK_N columns (K); per (expert, row tile) the two A chunks of
# an expert of up to two chunks stay in shared memory while STAGES buffers stream B's chunks; two chunks an
# iteration (the second's product runs while the first's is promoted), two output tiles' buffers (with an FP32
# output, 128x128 tiles fit with 4 stages at most; the launcher declines what does not fit). Not yet faster
# than the TMA by-expert kernel (run 38E, V3's experts: 567 against 608-611 TFLOP/s; run 39A 556-562 against
# 620-631), so not in the picker.
GLUON_WGRAD_CANDIDATES = (
    {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": 6, "num_warps": 8},
    {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": 4, "num_warps": 8},
    {"BLOCK_M": 128, "BLOCK_N": 64, "STAGES": 8, "num_warps": 8},
    # one math warpgroup on 64-row tiles and two programs an SM (what lets the TMA kernel overlap one program's
    # epilogue with the other's products): 611-615 TFLOP/s in run 39A against 620-631 for the TMA kernel's pick
    # (three or four output buffers in flight instead of two: no faster, 549-558 at 128x128, 414-425 at 128x64)
    {"BLOCK_M": 64, "BLOCK_N": 128, "STAGES": 4, "num_warps": 4, "PROGRAMS_PER_SM": 2, "maxnreg": 128},
    # 256 rows of dW a tile (each math warpgroup 128): a chunk of X^T is read from L2 once per 256 rows instead of
    # 128 (with 128-row tiles those reads are as large as dW itself); compiled for sm_90 without spills, not yet
    # run on a GPU
    {"BLOCK_M": 256, "BLOCK_N": 64, "STAGES": 8, "num_warps": 8},
    {"BLOCK_M": 256, "BLOCK_N": 32, "STAGES": 8, "num_warps": 8},
    # A_RING: A's chunks stream through the stages beside B's and each program takes single output tiles, for
    # experts of many chunks and for few experts (one expert: FP8Linear's weight gradient, where a program per
    # (expert, row tile) would leave most SMs idle); compiled for sm_90 without spills, not yet run on a GPU
    {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": 4, "num_warps": 8, "A_RING": True},
    {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": 5, "num_warps": 8, "A_RING": True},
)


@functools.cache
def gluon_available() -> bool:
    """Whether the installed Triton has Gluon's Hopper API (warp_specialize, warpgroup_mma, TMA)."""
    return builds(_build)


@functools.cache
def _build():
    api = hopper_api()
    gluon, gl, mbarrier, tma = api.gluon, api.gl, api.mbarrier, api.tma
    tma_load, tma_store = api.tma_load, api.tma_store
    fence_async_shared = api.fence_async_shared
    warpgroup_mma, warpgroup_mma_wait = api.warpgroup_mma, api.warpgroup_mma_wait

    @gluon.jit
    def _tile_coords(tile, num_m, num_n, num_k, tile_ptr, E, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     GROUP_M: gl.constexpr):  # fmt: skip
        # tile -> (first row, first column, expert, K steps): both partitions walk the tiles this way. GROUP_M
        # row tiles sweep the column tiles together (B tiles reused from L2), as in the Triton kernel; rows
        # after the last expert (tile_expert says E) take no K step and store zeros
        in_group = GROUP_M * num_n
        first_m = (tile // in_group) * GROUP_M
        group_rows = gl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % in_group) % group_rows
        pid_n = (tile % in_group) // group_rows
        row0 = pid_m * BLOCK_M
        expert = gl.load(tile_ptr + row0 // 128)  # segments are 128-aligned
        return row0, pid_n * BLOCK_N, expert, gl.where(expert < E, num_k, 0)

    @gluon.jit
    def _tile_counts(M, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        return gl.cdiv(M, BLOCK_M), gl.cdiv(N, BLOCK_N), gl.cdiv(K, 128)

    @gluon.jit
    def _loader(a_desc, b_desc, tile_ptr, a_bufs, b_bufs, ready, empty, M, N, K, E,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
        num_m, num_n, num_k = _tile_counts(M, N, K, BLOCK_M, BLOCK_N)
        it = 0
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            row0, n0, expert, k_iters = _tile_coords(tile, num_m, num_n, num_k, tile_ptr, E, BLOCK_M, BLOCK_N, GROUP_M)
            for kb in range(k_iters):
                s = it % STAGES
                # a fresh barrier counts as having completed the phase before 0: the first pass waits for nothing
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                tma_load(a_desc, [row0, kb * 128], ready.index(s), a_bufs.index(s))
                tma_load(b_desc, [expert * N + n0, kb * 128], ready.index(s), b_bufs.index(s))
                it += 1

    @gluon.jit
    def _scale(sa_ptr, sb_base, rows, kb, stride_sak, stride_sbk, M):
        # the product of step kb is multiplied by its rows' activation scales times the weight block's scale
        sa = gl.load(sa_ptr + kb * stride_sak, mask=rows < M, other=0.0)
        return sa * gl.load(sb_base + kb * stride_sbk)

    @gluon.jit
    def _issue_and_promote(a_buf, b_buf, prod, prev, acc, prev_scale, empty, it, sa_rows, sb_base, rows, kb,
                           stride_sak, stride_sbk, M, STAGES):  # fmt: skip
        # issue step kb's product into prod, then promote the previous step's (prev) while it runs; the
        # previous step's buffers are free once its product is done. (STAGES, a constexpr, stays one unannotated:
        # an annotation would name gl, which this closure does not capture.)
        prod = warpgroup_mma(a_buf, b_buf.permute((1, 0)), prod, use_acc=False, is_async=True)
        scale = _scale(sa_rows, sb_base, rows, kb, stride_sak, stride_sbk, M)
        prev, acc = warpgroup_mma_wait(num_outstanding=1, deps=(prev, acc))
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
        acc += prev * prev_scale[:, None]
        return prod, prev, acc, scale

    @gluon.jit
    def _math(c_desc, sa_ptr, sb_ptr, tile_ptr, a_bufs, b_bufs, ready, empty, c_smem, M, N, K, E,
              stride_sam, stride_sak, stride_sbe, stride_sbn, stride_sbk,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
              DEFER: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        row_layout: gl.constexpr = gl.SliceLayout(1, mma)
        num_m, num_n, num_k = _tile_counts(M, N, K, BLOCK_M, BLOCK_N)
        it = 0
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            row0, n0, expert, k_iters = _tile_coords(tile, num_m, num_n, num_k, tile_ptr, E, BLOCK_M, BLOCK_N, GROUP_M)
            expert = gl.minimum(expert, E - 1)
            rows = row0 + gl.arange(0, BLOCK_M, layout=row_layout)
            sa_rows = sa_ptr + rows.to(gl.int64) * stride_sam
            sb_base = sb_ptr + expert.to(gl.int64) * stride_sbe + (n0 // 128) * stride_sbn
            acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=mma)
            # DEFER K steps an iteration (a divisor of the K steps), two products in flight by turns: step
            # j's product runs while step j-1's is promoted. Every product is retired within its iteration:
            # ptxas serializes all wgmma (warning C7514) when a product read after wait_group 1 was issued
            # before the loop's back edge, so one promotion in DEFER runs with the tensor cores idle. The
            # accumulator passes through each wait, or the compiler sinks the promotions past the waits and
            # holds every product in registers at once (spills, and serialized wgmma again).
            prod_a = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=mma)
            prod_b = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=mma)
            for kk in range(0, k_iters, DEFER):
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                prod_a = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), prod_a,
                                       use_acc=False, is_async=True)
                scale_a = _scale(sa_rows, sb_base, rows, kk, stride_sak, stride_sbk, M)
                it += 1
                for j in gl.static_range(1, DEFER):
                    s = it % STAGES
                    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                    # the two register sets by turns (each a named value: a product in flight keeps its registers)
                    if j % 2 == 1:
                        prod_b, prod_a, acc, scale_b = _issue_and_promote(
                            a_bufs.index(s), b_bufs.index(s), prod_b, prod_a, acc, scale_a, empty, it, sa_rows,
                            sb_base, rows, kk + j, stride_sak, stride_sbk, M, STAGES)
                    else:
                        prod_a, prod_b, acc, scale_a = _issue_and_promote(
                            a_bufs.index(s), b_bufs.index(s), prod_a, prod_b, acc, scale_b, empty, it, sa_rows,
                            sb_base, rows, kk + j, stride_sak, stride_sbk, M, STAGES)
                    it += 1
                if DEFER % 2 == 0:  # the last step's product is prod_b
                    prod_b, acc = warpgroup_mma_wait(num_outstanding=0, deps=(prod_b, acc))
                    mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
                    acc += prod_b * scale_b[:, None]
                else:
                    prod_a, acc = warpgroup_mma_wait(num_outstanding=0, deps=(prod_a, acc))
                    mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
                    acc += prod_a * scale_a[:, None]
            # rows after the last expert store zeros; rows past M are clipped by the descriptor
            tma.store_wait(0)  # the previous tile's store has read c_smem
            c_smem.store(acc.to(c_desc.dtype))
            fence_async_shared()
            tma_store(c_desc, [row0, n0], c_smem)
        tma.store_wait(0)

    @gluon.jit
    def grouped_mm_gluon_kernel(
        a_desc, b_desc, c_desc, sa_ptr, sb_ptr, tile_ptr, M, N, K, E,
        stride_sam, stride_sak, stride_sbe, stride_sbn, stride_sbk,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
        DEFER: gl.constexpr, num_warps: gl.constexpr,
    ):  # fmt: skip
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        gl.warp_specialize([
            (_math, (c_desc, sa_ptr, sb_ptr, tile_ptr, a_bufs, b_bufs, ready, empty, c_smem, M, N, K, E,
                     stride_sam, stride_sak, stride_sbe, stride_sbn, stride_sbk,
                     BLOCK_M, BLOCK_N, GROUP_M, STAGES, DEFER, num_warps)),
            (_loader, (a_desc, b_desc, tile_ptr, a_bufs, b_bufs, ready, empty, M, N, K, E,
                       BLOCK_M, BLOCK_N, GROUP_M, STAGES)),
        ], [1], [40])

    @gluon.jit
    def _wgrad_group(group, num_m, off_ptr):
        # work group -> (expert, row tile of dW, first chunk, chunks): one program walks all the column tiles of
        # its groups, so an expert's A chunks are loaded once per group when it has at most two
        e = group // num_m
        pid_m = group - e * num_m
        start = gl.load(off_ptr + e - 1, mask=e > 0, other=0)
        chunks = gl.cdiv(gl.load(off_ptr + e) - start, 128)
        return e, pid_m, start // 128, chunks

    @gluon.jit
    def _wgrad_item(item, num_m, num_k, off_ptr, A_RING: gl.constexpr):
        # work item -> (expert, row tile, first chunk, chunks, first and end column tile): a (expert, row tile)
        # group and all its column tiles, or with A_RING one output tile (groups of few experts spread over the SMs)
        if A_RING:
            group = item // num_k
            kt_lo = item - group * num_k
            kt_hi = kt_lo + 1
        else:
            group = item
            kt_lo = item * 0  # a runtime zero: both branches must give kt_lo the same (tensor) type
            kt_hi = kt_lo + num_k
        e, pid_m, c0, chunks = _wgrad_group(group, num_m, off_ptr)
        return e, pid_m, c0, chunks, kt_lo, gl.where(chunks > 0, kt_hi, kt_lo)

    @gluon.jit
    def _wgrad_loader(a_desc, b_desc, off_ptr, a_bufs, b_bufs, a_ready, a_empty, ready, empty, N, K, E,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      A_RING: gl.constexpr):  # fmt: skip
        num_m = gl.cdiv(N, BLOCK_M)
        num_k = gl.cdiv(K, BLOCK_N)
        it = 0  # B chunks loaded
        a_it = 0  # A chunk pairs loaded
        for item in range(gl.program_id(0), E * num_m * (num_k if A_RING else 1), gl.num_programs(0)):
            e, pid_m, c0, chunks, kt_lo, kt_hi = _wgrad_item(item, num_m, num_k, off_ptr, A_RING)
            resident = chunks <= 2
            for kt in range(kt_lo, kt_hi):
                # chunks in pairs; an odd count's last pair takes its last chunk twice (the math zeroes its scales)
                for cc in range(0, chunks, 2):
                    first = c0 + cc
                    second = c0 + gl.minimum(cc + 1, chunks - 1)
                    if not A_RING:
                        if (kt == 0) | (not resident):  # A: once per group, or every pair of a larger expert
                            mbarrier.wait(a_empty, (a_it & 1) ^ 1)
                            mbarrier.expect(a_ready, 2 * a_desc.block_type.nbytes)
                            tma_load(a_desc, [pid_m * BLOCK_M, first * 128], a_ready, a_bufs.index(0))
                            tma_load(a_desc, [pid_m * BLOCK_M, second * 128], a_ready, a_bufs.index(1))
                            a_it += 1
                    for j in gl.static_range(2):
                        chunk = first if j == 0 else second
                        s = it % STAGES
                        mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                        if A_RING:  # the A chunk travels with the B chunk in the same stage
                            mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                            tma_load(a_desc, [pid_m * BLOCK_M, chunk * 128], ready.index(s), a_bufs.index(s))
                        else:
                            mbarrier.expect(ready.index(s), b_desc.block_type.nbytes)
                        tma_load(b_desc, [kt * BLOCK_N, chunk * 128], ready.index(s), b_bufs.index(s))
                        it += 1

    @gluon.jit
    def _wgrad_scales(sa_ptr, sb_ptr, rows, cols, chunk, stride_san, stride_sat, stride_sbk, stride_sbt, N, K, live):
        # the chunk's row scales (dY^T; zeros for a repeated chunk) and column scales (X^T), the column scales
        # one a thread (cols: a compact layout; the promotion moves them to the accumulator's column layout:
        # loaded there, their pointers alone would take 64 registers a thread)
        sa = gl.load(sa_ptr + rows.to(gl.int64) * stride_san + chunk * stride_sat, mask=(rows < N) & live, other=0.0)
        sb = gl.load(sb_ptr + cols.to(gl.int64) * stride_sbk + chunk * stride_sbt, mask=cols < K, other=0.0)
        return sa, sb

    @gluon.jit
    def _wgrad_math(c_desc, sa_ptr, sb_ptr, off_ptr, a_bufs, b_bufs, a_ready, a_empty, ready, empty, c_bufs,
                    N, K, E, stride_san, stride_sat, stride_sbk, stride_sbt, BLOCK_M: gl.constexpr,
                    BLOCK_N: gl.constexpr, STAGES: gl.constexpr, A_RING: gl.constexpr,
                    num_warps: gl.constexpr):  # fmt: skip
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        col_layout: gl.constexpr = gl.SliceLayout(0, mma)
        num_m = gl.cdiv(N, BLOCK_M)
        num_k = gl.cdiv(K, BLOCK_N)
        it = 0
        a_it = 0
        stores = 0
        for item in range(gl.program_id(0), E * num_m * (num_k if A_RING else 1), gl.num_programs(0)):
            e, pid_m, c0, chunks, kt_lo, kt_hi = _wgrad_item(item, num_m, num_k, off_ptr, A_RING)
            resident = chunks <= 2
            rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
            for kt in range(kt_lo, kt_hi):
                cols = kt * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.BlockedLayout([1], [32], [num_warps], [0]))
                acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=mma)
                # (the products' registers are overwritten by their wgmma, use_acc=False, before they are read)
                prod_a = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=mma)
                prod_b = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=mma)
                # two chunks an iteration: the second's product runs while the first's is promoted (the mm
                # kernel's schedule with DEFER = 2; each product is retired within its iteration). Both chunks'
                # scales are loaded first, so their latency passes while the operands arrive and the products
                # run; they pass through the waits (kept compact until their promotion) and the outer product of
                # a chunk's scales is formed at its promotion (a [BLOCK_M, BLOCK_N] tile would spill).
                for cc in range(0, chunks, 2):
                    sa_a, sb_a = _wgrad_scales(sa_ptr, sb_ptr, rows, cols, c0 + cc, stride_san, stride_sat,
                                               stride_sbk, stride_sbt, N, K, True)
                    sa_b, sb_b = _wgrad_scales(sa_ptr, sb_ptr, rows, cols, c0 + gl.minimum(cc + 1, chunks - 1),
                                               stride_san, stride_sat, stride_sbk, stride_sbt, N, K, cc + 1 < chunks)
                    load_a = ((kt == 0) | (not resident)) & (not A_RING)  # (A_RING: A comes with each stage)
                    mbarrier.wait(a_ready, a_it & 1, pred=load_a)
                    s = it % STAGES
                    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                    prod_a = warpgroup_mma(a_bufs.index(s if A_RING else 0), b_bufs.index(s).permute((1, 0)), prod_a,
                                           use_acc=False, is_async=True)
                    it += 1
                    s = it % STAGES
                    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                    prod_b = warpgroup_mma(a_bufs.index(s if A_RING else 1), b_bufs.index(s).permute((1, 0)), prod_b,
                                           use_acc=False, is_async=True)
                    prod_a, acc, sa_a, sb_a = warpgroup_mma_wait(num_outstanding=1, deps=(prod_a, acc, sa_a, sb_a))
                    mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
                    acc += prod_a * (sa_a[:, None] * gl.convert_layout(sb_a, col_layout)[None, :])
                    prod_b, acc, sa_b, sb_b = warpgroup_mma_wait(num_outstanding=0, deps=(prod_b, acc, sa_b, sb_b))
                    mbarrier.arrive(empty.index(s))
                    # A is free after the group's last column tile, or after each pair of a larger expert
                    mbarrier.arrive(a_empty, pred=((kt == num_k - 1) | (not resident)) & (not A_RING))
                    a_it += load_a.to(gl.int32)
                    acc += prod_b * (sa_b[:, None] * gl.convert_layout(sb_b, col_layout)[None, :])
                    it += 1
                # two output buffers by turns: this tile waits only for the store of two tiles ago, so each
                # store overlaps the next tile's products (at 256 tokens an expert, dW is as large as the operands)
                tma.store_wait(1)
                c_buf = c_bufs.index(stores % 2)
                c_buf.store(acc.to(c_desc.dtype))
                fence_async_shared()
                tma_store(c_desc, [e * N + pid_m * BLOCK_M, kt * BLOCK_N], c_buf)
                stores += 1
        tma.store_wait(0)

    @gluon.jit
    def grouped_wgrad_gluon_kernel(
        a_desc, b_desc, c_desc, sa_ptr, sb_ptr, off_ptr, N, K, E,
        stride_san, stride_sat, stride_sbk, stride_sbt,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, A_RING: gl.constexpr,
        num_warps: gl.constexpr,
    ):  # fmt: skip
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES if A_RING else 2] + a_desc.block_type.shape,
                                           a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2] + c_desc.block_type.shape, c_desc.layout)
        a_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        a_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(a_ready, count=1)
        mbarrier.init(a_empty, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        gl.warp_specialize([
            (_wgrad_math, (c_desc, sa_ptr, sb_ptr, off_ptr, a_bufs, b_bufs, a_ready, a_empty, ready, empty, c_bufs,
                           N, K, E, stride_san, stride_sat, stride_sbk, stride_sbt, BLOCK_M, BLOCK_N, STAGES,
                           A_RING, num_warps)),
            (_wgrad_loader, (a_desc, b_desc, off_ptr, a_bufs, b_bufs, a_ready, a_empty, ready, empty, N, K, E,
                             BLOCK_M, BLOCK_N, STAGES, A_RING)),
        ], [1], [24])  # 24 loader registers leave the math warps 240 (40: 232, and the math spills)

    return grouped_mm_gluon_kernel, grouped_wgrad_gluon_kernel


def compile_for_sm90(which: str, cfg: dict, defer: int = 1):
    """The forward/dgrad kernel ("mm", with ``defer`` K steps an iteration) or the weight-gradient kernel
    ("wgrad") compiled for an H100/H200 without a GPU (Triton's wheel carries ptxas): its ``asm`` holds the PTX,
    cubin and TTGIR. For the CPU tests and tools/compile_sm90.py; BF16 output, divisibility as on the GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    a = torch.zeros(256, 1024, dtype=torch.float8_e4m3fn)
    b = torch.zeros(2, 256, 1024, dtype=torch.float8_e4m3fn)
    c = torch.zeros(512, 256, dtype=torch.bfloat16)
    descs = dict(zip(("a_desc", "b_desc", "c_desc"), _descriptors(a, b, c, bm, bn)))
    constexprs = dict(BLOCK_M=bm, BLOCK_N=bn, STAGES=cfg["STAGES"], num_warps=cfg["num_warps"])
    if which == "mm":
        kernel = _build()[0]
        constexprs.update(GROUP_M=8, DEFER=defer)
        pointers = dict(sa_ptr="*fp32", sb_ptr="*fp32", tile_ptr="*i32")
    else:
        kernel = _build()[1]
        descs["a_desc"], descs["b_desc"] = _desc(a, [bm, BLOCK]), _desc(a, [bn, BLOCK])
        constexprs.update(A_RING=cfg.get("A_RING", False))
        pointers = dict(sa_ptr="*fp32", sb_ptr="*fp32", off_ptr="*i32")
    signature = {name: "i32" for name in kernel.arg_names}
    signature.update({k: mangle_type(v) for k, v in descs.items()}, **pointers)
    signature.update({k: "constexpr" for k in constexprs})
    # pointers and the strides and sizes that are multiples of 16 at DeepSeek-V3's shapes, as the GPU specialises
    even = {"stride_sak", "stride_sbe", "stride_sat", "stride_sbt", "N", "K"}
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*") or n in even}
    src = GluonASTSource(fn=kernel, signature=signature, attrs=attrs,
                         constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    options = {"num_warps": cfg["num_warps"], **({"maxnreg": cfg["maxnreg"]} if "maxnreg" in cfg else {})}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _desc(t: torch.Tensor, block: list[int]):
    """A Gluon TMA descriptor of t (16-byte aligned rows and base) in blocks of ``block``, swizzled for wgmma."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    dtype = {torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16,
             torch.float32: gl.float32}[t.dtype]  # fmt: skip
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))


def _descriptors(a, b, c, bm: int, bn: int):
    e, n, k = b.shape
    return _desc(a, [bm, BLOCK]), _desc(b.reshape(e * n, k), [bn, BLOCK]), _desc(c, [bm, bn])


def _require_hopper(device: torch.device) -> None:
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        # not a user error: the picker skips a configuration that cannot launch here
        raise RuntimeError("the Gluon grouped GEMM runs on sm_90 (Hopper) only")


def launch_grouped_mm_gluon(a, a_scale, b, b_scale, tile_expert, c, cfg: dict):
    """One launch of the Gluon kernel: the contract of ``launch_grouped_mm_tma`` (a [M, K] FP8 rows in
    128-aligned expert segments, a_scale [M, K/128], b [E, N, K] FP8, b_scale [E, N/128, K/128],
    tile_expert from ``segment_of_each_block``, c [M, N] written), with K a multiple of 128, operands that a
    descriptor can read (launch_grouped_mm passes aligned copies where needed) and a contiguous c; a
    persistent grid of one program an SM."""
    _require_hopper(a.device)
    m, k = a.shape
    e, n, _ = b.shape
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if k % BLOCK or n % bn or BLOCK % bn or not c.is_contiguous() or c.data_ptr() % 16:
        # a shape this kernel does not take: the picker skips the configuration (the TMA kernel takes it)
        raise ValueError(f"the Gluon grouped GEMM needs K a multiple of {BLOCK}, N of BLOCK_N (a divisor of {BLOCK}) "
                         f"and an aligned contiguous output; got K = {k}, N = {n}, BLOCK_N = {bn}")
    steps = k // BLOCK
    defer = max(d for d in range(1, cfg["DEFER_MAX"] + 1) if steps % d == 0)
    a_desc, b_desc, c_desc = _descriptors(a, b, c, bm, bn)
    tiles = -(-m // bm) * (n // bn)
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    _build()[0][(max(1, min(tiles, sms)),)](
        a_desc, b_desc, c_desc, a_scale, b_scale, tile_expert, m, n, k, e,
        a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1), b_scale.stride(2),
        BLOCK_M=bm, BLOCK_N=bn, GROUP_M=cfg.get("GROUP_M", 8), STAGES=cfg["STAGES"], DEFER=defer,
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    return c


def launch_grouped_wgrad_gluon(dyt, dyt_scale, xt, xt_scale, offsets, out, cfg: dict):
    """One launch of the Gluon weight-gradient kernel: the contract of ``launch_grouped_wgrad_tma`` (out [E, N,
    K] = dY^T X per expert from dyt [N, Mp], xt [K, Mp] in 128-token chunks, offsets [E] the segments' ends)
    except that the gradients of experts without tokens are left to the caller (the TMA launcher's zeros
    launch). Needs N a multiple of BLOCK_M (a tile stays in its expert in the [E*N, K] view it stores
    through) and an aligned contiguous output; a persistent grid of one program an SM."""
    _require_hopper(dyt.device)
    n, mp = dyt.shape
    k = xt.shape[0]
    experts = offsets.numel()
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    c2d = out.view(experts * n, k) if out.is_contiguous() else None
    if n % bm or c2d is None or out.data_ptr() % 16 or (k * out.element_size()) % 16:
        raise ValueError(f"the Gluon wgrad kernel needs N a multiple of {bm} and an aligned contiguous output; "
                         f"got N = {n}, K = {k}")
    props = torch.cuda.get_device_properties(dyt.device)
    a_ring = cfg.get("A_RING", False)
    smem = ((cfg["STAGES"] if a_ring else 2) * bm + cfg["STAGES"] * bn) * BLOCK + 2 * bm * bn * out.element_size() \
        + 1024  # + barriers, slack
    limit = getattr(props, "shared_memory_per_block_optin", 232448) // cfg.get("PROGRAMS_PER_SM", 1)
    if smem > limit:
        raise ValueError(f"this wgrad configuration needs {smem} bytes of shared memory with a {out.dtype} output; "
                         f"the GPU has {limit}")
    c_desc = _desc(c2d, [bm, bn])
    items = experts * (n // bm) * (-(-k // bn) if a_ring else 1)
    sms = props.multi_processor_count
    per_sm = cfg.get("PROGRAMS_PER_SM", 1)
    # two programs an SM need each program's registers capped (maxnreg: the math warps get what the loader leaves)
    options = {"maxnreg": cfg["maxnreg"]} if "maxnreg" in cfg else {}
    _build()[1][(max(1, min(items, per_sm * sms)),)](
        _desc(dyt, [bm, BLOCK]), _desc(xt, [bn, BLOCK]), c_desc, dyt_scale, xt_scale, offsets, n, k, experts,
        dyt_scale.stride(0), dyt_scale.stride(1), xt_scale.stride(0), xt_scale.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, STAGES=cfg["STAGES"], A_RING=a_ring, num_warps=cfg["num_warps"], **options,
    )  # fmt: skip
    return out
