"""The routed experts of a decode step on one GPU: coscale.kernels.moe_decode against the general path.

Run: `PYTHONPATH=src python benchmarks/bench_moe_decode.py [--quick]`; appends a line to
benchmarks/results/bench_moe_decode.jsonl (results_log.py); `--smoke`: tiny shapes on the CPU interpreter
(a check of the script, nothing recorded).

For DeepSeek-V2-Lite's routed experts (64 experts, hidden 2048, intermediate 1408, top-6) and DeepSeek-V3's
(256, 7168, 2048, top-8) at decode batch sizes, uniformly random picks, each replayed from a CUDA graph
as the engine replays its decode step and compiled as the engine compiles it:

- "general": coscale.kernels.moe.grouped_experts_forward ("auto": permutation, the Triton grouped GEMM's
  16-row decode tiles for gate, up and down, SwiGLU, the combine), about a dozen kernels;
- "decode kernels": coscale.kernels.moe_decode.moe_decode (gate + up + SwiGLU, down + weighting, the sum
  of the partials), three kernels, every token a row of every picked expert's tile (the down projection split
  by moe_decode.default_experts_per_split; `--experts-per-split N ..` times other splits beside it);
- "picks": the same with `rows="picks"` (a plan kernel lists each expert's picks, the two GEMM kernels gather
  only those rows, PyTorch sums each token's K rows), for the batches where every token as a row is waste.

Columns: microseconds per call, the speed-up over "general", the bytes of the experts that some token
picked (the weights each path must read) as a per cent of the H200's copy bandwidth (4.25 TB/s), and the
largest difference from "general" over the output's largest magnitude. (Under --smoke "general" is the
PyTorch path: the interpreter's tl.dot mishandles bf16 operands.)
"""

from __future__ import annotations

import torch

# isort: off
# first: --smoke sets TRITON_INTERPRET before coscale's kernels decorate
from gpu_timing import SMOKE, add_speedups, decode_bench_args, print_rows, run_cases, time_variant
# isort: on

from coscale.kernels.moe import grouped_experts_forward
from coscale.kernels.moe_decode import moe_decode

COPY_TBPS = 4.25  # H200, measured (shared/reference/measuring.md)
SHAPES = {"v2-lite": (64, 2048, 1408, 6), "v3": (256, 7168, 2048, 8)}  # experts, hidden, intermediate, top-k
SMOKE_SHAPE = (8, 64, 32, 2)


def run_case(name: str, shape, T: int, gen, dev, experts_per_split=()) -> list[dict]:
    E, H, I, K = shape
    x = torch.randn(T, H, generator=gen).to(dev, torch.bfloat16)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(dev)
    g = torch.rand(T, K, generator=gen).to(dev)
    w_gate = torch.randn(E, I, H, device=dev, dtype=torch.bfloat16) / H**0.5
    w_up = torch.randn(E, I, H, device=dev, dtype=torch.bfloat16) / H**0.5
    w_down = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16) / I**0.5
    touched = idx.unique().numel()
    nbytes = touched * 3 * I * H * 2 + 2 * x.numel() * 2

    def general():
        return grouped_experts_forward(x, idx, g, w_gate, w_up, w_down, backend="torch" if SMOKE else "auto")

    def decode():
        return moe_decode(x, idx, g, w_gate, w_up, w_down, backend="triton" if SMOKE else "auto")

    def picks():
        return moe_decode(x, idx, g, w_gate, w_up, w_down, backend="triton" if SMOKE else "auto", rows="picks")

    def decode_split(n):
        return lambda: moe_decode(x, idx, g, w_gate, w_up, w_down, backend="triton" if SMOKE else "auto",
                                  experts_per_split=n)

    variants = (("general", general), ("decode kernels", decode), ("picks", picks)) + tuple(
        (f"decode, {n} a split", decode_split(n)) for n in experts_per_split)
    if not SMOKE:
        variants = tuple((v, torch.compile(fn)) for v, fn in variants)
    with torch.no_grad():
        ref = general().float()
    scale = ref.abs().max().item() or 1.0

    def check(out):
        return dict(max_rel_diff=float((out.float() - ref).abs().max()) / scale, experts_touched=touched)

    rows = []
    with torch.no_grad():
        for variant, fn in variants:
            rows.append(time_variant(dict(shape=name, tokens=T, variant=variant), fn, check, nbytes, COPY_TBPS))
    if not SMOKE:
        torch._dynamo.reset()  # drop the compiled functions and the weights they hold (V3's: 22.5 GB a case)
    return add_speedups(rows, "general", "speedup_vs_general")


def print_table(results: list[dict]) -> None:
    print_rows(results, [("shape", "shape", 8, ""), ("T", "tokens", 5, "d"), ("variant", "variant", 20, ""),
                         ("experts", "experts_touched", 7, "d"), ("us", "us", 9, ".1f"),
                         ("x general", "speedup_vs_general", 9, ".2f"), ("% copy", "pct_of_copy", 7, ".1f"),
                         ("max diff", "max_rel_diff", 9, ".1e")])


def main() -> None:
    def shapes_option(parser):
        parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES),
                            help="expert shapes (default: all)")
        parser.add_argument("--experts-per-split", nargs="+", type=int, default=[], metavar="N",
                            help="also time the decode kernels with N experts a down-projection program "
                                 "(default: only the library's default)")

    args, dev, gen = decode_bench_args(__doc__, "batches 1, 16 and 32 (about a minute)", "tokens",
                                       "batch sizes (default 1 4 16 32 64 128)", more=shapes_option)
    if any(n < 1 for n in args.experts_per_split):
        raise SystemExit("bench_moe_decode.py: --experts-per-split takes positive counts")
    tokens = args.tokens or ([1, 16, 32] if args.quick else [1, 4, 16, 32, 64, 128])
    cases = [("smoke", SMOKE_SHAPE, t) for t in (args.tokens or [1, 20])] if SMOKE else \
        [(name, SHAPES[name], t) for name in args.shapes for t in tokens]
    run_cases("bench_moe_decode", cases, lambda *c: run_case(*c, gen, dev, args.experts_per_split), print_table, dev,
              args.quick, COPY_TBPS)


if __name__ == "__main__":
    main()
