"""EP decoding speed limit: the paper's worked example, hand cases and monotonicity."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coscale.analysis.ep_limit import (
    PAPER_HIDDEN,
    PUBLISHED,
    ep_comm_time,
    inference_limit,
    paper_cases,
    tpot_sweep,
)
from coscale.errors import ConfigError
from coscale.hardware import HardwareSpec, get_hardware


def test_infiniband_case_exactly():
    r = inference_limit("deepseek-v3", "h800", hidden=PAPER_HIDDEN)
    assert r.bandwidth_gbps == 50 and r.experts_per_token == 9 and r.tokens_per_device == 32
    assert round(r.comm_time_s * 1e6, 2) == PUBLISHED["ib"]["comm_us"] == 120.96
    assert round(r.layer_time_s * 1e6, 2) == PUBLISHED["ib"]["layer_us"] == 241.92
    assert round(r.tpot_s * 1e3, 2) == PUBLISHED["ib"]["tpot_ms"] == 14.76
    assert int(r.tokens_per_s) == PUBLISHED["ib"]["tokens_per_s"] == 67  # 67.8; the paper rounds down


def test_nvl72_case_exactly():
    r = inference_limit("deepseek-v3", "gb200-nvl72", hidden=PAPER_HIDDEN)
    assert r.bandwidth_gbps == 900
    assert round(r.comm_time_s * 1e6, 2) == PUBLISHED["nvl72"]["comm_us"] == 6.72
    assert round(r.tpot_s * 1e3, 2) == PUBLISHED["nvl72"]["tpot_ms"] == 0.82
    assert round(r.tokens_per_s, -2) == PUBLISHED["nvl72"]["tokens_per_s"] == 1200


def test_real_hidden_size():
    r = inference_limit("deepseek-v3", "h800")
    assert r.hidden == 7168
    assert round(r.tpot_s * 1e3, 2) == PUBLISHED["ib_hidden_7168"]["tpot_ms"] == 15.11


def test_hand_case():
    # (1 + 2) bytes x 2 tokens x 3 experts x 100 numbers / 1 GB/s = 1.8 us
    assert ep_comm_time(2, 3, 100, 1.0) == pytest.approx(1.8e-6)
    assert ep_comm_time(2, 3, 100, 1.0, dispatch_bytes=2, combine_bytes=2) == pytest.approx(2.4e-6)


def test_other_bounds_are_reported_and_binding_named():
    ib, nvl72 = inference_limit("deepseek-v3", "h800"), inference_limit("deepseek-v3", "gb200-nvl72")
    assert ib.binding == "communication"
    assert nvl72.binding in ("compute", "memory")
    assert nvl72.achievable_tpot_s == max(nvl72.bounds.values()) > nvl72.tpot_s
    assert ib.to_dict()["binding"] == "communication"


def test_custom_bandwidth_and_hardware():
    hw = HardwareSpec(name="x", hbm_gb=80, hbm_bandwidth_tbps=3, bf16_tflops=1000, fp8_tflops=2000,
                      scale_up_bandwidth_gbps=100, scale_up_domain=8, nics_per_gpu=2, nic_gbps=400)
    assert inference_limit("deepseek-v3", hw).bandwidth_gbps == 100  # 2 x 400 Gbps
    assert inference_limit("deepseek-v3", hw, link="scale-up").bandwidth_gbps == 100
    assert inference_limit("deepseek-v3", "h800", bandwidth_gbps=25).tpot_s == pytest.approx(
        2 * inference_limit("deepseek-v3", "h800").tpot_s)


@given(st.floats(0.1, 1e4), st.floats(0.1, 1e4))
def test_more_bandwidth_is_never_slower(a, b):
    low, high = sorted((a, b))
    r_low, r_high = tpot_sweep([low, high], model="deepseek-v3", hardware="h800")
    assert r_high.tpot_s <= r_low.tpot_s
    assert r_high.achievable_tpot_s <= r_low.achievable_tpot_s


def test_paper_cases_list():
    labels = [label for label, _ in paper_cases()]
    assert len(labels) == 4 and "paper" in labels[0]


@pytest.mark.parametrize("kwargs", [dict(bandwidth_gbps=0), dict(bandwidth_gbps=-5), dict(tokens_per_device=0),
                                    dict(link="pcie"), dict(micro_batches=0)])
def test_bad_input(kwargs):
    with pytest.raises(ConfigError):
        inference_limit("deepseek-v3", "h800", **kwargs)


def test_dense_model_rejected():
    with pytest.raises(ConfigError, match="no routed experts"):
        inference_limit("llama3.1-70b", get_hardware("h100"))


def test_mtp_acceptance_gives_the_papers_1_8x():
    r = inference_limit("deepseek-v3", "h800", hidden=PAPER_HIDDEN, mtp_acceptance=0.8)
    assert r.tokens_per_s_with_mtp / r.tokens_per_s == pytest.approx(1.8)
    with pytest.raises(ConfigError):
        inference_limit("deepseek-v3", "h800", mtp_acceptance=1.5)
