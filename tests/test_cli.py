"""The CLI front end (coscale.cli): ending quietly when the reader of its output goes away."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import coscale
from coscale.cli import BROKEN_PIPE_STATUS

SRC = str(Path(coscale.__file__).resolve().parents[1])  # this checkout's coscale, not an installed one


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


def _into_closed_pipe(args):
    """Run coscale with a stdout pipe whose reader has gone before the first write (what `| head -1`
    does to a long output)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "coscale", *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, env=_env(), timeout=120)
    finally:
        os.close(write_end)
    return proc


@pytest.mark.parametrize("args", [["info"], ["analyze", "network"], ["analyze", "kv-cache"]])
def test_output_into_a_closed_pipe_ends_quietly(args):
    proc = _into_closed_pipe(args)
    assert proc.stderr == ""
    assert proc.returncode == BROKEN_PIPE_STATUS == 141


def test_help_into_a_closed_pipe_ends_quietly():
    proc = _into_closed_pipe(["--help"])  # argparse ignores the failed write itself: status 0 or 141
    assert proc.stderr == ""
    assert proc.returncode in (0, BROKEN_PIPE_STATUS)


def test_a_pipe_into_head_prints_no_traceback():
    """The shell pipeline a user types; whether coscale writes after head exits is a race, so either
    status is right, but never a traceback."""
    proc = subprocess.run(f"set -o pipefail; '{sys.executable}' -m coscale info | head -1", shell=True,
                          executable="/bin/bash", capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.stderr == ""
    assert proc.returncode in (0, BROKEN_PIPE_STATUS)
    assert proc.stdout.count("\n") == 1


def test_a_user_error_is_still_one_line_and_status_2():
    proc = subprocess.run([sys.executable, "-m", "coscale", "analyze", "kv-cache", "--model", "no-such-preset"],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no-such-preset" in proc.stderr


def _subcommand_parser(name):
    from coscale.cli import build_parser

    subparsers = build_parser()._subparsers._group_actions[0]
    return subparsers.choices[name]


def test_generate_help_gives_every_option_a_help_and_each_default_once():
    generate = _subcommand_parser("generate")
    assert generate.description
    assert all(action.help for action in generate._actions)
    text = generate.format_help()
    assert "(default: None)" not in text
    assert text.count("(default: cuda when available)") == 1


def test_generate_checks_threads_before_importing_torch():
    code = ("import sys; from coscale.cli import main; "
            "rc = main(['generate', 'no-such-dir', '--threads', '0']); print(rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.stdout.split() == ["2", "False"]
    assert proc.stderr.strip() == "coscale generate: error: --threads must be a positive integer, got 0"


def test_generate_threads_sets_torch_threads(tmp_path, monkeypatch, capsys):
    import torch

    from coscale import save_pretrained
    from coscale.cli import main
    from coscale.config import get_preset
    from coscale.model import DeepseekForCausalLM

    save_pretrained(DeepseekForCausalLM(get_preset("tiny", num_hidden_layers=1)), tmp_path / "hf")
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert main(["generate", str(tmp_path / "hf"), "--max-new-tokens", "2", "--threads", "1"]) == 0
    assert calls == [1]
    assert "2 tokens in" in capsys.readouterr().out
