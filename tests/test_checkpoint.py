"""HF-layout checkpoints: name mapping, FP8 block scaling, save/load round trips, published-layout
loads (FP8 included), streaming, expert ranges and every user-facing error."""

from __future__ import annotations

import ast
import copy
import errno
import json
import logging
import math
import os
import pathlib
import shutil
import weakref

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import coscale
from coscale import checkpoint as ckpt
from coscale import save_pretrained
from coscale.checkpoint import dequant_fp8_block, is_fp8_weight_name, quantize_fp8_block
from coscale.config import get_preset
from coscale.errors import CheckpointError
from coscale.kernels.quant import AMAX_FLOOR, FP8_MAX, weight_quant_128x128_ref
from coscale.model.state_dict import (
    coscale_to_hf_name,
    hf_to_coscale_name,
    is_mtp_shared_copy,
    is_stacked_expert,
    local_expert_index,
)

V3 = get_preset("deepseek-v3")  # 61 layers: MTP module 0 is HF layer 61


def micro_config(**overrides):
    """V3-style (q_lora, sigmoid, noaux_tc, MTP) and small enough for a checkpoint per test."""
    kw = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, vocab_size=64,
              n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2,
              moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=16)
    return get_preset("tiny", **{**kw, **overrides})


def v2_lite_config():
    """V2-Lite-like: direct q_proj, softmax scoring, greedy top-k, no MTP; sizes make 128x128 blocks
    ragged (200, 136, 300, 72 + 8 ...)."""
    return get_preset(
        "tiny", model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], vocab_size=300,
        hidden_size=200, intermediate_size=300, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=72, qk_nope_head_dim=24,
        qk_rope_head_dim=8, v_head_dim=24, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=2, moe_intermediate_size=136, first_k_dense_replace=1, n_group=1,
        topk_group=1, topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
        num_nextn_predict_layers=0,
    )


def make_model(cfg, seed=0):
    from coscale.model.transformer import DeepseekForCausalLM

    torch.manual_seed(seed)
    model = DeepseekForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("e_score_correction_bias") or name.endswith("norm.weight"):
                t.uniform_(0.5, 1.5) if name.endswith("norm.weight") else t.normal_(0, 0.1)
    return model


def tokens(cfg, seed=1):
    return torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))


# ---- a published-layout writer, independent of coscale.checkpoint's mapping ---------------------

def published_tensors(model):
    """The model's weights under the names of the published DeepSeek repositories."""
    cfg, out = model.config, {}
    for name, t in model.state_dict().items():
        if name.startswith("mtp."):
            k, rest = name.split(".", 2)[1:]
            layer = f"model.layers.{cfg.num_hidden_layers + int(k)}."
            rest = {"norm.weight": "shared_head.norm.weight"}.get(rest, rest.removeprefix("block."))
            name = layer + rest
        for stacked, proj in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
            if name.endswith(f"mlp.experts.{stacked}"):
                prefix = name[: -len(stacked)]
                out.update({f"{prefix}{j}.{proj}.weight": t[j].clone() for j in range(t.shape[0])})
                break
        else:
            out[name] = t.clone()
    for k in range(cfg.num_nextn_predict_layers):
        layer = f"model.layers.{cfg.num_hidden_layers + k}."
        out[layer + "embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
        out[layer + "shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    return out


FP8_NAMES = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
             "gate_proj", "up_proj", "down_proj")


def quantize_published(tensors):
    """FP8 as in the published V3 files: attention / FFN / expert projections, not eh_proj."""
    out = {}
    for name, t in tensors.items():
        module = name.rsplit(".", 2)[-2]
        if module in FP8_NAMES and (".self_attn." in name or ".mlp." in name):
            out[name], out[name + "_scale_inv"] = quantize_fp8_block(t)
        else:
            out[name] = t
    return out


def write_published(tensors, path, cfg, shards=2, single_file=False):
    os.makedirs(path, exist_ok=True)
    d = cfg.to_dict()
    if any(t.dtype == torch.float8_e4m3fn for t in tensors.values()):
        d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                    "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)
    if single_file:
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):  # weights and their scales may land in different shards
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, os.path.join(path, file))
        weight_map.update(dict.fromkeys(part, file))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def dequantized_reference(model):
    """A copy of `model` whose FP8-stored weights are replaced by dequant(quant(w)) in float32."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            hf = coscale_to_hf_name(name, ref.config, 0) if is_stacked_expert(name) else (
                coscale_to_hf_name(name, ref.config))
            if not is_fp8_weight_name(hf):
                continue
            rows = t if t.ndim == 3 else t[None]
            for w in rows:
                w.copy_(dequant_fp8_block(*quantize_fp8_block(w)))
    return ref


# ---- name mapping ----------------------------------------------------------------------------

MAPPING = [
    ("model.embed_tokens.weight", "model.embed_tokens.weight", None),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
     "model.layers.0.self_attn.kv_a_proj_with_mqa.weight", None),
    ("model.layers.3.mlp.experts.17.gate_proj.weight", "model.layers.3.mlp.experts.w_gate", 17),
    ("model.layers.60.mlp.experts.255.down_proj.weight", "model.layers.60.mlp.experts.w_down", 255),
    ("model.layers.5.mlp.experts.0.up_proj.weight", "model.layers.5.mlp.experts.w_up", 0),
    ("model.layers.5.mlp.gate.e_score_correction_bias", "model.layers.5.mlp.gate.e_score_correction_bias",
     None),
    ("model.layers.5.mlp.shared_experts.up_proj.weight", "model.layers.5.mlp.shared_experts.up_proj.weight",
     None),
    ("model.layers.61.enorm.weight", "mtp.0.enorm.weight", None),
    ("model.layers.61.hnorm.weight", "mtp.0.hnorm.weight", None),
    ("model.layers.61.eh_proj.weight", "mtp.0.eh_proj.weight", None),
    ("model.layers.61.shared_head.norm.weight", "mtp.0.norm.weight", None),
    ("model.layers.61.input_layernorm.weight", "mtp.0.block.input_layernorm.weight", None),
    ("model.layers.61.self_attn.q_a_proj.weight", "mtp.0.block.self_attn.q_a_proj.weight", None),
    ("model.layers.61.mlp.experts.9.gate_proj.weight", "mtp.0.block.mlp.experts.w_gate", 9),
    ("model.layers.61.mlp.gate.weight", "mtp.0.block.mlp.gate.weight", None),
    ("model.norm.weight", "model.norm.weight", None),
    ("lm_head.weight", "lm_head.weight", None),
]


@pytest.mark.parametrize("hf, coscale_name, expert", MAPPING)
def test_name_mapping_both_ways(hf, coscale_name, expert):
    assert hf_to_coscale_name(hf, V3) == (coscale_name, expert)
    assert coscale_to_hf_name(coscale_name, V3, expert) == hf
    assert not is_mtp_shared_copy(hf, V3)


def test_mtp_shared_copies_map_to_the_main_tensors():
    assert hf_to_coscale_name("model.layers.61.embed_tokens.weight", V3) == ("model.embed_tokens.weight", None)
    assert hf_to_coscale_name("model.layers.61.shared_head.head.weight", V3) == ("lm_head.weight", None)
    assert is_mtp_shared_copy("model.layers.61.embed_tokens.weight", V3)
    assert not is_mtp_shared_copy("model.layers.60.embed_tokens.weight", V3)


def test_mtp_index_follows_num_hidden_layers():
    cfg = micro_config()  # L = 2
    assert hf_to_coscale_name("model.layers.2.eh_proj.weight", cfg) == ("mtp.0.eh_proj.weight", None)
    assert hf_to_coscale_name("model.layers.1.mlp.gate.weight", cfg) == ("model.layers.1.mlp.gate.weight", None)
    assert coscale_to_hf_name("mtp.1.block.post_attention_layernorm.weight", cfg) == (
        "model.layers.3.post_attention_layernorm.weight")


def test_expert_index_needed_exactly_for_stacked_weights():
    with pytest.raises(ValueError):
        coscale_to_hf_name("model.layers.3.mlp.experts.w_gate", V3)
    with pytest.raises(ValueError):
        coscale_to_hf_name("model.layers.3.mlp.gate.weight", V3, 2)


def test_local_expert_index():
    assert local_expert_index(5, None) == 5
    assert local_expert_index(5, range(4, 8)) == 1
    assert local_expert_index(8, range(4, 8)) is None


@pytest.mark.parametrize("name, fp8", [
    ("model.layers.0.self_attn.q_a_proj.weight", True),
    ("model.layers.0.self_attn.q_proj.weight", True),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", True),
    ("model.layers.0.self_attn.kv_b_proj.weight", True),
    ("model.layers.0.self_attn.o_proj.weight", True),
    ("model.layers.0.mlp.down_proj.weight", True),
    ("model.layers.3.mlp.experts.7.up_proj.weight", True),
    ("model.layers.3.mlp.shared_experts.gate_proj.weight", True),
    ("model.layers.3.mlp.gate.weight", False),
    ("model.layers.3.mlp.gate.e_score_correction_bias", False),
    ("model.layers.0.self_attn.kv_a_layernorm.weight", False),
    ("model.layers.61.eh_proj.weight", False),
    ("model.layers.61.shared_head.head.weight", False),
    ("model.embed_tokens.weight", False),
    ("lm_head.weight", False),
])
def test_fp8_weight_names(name, fp8):
    assert is_fp8_weight_name(name) is fp8


# ---- FP8 block scaling -------------------------------------------------------------------------

def dequant_by_loop(w, s, block=128):
    out = torch.empty(w.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = w[rows, cols].float() * s[i, j]
    return out


@pytest.mark.parametrize("shape", [(128, 128), (576, 7168), (300, 200), (1, 257), (129, 1)])
def test_dequant_matches_blockwise_loop(shape):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=g) * 3).to(torch.float8_e4m3fn)
    s = torch.rand(math.ceil(shape[0] / 128), math.ceil(shape[1] / 128), generator=g) + 0.01
    assert torch.equal(dequant_fp8_block(w, s), dequant_by_loop(w, s))
    assert dequant_fp8_block(w, s, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(128, 128), (576, 7168), (300, 200), (1, 257)])
def test_quantize_dequantize_error_is_fp8_rounding(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    w[: min(shape[0], 5)] *= 50  # blocks with very different ranges
    q, s = quantize_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    dq = dequant_fp8_block(q, s)
    scale = s.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    # e4m3: 3 mantissa bits -> relative error <= 2^-4; subnormals: absolute <= 2^-10 in scaled units.
    assert ((dq - w).abs() <= w.abs() * 2**-4 + scale * 2**-10).all()
    # each block's largest magnitude maps onto the format's largest finite value
    assert q.float().abs().max() == torch.finfo(torch.float8_e4m3fn).max


def test_quantize_zero_block_and_bad_scale_shape():
    w = torch.zeros(130, 10)
    w[129, 0] = 1.0
    q, s = quantize_fp8_block(w)
    # kernels.quant's rule: an all-zero block gets the smallest scale, AMAX_FLOOR / 448 (was 1 before
    # checkpoint.py used that quantizer); its values stay exactly zero either way
    assert s[0, 0] == torch.tensor(AMAX_FLOOR) / FP8_MAX and torch.equal(dequant_fp8_block(q, s), w)
    with pytest.raises(ValueError, match="expected"):
        dequant_fp8_block(q, torch.ones(1, 1))


@pytest.mark.parametrize("size, expected", [(1000, 1000), ("2GB", 2 * 10**9), ("5MB", 5 * 10**6),
                                            ("1GiB", 2**30), ("0.5 KB", 500), ("64", 64)])
def test_parse_size(size, expected):
    assert ckpt.parse_size(size) == expected


@pytest.mark.parametrize("size", ["two GB", "-1GB", 0, "0MB"])
def test_parse_size_rejects(size):
    with pytest.raises(CheckpointError, match="max_shard_size"):
        ckpt.parse_size(size)


# ---- save_pretrained -> from_pretrained ------------------------------------------------------

@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A saved micro checkpoint (several shards) and the model it came from."""
    model = make_model(micro_config())
    path = tmp_path_factory.mktemp("micro") / "ckpt"
    save_pretrained(model, path, max_shard_size="100KB")
    return model, path


@pytest.fixture
def micro_copy(micro, tmp_path):
    model, path = micro
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return model, dst


def test_round_trip_gives_identical_logits_and_tensors(micro):
    model, path = micro
    loaded = coscale.from_pretrained(path)
    x = tokens(model.config)
    assert torch.equal(loaded(x), model(x))
    state = loaded.state_dict()
    assert state.keys() == model.state_dict().keys()
    for name, t in model.state_dict().items():
        assert torch.equal(state[name], t), name
    assert not loaded.training
    assert torch.equal(loaded.rotary.inv_freq, model.rotary.inv_freq)  # recomputed by init_buffers
    mtp_in = torch.randn(2, 7, model.config.hidden_size)
    assert torch.equal(loaded.mtp_logits(mtp_in, x)[0], model.mtp_logits(mtp_in, x)[0])


def test_saved_layout_is_the_published_one(micro):
    model, path = micro
    files = sorted(os.listdir(path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    with open(path / "model.safetensors.index.json") as f:
        index = json.load(f)
    names = set(index["weight_map"])
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:
        tensors = load_file(path / shard)
        assert {n for n, s in index["weight_map"].items() if s == shard} == set(tensors)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    L = model.config.num_hidden_layers
    for name in ["model.layers.1.mlp.experts.3.down_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
                 f"model.layers.{L}.eh_proj.weight", f"model.layers.{L}.shared_head.norm.weight",
                 f"model.layers.{L}.embed_tokens.weight", f"model.layers.{L}.shared_head.head.weight",
                 f"model.layers.{L}.mlp.experts.0.gate_proj.weight", "lm_head.weight"]:
        assert name in names, name
    assert not any(n.startswith("mtp.") or ".w_gate" in n or "_scale_inv" in n for n in names)
    with open(path / "config.json") as f:
        config = json.load(f)
    assert config["num_hidden_layers"] == L and config["torch_dtype"] == "float32"
    assert "quantization_config" not in config


def test_bf16_round_trip_keeps_dtypes(tmp_path):
    model = make_model(micro_config())
    with torch.no_grad():  # parameters only: RoPE tables and router biases stay float32
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    save_pretrained(model, tmp_path / "bf16")
    loaded = coscale.from_pretrained(tmp_path / "bf16")
    assert loaded.model.layers[1].mlp.experts.w_gate.dtype == torch.bfloat16
    assert loaded.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    x = tokens(model.config)
    assert torch.equal(loaded(x), model(x))
    as_f32 = coscale.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert as_f32.model.embed_tokens.weight.dtype == torch.float32


def test_save_refuses_non_empty_directory_unless_overwrite(micro, tmp_path):
    model, _ = micro
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty"):
        save_pretrained(model, target)
    assert os.listdir(target) == ["notes.txt"]
    save_pretrained(model, target, overwrite=True)
    assert "notes.txt" not in os.listdir(target) and "config.json" in os.listdir(target)
    empty = tmp_path / "empty"
    empty.mkdir()
    save_pretrained(model, empty)  # an empty directory is fine
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary leftovers


def test_failed_save_leaves_nothing_behind(micro, tmp_path, monkeypatch):
    model, _ = micro

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(CheckpointError, match="disk full"):
        save_pretrained(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_saved_files_honour_the_umask(micro, tmp_path):
    model, _ = micro
    for umask, dir_mode, file_mode in [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640), (0o077, 0o700, 0o600)]:
        old = os.umask(umask)
        try:
            save_pretrained(model, tmp_path / f"ckpt{umask:o}")
        finally:
            os.umask(old)
        path = tmp_path / f"ckpt{umask:o}"
        assert stat_mode(path) == dir_mode
        assert {stat_mode(path / f) for f in os.listdir(path)} == {file_mode}, sorted(os.listdir(path))


def stat_mode(path):
    return os.stat(path).st_mode & 0o777


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
FULL_DISK_ERRORS = {  # what each writer raises when the disk fills up (safetensors: its own error type)
    "save_file": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    "json.dump": ENOSPC,
}


@pytest.mark.parametrize("writer", list(FULL_DISK_ERRORS))
def test_full_disk_is_one_line_naming_the_path_and_nothing_is_left(micro, tmp_path, monkeypatch, writer):
    model, _ = micro

    def full(*args, **kwargs):
        raise FULL_DISK_ERRORS[writer]

    monkeypatch.setattr(*((ckpt, "save_file") if writer == "save_file" else (ckpt.json, "dump")), full)
    target = tmp_path / "out"
    with pytest.raises(CheckpointError) as info:
        save_pretrained(model, target)
    message = str(info.value)
    assert message.startswith(f"cannot write checkpoint {target}: No space left on device") and "\n" not in message
    assert os.listdir(tmp_path) == []


def test_unwritable_targets_are_one_line_errors(micro, tmp_path):
    model, _ = micro
    (tmp_path / "file").write_text("not a directory")
    targets = {tmp_path / "file" / "ckpt": "is not a directory"}
    if os.path.isdir("/proc/self"):  # Linux: nothing can be created in /proc
        targets["/proc/coscale-ckpt"] = "cannot write checkpoint /proc/coscale-ckpt: "
    for target, fragment in targets.items():
        with pytest.raises(CheckpointError) as info:
            save_pretrained(model, target)
        message = str(info.value)
        assert str(target) in message and fragment in message and "\n" not in message
    assert os.listdir(tmp_path) == ["file"]


def test_fp8_save_uses_the_kernels_quantizer(micro, tmp_path):
    model, _ = micro
    save_pretrained(model, tmp_path / "fp8", fp8=True)
    w = model.model.layers[1].mlp.experts.w_down[3].detach()
    q_ref, s_ref = weight_quant_128x128_ref(w)
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    saved = load_file(tmp_path / "fp8" / "model-00001-of-00001.safetensors")
    n, k = w.shape
    assert torch.equal(saved[name].view(torch.uint8), q_ref[:n, :k].view(torch.uint8))
    assert torch.equal(saved[name + "_scale_inv"], s_ref)


# ---- loading the published layout (FP8 included) ------------------------------------------------

@pytest.mark.parametrize("make_cfg", [micro_config, v2_lite_config], ids=["v3-like", "v2-lite-like"])
def test_published_bf16_layout_loads_exactly(make_cfg, tmp_path):
    model = make_model(make_cfg())
    write_published(published_tensors(model), tmp_path / "hf", model.config, shards=3)
    loaded = coscale.from_pretrained(tmp_path / "hf")
    x = tokens(model.config)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("make_cfg", [micro_config, v2_lite_config], ids=["v3-like", "v2-lite-like"])
def test_published_fp8_layout_gives_the_dequantized_models_logits(make_cfg, tmp_path):
    model = make_model(make_cfg())
    write_published(quantize_published(published_tensors(model)), tmp_path / "fp8", model.config)
    loaded = coscale.from_pretrained(str(tmp_path / "fp8"), dtype="float32")
    reference = dequantized_reference(model)
    x = tokens(model.config)
    assert torch.equal(loaded(x), reference(x))
    # and close to the unquantised model: within FP8 rounding
    diff = (loaded(x) - model(x)).norm() / model(x).norm()
    assert 0 < diff < 0.1


def test_fp8_weights_dequantize_to_bf16_by_default(tmp_path):
    model = make_model(micro_config())
    write_published(quantize_published(published_tensors(model)), tmp_path / "fp8", model.config)
    loaded = coscale.from_pretrained(tmp_path / "fp8")
    layer = loaded.model.layers[1]
    assert layer.self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    assert layer.mlp.experts.w_down.dtype == torch.bfloat16
    assert layer.mlp.gate.weight.dtype == torch.float32  # not FP8 in the file: keeps its dtype
    assert layer.mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert loaded.config.quantization_config["weight_block_size"] == [128, 128]


def test_save_pretrained_fp8_round_trip(micro, tmp_path):
    model, _ = micro
    save_pretrained(model, tmp_path / "fp8", fp8=True)
    with open(tmp_path / "fp8" / "config.json") as f:
        assert json.load(f)["quantization_config"]["weight_block_size"] == [128, 128]
    with safe_open(tmp_path / "fp8" / "model-00001-of-00001.safetensors", "pt") as f:
        assert f.get_slice("model.layers.1.mlp.experts.2.up_proj.weight").get_dtype() == "F8_E4M3"
        assert f.get_slice("model.layers.2.eh_proj.weight").get_dtype() == "F32"
        assert "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv" in f.keys()
    loaded = coscale.from_pretrained(tmp_path / "fp8", dtype=torch.float32)
    x = tokens(model.config)
    assert torch.equal(loaded(x), dequantized_reference(model)(x))
    # saving the dequantised model without fp8 drops quantization_config
    save_pretrained(loaded, tmp_path / "plain")
    with open(tmp_path / "plain" / "config.json") as f:
        assert "quantization_config" not in json.load(f)


def test_single_file_checkpoint_loads(tmp_path):
    model = make_model(micro_config())
    write_published(published_tensors(model), tmp_path / "one", model.config, single_file=True)
    loaded = coscale.from_pretrained(tmp_path / "one")
    x = tokens(model.config)
    assert torch.equal(loaded(x), model(x))


def test_mtp_layers_load_from_index_L(tmp_path):
    model = make_model(micro_config())
    tensors = published_tensors(model)
    L = model.config.num_hidden_layers
    assert f"model.layers.{L}.eh_proj.weight" in tensors and f"model.layers.{L + 1}.enorm.weight" not in tensors
    write_published(tensors, tmp_path / "hf", model.config)
    loaded = coscale.from_pretrained(tmp_path / "hf")
    assert torch.equal(loaded.mtp[0].eh_proj.weight, model.mtp[0].eh_proj.weight)
    assert torch.equal(loaded.mtp[0].norm.weight, model.mtp[0].norm.weight)
    assert torch.equal(loaded.mtp[0].block.mlp.experts.w_up, model.mtp[0].block.mlp.experts.w_up)


def test_mtp_copies_are_ignored_when_the_main_copy_exists(tmp_path):
    model = make_model(micro_config())
    tensors = published_tensors(model)
    tensors["model.layers.2.embed_tokens.weight"] = torch.zeros_like(tensors["model.embed_tokens.weight"])
    write_published(tensors, tmp_path / "hf", model.config)
    loaded = coscale.from_pretrained(tmp_path / "hf")
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    # ... and used when it does not
    del tensors["lm_head.weight"]
    write_published(tensors, tmp_path / "no_head", model.config)
    loaded = coscale.from_pretrained(tmp_path / "no_head")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def without_mtp_layers(tensors, cfg):
    L = cfg.num_hidden_layers
    return {n: t for n, t in tensors.items() if not n.startswith(f"model.layers.{L}.")}


def test_checkpoint_without_mtp_weights_loads_the_main_model(tmp_path, caplog):
    model = make_model(micro_config())
    assert model.config.num_nextn_predict_layers == 1
    write_published(without_mtp_layers(published_tensors(model), model.config), tmp_path / "hf", model.config)
    with caplog.at_level(logging.WARNING, logger="coscale"):
        loaded = coscale.from_pretrained(tmp_path / "hf")
    (warning,) = [r.getMessage() for r in caplog.records if r.name.startswith("coscale")]
    assert "no MTP weights" in warning and str(tmp_path / "hf") in warning and "\n" not in warning
    assert len(loaded.mtp) == 0 and loaded.config.num_nextn_predict_layers == 0
    assert not any(n.startswith("mtp.") for n in loaded.state_dict())
    x = tokens(model.config)
    assert torch.equal(loaded(x), model(x))
    # into a model built with its MTP module: the module goes, the main model is filled
    target = make_model(micro_config(), seed=3)
    ckpt.load_checkpoint(target, tmp_path / "hf")
    assert len(target.mtp) == 0 and target.config.num_nextn_predict_layers == 0
    assert torch.equal(target(x), model(x))


def test_checkpoint_with_part_of_an_mtp_layer_is_an_error(tmp_path):
    model = make_model(micro_config())
    tensors = published_tensors(model)
    L = model.config.num_hidden_layers
    del tensors[f"model.layers.{L}.eh_proj.weight"]
    write_published(tensors, tmp_path / "hf", model.config)
    expect_error(tmp_path / "hf", "lacks 1 tensors", f"model.layers.{L}.eh_proj.weight")


def test_generate_speculative_says_why_without_mtp_weights(tmp_path, capsys):
    from coscale.cli import main

    model = make_model(micro_config())
    write_published(without_mtp_layers(published_tensors(model), model.config), tmp_path / "hf", model.config)
    args = ["generate", str(tmp_path / "hf"), "--prompt-ids", "1,2", "--max-new-tokens", "2", "--device", "cpu"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--speculative"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--speculative" in err[0] and "MTP" in err[0]


# ---- streaming --------------------------------------------------------------------------------

def test_loader_builds_on_meta_and_holds_one_checkpoint_tensor_at_a_time(micro, monkeypatch):
    model, path = micro
    registered, alive, reads = [], [], []
    original_read = ckpt._TensorReader.read

    def tracking_read(self, name):
        reads.append(sum(r() is not None for r in alive))
        t = original_read(self, name)
        alive.append(weakref.ref(t))
        return t

    monkeypatch.setattr(ckpt._TensorReader, "read", tracking_read)
    handle = torch.nn.modules.module.register_module_parameter_registration_hook(
        lambda module, name, p: registered.append(p.device.type))
    try:
        loaded = coscale.from_pretrained(path)
    finally:
        handle.remove()
    assert registered and set(registered) == {"meta"}  # no randomly initialised full copy
    assert len(reads) == len(ckpt.checkpoint_weight_map(path)) - 2  # the 2 MTP copies are skipped
    assert max(reads) <= 1  # at most the previous tensor (an FP8 weight while its scale is read)
    x = tokens(model.config)
    assert torch.equal(loaded(x), model(x))


# ---- expert ranges (expert parallelism) --------------------------------------------------------

def local_model(cfg, n_local):
    """The model on meta with `n_local` routed experts per MoE layer (as an EP rank holds them)."""
    from coscale.model.moe import GroupedExperts
    from coscale.model.transformer import DeepseekForCausalLM

    with torch.device("meta"):
        model = DeepseekForCausalLM(cfg)
        for module in model.modules():
            if hasattr(module, "experts") and isinstance(module.experts, GroupedExperts):
                module.experts = GroupedExperts(n_local, cfg.hidden_size, cfg.moe_intermediate_size)
    return model


@pytest.mark.parametrize("expert_range", [(2, 4), range(0, 2)])
def test_expert_range_loads_local_experts_renumbered(micro, expert_range):
    model, path = micro
    local = ckpt.load_checkpoint(local_model(model.config, 2), path, expert_range=expert_range)
    start = expert_range[0]
    for name in ["model.layers.1.mlp.experts.w_gate", "mtp.0.block.mlp.experts.w_down"]:
        assert torch.equal(local.get_parameter(name), model.get_parameter(name)[start:start + 2])
    assert torch.equal(local.model.layers[1].mlp.gate.weight, model.model.layers[1].mlp.gate.weight)


def test_expert_range_must_match_the_local_expert_count(micro):
    model, path = micro
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.3\.gate_proj\.weight"):
        ckpt.load_checkpoint(local_model(model.config, 4), path, expert_range=(0, 3))
    with pytest.raises(CheckpointError, match="beyond the model's 2 experts"):
        ckpt.load_checkpoint(local_model(model.config, 2), path, expert_range=(0, 3))


def test_load_into_a_materialised_model_fills_in_place(micro):
    model, path = micro
    target = make_model(micro_config(), seed=5)
    weight = target.model.embed_tokens.weight
    ckpt.load_checkpoint(target, path)
    assert target.model.embed_tokens.weight is weight
    x = tokens(model.config)
    assert torch.equal(target(x), model(x))


# ---- errors: one line, naming the file or tensor ----------------------------------------------

def rewrite_shard_of(path, name, edit):
    """Apply `edit(tensors)` to the shard holding `name` and keep the index consistent."""
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"][name]
    tensors = load_file(path / shard)
    edit(tensors)
    save_file(tensors, path / shard)
    index["weight_map"] = {n: s for n, s in index["weight_map"].items() if s != shard}
    index["weight_map"].update(dict.fromkeys(tensors, shard))
    index_path.write_text(json.dumps(index))


def expect_error(path, *fragments, **kwargs):
    with pytest.raises(CheckpointError) as info:
        coscale.from_pretrained(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_error_missing_directory(tmp_path):
    expect_error(tmp_path / "nope", "not found", str(tmp_path / "nope"))


def test_error_missing_config(micro_copy):
    _, path = micro_copy
    os.remove(path / "config.json")
    expect_error(path, "config.json")


def test_error_other_architecture(micro_copy):
    _, path = micro_copy
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (path / "config.json").write_text(json.dumps(config))
    expect_error(path, "config.json", "llama")


def test_error_no_weights(micro_copy):
    _, path = micro_copy
    os.remove(path / "model.safetensors.index.json")
    expect_error(path, "model.safetensors.index.json", "model.safetensors")


def test_error_index_references_missing_shard(micro_copy):
    _, path = micro_copy
    shard = sorted(f for f in os.listdir(path) if f.startswith("model-"))[1]
    os.remove(path / shard)
    expect_error(path, shard, "does not exist")


def test_error_corrupt_index(micro_copy):
    _, path = micro_copy
    (path / "model.safetensors.index.json").write_text("{not json")
    expect_error(path, "model.safetensors.index.json")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_error_corrupt_shard(micro_copy, damage):
    _, path = micro_copy
    shard = sorted(f for f in os.listdir(path) if f.startswith("model-"))[0]
    data = (path / shard).read_bytes()
    (path / shard).write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    expect_error(path, shard, "not a valid safetensors file")


def test_error_missing_tensor(micro_copy):
    _, path = micro_copy
    name = "model.layers.1.mlp.experts.2.gate_proj.weight"
    rewrite_shard_of(path, name, lambda t: t.pop(name))
    expect_error(path, "lacks 1 tensors", name)


def test_error_unexpected_tensor(micro_copy):
    _, path = micro_copy
    name = "model.layers.1.mlp.experts.2.gate_proj.weight"
    extra = "model.layers.0.self_attn.rotary_emb.inv_freq"
    rewrite_shard_of(path, name, lambda t: t.update({extra: torch.ones(3)}))
    expect_error(path, "does not have", extra)


def test_error_expert_beyond_config(micro_copy):
    _, path = micro_copy
    name = "model.layers.1.mlp.experts.2.gate_proj.weight"
    rewrite_shard_of(path, name, lambda t: t.update({"model.layers.1.mlp.experts.4.gate_proj.weight": t[name].clone()}))
    expect_error(path, "model.layers.1.mlp.experts.4.gate_proj.weight")


def test_error_shape_mismatch(micro_copy):
    _, path = micro_copy
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    rewrite_shard_of(path, name, lambda t: t.update({name: t[name][:, :-1].contiguous()}))
    expect_error(path, name, "[256, 15]", "[256, 16]")


def test_error_fp8_weight_without_scale(tmp_path):
    model = make_model(micro_config())
    tensors = quantize_published(published_tensors(model))
    name = "model.layers.1.self_attn.o_proj.weight"
    del tensors[name + "_scale_inv"]
    write_published(tensors, tmp_path / "fp8", model.config)
    expect_error(tmp_path / "fp8", name, "_scale_inv")


def test_error_scale_of_wrong_shape(tmp_path):
    model = make_model(micro_config())
    tensors = quantize_published(published_tensors(model))
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name + "_scale_inv"] = torch.ones(2, 2)
    write_published(tensors, tmp_path / "fp8", model.config)
    expect_error(tmp_path / "fp8", name + "_scale_inv", "(2, 2)")


def test_checkpoints_move_between_plain_and_fp8_converted_models(micro, tmp_path):
    from coscale.fp8 import convert_to_fp8

    model, path = micro
    converted = ckpt.load_checkpoint(convert_to_fp8(make_model(micro_config(), seed=7)), path)
    for name, t in model.state_dict().items():
        assert torch.equal(converted.state_dict()[name], t), name
    save_pretrained(converted, tmp_path / "from_converted")
    plain = coscale.from_pretrained(tmp_path / "from_converted")
    x = tokens(model.config)
    assert torch.equal(plain(x), model(x))


def imported_modules(path):
    """Every module a source file imports, at any depth (function-local imports included)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_model_package_never_imports_checkpoint():
    model_dir = pathlib.Path(coscale.__file__).parent / "model"
    for source in sorted(model_dir.glob("*.py")):
        bad = {m for m in imported_modules(source) if m.startswith(("coscale.checkpoint", "coscale.train",
                                                                    "coscale.infer"))}
        assert not bad, f"{source.name} imports {sorted(bad)}"

