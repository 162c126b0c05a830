"""FP8 checkpoints served in FP8 (FP8InferenceLinear, FP8InferenceExperts)."""

import pytest
import torch

from coscale.checkpoint import from_pretrained, save_pretrained
from coscale.config import get_preset
from coscale.fp8 import convert_to_fp8
from coscale.infer.engine import Engine, EngineConfig
from coscale.infer.layers import FP8InferenceExperts, FP8InferenceLinear
from coscale.infer.loading import load_for_inference
from coscale.infer.sampling import SamplingParams
from coscale.model import DeepseekForCausalLM


def fp8_config():
    return get_preset("tiny", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2,
                      q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
                      n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, n_group=2, topk_group=1,
                      vocab_size=256)


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fp8") / "ckpt"
    model = DeepseekForCausalLM(fp8_config())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)  # weights of a useful scale, so the logits are not all near zero
    save_pretrained(model, path, fp8=True)
    return str(path)


def test_fp8_checkpoint_is_served_in_fp8(fp8_checkpoint):
    model = load_for_inference(fp8_checkpoint, torch.float32, torch.device("cpu"))
    attn = model.model.layers[1].self_attn
    assert isinstance(attn.q_b_proj, FP8InferenceLinear) and attn.q_b_proj.weight.dtype == torch.float8_e4m3fn
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, FP8InferenceExperts) and experts.w_gate.dtype == torch.float8_e4m3fn
    assert isinstance(model.model.layers[0].mlp.gate_proj, FP8InferenceLinear)  # the dense FFN too
    assert model.lm_head.weight.dtype == torch.float32  # the head stays in high precision
    dequantized = from_pretrained(fp8_checkpoint, dtype=torch.float32)  # the same weights in FP32
    recipe = convert_to_fp8(from_pretrained(fp8_checkpoint, dtype=torch.float32))  # the training recipe
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(ids)  # FP8 GEMMs (1x128 activation tiles) on the checkpoint's FP8 weights
        exact, fp8_recipe = dequantized(ids), recipe(ids)
    # Requantizing the dequantized weights gives back the checkpoint's bytes, so serving equals the
    # training recipe's FP8 forward; both differ from FP32 by the activations' quantization.
    torch.testing.assert_close(got, fp8_recipe, rtol=1e-6, atol=1e-6)
    assert 0 < ((got - exact).norm() / exact.norm()).item() < 0.15


def test_engine_from_an_fp8_checkpoint(fp8_checkpoint):
    engine = Engine.from_pretrained(fp8_checkpoint, EngineConfig(block_size=8, num_blocks=16), device="cpu")
    engine.add_request("a", [1, 2, 3, 4], SamplingParams(5, 0.0))
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    assert len(tokens) == 5 and all(0 <= t < 256 for t in tokens)
    assert engine.stats().used_blocks == 0
