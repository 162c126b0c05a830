"""The server over real loopback sockets (uvicorn), with the engine's test double (tests/serve_double.py).

A client that disconnects mid-request has its engine request aborted at once (cache blocks freed);
the official ``openai`` client works against the server, errors included; SIGTERM finishes or cancels
running requests and the process exits.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time

import httpx
import pytest

from serve_double import FakeEngine, script_text, server_process, threaded_server, wait_for

TESTS = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(TESTS), "src")


def test_streaming_client_disconnect_aborts_the_request():
    engine = FakeEngine(step_delay=0.01, max_model_len=100_000)
    with threaded_server(engine) as (url, app):
        with httpx.Client(base_url=url, timeout=10) as client:
            with client.stream("POST", "/v1/completions", json={"prompt": "x", "max_tokens": 50_000,
                                                                "stream": True}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
            # leaving the block closed the connection mid-stream
        assert wait_for(lambda: len(engine.aborted) == 1, timeout=5)
        assert engine.aborted == list(engine.added)
        assert wait_for(lambda: app.state.server.engine.stats().used_blocks == 0, timeout=5)
        assert len(engine.added[engine.aborted[0]][0]) == 1
        assert not engine.running


def test_non_streaming_client_disconnect_aborts_the_request():
    engine = FakeEngine(step_delay=0.01, max_model_len=100_000)
    with threaded_server(engine) as (url, _):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 50_000}, timeout=0.5)
        assert wait_for(lambda: len(engine.aborted) == 1, timeout=5)
        # the server is still healthy and serves the next request
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=10)
        assert r.json()["choices"][0]["text"] == script_text(3)


def test_openai_client_against_the_server():
    openai = pytest.importorskip("openai")
    with threaded_server(FakeEngine(), name="tiny") as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list()] == ["tiny"]
        assert client.models.retrieve("tiny").id == "tiny"
        completion = client.completions.create(model="tiny", prompt="Hi", max_tokens=5, temperature=0)
        assert completion.choices[0].text == script_text(5) and completion.usage.completion_tokens == 5
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=7, stop=["o"])
        assert chat.choices[0].message.content == "Hell" and chat.choices[0].finish_reason == "stop"
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=12, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == script_text(12)
        assert chunks[-1].usage.completion_tokens == 12
        text = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt="Hi", max_tokens=8, stream=True))
        assert text == script_text(8)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="Hi", n=2)
        assert e.value.status_code == 400 and "n must be 1" in e.value.message
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="Hi" * 40, max_tokens=10)
        assert e.value.code == "context_length_exceeded"
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt="Hi")


SERVER_SCRIPT = textwrap.dedent("""
    import sys
    from serve_double import FakeEngine
    from coscale.serve.app import build_app
    from coscale.serve.server import make_server
    from coscale.tokenizer import ByteTokenizer

    port, grace = int(sys.argv[1]), float(sys.argv[2])
    app = build_app(FakeEngine(step_delay=0.02, max_model_len=100_000), ByteTokenizer(), "tiny")
    make_server(app, "127.0.0.1", port, shutdown_grace=grace, log_level="warning").run()
""")


def _sigterm_mid_stream(tmp_path, grace: float, max_tokens: int) -> tuple[list[str], int, float]:
    """Start a server process, stream one request, SIGTERM it after the first chunk; returns the
    stream's data payloads, the process' exit status and the seconds it took to exit."""
    script = tmp_path / "server.py"
    script.write_text(SERVER_SCRIPT)
    with server_process(lambda port: [sys.executable, str(script), str(port), str(grace)], [SRC, TESTS]) \
            as (url, proc):
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                          json={"prompt": "x", "max_tokens": max_tokens, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    if len(events) == 1:
                        proc.send_signal(signal.SIGTERM)
                        sent = time.monotonic()
        rc = proc.wait(timeout=30)
        return events, rc, time.monotonic() - sent


def test_sigterm_cancels_a_long_stream_cleanly(tmp_path):
    events, rc, seconds = _sigterm_mid_stream(tmp_path, grace=0.2, max_tokens=50_000)
    assert events[-1] == "[DONE]"
    assert "shutting down" in json.loads(events[-2])["error"]["message"]
    assert rc in (0, -signal.SIGTERM) and seconds < 15


def test_sigterm_lets_a_short_stream_finish(tmp_path):
    events, rc, _ = _sigterm_mid_stream(tmp_path, grace=20, max_tokens=20)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == script_text(20)
    assert rc in (0, -signal.SIGTERM)
