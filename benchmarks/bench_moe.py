"""MoE layer forward+backward on one GPU: grouped (permute + grouped GEMMs) vs per-expert loop vs dense.

Run: `PYTHONPATH=src python benchmarks/bench_moe.py [--quick]`; appends a line to
benchmarks/results/bench_moe.jsonl (results_log.py) (`--smoke`: tiny shapes on the CPU interpreter, a
check of the script, records nothing). Shapes:
DeepSeek-V3's experts (H 7168, I 2048, 256 experts, top-8, 1 shared expert) at 4096-16384 tokens and the
decode regime (128-512 tokens); the `proxy-v3` preset's (V3's expert shape, 16 experts, top-4: 2048 rows
per expert at 8192 tokens, the regime of a GPU holding few experts); the `small` preset's. Balanced
routing (every expert exactly T*K/E rows) and skewed routing (Zipf s=1.2, some experts empty). The
router itself is not timed (routing is fixed so every layout sees the same loads).

Variants (each in try/except: a failure is recorded and the run carries on):
- loop:      per-expert loop layer (argsort once, then gather / SwiGLU / index_add per expert) with
             per-expert weight tensors, as a ModuleList of experts would have.
- grouped:   coscale.kernels.moe.grouped_experts_forward, BF16 (torch._grouped_mm + Triton data movement).
- grouped_triton: the same with the Triton grouped GEMM (subset of cases: autotuning costs time).
- grouped_fp8: precision="fp8" (block-scaled 1x128/128x128 Triton grouped GEMMs), the routed experts
             as one autograd node with every quantization fused into its producer
             (coscale.kernels.fp8_moe), expert weights quantized in every call (what one micro-batch
             per optimizer step pays).
- grouped_fp8_cached: the same with an FP8WeightCache and unchanged weights (inference, and
             the micro-batches after the first of an optimizer step).
- grouped_fp8_unfused: the separate FP8 operations (permute, quantize, grouped GEMMs, SwiGLU, ...),
             what coscale ran before the fused path; the same bits.
- grouped_fp8_one_pass: the cached path with both layouts of each quantization from one launch.
- grouped_fp8_per_copy: the cached path with every permuted copy of x quantized in the gather instead of
             x quantized once per token and its FP8 rows gathered (coscale.kernels.fp8_moe.QUANTIZE_TOKENS_ONCE,
             the default since run 38; grouped_fp8_tokens_once in runs 37-38); the same bits.
- grouped_fp8_unpaired: the cached path with SwiGLU's backward producer unpaired (each element computing both
             gradients to keep one; coscale.kernels.quant_ops.SWIGLU_BACKWARD_PAIRED, the default since run 44);
             the same bits.
- grouped_fp8_shared_fp8: the cached path with the shared expert in FP8 too, as one expert that every token
             picks (coscale.kernels.fp8_moe.fp8_swiglu_mlp, what SharedExperts runs under the FP8 policy), its
             weights in the same cache.
- grouped_fp8_shared_grouped / grouped_fp8_shared_dense: grouped_fp8_shared_fp8 with the shared expert's six
             GEMMs through the grouped kernels / through the dense block-scaled GEMM (cuBLAS) on the same FP8 operands
             (fp8_moe.DENSE_GEMMS_FOR_ONE_EXPERT off / on; grouped_fp8_shared_fp8 runs the shipped choice).
- dense:     a dense SwiGLU MLP over T*K rows with one expert's shape: the same FLOPs in plain GEMMs.
All variants but grouped_fp8_shared_* include the shared expert as a dense SwiGLU MLP over the
T tokens in BF16 (cuBLAS). Every variant
but the loop (which reads expert counts back to the host) is also timed replayed from a CUDA graph
(`graph_ms`: the kernels alone, as the graphed training step runs them); the FP8 / BF16 ratios use
those times.

FLOPs (fwd+bwd) = 3 GEMMs x 2*rows*H*I x 3 (forward, dgrad, wgrad), rows = T*K routed + T shared.
Correctness: every grouped variant's output, grad x, grad topk_weight and grad w_down of a few
experts are compared with the loop layer (relative norm), and experts without tokens must get
exactly zero weight gradients.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
import traceback

import torch
import torch.nn.functional as F

# isort: off
# first: --smoke sets TRITON_INTERPRET before coscale's kernels decorate
from gpu_timing import SMOKE, device, graph_ms
# isort: on

from coscale.config import get_preset
from coscale.fp8 import FP8WeightCache
from coscale.kernels import fp8_moe, quant_ops
from coscale.kernels.moe import grouped_experts_forward
from results_log import ResultsLog

BF16_PEAK_TFLOPS = 800.0  # H100 dense bf16 matmul ceiling measured at 8192^3 (shared/reference)


# ---- routing ---------------------------------------------------------------------------------
def make_routing(kind: str, T: int, K: int, E: int, gen: torch.Generator, device):
    if kind == "balanced":  # token t takes experts (t*K + k) mod E under a random relabelling
        base = (torch.arange(T)[:, None] * K + torch.arange(K)[None, :]) % E
        idx = torch.randperm(E, generator=gen)[base]
    else:  # Zipf-like: expert of rank r drawn with probability ~ 1 / r^1.2, no repeats per token
        probs = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
        probs = probs[torch.randperm(E, generator=gen)]
        idx = torch.multinomial(probs.expand(T, E), K, replacement=False, generator=gen)
    weight = torch.rand(T, K, generator=gen) + 0.1
    weight = weight / weight.sum(-1, keepdim=True) * 2.5
    return idx.to(device), weight.to(device)


# ---- layers ----------------------------------------------------------------------------------
def shared_mlp(x, sg, su, sd):
    return F.linear(F.silu(F.linear(x, sg)) * F.linear(x, su), sd)


def loop_layer(x, idx, weight, experts, shared):
    """Per-expert loop: gather, SwiGLU, weighted scatter-add (one host sync for the counts)."""
    T, K = idx.shape
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    token = order // K
    w_sorted = weight.flatten()[order]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    start = 0
    for (wg, wu, wd), n in zip(experts, counts):
        if n:
            tok = token[start : start + n]
            h = x[tok]
            y = F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)
            out = out.index_add(0, tok, y.float() * w_sorted[start : start + n, None])
        start += n
    return out.to(x.dtype) + shared_mlp(x, *shared)


def grouped_layer(x, idx, weight, w_gate, w_up, w_down, shared, precision="bf16", backend="auto", cache=None,
                  fused=True, shared_fp8=False):  # fmt: skip
    routed = grouped_experts_forward(
        x, idx, weight, w_gate, w_up, w_down, precision=precision, backend=backend, fp8_weight_cache=cache,
        fused=fused,
    )
    if shared_fp8:
        return routed + fp8_moe.fp8_swiglu_mlp(x, *shared, backend=backend, weight_cache=cache)
    return routed + shared_mlp(x, *shared)


def dense_layer(x_rows, wg, wu, wd, x, shared):
    return shared_mlp(x_rows, wg, wu, wd), shared_mlp(x, *shared)


# ---- measuring -------------------------------------------------------------------------------
def bench(fn, quick: bool) -> dict:
    if SMOKE:  # CPU check of the script's logic only
        fn()
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return {"median_ms": ms, "min_ms": ms, "max_ms": ms, "n": 1}
    import triton.testing

    fn()  # compile / autotune / cuBLAS handles
    torch.cuda.synchronize()
    times = triton.testing.do_bench(
        fn, warmup=25 if quick else 50, rep=100 if quick else 250, return_mode="all"
    )
    times = sorted(times)
    return {"median_ms": times[len(times) // 2], "min_ms": times[0], "max_ms": times[-1], "n": len(times)}


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_case(shape, T, routing, args, results):
    name, H, I, E, K, n_shared = shape
    device = args.device
    gen = torch.Generator().manual_seed(args.seed + T)
    dt = torch.bfloat16
    case = {"shape": name, "tokens": T, "routing": routing, "H": H, "I": I, "E": E, "K": K}
    idx, weight = make_routing(routing, T, K, E, gen, device)
    counts = torch.bincount(idx.flatten(), minlength=E)
    case["rows_per_expert_max"] = int(counts.max())
    case["empty_experts"] = int((counts == 0).sum())
    flops = 18.0 * (T * K * H * I + T * H * I * n_shared)
    flops_fwd = flops / 3
    case["tflop_fwd_bwd"] = flops / 1e12

    torch.manual_seed(args.seed)
    x = (torch.randn(T, H, device=device) * 0.5).to(dt).requires_grad_()
    topw = weight.float().requires_grad_()
    w_gate = (torch.randn(E, I, H, device=device, dtype=dt) * H**-0.5).requires_grad_()
    w_up = (torch.randn(E, I, H, device=device, dtype=dt) * H**-0.5).requires_grad_()
    w_down = (torch.randn(E, H, I, device=device, dtype=dt) * I**-0.5).requires_grad_()
    Is = I * n_shared
    shared = [
        (torch.randn(Is, H, device=device, dtype=dt) * H**-0.5).requires_grad_(),
        (torch.randn(Is, H, device=device, dtype=dt) * H**-0.5).requires_grad_(),
        (torch.randn(H, Is, device=device, dtype=dt) * Is**-0.5).requires_grad_(),
    ]
    grad_out = torch.randn(T, H, device=device, dtype=dt)
    # per-expert leaf views of the same storage: the loop layer's "ModuleList" weights
    base = (w_gate.detach(), w_up.detach(), w_down.detach())
    experts = [tuple(b[e].requires_grad_() for b in base) for e in range(E)]
    check_experts = sorted({0, 1, int(counts.argmax()), int(counts.argmin())})

    def loop_fn():
        out = loop_layer(x, idx, topw, experts, shared)
        wanted = [x, topw, *[experts[e][2] for e in check_experts], *shared]
        grads = torch.autograd.grad(out, wanted, grad_out, allow_unused=True)
        return out, [torch.zeros_like(w) if g is None else g for w, g in zip(wanted, grads)]

    variants = {"loop": None, "grouped": ("bf16", "auto")}
    if args.triton_variant(name, T, routing):
        variants["grouped_triton"] = ("bf16", "triton")
    variants["grouped_fp8"] = ("fp8", "auto")
    # FP8 copies of the weights kept from the previous call (weights unchanged): what inference and
    # every micro-batch after the first in an optimizer step pay
    variants["grouped_fp8_cached"] = ("fp8", "auto", True)
    variants["grouped_fp8_unfused"] = ("fp8", "auto", False, False)
    variants["grouped_fp8_one_pass"] = ("fp8", "auto", True, True, True)
    variants["grouped_fp8_per_copy"] = ("fp8", "auto", True, True, False, False)
    variants["grouped_fp8_unpaired"] = ("fp8", "auto", True, True, False, TOKENS_ONCE_DEFAULT, False)
    variants["grouped_fp8_shared_fp8"] = ("fp8", "auto", True, True, False, TOKENS_ONCE_DEFAULT, PAIRED_DEFAULT, True)
    for route, dense in (("grouped", False), ("dense", True)):
        variants[f"grouped_fp8_shared_{route}"] = ("fp8", "auto", True, True, False, TOKENS_ONCE_DEFAULT,
                                                   PAIRED_DEFAULT, True, dense)
    variants["dense"] = None
    if args.variants:  # in the order given; the loop layer still gives the reference values below
        variants = {k: variants[k] for k in dict.fromkeys(args.variants) if k in variants}

    # reference values from the loop layer (bf16)
    try:
        ref_out, ref_grads = loop_fn()
        ref = {"out": ref_out.detach(), "gx": ref_grads[0], "gw": ref_grads[1],
               "gwd": torch.stack(ref_grads[2 : 2 + len(check_experts)])}
        del ref_out, ref_grads
    except Exception as exc:  # noqa: BLE001
        ref = None
        case["reference_error"] = f"{type(exc).__name__}: {exc}"[:300]

    for variant, spec in variants.items():
        entry = dict(case, variant=variant)
        cache = None  # the cached variant's FP8WeightCache
        try:
            if variant == "loop":
                def step():
                    loop_fn()

                def fwd():
                    with torch.no_grad():
                        loop_layer(x, idx, topw, experts, shared)
            elif variant == "dense":
                rows = torch.randn(T * K, H, device=device, dtype=dt).requires_grad_()
                dense_w = [w.detach()[0].clone().requires_grad_() for w in (w_gate, w_up, w_down)]
                grad_rows = torch.randn(T * K, H, device=device, dtype=dt)

                def step(rows=rows, dense_w=dense_w, grad_rows=grad_rows):
                    a, b = dense_layer(rows, *dense_w, x, shared)
                    torch.autograd.grad([a, b], [rows, x, *dense_w, *shared], [grad_rows, grad_out])

                def fwd(rows=rows, dense_w=dense_w):
                    with torch.no_grad():
                        dense_layer(rows, *dense_w, x, shared)
            else:
                precision, backend, cached, fused, one_pass, tokens_once, paired, shared_fp8, shared_dense = (
                    *spec, False, True, False, TOKENS_ONCE_DEFAULT, PAIRED_DEFAULT, False, DENSE_DEFAULT)[:9]
                cache = FP8WeightCache() if cached else None
                quant_ops.DUAL_ONE_PASS = one_pass
                fp8_moe.QUANTIZE_TOKENS_ONCE = tokens_once
                quant_ops.SWIGLU_BACKWARD_PAIRED = paired
                fp8_moe.DENSE_GEMMS_FOR_ONE_EXPERT = shared_dense

                def layer(precision=precision, backend=backend, cache=cache, fused=fused, shared_fp8=shared_fp8):
                    return grouped_layer(x, idx, topw, w_gate, w_up, w_down, shared, precision, backend, cache,
                                         fused, shared_fp8)

                def step(layer=layer):
                    torch.autograd.grad(layer(), [x, topw, w_gate, w_up, w_down, *shared], grad_out)

                def fwd(layer=layer):
                    with torch.no_grad():
                        layer()

                # correctness against the loop layer
                out = layer()
                gx, gw, gwg, gwu, gwd = torch.autograd.grad(out, [x, topw, w_gate, w_up, w_down], grad_out)
                if ref is not None:
                    entry["err_out"] = rel(out, ref["out"])
                    entry["err_grad_x"] = rel(gx, ref["gx"])
                    entry["err_grad_topk_weight"] = rel(gw, ref["gw"])
                    entry["err_grad_w_down"] = rel(gwd[check_experts], ref["gwd"])
                empty = counts == 0
                if bool(empty.any()):
                    entry["empty_expert_grads_zero"] = all(
                        float(g[empty].abs().max()) == 0.0 for g in (gwg, gwu, gwd)
                    )
                tol = 0.1 if precision == "fp8" else 0.02  # e4m3: ~6% relative norm over 3 GEMMs
                entry["correct"] = bool(
                    entry.get("empty_expert_grads_zero", True)
                    and all(entry.get(k, 0.0) < tol for k in ("err_out", "err_grad_x", "err_grad_w_down"))
                )
                del out, gx, gw, gwg, gwu, gwd
            timing = bench(step, args.quick)
            entry["fwd_bwd_ms"] = timing["median_ms"]
            entry["fwd_bwd_spread_ms"] = [timing["min_ms"], timing["max_ms"]]
            entry["tflops"] = flops / (timing["median_ms"] * 1e-3) / 1e12
            entry["pct_of_800"] = 100 * entry["tflops"] / BF16_PEAK_TFLOPS
            if variant != "loop":  # the loop reads its expert counts back: not capturable
                entry["graph_ms"] = graph_ms(step, rep=100 if args.quick else 250)
                entry["graph_tflops"] = flops / (entry["graph_ms"] * 1e-3) / 1e12
            if T <= 1024:  # decode: forward alone is what serving pays
                ft = bench(fwd, args.quick)
                entry["fwd_ms"] = ft["median_ms"]
                entry["fwd_tflops"] = flops_fwd / (ft["median_ms"] * 1e-3) / 1e12
        except Exception as exc:  # noqa: BLE001 - record and carry on
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
            entry["traceback"] = traceback.format_exc()[-2000:]
        finally:
            quant_ops.DUAL_ONE_PASS = False
            fp8_moe.QUANTIZE_TOKENS_ONCE = TOKENS_ONCE_DEFAULT
            quant_ops.SWIGLU_BACKWARD_PAIRED = PAIRED_DEFAULT
            fp8_moe.DENSE_GEMMS_FOR_ONE_EXPERT = DENSE_DEFAULT
            if cache is not None:
                cache.invalidate()  # the cached variant's FP8 weights (up to 2 bytes per parameter)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        results.append(entry)
        status = entry.get("error", f"{entry.get('fwd_bwd_ms', float('nan')):.3f} ms, graphed "
                                    f"{entry.get('graph_ms', float('nan')):.3f} ms")
        print(f"  {name:8s} T={T:6d} {routing:8s} {variant:22s} {status}", flush=True)
    # ratios within the case
    by = {r["variant"]: r for r in results if r.get("shape") == name and r["tokens"] == T and r["routing"] == routing}
    for r in by.values():
        if "fwd_bwd_ms" not in r:
            continue
        if "fwd_bwd_ms" in by.get("loop", {}):
            r["speedup_vs_loop"] = by["loop"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            if "fwd_ms" in r and "fwd_ms" in by["loop"]:
                r["fwd_speedup_vs_loop"] = by["loop"]["fwd_ms"] / r["fwd_ms"]
        if "tflops" in by.get("dense", {}):
            r["frac_of_dense"] = r["tflops"] / by["dense"]["tflops"]
        if "fwd_bwd_ms" in by.get("grouped", {}):
            r["speedup_vs_bf16_grouped"] = by["grouped"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        if "graph_ms" in by.get("grouped", {}) and "graph_ms" in r:
            r["graph_speedup_vs_bf16_grouped"] = by["grouped"]["graph_ms"] / r["graph_ms"]
    ref = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


TOKENS_ONCE_DEFAULT = fp8_moe.QUANTIZE_TOKENS_ONCE  # the shipped choices, restored after each variant
PAIRED_DEFAULT = quant_ops.SWIGLU_BACKWARD_PAIRED
DENSE_DEFAULT = fp8_moe.DENSE_GEMMS_FOR_ONE_EXPERT
VARIANT_NAMES = ("loop", "grouped", "grouped_triton", "grouped_fp8", "grouped_fp8_cached", "grouped_fp8_unfused",
                 "grouped_fp8_one_pass", "grouped_fp8_per_copy", "grouped_fp8_unpaired", "grouped_fp8_shared_fp8",
                 "grouped_fp8_shared_grouped", "grouped_fp8_shared_dense", "dense")


def print_table(results):
    header = (f"{'shape':8s} {'T':>6s} {'routing':8s} {'variant':22s} {'ms':>9s} {'graph ms':>9s} {'TFLOP/s':>8s} "
              f"{'%800':>5s} {'xloop':>6s} {'/dense':>6s} {'xbf16':>6s} {'fwd ms':>8s} {'fwd xloop':>9s} {'ok':>3s}")
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['shape']:8s} {r['tokens']:6d} {r['routing']:8s} {r['variant']:22s} ERROR {r['error'][:60]}")
            continue

        def f(key, fmt, r=r):
            return format(r[key], fmt) if key in r else "-"

        ok = {True: "yes", False: "NO"}.get(r.get("correct"), "-")
        print(f"{r['shape']:8s} {r['tokens']:6d} {r['routing']:8s} {r['variant']:22s} {f('fwd_bwd_ms', '9.3f')} "
              f"{f('graph_ms', '9.3f')} {f('tflops', '8.1f')} {f('pct_of_800', '5.1f')} {f('speedup_vs_loop', '6.2f')} "
              f"{f('frac_of_dense', '6.2f')} {f('graph_speedup_vs_bf16_grouped', '6.2f')} {f('fwd_ms', '8.3f')} "
              f"{f('fwd_speedup_vs_loop', '9.2f')} {ok:>3s}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few cases only (about a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", type=int, nargs="+", metavar="T",
                        help="DeepSeek-V3-shape cases at these token counts only (both routings unless --routing)")
    parser.add_argument("--routing", choices=("balanced", "skewed"), help="with --tokens: one routing only")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter: checks the script")
    parser.add_argument("--variants", nargs="+", metavar="NAME", choices=VARIANT_NAMES,
                        help=f"time only these variants, in this order (of {', '.join(VARIANT_NAMES)})")
    args = parser.parse_args()
    if args.tokens is not None and any(t < 1 for t in args.tokens):
        parser.error("--tokens takes positive token counts")
    if args.routing is not None and args.tokens is None:
        parser.error("--routing applies to --tokens cases")
    if args.tokens is not None and args.quick:
        parser.error("--tokens and --quick choose the cases in two ways; give one")
    args.device = device()
    small = get_preset("small")
    v3 = ("dsv3", 7168, 2048, 256, 8, 1)
    proxy = ("proxy-v3", 7168, 2048, 16, 4, 1)  # V3's expert shape, 16 experts top-4 (the proxy-v3 preset)
    sm = ("small", small.hidden_size, small.moe_intermediate_size, small.n_routed_experts,
          small.num_experts_per_tok, small.n_shared_experts or 0)
    if SMOKE:
        plan = [(("smoke", 128, 128, 4, 2, 1), 64, "balanced"), (("smoke", 128, 128, 4, 2, 1), 64, "skewed")]
        triton_cases = set()
    elif args.tokens is not None:
        plan = [(v3, T, r) for T in args.tokens for r in ((args.routing,) if args.routing else ("balanced", "skewed"))]
        triton_cases = set()
    elif args.quick:
        plan = [(v3, 8192, "balanced"), (proxy, 8192, "balanced"), (v3, 128, "balanced"), (sm, 8192, "balanced")]
        triton_cases = set()
    else:
        plan = [(v3, T, r) for T in (4096, 8192, 16384, 128, 512) for r in ("balanced", "skewed")]
        plan += [(proxy, T, r) for T in (8192, 16384) for r in ("balanced", "skewed")]
        plan += [(sm, T, r) for T in (8192, 256) for r in ("balanced", "skewed")]
        triton_cases = {("dsv3", 8192, "balanced"), ("dsv3", 128, "balanced"), ("small", 8192, "balanced")}
    args.triton_variant = lambda name, T, r: (name, T, r) in triton_cases

    import triton

    meta = {
        "device": torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
        "bf16_peak_tflops": BF16_PEAK_TFLOPS,
    }
    print(json.dumps(meta))
    log = None if SMOKE else ResultsLog("bench_moe")
    results: list[dict] = []
    start = time.time()
    for shape, T, routing in plan:
        run_case(shape, T, routing, args, results)
        if log is not None:
            log.save(meta=meta, results=results)  # keep partial results if the lease ends mid-run
    meta["wall_s"] = time.time() - start
    if log is not None:
        log.save(meta=meta, results=results)
    print_table(results)
    print(json.dumps({"meta": meta, "n_results": len(results),
                      "errors": sum("error" in r for r in results)}))


if __name__ == "__main__":
    main()
