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
from coscale.kernels.backend import select_backend

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


def _rows_from_tokens_triton(src, info, weight=None, y=None, out_dtype=None):
    """Triton: [T, H] token rows -> [M_pad, H] permuted rows (optionally weighted, with <y, src>)."""
    H = src.shape[1]
    src = src.contiguous()
    dst = torch.empty(info.num_rows, H, dtype=out_dtype or src.dtype, device=src.device)
    grad_weight = None
    if y is not None:
        y = y.contiguous()
        grad_weight = torch.zeros(info.num_tokens * info.topk, dtype=torch.float32, device=src.device)
    if info.num_rows == 0:
        return dst, grad_weight
    w = weight.reshape(-1).contiguous().float() if weight is not None else src
    _rows_from_tokens_kernel[(info.num_rows,)](
        src, info.row_pair, w, dst, y if y is not None else src,
        grad_weight if grad_weight is not None else dst,
        H, src.stride(0), dst.stride(0), y.stride(0) if y is not None else 0,
        TOPK=info.topk, HAS_WEIGHT=weight is not None, COMPUTE_DOT=y is not None,
        BLOCK_H=_block_h(H),
    )
    return dst, grad_weight


def _tokens_from_rows_triton(src, info, weight=None, out_dtype=None):
    """Triton: [M_pad, H] rows -> [T, H], each token summing its K rows in k order."""
    H = src.shape[1]
    src = src.contiguous()
    out = torch.empty(info.num_tokens, H, dtype=out_dtype or src.dtype, device=src.device)
    if info.num_tokens == 0:
        return out
    w = weight.contiguous().float() if weight is not None else src
    block = _block_h(H)
    _tokens_from_rows_kernel[(info.num_tokens, triton.cdiv(H, block))](
        src, info.pair_row, w, out, H, src.stride(0), out.stride(0),
        TOPK=info.topk, HAS_WEIGHT=weight is not None, BLOCK_H=block,
    )
    return out


# ---- PyTorch references ------------------------------------------------------------------------
def _rows_from_tokens_torch(src, info, weight=None, y=None, out_dtype=None):
    H = src.shape[1]
    dst = torch.zeros(info.num_rows, H, dtype=out_dtype or src.dtype, device=src.device)
    grad_weight = None
    real = info.row_pair >= 0
    pairs = info.row_pair[real]
    token_rows = src[pairs // info.topk]
    if weight is not None:
        dst[real] = (token_rows.float() * weight.reshape(-1).float()[pairs, None]).to(dst.dtype)
    else:
        dst[real] = token_rows.to(dst.dtype)
    if y is not None:
        grad_weight = torch.zeros(info.num_tokens * info.topk, dtype=torch.float32, device=src.device)
        grad_weight[pairs] = (y[real].float() * token_rows.float()).sum(-1)
    return dst, grad_weight


def _tokens_from_rows_torch(src, info, weight=None, out_dtype=None, deterministic=True):
    T, K = info.pair_row.shape
    H = src.shape[1]
    if deterministic:  # gather the K rows of every token and add them in k order
        acc = torch.zeros(T, H, dtype=torch.float32, device=src.device)
        for k in range(K):
            rows = src[info.pair_row[:, k]].float()
            acc += rows * weight[:, k, None].float() if weight is not None else rows
    else:  # scatter-add every row into its token (atomics on CUDA)
        acc = torch.zeros(T, H, dtype=torch.float32, device=src.device)
        real = info.row_pair >= 0
        pairs = info.row_pair[real]
        rows = src[real].float()
        if weight is not None:
            rows = rows * weight.reshape(-1).float()[pairs, None]
        acc.index_add_(0, pairs // K, rows)
    return acc.to(out_dtype or src.dtype)


# ---- dispatch and autograd ---------------------------------------------------------------------
def rows_from_tokens(src, info, weight=None, y=None, out_dtype=None, backend="auto"):
    """[T, H] -> [M_pad, H]: row r = weight[pair] * src[token] (zeros on padding rows); no autograd.

    With y [M_pad, H] also returns <y[r], src[token]> per pair as float32 [T*K], else None.
    """
    if select_backend(backend, src, op="rows_from_tokens") == "triton":
        return _rows_from_tokens_triton(src, info, weight, y, out_dtype)
    return _rows_from_tokens_torch(src, info, weight, y, out_dtype)


def tokens_from_rows(src, info, weight=None, out_dtype=None, backend="auto", deterministic=True):
    """[M_pad, H] -> [T, H]: out[t] = sum_k weight[t, k] * src[pair_row[t, k]]; no autograd."""
    if select_backend(backend, src, op="tokens_from_rows") == "triton":
        return _tokens_from_rows_triton(src, info, weight, out_dtype)
    return _tokens_from_rows_torch(src, info, weight, out_dtype, deterministic)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, info, backend, deterministic):
        ctx.info, ctx.backend, ctx.deterministic = info, backend, deterministic
        x_perm, _ = rows_from_tokens(x, info, backend=backend)
        return x_perm

    @staticmethod
    def backward(ctx, grad_x_perm):
        grad_x = tokens_from_rows(
            grad_x_perm, ctx.info, backend=ctx.backend, deterministic=ctx.deterministic
        )
        return grad_x, None, None, None


class _UnpermuteCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_perm, topk_weight, info, backend, deterministic):
        ctx.info, ctx.backend = info, backend
        ctx.save_for_backward(y_perm, topk_weight)
        return tokens_from_rows(y_perm, info, topk_weight, backend=backend, deterministic=deterministic)

    @staticmethod
    def backward(ctx, grad_out):
        y_perm, topk_weight = ctx.saved_tensors
        need_weight_grad = ctx.needs_input_grad[1]
        grad_y, grad_w = rows_from_tokens(
            grad_out, ctx.info, weight=topk_weight, y=y_perm if need_weight_grad else None,
            out_dtype=y_perm.dtype, backend=ctx.backend,
        )
        if grad_w is not None:
            grad_w = grad_w.view(topk_weight.shape).to(topk_weight.dtype)
        return grad_y, grad_w, None, None, None


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
    if info is None:
        info = build_permute_info(topk_idx, n_experts, align)
    return _Permute.apply(x, info, backend, deterministic), info


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
    return _UnpermuteCombine.apply(y_perm, topk_weight, info, backend, deterministic)
