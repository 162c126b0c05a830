"""Equal outputs to a peer implementation of the published checkpoint format, both ways: HF
transformers' DeepseekV3 / DeepseekV2 models load a checkpoint that coscale wrote, and coscale loads
one that HF transformers wrote with its own save_pretrained (its config.json in the transformers 5
layout: rope_parameters, head_dim, rope_interleave, ... and no MTP weights). Logits agree in float32.

Three members of the family: V3 with YaRN, rope_theta != 10000 and MTP declared; V2-Lite (softmax
gate, greedy top-k, no q_lora, YaRN mscale 0.707, norm_topk_prob false); V3 with a single expert group
(n_group = topk_group = 1), attention biases and plain RoPE. Sequences (96 tokens) are longer than the
YaRN configs' original_max_position_embeddings (32).
"""

import logging

import pytest
import torch

import coscale
from coscale.config import get_preset
from coscale.model import DeepseekForCausalLM

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=24,
             n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=64, first_k_dense_replace=1,
             max_position_embeddings=4096)
ORIGINAL_CONTEXT = 32
SEQ_LEN = 96  # > ORIGINAL_CONTEXT: YaRN's interpolated frequencies matter
YARN = {"type": "yarn", "factor": 8, "original_max_position_embeddings": ORIGINAL_CONTEXT, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
V2_YARN = {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}

CONFIGS = {
    "v3-yarn-mtp": ("deepseek-v3", dict(q_lora_rank=64, n_group=4, topk_group=2, num_nextn_predict_layers=1,
                                        quantization_config=None, rope_theta=50000.0, rope_scaling=YARN)),
    "v2-lite": ("deepseek-v2-lite", dict(routed_scaling_factor=1.7, rope_scaling=V2_YARN)),
    "v3-one-group": ("deepseek-v3", dict(q_lora_rank=64, n_group=1, topk_group=1, num_nextn_predict_layers=0,
                                         quantization_config=None, attention_bias=True, rope_scaling=None)),
}
# coscale-only keys, and keys HF's V3 class has no field for (its router is always sigmoid + noaux_tc)
NOT_IN_HF = {"architectures", "model_type", "quantization_config", "bias_update_speed", "mtp_loss_weight",
             "aux_loss_alpha", "seq_aux", "moe_layer_freq", "scoring_func", "rope_theta", "rope_scaling"}


def coscale_config(name):
    preset, extra = CONFIGS[name]
    return get_preset(preset, **SMALL, **extra)


def hf_native_config(cfg):
    """The same model as HF transformers' own config class (rope_parameters layout)."""
    kwargs = {k: v for k, v in cfg.to_dict().items() if k not in NOT_IN_HF}
    rope = {"rope_type": "default"}
    if cfg.rope_scaling:
        rope = {"rope_type": cfg.rope_scaling["type"], **{k: v for k, v in cfg.rope_scaling.items() if k != "type"}}
    kwargs["rope_parameters"] = {**rope, "rope_theta": cfg.rope_theta}
    if cfg.model_type == "deepseek_v2":
        return transformers.DeepseekV2Config(**kwargs)
    del kwargs["topk_method"]
    return transformers.DeepseekV3Config(**kwargs)


@torch.no_grad()
def randomize(model, seed=0):
    """Weights large enough that attention is far from uniform; norms, biases and router biases too
    (coscale and HF name them alike)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "norm" in name and name.endswith("weight"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif name.endswith("bias"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.05)
        elif t.is_floating_point() and t.ndim >= 2:
            t.copy_(torch.randn(t.shape, generator=g) * t.shape[-1] ** -0.5)


def tokens(cfg):
    return torch.randint(0, cfg.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def relative_error(ours, theirs):
    return ((ours - theirs).norm() / theirs.norm()).item()


# Same float32 arithmetic up to operation order: relative error at float32 rounding level (~1e-6 seen).
TOLERANCE = 2e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_transformers_loads_what_coscale_writes(tmp_path, name):
    cfg = coscale_config(name)
    model = DeepseekForCausalLM(cfg).eval()
    randomize(model)
    coscale.save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_theta"] == cfg.rope_theta
    ids = tokens(cfg)
    with torch.no_grad():
        assert relative_error(model(ids), hf(ids).logits) < TOLERANCE


@pytest.mark.parametrize("name", list(CONFIGS))
def test_coscale_loads_what_hf_transformers_writes(tmp_path, name, caplog):
    cfg = coscale_config(name)
    torch.manual_seed(0)
    v2 = cfg.model_type == "deepseek_v2"
    hf = (transformers.DeepseekV2ForCausalLM if v2 else transformers.DeepseekV3ForCausalLM)(hf_native_config(cfg))
    hf.eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="coscale"):
        loaded = coscale.from_pretrained(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("coscale")]
    assert loaded.config.rope_theta == cfg.rope_theta and loaded.config.rope_scaling == cfg.rope_scaling
    if cfg.num_nextn_predict_layers:  # HF saves no MTP layers: the main model loads, depth 0
        assert len(warnings) == 1 and "no MTP weights" in warnings[0] and "\n" not in warnings[0]
        assert loaded.config.num_nextn_predict_layers == 0 and len(loaded.mtp) == 0
    else:
        assert warnings == []  # every key HF wrote is known to coscale
    ids = tokens(cfg)
    with torch.no_grad():
        theirs = hf(ids).logits
        assert relative_error(loaded(ids), theirs) < TOLERANCE
        if cfg.rope_scaling:  # the test can fail: the RoPE settings dropped give other logits
            plain = DeepseekForCausalLM(loaded.config.replace(rope_theta=10000.0, rope_scaling=None)).eval()
            plain.load_state_dict(loaded.state_dict())
            assert relative_error(plain(ids), theirs) > 100 * TOLERANCE
