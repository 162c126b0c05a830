"""The engine's overlapped schedule (docs/serving.md): step N + 1 is launched before step N's tokens are
read back, its inputs taken from step N's sampled tokens on the device. On CPU nothing runs in the
background, but the bookkeeping is the same: placeholders, tokens of a request that stopped in the step
before, aborts while a step is in flight, outputs one call later. Greedy output must equal the naive
model and the synchronous engine."""

import pytest
import torch

from coscale.config import get_preset
from coscale.errors import ConfigError
from coscale.infer.batch import build_batch
from coscale.infer.sampling import SamplingParams
from coscale.infer.scheduler import PLACEHOLDER
from coscale.model import DeepseekForCausalLM
from test_engine import VOCAB, drive, naive_greedy, small_engine, workload


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepseekForCausalLM(get_preset("tiny", num_hidden_layers=2, vocab_size=VOCAB)).double().eval()


def test_overlap_is_off_on_cpu_and_refused_with_speculation(model):
    assert small_engine(model).overlap is False
    assert small_engine(model, overlap=True).overlap is True
    with pytest.raises(ConfigError, match="speculative"):
        small_engine(model, overlap=True, speculative=True)
    with pytest.raises(ConfigError, match="overlap"):
        small_engine(model, overlap="yes")


@pytest.mark.parametrize("seed", [0, 3])
def test_mixed_batches_with_joins_leaves_and_preemption_equal_naive_greedy(model, seed):
    engine = small_engine(model, overlap=True)
    arrivals = workload(seed)
    results = drive(engine, arrivals)
    sync = drive(small_engine(model), arrivals)
    for rid, prompt, params in (a for step in arrivals.values() for a in step):
        tokens, reason, outs = results[rid]
        assert tokens == naive_greedy(model, prompt, params.max_tokens) == sync[rid][0], rid
        assert reason == "length" and [o.completion_tokens for o in outs if o.new_token_ids] == list(
            range(1, params.max_tokens + 1))
    stats = engine.stats()
    assert stats.preemptions_total > 0
    assert stats.used_blocks == 0 and stats.running == 0 and stats.waiting == 0
    assert stats.generation_tokens_total == sum(p.max_tokens for step in arrivals.values() for _, _, p in step)
    assert engine._in_flight is None and not engine.has_unfinished()


def test_next_step_takes_its_input_from_the_step_in_flight(model):
    engine = small_engine(model, num_blocks=20, overlap=True)
    engine.add_request("a", [1, 2, 3], SamplingParams(5, 0.0))
    assert engine.step() == []  # the prefill is launched; nothing has landed yet
    r = engine.requests["a"]
    assert r.output_ids == [PLACEHOLDER] and engine.has_unfinished()
    outs = engine.step()  # launches the first decode (its token from the device), lands the prefill
    assert [o.new_token_ids for o in outs] == [naive_greedy(model, [1, 2, 3], 1)]
    assert r.output_ids[-1] == PLACEHOLDER and len(r.output_ids) == 2
    tokens = outs[0].new_token_ids
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    assert tokens == naive_greedy(model, [1, 2, 3], 5)
    assert r.output_ids == tokens and engine.stats().used_blocks == 0


def test_a_stop_token_drops_the_token_of_the_step_after_it(model):
    prompt = [4, 8, 15, 16, 23]
    reference = naive_greedy(model, prompt, 10)
    stop = reference[3]
    cut = reference.index(stop) + 1
    engine = small_engine(model, num_blocks=20, overlap=True)
    other = [2, 2, 5]
    arrivals = {0: [("s", prompt, SamplingParams(10, 0.0, stop_token_ids=(stop,))),
                    ("o", other, SamplingParams(10, 0.0))]}
    results = drive(engine, arrivals)
    tokens, reason, outs = results["s"]
    assert tokens == reference[:cut] and reason == "stop" and outs[-1].completion_tokens == cut
    assert results["o"][0] == naive_greedy(model, other, 10)
    stats = engine.stats()
    assert stats.used_blocks == 0 and stats.generation_tokens_total == cut + 10


def test_abort_while_a_step_is_in_flight(model):
    engine = small_engine(model, num_blocks=20, overlap=True)
    engine.add_request("x", [1, 2, 3, 4], SamplingParams(8, 0.0))
    engine.add_request("y", [5, 6], SamplingParams(8, 0.0))
    engine.step()
    engine.step()
    engine.step()  # x and y each have one token landed and one in flight
    engine.abort("x")
    outs = {o.request_id: o for o in engine.step()}
    assert outs["x"].finished and outs["x"].finish_reason == "abort" and outs["x"].new_token_ids == []
    assert outs["x"].completion_tokens == 2  # the tokens that landed; the one in flight is dropped
    y = outs["y"].new_token_ids
    while engine.has_unfinished():
        outs = engine.step()
        assert all(o.request_id == "y" for o in outs)
    assert engine.stats().used_blocks == 0 and engine.stats().running == 0
    assert y and engine._in_flight is None


def test_sampling_seeds_and_logprobs_match_the_synchronous_engine(model):
    arrivals = {0: [("a", [1, 2, 3], SamplingParams(8, 1.0, top_p=0.9, top_k=20, seed=7, logprobs=3))],
                1: [("b", [9, 9, 9, 9], SamplingParams(6, 0.8, seed=11, logprobs=0))],
                2: [("c", [5] * 9, SamplingParams(6, 0.0, logprobs=2))]}
    overlapped = drive(small_engine(model, num_blocks=12, overlap=True), arrivals)
    sync = drive(small_engine(model, num_blocks=12), arrivals)
    for rid in "abc":
        assert overlapped[rid][0] == sync[rid][0], rid
        lp = [x for o in overlapped[rid][2] for x in (o.new_logprobs or [])]
        ref = [x for o in sync[rid][2] for x in (o.new_logprobs or [])]
        assert len(lp) == len(ref) == len(sync[rid][0])
        for x, y in zip(lp, ref):
            assert x.token_id == y.token_id and [t for t, _ in x.top] == [t for t, _ in y.top]
            assert x.logprob == pytest.approx(y.logprob, abs=1e-12)


def test_a_batch_padded_for_a_graph_gives_the_same_hidden_states(model):
    """build_batch(pad_to=...) pads a decode batch as a CUDA graph replays it (checked eagerly on CPU,
    through the graph's static buffers): the real rows match, padding writes only block 0, and a narrower
    block table after a wider one reads only its own blocks."""
    from coscale.infer.graphs import DecodeGraphs, capture_sizes

    engine = small_engine(model, num_blocks=30, max_num_batched_tokens=40)
    engine.add_request("a", list(range(1, 14)), SamplingParams(8, 0.0))
    engine.add_request("b", [6, 7], SamplingParams(8, 0.0))
    engine.step()
    graphs = DecodeGraphs.__new__(DecodeGraphs)  # no CUDA pool on this machine: only the buffers
    graphs.engine, graphs.sizes = engine, capture_sizes(4)
    g = graphs._buffers(4, 1)
    for keep in (["a", "b"], ["b"]):  # a's 4 blocks widen the table; b alone narrows it to 1 column
        scheduled = [s for s in engine.scheduler.schedule() if s.request.request_id in keep]
        assert graphs.pad_size(scheduled) == len(scheduled)  # sizes 1, 2, 4
        padded = build_batch(scheduled, engine.cache, engine.device, engine.table_width, pad_to=4)
        plain = build_batch(scheduled, engine.cache, engine.device, engine.table_width)
        assert padded.padded and padded.input_ids.shape[0] == 4 and padded.num_tokens == len(scheduled)
        assert plain.meta.block_table.shape[1] == max(len(s.request.blocks) for s in scheduled)
        graphs._load(g, padded)
        before = engine.cache.latent.clone()
        with torch.no_grad():
            out = model.hidden_states_paged(g.input_ids, g.positions, g.meta)
            changed = (engine.cache.latent != before).any(dim=-1).any(dim=0).flatten().nonzero().flatten()
            ref = model.hidden_states_paged(plain.input_ids, plain.positions, plain.meta)
        torch.testing.assert_close(out[: len(scheduled)], ref, rtol=1e-12, atol=1e-12)
        assert set(changed.tolist()) <= set(plain.meta.slots.tolist()) | {0}


def test_the_compiled_decode_forward_matches_the_eager_one_across_graph_sizes(model):
    """What DecodeGraphs captures when compiling: torch.compile of hidden_states_paged as one graph (the
    MLA decode launcher an opaque operator), at one static size and then a dynamic one, equal to the
    eager forward."""
    import copy

    from coscale.infer.graphs import DecodeGraphs, capture_sizes
    from coscale.model.moe import GroupedExperts

    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            module.impl = "grouped"  # the GPU's path: the CPU's per-expert loop sizes its work on the host
    engine = small_engine(model, num_blocks=30, max_num_batched_tokens=40)
    for rid, prompt in (("a", list(range(1, 14))), ("b", [6, 7]), ("c", [3, 4, 5])):
        engine.add_request(rid, prompt, SamplingParams(8, 0.0))
    engine.step()
    graphs = DecodeGraphs.__new__(DecodeGraphs)  # no CUDA pool on this machine: only the buffers
    graphs.engine, graphs.sizes = engine, capture_sizes(8)
    torch._dynamo.reset()
    compiled = torch.compile(model.hidden_states_paged, backend="aot_eager", fullgraph=True)
    scheduled = list(engine.scheduler.schedule())
    for size, keep in ((1, 1), (2, 2), (4, 3)):  # static, then dynamic; the last padded
        g = graphs._buffers(size, 1)
        batch = build_batch(scheduled[:keep], engine.cache, engine.device, engine.table_width, pad_to=size)
        graphs._load(g, batch)
        with torch.no_grad():
            ref = model.hidden_states_paged(g.input_ids, g.positions, g.meta)
            out = compiled(g.input_ids, g.positions, g.meta)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_the_compiled_decode_step_writes_the_cache_in_place():
    """Inductor's code for the decode forward has no loop over the whole KV cache: the step's cache
    writes are scatters into the cache tensors. Writing through a view of one layer made Inductor copy
    the whole cache several times per step (35 ms a step on an H200 with a 2.6 GiB cache)."""
    import re

    from torch._inductor.utils import run_and_get_code

    from coscale.infer.graphs import DecodeGraphs, capture_sizes
    from coscale.model.moe import GroupedExperts

    model = DeepseekForCausalLM(get_preset("tiny", num_hidden_layers=2, vocab_size=VOCAB)).float().eval()
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            module.impl = "grouped"
    engine = small_engine(model, num_blocks=3000, max_num_batched_tokens=40)
    engine.add_request("a", list(range(1, 14)), SamplingParams(8, 0.0))
    engine.step()
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.engine, graphs.sizes = engine, capture_sizes(8)
    g = graphs._buffers(1, 1)
    graphs._load(g, build_batch(list(engine.scheduler.schedule()), engine.cache, engine.device, engine.table_width,
                                pad_to=1))  # fmt: skip
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model.hidden_states_paged(g.input_ids, g.positions, g.meta)
        cache_ref = engine.cache.latent.clone()
        out, code = run_and_get_code(torch.compile(model.hidden_states_paged, fullgraph=True), g.input_ids,
                                     g.positions, g.meta)  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(engine.cache.latent, cache_ref, rtol=1e-5, atol=1e-5)  # the same slots written
    cache_slots = engine.cache.latent.shape[1] * engine.cache.block_size
    bounds = {int(n) for n in re.findall(r"<\s*(\d+)L?\b", "\n".join(code))}
    assert bounds and not {n for n in bounds if n >= cache_slots}, sorted(bounds)


def test_decode_graphs_fall_back_to_the_eager_forward_when_compiling_fails(model, caplog):
    from coscale.infer.graphs import DecodeGraphs

    engine = small_engine(model, num_blocks=30, max_num_batched_tokens=40)
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.engine, graphs.compiled = engine, True
    calls = []

    def failing(*args):
        calls.append("compiled")
        raise torch._dynamo.exc.TorchDynamoException("Inductor could not lower this\nand more detail")

    graphs._compiled = {False: failing, True: failing}  # (the compilations with and without the side stream)
    g = graphs._buffers(1, 1)
    with torch.no_grad():
        graphs._warm_up(g)
        assert calls == ["compiled"] and graphs.compiled is False
        eager = graphs.forward(g.input_ids, g.positions, g.meta)  # the eager forward from now on
        torch.testing.assert_close(eager, model.hidden_states_paged(g.input_ids, g.positions, g.meta))
    assert calls == ["compiled"]
    assert "compiling the decode step failed (TorchDynamoException: Inductor could not lower this)" in caplog.text

    def out_of_memory(*args):  # an error of the computation, not of the compiler: no eager retry
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    graphs._compiled, graphs.compiled = {False: out_of_memory, True: out_of_memory}, True
    with pytest.raises(torch.cuda.OutOfMemoryError), torch.no_grad():
        graphs._warm_up(g)
    assert graphs.compiled is True


def test_engine_config_compile_is_validated(model):
    with pytest.raises(ConfigError, match="compile"):
        small_engine(model, compile="no")


def test_decode_graphs_compile_the_side_stream_batches_apart(model, monkeypatch):
    """The batches that run the shared experts on a side stream get the compilation with Inductor's reordering
    passes off (side_stream.compile_options); larger ones keep them."""
    from coscale.infer.graphs import DecodeGraphs
    from coscale.kernels import side_stream

    monkeypatch.setattr(side_stream, "SHARED_STREAM_MAX_TOKENS", 4)
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.engine, graphs.compiled = small_engine(model, num_blocks=30, max_num_batched_tokens=40), True
    seen = []
    graphs._compiled = {side: (lambda ids, *rest, side=side: seen.append((ids.shape[0], side)))
                        for side in (False, True)}
    for tokens in (1, 4, 5, 16):
        graphs.forward(torch.zeros(tokens, dtype=torch.long), None, None)
    assert seen == [(1, True), (4, True), (5, False), (16, False)]
