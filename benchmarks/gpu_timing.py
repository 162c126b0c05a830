"""Timing helpers of the kernel benchmarks (bench_quant, bench_fp8, bench_moe) on one GPU.

- ``eager_ms``: medians of ``triton.testing.do_bench`` (L2 flushed between calls): what eager mode pays,
  Python's launches included, so a sub-0.1 ms kernel can measure the host rather than the GPU.
- ``graph_ms``: the same function captured in a CUDA graph and replayed
  (``triton.testing.do_bench_cudagraph``): the kernels alone, as a graphed training step runs them
  (L2 is not flushed between the calls inside one replay).
Both run the function once first (compilation, autotuning, cuBLAS handles), outside the timing.

``--smoke`` (every script that uses these): tiny shapes on the CPU under TRITON_INTERPRET=1, each
function timed once with a wall clock; it checks the script, not the kernels' speed.

``COSCALE_NCU=1`` (in the environment): before it is timed, each function runs once more between
``cudaProfilerStart`` and ``cudaProfilerStop``, so that Nsight Compute, started with
``--profile-from-start off``, profiles one eager run of every timed function and nothing else (warm-up,
autotuning, graph replays); its ``--kernel-name regex:...`` keeps the kernels of interest. On the H200's
Firecracker runtime: ``COSCALE_NCU=1 ncu --clock-control none --profile-from-start off -k regex:encode_kernel
--section SpeedOfLight --section WarpStateStats python3 benchmarks/bench_logfmt.py --quick --comm-only``.
"""

from __future__ import annotations

import os
import sys
import time

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before any coscale kernel module is imported: kernels decorate for the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


def device() -> torch.device:
    """The GPU, or the CPU for ``--smoke``; exits with a message when neither applies."""
    if SMOKE:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(f"{os.path.basename(sys.argv[0])} needs a CUDA GPU (or --smoke: a CPU check of the script)")
    return torch.device("cuda")


NCU = os.environ.get("COSCALE_NCU", "") == "1"


def profiled_run(fn) -> None:
    """One run of ``fn`` between cudaProfilerStart and cudaProfilerStop under ``COSCALE_NCU=1`` (the module
    docstring); nothing otherwise."""
    if NCU and not SMOKE:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


def _wall_ms(fn) -> float:
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def eager_ms(fn, rep: int = 100, warmup: int = 25) -> float:
    if SMOKE:
        return _wall_ms(fn)
    import triton.testing

    fn()
    profiled_run(fn)
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def graph_ms(fn, rep: int = 50) -> float:
    if SMOKE:
        return _wall_ms(fn)
    import triton.testing

    side = torch.cuda.Stream()  # warm up off the default stream, as capture requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    profiled_run(fn)
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def copy_bandwidth(dev, nbytes: int = 1 << 30) -> float:
    """TB/s of a device-to-device copy (read + write), the ceiling the quantization kernels aim at."""
    nbytes = 1 << 20 if SMOKE else nbytes
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = eager_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e9


def run_cases(script: str, cases, run_case, print_table, dev, quick: bool, copy_tbps: float) -> list[dict]:
    """The loop of a kernel benchmark: print the run's conditions, call ``run_case(*case)`` (a list of result
    rows) for each case, keep every row in benchmarks/results/<script>.jsonl as it comes (partial results
    survive a lease that ends mid-run; nothing is recorded under --smoke), then ``print_table(rows)``."""
    import datetime
    import json

    from results_log import ResultsLog

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "quick": quick,
            "copy_tbps": copy_tbps, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
    print(json.dumps(meta), flush=True)
    log = None if SMOKE else ResultsLog(script)
    results: list[dict] = []
    for case in cases:
        results += run_case(*case)
        if log is not None:
            log.save(meta=meta, results=results)
    print_table(results)
    return results


def decode_bench_args(doc: str, quick_help: str, sizes: str, sizes_help: str, more=None):
    """The command line of a decode-kernel benchmark: --quick, --<sizes> (batch sizes, each >= 1), --seed,
    --smoke, plus what ``more(parser)`` adds. Returns (args, device, a seeded torch.Generator)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(f"--{sizes}", type=int, nargs="+", metavar="N", help=sizes_help)
    if more is not None:
        more(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter: checks the script")
    args = parser.parse_args()
    given = getattr(args, sizes)
    if given is not None and min(given) < 1:
        parser.error(f"--{sizes}: batch sizes must be >= 1")
    return args, device(), torch.Generator().manual_seed(args.seed)


def print_rows(results: list[dict], columns: list[tuple]) -> None:
    """A table of result rows: ``columns`` = [(header, key or function of the row, width, format spec)];
    strings (format spec "") align left, numbers right, a missing value prints "-". A row with an "error"
    prints its first three columns (the case) and the error."""
    def cell(row, get, width, spec):
        value = get(row) if callable(get) else row.get(get)
        if value is None:
            return f"{'-':>{width}}"
        return f"{value:<{width}}" if isinstance(value, str) else f"{format(value, spec):>{width}}"

    print("\n" + " ".join(f"{h:<{w}}" if not spec else f"{h:>{w}}" for h, _, w, spec in columns))
    for r in results:
        if "error" in r:
            print(" ".join(cell(r, *c[1:]) for c in columns[:3]), "ERROR", r["error"])
            continue
        print(" ".join(cell(r, *c[1:]) for c in columns))


def add_speedups(rows: list[dict], base_variant: str, key: str) -> list[dict]:
    """Each timed row's speed-up over the row whose "variant" is ``base_variant``, as ``row[key]``."""
    base = next((r.get("us") for r in rows if r["variant"] == base_variant), None)
    for r in rows:
        if base and r.get("us"):
            r[key] = base / r["us"]
    return rows


def time_variant(entry: dict, fn, check, nbytes: float, copy_tbps: float) -> dict:
    """One row of a kernel benchmark: ``entry`` updated with ``check(fn())`` (accuracy fields), microseconds
    per call replayed from a CUDA graph, and ``nbytes`` per call as a per cent of ``copy_tbps``; an error
    is recorded in the row rather than ending the run. Prints the row as a JSON line."""
    import json

    try:
        entry.update(check(fn()))
        entry["us"] = graph_ms(fn) * 1e3
        entry["pct_of_copy"] = 100 * nbytes / (entry["us"] * 1e-6) / (copy_tbps * 1e12)
    except Exception as exc:  # one failing variant must not end the run
        entry["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()}), flush=True)
    return entry
