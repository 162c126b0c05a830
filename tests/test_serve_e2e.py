"""End to end: `coscale serve` on a random `tiny` checkpoint with the real engine (coscale.infer.engine).

Skipped while the engine is not part of the tree. Greedy replies must equal `coscale.infer.generate`
on the same weights, one request alone or many at once; no cache block is left in use afterwards;
a client that disconnects frees its blocks; bench-serve runs against it; SIGTERM stops it cleanly.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import sys

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from coscale.checkpoint import save_pretrained
from coscale.config import get_preset
from coscale.infer import generate
from coscale.model import DeepseekForCausalLM
from coscale.serve.bench import BenchConfig, run_bench
from coscale.tokenizer import ByteTokenizer
from serve_double import server_process, wait_for

pytestmark = pytest.mark.skipif(importlib.util.find_spec("coscale.infer.engine") is None,
                                reason="the serving engine (coscale.infer.engine) is not in this tree yet")

TESTS = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(TESTS), "src")
MAX_MODEL_LEN = 128
PROMPTS = ["The ", "def main():\n", "Hello, wörld", "x", "Serving MLA: "]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = DeepseekForCausalLM(get_preset("tiny", num_hidden_layers=2, max_position_embeddings=MAX_MODEL_LEN))
    path = tmp_path_factory.mktemp("ckpt") / "tiny-random"
    save_pretrained(model, path)
    return path, model.eval()


@pytest.fixture(scope="module")
def server(checkpoint):
    path, _ = checkpoint

    def argv(port):
        return [sys.executable, "-m", "coscale", "serve", str(path), "--port", str(port), "--device", "cpu",
                "--block-size", "16", "--num-blocks", "64", "--max-num-seqs", "8", "--shutdown-grace", "1",
                "--log-level", "warning"]

    with server_process(argv, [SRC, TESTS], start_timeout=180) as (url, proc):
        yield url, proc


def reference(model, prompt: str, n: int) -> str:
    ids = list(prompt.encode())
    out = generate(model, torch.tensor([ids]), n)[0, len(ids):].tolist()
    return ByteTokenizer().decode(out)


def metric(url: str, name: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


def test_greedy_completion_equals_generate(server, checkpoint):
    url, _ = server
    _, model = checkpoint
    for prompt in PROMPTS[:2]:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0},
                       timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == reference(model, prompt, 12)
        assert r.json()["usage"] == {"prompt_tokens": len(prompt.encode()), "completion_tokens": 12,
                                     "total_tokens": len(prompt.encode()) + 12}


def test_concurrent_streams_equal_single_runs_and_free_the_cache(server, checkpoint):
    url, _ = server
    _, model = checkpoint

    async def one(client, prompt):
        async with client.stream("POST", "/v1/completions", json={
                "prompt": prompt, "max_tokens": 10, "temperature": 0, "stream": True}) as r:
            events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])

    async def all_at_once():
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            return await asyncio.gather(*[one(client, p) for p in PROMPTS * 2])

    texts = asyncio.run(all_at_once())
    assert texts == [reference(model, p, 10) for p in PROMPTS * 2]
    assert wait_for(lambda: metric(url, "coscale:kv_cache_usage_perc") == 0, timeout=10)
    assert metric(url, "coscale:num_requests_running") == 0


def test_limits_and_chat(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "y" * 120, "max_tokens": 20}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 5}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny-random"


def test_disconnect_frees_blocks(server):
    url, _ = server
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "abc", "max_tokens": 100, "stream": True},
                      timeout=120) as r:
        next(r.iter_lines())
    assert wait_for(lambda: metric(url, "coscale:num_requests_running") == 0, timeout=30)
    assert metric(url, "coscale:kv_cache_usage_perc") == 0


def test_bench_serve_against_the_engine(server):
    url, _ = server
    result = asyncio.run(run_bench(BenchConfig(url=url, num_requests=6, concurrency=3, max_tokens=6,
                                               prompt="Hello ", max_duration=300)))
    assert result.completed == 6 and result.ttft_s["p50"] > 0 and result.tpot_s["p50"] > 0


def test_sigterm_stops_the_server(server):  # last in this module: it ends the server
    url, proc = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
