"""`coscale serve`, `bench-serve` and `tokenize` refuse bad input with one line and status 2, before any work
(loading a checkpoint, running a load), never with a traceback or by ignoring what was given."""

from __future__ import annotations

import pytest

from coscale.cli import main


@pytest.fixture
def checkpoint_dir(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    return d  # never loaded: every case below is refused before that


def _refused(capsys, argv, expected):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "error:" in err and expected in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("extra, expected", [
    (["--port", "70000"], "--port must be in 1..65535"),
    (["--port", "0"], "--port must be in 1..65535"),
    (["--shutdown-grace", "nan"], "--shutdown-grace must be a finite"),
    (["--served-model-name", ""], "--served-model-name must not be empty"),
    (["--speculative", "--overlap", "on"], "--overlap on does not work with --speculative"),
    (["--host", "999.999.1.1"], "--host '999.999.1.1'"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["--device", "cuda:abc"], "--device must be cpu, cuda or cuda:N"),
    (["--device", "cpu", "--gpu-memory-fraction", "0.5"], "--gpu-memory-fraction sizes the KV cache on CUDA"),
])
def test_serve_refuses_before_loading(capsys, checkpoint_dir, extra, expected):
    _refused(capsys, ["serve", str(checkpoint_dir), *extra], expected)


def test_serve_names_a_file_given_as_checkpoint(capsys, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    _refused(capsys, ["serve", str(f)], "is a file; serve takes a checkpoint directory")


@pytest.mark.parametrize("extra, expected", [
    (["--timeout", "nan"], "--timeout must be a finite"),
    (["--max-duration", "nan"], "--max-duration must be a finite"),
    (["--max-duration", "inf"], "--max-duration must be a finite"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "-3"], "--temperature must be a finite number >= 0"),
    (["--prompt", ""], "--prompt must not be empty"),
    (["--prompt", "hello", "--prompt-tokens", "5"], "--prompt and --prompt-tokens exclude each other"),
    (["--seed", "3"], "--seed draws the random prompts of --prompt-tokens"),
    (["--url", "http://127.0.0.1:9/v1"], "without /v1"),
    (["--num-requests", "0"], "--num-requests must be >= 1"),
])
def test_bench_serve_refuses_before_the_load(capsys, extra, expected):
    # an unreachable URL: had any of these reached the load, the error would be about the connection
    _refused(capsys, ["bench-serve", "--url", "http://127.0.0.1:9", *extra], expected)


def test_bench_serve_checks_out_before_the_load(capsys, tmp_path):
    _refused(capsys, ["bench-serve", "--url", "http://127.0.0.1:9", "--out", str(tmp_path)], "is a directory")
    _refused(capsys, ["bench-serve", "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "no" / "x.json")],
             "does not exist")


def test_bench_serve_prints_no_progress_bar_before_an_argument_error(capsys):
    assert main(["bench-serve", "--url", "http://127.0.0.1:9", "--concurrency", "0"]) == 2
    err = capsys.readouterr().err  # (tqdm draws on stderr)
    assert "req/s" not in err and "%|" not in err and err.count("\n") == 1, err


def test_tokenize_refuses_a_file_as_out_and_a_misnamed_tokenizer(capsys, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("hello world")
    _refused(capsys, ["tokenize", str(text), "--out", str(text), "--no-progress"], "is not a directory")
    other = tmp_path / "vocab.json"
    other.write_text("{}")
    _refused(capsys, ["tokenize", str(text), "--out", str(tmp_path / "o"), "--tokenizer", str(other)],
             "is not a tokenizer.json")
