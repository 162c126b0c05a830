"""One GEMM for two projections of x at inference (coscale.model.fused_weights): MLA's q / q_a with kv_a, and
SwiGLU's gate with up. Same outputs, same parameters, no second copy of the weights."""

import dataclasses

import pytest
import torch
from torch import nn

from coscale.config import get_preset
from coscale.infer.layers import use_decode_kernels
from coscale.model.fused_weights import concatenate_weights
from coscale.model.mla import MLA
from coscale.model.moe import MLP
from coscale.model.transformer import DeepseekForCausalLM


def _model(q_lora_rank, seed=0):
    cfg = dataclasses.replace(get_preset("tiny"), q_lora_rank=q_lora_rank)
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(cfg)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize("q_lora_rank", [None, 64])
def test_fused_projections_give_the_same_logits_and_keep_the_parameters(q_lora_rank):
    model = _model(q_lora_rank, seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    keys = sorted(model.state_dict())
    numel = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        ref = model(ids)
        use_decode_kernels(model, "auto")
        fused = model(ids)
    attn = [m for m in model.modules() if isinstance(m, MLA)]
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    assert attn and mlps and all(m.qkv_a_weight is not None for m in attn)
    assert all(m.gate_up_weight is not None for m in mlps)
    # rows of one float32 GEMM against two: the same dot products, summed the same way on every row
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    assert sorted(model.state_dict()) == keys and sum(p.numel() for p in model.parameters()) == numel
    first = attn[0].q_a_proj if q_lora_rank else attn[0].q_proj
    assert first.weight.data_ptr() == attn[0].qkv_a_weight.data_ptr()  # a view, not a copy
    with torch.no_grad():
        first.weight.mul_(0.5)  # an in-place change reaches the stacked weight
    assert torch.equal(attn[0].qkv_a_weight[: first.weight.shape[0]], first.weight)
    # with gradients the layers run as they are, and their weights get gradients
    model(ids).float().pow(2).mean().backward()
    assert first.weight.grad is not None and mlps[0].gate_proj.weight.grad is not None
    use_decode_kernels(model, "torch")
    assert all(m.qkv_a_weight is None for m in attn) and all(m.gate_up_weight is None for m in mlps)


def test_layers_that_do_not_qualify_are_left_alone():
    with_bias = nn.Linear(8, 4)
    plain = nn.Linear(8, 3, bias=False)
    before = plain.weight
    assert concatenate_weights(with_bias, plain) is None and plain.weight is before
    assert concatenate_weights(nn.Linear(8, 4, bias=False), nn.Linear(6, 4, bias=False)) is None  # in_features
    half = nn.Linear(8, 4, bias=False).to(torch.bfloat16)
    assert concatenate_weights(half, plain) is None  # dtypes differ
    assert concatenate_weights(nn.Identity(), plain) is None  # e.g. an FP8 inference layer
    a, b = nn.Linear(8, 4, bias=False), nn.Linear(8, 2, bias=False)
    wa, wb = a.weight.detach().clone(), b.weight.detach().clone()
    stacked = concatenate_weights(a, b)
    assert stacked.shape == (6, 8) and torch.equal(stacked, torch.cat([wa, wb]))
    assert isinstance(a.weight, nn.Parameter) and torch.equal(a.weight, wa) and torch.equal(b.weight, wb)
