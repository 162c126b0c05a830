"""Learning-rate schedule and AdamW with FP32 / BF16 moments."""

import math

import pytest
import torch
from torch import nn

from coscale.errors import ConfigError
from coscale.train.optim import AdamW, build_optimizer
from coscale.train.schedule import lr_at


def test_schedule_warmup_then_cosine():
    lr, warm, total, floor = 1.0, 10, 110, 0.1
    assert lr_at(0, lr, warm, total, floor) == pytest.approx(0.1)
    assert lr_at(4, lr, warm, total, floor) == pytest.approx(0.5)
    assert lr_at(9, lr, warm, total, floor) == pytest.approx(1.0)
    assert lr_at(10, lr, warm, total, floor) == pytest.approx(1.0)
    mid = 10 + (100 - 1) / 2
    assert lr_at(int(mid), lr, warm, total, floor) == pytest.approx(
        floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * int(mid - 10) / 99)))
    assert lr_at(109, lr, warm, total, floor) == pytest.approx(floor)
    assert lr_at(500, lr, warm, total, floor) == pytest.approx(floor)  # past the end: the floor
    values = [lr_at(s, lr, warm, total, floor) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_schedule_edge_cases():
    assert lr_at(0, 2.0, 0, 1, 0.0) == 2.0  # no warm-up, one step
    assert lr_at(0, 2.0, 0, 5, 0.5) == 2.0
    with pytest.raises(ConfigError):
        lr_at(0, 1.0, 0, 0, 0.0)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def _train(model, opt, steps=5):
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 8)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_adamw_fp32_moments_matches_torch():
    a, b = _model(), _model()
    ours = AdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, moments_dtype=torch.float32)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    _train(a, ours)
    _train(b, ref)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_adamw_bf16_moments_close_and_stored_in_bf16():
    a, b = _model(), _model()
    ours = AdamW(a.parameters(), lr=1e-2, weight_decay=0.1, moments_dtype=torch.bfloat16)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    _train(a, ours, steps=10)
    _train(b, ref, steps=10)
    for p in a.parameters():
        state = ours.state[p]
        assert p.dtype == torch.float32  # master weights
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    diff = max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))
    assert diff < 5e-3  # same trajectory up to BF16 rounding of the moments


def test_adamw_bf16_state_round_trip_is_exact():
    a = _model()
    opt = AdamW(a.parameters(), lr=1e-2, moments_dtype=torch.bfloat16)
    _train(a, opt, steps=3)
    saved_params = [p.detach().clone() for p in a.parameters()]
    state = opt.state_dict()
    b = _model(seed=5)
    with torch.no_grad():
        for pb, saved in zip(b.parameters(), saved_params):
            pb.copy_(saved)
    opt_b = AdamW(b.parameters(), lr=1e-2, moments_dtype=torch.bfloat16)
    opt_b.load_state_dict(state)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in opt_b.state.values())
    _train(a, opt, steps=2)
    _train(b, opt_b, steps=2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_build_optimizer_groups_and_kinds():
    model = _model()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, moments_dtype="fp32")
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert isinstance(build_optimizer(model, lr=1e-3, moments_dtype="bf16"), AdamW)
    with pytest.raises(ConfigError, match="moments dtype"):
        build_optimizer(model, lr=1e-3, moments_dtype="fp16")


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_router_learning_rate_scale(moments):
    from coscale.config import get_preset
    from coscale.model.moe import Gate
    from coscale.model.transformer import DeepseekForCausalLM
    from coscale.train.step_runner import set_learning_rate

    model = DeepseekForCausalLM(get_preset("tiny"))
    model.init_weights()
    routers = {id(m.weight) for m in model.modules() if isinstance(m, Gate)}
    assert len(build_optimizer(model, lr=1e-3).param_groups) == 2  # scale 1: the groups of earlier checkpoints
    opt = build_optimizer(model, lr=1e-3, moments_dtype=moments, router_lr_scale=0.1)
    router_group = opt.param_groups[-1]
    assert {id(p) for p in router_group["params"]} == routers and router_group["lr_scale"] == 0.1
    assert not routers & {id(p) for g in opt.param_groups[:-1] for p in g["params"]}
    assert router_group["lr"] == pytest.approx(1e-4) and opt.param_groups[0]["lr"] == 1e-3
    set_learning_rate(opt, 2e-3)
    assert router_group["lr"] == pytest.approx(2e-4) and opt.param_groups[0]["lr"] == 2e-3
    # scale 0 freezes the routers (no decay either) while everything else trains
    opt = build_optimizer(model, lr=1e-2, moments_dtype=moments, router_lr_scale=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 256, (2, 16))
    model(ids).float().pow(2).mean().backward()
    opt.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved != (id(p) in routers) or p.grad is None, n


def test_adamw_rejects_low_precision_master_weights():
    p = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    with pytest.raises(ConfigError, match="FP32 master weights"):
        AdamW([p]).step()


def _steps_with_factor(make_opt, fold: bool, factors=(0.37, 1.0, 3e-3)):
    """Three steps of ``make_opt``'s optimizer on fresh random gradients times each factor: folded into the step
    (step_with_grad_factor) or multiplied into the gradients first. Returns the parameters."""
    from coscale.train.optim import step_with_grad_factor

    gen = torch.Generator().manual_seed(11)
    params = [nn.Parameter(torch.randn(37, 129, generator=gen)), nn.Parameter(torch.randn(300, generator=gen))]
    opt = make_opt(params)
    for f in factors:
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 10
        factor = torch.tensor(f)
        if fold:
            step_with_grad_factor(opt, factor)
        else:
            for p in params:
                p.grad.mul_(factor)
            opt.step()
    return [p.detach() for p in params], opt


OPTIMIZERS = {
    "coscale-bf16": lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1),
    "coscale-fp32": lambda ps: AdamW(ps, lr=1e-2, weight_decay=0.1, moments_dtype=torch.float32),
    "torch-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "torch-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_grad_factor_folded_into_the_step_equals_scaling_the_gradients(kind):
    folded, opt = _steps_with_factor(OPTIMIZERS[kind], fold=True)
    scaled, _ = _steps_with_factor(OPTIMIZERS[kind], fold=False)
    unscaled, _ = _steps_with_factor(OPTIMIZERS[kind], fold=False, factors=(1.0, 1.0, 1.0))
    for a, b, c in zip(folded, scaled, unscaled):
        # the fused torch kernel divides by 1 / factor: within an ulp or two of multiplying
        torch.testing.assert_close(a, b, rtol=2e-7, atol=2e-7)
        assert not torch.allclose(a, c)  # the factor did reach the update
    # the factor is for that step only: nothing of it stays on the optimizer
    assert getattr(opt, "grad_factor", None) is None and getattr(opt, "grad_scale", None) is None


def test_grad_factor_in_the_compiled_update():
    """The compiled update (as StepRunner's compile mode makes it) takes the factor like the eager one."""
    from coscale.train.optim import adamw_update_

    def compiled(ps):
        opt = AdamW(ps, lr=1e-2, weight_decay=0.1)
        opt.update_fn = torch.compile(adamw_update_, backend="aot_eager", fullgraph=True, dynamic=True)
        return opt

    folded, _ = _steps_with_factor(compiled, fold=True)
    scaled, _ = _steps_with_factor(OPTIMIZERS["coscale-bf16"], fold=False)
    for a, b in zip(folded, scaled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_train_step_clip_equals_torch_clip_then_step(moments):
    """train_step's clip (the norm, then the factor inside the optimizer's update) moves the parameters as
    torch.nn.utils.clip_grad_norm_ followed by a plain step does, and reports the same norm."""
    import contextlib

    from coscale.config import get_preset
    from coscale.model.transformer import DeepseekForCausalLM
    from coscale.parallel.world import SingleProcess
    from coscale.train.step import train_step

    torch.set_num_threads(2)
    cfg = get_preset("tiny").replace(num_nextn_predict_layers=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(3))
    batch = (ids[:, :-1], ids[:, 1:])

    def model_and_opt():
        torch.manual_seed(0)
        model = DeepseekForCausalLM(cfg)
        model.init_weights()
        # torch's fused AdamW on CPU too, so that its grad_scale path is the one under test with FP32 moments
        opt = build_optimizer(model, lr=3e-3, moments_dtype=moments)
        if moments == "fp32":
            opt = torch.optim.AdamW(opt.param_groups, lr=3e-3, fused=True)
        return model, opt

    model, opt = model_and_opt()
    clip = 0.05  # far below the initial norm: the factor is well under 1
    metrics = train_step(model, opt, SingleProcess(torch.device("cpu")), batch, gamma=0.0, grad_clip=clip,
                         autocast=contextlib.nullcontext)
    ref_model, ref_opt = model_and_opt()
    loss = ref_model.compute_loss(*batch).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), clip)
    assert norm > 10 * clip
    ref_opt.step()
    torch.testing.assert_close(metrics["grad_norm"], norm.float())
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", ["coscale-bf16", "torch-fused"])
def test_grad_factor_does_not_outlive_a_failed_step(kind):
    from coscale.train.optim import step_with_grad_factor

    param = nn.Parameter(torch.randn(4))
    param.grad = torch.ones(4)
    opt = OPTIMIZERS[kind]([param])

    def fail(*_):
        raise RuntimeError("a failing step")

    opt.register_step_pre_hook(fail)
    with pytest.raises(RuntimeError, match="a failing step"):
        step_with_grad_factor(opt, torch.tensor(0.5))
    assert getattr(opt, "grad_factor", None) is None and getattr(opt, "grad_scale", None) is None
