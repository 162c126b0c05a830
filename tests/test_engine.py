"""The serving engine: continuous batching with joins, leaves, chunked prefill and preemption gives
exactly the naive model's greedy tokens; the contract's errors, stops, aborts, seeds, logprobs, stats;
MTP speculation in the batch; the Triton kernels through the engine; the FP8 cache."""

import pytest
import torch

from coscale.config import get_preset
from coscale.errors import ConfigError
from coscale.infer import speculative
from coscale.infer.engine import Engine, EngineConfig
from coscale.infer.sampling import SamplingParams
from coscale.model import DeepseekForCausalLM

VOCAB = 50


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepseekForCausalLM(get_preset("tiny", num_hidden_layers=2, vocab_size=VOCAB)).double().eval()


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(prompt):].tolist()


def drive(engine, arrivals: dict[int, list], max_steps=500):
    """Step the engine, adding arrivals[step] = [(id, prompt, params)] before that step. Returns
    {id: (tokens, finish_reason, outputs)} and the number of steps in which prefill and decode mixed."""
    results, step = {}, 0
    while engine.has_unfinished() or step <= max(arrivals, default=0):
        for rid, prompt, params in arrivals.get(step, []):
            engine.add_request(rid, prompt, params)
            results[rid] = ([], None, [])
        for out in engine.step():
            tokens, _, outs = results[out.request_id]
            tokens += out.new_token_ids
            outs.append(out)
            results[out.request_id] = (tokens, out.finish_reason if out.finished else None, outs)
        step += 1
        assert step < max_steps
    return results


def workload(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    arrivals = {}
    for i in range(n):
        prompt = torch.randint(0, VOCAB, (int(torch.randint(1, 16, (1,), generator=g)),), generator=g).tolist()
        max_tokens = int(torch.randint(6, 17, (1,), generator=g))
        arrivals.setdefault(i // 2, []).append((f"r{i}", prompt, SamplingParams(max_tokens, 0.0)))
    return arrivals


def small_engine(model, **kw):
    base = dict(block_size=4, num_blocks=10, max_num_seqs=4, max_num_batched_tokens=10)
    base.update(kw)
    return Engine(model, EngineConfig(**base))


@pytest.mark.parametrize("speculate", [False, True])
def test_mixed_batches_with_joins_leaves_and_preemption_equal_naive_greedy(model, speculate):
    engine = small_engine(model, speculative=speculate)
    arrivals = workload()
    results = drive(engine, arrivals)
    for rid, prompt, params in (a for step in arrivals.values() for a in step):
        tokens, reason, _ = results[rid]
        assert tokens == naive_greedy(model, prompt, params.max_tokens), rid
        assert reason == "length"
    stats = engine.stats()
    assert stats.preemptions_total > 0  # the 40-token cache cannot hold all six requests at once
    assert stats.used_blocks == 0 and stats.running == 0 and stats.waiting == 0  # nothing leaked
    assert stats.prompt_tokens_total == sum(len(p) for step in arrivals.values() for _, p, _ in step)
    assert stats.generation_tokens_total == sum(p.max_tokens for step in arrivals.values() for _, _, p in step)
    if speculate:
        assert stats.draft_tokens_total > 0 and 0 <= stats.accepted_tokens_total <= stats.draft_tokens_total


def test_speculative_batch_with_accepted_drafts_is_exact(model, monkeypatch):
    """Same prompt for every request (so one greedy continuation), an MTP drafter that is right every
    other time: drafts are accepted in the batch and the tokens are still exactly greedy."""
    prompt = [3, 1, 4, 1, 5]
    reference = prompt + naive_greedy(model, prompt, 12)
    real = speculative.draft_logits
    calls = {"n": 0}

    def oracle(model_, depth, h, positions):
        logits = real(model_, depth, h, positions)
        calls["n"] += 1
        if calls["n"] % 2:
            for row, pos in enumerate(positions.tolist()):
                target = pos + depth + 2
                if target < len(reference):
                    logits[row] = -1e9
                    logits[row, reference[target]] = 0.0
        return logits

    monkeypatch.setattr(speculative, "draft_logits", oracle)
    engine = small_engine(model, speculative=True, num_blocks=12)
    arrivals = {0: [("a", prompt, SamplingParams(12, 0.0))], 2: [("b", prompt, SamplingParams(9, 0.0))],
                3: [("c", prompt, SamplingParams(12, 0.0))]}
    results = drive(engine, arrivals)
    for rid, _, params in (a for step in arrivals.values() for a in step):
        tokens, _, outs = results[rid]
        assert tokens == reference[len(prompt): len(prompt) + params.max_tokens]
        assert outs[-1].accepted_tokens > 0 and outs[-1].draft_tokens >= outs[-1].accepted_tokens
        assert any(len(o.new_token_ids) == 2 for o in outs)  # a step that committed a draft and its successor
    assert engine.stats().accepted_tokens_total > 0


def test_two_mtp_modules_draft_two_tokens_per_step(monkeypatch):
    """Depth 2 (two chained MTP modules): with correct drafts a step commits three tokens; with the
    random modules' own drafts the tokens are still exactly greedy."""
    torch.manual_seed(1)
    deep = DeepseekForCausalLM(get_preset("tiny", num_hidden_layers=2, vocab_size=VOCAB,
                                          num_nextn_predict_layers=2)).double().eval()
    prompt = [2, 7, 1, 8, 2, 8]
    reference = prompt + naive_greedy(deep, prompt, 11)
    plain = drive(small_engine(deep, speculative=True, num_blocks=16), {0: [("a", prompt, SamplingParams(11, 0.0))]})
    assert plain["a"][0] == reference[len(prompt):]
    real = speculative.draft_logits

    def oracle(model_, depth, h, positions):
        logits = real(model_, depth, h, positions)
        for row, pos in enumerate(positions.tolist()):
            if pos + depth + 2 < len(reference):
                logits[row] = -1e9
                logits[row, reference[pos + depth + 2]] = 0.0
        return logits

    monkeypatch.setattr(speculative, "draft_logits", oracle)
    tokens, _, outs = drive(small_engine(deep, speculative=True, num_blocks=16),
                            {0: [("a", prompt, SamplingParams(11, 0.0))]})["a"]
    assert tokens == reference[len(prompt):]
    assert [len(o.new_token_ids) for o in outs] == [1, 3, 3, 3, 1]  # the last step cut at max_tokens
    # 4 steps x 2 drafts; the last step's second draft is past the reference, so the oracle leaves it
    assert outs[-1].draft_tokens == 8 and outs[-1].accepted_tokens == 7


def test_triton_kernels_through_the_engine(model):
    """The interpreted decode and prefill kernels (float32 model) give the naive model's greedy tokens."""
    model32 = DeepseekForCausalLM(model.config)
    model32.load_state_dict(model.state_dict())
    model32 = model32.float().eval()
    engine = small_engine(model32, block_size=8, num_blocks=12, max_num_batched_tokens=12)
    engine.kernel_backend = "triton"
    arrivals = {0: [("a", [5, 7, 9, 11, 2, 3, 4, 8, 1, 0, 6, 12, 13, 14], SamplingParams(4, 0.0))],
                1: [("b", [1, 2, 3], SamplingParams(5, 0.0))]}
    results = drive(engine, arrivals)
    for rid, prompt, params in (a for step in arrivals.values() for a in step):
        assert results[rid][0] == naive_greedy(model32, prompt, params.max_tokens)


def test_stop_tokens_abort_and_stats(model):
    prompt = [4, 8, 15, 16, 23]
    reference = naive_greedy(model, prompt, 8)
    stop = reference[3]
    cut = reference.index(stop) + 1
    engine = small_engine(model, num_blocks=20)
    results = drive(engine, {0: [("s", prompt, SamplingParams(8, 0.0, stop_token_ids=(stop,)))]})
    assert results["s"][0] == reference[:cut] and results["s"][1] == "stop"  # the stop token is included

    engine.add_request("x", prompt, SamplingParams(8, 0.0))
    engine.add_request("y", [1, 2], SamplingParams(8, 0.0))
    engine.step()
    used = engine.stats().used_blocks
    engine.abort("x")
    assert engine.stats().used_blocks < used  # freed at once
    engine.abort("x")  # a second abort, and an unknown id: no-ops
    engine.abort("nobody")
    outs = {o.request_id: o for o in engine.step()}
    assert outs["x"].finished and outs["x"].finish_reason == "abort" and outs["x"].new_token_ids == []
    assert not outs["y"].finished and outs["y"].prompt_tokens == 2
    while engine.has_unfinished():
        engine.step()
    assert engine.stats().used_blocks == 0


def test_seeded_sampling_is_reproducible_whatever_the_batch(model):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, top_k=20, seed=1234)
    alone = drive(small_engine(model, num_blocks=20), {0: [("a", [1, 2, 3], params)]})["a"][0]
    crowd = {0: [("a", [1, 2, 3], params)], 1: [("b", [9, 9, 9, 9], SamplingParams(6, 1.0))],
             2: [("c", [5] * 12, SamplingParams(6, 0.7, seed=5))]}
    batched = drive(small_engine(model, num_blocks=9), crowd)
    assert batched["a"][0] == alone
    other = drive(small_engine(model, num_blocks=20), {0: [("a", [1, 2, 3], SamplingParams(8, 1.0, seed=99))]})
    assert other["a"][0] != alone  # (a different seed: 8 draws from 50 tokens agree with tiny probability)


def test_logprobs_are_the_models(model):
    prompt = [7, 3, 9]
    engine = small_engine(model, num_blocks=20)
    outs = drive(engine, {0: [("a", prompt, SamplingParams(4, 0.0, logprobs=3))]})["a"][2]
    seq = prompt + [t for o in outs for t in o.new_token_ids]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq]))[0], dim=-1)
    lps = [lp for o in outs for lp in o.new_logprobs]
    assert len(lps) == 4
    for i, lp in enumerate(lps):
        row = logp[len(prompt) - 1 + i]
        assert lp.token_id == seq[len(prompt) + i]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-9)
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()
        assert lp.top[0][0] == lp.token_id  # greedy: the best token


def test_add_request_errors(model):
    engine = small_engine(model)
    engine.add_request("a", [1, 2], SamplingParams(4))
    cases = [
        (("a", [1], SamplingParams(2)), "already in use"),
        (("b", [], SamplingParams(2)), "empty"),
        (("b", [1, VOCAB], SamplingParams(2)), r"\[0, 50\)"),
        (("b", [1, -1], SamplingParams(2)), r"\[0, 50\)"),
        (("b", [1] * 35, SamplingParams(10)), "prompt \\(35 tokens\\) \\+ max_tokens \\(10\\) exceeds .* 40"),
        (("b", [1], SamplingParams(0)), "max_tokens"),
        (("b", [1], SamplingParams(2, temperature=-1)), "temperature"),
        (("b", [1], SamplingParams(2, top_p=0)), "top_p"),
        (("b", [1], SamplingParams(2, logprobs=21)), "logprobs"),
    ]
    for args, msg in cases:
        with pytest.raises(ConfigError, match=msg) as info:
            engine.add_request(*args)
        assert "\n" not in str(info.value)
    assert engine.max_model_len == 10 * 4  # lowered to what the cache holds
    assert "40 tokens" in engine.describe()


def test_config_errors(model):
    no_mtp = DeepseekForCausalLM(get_preset("tiny", num_hidden_layers=1, num_nextn_predict_layers=0))
    with pytest.raises(ConfigError, match="has none") as info:
        Engine(no_mtp, EngineConfig(speculative=True, num_blocks=4))
    assert "\n" not in str(info.value)
    for kw, msg in [(dict(kv_cache_dtype="fp4"), "kv_cache_dtype"), (dict(block_size=6), "power of two"),
                    (dict(max_model_len=10**7), "exceeds the model's context"), (dict(max_num_seqs=0), "max_num_seqs")]:
        with pytest.raises(ConfigError, match=msg):
            Engine(model, EngineConfig(**kw))


def test_fp8_cache_stays_close_to_the_exact_cache(model):
    """Greedy tokens can differ, but the FP8 cache's logits stay within a few percent of the exact ones."""
    model32 = DeepseekForCausalLM(model.config)
    model32.load_state_dict(model.state_dict())
    model32 = model32.float().eval()
    logits = {}
    for fmt in ("bf16", "fp8"):
        engine = small_engine(model32, kv_cache_dtype=fmt, num_blocks=20)
        seen = []
        real = engine.model.logits

        def record(h, norm=None, real=real, seen=seen):
            out = real(h, norm)
            seen.append(out)
            return out

        engine.model.logits = record
        drive(engine, {0: [("a", [1, 5, 9, 13, 17, 21], SamplingParams(5, 0.0))]})
        del engine.model.logits
        logits[fmt] = torch.cat(seen[:2])  # the prefill's row and the first decode's
    exact, fp8 = logits["bf16"], logits["fp8"]
    assert (fp8 - exact).norm() / exact.norm() < 0.05
    assert not torch.equal(fp8, exact)  # the FP8 cache is really quantized


def test_decode_graph_buffers_pad_into_the_padding_block(model):
    """The static buffers a CUDA graph replays (checked eagerly on CPU): a batch of 2 decodes padded
    to 4 gives the same hidden states for the real rows, and the padding rows touch only block 0."""
    from coscale.infer.batch import build_batch
    from coscale.infer.graphs import DecodeGraphs, capture_sizes

    assert capture_sizes(4) == [1, 2, 4] and capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    engine = small_engine(model, num_blocks=20)
    engine.add_request("a", [1, 2, 3, 4, 5], SamplingParams(8, 0.0))
    engine.add_request("b", [6, 7], SamplingParams(8, 0.0))
    engine.step()
    engine.step()
    scheduled = engine.scheduler.schedule()
    assert all(s.is_decode for s in scheduled) and len(scheduled) == 2
    batch = build_batch(scheduled, engine.cache, engine.device, engine.table_width)
    graphs = DecodeGraphs.__new__(DecodeGraphs)  # no CUDA pool on this machine: only the buffers
    graphs.engine, graphs.sizes = engine, capture_sizes(4)
    g = graphs._buffers(graphs._padded(3), 1)
    graphs._load(g, batch)
    before = engine.cache.latent.clone()
    with torch.no_grad():
        padded = model.hidden_states_paged(g.input_ids, g.positions, g.meta)
        changed = (engine.cache.latent != before).any(dim=-1).any(dim=0).flatten().nonzero().flatten()  # slots
        plain = model.hidden_states_paged(batch.input_ids, batch.positions, batch.meta)
    torch.testing.assert_close(padded[:2], plain, rtol=1e-12, atol=1e-12)
    assert set(changed.tolist()) == set(batch.meta.slots.tolist()) | {0}  # the new tokens', and padding slot 0


class _ReplayedGraph:
    """A CUDA graph's semantics on the CPU: replay() reruns what was captured on the same static buffers
    and leaves the result in the captured output tensor."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        with torch.no_grad():
            self.out.copy_(self.fn())


def _cpu_graphs(engine):
    from coscale.infer.graphs import DecodeGraphs, capture_sizes

    graphs = DecodeGraphs.__new__(DecodeGraphs)  # no CUDA on this machine: graphs that rerun their function
    graphs.engine, graphs.graphs, graphs.pool = engine, {}, None
    graphs.sizes = capture_sizes(engine.config.max_num_seqs)
    graphs.compiled, graphs.forward, graphs.mtp_graphs = False, engine.model.hidden_states_paged, True

    def graphed(warm_up, fn):
        warm_up()
        out = fn()
        return _ReplayedGraph(fn, out), out

    graphs._graphed = graphed
    engine.graphs = graphs


@pytest.mark.parametrize("depth", [1, 2])
def test_speculative_steps_replay_the_main_and_mtp_graphs_exactly(depth, monkeypatch):
    """The speculative step through DecodeGraphs: the main forward at S = 1 + depth and each MTP
    module from graphs of their own (padded batches, static buffers), tokens exactly greedy with drafts
    accepted and rejected."""
    torch.manual_seed(2)
    deep = DeepseekForCausalLM(get_preset("tiny", num_hidden_layers=2, vocab_size=VOCAB,
                                          num_nextn_predict_layers=depth)).double().eval()
    prompt = [3, 1, 4, 1, 5]
    reference = prompt + naive_greedy(deep, prompt, 12)
    real, calls_n = speculative.draft_logits, {"n": 0}

    def oracle(model_, d, h, positions):  # right every other call, else the module's own draft
        logits = real(model_, d, h, positions)
        calls_n["n"] += 1
        for row, pos in enumerate(positions.tolist()):
            if calls_n["n"] % 2 and pos + d + 2 < len(reference):
                logits[row] = -1e9
                logits[row, reference[pos + d + 2]] = 0.0
        return logits

    monkeypatch.setattr(speculative, "draft_logits", oracle)
    engine = small_engine(deep, speculative=True, num_blocks=24)
    _cpu_graphs(engine)
    arrivals = {0: [("a", prompt, SamplingParams(12, 0.0))], 2: [("b", prompt, SamplingParams(9, 0.0))],
                3: [("c", prompt, SamplingParams(12, 0.0))]}
    results = drive(engine, arrivals)
    for rid, _, params in (a for step in arrivals.values() for a in step):
        assert results[rid][0] == reference[len(prompt): len(prompt) + params.max_tokens]
    assert engine.stats().accepted_tokens_total > 0
    spec_graphs = [g for g in engine.graphs.graphs.values() if g.meta.decode_len == 1 + depth]
    assert spec_graphs and all(len(g.drafts) == depth for g in spec_graphs)  # each MTP module replayed


def test_speculation_drafts_eagerly_when_capturing_the_mtp_module_fails(monkeypatch, caplog):
    """A capture of the MTP module's forward that raises (a torch that cannot capture some part): the
    engine logs it, drafts eagerly from then on, and the tokens are still exactly greedy."""
    torch.manual_seed(3)
    deep = DeepseekForCausalLM(get_preset("tiny", num_hidden_layers=2, vocab_size=VOCAB)).double().eval()
    prompt = [2, 7, 1, 8]
    reference = prompt + naive_greedy(deep, prompt, 8)
    engine = small_engine(deep, speculative=True, num_blocks=16)
    _cpu_graphs(engine)

    def failing(g, depth, h_prev):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(engine.graphs, "_capture_mtp", failing)
    tokens = drive(engine, {0: [("a", prompt, SamplingParams(8, 0.0))]})["a"][0]
    assert tokens == reference[len(prompt):]
    assert engine.graphs.mtp_graphs is False
    assert "capturing the MTP module's forward failed (RuntimeError: operation not permitted" in caplog.text


def test_cache_size_from_free_memory_and_the_cpu_default(model):
    """CUDA: gpu_memory_fraction of the device less what is used, the profiled activations and the
    sampling buffers (the CUDA calls mocked: this checks the arithmetic and the profiling forward)."""
    from unittest import mock

    from coscale.infer import graphs

    engine = small_engine(model, max_model_len=40, max_num_batched_tokens=16)
    cuda = mock.MagicMock()
    cuda.mem_get_info.return_value = (10**9, 2 * 10**9)  # free, total
    cuda.memory_allocated.return_value = 10**6
    cuda.max_memory_allocated.return_value = 5 * 10**6
    with mock.patch.object(graphs.torch, "cuda", cuda):
        budget = graphs.free_cache_bytes(engine)
    assert budget == 10**9 - 0.1 * 2 * 10**9 - 4 * 10**6 - 6 * 4 * VOCAB * 4
    default = Engine(model, EngineConfig(block_size=64))  # CPU: 1 GiB worth of tokens, at most 65,536
    per_token = default.cache.bytes_per_token()
    assert default.cache.num_tokens == 64 * -(-min(65536, (1 << 30) // per_token) // 64)
