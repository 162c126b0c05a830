"""What the two Gluon FP8 MLA decode kernels share (coscale.kernels._mla_decode_gluon_regs, the default, and
coscale.kernels._mla_decode_gluon): their Gluon helper functions, the cases they take and their sm_90 compile
without a GPU."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from coscale.kernels._gluon_hopper import hopper_api

BLOCK_N = 64  # keys a tile: wgmma's M for the scores
NT = 4  # 128-column scale tiles of the 512-wide latent
TILE = 128
MAX_ROWS = 16  # query rows a program (wgmma's N): 16 heads, or MTP's two tokens of 8


def supports(c: int, dr: int, page: int, rows: int, fp8: bool, q_dtype: torch.dtype) -> bool:
    """Whether the kernels take the case: DeepSeek's latent (512 = 4 scale tiles) and RoPE width (64), pages of whole
    64-key tiles, at most 16 query rows a program (the [512, rows] FP32 accumulator of one warpgroup; with 32 rows,
    MTP's two tokens of 16 heads, the math warps spill in sm_90 compiles), an FP8 cache and bf16 queries."""
    return fp8 and c == NT * TILE and dr == 64 and page % BLOCK_N == 0 and rows <= MAX_ROWS \
        and q_dtype == torch.bfloat16


@functools.cache
def helpers() -> SimpleNamespace:
    """The Gluon functions both kernels use (their builders take them into local names, which their own jit
    functions then call as closure variables)."""
    api = hopper_api()
    gluon, gl = api.gluon, api.gl
    public_reinterpret = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))  # (3.6: _reinterpret)

    @gluon.jit
    def as_words(buf, shape: gl.constexpr, layout: gl.constexpr):
        # the same bytes seen as int32
        if public_reinterpret:
            return buf.reinterpret(gl.int32, shape, layout)
        else:
            return buf._reinterpret(gl.int32, shape, layout)

    # Reductions through gl.reduce: gl.max and gl.sum are Triton's own jit functions, which its CPU interpreter
    # (on in the test session, where the kernels are compiled for sm_90) swaps for interpreted ones
    @gluon.jit
    def _maximum(a, b):
        return gl.maximum(a, b)

    @gluon.jit
    def _add(a, b):
        return a + b

    @gluon.jit
    def rmax(x, axis: gl.constexpr):
        return gl.reduce(x, axis, _maximum)

    @gluon.jit
    def rsum(x, axis: gl.constexpr):
        return gl.reduce(x, axis, _add)

    @gluon.jit
    def split_range(seq_len, split, num_splits, BLOCK_N: gl.constexpr):
        # the keys [lo, hi) of this split and its tile count, in whole tiles (the Triton kernel's division)
        per_split = gl.cdiv(gl.cdiv(seq_len, BLOCK_N), num_splits) * BLOCK_N
        lo = split * per_split
        hi = gl.minimum(lo + per_split, seq_len)
        return lo, hi, gl.cdiv(gl.maximum(hi - lo, 0), BLOCK_N)

    @gluon.jit
    def scale_column(sc_tile, groups, g: gl.constexpr, key_ok, key_layout: gl.constexpr):
        # scale tile g of each key as a vector along the keys, 0 past the split's end (a maximum, not a sum, picks the
        # column: exact however a layout's copies of an element are reduced; the conversion is a relabelling)
        col = rmax(gl.where(groups[None, :] == g, sc_tile, float("-inf")), axis=1)
        return gl.where(key_ok, gl.convert_layout(col, key_layout, assert_trivial=True), 0.0)

    @gluon.jit
    def pow2_row_scale(amax):
        # 2^(14 - floor(log2 amax)) per row, from the exponent bits (exact; 1 for a zero row): the Triton
        # kernel's scaling of the query into fp16's range
        e = ((amax.to(gl.int32, bitcast=True) >> 23) & 0xFF) - 127
        biased = gl.minimum(gl.maximum(127 + 14 - e, 1), 254)
        f = (biased << 23).to(gl.float32, bitcast=True)
        return gl.where(amax > 0, f, 1.0)

    @gluon.jit
    def query(q_ptr, qpe_ptr, group, b, stride_qb, stride_qs, stride_qh, stride_pb, stride_ps, stride_ph, H,
              C: gl.constexpr, DR: gl.constexpr, S_Q: gl.constexpr, HEADS_TILE: gl.constexpr, BLOCK_M: gl.constexpr):
        # The program's query rows (S_Q tokens x HEADS_TILE heads): the latent part scaled by a power of two f per
        # row into fp16's range, [BLOCK_M, C] fp16, f, and the RoPE part [BLOCK_M, DR] (read in order, 16 bytes a load)
        q_layout: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [4, 1], [1, 0])
        rows_q = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, q_layout))
        token_q = rows_q // HEADS_TILE
        head_q = group * HEADS_TILE + rows_q % HEADS_TILE
        off_q = b * stride_qb + token_q * stride_qs + head_q * stride_qh
        ok_q = (token_q < S_Q) & (head_q < H)
        cols = gl.arange(0, C, layout=gl.SliceLayout(0, q_layout))
        q = gl.load(q_ptr + off_q[:, None] + cols[None, :], mask=ok_q[:, None], other=0.0).to(gl.float32)
        f = pow2_row_scale(rmax(gl.abs(q), axis=1))
        off_pe = b * stride_pb + token_q * stride_ps + head_q * stride_ph
        cols_r = gl.arange(0, DR, layout=gl.SliceLayout(0, q_layout))
        q_pe = gl.load(qpe_ptr + off_pe[:, None] + cols_r[None, :], mask=ok_q[:, None], other=0.0)
        return (q * f[:, None]).to(gl.float16), f, q_pe

    @gluon.jit
    def query_rows(group, seq_len, H, S_Q: gl.constexpr, HEADS_TILE: gl.constexpr, BLOCK_M: gl.constexpr,
                   row_layout: gl.constexpr):
        # each query row's token and head, whether it is one, and its last visible key (causal among the S_Q tokens)
        rows = gl.arange(0, BLOCK_M, layout=row_layout)
        token = rows // HEADS_TILE
        head = group * HEADS_TILE + rows % HEADS_TILE
        return token, head, (token < S_Q) & (head < H), seq_len - S_Q + token

    @gluon.jit
    def tile_scales(sc_buf, start, hi, BLOCK_N: gl.constexpr, key_layout: gl.constexpr):
        # The tile's keys (positions from start, and which lie before hi), each key's four scales as vectors along the
        # keys (0 past the end), and the tile's largest scale. sc_layout holds a key's four scales in the registers of
        # the threads that hold its scores in the wgmma layout of 64 keys on M (each scale tile's vector is then
        # already in key_layout: no layout conversion, no barrier); sc_all_layout the whole [64, 4] tile in every warp
        # (the largest, a reduction within the warp).
        sc_layout: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [0, 2], [8, 0]], lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
            warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[BLOCK_N, 4])
        sc_all_layout: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [0, 2], [32, 0]], lane_bases=[[1, 0], [2, 0], [4, 0], [8, 0], [16, 0]],
            warp_bases=[[0, 0], [0, 0]], block_bases=[], shape=[BLOCK_N, 4])
        pos = start + gl.arange(0, BLOCK_N, layout=key_layout)
        key_ok = pos < hi
        sc_tile = sc_buf.load(sc_layout)
        groups = gl.arange(0, 4, layout=gl.SliceLayout(0, sc_layout))
        sc0 = scale_column(sc_tile, groups, 0, key_ok, key_layout)
        sc1 = scale_column(sc_tile, groups, 1, key_ok, key_layout)
        sc2 = scale_column(sc_tile, groups, 2, key_ok, key_layout)
        sc3 = scale_column(sc_tile, groups, 3, key_ok, key_layout)
        rows_all = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, sc_all_layout))
        sc_all = gl.where((rows_all < hi)[:, None], sc_buf.load(sc_all_layout), 0.0)
        return pos, key_ok, sc0, sc1, sc2, sc3, rmax(rmax(sc_all, axis=1), axis=0)

    @gluon.jit
    def softmax_step(s0, s1, s2, s3, s_pe, sc0, sc1, sc2, sc3, visible, inv_f, sm_scale_log2, m_i, l_acc, smax,
                     tile_smax):  # fmt: skip
        # One tile of the online softmax with the keys on M: scores^T per scale tile times its scales (and 1/f, the
        # query's power-of-two scaling) plus the RoPE part, base-2 exponent. Returns P / smax (so P' = P x scale /
        # smax <= 1 per scale tile; the accumulators hold value / smax), the running maximum, the denominators (kept
        # per score element, summed over the keys once at the end), smax, and the factor the accumulators take
        # before this tile's products (the softmax's rescale times smax_old / smax_new).
        s_lat = s0 * sc0[:, None] + s1 * sc1[:, None] + s2 * sc2[:, None] + s3 * sc3[:, None]
        sc = gl.where(visible, (s_lat * inv_f[None, :] + s_pe) * sm_scale_log2, float("-inf"))
        m_new = gl.maximum(m_i, rmax(sc, axis=0))
        smax_new = gl.maximum(smax, tile_smax)
        alpha = gl.exp2(m_i - gl.where(m_new == float("-inf"), 0.0, m_new))  # a row with no visible key yet
        p = gl.exp2(sc - gl.where(m_new == float("-inf"), 0.0, m_new)[None, :])
        l_acc = l_acc * alpha[None, :] + p
        return p * (1.0 / smax_new), m_new, l_acc, smax_new, alpha * (smax / smax_new)

    @gluon.jit
    def softmax_end(l_acc, m_i):
        # (the denominators, 1 for a row with no key; the log-sum-exp, -inf for such a row)
        l_i = rsum(l_acc, axis=0)
        has_keys = l_i > 0
        l_safe = gl.where(has_keys, l_i, 1.0)
        return l_safe, gl.where(has_keys, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))

    return SimpleNamespace(as_words=as_words, rmax=rmax, split_range=split_range,
                           query=query, query_rows=query_rows, tile_scales=tile_scales, softmax_step=softmax_step,
                           softmax_end=softmax_end)


def tma_descriptor(t: torch.Tensor, block: list[int]):
    """A TMA descriptor of ``t`` with ``block``-shaped boxes in the default swizzled layout of its dtype."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    dtypes = {torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16, torch.float32: gl.float32}
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtypes[t.dtype]))


def compile_for_sm90(kernel, descriptors, constexprs: dict, page: int, out_dtype=torch.float32):
    """``kernel`` compiled for an H100/H200 without a GPU (Triton's wheel carries ptxas): its ``asm`` holds the PTX,
    cubin and TTGIR. ``descriptors(latent, rope, scale)`` builds its TMA descriptors (compiled from a small cache
    of ``page``-key blocks); divisibility as on the GPU. For the CPU tests and tools/compile_sm90.py."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    nb = 4
    latent = torch.zeros(nb, page, NT * TILE, dtype=torch.float8_e4m3fn)
    rope = torch.zeros(nb, page, 64, dtype=torch.bfloat16)
    scale = torch.zeros(nb, page, NT, dtype=torch.float32)
    descs = dict(zip(("lat_desc", "rope_desc", "sc_desc"), descriptors(latent, rope, scale)))
    signature = {name: "i32" for name in kernel.arg_names}
    signature.update({k: mangle_type(v) for k, v in descs.items()})
    out = {torch.float32: "*fp32", torch.bfloat16: "*bf16"}[out_dtype]
    signature.update(q_ptr="*bf16", qpe_ptr="*bf16", table_ptr="*i32", seq_lens_ptr="*i32", out_ptr=out,
                     lse_ptr="*fp32", sm_scale_log2="fp32")
    signature.update({k: "constexpr" for k in constexprs})
    # pointers and the query's and outputs' strides, multiples of 16 at DeepSeek's shapes as the GPU specialises
    even = {"stride_qb", "stride_qs", "stride_qh", "stride_pb", "stride_ps", "stride_ph", "stride_ob", "stride_os",
            "stride_oh", "stride_osplit"}
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*") or n in even}
    src = GluonASTSource(fn=kernel, signature=signature, attrs=attrs,
                         constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def launch(kernel, descriptors, constexprs: dict, q_lat, q_pe, block_table, seq_lens, o, o_lse, num_splits: int,
           sm_scale_log2: float, heads_tile: int) -> None:
    """``kernel`` on grid (head groups, splits, sequences) with mla_decode's split-kernel contract (o [B, S, H,
    splits, c], o_lse [B, S, H, splits]); ``descriptors``: the cache's TMA descriptors (contiguous tensors: TMA
    reads them as rows, so a strided view fails there)."""
    if torch.cuda.get_device_capability(q_lat.device) != (9, 0):
        raise RuntimeError("the Gluon MLA decode kernels run on sm_90 (Hopper) only")
    lat_desc, rope_desc, sc_desc = descriptors
    kernel[(-(-q_lat.shape[2] // heads_tile), num_splits, q_lat.shape[0])](
        lat_desc, rope_desc, sc_desc, q_lat, q_pe, block_table, seq_lens, o, o_lse,
        q_lat.stride(0), q_lat.stride(1), q_lat.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        block_table.stride(0), o.stride(0), o.stride(1), o.stride(2), o.stride(3),
        o_lse.stride(0), o_lse.stride(1), o_lse.stride(2), q_lat.shape[2], num_splits, sm_scale_log2,
        **constexprs, num_warps=4,
    )  # fmt: skip
