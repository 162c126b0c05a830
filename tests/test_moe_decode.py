"""The decode-step expert kernels (coscale.kernels.moe_decode) against their reference and the float64 loop."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch
from torch.library import opcheck

from coscale.errors import CoscaleError
from coscale.kernels.backend import interpreting, triton_available
from coscale.kernels.moe_decode import (
    MOE_DECODE_MAX_TOKENS,
    MOE_DECODE_PICKS_MAX_TOKENS,
    moe_decode,
    moe_decode_op,
    moe_decode_picks_op,
    moe_decode_rows,
    moe_decode_torch,
)
from coscale.model.moe import GroupedExperts, experts_forward_loop

needs_triton = pytest.mark.skipif(not (triton_available() and interpreting()), reason="needs triton's interpreter")

# (T, K, E, H, I): one token; a full 16-token block; ragged tokens, hidden and intermediate sizes; experts
# not a multiple of the 8 of a down-projection split; two token blocks (T 70 > 64).
CASES = [(1, 2, 8, 64, 32), (16, 6, 16, 64, 48), (23, 3, 12, 48, 40), (70, 2, 9, 32, 16)]


def _problem(T, K, E, H, I, seed, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype)
    probs = 1.0 / torch.arange(1, E + 1, dtype=torch.float64)  # uneven load; some experts get no token
    idx = torch.stack([torch.multinomial(probs, K, generator=gen) for _ in range(T)])
    g = torch.rand(T, K, generator=gen)
    w_gate = (torch.randn(E, I, H, generator=gen) / H**0.5).to(dtype)
    w_up = (torch.randn(E, I, H, generator=gen) / H**0.5).to(dtype)
    w_down = (torch.randn(E, H, I, generator=gen) / I**0.5).to(dtype)
    return x, idx, g, w_gate, w_up, w_down


def _exact(x, idx, g, wg, wu, wd):
    return experts_forward_loop(x.double(), idx, g.double(), wg.double(), wu.double(), wd.double())


def _assert_matches(got, args, dtype):
    """Both round gate, up, SwiGLU and each expert's output to `dtype` at the same points; float32 sums in
    another order can move a rounding by one unit: a few units of `dtype` at the output's scale. Against the
    exact math in float64: three roundings of `dtype` away."""
    eps = torch.finfo(dtype).eps
    want = moe_decode_torch(*args)
    torch.testing.assert_close(got.float(), want, rtol=4 * eps, atol=4 * eps * want.abs().max().item())
    exact = _exact(*args).float()
    torch.testing.assert_close(got.float(), exact, rtol=8 * eps, atol=8 * eps * exact.abs().max().item())


@needs_triton
@pytest.mark.parametrize("rows", ["tokens", "picks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_the_reference(case, dtype, rows):
    args = _problem(*case, seed=sum(case), dtype=dtype)
    got = moe_decode(*args, backend="triton", rows=rows)
    assert got.dtype == dtype and got.shape == args[0].shape
    _assert_matches(got, args, dtype)


@needs_triton
@pytest.mark.parametrize("rows", ["tokens", "picks"])
def test_repeated_picks_no_tokens_and_auto_on_cpu(rows):
    x, idx, g, wg, wu, wd = _problem(6, 3, 8, 32, 16, seed=6)
    idx[2] = torch.tensor([5, 5, 1])  # a token that lists an expert twice gets both weights, as the loop gives
    args = (x, idx, g, wg, wu, wd)
    _assert_matches(moe_decode(*args, backend="triton", rows=rows), args, torch.bfloat16)
    _assert_matches(moe_decode(*args, rows=rows), args, torch.bfloat16)  # "auto" on CPU tensors: the reference
    empty = moe_decode(x[:0], idx[:0], g[:0], wg, wu, wd, backend="triton", rows=rows)
    assert empty.shape == (0, 32) and empty.dtype == torch.bfloat16


@needs_triton
@pytest.mark.parametrize("experts_per_split", [1, 3, 8, 20])
def test_any_split_of_the_down_projection_gives_the_same_sum(experts_per_split):
    # 8 experts in splits of 1 (8 partials), 3 (a ragged last split), 8 (one) and 20 (more than there are)
    args = _problem(5, 3, 8, 32, 16, seed=9)
    _assert_matches(moe_decode(*args, backend="triton", experts_per_split=experts_per_split), args, torch.bfloat16)


def test_the_default_split_is_finer_at_small_batches():
    from coscale.kernels.moe_decode import default_experts_per_split

    assert [default_experts_per_split(t) for t in (1, 4, 5, 32)] == [4, 4, 8, 8]


def test_experts_per_split_must_be_a_positive_int():
    args = _problem(2, 2, 4, 16, 16, seed=1)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(CoscaleError, match="experts_per_split"):
            moe_decode(*args, experts_per_split=bad)


@needs_triton
def test_picks_beyond_one_plan_chunk_and_the_grid_row_blocks():
    # 300 tokens x 4 picks: the plan kernel's 1,024-pick chunks twice over; expert 0 picked by every token:
    # 300 rows, more than the grid's 4 row blocks of 16 cover, so the kernels loop
    x, idx, g, wg, wu, wd = _problem(300, 4, 6, 32, 16, seed=7)
    idx[:, 0] = 0
    idx[:, 1:] = torch.stack([torch.randperm(5)[:3] + 1 for _ in range(300)])
    args = (x, idx, g, wg, wu, wd)
    _assert_matches(moe_decode(*args, backend="triton", rows="picks"), args, torch.bfloat16)


@needs_triton
@pytest.mark.parametrize("rows", ["tokens", "picks"])
def test_nan_stays_in_its_token_and_zero_inputs_give_zero(rows):
    x, idx, g, wg, wu, wd = _problem(16, 4, 8, 32, 32, seed=2)
    x[3, 5] = float("nan")
    out = moe_decode(x, idx, g, wg, wu, wd, backend="triton", rows=rows)
    assert out[3].isnan().any()
    ok = torch.ones(16, dtype=torch.bool)
    ok[3] = False
    assert out[ok].isfinite().all()  # a token's NaN never reaches the tokens that share its experts
    _assert_matches(out[ok], (x[ok], idx[ok], g[ok], wg, wu, wd), torch.bfloat16)
    zeros = moe_decode(torch.zeros_like(x), idx, g, wg, wu, wd, backend="triton", rows=rows)
    assert torch.equal(zeros, torch.zeros_like(zeros))
    no_weight = moe_decode(x, idx, torch.zeros_like(g), wg, wu, wd, backend="triton", rows=rows)
    assert torch.equal(no_weight[ok], torch.zeros_like(no_weight[ok]))


@needs_triton
def test_grouped_experts_takes_the_kernels_only_for_inference(monkeypatch):
    import coscale.kernels.moe_decode as module

    E, H, I, T, K = 8, 32, 16, 6, 2
    layer = GroupedExperts(E, H, I)
    gen = torch.Generator().manual_seed(3)
    for w in (layer.w_gate, layer.w_up, layer.w_down):
        w.data = (torch.randn(w.shape, generator=gen) * 0.2).to(torch.bfloat16)
    x, idx, g = torch.randn(T, H, generator=gen).to(torch.bfloat16), torch.randint(0, E, (T, K)), torch.rand(T, K)
    idx[:, 1] = (idx[:, 0] + 1) % E
    calls = []
    real = module.moe_decode_triton
    monkeypatch.setattr(module, "moe_decode_triton", lambda *a: calls.append(a[0].shape) or real(*a))
    layer.eval()
    layer.decode_backend = "triton"
    with torch.no_grad():
        fused = layer(x, idx, g)
        layer.decode_backend = "torch"
        general = layer(x, idx, g)
    assert calls == [(T, H)]
    torch.testing.assert_close(fused.float(), general.float(), rtol=0.02, atol=0.02)
    layer.decode_backend = "triton"
    out = layer(x, idx, g)  # gradients on: the general path, differentiable
    assert out.requires_grad and calls == [(T, H)]
    with pytest.raises(ValueError, match="decode_backend"):
        layer.decode_backend = "fast"


def test_bad_inputs_are_clear_errors():
    x, idx, g, wg, wu, wd = _problem(4, 2, 8, 32, 16, seed=4)
    with pytest.raises(CoscaleError, match="float16"):
        moe_decode(x.float(), idx, g, wg.float(), wu.float(), wd.float())
    with pytest.raises(CoscaleError, match="w_down"):
        moe_decode(x, idx, g, wg, wu, wd.transpose(1, 2))
    with pytest.raises(CoscaleError, match="topk_idx"):
        moe_decode(x, idx[:3], g, wg, wu, wd)
    with pytest.raises(CoscaleError, match="w_gate"):
        moe_decode(x[:, :16], idx, g, wg, wu, wd)
    with pytest.raises(CoscaleError, match="rows must be"):
        moe_decode(x, idx, g, wg, wu, wd, rows="experts")
    with pytest.raises(CoscaleError, match="contiguous"):  # never a copy of every expert per call
        moe_decode(x, idx, g, wg.transpose(1, 2).contiguous().transpose(1, 2), wu, wd)


def test_auto_rule():
    assert [moe_decode_rows(t) for t in (0, 1, MOE_DECODE_MAX_TOKENS)] == [None, "tokens", "tokens"]
    assert [moe_decode_rows(t) for t in (MOE_DECODE_MAX_TOKENS + 1, MOE_DECODE_PICKS_MAX_TOKENS)] == ["picks"] * 2
    assert moe_decode_rows(MOE_DECODE_PICKS_MAX_TOKENS + 1) is None


@needs_triton
@pytest.mark.parametrize("T, want", [(6, "tokens"), (MOE_DECODE_MAX_TOKENS + 8, "picks"),
                                     (MOE_DECODE_PICKS_MAX_TOKENS + 1, "picks")])
def test_grouped_experts_picks_the_row_layout(monkeypatch, T, want):
    """decode_backend "triton" takes the layout moe_decode_rows names ("picks" past its range); float32
    weights never take the kernels."""
    import coscale.kernels.moe_decode as module

    E, H, I, K = 8, 32, 16, 2
    layer = GroupedExperts(E, H, I).eval()
    gen = torch.Generator().manual_seed(T)
    for w in (layer.w_gate, layer.w_up, layer.w_down):
        w.data = torch.randn(w.shape, generator=gen) * 0.2
    x, idx, g = torch.randn(T, H, generator=gen), torch.randint(0, E, (T, K), generator=gen), torch.rand(T, K)
    idx[:, 1] = (idx[:, 0] + 1) % E
    seen = []
    for name, layout in (("moe_decode_triton", "tokens"), ("moe_decode_picks_triton", "picks")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, layout=layout: seen.append(layout) or real(*a))
    layer.decode_backend = "triton"
    with torch.no_grad():
        layer(x, idx, g)  # float32: the general path
        assert seen == []
        for w in (layer.w_gate, layer.w_up, layer.w_down):
            w.data = w.data.to(torch.bfloat16)
        got = layer(x.bfloat16(), idx, g)
    assert seen == [want]
    _assert_matches(got, (x.bfloat16(), idx, g, layer.w_gate, layer.w_up, layer.w_down), torch.bfloat16)


def test_opcheck():
    x, idx, g, wg, wu, wd = _problem(5, 2, 8, 32, 16, seed=5)
    opcheck(moe_decode_op, (x, idx, g, wg, wu, wd, "torch", 8))
    opcheck(moe_decode_op, (x, idx, g, wg, wu, wd, "torch", 3))
    opcheck(moe_decode_picks_op, (x, idx, wg, wu, wd, "torch"))


GPU_CHECK = r"""
import torch
from coscale.kernels.moe_decode import moe_decode, moe_decode_torch

def problem(T, K, E, H, I, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    g = torch.rand(T, K, generator=gen)
    w = [torch.randn(E, I, H, generator=gen) / H**0.5, torch.randn(E, I, H, generator=gen) / H**0.5,
         torch.randn(E, H, I, generator=gen) / I**0.5]
    return [t.cuda() for t in (x.bfloat16(), idx, g, *(v.bfloat16() for v in w))]

def check(got, args):
    want = moe_decode_torch(*args)
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(got.float(), want, rtol=4 * eps, atol=4 * eps * want.abs().max().item())

for rows in ("tokens", "picks"):
    for shape in ((1, 6, 64, 256, 128), (16, 6, 64, 256, 128), (96, 8, 32, 512, 256), (256, 8, 16, 128, 64)):
        args = problem(*shape, seed=sum(shape))
        check(moe_decode(*args, backend="triton", rows=rows), args)
    # a CUDA graph captured once replays with the next step's picks
    x, idx, g, wg, wu, wd = problem(24, 6, 64, 256, 128, seed=1)
    run = lambda: moe_decode(x, idx, g, wg, wu, wd, backend="triton", rows=rows)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # autotuning, outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    _, idx2, g2, *_ = problem(24, 6, 64, 256, 128, seed=2)
    idx.copy_(idx2)
    g.copy_(g2)
    graph.replay()
    torch.cuda.synchronize()
    check(out, (x, idx, g, wg, wu, wd))
print("gpu check ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernels_on_the_gpu_and_replayed_from_a_cuda_graph():
    """The kernels compiled (this process imported Triton's interpreter), both row layouts, against the
    reference, and a captured graph replayed with new picks."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", GPU_CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "gpu check ok" in done.stdout, done.stderr[-3000:]
