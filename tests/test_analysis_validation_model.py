"""The model pieces added for validation: optimizer traffic, touched experts, the sustained clock, and the
H200 measurements file (every record predicted from the calibration file it names)."""

from __future__ import annotations

import dataclasses
import json
import os
import random

import pytest

from coscale.analysis import costs, layers, serving, training_time, validation
from coscale.analysis.models import as_view
from coscale.errors import ConfigError
from coscale.hardware import get_hardware

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEASUREMENTS = os.path.join(ROOT, "benchmarks", "results", "h200_measurements.json")


def test_optimizer_bytes_follow_the_recipe():
    # DeepSeek: read FP32 master + FP32 grad + 2 BF16 moments, write master + moments + BF16 weight
    assert training_time.optimizer_bytes_per_param("deepseek") == (4 + 4 + 2 * 2) + (4 + 2 * 2 + 2)
    # FP32 moments, no weight copy (BENCHMARKS: 19 GB for small's ~0.7B parameters)
    assert training_time.optimizer_bytes_per_param("fp32") == (4 + 4 + 2 * 4) + (4 + 2 * 4)
    with pytest.raises(ConfigError, match="optimizer"):
        training_time.training_time("small", "h200", optimizer="sgd")


def test_fp32_recipe_costs_its_traffic_and_autocast_casts():
    kw = dict(seq_len=512, global_batch=16, micro_batch=16, schedule="1f1b", precision="bf16")
    ds = training_time.training_time("small", "h200", **kw, optimizer="deepseek")
    fp = training_time.training_time("small", "h200", **kw, optimizer="fp32")
    assert fp.parts_s["optimizer"] == pytest.approx(ds.parts_s["optimizer"] * 28 / 22)
    assert "weight casts (autocast)" in fp.parts_s and "weight casts (autocast)" not in ds.parts_s


@pytest.mark.parametrize("seed", range(3))
def test_experts_touched_matches_sampling(seed):
    v = as_view("deepseek-v2-lite")
    rng = random.Random(seed)
    tokens = rng.choice([1, 3, 16])
    par = layers.Parallel(ep=1, tp=1, redundant_experts=0)
    trials, hit = 4000, 0
    for _ in range(trials):
        picked = set()
        for _ in range(tokens):
            picked.update(rng.sample(range(v.n_routed_experts), v.experts_per_token))
        hit += len(picked)
    expected = layers.experts_touched(v, par, tokens)
    assert hit / trials == pytest.approx(expected, rel=0.03)
    if tokens == 1:
        assert expected == pytest.approx(v.experts_per_token)


def test_experts_touched_saturates_under_large_ep_batches():
    v = as_view("deepseek-v3")
    par = layers.Parallel(ep=128, tp=1, redundant_experts=0)
    assert layers.experts_touched(v, par, 64) == pytest.approx(par.local_experts(v))


def test_sustained_clock_scales_compute_bound_time_only():
    eff = get_hardware("h800").achieved
    full = dataclasses.replace(eff, sustained_clock_ratio=1.0)
    big = (8192, 7168, 16384)
    slow, fast = costs.gemm(eff, "g", *big).seconds, costs.gemm(full, "g", *big).seconds
    assert slow == pytest.approx(fast / eff.sustained_clock_ratio)
    small = (1, 7168, 16384)  # weight-streaming: memory-bound, unchanged
    assert costs.gemm(eff, "g", *small).seconds == pytest.approx(costs.gemm(full, "g", *small).seconds)
    a, b = (costs.attention_prefill(e, "a", 2, 4096, 128, 192, 128).seconds for e in (eff, full))
    assert a == pytest.approx(b / eff.sustained_clock_ratio)
    for bad in (0.0, 1.2, -1):
        with pytest.raises(ConfigError, match="sustained_clock_ratio"):
            dataclasses.replace(eff, sustained_clock_ratio=bad)


def test_deepseek_profile_within_goal():
    for phase in ("decode", "prefill"):
        p = dict(serving.DEEPSEEK_PROFILE[phase])
        published = p.pop("published_tokens_per_s")
        p.pop("model"), p.pop("hardware")
        layout = serving.ServingLayout(ep=p.pop("ep"))
        r = getattr(serving, phase)("deepseek-v3", "h800", layout, **p)
        assert abs(r.tokens_per_s_per_gpu / published - 1) < 0.15, phase
        assert any("sustained clock" in a for a in r.assumptions)


def test_measurements_file_has_sources_and_predicts_each_record():
    with open(MEASUREMENTS, encoding="utf-8") as f:
        data = json.load(f)
    records = validation.load_measurements(MEASUREMENTS)
    assert records == data["measurements"] and len(records) >= 8
    cwd = os.getcwd()
    os.chdir(ROOT)  # hardware paths in the file are relative to the repository root
    try:
        table = validation.validation_table(records)
    finally:
        os.chdir(cwd)
    for r, row in zip(records, table.rows):
        assert "BENCHMARKS.md" in r["source"] and "commit" in r["source"]
        assert row[4] == pytest.approx(r["seconds"] * 1e3) and row[5] > 0
