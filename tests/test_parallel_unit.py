"""Single-process tests of coscale.parallel: codecs, the reference dispatch path, node-limited routing."""

import pytest
import torch

from coscale.errors import ConfigError
from coscale.model.moe import experts_forward_loop
from coscale.parallel import (
    ExpertParallelExperts,
    ParallelDims,
    analytic_inter_node_bytes,
    check_gate_is_node_limited,
    combine,
    dispatch,
    get_codec,
    local_experts_forward,
    node_limited_topk,
    nodes_per_token,
)
from coscale.parallel.codec import FP8Codec, _quantize_1x128_local


def _routing(t, e, k, seed=0):
    """Skewed routing: expert 0 is hot (half the tokens pick it first), expert e-1 gets no token."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(t):
        perm = torch.randperm(e - 1, generator=g)
        if r < t // 2:
            perm = torch.cat([torch.zeros(1, dtype=torch.long), perm[perm != 0]])
        rows.append(perm[:k])
    return torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long), torch.rand(t, k, generator=g)


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("hidden", [256, 200, 7168])
def test_codec_roundtrip(name, hidden):
    codec = get_codec(name)
    x = torch.randn(9, hidden) * torch.logspace(-3, 3, 9).unsqueeze(1)
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.shape == (9, codec.bytes_per_row(hidden))
    y = codec.decode(payload, hidden, torch.float32)
    err = ((y - x).norm(dim=1) / x.norm(dim=1)).max().item()
    assert err <= {"fp32": 0.0, "bf16": 4e-3, "fp8": 4e-2}[name]
    # Rows are independent: selecting encoded rows equals encoding the selected rows (bit-exact).
    sel = torch.tensor([3, 3, 0, 8])
    assert torch.equal(codec.encode(x[sel]), payload[sel])


def test_fp8_codec_layout_and_kernels_reference():
    x = torch.randn(5, 7168)
    codec = FP8Codec()
    assert codec.bytes_per_row(7168) == 7168 + 4 * 56  # e4m3 codes + one fp32 scale per 128 channels
    codes, scale = _quantize_1x128_local(x)
    payload = codec.encode(x)
    assert torch.equal(payload[:, :7168], codes.view(torch.uint8))
    assert torch.equal(payload[:, 7168:].contiguous().view(torch.float32), scale)
    try:
        from coscale.kernels.quant import act_quant_1x128_ref
    except ImportError:
        pytest.skip("coscale.kernels.quant not available")
    ref_codes, ref_scale = act_quant_1x128_ref(x)
    torch.testing.assert_close(ref_scale.float(), scale, rtol=0, atol=0)
    assert torch.equal(ref_codes.view(torch.uint8), codes.view(torch.uint8))


@pytest.mark.parametrize("width, offset", [(7392, 0), (7390, 0), (7391, 0), (7392, 4), (7392, 1), (16, 0)])
def test_select_rows_moves_words_and_equals_index_select(width, offset):
    """Encoded rows selected as 8/4/2-byte words where width, stride and offset allow, else bytes: always
    the bytes of index_select (duplicates, any order, no rows)."""
    from coscale.parallel.codec import select_rows

    g = torch.Generator().manual_seed(width + offset)
    flat = torch.randint(0, 256, (offset + 9 * width,), dtype=torch.uint8, generator=g)
    rows = flat[offset:].view(9, width)
    for index in (torch.tensor([3, 0, 3, 8, 1]), torch.randperm(9, generator=g), torch.tensor([], dtype=torch.long)):
        got = select_rows(rows, index)
        assert got.dtype == torch.uint8 and torch.equal(got, rows.index_select(0, index))
    words = torch.randn(5, 6, generator=g)  # other dtypes: index_select itself
    assert torch.equal(select_rows(words, torch.tensor([4, 4, 0])), words[[4, 4, 0]])


def test_zero_rows_encode():
    for name in ("bf16", "fp8"):
        codec = get_codec(name)
        x = torch.zeros(3, 256)
        assert torch.equal(codec.decode(codec.encode(x), 256, torch.float32), x)
        assert codec.encode(torch.zeros(0, 256)).shape == (0, codec.bytes_per_row(256))


def test_unknown_codec_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown EP codec"):
        get_codec("fp4")
    with pytest.raises(ConfigError, match="not a codec"):
        get_codec(object())


def _weights(e, h, i, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype) * 0.1 for s in ((e, i, h), (e, i, h), (e, h, i))]


@pytest.mark.parametrize("two_hop", [False, True])
def test_single_process_dispatch_is_the_reference(two_hop):
    t, h, e, k, i = 13, 64, 8, 3, 16
    x = torch.randn(t, h, dtype=torch.float64, requires_grad=True)
    idx, w = _routing(t, e, k)
    w.requires_grad_(True)
    weights = [p.requires_grad_(True) for p in _weights(e, h, i)]
    recv, meta = dispatch(x, idx, w, None, e, codec="fp32", combine_codec="fp32", two_hop=two_hop)
    assert meta.tokens_per_expert.tolist() == torch.bincount(idx.flatten(), minlength=e).tolist()
    assert torch.equal(meta.local_expert, meta.local_expert.sort().values)
    out = combine(local_experts_forward(recv, meta.tokens_per_expert, *weights), meta)
    ref = experts_forward_loop(x, idx, w, *weights)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad((out * out).sum(), [x, w, *weights])
    ref_grads = torch.autograd.grad((ref * ref).sum(), [x, w, *weights])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("two_hop", [False, True])
def test_scatter_then_gather_sums_each_tokens_copies(two_hop):
    """A route's gather is the adjoint of its scatter: scatter makes one row per (token, expert) pair,
    sorted by expert; gather sums them back, so gather(scatter(x)) == K * x (exact in float64/fp32)."""
    from coscale.parallel.routes import Topology, plan_routes, topology
    from coscale.parallel.transfer import gather, gather_start, gather_wait, scatter

    t, h, e, k = 11, 8, 8, 3
    idx, _ = _routing(t, e, k)
    x = torch.randn(t, h, dtype=torch.float64)
    fp32 = get_codec("fp32")
    plan = plan_routes(idx, e, topology(None), two_hop)
    rows = scatter(x, plan.token_route, fp32, fp32, torch.float64, 60.0)
    order = torch.argsort(idx.flatten(), stable=True)
    assert torch.equal(rows, x.float().double()[order // k])  # the fp32 wire format rounds once
    assert torch.equal(plan.local_expert, idx.flatten()[order])
    back = gather(rows, plan.token_route, fp32, fp32, torch.float64, 60.0)
    torch.testing.assert_close(back, k * x.float().double(), rtol=1e-6, atol=0)
    anchor, pending = gather_start(rows, plan.token_route, fp32, fp32, torch.float64, 60.0)
    assert torch.equal(gather_wait(anchor, pending), back)
    with pytest.raises(ConfigError, match="does not divide the 5 routed experts"):
        plan_routes(idx, 5, Topology(group=None, ranks=(0, 1), rank=0))


def test_bad_shapes_and_divisibility_are_config_errors():
    x = torch.randn(4, 8)
    idx = torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"\[T, K\]"):
        dispatch(x, idx, torch.ones(4, 3), None, 4)
    with pytest.raises(ConfigError, match="does not divide"):
        ParallelDims(4, 4, 4).check_divides_experts(6)
    with pytest.raises(ConfigError, match="must divide the world size"):
        ParallelDims(4, 3, 4)
    with pytest.raises(ConfigError, match="whole nodes"):
        ParallelDims(12, 6, 4)


def test_ep_module_without_distributed_equals_grouped_experts():
    from coscale.model.moe import GroupedExperts
    from coscale.parallel import apply_expert_parallel

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.experts = GroupedExperts(8, 32, 16)
    for p in holder.experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    plain_sd = {k: v.clone() for k, v in holder.state_dict().items()}
    x = torch.randn(10, 32)
    idx, w = _routing(10, 8, 2)
    ref = holder.experts(x, idx, w)
    apply_expert_parallel(holder, None, dispatch_codec="fp32", combine_codec="fp32")
    assert isinstance(holder.experts, ExpertParallelExperts)
    torch.testing.assert_close(holder.experts(x, idx, w), ref, rtol=1e-5, atol=1e-6)
    sd = holder.state_dict()
    assert sd.keys() == plain_sd.keys() and all(torch.equal(sd[k], plain_sd[k]) for k in sd)


@pytest.mark.parametrize("n_nodes,max_nodes,top_k", [(8, 4, 8), (4, 2, 4), (4, 1, 3)])
def test_node_limited_topk_never_exceeds_m_nodes(n_nodes, max_nodes, top_k):
    torch.manual_seed(0)
    e = 8 * n_nodes
    scores = torch.rand(500, e).sigmoid()
    bias = torch.randn(e) * 0.1
    idx, s = node_limited_topk(scores, top_k, n_nodes, max_nodes, bias)
    assert idx.shape == (500, top_k) and torch.equal(s, scores.gather(1, idx))
    assert int(nodes_per_token(idx, e // n_nodes).max()) <= max_nodes
    assert len(set(idx[0].tolist())) == top_k
    # Without the restriction the same scores reach more nodes.
    free = (scores + bias).topk(top_k, dim=-1).indices
    assert int(nodes_per_token(free, e // n_nodes).max()) >= max_nodes


def test_model_gate_is_node_limited_when_groups_are_nodes():
    from coscale.config import get_preset
    from coscale.model.moe import Gate

    cfg = get_preset("tiny")  # 16 experts in 4 groups, top-2 groups
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    m = check_gate_is_node_limited(cfg.n_routed_experts, cfg.n_group, cfg.topk_group, n_nodes=4)
    idx, _, _ = gate(torch.randn(300, cfg.hidden_size))
    assert int(nodes_per_token(idx, cfg.n_routed_experts // 4).max()) <= m == 2
    with pytest.raises(ConfigError, match="straddling"):
        check_gate_is_node_limited(16, 4, 2, n_nodes=8)


def test_analytic_bytes_drop_to_at_most_m_copies_per_token():
    idx = torch.tensor([[0, 1, 2, 3], [4, 5, 12, 13], [8, 9, 10, 11]])  # 4 experts per node, 4 nodes
    counts = analytic_inter_node_bytes(idx, source_node=0, experts_per_node=4, bytes_per_row=10)
    assert counts == {"flat": (0 + 4 + 4) * 10, "two_hop": (0 + 2 + 1) * 10}


def test_overlap_schedule_issues_the_next_dispatch_before_computing(monkeypatch):
    import coscale.parallel.overlap as overlap

    log = []

    def traced(name, fn):
        def wrapper(*args, **kwargs):
            log.append(name)
            return fn(*args, **kwargs)
        return wrapper

    for name in ("dispatch_plan", "dispatch_start", "dispatch_wait", "combine_start", "combine_wait"):
        monkeypatch.setattr(overlap, name, traced(name, getattr(overlap, name)))
    experts = ExpertParallelExperts(8, 32, 16, None, dispatch_codec="fp32", combine_codec="fp32")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    monkeypatch.setattr(experts, "compute", traced("compute", experts.compute))
    x = torch.randn(10, 32, requires_grad=True)
    idx, w = _routing(10, 8, 2)
    out = overlap.overlapped_experts_forward(experts, x, idx, w, micro_batches=2)
    assert log == ["dispatch_plan", "dispatch_plan", "dispatch_start", "dispatch_start",
                   "dispatch_wait", "compute", "combine_start", "dispatch_wait", "compute", "combine_start",
                   "combine_wait", "combine_wait"]
    ref = experts_forward_loop(x, idx, w, experts.w_gate, experts.w_up, experts.w_down)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0],
                               rtol=1e-5, atol=1e-6)


def test_local_experts_grouped_path_equals_loop():
    g = torch.Generator().manual_seed(3)
    e, h, i = 4, 128, 64
    weights = [torch.randn(*s, generator=g) * 0.1 for s in ((e, i, h), (e, i, h), (e, h, i))]
    x = torch.randn(20, h, generator=g)
    per_expert = torch.tensor([5, 0, 10, 5])  # an expert without rows
    loop = local_experts_forward(x, per_expert, *weights, impl="loop")
    grouped = local_experts_forward(x, per_expert, *weights, impl="grouped")
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)
    empty = local_experts_forward(x[:0], torch.zeros(4, dtype=torch.long), *weights, impl="loop")
    assert empty.shape == (0, h)


def test_node_map_from_hosts_and_dims():
    from coscale.parallel.groups import node_map_from_hosts

    assert node_map_from_hosts(["a", "a", "b", "b"]) == (0, 0, 1, 1)
    with pytest.raises(ConfigError, match="consecutive"):
        node_map_from_hosts(["a", "b", "a", "b"])
    with pytest.raises(ConfigError, match="consecutive"):
        node_map_from_hosts(["a", "a", "a", "b"])
    dims = ParallelDims(world_size=16, ep_size=8, gpus_per_node=4)
    assert (dims.dp_size, dims.ep_nodes, dims.ep_ranks_per_node) == (2, 2, 4)
    assert dims.ep_group_ranks(1) == list(range(8, 16)) and dims.dp_group_ranks(3) == [3, 11]
    small = ParallelDims(world_size=8, ep_size=2, gpus_per_node=4)  # EP inside a node
    assert (small.ep_nodes, small.ep_ranks_per_node) == (1, 2)
