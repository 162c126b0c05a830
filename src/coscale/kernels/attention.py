"""Causal flash attention forward over packed variable-length sequences, q/k and v dims unequal.

Shape legend: Nq packed query tokens, Nk packed key tokens, H heads, D q/k head dim (192 for MLA:
128 nope + 64 rope), Dv value head dim (128), G sequences.

MLA's prefill runs in decompressed (naive) form: per head q = [q_nope ; q_pe] and k = [k_nope ; k_pe] are
192 wide, v is 128 wide; PyTorch's flash SDPA backend wants equal dims. This kernel takes them as they
are. Sequence g owns queries cu_seqlens_q[g]:cu_seqlens_q[g+1] and keys cu_seqlens_k[g]:cu_seqlens_k[g+1];
its q_len queries are the last q_len of its k_len positions (a prefill chunk after k_len - q_len cached
tokens), so with `causal` query i sees keys j <= i + k_len - q_len.

    o[i, h] = softmax_j(scale * q[i, h] . k[j, h]) v[j, h]      over the visible j of i's sequence

Triton kernel: grid (query blocks, H, G); a program holds BLOCK_M queries of one head, streams
BLOCK_N keys at a time up to its last visible key (online softmax in base 2, FP32 accumulator). A head
dim that is not a power of two (192) is split into a power-of-two part and a remainder (128 + 64), two
tl.dots per score tile, so nothing is padded to 256. Under TRITON_INTERPRET=1 the dots run in FP32
(bf16 tl.dot is wrong there). `attention_ref` is the plain-PyTorch reference; `attention_sdpa` the
fallback where Triton is not available (torch SDPA per sequence, v zero-padded to D on CUDA so that its
fused backends apply).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from coscale.errors import CoscaleError
from coscale.kernels.autotune import triton_autotune
from coscale.kernels.backend import interpreting, select_backend


def _check(q, k, v, cu_seqlens_q, cu_seqlens_k):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise CoscaleError(f"q, k, v must be [N, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1:] != k.shape[1:] or v.shape[:2] != k.shape[:2]:
        raise CoscaleError(f"q/k must share [H, D] and k/v [Nk, H]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                           f"{tuple(v.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1:
        raise CoscaleError("cu_seqlens_q and cu_seqlens_k must be [G + 1] offsets of the same G sequences")


def _sequences(cu_seqlens_q, cu_seqlens_k):
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(cq[g], cq[g + 1], ck[g], ck[g + 1]) for g in range(len(cq) - 1)]


def _visible(q_len: int, k_len: int, causal: bool, device) -> torch.Tensor | None:
    if not causal:
        return None
    i = torch.arange(q_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= i + (k_len - q_len)  # (q_len, k_len)


def attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale: float, causal: bool = True):
    """Plain PyTorch (float64 for float64 inputs, else float32): o [Nq, H, Dv] in q's dtype."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=acc, device=q.device)
    for q0, q1, k0, k1 in _sequences(cu_seqlens_q, cu_seqlens_k):
        scores = torch.einsum("ihd,jhd->hij", q[q0:q1].to(acc), k[k0:k1].to(acc)) * softmax_scale
        visible = _visible(q1 - q0, k1 - k0, causal, q.device)
        if visible is not None:
            scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query without keys gets zeros
        out[q0:q1] = torch.einsum("hij,jhd->ihd", probs, v[k0:k1].to(acc))
    return out.to(q.dtype)


def attention_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale: float, causal: bool = True):
    """torch SDPA per sequence (the fallback without Triton); same contract as attention_ref."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    D, Dv = q.shape[-1], v.shape[-1]
    pad = q.is_cuda and Dv < D  # fused CUDA backends want equal dims
    out = torch.zeros(q.shape[0], q.shape[1], Dv, dtype=q.dtype, device=q.device)
    for q0, q1, k0, k1 in _sequences(cu_seqlens_q, cu_seqlens_k):
        vg = F.pad(v[k0:k1], (0, D - Dv)) if pad else v[k0:k1]
        same = q1 - q0 == k1 - k0
        o = F.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), vg.transpose(0, 1),
            attn_mask=None if same or not causal else _visible(q1 - q0, k1 - k0, True, q.device),
            is_causal=causal and same, scale=softmax_scale,
        )
        out[q0:q1] = o.transpose(0, 1)[..., :Dv]
    return out


def _configs(triton):
    """(the GPU's configurations, the interpreter's one) for coscale.kernels.autotune.triton_autotune."""
    gpu = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
           for m, n, w, s in [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4), (128, 64, 8, 3)]]
    return gpu, triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)


@functools.cache
def _build_kernel(interpret: bool):
    import triton
    import triton.language as tl

    @triton_autotune(*_configs(triton), key=["D1", "D2", "DV", "CAUSAL"])
    @triton.jit
    def attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, cu_q_ptr, cu_k_ptr,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh, sm_scale_log2,
        D1: tl.constexpr, D2: tl.constexpr, BLOCK_D2: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
        CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        m_block, head, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q_start = tl.load(cu_q_ptr + seq)
        q_len = tl.load(cu_q_ptr + seq + 1) - q_start
        k_start = tl.load(cu_k_ptr + seq)
        k_len = tl.load(cu_k_ptr + seq + 1) - k_start
        offset = k_len - q_len  # the queries are the last q_len of the k_len positions
        rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        hi = k_len
        if CAUSAL:
            hi = tl.minimum(k_len, offset + (m_block + 1) * BLOCK_M)
        hi = tl.where(m_block * BLOCK_M < q_len, hi, 0)

        offs_d1 = tl.arange(0, D1)
        offs_d2 = tl.arange(0, BLOCK_D2)
        offs_v = tl.arange(0, BLOCK_DV)
        q_rows = q_ptr + (q_start + rows).to(tl.int64)[:, None] * stride_qn + head * stride_qh
        dot_dtype = tl.float32 if DOT_FP32 else q_ptr.dtype.element_ty
        q1 = tl.load(q_rows + offs_d1[None, :], mask=row_ok[:, None], other=0.0).to(dot_dtype)
        q2 = tl.load(q_rows + D1 + offs_d2[None, :], mask=row_ok[:, None] & (offs_d2[None, :] < D2),
                     other=0.0).to(dot_dtype)

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
        for start in range(0, hi, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            key_ok = keys < k_len
            k_rows = k_ptr + (k_start + keys).to(tl.int64)[:, None] * stride_kn + head * stride_kh
            k1 = tl.load(k_rows + offs_d1[None, :], mask=key_ok[:, None], other=0.0).to(dot_dtype)
            s = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
            if D2 > 0:
                k2 = tl.load(k_rows + D1 + offs_d2[None, :], mask=key_ok[:, None] & (offs_d2[None, :] < D2),
                             other=0.0).to(dot_dtype)
                s += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
            visible = key_ok[None, :]
            if CAUSAL:
                visible = visible & (keys[None, :] <= rows[:, None] + offset)
            s = tl.where(visible, s * sm_scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_rows = v_ptr + (k_start + keys).to(tl.int64)[:, None] * stride_vn + head * stride_vh
            v = tl.load(v_rows + offs_v[None, :], mask=key_ok[:, None] & (offs_v[None, :] < DV),
                        other=0.0).to(dot_dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), v, input_precision=PRECISION)
            m_i = m_new

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_rows = o_ptr + (q_start + rows).to(tl.int64)[:, None] * stride_on + head * stride_oh
        tl.store(o_rows + offs_v[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_v[None, :] < DV))

    return attention_fwd_kernel


def _split_dims(d: int) -> tuple[int, int]:
    """d = d1 + d2 with d1 the largest power of two <= d (192 -> 128 + 64)."""
    d1 = 1 << (d.bit_length() - 1)
    return d1, d - d1


def flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, softmax_scale: float,
                    causal: bool = True, backend: str = "auto"):
    """Attention of packed sequences (module docstring). q [Nq, H, D], k [Nk, H, D], v [Nk, H, Dv]
    (last dim contiguous; any token/head strides); cu_seqlens_q/k int32 [G + 1] on q's device;
    max_seqlen_q: the longest query run (host int). Returns o [Nq, H, Dv] in q's dtype.
    `backend`: "auto" (Triton on CUDA, else SDPA), "triton", or "torch" (SDPA)."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if select_backend(backend, q, op="flash_attention") == "torch" or q.dtype == torch.float64:
        return attention_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    H, D = q.shape[1:]
    Dv = v.shape[-1]
    if D < 16:
        raise CoscaleError(f"flash_attention needs a head dim of at least 16, got {D}")
    d1, d2 = _split_dims(D)
    out = torch.empty(q.shape[0], H, Dv, dtype=q.dtype, device=q.device)
    G = cu_seqlens_q.shape[0] - 1
    if out.numel() == 0 or G == 0:
        return out.zero_()
    dot_fp32 = interpreting() or q.dtype == torch.float32
    kernel = _build_kernel(interpreting())

    def grid(meta):
        return (-(-max_seqlen_q // meta["BLOCK_M"]), H, G)

    kernel[grid](
        q, k, v, out, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        softmax_scale * math.log2(math.e),
        D1=d1, D2=d2, BLOCK_D2=max(16, 1 << max(0, (d2 - 1).bit_length())) if d2 else 16, DV=Dv,
        BLOCK_DV=max(16, 1 << (Dv - 1).bit_length()), CAUSAL=causal, DOT_FP32=dot_fp32,
        PRECISION="ieee" if dot_fp32 else "tf32",
    )  # fmt: skip
    return out
