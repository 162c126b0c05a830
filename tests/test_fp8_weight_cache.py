"""FP8WeightCache: FP8 weight copies owned by the module holding the weights, invalidated by the owner
of the optimizer (no global hook), with the version-counter stamp as a safety net."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module decorates its kernels

import pytest
import torch
from torch import nn

from coscale.errors import CoscaleError
from coscale.fp8 import FP8Linear, FP8WeightCache, invalidate_fp8_weight_caches
from coscale.kernels import fp8_grouped_linear as grouped
from coscale.kernels.fp8_weight_cache import weight_cache_of
from coscale.kernels.moe import grouped_experts_forward
from coscale.model.moe import GroupedExperts


def offsets_of(counts):
    return torch.tensor(counts).cumsum(0).to(torch.int32)


@pytest.fixture
def quantize_calls(monkeypatch):
    """The need_t flag of every quantization of stacked expert weights (a cache miss each)."""
    calls = []
    real = grouped.quantize_stacked_weights

    def counting(ws, need_t, backend="auto"):
        calls.append(need_t)
        return real(ws, need_t, backend)

    monkeypatch.setattr(grouped, "quantize_stacked_weights", counting)
    return calls


def test_weight_cache_reuses_until_the_weights_change(quantize_calls):
    calls = quantize_calls
    torch.manual_seed(3)
    off = offsets_of([128, 128])
    x = torch.randn(256, 128)
    w = (torch.randn(2, 128, 128) * 0.1).requires_grad_()
    cache = FP8WeightCache()

    def run(weight_cache=cache):
        return grouped.fp8_grouped_linear(x, w, off, backend="torch", aligned=True, weight_cache=weight_cache)

    with torch.no_grad():
        first = run()
        assert torch.equal(run(), first) and calls == [False]  # W only, reused
    xg = x.clone().requires_grad_()
    y = grouped.fp8_grouped_linear(xg, w, off, backend="torch", aligned=True, weight_cache=cache)
    assert calls == [False, True]  # a gradient of x needs W^T: quantized again, with it
    y.sum().backward()
    with torch.no_grad():
        run()
        assert calls == [False, True]  # the entry with W^T serves the no-grad call too
        w.add_(1.0)  # an in-place update: the version counter moves, no invalidate() needed
        changed = run()
        assert calls == [False, True, False]
        assert torch.equal(changed, run(weight_cache=None))  # (an uncached call: counted too)
        assert cache.num_entries == 1
        cache.invalidate()
        assert cache.num_entries == 0
        run()
        assert calls == [False, True, False, False, False]


def test_a_new_weight_tensor_is_never_served_old_copies(quantize_calls):
    # same shape, dtype and (fresh) version as the old one: only the object identity tells them apart
    off = offsets_of([128])
    x = torch.randn(128, 128)
    cache = FP8WeightCache()
    with torch.no_grad():
        grouped.fp8_grouped_linear(x, torch.randn(1, 128, 128), off, backend="torch", weight_cache=cache)
        w = torch.randn(1, 128, 128)
        got = grouped.fp8_grouped_linear(x, w, off, backend="torch", weight_cache=cache)
        assert torch.equal(got, grouped.fp8_grouped_linear(x, w, off, backend="torch"))
    assert len(quantize_calls) == 3  # a miss for each weight, and the uncached call


@pytest.mark.parametrize("fused", [False, True])
def test_owner_invalidation_after_any_optimizer_step_leaves_no_stale_copy(fused, quantize_calls):
    """fused AdamW updates the weights without bumping their version counter; the trainer's
    invalidate_fp8_weight_caches(model) after the step is what keeps the copies fresh."""
    torch.manual_seed(4)
    model = nn.ModuleDict({"experts": _experts(), "proj": FP8Linear(128, 256, bias=False, backend="torch")})
    model.experts.fp8_weight_cache = True
    model.proj.fp8_weight_cache = True
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    x, idx, weight = _tokens()
    for _ in range(2):  # two micro-batches of one step: the second reuses the FP8 copies
        (model.experts(x, idx, weight).square().sum() + model.proj(x).square().sum()).backward()
    assert quantize_calls == [True, True]  # gate+up and down, once each
    opt.step()
    assert invalidate_fp8_weight_caches(model) == 2
    with torch.no_grad():
        after = model.experts(x, idx, weight), model.proj(x)
        model.experts.fp8_weight_cache = False
        model.proj.fp8_weight_cache = None
        fresh = model.experts(x, idx, weight), model.proj(x)
    assert torch.equal(after[0], fresh[0]) and torch.equal(after[1], fresh[1])


def test_fp8_linear_cache_is_used_between_invalidations(monkeypatch):
    from coscale.fp8 import linear

    calls = []
    real = linear.weight_quant_128x128_dual
    monkeypatch.setattr(linear, "weight_quant_128x128_dual", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(5)
    layer = FP8Linear(256, 128, backend="torch")
    layer.fp8_weight_cache = True
    x = torch.randn(64, 256, requires_grad=True)
    first = layer(x)
    first.sum().backward()
    second = layer(x)
    assert torch.equal(first, second) and len(calls) == 1
    layer.round_scale = True  # other quantization settings: other copies
    layer(x)
    assert len(calls) == 2
    layer.fp8_weight_cache.invalidate()
    layer(x)
    assert len(calls) == 3


def test_weight_cache_takes_inference_tensors():
    off = offsets_of([128])
    cache = FP8WeightCache()
    with torch.inference_mode():
        w = torch.randn(1, 128, 128)
        x = torch.randn(128, 128)
        a = grouped.fp8_grouped_linear(x, w, off, backend="torch", aligned=True, weight_cache=cache)
        b = grouped.fp8_grouped_linear(x, w, off, backend="torch", aligned=True, weight_cache=cache)
        layer = FP8Linear(128, 128, backend="torch")
        layer.fp8_weight_cache = True
        c, d = layer(x), layer(x)
    assert torch.equal(a, b) and torch.equal(c, d) and cache.num_entries == 1


def test_the_switch_and_who_owns_the_cache():
    experts = _experts()
    assert experts.fp8_weight_cache is None  # off by default
    experts.fp8_weight_cache = True
    cache = experts.fp8_weight_cache
    assert isinstance(cache, FP8WeightCache)
    experts.fp8_weight_cache = False
    assert experts.fp8_weight_cache is None
    with pytest.raises(CoscaleError, match="fp8_weight_cache"):
        experts.fp8_weight_cache = "yes"
    x, idx, weight = _tokens()
    with pytest.raises(CoscaleError, match="FP8WeightCache"):  # True names no owner
        grouped_experts_forward(x, idx, weight, experts.w_gate, experts.w_up, experts.w_down, precision="fp8",
                                fp8_weight_cache=True)

    class Plain(nn.Module):  # a module without a normalising setter (as the expert-parallel experts)
        fp8_weight_cache = True

    plain = Plain()
    owned = weight_cache_of(plain)
    assert isinstance(owned, FP8WeightCache) and weight_cache_of(plain) is owned  # made once, kept
    shared = nn.ModuleList([plain, nn.Linear(2, 2)])
    shared[1].fp8_weight_cache = owned  # one cache reachable twice is invalidated once
    assert invalidate_fp8_weight_caches(shared) == 1


# ---- helpers -----------------------------------------------------------------------------------------
def _experts():
    experts = GroupedExperts(n_experts=2, hidden=128, intermediate=128)
    for w in (experts.w_gate, experts.w_up, experts.w_down):
        nn.init.normal_(w, std=0.05)
    experts.precision = "fp8"
    return experts


def _tokens():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(48, 128, generator=gen, requires_grad=True)
    idx = torch.stack([torch.randperm(2, generator=gen) for _ in range(48)])
    weight = torch.rand(48, 2, generator=gen)
    return x, idx, weight


def test_copying_or_pickling_the_owner_copies_no_fp8_data():
    import copy
    import pickle

    layer = FP8Linear(128, 128, backend="torch")
    layer.fp8_weight_cache = True
    layer(torch.randn(4, 128))
    assert layer.fp8_weight_cache.num_entries == 1
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert isinstance(clone.fp8_weight_cache, FP8WeightCache) and clone.fp8_weight_cache.num_entries == 0
        assert torch.equal(clone(torch.ones(2, 128)), layer(torch.ones(2, 128)))
