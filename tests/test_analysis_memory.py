"""Per-GPU memory: hand cases, ZeRO stages, inference, layout validation."""

import pytest

from coscale.analysis.memory import ParallelLayout, inference_memory_per_gpu, memory_per_gpu
from coscale.analysis.models import DenseModelSpec, as_view
from coscale.errors import ConfigError

TOY = DenseModelSpec(name="toy", hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=4, intermediate_size=16, vocab_size=10)
P = 1352  # toy parameters, see test_analysis_models


def test_toy_training_by_hand():
    m = memory_per_gpu(TOY, ParallelLayout(dp=2, zero=1), seq_len=16, micro_batch=1)
    assert m.weights == P * 2  # BF16, replicated
    assert m.gradients == P * 4  # FP32, replicated under ZeRO-1
    assert m.master_weights == P / 2 * 4  # FP32, sharded over dp = 2
    assert m.optimizer_moments == P / 2 * 2 * 2  # two BF16 moments, sharded
    assert m.activations == 34 * 16 * 1 * 8 * 2
    assert m.kv_cache == 0


def test_zero_stages_never_increase_memory():
    totals = [memory_per_gpu("deepseek-v3", ParallelLayout(dp=128, pp=16, ep=64, zero=z)).total
              for z in range(4)]
    assert totals == sorted(totals, reverse=True)


def test_expert_sharding_over_ep():
    v = as_view("deepseek-v3")
    m = memory_per_gpu(v, ParallelLayout(dp=128, pp=16, ep=64, zero=0), master=None, grads="bf16",
                       moments="bf16", activation_coeff=0)
    local = v.non_expert_params / 16 + v.routed_expert_params / (64 * 16)
    assert m.weights == pytest.approx(local * 2)
    assert m.total == pytest.approx(local * (2 + 2 + 4))


def test_fp8_weights_halve_the_weight_bytes():
    bf16 = memory_per_gpu("deepseek-v3", ParallelLayout(dp=128, pp=16, ep=64), weights="bf16")
    fp8 = memory_per_gpu("deepseek-v3", ParallelLayout(dp=128, pp=16, ep=64), weights="fp8")
    assert fp8.weights == bf16.weights / 2


def test_inference_by_hand():
    m = inference_memory_per_gpu("llama3.1-70b", ParallelLayout(tp=8, zero=0), batch=4, context=1000,
                                 weight_dtype="bf16", kv_dtype="bf16")
    v = as_view("llama3.1-70b")
    assert m.weights == pytest.approx(v.total_params / 8 * 2)
    assert m.kv_cache == 4 * 1000 * (80 * 8 * 128 * 2 * 2) / 8  # KV heads split over TP
    assert "b200" in m.fits()


def test_mla_cache_not_split_over_tp():
    m = inference_memory_per_gpu("deepseek-v2-lite", ParallelLayout(tp=2, zero=0), batch=2, context=10)
    assert m.kv_cache == 2 * 10 * 27 * 576 * 2


def test_fits_nowhere():
    assert memory_per_gpu("llama3.1-405b", ParallelLayout()).fits() == []


@pytest.mark.parametrize("layout", [
    ParallelLayout(ep=64),  # ep does not divide dp x tp
    ParallelLayout(dp=512, ep=512),  # more EP ranks than routed experts: some GPU would hold none
    ParallelLayout(dp=8, ep=8, redundant_experts=-1),
    ParallelLayout(pp=100),  # more stages than layers
    ParallelLayout(tp=3),  # does not divide 128 heads
    ParallelLayout(dp=0),
    ParallelLayout(zero=4),
])
def test_inconsistent_layouts(layout):
    with pytest.raises(ConfigError):
        memory_per_gpu("deepseek-v3", layout)


def test_ep_on_dense_model_rejected():
    with pytest.raises(ConfigError, match="dense"):
        memory_per_gpu("llama3.1-70b", ParallelLayout(dp=2, ep=2))


def test_bad_precision():
    with pytest.raises(ConfigError, match="precision"):
        memory_per_gpu("tiny", weights="int3")


def test_any_ep_size_with_redundant_experts():
    # The EP sizes: 72, 144, 320 GPUs; (routed + redundant) / ep experts per GPU, rounded up.
    v = as_view("deepseek-v3")
    moe_layers = v.layers - 3
    for ep, redundant, per_gpu in ((72, 32, 4), (144, 32, 2), (320, 64, 1), (6, 0, 43)):
        layout = ParallelLayout(dp=ep, ep=ep, zero=0, redundant_experts=redundant)
        assert layout.experts_per_gpu(v) == per_gpu == -(-(256 + redundant) // ep)
        m = inference_memory_per_gpu(v, layout, batch=ep, context=16)
        expected = v.non_expert_params + per_gpu * v.expert_params * moe_layers  # FP8: 1 byte per weight
        assert m.weights == pytest.approx(expected)


def test_redundant_experts_need_an_moe_model():
    with pytest.raises(ConfigError, match="dense"):
        memory_per_gpu("llama3.1-70b", ParallelLayout(dp=2, redundant_experts=4))
