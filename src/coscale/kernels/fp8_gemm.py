"""Block-scaled FP8 GEMM: C [M, N] = (A * sA) @ (B * sB)^T with FP32 accumulation.

Shape legend: A [M, K] and B [N, K] are float8_e4m3fn, row-major (the "NT" layout: both operands
K-major), K a multiple of 128. Scales are FP32 dequantization multipliers, one per 128 elements of K:
- 1x128 ("row") scales:  sA [M, K/128]  (sB [N, K/128]); any strides, ideally outer-dim-major.
- 128x128 ("block") scales: sA [ceil(M/128), K/128]  (sB [ceil(N/128), K/128]).
The granularity is inferred from the scale's shape. Forward (X 1x128, W 128x128), dgrad (dY 1x128,
W^T 128x128) and wgrad (dY^T 1x128, X^T 1x128, both along tokens) are all this one operation.

Backends and where they promote (the DeepSeek-V3 report, section 3.3: Hopper's FP8 tensor cores keep
about 14 bits while accumulating, so partial sums must move to FP32 at least every 128 elements of K):
- "cublas": torch._scaled_mm / torch.nn.functional.scaled_mm with BlockWise1x128 / BlockWise128x128
  scales. cuBLAS applies each 128-wide K block's scales to that block's partial product and adds it
  into an FP32 accumulator (the same per-128 promotion). Which call form and scale layout the installed
  torch accepts is found by a small probe on first use (checked against the torch backend) and cached.
- "triton": ``_fp8_gemm_kernel`` below. Each K step is one 128-wide tl.dot started from zero, scaled by
  sA[:, k] * sB[:, k] and added to an FP32 register accumulator: promotion every 128 elements of K.
- "torch": dequantize both operands to FP32 and matmul in FP32 (the CPU fallback and test oracle).
- "auto": cublas on CUDA when the probe accepted the granularities, M, N are multiples of 128 and
  ``cublas_shape_problem`` finds nothing (with 128x128 scales K % 512 == 0), else triton on CUDA, else
  torch. ``backend="cublas"`` raises a CoscaleError for a shape cuBLAS would get wrong.
"""

from __future__ import annotations

import functools

import torch

from coscale.errors import CoscaleError
from coscale.kernels.autotune import triton_autotune
from coscale.kernels.backend import interpreting, select_backend
from coscale.kernels.quant import BLOCK, FP8_DTYPE, outer_major

BACKENDS = ("auto", "cublas", "triton", "torch")

__all__ = ["fp8_gemm", "fp8_gemm_ref", "scale_granularity", "cublas_blockwise_supported", "cublas_shape_problem"]


def scale_granularity(rows: int, k: int, scale: torch.Tensor, name: str) -> int:
    """1 for 1x128 scales, 128 for 128x128 scales; raises a clear error for anything else."""
    kb = k // BLOCK
    if scale.dtype != torch.float32 or scale.dim() != 2:
        raise CoscaleError(f"{name} must be a 2-D float32 tensor, got {scale.dtype} {tuple(scale.shape)}")
    if tuple(scale.shape) == (rows, kb):
        return 1
    if tuple(scale.shape) == (-(-rows // BLOCK), kb):
        return BLOCK
    raise CoscaleError(
        f"{name} has shape {tuple(scale.shape)}; expected ({rows}, {kb}) for 1x128 scales or "
        f"({-(-rows // BLOCK)}, {kb}) for 128x128 scales"
    )


def _check(a, a_scale, b, b_scale):
    if a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise CoscaleError(f"fp8_gemm operands must be float8_e4m3fn, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise CoscaleError(f"fp8_gemm computes A [M,K] @ B[N,K]^T; got {tuple(a.shape)}, {tuple(b.shape)}")
    k = a.shape[1]
    if k % BLOCK:
        raise CoscaleError(f"fp8_gemm needs K to be a multiple of {BLOCK} (zero-pad it), got K={k}")
    return scale_granularity(a.shape[0], k, a_scale, "a_scale"), scale_granularity(
        b.shape[0], k, b_scale, "b_scale"
    )


def _expand(scale: torch.Tensor, group: int, rows: int) -> torch.Tensor:
    """Per-row, per-K-block scales [rows, K/128] from either granularity."""
    return scale if group == 1 else scale.repeat_interleave(group, dim=0)[:rows]


def fp8_gemm_ref(a, a_scale, b, b_scale, out_dtype=torch.bfloat16) -> torch.Tensor:
    """The "torch" backend: dequantize to FP32, matmul in FP32, cast to out_dtype."""
    ga, gb = _check(a, a_scale, b, b_scale)
    m, k = a.shape
    n = b.shape[0]
    sa = _expand(a_scale.float(), ga, m).repeat_interleave(BLOCK, dim=1)
    sb = _expand(b_scale.float(), gb, n).repeat_interleave(BLOCK, dim=1)
    return ((a.float() * sa) @ (b.float() * sb).t()).to(out_dtype)


# ----------------------------------------------------------------------------------------------------
# cuBLAS through torch: probe which call form and scale layout this torch accepts
# ----------------------------------------------------------------------------------------------------


def _pad_cols4(s: torch.Tensor) -> torch.Tensor:
    cols = -(-s.shape[1] // 4) * 4
    if cols == s.shape[1] and s.is_contiguous():
        return s
    out = torch.zeros(s.shape[0], cols, dtype=s.dtype, device=s.device)
    out[:, : s.shape[1]] = s
    return out[:, : s.shape[1]]


_LAYOUTS = {
    "outer_major": outer_major,
    "contiguous": lambda s: s.contiguous(),
    "padded4": _pad_cols4,
    # torch 2.11 on H100 (benchmarks/results/probe_torch_api_h100_2026-11-23.log): the scale of mat2 = b.t()
    # is read in mat2's orientation, [K/128, N/128] (128x128) or [K/128, N] (1x128 along K).
    # 128x128: [K/128, N/128] "near-inner-dim-major", i.e. strides (1, K/128), whatever the input's strides.
    "transposed": lambda s: s.contiguous().t(),
    "transposed_contiguous": lambda s: s.t().contiguous(),
}


def _call_private(a, b, sa, sb, out_dtype, ga, gb):
    return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)


def _call_functional(a, b, sa, sb, out_dtype, ga, gb):
    from torch.nn.functional import ScalingType, scaled_mm

    recipe = {1: ScalingType.BlockWise1x128, BLOCK: ScalingType.BlockWise128x128}
    return scaled_mm(a, b.t(), sa, recipe[ga], sb, recipe[gb], output_dtype=out_dtype)


_CALLS = {"_scaled_mm": _call_private, "F.scaled_mm": _call_functional}


@functools.cache
def _probe(device_index: int, ga: int, gb: int):
    """Find (call, layout_a, layout_b) that cuBLAS accepts and that computes the right product."""
    device = torch.device("cuda", device_index)
    gen = torch.Generator(device=device).manual_seed(0)
    # N/128 = 3 and K/128 = 4 differ, so a transposed scale layout cannot pass by symmetry; K/128 = 4 is
    # also what cuBLAS accepted in benchmarks/results/probe_torch_api_h100_2026-11-23.log
    m, n, k = 256, 384, 512
    a = torch.randn(m, k, device=device, generator=gen).to(FP8_DTYPE)
    b = torch.randn(n, k, device=device, generator=gen).to(FP8_DTYPE)
    shape_a = (m, k // BLOCK) if ga == 1 else (m // BLOCK, k // BLOCK)
    shape_b = (n, k // BLOCK) if gb == 1 else (n // BLOCK, k // BLOCK)
    sa = torch.rand(shape_a, device=device, generator=gen) + 0.5
    sb = torch.rand(shape_b, device=device, generator=gen) + 0.5
    ref = fp8_gemm_ref(a, sa, b, sb, torch.float32)
    for call_name, call in _CALLS.items():
        for la_name, la in _LAYOUTS.items():
            for lb_name, lb in _LAYOUTS.items():
                try:
                    out = call(a, b, la(sa), lb(sb), torch.bfloat16, ga, gb).float()
                    torch.cuda.synchronize(device)
                except Exception:
                    continue
                err = (out - ref).norm() / ref.norm()
                if out.shape == ref.shape and bool(err < 1e-2):
                    return call_name, la_name, lb_name
    return None


def cublas_blockwise_supported(device: torch.device, ga: int, gb: int):
    """The accepted (call, layout_a, layout_b) for these granularities on this device, or None."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _probe(index, ga, gb)


def cublas_shape_problem(m: int, n: int, k: int, ga: int, gb: int):
    """Why cuBLAS' block-scaled GEMM cannot take this shape (a sentence), or None when it can.

    torch checks a 128x128 scale's row stride to be exactly K/128 (it reads the scale of ``mat2 = b.t()``
    as [K/128, N/128] with strides (1, K/128)), and cuBLAS reads scale rows at 16-byte aligned strides:
    K/128 must be a multiple of 4 (K % 512 == 0). Otherwise cuBLAS silently reads misplaced scales
    (bench_fp8, H100: the kv_a_proj dgrad, K = 640, gave a relative error of 50). A 1x128 scale is
    outer-dim-major with stride = rows, so the rows of a 1x128-scaled operand must be a multiple of 4.
    """
    if BLOCK in (ga, gb) and (k // BLOCK) % 4:
        return (
            f"K = {k}: with 128x128 scales cuBLAS needs K/128 to be a multiple of 4 (K % 512 == 0); "
            "a padded scale stride is rejected by torch and an unaligned one is misread by cuBLAS"
        )
    for rows, g, name in ((m, ga, "M"), (n, gb, "N")):
        if g == 1 and rows % 4:
            return f"{name} = {rows}: 1x128 scales are outer-dim-major, cuBLAS needs {name} % 4 == 0"
    return None


def _fp8_gemm_cublas(a, a_scale, b, b_scale, out_dtype, ga, gb, form):
    call_name, la, lb = form
    sa, sb = _LAYOUTS[la](a_scale), _LAYOUTS[lb](b_scale)
    # cuBLAS's block-scaled kernels write only BF16 (torch 2.11 rejects an FP32 output); accumulation
    # inside is FP32 either way, so an FP32 request gets the BF16 result widened.
    cublas_dtype = torch.bfloat16 if out_dtype == torch.float32 else out_dtype
    return _CALLS[call_name](a, b, sa, sb, cublas_dtype, ga, gb).to(out_dtype)


# ----------------------------------------------------------------------------------------------------
# Triton block-scaled GEMM
# ----------------------------------------------------------------------------------------------------


def _configs(triton):
    """(the GPU's configurations, the interpreter's one) for coscale.kernels.autotune.triton_autotune."""
    shapes = [(128, 128, 4, 8), (128, 256, 3, 8), (256, 128, 3, 8), (128, 128, 3, 4), (64, 128, 4, 4)]
    gpu = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, s, w in shapes
    ]
    return gpu, triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=1)


@functools.cache
def _build_gemm_kernel(interpret: bool):
    """The autotuned kernel, built once per interpreter mode (``triton.jit`` decides at decoration)."""
    import triton
    import triton.language as tl

    @triton_autotune(*_configs(triton), key=["M", "N", "K", "A_GROUP", "B_GROUP"])
    @triton.jit
    def fp8_gemm_kernel(
        a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, M, N, K,
        stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
        stride_sam, stride_sak, stride_sbn, stride_sbk,
        A_GROUP: tl.constexpr, B_GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group_size = GROUP_M * num_n  # grouped ordering keeps a band of A tiles hot in L2
        first_m = (pid // group_size) * GROUP_M
        rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group_size) % rows_in_group
        pid_n = (pid % group_size) // rows_in_group
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M  # wrapped rows are loaded, never stored
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
        sa_ptrs = sa_ptr + (offs_m // A_GROUP).to(tl.int64) * stride_sam
        sb_ptrs = sb_ptr + (offs_n // B_GROUP).to(tl.int64) * stride_sbn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            sa = tl.load(sa_ptrs + kb * stride_sak)
            sb = tl.load(sb_ptrs + kb * stride_sbk)
            # one 128-deep dot from zero, then promoted into the FP32 accumulator with its scales
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])

    return fp8_gemm_kernel


def _fp8_gemm_triton(a, a_scale, b, b_scale, out_dtype, ga, gb):
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if c.numel() == 0:
        return c
    if k == 0:
        return c.zero_()
    kernel = _build_gemm_kernel(interpreting())

    def grid(meta):
        return (-(-m // meta["BLOCK_M"]) * -(-n // meta["BLOCK_N"]),)

    kernel[grid](
        a, b, c, a_scale, b_scale, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        c.stride(0), c.stride(1), a_scale.stride(0), a_scale.stride(1), b_scale.stride(0),
        b_scale.stride(1), A_GROUP=ga, B_GROUP=gb, BLOCK_K=BLOCK,
    )  # fmt: skip
    return c


# ----------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------


def _cublas_if_it_takes(a, m: int, n: int, k: int, ga: int, gb: int) -> str | None:
    """"cublas" when cuBLAS computes this GEMM correctly on a's device (see the module docstring)."""
    if not (m and n and k) or m % BLOCK or n % BLOCK or cublas_shape_problem(m, n, k, ga, gb) is not None:
        return None
    return "cublas" if cublas_blockwise_supported(a.device, ga, gb) is not None else None


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, backend: str = "auto") -> torch.Tensor:
    """C [M, N] = (A * sA) @ (B * sB)^T in FP32, returned as out_dtype. See the module docstring."""
    ga, gb = _check(a, a_scale, b, b_scale)
    m, n, k = a.shape[0], b.shape[0], a.shape[1]
    chosen = select_backend(
        backend, a, allowed=BACKENDS, preferred=lambda: _cublas_if_it_takes(a, m, n, k, ga, gb), op="fp8_gemm"
    )
    if chosen == "cublas":
        form = cublas_blockwise_supported(a.device, ga, gb)
        if backend == "cublas":  # an explicit request: say why cuBLAS cannot take it
            problem = cublas_shape_problem(m, n, k, ga, gb)
            if problem is not None:
                raise CoscaleError(
                    f"fp8_gemm: backend 'cublas' cannot compute this GEMM correctly: {problem}; use 'triton' or "
                    "'auto'"
                )
            if form is None:
                raise CoscaleError(
                    f"fp8_gemm: backend 'cublas': this torch/cuBLAS does not accept block-scaled FP8 GEMMs "
                    f"({ga}x128 by {gb}x128) on this device; use 'triton' or 'torch'"
                )
        return _fp8_gemm_cublas(a, a_scale, b, b_scale, out_dtype, ga, gb, form)
    if chosen == "triton":
        return _fp8_gemm_triton(a, a_scale, b, b_scale, out_dtype, ga, gb)
    return fp8_gemm_ref(a, a_scale, b, b_scale, out_dtype)
