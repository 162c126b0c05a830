"""Training step time, GPU-hours and cost: formulas by hand, scaling, and the DeepSeek-V3 report's check."""

import pytest

from coscale.analysis import training_time as T
from coscale.analysis.memory import ParallelLayout
from coscale.errors import ConfigError


def test_deepseek_v3_check_is_printed_not_fitted():
    r = T.training_time(**T.DEEPSEEK_V3_TRAINING)
    per_trillion = r.gpu_hours(1e12)
    # The report: 180K H800 GPU-hours per trillion tokens. The model predicts fewer (161K today): it has no
    # expert-load imbalance and takes kernel rates from standalone benchmarks (docs/analysis.md). The check
    # guards the direction and size of that gap.
    assert per_trillion < T.PUBLISHED_GPU_HOURS_PER_TRILLION
    assert per_trillion == pytest.approx(T.PUBLISHED_GPU_HOURS_PER_TRILLION, rel=0.4)
    assert r.tokens_per_step == 15360 * 4096 and r.world == 2048
    assert r.step_s == pytest.approx(sum(r.parts_s.values()))
    assert r.model_tflops_per_gpu == pytest.approx(r.mfu * 989)


def test_stage_split_whole_layers_by_hand():
    """Layers are whole: the busiest stage (1F1B) or rank (DualPipe: the mean of stages r and pp-1-r) sets the pace."""
    # 1F1B: 6 layers of 1 s, a 2 s tail on the last stage, 3 stages: [2, 3, 1] + 2 is 3 s each
    split, busiest = T.stage_split([1.0] * 6, 2.0, 3, "1f1b")
    assert busiest == pytest.approx(3.0) and split in ([3, 2, 1], [2, 3, 1])
    # one stage holds everything
    assert T.stage_split([1.0, 2.0], 0.5, 1, "1f1b") == ([2], pytest.approx(3.5))
    # DualPipe pairs stage 0 with the last: a 4 s tail is shared with a light first stage. 8 layers, 4 stages:
    # pairs (0, 3) and (1, 2) hold (8 + 4) / 2 = 6 s each, so each rank runs 3 s a micro-batch
    split, busiest = T.stage_split([1.0] * 8, 4.0, 4, "dualpipe")
    assert busiest == pytest.approx(3.0) and sum(split) == 8
    assert (split[0] + split[3] + 4) / 2 == pytest.approx(3.0) and (split[1] + split[2]) / 2 == pytest.approx(3.0)
    # among equally busy splits the most even: no stage above 4 s (e.g. [1, 3, 3, 1] puts 5 s on the last)
    stage_s = [float(c) for c in split]
    stage_s[-1] += 4.0
    assert max(stage_s) == pytest.approx(4.0)
    # 1F1B cannot share the tail: the last stage alone holds it
    split, busiest = T.stage_split([1.0] * 8, 4.0, 4, "1f1b")
    assert busiest == pytest.approx(4.0) and split[-1] == 0
    # an odd pp under DualPipe: the middle stage is a rank of its own
    split, busiest = T.stage_split([1.0] * 9, 0.0, 3, "dualpipe")
    assert sum(split) == 9 and busiest == pytest.approx(max(split[1], (split[0] + split[2]) / 2))


def test_uneven_layers_cost_the_busiest_stages_time():
    """27 layers in 4 stages: whole layers leave one stage with more than a quarter of the work; the step pays
    it (with the bubble) and says so; one stage pays nothing."""
    kw = dict(seq_len=512, global_batch=8, micro_batch=1, schedule="1f1b")
    r = T.training_time("deepseek-v2-lite", "h200", ParallelLayout(pp=4), **kw)
    assert r.parts_s["pipeline stage imbalance"] > 0
    assert any("layers per pipeline stage" in a for a in r.assumptions)
    one = T.training_time("deepseek-v2-lite", "h200", ParallelLayout(pp=1), **kw)
    assert one.parts_s["pipeline stage imbalance"] == 0


def test_expert_imbalance_slows_exactly_the_routed_experts():
    """The busiest EP rank's extra rows: the routed experts' kernels (forward here) take 1 + imbalance times as long,
    everything else as before; a dense model or a negative / non-finite value is refused."""
    from coscale.analysis.models import as_view
    from coscale.hardware import load_hardware

    kw = dict(seq_len=1024, global_batch=8, micro_batch=1, layout=ParallelLayout(dp=8, ep=8))
    even = T.training_time("deepseek-v2-lite", "h100", **kw)
    busy = T.training_time("deepseek-v2-lite", "h100", expert_imbalance=0.25, **kw)
    v, hw = as_view("deepseek-v2-lite"), load_hardware("h100")
    fwd = T._pass_ops(v, hw, 1024, 1, 1024, 1, 8, True, "fp8")[0]
    routed = sum(op.seconds for op in fwd if T._routed(op))
    assert routed > 0 and any(not T._routed(op) for op in fwd)
    slowdown = hw.achieved.sms / (hw.achieved.sms - hw.achieved.comm_sms)
    micro = 8 // 8
    expected = micro * 0.25 * routed * slowdown * v.moe_layers
    assert busy.parts_s["forward"] - even.parts_s["forward"] == pytest.approx(expected, rel=1e-9)
    assert busy.parts_s["optimizer"] == even.parts_s["optimizer"]
    assert any("1.25 x the mean routed rows" in a for a in busy.assumptions)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="imbalance"):
            T.training_time("deepseek-v2-lite", "h100", expert_imbalance=bad, **kw)
    with pytest.raises(ConfigError, match="no routed experts"):
        T.training_time("llama3.1-70b", "h100", ParallelLayout(dp=8), seq_len=1024, global_batch=8,
                        expert_imbalance=0.1)


def test_dualpipe_hides_each_all_to_all_only_under_the_computation_it_is_paired_with():
    """The V3 report's Figure 4 pairs: ATTN(F) | COMBINE(B), MLP(B) + MLP(W) | DISPATCH(F), MLP(F) | DISPATCH(B),
    ATTN(B) + ATTN(W) | COMBINE(F); each pair takes the longer of the two."""
    from coscale.analysis.costs import OpTime

    def op(name, s):
        return OpTime(name, s, "compute")

    fwd = [op("attention", 3.0), op("experts gate+up", 1.0), op("shared expert down", 0.5)]
    bwd = [op("attention backward", 2.0), op("experts down dgrad", 4.0), op("permute to grouped layout (b)", 1.0)]
    wgrad = [op("o_proj wgrad", 1.0), op("experts gate+up wgrad", 2.0)]
    # attention F 3 vs dispatch 2: hidden; MLP B + W 7 vs 2: hidden; MLP F 1.5 vs combine 4: 2.5 exposed;
    # attention B + W 3 vs 4: 1 exposed
    assert T.dualpipe_exposed(fwd, bwd, wgrad, 2.0, 4.0) == pytest.approx(3.5)
    # computation on fewer SMs (slowdown 2) is longer and hides more: MLP F 3 vs 4, attention B + W 6 vs 4
    assert T.dualpipe_exposed(fwd, bwd, wgrad, 2.0, 4.0, slowdown=2.0) == pytest.approx(1.0)
    assert T.dualpipe_exposed(fwd, bwd, wgrad, 0.5, 1.0) == 0.0
    # a TP all-reduce among the attention ops is communication: it hides nothing
    reduce = OpTime("TP all-reduce", 5.0, "scale-up")
    assert T.dualpipe_exposed([reduce] + fwd, bwd, wgrad, 2.0, 4.0) == pytest.approx(3.5)


def test_a_slow_network_exposes_part_of_the_all_to_all_under_dualpipe_and_all_of_it_under_1f1b():
    import dataclasses

    from coscale.hardware import load_hardware

    hw = load_hardware("h800")
    slow = dataclasses.replace(hw, efficiency=dataclasses.replace(hw.achieved, a2a_scale_out_gbps=4.0))
    kw = dict(seq_len=4096, global_batch=64, micro_batch=1, layout=ParallelLayout(dp=16, ep=16, pp=1))
    fast_dual = T.training_time("deepseek-v2-lite", hw, schedule="dualpipe", **kw)
    slow_dual = T.training_time("deepseek-v2-lite", slow, schedule="dualpipe", **kw)
    slow_1f1b = T.training_time("deepseek-v2-lite", slow, schedule="1f1b", **kw)
    assert fast_dual.parts_s["exposed all-to-all"] < slow_dual.parts_s["exposed all-to-all"]
    assert 0 < slow_dual.parts_s["exposed all-to-all"] < slow_1f1b.parts_s["exposed all-to-all"]
    assert slow_dual.parts_s["forward"] == pytest.approx(fast_dual.parts_s["forward"])


def _dualpipe_events(pp, chunks, h):
    """The chunks a rank at half-rank h runs, step by step, in DeepSeek's public DualPipe schedule
    (deepseek-ai/DualPipe, DualPipe.step): "F" and "B" alone, "FB" a forward-backward pair, "W" weights."""
    half, middle = pp // 2, h == pp // 2 - 1
    ev = ["F"] * (2 * (half - h - 1))  # step 1
    ev += ["F", "F"] * (h + 1)  # step 2: one chunk of each direction
    ev += ["B", "W", "F"] * (half - h - 1)  # step 3
    for i in range(chunks // 2 - pp + h + 1):  # step 4: the middle ranks do not overlap their first pair
        ev += (["F", "B"] if i == 0 and middle else ["FB"]) + ["FB"]
    ev += ["B", "FB"] * (half - h - 1)  # step 5
    ev += ["B", "B"] * (h + 1)  # step 6
    ev += ["W", "B"] * (half - h - 1)  # step 7
    return ev


@pytest.mark.parametrize("pp", [2, 4, 6, 8, 16])
def test_dualpipe_runs_its_warm_up_and_cool_down_chunks_unpaired(pp):
    chunks = 4 * pp + 8
    lone = []
    for h in range(pp // 2):
        ev = _dualpipe_events(pp, chunks, h)
        assert ev.count("F") + ev.count("FB") == chunks == ev.count("B") + ev.count("FB")  # every micro-batch
        assert ev.count("F") == ev.count("B")
        lone.append(ev.count("F"))
    assert T.dualpipe_unpaired_chunks(pp, chunks) == max(lone)
    assert T.dualpipe_unpaired_chunks(pp, 3) == min(3, max(lone))
    assert T.dualpipe_unpaired_chunks(1, 10) == 1


def test_dualpipes_unpaired_chunks_expose_their_all_to_all():
    """pp 4 under DualPipe: the busiest rank runs 5 micro-batches' forward and backward chunks alone, their
    all-to-all exposed whole (a); the others expose only what outlasts their paired computation (e). So the exposed
    time is (m - 5) e + 5 a: with a network fast enough that pairs hide everything, exactly 5 a; on a slow one,
    linear in m with slope e and intercept 5 (a - e). DualPipe's own limits are refused."""
    import dataclasses

    from coscale.hardware import load_hardware

    hw = load_hardware("h800")
    fast = dataclasses.replace(hw, efficiency=dataclasses.replace(hw.achieved, a2a_scale_out_gbps=1e6,
                                                                  a2a_scale_up_gbps=1e6, collective_latency_us=0.0))
    slow = dataclasses.replace(hw, efficiency=dataclasses.replace(hw.achieved, a2a_scale_out_gbps=2.0,
                                                                  a2a_scale_up_gbps=2.0))
    layout = ParallelLayout(dp=4, ep=4, pp=4)
    assert T.dualpipe_unpaired_chunks(4, 16) == 5

    def exposed(hardware, schedule, m):
        r = T.training_time("deepseek-v2-lite", hardware, layout, seq_len=2048, global_batch=4 * m, micro_batch=1,
                            schedule=schedule)
        return r.parts_s["exposed all-to-all"]

    def a2a(hardware):  # one micro-batch's all-to-all, both directions, on a stage: from the collectives' model
        from coscale.analysis import layers as L
        from coscale.analysis.models import as_view

        v = as_view("deepseek-v2-lite")
        d, c = L.collectives(v, hardware, 2048, L.Parallel(ep=4, tp=1, redundant_experts=0), decode=False)
        return (v.moe_layers + v.mtp_depth) / 4 * 2 * (d.seconds + c.seconds)

    a = a2a(fast)
    assert a > 0 and exposed(fast, "1f1b", 16) == pytest.approx(16 * a, rel=1e-9)  # 1F1B: all of it
    assert exposed(fast, "dualpipe", 16) == pytest.approx(5 * a, rel=1e-9)
    a = a2a(slow)
    e = (exposed(slow, "dualpipe", 16) - exposed(slow, "dualpipe", 8)) / 8
    assert 0 < e < a
    assert exposed(slow, "dualpipe", 8) == pytest.approx(8 * e + 5 * (a - e), rel=1e-9)
    # the bubble's F&B pair takes what of its all-to-all outlasts its computation too
    r = T.training_time("deepseek-v2-lite", slow, layout, seq_len=2048, global_batch=64, micro_batch=1)
    f, b, w = (r.parts_s[k] / 16 for k in ("forward", "input gradients", "weight gradients"))
    ratio = 1 + r.parts_s["pipeline stage imbalance"] / (16 * (f + b + w + e))
    assert r.parts_s["pipeline bubble"] == pytest.approx((f + b + w + e + b + w - 3 * w) * ratio, rel=1e-9)
    for m, pp in ((6, 4), (9, 4), (8, 3)):  # fewer than 2 pp micro-batches, an odd count, an odd pp
        with pytest.raises(ConfigError, match="DualPipe"):
            T.training_time("deepseek-v2-lite", "h800", ParallelLayout(dp=1, pp=pp), seq_len=512, global_batch=m)


def test_gpu_hours_and_cost_by_hand():
    r = T.training_time("small", "h200", ParallelLayout(dp=2), seq_len=256, global_batch=8, micro_batch=2)
    steps = 1e9 / r.tokens_per_step
    assert r.gpu_hours(1e9) == pytest.approx(steps * r.step_s * 2 / 3600)
    assert r.cost(1e9, 3.0) == pytest.approx(3 * r.gpu_hours(1e9))
    assert r.tokens_per_s_per_gpu == pytest.approx(r.tokens_per_step / r.step_s / 2)


def test_bubbles_by_hand():
    one = T.training_time("deepseek-v2-lite", "h200", ParallelLayout(dp=1, pp=1), seq_len=512, global_batch=8)
    assert one.parts_s["pipeline bubble"] == 0
    kw = dict(seq_len=512, global_batch=8, micro_batch=1)
    f1b = T.training_time("deepseek-v2-lite", "h200", ParallelLayout(pp=4), schedule="1f1b", **kw)
    # the busiest stage's time: the mean stage's plus the imbalance of whole layers
    per_micro = sum(f1b.parts_s[k] for k in ("forward", "input gradients", "weight gradients",
                                             "pipeline stage imbalance")) / 8
    assert f1b.parts_s["pipeline bubble"] == pytest.approx(3 * per_micro)
    dual = T.training_time("deepseek-v2-lite", "h200", ParallelLayout(pp=4), schedule="dualpipe", **kw)
    assert dual.parts_s["pipeline bubble"] < f1b.parts_s["pipeline bubble"]
    # the report's (pp/2 - 1)(F&B + B - 3W), B a whole backward chunk (b + w), F&B = f + b + w (no all-to-all here)
    f, b, w = (dual.parts_s[k] / 8 for k in ("forward", "input gradients", "weight gradients"))
    ratio = 1 + dual.parts_s["pipeline stage imbalance"] / (8 * (f + b + w))
    assert dual.parts_s["pipeline bubble"] == pytest.approx((4 / 2 - 1) * (f + b + w + b + w - 3 * w) * ratio)


def test_more_gpus_shorter_steps_and_fp8_faster_than_bf16():
    kw = dict(seq_len=4096, global_batch=64, micro_batch=1)
    few = T.training_time("deepseek-v2-lite", "h100", ParallelLayout(dp=8, ep=8), **kw)
    many = T.training_time("deepseek-v2-lite", "h100", ParallelLayout(dp=32, ep=8), **kw)
    assert many.step_s < few.step_s
    bf16 = T.training_time("deepseek-v2-lite", "h100", ParallelLayout(dp=8, ep=8), precision="bf16", **kw)
    assert bf16.parts_s["forward"] > few.parts_s["forward"]


def test_eager_steps_are_launch_bound_for_tiny_models():
    graph = T.training_time("tiny", "h200", ParallelLayout(), seq_len=32, global_batch=2, micro_batch=2)
    eager = T.training_time("tiny", "h200", ParallelLayout(), seq_len=32, global_batch=2, micro_batch=2, eager=True)
    assert eager.parts_s["host launch (beyond GPU time)"] > 0 and eager.step_s > graph.step_s


def test_a_stacks_kernel_count_adds_its_unmodelled_kernels():
    """kernels_per_step: the kernels beyond the modelled ops cost small_kernel_us each; fewer add nothing."""
    from coscale.hardware import load_hardware

    kw = dict(seq_len=512, global_batch=16, micro_batch=16, schedule="1f1b", recompute="none", precision="bf16")
    base = T.training_time("small", "h200", ParallelLayout(), **kw)
    more = T.training_time("small", "h200", ParallelLayout(), **kw, kernels_per_step=5000)
    per_kernel = load_hardware("h200").achieved.small_kernel_us * 1e-6
    assert more.step_s - base.step_s == pytest.approx(more.parts_s["other kernels"])
    modelled = 5000 - round(more.parts_s["other kernels"] / per_kernel)
    assert 100 < modelled < 2000
    few = T.training_time("small", "h200", ParallelLayout(), **kw, kernels_per_step=modelled - 1)
    assert few.step_s == base.step_s and "other kernels" not in few.parts_s


@pytest.mark.parametrize("optimizer,passes", [("fp32", 2), ("deepseek", 1)])
def test_gradient_clipping_costs_the_norm_and_what_the_update_adds(optimizer, passes):
    """grad_clip (the default): the norm pass reads every local gradient; the factor is applied inside the
    optimizer's update (coscale.train.optim.step_with_grad_factor), which reads them anyway; torch's fused AdamW
    (the fp32 recipe) writes the unscaled gradient back when handed a grad_scale: `passes` x the gradient's
    bytes per parameter at copy bandwidth, and nothing else changes."""
    from coscale.analysis.models import as_view
    from coscale.hardware import load_hardware

    kw = dict(seq_len=512, global_batch=16, micro_batch=16, schedule="1f1b", recompute="none", precision="bf16",
              optimizer=optimizer)
    clipped = T.training_time("small", "h200", ParallelLayout(), **kw)
    plain = T.training_time("small", "h200", ParallelLayout(), **kw, grad_clip=False)
    v = as_view("small")
    params = v.non_expert_params + v.routed_expert_params
    expected = params * passes * T.OPTIMIZERS[optimizer]["grad"] / (load_hardware("h200").achieved.memory_tbps * 1e12)
    assert clipped.parts_s["gradient clipping"] == pytest.approx(expected)
    assert clipped.step_s - plain.step_s == pytest.approx(expected)
    assert "gradient clipping" not in plain.parts_s
    # a pass of its own (coscale before the factor went into the update): read for the norm, read and write to scale
    separate = T.training_time("small", "h200", ParallelLayout(), **kw, clip_in_update=False)
    assert separate.parts_s["gradient clipping"] == pytest.approx(expected * 3 / passes)


@pytest.mark.parametrize("kwargs", [dict(schedule="gpipe"), dict(recompute="half"), dict(precision="int8"),
                                    dict(seq_len=0), dict(global_batch=3, layout=ParallelLayout(dp=2)),
                                    dict(layout=ParallelLayout(tp=3)), dict(kernels_per_step=0),
                                    dict(kernels_per_step=True)])
def test_bad_input(kwargs):
    with pytest.raises(ConfigError):
        T.training_time("deepseek-v2-lite", "h200", **kwargs)
