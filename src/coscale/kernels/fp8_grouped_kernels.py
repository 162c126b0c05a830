"""The Triton kernels of the grouped FP8 GEMMs, their launchers and their tile configurations.

The operations, shapes and contracts are in coscale.kernels.fp8_grouped_gemm (``fp8_grouped_mm``,
``fp8_grouped_wgrad``), which calls these launchers with the configuration its picker chose.

Both kernels read A and B through TMA tensor descriptors built on the host, may run persistent (a
grid smaller than the tile count; the weight-gradient kernel's tile loop and token loop are one flat
loop), and promote every 128 elements of K: one 128-deep tl.dot from
zero, scaled by its block scales and added into an FP32 register accumulator. The tile configuration
changes only how the work is cut and scheduled, never an output element's arithmetic.

Configurations: ``MM_CANDIDATES`` (forward and dgrad) and ``WGRAD_CANDIDATES``, chosen per call shape
by ``MM_PICKER`` / ``WGRAD_PICKER`` (coscale.kernels.autotune.ConfigPicker: timed once per process
and shape, on the first call; it says why these kernels use an explicit picker rather than
``@triton.autotune``). ``launch_grouped_mm_tma`` / ``launch_grouped_wgrad_tma`` run one explicit
configuration (the candidate tests and benchmarks/tune_fp8_grouped.py call them directly).
"""

from __future__ import annotations

import functools

import torch

from coscale.errors import CoscaleError
from coscale.kernels._fp8_grouped_gluon import (
    GLUON_MM_CANDIDATES,
    launch_grouped_mm_gluon,
    launch_grouped_wgrad_gluon,
)
from coscale.kernels.autotune import ConfigPicker
from coscale.kernels.backend import interpreting
from coscale.kernels.fp8_recipe import BLOCK

__all__ = [
    "MM_CANDIDATES",
    "WGRAD_CANDIDATES",
    "INTERPRETER_CONFIG",
    "MM_PICKER",
    "WGRAD_PICKER",
    "launch_grouped_mm",
    "launch_grouped_mm_tma",
    "launch_grouped_wgrad",
    "launch_grouped_wgrad_tma",
    "segment_of_each_block",
]


# Kernel configurations. BLOCK_M rows x BLOCK_N columns per tile (BLOCK_M and BLOCK_N divide 128: a
# row tile never straddles two experts' 128-aligned segments and a column tile lies in one 128x128
# weight block), software-pipeline STAGES, warps, PROGRAMS_PER_SM (0: one program per tile; k: a
# persistent grid of k programs per SM), FLATTEN (asks Triton to fuse the persistent tile loop with the K
# loop; it has no effect on this kernel: Triton fuses only loops whose inner trip count is the same for
# every outer iteration, and here it is 0 for the tiles past the last expert, as an sm_90 compile with
# triton 3.6 shows, so a candidate with it times the same code as its twin without) and TMA_STORE (write
# C with an asynchronous TMA bulk store instead of pointer stores). On CUDA each call shape times its
# candidates once per process and keeps the fastest; benchmarks/tune_fp8_grouped.py sweeps more. On the
# H100 (DeepSeek-V3 experts; results/tune_fp8_grouped_run{8,9,14,15}_h100_2026-11-23.log at 256 rows per
# expert, ..._16384tok_run13_... at 512) the forward/dgrad candidates each led some product in some run
# (824-904 TFLOP/s), the first wgrad candidate led most weight-gradient products (361-445 at 256 rows;
# 64x128 led at 512, 521-570). No option wins everywhere and run-to-run noise is 5-10%, hence several
# candidates; 256-column tiles and warp specialisation were 2-3x slower. (The wgrad figures are of an
# earlier kernel, a loop per tile over its expert's chunks.)
MM_CANDIDATES = (
    {"BLOCK_M": 64, "BLOCK_N": 128, "STAGES": 4, "num_warps": 4, "PROGRAMS_PER_SM": 2},
    {"BLOCK_M": 64, "BLOCK_N": 128, "STAGES": 4, "num_warps": 4, "PROGRAMS_PER_SM": 2, "TMA_STORE": True},
    {"BLOCK_M": 64, "BLOCK_N": 128, "STAGES": 3, "num_warps": 4, "PROGRAMS_PER_SM": 2, "TMA_STORE": True},
    {"BLOCK_M": 64, "BLOCK_N": 128, "STAGES": 4, "num_warps": 4, "PROGRAMS_PER_SM": 2, "TMA_STORE": True,
     "FLATTEN": True},
    {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": 4, "num_warps": 8, "PROGRAMS_PER_SM": 1, "TMA_STORE": True,
     "FLATTEN": True},
)
# The weight-gradient kernel loops over (output position, 128-token chunk) pairs in one flat loop
# (grouped_wgrad_tma_kernel); its tiles need not divide 128 (each output element has its own row and
# column scales). FLATTEN does not apply to it. On the H200 at DeepSeek-V3's experts (256 rows an
# expert; results/tune_fp8_grouped_run33A_h200_2026-12-04.log) 128x64 tiles of one warpgroup, two
# programs an SM, led (442-463 TFLOP/s; BF16 CUTLASS 430-435), 64x128 came within 5% and 128x128 of
# two warpgroups within 20%; 128x128 of one warpgroup and 128x256 (a fresh 128-deep product beside the
# accumulator: 256 registers a thread) ran at half that.
# BY_EXPERT runs grouped_wgrad_by_expert_kernel (work items of one expert's BLOCK_M rows, whose A tiles stay in
# shared memory while the item walks the columns). On the H200 at V3's experts (run 36B, results/
# tune_fp8_grouped_run36B_h200_2026-12-04.log) its 128x64 tiles of one warpgroup, two programs an SM, took 6.3-6.7
# / 3.2 ms for gate+up / down against 8.9 / 4.0 for the position-major 128x64 (1.32x / 1.23x); by expert, 64x128
# ran at 430 / 384 TFLOP/s, 128x128 of two warpgroups at 486 / 459 (it spills) and 128x64 with 4 stages at 464 /
# 437, so they are not candidates. The position-major kernels stay for experts of more than two chunks, where the
# by-expert kernel loops over chunks per column tile. Run 37 (results/tune_fp8_grouped_run37A_h200_2026-12-04.log):
# the two paths in separate launches (the two-chunk kernel then takes 235 registers, not 255) ran at the same speed
# (6.24-6.30 / 3.25-3.30 ms), 128x32 tiles with 3 programs an SM (153 registers) at 6.9 / 3.5 ms: neither kept;
# 128x64 by expert with 2 stages took 10.2 / 4.8 ms and with pointer stores 7.0 / 3.5 (run 37E).
WGRAD_CANDIDATES = (
    {"BLOCK_M": 128, "BLOCK_N": 64, "STAGES": 3, "num_warps": 4, "PROGRAMS_PER_SM": 2, "TMA_STORE": True,
     "BY_EXPERT": True},
    {"BLOCK_M": 128, "BLOCK_N": 64, "STAGES": 3, "num_warps": 4, "PROGRAMS_PER_SM": 2, "TMA_STORE": True},
    {"BLOCK_M": 64, "BLOCK_N": 128, "STAGES": 3, "num_warps": 4, "PROGRAMS_PER_SM": 2, "TMA_STORE": True},
    {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": 4, "num_warps": 8, "PROGRAMS_PER_SM": 1, "TMA_STORE": True},
)
# Experts without tokens: their gradients are zeroed by ZERO_PROGRAMS_PER_EXPERT programs an expert,
# ZERO_BLOCK elements a store (the programs of experts with tokens return at once).
ZERO_PROGRAMS_PER_EXPERT = 16
ZERO_BLOCK = 2048
# The CPU interpreter: small tiles (quick) and a persistent grid (the tile loop is exercised).
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "STAGES": 1, "num_warps": 4, "PROGRAMS_PER_SM": 1}
# The picker also times the Gluon kernel's configurations (coscale.kernels._fp8_grouped_gluon: Hopper only, a
# warp-specialized schedule that promotes each product while the next runs; GLUON: True). Where Gluon is
# missing or the GPU is not an sm_90 they fail to launch and the picker skips them; the first candidate, a
# TMA kernel's, is the one used where nothing can be timed (inside a graph capture).
MM_PICKER = ConfigPicker("grouped FP8 GEMM", MM_CANDIDATES + tuple({**c, "GLUON": True} for c in GLUON_MM_CANDIDATES),
                         INTERPRETER_CONFIG)
# The Gluon weight-gradient kernel (launch_grouped_wgrad with GLUON: True) is not among the picker's candidates: on
# the H200 at V3's experts (run 38E, results/tune_fp8_grouped_run38E_h200_2026-12-04.log) its best, 128x128 tiles
# with 6 stages, ran at 567 TFLOP/s against 608-611 for the by-expert TMA kernel; benchmarks/tune_fp8_grouped.py
# --gluon times it.
WGRAD_PICKER = ConfigPicker("grouped FP8 weight-gradient GEMM", WGRAD_CANDIDATES, INTERPRETER_CONFIG)


@functools.cache
def _build_tma_kernels(interpret: bool):
    """The Triton kernels: the forward/dgrad GEMM, the weight gradient by output position, the zeros of
    experts without tokens and the weight gradient by (expert, row tile). Operands A and B come through
    host-built tensor descriptors (TMA bulk copies on Hopper), scales through pointers, C through a
    descriptor (TMA_STORE) or pointers. The GEMM kernels loop over their work with a stride of the grid
    size, so a grid smaller than the work makes them persistent; FLATTEN lets the pipeliner treat the
    forward kernel's tile loop and K loop as one."""
    import triton
    import triton.language as tl

    @triton.jit
    def grouped_mm_tma_kernel(
        a_desc, b_desc, c_ptr, c_desc, sa_ptr, sb_ptr, tile_ptr, M, N, K, E,
        stride_cm, stride_sam, stride_sak, stride_sbe, stride_sbn, stride_sbk,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        STAGES: tl.constexpr, FLATTEN: tl.constexpr, TMA_STORE: tl.constexpr,
    ):  # fmt: skip
        # a_desc: A [M, K]; b_desc: B flattened to [E*N, K] (expert e's rows start at e*N).
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        num_tiles = num_m * num_n
        num_k = tl.cdiv(K, BLOCK_K)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN):
            # GROUP_M row tiles sweep the N tiles together, so B tiles are reused from L2
            in_group = GROUP_M * num_n
            first_m = (tile // in_group) * GROUP_M
            group_rows = tl.minimum(num_m - first_m, GROUP_M)
            pid_m = first_m + (tile % in_group) % group_rows
            pid_n = (tile % in_group) // group_rows
            row0 = pid_m * BLOCK_M
            n0 = pid_n * BLOCK_N
            expert = tl.load(tile_ptr + row0 // BLOCK_K)  # segments are 128-aligned
            valid = expert < E
            expert = tl.minimum(expert, E - 1)
            offs_m = row0 + tl.arange(0, BLOCK_M)
            sa_ptrs = sa_ptr + offs_m.to(tl.int64) * stride_sam
            sb_base = sb_ptr + expert.to(tl.int64) * stride_sbe + (n0 // BLOCK_K) * stride_sbn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            k_iters = tl.where(valid, num_k, 0)  # rows after the last expert: zeros
            for kb in tl.range(0, k_iters, num_stages=STAGES):
                a = a_desc.load([row0, kb * BLOCK_K])
                b = b_desc.load([expert * N + n0, kb * BLOCK_K])
                sa = tl.load(sa_ptrs + kb * stride_sak, mask=offs_m < M, other=0.0)
                # one 128-deep dot from zero, promoted into FP32 with its two block scales (BLOCK_N
                # divides 128: the tile lies in one 128x128 weight block, whose scale is one number)
                sb = tl.load(sb_base + kb * stride_sbk)
                acc += tl.dot(a, b.T) * (sa * sb)[:, None]
            if TMA_STORE:  # an asynchronous bulk store; rows past M are clipped by the descriptor
                c_desc.store([row0, n0], acc.to(c_desc.dtype))
            else:
                cols = n0 + tl.arange(0, BLOCK_N)
                c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + cols[None, :]
                tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (cols < N)[None, :])

    @triton.jit
    def grouped_wgrad_tma_kernel(
        a_desc, b_desc, c_ptr, c_desc, sa_ptr, sb_ptr, off_ptr, chunk_ptr, N, K, E,
        stride_ce, stride_cn, stride_san, stride_sat, stride_sbk, stride_sbt,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, STAGES: tl.constexpr,
        TMA_STORE: tl.constexpr,
    ):  # fmt: skip
        # C[e] [N, K] = A[:, seg e] @ B[:, seg e]^T, A = dY^T [N, Mp] and B = X^T [K, Mp] (descriptors).
        # One flat loop of uniform length: this program's output positions (pid, pid + grid, ...) times
        # the 128-token chunks that hold any expert's tokens, chunk-minor. A position accumulates over
        # one expert's chunks and is stored (and its accumulator cleared) at that expert's last chunk.
        # The trip count is one number for the whole kernel, so the pipeliner prefetches the next
        # position's (and expert's) operands during this one's epilogue: at 256 tokens an expert a
        # position has only two chunks, and a loop per (position, expert) waited for its first loads
        # every time. Experts without tokens own no chunk: zero_empty_experts_kernel writes their zeros.
        num_k = tl.cdiv(K, BLOCK_N)
        num_pos = tl.cdiv(N, BLOCK_M) * num_k
        pid = tl.program_id(0)
        grid = tl.num_programs(0)
        chunks = tl.load(off_ptr + E - 1) // BLOCK_T  # the chunks before the last expert's end
        total = tl.cdiv(num_pos - pid, grid) * chunks
        # (chunk, pid_n, pid_k) advance by counters, not by dividing the iteration count (two integer
        # divisions an iteration were a tenth of the loop's instructions); grid = step_n * num_k + step_k
        step_n = grid // num_k
        step_k = grid - step_n * num_k
        chunk = chunks - 1  # the first iteration wraps to chunk 0 of the position pid
        pid_n = pid // num_k - step_n
        pid_k = pid % num_k - step_k
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in tl.range(0, total, num_stages=STAGES):
            wrap = chunk == chunks - 1
            chunk = tl.where(wrap, 0, chunk + 1)
            pid_k = tl.where(wrap, pid_k + step_k, pid_k)
            pid_n = tl.where(wrap, pid_n + step_n, pid_n)
            carry = pid_k >= num_k
            pid_k = tl.where(carry, pid_k - num_k, pid_k)
            pid_n = tl.where(carry, pid_n + 1, pid_n)
            offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
            a = a_desc.load([pid_n * BLOCK_M, chunk * BLOCK_T])
            b = b_desc.load([pid_k * BLOCK_N, chunk * BLOCK_T])
            sa = tl.load(sa_ptr + offs_n.to(tl.int64) * stride_san + chunk * stride_sat, mask=offs_n < N, other=0.0)
            sb = tl.load(sb_ptr + offs_k.to(tl.int64) * stride_sbk + chunk * stride_sbt, mask=offs_k < K, other=0.0)
            acc += tl.dot(a, b.T) * (sa[:, None] * sb[None, :])
            expert = tl.load(chunk_ptr + chunk)
            following = tl.load(chunk_ptr + chunk + 1, mask=chunk + 1 < chunks, other=E)
            if expert != following:  # the expert's last chunk: this position of dW_expert is complete
                if TMA_STORE:  # C as [E*N, K] (N a multiple of BLOCK_M: a tile stays in its expert)
                    c_desc.store([expert * N + pid_n * BLOCK_M, pid_k * BLOCK_N], acc.to(c_desc.dtype))
                else:
                    c_base = c_ptr + expert.to(tl.int64) * stride_ce
                    c_ptrs = c_base + offs_n[:, None].to(tl.int64) * stride_cn + offs_k[None, :]
                    c_mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
                    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    @triton.jit
    def grouped_wgrad_by_expert_kernel(
        a_desc, b_desc, c_ptr, c_desc, sa_ptr, sb_ptr, off_ptr, N, K, E,
        stride_ce, stride_cn, stride_san, stride_sat, stride_sbk, stride_sbt,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, STAGES: tl.constexpr,
        TMA_STORE: tl.constexpr,
    ):  # fmt: skip
        # C[e] [N, K] = A[:, seg e] @ B[:, seg e]^T as in grouped_wgrad_tma_kernel, cut differently: one work
        # item is (expert e, BLOCK_M rows of dW_e), and it walks all K column tiles. An expert of at most two
        # 128-token chunks (256 tokens an expert at DeepSeek-V3's 8192 x top-8 over 256 experts) has its A
        # rows loaded once per item and kept in shared memory, so each column tile reads only B's tile: at
        # 128x64 tiles a third of the bytes the position-major loop moves from L2 per output tile (A's and B's
        # tiles for every chunk), where that loop ran L2- and latency-bound (ncu, run 36: 71% of L2, tensor
        # pipes 24%). Larger experts loop over their
        # chunks per column tile. Experts without tokens own no work: zero_empty_experts_kernel.
        num_m = tl.cdiv(N, BLOCK_M)
        num_k = tl.cdiv(K, BLOCK_N)
        for item in range(tl.program_id(0), E * num_m, tl.num_programs(0)):
            e = item // num_m
            pid_m = item - e * num_m
            start = tl.load(off_ptr + e - 1, mask=e > 0, other=0)
            chunks = tl.cdiv(tl.load(off_ptr + e) - start, BLOCK_T)
            c0 = start // BLOCK_T  # segments start on 128-token boundaries
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = offs_m < N
            c_base = c_ptr + e.to(tl.int64) * stride_ce
            if chunks > 0 and chunks <= 2:
                # A one-chunk expert takes its only chunk twice, the second time with zero scales: another
                # expert's tokens (which may hold NaN) are never read, and e4m3 has no infinity, so the
                # second product adds exactly 0 unless the first is already NaN.
                c1 = c0 + chunks - 1
                two_m = (tl.zeros_like(offs_m) + chunks) == 2  # (a tensor: triton 3.9's interpreter refuses
                # the int32 mask that a scalar condition and-ed with a bool tensor makes)
                a0 = a_desc.load([pid_m * BLOCK_M, c0 * BLOCK_T])
                a1 = a_desc.load([pid_m * BLOCK_M, c1 * BLOCK_T])
                sa0 = tl.load(sa_ptr + offs_m.to(tl.int64) * stride_san + c0 * stride_sat, mask=row_ok, other=0.0)
                sa1 = tl.load(sa_ptr + offs_m.to(tl.int64) * stride_san + c1 * stride_sat, mask=row_ok & two_m,
                              other=0.0)
                for kt in tl.range(0, num_k, num_stages=STAGES):
                    offs_k = kt * BLOCK_N + tl.arange(0, BLOCK_N)
                    col_ok = offs_k < K
                    b0 = b_desc.load([kt * BLOCK_N, c0 * BLOCK_T])
                    b1 = b_desc.load([kt * BLOCK_N, c1 * BLOCK_T])
                    sb_row = sb_ptr + offs_k.to(tl.int64) * stride_sbk
                    sb0 = tl.load(sb_row + c0 * stride_sbt, mask=col_ok, other=0.0)
                    sb1 = tl.load(sb_row + c1 * stride_sbt, mask=col_ok, other=0.0)
                    acc = tl.dot(a0, b0.T) * (sa0[:, None] * sb0[None, :])
                    acc += tl.dot(a1, b1.T) * (sa1[:, None] * sb1[None, :])
                    if TMA_STORE:  # C as [E*N, K] (N a multiple of BLOCK_M: a tile stays in its expert)
                        c_desc.store([e * N + pid_m * BLOCK_M, kt * BLOCK_N], acc.to(c_desc.dtype))
                    else:
                        c_ptrs = c_base + offs_m[:, None].to(tl.int64) * stride_cn + offs_k[None, :]
                        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_k < K)[None, :])
            elif chunks > 2:
                for kt in tl.range(0, num_k):
                    offs_k = kt * BLOCK_N + tl.arange(0, BLOCK_N)
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    for c in tl.range(c0, c0 + chunks, num_stages=STAGES):
                        a = a_desc.load([pid_m * BLOCK_M, c * BLOCK_T])
                        b = b_desc.load([kt * BLOCK_N, c * BLOCK_T])
                        sa = tl.load(sa_ptr + offs_m.to(tl.int64) * stride_san + c * stride_sat, mask=row_ok, other=0.0)
                        sb = tl.load(sb_ptr + offs_k.to(tl.int64) * stride_sbk + c * stride_sbt, mask=offs_k < K,
                                     other=0.0)
                        acc += tl.dot(a, b.T) * (sa[:, None] * sb[None, :])
                    if TMA_STORE:  # C as [E*N, K] (N a multiple of BLOCK_M: a tile stays in its expert)
                        c_desc.store([e * N + pid_m * BLOCK_M, kt * BLOCK_N], acc.to(c_desc.dtype))
                    else:
                        c_ptrs = c_base + offs_m[:, None].to(tl.int64) * stride_cn + offs_k[None, :]
                        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_k < K)[None, :])

    @triton.jit
    def zero_empty_experts_kernel(c_ptr, off_ptr, stride_ce, NK, BLOCK: tl.constexpr):
        # program (e, j): if expert e has no tokens, zeros over its [N, K] gradient (contiguous, NK
        # elements), strided by the grid's second dimension; else nothing
        e = tl.program_id(0)
        start = tl.load(off_ptr + e - 1, mask=e > 0, other=0)
        end = tl.load(off_ptr + e)
        if end == start:
            base = c_ptr + e.to(tl.int64) * stride_ce
            zeros = tl.zeros((BLOCK,), dtype=c_ptr.dtype.element_ty)
            for j0 in range(tl.program_id(1) * BLOCK, NK, tl.num_programs(1) * BLOCK):
                offs = j0 + tl.arange(0, BLOCK)
                tl.store(base + offs, zeros, mask=offs < NK)

    return grouped_mm_tma_kernel, grouped_wgrad_tma_kernel, zero_empty_experts_kernel, grouped_wgrad_by_expert_kernel


@functools.cache
def _sms_of_cuda_device(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device) -> int:
    """SMs of ``device`` (4 stand-ins for the CPU interpreter), looked up once per device."""
    if device.type != "cuda":
        return 4
    return _sms_of_cuda_device(device.index if device.index is not None else torch.cuda.current_device())


def _tensor_descriptor():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError as exc:  # triton < 3.4
        raise CoscaleError(f"the grouped FP8 GEMMs need triton >= 3.4 (tensor descriptors): {exc}") from exc
    return TensorDescriptor


def _descriptor_ok(t: torch.Tensor) -> bool:
    """Whether a tensor descriptor can read or write the 2-D tensor t: contiguous rows, 16-byte aligned
    base and row stride (not, e.g., a bf16 output with K = 100 columns)."""
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


def _tma_operand(t: torch.Tensor) -> torch.Tensor:
    """t itself when a tensor descriptor can read it, else a contiguous copy."""
    return t if _descriptor_ok(t) else t.contiguous()


def _check_tiles(cfg: dict) -> None:
    # a row tile must not straddle two experts' 128-aligned segments, and a column tile must lie in
    # one 128x128 weight block (the forward kernel loads one weight scale per tile and K step)
    for key in ("BLOCK_M", "BLOCK_N"):
        if BLOCK % cfg[key]:
            raise CoscaleError(f"{key} must divide {BLOCK}, got {cfg[key]}")


def _flatten_stages(cfg: dict) -> dict:
    # a flattened tile loop is pipelined by the kernel-level num_stages (the inner loop's is merged away)
    return {"num_stages": cfg.get("STAGES", 3)} if cfg.get("FLATTEN", False) else {}


def launch_grouped_mm_tma(a, a_scale, b, b_scale, tile_expert, c, cfg: dict):
    """One launch of the TMA forward/dgrad kernel with an explicit configuration ``cfg``:
    BLOCK_M and BLOCK_N (each dividing 128), GROUP_M, STAGES, num_warps,
    PROGRAMS_PER_SM (0: one program per tile, else a persistent grid of that many per SM), FLATTEN and
    TMA_STORE (see MM_CANDIDATES; the bulk store is skipped where c's layout does not allow it)."""
    _check_tiles(cfg)
    TensorDescriptor = _tensor_descriptor()
    m, k = a.shape
    e, n, _ = b.shape
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    a2 = _tma_operand(a)
    b2 = _tma_operand(b.reshape(e * n, k))  # a view for the buffers this module writes
    a_desc = TensorDescriptor.from_tensor(a2, [bm, BLOCK])
    b_desc = TensorDescriptor.from_tensor(b2, [bn, BLOCK])
    tiles = -(-m // bm) * (n // bn)
    per_sm = cfg.get("PROGRAMS_PER_SM", 1)
    programs = tiles if per_sm == 0 else max(1, min(tiles, per_sm * _num_sms(a.device)))
    tma_store = cfg.get("TMA_STORE", False) and _descriptor_ok(c)  # else pointer stores
    c_desc = TensorDescriptor.from_tensor(c, [bm, bn]) if tma_store else c
    kernel = _build_tma_kernels(interpreting())[0]
    kernel[(programs,)](
        a_desc, b_desc, c, c_desc, a_scale, b_scale, tile_expert, m, n, k, e,
        c.stride(0), a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1), b_scale.stride(2),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK, GROUP_M=cfg.get("GROUP_M", 8), STAGES=cfg.get("STAGES", 3),
        FLATTEN=cfg.get("FLATTEN", False), TMA_STORE=tma_store,
        num_warps=cfg.get("num_warps", 8), **_flatten_stages(cfg),
    )  # fmt: skip
    return c


def launch_grouped_mm(a, a_scale, b, b_scale, tile_expert, c, cfg: dict):
    """The forward/dgrad GEMM with a configuration of MM_PICKER: the Gluon kernel's (GLUON) or the TMA kernel's."""
    if cfg.get("GLUON", False):
        return launch_grouped_mm_gluon(_tma_operand(a), a_scale, _tma_operand(b), b_scale, tile_expert, c, cfg)
    return launch_grouped_mm_tma(a, a_scale, b, b_scale, tile_expert, c, cfg)


def segment_of_each_block(group_end_offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """[ceil(rows/128)] int32: the expert owning each 128-row block of a grouped layout (E for blocks
    after the last segment); two small device ops, no host sync."""
    offsets = group_end_offsets.to(torch.int64)
    starts = torch.arange(0, max(rows, 1), BLOCK, device=offsets.device, dtype=torch.int64)
    return torch.searchsorted(offsets, starts, right=True).to(torch.int32)


def launch_grouped_wgrad_tma(dyt, dyt_scale, xt, xt_scale, offsets, out, cfg: dict, chunk_expert=None):
    """One launch of the TMA wgrad kernel with an explicit configuration: BLOCK_M tiles N, BLOCK_N
    tiles K, STAGES, num_warps, PROGRAMS_PER_SM (0: one program per work item), TMA_STORE and BY_EXPERT
    (grouped_wgrad_by_expert_kernel: work items of (expert, BLOCK_M rows) instead of output positions);
    ``out`` a contiguous [E, N, K]; ``chunk_expert``: segment_of_each_block(offsets, Mp) if the
    caller has it. Experts without tokens get zeros from a second, small launch."""
    if not out.is_contiguous():
        raise CoscaleError("the grouped wgrad kernel writes a contiguous [E, N, K] output")
    TensorDescriptor = _tensor_descriptor()
    n, mp = dyt.shape
    k = xt.shape[0]
    experts = offsets.numel()
    by_expert = cfg.get("BY_EXPERT", False)
    if chunk_expert is None and not by_expert:  # the by-expert kernel reads the offsets only
        chunk_expert = segment_of_each_block(offsets, mp)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    a_desc = TensorDescriptor.from_tensor(_tma_operand(dyt), [bm, BLOCK])
    b_desc = TensorDescriptor.from_tensor(_tma_operand(xt), [bn, BLOCK])
    _, by_position, _, by_expert_kernel = _build_tma_kernels(interpreting())
    # work items: (expert, row tile) pairs with BY_EXPERT, else output positions (each over all experts)
    kernel = by_expert_kernel if by_expert else by_position
    items = -(-n // bm) * (experts if by_expert else -(-k // bn))
    per_sm = cfg.get("PROGRAMS_PER_SM", 0)
    programs = items if per_sm == 0 else max(1, min(items, per_sm * _num_sms(dyt.device)))
    # a bulk store writes C as [E*N, K]: only when a BLOCK_M row tile cannot cross into the next expert
    # and a descriptor can write that view; else pointer stores
    c2d = out.view(experts * n, k)
    tma_store = cfg.get("TMA_STORE", False) and n % bm == 0 and _descriptor_ok(c2d)
    c_desc = TensorDescriptor.from_tensor(c2d, [bm, bn]) if tma_store else out
    chunk_arg = () if by_expert else (chunk_expert,)
    kernel[(programs,)](
        a_desc, b_desc, out, c_desc, dyt_scale, xt_scale, offsets, *chunk_arg, n, k, experts,
        out.stride(0), out.stride(1), dyt_scale.stride(0), dyt_scale.stride(1), xt_scale.stride(0), xt_scale.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_T=BLOCK, STAGES=cfg.get("STAGES", 3), TMA_STORE=tma_store,
        num_warps=cfg.get("num_warps", 8),
    )  # fmt: skip
    _zero_empty_experts(out, offsets)
    return out


def _zero_empty_experts(out, offsets):
    """Zeros over the [N, K] gradients of the experts without tokens (a small launch; the others return at once)."""
    experts, n, k = out.shape
    zero_kernel = _build_tma_kernels(interpreting())[2]
    zero_kernel[(experts, ZERO_PROGRAMS_PER_EXPERT)](out, offsets, out.stride(0), n * k, BLOCK=ZERO_BLOCK, num_warps=4)


def launch_grouped_wgrad(dyt, dyt_scale, xt, xt_scale, offsets, out, cfg: dict, chunk_expert=None):
    """The weight-gradient GEMM with a configuration of WGRAD_PICKER: the Gluon kernel's (GLUON; then the zeros
    of experts without tokens) or the TMA kernels'."""
    if cfg.get("GLUON", False):
        if not out.is_contiguous():
            raise CoscaleError("the grouped wgrad kernel writes a contiguous [E, N, K] output")
        launch_grouped_wgrad_gluon(_tma_operand(dyt), dyt_scale, _tma_operand(xt), xt_scale, offsets, out, cfg)
        _zero_empty_experts(out, offsets)
        return out
    return launch_grouped_wgrad_tma(dyt, dyt_scale, xt, xt_scale, offsets, out, cfg, chunk_expert)
