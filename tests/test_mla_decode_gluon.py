"""The warp-specialized Gluon MLA decode kernels for an FP8 cache (coscale.kernels._mla_decode_gluon_regs, the default,
and coscale.kernels._mla_decode_gluon; the GPU tests run each).

Gluon has no interpreter, so on the CPU the kernel is compiled for sm_90 (Triton's wheel carries ptxas) and its
machine code checked for what would cost its speed or its correctness (spills, the products' count, the cast of
four values a word); on a Hopper GPU it runs against the float64 reference, with garbage (NaN) in the cache past
every sequence's end, ragged lengths, partial last tiles, splits and MTP's two query tokens.
"""

from __future__ import annotations

import re

import pytest
import torch

from coscale.errors import CoscaleError
from coscale.kernels import _mla_decode_gluon as gk
from coscale.kernels import _mla_decode_gluon_regs as gkr
from coscale.kernels import mla_decode as md
from coscale.kernels.backend import interpreting
from coscale.kernels.mla_decode import (
    LatentCacheLayer,
    gather_latent,
    mla_decode,
    mla_decode_ref,
    quantize_latent_fp8,
    sequence_slots,
)
from sm90 import compile_ptx, on_hopper, ptxas_report

needs_gluon = pytest.mark.skipif(not gk.gluon_decode_available(), reason="needs triton with Gluon's Hopper API")



@needs_gluon
@pytest.mark.timeout(120)
def test_the_kernel_compiles_for_sm90_without_spills(tmp_path):
    """sm_90 compile: 68 wgmma a tile (4 scale tiles x 8 k-steps of scores, 4 of the RoPE key, 4 scale tiles x 2
    row blocks x 4 k-steps of P @ V), 128 casts a converter thread a tile (64 rows x 512 values over 128 threads,
    two a cvt), no spills (the math warps once spilled the hoisted operand descriptors), one program an SM."""
    ptx, shared = compile_ptx("coscale.kernels._mla_decode_gluon", [16, 1], tmp_path)
    assert ptx.count("wgmma.mma_async") == 68
    assert ptx.count("cvt.rn.f16x2.e4m3x2") == 128
    report = ptxas_report(ptx, tmp_path)
    assert "C7514" not in report and "serialized" not in report, report
    assert re.search(r"\b0 bytes spill stores", report), report
    assert shared <= 227 * 1024


@needs_gluon
@pytest.mark.timeout(120)
def test_the_register_operand_kernel_compiles_for_sm90_without_spills(tmp_path):
    """sm_90 compile of the second design (coscale.kernels._mla_decode_gluon_regs): the same 68 wgmma a tile, 128
    casts a thread a tile in each MMA warpgroup (256 in all), the values warpgroup's 64 byte permutes (two a pair of
    keys' words), no spills, no product serialized or waited for by ptxas for want of registers, one program an
    SM."""
    ptx, shared = compile_ptx("coscale.kernels._mla_decode_gluon_regs", [16, 1], tmp_path)
    assert ptx.count("wgmma.mma_async") == 68
    assert ptx.count("cvt.rn.f16x2.e4m3x2") == 256
    assert ptx.count("prmt.b32") == 64
    report = ptxas_report(ptx, tmp_path)
    assert "C7512" not in report and "C7514" not in report and "C7517" not in report, report
    assert re.search(r"\b0 bytes spill stores", report), report
    assert shared <= 227 * 1024


def test_the_register_operands_column_orders_are_permutations():
    """Where the register-operand kernel's fragments hold the latent's columns: each order a permutation of a scale
    tile's 128 columns (the query is stored in the scores' order and the output rows undo the values' order)."""
    k = torch.arange(128)
    assert sorted(gkr.query_column(k).tolist()) == list(range(128))
    assert sorted(gkr.value_column(k).tolist()) == list(range(128))
    # a thread's eight words of a key row are 32 contiguous bytes; a thread's four value rows are one word
    assert gkr.query_column(torch.tensor([0, 1, 8, 9, 16])).tolist() == [0, 1, 2, 3, 4]
    assert gkr.value_column(torch.tensor([0, 8, 64, 72, 1])).tolist() == [0, 1, 2, 3, 4]


def _join(a, b):
    return torch.stack([a, b], -1)  # gl.join: a new last dimension


def test_the_register_operands_reorderings_give_those_column_orders():
    """The kernel's reshapes and permutes, replayed on index tensors with torch's semantics (Gluon's are the same):
    the query stored at query_column's positions, the scores' A holding column query_column(k) of key r at [r, k],
    and the values' A holding column value_column(m) of key k at [m, k]. Value ids: key * 1000 + column."""
    q = torch.arange(16 * 512).view(16, 512)
    stored = q.reshape(16, 4, 4, 8, 2, 2).permute(0, 1, 3, 4, 2, 5).reshape(16, 512)  # _scores
    k = torch.arange(512)
    assert torch.equal(stored, q[:, k - k % 128 + gkr.query_column(k % 128)])
    key = torch.arange(64)[:, None].expand(64, 32)
    word = torch.arange(32)[None, :].expand(64, 32)
    h = [key * 1000 + 4 * word + b for b in range(4)]  # _f16x4: bytes 0..3 of each word
    a = _join(_join(h[0], h[1]), _join(h[2], h[3])).permute(0, 1, 3, 2).reshape(64, 4, 8, 2, 2)  # _scores_operand
    a = a.permute(0, 2, 3, 1, 4).reshape(64, 128)
    assert torch.equal(a, torch.arange(64)[:, None] * 1000 + gkr.query_column(torch.arange(128))[None, :])
    pairs = [t.reshape(32, 2, 32).permute(0, 2, 1).unbind(-1) for t in (key, word)]  # _values_operand's split
    (even_k, odd_k), (even_w, odd_w) = pairs
    c = [x for b in range(4) for x in (even_k * 1000 + 4 * even_w + b, odd_k * 1000 + 4 * odd_w + b)]  # prmt + cvt
    v = _join(_join(_join(c[0], c[1]), _join(c[2], c[3])), _join(_join(c[4], c[5]), _join(c[6], c[7])))
    v = v.permute(1, 4, 3, 0, 2).reshape(4, 8, 2, 2, 64).permute(2, 0, 3, 1, 4).reshape(128, 64)
    assert torch.equal(v, torch.arange(64)[None, :] * 1000 + gkr.value_column(torch.arange(128))[:, None])


def test_asking_for_it_where_it_cannot_run_is_a_clear_error():
    """float32 queries (the interpreter's CPU tensors, or a GPU's): refused with a clear error when asked for; the
    Triton kernel otherwise (also by default, FP8_GLUON)."""
    dev = "cpu" if interpreting() or not torch.cuda.is_available() else "cuda"
    lens = torch.tensor([70], dtype=torch.int32, device=dev)
    latent, scale = quantize_latent_fp8(torch.randn(2 * 64, 512))
    cache = LatentCacheLayer(latent.view(2, 64, 512).to(dev), torch.randn(2, 64, 64, device=dev),
                             scale.view(2, 64, 4).to(dev))
    table = torch.tensor([[1, 0]], dtype=torch.int32, device=dev)
    q_lat, q_pe = torch.randn(1, 1, 16, 512, device=dev), torch.randn(1, 1, 16, 64, device=dev)
    with pytest.raises(CoscaleError, match="fp8_gluon"):
        mla_decode(q_lat, q_pe, cache, table, lens, 0.1, fp8_gluon=True, backend="triton")
    out, _ = mla_decode(q_lat, q_pe, cache, table, lens, 0.1, backend="triton")
    assert torch.isfinite(out).all()


def test_refusals_say_why():
    """Each reason the launcher gives for not running the Gluon kernel (an error when fp8_gluon=True asked for it),
    checked on the CPU as if on an sm_90 GPU: the kernel takes the case only when nothing refuses it."""
    from coscale.kernels.mla_decode import gluon_refusal

    latent, scale = quantize_latent_fp8(torch.randn(2 * 64, 512))
    cache = LatentCacheLayer(latent.view(2, 64, 512), torch.randn(2, 64, 64).bfloat16(), scale.view(2, 64, 4))
    bf16 = torch.bfloat16
    expected = None if gk.gluon_decode_available() else "no Gluon"
    why = gluon_refusal(cache, bf16, 16, None, on_sm90=True)
    assert why is None if expected is None else expected in why
    assert "sm_90" in gluon_refusal(cache, bf16, 16, None, on_sm90=False)
    assert "kernel_config" in gluon_refusal(cache, bf16, 16, {"BLOCK_N": 32}, on_sm90=True)
    assert "32 rows" in gluon_refusal(cache, bf16, 32, None, on_sm90=True)
    assert "float32 queries" in gluon_refusal(cache, torch.float32, 16, None, on_sm90=True)
    small_pages = LatentCacheLayer(latent.view(8, 16, 512), cache.rope.view(8, 16, 64), scale.view(8, 16, 4))
    assert "page = 16" in gluon_refusal(small_pages, bf16, 16, None, on_sm90=True)
    strided = LatentCacheLayer(torch.cat([latent, latent], dim=1).view(2, 64, 1024)[..., :512], cache.rope, cache.scale)
    assert "contiguous" in gluon_refusal(strided, bf16, 16, None, on_sm90=True)
    fp16_rope = LatentCacheLayer(cache.latent, cache.rope.half(), cache.scale)
    assert "(got bfloat16, float16, float32, int32)" in gluon_refusal(fp16_rope, bf16, 16, None, on_sm90=True)
    assert "(got float32, bfloat16" in gluon_refusal(cache, bf16, 16, None, True, q_pe_dtype=torch.float32)
    assert "int64)" in gluon_refusal(cache, bf16, 16, None, True, table_dtype=torch.int64)
    assert "FP8 cache" in gluon_refusal(LatentCacheLayer(torch.randn(2, 64, 512), cache.rope), bf16, 16, None, True)


def test_supports_states_its_cases():
    assert gk.supports(512, 64, 64, 16, True, torch.bfloat16)
    assert gk.supports(512, 64, 128, 16, True, torch.bfloat16)
    assert not gk.supports(512, 64, 64, 32, True, torch.bfloat16)  # MTP's two tokens x 16 heads (spills)
    assert not gk.supports(512, 64, 16, 16, True, torch.bfloat16)  # pages smaller than a tile
    assert not gk.supports(512, 64, 64, 64, True, torch.bfloat16)  # V3's 64-row tiles
    assert not gk.supports(256, 64, 64, 16, True, torch.bfloat16)
    assert not gk.supports(512, 64, 64, 16, False, torch.bfloat16)
    assert not gk.supports(512, 64, 64, 16, True, torch.float32)


def _case(lens, S, H, page, seed, decades):
    """An FP8 cache whose blocks are scattered, per-tile scales spread over ``decades``, and NaN everywhere a
    sequence has no key (the kernel's TMA reads whole blocks; the reference reads only the keys)."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // page) for n in lens)
    nb = len(lens) * width + 1
    x = torch.randn(nb * page, 512, generator=g)
    latent, scale = quantize_latent_fp8(x)
    scale = scale * 10 ** (torch.rand(scale.shape, generator=g) * decades - decades / 2)
    latent, scale = latent.view(nb, page, 512), scale.view(nb, page, 4)
    rope = torch.randn(nb, page, 64, generator=g).bfloat16()
    table = (torch.randperm(nb - 1, generator=g)[: len(lens) * width] + 1).view(len(lens), width).int()
    used = torch.zeros(nb, page, dtype=torch.bool)
    for b, n in enumerate(lens):
        for pos in range(n):
            used[table[b, pos // page], pos % page] = True
    latent.view(torch.uint8)[~used] = 0x7F  # e4m3 NaN
    rope[~used] = float("nan")
    scale[~used] = float("nan")
    cache = LatentCacheLayer(latent, rope, scale)
    q_lat = torch.randn(len(lens), S, H, 512, generator=g).bfloat16()
    q_pe = torch.randn(len(lens), S, H, 64, generator=g).bfloat16()
    return q_lat, q_pe, cache, table, torch.tensor(lens, dtype=torch.int32)


@pytest.fixture(params=md.GLUON_DESIGNS)
def design(request, monkeypatch):
    """Each Gluon kernel in turn (mla_decode.FP8_GLUON_DESIGN)."""
    monkeypatch.setattr(md, "FP8_GLUON_DESIGN", request.param)
    return request.param


@on_hopper
@needs_gluon
@pytest.mark.parametrize("S,H", [(1, 16), (2, 8)])
@pytest.mark.parametrize("page", [64, 128])
@pytest.mark.parametrize("decades", [2, 12])
def test_gpu_kernel_matches_the_reference(S, H, page, decades, design):
    """Against the float64 reference on the dequantized cache. The kernel's values are the e4m3 codes, exact in
    fp16; the query rows are scaled by a power of two into fp16 (exact for bf16 values within 2^24 of the row's
    largest); each scale tile's scores are fp16 products summed in FP32, then times the tile's scale: a score moves
    by at most about 512 x 2^-24 < 2^-14 of softmax_scale x sum |q k|, E_n, so the log-sum-exp by max E_n and the
    output (a convex combination) by 2 max E_n of the largest value. P' = P x scale / smax <= 1 is rounded to fp16
    (2^-11) and the output to bf16 (2^-9): 2^-8 + 2^-10 of the largest value in all. softmax_scale keeps the
    largest scores of order 3 (a peaked softmax, not a saturated one) whatever the scales' spread."""
    lens = [S, 63, 64, 65, 700, 2000]
    q_lat, q_pe, cache, table, seq_lens = _case(lens, S, H, page, seed=7 + S + page + decades, decades=decades)
    keys = [gather_latent(cache, sequence_slots(table[b], n, page), torch.float64)[0] for b, n in enumerate(lens)]
    q = q_lat.double().abs().reshape(len(lens), -1, 512)  # [B, S x H, c]
    spread = max(((q[b] ** 2) @ (k ** 2).T).sqrt().max().item() for b, k in enumerate(keys))
    softmax_scale = 3.0 / spread
    bound = max((2**-14 * softmax_scale * q[b] @ k.abs().T).max().item() for b, k in enumerate(keys))
    assert bound < 0.01  # (the bound means something)
    norm = max(k.abs().max().item() for k in keys)
    ref, ref_lse = mla_decode_ref(q_lat.double(), q_pe.double(), cache, table, seq_lens, softmax_scale)
    dev = torch.device("cuda")
    gpu = (q_lat.to(dev), q_pe.to(dev), LatentCacheLayer(cache.latent.to(dev), cache.rope.to(dev), cache.scale.to(dev)),
           table.to(dev), seq_lens.to(dev))
    for splits in (1, 3, 8):
        out, lse = mla_decode(*gpu, softmax_scale, num_splits=splits, fp8_gluon=True, backend="triton")
        torch.cuda.synchronize()
        out, lse = out.cpu().double(), lse.cpu().double()
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        torch.testing.assert_close(lse, ref_lse.double(), rtol=0, atol=bound + 1e-4)
        torch.testing.assert_close(out / norm, ref / norm, rtol=0, atol=2**-8 + 2**-10 + 2 * bound)


@on_hopper
@needs_gluon
def test_gpu_kernel_equals_the_triton_kernel_closely_and_replays_in_a_graph(design):
    """The same call on the Triton kernel (whole-tile FP8 read) agrees within both kernels' bounds, and a CUDA
    graph captured once replays with new lengths (the split count fixed, as the engine captures it)."""
    q_lat, q_pe, cache, table, seq_lens = _case([100, 4096, 5], 1, 16, 64, seed=3, decades=2)
    dev = torch.device("cuda")
    args = [q_lat.to(dev), q_pe.to(dev), LatentCacheLayer(cache.latent.to(dev), cache.rope.to(dev),
                                                           cache.scale.to(dev)), table.to(dev), seq_lens.to(dev)]
    triton_out, _ = mla_decode(*args, 0.07, max_seq_len=4096, fp8_gluon=False, backend="triton")
    out, _ = mla_decode(*args, 0.07, max_seq_len=4096, fp8_gluon=True, backend="triton")
    norm = triton_out.float().abs().max()
    assert ((out.float() - triton_out.float()).abs().max() / norm).item() < 2**-7
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed, _ = mla_decode(*args, 0.07, max_seq_len=4096, fp8_gluon=True, backend="triton")
    args[4].copy_(torch.tensor([64, 1000, 3], dtype=torch.int32))  # (within the keys _case wrote: NaN past them)
    graph.replay()
    again, _ = mla_decode(*args, 0.07, max_seq_len=4096, fp8_gluon=True, backend="triton")
    torch.testing.assert_close(graphed, again, rtol=0, atol=0)


def test_a_gluon_compile_failure_falls_back_unless_asked_for(monkeypatch):
    """Gluon is Triton's experimental API: where the kernel fails to compile the Triton kernel takes over (a warning,
    FP8_GLUON off) unless fp8_gluon=True asked for it, which gets the error."""
    from coscale.kernels import mla_decode as md

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(md._gluon_kernels(), "launch_mla_decode_fp8_gluon", broken)  # the default design's
    monkeypatch.setattr(md, "FP8_GLUON", True)
    cache = LatentCacheLayer(torch.zeros(1, 64, 512), torch.zeros(1, 64, 64), torch.ones(1, 64, 4))
    with pytest.raises(RuntimeError, match="PassManager"):
        md._launch_gluon(True, None, None, cache, None, None, None, None)
    assert md.FP8_GLUON
    with pytest.warns(RuntimeWarning, match="Triton kernel runs from now on"):
        assert md._launch_gluon(None, None, None, cache, None, None, None, None) is False
    assert not md.FP8_GLUON


def test_an_unknown_gluon_design_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(md, "FP8_GLUON_DESIGN", "fast")
    with pytest.raises(CoscaleError, match="FP8_GLUON_DESIGN must be one of"):
        md._gluon_kernels()


@needs_gluon
@pytest.mark.parametrize("module", [gkr, gk])
def test_the_launch_passes_every_kernel_argument_by_its_place(module, monkeypatch):
    """The launch glue (_mla_decode_gluon_common.launch), checked on the CPU against the kernel's own signature: the
    positional arguments are the kernel's non-constexpr parameters in order (strides of the right tensors), the
    keywords its constexprs, on grid (head groups, splits, sequences)."""
    kernel = module._build()
    seen = {}

    class Recorder:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.update(grid=grid, args=args, kwargs=kwargs)
            return run

    monkeypatch.setattr(module, "_build", lambda: Recorder())
    monkeypatch.setattr(module, "_descriptors", lambda *t: ("lat", "rope", "sc"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    B, S, H, splits = 3, 2, 8, 5
    q_lat, q_pe = torch.zeros(B, S, H, 512), torch.zeros(B, S, H, 64)
    table, lens = torch.zeros(B, 7, dtype=torch.int32), torch.zeros(B, dtype=torch.int32)
    o, lse = torch.zeros(B, S, H, splits, 512), torch.zeros(B, S, H, splits)
    latent = torch.zeros(4, 64, 512)
    module.launch_mla_decode_fp8_gluon(q_lat, q_pe, latent, None, None, table, lens, o, lse, heads_tile=8, rows=16,
                                       num_splits=splits, sm_scale_log2=0.5)
    names = [n for n, p in zip(kernel.arg_names, kernel.params) if not p.is_constexpr]
    got = dict(zip(names, seen["args"]))
    assert len(seen["args"]) == len(names) and set(seen["kwargs"]) >= {n for n in kernel.arg_names if n not in names}
    assert seen["grid"] == (1, splits, B) and got["H"] == H and got["num_splits"] == splits
    assert (got["stride_qs"], got["stride_ph"], got["stride_table"]) == (q_lat.stride(1), q_pe.stride(2), 7)
    assert (got["stride_osplit"], got["stride_lh"], got["sm_scale_log2"]) == (512, splits, 0.5)
    assert got["q_ptr"] is q_lat and got["out_ptr"] is o and got["lse_ptr"] is lse and got["lat_desc"] == "lat"
    assert seen["kwargs"]["S_Q"] == S and seen["kwargs"]["HEADS_TILE"] == 8 and seen["kwargs"]["PAGE"] == 64
