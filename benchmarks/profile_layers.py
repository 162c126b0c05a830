"""Where the time goes: per-kernel GPU time of FP8Linear and the MoE layer, forward + backward.

Run: `PYTHONPATH=src python3 benchmarks/profile_layers.py [--only linear|moe]`. For each case, three
forward+backward iterations run under torch.profiler after a warm-up; the table lists the kernels by
total GPU time per iteration (ms), with their launch count per iteration, and the sum. This explains the
bench_fp8 / bench_moe figures; it is not itself a performance claim.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from coscale.fp8 import FP8Linear
from coscale.kernels.moe import grouped_experts_forward

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


def linear_cases():
    dev, dt = "cuda", torch.bfloat16
    for m, k, n in [(8192, 16384, 7168), (8192, 7168, 4096), (8192, 7168, 18432)]:
        x = torch.randn(m, k, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn(m, n, device=dev, dtype=dt)
        for name, layer in [
            ("bf16 nn.Linear", torch.nn.Linear(k, n, bias=False, device=dev, dtype=dt)),
            ("FP8Linear", FP8Linear(k, n, bias=False, device=dev, dtype=dt)),
        ]:
            def step(layer=layer, x=x, dy=dy):
                torch.autograd.grad(layer(x), [x, layer.weight], dy)

            kernel_table(step, f"{name} {m}x{k}->{n} fwd+bwd")
        del x, dy
        torch.cuda.empty_cache()


def moe_cases():
    dev, dt = "cuda", torch.bfloat16
    T, H, I, E, K = 8192, 7168, 2048, 256, 8
    g = torch.Generator().manual_seed(0)
    base = (torch.arange(T)[:, None] * K + torch.arange(K)[None, :]) % E
    idx = torch.randperm(E, generator=g)[base].to(dev)
    topw = (torch.rand(T, K, generator=g) + 0.1).to(dev).requires_grad_()
    x = (torch.randn(T, H, device=dev) * 0.5).to(dt).requires_grad_()
    w_gate = (torch.randn(E, I, H, device=dev, dtype=dt) * H**-0.5).requires_grad_()
    w_up = (torch.randn(E, I, H, device=dev, dtype=dt) * H**-0.5).requires_grad_()
    w_down = (torch.randn(E, H, I, device=dev, dtype=dt) * I**-0.5).requires_grad_()
    dy = torch.randn(T, H, device=dev, dtype=dt)
    for precision in ("bf16", "fp8"):
        def step(precision=precision):
            out = grouped_experts_forward(x, idx, topw, w_gate, w_up, w_down, precision=precision)
            torch.autograd.grad(out, [x, topw, w_gate, w_up, w_down], dy)

        kernel_table(step, f"MoE routed experts {precision}, V3 shape, {T} tokens balanced", top=20)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("linear", "moe"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_layers.py needs a CUDA GPU")
    print(torch.cuda.get_device_name(), torch.__version__)
    if args.only in (None, "linear"):
        linear_cases()
    if args.only in (None, "moe"):
        moe_cases()


if __name__ == "__main__":
    main()
