"""`coscale calibrate`: the file it writes, the CPU refusal, the pluggable attention backend."""

import json
import sys
import types

import pytest

from coscale.calibrate import CalibrationError, attention_backend, calibrate
from coscale.cli import main
from coscale.hardware import EFFICIENCY_FIELDS, H800_EFFICIENCY, load_hardware


def test_refuses_without_a_gpu(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["calibrate", "--output", "unused.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GPU" in err and "--cpu-smoke" in err


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_cpu_smoke_writes_a_hardware_file(tmp_path, capsys, suffix):
    path = tmp_path / f"cal{suffix}"
    assert main(["calibrate", "--cpu-smoke", "--output", str(path)]) == 0
    assert str(path) in capsys.readouterr().out
    if suffix == ".json":
        assert json.loads(path.read_text())["efficiency"]["memory_tbps"]["value"] > 0
    hw = load_hardware(str(path))
    eff = hw.achieved
    measured = {k for k in EFFICIENCY_FIELDS if "cpu smoke test" in eff.source(k)}
    assert {"gemm_fp8_tflops", "gemm_grouped_fp8_tflops", "gemm_wgrad_fp8_tflops", "attention_decode_tflops",
            "attention_prefill_tflops", "memory_tbps", "host_launch_us"} <= measured
    for k in set(EFFICIENCY_FIELDS) - measured:  # the rest is carried over from the H800 and says so
        assert "H800" in eff.source(k)
    assert eff.a2a_low_latency_gbps == pytest.approx(H800_EFFICIENCY["a2a_low_latency_gbps"][0])
    # analyze reads it
    assert main(["analyze", "serve", "--hardware", str(path), "--phase", "decode", "--ep", "128", "--json"]) == 0


def test_attention_backend_is_pluggable(monkeypatch):
    module = types.ModuleType("fake_mla_backend")
    module.case = lambda batch, queries, heads, context, latent, rope, device: (lambda: None)
    monkeypatch.setitem(sys.modules, "fake_mla_backend", module)
    assert attention_backend("fake_mla_backend:case") is module.case
    assert attention_backend("torch").__name__ == "_mla_decode_torch"
    for bad in ("nonsense", "fake_mla_backend:missing", "no.such.module:f"):
        with pytest.raises(CalibrationError):
            attention_backend(bad)


def test_plugged_backend_is_used(monkeypatch):
    calls = []

    def case(batch, queries, heads, context, latent, rope, device):
        calls.append((batch, queries, heads, context, latent, rope, device))
        return lambda: None

    module = types.ModuleType("fake_mla_backend2")
    module.case = case
    monkeypatch.setitem(sys.modules, "fake_mla_backend2", module)
    spec = calibrate(attention="fake_mla_backend2:case", cpu_smoke=True, progress=lambda line: None)
    assert calls and all(c[4:6] == (512, 64) and c[6] == "cpu" for c in calls)
    assert "fake_mla_backend2:case" in spec.achieved.source("attention_decode_tflops")
