"""A warp-specialized grouped FP8 GEMM for Hopper written in Gluon (Triton's explicit-layout dialect).

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

Gluon has no interpreter: this kernel runs on sm_90 only and is tested on the GPU against the Triton
kernel (bit for bit: the products and their promotion order are the same). The Triton kernel stays the
CPU-tested path and the fallback. ``gluon_available()`` says whether this Triton build has what the
kernel needs.
"""

from __future__ import annotations

import functools

import torch

from coscale.errors import CoscaleError
from coscale.kernels.fp8_recipe import BLOCK

__all__ = ["GLUON_MM_CANDIDATES", "gluon_available", "launch_grouped_mm_gluon"]

# BLOCK_M rows (64: one math warpgroup, 128: two), BLOCK_N columns (a divisor of 128: one weight block
# a tile), STAGES shared-memory buffers of A and B, one program an SM (the math warps hold two 64-register
# products beside the accumulator).
GLUON_MM_CANDIDATES = (
    {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": 4, "num_warps": 8, "DEFER": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": 4, "num_warps": 8, "DEFER": 8},
    {"BLOCK_M": 64, "BLOCK_N": 128, "STAGES": 6, "num_warps": 4, "DEFER": 4},
    {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": 4, "num_warps": 8, "DEFER": 1},
)


@functools.cache
def gluon_available() -> bool:
    """Whether the installed Triton has Gluon's Hopper API (warp_specialize, warpgroup_mma, TMA)."""
    try:
        _build()
    except (ImportError, AttributeError):
        return False
    return True


@functools.cache
def _build():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    @gluon.jit
    def _tile_coords(tile, num_m, num_n, tile_ptr, E, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     GROUP_M: gl.constexpr):  # fmt: skip
        # GROUP_M row tiles sweep the column tiles together (B tiles reused from L2), as the Triton kernel
        in_group = GROUP_M * num_n
        first_m = (tile // in_group) * GROUP_M
        group_rows = gl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % in_group) % group_rows
        pid_n = (tile % in_group) // group_rows
        row0 = pid_m * BLOCK_M
        expert = gl.load(tile_ptr + row0 // 128)  # segments are 128-aligned; E past the last expert
        return row0, pid_n * BLOCK_N, expert

    @gluon.jit
    def _loader(a_desc, b_desc, tile_ptr, a_bufs, b_bufs, ready, empty, M, N, K, E,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
        num_m = gl.cdiv(M, BLOCK_M)
        num_n = gl.cdiv(N, BLOCK_N)
        num_k = gl.cdiv(K, 128)
        it = 0
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            row0, n0, expert = _tile_coords(tile, num_m, num_n, tile_ptr, E, BLOCK_M, BLOCK_N, GROUP_M)
            k_iters = gl.where(expert < E, num_k, 0)
            for kb in range(k_iters):
                s = it % STAGES
                # a fresh barrier counts as having completed the phase before 0: the first pass waits for nothing
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [row0, kb * 128], ready.index(s), a_bufs.index(s))
                tma.async_copy_global_to_shared(b_desc, [expert * N + n0, kb * 128], ready.index(s), b_bufs.index(s))
                it += 1

    @gluon.jit
    def _scale(sa_ptr, sb_base, rows, kb, stride_sak, stride_sbk, M):
        # the product of step kb is multiplied by its rows' activation scales times the weight block's scale
        sa = gl.load(sa_ptr + kb * stride_sak, mask=rows < M, other=0.0)
        return sa * gl.load(sb_base + kb * stride_sbk)

    @gluon.jit
    def _math(c_desc, sa_ptr, sb_ptr, tile_ptr, a_bufs, b_bufs, ready, empty, c_smem, M, N, K, E,
              stride_sam, stride_sak, stride_sbe, stride_sbn, stride_sbk,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
              DEFER: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        row_layout: gl.constexpr = gl.SliceLayout(1, mma)
        num_m = gl.cdiv(M, BLOCK_M)
        num_n = gl.cdiv(N, BLOCK_N)
        num_k = gl.cdiv(K, 128)
        it = 0
        for tile in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            row0, n0, expert = _tile_coords(tile, num_m, num_n, tile_ptr, E, BLOCK_M, BLOCK_N, GROUP_M)
            valid = expert < E
            k_iters = gl.where(valid, num_k, 0)
            expert = gl.minimum(expert, E - 1)
            rows = row0 + gl.arange(0, BLOCK_M, layout=row_layout)
            sa_rows = sa_ptr + rows.to(gl.int64) * stride_sam
            sb_base = sb_ptr + expert.to(gl.int64) * stride_sbe + (n0 // 128) * stride_sbn
            acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=mma)
            if DEFER > 1:
                # DEFER K steps an iteration, two products in flight by turns: step j's product runs while
                # step j-1's is promoted. Every product is retired within its iteration (ptxas serializes
                # wgmma when a product read after wait_group 1 was issued before the loop's back edge), so
                # one promotion in DEFER waits with the tensor cores idle. (The launcher checks that DEFER
                # divides the K steps.) The accumulator passes through each wait, so the compiler cannot sink
                # the promotions past it (they would hold every product in registers at once).
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
                        # the previous step's buffers are free once its product is done
                        if j % 2 == 1:
                            prod_b = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), prod_b,
                                                   use_acc=False, is_async=True)
                            scale_b = _scale(sa_rows, sb_base, rows, kk + j, stride_sak, stride_sbk, M)
                            prod_a, acc = warpgroup_mma_wait(num_outstanding=1, deps=(prod_a, acc))
                            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
                            acc += prod_a * scale_a[:, None]
                        else:
                            prod_a = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), prod_a,
                                                   use_acc=False, is_async=True)
                            scale_a = _scale(sa_rows, sb_base, rows, kk + j, stride_sak, stride_sbk, M)
                            prod_b, acc = warpgroup_mma_wait(num_outstanding=1, deps=(prod_b, acc))
                            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
                            acc += prod_b * scale_b[:, None]
                        it += 1
                    if DEFER % 2 == 0:  # the last step's product is prod_b
                        prod_b, acc = warpgroup_mma_wait(num_outstanding=0, deps=(prod_b, acc))
                        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
                        acc += prod_b * scale_b[:, None]
                    else:
                        prod_a, acc = warpgroup_mma_wait(num_outstanding=0, deps=(prod_a, acc))
                        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
                        acc += prod_a * scale_a[:, None]
            else:
                # the Triton kernel's schedule, for comparison: wait for each product before promoting it
                prod = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, layout=mma)
                for kb in range(k_iters):
                    s = it % STAGES
                    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                    prod = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), prod,
                                         use_acc=False, is_async=True)
                    scale = _scale(sa_rows, sb_base, rows, kb, stride_sak, stride_sbk, M)
                    prod = warpgroup_mma_wait(num_outstanding=0, deps=(prod,))
                    mbarrier.arrive(empty.index(s))
                    acc += prod * scale[:, None]
                    it += 1
            # rows after the last expert store zeros; rows past M are clipped by the descriptor
            tma.store_wait(0)  # the previous tile's store has read c_smem
            c_smem.store(acc.to(c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [row0, n0], c_smem)
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

    return grouped_mm_gluon_kernel


def _descriptors(a, b, c, bm: int, bn: int):
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    e, n, k = b.shape
    f8 = gl.float8e4nv
    out = {torch.bfloat16: gl.bfloat16, torch.float32: gl.float32, torch.float16: gl.float16}[c.dtype]
    a_desc = TensorDescriptor.from_tensor(a, [bm, BLOCK], gl.NVMMASharedLayout.get_default_for([bm, BLOCK], f8))
    b_desc = TensorDescriptor.from_tensor(b.reshape(e * n, k), [bn, BLOCK],
                                          gl.NVMMASharedLayout.get_default_for([bn, BLOCK], f8))
    c_desc = TensorDescriptor.from_tensor(c, [bm, bn], gl.NVMMASharedLayout.get_default_for([bm, bn], out))
    return a_desc, b_desc, c_desc


def launch_grouped_mm_gluon(a, a_scale, b, b_scale, tile_expert, c, cfg: dict):
    """One launch of the Gluon kernel: the contract of ``launch_grouped_mm_tma`` (a [M, K] FP8 rows in
    128-aligned expert segments, a_scale [M, K/128], b [E, N, K] FP8, b_scale [E, N/128, K/128],
    tile_expert from ``segment_of_each_block``, c [M, N] written), with K a multiple of 128 * DEFER,
    contiguous operands and a persistent grid of one program an SM."""
    m, k = a.shape
    e, n, _ = b.shape
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if k % (BLOCK * cfg["DEFER"]) or BLOCK % bn or not (a.is_contiguous() and b.is_contiguous() and c.is_contiguous()):
        raise CoscaleError(f"the Gluon grouped GEMM takes contiguous operands, K a multiple of {BLOCK * cfg['DEFER']} "
                           f"and BLOCK_N dividing {BLOCK}; got K = {k}, BLOCK_N = {bn}")
    a_desc, b_desc, c_desc = _descriptors(a, b, c, bm, bn)
    tiles = -(-m // bm) * (n // bn)
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    _build()[(max(1, min(tiles, sms)),)](
        a_desc, b_desc, c_desc, a_scale, b_scale, tile_expert, m, n, k, e,
        a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1), b_scale.stride(2),
        BLOCK_M=bm, BLOCK_N=bn, GROUP_M=cfg.get("GROUP_M", 8), STAGES=cfg["STAGES"], DEFER=cfg["DEFER"],
        num_warps=cfg["num_warps"],
    )  # fmt: skip
    return c
