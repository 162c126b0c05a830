"""`coscale bench-serve` against a loopback server backed by the engine's test double."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from coscale.cli import main
from coscale.errors import CoscaleError
from coscale.serve.bench import BenchConfig, _summary, run_bench
from serve_double import FakeEngine, threaded_server


def test_bench_serve_command_writes_json(tmp_path, capsys):
    engine = FakeEngine(step_delay=0.002, max_num_seqs=4, max_model_len=512)
    out = tmp_path / "bench.json"
    with threaded_server(engine) as (url, _):
        code = main(["bench-serve", "--url", url, "--num-requests", "12", "--concurrency", "4",
                     "--max-tokens", "8", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 12 and result["failed"] == 0 and result["cancelled"] == 0
    assert result["config"]["model"] == "tiny"
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        assert set(result[key]) == {"mean", "p50", "p90", "p99"}
        assert 0 < result[key]["p50"] <= result[key]["p99"]
    assert result["ttft_s"]["p99"] <= result["e2e_s"]["p99"]
    # every request generated exactly max_tokens (EOS ignored) and was counted
    assert result["output_token_throughput"] * result["duration_s"] == pytest.approx(12 * 8)
    assert engine.generation_total == 12 * 8 and engine.max_running_seen == 4
    printed = capsys.readouterr().out
    assert "TTFT ms" in printed and "TPOT ms" in printed and "req/s" in printed


def test_bench_chat_and_token_prompts():
    engine = FakeEngine(max_model_len=512)
    with threaded_server(engine) as (url, _):
        chat = asyncio.run(run_bench(BenchConfig(url=url, endpoint="chat", num_requests=3, concurrency=2,
                                                 max_tokens=4, prompt="hello")))
        ids = asyncio.run(run_bench(BenchConfig(url=url, num_requests=3, concurrency=3, max_tokens=4,
                                                prompt_tokens=17)))
    assert chat.completed == 3 and ids.completed == 3
    prompts = [prompt for prompt, _ in engine.added.values()]
    assert prompts[0] == list(b"user: hello\nassistant: ") and all(len(p) == 17 for p in prompts[3:])
    assert len({tuple(p) for p in prompts[3:]}) == 3  # a different random prompt per request


def test_bench_is_bounded_in_time():
    engine = FakeEngine(step_delay=0.02, max_model_len=100_000)
    with threaded_server(engine) as (url, _):
        start = time.monotonic()
        result = asyncio.run(run_bench(BenchConfig(url=url, num_requests=1000, concurrency=2, max_tokens=5000,
                                                   max_duration=0.5)))
        assert time.monotonic() - start < 10
    assert result.cancelled == 2 and result.completed == 0


def test_bench_reports_failures_and_bad_settings(tmp_path):
    with threaded_server(FakeEngine(max_model_len=32)) as (url, _):
        result = asyncio.run(run_bench(BenchConfig(url=url, num_requests=2, concurrency=1, max_tokens=64)))
    assert result.completed == 0 and result.failed == 2 and "context length" in result.errors[0]
    with pytest.raises(CoscaleError, match="no server answers"):
        asyncio.run(run_bench(BenchConfig(url="http://127.0.0.1:9", num_requests=1, request_timeout=2)))
    with pytest.raises(CoscaleError, match="--concurrency"):
        BenchConfig(concurrency=0).check()
    with pytest.raises(CoscaleError, match="--prompt-tokens"):
        BenchConfig(endpoint="chat", prompt_tokens=5).check()


def test_summary_percentiles():
    values = list(range(1, 101))
    s = _summary([float(v) for v in values])
    assert s["mean"] == pytest.approx(50.5) and s["p50"] == pytest.approx(50.5) and s["p99"] == pytest.approx(99.01)
    assert _summary([]) == {}


class CrowdedEngine(FakeEngine):
    """Wrong under load: a request admitted next to others starts its script elsewhere, and one cache
    block stays in use forever (what --check must catch)."""

    def step(self):
        crowd = len(self.running) + len(self.waiting)
        for r in self.waiting:
            if crowd > 1 and not r.generated:
                r.params.seed = (r.params.seed or 0) + 1
        return super().step()

    def used_blocks(self) -> int:
        return super().used_blocks() + 1


def test_check_passes_when_texts_match_and_nothing_leaks(capsys):
    engine = FakeEngine(step_delay=0.001, max_model_len=512)
    with threaded_server(engine) as (url, _):
        code = main(["bench-serve", "--url", url, "--num-requests", "10", "--concurrency", "5", "--max-tokens", "6",
                     "--prompt-tokens", "4", "--check"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "check: 10/10 texts identical" in printed and "PASSED" in printed
    assert len(engine.added) == 20  # the load, then each request alone


def test_check_catches_different_texts_and_a_leaked_block():
    with threaded_server(CrowdedEngine(step_delay=0.002, max_model_len=512)) as (url, _):
        result = asyncio.run(run_bench(BenchConfig(url=url, num_requests=6, concurrency=6, max_tokens=6,
                                                   prompt_tokens=4, verify=True)))
    c = result.check
    assert c["checked"] == 6 and c["single_runs"] == 6 and c["identical"] < 6 and c["mismatches"]
    assert c["blocks_in_use_after_load"] == 1 and c["blocks_in_use_after_singles"] == 1 and not c["passed"]
    assert "FAILED" in result.table()
    with pytest.raises(CoscaleError, match="temperature 0"):
        BenchConfig(verify=True, temperature=0.7).check()
