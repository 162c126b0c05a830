"""The plain model: MLA paths, routing, balancing, MTP, parameter accounting."""

import math

import pytest
import torch

from coscale.config import ModelConfig, get_preset
from coscale.errors import ConfigError
from coscale.model import DeepseekForCausalLM, Gate, LatentKVCache, MoE, update_router_biases
from coscale.model.moe import GroupedExperts, experts_forward_loop, sequence_balance_loss
from coscale.model.rope import yarn_inv_freq
from coscale.param_count import count_params

YARN = {"type": "yarn", "factor": 8, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}


def small_cfg(**kw):
    base = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                n_group=4, topk_group=2, vocab_size=97)
    base.update(kw)
    return get_preset("tiny", **base)


@pytest.mark.parametrize("kw", [{}, {"q_lora_rank": None}, {"rope_scaling": YARN}])
def test_absorbed_mla_equals_naive(kw):
    torch.manual_seed(0)
    cfg = small_cfg(**kw)
    model = DeepseekForCausalLM(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 23))
    with torch.no_grad():
        naive = model(ids)
        cache = LatentKVCache(cfg, 3, 32, dtype=torch.float64)
        parts = [model(ids[:, :9], 0, cache)]  # prefill through the absorbed path
        for t in range(9, 23):  # then one token at a time
            parts.append(model(ids[:, t : t + 1], t, cache))
    absorbed = torch.cat(parts, dim=1)
    torch.testing.assert_close(absorbed, naive, rtol=1e-9, atol=1e-9)


def test_cache_stores_only_latent_and_rope_key():
    cfg = get_preset("deepseek-v3")
    cache = LatentKVCache(small_cfg(kv_lora_rank=512, qk_rope_head_dim=64, num_hidden_layers=61),
                          1, 1, dtype=torch.bfloat16)
    assert cache.bytes_per_token() == 70272  # the paper's Table 1 figure for DeepSeek-V3
    assert cfg.kv_lora_rank + cfg.qk_rope_head_dim == 576


def test_cache_overflow_is_a_clear_error():
    cfg = small_cfg()
    model = DeepseekForCausalLM(cfg).eval()
    cache = LatentKVCache(cfg, 1, 4)
    with pytest.raises(ValueError, match="holds 4 positions"):
        model(torch.zeros(1, 5, dtype=torch.long), 0, cache)


def reference_route(s, bias, cfg):
    """Straight from the report's equations, one token at a time, in float64."""
    E, G = cfg.n_routed_experts, cfg.n_group
    per = E // G
    choice = s + (bias if bias is not None else 0)
    if cfg.topk_method == "greedy" or G == 1:
        allowed = list(range(E))
    else:
        groups = []
        for g in range(G):
            vals = sorted(choice[g * per : (g + 1) * per].tolist(), reverse=True)
            groups.append(sum(vals[:2]) if cfg.topk_method == "noaux_tc" else vals[0])
        kept = sorted(range(G), key=lambda g: -groups[g])[: cfg.topk_group]
        allowed = [e for g in kept for e in range(g * per, (g + 1) * per)]
    picked = sorted(allowed, key=lambda e: -choice[e].item())[: cfg.num_experts_per_tok]
    w = torch.stack([s[e] for e in picked])
    if cfg.norm_topk_prob:
        w = w / w.sum()
        if cfg.model_type == "deepseek_v2":  # V2's published code does not scale normalised weights
            return picked, w
    return picked, w * cfg.routed_scaling_factor


@pytest.mark.parametrize("method,scoring,norm,model_type", [
    ("noaux_tc", "sigmoid", True, "deepseek_v3"), ("group_limited_greedy", "softmax", False, "deepseek_v2"),
    ("greedy", "softmax", False, "deepseek_v2"), ("greedy", "softmax", True, "deepseek_v2"),
    ("group_limited_greedy", "softmax", True, "deepseek_v3"),
])
def test_gate_matches_reference(method, scoring, norm, model_type):
    torch.manual_seed(1)
    cfg = small_cfg(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3,
                    topk_method=method, scoring_func=scoring, norm_topk_prob=norm,
                    routed_scaling_factor=2.5, model_type=model_type)
    gate = Gate(cfg).double()
    torch.nn.init.normal_(gate.weight)
    if gate.e_score_correction_bias is not None:
        gate.e_score_correction_bias.normal_(0, 0.5)  # large enough to change choices
    x = torch.randn(40, cfg.hidden_size, dtype=torch.float64)
    idx, w, s = gate(x)
    bias = gate.e_score_correction_bias.double() if gate.e_score_correction_bias is not None else None
    for t in range(x.shape[0]):
        picked, w_ref = reference_route(s[t], bias, cfg)
        order = torch.argsort(idx[t])
        assert idx[t][order].tolist() == sorted(picked)
        w_sorted = w_ref[torch.argsort(torch.tensor(picked))]
        torch.testing.assert_close(w[t][order].double(), w_sorted, rtol=1e-6, atol=1e-6)


def test_bias_selects_but_never_weights():
    torch.manual_seed(2)
    cfg = small_cfg(n_group=1, topk_group=1, num_experts_per_tok=2, norm_topk_prob=False,
                    routed_scaling_factor=1.0)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight)
    x = torch.randn(10, cfg.hidden_size)
    gate.e_score_correction_bias[5] = 100.0  # forces expert 5 into every selection
    idx, w, s = gate(x)
    assert (idx == 5).any(dim=1).all()
    slot = (idx == 5).float().argmax(dim=1)
    torch.testing.assert_close(w[torch.arange(10), slot], s[:, 5])  # weight is s, not s + b


def test_group_limit_respected():
    torch.manual_seed(3)
    cfg = small_cfg(n_routed_experts=32, n_group=8, topk_group=3, num_experts_per_tok=6)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight)
    idx, _, _ = gate(torch.randn(200, cfg.hidden_size))
    groups_per_token = torch.tensor([len(set((row // 4).tolist())) for row in idx])
    assert groups_per_token.max() <= 3
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all()  # K distinct experts: dropless, no repeats


def test_bias_update_direction():
    cfg = small_cfg(n_group=1, topk_group=1)
    model = DeepseekForCausalLM(cfg).train()
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    load = torch.tensor([10.0, 0, 0, 0, 0, 0, 0, 6])  # mean 2
    for g in gates:
        g.expert_load.copy_(load)
    update_router_biases(model, gamma=0.01)
    expected = 0.01 * torch.sign(load.mean() - load)
    for g in gates:
        torch.testing.assert_close(g.e_score_correction_bias, expected)
        assert g.expert_load.sum() == 0  # counters reset


def test_training_forward_counts_load():
    cfg = small_cfg()
    model = DeepseekForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    model.compute_loss(ids, ids)
    gate = next(m for m in model.modules() if isinstance(m, Gate))
    assert gate.expert_load.sum() == 2 * 8 * cfg.num_experts_per_tok


def test_sequence_balance_loss_hand_case():
    # 1 sequence, 2 tokens, 2 experts, top-1: token0 -> e0, token1 -> e0.
    scores = torch.tensor([[0.6, 0.2], [0.3, 0.1]])
    idx = torch.tensor([[0], [0]])
    # f = [2 * 2/(1*2), 0] = [2, 0]; P_0 = mean(0.75, 0.75) = 0.75 -> loss 1.5
    assert sequence_balance_loss(scores, idx, batch=1, top_k=1).item() == pytest.approx(1.5)


def test_experts_loop_matches_per_token_sum():
    torch.manual_seed(4)
    E, H, I, T, K = 5, 8, 6, 7, 2
    experts = GroupedExperts(E, H, I).double()
    for p in experts.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(T, H, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K, dtype=torch.float64)
    out = experts_forward_loop(x, idx, w, experts.w_gate, experts.w_up, experts.w_down)
    for t in range(T):
        ref = sum(
            w[t, k] * (torch.nn.functional.silu(experts.w_gate[e] @ x[t]) * (experts.w_up[e] @ x[t])) @
            experts.w_down[e].T
            for k, e in enumerate(idx[t].tolist())
        )
        torch.testing.assert_close(out[t], ref)


def test_mtp_loss_is_shifted_cross_entropy():
    torch.manual_seed(5)
    cfg = small_cfg(num_nextn_predict_layers=2, mtp_loss_weight=0.3, aux_loss_alpha=0.0)
    model = DeepseekForCausalLM(cfg).double().train()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    out = model.compute_loss(ids, labels)
    h = model.hidden_states(ids)
    manual = []
    for k, logits in enumerate(model.mtp_logits(h, ids), start=1):
        # position i predicts token i + k + 1 from h_i and Emb(t_{i+k}); keep only valid positions
        n = ids.shape[1] - k - 1
        manual.append(torch.nn.functional.cross_entropy(logits[:, :n].flatten(0, 1), ids[:, k + 1 :].flatten()))
    torch.testing.assert_close(out.mtp_loss, torch.stack(manual).mean())
    torch.testing.assert_close(out.loss, out.main_loss + 0.3 * out.mtp_loss)
    assert out.aux_loss is None


def test_mtp_skipped_at_inference():
    cfg = small_cfg()
    model = DeepseekForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    out = model.compute_loss(ids, ids)
    assert out.mtp_loss is None


def test_gradients_reach_every_parameter():
    torch.manual_seed(6)
    cfg = small_cfg(n_routed_experts=4, n_group=2, topk_group=2, num_experts_per_tok=4)
    model = DeepseekForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    model.compute_loss(ids, ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_yarn_frequencies():
    dim, base = 64, 10000.0
    plain = yarn_inv_freq(dim, base, None)
    scaled = yarn_inv_freq(dim, base, {"factor": 40, "original_max_position_embeddings": 4096,
                                       "beta_fast": 32, "beta_slow": 1})
    torch.testing.assert_close(scaled[:5], plain[:5])  # high frequencies extrapolate unchanged
    torch.testing.assert_close(scaled[-3:], plain[-3:] / 40)  # low frequencies are interpolated
    assert ((scaled <= plain + 1e-12) & (scaled >= plain / 40 - 1e-12)).all()


def test_softmax_scale_has_yarn_mscale():
    cfg = get_preset("deepseek-v3")
    m = 0.1 * 1.0 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * m * m)
    assert get_preset("tiny").softmax_scale == pytest.approx(48**-0.5)


@pytest.mark.parametrize("name,total,activated,tol", [
    ("deepseek-v3", 671e9, 37e9, 0.02), ("deepseek-v2", 236e9, 21e9, 0.02),
    ("deepseek-v2-lite", 15.7e9, 2.4e9, 0.03),
])
def test_published_parameter_counts(name, total, activated, tol):
    counts = count_params(get_preset(name))
    assert abs(counts.total - total) / total < tol
    assert abs(counts.activated - activated) / activated < tol


def test_v3_mtp_parameters():
    counts = count_params(get_preset("deepseek-v3"))
    assert abs(counts.mtp - 14e9) / 14e9 < 0.05  # "MTP adds 14B" (with its embedding/head copies)
    assert 684e9 < counts.total + counts.mtp < 686e9  # the 685B of the published HF repository


def test_trainable_presets_sizes():
    tiny, small = count_params(get_preset("tiny")), count_params(get_preset("small"))
    assert 1e6 < tiny.total < 10e6
    assert 0.5e9 <= small.total <= 1e9 and 100e6 <= small.activated <= 200e6


@pytest.mark.parametrize("preset", ["tiny", "deepseek-v2-lite"])
def test_meta_device_count_matches_arithmetic(preset):
    cfg = get_preset(preset)
    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
    n_bias = sum(b.numel() for n, b in model.named_buffers() if "e_score" in n)
    c = count_params(cfg)
    assert model.num_parameters() + n_bias == c.total + c.mtp_unique


@pytest.mark.parametrize("bad,msg", [
    (dict(n_routed_experts=10, n_group=4), "divisible by n_group"),
    (dict(topk_group=5, n_group=4), "must not exceed n_group"),
    (dict(num_experts_per_tok=9, n_routed_experts=16, n_group=4, topk_group=2), "exceeds the experts"),
    (dict(kv_lora_rank=0), "kv_lora_rank must be a positive"),
    (dict(hidden_size=-1), "hidden_size must be a positive"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(qk_rope_head_dim=7), "even"),
])
def test_config_validation(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        small_cfg(**bad)


def test_config_json_round_trip(tmp_path):
    for name in ["deepseek-v3", "deepseek-v2-lite", "tiny"]:
        cfg = get_preset(name)
        cfg.save_json(tmp_path / "config.json")
        assert ModelConfig.from_json(tmp_path) == cfg


def test_moe_layer_shapes_and_shared_expert():
    cfg = small_cfg(n_shared_experts=2)
    moe = MoE(cfg)
    assert moe.shared_experts.gate_proj.out_features == 2 * cfg.moe_intermediate_size
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    y = moe(torch.randn(2, 5, cfg.hidden_size))
    assert y.shape == (2, 5, cfg.hidden_size) and torch.isfinite(y).all()


def test_experts_follow_autocast_dtype():
    """Under autocast the experts run in the autocast dtype, not in the FP32 of the residual stream."""
    torch.manual_seed(7)
    experts = GroupedExperts(4, 8, 6)
    for p in experts.parameters():
        torch.nn.init.normal_(p)
    x, idx, w = torch.randn(5, 8), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, idx, w)
    assert y.dtype == torch.bfloat16
    ref = experts_forward_loop(x, idx, w, experts.w_gate, experts.w_up, experts.w_down)
    assert ((y.float() - ref).norm() / ref.norm()) < 3e-2  # bf16 operands


@pytest.mark.parametrize("start_pos", [0, 5, 40])
def test_causal_at_any_start_position(start_pos):
    """Changing the last token never changes earlier positions' logits, with or without an offset."""
    torch.manual_seed(8)
    cfg = small_cfg()
    model = DeepseekForCausalLM(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(ids, start_pos), model(changed, start_pos)
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_chunk_at_offset_equals_rope_shifted_positions():
    """A chunk decoded at start_pos without a cache sees only itself, at positions start_pos.."""
    torch.manual_seed(9)
    cfg = small_cfg()
    model = DeepseekForCausalLM(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    with torch.no_grad():
        cache = LatentKVCache(cfg, 2, 16, dtype=torch.float64)
        model(torch.zeros(2, 4, dtype=torch.long), 0, cache)  # something else at positions 0..3
        with_cache = model(ids, 4, cache)
        alone = model(ids, 4)
    assert not torch.allclose(with_cache, alone)  # the cache adds context
    # RoPE is relative: the same chunk at offset 0 and offset 4 scores the same
    torch.testing.assert_close(alone, model(ids, 0), rtol=1e-8, atol=1e-8)


def test_empty_inputs_are_a_clear_error():
    model = DeepseekForCausalLM(small_cfg()).eval()
    for shape in [(0, 4), (2, 0)]:
        with pytest.raises(ValueError, match="non-empty"):
            model(torch.zeros(shape, dtype=torch.long))


def test_init_zeroes_biases_and_sets_norms_to_one():
    model = DeepseekForCausalLM(small_cfg(attention_bias=True))
    attn = model.model.layers[0].self_attn
    assert torch.equal(attn.o_proj.bias, torch.zeros_like(attn.o_proj.bias))
    assert torch.equal(attn.kv_a_layernorm.weight, torch.ones_like(attn.kv_a_layernorm.weight))
    assert attn.o_proj.weight.std() > 0


def test_mtp_against_independent_reference():
    """MTP depth 1 written out from the report: h'_i = W [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)]."""
    torch.manual_seed(10)
    cfg = small_cfg(num_nextn_predict_layers=1, aux_loss_alpha=0.0)
    model = DeepseekForCausalLM(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    mtp = model.mtp[0]
    with torch.no_grad():
        h = model.hidden_states(ids)
        got = model.mtp_logits(h, ids)[0]
        for i in range(ids.shape[1] - 1):  # the last position has no next token
            # module k=1 at position i sees h_i and the embedding of token i+1, over positions 0..i only
            emb = model.model.embed_tokens(ids[:, 1 : i + 2])

            def rms(x, w):
                return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

            x = torch.cat([rms(emb, mtp.enorm.weight), rms(h[:, : i + 1], mtp.hnorm.weight)], dim=-1)
            x = x @ mtp.eh_proj.weight.T
            cos, sin = model.rotary(0, i + 1)
            x = mtp.block(x, cos, sin)
            ref = rms(x[:, -1], mtp.norm.weight) @ model.lm_head.weight.T
            torch.testing.assert_close(got[:, i], ref)


def test_mtp_loss_skips_depths_without_targets():
    cfg = small_cfg(num_nextn_predict_layers=2)
    model = DeepseekForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 2))
    labels = torch.randint(0, cfg.vocab_size, (2, 2))
    out = model.compute_loss(ids, labels)
    assert torch.isfinite(out.loss)  # depth 2 has no target in a 2-token sequence


def test_experts_reject_unknown_impl_and_precision():
    experts = GroupedExperts(2, 4, 4)
    with pytest.raises(ValueError, match="impl"):
        experts.impl = "fast"
    with pytest.raises(ValueError, match="precision"):
        experts.precision = "fp16"
