"""``coscale calibrate``: measure the achieved rates of the local GPU with coscale's own kernels and write a
hardware file (YAML or JSON) that ``coscale analyze --hardware FILE`` reads.

Each entry of ``coscale.hardware.Efficiency`` is measured on one representative shape, with its shape and
the date in its source; what cannot be measured here (the NICs, the SMs held by all-to-all kernels, the
all-to-all itself on one GPU) keeps the value carried over from DeepSeek's published H800 figures, and
says so. Measurements, all on random data, timed by ``triton.testing.do_bench`` (median; CUDA events
when Triton is missing):

- BF16 GEMM (torch.matmul, 8192^3): ``gemm_bf16_tflops``; the same GEMM back to back for 3 s against its
  short-benchmark time: ``sustained_clock_ratio`` (the clock a full-model run holds); the BF16 grouped GEMM
  of a decode MoE (64 experts x 12 rows, N=2816, K=2048): ``gemm_bf16_memory_tbps``.
- FP8 block-scaled GEMM (coscale.kernels.fp8_gemm, M=4096, N=7168, K=16384 and K=2048): the plateau
  and the per-tile K overhead of ``time = FLOPs / plateau x (1 + K0 / K)``; M=64 (weights streamed):
  ``gemm_memory_tbps``.
- Grouped FP8 GEMM (coscale.kernels.fp8_grouped_gemm): 8 experts x 4096 rows (``gemm_grouped``), 2 x 512
  rows (the decode shape, ``gemm_masked``) and the grouped weight gradient (``gemm_wgrad``).
- Absorbed-MLA decode attention over a 576-wide latent, 4K context: 128 heads x 2 queries (compute-bound)
  and 16 heads x 1 query (memory-bound); one request over 512 tokens in a CUDA graph, its fixed cost
  (``attention_decode_floor_us``). The backend is pluggable (``--attention``): ``torch`` (bmm +
  softmax, what coscale's absorbed path computes) or ``triton`` (coscale.kernels.mla_decode, when it
  provides ``calibration_case``), or ``MODULE:FUNCTION``; a backend is a function
  ``(batch, queries, heads, context, latent, rope, device) -> callable`` that builds its inputs and returns
  the call to time.
- Causal prefill attention (torch SDPA, q/k 192, v 128, 4K) forward and backward.
- Device copy (1 GiB): ``memory_tbps``; a CUDA graph of tiny kernels: ``kernel_floor_us``; of cuBLAS GEMMs
  at 16 rows by a 2.4 MB weight: ``gemm_floor_us``; a CUDA graph of
  dependent decode-size kernels (row sums and divisions of a [128, 2048] BF16 activation):
  ``small_kernel_us``; eager tiny ops: ``host_launch_us``; SM count.
- With several GPUs under ``torchrun``: NCCL all_to_all_single (256 MiB and 8 KiB per rank) for
  ``a2a_scale_up_gbps`` and ``collective_latency_us`` (rank 0 writes the file).

It takes about a minute on an H200. Without a GPU it stops with exit status 2; ``--cpu-smoke`` runs the
same plumbing on tiny CPU shapes (for tests; the numbers are not a calibration).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable

from coscale.errors import CoscaleError
from coscale.hardware import PRESETS, HardwareSpec, derive_efficiency, get_hardware

GPU_PRESETS = (("gb200", "gb200-nvl72"), ("b200", "b200"), ("h200", "h200"), ("h800", "h800"), ("h100", "h100"))


class CalibrationError(CoscaleError):
    """The local machine cannot be calibrated as asked."""


@dataclasses.dataclass
class Probe:
    """Sizes of one run: full (a GPU) or smoke (tiny, CPU)."""

    device: str
    smoke: bool

    def dim(self, full: int, smoke: int) -> int:
        return smoke if self.smoke else full


def _timer(probe: Probe) -> Callable[[Callable[[], object]], float]:
    """Median seconds of ``fn()``."""
    if probe.smoke:
        def cpu(fn):
            fn()
            times = []
            for _ in range(3):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return statistics.median(times)
        return cpu
    try:
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    except ImportError:
        import torch

        def events(fn):
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(20):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) * 1e-3)
            return statistics.median(times)
        return events


def _gemm_fp8(probe, timer, tag):
    import torch

    from coscale.kernels.fp8_gemm import fp8_gemm
    from coscale.kernels.quant import act_quant_1x128, weight_quant_128x128

    backend = "torch" if probe.smoke else "auto"

    def run(m, n, k):
        a, sa = act_quant_1x128(torch.randn(m, k, device=probe.device, dtype=torch.bfloat16), backend=backend)
        b, sb = weight_quant_128x128(torch.randn(n, k, device=probe.device, dtype=torch.bfloat16), backend=backend)
        return timer(lambda: fp8_gemm(a, sa, b, sb, backend=backend)), 2.0 * m * n * k

    m, n = probe.dim(4096, 128), probe.dim(7168, 256)
    k_long, k_short = probe.dim(16384, 1024), probe.dim(2048, 256)
    (t1, f1), (t2, f2) = run(m, n, k_long), run(m, n, k_short)
    ratio = (t2 / f2) / (t1 / f1)  # = (1 + K0/k_short) / (1 + K0/k_long)
    k0 = max((ratio - 1) / (1 / k_short - ratio / k_long), 0.0)
    plateau = f1 / t1 * (1 + k0 / k_long) / 1e12
    t3, _ = run(probe.dim(64, 16), n, k_long)
    streamed = n * k_long + probe.dim(64, 16) * (k_long + 2 * n)
    shape = f"fp8_gemm M={m} N={n}, K={k_long} ({f1 / t1 / 1e12:.4g} TFLOP/s) and {k_short} ({f2 / t2 / 1e12:.4g})"
    return {"gemm_fp8_tflops": (plateau, f"{tag}: {shape}, fitted to FLOPs / P x (1 + K0/K)"),
            "gemm_k_overhead": (k0, f"{tag}: {shape}"),
            "gemm_memory_tbps": (streamed / t3 / 1e12, f"{tag}: fp8_gemm M=64 N={n} K={k_long}, bytes / time")}


def _grouped(probe, timer, tag, k0):
    import torch

    from coscale.kernels.fp8_grouped_gemm import fp8_grouped_mm, fp8_grouped_wgrad, quantize_expert_weights
    from coscale.kernels.quant import act_quant_1x128, act_quant_128x1

    backend = "torch" if probe.smoke else "auto"
    dev, n, k = probe.device, probe.dim(4096, 256), probe.dim(7168, 256)
    out = {}
    for key, experts, rows in (("gemm_grouped_fp8_tflops", 8, probe.dim(4096, 128)),
                               ("gemm_masked_fp8_tflops", 2, probe.dim(512, 128))):
        m = experts * rows
        a, sa = act_quant_1x128(torch.randn(m, k, device=dev, dtype=torch.bfloat16), backend=backend)
        w, sw = quantize_expert_weights(torch.randn(experts, n, k, device=dev, dtype=torch.bfloat16), backend=backend)
        ends = torch.arange(1, experts + 1, device=dev, dtype=torch.int32) * rows
        t = timer(lambda a=a, sa=sa, w=w, sw=sw, ends=ends: fp8_grouped_mm(a, sa, w, sw, ends, backend=backend))
        out[key] = (2.0 * m * n * k / t * (1 + k0 / k) / 1e12,
                    f"{tag}: fp8_grouped_mm {experts} experts x {rows} rows, N={n} K={k}")
    experts, rows = 8, probe.dim(4096, 128)
    mp = experts * rows
    dyt, sdy = act_quant_128x1(torch.randn(mp, n, device=dev, dtype=torch.bfloat16), backend=backend)
    xt, sx = act_quant_128x1(torch.randn(mp, k, device=dev, dtype=torch.bfloat16), backend=backend)
    ends = torch.arange(1, experts + 1, device=dev, dtype=torch.int32) * rows
    t = timer(lambda: fp8_grouped_wgrad(dyt, sdy, xt, sx, ends, backend=backend))
    out["gemm_wgrad_fp8_tflops"] = (2.0 * mp * n * k / t / 1e12,
                                    f"{tag}: fp8_grouped_wgrad {experts} experts x {rows} tokens, N={n} K={k}")
    return out


def _mla_decode_torch(batch, queries, heads, context, latent, rope, device):
    """The absorbed-MLA core: scores over the latent + RoPE key, softmax, weighted sum of the latent."""
    import torch

    q = torch.randn(batch, queries * heads, latent + rope, device=device, dtype=torch.bfloat16)
    kv = torch.randn(batch, context, latent + rope, device=device, dtype=torch.bfloat16)
    scale = (latent + rope) ** -0.5

    def run():
        p = torch.softmax(torch.bmm(q, kv.transpose(1, 2)).float() * scale, dim=-1).to(kv.dtype)
        return torch.bmm(p, kv[..., :latent])
    return run


def attention_backend(name: str) -> Callable:
    """``torch``, ``triton`` (coscale.kernels.mla_decode.calibration_case) or ``MODULE:FUNCTION``."""
    if name == "torch":
        return _mla_decode_torch
    module, _, function = ("coscale.kernels.mla_decode", "", "calibration_case") if name == "triton" \
        else name.partition(":")
    if not function:
        raise CalibrationError(f"--attention takes torch, triton or MODULE:FUNCTION, got {name!r}")
    try:
        found = getattr(importlib.import_module(module), function, None)
    except ImportError as e:
        raise CalibrationError(f"--attention {name}: cannot import {module} ({e})") from None
    if not callable(found):
        raise CalibrationError(f"--attention {name}: {module} has no function {function}(batch, queries, heads, "
                               "context, latent, rope, device)")
    return found


def _attention(probe, timer, tag, backend_name):
    import torch
    import torch.nn.functional as F

    make, dev = attention_backend(backend_name), probe.device
    ctx, latent, rope = probe.dim(4096, 256), 512, 64
    out = {}
    batch, queries, heads = probe.dim(64, 2), 2, probe.dim(128, 16)
    t = timer(make(batch, queries, heads, ctx, latent, rope, dev))
    flops = 2.0 * batch * queries * heads * (2 * latent + rope) * ctx
    out["attention_decode_tflops"] = (flops / t / 1e12, f"{tag}: {backend_name} MLA decode, {batch} requests x "
                                      f"{queries} queries x {heads} heads, {ctx} context")
    batch = probe.dim(64, 2)
    t = timer(make(batch, 1, 16, ctx, latent, rope, dev))
    out["attention_decode_tbps"] = (batch * ctx * (latent + rope) * 2 / t / 1e12,
                                    f"{tag}: {backend_name} MLA decode, {batch} requests x 1 query x 16 heads, "
                                    f"{ctx} context (KV-cache bytes / time)")
    if not probe.smoke:  # one request over a short context, inside a CUDA graph: the kernel's fixed cost
        short, calls = make(1, 1, 16, 512, latent, rope, dev), 50

        def shorts():
            for _ in range(calls):
                short()

        out["attention_decode_floor_us"] = (timer(_graphed(shorts)) / calls * 1e6,
                                            f"{tag}: {backend_name} MLA decode, a CUDA graph of {calls} calls of 1 "
                                            "request x 1 query x 16 heads over 512 tokens")
    b, h, s = probe.dim(2, 1), probe.dim(128, 4), probe.dim(4096, 256)
    q = torch.randn(b, h, s, 192, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, h, s, 192, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, h, s, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    flops = b * h * (192 + 128) * s * s  # causal: half of the 2 x S^2 products
    forward = timer(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    out["attention_prefill_tflops"] = (flops / forward / 1e12, f"{tag}: torch SDPA causal, {b} x {h} heads x {s}, "
                                       "q/k 192, v 128")
    grad = torch.randn(b, h, s, 128, device=dev, dtype=torch.bfloat16)
    both = timer(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad))
    if both > 1.05 * forward:  # else timing noise swamps the backward: keep the carried-over rate
        out["attention_backward_tflops"] = (2.5 * flops / (both - forward) / 1e12,
                                            f"{tag}: torch SDPA causal backward, same shape (2.5 x forward FLOPs)")
    return out


def _memory_and_launch(probe, timer, tag):
    import torch

    dev, n = probe.device, probe.dim(512 * 2**20, 2**20)  # BF16 numbers: 1 GiB on a GPU
    x, y = torch.empty(n, device=dev, dtype=torch.bfloat16), torch.empty(n, device=dev, dtype=torch.bfloat16)
    out = {"memory_tbps": (2 * 2 * n / timer(lambda: y.copy_(x)) / 1e12, f"{tag}: device copy of {2 * n >> 20} MiB "
                           "(read + write)")}
    small = torch.zeros(16, device=dev)
    ops = probe.dim(200, 20)
    if not probe.smoke:
        def tiny():
            for _ in range(ops):
                small.add_(1)

        # decode-size kernels, each reading what the one before wrote (a decode step's norms, casts and
        # residual adds are such kernels): a row sum of a [128, 2048] BF16 activation, then its division by it
        act, rows = torch.ones(128, 2048, device=dev, dtype=torch.bfloat16), torch.empty(128, 1, device=dev,
                                                                                        dtype=torch.bfloat16)

        def decode_size():
            for i in range(ops):
                if i % 2:
                    act.div_(rows)  # rows sum to 1 from then on: the values stay finite
                else:
                    torch.sum(act, dim=-1, keepdim=True, out=rows)

        # decode-size GEMMs through cuBLAS: 16 rows times a 2.4 MB weight (V2-Lite's kv_a projection), whose
        # bytes take about 0.6 us to read, so what is measured is the GEMM's fixed cost
        rows16, w576 = torch.ones(16, 2048, device=dev, dtype=torch.bfloat16), torch.ones(576, 2048, device=dev,
                                                                                          dtype=torch.bfloat16)
        prod = torch.empty(16, 576, device=dev, dtype=torch.bfloat16)

        def small_gemms():
            for _ in range(ops):
                torch.mm(rows16, w576.t(), out=prod)

        out["kernel_floor_us"] = (timer(_graphed(tiny)) / ops * 1e6, f"{tag}: CUDA graph of {ops} tiny kernels")
        out["gemm_floor_us"] = (timer(_graphed(small_gemms)) / ops * 1e6,
                                f"{tag}: CUDA graph of {ops} cuBLAS BF16 GEMMs of 16 x 2048 rows by a 2048 x 576 "
                                "weight (2.4 MB)")
        out["small_kernel_us"] = (timer(_graphed(decode_size)) / ops * 1e6,
                                  f"{tag}: CUDA graph of {ops} dependent decode-size kernels (row sum, division "
                                  "by it over a [128, 2048] BF16 activation, alternating)")
        sync = torch.cuda.synchronize
    else:
        def sync():
            return None
    sync()
    start = time.perf_counter()
    for _ in range(ops * 10):
        small.add_(1)
    host = (time.perf_counter() - start) / (ops * 10)
    sync()
    out["host_launch_us"] = (host * 1e6, f"{tag}: {ops * 10} eager tiny ops, host time per op")
    if not probe.smoke:
        out["sms"] = (torch.cuda.get_device_properties(dev).multi_processor_count, f"{tag}: device properties")
    return out


def _graphed(fn):
    """replay() of a CUDA graph of fn(), warmed up off the default stream first, as capture asks."""
    import torch

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _all_to_all(tag):
    """Only under torchrun with several GPUs: NCCL all_to_all_single bandwidth and latency."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() < 2:
        return {}
    world, dev = dist.get_world_size(), torch.device("cuda", torch.cuda.current_device())

    def seconds(numel):
        x = torch.empty(numel, device=dev, dtype=torch.bfloat16)
        y = torch.empty_like(x)
        for _ in range(3):
            dist.all_to_all_single(y, x)
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            dist.barrier()
            t = time.perf_counter()
            dist.all_to_all_single(y, x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    big = 128 * 2**20  # BF16 numbers per rank: 256 MiB
    sent = 2 * big * (world - 1) / world
    return {"a2a_scale_up_gbps": (sent / seconds(big) / 1e9, f"{tag}: NCCL all_to_all_single, {world} GPUs, "
                                  "256 MiB per rank"),
            "collective_latency_us": (seconds(4096) * 1e6, f"{tag}: NCCL all_to_all_single, {world} GPUs, 8 KiB")}


def _base_preset(device_name: str, base: str | None) -> str:
    if base:
        if base not in PRESETS:
            raise CalibrationError(f"--base must be one of {', '.join(PRESETS)}, got {base!r}")
        return base
    lowered = device_name.lower()
    for needle, preset in GPU_PRESETS:
        if needle in lowered:
            return preset
    raise CalibrationError(f"no preset matches {device_name!r}: pass --base with the closest of {', '.join(PRESETS)} "
                           "(its datasheet peaks go into the file)")


def calibrate(base: str | None = None, attention: str = "torch", cpu_smoke: bool = False,
              progress: Callable[[str], None] | None = None) -> HardwareSpec:
    """Measure the local GPU (or, with ``cpu_smoke``, run the same steps on tiny CPU shapes)."""
    import torch

    progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    if not cpu_smoke and not torch.cuda.is_available():
        raise CalibrationError("coscale calibrate measures a GPU and found none (CUDA unavailable); "
                               "--cpu-smoke runs the plumbing on CPU for testing")
    attention_backend(attention)  # refuse a bad backend before anything runs
    probe = Probe(device="cpu" if cpu_smoke else "cuda", smoke=cpu_smoke)
    name = "cpu" if cpu_smoke else torch.cuda.get_device_name()
    preset = _base_preset(name, base or ("h200" if cpu_smoke else None))
    date = datetime.date.today().isoformat()
    tag = (f"cpu smoke test, not a calibration ({date})" if cpu_smoke else
           f"measured by coscale calibrate on {name}, torch {torch.__version__}, {date}")
    timer, measured = _timer(probe), {}
    steps = [("FP8 GEMM", lambda: _gemm_fp8(probe, timer, tag)),
             ("grouped FP8 GEMM", lambda: _grouped(probe, timer, tag, measured.get("gemm_k_overhead", (512.0,))[0])),
             ("BF16 GEMM", lambda: _gemm_bf16(probe, timer, tag)),
             ("attention", lambda: _attention(probe, timer, tag, attention)),
             ("copy and launch", lambda: _memory_and_launch(probe, timer, tag)),
             ("all-to-all", lambda: _all_to_all(tag))]
    for label, step in steps:
        begin = time.perf_counter()
        try:
            found = step()
        except CalibrationError:
            raise
        except Exception as e:  # one kernel family missing or failing: keep the others, say which

            progress(f"  {label}: not measured ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            continue
        measured.update(found)
        shown = ", ".join(f"{k} {v:.4g}" for k, (v, _) in found.items()) or "skipped (one GPU)"
        progress(f"  {label} ({time.perf_counter() - begin:.1f} s): {shown}")
    if "sms" in measured:
        measured["sms"] = (int(measured["sms"][0]), measured["sms"][1])
    spec = get_hardware(preset)
    spec = dataclasses.replace(spec, name=f"{preset}-calibrated" if not cpu_smoke else "cpu-smoke",
                               source=f"{spec.source}; efficiencies: {tag}")
    return dataclasses.replace(spec, efficiency=derive_efficiency(spec, measured))


def _gemm_bf16(probe, timer, tag):
    import torch

    from coscale.kernels.grouped_gemm import grouped_mm

    n = probe.dim(8192, 256)
    a = torch.randn(n, n, device=probe.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=probe.device, dtype=torch.bfloat16)
    short = timer(lambda: a @ b)
    out = {"gemm_bf16_tflops": (2.0 * n**3 / short / 1e12, f"{tag}: torch.matmul {n}^3 BF16")}
    # The serving engine's BF16 MoE in decode: 64 experts with a few rows each (V2-Lite at batch 128:
    # 768 rows), so the time is the weights streamed from HBM.
    experts, rows, nn_, kk = probe.dim(64, 4), probe.dim(12, 2), probe.dim(2816, 256), probe.dim(2048, 256)
    x = torch.randn(experts * rows, kk, device=probe.device, dtype=torch.bfloat16)
    w = torch.randn(experts, nn_, kk, device=probe.device, dtype=torch.bfloat16)
    ends = torch.arange(1, experts + 1, device=probe.device, dtype=torch.int32) * rows
    t = timer(lambda: grouped_mm(x, w, ends, backend="torch" if probe.smoke else "auto"))
    out["gemm_bf16_memory_tbps"] = (experts * nn_ * kk * 2 / t / 1e12, f"{tag}: BF16 grouped_mm {experts} experts x "
                                    f"{rows} rows, N={nn_} K={kk} (weight bytes / time)")
    if not probe.smoke:  # the same GEMM back to back for ~3 s: the clock the GPU holds under sustained load
        import time as _time

        torch.cuda.synchronize()
        reps, begin = 0, _time.perf_counter()
        while _time.perf_counter() - begin < 3.0:
            for _ in range(20):
                a @ b
            torch.cuda.synchronize()
            reps += 20
        sustained = (_time.perf_counter() - begin) / reps
        out["sustained_clock_ratio"] = (min(short / sustained, 1.0), f"{tag}: torch.matmul {n}^3 BF16 back to back "
                                        "for 3 s against its short-benchmark time")
    return out


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="measure this GPU's achieved rates with coscale's kernels; write a hardware file",
        description="Measure GEMM, grouped GEMM, MLA decode and prefill attention, copy bandwidth and launch costs "
                    "on the local GPU (and all-to-all under torchrun with several GPUs) and write a hardware "
                    "file for 'coscale analyze ... --hardware FILE'. About a minute on an H200.")
    p.add_argument("--output", default="hardware-calibrated.yaml",
                   help="hardware file to write (.json for JSON, else YAML; default hardware-calibrated.yaml)")
    p.add_argument("--base", choices=list(PRESETS),
                   help="preset whose datasheet peaks the file carries (default: from the GPU's name)")
    p.add_argument("--attention", default="torch",
                   help="MLA decode backend: torch, triton (kernels/mla_decode.py) or MODULE:FUNCTION (default torch)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the steps on tiny CPU shapes to test the plumbing (the numbers are not a calibration)")
    p.set_defaults(func=run_calibrate)


def run_calibrate(args) -> int:
    import torch

    from coscale.analysis.output import write_hardware

    if not args.cpu_smoke and not torch.cuda.is_available():
        raise CalibrationError("coscale calibrate measures a GPU and found none (CUDA unavailable); "
                               "--cpu-smoke runs the plumbing on CPU for testing")
    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.cpu_smoke:
        import torch.distributed as dist

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    print(f"coscale calibrate: measuring ({'CPU smoke test' if args.cpu_smoke else torch.cuda.get_device_name()})",
          file=sys.stderr)
    try:
        spec = calibrate(args.base, args.attention, args.cpu_smoke)
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.cpu_smoke:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0:
        print(f"hardware file written to {write_hardware(spec, args.output)}")
    return 0
