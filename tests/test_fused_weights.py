"""One GEMM for several projections of x at inference (coscale.model.fused_weights): MLA's q / q_a with kv_a, and
SwiGLU's gate with up. Same outputs, the same parameter objects, no second copy, never a stale stacked tensor."""

import dataclasses

import pytest
import torch
from torch import nn

from coscale.config import get_preset
from coscale.infer.layers import use_decode_kernels
from coscale.model.fused_weights import concatenate_weights, is_stacked
from coscale.model.mla import MLA
from coscale.model.moe import MLP
from coscale.model.transformer import DeepseekForCausalLM


def _model(q_lora_rank, seed=0):
    cfg = dataclasses.replace(get_preset("tiny"), q_lora_rank=q_lora_rank)
    torch.manual_seed(seed)
    model = DeepseekForCausalLM(cfg)
    model.init_weights()
    return model.eval()


def _stacking(model):
    return [m for m in model.modules() if isinstance(m, (MLA, MLP))]


def _logits(model, ids, stacked: bool):
    use_decode_kernels(model, "auto" if stacked else "torch")
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("q_lora_rank", [None, 64])
def test_stacked_projections_give_the_same_logits_and_keep_the_parameters(q_lora_rank):
    model = _model(q_lora_rank, seed=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    keys = sorted(model.state_dict())
    params = list(model.parameters())
    ref = _logits(model, ids, stacked=False)
    fused = _logits(model, ids, stacked=True)
    modules = _stacking(model)
    assert modules and all(m.stacked_weight is not None for m in modules)
    # rows of one float32 GEMM against two: the same dot products on every row
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    assert sorted(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params))  # an optimizer's parameters stay the model's
    attn = next(m for m in modules if isinstance(m, MLA))
    first = attn.stacked_layers()[0]
    assert first.weight.data_ptr() == attn.stacked_weight.data_ptr()  # a view, not a copy
    with torch.no_grad():
        first.weight.mul_(0.5)  # an in-place change (an optimizer step) reaches the stacked weight
    assert torch.equal(attn.stacked_weight[: first.weight.shape[0]], first.weight)
    # with gradients the layers run one by one, and their weights get gradients
    model(ids).float().pow(2).mean().backward()
    mlp = next(m for m in modules if isinstance(m, MLP))
    assert first.weight.grad is not None and mlp.stacked_layers()[0].weight.grad is not None
    use_decode_kernels(model, "torch")
    assert all(m.stacked_weight is None for m in modules)


def test_the_stacked_weight_follows_moves_and_loads():
    model = _model(None, seed=2)
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    use_decode_kernels(model, "auto")
    before = [m.stacked_weight for m in _stacking(model)]
    model.to("cpu")  # nothing moves: no copy
    assert all(m.stacked_weight is b for m, b in zip(_stacking(model), before))
    model.to(torch.float64)  # every parameter converted on its own: the module stacks them again
    assert all(is_stacked(m.stacked_weight, *m.stacked_layers()) for m in _stacking(model))
    assert all(m.stacked_weight.dtype == torch.float64 for m in _stacking(model))
    other = _model(None, seed=3).to(torch.float64).state_dict()
    for assign in (False, True):
        use_decode_kernels(model, "auto")
        model.load_state_dict(other, assign=assign)
        assert all(is_stacked(m.stacked_weight, *m.stacked_layers()) for m in _stacking(model)), assign
        fused = _logits(model, ids, stacked=True)
        torch.testing.assert_close(fused, _logits(model, ids, stacked=False), rtol=1e-12, atol=1e-12)
    mlp = next(m for m in _stacking(model) if isinstance(m, MLP))
    use_decode_kernels(model, "auto")
    mlp.gate_proj.weight = nn.Parameter(torch.randn_like(mlp.gate_proj.weight))  # replaced by hand
    assert not is_stacked(mlp.stacked_weight, *mlp.stacked_layers())
    assert mlp.stack_weights() and is_stacked(mlp.stacked_weight, *mlp.stacked_layers())  # stacking again


def test_layers_that_do_not_qualify_are_left_alone():
    with_bias = nn.Linear(8, 4)
    plain = nn.Linear(8, 3, bias=False)
    before = plain.weight.data_ptr()
    assert concatenate_weights(with_bias, plain) is None and plain.weight.data_ptr() == before
    assert concatenate_weights(nn.Linear(8, 4, bias=False), nn.Linear(6, 4, bias=False)) is None  # in_features
    half = nn.Linear(8, 4, bias=False).to(torch.bfloat16)
    assert concatenate_weights(half, plain) is None  # dtypes differ
    assert concatenate_weights(nn.Identity(), plain) is None  # e.g. an FP8 inference layer
    a, b = nn.Linear(8, 4, bias=False), nn.Linear(8, 2, bias=False)
    wa, wb, pa = a.weight.detach().clone(), b.weight.detach().clone(), a.weight
    stacked = concatenate_weights(a, b)
    assert stacked.shape == (6, 8) and torch.equal(stacked, torch.cat([wa, wb])) and is_stacked(stacked, a, b)
    assert a.weight is pa and torch.equal(a.weight, wa) and torch.equal(b.weight, wb)
    assert not is_stacked(stacked, b, a)  # order matters
