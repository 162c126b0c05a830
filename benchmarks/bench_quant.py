"""FP8 quantization kernels on one GPU: bit-exactness first, then bandwidth (eager and CUDA-graphed).

Run: python benchmarks/bench_quant.py [--quick] [--fused-only] [--moe-shape v3] [--producer-order both]
[--paired both]
(appends a line to benchmarks/results/bench_quant.jsonl)

Standalone kernels (coscale.kernels.quant / quant_ops), bf16 input unless marked: mismatching FP8
bytes and scales against coscale's PyTorch reference on the GPU (must be 0: the GPU cast is
round-to-nearest-even with saturation) and of that reference against the CPU reference on 256 rows
(must be 0 too).
Fused kernels (coscale.kernels.fused_quant: SwiGLU, its backward, the MoE permutation, each with the
quantization of its output): mismatches against the unfused pipeline on the GPU (the producer's
Triton kernel, then the quantization kernels; must be 0), and, for SwiGLU, the dequantized output's
relative error against the float32 producer (E4M3's quantization error, about 0.03).
Timing: ``eager`` (do_bench, Python launches included) and ``graph`` (replayed from a CUDA graph:
the kernels alone, what a graphed training step pays); bandwidth = bytes read once + FP8 outputs and
FP32 scales written once, over the graphed time, and its fraction of a device-to-device copy
measured in the same process and of the H200's 4.25 TB/s (goal: >= 80%). Fused kernels also show
the unfused pipeline's graphed time and the speedup. Every autotuned kernel tunes on its first call,
before the timing; the table shows the configuration each kernel of a row picked
(coscale.kernels.quant_ops.picked_config).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

# isort: off
# first: --smoke sets TRITON_INTERPRET before coscale's kernels decorate
from gpu_timing import SMOKE, copy_bandwidth, device, eager_ms, graph_ms
# isort: on

from coscale.kernels import quant as q
from coscale.kernels import quant_ops
from coscale.kernels.fused_quant import gather_quant_op, swiglu_backward_quant_op, swiglu_quant_op
from coscale.kernels.permute import build_permute_info, rows_from_tokens
from coscale.kernels.quant_ops import picked_config, weight_quant_op
from coscale.kernels.swiglu import swiglu_backward_op, swiglu_op
from results_log import ResultsLog

FP8 = q.FP8_DTYPE
H200_COPY_TBS = 4.25  # the H200's device-to-device copy bandwidth measured in BENCHMARKS.md (the goal's base)


def mismatches(got, ref) -> int:
    count = 0
    for g, r in zip(got, ref):
        if g.dtype == FP8:
            count += int((g.view(torch.uint8) != r.view(torch.uint8)).sum())
        else:
            count += int((~((g == r) | (torch.isnan(g) & torch.isnan(r)))).sum())
    return count


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def dequant_error(outs, want: torch.Tensor) -> float:
    """Relative error of the 1x128 layout (outs[0], outs[1]) dequantized against ``want`` (float)."""
    deq = q.dequant_1x128(outs[0], outs[1])[:, : want.shape[1]]
    return float((deq - want).norm() / want.norm())


# ---- cases: (name, setup) where setup() returns (fused_fn, reference_fn, unfused_fn or None, inputs)
def standalone_cases(quick: bool, dev):
    acts = [(8192, 7168), (8192, 2048)] if quick else [(4096, 7168), (8192, 7168), (16384, 7168), (8192, 2048),
                                                       (8192, 18432), (16384, 1536)]  # fmt: skip
    weights = [(7168, 18432)] if quick else [(7168, 18432), (24576, 1536), (7168, 2048)]
    experts = (16, 2048, 7168)  # proxy-v3's routed experts
    if SMOKE:
        acts, weights, experts = [(200, 300)], [(136, 200)], (2, 128, 256)

    def act(m, k, dtype=torch.bfloat16):
        torch.manual_seed(0)
        return (torch.randn(m, k, device=dev) * torch.logspace(-3, 2, k, device=dev)).to(dtype)

    # (name, make input, run(x, backend), the autotuned kernels it launches: picked_config's names)
    cases = []
    for m, k in acts:
        cases.append((f"act_1x128 {m}x{k}", lambda m=m, k=k: act(m, k), lambda x, b: q.act_quant_1x128(x, backend=b),
                      ("rows",)))  # fmt: skip
        cases.append((f"act_dual {m}x{k}", lambda m=m, k=k: act(m, k),
                      lambda x, b: q.act_quant_1x128_dual(x, backend=b), ("rows", "cols")))
        cases.append((f"act_dual_one_pass {m}x{k}", lambda m=m, k=k: act(m, k),
                      lambda x, b: q.act_quant_1x128_dual(x, backend=b, one_pass=True), ("producer_dual",)))
    m, k = acts[0]
    cases.append((f"act_128x1 {m}x{k}", lambda: act(m, k), lambda x, b: q.act_quant_128x1(x, backend=b), ("cols",)))
    transpose = "transpose_words" if quant_ops.TRANSPOSE_WORDS else "transpose"  # W^T's kernel
    for n, k in weights:
        cases.append((f"weight_128x128 {n}x{k}", lambda n=n, k=k: act(n, k),
                      lambda w, b: q.weight_quant_128x128(w, backend=b), ("weight",)))
        for one_pass in (False, True):  # W^T from a byte transpose, or from the quantizing programs
            cases.append((f"weight_dual {n}x{k}{pair_name(one_pass)}", lambda n=n, k=k: act(n, k),
                          pair_run(lambda w, b: q.weight_quant_128x128_dual(w, backend=b), one_pass),
                          pair_kernels(one_pass, transpose)))
    n, k = weights[0]
    e, i, h = experts
    for one_pass in (False, True):
        cases.append((f"weight_dual fp32 {n}x{k}{pair_name(one_pass)}", lambda: act(n, k, torch.float32),
                      pair_run(lambda w, b: q.weight_quant_128x128_dual(w, backend=b), one_pass),
                      pair_kernels(one_pass, transpose)))
        # routed experts: [w_gate; w_up] (FP32 master weights) stacked in one buffer, with its transpose
        cases.append((f"experts gate+up fp32 {e}x2x{i}x{h}{pair_name(one_pass)}",
                      lambda: act(e * i, h, torch.float32).view(e, i, h),
                      pair_run(lambda w, b: weight_quant_op([w, w], False, True, b), one_pass),
                      pair_kernels(one_pass, transpose)))  # fmt: skip
    return cases


def pair_name(one_pass: bool) -> str:
    return " one-pass" if one_pass else ""


def pair_kernels(one_pass: bool, transpose: str) -> tuple:
    return ("weight",) if one_pass else ("weight", transpose)


def pair_run(run, one_pass: bool):
    """``run`` with quant_ops.WEIGHT_PAIR_ONE_PASS set to ``one_pass`` for the call."""
    def call(w, b):
        saved, quant_ops.WEIGHT_PAIR_ONE_PASS = quant_ops.WEIGHT_PAIR_ONE_PASS, one_pass
        try:
            return run(w, b)
        finally:
            quant_ops.WEIGHT_PAIR_ONE_PASS = saved
    return call


def picked(kinds) -> str:
    """The configurations the case's autotuned kernels used last (in its tuning call and all timed ones)."""
    return "; ".join(f"{kind}: {picked_config(kind)}" for kind in kinds)


def run_standalone(name, make, fn, kinds, copy_bw, results):
    rec = {"kernel": name}
    try:
        x = make()
        got = fn(x, "triton")
        rec["config"] = picked(kinds)
        rec["mismatches"] = mismatches(got, fn(x, "torch"))
        head = x[:256] if x.dim() == 2 else x[:1]  # the reference does not depend on the device
        rec["ref_vs_cpu_mismatches"] = mismatches([t.cpu() for t in fn(head, "torch")], fn(head.cpu(), "torch"))
        rec["eager_ms"] = eager_ms(lambda: fn(x, "triton"))
        rec["graph_ms"] = graph_ms(lambda: fn(x, "triton"))
        rec["torch_ms"] = eager_ms(lambda: fn(x, "torch"), rep=50)
        rec["bytes"] = nbytes(x, *got)
        rec["TB/s"] = rec["bytes"] / rec["graph_ms"] / 1e9
        rec["pct_copy"] = 100 * rec["TB/s"] / copy_bw
        rec["pct_4.25"] = 100 * rec["TB/s"] / H200_COPY_TBS
    except Exception as exc:  # record and carry on
        rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        traceback.print_exc()
    results.append(rec)


MOE_SHAPES = {  # 8192 tokens through the MoE layer of proxy-v3 (top-4 of 16 experts) or DeepSeek-V3 (top-8 of 256)
    "proxy-v3": (8192, 7168, 2048, 16, 4),
    "v3": (8192, 7168, 2048, 256, 8),
}


def fused_cases(quick: bool, dev, shape: str = "proxy-v3"):
    """(name, inputs, fused(backend), unfused(backend), reference float output or None, bytes read)"""
    t, h, i, e, k = MOE_SHAPES[shape]
    if SMOKE:
        t, h, i, e, k = (64, 256, 128, 4, 2)
    gen = torch.Generator(device=dev).manual_seed(0)
    repeat = max(1, t // 8)
    rows = t * k
    gate_up = torch.randn(rows, 2 * i, device=dev, generator=gen).to(torch.bfloat16)
    da = torch.randn(rows, i, device=dev, generator=gen).to(torch.bfloat16)
    x = torch.randn(t, h, device=dev, generator=gen).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(e, device=dev, generator=gen)[:k] for _ in range(8)]).repeat(repeat, 1)
    info = build_permute_info(idx, e, align=128)
    weight = torch.rand(t, k, device=dev, generator=gen)
    y_perm = torch.randn(info.num_rows, h, device=dev, generator=gen).to(torch.bfloat16)
    g32, u32 = gate_up[:, :i].float(), gate_up[:, i:].float()
    cases = []
    for one_pass in (False, True):
        cases.append((
            f"swiglu_quant {rows}x{i}{' one-pass' if one_pass else ''}", (gate_up,),
            lambda b, o=one_pass: swiglu_quant_op(gate_up, True, True, False, o, False, b),
            lambda b: q.act_quant_1x128_dual(swiglu_op(gate_up, b), backend=b),
            lambda: torch.nn.functional.silu(g32) * u32,
        ))  # fmt: skip
    cases.append((
        f"swiglu_backward_quant {rows}x{2 * i}", (gate_up, da),
        lambda b: swiglu_backward_quant_op(gate_up, da, True, True, False, False, False, b),
        lambda b: q.act_quant_1x128_dual(swiglu_backward_op(gate_up[:, :i], gate_up[:, i:], da, b), backend=b),
        None,
    ))  # fmt: skip
    cases.append((
        f"gather_quant (permutation) {info.num_rows}x{h}", (x,),
        lambda b: gather_quant_op(x, info.row_pair, k, None, None, True, True, False, False, False, b)[:4],
        lambda b: q.act_quant_1x128_dual(rows_from_tokens(x, info, backend=b)[0], backend=b),
        None,
    ))  # fmt: skip
    cases.append((
        f"gather_quant (combine backward, with dots) {info.num_rows}x{h}", (x, y_perm),
        lambda b: gather_quant_op(x, info.row_pair, k, weight, y_perm, True, True, False, False, False, b)[:4],
        lambda b: q.act_quant_1x128_dual(rows_from_tokens(x, info, weight=weight, y=y_perm, backend=b)[0], backend=b),
        None,
    ))  # fmt: skip
    return cases


def run_fused(name, inputs, fused, unfused, reference, copy_bw, results):
    rec = {"kernel": name}
    try:
        got = fused("triton")
        rec["config"] = picked(("producer_dual",) if "one-pass" in name else ("producer_rows", "producer_cols"))
        rec["mismatches_vs_unfused"] = mismatches(got, unfused("triton"))
        if reference is not None:
            rec["rel_err_vs_float_producer"] = dequant_error(got, reference())
        rec["graph_ms"] = graph_ms(lambda: fused("triton"))
        rec["eager_ms"] = eager_ms(lambda: fused("triton"))
        rec["unfused_graph_ms"] = graph_ms(lambda: unfused("triton"))
        rec["speedup_vs_unfused"] = rec["unfused_graph_ms"] / rec["graph_ms"]
        rec["bytes"] = nbytes(*inputs, *got)
        rec["TB/s"] = rec["bytes"] / rec["graph_ms"] / 1e9
        rec["pct_copy"] = 100 * rec["TB/s"] / copy_bw
        rec["pct_4.25"] = 100 * rec["TB/s"] / H200_COPY_TBS
    except Exception as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        traceback.print_exc()
    results.append(rec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the V3-sized shapes only (under two minutes)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter: checks the script")
    parser.add_argument("--transpose-words", action="store_true", help="W^T through 32-bit words "
                        "(quant_ops.TRANSPOSE_WORDS, off by default): the weight pairs' rows then time it")
    parser.add_argument("--moe-shape", choices=tuple(MOE_SHAPES), default="proxy-v3",
                        help="the MoE layer whose producer-fused quantizations are timed (default proxy-v3)")
    parser.add_argument("--fused-only", action="store_true", help="only the producer-fused kernels")
    parser.add_argument("--producer-order", choices=("rows", "columns", "both"), default="rows",
                        help="the producer kernels' launch order (quant_ops.PRODUCER_ROW_ORDER; rows is the default); "
                        "both: each fused case in the two orders, one after the other")
    parser.add_argument("--paired", choices=("on", "off", "both"), default="on",
                        help="SwiGLU's backward producer with dg and du of the same columns from one program "
                        "(quant_ops.SWIGLU_BACKWARD_PAIRED; on is the default); both: its case each way")
    args = parser.parse_args()
    quant_ops.TRANSPOSE_WORDS = args.transpose_words
    orders = ("rows", "columns") if args.producer_order == "both" else (args.producer_order,)
    pairings = (True, False) if args.paired == "both" else (args.paired == "on",)
    dev = device()
    import triton

    copy_bw = copy_bandwidth(dev)
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)",
            "torch": torch.__version__, "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
            "copy_TB/s": copy_bw}  # fmt: skip
    print(json.dumps(meta), flush=True)
    results: list[dict] = []
    for name, make, fn, kinds in () if args.fused_only else standalone_cases(args.quick, dev):
        run_standalone(name, make, fn, kinds, copy_bw, results)
        torch.cuda.empty_cache()
        print(" ", results[-1], flush=True)
    shipped = quant_ops.PRODUCER_ROW_ORDER, quant_ops.SWIGLU_BACKWARD_PAIRED
    for name, *case in fused_cases(args.quick, dev, args.moe_shape):
        for order in orders:
            for paired in pairings if name.startswith("swiglu_backward") else pairings[:1]:
                quant_ops.PRODUCER_ROW_ORDER = order == "rows"
                quant_ops.SWIGLU_BACKWARD_PAIRED = paired
                label = name + (" [column order]" if order == "columns" else "")
                label += " [unpaired]" if name.startswith("swiglu_backward") and not paired else ""
                run_fused(label, *case, copy_bw, results)
                torch.cuda.empty_cache()
                print(" ", results[-1], flush=True)
    quant_ops.PRODUCER_ROW_ORDER, quant_ops.SWIGLU_BACKWARD_PAIRED = shipped
    if not SMOKE:
        ResultsLog("bench_quant").save(meta=meta, results=results)
    print(f"\n{'kernel':>48} {'bad':>5} {'graph ms':>9} {'eager ms':>9} {'TB/s':>6} {'%copy':>6} {'%4.25':>6} "
          f"{'vs torch':>9} {'unfused':>8} {'speedup':>7}  config")  # fmt: skip
    for r in results:
        if "error" in r:
            print(f"{r['kernel']:>48} ERROR {r['error'][:80]}")
            continue
        bad = r.get("mismatches", 0) + r.get("ref_vs_cpu_mismatches", 0) + r.get("mismatches_vs_unfused", 0)
        vs_torch = f"{r['torch_ms'] / r['graph_ms']:>8.1f}x" if "torch_ms" in r else f"{'':>9}"
        unfused = (f"{r['unfused_graph_ms']:>8.3f} {r['speedup_vs_unfused']:>6.2f}x" if "unfused_graph_ms" in r
                   else f"{'':>16}")  # fmt: skip
        print(f"{r['kernel']:>48} {bad:>5} {r['graph_ms']:>9.3f} {r['eager_ms']:>9.3f} {r['TB/s']:>6.2f} "
              f"{r['pct_copy']:>6.1f} {r['pct_4.25']:>6.1f} {vs_torch} {unfused}  {r.get('config', '')}")  # fmt: skip
    errors = [r for r in results if "error" in r]
    bad = [r for r in results if r.get("mismatches", 0) or r.get("ref_vs_cpu_mismatches", 0)
           or r.get("mismatches_vs_unfused", 0)]  # fmt: skip
    print(f"\nerrors: {len(errors)}  inexact kernels: {len(bad)} (both must be 0)")


if __name__ == "__main__":
    main()
