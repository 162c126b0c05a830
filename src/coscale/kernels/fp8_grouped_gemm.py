"""Grouped block-scaled FP8 GEMMs for the routed experts, and their autograd wrapper.

Shape legend: M routed token rows sorted by expert, E experts, K input features, N output features,
``group_end_offsets`` [E] int32: rows [off[e-1], off[e]) belong to expert e (off[-1] = 0). Rows at or
after off[E-1] belong to no expert and produce zeros.

- ``fp8_grouped_mm(a [M, K] e4m3, a_scale [M, K/128], b [E, N, K] e4m3, b_scale [E, N/128, K/128],
  group_end_offsets) -> [M, N]``: row i uses expert e(i)'s weights (forward and dgrad).
  Contract: every segment boundary is a multiple of 128, so a 128-row tile never straddles two
  experts. The caller pads segments (``fp8_grouped_linear`` does it for you).
- ``fp8_grouped_wgrad(dyt [N, Mp], dyt_scale [N, Mp/128], xt [K, Mp], xt_scale [K, Mp/128],
  group_end_offsets) -> [E, N, K] fp32``: dW_e = dY_e^T X_e, both operands quantized in 1x128 tiles
  along the tokens (the transposed layout of kernels.quant.act_quant_128x1); the tokens of one expert
  are the contraction dimension, looped over from off[e-1] to off[e] in steps of 128 (a "K-grouped" GEMM).
- ``fp8_grouped_linear(x [M, K], w [E, N, K], group_end_offsets) -> [M, N]``: autograd wrapper with
  forward, dgrad and wgrad all in FP8 (the recipe of coscale.fp8; master weights fp32 or bf16, weight
  gradient accumulated in FP32 and written in w's dtype). Segments that are not multiples of 128 are
  padded here with zero rows (one host sync to check and size the padded buffer; ``aligned=True``, what
  the MoE layer passes, skips both); N and K that are not multiples of 128 are zero-padded by the
  quantization kernels, which does not change any product.
- ``fp8_grouped_gate_up(x, w_gate, w_up, offsets) -> [M, 2I]``: gate and up sharing one quantization of
  x, one stacked FP8 weight buffer, one forward GEMM and one dgrad GEMM (contraction 2I).

The weights are quantized with quant.weight_quant_128x128_dual, which also writes W_e^T's FP8 bytes (a
1-byte transpose), so dgrad needs no transposing copy of a 16- or 32-bit tensor. The grouped GEMM finds
each row tile's expert in a tile -> expert map built on the device once per call (``expert_tile_map``),
never by scanning E ends.

Both Triton kernels read A and B through TMA tensor descriptors, may run persistent (a grid smaller
than the tile count), pick their tile configuration per call shape by timing a few candidates once
(``MM_CANDIDATES``, ``WGRAD_CANDIDATES``), and promote every 128 elements of K: one 128-deep tl.dot
from zero, scaled by its block scales and added into an FP32 register accumulator. The ``*_ref``
functions (per-expert loops over coscale.kernels.fp8_gemm.fp8_gemm_ref, dequantized FP32) are the
specification and CPU fallback.
"""

from __future__ import annotations

import functools

import torch

from coscale.errors import CoscaleError
from coscale.kernels.fp8_gemm import fp8_gemm_ref
from coscale.kernels.quant import (
    BLOCK,
    FP8_DTYPE,
    act_quant_1x128,
    act_quant_1x128_dual,
    interpreting,
    triton_available,
    weight_quant_128x128,
    weight_quant_128x128_dual,
)

__all__ = [
    "fp8_grouped_mm",
    "fp8_grouped_mm_ref",
    "fp8_grouped_wgrad",
    "fp8_grouped_wgrad_ref",
    "fp8_grouped_linear",
    "fp8_grouped_gate_up",
    "expert_tile_map",
    "quantize_expert_weights",
    "clear_weight_cache",
]


def _starts_ends(group_end_offsets: torch.Tensor):
    ends = [int(v) for v in group_end_offsets.tolist()]
    return [0, *ends[:-1]], ends


def _check_offsets(group_end_offsets: torch.Tensor, experts: int) -> None:
    if group_end_offsets.dim() != 1 or group_end_offsets.numel() != experts:
        raise CoscaleError(
            f"group_end_offsets must have shape [{experts}] (one end offset per expert), "
            f"got {tuple(group_end_offsets.shape)}"
        )
    if group_end_offsets.dtype not in (torch.int32, torch.int64):
        raise CoscaleError(f"group_end_offsets must be int32 or int64, got {group_end_offsets.dtype}")


def _use_triton(device: torch.device, backend: str) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise CoscaleError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "triton":
        if not triton_available():
            raise CoscaleError("backend='triton' needs the triton package")
        if device.type != "cuda" and not interpreting():
            raise CoscaleError("Triton kernels on CPU tensors need TRITON_INTERPRET=1")
        return True
    return backend == "auto" and device.type == "cuda" and triton_available()


# ----------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------


def fp8_grouped_mm_ref(a, a_scale, b, b_scale, group_end_offsets, out_dtype=torch.bfloat16):
    """Per-expert loop of the dequantized FP32 GEMM; rows after the last offset are zeros."""
    _check_offsets(group_end_offsets, b.shape[0])
    out = torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    for e, (start, end) in enumerate(zip(*_starts_ends(group_end_offsets))):
        if end > start:
            out[start:end] = fp8_gemm_ref(a[start:end], a_scale[start:end], b[e], b_scale[e], out_dtype)
    return out


def fp8_grouped_wgrad_ref(dyt, dyt_scale, xt, xt_scale, group_end_offsets):
    """dW_e = dY_e^T X_e from the transposed (token-contiguous) layouts, dequantized FP32."""
    experts = group_end_offsets.numel()
    out = torch.zeros(experts, dyt.shape[0], xt.shape[0], dtype=torch.float32, device=dyt.device)
    for e, (start, end) in enumerate(zip(*_starts_ends(group_end_offsets))):
        if end > start:
            if start % BLOCK or end % BLOCK:
                raise CoscaleError(f"expert {e}'s segment [{start}, {end}) is not 128-aligned")
            tiles = slice(start // BLOCK, end // BLOCK)
            out[e] = fp8_gemm_ref(
                dyt[:, start:end], dyt_scale[:, tiles], xt[:, start:end], xt_scale[:, tiles], torch.float32
            )
    return out


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


# Kernel configurations. BLOCK_M rows x BLOCK_N columns per tile (BLOCK_M and BLOCK_N divide 128: a
# row tile never straddles two experts' 128-aligned segments and a column tile lies in one 128x128
# weight block), software-pipeline STAGES, warps, PROGRAMS_PER_SM (0: one program per tile; k: a
# persistent grid of k programs per SM), FLATTEN (pipeline the persistent tile loop as one loop, so the
# next tile's loads are issued during this tile's epilogue) and TMA_STORE (write C with an asynchronous
# TMA bulk store instead of pointer stores). On CUDA each call shape times its candidates once per
# process and keeps the fastest; benchmarks/tune_fp8_grouped.py sweeps more. On the H100 (DeepSeek-V3
# experts; results/tune_fp8_grouped_run{8,9,14,15}_h100_2026-11-23.log at 256 rows per expert,
# ..._16384tok_run13_... at 512) the forward/dgrad candidates each led some product in some run
# (824-904 TFLOP/s), the first wgrad candidate led most weight-gradient products (361-445 at 256 rows;
# 64x128 led at 512, 521-570). No option wins everywhere and run-to-run noise is 5-10%, hence several
# candidates; 256-column tiles and warp specialisation were 2-3x slower.
MM_CANDIDATES = (
    {"BLOCK_M": 64, "BLOCK_N": 128, "STAGES": 4, "num_warps": 4, "PROGRAMS_PER_SM": 2},
    {"BLOCK_M": 64, "BLOCK_N": 128, "STAGES": 4, "num_warps": 4, "PROGRAMS_PER_SM": 2, "TMA_STORE": True},
    {"BLOCK_M": 64, "BLOCK_N": 128, "STAGES": 3, "num_warps": 4, "PROGRAMS_PER_SM": 2, "TMA_STORE": True},
    {"BLOCK_M": 64, "BLOCK_N": 128, "STAGES": 4, "num_warps": 4, "PROGRAMS_PER_SM": 2, "TMA_STORE": True,
     "FLATTEN": True},
    {"BLOCK_M": 128, "BLOCK_N": 128, "STAGES": 4, "num_warps": 8, "PROGRAMS_PER_SM": 1, "TMA_STORE": True,
     "FLATTEN": True},
)
WGRAD_CANDIDATES = (
    {"BLOCK_M": 128, "BLOCK_N": 64, "STAGES": 3, "num_warps": 4, "PROGRAMS_PER_SM": 2, "TMA_STORE": True,
     "FLATTEN": True},
    {"BLOCK_M": 64, "BLOCK_N": 128, "STAGES": 3, "num_warps": 4, "PROGRAMS_PER_SM": 2, "TMA_STORE": True},
    {"BLOCK_M": 64, "BLOCK_N": 128, "STAGES": 3, "num_warps": 4, "PROGRAMS_PER_SM": 2, "TMA_STORE": True,
     "FLATTEN": True},
)
# The CPU interpreter: small tiles (quick) and a persistent grid (the tile loop is exercised).
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "STAGES": 1, "num_warps": 4, "PROGRAMS_PER_SM": 1}
_PICKED: dict = {}


PICK_ROUNDS = 2  # timing rounds over all candidates; each candidate keeps its fastest round


def _pick_config(key, candidates, launch) -> dict:
    """The fastest candidate for ``key`` (timed on the first call, then remembered), or the
    interpreter's configuration on CPU tensors. Every candidate is compiled and run once before any is
    timed, and the candidates are timed in interleaved rounds, so neither compilation nor the GPU's
    clock ramp favours the ones timed last (a single pass picked 8% below the best on the H100)."""
    if interpreting():
        return INTERPRETER_CONFIG
    cfg = _PICKED.get(key)
    if cfg is None:
        import triton.testing

        runnable, error = [], None
        for i, cand in enumerate(candidates):
            try:
                launch(cand)
                runnable.append(i)
            except CoscaleError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory on a smaller GPU: skip it
                error = exc
        if not runnable:
            raise CoscaleError(f"no grouped FP8 GEMM configuration runs on this GPU for {key}: {error}") from error
        best = {}
        for _ in range(PICK_ROUNDS):
            for i in runnable:
                ms = triton.testing.do_bench(lambda c=candidates[i]: launch(c), warmup=5, rep=40)
                best[i] = min(ms, best.get(i, ms))
        cfg = _PICKED[key] = candidates[min(runnable, key=best.__getitem__)]
    return cfg


def _rows_bucket(rows: int) -> int:
    return 1 << max(rows - 1, 0).bit_length()


@functools.cache
def _build_tma_kernels(interpret: bool):
    """The two Triton kernels. Operands A and B come through host-built tensor descriptors (TMA bulk
    copies on Hopper), scales through pointers, C through a descriptor (TMA_STORE) or pointers. Both
    kernels loop over their tiles with a stride of the grid size, so a grid smaller than the tile count
    makes them persistent; FLATTEN lets the pipeliner treat that loop and the K loop as one."""
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
        a_desc, b_desc, c_ptr, c_desc, sa_ptr, sb_ptr, off_ptr, N, K, E,
        stride_ce, stride_cn, stride_san, stride_sat, stride_sbk, stride_sbt,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, STAGES: tl.constexpr,
        FLATTEN: tl.constexpr, TMA_STORE: tl.constexpr,
    ):  # fmt: skip
        # C[e] [N, K] = A[:, seg e] @ B[:, seg e]^T, A = dY^T [N, Mp] and B = X^T [K, Mp] (descriptors).
        # Tiles expert-major (one expert's operands stay in L2 while its tiles run); a grid smaller
        # than the tile count makes the kernel persistent.
        num_n = tl.cdiv(N, BLOCK_M)
        num_k = tl.cdiv(K, BLOCK_N)
        per_expert = num_n * num_k
        for tile in tl.range(tl.program_id(0), E * per_expert, tl.num_programs(0), flatten=FLATTEN):
            expert = tile // per_expert
            pid_n = (tile % per_expert) // num_k
            pid_k = tile % num_k
            start = tl.load(off_ptr + expert - 1, mask=expert > 0, other=0)
            end = tl.load(off_ptr + expert)
            offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
            sa_ptrs = sa_ptr + offs_n.to(tl.int64) * stride_san
            sb_ptrs = sb_ptr + offs_k.to(tl.int64) * stride_sbk
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for t0 in tl.range(start, end, BLOCK_T, num_stages=STAGES):
                a = a_desc.load([pid_n * BLOCK_M, t0])
                b = b_desc.load([pid_k * BLOCK_N, t0])
                tile_t = t0 // BLOCK_T
                sa = tl.load(sa_ptrs + tile_t * stride_sat, mask=offs_n < N, other=0.0)
                sb = tl.load(sb_ptrs + tile_t * stride_sbt, mask=offs_k < K, other=0.0)
                acc += tl.dot(a, b.T) * sa[:, None] * sb[None, :]
            if TMA_STORE:  # C as [E*N, K] (N a multiple of BLOCK_M: a tile stays in its expert)
                c_desc.store([expert * N + pid_n * BLOCK_M, pid_k * BLOCK_N], acc.to(c_desc.dtype))
            else:
                c_base = c_ptr + expert.to(tl.int64) * stride_ce
                c_ptrs = c_base + offs_n[:, None].to(tl.int64) * stride_cn + offs_k[None, :]
                tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])

    return grouped_mm_tma_kernel, grouped_wgrad_tma_kernel


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
    kernel, _ = _build_tma_kernels(interpreting())
    kernel[(programs,)](
        a_desc, b_desc, c, c_desc, a_scale, b_scale, tile_expert, m, n, k, e,
        c.stride(0), a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1), b_scale.stride(2),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK, GROUP_M=cfg.get("GROUP_M", 8), STAGES=cfg.get("STAGES", 3),
        FLATTEN=cfg.get("FLATTEN", False), TMA_STORE=tma_store,
        num_warps=cfg.get("num_warps", 8), **_flatten_stages(cfg),
    )  # fmt: skip
    return c


def launch_grouped_wgrad_tma(dyt, dyt_scale, xt, xt_scale, offsets, out, cfg: dict):
    """One launch of the TMA wgrad kernel with an explicit configuration (BLOCK_M tiles N, BLOCK_N
    tiles K, STAGES, num_warps, PROGRAMS_PER_SM, FLATTEN and TMA_STORE as for the forward)."""
    TensorDescriptor = _tensor_descriptor()
    n, _ = dyt.shape
    k = xt.shape[0]
    experts = offsets.numel()
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    a_desc = TensorDescriptor.from_tensor(_tma_operand(dyt), [bm, BLOCK])
    b_desc = TensorDescriptor.from_tensor(_tma_operand(xt), [bn, BLOCK])
    _, kernel = _build_tma_kernels(interpreting())
    tiles = -(-n // bm) * -(-k // bn) * experts
    per_sm = cfg.get("PROGRAMS_PER_SM", 0)
    programs = tiles if per_sm == 0 else max(1, min(tiles, per_sm * _num_sms(dyt.device)))
    # a bulk store writes C as [E*N, K]: only when a BLOCK_M row tile cannot cross into the next expert
    # and a descriptor can write that view; else pointer stores
    c2d = out.view(experts * n, k) if out.is_contiguous() else None
    tma_store = cfg.get("TMA_STORE", False) and n % bm == 0 and c2d is not None and _descriptor_ok(c2d)
    c_desc = TensorDescriptor.from_tensor(c2d, [bm, bn]) if tma_store else out
    kernel[(programs,)](
        a_desc, b_desc, out, c_desc, dyt_scale, xt_scale, offsets, n, k, experts,
        out.stride(0), out.stride(1), dyt_scale.stride(0), dyt_scale.stride(1), xt_scale.stride(0), xt_scale.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_T=BLOCK, STAGES=cfg.get("STAGES", 3),
        FLATTEN=cfg.get("FLATTEN", False), TMA_STORE=tma_store,
        num_warps=cfg.get("num_warps", 8), **_flatten_stages(cfg),
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------
# Wrappers
# ----------------------------------------------------------------------------------------------------


def _check_grouped(a, a_scale, b, b_scale):
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise CoscaleError(f"grouped FP8 GEMM operands must be float8_e4m3fn, got {a.dtype}, {b.dtype}")
    if a.dim() != 2 or b.dim() != 3 or a.shape[1] != b.shape[2]:
        raise CoscaleError(f"expected a [M, K] and b [E, N, K]; got {tuple(a.shape)}, {tuple(b.shape)}")
    m, k = a.shape
    e, n, _ = b.shape
    if k % BLOCK or n % BLOCK:
        raise CoscaleError(f"grouped FP8 GEMM needs N and K to be multiples of {BLOCK}; got N={n}, K={k}")
    if tuple(a_scale.shape) != (m, k // BLOCK):
        raise CoscaleError(f"a_scale must be [{m}, {k // BLOCK}] (1x128), got {tuple(a_scale.shape)}")
    if tuple(b_scale.shape) != (e, n // BLOCK, k // BLOCK):
        raise CoscaleError(
            f"b_scale must be [{e}, {n // BLOCK}, {k // BLOCK}] (128x128), got {tuple(b_scale.shape)}"
        )


def expert_tile_map(group_end_offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """[ceil(rows/128)] int32: the expert owning each 128-row tile (E for tiles after the last segment).

    Two small device ops (arange + searchsorted), no host sync; computed once per layer call and
    shared by every grouped GEMM of that call, so the kernel looks its expert up in O(1)."""
    offsets = group_end_offsets.to(torch.int64)
    starts = torch.arange(0, max(rows, 1), BLOCK, device=offsets.device, dtype=torch.int64)
    return torch.searchsorted(offsets, starts, right=True).to(torch.int32)


def fp8_grouped_mm(
    a, a_scale, b, b_scale, group_end_offsets, out_dtype=torch.bfloat16, backend: str = "auto", *, tile_expert=None
) -> torch.Tensor:
    """[M, N]: rows of expert e times b[e]^T, block-scaled FP8 with FP32 accumulation (see module doc).

    ``b`` [E, N, K] with K contiguous; it is read as [E*N, K] (a free view of the buffers this module
    writes; another layout, or an operand a tensor descriptor cannot read, is copied in every call).
    ``tile_expert``: expert_tile_map(group_end_offsets, M) if the caller already has it."""
    _check_grouped(a, a_scale, b, b_scale)
    _check_offsets(group_end_offsets, b.shape[0])
    if not _use_triton(a.device, backend):
        return fp8_grouped_mm_ref(a, a_scale, b, b_scale, group_end_offsets, out_dtype)
    m, k = a.shape
    e, n, _ = b.shape
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if c.numel() == 0 or k == 0:  # nothing to compute, or an empty sum
        return c.zero_()
    if b.stride(2) != 1:
        raise CoscaleError("fp8_grouped_mm needs b's last (K) dimension contiguous")
    if tile_expert is None:
        tile_expert = expert_tile_map(group_end_offsets.to(a.device), m)

    def launch(cfg):
        return launch_grouped_mm_tma(a, a_scale, b, b_scale, tile_expert, c, cfg)

    cfg = _pick_config(("mm", _rows_bucket(m), n, k, e, out_dtype), MM_CANDIDATES, launch)
    return launch(cfg)


def fp8_grouped_wgrad(
    dyt, dyt_scale, xt, xt_scale, group_end_offsets, backend: str = "auto", *, out_dtype=torch.float32
):
    """[E, N, K]: dW_e = dY_e^T X_e from token-contiguous 1x128 layouts (see module doc); accumulated
    in FP32 and written in ``out_dtype`` (FP32 by default; the autograd wrappers ask for w's dtype)."""
    n, mp = dyt.shape
    k = xt.shape[0]
    if xt.shape[1] != mp or mp % BLOCK:
        raise CoscaleError(f"dyt [N, Mp] and xt [K, Mp] need one Mp, a multiple of 128: {dyt.shape}, {xt.shape}")
    experts = group_end_offsets.numel()
    if not _use_triton(dyt.device, backend):
        return fp8_grouped_wgrad_ref(dyt, dyt_scale, xt, xt_scale, group_end_offsets).to(out_dtype)
    out = torch.empty(experts, n, k, dtype=out_dtype, device=dyt.device)
    if out.numel() == 0 or mp == 0:  # no tokens: every expert's gradient is zero
        return out.zero_()
    offsets = group_end_offsets.to(device=dyt.device, dtype=torch.int32)

    def launch(cfg):
        return launch_grouped_wgrad_tma(dyt, dyt_scale, xt, xt_scale, offsets, out, cfg)

    cfg = _pick_config(("wgrad", _rows_bucket(mp), n, k, experts, out_dtype), WGRAD_CANDIDATES, launch)
    return launch(cfg)


def quantize_expert_weights(w: torch.Tensor, backend: str = "auto"):
    """w [E, N, K] (N, K multiples of 128) -> (wq [E, N, K] e4m3, scale [E, N/128, K/128])."""
    e, n, k = w.shape
    wq, ws = weight_quant_128x128(w.reshape(e * n, k), backend=backend)
    return wq.view(e, n, k), ws.view(e, n // BLOCK, k // BLOCK)


def _quantize_weights(ws, need_t: bool, backend: str):
    """Quantize expert weights [E, N_i, K] (one or several, e.g. w_gate and w_up) into one stacked
    buffer [E, sum Np_i, Kp] (each part padded to 128 rows) and, when ``need_t``, its transpose
    [E, Kp, sum Np_i] (W's FP8 bytes transposed into the stacked buffer)."""
    e, _, k = ws[0].shape
    kp = _ceil128(k)
    nps = [_ceil128(w.shape[1]) for w in ws]
    total = sum(nps)
    dev = ws[0].device
    wq = torch.empty(e, total, kp, dtype=FP8_DTYPE, device=dev)
    sq = torch.empty(e, total // BLOCK, kp // BLOCK, dtype=torch.float32, device=dev)
    if not need_t:
        if len(ws) == 1 and ws[0].shape[1] % BLOCK == 0 and k % BLOCK == 0:
            wq, sq = quantize_expert_weights(ws[0], backend)
            return wq, sq, None, None
    wt = torch.empty(e, kp, total if need_t else 0, dtype=FP8_DTYPE, device=dev)
    st = torch.empty(e, kp // BLOCK, total // BLOCK if need_t else 0, dtype=torch.float32, device=dev)
    row = 0
    for w, np_ in zip(ws, nps):
        rb = slice(row // BLOCK, (row + np_) // BLOCK)
        t_views = (wt[:, :, row : row + np_], st[:, :, rb]) if need_t else (None, None)
        out = (wq[:, row : row + np_], sq[:, rb], *t_views)
        weight_quant_128x128_dual(w.detach(), backend=backend, out=out)
        row += np_
    return wq, sq, (wt if need_t else None), (st if need_t else None)


# Quantized expert weights kept between calls (cache_weights=True), keyed weakly by the first weight
# tensor. An entry is dropped when a weight's storage or version counter changes (in-place updates bump
# it) and after every torch.optim optimizer step (a global post-step hook, registered with the first
# entry: fused optimizers update without bumping the version counter). Writes through ``.data`` outside
# an optimizer are not seen: call clear_weight_cache() after them. Costs the FP8 copies' memory (1 byte
# per parameter, 2 with W^T).
_WEIGHT_CACHE = torch.utils.weak.WeakIdKeyDictionary()
_STEP_HOOK = []


def _version(w: torch.Tensor) -> int:
    return -1 if w.is_inference() else w._version  # inference tensors keep no version counter


def _cached_quantize_weights(ws, need_t: bool, backend: str):
    if not _STEP_HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STEP_HOOK.append(register_optimizer_step_post_hook(lambda *_: clear_weight_cache()))
    stamp = (tuple((w.data_ptr(), _version(w), tuple(w.shape), w.dtype) for w in ws), backend)
    hit = _WEIGHT_CACHE.get(ws[0])
    if hit is not None and hit[0] == stamp and (hit[1][2] is not None or not need_t):
        return hit[1]
    _WEIGHT_CACHE.pop(ws[0], None)
    hit = None  # no reference to the stale copies is left while the new ones are allocated
    result = _quantize_weights(ws, need_t, backend)
    _WEIGHT_CACHE[ws[0]] = (stamp, result)
    return result


def clear_weight_cache() -> None:
    """Drop every cached FP8 expert weight (see ``cache_weights`` of fp8_grouped_linear)."""
    _WEIGHT_CACHE.clear()


def _ceil128(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------


class _FP8GroupedFunction(torch.autograd.Function):
    """out [M, sum Np_i] = x [M, K] @ [w_0; w_1; ...]_e^T for 128-aligned segments, all in FP8.

    Several weights (w_gate and w_up) share one quantization of x, one GEMM (their FP8 copies are
    stacked by the quantization pass itself, so the stacking costs nothing) and one dgrad GEMM
    dX = [dG | dU] [W_gate; W_up]. Full passes per direction:
      forward   x -> xq (+ xt when any weight needs a gradient), each weight -> wq (+ wq_t when x
                needs one), one grouped GEMM
      backward  dY -> dyq (+ dyt), one dgrad grouped GEMM against the saved wq_t (no transposing
                copy), one wgrad grouped GEMM per weight written in the weight's dtype
    No host synchronisation: the tile -> expert map comes from the caller.
    """

    @staticmethod
    def forward(ctx, x, offsets, tile_expert, backend, cache_weights, *ws):
        need_dx = ctx.needs_input_grad[0]
        need_dw = any(ctx.needs_input_grad[5:])
        if need_dw:
            xq, xs, xt, xts = act_quant_1x128_dual(x, backend=backend)
        else:
            (xq, xs), xt, xts = act_quant_1x128(x, backend=backend), None, None
        quantize = _cached_quantize_weights if cache_weights else _quantize_weights
        wq, sq, wt, st = quantize(ws, need_dx, backend)
        out = fp8_grouped_mm(xq, xs, wq, sq, offsets, x.dtype, backend, tile_expert=tile_expert)
        ctx.save_for_backward(xt, xts, wt, st, offsets, tile_expert)
        ctx.backend = backend
        ctx.x_shape = x.shape
        ctx.w_meta = [(w.shape[1], w.dtype) for w in ws]
        return out

    @staticmethod
    def backward(ctx, dy):
        xt, xts, wt, st, offsets, tile_expert = ctx.saved_tensors
        m, k = ctx.x_shape
        need_dx = ctx.needs_input_grad[0]
        need_dw = ctx.needs_input_grad[5:]
        dy = dy.contiguous()
        if any(need_dw):
            dyq, dys, dyt, dyts = act_quant_1x128_dual(dy, backend=ctx.backend)
        else:
            dyq, dys = act_quant_1x128(dy, backend=ctx.backend)
        dx = None
        if need_dx:  # one GEMM over all stacked weights: contraction sum Np_i
            dx = fp8_grouped_mm(dyq, dys, wt, st, offsets, dy.dtype, ctx.backend, tile_expert=tile_expert)
            if dx.shape[1] != k:
                dx = dx[:, :k]
        dws = []
        row = 0
        for (n, w_dtype), need in zip(ctx.w_meta, need_dw):
            np_ = _ceil128(n)
            if need:  # rows of dY^T belonging to this weight (a view, no copy)
                dt = w_dtype if w_dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
                dw = fp8_grouped_wgrad(
                    dyt[row : row + n], dyts[row : row + n], xt[:k], xts[:k], offsets, ctx.backend, out_dtype=dt
                )
                dws.append(dw.to(w_dtype))
            else:
                dws.append(None)
            row += np_
        return (dx, None, None, None, None, *dws)


def _check_linear_args(x, w, group_end_offsets):
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[2]:
        raise CoscaleError(f"expected x [M, K] and w [E, N, K]; got {tuple(x.shape)}, {tuple(w.shape)}")
    _check_offsets(group_end_offsets, w.shape[0])


def _aligned_call(x, ws, offsets, backend, cache_weights=False):
    """x [M, K] with 128-aligned segments (no check, no host sync) -> [M, sum Np_i]."""
    offsets = offsets.to(device=x.device, dtype=torch.int32)
    tile_expert = expert_tile_map(offsets, x.shape[0])
    return _FP8GroupedFunction.apply(x, offsets, tile_expert, backend, cache_weights, *ws)


def fp8_grouped_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    group_end_offsets: torch.Tensor,
    backend: str = "auto",
    *,
    aligned: bool = False,
    cache_weights: bool = False,
) -> torch.Tensor:
    """y [M, N] = x_i @ w[e(i)]^T with forward, dgrad and wgrad in FP8 (see the module docstring).

    x [M, K] bf16/fp32 rows sorted by expert; w [E, N, K] master weights (fp32/bf16);
    group_end_offsets [E] int32/int64 (rows [off[e-1], off[e]) use expert e). Returns x's dtype.
    ``aligned=True`` promises that every segment end is a multiple of 128 (what permute_tokens gives
    with align=128): no check, no padding, no host sync. Otherwise one host sync checks the offsets
    and unaligned segments are padded with zero rows. ``cache_weights=True`` keeps w's FP8 copies
    (W, and W^T when a gradient of x is needed) until w changes: for inference and for the
    micro-batches of one optimizer step (see ``_WEIGHT_CACHE`` for the rule and the memory cost).
    """
    _check_linear_args(x, w, group_end_offsets)
    m = x.shape[0]
    n = w.shape[1]
    if aligned:
        out = _aligned_call(x, (w,), group_end_offsets, backend, cache_weights)
        return out[:, :n] if out.shape[1] != n else out
    offsets = group_end_offsets.to(device=x.device, dtype=torch.int64)
    starts = torch.cat([offsets.new_zeros(1), offsets[:-1]])
    counts = offsets - starts
    padded_counts = (counts + BLOCK - 1) // BLOCK * BLOCK
    padded_ends = torch.cumsum(padded_counts, 0)
    if offsets.numel():  # one host sync for all three numbers
        end, total, unaligned = torch.stack(
            [offsets[-1], padded_ends[-1], (counts != padded_counts).any().to(torch.int64)]
        ).tolist()
    else:
        end, total, unaligned = 0, 0, 0
    if not unaligned and end == m:
        out = _aligned_call(x, (w,), offsets, backend, cache_weights)
        return out[:, :n] if out.shape[1] != n else out
    # Pad each expert's segment to a multiple of 128 rows: scatter rows into a zeroed buffer.
    padded_starts = padded_ends - padded_counts
    rows = torch.arange(end, device=x.device)
    expert_of_row = torch.searchsorted(offsets, rows, right=True)
    dest = rows - starts[expert_of_row] + padded_starts[expert_of_row]
    x_buf = x.new_zeros(total, x.shape[1]).index_copy(0, dest, x[:end])
    out_buf = _aligned_call(x_buf, (w,), padded_ends, backend, cache_weights)
    out = out_buf.index_select(0, dest)[:, :n]
    if end < m:  # rows after the last expert belong to none: zeros
        out = torch.cat([out, out.new_zeros(m - end, n)])
    return out


def fp8_grouped_gate_up(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    group_end_offsets: torch.Tensor,
    backend: str = "auto",
    *,
    cache_weights: bool = False,
) -> torch.Tensor:
    """gate_up [M, 2I] = [x_i w_gate[e]^T | x_i w_up[e]^T], everything in FP8, for 128-aligned
    segments (the caller's contract, as permute_tokens gives with align=128; not checked, no host sync).

    x is quantized once for both (and its transposed layout once for both weight gradients); w_gate
    and w_up are quantized into one stacked [E, 2I, K] FP8 buffer and its transpose,
    so the forward is one grouped GEMM and the dgrad is one grouped GEMM with contraction 2I.
    Feed the result to kernels.swiglu.swiglu (gate first, then up). ``cache_weights``: as for
    fp8_grouped_linear."""
    _check_linear_args(x, w_gate, group_end_offsets)
    if w_up.shape != w_gate.shape:
        raise CoscaleError(f"w_gate and w_up must have one shape, got {tuple(w_gate.shape)}, {tuple(w_up.shape)}")
    i = w_gate.shape[1]
    ip = _ceil128(i)
    out = _aligned_call(x, (w_gate, w_up), group_end_offsets, backend, cache_weights)  # [M, 2 Ip]
    if ip != i:
        out = torch.cat([out[:, :i], out[:, ip : ip + i]], dim=1)
    return out
