"""FP8 quantization kernels on one GPU: bit-exactness against the PyTorch reference and bandwidth.

Run: python benchmarks/bench_quant.py [--quick]      (appends a line to benchmarks/results/bench_quant.jsonl)
For each shape (bf16 input) and kernel: mismatching FP8 bytes and scales versus coscale's reference
(must be 0; the GPU cast is round-to-nearest-even with saturation; `ref_vs_cpu_mismatches`: the GPU
reference against the CPU reference on 256 rows, must be 0 too), median time, effective bandwidth
(input read once + FP8 outputs and FP32 scales written once) and its fraction of a device-to-device
copy measured in the same process (goal: >= 80%; H100 copy ~3.0 TB/s). The eager PyTorch reference
is timed alongside as the baseline.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

from coscale.kernels import quant as q
from results_log import ResultsLog


def bench(fn, rep_ms=200):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def mismatches(got, ref):
    count = 0
    for g, r in zip(got, ref):
        if g.dtype == q.FP8_DTYPE:
            count += int((g.view(torch.uint8) != r.view(torch.uint8)).sum())
        else:
            count += int((~((g == r) | (torch.isnan(g) & torch.isnan(r)))).sum())
    return count


def copy_bandwidth(dev, nbytes=1 << 30):
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return ms, 2 * nbytes / ms / 1e9  # TB/s, read + write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variants", action="store_true", help="also time other chunk sizes / warps")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_quant.py needs a CUDA GPU")
    import triton

    dev = torch.device("cuda")
    shapes = [(8192, 7168), (8192, 2048)] if args.quick else [
        (4096, 7168), (8192, 7168), (16384, 7168), (8192, 2048), (8192, 18432), (16384, 1536)
    ]  # fmt: skip
    weights = [(7168, 18432)] if args.quick else [(7168, 18432), (24576, 1536), (7168, 2048)]
    table_rows, results = [], []
    t_copy, copy_bw = copy_bandwidth(dev)
    # (kernel, shape, input dtype)
    cases = [("act_1x128", s, "bf16") for s in shapes] + [("act_dual", s, "bf16") for s in shapes]
    cases += [("act_128x1", s, "bf16") for s in shapes[:2]]
    cases += [("weight_128x128", s, "bf16") for s in weights] + [("weight_dual", s, "bf16") for s in weights]
    cases += [("weight_dual", weights[0], "fp32")]  # FP32 master weights, as in FP8 training
    default = (q.COLS_BLOCK_K, q.COLS_WARPS, q.WEIGHT_WARPS)
    cases = [(*c, default) for c in cases]
    if args.variants:  # launch shapes of the transposing and weight kernels, on two shapes each
        cases += [(kind, sh, "bf16", (bk, w, q.WEIGHT_WARPS)) for bk, w in ((16, 4), (64, 4), (64, 8))
                  for kind, sh in (("act_128x1", shapes[0]), ("act_dual", shapes[0]))]
        cases += [(kind, weights[0], "bf16", (q.COLS_BLOCK_K, q.COLS_WARPS, w)) for w in (8, 32)
                  for kind in ("weight_128x128", "weight_dual")]
    for kind, (m, k), dtype, (cols_bk, cols_w, weight_w) in cases:
        rec = {"kernel": kind, "M": m, "K": k, "dtype": dtype,
               "cols_block_k": cols_bk, "cols_warps": cols_w, "weight_warps": weight_w}
        q.COLS_BLOCK_K, q.COLS_WARPS, q.WEIGHT_WARPS = cols_bk, cols_w, weight_w
        try:
            torch.manual_seed(0)
            x = torch.randn(m, k, device=dev) * torch.logspace(-3, 2, k, device=dev)
            x = x if dtype == "fp32" else x.to(torch.bfloat16)
            fn = {
                "act_1x128": q.act_quant_1x128,
                "act_dual": q.act_quant_1x128_dual,
                "act_128x1": q.act_quant_128x1,
                "weight_128x128": q.weight_quant_128x128,
                "weight_dual": q.weight_quant_128x128_dual,
            }[kind]
            got = fn(x, backend="triton")
            ref = fn(x, backend="torch")
            rec["mismatches"] = mismatches(got, ref)
            # the reference itself must not depend on the device (CUDA's `tensor / number` is a
            # reciprocal multiply; the reference divides by a tensor): 256 rows on the CPU
            head = x[:256]
            rec["ref_vs_cpu_mismatches"] = mismatches(
                [t.cpu() for t in fn(head, backend="torch")], fn(head.cpu(), backend="torch")
            )
            rec["ms"] = bench(lambda: fn(x, backend="triton"))  # noqa: B023
            rec["ref_ms"] = bench(lambda: fn(x, backend="torch"))  # noqa: B023
            out_bytes = sum(t.numel() * t.element_size() for t in got)
            rec["bytes"] = x.numel() * x.element_size() + out_bytes
            rec["TB/s"] = rec["bytes"] / rec["ms"] / 1e9
            rec["pct_copy"] = 100 * rec["TB/s"] / copy_bw
        except Exception as exc:  # record and carry on
            rec["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        results.append(rec)
        table_rows.append(rec)
        torch.cuda.empty_cache()
    meta = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"), "copy_TB/s": copy_bw, "copy_ms_1GiB": t_copy,
    }  # fmt: skip
    ResultsLog("bench_quant").save(meta=meta, results=results)
    print(json.dumps(meta))
    print(f"{'kernel':>15} {'launch':>8} {'in':>4} {'M':>6} {'K':>6} {'bad':>5} {'ms':>8} "
          f"{'TB/s':>6} {'%copy':>6} {'torch ms':>9} {'speedup':>7}")  # fmt: skip
    for r in table_rows:
        launch = f"{r['cols_block_k']}/{r['cols_warps']}/{r['weight_warps']}"
        head = (f"{r['kernel']:>15} {launch:>8} "
                f"{r['dtype']:>4} {r['M']:>6} {r['K']:>6}")  # fmt: skip
        if "error" in r:
            print(f"{head} ERROR {r['error'][:80]}")
            continue
        bad = r["mismatches"] + r["ref_vs_cpu_mismatches"]
        print(f"{head} {bad:>5} {r['ms']:>8.3f} {r['TB/s']:>6.2f} {r['pct_copy']:>6.1f} {r['ref_ms']:>9.3f} "
              f"{r['ref_ms'] / r['ms']:>7.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
