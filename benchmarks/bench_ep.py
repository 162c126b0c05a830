"""Expert-parallel dispatch / combine against raw NCCL all_to_all_single, and two-micro-batch overlap.

Launch (two GPUs of one host; NCCL):
    torchrun --nproc-per-node 2 benchmarks/bench_ep.py --out $OUT
Rank 0 appends a line to bench_ep.jsonl in --out (default benchmarks/results; results_log.py).
CPU smoke run (gloo, small sizes, checks that everything runs):
    torchrun --nproc-per-node 2 benchmarks/bench_ep.py --backend gloo --quick

What is timed (per size; median over reps of the slowest rank; a barrier before each rep):
- ``raw``: all_to_all_single of uint8 buffers with exactly the per-destination bytes of the route
  (the ceiling a dispatch can reach on this fabric).
- ``payload``: the token transfer of a prepared route (encode, exchange, decode).
- ``dispatch``: the whole dispatch (split sizes exchanged, routes planned, weights moved, tokens sent).
- ``combine``: weighted rows sent home and summed (BF16).
Bandwidth = bytes this rank sends to other ranks / time. Routes: ``pair`` sends one row per
(token, expert) pair; ``rank`` one row per (token, destination rank), forwarded to the experts on
arrival (the two-hop route with one GPU per node: per-rank deduplication, as DeepEP does).
Overlap: one MoE expert layer step (dispatch -> local grouped experts -> combine), forward and
forward + backward, with 1 and with n micro-batches (--micro-batches, default 2);
hidden = (t_1 - t_n) / t_comm, where t_comm is dispatch + combine alone (FP8 dispatch, BF16 combine).
Goals (issue 6): payload >= 80% of raw at large sizes; FP8 dispatch >= 1.7x faster than BF16 at large
sizes; overlap hides >= 50% of the communication time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

from coscale.parallel import (
    ExpertParallelExperts,
    combine,
    dispatch,
    get_codec,
    init_parallel,
)
from coscale.parallel.routes import plan_routes, topology
from coscale.parallel.transfer import scatter
from results_log import ResultsLog


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--decode-tokens", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--overlap-tokens", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches of the overlapped step")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--backend", default=None, help="nccl (default with CUDA) or gloo")
    p.add_argument("--out", default=None, help="folder of bench_ep.jsonl (default: benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    if args.quick:
        args.train_tokens, args.decode_tokens, args.overlap_tokens = [256], [32], [128]
        args.hidden, args.experts, args.topk, args.intermediate = 256, 16, 4, 64
        args.warmup, args.reps = 1, 3
    return args


class Timer:
    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn) -> dict:
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.reps):
            dist.barrier()
            self.sync()
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e-3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        stats = torch.tensor([statistics.median(times), min(times), max(times)], dtype=torch.float64,
                             device=self.device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        return {"median_s": stats[0].item(), "min_s": stats[1].item(), "max_s": stats[2].item()}


def make_routing(tokens, args, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(tokens, args.experts, generator=g)
    idx = scores.topk(args.topk, dim=-1).indices
    weights = torch.rand(tokens, args.topk, generator=g)
    x = torch.randn(tokens, args.hidden, generator=g)
    dtype = torch.bfloat16
    return x.to(device, dtype), idx.to(device), weights.to(device)


def make_plan(route, idx, args, ctx):
    return plan_routes(idx, args.experts, topology(ctx), two_hop=route == "rank")


def sent_bytes(route_obj, bytes_per_row, me):
    return sum(rows * bytes_per_row for s in route_obj.stages if s.exchanges
               for dest, rows in zip(s.ranks, s.send_splits) if dest != me)


def raw_all_to_all(route_obj, bytes_per_row, device, ctx):
    """uint8 buffers with the route's per-destination byte counts, one all_to_all_single per stage."""
    stages = []
    for s in route_obj.stages:
        if not s.exchanges or len(s.ranks) == 1:
            continue
        send = [n * bytes_per_row for n in s.send_splits]
        recv = [n * bytes_per_row for n in s.recv_splits]
        inp = torch.randint(0, 255, (sum(send),), dtype=torch.uint8, device=device)
        out = torch.empty(sum(recv), dtype=torch.uint8, device=device)
        stages.append((out, inp, recv, send, s.group))

    def run():
        for out, inp, recv, send, group in stages:
            dist.all_to_all_single(out, inp, recv, send, group=group)
    return run


def bench_transfers(tokens, kind, route, args, ctx, timer, rows_out):
    x, idx, w = make_routing(tokens, args, ctx.device, seed=tokens)
    plan = make_plan(route, idx, args, ctx)
    me = dist.get_rank()
    raw = {}
    for codec_name in ("bf16", "fp8"):
        codec, bf16 = get_codec(codec_name), get_codec("bf16")
        row = codec.bytes_per_row(args.hidden)
        nbytes = sent_bytes(plan.token_route, row, me)
        nbytes_t = torch.tensor([nbytes], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(nbytes_t, op=dist.ReduceOp.MAX)
        nbytes = nbytes_t.item()

        def payload(codec=codec, bf16=bf16):
            return scatter(x, plan.token_route, codec, bf16, x.dtype, ctx.timeout_s)

        def full_dispatch(codec=codec):
            return dispatch(x, idx, w, ctx, args.experts, codec=codec, combine_codec="bf16",
                            two_hop=route == "rank")

        with torch.no_grad():
            raw[codec_name] = timer(raw_all_to_all(plan.token_route, row, ctx.device, ctx))
            t_payload = timer(payload)
            t_dispatch = timer(full_dispatch)
            recv, meta = full_dispatch()
            t_combine = timer(lambda r=recv, m=meta: combine(r, m)) if codec_name == "bf16" else None
        rec = {
            "kind": kind, "tokens": tokens, "route": route, "codec": codec_name, "bytes_sent": nbytes,
            "raw": raw[codec_name], "payload": t_payload, "dispatch": t_dispatch, "combine": t_combine,
            "raw_GBps": nbytes / raw[codec_name]["median_s"] / 1e9,
            "payload_GBps": nbytes / t_payload["median_s"] / 1e9,
            "payload_vs_raw": raw[codec_name]["median_s"] / t_payload["median_s"],
        }
        rows_out.append(rec)
    bf, f8 = rows_out[-2], rows_out[-1]
    f8["fp8_speedup_payload"] = bf["payload"]["median_s"] / f8["payload"]["median_s"]
    f8["fp8_speedup_dispatch"] = bf["dispatch"]["median_s"] / f8["dispatch"]["median_s"]


def check_correctness(args, ctx):
    """Identity experts: dispatch + combine must return x * sum_k w (exact with fp32 wire formats)."""
    x, idx, w = make_routing(512, args, ctx.device, seed=7)
    x = x.float()
    errors = {}
    for route in ("pair", "rank"):
        for codec in ("fp32", "bf16", "fp8"):
            with torch.no_grad():
                recv, meta = dispatch(x, idx, w, ctx, args.experts, codec=codec,
                                      combine_codec="fp32" if codec == "fp32" else "bf16",
                                      two_hop=route == "rank")
                out = combine(recv, meta)
            ref = x * w.sum(1, keepdim=True)
            errors[f"{route}/{codec}"] = float((out - ref).norm() / ref.norm())
    return errors


def bench_overlap(tokens, args, ctx, timer, route):
    x, idx, w = make_routing(tokens, args, ctx.device, seed=tokens + 1)
    experts = ExpertParallelExperts(args.experts, args.hidden, args.intermediate, ctx, dispatch_codec="fp8",
                                    combine_codec="bf16", two_hop=route == "rank", dtype=torch.bfloat16,
                                    device=ctx.device)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.02)
        recv, meta = dispatch(x, idx, w, ctx, args.experts, codec="fp8", two_hop=route == "rank")

        def comm():
            r, m = dispatch(x, idx, w, ctx, args.experts, codec="fp8", two_hop=route == "rank")
            return combine(r, m)

        t_comm = timer(comm)
        t_compute = timer(lambda: experts.compute(recv, meta.tokens_per_expert))
        experts.micro_batches = 1
        t_one = timer(lambda: experts(x, idx, w))
        experts.micro_batches = args.micro_batches
        t_two = timer(lambda: experts(x, idx, w))
    hidden = (t_one["median_s"] - t_two["median_s"]) / t_comm["median_s"]
    result = {"tokens": tokens, "route": route, "micro_batches": args.micro_batches, "comm": t_comm,
              "compute": t_compute,
              "one_micro_batch": t_one, "two_micro_batches": t_two, "hidden_fraction": hidden,
              "ideal_s": max(t_comm["median_s"], t_compute["median_s"])}
    # Training step: forward + backward of the layer; communication doubles (the backward of dispatch
    # is a combine and vice versa).
    xg = x.detach().clone().requires_grad_(True)

    def comm_train():
        r, m = dispatch(xg, idx, w, ctx, args.experts, codec="fp8", two_hop=route == "rank")
        combine(r, m).float().sum().backward()

    def step(micro_batches):
        experts.micro_batches = micro_batches
        experts(xg, idx, w).float().sum().backward()

    t_comm_train = timer(comm_train)
    t_one_train, t_two_train = timer(lambda: step(1)), timer(lambda: step(args.micro_batches))
    experts.zero_grad(set_to_none=True)
    result.update(comm_train=t_comm_train, one_micro_batch_train=t_one_train,
                  two_micro_batches_train=t_two_train,
                  hidden_fraction_train=(t_one_train["median_s"] - t_two_train["median_s"])
                  / t_comm_train["median_s"])
    return result


def main(argv=None):
    args = parse_args(argv)
    ctx = init_parallel(ep_size=int(os.environ.get("WORLD_SIZE", "1")), gpus_per_node=1,
                        backend=args.backend, timeout_s=args.timeout)
    if args.experts % ctx.ep_size:
        raise SystemExit(f"--experts {args.experts} must be divisible by the {ctx.ep_size} ranks")
    timer = Timer(ctx.device, args.warmup, args.reps)
    rank0 = ctx.rank == 0
    on_gpu = ctx.device.type == "cuda"
    result = {
        "conditions": {
            "device": torch.cuda.get_device_name(ctx.device) if on_gpu else f"cpu {platform.machine()}",
            "world_size": ctx.world_size, "backend": dist.get_backend(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "hidden": args.hidden, "experts": args.experts, "topk": args.topk,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        },
        "correctness": check_correctness(args, ctx),
        "transfers": [],
        "overlap": [],
    }
    for kind, sizes in (("train", args.train_tokens), ("decode", args.decode_tokens)):
        for tokens in sizes:
            for route in ("pair", "rank"):
                bench_transfers(tokens, kind, route, args, ctx, timer, result["transfers"])
                if rank0:
                    r = result["transfers"][-1]
                    print(f"  {kind} {tokens} {route}: fp8 payload {r['payload']['median_s'] * 1e6:.0f} us",
                          flush=True)
    for tokens in args.overlap_tokens:
        for route in ("pair", "rank"):
            try:
                result["overlap"].append(bench_overlap(tokens, args, ctx, timer, route))
            except torch.cuda.OutOfMemoryError:
                result["overlap"].append({"tokens": tokens, "route": route, "error": "out of memory"})
                torch.cuda.empty_cache()
    if rank0:
        print_tables(result)
        path = ResultsLog("bench_ep", args.out).save(**result)
        print(f"appended to {path}")
        print(json.dumps({"goals": goals(result)}))
    dist.destroy_process_group()


def goals(result):
    big = max(r["tokens"] for r in result["transfers"])
    large = [r for r in result["transfers"] if r["tokens"] == big]
    ok_overlap = [o["hidden_fraction"] for o in result["overlap"] if "hidden_fraction" in o]
    ok_train = [o["hidden_fraction_train"] for o in result["overlap"] if "hidden_fraction_train" in o]
    return {
        "payload_vs_raw_at_largest": min(r["payload_vs_raw"] for r in large),
        "fp8_speedup_at_largest": min(r.get("fp8_speedup_payload", float("inf")) for r in large
                                      if r["codec"] == "fp8"),
        "overlap_hidden_fraction": max(ok_overlap) if ok_overlap else None,
        "overlap_hidden_fraction_train": max(ok_train) if ok_train else None,
    }


def print_tables(result):
    us = 1e6
    print(f"\n{result['conditions']}")
    print("correctness (relative error, identity experts):", {k: f"{v:.1e}" for k, v in result["correctness"].items()})
    print(f"\n{'kind':6} {'tokens':>6} {'route':5} {'codec':5} {'MB sent':>8} {'raw us':>8} {'payload us':>10} "
          f"{'dispatch us':>11} {'combine us':>10} {'raw GB/s':>8} {'GB/s':>6} {'vs raw':>6} {'fp8 x':>6}")
    for r in result["transfers"]:
        comb = f"{r['combine']['median_s'] * us:10.0f}" if r["combine"] else f"{'':>10}"
        speed = f"{r['fp8_speedup_payload']:6.2f}" if "fp8_speedup_payload" in r else f"{'':>6}"
        print(f"{r['kind']:6} {r['tokens']:6d} {r['route']:5} {r['codec']:5} {r['bytes_sent'] / 1e6:8.2f} "
              f"{r['raw']['median_s'] * us:8.0f} {r['payload']['median_s'] * us:10.0f} "
              f"{r['dispatch']['median_s'] * us:11.0f} {comb} {r['raw_GBps']:8.1f} {r['payload_GBps']:6.1f} "
              f"{r['payload_vs_raw']:6.2f} {speed}")
    print(f"\n{'tokens':>6} {'route':5} {'comm us':>8} {'compute us':>10} {'1 mb us':>8} {'n mb us':>8} "
          f"{'ideal us':>8} {'hidden':>6} {'train: comm us':>14} {'1 mb us':>8} {'n mb us':>8} {'hidden':>6}")
    for o in result["overlap"]:
        if "error" in o:
            print(f"{o['tokens']:6d} {o['route']:5} {o['error']}")
            continue
        print(f"{o['tokens']:6d} {o['route']:5} {o['comm']['median_s'] * us:8.0f} "
              f"{o['compute']['median_s'] * us:10.0f} {o['one_micro_batch']['median_s'] * us:8.0f} "
              f"{o['two_micro_batches']['median_s'] * us:8.0f} {o['ideal_s'] * us:8.0f} "
              f"{o['hidden_fraction']:6.2f} {o['comm_train']['median_s'] * us:14.0f} "
              f"{o['one_micro_batch_train']['median_s'] * us:8.0f} "
              f"{o['two_micro_batches_train']['median_s'] * us:8.0f} {o['hidden_fraction_train']:6.2f}")


if __name__ == "__main__":
    main()
