"""Dense model specs, the HF config.json reader and ModelView."""

import json

import pytest

from coscale.analysis.models import DenseModelSpec, as_view, load_model
from coscale.config import ModelConfig, get_preset
from coscale.errors import ConfigError
from coscale.param_count import count_params

TOY = DenseModelSpec(name="toy", hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=4, intermediate_size=16, vocab_size=10)


def test_toy_parameter_count_by_hand():
    # attention 8x8 + 2x8x4 + 8x8 = 192, FFN 3x8x16 = 384, norms 16 -> 592 per layer; + final norm 8
    v = as_view(TOY)
    assert v.total_params == 2 * 592 + 8 + 2 * 80
    assert v.activated_params == 2 * 592 + 8 + 80  # the head counts, the embedding does not
    assert v.attention == "MQA"


@pytest.mark.parametrize("name, billions", [
    ("qwen2.5-72b", 72.7), ("llama3.1-405b", 405.9), ("llama3.1-70b", 70.6), ("qwen-72b", 72.3),
])
def test_dense_presets_match_published_sizes(name, billions):
    assert round(as_view(name).total_params / 1e9, 1) == billions


def test_deepseek_view_uses_param_count():
    v = as_view("deepseek-v3")
    counts = count_params(get_preset("deepseek-v3"))
    assert (v.total_params, v.activated_params) == (counts.total, counts.activated)
    assert v.attention == "MLA" and v.kv_cache_elements_per_layer == 576
    assert v.experts_per_token == 8 and v.shared_experts == 1


def _write(tmp_path, d, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(d))
    return path


def test_llama_style_config(tmp_path):
    d = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256}
    spec = load_model(str(_write(tmp_path, d)))
    assert isinstance(spec, DenseModelSpec)
    assert spec.head_dim == 128 and spec.num_key_value_heads == 8
    assert round(as_view(spec).total_params / 1e9, 2) == 8.03  # Llama-3.1-8B


def test_checkpoint_directory_and_qwen1(tmp_path):
    d = {"model_type": "qwen", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
         "kv_channels": 128, "intermediate_size": 49152, "vocab_size": 152064}
    _write(tmp_path, d)
    v = as_view(str(tmp_path))
    assert v.attention == "MHA"
    assert v.total_params == as_view("qwen-72b").total_params


def test_deepseek_checkpoint_directory(tmp_path):
    get_preset("deepseek-v2-lite").save_json(tmp_path)
    assert isinstance(load_model(str(tmp_path)), ModelConfig)


@pytest.mark.parametrize("d, message", [
    ({"model_type": "gpt2"}, "not supported"),
    ({"model_type": "llama", "hidden_size": 64}, "lacks"),
    ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 6,
      "num_key_value_heads": 4, "intermediate_size": 8, "vocab_size": 9}, "multiple"),
])
def test_bad_configs(tmp_path, d, message):
    with pytest.raises(ConfigError, match=message):
        load_model(str(_write(tmp_path, d)))


def test_malformed_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(str(path))


def test_unknown_model():
    with pytest.raises(ConfigError, match="neither a model preset"):
        as_view("gpt-5")


def test_info_names_the_activated_convention_and_gives_both_numbers(capsys):
    from coscale.cli import main
    from coscale.config import get_preset
    from coscale.param_count import ACTIVATED_CONVENTION

    counts = count_params(get_preset("deepseek-v3"))
    assert counts.activated_with_embedding == counts.activated + 129280 * 7168
    assert main(["info", "--model", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert ACTIVATED_CONVENTION in out and f"{counts.activated:,}" in out
    assert f"{counts.activated_with_embedding:,}" in out
