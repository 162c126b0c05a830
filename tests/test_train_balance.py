"""Expert-load balance: MaxVio against a float64 reference, its place in the step's metrics (sync-free), the
held-out MaxVio_global, the bias update with a device-tensor gamma, and the run-scaled default gamma."""

import contextlib
import math
import sys

import pytest
import torch

from coscale.config import get_preset
from coscale.model import DeepseekForCausalLM, update_router_biases
from coscale.parallel.world import SingleProcess
from coscale.train.balance import (
    balance_metrics,
    counting_expert_loads,
    default_bias_update_speed,
    load_balance,
    max_violation,
    moe_gates,
)
from coscale.train.step import Evaluation, evaluate, metrics_record


def small_model(**changes):
    """`tiny` shrunk: 3 layers (1 dense, 2 MoE with 8 experts, top-2) + one MTP module (MoE too)."""
    cfg = get_preset(
        "tiny", num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=2,
        num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2,
        topk_group=1, **changes,
    )
    torch.manual_seed(0)
    return DeepseekForCausalLM(cfg)


def reference_maxvio(loads) -> list[float]:
    """max / mean - 1 per row, in float64 on the host; NaN for a row without tokens."""
    out = []
    rows = torch.stack(list(loads)) if isinstance(loads, list) and torch.is_tensor(loads[0]) else loads
    for row in torch.as_tensor(rows, dtype=torch.float64).tolist():
        mean = sum(row) / len(row)
        out.append(max(row) / mean - 1 if mean > 0 else math.nan)
    return out


def test_max_violation_matches_the_reference_on_random_loads():
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 16), (4, 8), (3, 256), (2, 3, 7)]:
        loads = torch.randint(0, 1000, shape, generator=gen).float()
        got = max_violation(loads)
        assert got.shape == shape[:-1]
        expected = torch.tensor(reference_maxvio(loads.reshape(-1, shape[-1])), dtype=torch.float64)
        torch.testing.assert_close(got.double().flatten(), expected, rtol=1e-6, atol=0)


def test_max_violation_edge_cases():
    E, K, T = 16, 4, 100
    collapsed = torch.zeros(E)
    collapsed[:K] = T  # one group of K experts takes every token: the worst case E / K - 1
    assert max_violation(collapsed).item() == pytest.approx(E / K - 1)
    assert max_violation(torch.full((E,), 7.0)).item() == 0.0  # a perfectly even split
    assert math.isnan(max_violation(torch.zeros(E)).item())  # no token routed: undefined, not 0 or inf
    huge = torch.tensor([3e38, 1e38, 1e38, 1e38])  # counts near float32's limit stay finite
    assert max_violation(huge).item() == pytest.approx(reference_maxvio([huge.tolist()])[0], rel=1e-5)
    one = torch.tensor([5.0, 0.0, 0.0, 0.0])  # some experts empty: max / mean still defined
    assert max_violation(one).item() == pytest.approx(3.0)


def test_balance_metrics_leave_out_layers_without_tokens():
    loads = torch.tensor([[4.0, 4, 4, 4], [8, 0, 4, 4], [0, 0, 0, 0]])  # the last layer saw nothing
    m = balance_metrics(loads, ["layer1", "layer2", "mtp1"])
    assert m["maxvio"].item() == pytest.approx(1.0) and m["maxvio_mean"].item() == pytest.approx(0.5)
    assert m["moe_load_max_over_mean"].item() == pytest.approx(2.0)
    assert m["maxvio/layer1"].item() == 0.0 and math.isnan(m["maxvio/mtp1"].item())
    assert m["moe_all_experts_loaded"].item() == 0.0 and m["moe_any_routed"].item() == 1.0
    record = metrics_record({"loss": 1.0, "total_loss": 1.0, "mtp_loss": math.nan, "aux_loss": 0.0,
                             "grad_norm": 1.0, **{k: v.item() for k, v in m.items()}})
    assert record["maxvio"] == pytest.approx(1.0) and record["moe_load_max_over_min"] is None
    assert record["maxvio_layers"] == {"layer1": 0.0, "layer2": pytest.approx(1.0), "mtp1": None}
    nothing = balance_metrics(torch.zeros(2, 4), ["layer1", "layer2"])
    assert math.isnan(nothing["maxvio"].item()) and nothing["moe_any_routed"].item() == 0.0


def test_layer_labels():
    model = small_model()
    assert [label for label, _ in moe_gates(model)] == ["layer1", "layer2", "mtp1"]
    assert moe_gates(DeepseekForCausalLM(get_preset("tiny", n_routed_experts=None, hidden_size=64,
                                                     num_hidden_layers=1))) == []


def _reference_loads(model, input_ids, run):
    """Tokens per expert per router, counted from the routers' own outputs (not from their counters)."""
    picks = {}
    handles = [gate.register_forward_hook(lambda g, i, out, label=label: picks.setdefault(label, []).append(out[0]))
               for label, gate in moe_gates(model)]
    try:
        run(input_ids)
    finally:
        for h in handles:
            h.remove()
    E = model.config.n_routed_experts
    return {label: sum(torch.bincount(idx.flatten(), minlength=E) for idx in found).double()
            for label, found in picks.items()}


def test_load_balance_is_the_batch_maxvio_of_the_routers_counts():
    model = small_model().train()
    input_ids = torch.randint(0, 256, (3, 24))
    loads = _reference_loads(model, input_ids, lambda ids: model.compute_loss(ids, ids))
    balance = load_balance(model)
    for label, row in loads.items():
        assert balance[f"maxvio/{label}"].item() == pytest.approx(reference_maxvio([row])[0], rel=1e-6)
    per_layer = [reference_maxvio([row])[0] for row in loads.values()]
    assert balance["maxvio"].item() == pytest.approx(max(per_layer), rel=1e-6)
    assert balance["maxvio_mean"].item() == pytest.approx(sum(per_layer) / len(per_layer), rel=1e-6)
    assert all(t.dim() == 0 for t in balance.values())


def test_counting_expert_loads_in_evaluation_and_hooks_removed():
    model = small_model().eval()
    input_ids = torch.randint(0, 256, (2, 16))
    expected = _reference_loads(model, input_ids, model)  # the forward pass without MTP
    with counting_expert_loads(model) as loads:
        model(input_ids)
    labels = [label for label, _ in moe_gates(model)]
    for row, label in enumerate(labels):
        want = expected.get(label, torch.zeros(model.config.n_routed_experts, dtype=torch.float64))
        torch.testing.assert_close(loads[row].double(), want)
    assert loads[labels.index("mtp1")].sum() == 0  # evaluation does not run the MTP module
    assert all(not gate._forward_hooks for _, gate in moe_gates(model))
    with counting_expert_loads(DeepseekForCausalLM(get_preset("tiny", n_routed_experts=None, hidden_size=64,
                                                                num_hidden_layers=1))) as none:
        assert none is None


def test_evaluate_reports_maxvio_global_over_all_held_out_tokens():
    model = small_model()
    batches = [(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))) for _ in range(3)]
    world = SingleProcess(torch.device("cpu"))
    result = evaluate(model, batches, world)
    assert model.training  # evaluate restores the mode it found
    model.eval()
    totals = {}
    for input_ids, _ in batches:
        for label, row in _reference_loads(model, input_ids, model).items():
            totals[label] = totals.get(label, 0) + row
    reference = {label: reference_maxvio([row])[0] for label, row in totals.items()}
    assert set(result.maxvio_layers) == set(reference) == {"layer1", "layer2"}  # no MTP in evaluation
    for label, value in reference.items():
        assert result.maxvio_layers[label] == pytest.approx(value, rel=1e-6)
    assert result.maxvio == pytest.approx(max(reference.values()), rel=1e-6)
    assert result.record()["val_maxvio_mean"] == pytest.approx(sum(reference.values()) / 2, rel=1e-6)
    dense = DeepseekForCausalLM(get_preset("tiny", n_routed_experts=None, hidden_size=64, num_hidden_layers=1))
    plain = evaluate(dense, batches, world)
    assert plain.maxvio is None and set(plain.record()) == {"val_loss"}
    assert isinstance(result, Evaluation) and result.loss > 0


def test_evaluate_in_chunks_of_tokens_gives_the_same_loss_and_maxvio(monkeypatch):
    """A large vocabulary is evaluated a row at a time, the output head over a few tokens at a time
    (bounded logits); the loss is the plain forward's and MaxVio does not change with the chunk size."""
    import torch.nn.functional as F

    import coscale.train.step as step_module

    model = small_model()
    batches = [(torch.randint(0, 256, (3, 16)), torch.randint(0, 256, (3, 16))) for _ in range(2)]
    world = SingleProcess(torch.device("cpu"))
    whole = evaluate(model, batches, world)
    model.eval()
    with torch.no_grad():
        plain = torch.stack([F.cross_entropy(model(ids).flatten(0, 1).double(), lab.flatten(), reduction="sum")
                             for ids, lab in batches]).sum() / sum(lab.numel() for _, lab in batches)
    model.train()
    monkeypatch.setattr(step_module, "EVAL_LOGITS_PER_CHUNK", 5 * 256)  # 5 tokens at a time: ragged chunks
    chunked = evaluate(model, batches, world)
    assert whole.loss == pytest.approx(float(plain), rel=1e-5)
    assert chunked.loss == pytest.approx(whole.loss, rel=1e-6)
    assert chunked.maxvio == pytest.approx(whole.maxvio, rel=1e-6)
    assert chunked.maxvio_layers == pytest.approx(whole.maxvio_layers, rel=1e-6)


def test_bias_update_takes_a_device_tensor_gamma_without_a_host_sync(monkeypatch):
    a, b = small_model().train(), small_model().train()
    input_ids = torch.randint(0, 256, (2, 16))
    for model in (a, b):
        model.compute_loss(input_ids, input_ids)
    update_router_biases(a, 0.02)

    def forbidden(name, real):
        def call(self, *args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("coscale."):
                raise AssertionError(f"host sync: Tensor.{name} in the bias update")
            return real(self, *args, **kwargs)
        return call

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            patch.setattr(torch.Tensor, name, forbidden(name, getattr(torch.Tensor, name)))
        update_router_biases(b, torch.tensor(0.02))
    for (_, ga), (_, gb) in zip(moe_gates(a), moe_gates(b)):
        assert torch.equal(ga.e_score_correction_bias, gb.e_score_correction_bias)
        assert ga.e_score_correction_bias.abs().max() > 0 and gb.expert_load.sum() == 0
    before = [g.e_score_correction_bias.clone() for _, g in moe_gates(b)]
    b.compute_loss(input_ids, input_ids)
    update_router_biases(b, torch.tensor(0.0))  # a zero tensor moves nothing (no host check needed)
    assert all(torch.equal(x, g.e_score_correction_bias) for x, (_, g) in zip(before, moe_gates(b)))


def test_balance_metrics_need_no_host_sync(monkeypatch):
    model = small_model().train()
    model.compute_loss(*(torch.randint(0, 256, (2, 16)),) * 2)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("host sync in load_balance")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
            patch.setattr(torch.Tensor, name, forbidden)
        balance = load_balance(model)
    assert set(balance) >= {"maxvio", "maxvio_mean", "maxvio/layer1", "maxvio/mtp1"}


@pytest.mark.parametrize("steps, warmup", [(200, 20), (60, 6), (1000, 100), (10, 0), (200_000, 2000)])
def test_default_bias_update_speed_scales_with_the_run(steps, warmup):
    gamma = default_bias_update_speed(steps, warmup)
    assert 0.001 <= gamma <= 0.1
    assert gamma == default_bias_update_speed(steps, warmup)  # a pure function of the run
    assert default_bias_update_speed(steps * 10, max(warmup * 10, 1)) <= gamma  # longer runs: slower or equal
    if warmup >= 1000:
        assert gamma == 0.001  # a pretraining-length run gets the paper's gamma


def test_step_with_a_tensor_gamma_equals_a_float_gamma():
    from coscale.train.optim import build_optimizer
    from coscale.train.step import train_step

    results = []
    for gamma in (0.01, torch.tensor(0.01)):
        model = small_model()
        optimizer = build_optimizer(model, lr=1e-3)
        torch.manual_seed(3)
        batch = (torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))
        metrics = train_step(model, optimizer, SingleProcess(torch.device("cpu")), batch, gamma=gamma,
                             grad_clip=1.0, autocast=contextlib.nullcontext)
        results.append((metrics, [g.e_score_correction_bias.clone() for _, g in moe_gates(model)]))
    (ma, ba), (mb, bb) = results
    assert all(torch.equal(x, y) for x, y in zip(ba, bb))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def test_the_run_uses_the_scaled_default_unless_told():
    from coscale.train.balance import resolve_bias_update_speed
    from coscale.train.config import TrainConfig
    from coscale.train.report import balancing_note

    tiny = get_preset("tiny")
    assert resolve_bias_update_speed(TrainConfig(), tiny) == pytest.approx(0.01)  # 200 steps, 20 warm-up
    assert resolve_bias_update_speed(TrainConfig(steps=100_000, warmup_steps=2000), tiny) == 0.001
    assert resolve_bias_update_speed(TrainConfig(bias_update_speed=0.005), tiny) == 0.005  # the option wins
    assert resolve_bias_update_speed(TrainConfig(bias_update_speed=0.0), tiny) == 0.0
    assert resolve_bias_update_speed(TrainConfig(), tiny.replace(bias_update_speed=0.0)) == 0.0  # off stays off
    assert "bias update speed 0.01 (scaled with the run: 0.2 over 20 steps)" in balancing_note(TrainConfig(), tiny)
    assert "(--bias-update-speed)" in balancing_note(TrainConfig(bias_update_speed=0.005), tiny)
    assert balancing_note(TrainConfig(), tiny.replace(n_routed_experts=None)) is None
    v2 = get_preset("deepseek-v2-lite")
    assert balancing_note(TrainConfig(), v2) == "balancing: no router bias (greedy routing); sequence-wise " \
                                               "balance loss alpha 0.001"


def test_input_alignment_of_the_gate_inputs():
    from coscale.model.moe import input_alignment

    row = torch.randn(64, dtype=torch.float64)
    same = row.repeat(10, 1) * torch.rand(10, 1, dtype=torch.float64)  # one direction, any lengths
    assert input_alignment(same).item() == pytest.approx(1.0, rel=1e-6)
    assert input_alignment(torch.eye(8)).item() == pytest.approx(1 / 8)  # unrelated directions: 1/T
    half = torch.stack([row, -row])
    assert input_alignment(half).item() == pytest.approx(0.0, abs=1e-7)  # opposite directions cancel
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 64, generator=gen)
    unit = (x / x.norm(dim=-1, keepdim=True)).double()
    assert input_alignment(x).item() == pytest.approx(unit.mean(0).pow(2).sum().item(), rel=1e-5)
    zeros = input_alignment(torch.zeros(4, 64))  # padding rows: 0, never NaN
    assert zeros.item() == 0.0 and input_alignment(x.to(torch.bfloat16)).dtype == torch.float32


def test_a_training_step_logs_each_routers_input_alignment():
    model = small_model()
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model.compute_loss(ids, ids).loss.backward()
    metrics = load_balance(model)
    record = metrics_record({"loss": 1.0, "total_loss": 1.0, "mtp_loss": 1.0, "aux_loss": 0.0, "grad_norm": 1.0,
                             **{k: v.item() for k, v in metrics.items()}})
    layers = record["gate_alignment_layers"]
    assert set(layers) == {"layer1", "layer2", "mtp1"} and all(0 < v <= 1 for v in layers.values())
    gate = dict(moe_gates(model))["layer1"]
    captured = {}
    gate.register_forward_hook(lambda g, inputs, out: captured.update(x=inputs[0].detach()))  # returns None
    model.compute_loss(ids, ids)
    assert gate.input_alignment.item() == pytest.approx(
        (captured["x"] / captured["x"].norm(dim=-1, keepdim=True)).mean(0).pow(2).sum().item(), rel=1e-5)
