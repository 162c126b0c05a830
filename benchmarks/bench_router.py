"""The MoE router at decode on one GPU: coscale's two fused kernels against the PyTorch reference.

Run: `PYTHONPATH=src python benchmarks/bench_router.py [--quick]`; appends a line to
benchmarks/results/bench_router.jsonl (results_log.py); `--smoke`: tiny shapes on the CPU interpreter
(a check of the script, nothing recorded).

For DeepSeek-V2-Lite's router (64 experts, hidden 2048, softmax, top-6) and DeepSeek-V3's (256 experts,
hidden 7168, sigmoid plus bias, 8 groups of which 4 are kept, top-8, normalised and scaled by 2.5), at
decode batch sizes, each replayed from a CUDA graph as the engine replays its decode step:

- "reference, eager": coscale.kernels.router.route_torch (the math of Gate: casts, an FP32 GEMM, the
  score function, torch.topk, a gather, the normalisation), about ten kernels;
- "reference, compiled": the same through torch.compile, as it runs inside the compiled decode step
  (Inductor fuses the element-wise work; the GEMM and the top-k stay library kernels);
- "fused": coscale.kernels.router.route, two Triton kernels;
- "fused, N columns": the same with another slice of H per logits program (COLUMNS_PER_PROGRAM is the
  default): more programs each reading less, against fewer partial sums for the select kernel.

Columns: microseconds per call, the speed-up over the compiled reference, the gate weights' bytes as a
per cent of the H200's copy bandwidth (4.25 TB/s; at these sizes every variant is bound by launches
and latency, not bandwidth), and agreement with the reference (picks equal, largest weight difference).
"""

from __future__ import annotations

import torch

# isort: off
# first: --smoke sets TRITON_INTERPRET before coscale's kernels decorate
from gpu_timing import SMOKE, add_speedups, decode_bench_args, print_rows, run_cases, time_variant
# isort: on

from coscale.kernels.router import COLUMNS_PER_PROGRAM, route, route_torch, route_triton

COPY_TBPS = 4.25  # H200, measured (shared/reference/measuring.md)
# name: (experts, hidden, top-k, groups, kept groups, rank_by, scoring, normalise, scale, bias)
ROUTERS = {
    "v2-lite": (64, 2048, 6, 1, 1, "max", "softmax", False, 1.0, False),
    "v3": (256, 7168, 8, 8, 4, "top2_sum", "sigmoid", True, 2.5, True),
}
SMOKE_ROUTER = (16, 128, 4, 4, 2, "top2_sum", "sigmoid", True, 2.5, True)
SWEEP_COLUMNS = (64, 128, 256, 512)  # of H per logits program
DTYPE = torch.float32 if SMOKE else torch.bfloat16  # the interpreter's tl.dot mishandles bf16 operands


def run_case(name: str, router, T: int, gen, dev) -> list[dict]:
    E, H, K, G, TG, rank_by, scoring, normalize, scale, has_bias = router
    x = torch.randn(T, H, generator=gen).to(dev, DTYPE)
    w = (torch.randn(E, H, generator=gen) / H**0.5).to(dev, DTYPE)
    b = (torch.randn(E, generator=gen) * 0.05).to(dev) if has_bias else None
    args = (K, G, TG, rank_by == "top2_sum", scoring == "sigmoid", normalize, scale)
    ref_idx, ref_g, _ = route_torch(x, w, b, *args)

    def reference():
        return route_torch(x, w, b, *args)[:2]

    compiled = reference if SMOKE else torch.compile(reference)

    def fused():
        return route(x, w, b, top_k=K, n_group=G, topk_group=TG, rank_by=rank_by, scoring=scoring,
                     normalize=normalize, scale=scale)

    nbytes = w.numel() * w.element_size() + x.numel() * x.element_size()

    def check(out):
        idx, g = out
        same = torch.equal(idx.sort(1).values, ref_idx.sort(1).values)
        diff = (g.sort(1).values - ref_g.sort(1).values).abs().max()
        return dict(picks_equal=same, max_weight_diff=float(diff) if same else None)

    def fused_columns(columns):  # the logits kernel with another slice of H per program
        return lambda: route_triton(x, w, b, *args, columns=columns)

    variants = [("reference, eager", reference), ("reference, compiled", compiled), ("fused", fused)]
    variants += [(f"fused, {c} columns", fused_columns(c)) for c in SWEEP_COLUMNS if c != COLUMNS_PER_PROGRAM]
    rows = []
    for variant, fn in variants:
        rows.append(time_variant(dict(router=name, tokens=T, variant=variant), fn, check, nbytes, COPY_TBPS))
    return add_speedups(rows, "reference, compiled", "speedup_vs_compiled")


def print_table(results: list[dict]) -> None:
    print_rows(results, [("router", "router", 8, ""), ("T", "tokens", 5, "d"), ("variant", "variant", 24, ""),
                         ("us", "us", 8, ".2f"), ("x compiled", "speedup_vs_compiled", 10, ".2f"),
                         ("% copy", "pct_of_copy", 7, ".1f"),
                         ("picks", lambda r: "same" if r.get("picks_equal") else "DIFF", 6, ""),
                         ("max dw", "max_weight_diff", 8, ".1e")])


def main() -> None:
    args, dev, gen = decode_bench_args(__doc__, "batches 1, 16 and 128 (under a minute)", "tokens",
                                       "batch sizes (default 1 16 64 128 512)")
    tokens = args.tokens or ([1, 16, 128] if args.quick else [1, 16, 64, 128, 512])
    cases = [("smoke", SMOKE_ROUTER, t) for t in (args.tokens or [1, 20])] if SMOKE else \
        [(name, router, t) for name, router in ROUTERS.items() for t in tokens]
    run_cases("bench_router", cases, lambda *c: run_case(*c, gen, dev), print_table, dev,
              args.quick, COPY_TBPS)


if __name__ == "__main__":
    main()
