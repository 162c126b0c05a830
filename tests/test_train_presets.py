"""The proxy-v3 preset: DeepSeek-V3's layer shapes with 4 layers and 16 experts, sized for one H200."""

import torch

from coscale.config import ModelConfig, get_preset, preset_names
from coscale.model import DeepseekForCausalLM
from coscale.param_count import count_params

V3_WIDTHS = ("hidden_size", "vocab_size", "intermediate_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
             "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_intermediate_size", "n_shared_experts",
             "topk_method", "scoring_func", "routed_scaling_factor", "norm_topk_prob", "num_nextn_predict_layers")


def test_proxy_v3_has_v3_widths_and_the_torchtitan_comparison_shape():
    proxy, v3 = get_preset("proxy-v3"), get_preset("deepseek-v3")
    for name in V3_WIDTHS:
        assert getattr(proxy, name) == getattr(v3, name), name
    assert (proxy.num_hidden_layers, proxy.first_k_dense_replace, proxy.n_routed_experts,
            proxy.num_experts_per_tok, proxy.n_group, proxy.topk_group) == (4, 1, 16, 4, 4, 2)
    assert proxy.rope_scaling is None and proxy.max_position_embeddings == 4096
    assert proxy.quantization_config is None  # trained from scratch, not a published FP8 checkpoint
    assert "proxy-v3" in preset_names()


def test_proxy_v3_parameter_count_and_the_module_agree():
    cfg = get_preset("proxy-v3")
    counts = count_params(cfg)
    assert 5.1e9 < counts.total < 5.4e9 and 0.95e9 < counts.mtp_unique < 1.1e9  # "about 5.2B + 1.0B MTP"
    with torch.device("meta"):  # shapes only: no 25 GB of weights on a CPU test machine
        model = DeepseekForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    router_biases = sum(b.numel() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))
    assert params + router_biases == counts.total + counts.mtp_unique  # the biases are buffers, not parameters
    # every GEMM has V3's shape: the routed experts and the MLA projections
    assert tuple(model.model.layers[1].mlp.experts.w_gate.shape) == (16, 2048, 7168)
    attn = model.model.layers[0].self_attn
    shapes = {tuple(p.shape) for p in attn.parameters() if p.dim() == 2}
    assert {(1536, 7168), (576, 7168), (128 * 192, 1536), (7168, 128 * 128)} <= shapes


def test_proxy_v3_config_round_trips(tmp_path):
    cfg = get_preset("proxy-v3")
    cfg.save_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path) == cfg


def test_info_lists_proxy_v3(capsys):
    from coscale.cli import main

    assert main(["info"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("proxy-v3"))
    assert "5.24B" in row and "7168" in row and "4/16" in row
