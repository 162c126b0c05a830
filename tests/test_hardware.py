"""Hardware presets and user YAML/JSON files."""

import json

import pytest

from coscale.errors import ConfigError
from coscale.hardware import HardwareSpec, get_hardware, hardware_names, load_hardware

FIELDS = dict(hbm_gb=96, hbm_bandwidth_tbps=4.0, bf16_tflops=1000, fp8_tflops=2000,
              scale_up_bandwidth_gbps=450, scale_up_domain=8, nics_per_gpu=1, nic_gbps=400)


def test_presets_required_by_the_issue_exist():
    assert {"h800", "h100", "h200", "b200", "gb200-nvl72"} <= set(hardware_names())
    for name in hardware_names():
        hw = get_hardware(name)
        assert hw.name == name and hw.source


def test_datasheet_values():
    h800, h100, h200 = get_hardware("h800"), get_hardware("h100"), get_hardware("h200")
    assert (h800.hbm_gb, h800.hbm_bandwidth_tbps, h800.bf16_tflops, h800.fp8_tflops) == (80, 3.35, 989, 1979)
    # NVLink: H800 400 GB/s and H100 900 GB/s summed over both directions (the paper's figures).
    assert 2 * h800.scale_up_bandwidth_gbps == 400 and 2 * h100.scale_up_bandwidth_gbps == 900
    assert (h200.hbm_gb, h200.hbm_bandwidth_tbps) == (141, 4.8)
    b200, nvl72 = get_hardware("b200"), get_hardware("gb200-nvl72")
    assert (b200.bf16_tflops, b200.fp8_tflops, b200.hbm_bandwidth_tbps) == (2250, 4500, 8.0)
    assert nvl72.scale_up_bandwidth_gbps == 900 and nvl72.scale_up_domain == 72


def test_scale_out_bandwidth_is_the_papers_50_gbps():
    assert get_hardware("h800").scale_out_bandwidth_gbps == 50.0


def test_peak_flops_by_dtype():
    hw = get_hardware("h800")
    assert hw.peak_flops("bf16") == 989e12 and hw.peak_flops("fp8") == 1979e12
    with pytest.raises(ConfigError):
        hw.peak_flops("int4")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_user_file_round_trip(tmp_path, suffix):
    path = tmp_path / f"mygpu{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(FIELDS))
    else:
        path.write_text("\n".join(f"{k}: {v}" for k, v in FIELDS.items()))
    hw = load_hardware(str(path))
    assert hw.name == "mygpu" and hw.hbm_gb == 96 and hw.scale_out_bandwidth_gbps == 50


def test_spec_passes_through():
    hw = get_hardware("h100")
    assert load_hardware(hw) is hw


@pytest.mark.parametrize("text, message", [
    ("hbm_gb: [1, 2\n", "not valid YAML"),
    ("- just\n- a list\n", "must be a mapping"),
    ("\n".join(f"{k}: {v}" for k, v in {**FIELDS, "hbm_gb": -1}.items()), "hbm_gb must be a positive"),
    ("\n".join(f"{k}: {v}" for k, v in {**FIELDS, "colour": "green"}.items()), "unknown key"),
    ("hbm_gb: 80\n", "missing key"),
])
def test_bad_user_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_hardware(str(path))
    assert "\n" not in str(info.value)


def test_bad_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_hardware(str(path))


def test_unknown_preset():
    with pytest.raises(ConfigError, match="neither a hardware preset"):
        load_hardware("tpu-v9")


def test_zero_bandwidth_rejected():
    with pytest.raises(ConfigError, match="scale_up_bandwidth_gbps"):
        HardwareSpec(name="x", **{**FIELDS, "scale_up_bandwidth_gbps": 0})


def test_every_preset_has_achieved_rates_with_sources():
    from coscale.hardware import EFFICIENCY_FIELDS

    for name in hardware_names():
        eff = get_hardware(name).achieved
        for field in EFFICIENCY_FIELDS:
            assert getattr(eff, field) >= 0 and eff.source(field), (name, field)


def test_rates_carried_over_by_peak_ratios():
    h800, h200, b200 = (get_hardware(n).achieved for n in ("h800", "h200", "b200"))
    assert h200.memory_tbps == pytest.approx(h800.memory_tbps * 4.8 / 3.35)
    assert h200.gemm_fp8_tflops == h800.gemm_fp8_tflops  # same tensor cores
    assert b200.gemm_fp8_tflops == pytest.approx(h800.gemm_fp8_tflops * 4500 / 1979)
    assert b200.a2a_scale_up_gbps == pytest.approx(h800.a2a_scale_up_gbps * 900 / 200)
    assert b200.sms == 148 and "not measured on b200" in b200.source("gemm_fp8_tflops")
    assert h800.gemm_k_overhead == get_hardware("b200").achieved.gemm_k_overhead


def test_user_file_with_efficiencies(tmp_path):
    from coscale.analysis.output import write_hardware
    from coscale.hardware import hardware_to_dict

    path = tmp_path / "gpu.yaml"
    path.write_text("\n".join(f"{k}: {v}" for k, v in FIELDS.items()) + "\nefficiency:\n"
                    "  memory_tbps: 3.5\n  gemm_fp8_tflops: {value: 1200, source: my bench}\n")
    hw = load_hardware(str(path))
    assert hw.achieved.memory_tbps == 3.5 and hw.achieved.source("memory_tbps") == "given in the hardware file"
    assert hw.achieved.gemm_fp8_tflops == 1200 and hw.achieved.source("gemm_fp8_tflops") == "my bench"
    assert "H800" in hw.achieved.source("attention_decode_tflops")  # the rest carried over
    for suffix in (".yaml", ".json"):  # written and read back unchanged
        again = load_hardware(write_hardware(hw, tmp_path / f"copy{suffix}"))
        assert hardware_to_dict(again) == {**hardware_to_dict(hw), "name": again.name}
        assert again.achieved == hw.achieved


@pytest.mark.parametrize("extra, message", [
    ("efficiency: 3\n", "efficiency must be a mapping"),
    ("efficiency:\n  warp_speed: 9\n", "unknown efficiency key"),
    ("efficiency:\n  memory_tbps: -1\n", "memory_tbps must be a positive"),
    ("efficiency:\n  memory_tbps: {source: x}\n", "must be a number"),
    ("efficiency:\n  comm_sms: 500\n", "comm_sms"),
    ("gpus_per_node: 0\n", "gpus_per_node"),
])
def test_bad_efficiency_entries(tmp_path, extra, message):
    path = tmp_path / "bad.yaml"
    path.write_text("\n".join(f"{k}: {v}" for k, v in FIELDS.items()) + "\n" + extra)
    with pytest.raises(ConfigError, match=message):
        load_hardware(str(path))


def test_gemm_floor_falls_back_to_the_kernel_floor_and_bounds_small_gemms(tmp_path):
    from coscale.analysis import costs

    path = tmp_path / "gpu.yaml"
    head = "\n".join(f"{k}: {v}" for k, v in FIELDS.items()) + "\nefficiency:\n"
    path.write_text(head + "  kernel_floor_us: {value: 1.5, source: my graph}\n")
    eff = load_hardware(str(path)).achieved
    # a file from before the GEMM floor takes its kernel floor for it
    assert eff.gemm_floor_us == 1.5 and "as kernel_floor_us (my graph)" in eff.source("gemm_floor_us")
    path.write_text(head + "  kernel_floor_us: 1.5\n  gemm_floor_us: 5\n")
    eff = load_hardware(str(path)).achieved
    # the calibration GEMM (2.4 MB) takes the floor; a larger weight pays its extra bytes on top of it
    small = costs.gemm(eff, "kv_a", 16, 576, 2048, dtype="bf16")
    assert small.seconds == pytest.approx(5e-6)
    stream = eff.gemm_bf16_memory_tbps * 1e12
    big = costs.gemm(eff, "head", 16, 102400, 2048, dtype="bf16")  # 420 MB: streaming-bound
    assert big.bound == "memory"
    assert big.seconds == pytest.approx(5e-6 + (big.bytes - costs.GEMM_FLOOR_BYTES) / stream)
    assert costs.elementwise(eff, "norm", 1024).seconds == pytest.approx(1.5e-6)  # other kernels keep theirs
