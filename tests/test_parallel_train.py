"""`coscale train` with several processes (EP x DP on gloo, 2 ranks on 127.0.0.1) against one process.

The ranks run ``coscale.cli.main(["train", ...])`` exactly as torchrun would start them: spawned by
``coscale.parallel.launch.spawn``, which sets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); one test starts the real ``torchrun -m coscale train``.

Tolerance. With ``--dispatch-codec fp32`` (the combine follows: fp32) nothing is rounded on the wire;
what differs from one process is only the order of floating-point sums (each rank's mean loss over
half the batch, averaged; gradients summed by the all-reduce; the clip norm as a sum of squares rather
than a norm of norms), i.e. a few float32 ulps per step. Measured: <= 2e-7 relative on losses and
gradient norms over 6 steps and <= 2e-6 absolute on weights. The tests allow 1e-4 relative (and 1e-4
absolute on weights), the bound the EP x DP tests of tests/test_parallel_distributed.py use; a wrong
gradient scale or a missed all-reduce is off by 1e-2 or more.
"""

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from coscale.cli import main
from coscale.parallel.launch import free_port, spawn
from coscale.train import checkpointing as ckpt
from coscale.train.config import TrainConfig
from coscale.train.metrics import read_metrics

REL = 1e-4
SMALL_OVERRIDES = dict(  # `tiny` shrunk: 2 layers (1 dense, 1 MoE with 8 routed experts) + MTP
    num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2,
    q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2, topk_group=1,
)


def _config_file(path, **changes):
    cfg = dict(model="tiny", model_overrides=SMALL_OVERRIDES, steps=6, batch_size=4, seq_len=32, eval_interval=3,
               eval_batches=2, save_interval=3, keep_checkpoints=0, log_interval=1, threads=1, tensorboard=False,
               progress=False, dispatch_codec="fp32")
    path.write_text(json.dumps(cfg | changes))
    return str(path)


def _cli_rank(rank, argv_by_rank):
    """One rank: `coscale train` through the CLI; returns (exit status, stdout, stderr)."""
    from coscale.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv_by_rank[rank])
    return rc, out.getvalue(), err.getvalue()


def _launch(argv, world=2, timeout_s=80, per_rank=None):
    """Run `coscale train argv` on `world` spawned ranks; per_rank {rank: extra args} for one rank."""
    argv_by_rank = [["train", *argv, *((per_rank or {}).get(r, []))] for r in range(world)]
    outcomes = spawn(_cli_rank, world, args=(argv_by_rank,), timeout_s=timeout_s)
    return [o.result for o in outcomes]


def _single(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["train", *argv])
    return rc, out.getvalue(), err.getvalue()


def _train_records(run_dir):
    return {r["step"]: r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["type"] == "train"}


def _eval_losses(run_dir):
    return {r["step"]: r["val_loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
            if r["type"] == "eval"}


def _checkpoint(run_dir, step):
    return ckpt.load_checkpoint(os.path.join(run_dir, ckpt.CHECKPOINTS, ckpt.checkpoint_name(step)))


def _assert_close_curves(a, b, steps, what):
    for step in steps:
        for key in ("loss", "total_loss", "mtp_loss", "aux_loss", "grad_norm"):
            x, y = a[step][key], b[step][key]
            assert math.isclose(x, y, rel_tol=REL), f"{what}: step {step} {key}: {x} vs {y}"
        for key in ("moe_load_max_over_mean", "moe_load_max_over_min"):  # global loads: the same counts
            assert a[step].get(key) == b[step].get(key), f"{what}: step {step} {key}"


def _assert_close_states(a, b, what):
    assert a.keys() == b.keys(), what
    for name in a:
        assert a[name].shape == b[name].shape, f"{what}: {name}"
        assert torch.allclose(a[name].float(), b[name].float(), rtol=0, atol=1e-4), f"{what}: {name}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 6 steps in one process and on 2 ranks at EP=2 (checkpoints at steps 3 and 6)."""
    root = tmp_path_factory.mktemp("parallel_train")
    config = _config_file(root / "train.json")
    single, ep2 = str(root / "single"), str(root / "ep2")
    rc, _, err = _single(["--config", config, "--out", single])
    assert rc == 0, err
    results = _launch(["--config", config, "--out", ep2, "--ep-size", "2"])
    return {"root": root, "config": config, "single": single, "ep2": ep2, "results": results}


def test_ep2_loss_curve_matches_one_process(runs):
    results = runs["results"]
    assert [r[0] for r in results] == [0, 0], [r[2] for r in results]
    a, b = _train_records(runs["single"]), _train_records(runs["ep2"])
    assert sorted(b) == list(range(1, 7))
    _assert_close_curves(a, b, range(1, 7), "EP=2 vs one process")
    for step, val in _eval_losses(runs["single"]).items():
        assert math.isclose(val, _eval_losses(runs["ep2"])[step], rel_tol=REL)
    # Rank 0 alone prints and writes; the header names the layout.
    out0, out1 = results[0][1], results[1][1]
    assert "parallel: 2 ranks = EP 2 x DP 1 (gloo" in out0 and "dispatch fp32, combine fp32" in out0
    assert out1 == "" and results[1][2] == ""
    runs_logged = [r for r in read_metrics(os.path.join(runs["ep2"], "metrics.jsonl")) if r["type"] == "run"]
    assert len(runs_logged) == 1 and runs_logged[0]["parallel"]["ep_size"] == 2
    summary = json.loads((runs["root"] / "ep2" / "summary.json").read_text())
    assert summary["parallel"]["world_size"] == 2 and summary["parallel"]["dp_size"] == 1


def test_dp2_without_ep_matches_one_process(runs, tmp_path):
    """--ep-size 1 on 2 ranks: pure data parallelism, every expert replicated and averaged over the world."""
    out = str(tmp_path / "dp2")
    results = _launch(["--config", runs["config"], "--out", out, "--save-interval", "0"])
    assert [r[0] for r in results] == [0, 0], [r[2] for r in results]
    assert "EP 1 x DP 2" in results[0][1]
    _assert_close_curves(_train_records(out), _train_records(runs["single"]), range(1, 7), "DP=2 vs one process")


def test_ep2_checkpoint_has_the_single_process_format(runs):
    for step in (3, 6):
        one, two = _checkpoint(runs["single"], step), _checkpoint(runs["ep2"], step)
        _assert_close_states(one.model, two.model, f"model at step {step}")
        assert two.model["model.layers.1.mlp.experts.w_gate"].shape[0] == 8  # all experts, not a slice
        assert one.optimizer["state"].keys() == two.optimizer["state"].keys()
        for index, entry in one.optimizer["state"].items():
            _assert_close_states({k: v for k, v in entry.items() if torch.is_tensor(v)},
                                 {k: v for k, v in two.optimizer["state"][index].items() if torch.is_tensor(v)},
                                 f"optimizer state {index} at step {step}")
        assert two.meta["parallel"]["ep_size"] == 2


def test_ep2_checkpoint_resumes_in_one_process(runs, tmp_path):
    out = str(tmp_path / "resumed_ep1")
    checkpoint = os.path.join(runs["ep2"], ckpt.CHECKPOINTS, ckpt.checkpoint_name(3))
    rc, printed, err = _single(["--resume", checkpoint, "--out", out])  # EP size is not taken from it
    assert rc == 0, err
    assert "resuming from" in printed and "parallel:" not in printed
    resumed = _train_records(out)
    assert sorted(resumed) == [4, 5, 6]
    _assert_close_curves(resumed, _train_records(runs["ep2"]), [4, 5, 6], "EP=2 -> 1 process")
    _assert_close_curves(resumed, _train_records(runs["single"]), [4, 5, 6], "EP=2 -> 1 process vs straight")
    _assert_close_states(_checkpoint(out, 6).model, _checkpoint(runs["ep2"], 6).model, "final weights")


def test_one_process_checkpoint_resumes_at_ep2(runs, tmp_path):
    out = str(tmp_path / "resumed_ep2")
    checkpoint = os.path.join(runs["single"], ckpt.CHECKPOINTS, ckpt.checkpoint_name(3))
    results = _launch(["--resume", checkpoint, "--out", out, "--ep-size", "2"])
    assert [r[0] for r in results] == [0, 0], [r[2] for r in results]
    resumed = _train_records(out)
    assert sorted(resumed) == [4, 5, 6]
    _assert_close_curves(resumed, _train_records(runs["single"]), [4, 5, 6], "1 process -> EP=2")
    _assert_close_states(_checkpoint(out, 6).model, _checkpoint(runs["single"], 6).model, "final weights")


def _one_line_error(result, match):
    rc, _, err = result
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("coscale train: error: ") and match in lines[0], lines[0]


def test_ep_size_not_dividing_the_experts_exits_2_on_every_rank(tmp_path):
    out = tmp_path / "run"
    results = _launch(["--config", _config_file(tmp_path / "t.json"), "--out", str(out), "--ep-size", "3"],
                      timeout_s=60)
    for result in results:
        _one_line_error(result, "ep_size 3 does not divide the model's 8 routed experts")
    assert not out.exists()


def test_options_that_differ_across_ranks_exit_2_on_every_rank(tmp_path):
    out = tmp_path / "run"
    results = _launch(["--config", _config_file(tmp_path / "t.json"), "--out", str(out), "--ep-size", "2"],
                      per_rank={1: ["--lr", "1e-3"]}, timeout_s=60)
    for result in results:
        _one_line_error(result, "training config (options given to coscale train) differs across ranks")
    assert not out.exists()


def test_a_failure_on_one_rank_only_ends_every_rank(tmp_path):
    """Rank 1 alone is given a missing data file: both ranks stop with one line, nobody waits."""
    out = tmp_path / "run"
    results = _launch(["--config", _config_file(tmp_path / "t.json"), "--out", str(out), "--ep-size", "2"],
                      per_rank={1: ["--data", str(tmp_path / "missing.txt")]}, timeout_s=60)
    _one_line_error(results[1], "data file not found")
    _one_line_error(results[0], "rank 1 failed: ")
    assert not out.exists()


def test_ep_size_without_torchrun_is_a_one_line_error(tmp_path):
    rc, _, err = _single(["--config", _config_file(tmp_path / "t.json"), "--out", str(tmp_path / "run"),
                          "--ep-size", "2"])
    _one_line_error((rc, "", err), "needs 2 processes")
    assert not (tmp_path / "run").exists()


def test_layout_is_not_taken_from_a_checkpoint():
    cfg = TrainConfig.from_dict({"ep_size": 4, "gpus_per_node": 2, "two_hop": True, "dispatch_codec": "fp8"})
    assert cfg.resolved_combine_codec == "bf16"
    from coscale.train.config import LAYOUT_FIELDS

    assert set(LAYOUT_FIELDS) == {"ep_size", "gpus_per_node", "two_hop", "dist_timeout", "compile", "cuda_graphs"}
    with pytest.raises(Exception, match="dispatch_codec must be one of"):
        TrainConfig.from_dict({"dispatch_codec": "int4"})


def test_torchrun_launches_python_m_coscale(tmp_path):
    """The documented command: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "coscale", "train",
           "--config", _config_file(tmp_path / "t.json", steps=2, eval_interval=0, save_interval=0),
           "--out", str(out), "--ep-size", "2", "--gpus-per-node", "1", "--two-hop", "--dist-timeout", "30"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=80, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parallel"] == {"world_size": 2, "ep_size": 2, "dp_size": 1, "gpus_per_node": 1,
                                   "backend": "gloo", "dispatch_codec": "fp32", "combine_codec": "fp32",
                                   "two_hop": True}
    assert proc.stdout.count("parallel: 2 ranks") == 1  # rank 0 alone prints


# ---- review fixes in the single-process loop -------------------------------------------------------


def test_non_finite_loss_stops_with_one_line(tmp_path):
    out = tmp_path / "run"
    rc, _, err = _single(["--config", _config_file(tmp_path / "t.json"), "--out", str(out), "--lr", "1e30",
                          "--grad-clip", "0", "--warmup-steps", "0"])
    _one_line_error((rc, "", err), "loss is")
    assert "at step" in err and "stopping" in err
    logged = _train_records(str(out))
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in logged.values())


def test_seq_len_below_2_is_rejected(tmp_path):
    rc, _, err = _single(["--config", _config_file(tmp_path / "t.json"), "--out", str(tmp_path / "run"),
                          "--seq-len", "1"])
    _one_line_error((rc, "", err), "seq_len must be at least 2")


def test_fp8_study_uses_the_metrics_moving_average():
    from coscale.train import fp8_study, metrics

    assert fp8_study._moving_average is metrics._moving_average
    assert metrics._moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
