"""TEST DOUBLE of the serving engine (ENGINE_CONTRACT.md): not the real engine, no model inside.

``FakeEngine`` obeys the contract's interface and rules (validation in add_request, one output per
advanced/finished/aborted request per step, stop ids, max_tokens, the max_num_seqs limit, abort frees
blocks at once, stats), so the HTTP layer can be tested fast and deterministically: each request
"generates" the token ids of ``script`` in order, starting at ``seed`` (0 when unset), one per step
(or ``tokens_per_step``, like MTP speculation).

The contract's types (SamplingParams, RequestOutput, TokenLogprob, EngineStats) are the real engine's.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

from coscale.errors import ConfigError
from coscale.infer.engine import EngineStats, RequestOutput, TokenLogprob  # the contract's types
from coscale.infer.sampling import SamplingParams

SCRIPT_TEXT = "Hello, wörld! ✓ 日本 END tail text.\n"
SCRIPT = list(SCRIPT_TEXT.encode("utf-8"))


def script_text(n: int, start: int = 0) -> str:
    """The text of the double's first n tokens from ``start`` (the seed), decoded as the server must."""
    ids = [SCRIPT[(start + i) % len(SCRIPT)] for i in range(n)]
    return bytes(ids).decode("utf-8", errors="replace")


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    generated: list[int] = field(default_factory=list)


class FakeEngine:
    """A scripted engine with the contract's interface; records what the server asked of it."""

    def __init__(self, *, max_model_len: int = 64, vocab_size: int = 256, script: list[int] | None = None,
                 tokens_per_step: int = 1, max_num_seqs: int = 8, block_size: int = 4, num_blocks: int = 256,
                 step_delay: float = 0.0, fail_on_step: int | None = None) -> None:
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.script = SCRIPT if script is None else script
        self.tokens_per_step, self.max_num_seqs = tokens_per_step, max_num_seqs
        self.block_size, self.num_blocks = block_size, num_blocks
        self.step_delay, self.fail_on_step = step_delay, fail_on_step
        self.waiting: list[_Request] = []
        self.running: list[_Request] = []
        self.pending_aborts: list[_Request] = []
        self.added: dict[str, tuple[list[int], SamplingParams]] = {}
        self.aborted: list[str] = []
        self.steps = 0
        self.max_running_seen = 0
        self.caller_threads: set[int] = set()
        self.prompt_total = self.generation_total = 0

    def _touch(self) -> None:
        self.caller_threads.add(threading.get_ident())

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._touch()
        params.validate()
        if not prompt_token_ids:
            raise ConfigError("empty prompt")
        if any(not 0 <= t < self.vocab_size for t in prompt_token_ids):
            raise ConfigError(f"prompt token ids must be in [0, {self.vocab_size})")
        if request_id in self.added:
            raise ConfigError(f"duplicate request id {request_id}")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ConfigError(f"prompt ({len(prompt_token_ids)}) + max_tokens ({params.max_tokens}) exceeds "
                              f"max_model_len ({self.max_model_len})")
        self.added[request_id] = (list(prompt_token_ids), params)
        self.waiting.append(_Request(request_id, list(prompt_token_ids), params))

    def abort(self, request_id: str) -> None:
        self._touch()
        for queue in (self.waiting, self.running):
            for r in queue:
                if r.request_id == request_id:
                    queue.remove(r)
                    self.pending_aborts.append(r)
                    self.aborted.append(request_id)
                    return

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.pending_aborts)

    def step(self) -> list[RequestOutput]:
        self._touch()
        self.steps += 1
        if self.fail_on_step is not None and self.steps >= self.fail_on_step:
            raise RuntimeError("injected engine failure")
        if self.step_delay:
            time.sleep(self.step_delay)
        outputs = [self._output(r, [], None, True, "abort") for r in self.pending_aborts]
        self.pending_aborts = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting.pop(0)
            self.prompt_total += len(r.prompt)
            self.running.append(r)
        self.max_running_seen = max(self.max_running_seen, len(self.running))
        for r in list(self.running):
            outputs.append(self._advance(r))
        return outputs

    def _advance(self, r: _Request) -> RequestOutput:
        p, new, reason = r.params, [], None
        for _ in range(self.tokens_per_step):
            token = self.script[((p.seed or 0) + len(r.generated)) % len(self.script)]
            r.generated.append(token)
            new.append(token)
            if token in p.stop_token_ids:
                reason = "stop"
            elif len(r.generated) >= p.max_tokens:
                reason = "length"
            if reason:
                break
        self.generation_total += len(new)
        logprobs = None
        if p.logprobs is not None:
            logprobs = [TokenLogprob(t, -0.25, [(t, -0.25), ((t + 1) % self.vocab_size, -1.5),
                                                ((t + 2) % self.vocab_size, -2.5)][:p.logprobs]) for t in new]
        if reason:
            self.running.remove(r)
        return self._output(r, new, logprobs, reason is not None, reason)

    @staticmethod
    def _output(r: _Request, new, logprobs, finished: bool, reason: str | None) -> RequestOutput:
        return RequestOutput(r.request_id, new, logprobs, finished, reason, len(r.prompt), len(r.generated))

    def used_blocks(self) -> int:
        return sum(math.ceil((len(r.prompt) + len(r.generated)) / self.block_size) for r in self.running)

    def stats(self) -> EngineStats:
        return EngineStats(waiting=len(self.waiting), running=len(self.running), num_blocks=self.num_blocks,
                           used_blocks=self.used_blocks(), cache_tokens=self.num_blocks * self.block_size,
                           prompt_tokens_total=self.prompt_total, generation_tokens_total=self.generation_total,
                           preemptions_total=0, draft_tokens_total=0, accepted_tokens_total=0)


# ---- running the app over loopback ----------------------------------------------------------------


@contextlib.contextmanager
def threaded_server(engine, tokenizer=None, name: str = "tiny", shutdown_grace: float = 0.0):
    """The app on a uvicorn server in a background thread on a free loopback port; yields (url, app)."""
    from coscale.serve.app import build_app
    from coscale.serve.server import make_server
    from coscale.tokenizer import ByteTokenizer

    app = build_app(engine, tokenizer or ByteTokenizer(), name)
    server = make_server(app, "127.0.0.1", 0, shutdown_grace=shutdown_grace, log_level="warning")
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_for(condition, timeout: float = 10.0) -> bool:
    """Poll ``condition()`` until true or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return bool(condition())
        time.sleep(0.01)
    return True


def healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def server_process(argv, python_path: list[str], start_timeout: float = 60.0):
    """A server in a child process on a free loopback port: ``argv(port)`` is its command line.
    Yields (url, process); the process is killed afterwards if it still runs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(python_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv(port), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_for(lambda: proc.poll() is not None or healthy(url), start_timeout) or proc.poll() is not None:
            raise RuntimeError(f"the server did not start:\n{proc.stdout.read1().decode()}")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
