"""Block-scaled FP8 grouped GEMM: every kernel configuration side by side with cuBLAS baselines.

Run: `PYTHONPATH=src python3 benchmarks/tune_fp8_grouped.py [--tokens 8192]`; appends a line to
benchmarks/results/tune_fp8_grouped.jsonl (results_log.py). DeepSeek-V3's routed experts (256 experts, top-8,
balanced: tokens*8/256 rows per expert), the four forward/dgrad products and the two wgrad products of
one MoE layer:

  fwd gate+up  [M, 7168] x [E, 4096, 7168]^T     dgrad gate+up [M, 4096] x [E, 7168, 4096]^T
  fwd down     [M, 2048] x [E, 7168, 2048]^T     dgrad down    [M, 7168] x [E, 2048, 7168]^T
  wgrad gate+up dW [E, 4096, 7168]               wgrad down    dW [E, 7168, 2048]

Variants: coscale's shipped path (the configuration it picks among MM_CANDIDATES / WGRAD_CANDIDATES),
the TMA kernel at each configuration listed below, torch._grouped_mm in BF16, and torch._scaled_grouped_mm
with rowwise scales (cuBLAS; a coarser recipe, the speed of light for a grouped FP8 GEMM here).
Each TMA configuration is checked against the dequantized FP32 product on three experts first.
"""

from __future__ import annotations

import argparse
import traceback

import torch

from coscale.kernels import _fp8_grouped_gluon as gluon_mm
from coscale.kernels import fp8_grouped_gemm as G
from coscale.kernels.fp8_grouped_kernels import launch_grouped_mm_tma, launch_grouped_wgrad, launch_grouped_wgrad_tma
from coscale.kernels.quant import act_quant_1x128, act_quant_1x128_dual, dequant_1x128
from results_log import ResultsLog

E, TOPK = 256, 8
MM_CONFIGS = [
    # BLOCK_M, BLOCK_N, STAGES, num_warps, PROGRAMS_PER_SM (0 = one program per tile), flags:
    # "f" flattens the persistent tile loop (the next tile's loads overlap this tile's epilogue),
    # "t" stores C with a TMA bulk store. (Earlier sweeps on the H100: 128x256 tiles and Triton's warp
    # specialisation 2-3x slower, so the kernels no longer take either; one program per tile and 3
    # programs per SM behind 2 per SM.)
    (64, 128, 4, 4, 2, ""), (64, 128, 4, 4, 2, "t"), (64, 128, 4, 4, 2, "ft"), (64, 128, 3, 4, 2, "t"),
    (128, 128, 4, 8, 1, "f"), (128, 128, 4, 8, 1, "ft"), (128, 128, 5, 8, 0, ""),
]
WG_CONFIGS = [
    # one flat loop over (output position, 128-token chunk) pairs, so the next position's loads are
    # issued during this one's epilogue ("f" does not apply); tiles need not divide 128. Run 33A (H200):
    # 128x128 with 4 warps and 128x256 with 8 ran at half the speed of the rest (registers), so they left
    (128, 64, 3, 4, 2, "t"), (64, 128, 3, 4, 2, "t"), (128, 64, 2, 4, 3, "t"), (64, 128, 2, 4, 3, "t"),
    (64, 128, 4, 4, 2, "t"), (128, 128, 3, 8, 1, "t"), (128, 128, 4, 8, 1, "t"), (256, 128, 3, 8, 1, "t"),
    (128, 64, 3, 4, 2, ""),
    # "e": grouped_wgrad_by_expert_kernel, work items of (expert, BLOCK_M rows), A kept while the columns pass
    (128, 64, 3, 4, 2, "te"), (64, 128, 3, 4, 2, "te"), (128, 64, 4, 4, 2, "te"), (128, 128, 3, 8, 1, "te"),
]


def cfg_dict(c):
    bm, bn, st, w, per_sm, flags = c
    return {"BLOCK_M": bm, "BLOCK_N": bn, "STAGES": st, "num_warps": w, "PROGRAMS_PER_SM": per_sm, "GROUP_M": 8,
            "FLATTEN": "f" in flags, "TMA_STORE": "t" in flags, "BY_EXPERT": "e" in flags}


def name_of(c):
    bm, bn, st, w, per_sm, flags = c
    return f"tma {bm}x{bn} s{st} w{w} p{per_sm} {flags}".rstrip()


def timeit(fn):
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def show(label, variant, entry):
    if "ms" in entry:
        err = entry.get("err", float("nan"))
        tf = entry["tflops"]
        print(f"{label:14s} {variant:32s} {entry['ms']:8.3f} ms {tf:7.1f} TFLOP/s err {err:.2e}", flush=True)
    else:
        print(f"{label:14s} {variant:32s} ERROR {entry['error'][:150]}", flush=True)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


ROUNDS = 2  # timing rounds over all variants of a product; each keeps its fastest round


def record(pending, case, variant, fn, flops, error=None):
    """Check one variant (``error()`` -> relative error, when given) or run it once, and queue it for
    timing; a failure is recorded and the sweep goes on."""
    entry = {**case, "variant": variant}
    try:
        if error is not None:  # runs the variant, so it is compiled before the timing rounds
            entry["err"] = error()
        else:
            fn()
    except Exception as exc:  # noqa: BLE001
        entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
        entry["traceback"] = traceback.format_exc()[-1500:]
    pending.append((entry, fn, flops))


def time_pending(pending, results):
    """Time the queued variants of one product in interleaved rounds (a single pass in list order
    favoured the variants timed first by up to 10% on the H100), then print and keep them."""
    for _ in range(ROUNDS):
        for entry, fn, _ in pending:
            if "error" in entry:
                continue
            try:
                ms = timeit(fn)
                entry["ms"] = min(ms, entry.get("ms", ms))
            except Exception as exc:  # noqa: BLE001
                entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
    for entry, _, flops in pending:
        if "ms" in entry and "error" not in entry:
            entry["tflops"] = flops / entry["ms"] / 1e9
        else:
            entry.pop("ms", None)
        results.append(entry)
        show(entry["case"], entry["variant"], entry)
    pending.clear()


def gluon_name(cfg):
    extra = f" dmax{cfg['DEFER_MAX']}" if "DEFER_MAX" in cfg else ""
    extra += " ring" if cfg.get("A_RING") else ""
    extra += f" c{cfg['C_BUFS']}" if "C_BUFS" in cfg else ""
    extra += f" p{cfg['PROGRAMS_PER_SM']}" if "PROGRAMS_PER_SM" in cfg else ""
    return f"gluon {cfg['BLOCK_M']}x{cfg['BLOCK_N']} s{cfg['STAGES']} w{cfg['num_warps']}{extra}"


def mm_case(label, m_per_e, k, n, results, gluon=False):
    dev, pending = "cuda", []
    m = m_per_e * E
    flops = 2.0 * m * k * n
    offs = (torch.arange(1, E + 1, device=dev) * m_per_e).to(torch.int32)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    xq, xs = act_quant_1x128(x)
    w = torch.randn(E, n, k, device=dev, dtype=torch.bfloat16) * k**-0.5
    wq, ws = G.quantize_expert_weights(w)
    te = G.expert_tile_map(offs, m)
    check = [0, E // 2, E - 1]
    refs = {}
    for e in check:
        rows = slice(e * m_per_e, (e + 1) * m_per_e)
        xd = dequant_1x128(xq[rows], xs[rows])
        wd = (wq[e].float().view(n // 128, 128, k // 128, 128) * ws[e][:, None, :, None]).view(n, k)
        refs[e] = xd @ wd.t()

    case = {"case": label, "M": m, "K": k, "N": n}

    def error(run):  # run() -> [M, N] output in FP32
        out = run()
        return max(rel(out[e * m_per_e:(e + 1) * m_per_e], refs[e]) for e in check)

    record(pending, case, "bf16 torch._grouped_mm", lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs),
           flops)
    try:  # rowwise FP8: one scale per row of x and per output column of each expert
        sa = (x.float().abs().amax(1) / 448).clamp_min(1e-12)
        sb = (w.abs().amax(2).float() / 448).clamp_min(1e-12)
        xr = (x.float() / sa[:, None]).to(torch.float8_e4m3fn)
        wr = torch.empty(w.shape, device=dev, dtype=torch.float8_e4m3fn)
        for e in range(E):  # one expert at a time: an FP32 copy of all weights would not fit
            wr[e] = (w[e].float() / sb[e, :, None]).to(torch.float8_e4m3fn)
        record(pending, case, "fp8 rowwise _scaled_grouped_mm", lambda: torch._scaled_grouped_mm(
            xr, wr.transpose(-2, -1), sa, sb, offs=offs, out_dtype=torch.bfloat16, use_fast_accum=True), flops)
    except Exception as exc:  # noqa: BLE001
        print("rowwise setup failed:", exc)
    c = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
    record(pending, case, "coscale auto (picked config)",
           lambda: G.fp8_grouped_mm(xq, xs, wq, ws, offs, tile_expert=te), flops,
           lambda: error(lambda: G.fp8_grouped_mm(xq, xs, wq, ws, offs, torch.float32, tile_expert=te)))
    for cfg in MM_CONFIGS:
        if n % cfg[1]:
            continue
        d = cfg_dict(cfg)
        record(pending, case, name_of(cfg), lambda d=d: launch_grouped_mm_tma(xq, xs, wq, ws, te, c, d), flops,
               lambda d=d: error(lambda: launch_grouped_mm_tma(xq, xs, wq, ws, te, torch.empty(m, n, device=dev), d)))
    if gluon:  # the Gluon kernel: the same products and promotion order, so the same bits as the TMA kernel
        triton_out = launch_grouped_mm_tma(xq, xs, wq, ws, te, torch.empty(m, n, device=dev), cfg_dict(MM_CONFIGS[1]))

        def gluon_error(d):
            out = gluon_mm.launch_grouped_mm_gluon(xq, xs, wq, ws, te, torch.empty(m, n, device=dev), d)
            mismatches = int((out != triton_out).sum())
            print(f"{label:14s} {gluon_name(d):32s} {mismatches} of {out.numel()} outputs differ from the TMA kernel's",
                  flush=True)
            return error(lambda: out)

        for d in gluon_mm.GLUON_MM_CANDIDATES:
            record(pending, case, gluon_name(d), lambda d=d: gluon_mm.launch_grouped_mm_gluon(xq, xs, wq, ws, te, c, d),
                   flops, lambda d=d: gluon_error(d))
    time_pending(pending, results)


def wgrad_case(label, m_per_e, n, k, results, gluon=False):
    """dW [E, n, k] = dY^T X per expert: dY [M, n], X [M, k]."""
    dev, pending = "cuda", []
    m = m_per_e * E
    flops = 2.0 * m * k * n
    offs = (torch.arange(1, E + 1, device=dev) * m_per_e).to(torch.int32)
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    _, _, dyt, dyts = act_quant_1x128_dual(dy, pad_t=True)
    _, _, xt, xts = act_quant_1x128_dual(x, pad_t=True)
    check = [0, E - 1]
    refs = {}
    for e in check:
        cols = slice(e * m_per_e, (e + 1) * m_per_e)
        tiles = slice(e * m_per_e // 128, (e + 1) * m_per_e // 128)
        refs[e] = dequant_1x128(dyt[:, cols], dyts[:, tiles]) @ dequant_1x128(xt[:, cols], xts[:, tiles]).t()
    out = torch.empty(E, n, k, device=dev, dtype=torch.bfloat16)

    case = {"case": label, "M": m, "K": k, "N": n}

    def error(dw):  # dw [E, n, k]
        return max(rel(dw[e], refs[e]) for e in check)

    def bf16():
        return torch._grouped_mm(dy.t(), x, offs=offs)

    def auto():  # allocates its own output, as in training
        return G.fp8_grouped_wgrad(dyt, dyts, xt, xts, offs, out_dtype=torch.bfloat16)

    record(pending, case, "bf16 torch._grouped_mm", bf16, flops, lambda: error(bf16()))
    # no kernel that writes dW in BF16 can be faster than writing it alone: the rate at that time
    record(pending, case, "floor: writing dW alone (zero_)", out.zero_, flops)
    record(pending, case, "coscale auto (picked config)", auto, flops, lambda: error(auto()))
    for cfg in WG_CONFIGS:
        d = cfg_dict(cfg)

        def tuned(d=d):
            return launch_grouped_wgrad_tma(dyt, dyts, xt, xts, offs, out, d)

        record(pending, case, name_of(cfg), tuned, flops, lambda f=tuned: error(f()))
    if gluon:  # the Gluon kernel and the zeros launch, as the picker runs them; bits against the TMA kernel
        expected = launch_grouped_wgrad_tma(dyt, dyts, xt, xts, offs, torch.empty_like(out), cfg_dict(WG_CONFIGS[0]))
        for d in gluon_mm.GLUON_WGRAD_CANDIDATES:
            d = {**d, "GLUON": True}

            def run(d=d):
                return launch_grouped_wgrad(dyt, dyts, xt, xts, offs, out, d)

            def gluon_error(run=run, d=d):
                got = run()
                print(f"{label:14s} {gluon_name(d):32s} {int((got != expected).sum())} of {got.numel()} outputs differ "
                      "from the TMA kernel's", flush=True)
                return error(got)

            record(pending, case, gluon_name(d), run, flops, gluon_error)
    time_pending(pending, results)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--only", choices=("mm", "wgrad"))
    parser.add_argument("--gluon", action="store_true", help="also time the Gluon kernels' candidates")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_fp8_grouped.py needs a CUDA GPU")
    import triton

    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    m_per_e = args.tokens * TOPK // E
    results: list[dict] = []
    if args.only in (None, "mm"):
        for label, k, n in [("fwd gate+up", 7168, 4096), ("fwd down", 2048, 7168),
                            ("dgrad gate+up", 4096, 7168), ("dgrad down", 7168, 2048)]:
            mm_case(label, m_per_e, k, n, results, args.gluon)
            torch.cuda.empty_cache()
    if args.only in (None, "wgrad"):
        for label, n, k in [("wgrad gate+up", 4096, 7168), ("wgrad down", 7168, 2048)]:
            wgrad_case(label, m_per_e, n, k, results, args.gluon)
            torch.cuda.empty_cache()
    ResultsLog("tune_fp8_grouped").save(tokens=args.tokens, results=results)
    print("\nbest per case:")
    for label in dict.fromkeys(r["case"] for r in results):
        rows = [r for r in results if r["case"] == label and "tflops" in r]
        ours = [r for r in rows if r["variant"].startswith(("tma", "coscale", "gluon")) and r.get("err", 1) < 0.05]
        base = {r["variant"]: r["tflops"] for r in rows if not r["variant"].startswith(("tma", "coscale", "gluon"))}
        if ours:
            best = max(ours, key=lambda r: r["tflops"])
            print(f"{label:14s} best {best['variant']:32s} {best['tflops']:7.1f} TFLOP/s; baselines {base}")


if __name__ == "__main__":
    main()
