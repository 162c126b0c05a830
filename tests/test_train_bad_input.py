"""`coscale train` / `coscale info` on input that is wrong in type or meaning (the CLI audit): one line, exit 2,
nothing written, before any model is built."""

import json
import os
import types

import pytest

from coscale.cli import build_parser, main
from coscale.errors import ConfigError
from coscale.train.commands import train_config_from_args
from coscale.train.config import SEED_LIMIT, TrainConfig, max_threads

TINY_RUN = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--no-progress", "--no-tensorboard"]
SMALL_OVERRIDES = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2,
    q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1,
)


def _fails(capsys, argv, match, command="train"):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"coscale {command}: error: ") and match in lines[0], lines[0]
    return lines[0]


def _config_file(tmp_path, text, name="train.yaml"):
    path = tmp_path / name
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return str(path)


def _args(*argv):
    return build_parser().parse_args(["train", *argv])


# ---- model configs without model_type (A1) and files that are not UTF-8 (A3) ------------------------------

@pytest.mark.parametrize("content", ["{}", '{"foo": 1}', '{"hidden_size": 64}'])
@pytest.mark.parametrize("command", ["train", "info"])
def test_a_json_file_without_model_type_is_no_model_config(tmp_path, capsys, content, command):
    path = _config_file(tmp_path, content, "wrong.json")
    argv = [command, "--model", path] + (TINY_RUN + ["--out", str(tmp_path / "run")] if command == "train" else [])
    line = _fails(capsys, argv, "no model_type", command)
    assert path in line and "not a DeepSeek/HF model config" in line
    assert not (tmp_path / "run").exists()


def test_a_model_mapping_without_model_type_in_a_config_file(tmp_path, capsys):
    path = _config_file(tmp_path, "steps: 2\nmodel: {foo: 1}\n")
    line = _fails(capsys, ["train", "--config", path, "--out", str(tmp_path / "run")], "needs a model_type")
    assert path in line


@pytest.mark.parametrize("flag", ["--model", "--config"])
def test_files_that_are_not_utf8(tmp_path, capsys, flag):
    path = _config_file(tmp_path, bytes([0x81, 0xFF, 0x00, 0x12]) * 8, "random.bin")
    line = _fails(capsys, ["train", flag, path, *TINY_RUN, "--out", str(tmp_path / "run")], "not UTF-8")
    assert path in line


# ---- field types in config files (A9, B1) ---------------------------------------------------------------

@pytest.mark.parametrize("field,value,match", [
    ("overwrite", "no", "overwrite must be true or false"),
    ("progress", "maybe", "progress must be true or false"),
    ("tensorboard", "off", "tensorboard must be true or false"),
    ("checkpoints", 1, "checkpoints must be true or false"),
    ("tokenizer", 7, "tokenizer must be a path"),
    ("out_dir", 5, "out_dir must be a path"),
    ("out_dir", "", "out_dir must be a path"),
    ("resume", ["a"], "resume must be a path"),
    ("bin_dtype", "int8", "bin_dtype must be one of uint16, uint32"),
])
def test_wrongly_typed_fields_are_refused(tmp_path, capsys, field, value, match):
    path = _config_file(tmp_path, json.dumps({"steps": 2, field: value}), "train.json")
    _fails(capsys, ["train", "--config", path], match)


def test_overwrite_no_does_not_replace_a_finished_run(tmp_path, capsys):
    """The audit's worst silent case: overwrite "no" counted as true and deleted the run's checkpoints."""
    out = tmp_path / "run"
    base = dict(model="tiny", model_overrides=SMALL_OVERRIDES, steps=2, batch_size=2, seq_len=16, eval_interval=0,
                eval_batches=1, threads=1, tensorboard=False, progress=False, out_dir=str(out))
    assert main(["train", "--config", _config_file(tmp_path, json.dumps(base), "a.json")]) == 0
    before = sorted(os.listdir(out / "checkpoints"))
    capsys.readouterr()
    again = _config_file(tmp_path, json.dumps(base | {"steps": 1, "overwrite": "no"}), "b.json")
    _fails(capsys, ["train", "--config", again], "overwrite must be true or false")
    assert sorted(os.listdir(out / "checkpoints")) == before


# ---- values torch cannot take (A2, A7, A8) ---------------------------------------------------------------

@pytest.mark.parametrize("argv,match", [
    (["--threads", str(max_threads() + 1)], "CPU cores"),
    (["--threads", "100000"], "CPU cores"),
    (["--device", "cuda:abc"], "device must be auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:-1"], "device must be auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:1x"], "device must be auto, cpu, cuda or cuda:N"),
    (["--seed", str(SEED_LIMIT)], "seed must be an integer between 0 and 2**64 - 1"),
    (["--seed", "99999999999999999999999"], "seed must be an integer between 0 and 2**64 - 1"),
])
def test_values_torch_cannot_take(tmp_path, capsys, argv, match):
    _fails(capsys, ["train", *argv, *TINY_RUN, "--out", str(tmp_path / "run")], match)
    assert not (tmp_path / "run").exists()


def test_the_limits_themselves_are_accepted():
    TrainConfig(seed=SEED_LIMIT - 1, threads=max_threads(), device="cuda:0").validate()


def test_a_gpu_index_beyond_the_machine(monkeypatch):
    import torch

    from coscale.train.setup import _check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _check_device("cuda:0", 1)
    with pytest.raises(ConfigError, match="has 1 CUDA device"):
        _check_device("cuda:1", 1)


# ---- options that would be unused (B9) -------------------------------------------------------------------

@pytest.mark.parametrize("argv,match", [
    (["--two-hop"], "--two-hop: only expert parallelism over several processes"),
    (["--dispatch-codec", "fp8"], "--dispatch-codec fp8: only expert parallelism"),
    (["--combine-codec", "fp32"], "--combine-codec fp32: only expert parallelism"),
    (["--gpus-per-node", "4"], "--gpus-per-node 4: only expert parallelism"),
    (["--dist-timeout", "5"], "--dist-timeout 5: only expert parallelism"),
    (["--fp8-layers", "all"], "add --precision fp8 or drop --fp8-layers"),
    (["--fp8-layers", "all", "--precision", "fp32"], "precision is fp32"),
    (["--no-checkpoints", "--keep-checkpoints", "5"], "keep_checkpoints 5 means nothing with checkpoints off"),
    (["--no-checkpoints", "--save-interval", "1"], "save_interval 1 means nothing with checkpoints off"),
    (["--bin-dtype", "uint32"], "bin_dtype uint32 is the token dtype of .bin data files"),
])
def test_options_a_single_process_run_would_not_use(tmp_path, capsys, monkeypatch, argv, match):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _fails(capsys, ["train", *argv, *TINY_RUN, "--out", str(tmp_path / "run")], match)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [
    ["--dist-timeout", "120", "--dispatch-codec", "bf16", "--combine-codec", "bf16"],  # the defaults, given
    ["--precision", "fp8", "--fp8-layers", "all"],
    # what benchmarks/run_gpu.sh (studyrun) and bench_train.py pass to the BF16 reference of an FP8 run
    ["--precision", "bf16", "--fp8-layers", "all", "--save-interval", "0", "--no-checkpoints"],
    ["--data", "tokens.bin", "--bin-dtype", "uint32"],
])
def test_options_that_are_used_or_defaults_are_accepted(monkeypatch, argv):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    train_config_from_args(_args(*argv))


def test_layout_options_are_taken_under_torchrun_and_from_config_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = train_config_from_args(_args("--two-hop", "--dispatch-codec", "fp8", "--dist-timeout", "30"))
    assert cfg.two_hop and cfg.dispatch_codec == "fp8"
    # one config file for a one-process run and a torchrun one (tests/test_parallel_train.py's equivalence)
    monkeypatch.delenv("WORLD_SIZE")
    path = _config_file(tmp_path, json.dumps({"dispatch_codec": "fp32"}), "shared.json")
    assert train_config_from_args(_args("--config", path)).dispatch_codec == "fp32"


def test_a_bf16_run_notes_that_fp8_layers_is_unused():
    from coscale.train.report import _fp8_layers_note

    cfg = TrainConfig(precision="bf16", fp8_layers="all")
    assert "--fp8-layers all is unused at precision bf16" in _fp8_layers_note(cfg, types.SimpleNamespace(
        precision="bf16"))
    assert _fp8_layers_note(TrainConfig(precision="fp8", fp8_layers="all"), types.SimpleNamespace(
        precision="fp8")) is None
