"""Grouped GEMM for MoE experts: one launch multiplies every expert's rows by that expert's weight.

Shape legend: M rows (all experts' rows, grouped, see coscale.kernels.permute), E experts,
N output features, K input features.

    grouped_mm(a [M, K], b [E, N, K], group_end_offsets [E] int32) -> [M, N]
    out[s_e:t_e] = a[s_e:t_e] @ b[e]^T,   s_e = group_end_offsets[e-1] (0 for e = 0), t_e = offsets[e]

b is stored like nn.Linear weights (out_features x in_features), as the model's stacked experts are.
Rows past group_end_offsets[-1] are not part of any group: their output is unspecified (zeros on
the reference path, left unwritten by the Triton kernel and torch._grouped_mm).

Autograd: grad_a = grouped_mm(grad_out, b^T) (the same kernel with b read transposed), and
grad_b[e] = grad_out[s_e:t_e]^T @ a[s_e:t_e] (a grouped GEMM whose groups run along the reduction
dimension; experts with no rows get zero gradients).

Backends:
- "torch": torch._grouped_mm (CUTLASS on Hopper; BF16 only). b^T is passed as a column-major view,
  the weight gradient uses its 2D x 2D form with offsets along the reduction dimension. Every
  group's start must stay 16-byte aligned, hence segments padded to multiples of 16 rows
  (permute_tokens' `align`), and K, N multiples of 8.
- "triton": the kernels below. The forward/dgrad kernel finds its expert from a prefix sum of
  per-expert tile counts computed inside the kernel, so nothing is read back to the host.
- "loop": a Python loop over experts, the reference (and the CPU path).
- "auto": torch on CUDA when it applies, else triton on CUDA, else loop
  (coscale.kernels.backend.select_backend decides, as for every kernel).
"""

from __future__ import annotations

import torch

from coscale.errors import CoscaleError
from coscale.kernels.autotune import power_of_two_bucket, triton_autotune
from coscale.kernels.backend import check_backend, select_backend
from coscale.kernels.library import operator

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

BACKENDS = ("auto", "torch", "triton", "loop")


# ---- Triton kernels ----------------------------------------------------------------------------
if triton is not None:

    # (the GPU's configurations, the interpreter's one) for coscale.kernels.autotune.triton_autotune.
    # The 16-row shapes are for decode, where an expert has a row or two: the kernel then streams the
    # expert's weights, and narrow N tiles with deep K steps put enough programs and bytes in flight.
    _MM_SHAPES = ((128, 256, 64, 3, 8), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (16, 128, 128, 4, 4),
                  (32, 128, 128, 4, 4), (16, 64, 128, 5, 4), (16, 64, 256, 4, 4), (16, 32, 256, 4, 4))
    _MM_CONFIGS = (
        [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w)
         for bm, bn, bk, s, w in _MM_SHAPES],
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4),
    )

    def _prune_mm_configs(configs, named_args, **kwargs):
        """Tiles no taller than twice the rows an expert has on average (32 at least), and beyond 32 rows an
        expert no narrow (decode) tiles: a decode batch does not time the prefill tiles, nor prefill the
        decode ones."""
        rows = named_args["ROWS_PER_EXPERT"]
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, 2 * rows)
                and (rows <= 32 or c.kwargs["BLOCK_N"] >= 128)]
        return kept or configs
    _WGRAD_SHAPES = ((64, 128, 128, 3, 8), (32, 128, 128, 4, 4), (64, 128, 64, 4, 4))
    _WGRAD_CONFIGS = (
        [triton.Config({"BLOCK_R": br, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w)
         for br, bn, bk, s, w in _WGRAD_SHAPES],
        triton.Config({"BLOCK_R": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4),
    )

    @triton.jit
    def _locate_tile(offs_ptr, E, pid_m, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
        """(expert, first row, end row) of the pid_m-th M tile, tiles numbered expert by expert."""
        experts = tl.arange(0, E_POW2)
        ends = tl.load(offs_ptr + experts, mask=experts < E, other=0)
        starts = tl.load(offs_ptr + experts - 1, mask=(experts > 0) & (experts < E), other=0)
        tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
        tiles_end = tl.cumsum(tiles, axis=0)
        expert = tl.sum((tiles_end <= pid_m).to(tl.int32), axis=0)
        is_mine = experts == expert
        first_tile = tl.sum(tl.where(is_mine, tiles_end - tiles, 0), axis=0)
        row_start = tl.sum(tl.where(is_mine, starts, 0), axis=0) + (pid_m - first_tile) * BLOCK_M
        row_end = tl.sum(tl.where(is_mine, ends, 0), axis=0)
        return expert, row_start, row_end

    @triton_autotune(*_MM_CONFIGS, key=["N", "K", "ROWS_PER_EXPERT"],
                     prune_configs_by={"early_config_prune": _prune_mm_configs})
    @triton.jit
    def _grouped_mm_kernel(
        a_ptr, b_ptr, c_ptr, offs_ptr,
        M, N, K, E, ROWS_PER_EXPERT,
        stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
        E_POW2: tl.constexpr, IEEE_FP32: tl.constexpr, DENSE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """c[rows of e] = a[rows of e] @ B_e with B_e[k, n] at b_ptr + e*stride_be + k*stride_bk + n*stride_bn.
        DENSE: one expert of all M rows, no offsets (coscale.kernels.decode_linear)."""
        pid_n = tl.program_id(0)  # N tiles vary fastest: an A tile stays in L2 across them
        pid_m = tl.program_id(1)
        if DENSE:
            expert = 0
            row_start = pid_m * BLOCK_M
            row_end = M
        else:
            expert, row_start, row_end = _locate_tile(offs_ptr, E, pid_m, E_POW2, BLOCK_M)
            if expert >= E:
                return
        rows = row_start + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_mask = rows < row_end
        col_mask = cols < N
        a_ptrs = a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak
        b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + ks) < K
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if IEEE_FP32:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])

    @triton_autotune(*_WGRAD_CONFIGS, key=["N", "K", "ROWS_PER_EXPERT"])
    @triton.jit
    def _grouped_wgrad_kernel(
        g_ptr, a_ptr, c_ptr, offs_ptr,
        N, K, ROWS_PER_EXPERT,
        stride_gm, stride_gn, stride_am, stride_ak, stride_ce, stride_cn, stride_ck,
        IEEE_FP32: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """c[e] = g[rows of e]^T @ a[rows of e]  ([N, K]; zeros for an expert without rows)."""
        pid = tl.program_id(0)
        expert = tl.program_id(1)
        n_tiles = tl.cdiv(N, BLOCK_N)
        pid_n = pid % n_tiles
        pid_k = pid // n_tiles
        row_end = tl.load(offs_ptr + expert)
        row_start = tl.load(offs_ptr + expert - 1, mask=expert > 0, other=0)
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rs = tl.arange(0, BLOCK_R)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for r0 in range(row_start, row_end, BLOCK_R):
            rows = r0 + rs
            r_mask = rows < row_end
            g = tl.load(
                g_ptr + rows[None, :].to(tl.int64) * stride_gm + ns[:, None] * stride_gn,
                mask=r_mask[None, :] & (ns[:, None] < N), other=0.0,
            )  # [BLOCK_N, BLOCK_R]: g transposed
            a = tl.load(
                a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak,
                mask=r_mask[:, None] & (ks[None, :] < K), other=0.0,
            )
            if IEEE_FP32:
                acc += tl.dot(g, a, input_precision="ieee")
            else:
                acc += tl.dot(g, a)
        c_ptrs = c_ptr + expert.to(tl.int64) * stride_ce + ns[:, None] * stride_cn + ks[None, :] * stride_ck
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(ns[:, None] < N) & (ks[None, :] < K))


def _rows_hint(M: int, E: int) -> int:
    """Autotune key: rows per expert rounded to a power of two (decode vs. prefill tiles)."""
    return power_of_two_bucket(max(1, M // max(E, 1)))


def _triton_mm(a, b_kn_strides, b, N, offs):
    """a [M, K] times per-expert [K, N] operands described by (stride_be, stride_bk, stride_bn)."""
    M, K = a.shape
    E = offs.shape[0]
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)
    if M == 0 or E == 0:
        return c
    stride_be, stride_bk, stride_bn = b_kn_strides

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]) + E)

    _grouped_mm_kernel[grid](
        a, b, c, offs, M, N, K, E, _rows_hint(M, E),
        a.stride(0), a.stride(1), stride_be, stride_bk, stride_bn, c.stride(0), c.stride(1),
        E_POW2=triton.next_power_of_2(E), IEEE_FP32=a.dtype == torch.float32, DENSE=False,
    )
    return c


def triton_dense_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ w[N, K]^T by the grouped kernel as one expert: at a few rows, its decode tiles stream
    w (coscale.kernels.decode_linear)."""
    M, K = a.shape
    N = w.shape[0]
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)
    if M == 0:
        return c

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))

    _grouped_mm_kernel[grid](
        a, w, c, a, M, N, K, 1, _rows_hint(M, 1),
        a.stride(0), a.stride(1), 0, w.stride(1), w.stride(0), c.stride(0), c.stride(1),
        E_POW2=1, IEEE_FP32=a.dtype == torch.float32, DENSE=True,
    )
    return c


def _triton_forward(a, b, offs):
    return _triton_mm(a, (b.stride(0), b.stride(2), b.stride(1)), b, b.shape[1], offs)


def _triton_dgrad(grad, b, offs):
    return _triton_mm(grad, (b.stride(0), b.stride(1), b.stride(2)), b, b.shape[2], offs)


def _triton_wgrad(grad, a, offs, out_dtype):
    M, N = grad.shape
    K = a.shape[1]
    E = offs.shape[0]
    c = torch.empty(E, N, K, dtype=out_dtype, device=a.device)
    if E == 0:
        return c

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]), E)

    _grouped_wgrad_kernel[grid](
        grad, a, c, offs, N, K, _rows_hint(M, E),
        grad.stride(0), grad.stride(1), a.stride(0), a.stride(1), c.stride(0), c.stride(1), c.stride(2),
        IEEE_FP32=a.dtype == torch.float32,
    )
    return c


# ---- torch._grouped_mm -------------------------------------------------------------------------
def torch_grouped_mm_applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands (BF16 on CUDA, 16-byte aligned strides)."""
    return _grouped_mm_takes(a, b.dtype, n=b.shape[1], k=a.shape[1])


def _grouped_mm_takes(t: torch.Tensor, b_dtype: torch.dtype, n: int, k: int) -> bool:
    return (
        hasattr(torch, "_grouped_mm") and t.is_cuda and t.dtype == torch.bfloat16 and b_dtype == torch.bfloat16
        and k % 8 == 0 and n % 8 == 0
    )  # fmt: skip


def _torch_forward(a, b, offs):
    return torch._grouped_mm(a, b.transpose(-2, -1), offs=offs)


def _torch_dgrad(grad, b, offs):
    return torch._grouped_mm(grad, b, offs=offs)


def _torch_wgrad(grad, a, offs, out_dtype):
    return torch._grouped_mm(grad.t(), a, offs=offs).to(out_dtype)


# ---- reference loop ----------------------------------------------------------------------------
def _segments(offs):
    ends = offs.tolist()
    return zip([0] + ends[:-1], ends)


def _loop_forward(a, b, offs):
    out = a.new_zeros(a.shape[0], b.shape[1])
    for e, (s, t) in enumerate(_segments(offs)):
        if t > s:
            out[s:t] = a[s:t] @ b[e].t()
    return out


def _loop_dgrad(grad, b, offs):
    out = grad.new_zeros(grad.shape[0], b.shape[2])
    for e, (s, t) in enumerate(_segments(offs)):
        if t > s:
            out[s:t] = grad[s:t] @ b[e]
    return out


def _loop_wgrad(grad, a, offs, out_dtype):
    out = torch.zeros(offs.shape[0], grad.shape[1], a.shape[1], dtype=out_dtype, device=a.device)
    for e, (s, t) in enumerate(_segments(offs)):
        if t > s:
            out[e] = (grad[s:t].t() @ a[s:t]).to(out_dtype)
    return out


_IMPLS = {
    "torch": (_torch_forward, _torch_dgrad, _torch_wgrad),
    "triton": (_triton_forward, _triton_dgrad, _triton_wgrad),
    "loop": (_loop_forward, _loop_dgrad, _loop_wgrad),
}


# Rows per expert up to which "auto" takes the Triton kernel over torch._grouped_mm: at decode an expert
# has a row or two and the GEMMs stream its weights; the Triton kernel's 16-row tiles read them at 94-96%
# of the H200's copy bandwidth against 66-78% for CUTLASS (bench_grouped_decode.py, run 25: V2-Lite's and
# V3's experts at 1-64 tokens), where the grouped GEMMs were 70% of a V2-Lite decode step's GPU time.
DECODE_ROWS_PER_EXPERT = 32


def prefers_torch_grouped_mm(rows: int, experts: int) -> bool:
    """Whether "auto" takes torch._grouped_mm (where it applies) for `rows` rows over `experts` experts:
    not in the decode regime, where the Triton kernel is faster (DECODE_ROWS_PER_EXPERT)."""
    return triton is None or rows > DECODE_ROWS_PER_EXPERT * max(experts, 1)


def _chosen(backend: str, t: torch.Tensor, b_dtype: torch.dtype, n: int, k: int, experts: int) -> str:
    """The backend of the forward problem [M, K] x [E, N, K] (its dgrad and wgrad choose the same)."""
    def vendor():
        takes = _grouped_mm_takes(t, b_dtype, n, k) and prefers_torch_grouped_mm(t.shape[0], experts)
        return "torch" if takes else None

    chosen = select_backend(backend, t, allowed=BACKENDS, reference="loop", op="grouped_mm", preferred=vendor)
    if chosen == "torch" and not hasattr(torch, "_grouped_mm"):
        raise CoscaleError(f"grouped_mm: torch {torch.__version__} has no torch._grouped_mm; use backend 'triton'")
    return chosen


# Opaque operators (coscale.kernels.library): torch._grouped_mm, autotuned Triton kernels or, on the CPU, a
# loop over experts that reads the offsets back; torch.compile calls them as they are.
def _fake_forward(a, b, offs, backend):
    return a.new_empty(a.shape[0], b.shape[1])


def _fake_dgrad(grad, b, offs, backend):
    return grad.new_empty(grad.shape[0], b.shape[2])


def _fake_wgrad(grad, a, offs, out_dtype, backend):
    return a.new_empty(offs.shape[0], grad.shape[1], a.shape[1], dtype=out_dtype)


@operator("grouped_mm", opaque=True, fake=_fake_forward)
def grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, backend: str) -> torch.Tensor:
    """a [M, K] @ b[e]^T per expert segment -> [M, N] (rows past offs[-1]: unspecified)."""
    chosen = _chosen(backend, a, b.dtype, b.shape[1], b.shape[2], offs.shape[0])
    return _IMPLS[chosen][0](a.contiguous() if chosen == "triton" else a, b, offs).contiguous()


@operator("grouped_mm_dgrad", opaque=True, fake=_fake_dgrad)
def grouped_mm_dgrad_op(grad: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, backend: str) -> torch.Tensor:
    """grad [M, N] @ b[e] per expert segment -> [M, K]."""
    chosen = _chosen(backend, grad, b.dtype, b.shape[1], b.shape[2], offs.shape[0])
    return _IMPLS[chosen][1](grad.contiguous(), b, offs).contiguous()


@operator("grouped_mm_wgrad", opaque=True, fake=_fake_wgrad)
def grouped_mm_wgrad_op(
    grad: torch.Tensor, a: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype, backend: str
) -> torch.Tensor:
    """[E, N, K]: grad[rows of e]^T @ a[rows of e] (zeros for an expert without rows)."""
    chosen = _chosen(backend, a, grad.dtype, grad.shape[1], a.shape[1], offs.shape[0])
    a = a.contiguous() if chosen == "triton" else a
    return _IMPLS[chosen][2](grad.contiguous(), a, offs, out_dtype).contiguous()


def _setup(ctx, inputs, output):
    a, b, offs, backend = inputs
    ctx.save_for_backward(a, b, offs)
    ctx.backend = backend


def _backward(ctx, grad_out):
    a, b, offs = ctx.saved_tensors
    grad_a = grouped_mm_dgrad_op(grad_out, b, offs, ctx.backend) if ctx.needs_input_grad[0] else None
    grad_b = grouped_mm_wgrad_op(grad_out, a, offs, b.dtype, ctx.backend) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None, None


grouped_mm_op.register_autograd(_backward, setup_context=_setup)


def grouped_mm(
    a: torch.Tensor, b: torch.Tensor, group_end_offsets: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """a [M, K] @ b[e]^T per expert segment -> [M, N] in a's dtype; differentiable in a and b."""
    if a.dim() != 2 or b.dim() != 3 or a.shape[1] != b.shape[2]:
        raise CoscaleError(
            f"grouped_mm needs a [M, K] and b [E, N, K], got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if group_end_offsets.shape != (b.shape[0],) or group_end_offsets.dtype != torch.int32:
        raise CoscaleError(
            f"group_end_offsets must be int32 [{b.shape[0]}], got {group_end_offsets.dtype} "
            f"{tuple(group_end_offsets.shape)}"
        )
    if a.dtype != b.dtype:
        raise CoscaleError(f"grouped_mm operands must share a dtype, got {a.dtype} and {b.dtype}")
    check_backend(backend, a, op="grouped_mm", allowed=BACKENDS, reference="loop")
    return grouped_mm_op(a, b, group_end_offsets, backend)
