"""Parameter accounting by arithmetic (no tensors allocated), from a :class:`ModelConfig`.

Counts follow the published checkpoint layout: every weight matrix, every norm vector, the router
and its correction bias. "Activated" counts the weights one token multiplies with: all attention and dense FFN
weights, the router, the shared experts and `num_experts_per_tok` routed experts per MoE layer, and
the output head; the embedding is a table look-up and is not counted. That convention reproduces all
three published figures (V3 37B, V2 21B, V2-Lite 2.4B); counting the embedding too would give 2.7B
for V2-Lite.

MTP: DeepSeek reports the main model (671B) and the MTP module (14B) separately. The MTP module as
stored repeats the embedding and the output head (they are shared at run time), and the 14B counts
them; ``mtp`` below does the same, and ``mtp_unique`` excludes the shared copies.
"""

from __future__ import annotations

from dataclasses import dataclass

from coscale.config import ModelConfig

# The convention "activated" follows everywhere in coscale (info, analyze flops, the analysis models).
ACTIVATED_CONVENTION = "embedding table excluded (a look-up, no multiply), output head included"


@dataclass(frozen=True)
class ParamCounts:
    total: int  # main model, as DeepSeek reports it (671B for V3)
    activated: int  # per token, main model
    mtp: int  # MTP modules as stored (embedding and head copies included)
    mtp_unique: int  # MTP modules without the shared embedding and head
    mtp_activated: int  # MTP modules per token: k routed experts, the output head again, no embedding
    embedding: int
    attention_per_layer: int
    routed_experts: int  # all routed-expert weights in the main model

    @property
    def activated_with_embedding(self) -> int:
        """``activated`` under the other convention: the embedding table counted too."""
        return self.activated + self.embedding


def attention_params(cfg: ModelConfig) -> int:
    h, n = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank:
        q = h * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * n * cfg.qk_head_dim
    else:
        q = h * n * cfg.qk_head_dim
    kv = (
        h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        + cfg.kv_lora_rank
        + cfg.kv_lora_rank * n * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    )
    out = n * cfg.v_head_dim * h
    return q + kv + out


def expert_params(cfg: ModelConfig, intermediate: int) -> int:
    """One SwiGLU FFN: gate, up (hidden -> intermediate) and down (intermediate -> hidden)."""
    return 3 * cfg.hidden_size * intermediate


def _layer_params(cfg: ModelConfig, layer_idx: int) -> tuple[int, int, int]:
    """(total, activated, routed-expert) parameters of one decoder layer."""
    common = attention_params(cfg) + 2 * cfg.hidden_size  # + input and post-attention norms
    if not cfg.is_moe_layer(layer_idx):
        ffn = expert_params(cfg, cfg.intermediate_size)
        return common + ffn, common + ffn, 0
    n_exp = cfg.n_routed_experts or 0
    router = cfg.hidden_size * n_exp + (n_exp if cfg.topk_method == "noaux_tc" else 0)
    shared = expert_params(cfg, cfg.moe_intermediate_size * (cfg.n_shared_experts or 0))
    one = expert_params(cfg, cfg.moe_intermediate_size)
    routed = n_exp * one
    activated = common + router + shared + (cfg.num_experts_per_tok or 0) * one
    return common + router + shared + routed, activated, routed


def count_params(cfg: ModelConfig) -> ParamCounts:
    emb = cfg.vocab_size * cfg.hidden_size
    head = 0 if cfg.tie_word_embeddings else emb
    total, routed_all = emb + head + cfg.hidden_size, 0
    activated = head + cfg.hidden_size
    for i in range(cfg.num_hidden_layers):
        t, a, r = _layer_params(cfg, i)
        total, activated, routed_all = total + t, activated + a, routed_all + r
    # MTP blocks use the layout of the last decoder layer (MoE in DeepSeek-V3).
    depth, h = cfg.num_nextn_predict_layers, cfg.hidden_size
    block, block_activated, _ = _layer_params(cfg, cfg.num_hidden_layers - 1)
    own = 2 * h + 2 * h * h + h  # enorm, hnorm, eh_proj, shared_head.norm
    mtp_unique = depth * (block + own)
    return ParamCounts(
        total=total, activated=activated, mtp=mtp_unique + depth * (emb + emb), mtp_unique=mtp_unique,
        mtp_activated=depth * (block_activated + own + emb), embedding=emb,
        attention_per_layer=attention_params(cfg), routed_experts=routed_all,
    )
