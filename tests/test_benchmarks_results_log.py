"""benchmarks/results_log.py: one results file per benchmark script, one line per run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
results_log = pytest.importorskip("results_log")


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_is_one_line_rewritten_as_it_grows_and_the_next_run_appends(tmp_path):
    run = results_log.ResultsLog("bench_x", tmp_path)
    partial = run.save(results=[1])
    run.save(results=[1, 2], note="done")
    assert partial == tmp_path / "bench_x.jsonl"
    (only,) = _lines(partial)
    assert only["results"] == [1, 2] and only["note"] == "done" and only["script"] == "bench_x"
    results_log.ResultsLog("bench_x", tmp_path).save(results=[3, 4, 5])
    first, second = _lines(partial)
    assert first == only and second["results"] == [3, 4, 5]
    assert not list(tmp_path.glob(".*.tmp"))
    run.save(results=[6])  # a later save of the first run replaces its own line and keeps the other
    first, second = _lines(partial)
    assert first["results"] == [6] and second["results"] == [3, 4, 5] and first["run"] != second["run"]


def test_the_conditions_name_the_code_and_the_machine(tmp_path):
    line = _lines(results_log.ResultsLog("bench_x", tmp_path).save())[0]
    for key in ("date", "commit", "modified", "source_digest", "gpu", "driver", "cuda", "torch", "triton",
                "python", "argv"):
        assert key in line
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=BENCHMARKS)
    if head.returncode == 0:
        assert line["commit"] == head.stdout.strip()
    assert len(line["source_digest"]) == 16 and line["source_digest"] == results_log.source_digest()
    assert line["date"].endswith("+00:00")


def test_the_folder_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_RESULTS_DIR", str(tmp_path / "out"))
    assert results_log.ResultsLog("bench_y").save(x=1) == tmp_path / "out" / "bench_y.jsonl"


def test_teed_stdout_prints_and_keeps_a_copy(capsys):
    with results_log.teed_stdout() as report:
        print("## table")
    assert report.getvalue() == "## table\n"
    assert capsys.readouterr().out == "## table\n"
