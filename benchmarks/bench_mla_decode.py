"""MLA decode kernel over the paged latent cache: achieved HBM bandwidth against the H200's, vs PyTorch.

Run: `PYTHONPATH=src python benchmarks/bench_mla_decode.py [--quick] [--splits N ...]`; appends a line
to benchmarks/results/bench_mla_decode.jsonl (results_log.py).

Cases: one layer's cache (c = 512 latent + 64 RoPE, 64-token blocks scattered over the cache in random
order), batch 1/16/64/128 x context 4K/8K/16K/32K, BF16 and FP8 ("FP8 with scale": e4m3 latent, one
float32 scale per 128, BF16 RoPE) caches, 16 heads (DeepSeek-V2-Lite) and 128 heads (DeepSeek-V3), one
query token per sequence (and MTP's two at 16 heads in the full run).

Bytes the kernel must read: every cached token of every sequence once (1152 bytes per token in BF16,
656 in FP8) plus the queries; the bandwidth is those bytes over the median time of CUDA graph replays
(``timed``: the kernels without the launcher's host time, as the engine runs them), against the H200's
measured device copy bandwidth of 4.25 TB/s (shared/reference/measuring.md); the goal is >= 85% at batch
64-128 and 4K-32K. The split-KV scratch (partial outputs) is extra traffic the kernel chooses to spend and
is not counted as useful bytes.

Baseline: PyTorch, the whole context of each sequence gathered through the block table into a dense
[B, T, 576] tensor, then scores, softmax and the value product as batched matmuls (BF16 in, FP32
softmax); FP8 caches are dequantized in the gather.

Correctness: each case first checks the kernel against the float32 reference (coscale.kernels.mla_decode.
mla_decode_ref) on fresh random data at a reduced batch, ragged lengths included, and records the error.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import time
import traceback

import torch

from coscale.kernels import _mla_decode_gluon_regs as gluon_regs
from coscale.kernels import mla_decode as md
from coscale.kernels.mla_decode import (
    FP8_CONVERT_EARLY_MIN_BATCH,
    GLUON_DESIGNS,
    LatentCacheLayer,
    default_num_splits,
    heads_per_tile,
    mla_decode,
    mla_decode_ref,
    quantize_latent_fp8,
    tuned_config,
)
from gpu_timing import graph_ms
from results_log import ResultsLog

H200_COPY_TBPS = 4.25  # measured device-to-device copy bandwidth (shared/reference/measuring.md)
C, DR, PAGE = 512, 64, 64


def make_case(B: int, T: int | list[int], H: int, S: int, fp8: bool, gen: torch.Generator, device="cuda"):
    lens = T if isinstance(T, list) else [T] * B
    width = max(-(-n // PAGE) for n in lens)
    blocks = B * width + 1
    latent = torch.randn(blocks, PAGE, C, generator=gen, device=device, dtype=torch.bfloat16)
    rope = torch.randn(blocks, PAGE, DR, generator=gen, device=device, dtype=torch.bfloat16)
    scale = None
    if fp8:
        q, s = quantize_latent_fp8(latent.view(-1, C))
        latent, scale = q.view(blocks, PAGE, C), s.view(blocks, PAGE, -1)
    cache = LatentCacheLayer(latent, rope, scale)
    perm = torch.randperm(blocks - 1, generator=gen, device=device)[: B * width] + 1
    table = perm.view(B, width).to(torch.int32)
    q_lat = torch.randn(B, S, H, C, generator=gen, device=device, dtype=torch.bfloat16)
    q_pe = torch.randn(B, S, H, DR, generator=gen, device=device, dtype=torch.bfloat16)
    return q_lat, q_pe, cache, table, torch.tensor(lens, dtype=torch.int32, device=device)


def torch_baseline(q_lat, q_pe, cache: LatentCacheLayer, table, seq_lens, scale: float):
    """Dense gather + batched matmuls (all sequences padded to the longest)."""
    B, S, H, _ = q_lat.shape
    T = table.shape[1] * PAGE
    latent = cache.latent[table.long()].view(B, T, C)
    if cache.scale is not None:
        s = cache.scale[table.long()].view(B, T, -1).repeat_interleave(128, dim=-1)[..., :C]
        latent = (latent.float() * s).to(torch.bfloat16)
    rope = cache.rope[table.long()].view(B, T, DR)
    scores = torch.matmul(q_lat.view(B, S * H, C), latent.transpose(1, 2)).float()
    scores += torch.matmul(q_pe.view(B, S * H, DR), rope.transpose(1, 2)).float()
    pos = torch.arange(T, device=q_lat.device)
    last = (seq_lens[:, None] - S + torch.arange(S, device=q_lat.device)[None, :]).repeat_interleave(H, dim=1)
    scores = scores.masked_fill(pos[None, None, :] > last[:, :, None], float("-inf")) * scale
    probs = torch.softmax(scores, dim=-1).to(torch.bfloat16)
    return torch.matmul(probs, latent).view(B, S, H, C)


EAGER_TIMING = False  # --eager-timing: do_bench around each call, the launcher's host time included


def timed(fn, quick: bool) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (gpu_timing.graph_ms), as the serving engine runs the
    kernels: a call's host work (the autotuner's lookup, allocations, two launches: ~150-300 us in Python)
    is not timed, and it exceeds the kernels' time at batch 1 and at 4K contexts (runs 6-30 timed with
    do_bench measured it there). The L2 is not flushed between replays: a case whose cache fits in L2
    (batch 1 at 4K: 5 MB) measures a warm cache; from batch 16 at 4K (75 MB) the cache exceeds the H200's
    L2. With --eager-timing, triton.testing.do_bench around each call (L2 flushed; host time included)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    if EAGER_TIMING:
        return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=50 if quick else 150, return_mode="median")
    return graph_ms(fn, rep=50 if quick else 150)


def useful_bytes(B: int, T: int, H: int, S: int, fp8: bool) -> int:
    per_token = (C + 4 * math.ceil(C / 128) + 2 * DR) if fp8 else 2 * (C + DR)
    return B * T * per_token + B * S * H * (C + DR) * 2 * 2 + B * (4 + 4 * math.ceil(T / PAGE))  # + q, out, tables


def check(H: int, S: int, fp8: bool, gen, splits, config, **options) -> float:
    """Max |kernel - reference| / max |reference| on fresh data with ragged lengths, with the configuration
    the timed run picked (so the check neither tunes again nor tests another candidate)."""
    lens = [S, 200, 4096 + 37, 1500]
    q_lat, q_pe, cache, table, seq_lens = make_case(len(lens), lens, H, S, fp8, gen)
    out, _ = mla_decode(q_lat, q_pe, cache, table, seq_lens, 0.1, num_splits=splits, kernel_config=config,
                        backend="triton", **options)
    ref, _ = mla_decode_ref(q_lat.float(), q_pe.float(), cache, table, seq_lens, 0.1)
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def run_case(B, T, H, S, fp8, args, gen, results):
    entry = dict(batch=B, context=T, heads=H, s_q=S, cache="fp8" if fp8 else "bf16")
    scale = 1 / math.sqrt(192)
    try:
        case = make_case(B, T, H, S, fp8, gen)
        tile = heads_per_tile(H, S)
        for splits in args.splits or [None]:
            used = splits or default_num_splits(B, -(-H // tile), T, case[0].device)
            ms = timed(functools.partial(mla_decode, *case, scale, max_seq_len=T, num_splits=used, backend="triton",
                                         fp8_gluon=False), args.quick)  # the Triton kernel; its first call autotunes
            config = tuned_config()
            r = dict(entry, splits=used, heads_tile=tile, config=config_name(config),
                     max_rel_err=check(H, S, fp8, gen, used, config))
            nbytes = useful_bytes(B, T, H, S, fp8)
            r.update(kernel_ms=ms, useful_gb=nbytes / 1e9, tbps=nbytes / ms / 1e9,
                     pct_of_copy=100 * nbytes / ms / 1e9 / H200_COPY_TBPS)
            if not args.no_baseline and splits in (None, args.splits[0] if args.splits else None):
                try:
                    base = timed(functools.partial(torch_baseline, *case, scale), args.quick)
                    r.update(torch_ms=base, speedup=base / ms)
                except torch.OutOfMemoryError:
                    r["torch_ms"] = "OOM"
                    torch.cuda.empty_cache()
            run = dict(r=r, case=case, scale=scale, used=used, nbytes=nbytes, gen=gen, quick=args.quick)
            if fp8 and args.compare_fp8_read:  # the previous path
                time_variant("bf16_read", "read through bf16", **run, fp8_in_fp16=False)
            if fp8 and args.fp8_convert_early:  # the other choice than the default's at this batch
                early = B < FP8_CONVERT_EARLY_MIN_BATCH
                time_variant("early_cvt" if early else "late_cvt", "cast before shared memory" if early else
                             "cast after shared memory", **run, fp8_convert_early=early)
            if fp8 and args.fp8_per_tile:  # one product per scale tile (the default reads the tile whole)
                time_variant("per_tile", "per scale tile", **run, fp8_whole_tile=False)
            if fp8 and args.fp8_gluon and tile * S <= 16:  # the warp-specialized Gluon kernels (sm_90, 16 rows)
                for design in args.gluon_designs:
                    time_variant("gluon" if design == "converter" else f"gluon_{design}", f"Gluon, {design}", **run,
                                 fp8_gluon=True, gluon_design=design)
                for stages in args.gluon_stages:  # the register-operand kernel's ring depth
                    time_variant(f"gluon_registers_s{stages}", f"Gluon, registers, {stages} stages", **run,
                                 fp8_gluon=True, gluon_design="registers", gluon_stages=stages)
            if args.lazy and config is not None:  # the picked configuration with lazy rescaling
                time_variant("lazy", "lazy rescaling", **run, kernel_config={**config, "LAZY": 1})
            results.append(r)
            t = r.get("torch_ms")
            base_s = f"{t * 1e3:.1f} us" if isinstance(t, float) else str(t)
            print(f"  B={B:4d} T={T:6d} H={H:4d} S={S} {r['cache']:4s} splits={used:3d} {r['config']}: "
                  f"{ms * 1e3:8.1f} us "
                  f"{r['tbps']:.2f} TB/s ({r['pct_of_copy']:.0f}%), torch {base_s}, err {r['max_rel_err']:.1e}",
                  flush=True)
        del case
        torch.cuda.empty_cache()
    except Exception as exc:  # record and carry on
        entry["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        results.append(entry)


def time_variant(name: str, label: str, *, r: dict, case, scale: float, used: int, nbytes: int, gen, quick: bool,
                 **options) -> None:
    """The case of row ``r`` again with other mla_decode options: timed, checked against the reference,
    recorded as ``name``_ms / ``name``_err and printed."""
    B, T, H, S = r["batch"], r["context"], r["heads"], r["s_q"]
    design = options.pop("gluon_design", None)
    stages = options.pop("gluon_stages", None)
    previous, previous_stages = md.FP8_GLUON_DESIGN, gluon_regs.STAGES
    md.FP8_GLUON_DESIGN = design or previous  # (read when a call launches, and graphs capture the launch)
    gluon_regs.STAGES = stages or previous_stages
    try:
        r[f"{name}_ms"] = timed(functools.partial(mla_decode, *case, scale, max_seq_len=T, num_splits=used,
                                                  backend="triton", **options), quick)
        cfg = options.pop("kernel_config", None) or (None if options.get("fp8_gluon") else tuned_config())
        r[f"{name}_err"] = check(H, S, r["cache"] == "fp8", gen, used, cfg, **options)
    finally:
        md.FP8_GLUON_DESIGN, gluon_regs.STAGES = previous, previous_stages
    print(f"  B={B:4d} T={T:6d} H={H:4d} {r['cache']} {label}: {r[f'{name}_ms'] * 1e3:8.1f} us "
          f"({100 * nbytes / r[f'{name}_ms'] / 1e9 / H200_COPY_TBPS:.0f}%, {config_name(cfg)}), "
          f"err {r[f'{name}_err']:.1e}", flush=True)


def check_all_candidates(gen) -> dict:
    """Every GPU candidate of the split kernel, fixed, against the reference: relative error, or the
    failure (a candidate over the shared-memory limit fails here and the autotuner skips it)."""
    from coscale.kernels._mla_decode_triton import _configs

    errors = {}
    for cfg in _configs()[0]:
        config = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        for H in (16, 128):
            for fp8 in (False, True):
                name = f"{config_name(config)} H={H} {'fp8' if fp8 else 'bf16'}"
                try:
                    errors[name] = check(H, 1, fp8, gen, 3, config)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    errors[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
                print(f"  check {name}: {errors[name]}", flush=True)
    return errors


def config_name(cfg: dict | None) -> str:
    """The autotuner's pick: key block, orientation (rows = heads on M, keys = keys on M), warps, stages."""
    if cfg is None:
        return "-"
    return f"n{cfg['BLOCK_N']}-{'keys' if cfg['SWAP'] else 'rows'}-w{cfg['num_warps']}-s{cfg['num_stages']}"


def print_table(results):
    print(f"\n{'batch':>5} {'ctx':>6} {'H':>4} {'S':>2} {'cache':>5} {'split':>5} {'config':>18} {'us':>9} {'TB/s':>6} "
          f"{'%4.25':>6} {'torch us':>9} {'x':>6} {'err':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['batch']:5d} {r['context']:6d} {r['heads']:4d} {r['s_q']:2d} {r['cache']:>5} ERROR {r['error']}")
            continue
        t = r.get("torch_ms")
        tus = f"{t * 1e3:9.1f}" if isinstance(t, float) else f"{str(t):>9}"
        sp = f"{r['speedup']:6.1f}" if "speedup" in r else f"{'-':>6}"
        print(f"{r['batch']:5d} {r['context']:6d} {r['heads']:4d} {r['s_q']:2d} {r['cache']:>5} {r['splits']:5d} "
              f"{r['config']:>18} {r['kernel_ms'] * 1e3:9.1f} {r['tbps']:6.2f} {r['pct_of_copy']:6.1f} {tus} {sp} "
              f"{r['max_rel_err']:8.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 heads, batches 1/64/128 x 4K/32K, one V3 case")
    parser.add_argument("--splits", type=int, nargs="+", help="time these context-split counts instead of the "
                        "heuristic's choice")
    parser.add_argument("--no-baseline", action="store_true", help="skip the PyTorch baseline")
    parser.add_argument("--check-all", action="store_true", help="first check every autotuning candidate against "
                        "the reference (BF16/FP8, 16/128 heads), not only the picked one")
    parser.add_argument("--compare-fp8-read", action="store_true", help="also time FP8 caches read through bf16 "
                        "(the kernel's previous path) beside the fp16 read")
    parser.add_argument("--fp8-convert-early", action="store_true", help="also time FP8 caches with the other "
                        "choice of mla_decode's fp8_convert_early than its default (the cast before the shared-memory "
                        "round trip from batch FP8_CONVERT_EARLY_MIN_BATCH on, after it below)")
    parser.add_argument("--fp8-per-tile", action="store_true", help="also time FP8 caches with fp8_whole_tile=False "
                        "(one product per 128-column scale tile; the default reads the tile whole, its scales folded "
                        "into the fp16 latent)")
    parser.add_argument("--fp8-gluon", action="store_true", help="also time FP8 caches on the warp-specialized "
                        "Gluon kernel (mla_decode's default where it takes the case: sm_90, 16 heads); the main rows "
                        "are the Triton kernel's")
    parser.add_argument("--gluon-designs", nargs="+", choices=GLUON_DESIGNS, default=list(GLUON_DESIGNS),
                        help="with --fp8-gluon: the Gluon kernels to time (mla_decode.FP8_GLUON_DESIGN; default both)")
    parser.add_argument("--gluon-stages", nargs="+", type=int, choices=(2, 3, 4), default=[], metavar="N",
                        help="with --fp8-gluon: also time the register-operand kernel with N stages in its ring "
                             "(_mla_decode_gluon_regs.STAGES, default 4)")
    parser.add_argument("--caches", nargs="+", choices=("bf16", "fp8"), default=["bf16", "fp8"],
                        help="--quick: the cache formats to run (default both)")
    parser.add_argument("--eager-timing", action="store_true", help="time each call with do_bench, the "
                        "launcher's host time included (how runs 6-30 timed), instead of CUDA graph replays")
    parser.add_argument("--lazy", action="store_true", help="also time the picked configuration with lazy "
                        "rescaling (kernel_config LAZY=1; not among the autotuner's candidates)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_mla_decode.py needs a CUDA GPU")
    global EAGER_TIMING
    EAGER_TIMING = args.eager_timing
    if args.splits and any(s < 1 for s in args.splits):
        parser.error("--splits takes positive counts")
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    if args.quick:
        fp8s = [c == "fp8" for c in args.caches]
        plan = [(B, T, 16, 1, fp8) for fp8 in fp8s for B in (1, 64, 128) for T in (4096, 32768)]
        plan += [(64, 8192, 128, 1, fp8) for fp8 in fp8s]
    else:
        plan = [(B, T, H, 1, fp8) for H in (16, 128) for fp8 in (False, True) for B in (1, 16, 64, 128)
                for T in (4096, 8192, 16384, 32768)]
        plan += [(B, 8192, 16, 2, fp8) for fp8 in (False, True) for B in (16, 64, 128)]  # MTP verification
    import triton

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
            "copy_tbps": H200_COPY_TBPS, "timing": "do_bench" if args.eager_timing else "cuda_graph",
            "sms": torch.cuda.get_device_properties(0).multi_processor_count}
    print(json.dumps(meta))
    log = ResultsLog("bench_mla_decode")
    results: list[dict] = []
    if args.check_all:
        meta["candidate_errors"] = check_all_candidates(gen)
    start = time.time()
    for B, T, H, S, fp8 in plan:
        run_case(B, T, H, S, fp8, args, gen, results)
        log.save(meta=meta, results=results)  # keep partial results if the lease ends mid-run
    meta["wall_s"] = time.time() - start
    log.save(meta=meta, results=results)
    print_table(results)
    goal = [r for r in results if "error" not in r and r["batch"] >= 64 and r["s_q"] == 1]
    print(json.dumps({"meta": meta, "n_results": len(results), "errors": sum("error" in r for r in results),
                      "min_pct_at_batch_64_128": min((r["pct_of_copy"] for r in goal), default=None)}))


if __name__ == "__main__":
    main()
