"""benchmarks/balance_study.py: its methods do what they say, and a tiny study runs end to end into one
results line."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
study = pytest.importorskip("balance_study")


def test_method_names():
    assert study.parse_method("none") == study.Method("none")
    assert study.parse_method("aux-free").gamma is None  # coscale's run-scaled default
    assert study.parse_method("aux-free-g0.003") == study.Method("aux-free-g0.003", gamma=0.003)
    assert study.parse_method("seq-aux-a0.01") == study.Method("seq-aux-a0.01", alpha=0.01, loss="sequence")
    assert study.parse_method("batch-aux-a1e-3") == study.Method("batch-aux-a1e-3", alpha=0.001, loss="batch")
    with pytest.raises(SystemExit, match="unknown method"):
        study.parse_method("seq-aux-abc")


def test_batch_balance_loss_is_the_balance_loss_of_the_whole_batch_as_one_sequence():
    from coscale.config import get_preset
    from coscale.model import DeepseekForCausalLM

    cfg = get_preset("tiny", num_hidden_layers=2, hidden_size=64, n_routed_experts=8, num_experts_per_tok=2,
                     n_group=2, topk_group=1, moe_intermediate_size=32, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = DeepseekForCausalLM(cfg).train()
    outputs = []
    (gate,) = [g for _, g in study.moe_gates(model)]
    gate.register_forward_hook(lambda g, i, out: outputs.append(out))
    batch_loss = study.BatchBalanceLoss(model, alpha=0.5, top_k=2)
    ids = torch.randint(0, 256, (3, 10))
    model.compute_loss(ids, ids)
    got = batch_loss.take()
    # alpha * sum_i f_i P_i over all 30 tokens: f_i = E / (K T) * tokens choosing i, P_i = mean normalised score
    (topk_idx, _, scores), = outputs
    scores = scores.detach().double()
    T, E, K = scores.shape[0], 8, 2
    f = torch.bincount(topk_idx.flatten(), minlength=E).double() * E / (K * T)
    P = (scores / scores.sum(-1, keepdim=True)).mean(0)
    torch.testing.assert_close(got.double(), 0.5 * (f * P).sum(), rtol=1e-6, atol=0)
    assert got.requires_grad and batch_loss.terms == []


def test_a_tiny_study_runs_and_saves_one_line(tmp_path):
    result = study.main(["--quick", "--steps", "3", "--methods", "none", "aux-free", "batch-aux-a0.01",
                         "--out", str(tmp_path)])
    (line,) = [json.loads(x) for x in (tmp_path / "balance_study.jsonl").read_text().splitlines()]
    assert line["script"] == "balance_study" and line["commit"] and line["table"] == result["table"]
    assert [r["method"] for r in line["records"]] == ["none", "aux-free", "batch-aux-a0.01"]
    for record in line["records"]:
        assert len(record["maxvio_batch_steps"]) == 3 and record["val_layers"] == ["layer1", "layer2", "layer3"]
        assert record["train_layers"] == ["layer1", "layer2", "layer3", "mtp1"]
    assert line["records"][0]["gamma"] == 0 and line["records"][1]["gamma"] == 0.02  # quick: 0.2 / 10 steps
    assert "| aux-free | 0.02 | 0 |" in result["table"] and "vs the best-loss" in result["verdict"]


def test_runs_in_worker_processes_equal_runs_in_this_one(tmp_path):
    args = ["--quick", "--steps", "2", "--methods", "aux-free", "seq-aux-a0.01"]
    here = study.main(args + ["--out", str(tmp_path / "one")])
    spread = study.main(args + ["--jobs", "2", "--out", str(tmp_path / "two")])
    for a, b in zip(here["records"], spread["records"], strict=True):
        for key in ("method", "train_loss", "maxvio_batch_steps", "val_loss", "val_maxvio_global"):
            assert a[key] == b[key], key  # same seeds, same batches, one torch thread each: bit for bit
