"""Multi-process tests of coscale.parallel on gloo (CPU): 2 and 4 ranks spawned on 127.0.0.1.

Each spawn runs a whole suite of checks inside the ranks and returns numbers; the tests below assert
on them, so a failure names the check. The single-process MoE layer (experts_forward_loop) and the
single-process training loop are the specification.
"""

import math
import time

import pytest
import torch

from coscale.checkpoint import load_checkpoint, save_pretrained
from coscale.config import get_preset
from coscale.errors import ConfigError
from coscale.model import DeepseekForCausalLM, experts_forward_loop, update_router_biases
from coscale.parallel import (
    CommunicationError,
    ExpertParallelExperts,
    all_reduce_router_loads,
    analytic_inter_node_bytes,
    apply_expert_parallel,
    check_same_config,
    clip_grad_norm_,
    dispatch,
    gathered_experts,
    get_codec,
    init_parallel,
    local_expert_range,
    node_limited_topk,
    nodes_per_token,
    setup_for_training,
    shard_batch,
    sync_gradients,
    total_traffic,
)
from coscale.parallel.launch import spawn

T, H, E, K, I = 12, 256, 16, 4, 32  # tokens per rank, hidden, experts, top-k, expert intermediate


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _problem(world, seed=0, t=T, node_limit=None, n_nodes=None, empty_rank=None):
    """Global tokens, skewed routing (expert 0 hot, expert E-1 never used; the last rank keeps its
    tokens at home), gate weights and full expert weights; identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * t, H, generator=g)
    if node_limit is not None:
        scores = torch.rand(world * t, E, generator=g)
        idx, _ = node_limited_topk(scores, K, n_nodes, node_limit)
    else:
        rows = []
        for r in range(world * t):
            perm = torch.randperm(E - 1, generator=g)
            if r < world * t // 3:
                perm = torch.cat([torch.zeros(1, dtype=torch.long), perm[perm != 0]])
            rows.append(perm[:K])
        idx = torch.stack(rows)
        per_rank = E // world
        home = (world - 1) * per_rank + torch.randperm(per_rank, generator=g)[:min(K, per_rank)]
        if per_rank >= K:
            idx[(world - 1) * t:] = home  # the last rank sends nothing to the others
    w = torch.rand(world * t, K, generator=g)
    weights = [torch.randn(*s, generator=g) * 0.05 for s in ((E, I, H), (E, I, H), (E, H, I))]
    counts = [t] * world
    if empty_rank is not None:  # that rank has no tokens at all; the global batch shrinks
        counts[empty_rank] = 0
        keep = torch.cat([torch.arange(r * t, (r + 1) * t) for r in range(world) if r != empty_rank])
        x, idx, w = x[keep], idx[keep], w[keep]
    return x, idx, w, weights, counts


def _ep_vs_reference(ctx, problem, codec, combine_codec, two_hop=False, micro_batches=1):
    """Forward and gradients of the EP layer against the single-process layer on the global batch."""
    x, idx, w, weights, counts = problem
    rank, world = ctx.ep_rank, ctx.ep_size
    lo, hi = sum(counts[:rank]), sum(counts[:rank + 1])
    full = [p.clone().requires_grad_(True) for p in weights]
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = experts_forward_loop(xr, idx, wr, *full)
    (ref * torch.linspace(-1, 1, H)).sum().backward()

    ep = ExpertParallelExperts(E, H, I, ctx, dispatch_codec=codec, combine_codec=combine_codec,
                               two_hop=two_hop, impl="loop", micro_batches=micro_batches)
    ep.load_state_dict({"w_gate": weights[0], "w_up": weights[1], "w_down": weights[2]})
    xl, wl = x[lo:hi].clone().requires_grad_(True), w[lo:hi].clone().requires_grad_(True)
    out = ep(xl, idx[lo:hi], wl)
    (out * torch.linspace(-1, 1, H)).sum().backward()
    n_local, first = E // world, rank * (E // world)
    return {
        "out": _rel(out, ref[lo:hi]) if hi > lo else 0.0,
        "grad_x": _rel(xl.grad, xr.grad[lo:hi]) if hi > lo else 0.0,
        "grad_w": _rel(wl.grad, wr.grad[lo:hi]) if hi > lo else 0.0,
        "grad_experts": max(_rel(p.grad, f.grad[first:first + n_local])
                            for p, f in zip((ep.w_gate, ep.w_up, ep.w_down), full)),
        "traffic": ep.traffic,
    }


def _dispatch_suite(rank, world, gpus_per_node):
    ctx = init_parallel(ep_size=world, gpus_per_node=gpus_per_node, timeout_s=30)
    torch.manual_seed(0)
    res = {}
    problem = _problem(world)
    for name, kw in {
        "flat_fp32": dict(codec="fp32", combine_codec="fp32"),
        "two_hop_fp32": dict(codec="fp32", combine_codec="fp32", two_hop=True),
        "overlap_fp32": dict(codec="fp32", combine_codec="fp32", micro_batches=2),
        "overlap_two_hop_fp32": dict(codec="fp32", combine_codec="fp32", two_hop=True, micro_batches=3),
        "flat_bf16": dict(codec="bf16", combine_codec="bf16"),
        "flat_fp8": dict(codec="fp8", combine_codec="bf16"),
        "two_hop_fp8": dict(codec="fp8", combine_codec="bf16", two_hop=True),
    }.items():
        r = _ep_vs_reference(ctx, problem, **kw)
        r.pop("traffic")
        res[name] = r
    res["empty_rank"] = _ep_vs_reference(ctx, _problem(world, seed=1, empty_rank=0), "fp32", "fp32")
    res["empty_rank"].pop("traffic")

    # Byte counters against the analytic count, with node-limited routing (M = 1 node of the others).
    n_nodes = world // min(world, gpus_per_node)
    limited = _problem(world, seed=2, node_limit=max(1, n_nodes // 2), n_nodes=n_nodes)
    x, idx, w, _, counts = limited
    lo, hi = rank * T, (rank + 1) * T
    row = get_codec("fp8").bytes_per_row(H)
    counted = {}
    for two_hop in (False, True):
        traffic = _ep_vs_reference(ctx, limited, "fp8", "bf16", two_hop=two_hop)["traffic"]
        counted["two_hop" if two_hop else "flat"] = traffic.inter_node_bytes
    res["bytes"] = {
        "counted": counted,
        "analytic": analytic_inter_node_bytes(idx[lo:hi], ctx.node, E // n_nodes, row),
        "max_nodes": int(nodes_per_token(idx, E // n_nodes).max()),
        "limit": max(1, n_nodes // 2),
        "bound": T * max(1, n_nodes // 2) * row,
    }

    # A config that differs on one rank is reported by name, on every rank.
    cfg = get_preset("tiny", hidden_size=256 if rank != world - 1 else 128)
    try:
        check_same_config(cfg, what="model config")
        res["mismatch"] = None
    except ConfigError as e:
        res["mismatch"] = str(e)
    return res


@pytest.fixture(scope="module")
def suite2():
    return spawn(_dispatch_suite, 2, args=(2, 1), timeout_s=90)  # 2 virtual nodes x 1 rank


@pytest.fixture(scope="module")
def suite4():
    return spawn(_dispatch_suite, 4, args=(4, 2), timeout_s=120)  # 2 virtual nodes x 2 ranks


TOLERANCE = {"fp32": 1e-5, "bf16": 1.5e-2, "fp8": 6e-2}


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_combine_equals_single_process_layer(world, request):
    outcomes = request.getfixturevalue(f"suite{world}")
    for o in outcomes:
        for name in ("flat_fp32", "two_hop_fp32", "overlap_fp32", "overlap_two_hop_fp32", "empty_rank",
                     "flat_bf16", "flat_fp8", "two_hop_fp8"):
            tol = TOLERANCE[name.split("_")[-1]] if name != "empty_rank" else 1e-5
            for key, err in o.result[name].items():
                assert err <= tol, f"rank {o.rank} {name} {key}: relative error {err:.2e} > {tol}"


@pytest.mark.parametrize("world", [2, 4])
def test_node_limited_bytes_match_analytic_count(world, request):
    outcomes = request.getfixturevalue(f"suite{world}")
    for o in outcomes:
        b = o.result["bytes"]
        assert b["max_nodes"] <= b["limit"]
        assert b["counted"] == b["analytic"], f"rank {o.rank}: counters {b['counted']} != {b['analytic']}"
        assert b["counted"]["two_hop"] <= b["bound"]
        assert b["counted"]["two_hop"] <= b["counted"]["flat"]
    total_flat = sum(o.result["bytes"]["counted"]["flat"] for o in outcomes)
    total_two_hop = sum(o.result["bytes"]["counted"]["two_hop"] for o in outcomes)
    assert total_two_hop < total_flat  # K = 4 experts, at most M nodes: copies are saved


def test_mismatched_config_is_reported_on_every_rank(suite2):
    for o in suite2:
        assert o.result["mismatch"] is not None and "ranks [1] disagree" in o.result["mismatch"]


# ---- training: EP (x DP) reproduces the single-process loss curve ------------------------------------

STEPS, BATCH, SEQ = 4, 4, 16
CLIP = 0.5  # small enough that clipping acts in every step


def _tiny():
    return get_preset("tiny", num_hidden_layers=2, vocab_size=128)


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, 128, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _reference_losses():
    torch.manual_seed(0)
    model = DeepseekForCausalLM(_tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, norms = [], []
    for step in range(STEPS):
        ids, labels = _data(step)
        loss = model.compute_loss(ids, labels).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        opt.zero_grad()
        update_router_biases(model, 0.01)
        losses.append(loss.item())
    return losses, norms, model


def _train_worker(rank, ep_size, gpus_per_node, codec, path, reload_ep):
    torch.manual_seed(0)
    model = DeepseekForCausalLM(_tiny())
    model, ctx = setup_for_training(model, {"ep_size": ep_size, "gpus_per_node": gpus_per_node,
                                            "dispatch_codec": codec, "combine_codec": codec,
                                            "dist_timeout": 30})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, norms = [], []
    for step in range(STEPS):
        ids, labels = (shard_batch(t, ctx) for t in _data(step))
        loss = model.compute_loss(ids, labels).loss
        loss.backward()
        sync_gradients(model, ctx)
        norms.append(float(clip_grad_norm_(model, CLIP, ctx)))
        opt.step()
        opt.zero_grad()
        all_reduce_router_loads(model, ctx)
        update_router_biases(model, 0.01)
        losses.append(float(ctx.all_reduce_mean(loss.detach())))
    state = model.state_dict()  # collective: full expert tensors on every rank
    if rank == 0:
        torch.save(state, path)
    with gathered_experts(model):  # every rank gathers; rank 0 alone writes the HF layout
        if rank == 0:
            save_pretrained(model, path + ".hf")
    torch.distributed.barrier()
    result = {"losses": losses, "norms": norms, "traffic": total_traffic(model).intra_node_bytes
              + total_traffic(model).inter_node_bytes}
    if reload_ep:
        # Load both checkpoints into a model sharded differently.
        ctx2 = init_parallel(ep_size=reload_ep, gpus_per_node=gpus_per_node, timeout_s=30)
        ids, labels = (shard_batch(t, ctx2) for t in _data(STEPS))
        for how in ("state_dict", "hf"):
            fresh = apply_expert_parallel(DeepseekForCausalLM(_tiny()), ctx2, dispatch_codec="fp32",
                                          combine_codec="fp32")
            if how == "state_dict":
                fresh.load_state_dict(torch.load(path))
            else:
                load_checkpoint(fresh, path + ".hf", expert_range=local_expert_range(fresh))
            fresh.eval()
            with torch.no_grad():
                loss = fresh.compute_loss(ids, labels).loss
            result[f"reload_loss_{how}"] = float(ctx2.all_reduce_mean(loss))
    return result


@pytest.fixture(scope="module")
def reference():
    return _reference_losses()


def _eval_loss(model):
    model.eval()
    with torch.no_grad():
        return model.compute_loss(*_data(STEPS)).loss.item()


def test_ep2_training_matches_single_process_and_checkpoint_loads_plain(reference, tmp_path):
    ref_losses, ref_norms, ref_model = reference
    path = tmp_path / "ep2.pt"
    outcomes = spawn(_train_worker, 2, args=(2, None, "bf16", str(path), None), timeout_s=90)
    for o in outcomes:
        assert o.result["traffic"] > 0
        for step, (a, b) in enumerate(zip(o.result["losses"], ref_losses)):
            assert math.isclose(a, b, rel_tol=2e-2), f"rank {o.rank} step {step}: {a} vs {b}"
    # The EP=2 checkpoints (state_dict and HF layout) have the plain model's names and shapes.
    plain = DeepseekForCausalLM(_tiny())
    plain.load_state_dict(torch.load(path))
    assert math.isclose(_eval_loss(plain), _eval_loss(ref_model), rel_tol=3e-2)
    from_hf = load_checkpoint(DeepseekForCausalLM(_tiny()), str(path) + ".hf")
    for name, t in from_hf.state_dict().items():
        assert torch.equal(t, plain.state_dict()[name]), name


def test_ep2_dp2_training_and_reload_at_ep4(reference, tmp_path):
    ref_losses, ref_norms, ref_model = reference
    assert min(ref_norms) > CLIP
    path = tmp_path / "ep2dp2.pt"
    outcomes = spawn(_train_worker, 4, args=(2, 2, "fp32", str(path), 4), timeout_s=150)
    for o in outcomes:
        for step, (a, b) in enumerate(zip(o.result["losses"], ref_losses)):
            assert math.isclose(a, b, rel_tol=1e-4), f"rank {o.rank} step {step}: {a} vs {b}"
        for step, (a, b) in enumerate(zip(o.result["norms"], ref_norms)):
            assert math.isclose(a, b, rel_tol=1e-4), f"rank {o.rank} step {step}: grad norm {a} vs {b}"
    plain = DeepseekForCausalLM(_tiny())
    plain.load_state_dict(torch.load(path))
    expected = _eval_loss(plain)
    assert math.isclose(_eval_loss(ref_model), expected, rel_tol=1e-4)
    for o in outcomes:
        assert math.isclose(o.result["reload_loss_state_dict"], expected, rel_tol=1e-5)
        assert math.isclose(o.result["reload_loss_hf"], expected, rel_tol=1e-5)


# ---- faults ----------------------------------------------------------------------------------------


def _dies_worker(rank):
    import os

    ctx = init_parallel(ep_size=2, timeout_s=10)
    x = torch.randn(8, 64)
    idx = torch.randint(0, 4, (8, 1))
    dispatch(x, idx, torch.ones(8, 1), ctx, 4)  # one healthy round trip
    if rank == 1:
        os._exit(3)  # dies without a word
    time.sleep(0.5)
    start = time.monotonic()
    try:
        for _ in range(3):
            dispatch(x, idx, torch.ones(8, 1), ctx, 4)
    except CommunicationError as e:
        return {"error": str(e), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def test_a_dead_rank_makes_the_others_fail_fast_with_a_clear_error():
    start = time.monotonic()
    outcomes = spawn(_dies_worker, 2, timeout_s=50, raise_on_error=False)
    assert time.monotonic() - start < 50
    survivor, dead = outcomes
    assert not dead.ok and dead.exitcode == 3
    assert survivor.ok, survivor.error
    assert survivor.result["error"] is not None, "the survivor did not notice the dead rank"
    assert "a peer rank that exited" in survivor.result["error"]
    assert survivor.result["seconds"] < 25


def _hangs_worker(rank):
    ctx = init_parallel(ep_size=2, timeout_s=4)
    x = torch.randn(8, 64)
    idx = torch.randint(0, 4, (8, 1))
    dispatch(x, idx, torch.ones(8, 1), ctx, 4)
    if rank == 1:
        time.sleep(9)  # alive but stuck: never joins the next collective in time
        return {"error": None, "seconds": 0.0}
    start = time.monotonic()
    try:
        dispatch(x, idx, torch.ones(8, 1), ctx, 4)
    except CommunicationError as e:
        return {"error": str(e), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def test_a_hung_rank_makes_the_others_fail_within_the_timeout():
    outcomes = spawn(_hangs_worker, 2, timeout_s=50, raise_on_error=False)
    waiting = outcomes[0]
    assert waiting.ok, waiting.error
    assert waiting.result["error"] is not None and "timeout 4 s" in waiting.result["error"]
    assert waiting.result["seconds"] < 12


def test_ep_size_not_dividing_experts_is_a_config_error():
    from coscale.parallel import Topology

    two_ranks = Topology(group=None, ranks=(0, 1), rank=0)  # the check needs no communication
    with pytest.raises(ConfigError, match="does not divide the 5 routed experts"):
        ExpertParallelExperts(5, 8, 4, two_ranks)
    with pytest.raises(ConfigError, match="does not divide the 5 routed experts"):
        dispatch(torch.randn(3, 8), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), two_ranks, 5)
