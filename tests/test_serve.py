"""The HTTP layer (coscale.serve) against a test double of the engine (tests/serve_double.py), in process.

Every route, OpenAI's response shapes, server-sent-event framing, stop strings and logprobs, the 4xx
error shapes, metrics, concurrency and shutdown. Real sockets (disconnects, the openai client,
SIGTERM) are in test_serve_http.py; the real engine in test_serve_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coscale.errors import ConfigError
from coscale.serve.app import build_app
from coscale.serve.async_engine import AsyncEngine, EngineUnavailable, RequestAborted
from coscale.serve.metrics import TokenRates
from coscale.tokenizer import ByteTokenizer
from serve_double import SCRIPT, SCRIPT_TEXT, FakeEngine, SamplingParams, script_text

ERROR_KEYS = {"message", "type", "param", "code"}


def run(coro):
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def serving(engine: FakeEngine | None = None, tokenizer=None, name: str = "tiny"):
    engine = engine or FakeEngine()
    app = build_app(engine, tokenizer or ByteTokenizer(), name)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        try:
            yield client, engine, app
        finally:
            await app.state.server.engine.shutdown()


async def eventually(condition, timeout: float = 5.0) -> bool:
    """Await ``condition()`` (the engine thread acts on commands asynchronously)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition() and loop.time() < deadline:
        await asyncio.sleep(0.005)
    return bool(condition())


def sse_events(body: str) -> list[str]:
    """The data payloads of an SSE body; checks the framing (data lines, blank-line separators)."""
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), body
    return [e[len("data: "):] for e in events]


def stream_chunks(body: str) -> list[dict]:
    events = sse_events(body)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]]


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    assert body["error"]["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    assert body["error"]["code"] == code
    return body["error"]["message"]


# ---- completions -------------------------------------------------------------------------------


def test_completion_shape_text_and_usage():
    async def body():
        async with serving() as (client, engine, _):
            r = await client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 20})
            assert r.status_code == 200
            out = r.json()
            assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == "tiny"
            assert isinstance(out["created"], int)
            [choice] = out["choices"]
            assert choice == {"index": 0, "text": script_text(20), "logprobs": None, "finish_reason": "length"}
            assert out["usage"] == {"prompt_tokens": 2, "completion_tokens": 20, "total_tokens": 22}
            [(prompt, params)] = engine.added.values()
            assert prompt == [ord("h"), ord("i")]
            assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (20, 1.0, 1.0, 0)
            assert params.stop_token_ids == () and params.logprobs is None
    run(body())


def test_completion_defaults_and_sampling_parameters_reach_the_engine():
    async def body():
        async with serving() as (client, engine, _):
            r = await client.post("/v1/completions", json={"prompt": "x"})
            assert r.json()["usage"]["completion_tokens"] == 16  # OpenAI's default max_tokens
            r = await client.post("/v1/completions", json={
                "prompt": "x", "max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "top_k": 7, "seed": 5,
                "stop_token_ids": [200]})
            assert r.json()["choices"][0]["text"] == script_text(3, start=5)
            params = list(engine.added.values())[-1][1]
            assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.5, 0.9, 7, 5)
            assert params.stop_token_ids == (200,)
            r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "top_k": -1})
            assert r.status_code == 200 and list(engine.added.values())[-1][1].top_k == 0
    run(body())


def test_completion_token_id_prompts_and_prompt_batches():
    async def body():
        async with serving() as (client, engine, _):
            r = await client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3
            assert list(engine.added.values())[-1][0] == [5, 6, 7]
            r = await client.post("/v1/completions", json={"prompt": ["ab", "cde"], "max_tokens": 4, "seed": 2})
            out = r.json()
            assert [c["index"] for c in out["choices"]] == [0, 1]
            assert all(c["text"] == script_text(4, start=2) for c in out["choices"])
            assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
            r = await client.post("/v1/completions", json={"prompt": [[1, 2], [3]], "max_tokens": 2})
            assert r.json()["usage"]["prompt_tokens"] == 3
    run(body())


def test_echo_prepends_the_prompt():
    async def body():
        async with serving() as (client, _, _):
            r = await client.post("/v1/completions", json={"prompt": "Say: ", "max_tokens": 5, "echo": True})
            assert r.json()["choices"][0]["text"] == "Say: " + script_text(5)
    run(body())


def test_stop_string_cuts_the_text_and_aborts_the_engine_request():
    async def body():
        async with serving(FakeEngine(step_delay=0.002, max_model_len=4096)) as (client, engine, app):
            r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2000, "stop": ["END", "zzz"]})
            [choice] = r.json()["choices"]
            assert choice["text"] == SCRIPT_TEXT[:SCRIPT_TEXT.index("END")]
            assert choice["finish_reason"] == "stop"
            assert await eventually(lambda: len(engine.aborted) == 1)  # told to stop and free the blocks
            assert await eventually(lambda: app.state.server.engine.stats().used_blocks == 0)
    run(body())


def test_eos_from_the_tokenizer_is_a_stop_token_unless_ignore_eos():
    tokenizer = ByteTokenizer()
    tokenizer.eos_token_ids = (ord("!"),)  # pretend "!" is the end-of-sequence token

    async def body():
        async with serving(tokenizer=tokenizer) as (client, engine, _):
            r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 40})
            assert r.json()["choices"][0]["finish_reason"] == "stop"
            assert r.json()["choices"][0]["text"] == SCRIPT_TEXT[:SCRIPT_TEXT.index("!") + 1]
            r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 40, "ignore_eos": True})
            assert r.json()["choices"][0]["finish_reason"] == "length"
            assert [p.stop_token_ids for _, p in engine.added.values()] == [(ord("!"),), ()]
    run(body())


def test_completion_logprobs():
    async def body():
        async with serving() as (client, _, _):
            r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 12, "logprobs": 2})
            [choice] = r.json()["choices"]
            lp = choice["logprobs"]
            n = r.json()["usage"]["completion_tokens"]
            assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n == 12
            assert lp["tokens"][:2] == ["H", "e"] and lp["token_logprobs"][0] == -0.25
            assert lp["top_logprobs"][0] == {"H": -0.25, "I": -1.5}
            # "ö" is two byte tokens: each shows its byte, and both start where "ö" starts in the text
            i = SCRIPT_TEXT.index("ö")
            assert lp["tokens"][i:i + 2] == ["bytes:\\xc3", "bytes:\\xb6"]
            assert lp["text_offset"][i:i + 3] == [i, i, i + 1]
            assert lp["text_offset"][:3] == [0, 1, 2]
    run(body())


# ---- streaming ---------------------------------------------------------------------------------


def test_streamed_completion_equals_the_plain_one():
    async def body():
        async with serving() as (client, _, _):
            request = {"prompt": "x", "max_tokens": len(SCRIPT), "stream": True}
            r = await client.post("/v1/completions", json=request)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            chunks = stream_chunks(r.text)
            assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
            assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
            text = "".join(c["choices"][0]["text"] for c in chunks)
            assert text == SCRIPT_TEXT  # multi-byte characters arrive whole
            assert all("\ufffd" not in c["choices"][0]["text"] for c in chunks)
            assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
            assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
            plain = await client.post("/v1/completions", json={**request, "stream": False})
            assert plain.json()["choices"][0]["text"] == text
    run(body())


def test_stream_usage_chunk_and_held_back_stop_string():
    async def body():
        async with serving() as (client, _, _):
            r = await client.post("/v1/completions", json={
                "prompt": "x", "max_tokens": 60, "stream": True, "stop": "END",
                "stream_options": {"include_usage": True}})
            chunks = stream_chunks(r.text)
            pieces = [c["choices"][0]["text"] for c in chunks[:-1]]
            assert "".join(pieces) == SCRIPT_TEXT[:SCRIPT_TEXT.index("END")]
            assert not any("E" in p for p in pieces)  # no part of the stop string was ever sent
            assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 1
            assert all(c["usage"] is None for c in chunks[:-1])
    run(body())


def test_streamed_logprobs_and_echo():
    async def body():
        async with serving() as (client, _, _):
            r = await client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 10, "stream": True,
                                                           "echo": True})
            chunks = stream_chunks(r.text)
            assert chunks[0]["choices"][0]["text"] == "ab"
            assert "".join(c["choices"][0]["text"] for c in chunks) == "ab" + script_text(10)
            r = await client.post("/v1/completions", json={"prompt": "ab", "max_tokens": 10, "stream": True,
                                                           "logprobs": 1})
            chunks = stream_chunks(r.text)
            tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
            offsets = [t for c in chunks for t in c["choices"][0]["logprobs"]["text_offset"]]
            assert len(tokens) == 10 and offsets[:3] == [0, 1, 2]
    run(body())


def test_several_tokens_per_step_stream_correctly():
    async def body():
        async with serving(FakeEngine(tokens_per_step=3)) as (client, engine, _):
            r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 10, "stream": True})
            assert "".join(c["choices"][0]["text"] for c in stream_chunks(r.text)) == script_text(10)
            assert engine.steps <= 5
    run(body())


# ---- chat --------------------------------------------------------------------------------------


def test_chat_completion_shape_and_template():
    async def body():
        async with serving() as (client, engine, _):
            messages = [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}]}]
            r = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 8})
            out = r.json()
            assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
            [choice] = out["choices"]
            assert choice == {"index": 0, "message": {"role": "assistant", "content": script_text(8)},
                              "logprobs": None, "finish_reason": "length"}
            [(prompt, params)] = engine.added.values()
            assert bytes(prompt).decode() == "system: Be brief.\nuser: Hi you\nassistant: "
            assert out["usage"]["prompt_tokens"] == len(prompt)
            # no max_tokens: whatever room the context leaves
            r = await client.post("/v1/chat/completions", json={"messages": messages[1:]})
            prompt, params = list(engine.added.values())[-1]
            assert params.max_tokens == engine.max_model_len - len(prompt)
    run(body())


def test_chat_stream_chunks():
    async def body():
        async with serving() as (client, _, _):
            r = await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "stream": True,
                "stream_options": {"include_usage": True}})
            chunks = stream_chunks(r.text)
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1])
            assert content == script_text(9)
            assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 9
    run(body())


def test_chat_logprobs():
    async def body():
        async with serving() as (client, _, _):
            r = await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "logprobs": True,
                "top_logprobs": 2})
            content = r.json()["choices"][0]["logprobs"]["content"]
            assert len(content) == 9
            assert content[0] == {"token": "H", "logprob": -0.25, "bytes": [72], "top_logprobs": [
                {"token": "H", "logprob": -0.25, "bytes": [72]}, {"token": "I", "logprob": -1.5, "bytes": [73]}]}
            assert content[8]["bytes"] == [0xC3] and content[8]["token"] == "bytes:\\xc3"
            r = await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True})
            assert r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []
    run(body())


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("payload, param", [
    (b"{not json", None),
    (b"", None),
    (b"[1, 2]", None),
    (b'"text"', None),
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "stream": 1}, "stream"),
    ({"prompt": "x", "stop": [1]}, "stop"),
    ({"prompt": "x", "stop": ""}, "stop"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_k": -5}, "top_k"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"prompt": "x", "logprobs": 1, "echo": True}, "echo"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "stop_token_ids": [3, -1]}, "stop_token_ids"),
])
def test_malformed_completion_requests_get_400_in_openai_shape(payload, param):
    async def body():
        async with serving() as (client, engine, _):
            kwargs = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
            assert_error(await client.post("/v1/completions", **kwargs), 400, param)
            assert not engine.added
            ok = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert ok.status_code == 200  # the server keeps serving
    run(body())


@pytest.mark.parametrize("payload, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice"),
])
def test_malformed_chat_requests_get_400(payload, param):
    async def body():
        async with serving() as (client, engine, _):
            assert_error(await client.post("/v1/chat/completions", json=payload), 400, param)
            assert not engine.added
    run(body())


def test_error_messages_name_the_field():
    async def body():
        async with serving() as (client, _, _):
            cases = [({"messages": [{"content": "hi"}]}, "'messages.0.role' is a required property"),
                     ({"messages": [{"role": "user", "content": 5}]}, "'messages.0.content' must be a string or"),
                     ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}, "'max_tokens': "),
                     ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": 1}},
                      "'stream_options.include_usage': ")]
            for payload, expected in cases:
                assert expected in assert_error(await client.post("/v1/chat/completions", json=payload), 400)
    run(body())


def test_too_long_prompt_is_refused_with_both_numbers():
    async def body():
        async with serving(FakeEngine(max_model_len=32)) as (client, engine, _):
            r = await client.post("/v1/completions", json={"prompt": "y" * 30, "max_tokens": 5})
            message = assert_error(r, 400, "prompt", "context_length_exceeded")
            assert "32" in message and "35" in message and "30" in message
            r = await client.post("/v1/completions", json={"prompt": "y" * 40, "max_tokens": 1, "stream": True})
            assert_error(r, 400, "prompt", "context_length_exceeded")
            r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "y" * 40}]})
            message = assert_error(r, 400, "messages", "context_length_exceeded")
            # no max_tokens: the messages alone overflow; the message says how many tokens they make, no negative
            # completion size
            assert "32" in message and "resulted in" in message and "-" not in message
            assert not engine.added
    run(body())


def test_engine_refusal_is_a_400_even_for_a_stream():
    async def body():
        async with serving(FakeEngine(vocab_size=100, step_delay=0.01)) as (client, engine, _):
            for stream in (False, True):
                r = await client.post("/v1/completions", json={"prompt": [5, 150], "stream": stream, "max_tokens": 2})
                assert "[0, 100)" in assert_error(r, 400)
            # a multi-prompt request is all or nothing: the accepted first prompt is aborted again
            r = await client.post("/v1/completions", json={"prompt": [[5], [150]], "max_tokens": 50})
            assert_error(r, 400)
            assert await eventually(lambda: len(engine.aborted) == 1)
    run(body())


def test_unknown_model_route_and_method():
    async def body():
        async with serving() as (client, _, _):
            r = await client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"})
            assert "gpt-9" in assert_error(r, 404, "model", "model_not_found")
            assert_error(await client.get("/v1/nothing"), 404)
            assert_error(await client.get("/v1/completions"), 405)
    run(body())


def test_engine_failure_fails_requests_and_health_but_the_server_answers():
    async def body():
        async with serving(FakeEngine(fail_on_step=1)) as (client, _, _):
            assert (await client.get("/health")).status_code == 200
            r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
            assert "injected engine failure" in assert_error(r, 503)
            assert_error(await client.get("/health"), 503)
            assert_error(await client.post("/v1/completions", json={"prompt": "x"}), 503)
            assert (await client.get("/v1/models")).status_code == 200
    run(body())


# ---- models, health, metrics ------------------------------------------------------------------


def test_models_and_health():
    async def body():
        async with serving(name="my-model") as (client, engine, _):
            out = (await client.get("/v1/models")).json()
            assert out["object"] == "list"
            [model] = out["data"]
            assert model["id"] == "my-model" and model["object"] == "model" and model["owned_by"] == "coscale"
            assert isinstance(model["created"], int) and model["max_model_len"] == engine.max_model_len
            assert (await client.get("/v1/models/my-model")).json() == model
            assert "other" in assert_error(await client.get("/v1/models/other"), 404, "model", "model_not_found")
            assert (await client.get("/health")).json() == {"status": "ok"}
    run(body())


def test_metrics_parse_and_count():
    async def body():
        async with serving() as (client, engine, app):
            await asyncio.gather(*[client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 5 + i})
                                   for i in range(4)])
            await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 40, "stop": "END"})
            # The reply ends at the stop string; the engine may still take a step before the abort lands,
            # and the server publishes its counters after each pass of the engine thread, a moment after
            # the step itself (so the engine can be idle while /metrics still shows the pass before).
            for _ in range(200):
                if not engine.has_unfinished():
                    r = await client.get("/metrics")
                    samples = {}
                    for family in text_string_to_metric_families(r.text):
                        for s in family.samples:
                            assert s.labels.get("model_name") == "tiny"
                            samples[(s.name, s.labels.get("finished_reason"), s.labels.get("le"))] = s.value
                    if samples[("coscale:generation_tokens_total", None, None)] == engine.generation_total:
                        break
                await asyncio.sleep(0.01)
            assert r.headers["content-type"].startswith("text/plain")
            assert samples[("coscale:generation_tokens_total", None, None)] == engine.generation_total
            assert samples[("coscale:prompt_tokens_total", None, None)] == 4 * 3 + 1
            assert samples[("coscale:time_to_first_token_seconds_count", None, None)] == 5
            assert samples[("coscale:time_per_output_token_seconds_count", None, None)] == 5
            assert samples[("coscale:e2e_request_latency_seconds_count", None, None)] == 5
            assert samples[("coscale:request_success_total", "length", None)] == 4
            assert samples[("coscale:request_success_total", "stop", None)] == 1
            assert samples[("coscale:num_requests_running", None, None)] == 0
            assert samples[("coscale:kv_cache_blocks", None, None)] == engine.num_blocks
            assert 0 <= samples[("coscale:kv_cache_usage_perc", None, None)] <= 1
            assert samples[("coscale:time_to_first_token_seconds_bucket", None, "+Inf")] == 5
    run(body())


def test_token_rates_over_a_window():
    class Stats:
        def __init__(self, p, g):
            self.prompt_tokens_total, self.generation_tokens_total = p, g

    rates = TokenRates(window_s=10)
    assert rates.rates() == (0.0, 0.0)
    for t in range(30):
        rates.sample(Stats(100 * t, 7 * t), at=float(t))
    prompt, generation = rates.rates()
    assert prompt == pytest.approx(100) and generation == pytest.approx(7)
    rates.sample(Stats(2900, 203 + 70), at=30.0)  # a burst of 70 tokens in the last second
    assert rates.rates()[1] == pytest.approx((273 - 7 * 20) / 10)


# ---- concurrency and shutdown -----------------------------------------------------------------


def test_async_engine_bridge():
    async def body():
        engine = FakeEngine(step_delay=0.002, max_model_len=4096)
        bridge = AsyncEngine(engine)
        stream = await bridge.generate("a", [1, 2], SamplingParams(max_tokens=5))
        outputs = [o async for o in stream]
        assert [t for o in outputs for t in o.new_token_ids] == SCRIPT[:5]
        assert outputs[-1].finished and outputs[-1].finish_reason == "length"
        assert all(not o.finished for o in outputs[:-1])
        with pytest.raises(ConfigError, match="empty prompt"):
            await bridge.generate("b", [], SamplingParams())
        # the reader of a request aborted elsewhere (a disconnect watcher) is told so
        stream = await bridge.generate("c", [1], SamplingParams(max_tokens=4000))
        await stream.__anext__()
        reader = asyncio.create_task(stream.__anext__())
        await asyncio.sleep(0)
        bridge.abort("c")
        with pytest.raises(RequestAborted):
            await reader
        assert await eventually(lambda: engine.aborted == ["c"] and bridge.stats().running == 0)
        await bridge.shutdown()
        await bridge.shutdown()  # idempotent
        with pytest.raises(EngineUnavailable):
            await bridge.generate("d", [1], SamplingParams())
        assert len(engine.caller_threads) == 1

    run(body())


def test_concurrent_requests_are_batched_and_all_correct():
    async def body():
        async with serving(FakeEngine(max_num_seqs=6, step_delay=0.001)) as (client, engine, app):
            async def one(i):
                stream = i % 2 == 0
                r = await client.post("/v1/completions", json={"prompt": "p" * (1 + i % 5), "max_tokens": 4 + i % 7,
                                                               "seed": i, "stream": stream})
                text = "".join(c["choices"][0]["text"] for c in stream_chunks(r.text)) if stream else \
                    r.json()["choices"][0]["text"]
                assert text == script_text(4 + i % 7, start=i)

            await asyncio.gather(*[one(i) for i in range(32)])
            assert len(engine.added) == 32 and engine.max_running_seen == 6  # batched, within the limit
            assert len(engine.caller_threads) == 1  # the engine is only touched by its own thread
            # the last token reaches its client before the engine thread frees the request's blocks and
            # publishes its counters (CI, on busy cores: 2 blocks still in use when the responses had ended)
            assert await eventually(lambda: app.state.server.engine.stats().used_blocks == 0)
    run(body())


def test_shutdown_cancels_running_requests_cleanly():
    async def body():
        async with serving(FakeEngine(step_delay=0.01, max_model_len=4096)) as (client, engine, app):
            long = {"prompt": "x", "max_tokens": 4000}
            streaming = asyncio.create_task(client.post("/v1/completions", json={**long, "stream": True}))
            plain = asyncio.create_task(client.post("/v1/completions", json=long))
            while len(engine.running) < 2:
                await asyncio.sleep(0.01)
            await app.state.server.engine.shutdown(grace=0.05)
            events = sse_events((await streaming).text)
            assert events[-1] == "[DONE]" and "shutting down" in json.loads(events[-2])["error"]["message"]
            assert "shutting down" in assert_error(await plain, 503)
            assert await eventually(lambda: sorted(engine.aborted) == sorted(engine.added))
            assert not engine.running and not engine.waiting
            assert_error(await client.post("/v1/completions", json={"prompt": "x"}), 503)
            assert_error(await client.get("/health"), 503)
    run(body())


def test_shutdown_lets_requests_finish_within_the_grace_period():
    async def body():
        async with serving(FakeEngine(step_delay=0.005)) as (client, engine, app):
            task = asyncio.create_task(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 20}))
            while not engine.running:
                await asyncio.sleep(0.005)
            await app.state.server.engine.shutdown(grace=30)
            assert (await task).json()["choices"][0]["finish_reason"] == "length"
            assert not engine.aborted
    run(body())
