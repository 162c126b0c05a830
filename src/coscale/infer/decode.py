"""The simple one-prompt API on top of the engine: `generate` and `generate_speculative`.

Both run a private Engine (engine.py) sized for the given prompts: every sequence fits in the cache at
once, so nothing is preempted. `generate` decodes a batch of prompts (greedy, or sampled at a
temperature); `generate_speculative` decodes one prompt greedily with the MTP modules as drafters: the
main model verifies 1 + D tokens per call and commits between 1 and D + 1 of them, and the output is
exactly the plain greedy output (speculative.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from coscale.infer.cache import blocks_for
from coscale.infer.engine import Engine, EngineConfig, model_dtype
from coscale.infer.sampling import SamplingParams
from coscale.model.transformer import DeepseekForCausalLM

BLOCK_SIZE = 16


@dataclass
class GenerationStats:
    """Tokens committed by each main-model call (the prefill's first token included), and the MTP
    drafts proposed and accepted over the run."""

    per_step_tokens: list[int] = field(default_factory=list)
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def tokens(self) -> int:
        return sum(self.per_step_tokens)

    @property
    def main_calls(self) -> int:
        return len(self.per_step_tokens)

    @property
    def drafts(self) -> int:
        return self.draft_tokens

    @property
    def accepted(self) -> int:
        return self.accepted_tokens

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafts if self.drafts else 0.0


def _check(prompt: torch.Tensor, max_new_tokens: int) -> None:
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError("prompt must be a non-empty [batch, seq] tensor of token ids")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")


def _cache_format(model, cache_dtype: torch.dtype | None) -> str:
    if cache_dtype is None or cache_dtype == model_dtype(model):
        return "bf16"
    if cache_dtype == torch.float8_e4m3fn:
        return "fp8"
    raise ValueError(f"cache_dtype must be the model's dtype ({model_dtype(model)}) or torch.float8_e4m3fn, "
                     f"got {cache_dtype}")


def _engine(model, prompt: torch.Tensor, max_new_tokens: int, cache_dtype, speculative: bool) -> Engine:
    depth = model.config.num_nextn_predict_layers if speculative else 0
    B, S = prompt.shape
    per_seq = blocks_for(S + max_new_tokens + depth + 1, BLOCK_SIZE)
    config = EngineConfig(
        max_model_len=max(2, S + max_new_tokens), block_size=BLOCK_SIZE,
        kv_cache_dtype=_cache_format(model, cache_dtype), num_blocks=B * per_seq, max_num_seqs=B,
        max_num_batched_tokens=max(B * S, B * (1 + depth), 1), speculative=speculative,
    )
    return Engine(model, config, device=prompt.device)


def _run(engine: Engine, prompt: torch.Tensor, params: list[SamplingParams], stats: GenerationStats | None):
    ids = [f"{i}" for i in range(prompt.shape[0])]
    for rid, row, p in zip(ids, prompt.tolist(), params):
        engine.add_request(rid, row, p)
    new: dict[str, list[int]] = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            new[out.request_id] += out.new_token_ids
            if stats is not None and out.new_token_ids:
                stats.per_step_tokens.append(len(out.new_token_ids))
                stats.draft_tokens, stats.accepted_tokens = out.draft_tokens, out.accepted_tokens
    generated = torch.tensor([new[rid] for rid in ids], dtype=prompt.dtype, device=prompt.device)
    return torch.cat([prompt, generated.view(prompt.shape[0], -1)], dim=1)


@torch.no_grad()
def generate(model: DeepseekForCausalLM, prompt: torch.Tensor, max_new_tokens: int,
             temperature: float = 0.0, generator: torch.Generator | None = None,
             cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode max_new_tokens for each row of prompt [B, S] (greedy at temperature 0, else sampled; a
    generator seeds each row's sampling). Returns [B, S + max_new_tokens] token ids."""
    _check(prompt, max_new_tokens)
    if max_new_tokens == 0:
        return prompt.clone()
    seeds = [None] * prompt.shape[0]
    if temperature > 0 and generator is not None:
        seeds = torch.randint(0, 2**62, (prompt.shape[0],), generator=generator, device=generator.device).tolist()
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=s) for s in seeds]
    return _run(_engine(model, prompt, max_new_tokens, cache_dtype, False), prompt, params, None)


@torch.no_grad()
def generate_speculative(model: DeepseekForCausalLM, prompt: torch.Tensor, max_new_tokens: int,
                         cache_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, GenerationStats]:
    """Greedy decoding of one prompt [1, S] with the MTP modules drafting (module docstring)."""
    if not len(model.mtp):
        raise ValueError("this model has no MTP module (num_nextn_predict_layers = 0)")
    if prompt.shape[0] != 1:
        raise ValueError("speculative decoding takes one sequence at a time")
    _check(prompt, max_new_tokens)
    stats = GenerationStats()
    if max_new_tokens == 0:
        return prompt.clone(), stats
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=0.0)]
    out = _run(_engine(model, prompt, max_new_tokens, cache_dtype, True), prompt, params, stats)
    return out, stats
