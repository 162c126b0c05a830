"""Dense linear layers at decode batch sizes on one GPU: coscale's decode_linear against cuBLAS.

Run: `PYTHONPATH=src python benchmarks/bench_decode_linear.py [--quick]`; appends a line to
benchmarks/results/bench_decode_linear.jsonl (results_log.py); `--smoke`: tiny shapes on the CPU
interpreter (a check of the script, nothing recorded).

At decode a linear layer reads its whole weight for a few rows, so its time is the weight's bytes over
the memory bandwidth plus fixed costs. For the layers of DeepSeek-V2-Lite (attention, shared experts,
the dense first layer, the output head) and DeepSeek-V3, at M rows, each replayed from a CUDA graph
(as the engine replays its decode step): F.linear (cuBLAS) against coscale.kernels.decode_linear
(the grouped GEMM's decode tiles on one weight, autotuned per shape). Columns: microseconds, the
speed-up over cuBLAS, the weight's bytes as a per cent of the H200's copy bandwidth (4.25 TB/s), and the
largest difference from cuBLAS relative to the output's largest value.

The last table adds up one V2-Lite decode step's dense GEMMs (26 MoE layers of q_proj, kv_a_proj,
o_proj, shared gate, up and down, plus the dense first layer and the head), what the engine's switch
(`EngineConfig.decode_kernels`) changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# isort: off
# first: --smoke sets TRITON_INTERPRET before coscale's kernels decorate
from gpu_timing import SMOKE, decode_bench_args, run_cases, time_variant
# isort: on

from coscale.kernels.decode_linear import decode_linear

COPY_TBPS = 4.25  # H200, measured (shared/reference/measuring.md)
# model: [(layer, in_features, out_features, count per decode step)]
LAYERS = {
    "v2-lite": [("q_proj", 2048, 3072, 27), ("kv_a_proj", 2048, 576, 27), ("o_proj", 2048, 2048, 27),
                ("shared gate/up", 2048, 2816, 52), ("shared down", 2816, 2048, 26),
                ("dense gate/up", 2048, 10944, 2), ("dense down", 10944, 2048, 1), ("lm_head", 2048, 102400, 1)],
    "v3": [("q_a_proj", 7168, 1536, 61), ("q_b_proj", 1536, 24576, 61), ("kv_a_proj", 7168, 576, 61),
           ("o_proj", 16384, 7168, 61), ("shared gate/up", 7168, 2048, 116), ("shared down", 2048, 7168, 58)],
}
SMOKE_LAYERS = [("smoke", 64, 48, 1)]
DTYPE = torch.float32 if SMOKE else torch.bfloat16  # the interpreter's tl.dot mishandles bf16 operands


def run_case(model: str, layer, M: int, gen, dev) -> list[dict]:
    name, K, N, count = layer
    x = torch.randn(M, K, generator=gen).to(dev, DTYPE)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(dev, DTYPE)
    nbytes = w.numel() * w.element_size()
    ref = F.linear(x, w)
    rows = []
    for variant, fn in (("cublas", lambda: F.linear(x, w)),
                        ("decode_linear", lambda: decode_linear(x, w, backend="triton"))):
        def check(out):
            diff = (out.float() - ref.float()).abs().max()
            return dict(rel_diff=float(diff / ref.float().abs().max().clamp_min(1e-30)))

        entry = dict(model=model, layer=name, M=M, K=K, N=N, count=count, variant=variant)
        rows.append(time_variant(entry, fn, check, nbytes, COPY_TBPS))
    if all("us" in r for r in rows):
        rows[1]["speedup"] = rows[0]["us"] / rows[1]["us"]
    return rows


def print_table(results: list[dict]) -> None:
    print(f"\n{'model':8} {'layer':15} {'M':>4} {'K x N':>13}  {'variant':14} {'us':>8} {'x cuBLAS':>8} "
          f"{'% copy':>7} {'rel diff':>8}")
    for r in results:
        head = f"{r['model']:8} {r['layer']:15} {r['M']:4d} {str(r['K']) + 'x' + str(r['N']):>13}  {r['variant']:14}"
        if "error" in r:
            print(f"{head} ERROR {r['error']}")
            continue
        speedup = f"{r['speedup']:.2f}" if "speedup" in r else "-"
        print(f"{head} {r['us']:8.2f} {speedup:>8} {r['pct_of_copy']:7.1f} {r['rel_diff']:8.1e}")
    totals: dict[tuple, float] = {}
    for r in results:
        if "us" in r:
            key = (r["model"], r["M"], r["variant"])
            totals[key] = totals.get(key, 0.0) + r["us"] * r["count"]
    print(f"\n{'model':8} {'M':>4}  per decode step: cuBLAS us   decode_linear us   saved us")
    for (model, M, variant), us in sorted(totals.items()):
        if variant == "cublas" and (model, M, "decode_linear") in totals:
            ours = totals[(model, M, "decode_linear")]
            print(f"{model:8} {M:4d}  {us:26.1f} {ours:18.1f} {us - ours:10.1f}")


def main() -> None:
    def more(parser):
        parser.add_argument("--models", nargs="+", choices=sorted(LAYERS), help="default: both (--quick: v2-lite)")

    args, dev, gen = decode_bench_args(__doc__, "V2-Lite at 1, 16 and 32 rows (under a minute)", "rows",
                                       "decode batch sizes (default 1 16 32 64)", more)
    rows = args.rows or ([1, 16, 32] if args.quick else [1, 16, 32, 64])
    models = args.models or (["v2-lite"] if args.quick else sorted(LAYERS))
    cases = [("smoke", layer, m) for layer in SMOKE_LAYERS for m in (args.rows or [1, 5])] if SMOKE else \
        [(model, layer, m) for model in models for m in rows for layer in LAYERS[model]]
    run_cases("bench_decode_linear", cases, lambda *c: run_case(*c, gen, dev), print_table, dev,
              args.quick, COPY_TBPS)


if __name__ == "__main__":
    main()
