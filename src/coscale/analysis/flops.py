"""Training FLOPs per token (the paper's Table 2) and total / activated parameters.

Convention (the one that reproduces the DeepSeek rows and Table 4's 385 TFLOP/s; ours, the paper does
not state one):

    FLOPs/token = 6 x N_activated  +  3 x L x S x n_heads x (d_qk + d_v)

- ``6 x N``: forward 2 FLOPs per multiply-add, backward twice the forward. ``N_activated`` is every
  weight one token multiplies with: attention, dense FFN, router, shared experts, the ``k`` routed
  experts and the output head; the embedding (a table look-up) is not counted.
- Attention scores and the weighted sum of values: a query attends to ``S`` keys with ``d_qk``
  multiply-adds each and sums ``S`` values of ``d_v``: ``2 x n_heads x S x (d_qk + d_v)`` forward FLOPs.
  Causal masking halves it (each token sees S/2 keys on average); x 3 for training. ``attention="full"``
  counts the full S x S products (Table 4's "non-causal" 432 TFLOP/s), ``"none"`` drops the term.
- MTP modules are excluded unless ``include_mtp`` (their block, projections and the output head again).

With this convention DeepSeek-V2 gives 155 and DeepSeek-V3 250 GFLOPs at S = 4096, as published.
LLaMA-3.1-405B gives 2473 (published 2448, +1.0%) and Qwen-72B 442 (published 394, +12%). The LLaMA
figure is reproduced (2447.9) by counting only QK^T under the causal mask (``attention="causal-qk"``,
``3 x L x S x n_heads x d_qk``), but that mode gives 238 for DeepSeek-V3, whose 250 Table 4 pins to the
full causal term. 6 x the non-embedding weights of Qwen-72B alone is 419 GFLOPs, so no convention that
counts every weight once reaches 394.
"""

from __future__ import annotations

from dataclasses import dataclass

from coscale.analysis.models import Model, as_view
from coscale.analysis.table import Table
from coscale.errors import ConfigError
from coscale.param_count import ACTIVATED_CONVENTION

ATTENTION_MODES = ("causal", "full", "causal-qk", "none")

_ATTENTION_TERMS = {
    "causal": "causal, 3 x L x S x heads x (d_qk + d_v)",
    "full": "no mask, 6 x L x S x heads x (d_qk + d_v)",
    "causal-qk": "causal QK^T only, 3 x L x S x heads x d_qk",
    "none": "not counted",
}

# Table 2 as published (GFLOPs per training token at sequence length 4096); comparison and tests only.
PUBLISHED = {"deepseek-v2": 155, "deepseek-v3": 250, "qwen-72b": 394, "llama3.1-405b": 2448}
TABLE2_MODELS = ("deepseek-v2", "deepseek-v3", "qwen-72b", "llama3.1-405b")


@dataclass(frozen=True)
class TrainingFlops:
    weights: float  # 6 x counted parameters
    attention: float  # score and value products
    mtp: float  # MTP modules (0 unless included)
    total_params: int
    activated_params: int
    counted_params: int

    @property
    def total(self) -> float:
        return self.weights + self.attention + self.mtp


def attention_flops_per_token(model: Model, seq_len: int = 4096, attention: str = "causal") -> float:
    """Training FLOPs per token of QK^T and (scores x V) over all layers at ``seq_len``."""
    if attention not in ATTENTION_MODES:
        raise ConfigError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if seq_len < 1:
        raise ConfigError(f"sequence length must be positive, got {seq_len}")
    v = as_view(model)
    full = 3 * 2 * v.layers * seq_len * v.heads * (v.qk_head_dim + v.v_head_dim)
    qk_only = 3 * v.layers * seq_len * v.heads * v.qk_head_dim
    return {"causal": full / 2, "full": full, "causal-qk": qk_only, "none": 0.0}[attention]


def training_flops_breakdown(model: Model, seq_len: int = 4096, attention: str = "causal",
                             include_embedding: bool = False, include_mtp: bool = False) -> TrainingFlops:
    """FLOPs per training token (forward + backward), by term; see the module docstring."""
    v = as_view(model)
    counted = v.activated_params + (v.embedding_params if include_embedding else 0)
    attention_flops = attention_flops_per_token(v, seq_len, attention)
    mtp = 0.0
    if include_mtp and v.mtp_depth:
        mtp = 6 * v.mtp_activated_params + v.mtp_depth * (attention_flops / v.layers)
    return TrainingFlops(
        weights=6.0 * counted, attention=attention_flops, mtp=mtp,
        total_params=v.total_params, activated_params=v.activated_params, counted_params=counted,
    )


def training_flops_per_token(model: Model, seq_len: int = 4096, attention: str = "causal",
                             include_embedding: bool = False, include_mtp: bool = False) -> float:
    """Training FLOPs (forward + backward) per token, in FLOPs. Table 2 lists this / 1e9."""
    return training_flops_breakdown(model, seq_len, attention, include_embedding, include_mtp).total


def flops_table(models: list[Model] | None = None, seq_len: int = 4096, attention: str = "causal",
                include_embedding: bool = False, include_mtp: bool = False) -> Table:
    models = list(models or TABLE2_MODELS)
    rows = []
    for m in models:
        v = as_view(m)
        f = training_flops_breakdown(v, seq_len, attention, include_embedding, include_mtp)
        published = PUBLISHED.get(v.name) if (seq_len, attention, include_embedding, include_mtp) == (
            4096, "causal", False, False) else None
        delta = (f.total / 1e9 / published - 1) * 100 if published else None
        rows.append([v.name, "MoE" if v.is_moe else "dense", v.total_params / 1e9,
                     v.activated_params / 1e9, f.weights / 1e9, f.attention / 1e9, f.mtp / 1e9,
                     f.total / 1e9, published, delta, (v.activated_params + v.embedding_params) / 1e9])
    terms = [f"6 x activated parameters ({'with' if include_embedding else 'without'} the embedding; "
             "output head included)",
             f"attention at S = {seq_len}: " + _ATTENTION_TERMS[attention],
             "MTP modules " + ("included" if include_mtp else "excluded")]
    notes = ["counted: " + "; ".join(terms) + ".",
             f"activated params [B]: {ACTIVATED_CONVENTION}; the last column counts the embedding table too "
             "(the other convention in use)."]
    if any(r[8] is not None for r in rows):
        notes.append("DeepSeek-V2 and V3 reproduce the paper; LLaMA-3.1-405B is 1.0% above 2448 (2448 needs "
                     "--attention causal-qk, which breaks V3) and Qwen-72B 12% above 394: 6 x its "
                     "non-embedding weights alone is 419 GFLOPs (see docs/analysis.md).")
    return Table(
        title=f"Training compute per token (sequence length {seq_len})",
        columns=["model", "kind", "total params [B]", "activated params [B]", "6N [GFLOP]",
                 "attention [GFLOP]", "MTP [GFLOP]", "GFLOPs/token", "paper", "vs paper [%]",
                 "activated incl. embedding [B]"],
        rows=rows, formats=["", "", ".1f", ".2f", ".1f", ".1f", ".1f", ".0f", "", "+.1f", ".2f"], notes=notes,
    )
