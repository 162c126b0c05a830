"""Dropless token permutation for MoE: sort (token, expert) pairs by expert and back.

Shape legend: T tokens, K experts per token, E routed experts, H hidden, M_pad permuted rows.

`permute_tokens` turns x [T, H] and the router's choice topk_idx [T, K] into one contiguous buffer
x_perm [M_pad, H] whose rows are grouped by expert: expert e owns rows
[group_end_offsets[e-1], group_end_offsets[e]). Each group is padded up to a multiple of `align`
(what the grouped GEMM needs: 16 for torch._grouped_mm's 16-byte TMA alignment in BF16, 128 for the
FP8 1x128 / 128x128 block scales); padded rows are zeros, are never read back, and get zero
gradients, so they contribute nothing to the weight gradients either. Inside a group, pairs keep
their (token, k) order (a stable sort), so the layout is a pure function of topk_idx.

`unpermute_combine` is the inverse: out[t] = sum_k topk_weight[t, k] * y_perm[pair_row[t, k]], with
float32 accumulation, cast to y_perm's dtype.

Data movement kernels (Triton, one pass over memory each):
- rows-from-tokens: one program per permuted row copies (optionally scales) its source token's
  row, or writes zeros for a padding row. Used by the permute forward and by the combine backward,
  which also computes the gate-weight gradient <y_row, grad_out_token> in the same pass.
- tokens-from-rows: one program per (token, block of H) sums its K rows in k order. Used by the
  combine forward and by the permute backward.
Both are gathers: every output element is written by exactly one program, with a fixed summation
order, so the Triton path is deterministic and needs no atomics. The PyTorch reference uses
`index_add_` (a scatter-add; atomics on CUDA, hence run-to-run differences in the last bit) unless
`deterministic=True`, in which case it gathers like the kernels.

Index building (stable argsort, a scatter-add count, cumsum over T*K integers) stays in PyTorch: it
touches no hidden-state bytes. Nothing waits for the device: the buffer has a static size, the most
rows any routing can need, T*K + min(E, T*K)*(align - 1) (every used group one row short of a multiple
of `align`);
rows after the last group end are padding rows like the others (zeros, never combined), and the
grouped GEMMs ignore them. A static size is what lets the training step be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coscale.errors import CoscaleError
from coscale.kernels.backend import check_backend
from coscale.kernels.library import launcher, operator, runs_triton

try:  # Triton is optional: the PyTorch reference runs everywhere.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None
    tl = None


@dataclass(frozen=True)
class PermuteInfo:
    """Where every (token, k) pair went. Produced by `permute_tokens`, consumed by the inverse.

    pair_row [T, K] int64: row of x_perm holding pair (t, k).
    row_pair [M_pad] int64: flat pair index t*K + k of each row, -1 for padding rows.
    group_end_offsets [E] int32: cumulative padded group ends (the grouped GEMM's `offs`).
    tokens_per_expert [E] int64: real (unpadded) rows per expert.
    """

    pair_row: torch.Tensor
    row_pair: torch.Tensor
    group_end_offsets: torch.Tensor
    tokens_per_expert: torch.Tensor
    num_tokens: int
    topk: int
    align: int

    @property
    def num_rows(self) -> int:
        return self.row_pair.shape[0]

    @property
    def n_experts(self) -> int:
        return self.group_end_offsets.shape[0]

    @property
    def row_token(self) -> torch.Tensor:
        """Source token of each row [M_pad], -1 for padding rows."""
        return torch.where(self.row_pair >= 0, self.row_pair // self.topk, -1)

    @property
    def sorted_pairs(self) -> torch.Tensor:
        """Flat pair indices in expert order (padding removed) [T*K]."""
        return self.row_pair[self.row_pair >= 0]


def max_permuted_rows(pairs: int, n_experts: int, align: int) -> int:
    """Rows of the permuted buffer: enough for any routing of `pairs` (token, expert) pairs when each
    of `n_experts` groups is padded up to a multiple of `align`. At most min(n_experts, pairs) groups are
    non-empty, and only those are padded (a decode step of a few tokens needs few padding rows)."""
    return pairs + min(n_experts, pairs) * (align - 1)


def identity_permute_info(num_tokens: int, device: torch.device | str, align: int = 16,
                          tight: bool = False) -> PermuteInfo:
    """The layout `build_permute_info` gives when every token picks the one expert there is (K = 1, E = 1):
    row t holds token t, the rows after it are padding. Built without a sort or a count: a dense layer that
    runs through the grouped kernels (coscale.kernels.fp8_moe.fp8_swiglu_mlp) pays nothing for routing.
    ``tight``: only the one group's rows (num_tokens rounded up to ``align``) instead of build_permute_info's
    worst case (num_tokens + align - 1): a dense GEMM over the rows then sees a multiple of ``align``."""
    if num_tokens < 0 or align < 1:
        raise CoscaleError(f"need num_tokens >= 0 and align >= 1, got {num_tokens} and {align}")
    tokens = torch.arange(num_tokens, device=device)
    end = (num_tokens + align - 1) // align * align
    rows = end if tight else max_permuted_rows(num_tokens, 1, align)
    row_pair = torch.full((rows,), -1, dtype=torch.int64, device=device)
    row_pair[:num_tokens] = tokens
    return PermuteInfo(
        pair_row=tokens.view(num_tokens, 1),
        row_pair=row_pair,
        group_end_offsets=torch.full((1,), end, dtype=torch.int32, device=device),
        tokens_per_expert=torch.full((1,), num_tokens, dtype=torch.int64, device=device),
        num_tokens=num_tokens,
        topk=1,
        align=align,
    )


def build_permute_info(topk_idx: torch.Tensor, n_experts: int, align: int = 16) -> PermuteInfo:
    """Compute the expert-sorted layout of topk_idx [T, K] (int64) with groups padded to `align`."""
    if topk_idx.dim() != 2:
        raise CoscaleError(f"topk_idx must be [T, K], got shape {tuple(topk_idx.shape)}")
    if topk_idx.dtype not in (torch.int64, torch.int32):
        raise CoscaleError(f"topk_idx must be an integer tensor, got {topk_idx.dtype}")
    if align < 1:
        raise CoscaleError(f"align must be a positive integer, got {align}")
    T, K = topk_idx.shape
    device = topk_idx.device
    flat = topk_idx.reshape(-1).long()
    if flat.device.type == "cpu" and flat.numel() and not torch.compiler.is_compiling():
        # Checked where reading a value back is free; on CUDA an out-of-range id trips scatter_add_'s
        # device-side assert instead (checking here would make the host wait for the router).
        low, high = int(flat.min()), int(flat.max())
        if low < 0 or high >= n_experts:
            raise CoscaleError(f"topk_idx holds expert ids outside [0, n_experts={n_experts}): {low}..{high}")
    # A scatter-add rather than bincount, which sizes its output from the largest id on the host.
    counts = flat.new_zeros(n_experts).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + align - 1) // align * align
    group_end = torch.cumsum(padded, 0)
    group_start = group_end - padded
    count_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)  # pairs of one expert stay in (t, k) order
    sorted_expert = flat[order]
    rank = torch.arange(T * K, device=device) - count_start[sorted_expert]
    rows = group_start[sorted_expert] + rank
    pair_row = torch.empty_like(flat)
    pair_row[order] = rows
    num_rows = max_permuted_rows(T * K, n_experts, align)
    row_pair = torch.full((num_rows,), -1, dtype=torch.int64, device=device)
    row_pair[rows] = order
    return PermuteInfo(
        pair_row=pair_row.view(T, K),
        row_pair=row_pair,
        group_end_offsets=group_end.to(torch.int32),
        tokens_per_expert=counts,
        num_tokens=T,
        topk=K,
        align=align,
    )


# ---- Triton kernels ----------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _rows_from_tokens_kernel(
        src_ptr, row_pair_ptr, weight_ptr, dst_ptr, y_ptr, grad_weight_ptr,
        H, stride_src, stride_dst, stride_y,
        TOPK: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DOT: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        """dst[r] = weight[p] * src[p // TOPK] for p = row_pair[r] (zeros when p < 0).

        With COMPUTE_DOT also grad_weight[p] = <y[r], src[p // TOPK]> in float32.
        """
        row = tl.program_id(0).to(tl.int64)
        pair = tl.load(row_pair_ptr + row)
        valid = pair >= 0
        safe_pair = tl.where(valid, pair, 0)
        token = safe_pair // TOPK
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + safe_pair)
        read_end = tl.where(valid, H, 0)  # padding rows read nothing and store zeros
        dot = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = cols < H
            read = cols < read_end
            vals = tl.load(src_ptr + token * stride_src + cols, mask=read, other=0.0)
            if HAS_WEIGHT:
                out = (vals.to(tl.float32) * w).to(dst_ptr.dtype.element_ty)
            else:
                out = vals
            tl.store(dst_ptr + row * stride_dst + cols, out, mask=mask)
            if COMPUTE_DOT:
                y = tl.load(y_ptr + row * stride_y + cols, mask=read, other=0.0)
                dot += y.to(tl.float32) * vals.to(tl.float32)
        if COMPUTE_DOT:
            tl.store(grad_weight_ptr + safe_pair, tl.sum(dot, axis=0), mask=valid)

    @triton.jit
    def _tokens_from_rows_kernel(
        src_ptr, pair_row_ptr, weight_ptr, out_ptr,
        H, stride_src, stride_out,
        TOPK: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        """out[t] = sum_k weight[t, k] * src[pair_row[t, k]], in k order, float32 accumulation."""
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = cols < H
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for k in range(TOPK):
            row = tl.load(pair_row_ptr + token * TOPK + k)
            vals = tl.load(src_ptr + row * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                vals = vals * tl.load(weight_ptr + token * TOPK + k)
            acc += vals
        tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block_h(H: int) -> int:
    return min(1024, triton.next_power_of_2(max(H, 16)))


# Both directions take the layout as tensors: row_pair [M_pad] (flat pair index per row, -1 padding)
# and pair_row [T, K] (row of each pair); T, K and M_pad are their shapes.


def _gather_rows_triton(src, row_pair, topk, weight, dot, out_dtype):
    """Triton: [T, H] token rows -> [M_pad, H] permuted rows (optionally weighted, with <dot, src>)."""
    H = src.shape[1]
    src = src.contiguous()
    dst = torch.empty(row_pair.shape[0], H, dtype=out_dtype, device=src.device)
    pairs = src.shape[0] * topk
    dot_out = torch.zeros(pairs if dot is not None else 0, dtype=torch.float32, device=src.device)
    if dst.shape[0] == 0:
        return dst, dot_out
    w = weight.reshape(-1).contiguous().float() if weight is not None else src
    d = dot.contiguous() if dot is not None else src
    launcher(_rows_from_tokens_kernel)[(dst.shape[0],)](
        src, row_pair, w, dst, d, dot_out if dot is not None else src,  # (not the output twice)
        H, src.stride(0), dst.stride(0), d.stride(0) if dot is not None else 0,
        TOPK=topk, HAS_WEIGHT=weight is not None, COMPUTE_DOT=dot is not None, BLOCK_H=_block_h(H),
    )  # fmt: skip
    return dst, dot_out


def _sum_rows_triton(src, pair_row, weight, out_dtype):
    """Triton: [M_pad, H] rows -> [T, H], each token summing its K rows in k order."""
    H = src.shape[1]
    T, K = pair_row.shape
    src = src.contiguous()
    out = torch.empty(T, H, dtype=out_dtype, device=src.device)
    if T == 0:
        return out
    w = weight.contiguous().float() if weight is not None else src
    block = _block_h(H)
    launcher(_tokens_from_rows_kernel)[(T, triton.cdiv(H, block))](
        src, pair_row, w, out, H, src.stride(0), out.stride(0), TOPK=K, HAS_WEIGHT=weight is not None, BLOCK_H=block,
    )  # fmt: skip
    return out


# ---- PyTorch references ------------------------------------------------------------------------
def gather_rows_ref(src, row_pair, topk, weight=None, dot=None, out_dtype=None):
    """The reference of ``gather_rows``: row r = weight[p] * src[p // topk] for p = row_pair[r] (zeros
    where p < 0), and with ``dot`` [M_pad, H] also <dot[r], src[p // topk]> per pair (float32). Static
    shapes throughout (no boolean indexing), so torch.compile traces it on the CPU."""
    pairs = src.shape[0] * topk
    valid = row_pair >= 0
    safe = row_pair.clamp(min=0)
    token_rows = src[safe // topk]  # [M_pad, H]; padding rows read token 0 and are zeroed below
    rows = token_rows.float() * weight.reshape(-1).float()[safe, None] if weight is not None else token_rows
    dst = torch.where(valid[:, None], rows.to(out_dtype or src.dtype), 0)
    dot_out = torch.zeros(pairs if dot is not None else 0, dtype=torch.float32, device=src.device)
    if dot is not None:  # padding rows scatter into a spare slot that is dropped
        dots = (dot.float() * token_rows.float()).sum(-1)
        slot = torch.where(valid, row_pair, pairs)
        dot_out = torch.zeros(pairs + 1, dtype=torch.float32, device=src.device).scatter(0, slot, dots)[:pairs]
    return dst, dot_out


def row_weights(topk_weight: torch.Tensor, row_pair: torch.Tensor) -> torch.Tensor:
    """Each permuted row's router weight [M_pad] float32: topk_weight[p // K, p % K] for p = row_pair[r], 0 on
    padding rows (differentiable in topk_weight; the FP8 experts weight their SwiGLU output with it)."""
    return torch.where(row_pair >= 0, topk_weight.reshape(-1).float()[row_pair.clamp(min=0)], 0.0)


def sum_rows_ref(src, pair_row, row_pair, weight=None, out_dtype=None, deterministic=True):
    """The reference of ``sum_rows``: out[t] = sum_k weight[t, k] * src[pair_row[t, k]] in float32."""
    T, K = pair_row.shape
    H = src.shape[1]
    if deterministic:  # gather the K rows of every token and add them in k order
        acc = torch.zeros(T, H, dtype=torch.float32, device=src.device)
        for k in range(K):
            rows = src[pair_row[:, k]].float()
            acc += rows * weight[:, k, None].float() if weight is not None else rows
    else:  # scatter-add every row into its token (atomics on CUDA); padding rows into a spare row
        valid = row_pair >= 0
        rows = src.float()
        if weight is not None:
            rows = rows * weight.reshape(-1).float()[row_pair.clamp(min=0), None]
        token = torch.where(valid, row_pair // K, T)
        acc = torch.zeros(T + 1, H, dtype=torch.float32, device=src.device).index_add_(0, token, rows)[:T]
    return acc.to(out_dtype or src.dtype)


# ---- operators ---------------------------------------------------------------------------------
@operator("gather_rows")
def gather_rows_op(
    src: torch.Tensor, row_pair: torch.Tensor, topk: int, weight: torch.Tensor | None, dot: torch.Tensor | None,
    out_dtype: torch.dtype, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """[T, H] -> ([M_pad, H] rows, the per-pair dots [T*K] float32, or [0] without ``dot``)."""
    if runs_triton(backend, src, "rows_from_tokens"):
        return _gather_rows_triton(src, row_pair, topk, weight, dot, out_dtype)
    return gather_rows_ref(src, row_pair, topk, weight, dot, out_dtype)


@operator("sum_rows")
def sum_rows_op(
    src: torch.Tensor, pair_row: torch.Tensor, row_pair: torch.Tensor, weight: torch.Tensor | None,
    out_dtype: torch.dtype, deterministic: bool, backend: str,
) -> torch.Tensor:  # fmt: skip
    """[M_pad, H] -> [T, H]: every token's K rows (weighted) summed in float32."""
    if runs_triton(backend, src, "tokens_from_rows"):
        return _sum_rows_triton(src, pair_row, weight, out_dtype)
    return sum_rows_ref(src, pair_row, row_pair, weight, out_dtype, deterministic)


def rows_from_tokens(src, info, weight=None, y=None, out_dtype=None, backend="auto"):
    """[T, H] -> [M_pad, H]: row r = weight[pair] * src[token] (zeros on padding rows); no autograd.

    With y [M_pad, H] also returns <y[r], src[token]> per pair as float32 [T*K], else None.
    """
    check_backend(backend, src, op="rows_from_tokens")
    dst, dots = gather_rows_op(src, info.row_pair, info.topk, weight, y, out_dtype or src.dtype, backend)
    return dst, (dots if y is not None else None)


def tokens_from_rows(src, info, weight=None, out_dtype=None, backend="auto", deterministic=True):
    """[M_pad, H] -> [T, H]: out[t] = sum_k weight[t, k] * src[pair_row[t, k]]; no autograd."""
    check_backend(backend, src, op="tokens_from_rows")
    return sum_rows_op(src, info.pair_row, info.row_pair, weight, out_dtype or src.dtype, deterministic, backend)


# ---- differentiable operators ------------------------------------------------------------------
@operator("permute")
def permute_op(x: torch.Tensor, row_pair: torch.Tensor, pair_row: torch.Tensor, deterministic: bool,
               backend: str) -> torch.Tensor:  # fmt: skip
    """x [T, H] -> x_perm [M_pad, H] (row r = x[row_pair[r] // K], zeros on padding rows)."""
    return gather_rows_op(x, row_pair, pair_row.shape[1], None, None, x.dtype, backend)[0]


def _permute_setup(ctx, inputs, output):
    _, row_pair, pair_row, deterministic, backend = inputs
    ctx.save_for_backward(row_pair, pair_row)
    ctx.deterministic, ctx.backend = deterministic, backend


def _permute_backward(ctx, grad):
    row_pair, pair_row = ctx.saved_tensors
    grad_x = sum_rows_op(grad.contiguous(), pair_row, row_pair, None, grad.dtype, ctx.deterministic, ctx.backend)
    return grad_x, None, None, None, None


permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


@operator("combine")
def combine_op(y: torch.Tensor, topk_weight: torch.Tensor, pair_row: torch.Tensor, row_pair: torch.Tensor,
               deterministic: bool, backend: str) -> torch.Tensor:  # fmt: skip
    """y [M_pad, H], topk_weight [T, K] -> [T, H] = sum_k topk_weight[t, k] * y[pair_row[t, k]]."""
    return sum_rows_op(y, pair_row, row_pair, topk_weight, y.dtype, deterministic, backend)


def _combine_setup(ctx, inputs, output):
    y, topk_weight, _, row_pair, _, backend = inputs
    ctx.save_for_backward(y, topk_weight, row_pair)
    ctx.backend = backend


def _combine_backward(ctx, grad_out):
    y, topk_weight, row_pair = ctx.saved_tensors
    need_weight_grad = ctx.needs_input_grad[1]
    grad_y, grad_w = gather_rows_op(
        grad_out.contiguous(), row_pair, topk_weight.shape[1], topk_weight, y if need_weight_grad else None,
        y.dtype, ctx.backend,
    )  # fmt: skip
    grad_w = grad_w.view(topk_weight.shape).to(topk_weight.dtype) if need_weight_grad else None
    return grad_y, grad_w, None, None, None, None


combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


def permute_tokens(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    n_experts: int,
    align: int = 16,
    *,
    backend: str = "auto",
    deterministic: bool = False,
    info: PermuteInfo | None = None,
) -> tuple[torch.Tensor, PermuteInfo]:
    """x [T, H], topk_idx [T, K] -> (x_perm [M_pad, H] grouped by expert, PermuteInfo).

    Differentiable w.r.t. x (the backward sums each token's K row gradients; always deterministic
    on the Triton path). Pass a precomputed `info` to skip the index building.
    """
    if x.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise CoscaleError(
            f"x must be [T, H] and topk_idx [T, K] with the same T, got {tuple(x.shape)} and "
            f"{tuple(topk_idx.shape)}"
        )
    check_backend(backend, x, op="rows_from_tokens")
    if info is None:
        info = build_permute_info(topk_idx, n_experts, align)
    return permute_op(x, info.row_pair, info.pair_row, deterministic, backend), info


def unpermute_combine(
    y_perm: torch.Tensor,
    info: PermuteInfo,
    topk_weight: torch.Tensor,
    *,
    backend: str = "auto",
    deterministic: bool = False,
) -> torch.Tensor:
    """y_perm [M_pad, H], topk_weight [T, K] -> [T, H] in y_perm's dtype (float32 accumulation).

    Differentiable w.r.t. y_perm (padding rows get zero gradient) and topk_weight
    (d/dw[t, k] = <y_perm[pair_row[t, k]], grad_out[t]>).
    """
    if y_perm.dim() != 2 or y_perm.shape[0] != info.num_rows:
        raise CoscaleError(f"y_perm must be [{info.num_rows}, H], got {tuple(y_perm.shape)}")
    if tuple(topk_weight.shape) != tuple(info.pair_row.shape):
        raise CoscaleError(
            f"topk_weight must be {tuple(info.pair_row.shape)}, got {tuple(topk_weight.shape)}"
        )
    check_backend(backend, y_perm, op="tokens_from_rows")
    return combine_op(y_perm, topk_weight, info.pair_row, info.row_pair, deterministic, backend)
