"""Training throughput of `coscale train`, side by side with torchtitan's DeepSeek-V3 trainer.

Run (GPU): `PYTHONPATH=src python3 benchmarks/bench_train.py --model small --variants matched as-is
--precisions bf16 fp8 --modes default eager [--titan .peers/torchtitan]`.

Each coscale run is a `coscale train` subprocess on uniform random token ids (the distribution
torchtitan's titan_bench.py trains on) with no checkpoint and one evaluation batch; tokens/s is
recomputed from metrics.jsonl over the steps after `--warmup` (compilation and CUDA-graph capture
happen in the first steps), and peak device memory comes from the run's summary. Variants:
`as-is` = the preset; `matched` = without MTP and without the sequence-wise balance loss, the model
torchtitan 0.2.2 can build. Modes: `default` (what `coscale train` picks: compiled + CUDA graph on one
GPU), `eager`, `compile` (no graph), `graph` (eager kernels in a graph), `compile-graph` (both, asked for
explicitly: a model with FP8 layers runs eagerly by default).

With `--titan DIR` (a copy of ../shared/peers/torchtitan: its wheels and titan_bench.py), torchtitan runs
at the same shape, eager and compiled, before the coscale runs. MFU = model FLOPs per token x tokens/s over
989 TFLOP/s, the dense BF16 peak, FLOPs counted as coscale.analysis.flops does: 6 x activated parameters
(embedding out, output head in) + causal attention 3 x L x S x heads x (d_qk + d_v), MTP modules included.

Prints one table last; every run's record (losses left out) goes into this invocation's line of
benchmarks/results/bench_train.jsonl as soon as the run ends (results_log.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from coscale.analysis.flops import training_flops_per_token  # noqa: E402
from coscale.config import get_preset, load_config  # noqa: E402
from results_log import ResultsLog  # noqa: E402

PEAK_BF16 = 989e12
MODES = {"default": [], "eager": ["--no-compile", "--no-cuda-graphs"], "compile": ["--compile", "--no-cuda-graphs"],
         "graph": ["--no-compile", "--cuda-graphs"], "compile-graph": ["--compile", "--cuda-graphs"]}


def model_config(name: str, variant: str):
    cfg = load_config(name) if os.path.exists(name) else get_preset(name)
    if variant == "matched":
        cfg = cfg.replace(num_nextn_predict_layers=0, aux_loss_alpha=0.0)
    return cfg


def train_flops_per_token(cfg, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward, causal attention, MTP included)."""
    return training_flops_per_token(cfg, seq_len, attention="causal", include_mtp=True)


def random_tokens(path: str, vocab: int, n: int) -> str:
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    np.random.default_rng(0).integers(0, vocab, size=n, dtype=dtype).tofile(path)
    return "uint16" if dtype == np.uint16 else "uint32"


def run_coscale(args, cfg, variant: str, precision: str, mode: str, work: str) -> dict:
    name = f"{variant}_{precision}_{mode}"
    cfg_path = os.path.join(work, f"{variant}.json")
    cfg.save_json(cfg_path)
    data = os.path.join(work, f"tokens_{cfg.vocab_size}.bin")
    bin_dtype = "uint16" if cfg.vocab_size <= 65536 else "uint32"
    if not os.path.exists(data):
        random_tokens(data, cfg.vocab_size, max(4_000_000, 4 * args.batch_size * (args.seq_len + 1) * args.steps))
    out = os.path.join(work, name)
    cmd = [sys.executable, "-m", "coscale", "train", "--model", cfg_path, "--data", data, "--bin-dtype", bin_dtype,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
           "--precision", precision, "--out", out, "--overwrite", "--eval-interval", "0", "--eval-batches", "1",
           "--no-checkpoints", "--log-interval", "5", "--no-progress", "--no-tensorboard",
           "--adam-moments-dtype", args.adam_moments_dtype, *MODES[mode], *args.train_args]
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    print(f"=== coscale {name}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        output, status = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:  # keep what it printed and the steps it logged
        output = "".join(b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
                         for b in (e.stdout, e.stderr))
        status = "timeout"
    wall = time.perf_counter() - t0
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        with open(os.path.join(args.log_dir, f"bench_train_{args.model}_{name}.log"), "w") as f:
            f.write(output)
    tail = output.strip().splitlines()[-12:]
    print("\n".join("   " + line for line in tail), flush=True)
    record = {"framework": "coscale", "run": name, "exit_status": status, "wall_s": wall}
    metrics = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(metrics):
        return record
    with open(metrics) as f:
        steps = [r for r in map(json.loads, f) if r.get("type") == "train"]
    timed = [r for r in steps if r["step"] > args.warmup]
    if not timed:
        return record
    tokens = args.batch_size * args.seq_len
    seconds = [tokens / r["tokens_per_s"] for r in timed]
    record |= {"tokens_per_s": tokens * len(seconds) / sum(seconds),
               "tokens_per_s_median_step": tokens / statistics.median(seconds),
               "step_ms": 1e3 * sum(seconds) / len(seconds), "first_steps_s": sum(tokens / r["tokens_per_s"]
                                                                                for r in steps[: args.warmup]),
               "final_loss": steps[-1]["loss"], "losses": [r["loss"] for r in steps]}
    try:
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        record |= {k: v for k, v in summary.items() if "mem" in k and isinstance(v, (int, float))}
    except OSError:
        pass
    return record


def run_titan(args, cfg, variant: str, compiled: bool, work: str) -> dict:
    site = os.path.join(work, "titan_site")
    if not os.path.isdir(site):
        wheels = [os.path.join(args.titan, "wheels", w) for w in os.listdir(os.path.join(args.titan, "wheels"))]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", site,
                        *wheels], check=True)
    cfg_path = os.path.join(work, f"titan_{variant}.json")
    cfg.save_json(cfg_path)
    cmd = [sys.executable, os.path.join(args.titan, "titan_bench.py"), "--config", cfg_path, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--json-out", os.path.join(work, "titan.json")]
    if compiled:
        cmd.append("--compile")
    name = f"{variant}_bf16_{'compile' if compiled else 'eager'}"
    print(f"=== torchtitan {name}", flush=True)
    env = dict(os.environ, PYTHONPATH=site, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    record = {"framework": "torchtitan", "run": name, "exit_status": proc.returncode,
              "wall_s": time.perf_counter() - t0}
    print("\n".join("   " + line for line in (proc.stdout + proc.stderr).strip().splitlines()[-8:]), flush=True)
    try:
        with open(os.path.join(work, "titan.json")) as f:
            record |= json.load(f)
        os.remove(os.path.join(work, "titan.json"))
    except OSError:
        pass
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small", help="preset or config.json")
    p.add_argument("--variants", nargs="+", default=["matched", "as-is"], choices=["matched", "as-is"])
    p.add_argument("--precisions", nargs="+", default=["bf16"], choices=["bf16", "fp8"])
    p.add_argument("--modes", nargs="+", default=["default"], choices=list(MODES))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of tokens/s")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--adam-moments-dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--titan", metavar="DIR", help="torchtitan peer folder (wheels/ and titan_bench.py)")
    p.add_argument("--titan-compile", action="store_true", help="also run torchtitan with --compile")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--log-dir", metavar="DIR", help="write each coscale run's whole output there")
    p.add_argument("--work", metavar="DIR", help="scratch directory (default: a temporary one)")
    p.add_argument("train_args", nargs="*", help="extra `coscale train` options (after --)")
    args = p.parse_args(argv)
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")
    work = args.work or tempfile.mkdtemp(prefix="bench_train_")
    os.makedirs(work, exist_ok=True)
    records = []
    log = ResultsLog("bench_train")

    def keep(record):  # partial results survive a run that times out or a lease that ends
        records.append(record)
        log.save(model=args.model, batch_size=args.batch_size, seq_len=args.seq_len,
                 runs=[{k: v for k, v in r.items() if k != "losses"} for r in records])

    for variant in args.variants:
        cfg = model_config(args.model, variant)
        fpt = train_flops_per_token(cfg, args.seq_len)
        if args.titan and variant == "matched":
            for compiled in [False] + ([True] if args.titan_compile else []):
                keep(run_titan(args, cfg, variant, compiled, work) | {"flops_per_token": fpt})
        for precision in args.precisions:
            for mode in args.modes:
                keep(run_coscale(args, cfg, variant, precision, mode, work) | {"flops_per_token": fpt})
    titan = max((r.get("tokens_per_s", 0) for r in records if r["framework"] == "torchtitan"), default=0)
    print(f"\n## Training throughput: {args.model}, batch {args.batch_size} x {args.seq_len}, steps "
          f"{args.warmup + 1}-{args.steps} timed")
    print("| framework | run | tokens/s | step ms | MFU | vs torchtitan | peak GiB | exit |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        tps = r.get("tokens_per_s")
        mfu = f"{100 * tps * r['flops_per_token'] / PEAK_BF16:.1f}%" if tps else "-"
        ratio = f"{tps / titan:.2f}x" if tps and titan else "-"
        mem = r.get("peak_mem_allocated_gib") or r.get("peak_memory_allocated_gib")
        print(f"| {r['framework']} | {r['run']} | {tps:,.0f} | {r.get('step_ms', 0):.1f} | {mfu} | {ratio} | "
              f"{mem if mem is None else f'{mem:.1f}'} | {r['exit_status']} |" if tps else
              f"| {r['framework']} | {r['run']} | - | - | - | - | - | {r['exit_status']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
