"""Kernels per training step, as `coscale train` runs it on one GPU: the count that
``coscale analyze validate`` needs to charge a stack's small kernels (docs/analysis.md).

Builds a preset's model (random weights, bf16 autocast, coscale's AdamW with FP32 moments, or BF16 ones
with ``--adam-moments-dtype bf16``: proxy-v3's state then fits an H100), runs the step
in the mode ``coscale train`` picks (compiled and replayed from a CUDA graph on one GPU) until it is
captured, then profiles a few steps with torch.profiler and prints the kernels per step, the GPU time per
step and the top kernels. With ``--device cpu`` it profiles eager CPU operators instead (a check of the
script, not a kernel count).

Run: ``PYTHONPATH=src python3 tools/count_step_kernels.py --model small --batch-size 16 --seq-len 512``
(add ``--no-mtp`` for the record of `small` without MTP).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import time

import torch
from torch.profiler import ProfilerActivity, profile

from coscale.config import get_preset
from coscale.errors import CoscaleError
from coscale.fp8 import convert_to_fp8
from coscale.model import DeepseekForCausalLM
from coscale.parallel.world import SingleProcess
from coscale.train.optim import build_optimizer
from coscale.train.step_runner import StepRunner, resolve_step_mode

# Kinds of kernel, by name (the first pattern that matches; BENCHMARKS.md's per-kind tables of a step)
KINDS = (
    ("AdamW (torch's fused, FP32 moments) and the gradient norm (foreach)", r"multi_tensor_apply"),
    ("AdamW's update compiled (coscale's AdamW, BF16 moments)", r"^triton_poi_fused\w*lerp\w*sqrt"),
    ("FP8 GEMMs (cuBLAS block-scaled, Triton)", r"qqtst|fp8_gemm_kernel"),
    ("BF16 GEMMs (cuBLAS)", r"nvjet|gemm_kernel|sm90_xmma"),
    ("expert GEMMs, FP8 (Triton / Gluon grouped)", r"grouped_mm_tma|grouped_mm_gluon|grouped_wgrad"),
    ("expert GEMMs, BF16 (CUTLASS grouped)", r"cutlass"),
    ("attention (cuDNN / flash)", r"sdpa|cudnn|flash"),
    ("FP8 quantization", r"^(rows_kernel|cols_kernel|weight_kernel|rows_quant_kernel|cols_quant_kernel|"
                         r"dual_quant_kernel|transpose_bytes_kernel|transpose_words_kernel|swiglu_quant|gather_quant)"),
    ("MoE permutation, combine, SwiGLU (Triton)", r"^(_rows_from_tokens|_tokens_from_rows|_swiglu_(fwd|bwd)|"
                                                   r"zero_empty_experts|decode_sum)"),
    ("eager dtype-converting copies", r"direct_copy_kernel"),
    ("Inductor-generated (fused elementwise, reductions)", r"^triton_(poi|red|per)_"),
)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--no-mtp", action="store_true", help="the model without its MTP modules")
    parser.add_argument("--matched", action="store_true",
                        help="without MTP and without the sequence-wise balance loss (bench_train.py's `matched`)")
    parser.add_argument("--precision", choices=["bf16", "fp8"], default="bf16")
    parser.add_argument("--fp8-layers", default="auto", help="FP8 layer policy, as coscale train's option")
    parser.add_argument("--adam-moments-dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--top", type=int, default=15, help="kernels listed, the longest first")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after warm-up and capture)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dev = torch.device(args.device)
    cfg = get_preset(args.model, **({"num_nextn_predict_layers": 0} if args.no_mtp or args.matched else {}))
    if args.matched:
        cfg = cfg.replace(aux_loss_alpha=0.0)
    torch.manual_seed(0)
    model = DeepseekForCausalLM(cfg)
    if args.precision == "fp8":
        model = convert_to_fp8(model, policy=args.fp8_layers) or model
    model = model.to(dev).train()
    optimizer = build_optimizer(model, lr=1e-4, moments_dtype=args.adam_moments_dtype)
    world = SingleProcess(dev)
    mode = resolve_step_mode(None, None, world)
    cuda = dev.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    runner = StepRunner(model, optimizer, world, mode, gamma=1e-3, grad_clip=1.0, autocast=autocast)
    gen = torch.Generator().manual_seed(1)

    def step():
        ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen).to(dev)
        runner((ids[:, :-1], ids[:, 1:]), lr=1e-4)

    for _ in range(6):  # compile, warm up, capture
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        us = (getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)) if cuda else \
            ev.self_cpu_time_total
        if us:
            rows.append((us / args.steps, ev.count / args.steps, ev.key[:100]))
    rows.sort(reverse=True)
    summary = dict(model=args.model, mtp=cfg.num_nextn_predict_layers > 0, precision=args.precision,
                   fp8_layers=args.fp8_layers if args.precision == "fp8" else None, batch=args.batch_size,
                   seq_len=args.seq_len, adam_moments=args.adam_moments_dtype,
                   mode=mode.describe(), device=str(dev),
                   kernels_per_step=round(sum(r[1] for r in rows)), gpu_us_per_step=round(sum(r[0] for r in rows)),
                   wall_ms_per_step=round(wall_ms, 2),
                   peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None)
    print(json.dumps(summary))
    kinds: dict[str, list[float]] = {}
    for us, calls, name in rows:
        totals = kinds.setdefault(kind_of(name), [0.0, 0.0])
        totals[0] += us
        totals[1] += calls
    for kind, (us, calls) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        print(f"{us / 1e3:10.2f} ms x {calls:6.0f}  [{kind}]")
    for us, calls, name in rows[:args.top]:
        print(f"{us:10.1f} us x {calls:6.1f}  {name}")


if __name__ == "__main__":
    try:
        main()
    except CoscaleError as e:  # a bad preset or checkpoint: one line, not a traceback
        raise SystemExit(f"{__file__}: {e}") from None
