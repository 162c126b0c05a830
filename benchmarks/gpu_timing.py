"""Timing helpers of the kernel benchmarks (bench_quant, bench_fp8, bench_moe) on one GPU.

- ``eager_ms``: medians of ``triton.testing.do_bench`` (L2 flushed between calls): what eager mode pays,
  Python's launches included, so a sub-0.1 ms kernel can measure the host rather than the GPU.
- ``graph_ms``: the same function captured in a CUDA graph and replayed
  (``triton.testing.do_bench_cudagraph``): the kernels alone, as a graphed training step runs them
  (L2 is not flushed between the calls inside one replay).
Both run the function once first (compilation, autotuning, cuBLAS handles), outside the timing.

``--smoke`` (every script that uses these): tiny shapes on the CPU under TRITON_INTERPRET=1, each
function timed once with a wall clock; it checks the script, not the kernels' speed.
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
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def copy_bandwidth(dev, nbytes: int = 1 << 30) -> float:
    """TB/s of a device-to-device copy (read + write), the ceiling the quantization kernels aim at."""
    nbytes = 1 << 20 if SMOKE else nbytes
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = eager_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e9
