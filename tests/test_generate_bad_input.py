"""`coscale generate` on wrong option values (the CLI audit): one line, exit 2, before torch is imported."""

import os
import subprocess
import sys

import pytest

import coscale
from coscale.train.config import SEED_LIMIT, max_threads

SRC = os.path.dirname(os.path.dirname(os.path.abspath(coscale.__file__)))

CHECK = ("import sys; from coscale.cli import main; rc = main(['generate', 'no-such-dir', *sys.argv[1:]]); "
         "print(rc, 'torch' in sys.modules)")


@pytest.mark.parametrize("argv,match", [
    (["--threads", str(max_threads() + 1)], "--threads"),
    (["--threads", "100000"], "CPU cores"),
    (["--temperature", "1", "--seed", str(SEED_LIMIT)], "--seed must be an integer between 0 and 2**64 - 1"),
    (["--temperature", "1", "--seed", "99999999999999999999999"], "--seed must be an integer between 0 and 2**64 - 1"),
    (["--temperature", "1", "--seed", "-1"], "--seed must be an integer between 0 and 2**64 - 1"),  # as train's
    (["--seed", "3"], "--seed seeds sampling, and decoding is greedy"),  # (temperature 0 by default)
    (["--prompt", "hello", "--prompt-ids", "1,2"], "--prompt and --prompt-ids both give the prompt"),
])
def test_bad_options_are_refused_at_once(argv, match):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", CHECK, *argv], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.split() == ["2", "False"], proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coscale generate: error: ") and match in lines[0], lines


def test_an_empty_prompt_ids_is_not_replaced_by_the_default_prompt(tmp_path, capsys):
    from coscale.checkpoint import save_pretrained
    from coscale.cli import main
    from coscale.config import get_preset
    from coscale.model import DeepseekForCausalLM

    save_pretrained(DeepseekForCausalLM(get_preset("tiny", num_hidden_layers=1)), tmp_path / "hf")
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "hf"), "--prompt-ids", "", "--device", "cpu"]) == 2
    assert "prompt token ids must be non-empty" in capsys.readouterr().err


def test_a_model_larger_than_the_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    """Out of memory while loading (patched in: a CPU run cannot run out) reaches the user as one line naming
    the checkpoint and what to do, for generate and serve alike (both load through load_for_inference)."""
    import torch

    from coscale.checkpoint import save_pretrained
    from coscale.cli import main
    from coscale.config import get_preset
    from coscale.infer import loading
    from coscale.model import DeepseekForCausalLM

    save_pretrained(DeepseekForCausalLM(get_preset("tiny", num_hidden_layers=1)), tmp_path / "hf")

    def too_big(*_args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                     "79.18 GiB of which 1.02 GiB is free.")

    monkeypatch.setattr(loading, "_load", too_big)
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "hf"), "--prompt-ids", "1,2", "--device", "cpu"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coscale generate: error: "), lines
    assert "the model does not fit cpu (CUDA out of memory. Tried to allocate 2.00 GiB)" in lines[0], lines
    assert "FP8 checkpoint" in lines[0]
