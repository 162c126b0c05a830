"""KV-cache size per token (the paper's Table 1) and how many tokens fit beside the weights.

Per token and layer a model caches:
- MLA: the compressed latent and the decoupled RoPE key, ``kv_lora_rank + qk_rope_head_dim`` numbers
  (512 + 64 = 576 for DeepSeek-V3), shared by all heads;
- MHA / GQA / MQA: a key and a value per KV head, ``2 x kv_heads x head_dim`` numbers (MQA: one KV head,
  MHA: as many as query heads).
Bytes = numbers x layers x dtype bytes (2 for BF16). KB in the table are 1000 bytes, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

from coscale.analysis.models import Model, as_view
from coscale.analysis.table import Table
from coscale.errors import ConfigError
from coscale.hardware import HardwareSpec, load_hardware

# Table 1 as published (KB = 1000 bytes, BF16) and its multipliers; used for comparison and tests only.
PUBLISHED = {
    "deepseek-v3": (70.272, 1.0),
    "qwen2.5-72b": (327.680, 4.66),
    "llama3.1-405b": (516.096, 7.28),
}
TABLE1_MODELS = ("deepseek-v3", "qwen2.5-72b", "llama3.1-405b")


def kv_cache_bytes_per_token(model: Model, dtype_bytes: float = 2) -> float:
    """KV-cache bytes one token occupies over all layers, at ``dtype_bytes`` per cached number."""
    if dtype_bytes <= 0:
        raise ConfigError(f"KV-cache dtype bytes must be positive, got {dtype_bytes}")
    v = as_view(model)
    return v.layers * v.kv_cache_elements_per_layer * dtype_bytes


def weight_bytes(model: Model, dtype_bytes: float = 2) -> float:
    """Bytes of all main-model weights stored at ``dtype_bytes`` each (MTP modules excluded)."""
    return as_view(model).total_params * dtype_bytes


@dataclass(frozen=True)
class KVCapacity:
    bytes_per_token: float
    weight_bytes: float
    memory_bytes: float  # HBM of all GPUs, after the reserved fraction
    tokens: int  # tokens whose KV cache fits after the weights (0 if the weights do not fit)


def tokens_that_fit(model: Model, hardware: str | HardwareSpec = "h800", gpus: int = 16,
                    kv_dtype_bytes: float = 2, weight_dtype_bytes: float = 1,
                    reserved_fraction: float = 0.0) -> KVCapacity:
    """Tokens of KV cache that fit in ``gpus`` GPUs' HBM after the weights.

    Assumes the weights are sharded without replication across the GPUs and ignores activations and
    framework overhead, except for ``reserved_fraction`` of the HBM held back.
    """
    if gpus < 1:
        raise ConfigError(f"gpus must be at least 1, got {gpus}")
    if not 0 <= reserved_fraction < 1:
        raise ConfigError(f"reserved fraction must be in [0, 1), got {reserved_fraction}")
    hw = load_hardware(hardware)
    per_token = kv_cache_bytes_per_token(model, kv_dtype_bytes)
    weights = weight_bytes(model, weight_dtype_bytes)
    memory = gpus * hw.hbm_bytes * (1 - reserved_fraction)
    tokens = max(0, int((memory - weights) // per_token))
    return KVCapacity(per_token, weights, memory, tokens)


def kv_cache_table(models: list[Model] | None = None, dtype_bytes: float = 2,
                   hardware: str | HardwareSpec = "h800", gpus: int = 16,
                   weight_dtype_bytes: float = 1) -> Table:
    """Table 1 (or the same columns for other models): KB per token, multiplier, tokens that fit."""
    models = list(models or TABLE1_MODELS)
    hw = load_hardware(hardware)
    views = [as_view(m) for m in models]
    caps = [tokens_that_fit(v, hw, gpus, dtype_bytes, weight_dtype_bytes) for v in views]
    base = caps[0].bytes_per_token
    rows = []
    for v, cap in zip(views, caps):
        published = PUBLISHED.get(v.name) if dtype_bytes == 2 else None
        rows.append([
            v.name, v.attention, _per_layer_formula(v), cap.bytes_per_token / 1000, cap.bytes_per_token / base,
            published[0] if published else None, published[1] if published else None, cap.tokens,
        ])
    notes = [
        f"KB = 1000 bytes; {dtype_bytes:g} byte(s) per cached number; multiplier relative to {views[0].name}.",
        f"tokens that fit: {gpus} x {hw.name} ({hw.hbm_gb:g} GB each) minus weights at "
        f"{weight_dtype_bytes:g} byte(s) per parameter, no other overhead.",
    ]
    if any(v.name == "llama3.1-405b" for v in views) and views[0].name == "deepseek-v3" and dtype_bytes == 2:
        notes.append("the paper prints 7.28x for LLaMA-3.1 405B; its own byte counts give "
                     "516.096 / 70.272 = 7.34x (the 4.66x for Qwen-2.5 72B checks out).")
    return Table(
        title="KV cache per token",
        columns=["model", "attention", "numbers per layer", "KB per token", "multiplier",
                 "paper KB", "paper multiplier", f"tokens fit ({gpus}x{hw.name})"],
        rows=rows, formats=["", "", "", ".3f", ".2f", ".3f", ".2f", ","], notes=notes,
    )


def _per_layer_formula(v) -> str:
    if v.attention == "MLA":
        return f"{v.kv_cache_elements_per_layer} latent+rope"
    return f"2x{v.kv_heads}x{v.qk_head_dim}"
