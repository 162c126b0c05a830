"""Reading HF config.json files: both RoPE layouts, no key ignored silently (ConfigError for a key
that changes the math, one warning line for unknown ones), aliases and derived keys."""

import json
import logging

import pytest

from coscale.config import ModelConfig, get_preset, yarn_attention_factors
from coscale.errors import ConfigError

YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}

# DeepSeek-V3 / R1's published config.json (the published layout, FP8).
PUBLISHED_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": YARN, "rope_theta": 10000, "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid", "seq_aux": True, "aux_loss_alpha": 0.001, "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def as_rope_parameters(d):
    """The same config in transformers >= 5's layout: rope_parameters, no rope_theta / rope_scaling."""
    d = dict(d)
    scaling = d.pop("rope_scaling") or {"type": "default"}
    rope = {("rope_type" if k == "type" else k): v for k, v in scaling.items()}
    d["rope_parameters"] = {**rope, "rope_theta": d.pop("rope_theta")}
    return d


def load(d):
    return ModelConfig.from_dict(json.loads(json.dumps(d)))


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name.startswith("coscale")]


def test_published_v3_config_reads_without_warnings(caplog):
    with caplog.at_level(logging.WARNING, logger="coscale"):
        cfg = load(PUBLISHED_V3)
    assert warnings_of(caplog) == []
    assert cfg.rope_scaling == YARN and cfg.rope_theta == 10000
    assert cfg.quantization_config["weight_block_size"] == [128, 128]


@pytest.mark.parametrize("theta, scaling", [(50000.0, YARN), (1e6, None), (10000, {**YARN, "mscale": 0.707,
                                                                                   "mscale_all_dim": 0.707})])
def test_rope_parameters_layout_reads_as_the_published_one(theta, scaling):
    published = {**PUBLISHED_V3, "rope_theta": theta, "rope_scaling": scaling}
    new_layout = as_rope_parameters(published)
    assert "rope_theta" not in new_layout and "rope_scaling" not in new_layout
    cfg = load(new_layout)
    assert cfg == load(published)
    assert cfg.rope_theta == theta and cfg.rope_scaling == scaling
    # coscale keeps writing the published layout
    written = cfg.to_dict()
    assert written["rope_theta"] == theta and written["rope_scaling"] == scaling and "rope_parameters" not in written


def test_both_layouts_agreeing_read_fine():
    both = {**PUBLISHED_V3, "rope_parameters": as_rope_parameters(PUBLISHED_V3)["rope_parameters"]}
    assert load(both) == load(PUBLISHED_V3)
    # defaults both implementations share do not count as a disagreement
    without_betas = {k: v for k, v in both["rope_parameters"].items() if not k.startswith("beta")}
    assert load({**both, "rope_parameters": without_betas}) == load(PUBLISHED_V3)


@pytest.mark.parametrize("change, names", [
    (dict(rope_theta=50000.0), ["rope_theta", "rope_parameters.rope_theta"]),
    (dict(factor=8), ["rope_scaling", "rope_parameters"]),
    (dict(rope_type="default"), ["rope_scaling", "rope_parameters"]),
])
def test_layouts_that_disagree_are_one_line_errors(change, names):
    params = as_rope_parameters(PUBLISHED_V3)["rope_parameters"]
    if "rope_theta" in change:
        params = {**params, "rope_theta": change["rope_theta"]}
    elif change.get("rope_type") == "default":
        params = {"rope_type": "default", "rope_theta": 10000}
    else:
        params = {**params, **change}
    with pytest.raises(ConfigError) as info:
        load({**PUBLISHED_V3, "rope_parameters": params})
    message = str(info.value)
    assert "disagree" in message and "\n" not in message
    for name in names:
        assert name in message


def test_null_rope_scaling_with_yarn_rope_parameters_disagree():
    d = {**PUBLISHED_V3, "rope_scaling": None, "rope_parameters": as_rope_parameters(PUBLISHED_V3)["rope_parameters"]}
    with pytest.raises(ConfigError, match="disagree"):
        load(d)


# A key that would change the outputs and that coscale does not model: an error naming it.
MATH_CHANGING = [
    (dict(rope_interleave=False), "rope_interleave"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(attention_dropout=0.1), "attention_dropout"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(num_key_value_heads=16), "num_key_value_heads"),
    (dict(rope_scaling={**YARN, "type": "linear"}), "'linear'"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000, "factor": 4}), "'longrope'"),
    (dict(rope_scaling={**YARN, "truncate": False}), "truncate"),
    (dict(rope_scaling={**YARN, "attention_factor": 0.5}), "attention_factor"),
    (dict(rope_scaling={**YARN, "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
    (dict(rope_scaling={**YARN, "low_freq_factor": 1}), "low_freq_factor"),
    (dict(rope_scaling={"factor": 40}), "needs a type"),
    (dict(rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0}), "mscale"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default"}}), "per layer type"),
    (dict(quantization_config={"quant_method": "awq", "bits": 4}), "quant_method 'awq'"),
    (dict(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}), "bitsandbytes"),
    (dict(quantization_config={"quant_method": "fp8", "activation_scheme": "static"}), "activation_scheme"),
    (dict(quantization_config={"quant_method": "fp8", "fmt": "e5m2"}), "fmt"),
    (dict(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 64]}), "weight_block_size"),
    (dict(head_dim=128), "head_dim"),
    (dict(qk_head_dim=100), "qk_head_dim"),
    (dict(num_mtp_layers=2), "num_mtp_layers"),
    (dict(rope_theta=0), "rope_theta"),
]


@pytest.mark.parametrize("change, key", MATH_CHANGING, ids=[k for _, k in MATH_CHANGING])
def test_keys_that_change_the_math_are_one_line_errors(change, key):
    base = as_rope_parameters(PUBLISHED_V3) if "rope_parameters" in change else PUBLISHED_V3
    with pytest.raises(ConfigError) as info:
        load({**base, **change})
    message = str(info.value)
    assert key in message and "\n" not in message


@pytest.mark.parametrize("change", [
    dict(rope_interleave=True), dict(mlp_bias=False), dict(attention_dropout=0.0), dict(partial_rotary_factor=1.0),
    dict(head_dim=64, qk_head_dim=192), dict(num_mtp_layers=1), dict(rope_scaling={**YARN, "truncate": True}),
    dict(rope_scaling={**YARN, "beta_fast": None}), dict(quantization_config=None),
])
def test_neutral_values_of_those_keys_read_fine(change):
    cfg = load({**PUBLISHED_V3, **change})
    assert cfg.qk_rope_head_dim == 64 and cfg.num_nextn_predict_layers == 1


def test_unknown_keys_are_listed_once_in_one_warning_line(caplog):
    extra = {f"custom_{i}": i for i in range(12)}
    extra["quantization_config"] = {**PUBLISHED_V3["quantization_config"], "custom_q": 1}
    with caplog.at_level(logging.WARNING, logger="coscale"):
        cfg = ModelConfig.from_dict({**PUBLISHED_V3, **extra}, source="ckpt/config.json")
    (message,) = warnings_of(caplog)
    assert message.startswith("ckpt/config.json: ignoring 13 keys") and "\n" not in message
    assert "custom_0" in message and "(and 3 more)" in message
    assert cfg == load(PUBLISHED_V3).replace(quantization_config=extra["quantization_config"])


def test_aliases_read_as_their_field():
    d = {k: v for k, v in PUBLISHED_V3.items() if k not in ("num_nextn_predict_layers", "n_routed_experts")}
    cfg = load({**d, "num_mtp_layers": 2, "num_local_experts": 256})
    assert cfg.num_nextn_predict_layers == 2 and cfg.n_routed_experts == 256


def test_coscale_written_configs_read_back_without_warnings(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="coscale"):
        for name in ["deepseek-v3", "deepseek-v2", "deepseek-v2-lite", "tiny", "small"]:
            cfg = get_preset(name)
            cfg.save_json(tmp_path / "config.json")
            assert ModelConfig.from_json(tmp_path) == cfg
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("mscale, all_dim, equal", [
    (1.0, 1.0, True), (0.707, 0.707, True), (None, None, True), (1.0, None, True), (0.707, None, False),
    (None, 0.707, False),
])
def test_yarn_attention_factor_conventions(mscale, all_dim, equal):
    rs = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096}
    rs.update({k: v for k, v in (("mscale", mscale), ("mscale_all_dim", all_dim)) if v is not None})
    deepseek, hf = yarn_attention_factors(rs)
    assert (deepseek == pytest.approx(hf, rel=1e-12)) is equal
    if equal:
        get_preset("tiny", rope_scaling=rs)  # accepted
    else:
        with pytest.raises(ConfigError, match="mscale"):
            get_preset("tiny", rope_scaling=rs)


def test_every_key_hf_transformers_writes_is_known(caplog):
    transformers = pytest.importorskip("transformers")
    with caplog.at_level(logging.WARNING, logger="coscale"):
        for config in [transformers.DeepseekV3Config(), transformers.DeepseekV2Config(
                n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1)]:
            for d in (config.to_dict(), config.to_diff_dict()):
                cfg = ModelConfig.from_dict(d)
                assert cfg.rope_theta == config.rope_parameters["rope_theta"]
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("d", [{}, {"foo": 1}, {k: v for k, v in PUBLISHED_V3.items() if k != "model_type"}])
def test_a_dict_without_model_type_is_no_model_config(d):
    """Every field has V3's default: {} used to be read as DeepSeek-V3 (671B) and OOM-killed `coscale train`."""
    with pytest.raises(ConfigError, match="wrong.json: no model_type, so not a DeepSeek/HF model config"):
        ModelConfig.from_dict(d, source="wrong.json")


def test_from_json_names_the_file_it_cannot_read(tmp_path):
    (tmp_path / "wrong.json").write_text('{"foo": 1}')
    with pytest.raises(ConfigError, match=f"{tmp_path / 'wrong.json'}: no model_type"):
        ModelConfig.from_json(tmp_path / "wrong.json")
    (tmp_path / "random.json").write_bytes(bytes([0x81, 0xFF, 0x00]) * 10)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'random.json'} is not a JSON config: not UTF-8"):
        ModelConfig.from_json(tmp_path / "random.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="list.json: a model config must be a JSON object"):
        ModelConfig.from_json(tmp_path / "list.json")
