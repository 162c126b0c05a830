"""Generation over the latent KV cache, and MTP speculative decoding.

Plain decoding: one prefill through the absorbed MLA path (the cache keeps only c_kv and k_pe per
token and layer), then one token per step.

MTP speculative decoding (DeepSeek-V3 report section 5.4.3; the paper: the second token is accepted
80-90% of the time, about 1.8x tokens/s): the MTP module drafts token n+1 from the main model's hidden
state at position n-1 and the embedding of token n; one main-model call over [t_n, draft] then both
verifies the draft and yields the token after it. With greedy sampling the output is exactly the
plain greedy output; each main-model call commits one or two tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from coscale.model.mla import LatentKVCache
from coscale.model.transformer import DeepseekForCausalLM


@dataclass
class GenerationStats:
    """Tokens committed by each main-model call after prefill: 2 when it accepted the MTP draft, 1 when
    it rejected it. Every call verifies one draft; the counts below follow from the list."""

    per_step_tokens: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(self.per_step_tokens)

    @property
    def main_calls(self) -> int:
        return len(self.per_step_tokens)

    @property
    def drafts(self) -> int:
        return self.main_calls

    @property
    def accepted(self) -> int:
        return self.per_step_tokens.count(2)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafts if self.drafts else 0.0


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next token from logits [B, V]: argmax when temperature is 0, else a sample."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check(prompt: torch.Tensor, max_new_tokens: int) -> int:
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError("prompt must be a non-empty [batch, seq] tensor of token ids")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    return prompt.shape[1] + max_new_tokens + 1


@torch.no_grad()
def generate(model: DeepseekForCausalLM, prompt: torch.Tensor, max_new_tokens: int,
             temperature: float = 0.0, generator: torch.Generator | None = None,
             cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Autoregressive decoding with the latent cache. Returns [B, prompt + new] token ids."""
    max_len = _check(prompt, max_new_tokens)
    dtype = cache_dtype or next(model.parameters()).dtype
    cache = LatentKVCache(model.config, prompt.shape[0], max_len, device=prompt.device, dtype=dtype)
    logits = model(prompt, 0, cache)[:, -1]
    out, pos = [prompt], prompt.shape[1]
    for _ in range(max_new_tokens):
        token = _pick(logits, temperature, generator)
        out.append(token[:, None])
        logits = model(token[:, None], pos, cache)[:, -1]
        pos += 1
    return torch.cat(out, dim=1)


class _MTPDrafter:
    """Runs MTP module 0 incrementally with its own cache slot (layer index L)."""

    def __init__(self, model: DeepseekForCausalLM, cache: LatentKVCache):
        self.model, self.cache, self.module = model, cache, model.mtp[0]

    def draft(self, h: torch.Tensor, next_tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """h [B, S, H] main hidden states at positions start_pos.., next_tokens [B, S] the tokens one
        position later; returns the MTP logits of the last position [B, V]."""
        emb = self.model.model.embed_tokens(next_tokens)
        cos, sin = self.model.rotary(start_pos, h.shape[1])
        h_mtp = self.module(h, emb, cos, sin, start_pos, self.cache)
        return self.model.logits(h_mtp[:, -1], self.module.norm)


def _main_step(model, tokens, pos, cache):
    h = model.hidden_states(tokens, pos, cache)
    return model.logits(h), h


@torch.no_grad()
def generate_speculative(model: DeepseekForCausalLM, prompt: torch.Tensor, max_new_tokens: int,
                         cache_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, GenerationStats]:
    """Greedy decoding with the first MTP module as a one-token draft (batch size 1)."""
    if not len(model.mtp):
        raise ValueError("this model has no MTP module (num_nextn_predict_layers = 0)")
    if prompt.shape[0] != 1:
        raise ValueError("speculative decoding takes one sequence at a time")
    max_len = _check(prompt, max_new_tokens) + 2
    cfg, dtype = model.config, cache_dtype or next(model.parameters()).dtype
    cache = LatentKVCache(cfg, 1, max_len, n_layers=cfg.num_hidden_layers + 1, device=prompt.device, dtype=dtype)
    drafter, stats = _MTPDrafter(model, cache), GenerationStats()

    n = prompt.shape[1]  # position of `pending`; n - prompt length tokens are committed
    logits, h = _main_step(model, prompt, 0, cache)
    pending = logits[:, -1].argmax(-1)  # token n, not yet run through the main model
    mtp_inputs = torch.cat([prompt[:, 1:], pending[:, None]], dim=1)
    draft = drafter.draft(h, mtp_inputs, 0).argmax(-1)
    out = [prompt]
    end = n + max_new_tokens
    while n < end:
        logits, h = _main_step(model, torch.stack([pending, draft], dim=1), n, cache)
        verified = logits[:, 0].argmax(-1)
        if bool((verified == draft).all()) and n + 2 <= end:
            bonus = logits[:, 1].argmax(-1)
            out.append(torch.stack([pending, draft], dim=1))
            next_after = torch.stack([draft, bonus], dim=1)
            draft = drafter.draft(h, next_after, n).argmax(-1)
            pending, n = bonus, n + 2
            stats.per_step_tokens.append(2)
        else:
            out.append(pending[:, None])
            draft = drafter.draft(h[:, :1], verified[:, None], n).argmax(-1)
            pending, n = verified, n + 1
            stats.per_step_tokens.append(1)
    return torch.cat(out, dim=1)[:, : prompt.shape[1] + max_new_tokens], stats
