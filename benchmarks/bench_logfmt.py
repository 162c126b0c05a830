"""LogFMT-n encode/decode on one GPU against the FP8 1x128 quantization kernel: speed, bandwidth, accuracy.

Run: python benchmarks/bench_logfmt.py [--quick]      (appends a line to benchmarks/results/bench_logfmt.jsonl)

For each shape (bf16 activations, 4096-16384 tokens x 7168) and variant -- LogFMT-8 and LogFMT-10 encode
(nearest, fast and stochastic), LogFMT decode to bf16, and the baseline coscale.kernels.quant.act_quant_1x128
(e4m3 + 1x128 scales) -- the median time (replayed from a CUDA graph, triton.testing.do_bench_cudagraph, so that
a sub-0.1 ms kernel's Python launch is not timed; eager do_bench where capture fails; inputs rotated
through buffers larger than L2), the effective bandwidth (input read once + outputs written once, TB/s), its
fraction of a device-to-device copy measured in the same process, and the ratio to the FP8 kernel
(the paper: LogFMT cost 50-100 % extra time). Correctness on the GPU first: LogFMT nearest codes and
tile numbers must equal the float64 PyTorch reference bit for bit (mismatch counts reported), "fast" codes
keep their contract (logfmt.check_fast_codes; how many differ from nearest is reported), decode
must match the reference within 1e-5 relative. Last, an accuracy table: normalized L2 error and mean
relative error of LogFMT-8/10 and E4M3 (1x128) on Gaussian and heavy-tailed (Student-t, 2 dof) data.
The table prints last; one variant failing is recorded and the others go on.

The communication table (issue 16): the dispatch's packing and the combine's unpacking on T tokens x H
routed to K of E experts (bf16): plain permutation (coscale.kernels.permute.rows_from_tokens), permutation
+ FP8 1x128 quantization fused into wire rows (fused_quant.gather_quant_rows) and separate (permute, then
act_quant_1x128), permutation + LogFMT-8/10 fused into wire rows (logfmt.logfmt_encode_to_rows), LogFMT
encode and decode alone on the permuted rows, and the combine: decode + weighted sum in one pass
(logfmt_decode_sum) against decode then tokens_from_rows. Each with ms, TB/s (bytes read + written), %
of the 4.25 TB/s copy goal and the ratio to the plain permutation. The float32 encoder's codes are
checked against the float64 reference first (mismatch counts; the goal is 0).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

from coscale.kernels import logfmt as lf
from coscale.kernels import quant as q
from gpu_timing import profiled_run
from results_log import ResultsLog

TIMING = {"mode": "graph"}  # how the last bench() timed: "graph", or "eager" where capture failed


def bench(fns, rep_ms=200):
    """Median ms of fns[i % len(fns)]() (rotating inputs defeats L2 reuse between repetitions), replayed
    from a CUDA graph (the kernels alone: eager timing of a sub-0.1 ms kernel measures Python's launch of
    it); eager do_bench where the functions cannot be captured."""
    import triton.testing

    state = {"i": 0}

    def step():
        fns[state["i"] % len(fns)]()
        state["i"] += 1

    for fn in fns:
        fn()  # compilation and autotuning outside any capture
    profiled_run(fns[0])  # COSCALE_NCU=1: one run for Nsight Compute (gpu_timing)
    torch.cuda.synchronize()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        ms = triton.testing.do_bench_cudagraph(step, rep=rep_ms, return_mode="median")
        TIMING["mode"] = "graph"
        return ms
    except RuntimeError as exc:
        print(f"(CUDA-graph timing failed, {type(exc).__name__}: {str(exc).splitlines()[0][:120]}; eager)",
              flush=True)
        torch.cuda.synchronize()
        TIMING["mode"] = "eager"
        return triton.testing.do_bench(step, warmup=25, rep=rep_ms, return_mode="median")


def copy_bandwidth(dev, nbytes=1 << 30):
    """TB/s of a 1 GiB device copy (read + write), timed eagerly: launching it costs nothing beside it,
    and replayed from a CUDA graph it measured 2.8 TB/s on the H200 (run 15) against 4.2 eagerly (run 11)."""
    import triton.testing

    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * nbytes / triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") / 1e9


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def make_input(m, k, dev, seed=0, heavy=False):
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(m, k, device=dev, generator=g)
    if heavy:
        chi2 = torch.randn(m, k, device=dev, generator=g) ** 2 + torch.randn(m, k, device=dev, generator=g) ** 2
        x = x / torch.sqrt(chi2 / 2)
    return x * torch.logspace(-3, 2, k, device=dev)


def check_against_reference(x, n_bits):
    """(mismatching codes + tile numbers, max relative decode difference) on a slice of x."""
    ref = lf.logfmt_encode_ref(x, n_bits)
    got = lf.logfmt_encode(x, n_bits, backend="triton")
    bad = sum(int((g != r).sum()) for g, r in zip(got, ref))
    y = lf.logfmt_decode(*ref, n_bits, backend="triton")
    y_ref = lf.logfmt_decode_ref(*ref, n_bits)
    rel = ((y - y_ref).abs() / y_ref.abs().clamp_min(1e-30)).max().item()
    return bad, rel


def time_case(kind, n_bits, xs):
    """Returns (ms, bytes moved) of one variant on the rotating inputs xs."""
    if kind == "fp8_act_quant":
        outs = q.act_quant_1x128(xs[0], backend="triton")
        return bench([lambda x=x: q.act_quant_1x128(x, backend="triton") for x in xs]), nbytes(xs[0], *outs)
    if kind.startswith("encode"):
        rounding = kind.split("_")[1]
        outs = lf.logfmt_encode(xs[0], n_bits, rounding, seed=1, backend="triton")
        fns = [lambda x=x: lf.logfmt_encode(x, n_bits, rounding, seed=1, backend="triton") for x in xs]
        return bench(fns), nbytes(xs[0], *outs)
    encoded = [lf.logfmt_encode(x, n_bits, backend="triton") for x in xs]
    out = lf.logfmt_decode(*encoded[0], n_bits, dtype=torch.bfloat16, backend="triton")
    fns = [lambda e=e: lf.logfmt_decode(*e, n_bits, dtype=torch.bfloat16, backend="triton") for e in encoded]
    return bench(fns), nbytes(*encoded[0], out)


def picked_per_key() -> dict:
    """{kernel: {autotuning key: the configuration picked}} of the LogFMT autotuners (Triton's cache)."""
    from coscale.kernels.autotune import describe_config

    return {kind: {str(key): describe_config(cfg) for key, cfg in getattr(tuned, "cache", {}).items()}
            for kind, tuned in lf.tuned_kernels(lf.interpreting()).items()}


GOAL_TBS = 4.25  # an H200's device-to-device copy bandwidth (the issue's yardstick)
ENCODE_PARTS = False  # --encode-parts


def comm_rows(dev, tokens, hidden=7168, n_experts=256, topk=8):
    """The communication table: (name, ms, bytes) per variant; see the module docstring."""
    from coscale.kernels.fused_quant import gather_quant_rows
    from coscale.kernels.permute import build_permute_info, rows_from_tokens, tokens_from_rows
    from coscale.parallel.codec import FP8Codec, LogFMTCodec, select_rows

    g = torch.Generator(device=dev).manual_seed(0)
    x = make_input(tokens, hidden, dev, seed=1).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(n_experts, device=dev, generator=g)[:topk] for _ in range(tokens)])
    w = torch.rand(tokens, topk, device=dev, generator=g)
    info = build_permute_info(idx, n_experts, align=1)
    perm, _ = rows_from_tokens(x, info)
    rows_in = info.num_rows * hidden * 2  # the permuted rows read from the tokens
    out = []

    def add(name, fn, moved):
        out.append((name, bench([fn]), moved, TIMING["mode"]))

    add("permute (plain, bf16)", lambda: rows_from_tokens(x, info), rows_in + nbytes(perm))
    fp8 = gather_quant_rows(x, info.row_pair, topk)
    add("permute + FP8 fused", lambda: gather_quant_rows(x, info.row_pair, topk), rows_in + nbytes(fp8))
    add("permute, then FP8", lambda: q.act_quant_1x128(rows_from_tokens(x, info)[0], backend="triton"),
        rows_in + nbytes(perm) * 2 + nbytes(fp8))
    # what the FP8 dispatch runs (coscale.parallel.transfer): each token quantized once, its encoded row
    # then selected once per copy (as 8-byte words: select_rows)
    codec, token_of_row = FP8Codec(), (info.row_pair.clamp(min=0) // topk).long()
    enc = codec.encode(x)
    sel = select_rows(enc, token_of_row)
    add("FP8, then select (the dispatch)", lambda: select_rows(codec.encode(x), token_of_row),
        nbytes(x) + nbytes(enc) + 2 * nbytes(sel))
    assert torch.equal(sel, codec.encode(perm)), "FP8 then select must equal permute then FP8, byte for byte"
    for n_bits in (8, 10):
        rows = lf.logfmt_encode_to_rows(x, info.row_pair, topk, n_bits)
        add(f"permute + LogFMT-{n_bits} fused", lambda n=n_bits: lf.logfmt_encode_to_rows(x, info.row_pair, topk, n),
            rows_in + nbytes(rows))
        lc = LogFMTCodec(n_bits)  # the dispatch's path: each token encoded once, its bytes selected per copy
        assert torch.equal(lc.encode_rows(x, token_of_row), rows), "encode then select must equal the fused rows"
        add(f"LogFMT-{n_bits}, then select (the dispatch)", lambda c=lc: c.encode_rows(x, token_of_row),
            nbytes(x) + nbytes(rows) // topk + 2 * nbytes(rows))
        fast = LogFMTCodec(n_bits, "fast")
        add(f"LogFMT-{n_bits} fast, then select", lambda c=fast: c.encode_rows(x, token_of_row),
            nbytes(x) + nbytes(rows) // topk + 2 * nbytes(rows))
        # the dispatch's two steps apart: each token encoded into its row once, then the rows selected
        once = lf.logfmt_encode_to_rows(x, None, 1, n_bits)
        add("  its encode (tokens into rows)", lambda n=n_bits: lf.logfmt_encode_to_rows(x, None, 1, n),
            nbytes(x, once))
        add("  its encode, fast", lambda n=n_bits: lf.logfmt_encode_to_rows(x, None, 1, n, "fast"), nbytes(x, once))
        add("  its select (rows, 8-byte words)", lambda o=once: select_rows(o, token_of_row), 2 * nbytes(rows))
        if ENCODE_PARTS:  # what the encoder's parts cost: the float64 redo of ambiguous rows, the code planes
            delta, lf.DELTA = lf.DELTA, -1.0  # a negative band: no element is ambiguous, no row redone
            try:  # timing only: the codes are not exact
                add("  its encode without the redo (inexact)", lambda n=n_bits: lf.logfmt_encode_to_rows(x, None, 1, n),
                    nbytes(x, once))
            finally:
                lf.DELTA = delta
            if n_bits > 8:  # rows of int16 codes (no bit planes): more bytes, plain stores
                wide = lf.logfmt_encode_to_rows(x, None, 1, n_bits, packed=False)
                add("  its encode into int16-code rows", lambda n=n_bits: lf.logfmt_encode_to_rows(x, None, 1, n,
                                                                                              packed=False),
                    nbytes(x, wide))
        enc = lf.logfmt_encode(perm, n_bits, backend="triton")
        add(f"LogFMT-{n_bits} encode alone", lambda n=n_bits: lf.logfmt_encode(perm, n, backend="triton"),
            nbytes(perm, *enc))
        add(f"LogFMT-{n_bits} encode alone, fast", lambda n=n_bits: lf.logfmt_encode(perm, n, "fast", backend="triton"),
            nbytes(perm, *enc))
        dec = lf.logfmt_decode(*enc, n_bits, dtype=torch.bfloat16, backend="triton")
        add(f"LogFMT-{n_bits} decode alone", lambda n=n_bits, e=enc: lf.logfmt_decode(*e, n, dtype=torch.bfloat16,
                                                                                     backend="triton"),
            nbytes(*enc, dec))
        comb = lf.logfmt_decode_sum(*enc, info.pair_row, w, n_bits, torch.bfloat16, backend="triton")
        add(f"LogFMT-{n_bits} decode + combine fused",
            lambda n=n_bits, e=enc: lf.logfmt_decode_sum(*e, info.pair_row, w, n, torch.bfloat16, backend="triton"),
            nbytes(*enc, comb))
        add(f"LogFMT-{n_bits} decode, then combine",
            lambda n=n_bits, e=enc: tokens_from_rows(lf.logfmt_decode(*e, n, dtype=torch.bfloat16, backend="triton"),
                                                     info, w),
            nbytes(*enc, dec) * 1 + nbytes(dec, comb))
    plain = out[0][1]
    return [{"kernel": name, "T": tokens, "K": topk, "H": hidden, "ms": ms, "bytes": moved, "timing": mode,
             "TB/s": moved / ms / 1e9, "pct_goal": 100 * moved / ms / 1e9 / GOAL_TBS, "vs_permute": ms / plain}
            for name, ms, moved, mode in out]


def check_fused(dev):
    """Mismatches of the fused wire rows against the references on the GPU (0 expected)."""
    from coscale.kernels.fused_quant import gather_quant_rows
    from coscale.kernels.permute import build_permute_info

    x = make_input(256, 7168, dev, seed=9).to(torch.bfloat16)
    idx = torch.randint(0, 64, (256, 4), device=dev)
    info = build_permute_info(idx, 64, align=8)
    rec = {"fp8_rows": int((gather_quant_rows(x, info.row_pair, 4) !=
                            gather_quant_rows(x, info.row_pair, 4, backend="torch")).sum())}
    for n_bits in (8, 10):
        got = lf.logfmt_encode_to_rows(x, info.row_pair, 4, n_bits, backend="triton")
        ref = lf.logfmt_encode_to_rows(x, info.row_pair, 4, n_bits, backend="torch")
        rec[f"logfmt{n_bits}_rows"] = int((got != ref).sum())
    return rec


def accuracy_rows(dev):
    from coscale.kernels.quant import act_quant_1x128_ref, dequant_1x128

    rows = []
    for heavy in (False, True):
        x = make_input(1024, 7168, dev, seed=7, heavy=heavy).float()
        y8, s8 = act_quant_1x128_ref(x)
        variants = {"E4M3 1x128": dequant_1x128(y8, s8)}
        for n_bits in (8, 10):
            enc = lf.logfmt_encode(x, n_bits, backend="auto")
            variants[f"LogFMT-{n_bits}"] = lf.logfmt_decode(*enc, n_bits, backend="auto")
            enc = lf.logfmt_encode(x, n_bits, "stochastic", seed=3, backend="auto")
            variants[f"LogFMT-{n_bits} stoch"] = lf.logfmt_decode(*enc, n_bits, backend="auto")
        xd, nz = x.double(), x != 0
        for name, y in variants.items():
            err = y.double() - xd
            rows.append({"data": "student-t(2)" if heavy else "gaussian", "format": name,
                         "l2": (err.norm() / xd.norm()).item(),
                         "mean_rel": (err.abs()[nz] / xd.abs()[nz]).mean().item()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--comm-only", action="store_true",
                        help="the exactness checks and the communication table only (no kernel shapes, no accuracy)")
    parser.add_argument("--encode-parts", action="store_true",
                        help="also time the dispatch's encode without the float64 redo (inexact codes) and, for "
                             "LogFMT-10, into rows of int16 codes")
    parser.add_argument("--only", default="",
                        help="time only the kernels whose name holds this text (beside the FP8 baseline), no "
                             "communication or accuracy table: e.g. --only fast")
    args = parser.parse_args()
    global ENCODE_PARTS
    ENCODE_PARTS = args.encode_parts
    if not torch.cuda.is_available():
        raise SystemExit("bench_logfmt.py needs a CUDA GPU")
    import triton

    dev = torch.device("cuda")
    shapes = [] if args.comm_only else [(4096, 7168)] if args.quick else [(4096, 7168), (8192, 7168), (16384, 7168)]
    kinds = [("fp8_act_quant", 8)]
    for n_bits in (8, 10):
        kinds += [(f"encode_{r}", n_bits) for r in lf.ROUNDINGS] + [("decode", n_bits)]
    if args.only:
        kinds = [(k, n) for k, n in kinds if k.startswith("fp8") or args.only in f"logfmt{n}_{k}"]
    copy_bw = copy_bandwidth(dev)
    results, checks = [], []
    try:  # the bound the encoder's fast path assumes for the GPU's lg2.approx (every mantissa)
        err, fast = lf.fast_log2_max_error(), lf.fast_log2_max_error(fast=True)  # nearest's mantissas; fast's
        checks.append({"check": "lg2.approx", "max_abs_error": err, "bound": lf.LOG2_BOUND,
                       "whole_range_beyond_rounding": fast, "whole_range_bound": lf.FAST_LOG2_BOUND,
                       "ok": err <= lf.LOG2_BOUND and fast <= lf.FAST_LOG2_BOUND})
    except Exception as exc:
        checks.append({"check": "lg2.approx", "error": f"{type(exc).__name__}: {exc}"})
    print(json.dumps(checks[-1]), flush=True)
    for n_bits in (8, 10):
        rec = {"check": f"LogFMT-{n_bits}"}
        try:
            rec["mismatches"], rec["decode_max_rel"] = check_against_reference(make_input(512, 7168, dev, 5), n_bits)
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        try:  # "fast" rounding: its contract on the GPU (lg2.approx), hard inputs included
            xf = make_input(512, 7168, dev, 6, heavy=True)
            xf[:8] *= torch.exp(torch.empty(8, 7168, device=dev).uniform_(-40, 40))  # ranges the clamp cuts
            rec["fast_differ"] = lf.check_fast_codes(xf, *lf.logfmt_encode(xf, n_bits, "fast", backend="triton"),
                                                     n_bits)
            rec["fast_contract"] = True
        except Exception as exc:
            rec["fast_contract"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        checks.append(rec)
        print(json.dumps(rec), flush=True)  # progress: the tables print at the end
    for m, k in shapes:
        fp8_ms = None
        try:
            xs = [make_input(m, k, dev, seed=i).to(torch.bfloat16) for i in range(2 if m >= 16384 else 3)]
        except Exception as exc:
            results.append({"kernel": "inputs", "M": m, "K": k, "error": f"{type(exc).__name__}: {exc}"})
            continue
        for kind, n_bits in kinds:
            rec = {"kernel": kind if kind.startswith("fp8") else f"logfmt{n_bits}_{kind}", "M": m, "K": k}
            try:
                rec["ms"], rec["bytes"] = time_case(kind, n_bits, xs)
                rec["timing"] = TIMING["mode"]
                if kind != "fp8_act_quant":  # the tile shape the autotuner picked (printed now: the meta prints last)
                    rec["tile"] = lf.picked_configs()["encode" if kind.startswith("encode") else "decode"]
                rec["TB/s"] = rec["bytes"] / rec["ms"] / 1e9
                rec["pct_copy"] = 100 * rec["TB/s"] / copy_bw
                if kind == "fp8_act_quant":
                    fp8_ms = rec["ms"]
                rec["vs_fp8"] = rec["ms"] / fp8_ms if fp8_ms else None
            except Exception as exc:  # record and carry on
                rec["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            results.append(rec)
            print(json.dumps(rec), flush=True)
        del xs
        torch.cuda.empty_cache()
    comm = []
    for tokens in ([] if args.only else [4096] if args.quick else [4096, 8192]):
        try:
            comm += comm_rows(dev, tokens)
        except Exception as exc:
            comm.append({"kernel": "communication", "T": tokens, "error": f"{type(exc).__name__}: {exc}"})
            traceback.print_exc()
    try:
        checks.append({"check": "fused rows", **check_fused(dev)})
    except Exception as exc:
        checks.append({"check": "fused rows", "error": f"{type(exc).__name__}: {exc}"})
        traceback.print_exc()
    try:
        acc = [] if args.comm_only or args.only else accuracy_rows(dev)
    except Exception as exc:
        acc = [{"error": f"{type(exc).__name__}: {exc}"}]
        traceback.print_exc()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), "copy_TB/s": copy_bw,
            "tile_shapes_last": lf.picked_configs(),  # the autotuners' last picks (encode, decode)
            "tile_shapes": picked_per_key()}
    ResultsLog("bench_logfmt").save(meta=meta, checks=checks, results=results, accuracy=acc, communication=comm)
    print(json.dumps(meta))
    print("GPU vs float64 reference:", json.dumps(checks))
    print(f"{'format':>20} {'data':>13} {'L2 err':>8} {'mean rel':>9}")
    for r in acc:
        if "error" in r:
            print("accuracy ERROR", r["error"][:100])
        else:
            print(f"{r['format']:>20} {r['data']:>13} {r['l2']:>8.4f} {r['mean_rel']:>9.4f}")
    print_comm(comm)
    print(f"{'kernel':>26} {'M':>6} {'K':>6} {'ms':>8} {'TB/s':>6} {'%copy':>6} {'x fp8':>6}")
    for r in results:
        if "error" in r:
            print(f"{r['kernel']:>26} {r['M']:>6} {r['K']:>6} ERROR {r['error'][:80]}")
            continue
        ratio = f"{r['vs_fp8']:>6.2f}" if r.get("vs_fp8") else f"{'-':>6}"
        print(f"{r['kernel']:>26} {r['M']:>6} {r['K']:>6} {r['ms']:>8.3f} {r['TB/s']:>6.2f} "
              f"{r['pct_copy']:>6.1f} {ratio}")


def print_comm(comm):
    print(f"{'communication kernel (bf16 tokens, H 7168, K 8)':>44} {'T':>5} {'ms':>8} {'TB/s':>6} "
          f"{'%4.25':>6} {'x permute':>9} {'timed':>6}")
    for r in comm:
        if "error" in r:
            print(f"{r['kernel']:>44} {r['T']:>5} ERROR {r['error'][:80]}")
            continue
        print(f"{r['kernel']:>44} {r['T']:>5} {r['ms']:>8.3f} {r['TB/s']:>6.2f} {r['pct_goal']:>6.1f} "
              f"{r['vs_permute']:>9.2f} {r.get('timing', '-'):>6}")


if __name__ == "__main__":
    main()
