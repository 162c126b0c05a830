"""Equal outputs to a peer implementation of the published checkpoint format: HF transformers'
DeepseekV3 / DeepseekV2 models load a checkpoint that coscale wrote and must give the same logits."""

import pytest
import torch

from coscale.config import get_preset
from coscale.model import DeepseekForCausalLM

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=24,
             n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=64, first_k_dense_replace=1,
             max_position_embeddings=4096)
YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


@pytest.mark.parametrize("preset,extra", [
    ("deepseek-v3", dict(q_lora_rank=64, n_group=4, topk_group=2, num_nextn_predict_layers=1,
                         quantization_config=None, rope_scaling=YARN)),
    ("deepseek-v2-lite", dict(routed_scaling_factor=1.7)),
])
def test_logits_equal_hf_transformers(tmp_path, preset, extra):
    torch.manual_seed(0)
    cfg = get_preset(preset, **SMALL, **extra)
    model = DeepseekForCausalLM(cfg).eval()
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "e_score_correction_bias", None) is not None:
                module.e_score_correction_bias.normal_(0, 0.05)  # make the bias change selections
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    # Same float32 arithmetic up to operation order: relative error at float32 rounding level.
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5
