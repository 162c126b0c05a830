"""`coscale train` / `coscale info` through coscale.cli.main: bad input exits 2 with one line, changes nothing."""

import json
import os

import pytest

from coscale.cli import main

SMALL_OVERRIDES = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2,
    q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1,
)


def _config_file(tmp_path, name="train.json", **changes):
    cfg = dict(model="tiny", model_overrides=SMALL_OVERRIDES, steps=2, batch_size=2, seq_len=16,
               eval_interval=0, eval_batches=1, save_interval=1, threads=1, tensorboard=False, progress=False)
    path = tmp_path / name
    path.write_text(json.dumps(cfg | changes))
    return str(path)


def _snapshot(root):
    """Every file under root with its bytes and mtime: 'nothing overwritten' means this is unchanged."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[p] = (open(p, "rb").read(), os.stat(p).st_mtime_ns)
    return out


def _fails(capsys, argv, match):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("coscale train: error: ") and match in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", _config_file(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "unigram entropy" in printed and "checkpoint:" in printed
    return out


def test_missing_data_file(tmp_path, capsys):
    out = tmp_path / "run"
    _fails(capsys, ["train", "--data", str(tmp_path / "missing.txt"), "--out", str(out)], "data file not found")
    assert not out.exists()


def test_unknown_preset(tmp_path, capsys):
    _fails(capsys, ["train", "--model", "tiny-x", "--out", str(tmp_path / "run")], "neither a model preset")
    assert not (tmp_path / "run").exists()


def test_invalid_fields_in_config_files(tmp_path, capsys):
    _fails(capsys, ["train", "--config", _config_file(tmp_path, batch_sise=3)],
           "unknown training config field 'batch_sise'")
    _fails(capsys, ["train", "--config", _config_file(tmp_path, steps=-1)], "steps must be a positive integer")
    model_json = tmp_path / "model.json"
    model_json.write_text(json.dumps({"model_type": "deepseek_v3", "hidden_size": -5}))
    _fails(capsys, ["train", "--model", str(model_json), "--out", str(tmp_path / "run")],
           "hidden_size must be a positive integer")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{steps: 3")
    _fails(capsys, ["train", "--config", str(bad_json)], "is not valid JSON")
    _fails(capsys, ["train", "--config", str(tmp_path / "none.json")], "config file not found")
    assert not (tmp_path / "run").exists()


def test_data_edge_cases_via_cli(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    _fails(capsys, ["train", "--config", _config_file(tmp_path), "--data", str(short), "--out",
                    str(tmp_path / "run")], "too short for seq_len 16")
    tokens = tmp_path / "t.bin"
    tokens.write_bytes(b"\x00\x01" * 100)  # uint16 id 256: out of range for the byte vocabulary
    _fails(capsys, ["train", "--config", _config_file(tmp_path), "--data", str(tokens), "--out",
                    str(tmp_path / "run")], "out of range for vocab_size 256")
    assert not (tmp_path / "run").exists()


def test_existing_run_dir_not_overwritten(tmp_path, capsys, finished_run):
    before = _snapshot(finished_run)
    _fails(capsys, ["train", "--config", _config_file(tmp_path), "--out", str(finished_run)], "not empty")
    assert _snapshot(finished_run) == before


def test_corrupt_checkpoint(tmp_path, capsys, finished_run):
    latest = os.path.join(finished_run, "checkpoints", "step_00000002", "model.pt")
    with open(latest, "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    before = _snapshot(finished_run)
    _fails(capsys, ["train", "--resume", str(finished_run), "--steps", "4"], "corrupt checkpoint")
    assert _snapshot(finished_run) == before


def test_resume_with_incompatible_config(tmp_path, capsys, finished_run):
    before = _snapshot(finished_run)
    _fails(capsys, ["train", "--resume", str(finished_run), "--steps", "4", "--model", "tiny"],
           "cannot resume from")
    _fails(capsys, ["train", "--resume", str(finished_run), "--steps", "4", "--adam-moments-dtype", "bf16"],
           "adam_moments_dtype is 'fp32' in the checkpoint, 'bf16' now")
    _fails(capsys, ["train", "--resume", str(finished_run)], "already reaches steps=2")
    _fails(capsys, ["train", "--resume", str(tmp_path / "nowhere")], "checkpoint not found")
    assert _snapshot(finished_run) == before


def test_resume_continues_a_run(finished_run, capsys):
    assert main(["train", "--resume", str(finished_run), "--steps", "3"]) == 0
    assert "resuming from" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in open(finished_run / "metrics.jsonl")
             if json.loads(line)["type"] == "train"]
    assert steps == [1, 2, 3]
    assert (finished_run / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def test_info(capsys):
    assert main(["info"]) == 0
    table = capsys.readouterr().out
    assert "deepseek-v3" in table and "671B" in table and "tiny" in table
    assert main(["info", "--model", "deepseek-v3"]) == 0
    text = capsys.readouterr().out
    assert "activated per token 36.6B" in text and "256 routed" in text
    assert main(["info", "--model", "nope"]) == 2
    assert "neither a model preset" in capsys.readouterr().err


def test_resume_header_names_the_preset(finished_run, capsys):
    assert main(["train", "--resume", str(finished_run), "--steps", "3"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("model: tiny (") and "custom config" not in header


def test_invalid_numbers_are_reported_before_torch_is_imported(tmp_path, finished_run):
    """`coscale train --steps -1` answers at once: torch (seconds to import) is never loaded."""
    import subprocess
    import sys

    code = ("import sys; from coscale.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, 'torch' in sys.modules)")
    for argv in (["train", "--steps", "-1"], ["train", "--resume", str(finished_run), "--lr", "-2"],
                 ["train", "--config", _config_file(tmp_path, batch_size=0)]):
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60,
                              env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
        assert proc.stdout.split() == ["2", "False"], (argv, proc.stdout, proc.stderr)
        assert "must be a positive" in proc.stderr


def test_train_help_documents_every_option_once():
    import argparse

    from coscale.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train_parser = subparsers.choices["train"]
    flags = [a for a in train_parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 30
    for action in flags:
        assert action.help and action.help.strip(), action.option_strings
        assert action.help.count("(default:") <= 1 and action.help.count("default:") <= 1, action.help
    text = train_parser.format_help()
    assert "--init-from DIR" in text and "(default: 200)" in text  # defaults come from TrainConfig


def test_init_from_errors_are_one_line(tmp_path, capsys, finished_run):
    _fails(capsys, ["train", "--init-from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "new")],
           "no such checkpoint directory")
    _fails(capsys, ["train", "--resume", str(finished_run), "--init-from", str(tmp_path)],
           "pass one of them")
    from coscale.checkpoint import save_pretrained
    from coscale.config import get_preset
    from coscale.model import DeepseekForCausalLM

    hf_dir = tmp_path / "hf"
    save_pretrained(DeepseekForCausalLM(get_preset("tiny", **SMALL_OVERRIDES)), hf_dir)
    # the run's model (the config file's) is not the checkpoint's: refused before anything is written
    _fails(capsys, ["train", "--config", _config_file(tmp_path, model_overrides=SMALL_OVERRIDES | {
        "hidden_size": 32}), "--init-from", str(hf_dir), "--out", str(tmp_path / "new")], str(hf_dir))
    assert not (tmp_path / "new").exists()
    assert main(["train", "--config", _config_file(tmp_path), "--init-from", str(hf_dir), "--out",
                 str(tmp_path / "ok")]) == 0
    assert f"init: weights from {hf_dir}" in capsys.readouterr().out


def test_default_learning_rate_scales_with_the_width(tmp_path, capsys):
    """Without --lr a run gets 3e-3 x 256 / hidden size (at most 3e-3); it is saved with the run, an
    explicit --lr wins, and a --min-lr above the default is refused in one line, before anything is written."""
    from coscale.train.config import TrainConfig, default_learning_rate, with_resolved_lr

    assert default_learning_rate(256) == 3e-3 and default_learning_rate(64) == 3e-3
    assert default_learning_rate(1024) == pytest.approx(7.5e-4)
    assert default_learning_rate(7168) == pytest.approx(3e-3 * 256 / 7168)
    assert with_resolved_lr(TrainConfig(model="tiny", model_overrides={"hidden_size": 512})).lr == pytest.approx(1.5e-3)
    assert with_resolved_lr(TrainConfig(model="tiny", lr=1e-2)).lr == 1e-2

    wide = dict(SMALL_OVERRIDES, hidden_size=512)
    out = tmp_path / "run"
    assert main(["train", "--config", _config_file(tmp_path, model_overrides=wide), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lr 0.0015 (the default for hidden size 512" in printed
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["lr"] == pytest.approx(1.5e-3)

    bad = tmp_path / "bad"
    _fails(capsys, ["train", "--config", _config_file(tmp_path, model_overrides=wide), "--min-lr", "0.002",
                    "--out", str(bad)], "min_lr must be between 0 and lr")
    assert not bad.exists()
