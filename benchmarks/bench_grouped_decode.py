"""Routed experts at decode batch sizes on one GPU: how close the expert GEMMs come to streaming the weights.

Run: `PYTHONPATH=src python benchmarks/bench_grouped_decode.py [--quick]`; appends a line to
benchmarks/results/bench_grouped_decode.jsonl (results_log.py); `--smoke`: tiny shapes on the CPU
interpreter (a check of the script, nothing recorded).

At decode an expert gets a row or two, so its GEMMs are matrix-vector products: the time is the time to
read the weights of the experts the batch touches. For each model shape (DeepSeek-V2-Lite: 64 experts
of 2048 x 1408, top-6; DeepSeek-V3: 256 of 7168 x 2048, top-8) and batch (tokens), routing drawn
uniformly at random:

- gate / up / down GEMMs alone (`grouped_mm`, each expert's rows padded to 16 as torch._grouped_mm needs),
  torch._grouped_mm (CUTLASS) against coscale's Triton grouped GEMM (autotuned, with 16-row tiles for
  this regime);
- the whole routed forward (`grouped_experts_forward`: permutation, three GEMMs, SwiGLU, weighted
  combine) in BF16: backend "torch" (CUTLASS and PyTorch data movement, rows padded to 16) and "auto"
  (what the engine runs: since run 25 the Triton GEMM at decode, rows padded to 16); and in FP8 with
  cached block-scaled weights (what an FP8 checkpoint runs: half the bytes).

Each is timed replayed from a CUDA graph (the engine replays its decode steps). Bytes = the touched
experts' weights (gate, up, down; FP8: one byte a weight plus its 128x128 block scales) + the activations;
the table gives them as a per cent of the H200's measured copy bandwidth (4.25 TB/s, read only).
"""

from __future__ import annotations

import json

import torch

# isort: off
# first: --smoke sets TRITON_INTERPRET before coscale's kernels decorate
from gpu_timing import SMOKE, decode_bench_args, graph_ms, run_cases
# isort: on

from coscale.fp8 import FP8WeightCache
from coscale.kernels.grouped_gemm import grouped_mm
from coscale.kernels.moe import grouped_experts_forward
from coscale.kernels.permute import permute_tokens

COPY_TBPS = 4.25  # H200, measured (shared/reference/measuring.md)
SHAPES = {  # name: (experts, hidden, expert intermediate, top-k)
    "v2-lite": (64, 2048, 1408, 6),
    "v3": (256, 7168, 2048, 8),
}
SMOKE_SHAPE = (8, 256, 128, 2)
# the interpreter's tl.dot on bf16 operands multiplies their bit patterns (shared/reference/triton-cpu.md)
DTYPE = torch.float32 if SMOKE else torch.bfloat16


def routing(T: int, K: int, E: int, gen: torch.Generator, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random top-K experts per token (distinct), weights summing to one."""
    idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K]
    weight = torch.rand(T, K, generator=gen) + 0.1
    return idx.to(dev), (weight / weight.sum(-1, keepdim=True)).to(dev)


def run_case(name: str, shape, T: int, args, gen, dev) -> list[dict]:
    E, H, I, K = shape
    x = torch.randn(T, H, generator=gen).to(dev, DTYPE)
    idx, weight = routing(T, K, E, gen, dev)
    w_gate, w_up = (torch.randn(E, I, H, generator=gen).div_(H**0.5).to(dev, DTYPE) for _ in range(2))
    w_down = torch.randn(E, H, I, generator=gen).div_(I**0.5).to(dev, DTYPE)
    touched = int(torch.unique(idx).numel())
    weight_bytes = touched * 3 * H * I  # elements; times 2 for BF16, 1 (+ scales) for FP8
    x_perm, info = permute_tokens(x, idx, E, 16)
    offs = info.group_end_offsets
    a = torch.randn(x_perm.shape[0], I, generator=gen).to(dev, DTYPE)
    rows = []

    def record(variant: str, fn, nbytes: float, ref: torch.Tensor | None = None):
        entry = dict(shape=name, tokens=T, touched_experts=touched, variant=variant)
        try:
            out = fn()
            if ref is not None:  # the rows that belong to a group (padding rows are unspecified)
                n = int(offs[-1]) if out.shape[0] == x_perm.shape[0] else out.shape[0]
                err = (out[:n].float() - ref[:n].float()).norm() / ref[:n].float().norm().clamp_min(1e-30)
                entry["rel_err"] = float(err)
            ms = graph_ms(fn)
            entry.update(ms=ms, gbytes=nbytes / 1e9, pct_of_copy=100 * nbytes / (ms * 1e-3) / (COPY_TBPS * 1e12))
        except Exception as exc:  # one failing variant must not end the run
            entry["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(entry)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()}), flush=True)
        return entry

    gemm_bytes = {"gate": touched * H * I * 2, "down": touched * H * I * 2}
    ref_gate = grouped_mm(x_perm, w_gate, offs, backend="loop")
    ref_down = grouped_mm(a, w_down, offs, backend="loop")
    for backend in ("torch", "triton"):
        record(f"gate GEMM, {backend}", lambda b=backend: grouped_mm(x_perm, w_gate, offs, backend=b),
               gemm_bytes["gate"] + x_perm.numel() * 2, ref_gate)
        record(f"down GEMM, {backend}", lambda b=backend: grouped_mm(a, w_down, offs, backend=b),
               gemm_bytes["down"] + a.numel() * 2, ref_down)
    layer_ref = grouped_experts_forward(x, idx, weight, w_gate, w_up, w_down, backend="reference")
    act_bytes = 2 * T * H * 2
    for backend, label in (("torch", "bf16, torch (CUTLASS, padded rows)"), ("auto", "bf16, auto (the engine's)")):
        record(f"routed forward {label}",
               lambda b=backend: grouped_experts_forward(x, idx, weight, w_gate, w_up, w_down, backend=b),
               weight_bytes * 2 + act_bytes, layer_ref)
    cache = FP8WeightCache()
    scales = touched * 3 * 4 * -(-I // 128) * -(-H // 128)  # one FP32 scale per 128x128 block of 3 matrices
    record("routed forward fp8, cached weights",
           lambda: grouped_experts_forward(x, idx, weight, w_gate, w_up, w_down, precision="fp8",
                                           fp8_weight_cache=cache),
           weight_bytes + scales + act_bytes, layer_ref)
    return rows


def print_table(results: list[dict]) -> None:
    print(f"\n{'shape':8} {'T':>4} {'experts':>7}  {'variant':50} {'ms':>8} {'% copy':>7} {'rel err':>8}")
    for r in results:
        if "error" in r:
            print(f"{r['shape']:8} {r['tokens']:4d} {r['touched_experts']:7d}  {r['variant']:50} ERROR {r['error']}")
            continue
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else "-"
        print(f"{r['shape']:8} {r['tokens']:4d} {r['touched_experts']:7d}  {r['variant']:50} {r['ms']:8.4f} "
              f"{r['pct_of_copy']:7.1f} {err:>8}")


def main() -> None:
    def more(parser):
        parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), help="default: both")

    args, dev, gen = decode_bench_args(__doc__, "V2-Lite at 1 / 16 / 64 tokens, V3 at 16 (about a minute)", "tokens",
                                       "decode batch sizes (default 1 16 64 128)", more)
    if SMOKE:
        cases = [("smoke", SMOKE_SHAPE, t) for t in (args.tokens or [1, 4])]
    elif args.quick and args.tokens is None and args.shapes is None:
        cases = [("v2-lite", SHAPES["v2-lite"], t) for t in (1, 16, 64)] + [("v3", SHAPES["v3"], 16)]
    else:
        cases = [(s, SHAPES[s], t) for s in (args.shapes or sorted(SHAPES)) for t in (args.tokens or [1, 16, 64, 128])]
    run_cases("bench_grouped_decode", cases, lambda *c: run_case(*c, args, gen, dev), print_table, dev,
              args.quick, COPY_TBPS)


if __name__ == "__main__":
    main()
