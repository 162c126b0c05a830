"""Prometheus metrics for ``/metrics``, named after vLLM's (prefix ``coscale:``, label ``model_name``).

Two sources:
- the engine's own counters and gauges (EngineStats), read at scrape time by a collector, so the
  numbers are the engine's and never drift: ``num_requests_running``, ``num_requests_waiting``,
  ``kv_cache_usage_perc`` (0-1), ``kv_cache_blocks``, ``prompt_tokens_total``, ``generation_tokens_total``,
  ``num_preemptions_total``, ``spec_decode_num_draft_tokens_total`` and ``..._num_accepted_tokens_total``;
- what the server measures per request, from its arrival (tokenization included) to its last token:
  histograms ``time_to_first_token_seconds`` (TTFT), ``time_per_output_token_seconds`` (TPOT, the mean
  gap between a request's tokens after the first), ``e2e_request_latency_seconds``, and the counter
  ``request_success_total{finished_reason}``.

``prompt_tokens_per_second`` and ``generation_tokens_per_second`` are gauges over the last
:data:`RATE_WINDOW_S` seconds of engine counters, sampled once a second by the server (Prometheus'
``rate()`` over the counters gives the same over any window).

Each server owns its registry (no process-global state), so tests can build several apps.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "coscale:"
RATE_WINDOW_S = 10.0
# vLLM's bucket edges: TTFT from 1 ms, TPOT from 10 ms, request latency from 0.3 s.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class TokenRates:
    """Tokens per second over a sliding window of (time, prompt total, generation total) samples."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int, int]] = deque()

    def sample(self, stats, at: float | None = None) -> None:
        at = time.monotonic() if at is None else at
        self._samples.append((at, stats.prompt_tokens_total, stats.generation_tokens_total))
        while len(self._samples) > 2 and at - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def rates(self) -> tuple[float, float]:
        """(prompt tokens/s, generation tokens/s); zeros before two samples exist."""
        if len(self._samples) < 2:
            return 0.0, 0.0
        (t0, p0, g0), (t1, p1, g1) = self._samples[0], self._samples[-1]
        span = max(t1 - t0, 1e-9)
        return (p1 - p0) / span, (g1 - g0) / span


class _EngineCollector:
    """Reads EngineStats at scrape time (prometheus_client's custom-collector protocol)."""

    def __init__(self, stats_fn, rates: TokenRates, model_name: str) -> None:
        self.stats_fn, self.rates, self.model_name = stats_fn, rates, model_name

    def collect(self):
        s, labels = self.stats_fn(), [self.model_name]
        prompt_rate, generation_rate = self.rates.rates()
        gauges = [
            ("num_requests_running", "Requests in the engine's running batch.", s.running),
            ("num_requests_waiting", "Requests queued for admission.", s.waiting),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
             s.used_blocks / s.num_blocks if s.num_blocks else 0.0),
            ("kv_cache_blocks", "KV-cache blocks in all.", s.num_blocks),
            ("kv_cache_tokens", "KV-cache capacity in tokens.", s.cache_tokens),
            ("prompt_tokens_per_second", f"Prompt tokens per second over the last {RATE_WINDOW_S:g} s.",
             prompt_rate),
            ("generation_tokens_per_second", f"Generated tokens per second over the last {RATE_WINDOW_S:g} s.",
             generation_rate),
        ]
        counters = [
            ("prompt_tokens", "Prompt tokens processed.", s.prompt_tokens_total),
            ("generation_tokens", "Tokens generated.", s.generation_tokens_total),
            ("num_preemptions", "Requests preempted (recomputed) because the cache was full.", s.preemptions_total),
            ("spec_decode_num_draft_tokens", "MTP draft tokens proposed.", s.draft_tokens_total),
            ("spec_decode_num_accepted_tokens", "MTP draft tokens accepted.", s.accepted_tokens_total),
        ]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric(labels, float(value))
            yield family
        for name, doc, value in counters:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric(labels, float(value))
            yield family


class ServerMetrics:
    """The registry behind ``/metrics`` and the per-request observations the server makes."""

    def __init__(self, model_name: str, stats_fn) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.rates = TokenRates()
        self.registry.register(_EngineCollector(stats_fn, self.rates, model_name))
        labels = ["model_name"]
        self._ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from arrival to the first token.",
                               labels, buckets=TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self._tpot = Histogram(PREFIX + "time_per_output_token_seconds",
                               "Mean time between a request's tokens after the first.",
                               labels, buckets=TPOT_BUCKETS, registry=self.registry).labels(model_name)
        self._e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from arrival to the last token.",
                              labels, buckets=LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self._finished = Counter(PREFIX + "request_success", "Requests finished, by reason.",
                                 ["model_name", "finished_reason"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """One request's timing from its arrival (``time.monotonic()``); ``tokens`` marks tokens going out,
    ``finish`` records the request."""

    def __init__(self, metrics: ServerMetrics, arrival: float | None = None) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic() if arrival is None else arrival
        self.first: float | None = None
        self.last: float | None = None
        self.count = 0

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        t = time.monotonic()
        if self.first is None:
            self.first = t
            self.metrics._ttft.observe(t - self.arrival)
        self.last, self.count = t, self.count + n

    def finish(self, reason: str) -> None:
        m = self.metrics
        m._finished.labels(m.model_name, reason).inc()
        if self.last is None:
            return
        m._e2e.observe(self.last - self.arrival)
        if self.count > 1:
            m._tpot.observe((self.last - self.first) / (self.count - 1))
