"""``coscale bench-serve``: load a running server with concurrent streaming clients and time it.

Each client sends streaming requests (``stream_options.include_usage`` on, so token counts come from
the server) one after another until ``num_requests`` have been sent; a request's TTFT is the time to
its first chunk that carries text, its TPOT ``(last text chunk - first) / (completion tokens - 1)``.
The run is bounded in count and in time: past ``max_duration`` no request starts and the ones in
flight are cancelled (counted, not timed). Throughput is over the wall time of the whole run.

``verify`` (``--check``): after the load, (1) wait for the server to go idle and read ``/metrics``:
the KV-cache blocks still in use must be 0 (nothing leaked), (2) send every completed request again,
alone, one at a time, and compare its text with what the loaded run streamed (greedy: it must be the
same), (3) read the blocks in use once more. ``BenchResult.check`` holds the counts; ``passed`` says whether all held.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from coscale.errors import CoscaleError

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
PERCENTILES = (50, 90, 99)


@dataclass
class BenchConfig:
    url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model the server lists
    endpoint: str = "completions"  # or "chat"
    num_requests: int = 64
    concurrency: int = 8
    prompt: str = DEFAULT_PROMPT
    prompt_tokens: int | None = None  # random token ids (0..255) of this length instead of the prompt text
    max_tokens: int = 64
    ignore_eos: bool = True  # fixed output lengths, so runs compare
    temperature: float = 0.0
    max_duration: float = 600.0  # seconds for the whole run
    request_timeout: float = 600.0
    seed: int = 0
    verify: bool = False  # --check: compare each text with a single-request run; check no cache block is leaked

    def check(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise CoscaleError(f"--endpoint must be completions or chat, got {self.endpoint!r}")
        for name in ("num_requests", "concurrency", "max_tokens"):
            if getattr(self, name) < 1:
                raise CoscaleError(f"--{name.replace('_', '-')} must be >= 1")
        for flag, value in (("--max-duration", self.max_duration), ("--timeout", self.request_timeout)):
            if not 0 < value < math.inf:  # (also false for NaN)
                raise CoscaleError(f"{flag} must be a finite number of seconds > 0, got {value}")
        if not 0 <= self.temperature < math.inf:
            raise CoscaleError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.prompt_tokens is None and not self.prompt:
            raise CoscaleError("--prompt must not be empty")
        if self.url.rstrip("/").endswith("/v1"):
            raise CoscaleError(f"--url takes the server's address without /v1 (e.g. http://127.0.0.1:8000), "
                               f"got {self.url}")
        if self.prompt_tokens is not None and (self.prompt_tokens < 1 or self.endpoint == "chat"):
            raise CoscaleError("--prompt-tokens takes a count >= 1 and the completions endpoint")
        if self.verify and self.temperature != 0:
            raise CoscaleError("--check compares texts with single-request runs: it needs --temperature 0")


@dataclass
class RequestResult:
    ok: bool
    latency: float = 0.0
    ttft: float | None = None
    tpot: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    index: int = -1  # the request number (its payload)
    text: str = ""


@dataclass
class BenchResult:
    config: dict
    duration_s: float
    completed: int
    failed: int
    cancelled: int
    request_throughput: float  # completed requests per second
    output_token_throughput: float
    total_token_throughput: float
    ttft_s: dict = field(default_factory=dict)
    tpot_s: dict = field(default_factory=dict)
    e2e_s: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    check: dict | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def table(self) -> str:
        lines = [f"requests: {self.completed} completed, {self.failed} failed, {self.cancelled} cancelled "
                 f"in {self.duration_s:.2f} s",
                 f"throughput: {self.request_throughput:.2f} req/s, {self.output_token_throughput:.1f} output "
                 f"tok/s, {self.total_token_throughput:.1f} total tok/s",
                 f"{'':10}{'mean':>10}" + "".join(f"{'p' + str(p):>10}" for p in PERCENTILES)]
        for name, stats in (("TTFT ms", self.ttft_s), ("TPOT ms", self.tpot_s), ("E2E ms", self.e2e_s)):
            if stats:
                values = [stats["mean"], *(stats[f"p{p}"] for p in PERCENTILES)]
                lines.append(f"{name:10}" + "".join(f"{1000 * v:>10.1f}" for v in values))
        lines += [f"error: {e}" for e in self.errors[:5]]
        c = self.check
        if c is not None:
            lines.append(f"check: {c['identical']}/{c['checked']} texts identical to single-request runs; KV-cache "
                         f"blocks in use after the load {c['blocks_in_use_after_load']}, after the single runs "
                         f"{c['blocks_in_use_after_singles']}: {'PASSED' if c['passed'] else 'FAILED'}")
            lines += [f"mismatch: {m}" for m in c["mismatches"][:3]]
        return "\n".join(lines)


def _summary(values: list[float]) -> dict:
    if not values:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


def _payload(cfg: BenchConfig, model: str, index: int) -> dict:
    body = {"model": model, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": cfg.ignore_eos}
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": cfg.prompt}]
    elif cfg.prompt_tokens is not None:
        rng = random.Random(cfg.seed * 1_000_003 + index)
        body["prompt"] = [rng.randrange(256) for _ in range(cfg.prompt_tokens)]
    else:
        body["prompt"] = cfg.prompt
    return body


async def _one_request(client, cfg: BenchConfig, path: str, body: dict) -> RequestResult:
    start = time.perf_counter()
    first = last = None
    usage = None
    pieces = []
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode("utf-8", errors="replace")
            return RequestResult(False, error=f"HTTP {response.status_code}: {text[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                return RequestResult(False, error=str(event["error"].get("message")))
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                piece = choice.get("text") or (choice.get("delta") or {}).get("content")
                if piece:
                    pieces.append(piece)
                    last = time.perf_counter()
                    first = first or last
    if usage is None:
        return RequestResult(False, error="the stream ended without a usage chunk")
    n = usage["completion_tokens"]
    return RequestResult(True, latency=time.perf_counter() - start,
                         ttft=None if first is None else first - start,
                         tpot=(last - first) / (n - 1) if first is not None and n > 1 else None,
                         prompt_tokens=usage["prompt_tokens"], completion_tokens=n, text="".join(pieces))


async def _served_model(client) -> str:
    response = await client.get("/v1/models")
    if response.status_code != 200:
        raise CoscaleError(f"GET /v1/models answered HTTP {response.status_code}")
    return response.json()["data"][0]["id"]


async def run_bench(cfg: BenchConfig, progress=None) -> BenchResult:
    """Run the benchmark against ``cfg.url``; ``progress`` is called with each finished RequestResult."""
    import httpx

    cfg.check()
    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(base_url=cfg.url, timeout=cfg.request_timeout, limits=limits) as client:
        try:
            model = cfg.model or await _served_model(client)
        except httpx.HTTPError as e:
            raise CoscaleError(f"no server answers at {cfg.url}: {e}") from None
        results: list[RequestResult] = []
        next_index = iter(range(cfg.num_requests))
        start = time.perf_counter()
        deadline = start + cfg.max_duration

        async def client_loop():
            for index in next_index:  # shared iterator: clients take the next request number
                if time.perf_counter() >= deadline:
                    return
                try:
                    result = await _one_request(client, cfg, path, _payload(cfg, model, index))
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    result = RequestResult(False, error=f"{type(e).__name__}: {e}")
                result.index = index
                results.append(result)
                if progress is not None:
                    progress(result)

        tasks = [asyncio.create_task(client_loop()) for _ in range(cfg.concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=cfg.max_duration)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - start
        check = await _check(client, cfg, path, model, results) if cfg.verify else None
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.completion_tokens for r in ok)
    return BenchResult(
        config={**asdict(cfg), "model": model}, duration_s=duration, completed=len(ok),
        failed=len(results) - len(ok), cancelled=len(pending),
        request_throughput=len(ok) / duration, output_token_throughput=out_tokens / duration,
        total_token_throughput=(out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        ttft_s=_summary([r.ttft for r in ok if r.ttft is not None]),
        tpot_s=_summary([r.tpot for r in ok if r.tpot is not None]),
        e2e_s=_summary([r.latency for r in ok]),
        errors=[r.error for r in results if r.error][:20], check=check)


async def _blocks_in_use(client, idle_timeout: float = 60.0) -> int:
    """KV-cache blocks in use once the server has no running or waiting request (from /metrics)."""
    deadline = time.perf_counter() + idle_timeout
    while True:
        response = await client.get("/metrics")
        values = {}
        for line in response.text.splitlines():
            if line.startswith("coscale:") and " " in line:
                name, value = line.rsplit(" ", 1)
                values[name.split("{")[0][len("coscale:"):]] = float(value)
        idle = values.get("num_requests_running", 0) == 0 and values.get("num_requests_waiting", 0) == 0
        if idle or time.perf_counter() > deadline:
            return round(values.get("kv_cache_usage_perc", 0.0) * values.get("kv_cache_blocks", 0.0))
        await asyncio.sleep(0.05)


async def _check(client, cfg: BenchConfig, path: str, model: str, results: list[RequestResult]) -> dict:
    """`verify` (module docstring)."""
    after_load = await _blocks_in_use(client)
    done = sorted((r for r in results if r.ok), key=lambda r: r.index)
    alone: dict[str, str] = {}  # payload -> text of its single-request run (requests may share a prompt)
    mismatches = []
    for r in done:
        body = _payload(cfg, model, r.index)
        key = json.dumps(body, sort_keys=True)
        if key not in alone:
            single = await _one_request(client, cfg, path, body)
            alone[key] = single.text if single.ok else f"<failed: {single.error}>"
        if alone[key] != r.text:
            mismatches.append(f"request {r.index}: loaded {r.text[:60]!r} vs alone {alone[key][:60]!r}")
    after_singles = await _blocks_in_use(client)
    identical = len(done) - len(mismatches)
    return dict(checked=len(done), identical=identical, single_runs=len(alone), mismatches=mismatches[:20],
                blocks_in_use_after_load=after_load, blocks_in_use_after_singles=after_singles,
                passed=bool(done) and identical == len(done) and after_load == 0 and after_singles == 0)
