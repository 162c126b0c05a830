"""The fused router (coscale.kernels.router) against its PyTorch reference, and Gate's use of it."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch
from torch.library import opcheck

from coscale.config import get_preset
from coscale.errors import CoscaleError
from coscale.kernels.backend import interpreting, triton_available
from coscale.kernels.router import route, route_torch
from coscale.model.moe import Gate

pytestmark = pytest.mark.skipif(not (triton_available() and interpreting()), reason="needs triton's interpreter")

# (T, H, E, K, n_group, topk_group, rank_by, scoring, normalize, scale): V2-Lite's router (softmax, greedy,
# no normalisation), V2's (160 experts in 8 groups of 20: groups that are not a power of two), V3's
# (sigmoid, 8 groups, top-2 sums, normalised, scaled), ragged token and hidden counts, one-expert groups.
CASES = [
    (1, 128, 64, 6, 1, 1, "max", "softmax", False, 1.0),
    (17, 200, 160, 6, 8, 3, "max", "softmax", False, 16.0),
    (33, 300, 256, 8, 8, 4, "top2_sum", "sigmoid", True, 2.5),
    (16, 64, 8, 2, 8, 4, "top2_sum", "sigmoid", True, None),
    (5, 520, 16, 4, 4, 2, "max", "sigmoid", False, None),
]


def _inputs(T, H, E, dtype, seed, with_bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype)
    w = (torch.randn(E, H, generator=gen) / H**0.5).to(dtype)
    b = torch.randn(E, generator=gen) * 0.05 if with_bias else None
    return x, w, b


def _check_against_reference(x, w, b, K, G, TG, rank_by, scoring, normalize, scale, idx, g):
    """The picks are the reference's, except where two experts' choice scores tie within float32 rounding
    (the kernels sum in another order); the weights are the reference's at the kernel's own picks."""
    ref_idx, _, scores = route_torch(x, w, b, K, G, TG, rank_by == "top2_sum", scoring == "sigmoid", normalize,
                                     scale)
    choice = scores + (b if b is not None else 0)
    for t in range(x.shape[0]):
        got, want = set(idx[t].tolist()), set(ref_idx[t].tolist())
        assert len(got) == K
        for e_got, e_want in zip(sorted(got - want), sorted(want - got)):
            assert abs(choice[t, e_got] - choice[t, e_want]) < 1e-5, (t, e_got, e_want)
    picked = scores.gather(1, idx)
    if normalize:
        picked = picked / (picked.sum(-1, keepdim=True) + 1e-20)
    if scale is not None:
        picked = picked * scale
    torch.testing.assert_close(g, picked, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_fused_router_matches_the_reference(case, dtype):
    T, H, E, K, G, TG, rank_by, scoring, normalize, scale = case
    x, w, b = _inputs(T, H, E, dtype, seed=T * E, with_bias=scoring == "sigmoid")
    idx, g = route(x, w, b, top_k=K, n_group=G, topk_group=TG, rank_by=rank_by, scoring=scoring,
                   normalize=normalize, scale=scale, backend="triton")
    assert idx.dtype == torch.int64 and g.dtype == torch.float32 and idx.shape == (T, K)
    _check_against_reference(x.float(), w.float(), b, K, G, TG, rank_by, scoring, normalize, scale, idx, g)
    # in descending order of choice score, as torch.topk returns them
    ref = route_torch(x, w, b, K, G, TG, rank_by == "top2_sum", scoring == "sigmoid", normalize, scale)
    choice = ref[2] + (b if b is not None else 0)
    assert (choice.gather(1, idx).diff(dim=1) <= 0).all()


def test_picks_stay_in_the_kept_groups():
    T, H, E, K, G, TG = 40, 96, 64, 8, 8, 3
    x, w, b = _inputs(T, H, E, torch.float32, seed=3)
    idx, g = route(x, w, b, top_k=K, n_group=G, topk_group=TG, normalize=True, backend="triton")
    groups_reached = torch.tensor([len(set((row // (E // G)).tolist())) for row in idx])
    assert groups_reached.le(TG).all() and groups_reached.eq(TG).any()
    _check_against_reference(x, w, b, K, G, TG, "top2_sum", "sigmoid", True, None, idx, g)


def test_a_zero_row_ties_everywhere_and_still_picks_k_distinct_experts():
    x, w, b = _inputs(3, 64, 32, torch.float32, seed=5, with_bias=False)
    x[1] = 0  # a padding row of a decode batch: every logit 0, every score 0.5
    idx, g = route(x, w, None, top_k=4, normalize=False, backend="triton")
    assert len(set(idx[1].tolist())) == 4
    torch.testing.assert_close(g[1], torch.full((4,), 0.5))
    _check_against_reference(x[[0, 2]], w, None, 4, 1, 1, "top2_sum", "sigmoid", False, None, idx[[0, 2]], g[[0, 2]])


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_nan_reaches_the_weights_and_huge_values_saturate(scoring):
    x, w, _ = _inputs(4, 64, 16, torch.float32, seed=7)
    x[0, 3] = float("nan")
    w[5, 0] = float("nan")  # one corrupt centroid: every token's score for expert 5 is NaN
    x[2] *= 1e6  # saturated scores: sigmoid 0 or 1, softmax one-hot
    idx, g = route(x, w, None, top_k=2, scoring=scoring, normalize=True, backend="triton")
    assert g[0].isnan().all()
    assert g[1:].isnan().any(dim=1).all()  # softmax: the whole row is NaN; sigmoid: expert 5's score
    if scoring == "sigmoid":
        assert (idx[1:] == 5).any(dim=1).all()  # picked, as torch.topk picks NaN first
    w[5, 0] = 0.0
    idx, g = route(x, w, None, top_k=2, scoring=scoring, normalize=True, backend="triton")
    assert torch.isfinite(g[1:]).all()
    _check_against_reference(x[1:], w, None, 2, 1, 1, "top2_sum", scoring, True, None, idx[1:], g[1:])


def test_no_tokens():
    x, w, b = _inputs(0, 64, 16, torch.float32, seed=0)
    idx, g = route(x, w, b, top_k=2, backend="triton")
    assert idx.shape == (0, 2) and g.shape == (0, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=9), "top_k 9 must be 1..8"),
    (dict(top_k=2, n_group=3), "cannot form 3 groups"),
    (dict(top_k=2, n_group=4, topk_group=5), "cannot form 4 groups with 5 kept"),
    (dict(top_k=5, n_group=4, topk_group=2), "top_k 5 must be 1..4"),
    (dict(top_k=2, rank_by="sum"), "rank_by must be"),
    (dict(top_k=2, backend="cuda"), "backend must be one of"),
])
def test_bad_arguments_are_refused(kwargs, message):
    x, w, b = _inputs(3, 64, 8, torch.float32, seed=0)
    with pytest.raises(CoscaleError, match=message):
        route(x, w, b, **kwargs)
    with pytest.raises(CoscaleError, match="bias must be"):
        route(x, w, b[:4], top_k=2)
    with pytest.raises(CoscaleError, match=r"x \[T, H\] and weight \[E, H\]"):
        route(x, w[:, :32], b, top_k=2)
    from coscale.kernels.router import route_triton

    with pytest.raises(CoscaleError, match="at least 16"):
        route_triton(x, w, b, 2, 1, 1, False, True, False, None, columns=8)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_route_opcheck(backend):
    x, w, b = _inputs(9, 64, 16, torch.float32, seed=1)
    result = opcheck(torch.ops.coscale.route, (x, w, b, 4, 4, 2, True, True, True, 2.5, True, backend),
                     test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                 "test_aot_dispatch_dynamic"))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("preset", ["tiny", "deepseek-v2-lite"])
def test_gate_takes_the_fused_router_only_without_gradients_outside_training(preset):
    cfg = get_preset(preset)
    torch.manual_seed(0)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=cfg.hidden_size**-0.5)
    if gate.e_score_correction_bias is not None:
        gate.e_score_correction_bias.normal_(std=0.05)
    x = torch.randn(11, cfg.hidden_size)
    gate.eval()
    with torch.no_grad():
        gate.backend = "torch"
        ref_idx, ref_g, scores = gate(x)
        gate.backend = "triton"
        idx, g, fused_scores = gate(x)
    assert scores is not None and fused_scores is None
    normalise = gate.norm_topk_prob and gate.top_k > 1
    scale = gate.routed_scaling_factor if (gate.scale_normalised or not normalise) else None
    n_group, topk_group, rank_by = gate._group_limit()
    _check_against_reference(x, gate.weight, gate.e_score_correction_bias, gate.top_k, n_group, topk_group,
                             rank_by, gate.scoring_func, normalise, scale, idx, g)
    assert torch.equal(idx.sort(1).values, ref_idx.sort(1).values)
    torch.testing.assert_close(g.sort(1).values, ref_g.sort(1).values, rtol=2e-6, atol=1e-7)
    # with gradients, or in training, the reference runs (the balance loss reads its scores)
    assert gate(x)[2] is not None
    gate.train()
    with torch.no_grad():
        assert gate(x)[2] is not None
    with pytest.raises(ValueError, match="Gate.backend"):
        gate.backend = "cuda"
