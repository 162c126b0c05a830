"""The step runner: eager, compiled and CUDA-graphed steps compute the same training step; the MoE
index building and the router never wait for the device (they trace without a graph break)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from coscale.config import get_preset
from coscale.errors import ConfigError
from coscale.fp8 import convert_to_fp8
from coscale.kernels.permute import build_permute_info
from coscale.model import DeepseekForCausalLM
from coscale.model.moe import Gate
from coscale.parallel.world import SingleProcess
from coscale.train.optim import build_optimizer
from coscale.train.step_runner import (
    StepMode,
    StepRunner,
    keep_fp8_layers_eager,
    resolve_step_mode,
    runs_fp8,
    set_learning_rate,
)

# Two layers (one dense, one MoE with MTP on top): every kind of block, small enough to trace in seconds.
SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
             n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, q_lora_rank=32,
             kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_attention_heads=2,
             num_key_value_heads=2)


def _losses(mode: StepMode, device: str = "cpu", steps: int = 4, moments: str = "fp32", fp8: bool = False,
            **overrides):
    cfg = get_preset("tiny", **(SMALL | overrides))
    torch.manual_seed(0)
    model = DeepseekForCausalLM(cfg).to(device)
    if fp8:
        model = convert_to_fp8(model, policy="all") or model
    model.train()
    optimizer = build_optimizer(model, lr=1e-3, moments_dtype=moments)
    runner = StepRunner(model, optimizer, SingleProcess(torch.device(device)), mode, gamma=1e-2, grad_clip=1.0,
                        autocast=contextlib.nullcontext, compile_backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    losses, biases = [], []
    for step in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=gen)
        metrics = runner((ids[:, :-1].to(device), ids[:, 1:].to(device)), lr=1e-3 * (step + 1))
        losses.append([float(metrics[k]) for k in ("loss", "total_loss", "mtp_loss", "aux_loss", "grad_norm")])
    for module in model.modules():
        if isinstance(module, Gate):
            biases.append(module.e_score_correction_bias.detach().cpu().clone())
    return torch.tensor(losses, dtype=torch.float64), torch.cat(biases), [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("moments", ["fp32", "bf16"])  # torch's AdamW; coscale's, its update compiled too
def test_compiled_step_matches_eager_on_cpu(moments):
    eager_losses, eager_bias, eager_params = _losses(StepMode(compile=False, cuda_graphs=False), moments=moments)
    losses, bias, params = _losses(StepMode(compile=True, cuda_graphs=False), moments=moments)
    assert torch.isfinite(eager_losses).all()
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    assert torch.equal(bias, eager_bias)  # sign updates: any difference would show as a multiple of gamma
    # Adam amplifies last-bit gradient differences of tiny entries; BF16 moments can round either way
    tolerance = 1e-5 if moments == "fp32" else 2e-4
    for a, b in zip(params, eager_params):
        assert float((a - b).norm() / b.norm()) < tolerance


def test_fp8_layers_run_eagerly_inside_the_compiled_step_and_match_eager():
    eager_losses, eager_bias, eager_params = _losses(StepMode(compile=False, cuda_graphs=False), fp8=True)
    losses, bias, params = _losses(StepMode(compile=True, cuda_graphs=False), fp8=True)
    assert torch.isfinite(eager_losses).all()
    # The compiled regions between the FP8 layers round their last bits differently from eager; where
    # that moves a value across an E4M3 rounding boundary one element changes by a whole FP8 step
    # (6-12%), a few 1e-4 of a loss or a gradient norm at this size. Anything structural (a layer
    # skipped, stale FP8 weights) changes losses by far more than 2e-3.
    torch.testing.assert_close(losses, eager_losses, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(bias, eager_bias)  # sign updates of the same loads
    # Adam turns such tiny gradient differences of near-zero entries into whole steps of size lr: a few
    # elements move differently (0.6% of the norm here), where a skipped update would move them all.
    for p, q in zip(params, eager_params):
        assert float((p - q).norm() / q.norm()) < 2e-2


def test_keep_fp8_layers_eager_marks_each_fp8_layer_once():
    cfg = get_preset("tiny", **SMALL)
    model = convert_to_fp8(DeepseekForCausalLM(cfg), policy="all")
    fp8_layers = [m for m in model.modules() if runs_fp8(m)]
    assert fp8_layers and any(getattr(m, "precision", None) == "fp8" for m in fp8_layers)
    assert keep_fp8_layers_eager(model) == len(fp8_layers)
    assert keep_fp8_layers_eager(model) == 0  # idempotent
    # only the kernels are left eager: the forward's autocast cast stays in the compiled graph
    for m in fp8_layers:
        assert "run_kernels" in vars(m) and "forward" not in vars(m)
    assert keep_fp8_layers_eager(DeepseekForCausalLM(cfg)) == 0  # a BF16 model has none


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_graphed_step_replays_what_it_captured_on_cuda(compile, moments):
    """A replayed step runs the kernels the ungraphed step launches: the same losses, bias updates and
    weights, step after step (the warm-up steps, the captured step and four replays)."""
    plain_losses, plain_bias, plain_params = _losses(StepMode(compile=compile, cuda_graphs=False), "cuda", steps=7,
                                                     moments=moments)
    losses, bias, params = _losses(StepMode(compile=compile, cuda_graphs=True), "cuda", steps=7, moments=moments)
    torch.testing.assert_close(losses, plain_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias, plain_bias)
    for a, b in zip(params, plain_params):
        assert float((a - b).norm() / b.norm()) < 1e-5


def test_learning_rate_lives_in_a_device_tensor_when_captured():
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(model, lr=1e-3)
    set_learning_rate(optimizer, 2e-3)
    assert optimizer.param_groups[0]["lr"] == 2e-3
    optimizer.param_groups[0]["lr"] = torch.tensor(0.0)
    set_learning_rate(optimizer, 5e-4)
    lr = optimizer.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and float(lr) == pytest.approx(5e-4)


def test_step_mode_defaults_and_refusals():
    cpu = SingleProcess(torch.device("cpu"))
    assert resolve_step_mode(None, None, cpu) == StepMode(compile=False, cuda_graphs=False)
    assert resolve_step_mode(True, None, cpu) == StepMode(compile=True, cuda_graphs=False)
    assert resolve_step_mode(None, False, cpu) == StepMode(compile=False, cuda_graphs=False)
    cuda = SingleProcess(torch.device("cuda"))  # (no device is touched)
    assert resolve_step_mode(None, None, cuda) == StepMode(compile=True, cuda_graphs=True)
    assert resolve_step_mode(True, True, cuda) == StepMode(compile=True, cuda_graphs=True)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_step_mode(None, True, cpu)
    assert "eager" in StepMode(False, False).describe()
    assert "CUDA graph" in StepMode(True, True).describe()


@pytest.mark.parametrize("preset,policy,expected", [("small", "auto", False), ("small", "all", True),
                                                     ("proxy-v3", "auto", True), ("tiny", "auto", False)])
def test_which_models_fp8_converts_is_known_before_building_them(preset, policy, expected):
    from coscale.fp8 import FP8Linear, convert_to_fp8
    from coscale.fp8.policy import converts_any_layer

    cfg = get_preset(preset)
    assert converts_any_layer(cfg, policy) is expected
    if preset != "proxy-v3":  # build and convert the small ones to check the prediction
        model = convert_to_fp8(DeepseekForCausalLM(cfg.replace(num_hidden_layers=2)), policy=policy) \
            or DeepseekForCausalLM(cfg)
        converted = any(isinstance(m, FP8Linear) or getattr(m, "precision", "bf16") == "fp8"
                        for m in model.modules())
        assert converted is expected


def test_moe_routing_and_index_building_trace_without_a_graph_break():
    """fullgraph=True fails on any .item(), .tolist(), bool(tensor) or data-dependent shape: what would
    make the host wait for the device inside a step (and break a CUDA-graph capture)."""
    cfg = get_preset("tiny", **SMALL)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight)
    gate.train()

    def route(x):
        topk_idx, weights, _ = gate(x)
        info = build_permute_info(topk_idx, cfg.n_routed_experts, align=16)
        return info.pair_row, info.row_pair, info.group_end_offsets, weights

    x = torch.randn(37, cfg.hidden_size)
    eager = route(x)
    gate.expert_load.zero_()
    traced = torch.compile(route, fullgraph=True, backend="eager")(x)
    for a, b in zip(traced, eager):
        assert torch.equal(a, b)
    assert float(gate.expert_load.sum()) == x.shape[0] * cfg.num_experts_per_tok


def test_training_cli_takes_the_step_mode(tmp_path):
    from coscale.cli import main

    rc = main(["train", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--out", str(tmp_path / "r"),
               "--eval-batches", "1", "--no-progress", "--no-tensorboard", "--cuda-graphs"])
    if torch.cuda.is_available():
        assert rc == 0
    else:
        assert rc == 2
        assert not (tmp_path / "r").exists()  # refused before anything was written


def test_fp8_graph_breaks_do_not_recompile_per_layer():
    """Each FP8 layer is a graph break; the code resumed after it must not be specialised per layer (past
    torch.compile's recompile limit of 8 the remaining layers would run uncompiled, as the engine's
    decode did once): compiling 12 layers makes no more graphs than compiling 6."""
    from torch._dynamo.utils import counters

    graphs = []
    for layers in (6, 12):
        torch._dynamo.reset()
        counters.clear()
        _losses(StepMode(compile=True, cuda_graphs=False), steps=1, fp8=True, num_hidden_layers=layers)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0], graphs


def test_a_deep_copy_of_a_model_with_eager_fp8_layers_uses_its_own_weights():
    import copy

    model = convert_to_fp8(DeepseekForCausalLM(get_preset("tiny", **SMALL)), policy="all")
    keep_fp8_layers_eager(model)
    from coscale.fp8.linear import FP8Linear

    layer = next(m for m in model.modules() if isinstance(m, FP8Linear))
    assert layer._eager_under_compile
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight.zero_()
    x = torch.randn(3, layer.in_features)
    assert torch.count_nonzero(twin(x) - (twin.bias if twin.bias is not None else 0)) == 0
    assert torch.count_nonzero(layer(x)) > 0
