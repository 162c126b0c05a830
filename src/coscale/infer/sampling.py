"""Sampling parameters and batched sampling: temperature, top-k, top-p, per-request seeds, logprobs.

Shape legend: B rows (one per request, or per request and draft position), V vocabulary.

The sampled distribution of a row is softmax(logits / temperature) restricted to the top_k most likely
tokens and then to the smallest set whose probability reaches top_p (both renormalised); temperature 0
(or below 1e-5) is argmax. Draws use the exponential race (argmax_i p_i / E_i with E_i ~ Exp(1) is distributed as p),
which lets one random tensor serve a whole batch: rows with a seed draw from their request's own
torch.Generator (reproducible whatever else is in the batch), the others from the engine's generator.

Logprobs are those of the model's raw distribution, log_softmax(logits), before temperature, top-k and
top-p (what vLLM reports by default); the sampled token's logprob comes with the `logprobs` best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from coscale.errors import ConfigError
from coscale.infer.transfer import to_device

MAX_LOGPROBS = 20
# Temperatures below this sample greedily (vLLM's threshold): logits / 1e-45 overflows float32 to inf and the
# softmax of inf is NaN, and long before that the tempered distribution is the argmax's one-hot anyway.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 16  # new tokens at most (>= 1)
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW_TEMPERATURE): greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0: off
    seed: int | None = None  # per-request generator seed (reproducible sampling)
    stop_token_ids: tuple[int, ...] = ()  # the engine stops at these (EOS is added by the server)
    logprobs: int | None = None  # None: none; k in 0..20: logprob of the sampled token + top-k

    def validate(self) -> None:
        """Raise ConfigError with a one-line message for a parameter out of range."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ConfigError(f"seed must be an integer or None, got {self.seed!r}")
        if not all(_is_int(t) for t in self.stop_token_ids):
            raise ConfigError(f"stop_token_ids must be integers, got {self.stop_token_ids!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ConfigError(f"logprobs must be None or an integer in 0..{MAX_LOGPROBS}, got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _column(values, device) -> torch.Tensor:
    return to_device(values, torch.float32, device)[:, None]


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution each row samples from: [B, V] float32 probabilities. Greedy rows get a one-hot
    of their argmax (so that speculative verification treats them like any other row). Nothing here
    waits for the device (the parameters are host values)."""
    logits = logits.float()
    temperature = _column([p.temperature if not p.greedy else 1.0 for p in params], logits.device)
    scaled = logits / temperature
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        scaled = _top_k_top_p(scaled, params)
    probs = torch.softmax(scaled, dim=-1)
    if any(p.greedy for p in params):
        greedy = to_device([p.greedy for p in params], torch.bool, logits.device)
        one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs


def _top_k_top_p(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) what falls outside each row's top-k and top-p sets."""
    V = scaled.shape[-1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=scaled.device)[None, :]
    top_k = to_device([p.top_k if p.top_k > 0 else V for p in params], torch.long, scaled.device)[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # Keep a token when the probability before it is below top_p: the smallest set reaching top_p.
    before = probs.cumsum(dim=-1) - probs
    top_p = _column([p.top_p if p.top_p < 1 else math.inf for p in params], scaled.device)
    outside = before >= top_p
    outside[:, 0] = False  # the most likely token is always in (a top_p below float32's range rounds to 0)
    sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter_(1, order, sorted_logits)


def random_rows(shape, device, generators: list[torch.Generator | None], default: torch.Generator | None,
                kind: str = "exponential") -> torch.Tensor:
    """Exp(1) ("exponential") or U[0, 1) ("uniform") noise of `shape` [B, ...] in float32: row b from
    generators[b] when set, else from `default` (one draw for all such rows)."""
    def fill(t, g):
        return t.exponential_(generator=g) if kind == "exponential" else t.uniform_(generator=g)

    noise = torch.empty(shape, device=device, dtype=torch.float32)
    shared = [b for b, g in enumerate(generators) if g is None]
    if len(shared) == len(generators):
        return fill(noise, default)
    if shared:
        noise[to_device(shared, torch.long, device)] = fill(torch.empty((len(shared), *shape[1:]), device=device),
                                                             default)
    for b, g in enumerate(generators):
        if g is not None:
            fill(noise[b], g)
    return noise


def sample_from_probs(probs: torch.Tensor, generators: list[torch.Generator | None],
                      default: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [B, V] (int64 [B]); one-hot rows give their token whatever the noise."""
    noise = random_rows(probs.shape, probs.device, generators, default).clamp_min_(torch.finfo(torch.float32).tiny)
    return (probs / noise).argmax(dim=-1)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           default: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of logits [B, V] under each row's parameters; int64 [B]."""
    if all(p.greedy for p in params):
        return logits.argmax(dim=-1)
    return sample_from_probs(sampling_probs(logits, params), generators, default)


def logprobs_on_device(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[torch.Tensor]:
    """[chosen [R]] or, with k > 0, [chosen, top ids [R, k], top logprobs [R, k]]: the raw-distribution
    logprob of tokens[b] in row b and each row's k best, best first, as device tensors (no host sync)."""
    logp = torch.log_softmax(logits if logits.element_size() >= 4 else logits.float(), dim=-1)
    out = [logp.gather(1, tokens[:, None].long())[:, 0]]
    if k:
        top = logp.topk(k, dim=-1)
        out += [top.indices, top.values]
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int):
    """:func:`logprobs_on_device` on the host: (list[float], list[list[tuple[int, float]]]), one entry
    per row."""
    found = [t.tolist() for t in logprobs_on_device(logits, tokens, k)]
    if k == 0:
        return found[0], [[] for _ in found[0]]
    return found[0], [list(zip(i, v)) for i, v in zip(found[1], found[2])]
