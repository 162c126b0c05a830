"""Models the analysis knows: DeepSeek (MLA + MoE) configs and dense Llama / Qwen-style transformers.

DeepSeek models are :class:`coscale.config.ModelConfig` and are counted by
:func:`coscale.param_count.count_params`. Dense comparison models (the paper's Tables 1 and 2) are a
:class:`DenseModelSpec`. Every analysis function takes either, or a name or path, and works on a
:class:`ModelView`: the handful of numbers the formulas need, with parameter counts in one convention.

Parameter convention (the same as ``param_count``): ``activated`` counts the weights one token
multiplies with, the output head included and the embedding table (a look-up) excluded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Union

from coscale.config import MODEL_TYPES as DEEPSEEK_MODEL_TYPES
from coscale.config import PRESETS as DEEPSEEK_PRESETS
from coscale.config import ModelConfig, get_preset
from coscale.errors import ConfigError
from coscale.param_count import count_params, expert_params


@dataclass(frozen=True)
class DenseModelSpec:
    """A dense decoder-only transformer with SwiGLU FFN and MHA / GQA / MQA attention."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # per SwiGLU branch
    vocab_size: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen: biases on the q, k, v projections

    def __post_init__(self) -> None:
        for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "intermediate_size", "vocab_size"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model {self.name!r}: {f} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model {self.name!r}: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def attention_params_per_layer(self) -> int:
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, \
            self.num_key_value_heads * self.head_dim
        bias = (q + 2 * kv) if self.attention_bias else 0
        return h * q + 2 * h * kv + q * h + bias

    @property
    def layer_params(self) -> int:
        ffn = 3 * self.hidden_size * self.intermediate_size
        return self.attention_params_per_layer + ffn + 2 * self.hidden_size  # + two RMSNorms


DENSE_PRESETS: dict[str, dict[str, Any]] = {
    # Qwen2.5-72B (HF Qwen/Qwen2.5-72B config.json): GQA with 8 KV heads, qkv bias.
    "qwen2.5-72b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, head_dim=128, intermediate_size=29568,
                        vocab_size=152064, attention_bias=True),
    # Qwen-72B (Qwen1, Table 2): MHA; its HF intermediate_size 49152 counts both SwiGLU branches.
    "qwen-72b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                     num_key_value_heads=64, head_dim=128, intermediate_size=24576,
                     vocab_size=152064, attention_bias=True),
    "llama3.1-405b": dict(hidden_size=16384, num_hidden_layers=126, num_attention_heads=128,
                          num_key_value_heads=8, head_dim=128, intermediate_size=53248, vocab_size=128256),
    "llama3.1-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                         num_key_value_heads=8, head_dim=128, intermediate_size=28672, vocab_size=128256),
}

DENSE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen")

Model = Union[str, os.PathLike, ModelConfig, DenseModelSpec, "ModelView"]


def model_names() -> list[str]:
    return [n for n in DEEPSEEK_PRESETS if n not in ("tiny", "small")] + list(DENSE_PRESETS) \
        + ["tiny", "small"]


def dense_from_hf(d: dict[str, Any], name: str = "custom") -> DenseModelSpec:
    """A :class:`DenseModelSpec` from a Llama / Mistral / Qwen2 / Qwen (v1) ``config.json`` dict."""
    try:
        # the fields divided here are checked first: DenseModelSpec checks the rest, after the division
        heads, hidden = _positive_int(d, "num_attention_heads", name), _positive_int(d, "hidden_size", name)
        if d.get("model_type") == "qwen":  # Qwen1: kv_channels, both SwiGLU branches in intermediate
            return DenseModelSpec(
                name=name, hidden_size=hidden, num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=heads, num_key_value_heads=heads,
                head_dim=d.get("kv_channels", hidden // heads),
                intermediate_size=_positive_int(d, "intermediate_size", name) // 2, vocab_size=d["vocab_size"],
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), attention_bias=True,
            )
        return DenseModelSpec(
            name=name, hidden_size=hidden, num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            intermediate_size=d["intermediate_size"], vocab_size=d["vocab_size"],
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", d.get("model_type") == "qwen2")),
        )
    except KeyError as e:
        raise ConfigError(f"model {name!r}: config.json lacks {e.args[0]!r}") from None
    except TypeError as e:
        raise ConfigError(f"model {name!r}: invalid config.json value: {e}") from None


def _positive_int(d: dict[str, Any], key: str, name: str) -> int:
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"model {name!r}: {key} must be a positive integer, got {value!r}")
    return value


def load_model(name_or_path: Model) -> ModelConfig | DenseModelSpec | ModelView:
    """A model preset name, a path to an HF ``config.json`` or a checkpoint directory holding one.

    The architecture is chosen by ``model_type``: DeepSeek types give a ``ModelConfig``; Llama, Mistral
    and Qwen types a ``DenseModelSpec``.
    """
    if isinstance(name_or_path, (ModelConfig, DenseModelSpec, ModelView)):
        return name_or_path
    s = os.fspath(name_or_path)
    if s in DEEPSEEK_PRESETS:
        return get_preset(s)
    if s in DENSE_PRESETS:
        return DenseModelSpec(name=s, **DENSE_PRESETS[s])
    path = os.path.join(s, "config.json") if os.path.isdir(s) else s
    if not os.path.isfile(path):
        raise ConfigError(f"{s!r} is neither a model preset ({', '.join(model_names())}) nor a "
                          "config.json or checkpoint directory")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}): a model config is JSON") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    model_type = d.get("model_type")
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) or "custom"
    if model_type in DEEPSEEK_MODEL_TYPES:
        return ModelConfig.from_dict(d)
    if model_type in DENSE_MODEL_TYPES:
        return dense_from_hf(d, name=name)
    raise ConfigError(f"{path}: model_type {model_type!r} is not supported; expected one of "
                      f"{', '.join(DEEPSEEK_MODEL_TYPES + DENSE_MODEL_TYPES)}")


@dataclass(frozen=True)
class ModelView:
    """What the formulas need from a model. Parameter counts are numbers of weights."""

    name: str
    attention: str  # "MLA", "MHA", "GQA" or "MQA"
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int  # MLA: heads (each has its own decompressed K and V)
    qk_head_dim: int
    v_head_dim: int
    kv_cache_elements_per_layer: int  # cached numbers per token and layer (MLA: kv_lora_rank + rope)
    vocab_size: int
    total_params: int  # main model, embedding and head included
    activated_params: int  # per token: head included, embedding excluded
    embedding_params: int
    attention_params_per_layer: int
    routed_expert_params: int  # all routed experts (0 for dense)
    n_routed_experts: int = 0
    experts_per_token: int = 0  # routed experts per token
    shared_experts: int = 0
    expert_params: int = 0  # one routed expert
    mtp_depth: int = 0
    mtp_activated_params: int = 0  # MTP modules per token, output head included, embedding excluded
    kv_lora_rank: int = 0
    # Layer shapes for the time models (serving, training_time).
    q_lora_rank: int = 0  # MLA query compression (0: queries projected from the hidden state directly)
    qk_rope_head_dim: int = 0  # MLA decoupled RoPE dimension
    dense_layers: int = 0  # layers with a dense FFN (all of a dense model; the first k of DeepSeek-V3)
    dense_intermediate: int = 0  # their FFN width (per SwiGLU branch)
    moe_intermediate: int = 0  # one routed expert's width
    n_group: int = 1  # expert groups for node-limited routing
    topk_group: int = 1  # groups a token may use

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def non_expert_params(self) -> int:
        return self.total_params - self.routed_expert_params

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers

    @property
    def shared_intermediate(self) -> int:
        return self.moe_intermediate * self.shared_experts


def as_view(model: Model, name: str | None = None) -> ModelView:
    """A :class:`ModelView` of a preset name, a path, a ``ModelConfig`` or a ``DenseModelSpec``."""
    if isinstance(model, ModelView):
        return model
    label = name or (os.fspath(model) if isinstance(model, (str, os.PathLike)) else None)
    loaded = load_model(model)
    if isinstance(loaded, ModelView):
        return loaded
    if isinstance(loaded, DenseModelSpec):
        return _dense_view(loaded, label or loaded.name)
    return _deepseek_view(loaded, label or loaded.model_type)


def _dense_view(m: DenseModelSpec, name: str) -> ModelView:
    emb = m.vocab_size * m.hidden_size
    head = 0 if m.tie_word_embeddings else emb
    body = m.num_hidden_layers * m.layer_params + m.hidden_size  # + final norm
    if m.num_key_value_heads == m.num_attention_heads:
        kind = "MHA"
    elif m.num_key_value_heads == 1:
        kind = "MQA"
    else:
        kind = "GQA"
    return ModelView(
        name=name, attention=kind, layers=m.num_hidden_layers, hidden_size=m.hidden_size,
        heads=m.num_attention_heads, kv_heads=m.num_key_value_heads, qk_head_dim=m.head_dim,
        v_head_dim=m.head_dim, kv_cache_elements_per_layer=2 * m.num_key_value_heads * m.head_dim,
        vocab_size=m.vocab_size, total_params=emb + head + body,
        activated_params=body + (head if head else emb), embedding_params=emb,
        attention_params_per_layer=m.attention_params_per_layer, routed_expert_params=0,
        dense_layers=m.num_hidden_layers, dense_intermediate=m.intermediate_size,
    )


def _deepseek_view(cfg: ModelConfig, name: str) -> ModelView:
    counts = count_params(cfg)
    return ModelView(
        name=name, attention="MLA", layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
        heads=cfg.num_attention_heads, kv_heads=cfg.num_attention_heads, qk_head_dim=cfg.qk_head_dim,
        v_head_dim=cfg.v_head_dim, kv_cache_elements_per_layer=cfg.kv_lora_rank + cfg.qk_rope_head_dim,
        vocab_size=cfg.vocab_size, total_params=counts.total, activated_params=counts.activated,
        embedding_params=counts.embedding, attention_params_per_layer=counts.attention_per_layer,
        routed_expert_params=counts.routed_experts, n_routed_experts=cfg.n_routed_experts or 0,
        experts_per_token=cfg.num_experts_per_tok or 0, shared_experts=cfg.n_shared_experts or 0,
        expert_params=expert_params(cfg, cfg.moe_intermediate_size) if cfg.is_moe else 0,
        mtp_depth=cfg.num_nextn_predict_layers, mtp_activated_params=counts.mtp_activated,
        kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank or 0, qk_rope_head_dim=cfg.qk_rope_head_dim,
        dense_layers=sum(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)),
        dense_intermediate=cfg.intermediate_size, moe_intermediate=cfg.moe_intermediate_size if cfg.is_moe else 0,
        n_group=cfg.n_group or 1, topk_group=cfg.topk_group or 1,
    )
