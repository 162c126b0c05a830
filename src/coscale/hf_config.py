"""HF config.json keys that are not ModelConfig fields: how coscale reads each one.

Every key of HF transformers' DeepseekV3Config / DeepseekV2Config (transformers 5.x) and of DeepSeek's
published config.json files is either a ModelConfig field (coscale models it) or listed here as
- metadata: no effect on what coscale computes (read past);
- derived: a value HF recomputes from other keys (checked against them);
- an alias of a field (HF's attribute_map);
- a key that changes the math, of which coscale models one value (any other is a ConfigError);
- RoPE: the published layout (top-level rope_theta, rope_scaling {"type": "yarn", ...}) and
  transformers >= 5's rope_parameters {"rope_theta", "rope_type", ...}; where both are present they
  must agree (up to the defaults both implementations share).
Any other key is reported by ModelConfig.from_dict in one warning line.

No torch, and no import of coscale.config (which imports this module).
"""

from __future__ import annotations

import json
from typing import Any

from coscale.errors import ConfigError

# Keys with no effect on what coscale computes: file metadata, generation and output switches, HF's
# pretraining_tp (unused by HF's DeepSeek models), DeepSeek's ep_size (its inference code's expert
# parallelism), and the PreTrainedConfig base keys.
METADATA_KEYS = frozenset({
    "transformers_version", "torch_dtype", "dtype", "auto_map", "_name_or_path",
    "use_cache", "pad_token_id", "ep_size", "pretraining_tp", "output_router_logits",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class", "_commit_hash",
})
# Values HF's DeepSeek configs derive from other keys (and recompute on load); checked, not read.
DERIVED_KEYS = ("head_dim", "qk_head_dim")
# HF's attribute_map aliases of fields.
KEY_ALIASES = {"num_mtp_layers": "num_nextn_predict_layers", "num_local_experts": "n_routed_experts",
               "num_experts": "n_routed_experts"}
# Keys that change the math in HF transformers; coscale models the given value only.
NEUTRAL_VALUES = {
    "rope_interleave": (True, "coscale rotates interleaved RoPE pairs (DeepSeek's layout) only"),
    "mlp_bias": (False, "coscale's feed-forward layers have no biases"),
    "attention_dropout": (0.0, "coscale trains without dropout"),
    "partial_rotary_factor": (1.0, "MLA rotates all qk_rope_head_dim dimensions"),
}
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")
YARN_KEYS = frozenset({"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
                       "beta_slow", "mscale", "mscale_all_dim"})
# HF's YaRN options beyond DeepSeek's: only the value that equals DeepSeek's YaRN is read.
YARN_NEUTRAL = {
    "truncate": (True, "DeepSeek's YaRN rounds the ends of its frequency ramp"),
    "partial_rotary_factor": (1.0, "MLA rotates all qk_rope_head_dim dimensions"),
    "attention_factor": (None, "coscale derives YaRN's attention factor from mscale and mscale_all_dim"),
}
FP8_KEYS = frozenset({"quant_method", "fmt", "activation_scheme", "weight_block_size", "scale_fmt",
                      "modules_to_not_convert", "modules_to_convert", "dequantize", "expert_dtype"})
FP8_NEUTRAL = {
    "fmt": ("e4m3", "only e4m3 weights are read"),
    "activation_scheme": ("dynamic", "static activation scales are not read"),
    "expert_dtype": ("fp8", "experts are read in the same block-scaled format as the other weights"),
}


def kwargs_from_hf(d: dict[str, Any], field_names: set[str]) -> tuple[dict[str, Any], list[str]]:
    """ModelConfig keyword arguments from config dict `d`, and the keys coscale does not know."""
    kwargs, unknown = _rope_from_hf(d), []
    for key, value in d.items():
        if key in ROPE_KEYS or key in METADATA_KEYS or key in DERIVED_KEYS:
            continue
        if key in field_names:
            kwargs[key] = value
        elif key in KEY_ALIASES:
            name = KEY_ALIASES[key]
            if name in d and d[name] != value:
                raise ConfigError(f"{key} ({value}) and {name} ({d[name]}) disagree")
            kwargs[name] = value
        elif key in NEUTRAL_VALUES:
            neutral, why = NEUTRAL_VALUES[key]
            if value != neutral and not (value is None and not neutral):
                raise ConfigError(f"{key} = {json.dumps(value)} is not supported: {why}")
        else:
            unknown.append(key)
    return kwargs, sorted(unknown)


def _rope_from_hf(d: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and rope_scaling (published form) from either layout; sources that disagree raise."""
    found: dict[str, list[tuple[str, Any]]] = {"rope_theta": [], "rope_scaling": []}
    if "rope_theta" in d:
        found["rope_theta"].append(("rope_theta", d["rope_theta"]))
    for key in ("rope_scaling", "rope_parameters"):
        if key in d and not (key == "rope_parameters" and d[key] is None):
            theta, scaling = _split_rope(d[key], key)
            if theta is not None:
                found["rope_theta"].append((f"{key}.rope_theta", theta))
            found["rope_scaling"].append((key, scaling))
    out = {}
    for name, values in found.items():
        for (first, value), (other, v) in zip(values, values[1:]):
            if _without_defaults(v) != _without_defaults(value):
                raise ConfigError(f"{first} ({json.dumps(value)}) and {other} ({json.dumps(v)}) disagree")
        if values:
            out[name] = values[0][1]
    return out


def _without_defaults(value: Any) -> Any:
    """A RoPE dict without the entries that equal the default of both DeepSeek's and HF's YaRN."""
    if not isinstance(value, dict):
        return value
    defaults = {"beta_fast": 32, "beta_slow": 1, "truncate": True, "partial_rotary_factor": 1}
    return {k: v for k, v in value.items() if defaults.get(k, object()) != v}


def _split_rope(rs: Any, where: str) -> tuple[Any, dict[str, Any] | None]:
    """(rope_theta or None, scaling as {"type": kind, ...} or None for plain RoPE) of one RoPE dict."""
    if rs is None:
        return None, None
    if not isinstance(rs, dict):
        raise ConfigError(f"{where} must be a JSON object or null, got {rs!r}")
    if any(isinstance(v, dict) for v in rs.values()):
        raise ConfigError(f"{where} holds settings per layer type; coscale models one RoPE for all layers")
    rs = {k: v for k, v in rs.items() if v is not None}
    theta = rs.pop("rope_theta", None)
    kinds = {str(rs.pop(k)) for k in ("type", "rope_type") if k in rs}
    if len(kinds) > 1:
        raise ConfigError(f"{where} type and rope_type disagree ({', '.join(sorted(map(str, kinds)))})")
    if not kinds:
        if rs:
            raise ConfigError(f"{where} needs a type (e.g. \"type\": \"yarn\")")
        return theta, None
    kind = kinds.pop()
    if kind == "default":  # plain RoPE: HF reads no other key but this one
        neutral, why = YARN_NEUTRAL["partial_rotary_factor"]
        if rs.get("partial_rotary_factor", neutral) != neutral:
            raise ConfigError(f"{where} partial_rotary_factor = {rs['partial_rotary_factor']} is not "
                              f"supported: {why}")
        return theta, None
    return theta, {"type": kind, **rs}


def check_derived_keys(d: dict[str, Any], cfg) -> None:
    """HF's DeepSeek configs write head_dim (= qk_rope_head_dim) and qk_head_dim (= qk_nope_head_dim +
    qk_rope_head_dim); other values mean a file written for another architecture."""
    for key, value in (("head_dim", cfg.qk_rope_head_dim), ("qk_head_dim", cfg.qk_head_dim)):
        if d.get(key) is not None and d[key] != value:
            raise ConfigError(f"{key} ({d[key]}) disagrees with the value HF derives from the other keys "
                              f"({value})")


def first_names(names: list[str], n: int) -> str:
    more = f" (and {len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
