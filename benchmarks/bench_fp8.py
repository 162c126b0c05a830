"""FP8 GEMMs and FP8Linear on one GPU at DeepSeek-V3's linear shapes, side by side in one run.

Run: python benchmarks/bench_fp8.py [--quick] [--tokens 4096 8192 16384]
(appends a line to benchmarks/results/bench_fp8.jsonl, see results_log.py)
     python benchmarks/bench_fp8.py --smoke     (tiny shapes on the CPU interpreter: checks the script)

Per (tokens T, in K, out N) and GEMM direction (fwd Y = X W^T, dgrad dX = dY W, wgrad dW = dY^T X):
  bf16          torch.matmul on BF16 operands (the baseline)
  fp8_tensor    torch._scaled_mm with one scale per tensor (cuBLAS ceiling, ~1300 TFLOP/s on H100)
  fp8_cublas    coscale fp8_gemm backend="cublas" (block-scaled 1x128 / 128x128), GEMM only; shapes cuBLAS
                would get wrong (128x128 scales with K % 512 != 0, e.g. kv_a_proj dgrad) raise and show ERR
  fp8_triton    coscale fp8_gemm backend="triton" (block-scaled, FP32 promotion every 128), GEMM only
  fp8_triton_tma the grouped TMA kernels of coscale.kernels.fp8_grouped_gemm with one expert, GEMM only
  fp8_gluon     the warp-specialized Gluon kernels (coscale.kernels._fp8_grouped_gluon, sm_90) with one expert, the
                fastest of their candidates (timed once each here: the wgrad kernel is in no picker), GEMM only
and end to end, forward + backward including every quantization:
  linear_bf16   nn.Linear in BF16            linear_fp8 / linear_fp8_triton   FP8Linear (auto / triton)
  linear_fp8_cached   FP8Linear with its FP8 weight cache (weights unchanged: what every micro-batch
                after the first of an optimizer step, and inference, pay)
Every variant is checked first: relative Frobenius error against an FP32 matmul of the unquantized
inputs (< 0.07 for block-scaled FP8, see tests/test_fp8_gemm.py; < 0.01 for bf16). GEMM timings are
medians of triton.testing.do_bench; the layers are timed both eagerly (``ms``, Python's launches
included) and replayed from a CUDA graph (``graph_ms``: the kernels alone, as the graphed training
step runs them; the speedup column uses these). TFLOP/s counts 2*M*N*K per GEMM (6*T*K*N for forward
+ backward). Goal: linear_fp8 >= 1.4x linear_bf16 at T >= 8192 with K, N >= 4096. A failing variant is
recorded and skipped.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

# isort: off
# first: --smoke sets TRITON_INTERPRET before coscale's kernels decorate
from gpu_timing import SMOKE, device, eager_ms, graph_ms
# isort: on

from results_log import ResultsLog

SHAPES = [  # (K in, N out, name)
    (7168, 1536, "q_a_proj"),
    (7168, 576, "kv_a_proj"),
    (1536, 24576, "q_b_proj"),
    (16384, 7168, "o_proj"),
    (7168, 18432, "dense_up"),
    (18432, 7168, "dense_down"),
    (7168, 4096, "expert_up"),
    (2048, 7168, "expert_down"),
]
QUICK_SHAPES = ["q_a_proj", "o_proj", "dense_up", "expert_up"]  # the 1.4x goal's K, N >= 4096, and one below


def bench(fn):
    return eager_ms(fn, rep=100)


def rel(out, ref):
    return float((out.float() - ref).norm() / ref.norm())


def tensorwise(a8, b8, one):
    return torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


def gemm_cases(t, k, n, dev):
    """Operands of the three directions: (bf16 a, bf16 b) with C = a @ b^T, and their FP8 forms."""
    from coscale.kernels import quant as q

    x = torch.randn(t, k, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(n, k, device=dev) * k**-0.5).to(torch.bfloat16)
    dy = (torch.randn(t, n, device=dev) * 1e-3).to(torch.bfloat16)
    xq, xs, xt, xts = q.act_quant_1x128_dual(x)
    wq, ws, wq_t, ws_t = q.weight_quant_128x128_dual(w)  # W^T's FP8 bytes from the same pass
    dyq, dys, dyt, dyts = q.act_quant_1x128_dual(dy)
    return {
        "fwd": ((x, w), (xq, xs, wq, ws), (t, n)),
        "dgrad": ((dy, w.t()), (dyq, dys, wq_t, ws_t), (t, k)),
        "wgrad": ((dy.t(), x.t()), (dyt, dyts, xt, xts), (n, k)),
    }


def one_expert_tma(direction, a, a_scale, b, b_scale):
    """The grouped TMA kernel with one expert owning every row, as a function of nothing: the offsets
    and the tile -> expert map are built here, outside the timed call."""
    from coscale.kernels import fp8_grouped_gemm as G

    if direction == "wgrad":  # a = dY^T [N, T], b = X^T [K, T]: one expert owning all T tokens
        ends = torch.tensor([a.shape[1]], dtype=torch.int32, device=a.device)
        return lambda: G.fp8_grouped_wgrad(a, a_scale, b, b_scale, ends, out_dtype=torch.bfloat16)[0]
    ends = torch.tensor([a.shape[0]], dtype=torch.int32, device=a.device)
    tile_expert = G.expert_tile_map(ends, a.shape[0])
    return lambda: G.fp8_grouped_mm(a, a_scale, b[None], b_scale[None], ends, tile_expert=tile_expert)


def one_expert_gluon(direction, a, a_scale, b, b_scale):
    """The Gluon kernels with one expert owning every row: on its first call, each candidate is timed once and
    the fastest kept (the candidates that cannot run here are skipped; none at all raises)."""
    from coscale.kernels import _fp8_grouped_gluon as gm
    from coscale.kernels import fp8_grouped_gemm as G
    from coscale.kernels import fp8_grouped_kernels as kernels

    ends = torch.tensor([a.shape[1] if direction == "wgrad" else a.shape[0]], dtype=torch.int32, device=a.device)
    if direction == "wgrad":  # a = dY^T [N, T], b = X^T [K, T]
        out = torch.empty(1, a.shape[0], b.shape[0], device=a.device, dtype=torch.bfloat16)
        runs = [lambda cfg=cfg: kernels.launch_grouped_wgrad(a, a_scale, b, b_scale, ends, out,
                                                             {**cfg, "GLUON": True})[0]
                for cfg in gm.GLUON_WGRAD_CANDIDATES]
    else:
        tile_expert = G.expert_tile_map(ends, a.shape[0])
        c = torch.empty(a.shape[0], b.shape[0], device=a.device, dtype=torch.bfloat16)
        runs = [lambda cfg=cfg: kernels.launch_grouped_mm(a, a_scale, b[None], b_scale[None], tile_expert, c,
                                                          {**cfg, "GLUON": True})
                for cfg in gm.GLUON_MM_CANDIDATES]
    picked = []

    def run():
        if not picked:
            timed = []
            for i, fn in enumerate(runs):
                try:
                    timed.append((bench(fn), i, fn))
                except (RuntimeError, ValueError):  # no sm_90 / Gluon here, or a shape the candidate declines
                    continue
            if not timed:
                raise RuntimeError("no Gluon candidate runs here")
            picked.append(min(timed)[2])
        return picked[0]()

    return run


def run_gemms(t, k, n, name, dev, results):
    from coscale.kernels.fp8_gemm import fp8_gemm

    cases = gemm_cases(t, k, n, dev)
    ones = torch.ones((), device=dev)
    for direction, ((a, b), fp8_ops, (r, c)) in cases.items():
        flops = 2 * a.shape[0] * b.shape[0] * a.shape[1]
        ref = a.float() @ b.float().t()
        a8 = fp8_ops[0]
        b8 = fp8_ops[2]
        variants = {
            "bf16": (lambda a=a, b=b: a @ b.t(), 0.01),
            "fp8_tensor": (lambda a8=a8, b8=b8: tensorwise(a8, b8, ones), None),
            "fp8_cublas": (lambda ops=fp8_ops: fp8_gemm(*ops, backend="cublas"), 0.07),
            "fp8_triton": (lambda ops=fp8_ops: fp8_gemm(*ops, backend="triton"), 0.07),
            # the grouped TMA kernels with one expert (the wgrad is the K-grouped one over all tokens)
            "fp8_triton_tma": (one_expert_tma(direction, *fp8_ops), 0.07),
            "fp8_gluon": (one_expert_gluon(direction, *fp8_ops), 0.07),
        }
        for variant, (fn, bound) in variants.items():
            rec = {"shape": name, "T": t, "K": k, "N": n, "direction": direction, "variant": variant}
            try:
                out = fn()
                if bound is not None:
                    rec["rel_err"] = rel(out[:r, :c], ref)
                    rec["ok"] = rec["rel_err"] < bound
                ms = bench(fn)
                rec.update(ms=ms, tflops=flops / ms / 1e9)
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                traceback.print_exc()
            results.append(rec)
        del ref
    del cases


def run_linear(t, k, n, name, dev, results):
    from coscale.fp8 import FP8Linear

    torch.manual_seed(0)
    base = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
    x = torch.randn(t, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = (torch.randn(t, n, device=dev) * 1e-3).to(torch.bfloat16)
    with torch.no_grad():  # FP32 reference of the unquantized layer
        w32 = base.weight.float()
        ref_y = x.detach().float() @ w32.t()
        ref_dx = dy.float() @ w32
        ref_dw = dy.float().t() @ x.detach().float()
    layers = {"linear_bf16": base}
    for variant, backend in (("linear_fp8", "auto"), ("linear_fp8_triton", "triton"), ("linear_fp8_cached", "auto")):
        layers[variant] = FP8Linear.from_linear(base, backend=backend)
    layers["linear_fp8_cached"].fp8_weight_cache = True
    for variant, layer in layers.items():
        rec = {"shape": name, "T": t, "K": k, "N": n, "direction": "fwd+bwd", "variant": variant}
        try:

            def step(layer=layer):
                x.grad = None
                layer.weight.grad = None
                layer(x).backward(dy)

            step()
            bound = 0.01 if variant == "linear_bf16" else 0.07
            with torch.no_grad():
                y = layer(x)
            errs = [rel(y, ref_y), rel(x.grad, ref_dx), rel(layer.weight.grad, ref_dw)]
            rec.update(rel_err=max(errs), rel_errs=errs, ok=max(errs) < bound)
            ms = bench(step)
            gms = graph_ms(step)
            rec.update(ms=ms, graph_ms=gms, tflops=6 * t * k * n / gms / 1e9, eager_tflops=6 * t * k * n / ms / 1e9)
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
        results.append(rec)
    layers["linear_fp8_cached"].fp8_weight_cache = None


def summary(results):
    """One line per (shape, T, direction): TFLOP/s of each variant and the speedup over bf16."""
    keyed = {}
    for r in results:
        keyed.setdefault((r["shape"], r["T"], r["direction"]), {})[r["variant"]] = r
    lines = []
    cols = ["bf16", "fp8_tensor", "fp8_cublas", "fp8_triton", "fp8_triton_tma", "fp8_gluon",
            "linear_bf16", "linear_fp8", "linear_fp8_triton", "linear_fp8_cached"]
    header = f"{'shape':>12} {'T':>6} {'dir':>7} " + " ".join(f"{c[:11]:>11}" for c in cols) + "  speedup  ok"
    lines.append(header)
    for (shape, t, direction), variants in keyed.items():
        cells, base, best, oks = [], None, None, []
        for c in cols:
            r = variants.get(c)
            if r is None:
                cells.append(f"{'':>11}")
            elif "error" in r:
                cells.append(f"{'ERR':>11}")
            else:
                cells.append(f"{r['tflops']:>11.0f}")
                oks.append(r.get("ok", True))
                ms = r.get("graph_ms", r["ms"])
                if c in ("bf16", "linear_bf16"):
                    base = ms
                elif c in ("fp8_cublas", "fp8_triton", "fp8_triton_tma", "fp8_gluon", "linear_fp8",
                           "linear_fp8_triton"):
                    best = ms if best is None else min(best, ms)
        speed = f"{base / best:7.2f}x" if base and best else f"{'-':>8}"
        lines.append(f"{shape:>12} {t:>6} {direction:>7} " + " ".join(cells) + f" {speed} {all(oks)!s:>4}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8192 tokens, four shapes")
    parser.add_argument("--tokens", type=int, nargs="*", default=None)
    parser.add_argument("--shapes", nargs="*", default=None, help=f"subset of {[s[2] for s in SHAPES]}")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter: checks the script")
    parser.add_argument("--dual-one-pass", choices=("default", "on", "off"), default="default",
                        help="X's and dY's two layouts from one launch (on) or two (off); default: "
                             "coscale.kernels.quant_ops.DUAL_ONE_PASS")
    parser.add_argument("--overlap-quant", choices=("default", "on", "off"), default="default",
                        help="FP8Linear's transposed layouts on a side stream (on) or not (off); default: "
                             "coscale.fp8.linear.OVERLAP_TRANSPOSED_QUANT")
    args = parser.parse_args()
    from coscale.fp8 import linear as fp8_linear_module
    from coscale.kernels import quant_ops

    if args.dual_one_pass != "default":
        quant_ops.DUAL_ONE_PASS = args.dual_one_pass == "on"
    if args.overlap_quant != "default":
        fp8_linear_module.OVERLAP_TRANSPOSED_QUANT = args.overlap_quant == "on"
    dev = device()
    log = None if SMOKE else ResultsLog("bench_fp8")
    import triton

    from coscale.kernels.fp8_gemm import cublas_blockwise_supported

    tokens = args.tokens or ([8192] if args.quick else [4096, 8192, 16384])
    wanted = args.shapes or (QUICK_SHAPES if args.quick else [s[2] for s in SHAPES])
    shapes = SHAPES
    if SMOKE:
        tokens, shapes, wanted = [256], [(256, 384, "smoke")], ["smoke"]
    meta = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke)", "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cublas_forms": {f"{ga}x{gb}": cublas_blockwise_supported(dev, ga, gb) for ga, gb in ((1, 128), (1, 1))},
        "dual_one_pass": quant_ops.DUAL_ONE_PASS,
        "overlap_transposed_quant": fp8_linear_module.OVERLAP_TRANSPOSED_QUANT,
    }  # fmt: skip
    print(json.dumps(meta))
    results = []
    for t in tokens:
        for k, n, name in shapes:
            if name not in wanted:
                continue
            for runner in (run_gemms, run_linear):
                try:
                    runner(t, k, n, name, dev, results)
                except Exception as exc:  # e.g. out of memory while building inputs
                    results.append({"shape": name, "T": t, "K": k, "N": n, "direction": runner.__name__,
                                    "variant": "setup", "error": f"{type(exc).__name__}: {exc}"})  # fmt: skip
                    traceback.print_exc()
                torch.cuda.empty_cache()
            if log is not None:
                log.save(meta=meta, results=results)  # keep partial results if the lease ends mid-run
    errors = [r for r in results if "error" in r]
    bad = [r for r in results if r.get("ok") is False]
    print(f"\nerrors: {len(errors)}  failed correctness: {len(bad)}")
    for r in errors + bad:
        print(" ", {k: r[k] for k in r if k in ("shape", "T", "direction", "variant", "error", "rel_err")})
    print("TFLOP/s (fwd+bwd rows count 6TKN, graphed); speedup = bf16 time / best fp8 time (graphed for layers)")
    print(summary(results))


if __name__ == "__main__":
    main()
