"""Model configuration: one dataclass for the DeepSeek-V2 / V2-Lite / V3 family.

Field names are the keys of the published HF ``config.json`` files, so a config reads from and writes
to that format without a translation table. A few coscale-only fields (training hyper-parameters of
the DeepSeek-V3 recipe that the HF file does not carry) are written too; HF loaders ignore them.

Reading a config.json (``ModelConfig.from_dict``) never ignores a key silently:
- RoPE settings come from either layout: the published one (top-level ``rope_theta`` and
  ``rope_scaling``, which coscale also writes) or transformers >= 5's ``rope_parameters``; where a file
  holds both they must agree.
- A key that would change the model's outputs and that coscale does not model (``rope_interleave``
  false, ``mlp_bias`` true, ``tie_word_embeddings`` true, a ``hidden_act`` other than silu, an unknown
  rope type, a ``quantization_config`` coscale cannot read, ...) is a one-line ConfigError naming it.
- Keys HF transformers derives or that carry no math (``transformers_version``, ``torch_dtype``,
  ``architectures``, ``use_cache``, ...) are read past; any other key is named in one logged warning.

Presets: ``deepseek-v3`` (671B), ``deepseek-v2`` (236B), ``deepseek-v2-lite`` (16B) with the published
values, and three trainable members of the same family: ``tiny`` (a few million parameters, CPU),
``small`` (about 0.7B total, ~0.2B activated, one GPU) and ``proxy-v3`` (DeepSeek-V3's widths with 4
layers and 16 experts, about 5.2B + 1.0B MTP: V3's layer shapes on one GPU).

This module imports no torch: the analysis package depends on it alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from coscale.errors import ConfigError
from coscale.hf_config import (
    FP8_KEYS,
    FP8_NEUTRAL,
    YARN_KEYS,
    YARN_NEUTRAL,
    check_derived_keys,
    first_names,
    kwargs_from_hf,
)

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "kimi_k2", "coscale")  # config.json model_types read here

_log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    # Vocabulary and trunk.
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN of the first `first_k_dense_replace` layers
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # MLA: every head has its own (decompressed) K and V
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1

    # Multi-head Latent Attention.
    q_lora_rank: int | None = 1536  # None or 0: queries projected directly (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # YaRN: {"type": "yarn", "factor", ...}

    # DeepSeekMoE.
    n_routed_experts: int | None = 256
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    moe_intermediate_size: int = 2048
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 3
    n_group: int | None = 8
    topk_group: int | None = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    aux_loss_alpha: float = 0.0001  # sequence-wise balance loss weight (alpha); 0 disables it
    seq_aux: bool = True

    # Multi-Token Prediction.
    num_nextn_predict_layers: int = 1

    # coscale-only training hyper-parameters of the recipe (not in published HF files).
    bias_update_speed: float = 0.001  # gamma of auxiliary-loss-free balancing
    mtp_loss_weight: float = 0.3  # lambda

    model_type: str = "deepseek_v3"
    architectures: list[str] = field(default_factory=lambda: ["DeepseekV3ForCausalLM"])
    # Kept so that a published FP8 checkpoint's config round-trips; the loader reads its block size.
    quantization_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.q_lora_rank:
            self.q_lora_rank = None
        self.validate()

    # ---- derived quantities -------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: layer i uses MoE iff i >= first_k_dense_replace and i % freq == 0."""
        return (
            self.is_moe
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale^2 when mscale_all_dim is set (DeepSeek's convention)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            m = yarn_get_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale

    # ---- validation -------------------------------------------------------------------
    def validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "moe_layer_freq",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.q_lora_rank is not None and (
            not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 0
        ):
            raise ConfigError(f"q_lora_rank must be a non-negative integer, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.first_k_dense_replace < 0:
            raise ConfigError(f"first_k_dense_replace must be >= 0, got {self.first_k_dense_replace}")
        if self.num_nextn_predict_layers < 0:
            raise ConfigError(
                f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}"
            )
        if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) or not (
                self.rope_theta > 1):
            raise ConfigError(f"rope_theta must be a number > 1, got {self.rope_theta!r}")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings = true is not supported: coscale keeps a separate output "
                              "head (lm_head), as DeepSeek's models do")
        if self.num_key_value_heads not in (None, self.num_attention_heads):
            raise ConfigError(f"num_key_value_heads ({self.num_key_value_heads}) must equal num_attention_heads "
                              f"({self.num_attention_heads}): MLA decompresses a key and a value per head")
        if self.first_k_dense_replace > 0 or not self.is_moe:
            if self.intermediate_size <= 0:
                raise ConfigError(f"intermediate_size must be positive, got {self.intermediate_size}")
        if self.is_moe:
            self._validate_moe()
        self._validate_rope_scaling()
        self._validate_quantization()

    def _validate_moe(self) -> None:
        n_exp = self.n_routed_experts
        if not isinstance(n_exp, int) or n_exp < 0:
            raise ConfigError(f"n_routed_experts must be a non-negative integer, got {n_exp!r}")
        if self.moe_intermediate_size <= 0:
            raise ConfigError(f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
        if self.n_shared_experts is not None and self.n_shared_experts < 0:
            raise ConfigError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        k = self.num_experts_per_tok
        if not isinstance(k, int) or k <= 0:
            raise ConfigError(f"num_experts_per_tok must be a positive integer, got {k!r}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(f"scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(f"topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        n_group = self.n_group or 1
        topk_group = self.topk_group or 1
        if n_group <= 0 or topk_group <= 0:
            raise ConfigError(f"n_group and topk_group must be positive, got {n_group} and {topk_group}")
        if n_exp % n_group:
            raise ConfigError(
                f"n_routed_experts ({n_exp}) must be divisible by n_group ({n_group})"
            )
        if topk_group > n_group:
            raise ConfigError(f"topk_group ({topk_group}) must not exceed n_group ({n_group})")
        allowed = n_exp // n_group * (topk_group if self.topk_method != "greedy" else n_group)
        if k > allowed:
            raise ConfigError(
                f"num_experts_per_tok ({k}) exceeds the experts reachable in the allowed groups "
                f"({allowed} = {n_exp // n_group} per group x {topk_group} groups)"
            )
        if self.topk_method == "noaux_tc" and n_exp // n_group < 2:
            raise ConfigError(
                "topk_method 'noaux_tc' ranks groups by the sum of their top-2 scores, so each group "
                f"needs at least 2 experts (n_routed_experts/n_group = {n_exp // n_group})"
            )
        if self.routed_scaling_factor <= 0:
            raise ConfigError(f"routed_scaling_factor must be positive, got {self.routed_scaling_factor}")
        if self.aux_loss_alpha < 0 or self.bias_update_speed < 0:
            raise ConfigError("aux_loss_alpha and bias_update_speed must be >= 0")

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise ConfigError(f"rope_scaling must be a JSON object or null, got {rs!r}")
        kind = rs.get("type", rs.get("rope_type"))
        if kind != "yarn":
            raise ConfigError(f"RoPE type {kind!r} (rope_scaling / rope_parameters) is not supported: coscale "
                              "models plain RoPE and 'yarn'")
        for key in ("factor", "original_max_position_embeddings"):
            if key not in rs:
                raise ConfigError(f"rope_scaling of type 'yarn' needs {key!r}")
        for key, value in rs.items():
            if key in YARN_KEYS:
                continue
            if key not in YARN_NEUTRAL:
                raise ConfigError(f"rope_scaling key {key!r} is not modelled by coscale's YaRN")
            if value != YARN_NEUTRAL[key][0] and value is not None:
                raise ConfigError(f"rope_scaling {key} = {json.dumps(value)} is not supported: "
                                  f"{YARN_NEUTRAL[key][1]}")
        if float(rs["factor"]) < 1:
            raise ConfigError(f"rope_scaling factor must be >= 1, got {rs['factor']}")
        for key in ("beta_fast", "beta_slow"):
            if key in rs and not float(rs[key]) > 0:
                raise ConfigError(f"rope_scaling {key} must be positive, got {rs[key]}")
        ours, hf = yarn_attention_factors(rs)
        if not math.isclose(ours, hf, rel_tol=1e-12):
            raise ConfigError(
                f"rope_scaling mscale {rs.get('mscale')} with mscale_all_dim {rs.get('mscale_all_dim')}: "
                f"DeepSeek's code scales cos/sin by {ours:.6g} and HF transformers by {hf:.6g}; set both "
                "mscale and mscale_all_dim"
            )

    def _validate_quantization(self) -> None:
        """Only the format of DeepSeek-V3's published weights: e4m3 with square block scales."""
        qc = self.quantization_config
        if qc is None:
            return
        if not isinstance(qc, dict):
            raise ConfigError(f"quantization_config must be a JSON object, got {qc!r}")
        method = qc.get("quant_method")
        if method != "fp8":
            raise ConfigError(f"quantization_config quant_method {method!r} is not a format coscale reads "
                              "(only DeepSeek's block-scaled 'fp8')")
        for key, (neutral, why) in FP8_NEUTRAL.items():
            if qc.get(key, neutral) != neutral:
                raise ConfigError(f"quantization_config {key} {qc[key]!r} is not supported: {why}")
        size = qc.get("weight_block_size", [128, 128])
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]
                and isinstance(size[0], int) and size[0] > 0):
            raise ConfigError(f"quantization_config weight_block_size {size} is not a square block "
                              "(e.g. [128, 128])")

    # ---- HF config.json ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["q_lora_rank"] = self.q_lora_rank  # None stays None (HF writes null)
        if d["quantization_config"] is None:
            del d["quantization_config"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from an HF config dict (either RoPE layout; see the module docstring). `source` names
        the file in the one-line warning that lists keys coscale does not know, and in the errors of a
        dict that is no model config at all."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: a model config must be a JSON object")
        if "model_type" not in d:  # every field has V3's default: {} would silently be DeepSeek-V3 671B
            raise ConfigError(f"{source}: no model_type, so not a DeepSeek/HF model config (coscale reads "
                              f"config.json files whose model_type is one of {', '.join(MODEL_TYPES)})")
        model_type = d["model_type"]
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not a DeepSeek-V2/V3 architecture; coscale models "
                "deepseek_v2 and deepseek_v3 checkpoints"
            )
        kwargs, unknown = kwargs_from_hf(d, {f.name for f in dataclasses.fields(cls)})
        # Older files have no topk_method / scoring_func: V2 defaults.
        if model_type == "deepseek_v2":
            kwargs.setdefault("topk_method", "greedy")
            kwargs.setdefault("scoring_func", "softmax")
            kwargs.setdefault("num_nextn_predict_layers", 0)
            kwargs.setdefault("architectures", ["DeepseekV2ForCausalLM"])
        try:
            cfg = cls(**kwargs)
        except TypeError as e:  # a wrongly typed field
            raise ConfigError(f"invalid config: {e}") from None
        check_derived_keys(d, cfg)
        unknown += [f"quantization_config.{k}" for k in cfg.quantization_config or {} if k not in FP8_KEYS]
        if unknown:
            _log.warning("%s: ignoring %d keys coscale does not model: %s", source, len(unknown),
                         first_names(unknown, 10))
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        """Read an HF ``config.json`` (or a directory that holds one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not a JSON config: not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        return cls.from_dict(d, source=path)

    def save_json(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's attention temperature factor: 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factors(rs: dict[str, Any]) -> tuple[float, float]:
    """YaRN's cos/sin scale for rope_scaling `rs`, as (DeepSeek's code, HF transformers) compute it.

    DeepSeek: mscale(factor, mscale) / mscale(factor, mscale_all_dim), defaults 1 and 0 (coscale's
    rope.py). HF: that ratio only when both are set and non-zero, else mscale(factor). They agree on
    every published config (both keys set, or mscale 1 alone).
    """
    factor = float(rs["factor"])
    mscale, all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    deepseek = yarn_get_mscale(factor, float(1 if mscale is None else mscale)) / yarn_get_mscale(
        factor, float(all_dim or 0))
    if mscale and all_dim:
        hf = yarn_get_mscale(factor, float(mscale)) / yarn_get_mscale(factor, float(all_dim))
    else:
        hf = yarn_get_mscale(factor)
    return deepseek, hf


# ---- presets -------------------------------------------------------------------------------

_V3_YARN = {
    "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
}
_V2_YARN = {
    "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
    "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
}

PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": dict(
        rope_scaling=_V3_YARN,
        quantization_config={
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
    ),
    "deepseek-v2": dict(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, num_hidden_layers=60,
        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1536,
        first_k_dense_replace=1, n_group=8, topk_group=3, topk_method="group_limited_greedy",
        scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=16.0,
        aux_loss_alpha=0.003, num_nextn_predict_layers=0, bos_token_id=100000,
        eos_token_id=100001, rope_scaling=_V2_YARN, model_type="deepseek_v2",
        architectures=["DeepseekV2ForCausalLM"],
    ),
    "deepseek-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1408,
        first_k_dense_replace=1, n_group=1, topk_group=1, topk_method="greedy",
        scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
        aux_loss_alpha=0.001, num_nextn_predict_layers=0, bos_token_id=100000,
        eos_token_id=100001, rope_scaling=_V2_YARN, model_type="deepseek_v2",
        architectures=["DeepseekV2ForCausalLM"],
    ),
    # A few million parameters: trains on 2 CPU cores in minutes. Byte-level vocabulary.
    "tiny": dict(
        vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=128,
        first_k_dense_replace=1, n_group=4, topk_group=2, max_position_embeddings=2048,
        rope_scaling=None, bos_token_id=None, eos_token_id=None, aux_loss_alpha=0.0001,
        num_nextn_predict_layers=1,
    ),
    # About 0.7B total / 0.2B activated: one GPU. Dimensions are multiples of 128 for FP8.
    "small": dict(
        vocab_size=32768, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256,
        qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, n_routed_experts=64,
        n_shared_experts=1, num_experts_per_tok=6, moe_intermediate_size=256,
        first_k_dense_replace=1, n_group=8, topk_group=4, max_position_embeddings=4096,
        rope_scaling=None, bos_token_id=None, eos_token_id=None, num_nextn_predict_layers=1,
    ),
    # DeepSeek-V3's widths with 4 layers and 16 experts (torchtitan's comparison model for V3 on one GPU):
    # V3's hidden size, MLA, expert and dense FFN shapes and vocabulary, so every GEMM has V3's shape.
    # About 5.2B parameters (+1.0B MTP without the shared embedding and head): BF16 or FP8 training
    # with AdamW fits one H200 with bf16 moments (docs/training.md).
    "proxy-v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=4,
        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=2048, first_k_dense_replace=1,
        n_group=4, topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid", routed_scaling_factor=2.5,
        max_position_embeddings=4096, rope_scaling=None, num_nextn_predict_layers=1,
    ),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name, with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    kwargs = {**PRESETS[name], **overrides}
    return ModelConfig(**kwargs)


def load_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """A preset name, a path to an HF ``config.json``, or a checkpoint directory holding one."""
    s = os.fspath(name_or_path)
    if s in PRESETS:
        return get_preset(s)
    if os.path.exists(s):
        return ModelConfig.from_json(s)
    raise ConfigError(
        f"{s!r} is neither a model preset ({', '.join(PRESETS)}) nor an existing config path"
    )
