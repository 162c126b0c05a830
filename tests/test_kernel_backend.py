"""The one backend selector (kernels.backend) and the one tuning module (kernels.autotune)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module decorates its kernels

import types

import pytest
import torch

from coscale.errors import CoscaleError
from coscale.kernels import autotune, backend
from coscale.kernels import quant as q
from coscale.kernels.autotune import ConfigPicker, power_of_two_bucket
from coscale.kernels.backend import select_backend

CUDA_LIKE = types.SimpleNamespace(is_cuda=True)  # select_backend reads only .is_cuda


def test_auto_is_the_reference_on_cpu_and_triton_on_cuda(monkeypatch):
    cpu = torch.zeros(1)
    assert select_backend("auto", cpu) == "torch"
    assert select_backend("auto", cpu, allowed=("auto", "loop", "triton"), reference="loop") == "loop"
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    assert select_backend("auto", CUDA_LIKE) == "triton"
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    assert select_backend("auto", CUDA_LIKE) == "torch"


def test_a_vendor_library_is_asked_only_for_auto_on_cuda():
    asked = []

    def cublas():
        asked.append(1)
        return "cublas"

    allowed = ("auto", "cublas", "triton", "torch")
    assert select_backend("auto", torch.zeros(1), allowed=allowed, preferred=cublas) == "torch"
    assert select_backend("triton", torch.zeros(1), allowed=allowed, preferred=cublas) == "triton"
    assert asked == []
    assert select_backend("auto", CUDA_LIKE, allowed=allowed, preferred=cublas) == "cublas"
    assert select_backend("auto", CUDA_LIKE, allowed=allowed, preferred=lambda: None) in ("triton", "torch")


def test_explicit_requests_are_kept_or_refused_never_changed(monkeypatch):
    cpu = torch.zeros(1)
    assert select_backend("torch", cpu) == "torch"
    with pytest.raises(CoscaleError, match=r"swiglu: backend must be one of 'auto', 'triton', 'torch'; got 'cuda'"):
        select_backend("cuda", cpu, op="swiglu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(CoscaleError, match="TRITON_INTERPRET=1"):
        select_backend("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if backend.triton_available():
        assert select_backend("triton", cpu) == "triton"
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    with pytest.raises(CoscaleError, match="needs the triton package"):
        select_backend("triton", CUDA_LIKE)


def _wrapper_calls():
    """Every kernel wrapper, called with a backend name on small CPU inputs."""
    from coscale.kernels.fp8_gemm import fp8_gemm
    from coscale.kernels.fp8_grouped_gemm import fp8_grouped_mm, fp8_grouped_wgrad
    from coscale.kernels.grouped_gemm import grouped_mm
    from coscale.kernels.logfmt import logfmt_decode, logfmt_encode
    from coscale.kernels.permute import build_permute_info, rows_from_tokens, tokens_from_rows
    from coscale.kernels.swiglu import swiglu

    x = torch.randn(4, 128)
    a8 = torch.zeros(128, 128).to(q.FP8_DTYPE)
    info = build_permute_info(torch.tensor([[0], [1], [0], [1]]), 2)
    codes, lo, step = logfmt_encode(x, backend="torch")
    off = torch.tensor([128], dtype=torch.int32)
    return {
        "act_quant_1x128": lambda b: q.act_quant_1x128(x, backend=b),
        "act_quant_1x128_dual": lambda b: q.act_quant_1x128_dual(x, backend=b),
        "weight_quant_128x128": lambda b: q.weight_quant_128x128(x, backend=b),
        "transpose_fp8": lambda b: q.transpose_fp8(a8, backend=b),
        "fp8_gemm": lambda b: fp8_gemm(a8, torch.ones(128, 1), a8, torch.ones(128, 1), backend=b),
        "fp8_grouped_mm": lambda b: fp8_grouped_mm(a8, torch.ones(128, 1), a8[None], torch.ones(1, 1, 1), off,
                                                   backend=b),
        "fp8_grouped_wgrad": lambda b: fp8_grouped_wgrad(a8, torch.ones(128, 1), a8, torch.ones(128, 1), off,
                                                         backend=b),
        "grouped_mm": lambda b: grouped_mm(x, torch.randn(1, 8, 128), torch.tensor([4], dtype=torch.int32),
                                           backend=b),
        "rows_from_tokens": lambda b: rows_from_tokens(x, info, backend=b),
        "tokens_from_rows": lambda b: tokens_from_rows(torch.zeros(info.num_rows, 128), info, backend=b),
        "swiglu": lambda b: swiglu(torch.randn(4, 16), backend=b),
        "logfmt_encode": lambda b: logfmt_encode(x, backend=b),
        "logfmt_decode": lambda b: logfmt_decode(codes, lo, step, backend=b),
    }


@pytest.mark.parametrize("name", sorted(_wrapper_calls()))
def test_every_kernel_wrapper_decides_through_the_selector(name, monkeypatch):
    call = _wrapper_calls()[name]
    with pytest.raises(CoscaleError, match=f"{name}: backend must be one of"):
        call("nope")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if backend.triton_available():
        with pytest.raises(CoscaleError, match=f"{name}: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1"):
            call("triton")
    call("auto")  # the PyTorch reference on CPU


# ---- tuning -------------------------------------------------------------------------------------------
def test_power_of_two_bucket():
    assert [power_of_two_bucket(n) for n in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == [1, 1, 2, 4, 4, 8, 1024,
                                                                                      1024, 2048]


def test_triton_autotune_gets_one_configuration_under_the_interpreter():
    assert autotune.autotune_configs(["a", "b"], "interp") == ["interp"]  # interpreting, or no CUDA here


@pytest.mark.parametrize("graph_timing, rep_ms, expected", [(True, 10, ("graph", 10)), (True, None, ("graph", 20)),
                                                             (False, 10, ("eager", 10)), (False, None, None)])
def test_triton_autotune_times_candidates_as_asked(monkeypatch, graph_timing, rep_ms, expected):
    """graph_timing hands Triton's autotuner a do_bench that replays each candidate from a CUDA graph,
    rep_ms alone one that times launches over rep_ms; neither: Triton's own."""
    import triton
    import triton.testing

    monkeypatch.setattr(triton, "autotune", lambda configs, key, **options: options)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, rep, quantiles: ("graph", rep))
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, quantiles: ("eager", rep))
    options = autotune.triton_autotune(["a"], "interp", key=["N"], rep_ms=rep_ms, graph_timing=graph_timing)
    seen = options["do_bench"](lambda: None, quantiles=(0.5,)) if "do_bench" in options else None
    assert seen == expected


def test_config_picker_warms_every_candidate_then_keeps_each_ones_fastest_round(monkeypatch):
    import triton.testing

    monkeypatch.setattr(autotune, "interpreting", lambda: False)
    # per candidate, the time of each timing round: "c" is slow in round 1 (a cold clock) only
    rounds = {"a": [3.0, 3.0], "b": [2.0, 2.5], "c": [4.0, 1.5]}
    calls = []

    def fake_bench(fn, **kw):
        return fn()

    def launch(cfg):
        name = cfg["name"]
        calls.append(name)
        if name == "b2":
            raise RuntimeError("out of resources")
        timed = [c for c in calls if c == name]
        return rounds[name][len(timed) - 2] if len(timed) > 1 else 0.0  # the first call only warms

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    cands = ({"name": "a"}, {"name": "b2"}, {"name": "b"}, {"name": "c"})
    picker = ConfigPicker("grouped FP8 GEMM", cands, {"name": "interp"})
    assert picker.config("k", launch) == {"name": "c"}
    assert picker.config("k", launch) == {"name": "c"}  # remembered, not timed again
    assert calls == ["a", "b2", "b", "c"] + ["a", "b", "c"] * picker.rounds
    assert picker.picked == {"k": {"name": "c"}}
    with pytest.raises(CoscaleError, match="no grouped FP8 GEMM configuration"):
        ConfigPicker("grouped FP8 GEMM", ({"name": "b2"},), {}).config("k2", launch)
    picker.clear()
    assert picker.picked == {}


def test_config_picker_never_times_where_it_cannot(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert not autotune._cannot_time()
    with FakeTensorMode():  # e.g. a torch.library fake kernel: default candidate, not remembered
        assert autotune._cannot_time()
    monkeypatch.setattr(autotune, "interpreting", lambda: False)
    monkeypatch.setattr(autotune, "_cannot_time", lambda: True)

    def launch(cfg):
        raise AssertionError("timed")

    picker = ConfigPicker("k", ({"name": "first"}, {"name": "second"}), {"name": "interp"})
    assert picker.config("key", launch) == {"name": "first"} and picker.picked == {}
    monkeypatch.setattr(autotune, "interpreting", lambda: True)
    assert picker.config("key", launch) == {"name": "interp"}


def test_the_grouped_fp8_pickers_hold_the_measured_candidates():
    from coscale.kernels import fp8_grouped_kernels as kernels

    tma = tuple(c for c in kernels.MM_PICKER.candidates if not c.get("GLUON"))
    assert tma == kernels.MM_CANDIDATES and len(kernels.MM_CANDIDATES) == 5
    assert kernels.WGRAD_PICKER.candidates is kernels.WGRAD_CANDIDATES and len(kernels.WGRAD_CANDIDATES) == 4
    # the by-expert kernel first (the measured leader at 256 rows an expert, run 36): it runs where nothing is timed
    first, *rest = kernels.WGRAD_CANDIDATES
    assert first.get("BY_EXPERT") and not any(c.get("BY_EXPERT") for c in rest)
    for cfg in (*kernels.MM_CANDIDATES, kernels.INTERPRETER_CONFIG):
        kernels._check_tiles(cfg)  # every forward/dgrad tile divides the 128 scale block
