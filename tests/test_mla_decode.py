"""MLA decode over the paged latent cache: the Triton kernel (interpreted) against the PyTorch reference,
the reference against the model's naive attention, and the FP8 cache format."""

import math

import pytest
import torch

from coscale.config import get_preset
from coscale.errors import CoscaleError
from coscale.kernels.mla_decode import (
    FP8_MAX,
    MIN_TOKENS_PER_SPLIT,
    PROGRAM_COST_KEYS,
    LatentCacheLayer,
    default_num_splits,
    dequantize_latent_fp8,
    gather_latent,
    heads_per_tile,
    mla_decode,
    mla_decode_ref,
    quantize_latent_fp8,
    sequence_slots,
    write_latent,
)
from coscale.model.mla import MLA, PagedAttentionMetadata
from coscale.model.rope import RotaryEmbedding


def make_cache(num_blocks, block_size, c, dr, fp8=False, dtype=torch.float32, generator=None):
    latent = torch.randn(num_blocks, block_size, c, generator=generator).to(dtype)
    rope = torch.randn(num_blocks, block_size, dr, generator=generator).to(dtype)
    if not fp8:
        return LatentCacheLayer(latent, rope)
    q, scale = quantize_latent_fp8(latent.view(-1, c))
    return LatentCacheLayer(q.view(num_blocks, block_size, c), rope, scale.view(num_blocks, block_size, -1))


def make_inputs(seq_lens, S, H, c, dr, block_size, fp8=False, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // block_size) for n in seq_lens)
    num_blocks = len(seq_lens) * width + 1
    cache = make_cache(num_blocks, block_size, c, dr, fp8, dtype, g)
    # blocks scattered over the cache in random order: the kernel must follow the table
    table = (torch.randperm(num_blocks - 1, generator=g)[: len(seq_lens) * width] + 1).view(len(seq_lens), width)
    q_lat = torch.randn(len(seq_lens), S, H, c, generator=g).to(dtype)
    q_pe = torch.randn(len(seq_lens), S, H, dr, generator=g).to(dtype)
    return q_lat, q_pe, cache, table.int(), torch.tensor(seq_lens, dtype=torch.int32)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("S,splits", [(1, 1), (1, 3), (3, 2), (2, None)])
def test_kernel_matches_reference(fp8, S, splits):
    q_lat, q_pe, cache, table, lens = make_inputs([S, 16, 37, 70], S, H=4, c=64, dr=16, block_size=16, fp8=fp8)
    out, lse = mla_decode(q_lat, q_pe, cache, table, lens, 0.125, num_splits=splits, backend="triton")
    ref, ref_lse = mla_decode_ref(q_lat, q_pe, cache, table, lens, 0.125)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [8, 32])
def test_kernel_with_two_head_groups_and_other_page_sizes(block_size):
    """20 heads in tiles of 8 (three groups, the last ragged); pages smaller than the key block."""
    q_lat, q_pe, cache, table, lens = make_inputs([5, 41], 1, H=20, c=32, dr=8, block_size=block_size, seed=1)
    out, lse = mla_decode(q_lat, q_pe, cache, table, lens, 0.3, num_splits=2, heads_tile=8, backend="triton")
    ref, ref_lse = mla_decode_ref(q_lat, q_pe, cache, table, lens, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_kernel_fp8_with_several_scale_tiles_and_a_ragged_last_one():
    """c = 320: three 128-wide scale tiles, the last one 64 wide (the kernel pads c to 512)."""
    q_lat, q_pe, cache, table, lens = make_inputs([7, 40], 2, H=2, c=320, dr=16, block_size=16, fp8=True, seed=4)
    cache.scale.mul_(torch.rand(cache.scale.shape, generator=torch.Generator().manual_seed(5)) + 0.5)
    out, lse = mla_decode(q_lat, q_pe, cache, table, lens, 0.05, num_splits=2, backend="triton")
    ref, ref_lse = mla_decode_ref(q_lat, q_pe, cache, table, lens, 0.05)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_kernel_bf16_inputs():
    q_lat, q_pe, cache, table, lens = make_inputs([9, 33], 2, H=4, c=64, dr=16, block_size=16, seed=2,
                                                  dtype=torch.bfloat16)
    out, _ = mla_decode(q_lat, q_pe, cache, table, lens, 0.1, num_splits=2, backend="triton")
    ref, _ = mla_decode_ref(q_lat, q_pe, cache, table, lens, 0.1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)  # bf16 output rounding


@pytest.mark.parametrize("lazy,whole", [(0, False), (1, False), (0, True)], ids=["tiles", "lazy", "whole"])
@pytest.mark.parametrize("case", ["plain", "huge_queries", "tiny_queries", "scales_over_16_decades", "tiny_scales"])
def test_kernel_fp8_cache_with_bf16_queries_reads_the_latent_in_fp16(case, lazy, whole):
    """bf16 queries over an FP8 cache take the fp16 path (queries scaled into fp16's range by a power of two
    per row, P times the scales kept <= 1): against the float64 reference at bf16's rounding, including
    queries far outside fp16's range (1e8, 1e-9) and per-token scales spread over 16 decades or all tiny.
    Per scale tile, lazily rescaled, or whole (the log-sum-exp then also within its fp16 rounding bound:
    whole_tile_score_bound)."""
    g = torch.Generator().manual_seed(11)
    q_lat, q_pe, cache, table, lens = make_inputs([3, 45, 70], 1, H=4, c=256, dr=16, block_size=16, fp8=True,
                                                  seed=12)
    q_lat = q_lat * 0.05
    if case == "huge_queries":  # q . k would overflow fp16 without the row scaling
        q_lat = q_lat * 1e8
        q_pe = q_pe * 1e8
    elif case == "tiny_queries":  # every query value below fp16's smallest subnormal
        q_lat = q_lat * 1e-9
        q_pe = q_pe * 1e-9
    elif case == "scales_over_16_decades":  # P * scale past fp16's range without the running maximum
        cache.scale.mul_(10 ** (torch.rand(cache.scale.shape, generator=g) * 16 - 8))
    elif case == "tiny_scales":  # P * scale below fp16's smallest subnormal without it
        cache.scale.mul_(1e-7)
    q_lat, q_pe = q_lat.bfloat16(), q_pe.bfloat16()
    scale = {"huge_queries": 1e-9, "tiny_queries": 1e8}.get(case, 0.1)  # scores of order one
    cfg = dict(BLOCK_N=16, SWAP=0, LAZY=lazy, num_warps=4, num_stages=2)
    out, lse = mla_decode(q_lat, q_pe, cache, table, lens, scale, num_splits=2, kernel_config=cfg,
                          fp8_whole_tile=whole, backend="triton")
    ref, ref_lse = mla_decode_ref(q_lat.double(), q_pe.double(), cache, table, lens, scale)
    # per row, relative to the row's largest output (values are convex combinations of the latents)
    norm = ref.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close((out.double() / norm), (ref / norm), rtol=0, atol=2e-2)
    bound = whole_tile_score_bound(q_lat, cache, table, lens, 16, scale) if whole else 0.0
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-3, atol=1e-3 + bound)


def whole_tile_score_bound(q_lat, cache, table, lens, block_size, softmax_scale) -> float:
    """How far the whole-tile FP8 read may move a score (so the log-sum-exp): each latent value times its
    relative scale is rounded to fp16 twice (2^-10), so key n's score by 2^-10 x softmax_scale x
    sum_c |q_c k_nc| (k dequantized)."""
    keys = [gather_latent(cache, sequence_slots(table[b], int(n), block_size), torch.float64)[0]
            for b, n in enumerate(lens.tolist())]
    q = q_lat.double().abs()[:, 0]  # [B, H, c]
    return max((2**-10 * softmax_scale * q[b] @ k.abs().T).max().item() for b, k in enumerate(keys))


@pytest.mark.parametrize("case", ["zeros", "huge"])
def test_kernel_edge_values(case):
    q_lat, q_pe, cache, table, lens = make_inputs([20, 50], 1, H=4, c=32, dr=16, block_size=16, seed=3)
    if case == "zeros":  # uniform attention: the mean of the visible latents
        q_lat.zero_()
        q_pe.zero_()
    else:  # saturated softmax: one key takes everything
        q_lat.mul_(1e3)
    out, lse = mla_decode(q_lat, q_pe, cache, table, lens, 0.125, num_splits=3, backend="triton")
    ref, ref_lse = mla_decode_ref(q_lat, q_pe, cache, table, lens, 0.125)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-2 if case == "huge" else 1e-5)
    if case == "zeros":
        slots = sequence_slots(table[0], 20, 16)
        mean = cache.latent.view(-1, 32)[slots].mean(0)
        torch.testing.assert_close(out[0, 0, 0], mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse[0, 0], torch.full((4,), math.log(20)), rtol=1e-5, atol=1e-5)


def test_reference_equals_model_naive_attention():
    """Absorbed attention over a paged cache (the decode path) equals MLA's naive causal attention for
    the last S tokens of a sequence, through the kernel as the model calls it."""
    torch.manual_seed(0)
    cfg = get_preset("tiny", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                     num_attention_heads=4, hidden_size=64, q_lora_rank=None)
    mla = MLA(cfg, 0).eval()
    rotary = RotaryEmbedding(cfg)
    T, S, bs = 29, 3, 8
    x = torch.randn(1, T, cfg.hidden_size)
    with torch.no_grad():
        cos, sin = rotary(0, T)
        naive = mla(x, cos, sin)[0, T - S:]
        q_nope, q_pe, c_kv, k_pe = mla._project(x, cos, sin)
        cache = make_cache(8, bs, cfg.kv_lora_rank, cfg.qk_rope_head_dim)
        table = torch.tensor([[5, 2, 7, 1]], dtype=torch.int32)
        write_latent(cache, sequence_slots(table[0], T, bs), c_kv[0], k_pe[0])
        meta = PagedAttentionMetadata(cache=None, slots=torch.empty(0), num_decode_tokens=S, decode_len=S,
                                      block_table=table, seq_lens=torch.tensor([T], dtype=torch.int32),
                                      max_seq_len=T, kernel_backend="triton")
        o = mla._decode_paged(q_nope[0, T - S:], q_pe[0, T - S:], cache, meta)
        paged = mla.o_proj(o.flatten(1))
    torch.testing.assert_close(paged, naive, rtol=1e-4, atol=1e-5)


def test_fp8_format_round_trip_and_edge_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 320, generator=g) * torch.logspace(-3, 3, 6)[:, None]
    x[2, 128:256] = 0  # an all-zero tile
    q, scale = quantize_latent_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 3)
    assert (scale[2, 1] == 1).item()
    back = dequantize_latent_fp8(q, scale)
    tiles = torch.nn.functional.pad(x, (0, 64)).view(6, 3, 128).abs().amax(-1)
    bound = tiles.repeat_interleave(128, dim=1)[:, :320] * 2**-4  # e4m3: 3 mantissa bits, half-ulp 2^-4
    assert ((back - x).abs() <= bound + 1e-30).all()
    bad = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1.0]])
    q, scale = quantize_latent_fp8(bad)
    assert torch.isfinite(scale).all()
    assert dequantize_latent_fp8(q, scale)[0, 1].item() == pytest.approx(FP8_MAX * scale[0, 0].item())


def test_heuristics_and_errors():
    assert heads_per_tile(16, 1) == 16 and heads_per_tile(128, 1) == 64 and heads_per_tile(128, 2) == 32
    cpu = torch.device("cpu")
    assert default_num_splits(128, 1, 32768, cpu) == 1
    assert default_num_splits(1, 1, 32768, cpu) == 8  # one program an SM (8 on a CPU), 4K keys each
    assert default_num_splits(1, 1, 100, cpu) == 2  # 64 keys a split at least
    # 132 SMs (the H200): whole waves. Batch 64 at 32K: 2 splits (one wave), never 5 (three waves, the last
    # 56 programs; run 30: 714 us against 603); batch 128: one split; batch 1: 64 splits (one wave, the cap)
    h200 = dict(device=cpu, sms=132)
    assert default_num_splits(64, 1, 32768, **h200) == 2 and default_num_splits(64, 1, 4096, **h200) == 2
    assert default_num_splits(128, 1, 32768, **h200) == 1 and default_num_splits(256, 1, 4096, **h200) == 1
    assert default_num_splits(1, 1, 32768, **h200) == 64 and default_num_splits(1, 1, 656, **h200) == 11
    assert default_num_splits(16, 1, 4096, **h200) == 8  # 128 programs of 512 keys
    # more keys a split: fewer SMs on a short context at batch 1 (3 splits of 219 keys), the rest unchanged
    assert default_num_splits(1, 1, 656, min_tokens_per_split=256, **h200) == 3
    assert default_num_splits(64, 1, 4096, min_tokens_per_split=256, **h200) == 2
    assert default_num_splits(32, 2, 8192, **h200) == 2  # V3's 128 heads: two groups a sequence
    # an FP8 cache: two programs an SM (run 32: 4 / 4 / 2 / 2 splits 1.04-1.06x faster than 2 / 2 / 1 / 1)
    fp8 = dict(h200, programs_per_sm=2)
    assert [default_num_splits(b, 1, t, **fp8) for b, t in [(64, 4096), (64, 32768), (128, 4096), (128, 32768)]] == [
        4, 4, 2, 2]
    assert default_num_splits(1, 1, 32768, **fp8) == 64 and default_num_splits(256, 1, 4096, **fp8) == 1
    for B, T in [(3, 5000), (50, 20000), (100, 9000), (7, 300)]:  # no count finishes sooner
        s = default_num_splits(B, 1, T, **h200)
        most = min(64, -(-T // MIN_TOKENS_PER_SPLIT))
        finish = [-(-B * k // 132) * (-(-T // k) + PROGRAM_COST_KEYS) for k in range(1, most + 1)]
        assert finish[s - 1] == min(finish)
    q_lat, q_pe, cache, table, lens = make_inputs([4], 1, H=2, c=32, dr=16, block_size=16)
    with pytest.raises(CoscaleError, match="do not match the cache"):
        mla_decode(q_lat[..., :16], q_pe, cache, table, lens, 1.0)
    with pytest.raises(CoscaleError, match="block_table"):
        mla_decode(q_lat, q_pe, cache, table[0], lens, 1.0)
    with pytest.raises(CoscaleError, match="scales"):
        mla_decode(q_lat, q_pe, LatentCacheLayer(cache.latent, cache.rope, cache.rope), table, lens, 1.0)


# Every orientation and key-block size the GPU autotuner may pick, run here with a fixed configuration.
CONFIGS = [dict(BLOCK_N=n, SWAP=sw, LAZY=lazy, num_warps=4, num_stages=2)
           for n, sw, lazy in [(16, 0, 0), (32, 1, 0), (16, 1, 0), (64, 0, 0), (16, 0, 1), (32, 1, 1)]]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"n{c['BLOCK_N']}s{c['SWAP']}l{c['LAZY']}")
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("block_size", [8, 64])
def test_kernel_configurations(cfg, fp8, block_size):
    """Pages smaller than the key block (per-token block ids) and larger (one id per tile), lengths that
    are not multiples of the page or the key block, MTP's 2 query tokens."""
    q_lat, q_pe, cache, table, lens = make_inputs([2, 63, 65, 130], 2, H=4, c=64, dr=16, block_size=block_size,
                                                  fp8=fp8, seed=6)
    out, lse = mla_decode(q_lat, q_pe, cache, table, lens, 0.125, num_splits=2, kernel_config=cfg, backend="triton")
    ref, ref_lse = mla_decode_ref(q_lat, q_pe, cache, table, lens, 0.125)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("swap", [0, 1])
def test_kernel_fp8_scale_folding_four_tiles(swap):
    """c = 512 (DeepSeek's): four 128-column scale tiles, each folded into its scores and its P, with
    scales spread over three orders of magnitude so that a tile paired with the wrong scale shows."""
    q_lat, q_pe, cache, table, lens = make_inputs([1, 37], 1, H=2, c=512, dr=16, block_size=16, fp8=True, seed=7)
    g = torch.Generator().manual_seed(8)
    cache.scale.mul_(torch.logspace(-1.5, 1.5, 4)[torch.randperm(4, generator=g)])
    cfg = dict(BLOCK_N=16, SWAP=swap, num_warps=4, num_stages=2)
    out, lse = mla_decode(q_lat, q_pe, cache, table, lens, 0.02, num_splits=2, kernel_config=cfg, backend="triton")
    ref, ref_lse = mla_decode_ref(q_lat, q_pe, cache, table, lens, 0.02)
    # values reach ~100 (scales up to 30): FP32 summation-order error is relative to the largest output
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [dict(BLOCK_N=16, SWAP=0), dict(BLOCK_N=32, SWAP=1)], ids=["n16rows", "n32keys"])
@pytest.mark.parametrize("c,block_size,decades", [(512, 16, 3), (256, 8, 16), (512, 64, 16)])
def test_fp8_whole_tile_folds_each_scale_tile_into_the_latent(dtype, cfg, c, block_size, decades):
    check_fp8_whole_tile(dtype, cfg, c, block_size, decades, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a compiled kernel on a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", [dict(BLOCK_N=32, SWAP=0, num_stages=3), dict(BLOCK_N=64, SWAP=1, num_stages=2)],
                         ids=["n32rows", "n64keys"])
@pytest.mark.parametrize("c,block_size,decades", [(512, 64, 3), (256, 16, 16), (512, 64, 16)])
def test_gpu_fp8_whole_tile_folds_each_scale_tile_into_the_latent(dtype, cfg, c, block_size, decades):
    check_fp8_whole_tile(dtype, cfg, c, block_size, decades, "cuda")


def check_fp8_whole_tile(dtype, cfg, c, block_size, decades, device):
    """fp8_whole_tile: one product of each kind over all c columns, each key's per-tile scales relative to
    the largest so far multiplied into the latent. FP32 queries: the per-tile path's accuracy. BF16 queries (the
    latent in fp16): each latent value times its relative scale is rounded to fp16 (two roundings: 2^-10), so
    key n's score may move by E_n = 2^-10 x softmax_scale x sum_c |q_c k_nc|, the log-sum-exp by max E_n, and
    the output (a convex combination) by 2 max E_n of the largest latent value, plus 2^-10 of it for the
    values and 2^-8 for the bf16 output and fp16 P. Scales spread over `decades` (16: relative scales below
    fp16's range, whose keys then add nothing to the products)."""
    q_lat, q_pe, cache, table, lens = make_inputs([2, 1, 63, 97], 1, H=4, c=c, dr=16, block_size=block_size,
                                                  fp8=True, seed=41, dtype=dtype)
    g = torch.Generator().manual_seed(42)
    cache.scale.mul_(10 ** (torch.rand(cache.scale.shape, generator=g) * decades - decades / 2))
    keys = [gather_latent(cache, sequence_slots(table[b], int(n), block_size), torch.float64)[0]
            for b, n in enumerate(lens.tolist())]
    q = q_lat.double().abs()[:, 0]  # [B, H, c]
    spread = max(((q[b] ** 2) @ (k ** 2).T).sqrt().max().item() for b, k in enumerate(keys))
    softmax_scale = 3.0 / spread  # the largest keys' scores of order 3: a peaked softmax, not a saturated one
    bound = whole_tile_score_bound(q_lat, cache, table, lens, block_size, softmax_scale)
    norm = max(k.abs().max().item() for k in keys)
    config = dict(num_warps=4, num_stages=2) | cfg
    ref, ref_lse = mla_decode_ref(q_lat.double(), q_pe.double(), cache, table, lens, softmax_scale)
    if device != "cpu":
        q_lat, q_pe, table, lens = q_lat.to(device), q_pe.to(device), table.to(device), lens.to(device)
        cache = LatentCacheLayer(cache.latent.to(device), cache.rope.to(device), cache.scale.to(device))
    for splits in (1, 3):
        out, lse = mla_decode(q_lat, q_pe, cache, table, lens, softmax_scale, num_splits=splits, kernel_config=config,
                              fp8_whole_tile=True, backend="triton")
        out, lse = out.cpu(), lse.cpu()
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * norm)
            torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5, atol=1e-5)
        else:
            assert bound < 0.1  # (the bound means something)
            torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=0, atol=bound + 1e-4)
            torch.testing.assert_close(out.double() / norm, ref / norm, rtol=0, atol=2**-8 + 2**-10 + 2 * bound)


def test_fp8_whole_tile_is_refused_where_it_does_not_apply():
    """A latent width that is not 128, 256 or 512, or lazy rescaling: the per-tile path (same result)."""
    q_lat, q_pe, cache, table, lens = make_inputs([5, 40], 1, H=2, c=384, dr=16, block_size=16, fp8=True, seed=5)
    ref, _ = mla_decode_ref(q_lat, q_pe, cache, table, lens, 0.1)
    out, _ = mla_decode(q_lat, q_pe, cache, table, lens, 0.1, fp8_whole_tile=True, backend="triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    q_lat, q_pe, cache, table, lens = make_inputs([5, 40], 1, H=2, c=256, dr=16, block_size=16, fp8=True, seed=5)
    ref, _ = mla_decode_ref(q_lat, q_pe, cache, table, lens, 0.1)
    lazy = dict(BLOCK_N=16, SWAP=0, LAZY=1, num_warps=4, num_stages=2)
    out, _ = mla_decode(q_lat, q_pe, cache, table, lens, 0.1, kernel_config=lazy, fp8_whole_tile=True, backend="triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("cfg", [dict(BLOCK_N=16, SWAP=0), dict(BLOCK_N=32, SWAP=1), dict(BLOCK_N=16, SWAP=1, LAZY=1)],
                         ids=["n16rows", "n32keys", "n16keys-lazy"])
@pytest.mark.parametrize("block_size", [8, 16, 64])
def test_fp8_tiles_read_each_key_with_its_own_scales_across_pages(cfg, block_size):
    """An FP8 cache with pages smaller than the key block (block ids a key), equal to it and larger, lengths
    ending mid-tile and mid-page, sequences of one key, empty splits, four scale tiles spread over three decades
    (a tile paired with its neighbour's scales or block shows)."""
    q_lat, q_pe, cache, table, lens = make_inputs([2, 1, 63, 97], 1, H=2, c=512, dr=16, block_size=block_size,
                                                  fp8=True, seed=31)
    g = torch.Generator().manual_seed(32)
    cache.scale.mul_(torch.logspace(-1.5, 1.5, 4)[torch.randperm(4, generator=g)])
    cache.scale.mul_(torch.rand(cache.scale.shape[:2] + (1,), generator=g) + 0.5)  # and per token
    config = dict(num_warps=4, num_stages=2, **cfg)
    ref, ref_lse = mla_decode_ref(q_lat, q_pe, cache, table, lens, 0.02)
    for splits in (1, 3, 8):  # 8 splits of 97 keys: some splits have no key
        out, lse = mla_decode(q_lat, q_pe, cache, table, lens, 0.02, num_splits=splits, kernel_config=config,
                              backend="triton")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_prune_keeps_eight_warps_for_64_row_tiles():
    """The autotuner's pruning: 64-row tiles (DeepSeek-V3's 128 heads) keep only 8-warp candidates (an [M, 512]
    FP32 accumulator over 4 warps spills); 16-row tiles keep every candidate, both orientations."""
    from coscale.kernels._mla_decode_triton import _configs, _prune

    gpu = _configs()[0]
    assert _prune(gpu, {}, BLOCK_M=16) == gpu and {c.kwargs["SWAP"] for c in gpu} == {0, 1}
    assert all(c.num_warps >= 8 for c in _prune(gpu, {}, BLOCK_M=64)) and _prune(gpu, {}, BLOCK_M=64)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("swap", [0, 1])
def test_lazy_rescaling_with_maxima_that_keep_growing(fp8, swap):
    """LAZY=1 rescales the accumulators only when a row's running maximum grows by more than 2^8 (or, FP8,
    a scale by more than 64x): keys whose scores climb steadily along the sequence (by ~3 per 16-key tile in
    log2 units, past the threshold every few tiles) and scales that climb too take every branch."""
    q_lat, q_pe, cache, table, lens = make_inputs([5, 70, 160], 1, H=4, c=256, dr=16, block_size=16, fp8=fp8,
                                                  seed=13)
    q_pe.zero_()
    ramp = torch.linspace(0, 6, 16 * table.shape[1] * table.shape[0])  # per slot: the latents grow with position
    for b in range(table.shape[0]):
        slots = sequence_slots(table[b], int(lens[b]), 16)
        n = slots.numel()
        if fp8:
            cache.scale.view(-1, cache.scale.shape[-1])[slots] *= torch.exp(ramp[:n])[:, None]
        else:
            cache.latent.view(-1, 256)[slots] *= torch.exp(ramp[:n])[:, None]
    q_lat = q_lat.abs() * 0.5  # positive queries: the scores follow the latents' growth (14-44 in log2 units)
    if fp8:  # bf16 queries: the fp16 read, where a stale maximum 2^16 behind would overflow P
        q_lat, q_pe = q_lat.bfloat16(), q_pe.bfloat16()
    cfg = dict(BLOCK_N=16, SWAP=swap, LAZY=1, num_warps=4, num_stages=2)
    out, lse = mla_decode(q_lat, q_pe, cache, table, lens, 0.3, num_splits=2, kernel_config=cfg, backend="triton")
    ref, ref_lse = mla_decode_ref(q_lat.double(), q_pe.double(), cache, table, lens, 0.3)
    norm = ref.abs().amax(dim=-1, keepdim=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double() / norm, ref / norm, rtol=0, atol=2e-2 if fp8 else 1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5 if not fp8 else 1e-3, atol=1e-3)


@pytest.mark.parametrize("splits", [1, 9])
def test_kernel_batch_one_and_split_counts(splits):
    """Batch 1; one split, and more splits than key blocks (empty splits store only their lse)."""
    q_lat, q_pe, cache, table, lens = make_inputs([45], 1, H=4, c=32, dr=16, block_size=16, seed=9)
    out, lse = mla_decode(q_lat, q_pe, cache, table, lens, 0.1, num_splits=splits, backend="triton")
    ref, ref_lse = mla_decode_ref(q_lat, q_pe, cache, table, lens, 0.1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


class _NaNEmpty:
    """torch for coscale.kernels.mla_decode, with ``empty`` filled with NaN: buffers a kernel leaves unwritten
    are poisoned."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*size, **kwargs):
        return torch.full(size, float("nan"), **kwargs)


def test_combine_over_many_splits_ragged_columns_and_empty_splits(monkeypatch):
    """64 splits (one [64, 128] load a program, so c=300 takes three column blocks, the last ragged), a short
    sequence whose splits past its keys stay unwritten: NaN there must not reach the output."""
    _check_many_splits(monkeypatch, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a compiled kernel on a GPU")
def test_gpu_combine_over_many_splits_ragged_columns_and_empty_splits(monkeypatch):
    _check_many_splits(monkeypatch, "cuda")


def _check_many_splits(monkeypatch, device):
    import coscale.kernels.mla_decode as md

    monkeypatch.setattr(md, "torch", _NaNEmpty())
    q_lat, q_pe, cache, table, lens = make_inputs([45, 700], 1, H=2, c=300, dr=16, block_size=16, seed=4)
    cache = LatentCacheLayer(cache.latent.to(device), cache.rope.to(device))
    q_lat, q_pe, table, lens = q_lat.to(device), q_pe.to(device), table.to(device), lens.to(device)
    out, lse = mla_decode(q_lat, q_pe, cache, table, lens, 0.1, num_splits=64, backend="triton")
    ref, ref_lse = mla_decode_ref(q_lat.double(), q_pe.double(), cache, table, lens, 0.1)
    tol = 1e-5 if device == "cpu" else 1e-4  # fp32 queries: IEEE fp32 products on either (sums in another order)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("swap", [0, 1])
def test_kernel_128_heads(swap):
    """DeepSeek-V3's 128 heads: two 64-row tiles per sequence, both orientations."""
    q_lat, q_pe, cache, table, lens = make_inputs([3, 20], 1, H=128, c=16, dr=16, block_size=16, seed=10)
    assert heads_per_tile(128, 1) == 64
    cfg = dict(BLOCK_N=16, SWAP=swap, num_warps=8, num_stages=2)
    out, lse = mla_decode(q_lat, q_pe, cache, table, lens, 0.2, num_splits=2, kernel_config=cfg, backend="triton")
    ref, ref_lse = mla_decode_ref(q_lat, q_pe, cache, table, lens, 0.2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_kernel_config_and_fp8_width_errors():
    q_lat, q_pe, cache, table, lens = make_inputs([4], 1, H=2, c=32, dr=16, block_size=16)
    with pytest.raises(CoscaleError, match="needs the keys"):
        mla_decode(q_lat, q_pe, cache, table, lens, 1.0, kernel_config={"BLOCK_N": 16}, backend="triton")
    bad = dict(BLOCK_N=24, SWAP=0, num_warps=4, num_stages=2)
    with pytest.raises(CoscaleError, match="power of two"):
        mla_decode(q_lat, q_pe, cache, table, lens, 1.0, kernel_config=bad, backend="triton")
    with pytest.raises(CoscaleError, match="LAZY 0 or 1"):
        mla_decode(q_lat, q_pe, cache, table, lens, 1.0, kernel_config={**bad, "BLOCK_N": 16, "LAZY": 2},
                   backend="triton")
    q_lat, q_pe, cache, table, lens = make_inputs([4], 1, H=1, c=640, dr=16, block_size=16, fp8=True)
    with pytest.raises(CoscaleError, match="at most 512"):
        mla_decode(q_lat, q_pe, cache, table, lens, 1.0, backend="triton")


def test_calibration_case_is_what_calibrate_times_with_the_triton_backend():
    from coscale.calibrate import attention_backend
    from coscale.kernels.mla_decode import calibration_case

    assert attention_backend("triton") is calibration_case
    o_lat, lse = calibration_case(2, 1, 4, 100, 32, 8, "cpu", block_size=16)()
    assert o_lat.shape == (2, 1, 4, 32) and lse.shape == (2, 1, 4)
    assert torch.isfinite(o_lat.float()).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("fp8", [False, True])
def test_the_mla_decode_operator_passes_opcheck_and_equals_the_function(fp8):
    from coscale.kernels.mla_decode import mla_decode_op, paged_mla_decode

    gen = torch.Generator().manual_seed(3)
    B, S, H, c, dr, page, blocks = 2, 1, 4, 128, 16, 8, 6
    latent = torch.randn(blocks, page, c, generator=gen)
    rope = torch.randn(blocks, page, dr, generator=gen)
    scale = None
    if fp8:
        q8, s8 = quantize_latent_fp8(latent.view(-1, c))
        latent, scale = q8.view(blocks, page, c), s8.view(blocks, page, -1)
    table = torch.tensor([[0, 2, 4], [1, 3, 5]], dtype=torch.int32)
    lens = torch.tensor([19, 7], dtype=torch.int32)
    q_lat, q_pe = torch.randn(B, S, H, c, generator=gen), torch.randn(B, S, H, dr, generator=gen)
    args = (q_lat, q_pe, latent, rope, scale, table, lens, 0.1, 24, "torch")
    # The schema check compares inputs by arithmetic that CPU float8 tensors do not implement
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(mla_decode_op, args, test_utils=utils if fp8 else ("test_schema", *utils))
    o, lse = paged_mla_decode(q_lat, q_pe, LatentCacheLayer(latent, rope, scale), table, lens, 0.1, 24, "torch")
    ref_o, ref_lse = mla_decode_ref(q_lat, q_pe, LatentCacheLayer(latent, rope, scale), table, lens, 0.1)
    torch.testing.assert_close(o, ref_o, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cast before shared memory is GPU code (inline asm)")
def test_gpu_fp8_convert_early_gives_what_the_plain_cast_gives():
    """fp8_convert_early changes where the e4m3 -> fp16 cast happens, not its arithmetic: the output is the
    plain cast's but for rare last-bit differences (10 of 32,768 values one bf16 unit apart on the H200, run
    25, and 77 in run 36 with the four-value cast: the compiler schedules the FP32 arithmetic around the
    products differently; a wrong byte order would change most values) and the reference's at bf16's
    rounding."""
    q_lat, q_pe, cache, table, lens = make_inputs([1, 300, 1025, 4096], 1, H=16, c=512, dr=64, block_size=64,
                                                  fp8=True, seed=21, dtype=torch.bfloat16)
    q, qp, gpu_table, gpu_lens = q_lat.cuda(), q_pe.cuda(), table.cuda(), lens.cuda()
    gpu_cache = LatentCacheLayer(cache.latent.cuda(), cache.rope.cuda(), cache.scale.cuda())
    config = {"BLOCK_N": 32, "SWAP": 0, "num_warps": 4, "num_stages": 3}
    plain, _ = mla_decode(q, qp, gpu_cache, gpu_table, gpu_lens, 0.07, num_splits=2, kernel_config=config,
                          fp8_convert_early=False, backend="triton")
    early, _ = mla_decode(q, qp, gpu_cache, gpu_table, gpu_lens, 0.07, num_splits=2, kernel_config=config,
                          fp8_convert_early=True, backend="triton")
    assert (early != plain).float().mean().item() < 1e-2
    torch.testing.assert_close(early, plain, rtol=2**-7, atol=2e-3)
    ref, _ = mla_decode_ref(q.float(), qp.float(), gpu_cache, gpu_table, gpu_lens, 0.07)
    torch.testing.assert_close(early.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a compiled kernel on a GPU")
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_lazy_rescaling_matches_the_reference(fp8):
    """LAZY=1 (not among the autotuner's candidates until measured) against the reference on the GPU."""
    q_lat, q_pe, cache, table, lens = make_inputs([1, 300, 1025, 4096], 1, H=16, c=512, dr=64, block_size=64,
                                                  fp8=fp8, seed=22, dtype=torch.bfloat16)
    q, qp, gpu_table, gpu_lens = q_lat.cuda(), q_pe.cuda(), table.cuda(), lens.cuda()
    gpu_cache = LatentCacheLayer(cache.latent.cuda(), cache.rope.cuda(), None if cache.scale is None else
                                 cache.scale.cuda())
    ref, ref_lse = mla_decode_ref(q.float(), qp.float(), gpu_cache, gpu_table, gpu_lens, 0.07)
    for cfg in ({"BLOCK_N": 32, "SWAP": 0, "num_warps": 4, "num_stages": 4},
                {"BLOCK_N": 64, "SWAP": 1, "num_warps": 4, "num_stages": 2}):
        out, lse = mla_decode(q, qp, gpu_cache, gpu_table, gpu_lens, 0.07, num_splits=2,
                              kernel_config={**cfg, "LAZY": 1}, backend="triton")
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)


def test_the_compiled_cache_write_writes_the_cache_itself():
    """PagedLatentCache.write under torch.compile writes layer i's rows into the whole-cache tensors in
    place: the generated code allocates no buffer of a cache layer's size (a write through a view of a
    layer would: Inductor copies it), and the rows hold the new c_kv and k_pe."""
    import re

    from torch._inductor.utils import run_and_get_code

    from coscale.infer.cache import PagedLatentCache

    gen = torch.Generator().manual_seed(4)
    L, blocks, page, c, dr = 3, 5, 8, 32, 8
    latent = torch.randn(L, blocks, page, c, generator=gen)
    rope = torch.randn(L, blocks, page, dr, generator=gen)
    slots = torch.tensor([9, 0, 33, 17])
    c_kv = torch.randn(4, c, generator=gen)
    want, want_rope = latent.clone(), rope.clone()
    want[1].view(-1, c)[slots] = c_kv * 2
    want_rope[1].view(-1, dr)[slots] = torch.cos(c_kv[:, :dr])
    cache = PagedLatentCache(L, blocks - 1, page, c, dr, dtype=torch.float32)
    cache.latent.copy_(latent)
    cache.rope.copy_(rope)

    def write(x):
        cache.write(1, slots, x * 2, torch.cos(x[:, :dr]))
        return cache.layer(1).latent.sum()

    torch._dynamo.reset()
    _, code = run_and_get_code(torch.compile(write), c_kv)
    allocated = [math.prod(int(d) for d in shape.split(",") if d.strip())
                 for text in code for shape in re.findall(r"empty_strided_cpu\(\(([0-9, ]*)\)", text)]
    assert allocated and max(allocated) < blocks * page * c, allocated
    torch.testing.assert_close(cache.latent, want, rtol=0, atol=0)
    torch.testing.assert_close(cache.rope, want_rope, rtol=0, atol=2e-7)  # Inductor's cos: within an ulp
