"""Deployment search: the largest decode batch under memory and a TPOT target, the best layout."""

import time

import pytest

from coscale.analysis import search, serving
from coscale.analysis.serving import ServingLayout
from coscale.errors import ConfigError
from coscale.hardware import get_hardware


def test_memory_limit_by_hand():
    layout = ServingLayout(ep=128)
    limit = search.memory_batch_limit("deepseek-v3", "h800", layout, context=4096, reserve=0.1)
    v_mem = serving.memory_per_gpu
    from coscale.analysis.models import as_view

    one = v_mem(as_view("deepseek-v3"), layout, 1, 4097)
    free = 80e9 * 0.9 - one["weights"]
    assert limit == int(free // one["kv_cache"])
    assert search.max_decode_batch("deepseek-v3", "h800", layout, 4096).limited_by == "memory"


def test_tpot_target_is_met_by_the_batch_and_missed_by_one_more():
    layout = ServingLayout(ep=128)
    found = search.max_decode_batch("deepseek-v3", "h800", layout, 4096, tpot_target_s=0.05)
    assert found.limited_by == "TPOT target" and found.result.latency_s <= 0.05
    over = serving.decode("deepseek-v3", "h800", layout, batch=found.batch + 1, context=4096)
    assert over.latency_s > 0.05


def test_nothing_fits():
    found = search.max_decode_batch("deepseek-v3", "h800", ServingLayout(ep=1), 4096)
    assert found.batch == 0 and found.limited_by == "nothing fits"
    # memory holds a batch: the TPOT target is what fails, and the result says so
    found = search.max_decode_batch("deepseek-v3", "h800", ServingLayout(ep=128), 4096, tpot_target_s=1e-6)
    assert found.batch == 0 and found.limited_by == "TPOT target: missed even at batch 2"


def test_best_layouts_ranked_and_fast():
    start = time.perf_counter()
    found = search.best_layouts("deepseek-v3", "h800", 128, 4096, tpot_target_s=0.06)
    assert time.perf_counter() - start < 1.0
    rates = [f.result.tokens_per_s_per_gpu if f.result else 0.0 for f in found]
    assert rates == sorted(rates, reverse=True) and rates[0] > 0
    assert all(128 % f.layout.ep == 0 and f.layout.ep % f.layout.tp == 0 for f in found)
    best = found[0]
    assert best.layout.ep >= 16  # DeepSeek-V3 needs many GPUs to hold its experts in 80 GB


def test_gb200_layouts_include_the_rack():
    found = search.best_layouts("deepseek-v3", get_hardware("gb200-nvl72"), 72, 4096, redundant_experts=32)
    assert any(f.layout.ep == 72 and f.batch > 0 for f in found)


@pytest.mark.parametrize("kwargs", [dict(gpus=0), dict(gpus=8, reserve=1.0)])
def test_bad_input(kwargs):
    with pytest.raises(ConfigError):
        search.best_layouts("deepseek-v3", "h800", context=4096, **kwargs)
