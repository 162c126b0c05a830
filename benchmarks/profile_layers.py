"""Where the time goes: per-kernel GPU time of FP8Linear and the MoE layer, forward + backward.

Run: `PYTHONPATH=src python3 benchmarks/profile_layers.py [--only linear|moe|host] [--launches]`. For each
case, three forward+backward iterations run under torch.profiler after a warm-up; the table lists the kernels
by total GPU time per iteration (ms), with their launch count per iteration, and the sum. `--only moe
--launches` lists one forward+backward's kernels in launch order instead (which quantization is which).
This explains the bench_fp8 / bench_moe figures; it is not itself a performance claim.

``--only host`` asks whether the host keeps up: for FP8Linear / nn.Linear at small and medium shapes and
for one training step (forward + backward) of the `small` preset in BF16 and FP8, it prints the wall
time per iteration (the host issues every launch; the GPU drains behind it), the GPU kernel time per
iteration and the top host-side (CPU) operators. Wall >> kernels means the case is bound by the host.

The printed report is also appended, as text, to benchmarks/results/profile_layers.jsonl (results_log.py).
"""

from __future__ import annotations

import argparse

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from coscale.fp8 import FP8Linear
from coscale.kernels import quant_ops
from coscale.kernels.fp8_weight_cache import FP8WeightCache
from coscale.kernels.moe import grouped_experts_forward
from results_log import ResultsLog, teed_stdout

ITERS = 3


def kernel_table(fn, title: str, top: int = 14) -> None:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = ev.self_cuda_time_total
        if t > 0:
            rows.append((t / ITERS / 1e3, ev.count / ITERS, ev.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"\n## {title}: {total:.3f} ms of kernels per iteration")
    for ms, count, name in rows[:top]:
        print(f"{ms:9.3f} ms {100 * ms / total:5.1f}% x{count:5.1f}  {name[:110]}")


def linear_steps(shapes):
    """(title, step) per shape and layer: nn.Linear in BF16 and FP8Linear, forward + backward."""
    dev, dt = "cuda", torch.bfloat16
    for m, k, n in shapes:
        x = torch.randn(m, k, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(m, n, device=dev, dtype=dt)
        for name, layer in [
            ("bf16 nn.Linear", torch.nn.Linear(k, n, bias=False, device=dev, dtype=dt)),
            ("FP8Linear", FP8Linear(k, n, bias=False, device=dev, dtype=dt)),
        ]:
            def step(layer=layer, x=x, dy=dy):
                torch.autograd.grad(layer(x), [x, layer.weight], dy)

            yield f"{name} {m}x{k}->{n} fwd+bwd", step
        del x, dy
        torch.cuda.empty_cache()


def linear_cases():
    for title, step in linear_steps([(8192, 16384, 7168), (8192, 7168, 4096), (8192, 7168, 18432)]):
        kernel_table(step, title)


def moe_cases(launches: bool = False):
    """The routed experts' kernels by total (or, ``launches``, one call's launches in order)."""
    dev, dt = "cuda", torch.bfloat16
    # DeepSeek-V3's layer with all 256 experts on one GPU, and proxy-v3's (16 experts, top-4)
    for name, T, H, I, E, K in (("V3", 8192, 7168, 2048, 256, 8), ("proxy-v3", 8192, 7168, 2048, 16, 4)):
        g = torch.Generator().manual_seed(0)
        base = (torch.arange(T)[:, None] * K + torch.arange(K)[None, :]) % E
        idx = torch.randperm(E, generator=g)[base].to(dev)
        topw = (torch.rand(T, K, generator=g) + 0.1).to(dev).requires_grad_()
        x = (torch.randn(T, H, device=dev) * 0.5).to(dt).requires_grad_()
        w_gate = (torch.randn(E, I, H, device=dev, dtype=dt) * H**-0.5).requires_grad_()
        w_up = (torch.randn(E, I, H, device=dev, dtype=dt) * H**-0.5).requires_grad_()
        w_down = (torch.randn(E, H, I, device=dev, dtype=dt) * I**-0.5).requires_grad_()
        dy = torch.randn(T, H, device=dev, dtype=dt)
        # fp8 cached: the FP8 expert weights kept between calls (training: between optimizer steps)
        # one pass: both layouts of each fused quantization from one launch (quant_ops.DUAL_ONE_PASS)
        cases = (("bf16", None, False), ("fp8", None, False), ("fp8", FP8WeightCache(), False),
                 ("fp8", FP8WeightCache(), True))
        for precision, cache, one_pass in cases:
            def step(precision=precision, x=x, idx=idx, topw=topw, ws=(w_gate, w_up, w_down), dy=dy, cache=cache,
                     one_pass=one_pass):  # fmt: skip
                quant_ops.DUAL_ONE_PASS = one_pass
                try:
                    out = grouped_experts_forward(x, idx, topw, *ws, precision=precision, fp8_weight_cache=cache)
                    torch.autograd.grad(out, [x, topw, *ws], dy)
                finally:
                    quant_ops.DUAL_ONE_PASS = False

            label = precision + (" (weights cached)" if cache is not None else "") + (", one pass" if one_pass else "")
            title = f"MoE routed experts {label}, {name} shape, {T} tokens balanced"
            if launches:
                launch_sequence(step, title)
            else:
                kernel_table(step, title, top=20)
        del x, w_gate, w_up, w_down
        torch.cuda.empty_cache()


def launch_sequence(fn, title: str, min_us: float = 20.0) -> None:
    """Every kernel of one call of fn in launch order with its GPU time (those of at least ``min_us``), the
    sum and the span from the first start to the last end."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    if not events:
        print(f"\n## {title}: no kernels recorded")
        return
    total = sum(e.time_range.elapsed_us() for e in events) / 1e3
    span = (events[-1].time_range.end - events[0].time_range.start) / 1e3
    print(f"\n## {title}: {len(events)} kernels, {total:.3f} ms of kernels, span {span:.3f} ms")
    for e in events:
        if e.time_range.elapsed_us() >= min_us:
            print(f"  {e.time_range.elapsed_us():9.1f} us  {e.name[:90]}")


def host_table(fn, title: str, iters: int = 20, top: int = 12) -> None:
    import time

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / iters * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # kernels only: a CPU operator's self device time repeats the time of the kernels it launched
    gpu = sum(ev.self_device_time_total for ev in events if ev.device_type == DeviceType.CUDA) / ITERS / 1e3
    print(f"\n## {title}: wall {wall:.3f} ms per iteration, GPU kernels {gpu:.3f} ms "
          f"({'host-bound' if wall > 1.3 * gpu else 'GPU-bound'})", flush=True)
    rows = sorted(((ev.self_cpu_time_total / ITERS / 1e3, ev.count / ITERS, ev.key) for ev in events
                   if ev.device_type == DeviceType.CPU), reverse=True)
    for ms, count, name in rows[:top]:
        print(f"  host {ms:8.3f} ms x{count:6.1f}  {name[:100]}")


def launch_costs(calls: int = 300) -> None:
    """Host microseconds per call of each building block on tiny tensors (the GPU work is small, so
    the wall time per call is mostly what the host spends issuing it). On the lent H100 the same
    entries varied 2-5x between runs (runs 11 and 16): orders of magnitude, not figures to compare."""
    import time

    import triton
    import triton.language as tl

    from coscale.kernels import quant as q
    from coscale.kernels.fp8_gemm import fp8_gemm

    @triton.jit
    def copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    dev = "cuda"
    x = torch.randn(128, 128, device=dev, dtype=torch.bfloat16)
    flat, flat_out = x.view(-1), torch.empty(128 * 128, device=dev, dtype=torch.bfloat16)
    xq, xs, xt, xts = q.act_quant_1x128_dual(x)
    wq, ws, wqt, wst = q.weight_quant_128x128_dual(x)
    cases = {
        "torch.empty": lambda: torch.empty(128, 128, device=dev),
        "bf16 torch.mm 128^3": lambda: x @ x.t(),
        "minimal Triton kernel (4 args)": lambda: copy_kernel[(16,)](flat, flat_out, flat.numel(), BLOCK=1024),
        "act_quant_1x128 (1 launch)": lambda: q.act_quant_1x128(x),
        "act_quant_1x128_dual (2 launches)": lambda: q.act_quant_1x128_dual(x, pad_t=True),
        "act_quant_1x128_dual one_pass (1 launch)": lambda: q.act_quant_1x128_dual(x, pad_t=True, one_pass=True),
        "weight_quant_128x128_dual (2 launches)": lambda: q.weight_quant_128x128_dual(x),
        "transpose_fp8 (1 launch)": lambda: q.transpose_fp8(wq),
        "fp8_gemm cuBLAS block-scaled 128^3": lambda: fp8_gemm(xq, xs, wq, ws),
    }
    print("\n## host cost per call (tiny tensors)", flush=True)
    for name, fn in cases.items():
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        print(f"  {(time.perf_counter() - t0) / calls * 1e6:8.1f} us  {name}", flush=True)


def host_cases():
    dev = "cuda"
    launch_costs()
    for title, step in linear_steps([(1024, 1024, 1024), (4096, 2048, 7168), (4096, 7168, 4096)]):
        host_table(step, title)
    from coscale.config import get_preset
    from coscale.fp8 import convert_to_fp8
    from coscale.model import DeepseekForCausalLM

    cfg = get_preset("small")
    ids = torch.randint(0, cfg.vocab_size, (16, 513), device=dev)
    for precision in ("bf16", "fp8"):
        torch.manual_seed(0)
        model = DeepseekForCausalLM(cfg).to(dev)
        if precision == "fp8":
            model = convert_to_fp8(model)

        def train_step(model=model):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.compute_loss(ids[:, :-1], ids[:, 1:]).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        host_table(train_step, f"small preset, 16 x 512 tokens, {precision} forward+backward", iters=5, top=20)
        del model
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("linear", "moe", "host"))
    parser.add_argument("--launches", action="store_true",
                        help="with --only moe: one forward+backward's kernels in launch order instead of totals")
    args = parser.parse_args()
    if args.launches and args.only != "moe":
        parser.error("--launches lists the MoE layer's launches: give it with --only moe")
    if not torch.cuda.is_available():
        raise SystemExit("profile_layers.py needs a CUDA GPU")
    log = ResultsLog("profile_layers")
    with teed_stdout() as report:
        try:
            print(torch.cuda.get_device_name(), torch.__version__)
            if args.only in (None, "linear"):
                linear_cases()
            if args.only in (None, "moe"):
                moe_cases(args.launches)
            if args.only in (None, "host"):
                host_cases()
        finally:  # keep the report printed so far, even when a case fails
            log.save(only=args.only, report=report.getvalue())


if __name__ == "__main__":
    main()
